"""Delivery outcomes through a running daemon: 4xx/5xx per transaction and per recipient,
RFC 3464 reports (failed, delayed, expired, relayed), NOTIFY, aggregation, mta limits."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import ClassVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from sinks import RecordingHandler

HOST = "mx.dsn.test"
EXPIRY = 6


@dataclass
class SinkHandler(RecordingHandler):
    """451 for recipients starting "soft", 550 for "reject", 550 at MAIL for "refused";
    "slow" messages take 0.3 s in DATA (to see concurrent sessions)."""

    active: int = 0
    most_active: int = 0
    data_reply: ClassVar[str] = "250 2.0.0 Ok queued"

    async def handle_MAIL(
        self,
        server: AioSMTP,
        session: AioSession,
        envelope: AioEnvelope,
        address: str,
        opts: list[str],
    ) -> str:
        if address.startswith("refused"):
            return "550 5.7.1 Sender refused here"
        envelope.mail_from = address
        return "250 2.0.0 Ok"

    def refuse_rcpt(self, address: str) -> str | None:
        if address.startswith("soft"):
            return "451 4.3.0 Try again later"
        if address.startswith("reject"):
            return "550 5.1.1 No such user here"
        return None

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        if b"Subject: slow" in bytes(envelope.original_content or b""):
            await asyncio.sleep(0.3)
        with self.lock:
            self.active -= 1
        return await super().handle_DATA(server, session, envelope)

    @property
    def subjects(self) -> list[str]:
        return [
            m.data.split(b"Subject: ", 1)[-1].split(b"\r\n", 1)[0].decode() for m in self.received()
        ]


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(
            "".join(f"{n} {uid}:{gid}:{self.mail / n}\n" for n in ("alice", "refused"))
        )
        self.handler = SinkHandler()
        self.sink_port = free_port()
        self.sink = Controller(self.handler, hostname="127.0.0.1", port=self.sink_port)
        self.port = free_port()
        config = f"""bounce warn-interval 1s
mta limit max-conn-per-host 1
table users file:{users}
listen on 127.0.0.1 port {self.port} hostname {HOST}
action "local" maildir userbase <users>
action "sink" relay host smtp+notls://127.0.0.1:{self.sink_port}
action "short" relay host smtp+notls://127.0.0.1:{self.sink_port} ttl {EXPIRY}s
match from any for domain "{HOST}" action "local"
match from any for domain "expire.test" action "short"
match from any for domain "sink.test" action "sink"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def send(
        self,
        rcpts: list[str],
        subject: str,
        *,
        sender: str = f"alice@{HOST}",
        notify: str | None = None,
        envid: str | None = None,
    ) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail(sender, [f"ENVID={envid}"] if envid else [])
            for rcpt in rcpts:
                client.rcpt(rcpt, [f"NOTIFY={notify}"] if notify else [])
            code, _ = client.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n")
        assert code == 250

    def reports(self, about: str, kind: str, user: str = "alice") -> list[EmailMessage]:
        """Notices in ``user``'s mailbox of ``kind`` for the message with subject ``about``."""
        out = []
        for raw in maildir_messages(self.mail / user / "Maildir"):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            if msg["Subject"] != f"Delivery status notification: {kind}":
                continue
            if f"Subject: {about}\r\n".encode() in raw or f"Subject: {about}\n".encode() in raw:
                out.append(msg)
        return out


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.sink.start()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.sink.stop()
        s.work.cleanup()


def delivery_status(report: EmailMessage) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The per-message fields and the per-recipient field groups of a DSN."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    groups: list[dict[str, str]] = []
    for block in parts[1].get_payload():  # type: ignore[union-attr]
        groups.append({k: str(v) for k, v in block.items()})
    return groups[0], groups[1:]


