"""Value checks shared by the builder: delays, sizes, names, ports (OpenSMTPD's rules)."""

from __future__ import annotations

import re
import socket

_SCALE = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
# Leading blanks and a "+" are taken, as strtonum(3) and scan_scaled(3) take them.
_SCALED = re.compile(r"^\s*\+?(-?\d+)(?:\.(\d+))?([bkmgtpe]?)$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*\+?(\d+)([smhd])$")
_DELAY_FACTOR = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INT_MAX = 2**31 - 1
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?$")

MTA_LIMIT_KEYS = frozenset(
    """max-conn-per-host max-conn-per-route max-conn-per-source max-conn-per-connector
    max-conn-per-relay max-conn-per-domain conn-delay-host conn-delay-route conn-delay-source
    conn-delay-connector conn-delay-relay conn-delay-domain reconn-delay-route
    session-mail-max session-transaction-delay session-keepalive max-failures-per-session
    task-hiwat task-lowat task-release""".split()  # noqa: SIM905
)
MDA_LIMIT_KEYS = frozenset(
    ["max-session", "max-session-per-user", "task-lowat", "task-hiwat", "task-release"]
)
SCHEDULER_LIMIT_KEYS = frozenset(
    ["max-inflight", "max-evp-batch-size", "max-msg-batch-size", "max-schedule"]
)
SMTP_LIMIT_KEYS = frozenset(("max-mails", "max-rcpt"))


def parse_delay(text: str) -> int | None:
    """``delaytonum``: digits plus one of s/m/h/d, at least 1, result fits an int."""
    m = _DELAY.match(text)
    if not m:
        return None
    factor = _DELAY_FACTOR[m.group(2)]
    value = int(m.group(1))
    if value < 1 or value > _INT_MAX // factor:
        return None
    return value * factor


def parse_size(text: str) -> int | None:
    """``scan_scaled``: a number with an optional B/K/M/G/T/P/E suffix (powers of 1024)."""
    m = _SCALED.match(text)
    if not m:
        return None
    whole = int(m.group(1))
    scale = _SCALE[m.group(3).lower()]
    frac = m.group(2)
    value = whole * scale
    if frac and scale > 1:
        value += int(int(frac) * scale / 10 ** len(frac)) * (-1 if whole < 0 else 1)
    elif frac:
        return None
    if value < 0 or value >= 2**63:
        return None
    return value


def valid_hostname(name: str) -> bool:
    """``res_hnok``-like: dot-separated labels of letters, digits, ``-`` and ``_``."""
    if name == "*":
        return True
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return bool(name) and all(_LABEL.match(label) for label in labels)


def service_port(name: str) -> int | None:
    """A TCP service name from /etc/services (``submission`` = 587), None if unknown."""
    try:
        return socket.getservbyname(name, "tcp")
    except OSError:
        return {"smtp": 25, "smtps": 465, "submission": 587, "submissions": 465}.get(name)
