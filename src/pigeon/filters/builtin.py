"""Builtin filters: ``filter NAME phase PHASE match [!]CONDITION ACTION``.

Evaluated in-process, the way OpenSMTPD's ``lka_filter.c`` does: a builtin in any phase
checks its condition against what the session knows so far (a condition on data the
session does not have yet, such as ``helo`` at connect, is false, negated or not); the
``rcpt-to`` condition only exists in the rcpt-to phase, and the ``auth`` phase never
matches (its evaluator is a no-op in OpenSMTPD 6.8).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from pigeon.config.model import BuiltinFilter, TableRef
from pigeon.tables.base import Service, Table

UNKNOWN_RDNS = "<unknown>"  # what OpenSMTPD reports for a client without a PTR name


@dataclass
class SessionFacts:
    """What a builtin condition can look at; None means not known (yet)."""

    rdns: str = UNKNOWN_RDNS
    fcrdns: bool = False
    src: str = "local"  # client IP text, or "local" for the local socket
    helo: str | None = None
    auth_user: str | None = None
    mail_from: str | None = None
    rcpt_to: str | None = None  # the recipient of the current rcpt-to phase


def has_rdns(name: str) -> bool:
    """A session has an rDNS name unless it is ``<unknown>`` or an address."""
    if not name or name == UNKNOWN_RDNS:
        return False
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return True
    return False


TableGetter = Callable[[TableRef], Table]


async def builtin_matches(
    spec: BuiltinFilter, phase: str, facts: SessionFacts, tables: TableGetter
) -> bool:
    """Whether the builtin's (possibly negated) condition holds in ``phase``."""
    if phase == "auth":
        return False
    cond = spec.condition
    if cond == "fcrdns":
        return facts.fcrdns != spec.negated
    if cond == "rdns" and spec.table is None:
        return has_rdns(facts.rdns) != spec.negated
    if cond == "auth" and spec.table is None:
        return (facts.auth_user is not None) != spec.negated
    if cond == "rcpt-to" and phase != "rcpt-to":
        return False
    key, service = _key(cond, facts)
    if key is None or spec.table is None:
        return False
    table = tables(spec.table)
    found = await table.check(Service.REGEX if spec.regex else service, key)
    return found != spec.negated


def _key(cond: str, facts: SessionFacts) -> tuple[str | None, Service]:
    if cond == "rdns":
        return (facts.rdns if has_rdns(facts.rdns) else None), Service.DOMAIN
    if cond == "src":
        return facts.src, Service.NETADDR
    if cond == "helo":
        return facts.helo, Service.DOMAIN
    if cond == "auth":
        user = facts.auth_user
        return user, Service.MAILADDR if user and "@" in user else Service.STRING
    if cond == "mail-from":
        return facts.mail_from, Service.MAILADDR
    if cond == "rcpt-to":
        return facts.rcpt_to, Service.MAILADDR
    raise ValueError(f"unknown builtin filter condition {cond!r}")
