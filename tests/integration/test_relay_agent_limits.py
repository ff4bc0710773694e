"""Relay agent: per-domain ``mta limit`` values, and the state behind smtpctl's queue views
(show hosts, relays, routes, hoststats)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from dnsserver import DNSTestServer

from pigeon.delivery.dns import DNSSettings, MXResolver
from pigeon.delivery.relay import DomainLimits, RelayAgent, RelayRoute, RelaySettings
from pigeon.queue.envelope import Envelope, new_evpid

T = TypeVar("T")
BODY = b"Subject: limits\r\n\r\nhello\r\n"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@dataclass
class CountingSink:
    """A pipelining SMTP sink that counts concurrent transactions (MAIL to the reply after
    the body) and mails per session; recipients at ``reject.test`` get 550, at ``soft.test``
    451."""

    port: int = 0
    busy: int = 0
    most_busy: int = 0
    mails_per_session: list[int] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def __aenter__(self) -> CountingSink:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.mails_per_session)
        self.mails_per_session.append(0)
        writer.write(b"220 sink ESMTP\r\n")
        in_transaction = False
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"MAIL":
                    in_transaction = True
                    self.busy += 1
                    self.most_busy = max(self.most_busy, self.busy)
                if verb in (b"RSET", b"QUIT") and in_transaction:
                    in_transaction = False
                    self.busy -= 1
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"RCPT" and b"@reject.test" in line:
                    writer.write(b"550 5.1.1 No such user\r\n")
                elif verb == b"RCPT" and b"@soft.test" in line:
                    writer.write(b"451 4.3.0 Try again later\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    await asyncio.sleep(0.05)  # slow enough for sessions to overlap
                    self.mails_per_session[index] += 1
                    in_transaction = False
                    self.busy -= 1
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        finally:
            if in_transaction:
                self.busy -= 1
            writer.close()


@pytest.fixture
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        for domain in ("slow.test", "fast.test", "reject.test", "soft.test"):
            server.add_mx(domain, 10, "mx.sink.test")
        server.add_a("mx.sink.test", "127.0.0.1")
        yield server


def agent(dns: DNSTestServer, sink: CountingSink, **limits: DomainLimits) -> RelayAgent:
    settings = RelaySettings(
        helo="relay.test",
        mx_port=sink.port,
        connect_timeout=2,
        command_timeout=5,
        max_conn_per_host=10,
        domain_limits=dict(limits),
    )
    return RelayAgent(settings, MXResolver(DNSSettings(["127.0.0.1"], port=dns.port, timeout=1)))


def envelope(dest: str, msgid: int = 0x11D0B709) -> Envelope:
    return Envelope(
        evpid=new_evpid(msgid),
        dispatcher="relay",
        type="mta",
        sender="alice@example.org",
        rcpt=dest,
        dest=dest,
        ctime=int(time.time()),
    )


async def deliver_each(relay: RelayAgent, dests: list[str]) -> list[str]:
    """One message per destination, all at once; the outcome statuses."""
    results = await asyncio.gather(
        *(
            relay.deliver(RelayRoute(), [envelope(dest, 0x1000 + i)], BODY)
            for i, dest in enumerate(dests)
        )
    )
    return [outcome.status for result in results for outcome in result.values()]


def test_domain_limit_caps_its_sessions_and_mails_per_session(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with CountingSink() as sink:
            slow = DomainLimits(max_conn_per_host=1, max_mails_per_session=2)
            relay = agent(dns, sink, **{"slow.test": slow})
            statuses = await deliver_each(relay, [f"u{i}@slow.test" for i in range(5)])
            await relay.close()
            assert statuses == ["ok"] * 5
            assert sink.most_busy == 1  # one transaction at a time for slow.test
            assert sink.mails_per_session == [2, 2, 1]  # a new session after two mails

    run(scenario())


def test_other_domains_keep_the_default_limits(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with CountingSink() as sink:
            slow = DomainLimits(max_conn_per_host=1, max_mails_per_session=2)
            relay = agent(dns, sink, **{"slow.test": slow})
            statuses = await deliver_each(relay, [f"u{i}@fast.test" for i in range(5)])
            await relay.close()
            assert statuses == ["ok"] * 5
            assert sink.most_busy > 1  # the same MX, but fast.test is not held to one
            assert all(n <= 100 for n in sink.mails_per_session)

    run(scenario())


def test_queue_views_show_hosts_relays_routes_and_hoststats(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with CountingSink() as sink:
            relay = agent(dns, sink)
            assert relay.show("hosts") == relay.show("hoststats") == []
            before = int(time.time())
            statuses = await deliver_each(relay, ["a@fast.test", "b@reject.test", "c@soft.test"])
            assert sorted(statuses) == ["ok", "permfail", "tempfail"]

            hosts = relay.show("hosts")
            assert len(hosts) == 1
            address, name, refcount, nconn, lastconn = hosts[0].split(" ")
            assert (address, name) == ("127.0.0.1", "mx.sink.test")
            assert nconn.startswith("nconn=") and int(nconn[6:]) >= 1  # kept for reuse
            assert refcount == f"refcount={nconn[6:]}"
            assert lastconn in ("lastconn=0s", "lastconn=1s")

            relays = relay.show("relays")
            assert [line.split(" ")[0] for line in relays] == [
                f"[relay:{domain},port={sink.port},mx]"
                for domain in ("fast.test", "reject.test", "soft.test")
            ]
            assert all(" ntask=0 " in line for line in relays)

            routes = relay.show("routes")
            assert len(routes) == 1
            assert routes[0].startswith("1. [] <-> 127.0.0.1 (mx.sink.test) ---K nconn=")
            assert " nerror=0 penalty=0 " in routes[0]

            stats = [line.split("|") for line in relay.show("hoststats")]
            assert [(domain, text) for domain, _, text in stats] == [
                ("fast.test", "250 2.0.0 Ok"),
                ("reject.test", "550 5.1.1 No such user"),
                ("soft.test", "451 4.3.0 Try again later"),
            ]
            assert all(before <= int(when) <= time.time() for _, when, _ in stats)
            # Four hours later the results are forgotten, as OpenSMTPD's hoststats are.
            assert relay.show("hoststats", now=time.time() + 4 * 3600 + 60) == []

            await relay.close()
            assert relay.show("hosts")[0].split(" ")[3] == "nconn=0"

    run(scenario())


def test_failed_connections_count_as_route_errors(dns: DNSTestServer) -> None:
    async def scenario() -> None:
        async with CountingSink() as sink:
            port = sink.port
        # The sink is closed now: connecting is refused.
        settings = RelaySettings(helo="relay.test", mx_port=port, connect_timeout=2)
        relay = RelayAgent(
            settings, MXResolver(DNSSettings(["127.0.0.1"], port=dns.port, timeout=1))
        )
        result = await relay.deliver(RelayRoute(), [envelope("a@fast.test")], BODY)
        assert [o.status for o in result.values()] == ["tempfail"]
        [route] = relay.show("routes")
        assert " D-" in route and " nerror=1 " in route
        assert relay.show("hosts")[0].endswith(" nconn=0 lastconn=0s")
        await relay.close()

    run(scenario())
