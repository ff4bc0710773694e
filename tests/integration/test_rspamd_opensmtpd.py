"""Compat: ``pigeon-filter-rspamd`` under Debian's OpenSMTPD 6.8 against a real rspamd.

smtpd 6.8 has its spool (/var/spool/smtpd) and control socket (/var/run/smtpd.sock)
compiled in, so it runs in a private mount namespace (``unshare -m``) where a temporary
directory is bind-mounted over /var/spool and /run: nothing of the host is touched. Needs
root (smtpd refuses to start otherwise, and so does unshare -m).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from harness import Workdir, free_port, maildir_messages, wait_for
from rspamdserver import GTUBE, GTUBE_ADD_HEADER, RspamdServer, shared_rspamd

SMTPD = "/usr/sbin/smtpd"
HOSTNAME = "mx.example.test"


def _skip_reason() -> str | None:
    if not os.path.exists(SMTPD):
        return "OpenSMTPD is not installed (Debian package opensmtpd)"
    if os.geteuid() != 0:
        return "OpenSMTPD needs root (smtpd and unshare -m refuse to run otherwise)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


class OpenSmtpd:
    def __init__(self, rspamd_url: str) -> None:
        self.work = Workdir()
        self.port = free_port()
        root = self.work.path
        (root / "spool").mkdir()
        (root / "run").mkdir()
        self.maildir = root / "maildir"
        self.maildir.mkdir()
        os.chmod(self.maildir, 0o777)
        (root / "vusers").write_text("@example.test nobody\n")
        # Run as root: the filter must import Pigeon from this checkout, whoever owns it.
        command = f"{sys.executable} -m pigeon.filters.rspamd_cli -url {rspamd_url}"
        self.conf = root / "smtpd.conf"
        self.conf.write_text(
            f"table vusers file:{root / 'vusers'}\n"
            f'filter "rspamd" proc-exec "{command}" user root group root\n'
            f'listen on 127.0.0.1 port {self.port} hostname {HOSTNAME} filter "rspamd"\n'
            f'action "local" maildir "{self.maildir}" virtual <vusers>\n'
            'match from any for domain "example.test" action "local"\n'
        )
        os.chmod(self.conf, 0o644)
        script = (
            f"mount --bind {root / 'spool'} /var/spool && "
            f"mount --bind {root / 'run'} /run && "
            f"exec {SMTPD} -d -f {self.conf}"
        )
        self.log_path = root / "smtpd.log"
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115
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


@pytest.fixture(scope="module")
def smtpd() -> Iterator[OpenSmtpd]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    rspamd: RspamdServer = shared_rspamd()
    server = OpenSmtpd(rspamd.url)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def _transaction(port: int, subject: str, body: str) -> tuple[int, bytes, int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(
            f"From: alice@example.org\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"X-Spam: forged\r\n\r\n{body}\r\n".encode()
        )
        return code, text, client.noop()[0]


def _delivered(smtpd: OpenSmtpd, subject: str) -> email.message.Message:
    def find() -> email.message.Message | None:
        for raw in maildir_messages(smtpd.maildir):
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            if msg["Subject"] == subject:
                return msg
        return None

    wait_for(lambda: find() is not None, timeout=30, what=f"smtpd delivery of {subject!r}")
    found = find()
    assert found is not None
    return found


def test_opensmtpd_delivers_clean_mail_scanned_by_pigeon_filter(smtpd: OpenSmtpd) -> None:
    code, _, _ = _transaction(smtpd.port, "clean via smtpd", "Hello Bob.")
    assert code == 250, smtpd.log()[-3000:]
    msg = _delivered(smtpd, "clean via smtpd")
    assert str(msg["Authentication-Results"]).startswith(HOSTNAME)  # MTA-Name from smtpd
    assert msg["X-Spam-Action"] == "no action"
    assert msg.get_all("X-Spam") is None  # the forged one was removed on rspamd's request


def test_opensmtpd_rejects_gtube_and_keeps_the_session(smtpd: OpenSmtpd) -> None:
    code, text, after = _transaction(smtpd.port, "gtube via smtpd", GTUBE)
    assert (code, text) == (550, b"Gtube pattern"), smtpd.log()[-3000:]
    assert after == 250


def test_opensmtpd_junk_mark_from_pigeon_filter(smtpd: OpenSmtpd) -> None:
    code, _, _ = _transaction(smtpd.port, "junk via smtpd", GTUBE_ADD_HEADER)
    assert code == 250
    msg = _delivered(smtpd, "junk via smtpd")
    assert msg["X-Spam"] == "yes" and msg["X-Spam-Action"] == "add header"
