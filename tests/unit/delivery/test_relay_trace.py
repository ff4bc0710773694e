"""``pigeon trace mta``: ClientSession logs its SMTP dialogue as OpenSMTPD does
(``mta: 0x...: >>> MAIL FROM:<...>``, ``mta: 0x...: <<< 250 ...``), only while the
``pigeon.trace.mta`` logger itself is at DEBUG. In-memory transport: no sockets."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fake_transport import FakeTransport

from pigeon.delivery.relay import ClientSession, tracing
from pigeon.log import apply_levels, logger_levels
from pigeon.protocol.client import ClientConfig, RecipientSpec, Transaction

BODY = b"Subject: secret plans\r\n\r\nthe content\r\n"
EHLO_REPLY = b"250-fake.test\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 DSN\r\n"
AUTH = ("joe@example.test", "s3cret")


class FakeServer(FakeTransport):
    """A pipelining SMTP server behind an asyncio transport. Its multiline EHLO reply arrives
    in two reads cut in the middle of a line."""

    def __init__(self, session: ClientSession) -> None:
        super().__init__(session)
        self.in_data = False

    def write(self, data: bytes) -> None:
        if self.in_data:
            if data.endswith(b"\r\n.\r\n"):
                self.in_data = False
                self.say(b"250 2.0.0 Ok: queued\r\n")
            return
        for line in data.split(b"\r\n")[:-1]:
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.say(EHLO_REPLY[:40])
                self.say(EHLO_REPLY[40:])
            elif verb == b"AUTH":
                self.say(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.say(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.say(b"221 2.0.0 Bye\r\n")
            else:
                self.say(b"250 2.0.0 Ok\r\n")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> Iterator[Lines]:
    """Whatever the trace logger writes (set to DEBUG or not by each test)."""
    trace = logging.getLogger("pigeon.trace.mta")
    pigeon = logging.getLogger("pigeon")
    levels = (trace.level, pigeon.level)
    handler = Lines()
    trace.addHandler(handler)
    try:
        yield handler
    finally:
        trace.removeHandler(handler)
        trace.setLevel(levels[0])
        pigeon.setLevel(levels[1])


async def one_message() -> int:
    """A session with AUTH, one transaction, QUIT; its trace id."""
    config = ClientConfig(helo="relay.test", implicit_tls=True, auth=AUTH)
    session = ClientSession(config, timeout=5.0, peer="fake", relay="[relay:fake,smtps]")
    fake = FakeServer(session)
    session.connection_made(fake)  # type: ignore[arg-type]
    fake.say(b"220 fake.test ESMTP\r\n")
    await session.handshake()
    txn = Transaction(
        "alice@example.test",
        [RecipientSpec("dave@sink.test", {"NOTIFY": "SUCCESS,FAILURE"})],
        {"RET": "HDRS", "ENVID": "envid-QQ42"},
    )
    report = await session.transact(txn, BODY)
    assert report.failure is None and report.replies[0].code == 250
    await session.quit()
    return id(session)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_the_dialogue_is_traced_in_opensmtpd_style(captured: Lines) -> None:
    logging.getLogger("pigeon.trace.mta").setLevel(logging.DEBUG)
    ident = run(one_message())
    p = f"mta: {ident:#x}:"
    assert captured.lines == [
        f"debug: {p} spawned for relay [relay:fake,smtps]",
        f"{p} <<< 220 fake.test ESMTP",
        f"{p} >>> EHLO relay.test",
        f"{p} <<< 250-fake.test",  # a multiline reply line by line, cut reads joined
        f"{p} <<< 250-PIPELINING",
        f"{p} <<< 250-AUTH PLAIN LOGIN",
        f"{p} <<< 250 DSN",
        f"{p} >>> AUTH PLAIN ********",
        f"{p} <<< 235 2.7.0 Authentication successful",
        f"debug: {p} handling next task for relay [relay:fake,smtps]",
        f"{p} >>> MAIL FROM:<alice@example.test> RET=HDRS ENVID=envid-QQ42",
        f"{p} >>> RCPT TO:<dave@sink.test> NOTIFY=SUCCESS,FAILURE",
        f"{p} >>> DATA",
        f"{p} <<< 250 2.0.0 Ok",
        f"{p} <<< 250 2.0.0 Ok",
        f"{p} <<< 354 End data with <CR><LF>.<CR><LF>",
        f"{p} >>> [...{len(BODY)} bytes...]",
        f"{p} >>> .",
        f"{p} <<< 250 2.0.0 Ok: queued",
        f"{p} >>> QUIT",
        f"{p} <<< 221 2.0.0 Bye",
        f"debug: {p} session done",
    ]
    text = "\n".join(captured.lines)
    secret = base64.b64encode(b"\0joe@example.test\0s3cret").decode()
    assert secret not in text and "s3cret" not in text
    assert "secret plans" not in text and "the content" not in text


def test_log_verbose_alone_traces_nothing(captured: Lines) -> None:
    logging.getLogger("pigeon").setLevel(logging.DEBUG)  # what `pigeon log verbose` does
    logging.getLogger("pigeon.trace.mta").setLevel(logging.NOTSET)
    run(one_message())
    assert captured.lines == []


def test_tracing_turned_on_for_a_kept_session_starts_at_its_next_transaction(
    captured: Lines,
) -> None:
    trace = logging.getLogger("pigeon.trace.mta")
    trace.setLevel(logging.NOTSET)

    async def main() -> None:
        config = ClientConfig(helo="relay.test")
        session = ClientSession(config, timeout=5.0, peer="fake")
        fake = FakeServer(session)
        session.connection_made(fake)  # type: ignore[arg-type]
        fake.say(b"220 fake.test ESMTP\r\n")
        await session.handshake()
        txn = Transaction("a@b.test", [RecipientSpec("c@d.test")])
        await session.transact(txn, BODY)
        assert captured.lines == []
        trace.setLevel(logging.DEBUG)  # `pigeon trace mta` while the session is kept
        await session.transact(txn, BODY)
        assert f"mta: {id(session):#x}: >>> MAIL FROM:<a@b.test>" in captured.lines
        # No relay name given: the peer stands for it.
        assert captured.lines[0].endswith("handling next task for relay fake")
        trace.setLevel(logging.NOTSET)  # `pigeon untrace mta`
        seen = len(captured.lines)
        await session.transact(txn, BODY)
        await session.quit()
        assert len(captured.lines) == seen

    run(main())


def test_the_trace_level_reaches_the_relay_worker_and_goes_away_again(captured: Lines) -> None:
    """The daemon hands its levels to the worker (logger_levels -> apply_levels)."""
    trace = logging.getLogger("pigeon.trace.mta")
    trace.setLevel(logging.DEBUG)  # `pigeon trace mta` in the daemon
    levels = logger_levels()
    assert levels["pigeon.trace.mta"] == logging.DEBUG
    trace.setLevel(logging.NOTSET)
    apply_levels(levels)  # in the worker
    assert tracing()
    apply_levels({"pigeon": logging.DEBUG})  # after `untrace mta`, `log verbose`
    assert not tracing()
