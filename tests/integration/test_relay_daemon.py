"""Mail relayed by a running daemon: smarthost, MX lookup on a loopback DNS server,
one transaction per message, remote refusals bounced to the sender. Every test runs with the
relay in the daemon (``--relay in-process``) and in the relay worker (the default)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession
from dnsserver import DNSTestServer
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from sinks import Received, RecordingHandler

SRS_KEY = "a secret of the forwarder"
SLOW_REPLY = 1.5  # seconds the sink waits before its final reply to a "slow" recipient


@dataclass
class SinkHandler(RecordingHandler):
    """Accepts everything except recipients starting with ``reject`` (refused) or ``later``
    (temporarily refused); for ``slow`` ones it takes its time before its final reply."""

    slow_started: list[bytes] = field(default_factory=list)  # bodies it is taking slowly
    data_reply: ClassVar[str] = "250 2.0.0 Ok queued"

    def refuse_rcpt(self, address: str) -> str | None:
        if address.startswith("reject"):
            return "550 5.1.1 No such user here"
        if address.startswith("later"):
            return "451 4.3.0 Try again later"
        return None

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        if any(str(rcpt).startswith("slow") for rcpt in envelope.rcpt_tos):
            self.slow_started.append(bytes(envelope.original_content or b""))
            await asyncio.sleep(SLOW_REPLY)
        return await super().handle_DATA(server, session, envelope)


class Site:
    def __init__(self, dns: DNSTestServer, relay_mode: str) -> None:
        self.handler = SinkHandler()
        self.sink_port = free_port()
        self.sink = Controller(self.handler, hostname="127.0.0.1", port=self.sink_port)
        self.sink.start()
        dns.add_mx("mx-routed.test", 10, "mx1.mx-routed.test")
        dns.add_a("mx1.mx-routed.test", "127.0.0.1")
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        virtuals = self.work.path / "virtuals"
        virtuals.write_text("fwd@forward.test forwarded@smarthost.test\n")
        self.port = free_port()
        config = f"""srs key "{SRS_KEY}"
