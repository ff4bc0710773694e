"""``%{...}`` format specifiers in action paths and commands (OpenSMTPD mda_variables.c).

``%{token[slice]:modifier|modifier}``; tokens: sender, sender.user, sender.domain, rcpt,
rcpt.user, rcpt.domain, dest, dest.user, dest.domain, user.username, user.directory,
mbox.from, mda. ``[n]`` picks one character, ``[a:b]`` a range, both inclusive, negative from
the end. Modifiers: lowercase, uppercase, strip (drop the ``+tag``), raw (no sanitizing).
Unless raw, characters in ``!#$%&'*/?^`{|}~`` are replaced by ``:`` (not in user.directory
and mda). ``%%`` is a literal ``%``; a leading ``~/`` means the user's home directory.

Deviation: OpenSMTPD rejects modifiers after a slice (``%{rcpt.user[0]:lowercase}``) because
of a parsing slip; Pigeon applies them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ESCAPE = set("!#$%&'*/?^`{|}~")
EXPAND_BUFFER = 4096
_TOKEN = re.compile(r"^([A-Za-z.]+)(?:\[(-?\d*)(?::(-?\d*))?\])?(?::(.*))?$")


class FormatError(ValueError):
    """The format cannot be expanded (unknown token/modifier, bad slice, too long)."""


@dataclass(frozen=True)
class FormatContext:
    sender: str  # "" for the null sender
    rcpt: str
    dest: str
    username: str = ""
    directory: str = ""
    mda: str = ""
    subaddr_delim: str = "+"


def _addr(address: str) -> tuple[str, str]:
    if "@" in address:
        user, domain = address.rsplit("@", 1)
        return user, domain
    return address, ""


def _value(name: str, ctx: FormatContext) -> tuple[str, bool]:
    """(value, sanitize?) for a token name."""
    key = name.lower()
    parts = {"sender": ctx.sender, "rcpt": ctx.rcpt, "dest": ctx.dest}
    if key in parts:
        user, domain = _addr(parts[key])
        return ("" if not user and not domain else f"{user}@{domain}"), True
    if key == "mbox.from":
        user, domain = _addr(ctx.sender)
        return ("MAILER-DAEMON" if not user and not domain else f"{user}@{domain}"), True
    if "." in key:
        base, part = key.split(".", 1)
        if base in parts and part in ("user", "domain"):
            user, domain = _addr(parts[base])
            return (user if part == "user" else domain), True
    if key == "user.username":
        return ctx.username, True
    if key == "user.directory":
        return ctx.directory, False
    if key == "mda":
        return ctx.mda, False
    raise FormatError(f"unknown format token: {name}")


def _token(spec: str, ctx: FormatContext) -> str:
    m = _TOKEN.match(spec)
    if not m:
        raise FormatError(f"invalid format token: {spec}")
    name, begin, end, mods = m.groups()
    value, sanitize = _value(name, ctx)
    raw = False
    for mod in mods.split("|") if mods else []:
        mod = mod.lower()
        if mod == "lowercase":
            value = value.lower()
        elif mod == "uppercase":
            value = value.upper()
        elif mod == "strip":
            value = _strip(value, ctx.subaddr_delim)
        elif mod == "raw":
            raw = True
        else:
            raise FormatError(f"unknown format modifier: {mod}")
    if sanitize and not raw:
        value = "".join(":" if c in ESCAPE else c for c in value)
    if not value:
        return ""
    if m.group(2) is None and end is None:
        return value
    return _slice(value, begin, end, spec)


def _strip(value: str, delim: str) -> str:
    if delim not in value:
        return value
    head, _, tail = value.partition(delim)
    return head + tail[tail.index("@") :] if "@" in tail else head


def _slice(value: str, begin_s: str | None, end_s: str | None, spec: str) -> str:
    n = len(value)
    has_sep = ":" in spec.split("]")[0]
    begin = int(begin_s) if begin_s else 0
    end = begin if not has_sep else (int(end_s) if end_s else EXPAND_BUFFER)
    if begin >= n:
        raise FormatError(f"format slice out of range: {spec}")
    end = min(end, n - 1)
    if begin < 0:
        begin += n
    if end < 0:
        end += n - 1
    if begin < 0 or end < 0 or end < begin:
        raise FormatError(f"format slice out of range: {spec}")
    return value[begin : end + 1]


def expand_format(fmt: str, ctx: FormatContext) -> str:
    out: list[str] = []
    i = 0
    if fmt.startswith("~/"):
        out.append(ctx.directory + "/")
        i = 2
    while i < len(fmt):
        if fmt.startswith("%%", i):
            out.append("%")
            i += 2
        elif fmt.startswith("%{", i):
            close = fmt.find("}", i + 2)
            if close == -1:
                raise FormatError("unterminated %{ in format")
            out.append(_token(fmt[i + 2 : close], ctx))
            i = close + 1
        else:
            out.append(fmt[i])
            i += 1
    result = "".join(out)
    if len(result) >= EXPAND_BUFFER:
        raise FormatError("expanded format too long")
    return result
