"""ClientSession's own I/O glue (timeouts, flow control, kept sessions, connection limits),
driven through an in-memory transport: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fake_transport import FakeTransport

from pigeon.delivery.relay import (
    ClientSession,
    RelayAgent,
    RelaySettings,
    _Limiter,
)
from pigeon.delivery.routes import RelayRoute
from pigeon.protocol.client import ClientConfig, RecipientSpec, Transaction
from pigeon.queue.envelope import Envelope

BODY = b"Subject: hi\r\n\r\nhello\r\n"


class FakeServer(FakeTransport):
    """A pipelining SMTP server behind an asyncio transport. ``silent_after``: stop answering
    once this many commands were answered; ``pause``: report the write buffer full after
    every write until ``resume()``."""

    def __init__(
        self, session: ClientSession, *, silent_after: int | None = None, pause: bool = False
    ) -> None:
        super().__init__(session)
        self.silent_after = silent_after
        self.pause = pause
        self.answered = 0
        self.in_data = False
        self.written: list[bytes] = []

    # transport side
    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.pause:
            self.session.pause_writing()
        replies = []
        if self.in_data:
            if data.endswith(b"\r\n.\r\n"):
                self.in_data = False
                replies.append(b"250 2.0.0 queued\r\n")
        else:
            for line in data.split(b"\r\n")[:-1]:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    replies.append(b"250-fake\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    replies.append(b"354 go ahead\r\n")
                    self.in_data = True
                elif verb == b"QUIT":
                    replies.append(b"221 bye\r\n")
                else:
                    replies.append(b"250 2.0.0 Ok\r\n")
        for reply in replies:
            self.say(reply)

    def say(self, reply: bytes) -> None:
        if self.silent_after is not None and self.answered >= self.silent_after:
            return
        self.answered += 1
        self.loop.call_soon(self.session.data_received, reply)

    def resume(self) -> None:
        self.pause = False
        self.session.resume_writing()


async def connected(timeout: float = 5.0, **server: Any) -> tuple[ClientSession, FakeServer]:
    session = ClientSession(ClientConfig(helo="client.test"), timeout=timeout, peer="fake")
    fake = FakeServer(session, **server)
    session.connection_made(fake)  # type: ignore[arg-type]
    fake.say(b"220 fake ESMTP\r\n")
    await session.handshake()
    return session, fake


def txn() -> Transaction:
    return Transaction("alice@example.test", [RecipientSpec("bob@example.test")])


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 10))


def test_a_transaction_on_a_kept_session_and_its_writes() -> None:
    async def main() -> None:
        session, fake = await connected()
        for _ in range(3):
            fake.written.clear()
            report = await session.transact(txn(), BODY)
            assert report.failure is None and report.replies[0].code == 250
            # MAIL, RCPT and DATA in one write, then the body with its dot in another.
            assert len(fake.written) == 2 and fake.written[0].endswith(b"DATA\r\n")
        assert session.mails == 3 and session.usable
        await session.quit()
        assert not session.usable

    run(main)


def test_a_silent_server_times_out_after_the_command_timeout() -> None:
    async def main() -> None:
        session, fake = await connected(timeout=0.2)
        fake.silent_after = fake.answered + 2  # answers MAIL and RCPT, never DATA
        started = asyncio.get_running_loop().time()
        report = await session.transact(txn(), BODY)
        waited = asyncio.get_running_loop().time() - started
        assert report.failure == "timeout after 0.2s waiting for fake"
        assert 0.15 < waited < 2.0
        assert not session.usable

    run(main)


def test_the_timeout_counts_from_the_last_bytes_received() -> None:
    async def main() -> None:
        session, fake = await connected(timeout=0.5)
        fake.silent_after = fake.answered  # the test speaks for the server
        task = asyncio.ensure_future(session.transact(txn(), BODY))
        await asyncio.sleep(0)
        # Each piece of the replies comes well within the timeout; all of them take longer.
        for piece in (b"250 2.0.0 Ok\r\n", b"250 2.0", b".0 Ok\r\n35", b"4 go\r\n"):
            await asyncio.sleep(0.2)
            session.data_received(piece)
        await asyncio.sleep(0.2)
        session.data_received(b"250 2.0.0 queued\r\n")
        report = await task
        assert report.failure is None and report.replies[0].code == 250

    run(main)


def test_a_full_write_buffer_is_waited_for_within_the_timeout() -> None:
    async def main() -> None:
        session, fake = await connected(timeout=0.5)
        fake.pause = True
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, fake.resume)
        report = await session.transact(txn(), BODY)
        assert report.failure is None

        fake.pause = True  # this time the buffer never drains
        report = await session.transact(txn(), BODY)
        assert report.failure is not None and report.failure.startswith("timeout after 0.5s")

    run(main)


def test_a_connection_reset_is_a_connection_error() -> None:
    async def main() -> None:
        session, fake = await connected()
        fake.silent_after = fake.answered
        task = asyncio.ensure_future(session.transact(txn(), BODY))
        await asyncio.sleep(0.01)
        session.connection_lost(ConnectionResetError("reset by peer"))
        report = await task
        assert report.failure == "connection error: reset by peer"
        assert report.untouched

    run(main)


def test_a_421_while_kept_idle_makes_the_session_unusable() -> None:
    async def main() -> None:
        session, _fake = await connected()
        await session.transact(txn(), BODY)
        assert session.usable
        session.data_received(b"421 4.4.2 idle too long\r\n")
        assert not session.usable

    run(main)


def test_the_limiter_is_fifo_and_passes_on_a_slot_handed_to_a_cancelled_waiter() -> None:
    async def main() -> None:
        limiter = _Limiter(1)
        order: list[str] = []
        assert limiter.take_now()

        async def user(name: str) -> None:
            await limiter.take()
            order.append(name)
            limiter.give_back()

        first = asyncio.ensure_future(user("first"))
        second = asyncio.ensure_future(user("second"))
        await asyncio.sleep(0)
        limiter.give_back()  # handed to "first", which is cancelled before it runs
        first.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        assert order == ["second"]
        assert limiter.take_now()  # and the slot came back in the end
        assert not limiter.take_now()

    run(main)


def envelope(evpid: int) -> Envelope:
    return Envelope(
        evpid=evpid,
        dispatcher="relay",
        type="mta",
        sender="alice@example.test",
        rcpt="bob@example.test",
        dest="bob@example.test",
        ctime=0,
    )


def test_kept_sessions_expire_keepalive_after_their_last_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    servers: list[FakeServer] = []

    async def open_tcp(host: str, port: int, config: ClientConfig, **kw: Any) -> ClientSession:
        session = ClientSession(config, timeout=5.0, peer=f"{host}:{port}")
        fake = FakeServer(session)
        servers.append(fake)
        session.connection_made(fake)  # type: ignore[arg-type]
        fake.say(b"220 fake ESMTP\r\n")
        return session

    monkeypatch.setattr(ClientSession, "open_tcp", staticmethod(open_tcp))

    async def main() -> None:
        agent = RelayAgent(RelaySettings(helo="client.test", keepalive=0.6), None)  # type: ignore[arg-type]
        route = RelayRoute(smarthost="smtp+notls://192.0.2.1:2525")
        for evpid in range(3):  # each use before the keepalive ran out: one session for all
            outcomes = await agent.deliver(route, [envelope(evpid)], BODY)
            assert outcomes[evpid].status == "ok"
            await asyncio.sleep(0.35)
        assert len(servers) == 1 and agent.idle_sessions == 1
        await asyncio.sleep(0.5)  # 0.85 s after the last use
        assert agent.idle_sessions == 0
        await agent.close()
        assert servers[0].closing
        assert servers[0].written[-1] == b"QUIT\r\n"

    run(main)
