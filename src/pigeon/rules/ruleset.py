"""``match`` rules at run time: evaluated per recipient, first match wins.

``from local``: the client is the local socket or connects from one of this host's own
addresses, as in OpenSMTPD (whose ``<localhost>`` holds the exact interface addresses: a
client bound to 127.0.0.2 is not local). The session computes this as ``MatchContext.local``
with :func:`pigeon.server.localaddr.is_local`.

``for local``: the recipient domain is one of ``local_names``: ``localhost``, the host name,
its FQDN and the host's addresses as literals (``[192.0.2.1]``), like OpenSMTPD's
``<localnames>``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from pigeon.config.model import Config, Criterion, Match
from pigeon.mailname import mailname
from pigeon.server.localaddr import local_addresses
from pigeon.tables.base import Service, Table, TableResolver
from pigeon.tables.static import domain_match, split_mailaddr


@dataclass(frozen=True)
class MatchContext:
    local: bool  # client is local (the local socket or one of the host's own addresses)
    socket: bool  # came through the local socket (sendmail/enqueue)
    src_ip: str  # "a.b.c.d", "v6" or "local"
    rdns: str | None
    helo: str
    auth_user: str | None
    tls: bool
    tag: str | None
    mail_from: str  # "" for the null sender
    rcpt_to: str


@cache
def default_local_names() -> frozenset[str]:
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    names.add(mailname().lower())
    names |= {f"[{a}]" for a in local_addresses()}
    return frozenset(names)


class Ruleset:
    def __init__(
        self,
        config: Config,
        tables: Mapping[str, Table],
        *,
        local_names: frozenset[str] | None = None,
    ) -> None:
        self.config = config
        self.tables = TableResolver(config, tables)
        self.local_names = frozenset(
            n.lower() for n in (local_names if local_names is not None else default_local_names())
        )

    async def match(self, ctx: MatchContext) -> Match | None:
        """The first rule whose criteria all hold (its ``action`` None = reject), or None.
        Raises TableError when a table cannot answer (temporary failure)."""
        for rule in self.config.matches:
            if await self._rule_matches(rule, ctx):
                return rule
        return None

    async def _rule_matches(self, rule: Match, ctx: MatchContext) -> bool:
        for criterion in rule.criteria:
            result = await self._criterion(criterion, ctx)
            if result == criterion.negated:
                return False
        return True

    async def _check(self, c: Criterion, service: Service, key: str) -> bool:
        assert c.table is not None
        table = self.tables.get(c.table)
        return await table.check(Service.REGEX if c.regex else service, key)

    async def _criterion(self, c: Criterion, ctx: MatchContext) -> bool:
        rcpt_domain = split_mailaddr(ctx.rcpt_to)[1]
        kind = c.kind
        if kind == "from-any" or kind == "for-any":
            return True
        if kind == "from-local":
            return ctx.local or ctx.socket
        if kind == "from-socket":
            return ctx.socket
        if kind == "from-src":
            key = "local" if ctx.socket else ctx.src_ip
            return await self._check(c, Service.NETADDR, key)
        if kind == "from-rdns":
            if ctx.rdns is None:
                return False
            return c.table is None or await self._check(c, Service.DOMAIN, ctx.rdns)
        if kind == "for-local":
            name = rcpt_domain.lower()
            return any(domain_match(name, n) for n in self.local_names)
        if kind == "for-domain":
            return await self._check(c, Service.DOMAIN, rcpt_domain)
        if kind == "rcpt-to":
            return await self._check(c, Service.MAILADDR, ctx.rcpt_to)
        if kind == "mail-from":
            return await self._check(c, Service.MAILADDR, ctx.mail_from)
        if kind == "tag":
            return ctx.tag is not None and await self._check(c, Service.STRING, ctx.tag)
        if kind == "helo":
            return await self._check(c, Service.DOMAIN, ctx.helo)
        if kind == "tls":
            return ctx.tls
        if kind == "auth":
            if ctx.auth_user is None:
                return False
            if c.table is None:
                return True
            service = Service.MAILADDR if "@" in ctx.auth_user else Service.STRING
            return await self._check(c, service, ctx.auth_user)
        raise ValueError(f"unknown match criterion {kind!r}")  # pragma: no cover
