"""Test helpers: a real Pigeon daemon on 127.0.0.1, started as users start it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PIGEON = [sys.executable, "-m", "pigeon.control.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mail_uid_gid() -> tuple[int, int]:
    """The user local test mailboxes belong to: ourselves, or nobody when we are root."""
    if os.geteuid() == 0:
        return 65534, 65534
    return os.geteuid(), os.getegid()


class Workdir:
    """A directory tree every user can traverse (pytest's tmp dirs are 0700 under root)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="pigeon-it-", dir="/tmp"))
        os.chmod(self.path, 0o755)

    def mailroot(self, name: str = "mail") -> Path:
        root = self.path / name
        root.mkdir(exist_ok=True)
        os.chmod(root, 0o777)
        return root

    def cleanup(self) -> None:
        if not os.environ.get("PIGEON_TEST_KEEP"):  # keep for post-mortems when set
            shutil.rmtree(self.path, ignore_errors=True)


class PigeonDaemon:
    def __init__(self, workdir: Path, config: str, *, port: int, extra: list[str] | None = None):
        self.workdir = workdir
        self.port = port
        self.spool = workdir / "spool"
        self.conf = workdir / "smtpd.conf"
        self.conf.write_text(config)
        self.log_path = workdir / "pigeon.log"
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while it runs
        self.proc = subprocess.Popen(
            [*PIGEON, "run", "-d", "-f", str(self.conf), "--spool", str(self.spool), *self.extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pigeon exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if (self.spool / "control.sock").exists():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"pigeon did not start: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self._log.close()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ctl(self, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*PIGEON, *words, "--spool", str(self.spool)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pigeon {' '.join(words)} failed: {result.stderr}")
        return result

    def stats(self) -> dict[str, object]:
        out = self.ctl("show", "stats", "--json").stdout
        data: dict[str, object] = json.loads(out)
        return data

    def queue(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = json.loads(self.ctl("show", "queue", "--json").stdout)
        return rows

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.queue():
                return
            time.sleep(0.1)
        raise AssertionError(f"queue not empty: {self.queue()}\n{self.log()}")


def maildir_messages(maildir: Path) -> list[bytes]:
    new = maildir / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def wait_for(predicate: object, timeout: float = 20.0, what: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def workdir() -> Iterator[Workdir]:
    w = Workdir()
    yield w
    w.cleanup()


def pigeon_encrypt(password: str) -> str:
    """A crypt(3) hash made by `pigeon encrypt`, as an admin makes one."""
    out = subprocess.run(
        [sys.executable, "-m", "pigeon.control.cli", "encrypt", password],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip()
