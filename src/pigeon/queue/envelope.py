"""Envelopes: one per final destination of an accepted message.

Fields follow OpenSMTPD's envelope file (delivery-queue.md 1.3) so ``pigeon show envelope``
prints what smtpctl admins expect. The envelope stores the *dispatcher name*, not the resolved
action: the action is looked up again at each attempt, so a config change applies to queued mail.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields
from typing import Any

# DSN NOTIFY bitmask, as OpenSMTPD stores it.
DSN_SUCCESS = 1
DSN_FAILURE = 2
DSN_DELAY = 4
DSN_NEVER = 8

# Envelope flags.
FLAG_AUTHENTICATED = "authenticated"
FLAG_BOUNCE = "bounce"
FLAG_INTERNAL = "internal"


def new_msgid(taken: set[int] | None = None) -> int:
    """A random non-zero 32-bit message id, not in ``taken``."""
    while True:
        value = secrets.randbits(32)
        if value and (taken is None or value not in taken):
            return value


def new_evpid(msgid: int) -> int:
    """``msgid << 32 | rnd32`` with rnd32 != 0, as OpenSMTPD builds envelope ids."""
    while True:
        low = secrets.randbits(32)
        if low:
            return (msgid << 32) | low


def msgid_hex(msgid: int) -> str:
    return f"{msgid:08x}"


def evpid_hex(evpid: int) -> str:
    return f"{evpid:016x}"


def msgid_of(evpid: int) -> int:
    return evpid >> 32


def parse_dsn_notify(value: str | None) -> int:
    """``NOTIFY=SUCCESS,FAILURE`` -> bitmask; None (not given) -> 0 (default behaviour)."""
    if not value:
        return 0
    bits = 0
    for word in value.upper().split(","):
        bits |= {
            "SUCCESS": DSN_SUCCESS,
            "FAILURE": DSN_FAILURE,
            "DELAY": DSN_DELAY,
            "NEVER": DSN_NEVER,
        }.get(word.strip(), 0)
    return bits


@dataclass(slots=True)
class Envelope:
    """One destination of one message, with its delivery state."""

    evpid: int
    dispatcher: str
    type: str  # "mda" (local), "mta" (relay) or "bounce"
    sender: str  # "" for the null sender
    rcpt: str  # the RCPT TO as the client gave it
    dest: str  # final destination after expansion
    ctime: int
    smtpname: str = ""
    helo: str = ""
    hostname: str = ""
    sockaddr: str = ""
    tag: str = ""
    username: str = ""  # authenticated user, if any
    errorline: str = ""
    last_try: int = 0
    last_bounce: int = 0
    ttl: int = 0
    retry: int = 0
    flags: list[str] = field(default_factory=list)
    dsn_notify: int = 0
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_orcpt: str = ""
    esc_class: int = 0
    esc_code: int = 0
    mda_exec: str = ""  # alias "|cmd" or "/file" target replacing the action's method
    mda_subaddress: str = ""
    mda_user: str = ""  # local user the delivery runs as
    bounce_type: str = ""  # for type "bounce": "failed", "delayed", "delivered"

    @property
    def msgid(self) -> int:
        return msgid_of(self.evpid)

    def to_dict(self) -> dict[str, Any]:
        # Hand-written instead of dataclasses.asdict: that deep-copies, and this is hot.
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        out["flags"] = list(self.flags)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Envelope:
        return cls(**{k: v for k, v in data.items() if k in _FIELD_SET})

    def render(self) -> str:
        """``key: value`` lines in OpenSMTPD's field order, empty fields omitted."""
        order = [
            ("version", "3"),
            ("dispatcher", self.dispatcher),
            ("tag", self.tag),
            ("type", self.type),
            ("smtpname", self.smtpname),
            ("helo", self.helo),
            ("hostname", self.hostname),
            ("username", self.username),
            ("errorline", self.errorline),
            ("sockaddr", self.sockaddr),
            ("sender", self.sender),
            ("rcpt", self.rcpt),
            ("dest", self.dest),
            ("ctime", str(self.ctime)),
            ("last-try", str(self.last_try)),
            ("last-bounce", str(self.last_bounce)),
            ("ttl", str(self.ttl)),
            ("retry", str(self.retry)),
            ("flags", ",".join(self.flags)),
            ("dsn-notify", str(self.dsn_notify)),
            ("dsn-ret", self.dsn_ret),
            ("dsn-envid", self.dsn_envid),
            ("dsn-orcpt", self.dsn_orcpt),
            ("esc-class", str(self.esc_class) if self.esc_class else ""),
            ("esc-code", str(self.esc_code) if self.esc_class else ""),
        ]
        if self.type == "mda":
            order += [
                ("mda-exec", self.mda_exec),
                ("mda-subaddress", self.mda_subaddress),
                ("mda-user", self.mda_user),
            ]
        if self.type == "bounce":
            order += [("bounce-type", self.bounce_type)]
        return "".join(f"{k}: {v}\n" for k, v in order if v != "")


_FIELD_NAMES = tuple(f.name for f in fields(Envelope))
_FIELD_SET = frozenset(_FIELD_NAMES)
