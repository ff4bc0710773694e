"""sendmail(8) through a running daemon, and the offline queue while it is down
(tests/data/design/transcripts/sendmail-offline.txt)."""

from __future__ import annotations

import email
import email.policy
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
from harness import (
    PIGEON,
    PigeonDaemon,
    Workdir,
    free_port,
    mail_uid_gid,
    maildir_messages,
    wait_for,
)

from pigeon.queue import offline

SENDMAIL = [sys.executable, "-m", "pigeon.sendmail"]  # the `pigeon-sendmail` entry point


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(
            "".join(f"{n} {uid}:{gid}:{self.mail / n}\n" for n in ("bob", "carol", "root", "sock"))
        )
        self.port = free_port()
        config = f"""table users file:{users}
listen on 127.0.0.1 port {self.port} hostname mx.sendmail.test
action "local" maildir userbase <users>
action "socket-only" maildir userbase <users>
match from socket for rcpt-to "sock@example.test" action "socket-only"
match from local for domain "example.test" action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def sendmail(self, args: list[str], message: bytes, *, cli: bool = False) -> int:
        command = [*PIGEON, "sendmail"] if cli else SENDMAIL
        result = subprocess.run(
            [*command, "--spool", str(self.daemon.spool), *args],
            input=message,
            capture_output=True,
            timeout=30,
        )
        assert not result.stderr, result.stderr
        return result.returncode

    def inbox(self, user: str) -> list[EmailMessage]:
        out = []
        for raw in maildir_messages(self.mail / user / "Maildir"):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out

    def find(self, user: str, subject: str) -> list[EmailMessage]:
        return [m for m in self.inbox(user) if m["Subject"] == subject]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.work.cleanup()


def test_t_with_full_name_as_in_the_transcript(site: Site) -> None:
    message = (
        b"Subject: via sendmail online\nTo: bob@example.test\nBcc: carol@example.test\n\n"
        b"hello from sendmail -t\n"
    )
    status = site.sendmail(["-t", "-F", "Root User", "-f", "root@example.test"], message)
    assert status == 0
    wait_for(lambda: site.find("bob", "via sendmail online"), what="bob's copy")
    wait_for(lambda: site.find("carol", "via sendmail online"), what="the Bcc copy")
    got = site.find("bob", "via sendmail online")[0]
    assert got["Return-Path"] == "<root@example.test>"
    assert got["From"] == "Root User <root@example.test>"
    assert got["To"] == "bob@example.test"
    assert got["Bcc"] is None
    assert got["Date"] is not None and got["Message-ID"] is not None
    received = str(got["Received"])
    assert received.startswith("from localhost (localhost [local])")
    assert "with ESMTPA id" in received
    assert got.get_content() == "hello from sendmail -t\n"
    log = site.daemon.log()
    assert " smtp connected address=local host=localhost" in log
    assert "from=<root@example.test> to=<bob@example.test>" in log


def test_pigeon_sendmail_goes_through_from_socket_rules(site: Site) -> None:
    status = site.sendmail(
        ["-oi", "-bm", "sock@example.test"], b"Subject: socket rule\n\nx\n", cli=True
    )
    assert status == 0
    wait_for(lambda: site.find("sock", "socket rule"), what="delivery by the socket rule")
    got = site.find("sock", "socket rule")[0]
    # No -f: the submitting user at this host, in the envelope and the added From.
    assert str(got["Return-Path"]).startswith("<") and "@" in str(got["Return-Path"])
    assert got["From"] == str(got["Return-Path"]).strip("<>")


def test_notify_success_brings_a_delivered_report(site: Site) -> None:
    status = site.sendmail(
        ["-f", "root@example.test", "-N", "success", "-V", "envid-QQ42", "bob@example.test"],
        b"Subject: with dsn\n\nreport my delivery\n",
    )
    assert status == 0
    wait_for(lambda: site.find("bob", "with dsn"), what="the delivery")
    subject = "Delivery status notification: delivered"
    wait_for(lambda: site.find("root", subject), what="the success DSN")
    report = site.find("root", subject)[0]
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status_part = next(
        p for p in report.walk() if p.get_content_type() == "message/delivery-status"
    )
    text = status_part.as_string()
    assert "Original-Envelope-Id: envid-QQ42" in text
    assert "Final-Recipient: rfc822; bob@example.test" in text
    assert "Action: delivered" in text and "Status: 2.0.0" in text


def test_refused_recipient_fails_without_storing(site: Site) -> None:
    before = offline.pending(site.daemon.spool)
    result = subprocess.run(
        [*SENDMAIL, "--spool", str(site.daemon.spool), "nobody@elsewhere.invalid"],
        input=b"Subject: refused\n\nx\n",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert b"550" in result.stderr
    assert offline.pending(site.daemon.spool) == before


def test_offline_file_dropped_while_running_is_picked_up(site: Site) -> None:
    sub = offline.Submission("root@example.test", ["bob@example.test"], b"Subject: late\n\nx\n")
    path = offline.write(site.daemon.spool, sub)
    wait_for(lambda: site.find("bob", "late"), timeout=20, what="the offline pick-up")
    wait_for(lambda: not path.exists(), what="the offline file to go")


def test_offline_queue_while_down_then_delivered_at_start(workdir: Workdir) -> None:
    mail = workdir.mailroot()
    uid, gid = mail_uid_gid()
    users = workdir.path / "users"
    users.write_text(f"bob {uid}:{gid}:{mail / 'bob'}\n")
    port = free_port()
    conf = f"""table users file:{users}
listen on 127.0.0.1 port {port}
action "local" maildir userbase <users>
match from local for domain "example.test" action "local"
"""
    daemon = PigeonDaemon(workdir.path, conf, port=port)
    daemon.start()
    daemon.stop()  # leaves the spool (and its offline/ directory) behind
    offline_dir = daemon.spool / "offline"
    assert stat.S_IMODE(os.stat(offline_dir).st_mode) == 0o3733
    args = ["-f", "root@example.test", "-N", "success,failure", "-V", "envid-OFF"]
    result = subprocess.run(
        [*SENDMAIL, "--spool", str(daemon.spool), *args, "bob@example.test"],
        input=b"Subject: via sendmail offline\n\nqueued while down\n",
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr  # stored safely: 0 (OpenSMTPD says 75)
    files = list(offline_dir.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o640
    assert os.stat(files[0]).st_uid == os.getuid()
    daemon.start()
    try:
        maildir = mail / "bob" / "Maildir"
        wait_for(lambda: len(maildir_messages(maildir)) == 1, what="the offline message")
        assert b"queued while down" in maildir_messages(maildir)[0]
        wait_for(lambda: not any(offline_dir.iterdir()), what="the offline file to go")
    finally:
        daemon.stop()