def test_per_recipient_outcomes_in_one_transaction(site: Site) -> None:
    site.send(["ok@sink.test", "reject1@sink.test", "soft1@sink.test"], "mixed")
    wait_for(lambda: "mixed" in site.handler.subjects, what="the accepted copy")
    wait_for(lambda: site.reports("mixed", "failed"), what="the failure report")
    rows = [r for r in site.daemon.queue() if r["dest"] == "soft1@sink.test"]
    assert len(rows) == 1
    assert rows[0]["retry"] == 1 and rows[0]["errorline"] == "451 4.3.0 Try again later"
    _, recipients = delivery_status(site.reports("mixed", "failed")[0])
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; reject1@sink.test"]
    assert recipients[0]["Status"] == "5.1.1"
    assert recipients[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    site.daemon.ctl("remove", str(rows[0]["evpid"]))


def test_recipients_failing_together_get_one_report(site: Site) -> None:
    site.send(["reject2@sink.test", "reject3@sink.test"], "two refused")
    wait_for(lambda: site.reports("two refused", "failed"), what="the report")
    site.daemon.wait_queue_empty()
    reports = site.reports("two refused", "failed")
    assert len(reports) == 1
    _, recipients = delivery_status(reports[0])
    assert sorted(r["Final-Recipient"] for r in recipients) == [
        "rfc822; reject2@sink.test",
        "rfc822; reject3@sink.test",
    ]
    text = reports[0].get_body(("plain",))
    assert text is not None and "reject2@sink.test: 550 5.1.1" in text.get_content()


def test_sender_refused_at_mail_fails_every_recipient(site: Site) -> None:
    site.send(["a@sink.test", "b@sink.test"], "bad sender", sender=f"refused@{HOST}")
    wait_for(lambda: site.reports("bad sender", "failed", "refused"), what="the report")
    _, recipients = delivery_status(site.reports("bad sender", "failed", "refused")[0])
    assert len(recipients) == 2
    assert {r["Status"] for r in recipients} == {"5.7.1"}
    assert "bad sender" not in site.handler.subjects


def test_notify_never_suppresses_the_failure_report(site: Site) -> None:
    site.send(["reject4@sink.test"], "never tell", notify="NEVER")
    site.send(["reject5@sink.test"], "tell me")  # sent after: its report comes after
    wait_for(lambda: site.reports("tell me", "failed"), what="the control report")
    site.daemon.wait_queue_empty()
    assert site.reports("never tell", "failed") == []


def test_relayed_notice_when_the_next_hop_lacks_dsn(site: Site) -> None:
    site.send(["happy@sink.test"], "relay success", notify="SUCCESS", envid="env-77")
    wait_for(lambda: site.reports("relay success", "relayed"), what="the relayed notice")
    per_message, recipients = delivery_status(site.reports("relay success", "relayed")[0])
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Original-Envelope-Id"] == "env-77"
    assert recipients[0]["Final-Recipient"] == "rfc822; happy@sink.test"
    assert recipients[0]["Action"] == "relayed"
    assert recipients[0]["Status"] == "2.0.0"


def test_delayed_warning_then_failed_notice_on_expiry(site: Site) -> None:
    site.send(["soft-expiring@expire.test"], "will expire")
    wait_for(lambda: site.reports("will expire", "delayed"), what="the delay warning")
    delayed = site.reports("will expire", "delayed")[0]
    per_message, recipients = delivery_status(delayed)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert "Arrival-Date" in per_message
    (rcpt,) = recipients
    assert rcpt["Final-Recipient"] == "rfc822; soft-expiring@expire.test"
    assert rcpt["Action"] == "delayed"
    assert rcpt["Status"] == "4.3.0"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
    assert "Will-Retry-Until" in rcpt and "Last-Attempt-Date" in rcpt
    text = delayed.get_body(("plain",))
    assert text is not None and "temporary failure" in text.get_content()
    assert delayed["To"] == f"alice@{HOST}"
    assert delayed["From"] == f"Mailer Daemon <MAILER-DAEMON@{HOST}>"

    wait_for(
        lambda: site.reports("will expire", "failed"), timeout=EXPIRY + 15, what="the expiry notice"
    )
    failed = site.reports("will expire", "failed")[0]
    _, recipients = delivery_status(failed)
    (rcpt,) = recipients
    # OpenSMTPD 6.8 sends "delayed" wording here; the mail is dropped, so: failed.
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "4.4.7"
    text = failed.get_body(("plain",))
    assert text is not None and "Envelope expired" in text.get_content()
    assert "re-send" not in text.get_content()
    assert [r for r in site.daemon.queue() if r["dest"] == "soft-expiring@expire.test"] == []
    assert "stat=Envelope expired" in site.daemon.log()
    assert len(site.reports("will expire", "delayed")) == 1  # one warning per threshold


def test_max_conn_per_host_limits_concurrent_sessions(site: Site) -> None:
    threads = [
        threading.Thread(target=site.send, args=([f"c{i}@sink.test"], f"slow {i}"))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    wait_for(
        lambda: sum(s.startswith("slow ") for s in site.handler.subjects) == 4,
        what="the four slow messages",
    )
    assert site.handler.most_active == 1
