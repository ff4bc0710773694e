"""A reload changes filter chains and starts the new filter processes; the old processes
are stopped once the sessions that used them are gone."""

from __future__ import annotations

import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

DOMAIN = "mx.reload-filters.test"
RECORDER = Path(__file__).parent / "filterbin" / "recorder.py"


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        self.users = self.work.path / "users"
        self.users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        self.logs = self.work.mailroot("logs")
        self.port = free_port()
        self.daemon = PigeonDaemon(self.work.path, self.config("first"), port=self.port)

    def config(self, generation: str, *, block_spammer: bool = True) -> str:
        log = self.logs / f"{generation}.log"
        block = 'filter block phase mail-from match mail-from "spammer@example.org" '
        block += 'reject "550 5.7.1 you are blocked"\n'
        chain = "{ block, rec }" if block_spammer else "{ rec }"
        return f"""
table users file:{self.users}
{block if block_spammer else ""}
filter rec proc-exec "{sys.executable} {RECORDER} {log}"
listen on 127.0.0.1 port {self.port} hostname {DOMAIN} filter {chain}
action "local" maildir userbase <users>
match from any for domain "{DOMAIN}" action "local"
"""

    def send(self, sender: str, subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail(sender, [f"alice@{DOMAIN}"], f"Subject: {subject}\r\n\r\nx\r\n")


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def recorder_pids(log: Path) -> set[int]:
    """Running processes whose command line is the recorder writing to ``log``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(RECORDER).encode() in cmdline and str(log).encode() in cmdline:
            found.add(int(entry.name))
    return found


def test_reload_swaps_chains_and_filter_processes(site: Site) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        site.send("spammer@example.org", "blocked before")
    assert refused.value.smtp_code == 550
    site.send("friend@example.org", "first generation")
    first_log = site.logs / "first.log"
    wait_for(lambda: first_log.exists() and "friend@example.org" in first_log.read_text())
    assert recorder_pids(first_log)

    seen_before = len(first_log.read_text())
    site.daemon.conf.write_text(site.config("second", block_spammer=False))
    result = site.daemon.ctl("reload")
    assert "reloaded" in result.stdout

    site.send("spammer@example.org", "allowed after")  # the builtin filter is gone
    second_log = site.logs / "second.log"
    wait_for(lambda: second_log.exists() and "spammer@example.org" in second_log.read_text())
    # The new process got the session, not the old one.
    assert "spammer@example.org" not in first_log.read_text()[seen_before:]
    # No session uses the old process any more: it is stopped.
    wait_for(lambda: not recorder_pids(first_log), timeout=15, what="the old filter to stop")
    assert recorder_pids(second_log)
    wait_for(
        lambda: any(
            b"allowed after" in m for m in maildir_messages(site.mail / "alice" / "Maildir")
        )
    )
