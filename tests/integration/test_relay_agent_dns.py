"""MXResolver against a DNS server on 127.0.0.1 (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from dnsserver import DNSTestServer

from pigeon.delivery.dns import DNSSettings, MXHost, MXResolver, domain_literal_address
from pigeon.errors import SMTPError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.fixture
def dns() -> Iterator[DNSTestServer]:
    with DNSTestServer() as server:
        yield server


def resolver(dns: DNSTestServer, timeout: float = 2.0) -> MXResolver:
    return MXResolver(DNSSettings(["127.0.0.1"], port=dns.port, timeout=timeout))


def lookup_error(dns: DNSTestServer, domain: str, timeout: float = 2.0) -> SMTPError:
    with pytest.raises(SMTPError) as info:
        run(resolver(dns, timeout).mx_hosts(domain))
    return info.value


def test_mx_hosts_come_in_preference_order_with_their_addresses(dns: DNSTestServer) -> None:
    dns.add_mx("example.test", 30, "mx3.example.test")
    dns.add_mx("example.test", 10, "mx1.example.test")
    dns.add_mx("example.test", 20, "mx2.example.test")
    dns.add_a("mx1.example.test", "127.0.0.11")
    dns.add_aaaa("mx1.example.test", "::1")
    dns.add_a("mx2.example.test", "127.0.0.12")
    dns.add_a("mx3.example.test", "127.0.0.13")

    hosts = run(resolver(dns).mx_hosts("Example.TEST"))

    assert hosts == [
        MXHost("mx1.example.test", 10, ["127.0.0.11", "::1"]),
        MXHost("mx2.example.test", 20, ["127.0.0.12"]),
        MXHost("mx3.example.test", 30, ["127.0.0.13"]),
    ]


def test_mx_hosts_without_address_are_skipped(dns: DNSTestServer) -> None:
    dns.add_mx("example.test", 10, "gone.example.test")  # NXDOMAIN
    dns.add_mx("example.test", 20, "mx2.example.test")
    dns.add_a("mx2.example.test", "127.0.0.12")

    hosts = run(resolver(dns).mx_hosts("example.test"))

    assert [h.name for h in hosts] == ["mx2.example.test"]


def test_no_mx_record_means_the_domain_itself(dns: DNSTestServer) -> None:
    dns.add_a("plain.test", "127.0.0.5")

    assert run(resolver(dns).mx_hosts("plain.test")) == [MXHost("plain.test", 0, ["127.0.0.5"])]


def test_null_mx_is_a_permanent_556(dns: DNSTestServer) -> None:
    dns.add_null_mx("nomail.test")
    dns.add_a("nomail.test", "127.0.0.5")  # must not be used as an implicit MX

    err = lookup_error(dns, "nomail.test")

    assert (err.code, err.enhanced, err.permanent) == (556, "5.1.10", True)


def test_nxdomain_is_permanent(dns: DNSTestServer) -> None:
    err = lookup_error(dns, "nowhere.test")

    assert err.permanent
    assert "Domain does not exist" in err.text


def test_servfail_is_temporary(dns: DNSTestServer) -> None:
    dns.servfail("broken.test")

    err = lookup_error(dns, "broken.test")

    assert err.temporary
    assert err.text == "Temporary failure in MX lookup"


def test_unanswered_query_times_out_as_temporary(dns: DNSTestServer) -> None:
    dns.silent("slow.test")
    started = time.monotonic()

    err = lookup_error(dns, "slow.test", timeout=0.5)

    assert err.temporary
    assert err.text == "Temporary failure in MX lookup"
    assert time.monotonic() - started < 5


def test_mx_whose_hosts_have_no_address_is_temporary(dns: DNSTestServer) -> None:
    dns.add_mx("example.test", 10, "noaddr.example.test")
    dns.add_mx("noaddr.example.test", 10, "x.example.test")  # the name exists, no A/AAAA

    err = lookup_error(dns, "example.test")

    assert err.temporary
    assert err.text == "No MX found for domain"


def test_mx_host_servfail_is_temporary_not_missing(dns: DNSTestServer) -> None:
    dns.add_mx("example.test", 10, "mx1.example.test")
    dns.servfail("mx1.example.test")

    err = lookup_error(dns, "example.test")

    assert err.text == "Temporary failure in MX lookup"


def test_domain_literals_skip_dns(dns: DNSTestServer) -> None:
    hosts = run(resolver(dns).mx_hosts("[127.0.0.9]"))

    assert hosts == [MXHost("[127.0.0.9]", 0, ["127.0.0.9"])]
    assert dns.queries == []
    assert domain_literal_address("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert domain_literal_address("[not-an-address]") is None


def test_addresses_of_a_host(dns: DNSTestServer) -> None:
    dns.add_a("relay.test", "127.0.0.7")
    dns.add_aaaa("relay.test", "::1")

    assert run(resolver(dns).addresses("relay.test")) == ["127.0.0.7", "::1"]
    assert run(resolver(dns).addresses("127.0.0.8")) == ["127.0.0.8"]
    assert run(resolver(dns).addresses("nothing.test")) == []
