"""Filter faults never take Pigeon down: the session gets 421, the filter is restarted."""

from __future__ import annotations

import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

HOST = "mx.faults.test"
BIN = Path(__file__).parent / "filterbin"


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        self.logs = self.work.mailroot("logs")
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        self.port = free_port()
        self.other = free_port()
        self.seen = self.logs / "faulty.log"
        config = f"""
table users file:{users}
filter faulty proc-exec "/usr/bin/python3 {BIN / "faulty.py"} {self.seen}" timeout 2s
filter calm proc-exec "/usr/bin/python3 {BIN / "recorder.py"} {self.logs / "calm.log"}"
listen on 127.0.0.1 port {self.port} hostname {HOST} filter faulty
listen on 127.0.0.1 port {self.other} hostname {HOST} filter calm
action "local" maildir userbase <users>
match from any for any action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def delivered(self, subject: str) -> bool:
        maildir = self.mail / "alice" / "Maildir"
        return any(f"Subject: {subject}".encode() in m for m in maildir_messages(maildir))


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def send(port: int, sender: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example.net")
        client.sendmail(sender, [f"alice@{HOST}"], f"Subject: {subject}\r\n\r\nbody\r\n")


def mail_from_fails_temporarily(port: int, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example.net")
        code, _ = client.mail(sender)
        return code


def works_again(site: Site, subject: str) -> None:
    """After the fault, the restarted filter serves a new session normally."""
    deadline = time.monotonic() + 20
    while True:
        try:
            send(site.port, "ok@example.net", subject)
            break
        except smtplib.SMTPException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    wait_for(lambda: site.delivered(subject), what=subject)
    assert site.daemon.proc is not None and site.daemon.proc.poll() is None


@pytest.mark.parametrize("fault", ["crash", "garbage", "wrongtoken", "badword", "wrongphase"])
def test_fault_gives_421_and_the_filter_is_restarted(site: Site, fault: str) -> None:
    send(site.port, "ok@example.net", f"before-{fault}")  # accepted before the fault
    assert mail_from_fails_temporarily(site.port, f"{fault}@example.net") == 421
    works_again(site, f"after-{fault}")
    wait_for(lambda: site.delivered(f"before-{fault}"), what="mail accepted before the fault")
    log = site.daemon.log()
    assert "faulty" in log and "restarting" in log


def test_hung_filter_times_out_without_blocking_other_sessions(site: Site) -> None:
    result: list[int] = []
    hung = threading.Thread(
        target=lambda: result.append(mail_from_fails_temporarily(site.port, "hang@example.net"))
    )
    started = time.monotonic()
    hung.start()
    time.sleep(0.3)
    send(site.other, "ok@example.net", "other-listener-during-hang")  # not blocked
    assert time.monotonic() - started < 1.9
    hung.join(15)
    assert result == [421]
    assert "no answer to the mail-from request within 2s" in site.daemon.log()
    works_again(site, "after-hang")


def test_filter_originated_report_line_is_broadcast_not_fatal(site: Site) -> None:
    send(site.port, "report@example.net", "reported")
    wait_for(lambda: site.delivered("reported"), what="reported")
    wait_for(lambda: "|filter-report|" in site.seen.read_text(), what="filter-report")
    assert "|proc|faulty|hello from the filter" in site.seen.read_text()


def test_a_client_leaving_at_once_is_no_filter_failure_and_disconnect_is_last(
    site: Site,
) -> None:
    """A port scanner connects and closes while the connect request is with the filter:
    not a filter failure (no restart, no 421 for the filter's other sessions), and nothing
    reaches the filter after that session's link-disconnect (filters drop the session there
    and may die on a later event; smtpd sends none)."""
    import socket

    calm = site.logs / "calm.log"
    wait_for(lambda: calm.exists(), what="the calm filter")
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", site.other), timeout=5):
            pass
    time.sleep(1.0)
    send(site.other, "ok@example.net", "after the scanner")
    lines = calm.read_text().splitlines()
    disconnected: set[str] = set()
    for line in lines:
        fields = line.split("|")
        if fields[0] not in ("report", "filter") or len(fields) < 6:
            continue
        session = fields[5]
        assert session not in disconnected, f"after link-disconnect: {line}"
        if fields[0] == "report" and fields[4] == "link-disconnect":
            disconnected.add(session)
    assert len(disconnected) >= 30
    assert "filter-failure filter=calm" not in site.daemon.log()
