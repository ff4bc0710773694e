"""MX and address lookups for remote delivery (dnspython's asyncio resolver).

Failure texts follow OpenSMTPD's ``mta.c`` (delivery-queue.md 2.7): NXDOMAIN is permanent ("Domain
does not exist"), SERVFAIL/timeouts are temporary ("Temporary failure in MX lookup"), a domain
whose MX hosts have no address is temporary ("No MX found for domain"). A null MX (RFC 7505) is
permanent with the code RFC 7505 section 4.2 asks for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from pigeon.errors import SMTPError

__all__ = ["DNSSettings", "MXHost", "MXResolver", "domain_literal_address"]

log = logging.getLogger("pigeon.mta")


@dataclass
class DNSSettings:
    """Where and how to ask. ``nameservers`` None: the system's /etc/resolv.conf."""

    nameservers: list[str] | None = None
    port: int = 53
    timeout: float = 5.0
    cache: bool = True  # dnspython's TTL-honouring cache


@dataclass
class MXHost:
    """One mail exchanger with the addresses to try, IPv4 first."""

    name: str
    preference: int
    addresses: list[str] = field(default_factory=list)


def _domain_does_not_exist(domain: str) -> SMTPError:
    return SMTPError(550, "5.1.2", f"Domain does not exist: {domain}")


def _lookup_failed() -> SMTPError:
    return SMTPError(451, "4.4.3", "Temporary failure in MX lookup")


def _no_mx_found() -> SMTPError:
    return SMTPError(451, "4.4.4", "No MX found for domain")


def _null_mx(domain: str) -> SMTPError:
    return SMTPError(556, "5.1.10", f"Domain does not accept mail (null MX): {domain}")


def domain_literal_address(domain: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` -> the address; None for a domain name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


class MXResolver:
    """Resolves where mail for a domain goes. Raises ``SMTPError`` (temporary or permanent)."""

    def __init__(self, settings: DNSSettings) -> None:
        self.settings = settings
        resolver = self._make_resolver(settings)
        resolver.port = settings.port
        resolver.timeout = settings.timeout
        resolver.lifetime = settings.timeout
        if settings.cache:
            resolver.cache = dns.resolver.Cache()
        self._resolver = resolver

    @staticmethod
    def _make_resolver(settings: DNSSettings) -> dns.asyncresolver.Resolver:
        if settings.nameservers is not None:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(settings.nameservers)
            return resolver
        try:
            return dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            log.warning("warn: no usable /etc/resolv.conf, asking 127.0.0.1 for DNS")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            return resolver

    async def mx_hosts(self, domain: str) -> list[MXHost]:
        """Mail exchangers in the order to try: by preference, equal ones shuffled."""
        literal = domain_literal_address(domain)
        if literal is not None:
            return [MXHost(domain, 0, [literal])]
        name = domain.rstrip(".").lower()
        if not name:
            raise _domain_does_not_exist(domain)
        try:
            answer = await self._resolver.resolve(
                name, "MX", raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            raise _domain_does_not_exist(domain) from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.YXDOMAIN):
            raise _lookup_failed() from None
        except dns.exception.DNSException as exc:  # e.g. a name too long to ask about
            log.info("mta: MX lookup for %s failed: %s", domain, exc)
            raise _lookup_failed() from None

        records = [(r.preference, r.exchange) for r in answer.rrset or ()]
        if not records:
            # RFC 5321 5.1: no MX means the domain itself is the mail exchanger.
            addresses = await self.addresses(name)
            if not addresses:
                raise _no_mx_found()
            return [MXHost(name, 0, addresses)]
        if any(exchange == dns.name.root for _, exchange in records):
            real = [(p, e) for p, e in records if e != dns.name.root]
            if not real:
                raise _null_mx(domain)
            records = real  # RFC 7505 3: a null MX beside real ones is a mistake; skip it

        random.shuffle(records)  # RFC 5321 5.1: spread the load over equal preferences
        records.sort(key=lambda record: record[0])
        hosts = [MXHost(exchange.to_text(omit_final_dot=True), pref) for pref, exchange in records]
        lookups = await asyncio.gather(
            *(self.addresses(host.name) for host in hosts), return_exceptions=True
        )
        temporary = False
        for host, result in zip(hosts, lookups, strict=True):
            if isinstance(result, SMTPError):
                temporary = True
            elif isinstance(result, BaseException):
                raise result
            else:
                host.addresses = result
        usable = [host for host in hosts if host.addresses]
        if not usable:
            raise _lookup_failed() if temporary else _no_mx_found()
        return usable

    async def addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of ``host`` ([] when it has none); temporary SMTPError on
        SERVFAIL or timeout when neither family gave an answer."""
        literal = domain_literal_address(host)
        if literal is not None:
            return [literal]
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        results = await asyncio.gather(self._addresses(host, "A"), self._addresses(host, "AAAA"))
        found = [address for family in results if family is not None for address in family]
        if not found and any(family is None for family in results):
            raise _lookup_failed()
        return found

    async def _addresses(self, host: str, rdtype: str) -> list[str] | None:
        """The addresses of one family; None when the lookup failed temporarily."""
        try:
            answer = await self._resolver.resolve(
                host.rstrip("."), rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException:
            return None
        return [rdata.address for rdata in answer.rrset or ()]
