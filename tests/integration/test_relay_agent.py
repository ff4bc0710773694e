"""RelayAgent and deliver_lmtp against SMTP/LMTP sinks and a DNS server on 127.0.0.1.

The sink below is a small scriptable ESMTP/LMTP server (STARTTLS with a trustme certificate,
smtps, AUTH PLAIN/LOGIN, per-stage and per-recipient replies) that records what it saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from dnsserver import DNSTestServer

from pigeon.delivery.dns import DNSSettings, MXResolver
from pigeon.delivery.lmtp import deliver_lmtp
from pigeon.delivery.relay import RelayAgent, RelayRoute, RelaySettings
from pigeon.queue.envelope import DSN_FAILURE, DSN_SUCCESS, Envelope, new_evpid
from pigeon.scheduler.scheduler import Outcome

T = TypeVar("T")

BODY = b"Subject: test\r\nFrom: alice@example.org\r\n\r\nhello\r\n.leading dot\r\n"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


# --------------------------------------------------------------------------------------------
# The sink


@dataclass
class Message:
    mail: str  # the MAIL FROM argument as received, e.g. "<a@b> RET=HDRS"
    rcpts: list[str]  # accepted RCPT TO arguments
    body: bytes


@dataclass
class SinkSession:
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    auth_user: str | None = None
    messages: list[Message] = field(default_factory=list)


@dataclass
class Sink:
    """Replies are full reply lines; ``rcpt`` maps a RCPT address to its reply."""

    host: str = "127.0.0.1"
    port: int = 0
    greeting: str = "220 sink.test ESMTP"
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN", "SIZE")
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this context
    implicit_tls: bool = False  # smtps: TLS from the first byte
    broken_tls: bool = False  # say 220 to STARTTLS, then send garbage and hang up
    auth: tuple[str, str] | None = None  # offer AUTH (after TLS) and accept these only
    mail_reply: str = "250 2.1.0 Ok"
    rcpt: dict[str, str] = field(default_factory=dict)
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    eom_reply: str = "250 2.0.0 Ok: queued"
    lmtp: bool = False
    unix_path: str | None = None
    silent: bool = False  # accept the connection, never say anything
    hangup_after: int | None = None  # close the session after this many messages...
    hangup_reply: str | None = None  # ... saying this first
    sessions: list[SinkSession] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Sink:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
        else:
            self._server = await asyncio.start_server(
                self._handle,
                self.host,
                self.port,
                ssl=self.tls if self.implicit_tls else None,
            )
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    @property
    def messages(self) -> list[Message]:
        return [m for s in self.sessions for m in s.messages]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = SinkSession(tls=self.implicit_tls)
        self.sessions.append(session)
        try:
            if self.silent:
                await reader.read()  # until the client gives up
                return
            await self._converse(session, reader, writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _converse(
        self, session: SinkSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await say(self.greeting)
        if not self.greeting.startswith("2"):
            return
        mail: str | None = None
        rcpts: list[str] = []
        while True:
            raw = await reader.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            session.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "LHLO"):
                if (verb == "LHLO") != self.lmtp:
                    await say("500 5.5.1 Wrong protocol")
                    continue
                offered = list(self.extensions)
                if self.tls is not None and not session.tls:
                    offered.append("STARTTLS")
                if self.auth is not None and session.tls:
                    offered.append("AUTH PLAIN LOGIN")
                lines = ["sink.test Hello", *offered]
                for item in lines[:-1]:
                    await say(f"250-{item}")
                await say(f"250 {lines[-1]}")
            elif verb == "HELO":
                await say("250 sink.test")
            elif verb == "STARTTLS" and self.tls is not None and not session.tls:
                await say("220 2.0.0 Ready to start TLS")
                if self.broken_tls:
                    await asyncio.sleep(0.05)  # separate from the 220: a failed handshake
                    writer.write(b"this is not a TLS handshake\r\n" * 20)
                    await writer.drain()
                    return
                await writer.start_tls(self.tls)
                session.tls = True
            elif verb == "AUTH" and self.auth is not None and session.tls:
                user, password = await self._auth(arg, reader, say)
                if (user, password) == self.auth:
                    session.auth_user = user
                    await say("235 2.7.0 Authentication successful")
                else:
                    await say("535 5.7.8 Authentication failed")
            elif verb == "MAIL":
                reply = self.mail_reply
                if reply.startswith("2"):
                    mail, rcpts = arg.partition(":")[2], []
                await say(reply)
            elif verb == "RCPT":
                address = arg.partition(":")[2].split(" ")[0].strip("<>")
                reply = self.rcpt.get(address, "250 2.1.5 Ok")
                if reply.startswith("2"):
                    rcpts.append(arg.partition(":")[2])
                await say(reply)
            elif verb == "DATA":
                if mail is None or not rcpts:
                    await say("503 5.5.1 No recipients")
                    continue
                await say(self.data_reply)
                if not self.data_reply.startswith("3"):
                    continue
                body = await self._read_body(reader)
                session.messages.append(Message(mail, rcpts, body))
                if self.lmtp:
                    for rcpt in rcpts:
                        address = rcpt.split(" ")[0].strip("<>")
                        await say(self.rcpt.get("eom:" + address, "250 2.0.0 Delivered"))
                else:
                    await say(self.eom_reply)
                mail, rcpts = None, []
                if self.hangup_after == len(session.messages):
                    if self.hangup_reply:
                        await say(self.hangup_reply)
                    return
            elif verb == "RSET":
                mail, rcpts = None, []
                await say("250 2.0.0 Reset")
            elif verb == "QUIT":
                await say("221 2.0.0 Bye")
                return
            else:
                await say("502 5.5.2 Command not recognized")

    @staticmethod
    async def _auth(arg: str, reader: asyncio.StreamReader, say: Any) -> tuple[str, str]:
        mechanism, _, initial = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            _, user, password = base64.b64decode(initial).decode().split("\0")
            return user, password
        await say("334 VXNlcm5hbWU6")
        user = base64.b64decode(await reader.readline()).decode()
        await say("334 UGFzc3dvcmQ6")
        password = base64.b64decode(await reader.readline()).decode()
        return user, password

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader) -> bytes:
        lines: list[bytes] = []
        while True:
            line = await reader.readline()
            if line in (b".\r\n", b""):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        server.add_a("mx.test", "127.0.0.1")
        yield server


def agent(
    dns: DNSTestServer, *, mx_port: int = 25, ca_file: str | None = None, **kw: Any
) -> RelayAgent:
    settings = RelaySettings(
        helo="relay.test", mx_port=mx_port, connect_timeout=2, command_timeout=5, ca_file=ca_file
    )
    for key, value in kw.items():
        setattr(settings, key, value)
    return RelayAgent(settings, MXResolver(DNSSettings(["127.0.0.1"], port=dns.port, timeout=1)))


_MSGID = 0x11D0B709


def envelope(dest: str, sender: str = "alice@example.org", **kw: Any) -> Envelope:
    return Envelope(
        evpid=new_evpid(_MSGID),
        dispatcher="relay",
        type="mta",
        sender=sender,
        rcpt=dest,
        dest=dest,
        ctime=int(time.time()),
        **kw,
    )


async def deliver(
    relay: RelayAgent, route: RelayRoute, envs: list[Envelope], **kw: Any
) -> list[Outcome]:
    try:
        results = await relay.deliver(route, envs, BODY, **kw)
    finally:
        await relay.close()
    assert set(results) == {e.evpid for e in envs}
    return [results[e.evpid] for e in envs]


def statuses(outcomes: list[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


# --------------------------------------------------------------------------------------------
# MX delivery


def test_mx_delivery_uses_the_preferred_mx(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink(host="127.0.0.1") as best, Sink(host="127.0.0.3", port=best.port) as other:
            dns.add_mx("example.test", 20, "mx2.example.test")
            dns.add_mx("example.test", 10, "mx1.example.test")
            dns.add_a("mx1.example.test", "127.0.0.1")
            dns.add_a("mx2.example.test", "127.0.0.3")
            outcomes = await deliver(
                agent(dns, mx_port=best.port), RelayRoute(), [envelope("bob@example.test")]
            )
            assert statuses(outcomes) == ["ok"]
            assert outcomes[0].line == "250 2.0.0 Ok: queued"
            assert [m.rcpts for m in best.messages] == [["<bob@example.test>"]]
            assert best.messages[0].body == BODY
            assert best.sessions[0].commands[0] == "EHLO relay.test"
            assert other.sessions == []

    run(scenario())


def test_next_mx_when_the_first_refuses_connections_or_greets_with_4xx(
    dns: DNSTestServer,
) -> None:
    async def scenario() -> None:
        async with (
            Sink(host="127.0.0.1", greeting="421 4.3.2 busy") as busy,
            Sink(host="127.0.0.3", port=busy.port) as good,
        ):
            dns.add_mx("example.test", 5, "dead.example.test")  # nothing listens there
            dns.add_mx("example.test", 10, "busy.example.test")
            dns.add_mx("example.test", 20, "good.example.test")
            dns.add_a("dead.example.test", "127.0.0.2")
            dns.add_a("busy.example.test", "127.0.0.1")
            dns.add_a("good.example.test", "127.0.0.3")
            outcomes = await deliver(
                agent(dns, mx_port=busy.port), RelayRoute(), [envelope("bob@example.test")]
            )
            assert statuses(outcomes) == ["ok"]
            assert len(busy.sessions) == 1 and busy.messages == []
            assert len(good.messages) == 1

    run(scenario())


def test_mta_log_lines_share_their_session_id(
    dns: DNSTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """As smtpd's mta: a session's connecting, error or connected, delivery and disconnected
    lines all start with its id; the delivery line names the source and the relay."""

    async def scenario() -> list[Outcome]:
        async with Sink(host="127.0.0.3") as good:
            dns.add_mx("lines.test", 5, "dead.lines.test")  # nothing listens there
            dns.add_mx("lines.test", 10, "good.lines.test")
            dns.add_a("dead.lines.test", "127.0.0.2")
            dns.add_a("good.lines.test", "127.0.0.3")
            return await deliver(
                agent(dns, mx_port=good.port), RelayRoute(), [envelope("bob@lines.test")]
            )

    with caplog.at_level(logging.INFO, logger="pigeon"):
        assert statuses(run(scenario())) == ["ok"]
    lines = [r.getMessage() for r in caplog.records if " mta " in r.getMessage()]
    by_session: dict[str, list[str]] = {}
    for line in lines:
        sid, _, rest = line.partition(" ")
        assert re.fullmatch(r"[0-9a-f]{16}", sid), line
        by_session.setdefault(sid, []).append(rest)
    dead, good = by_session.values()
    assert dead[0].startswith("mta connecting address=smtp://127.0.0.2:")
    assert dead[1].startswith("mta error reason=connection failed")
    assert good[0].startswith("mta connecting address=smtp://127.0.0.3:")
    assert good[1].startswith("mta connected ")
    assert good[2].startswith("mta delivery evpid=") and (
        'rcpt=<-> source="127.0.0.1" relay="127.0.0.3 (good.lines.test)" delay=0s '
        'result="Ok" stat="250 2.0.0 Ok: queued"' in good[2]
    ), good[2]
    assert good[3] == "mta disconnected reason=quit messages=1"


def test_all_mx_unreachable_is_a_tempfail(dns: DNSTestServer) -> None:
    dns.add_mx("example.test", 10, "dead.example.test")
    dns.add_a("dead.example.test", "127.0.0.2")

    outcomes = run(deliver(agent(dns, mx_port=9), RelayRoute(), [envelope("bob@example.test")]))

    assert statuses(outcomes) == ["tempfail"]
    assert outcomes[0].line.startswith("Network error on destination MXs")


def test_implicit_mx_and_domain_literal(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            dns.add_a("plain.test", "127.0.0.1")
            outcomes = await deliver(
                agent(dns, mx_port=sink.port),
                RelayRoute(),
                [envelope("bob@plain.test"), envelope("carol@[127.0.0.1]")],
            )
            assert statuses(outcomes) == ["ok", "ok"]
            assert sorted(r for m in sink.messages for r in m.rcpts) == [
                "<bob@plain.test>",
                "<carol@[127.0.0.1]>",
            ]

    run(scenario())


@pytest.mark.parametrize(
    ("setup", "status", "text"),
    [
        (lambda d: d.add_null_mx("example.test"), "permfail", "556 5.1.10"),
        (lambda d: None, "permfail", "Domain does not exist"),
        (lambda d: d.servfail("example.test"), "tempfail", "Temporary failure in MX lookup"),
    ],
    ids=["null-mx", "nxdomain", "servfail"],
)
def test_dns_failures_decide_every_envelope(
    dns: DNSTestServer, setup: Any, status: str, text: str
) -> None:
    setup(dns)

    outcomes = run(
        deliver(agent(dns), RelayRoute(), [envelope("a@example.test"), envelope("b@example.test")])
    )

    assert statuses(outcomes) == [status, status]
    assert text in outcomes[0].line


def test_backup_mx_uses_only_better_mxs(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with (
            Sink(host="127.0.0.1") as primary,
            Sink(host="127.0.0.3", port=primary.port) as worse,
        ):
            dns.add_mx("example.test", 10, "primary.example.test")
            dns.add_mx("example.test", 20, "relay.test")  # us
            dns.add_mx("example.test", 30, "worse.example.test")
            dns.add_a("primary.example.test", "127.0.0.2")  # down
            dns.add_a("relay.test", "127.0.0.3")
            dns.add_a("worse.example.test", "127.0.0.3")
            outcomes = await deliver(
                agent(dns, mx_port=primary.port),
                RelayRoute(backup=True),
                [envelope("bob@example.test")],
            )
            assert statuses(outcomes) == ["tempfail"]
            assert worse.sessions == []

    run(scenario())


# --------------------------------------------------------------------------------------------
# Transactions and replies


def test_all_recipients_in_one_transaction_with_dsn_parameters(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            envs = [
                envelope(
                    "dave@sink.test",
                    dsn_notify=DSN_SUCCESS | DSN_FAILURE,
                    dsn_orcpt="rfc822;orig+dave@sink.test",
                    dsn_ret="HDRS",
                    dsn_envid="envid-QQ42",
                ),
                envelope("eve@sink.test", dsn_ret="HDRS", dsn_envid="envid-QQ42"),
            ]
            relayed: set[int] = set()
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                envs,
                dsn_relayed=relayed,
            )
            assert statuses(outcomes) == ["ok", "ok"]
            assert relayed == {envs[0].evpid, envs[1].evpid}
            assert len(sink.sessions) == 1
            [message] = sink.messages
            assert message.mail == f"<alice@example.org> RET=HDRS ENVID=envid-QQ42 SIZE={len(BODY)}"
            assert message.rcpts == [
                "<dave@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+dave@sink.test",
                "<eve@sink.test>",
            ]

    run(scenario())


def test_dsn_parameters_are_dropped_when_the_next_hop_lacks_dsn(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink(extensions=("PIPELINING",)) as sink:
            env = envelope("dave@sink.test", dsn_notify=DSN_SUCCESS, dsn_ret="FULL")
            relayed: set[int] = set()
            outcomes = await deliver(
                agent(dns), RelayRoute(smarthost=f"mx.test:{sink.port}"), [env], dsn_relayed=relayed
            )
            assert statuses(outcomes) == ["ok"]
            assert relayed == set()  # the caller owes the sender a "relayed" notice
            assert sink.messages[0].mail == "<alice@example.org>"
            assert sink.messages[0].rcpts == ["<dave@sink.test>"]

    run(scenario())


def test_per_recipient_replies(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        rcpt = {
            "temp@sink.test": "451 4.2.1 Mailbox busy",
            "gone@sink.test": "550 5.1.1 No such user",
        }
        async with Sink(rcpt=rcpt) as sink:
            envs = [
                envelope("ok@sink.test"),
                envelope("temp@sink.test"),
                envelope("gone@sink.test"),
            ]
            outcomes = await deliver(
                agent(dns), RelayRoute(smarthost=f"smtp://127.0.0.1:{sink.port}"), envs
            )
            assert [(o.status, o.line) for o in outcomes] == [
                ("ok", "250 2.0.0 Ok: queued"),
                ("tempfail", "451 4.2.1 Mailbox busy"),
                ("permfail", "550 5.1.1 No such user"),
            ]
            assert sink.messages[0].rcpts == ["<ok@sink.test>"]

    run(scenario())


@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        ("mail_reply", "550 5.7.1 Sender rejected", "permfail"),
        ("mail_reply", "451 4.7.1 Greylisted", "tempfail"),
        ("data_reply", "554 5.5.1 No thanks", "permfail"),
        ("data_reply", "451 4.3.0 Try later", "tempfail"),
        ("eom_reply", "552 5.3.4 Message too big", "permfail"),
        ("eom_reply", "452 4.3.1 Out of space", "tempfail"),
    ],
)
def test_transaction_wide_replies(dns: DNSTestServer, stage: str, reply: str, status: str) -> None:
    async def scenario() -> None:
        sink = Sink()
        setattr(sink, stage, reply)
        async with sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                [envelope("a@sink.test"), envelope("b@sink.test")],
            )
            assert [(o.status, o.line) for o in outcomes] == [(status, reply)] * 2

    run(scenario())


def test_all_recipients_refused_resets_and_keeps_the_session_usable(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink(rcpt={"gone@sink.test": "550 5.1.1 No such user"}) as sink:
            relay = agent(dns)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            first = await relay.deliver(route, [envelope("gone@sink.test")], BODY)
            second = await relay.deliver(route, [envelope("ok@sink.test")], BODY)
            await relay.close()
            assert [o.status for o in (*first.values(), *second.values())] == ["permfail", "ok"]
            assert len(sink.sessions) == 1
            assert "RSET" in sink.sessions[0].commands

    run(scenario())


def test_sender_override_and_mail_from_option(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            url = f"smtp://mx.test:{sink.port}"
            relay = agent(dns)
            await relay.deliver(
                RelayRoute(smarthost=url, mail_from="bounce@relay.test"),
                [envelope("a@sink.test")],
                BODY,
            )
            await relay.deliver(
                RelayRoute(smarthost=url),
                [envelope("a@sink.test")],
                BODY,
                sender="SRS0=abcd=TT=example.org=alice@relay.test",
            )
            await relay.deliver(
                RelayRoute(smarthost=url), [envelope("a@sink.test", sender="")], BODY
            )
            await relay.close()
            assert [m.mail.split(" ")[0] for m in sink.messages] == [
                "<bounce@relay.test>",
                "<SRS0=abcd=TT=example.org=alice@relay.test>",
                "<>",
            ]

    run(scenario())


# --------------------------------------------------------------------------------------------
# Connection reuse and limits


def test_a_kept_session_carries_the_next_message(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            relay = agent(dns)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            first = await relay.deliver(route, [envelope("a@sink.test")], BODY)
            assert relay.idle_sessions == 1
            second = await relay.deliver(
                route, [envelope("b@sink.test")], BODY, sender="bob@x.test"
            )
            await relay.close()
            assert [o.status for o in (*first.values(), *second.values())] == ["ok", "ok"]
            [session] = sink.sessions
            assert [c.split(":")[0] for c in session.commands] == [
                "EHLO relay.test", "MAIL FROM", "RCPT TO", "DATA",
                "MAIL FROM", "RCPT TO", "DATA", "QUIT",
            ]  # fmt: skip
            assert relay.idle_sessions == 0

    run(scenario())


def test_idle_sessions_end_after_keepalive(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            relay = agent(dns, keepalive=0.2)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            await relay.deliver(route, [envelope("a@sink.test")], BODY)
            await asyncio.sleep(0.6)
            assert relay.idle_sessions == 0
            assert sink.sessions[0].commands[-1] == "QUIT"
            await relay.deliver(route, [envelope("b@sink.test")], BODY)
            await relay.close()
            assert len(sink.sessions) == 2

    run(scenario())


def test_session_mail_limit_opens_a_new_session(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            relay = agent(dns, max_mails_per_session=2)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            for name in "abc":
                await relay.deliver(route, [envelope(f"{name}@sink.test")], BODY)
            await relay.close()
            assert [len(s.messages) for s in sink.sessions] == [2, 1]

    run(scenario())


@pytest.mark.parametrize("hangup_reply", [None, "421 4.4.2 sink.test Idle timeout"])
def test_a_kept_session_closed_by_the_server_is_replaced(
    dns: DNSTestServer, hangup_reply: str | None
) -> None:
    async def scenario() -> None:
        async with Sink(hangup_after=1, hangup_reply=hangup_reply) as sink:
            relay = agent(dns)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            await relay.deliver(route, [envelope("a@sink.test")], BODY)
            await asyncio.sleep(0.1)  # the hang-up reaches us while the session is idle
            second = await relay.deliver(route, [envelope("b@sink.test")], BODY)
            await relay.close()
            assert [o.status for o in second.values()] == ["ok"]
            assert [len(s.messages) for s in sink.sessions] == [1, 1]

    run(scenario())


def test_concurrent_deliveries_respect_max_conn_per_host(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            relay = agent(dns, max_conn_per_host=2, keepalive=0)
            route = RelayRoute(smarthost=f"smtp://mx.test:{sink.port}")
            results = await asyncio.gather(
                *(relay.deliver(route, [envelope(f"u{i}@sink.test")], BODY) for i in range(6))
            )
            await relay.close()
            assert [o.status for r in results for o in r.values()] == ["ok"] * 6
            assert len(sink.messages) == 6

    run(scenario())


# --------------------------------------------------------------------------------------------
# Smarthost URLs, TLS and AUTH


def test_opportunistic_starttls_is_used_when_offered(
    dns: DNSTestServer, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        # The certificate names someone else: opportunistic TLS does not check it.
        async with Sink(tls=server_context(ca, "other.test")) as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["ok"]
            assert sink.sessions[0].tls
            assert sink.sessions[0].commands[:3] == [
                "EHLO relay.test",
                "STARTTLS",
                "EHLO relay.test",
            ]

    with caplog.at_level(logging.INFO, logger="pigeon"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    connected = next(ln for ln in lines if " mta connected " in ln)
    assert " tls=yes " in connected
    sid = connected.split()[0]
    # as smtpd's mta: the session's id, then TLS version, cipher and bits
    assert any(re.fullmatch(rf"{sid} mta tls ciphers=TLSv1\.[23]:\S+:\d+", ln) for ln in lines)


def test_failed_opportunistic_tls_falls_back_to_plain(dns: DNSTestServer, ca: trustme.CA) -> None:
    async def scenario() -> None:
        async with Sink(tls=server_context(ca, "mx.test"), broken_tls=True) as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["ok"]
            assert [s.commands[:2] for s in sink.sessions] == [
                ["EHLO relay.test", "STARTTLS"],
                ["EHLO relay.test", f"MAIL FROM:<alice@example.org> SIZE={len(BODY)}"],
            ]
            assert not sink.sessions[1].tls

    run(scenario())


def test_smtp_tls_url_verifies_and_authenticates(
    dns: DNSTestServer, ca: trustme.CA, ca_file: str
) -> None:
    async def scenario() -> None:
        async with Sink(tls=server_context(ca, "mx.test"), auth=("joe", "s3cret")) as sink:
            outcomes = await deliver(
                agent(dns, ca_file=ca_file),
                RelayRoute(
                    smarthost=f"smtp+tls://label@mx.test:{sink.port}", auth=("joe", "s3cret")
                ),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["ok"]
            assert sink.sessions[0].tls
            assert sink.sessions[0].auth_user == "joe"
            assert len(sink.messages) == 1

    run(scenario())


def test_wrong_credentials_are_a_tempfail(dns: DNSTestServer, ca: trustme.CA, ca_file: str) -> None:
    async def scenario() -> None:
        async with Sink(tls=server_context(ca, "mx.test"), auth=("joe", "s3cret")) as sink:
            outcomes = await deliver(
                agent(dns, ca_file=ca_file),
                RelayRoute(smarthost=f"smtp+tls://mx.test:{sink.port}", auth=("joe", "wrong")),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["tempfail"]
            assert "535 5.7.8" in outcomes[0].line
            assert sink.messages == []

    run(scenario())


def test_no_auth_over_plain_text(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink(auth=("joe", "s3cret")) as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp+notls://mx.test:{sink.port}", auth=("joe", "s3cret")),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["tempfail"]
            assert not any(c.startswith("AUTH") for c in sink.sessions[0].commands)

    run(scenario())


def test_smtp_notls_never_starts_tls(dns: DNSTestServer, ca: trustme.CA) -> None:
    async def scenario() -> None:
        async with Sink(tls=server_context(ca, "mx.test")) as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp+notls://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["ok"]
            assert "STARTTLS" not in sink.sessions[0].commands

    run(scenario())


def test_smtps_url(dns: DNSTestServer, ca: trustme.CA, ca_file: str) -> None:
    async def scenario() -> None:
        async with Sink(
            tls=server_context(ca, "mx.test"), implicit_tls=True, auth=("joe", "pw")
        ) as sink:
            outcomes = await deliver(
                agent(dns, ca_file=ca_file),
                RelayRoute(smarthost=f"smtps://mx.test:{sink.port}", auth=("joe", "pw")),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["ok"]
            assert sink.sessions[0].auth_user == "joe"
            assert "STARTTLS" not in sink.sessions[0].commands

    run(scenario())


@pytest.mark.parametrize("tls", ["required", "no-verify"])
def test_required_tls_with_a_bad_certificate(
    dns: DNSTestServer, ca: trustme.CA, ca_file: str, tls: Any
) -> None:
    async def scenario() -> None:
        async with Sink(tls=server_context(ca, "other.test")) as sink:
            outcomes = await deliver(
                agent(dns, ca_file=ca_file),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}", tls=tls),
                [envelope("a@x.test")],
            )
            if tls == "required":
                assert statuses(outcomes) == ["tempfail"]
                assert "certificate" in outcomes[0].line.lower()
                assert sink.messages == []
            else:
                assert statuses(outcomes) == ["ok"]
                assert sink.sessions[0].tls

    run(scenario())


def test_required_tls_without_starttls_offered(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"smtp+tls://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["tempfail"]
            assert sink.messages == []

    run(scenario())


def test_lmtp_url_gives_per_recipient_results(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        rcpt = {"eom:b@x.test": "452 4.2.2 Over quota", "eom:c@x.test": "550 5.1.1 Unknown user"}
        async with Sink(lmtp=True, rcpt=rcpt) as sink:
            outcomes = await deliver(
                agent(dns),
                RelayRoute(smarthost=f"lmtp://mx.test:{sink.port}"),
                [envelope("a@x.test"), envelope("b@x.test"), envelope("c@x.test")],
            )
            assert statuses(outcomes) == ["ok", "tempfail", "permfail"]
            assert outcomes[2].line == "550 5.1.1 Unknown user"
            assert sink.sessions[0].commands[0] == "LHLO relay.test"

    run(scenario())


def test_bad_relay_url_is_a_tempfail(dns: DNSTestServer) -> None:
    outcomes = run(
        deliver(agent(dns), RelayRoute(smarthost="gopher://mx.test"), [envelope("a@x.test")])
    )

    assert statuses(outcomes) == ["tempfail"]
    assert "gopher" in outcomes[0].line


# --------------------------------------------------------------------------------------------
# Timeouts


def test_a_server_that_never_answers_times_out(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink(silent=True) as sink:
            started = time.monotonic()
            outcomes = await deliver(
                agent(dns, command_timeout=0.3),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["tempfail"]
            assert "timeout" in outcomes[0].line
            assert time.monotonic() - started < 3

    run(scenario())


def test_a_server_that_stalls_after_data_times_out(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with Sink() as sink:
            # Never answer the final dot: the reply to it is what we wait for.
            original = sink._read_body

            async def stall(reader: asyncio.StreamReader) -> bytes:
                await original(reader)
                await asyncio.sleep(3600)
                return b""

            sink._read_body = stall  # type: ignore[method-assign]
            outcomes = await deliver(
                agent(dns, command_timeout=0.3),
                RelayRoute(smarthost=f"smtp://mx.test:{sink.port}"),
                [envelope("a@x.test")],
            )
            assert statuses(outcomes) == ["tempfail"]

    run(scenario())


# --------------------------------------------------------------------------------------------
# LMTP delivery method


def test_lmtp_over_tcp_with_local_user_names() -> None:
    async def scenario() -> None:
        rcpt = {"eom:bob": "550 5.1.1 No such user", "eom:carol": "451 4.3.0 Try again"}
        async with Sink(lmtp=True, rcpt=rcpt) as sink:
            envs = [envelope("alice@x.test"), envelope("bob@x.test"), envelope("carol@x.test")]
            users = {envs[0].evpid: "alice", envs[1].evpid: "bob", envs[2].evpid: "carol"}
            results = await deliver_lmtp(
                f"127.0.0.1:{sink.port}", envs, BODY, rcpt_to=False, users=users
            )
            assert [results[e.evpid].status for e in envs] == ["ok", "permfail", "tempfail"]
            assert results[envs[0].evpid].line == "Delivered"  # smtpd's mail.lmtp says so
            assert results[envs[1].evpid].line == "550 5.1.1 No such user"
            [session] = sink.sessions
            assert session.commands == [
                "LHLO localhost", "MAIL FROM:<alice@example.org>",
                "RCPT TO:<alice>", "RCPT TO:<bob>", "RCPT TO:<carol>", "DATA", "QUIT",
            ]  # fmt: skip
            assert session.messages[0].body == BODY

    run(scenario())


def test_lmtp_over_a_unix_socket_with_rcpt_to(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = str(tmp_path / "lmtp.sock")
        async with Sink(
            lmtp=True, unix_path=path, rcpt={"gone@x.test": "550 5.1.1 Unknown"}
        ) as sink:
            envs = [envelope("alice@x.test"), envelope("gone@x.test")]
            results = await deliver_lmtp(path, envs, BODY, rcpt_to=True, users={}, helo="mx.test")
            assert [results[e.evpid].status for e in envs] == ["ok", "permfail"]
            assert sink.sessions[0].commands[:4] == [
                "LHLO mx.test", "MAIL FROM:<alice@example.org>",
                "RCPT TO:<alice@x.test>", "RCPT TO:<gone@x.test>",
            ]  # fmt: skip

    run(scenario())


def test_lmtp_unreachable_or_silent_server_is_a_tempfail(tmp_path: Path) -> None:
    async def scenario() -> None:
        env = envelope("alice@x.test")
        missing = await deliver_lmtp(
            str(tmp_path / "none.sock"), [env], BODY, rcpt_to=True, users={}
        )
        assert missing[env.evpid].status == "tempfail"
        async with Sink(lmtp=True, silent=True) as sink:
            started = time.monotonic()
            silent = await deliver_lmtp(
                f"127.0.0.1:{sink.port}", [env], BODY, rcpt_to=True, users={}, timeout=0.3
            )
            assert silent[env.evpid].status == "tempfail"
            assert time.monotonic() - started < 3

    run(scenario())