table users file:{users}
table virtuals file:{virtuals}
listen on 127.0.0.1 port {self.port} hostname mx.local.test
action "local" maildir userbase <users>
action "virtual" maildir virtual <virtuals> userbase <users>
action "smarthost" relay host smtp+notls://127.0.0.1:{self.sink_port} helo relay.local.test srs
action "mx" relay
action "plain" relay host smtp+notls://127.0.0.1:{self.sink_port}
match from any for domain "mx.local.test" action "local"
match from any for domain "forward.test" action "virtual"
match from local for domain "smarthost.test" action "smarthost"
match from local for domain "mx-routed.test" action "mx"
match from local for domain "plain.test" action "plain"
"""
        self.daemon = PigeonDaemon(
            self.work.path,
            config,
            port=self.port,
            extra=[
                *("--resolver", f"127.0.0.1:{dns.port}", "--mx-port", str(self.sink_port)),
                *("--relay", relay_mode),
            ],
        )

    def received(self) -> list[Received]:
        return self.handler.received()


@pytest.fixture(scope="module", params=["in-process", "worker"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    with DNSTestServer() as dns:
        s = Site(dns, str(request.param))
        s.daemon.start()
        try:
            yield s
        finally:
            s.daemon.stop()
            s.sink.stop()
            s.work.cleanup()


def send(site: Site, sender: str, rcpts: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail(sender, rcpts, f"Subject: {subject}\r\n\r\nbody\r\n")


def find(site: Site, subject: str) -> list[Received]:
    return [m for m in site.received() if f"Subject: {subject}".encode() in m.data]


def test_smarthost_gets_all_recipients_in_one_transaction(site: Site) -> None:
    send(site, "alice@mx.local.test", ["a@smarthost.test", "b@smarthost.test"], "two rcpts")
    wait_for(lambda: find(site, "two rcpts"), what="the sink to receive it")
    got = find(site, "two rcpts")
    assert len(got) == 1
    assert sorted(got[0].rcpts) == ["a@smarthost.test", "b@smarthost.test"]
    assert got[0].sender == "alice@mx.local.test"
    assert b"Received: from " in got[0].data
    site.daemon.wait_queue_empty()
    assert "mta delivery evpid=" in site.daemon.log()


def test_mx_lookup_through_the_configured_resolver(site: Site) -> None:
    send(site, "alice@mx.local.test", ["carol@mx-routed.test"], "via mx")
    wait_for(lambda: find(site, "via mx"), what="delivery to the MX")
    assert find(site, "via mx")[0].rcpts == ["carol@mx-routed.test"]


def test_remote_refusal_bounces_to_sender(site: Site) -> None:
    send(site, "alice@mx.local.test", ["reject@smarthost.test", "ok@smarthost.test"], "mixed")
    wait_for(lambda: find(site, "mixed"), what="the accepted recipient")
    assert find(site, "mixed")[0].rcpts == ["ok@smarthost.test"]

    def bounce() -> bytes | None:
        for m in maildir_messages(site.mail / "alice" / "Maildir"):
            if b"reject@smarthost.test" in m and b"multipart/report" in m:
                return m
        return None

    wait_for(lambda: bounce() is not None, what="the bounce")
    raw = bounce()
    assert raw is not None
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    text = raw.decode()
    assert "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in text
    assert "ok@smarthost.test" not in text.split("message/delivery-status")[1].split("--")[0]


def test_outside_sender_cannot_relay(site: Site) -> None:
    # 127.0.0.2 is not one of this host's addresses: not "local", so no relaying.
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("outside.example")
        c.mail("spammer@example.org")
        code, _ = c.rcpt("victim@smarthost.test")
        assert code == 550


def test_forwarded_mail_gets_srs_sender_and_its_bounce_comes_back(site: Site) -> None:
    # An outside sender writes to a virtual address that forwards to another domain.
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("alice@mx.local.test", ["fwd@forward.test"], "Subject: forwarded\r\n\r\nx\r\n")
    wait_for(lambda: find(site, "forwarded"), what="the forwarded copy")
    got = find(site, "forwarded")[0]
    assert got.rcpts == ["forwarded@smarthost.test"]
    srs_sender = got.sender
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith("@forward.test"), srs_sender
    assert "=mx.local.test=alice@" in srs_sender

    # The next hop bounces it to the SRS address: it goes back to the original sender.
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.sendmail("", [srs_sender], "Subject: bounce of forwarded\r\n\r\nfailed\r\n")
    wait_for(
        lambda: any(
            b"bounce of forwarded" in m for m in maildir_messages(site.mail / "alice" / "Maildir")
        ),
        what="the bounce at the original sender",
    )

    # A forged SRS address (bad hash) is refused outright.
    forged = "SRS0=AAAA" + srs_sender[9:]
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("outside.example")
        c.mail("")
        code, text = c.rcpt(forged)
        assert code == 550 and b"5.7.1" in text, text


def test_queue_views_show_what_the_relay_agent_did(site: Site) -> None:
    send(site, "alice@mx.local.test", ["dora@smarthost.test"], "for the views")
    wait_for(lambda: find(site, "for the views"), what="the sink to receive it")
    site.daemon.wait_queue_empty()

    def lines(view: str) -> list[str]:
        return site.daemon.ctl("show", view).stdout.splitlines()

    stats = {line.split("|")[0]: line.split("|") for line in lines("hoststats")}
    assert stats["smarthost.test"][2] == "250 2.0.0 Ok queued"
    assert stats["smarthost.test"][1].isdigit()
    relays = lines("relays")
    assert any(
        line.startswith(f"[relay:127.0.0.1,port={site.sink_port},smtp+notls] refcount=")
        for line in relays
    ), relays
    assert any(line.startswith("127.0.0.1 127.0.0.1 refcount=") for line in lines("hosts"))
    assert any(" <-> 127.0.0.1 (127.0.0.1) " in line for line in lines("routes"))


def test_busy_route_refusals_bounce_and_tempfails_stay_queued(site: Site) -> None:
    """A route in use (the worker takes its mail without a task per message): a refused
    recipient is bounced, a temporarily refused one stays queued, the rest is delivered."""
    send(site, "alice@mx.local.test", ["warm@plain.test"], "warm-up")
    wait_for(lambda: find(site, "warm-up"), what="the first message")
    for i in range(3):
        send(
            site,
            "alice@mx.local.test",
            [f"ok{i}@plain.test", f"reject{i}@plain.test", f"later{i}@plain.test"],
            f"busy {i}",
        )
    for i in range(3):
        wait_for(lambda i=i: find(site, f"busy {i}"), what=f"message {i}")  # type: ignore[misc]
        assert find(site, f"busy {i}")[0].rcpts == [f"ok{i}@plain.test"]

    def bounced(i: int) -> bool:
        return any(
            f"reject{i}@plain.test".encode() in m and b"multipart/report" in m
            for m in maildir_messages(site.mail / "alice" / "Maildir")
        )

    wait_for(lambda: all(bounced(i) for i in range(3)), what="the three bounces")

    def queued() -> list[str]:
        return site.daemon.ctl("show", "queue").stdout.splitlines()

    wait_for(
        lambda: sum("later" in line and "plain.test" in line for line in queued()) == 3,
        what="the three delayed recipients to wait in the queue",
    )
    later = [line for line in queued() if "plain.test" in line]
    assert len(later) == 3 and all("451 4.3.0 Try again later" in line for line in later), later
    # Clean up for the other tests: they expect an empty queue.
    site.daemon.ctl("remove", "all")


def test_a_delivery_under_way_at_shutdown_is_recorded_not_sent_again(site: Site) -> None:
    """Stopped while the next hop is still taking a message: the daemon waits for the
    answer and records it, so the restart does not send that message a second time.
    (Last in the module: it restarts the daemon.)"""
    send(site, "alice@mx.local.test", ["slow@plain.test"], "at shutdown")
    wait_for(
        lambda: any(b"Subject: at shutdown" in m for m in site.handler.slow_started),
        what="the sink to be taking it",
    )
    site.daemon.stop()
    assert len(find(site, "at shutdown")) == 1
    assert "waiting up to 5s for 1 delivery(ies) under way" in site.daemon.log()
    site.daemon.start()
    site.daemon.wait_queue_empty()  # a copy still queued would be sent again before this
    assert len(find(site, "at shutdown")) == 1
