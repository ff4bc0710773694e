"""Delivery to a real Dovecot over LMTP, the usual setup of a Dovecot host
(design/confs/07-virtual-lmtp-dovecot.conf): ``lmtp "<socket>" rcpt-to virtual <virtuals>``.

A private Dovecot (Debian packages dovecot-core and dovecot-lmtpd, which CI installs) runs
with its own configuration, runtime directory and mail store in a temporary directory, and
listens on a UNIX socket and on a TCP port of 127.0.0.1. Needs root (Dovecot starts as root
and delivers as the mail user).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import shutil
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

from harness import PigeonDaemon, Workdir, free_port, maildir_messages, wait_for

DOVECOT = "/usr/sbin/dovecot"
MAIL_UID = 65534  # nobody: Dovecot stores mail as this user
DOMAIN = "example.test"


class Dovecot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / "run"
        self.mail = root / "mail"
        for path in (root, self.run, root / "state", self.mail):
            path.mkdir()
        os.chown(self.mail, MAIL_UID, MAIL_UID)
        os.chmod(root, 0o755)
        users = root / "users"
        users.write_text(
            "".join(
                f"{name}@{DOMAIN}::{MAIL_UID}:{MAIL_UID}::{self.mail / name}::\n"
                for name in ("alice", "bob")
            )
        )
        self.port = free_port()
        self.socket = self.run / "lmtp"
        self.log = root / "dovecot.log"
        self.conf = root / "dovecot.conf"
        self.conf.write_text(
            f"""
base_dir = {self.run}
state_dir = {root / "state"}
log_path = {self.log}
protocols = lmtp
ssl = no
listen = 127.0.0.1
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
"""
        )
        self.start()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, what="Dovecot")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dovecot exited: {self.log.read_text(errors='replace')}")

    def inbox(self, user: str) -> list[bytes]:
        return maildir_messages(self.mail / user / "Maildir")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.dovecot = Dovecot(self.work.path / "dovecot")
        virtuals = self.work.path / "virtuals"
        virtuals.write_text(
            f"alice@{DOMAIN} vmail\n"
            f"bob@{DOMAIN} vmail\n"
            f"ghost@{DOMAIN} vmail\n"  # known here, unknown to Dovecot
            f"sales@{DOMAIN} alice@{DOMAIN}, bob@{DOMAIN}\n"
        )
        self.port = free_port()
        config = f"""
table virtuals file:{virtuals}
listen on 127.0.0.1 port {self.port} hostname mx.{DOMAIN}
action "dovecot" lmtp "{self.dovecot.socket}" rcpt-to virtual <virtuals>
action "dovecot-tcp" lmtp "127.0.0.1:{self.dovecot.port}" rcpt-to virtual <virtuals>
match from any for rcpt-to "bob@{DOMAIN}" action "dovecot-tcp"
match from any for domain "{DOMAIN}" action "dovecot"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def send(self, sender: str, rcpts: list[str], message: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail(sender, rcpts, message)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if not os.path.exists(DOVECOT) or not shutil.which("doveadm"):
        pytest.skip("Dovecot is not installed (Debian packages dovecot-core, dovecot-lmtpd)")
    if os.geteuid() != 0:
        pytest.skip("a private Dovecot needs root")
    s = Site()
    try:
        s.daemon.start()
        yield s
    finally:
        s.daemon.stop()
        s.dovecot.stop()
        s.work.cleanup()


def with_subject(messages: list[bytes], subject: str) -> list[bytes]:
    return [m for m in messages if f"Subject: {subject}".encode() in m]


def test_mail_reaches_the_dovecot_mailbox_over_the_unix_socket(site: Site) -> None:
    body = "Subject: hello dovecot\r\n\r\nGrüße aus Pigeon\r\n".encode()
    site.send("carol@remote.example", [f"alice@{DOMAIN}"], body)
    wait_for(lambda: with_subject(site.dovecot.inbox("alice"), "hello dovecot"), what="delivery")
    [stored] = with_subject(site.dovecot.inbox("alice"), "hello dovecot")
    assert "Grüße aus Pigeon".encode() in stored  # 8-bit body intact
    assert stored.startswith(b"Return-Path: <carol@remote.example>")  # set by Dovecot
    site.daemon.wait_queue_empty()
    assert f"to=<alice@{DOMAIN}> rcpt=<alice@{DOMAIN}> user=vmail" in site.daemon.log()
    assert "result=Ok stat=Delivered" in site.daemon.log()


def test_an_alias_fans_out_over_the_socket_and_tcp(site: Site) -> None:
    site.send("carol@remote.example", [f"sales@{DOMAIN}"], b"Subject: for sales\r\n\r\nx\r\n")
    for user in ("alice", "bob"):  # bob's copy goes through the TCP listener
        wait_for(
            lambda user=user: with_subject(site.dovecot.inbox(user), "for sales"),  # type: ignore[misc]
            what=f"{user}'s copy",
        )
        assert len(with_subject(site.dovecot.inbox(user), "for sales")) == 1
    site.daemon.wait_queue_empty()


def test_a_user_dovecot_does_not_know_is_bounced_to_the_sender(site: Site) -> None:
    site.send(
        f"alice@{DOMAIN}",
        [f"ghost@{DOMAIN}", f"bob@{DOMAIN}"],
        b"Subject: partly unknown\r\n\r\nx\r\n",
    )
    wait_for(lambda: with_subject(site.dovecot.inbox("bob"), "partly unknown"), what="bob's copy")

    def bounce() -> bytes | None:
        for message in site.dovecot.inbox("alice"):
            if b"multipart/report" in message and f"ghost@{DOMAIN}".encode() in message:
                return message
        return None

    wait_for(lambda: bounce() is not None, what="the bounce in alice's mailbox")
    raw = bounce()
    assert raw is not None
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "Status: 5.1.1" in raw.decode()
    assert "User doesn't exist" in raw.decode()  # Dovecot's own words in Diagnostic-Code
    site.daemon.wait_queue_empty()
    assert "result=PermFail" in site.daemon.log()


def test_dovecot_restart_is_a_temporary_failure_then_delivered(site: Site) -> None:
    site.dovecot.stop()
    site.send("carol@remote.example", [f"alice@{DOMAIN}"], b"Subject: while down\r\n\r\nx\r\n")
    wait_for(lambda: "result=TempFail" in site.daemon.log(), what="the temporary failure")
    assert site.daemon.queue(), "the message stays queued"
    # Dovecot comes back; the retry (scheduled at once here) delivers it.
    site.dovecot.start()
    site.daemon.ctl("schedule", "all")
    wait_for(lambda: with_subject(site.dovecot.inbox("alice"), "while down"), what="the retry")
