"""Run Debian's real OpenSMTPD 6.8 (/usr/sbin/smtpd) for compat tests.

smtpd 6.8 has its spool (/var/spool/smtpd) and control socket (/var/run/smtpd.sock)
compiled in, so it runs in a private mount namespace (``unshare -m``) where directories of
a temporary tree are bind-mounted over /var/spool and /run: nothing of the host is touched.
Needs root (smtpd refuses to start otherwise, and so does unshare -m). Mail for
``@example.test`` is delivered to the maildir :attr:`OpenSmtpd68.maildir` (as nobody).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from harness import Workdir

SMTPD = "/usr/sbin/smtpd"


def skip_reason() -> str | None:
    """Why OpenSMTPD 6.8 cannot run here, or None."""
    if not os.path.exists(SMTPD):
        return "OpenSMTPD is not installed (Debian package opensmtpd)"
    if os.geteuid() != 0:
        return "OpenSMTPD needs root (smtpd and unshare -m refuse to run otherwise)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


class OpenSmtpd68:
    """``config`` holds the filter and listen lines; the table, action and match for
    ``example.test`` are added here. ``port`` is the listener that :meth:`wait_listening`
    waits for."""

    def __init__(self, config: str, port: int) -> None:
        self.work = Workdir()
        self.port = port
        root = self.work.path
        (root / "spool").mkdir()
        (root / "run").mkdir()
        self.maildir = root / "maildir"
        self.maildir.mkdir()
        os.chmod(self.maildir, 0o777)
        (root / "vusers").write_text("@example.test nobody\n")
        self.conf = root / "smtpd.conf"
        self.conf.write_text(
            f"table vusers file:{root / 'vusers'}\n"
            + config
            + f'\naction "local" maildir "{self.maildir}" virtual <vusers>\n'
            + 'match from any for domain "example.test" action "local"\n'
        )
        os.chmod(self.conf, 0o644)
        script = (
            f"mount --bind {root / 'spool'} /var/spool && "
            f"mount --bind {root / 'run'} /run && "
            f"exec {SMTPD} -d -f {self.conf}"
        )
        self.log_path = root / "smtpd.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpd exited:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"smtpd did not listen:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.work.cleanup()
