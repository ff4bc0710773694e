"""SMTP paths, mailboxes and ESMTP parameters (RFC 5321 section 4.1.2, RFC 3461 xtext).

Pure string handling, no I/O. The rules follow OpenSMTPD's ``smtp_mailaddr()``,
``valid_localpart()`` and ``valid_domainpart()`` where they are stricter than the RFC
(no trailing dot in a domain, ASCII-only unless SMTPUTF8), and the RFC where OpenSMTPD is
sloppy (``<user@>`` is refused instead of silently becoming ``user@<hostname>``; quoted
local parts are accepted, and one that needs no quotes is the unquoted mailbox).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# RFC 5322 atext specials; identical to OpenSMTPD's MAILADDR_ALLOWED.
_ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")
MAX_LOCAL_PART = 255  # OpenSMTPD's SMTPD_MAXLOCALPARTSIZE - 1; RFC 5321 says 64.
MAX_DOMAIN = 255
MAX_LABEL = 63

# Fast paths for the usual all-ASCII cases (the per-character loops below decide the rest).
_ASCII_DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
)
_ASCII_DOMAIN = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AddressError(ValueError):
    """A path, mailbox or parameter that does not parse."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A mailbox split at its last ``@``; the local part keeps its quotes if it had any."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


def _is_atext(ch: str, utf8: bool) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in _ATEXT_SPECIALS
    return utf8 and ch.isprintable()


def valid_dot_atom(local: str, utf8: bool = False) -> bool:
    """``atom *("." atom)``: no empty atom, so no leading, trailing or double dot."""
    if not local:
        return False
    if _ASCII_DOT_ATOM.fullmatch(local):
        return True
    return all(atom and all(_is_atext(c, utf8) for c in atom) for atom in local.split("."))


def valid_quoted_string(local: str, utf8: bool = False) -> bool:
    """``DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE`` (RFC 5321 section 4.1.2)."""
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    i, end = 1, len(local) - 1
    while i < end:
        ch = local[i]
        if ch == "\\":
            if i + 1 >= end or not (32 <= ord(local[i + 1]) <= 126):
                return False
            i += 2
            continue
        if ch == '"':
            return False
        if ch.isascii():
            if not (32 <= ord(ch) <= 126):
                return False
        elif not (utf8 and ch.isprintable()):
            return False
        i += 1
    return True


def valid_local_part(local: str, utf8: bool = False) -> bool:
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART:
        return False
    return valid_dot_atom(local, utf8) or valid_quoted_string(local, utf8)


def valid_address_literal(literal: str) -> bool:
    """``[1.2.3.4]``, ``[IPv6:::1]``, and (as OpenSMTPD) ``[::1]`` without the tag."""
    if len(literal) < 3 or literal[0] != "[" or literal[-1] != "]":
        return False
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        versions: tuple[int, ...] = (6,)
    else:
        versions = (4, 6)
    try:
        return ipaddress.ip_address(inner).version in versions
    except ValueError:
        return False


def valid_domain(domain: str, utf8: bool = False) -> bool:
    """A hostname (letters, digits, ``-``, ``_``; U-labels with SMTPUTF8) or an address literal."""
    if domain.startswith("["):
        return valid_address_literal(domain)
    if not domain or len(domain.encode("utf-8", "surrogatepass")) > MAX_DOMAIN:
        return False
    if _ASCII_DOMAIN.fullmatch(domain):
        return True
    for label in domain.split("."):
        if not label or len(label) > MAX_LABEL:
            return False
        for ch in label:
            if ch.isascii():
                if not (ch.isalnum() or ch in "-_"):
                    return False
            elif not (utf8 and ch.isalnum()):
                return False
    return True


def split_address(address: str) -> tuple[str, str]:
    """``"a@b"`` -> ``("a", "b")``; split at the last ``@``; no ``@`` gives an empty domain."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain


def _find_closing_bracket(text: str) -> int:
    """Index of the ``>`` closing a path that starts at ``text[0] == "<"``, or -1.

    Quoted strings and quoted pairs may contain ``>``; domain literals may not.
    """
    if '"' not in text:
        return text.find(">")
    in_quote = False
    i = 1
    while i < len(text):
        ch = text[i]
        if in_quote:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == ">":
            return i
        i += 1
    return -1


def _strip_source_route(inner: str, utf8: bool) -> str:
    """Drop a source route, which servers must accept and may ignore: an RFC 5321 A-d-l
    (``@a,@b:``), or as OpenSMTPD does, whatever an unquoted local part holds up to its
    first ``:`` (``<whatever:a@b>`` is ``a@b``). Rules match what is left."""
    if inner.startswith("@"):
        route, sep, inner = inner.partition(":")
        if not sep:
            raise AddressError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@") or not valid_domain(hop[1:], utf8):
                raise AddressError("bad source route")
    at = inner.rfind("@")
    local = inner[:at] if at >= 0 else inner
    colon = local.find(":")
    if colon >= 0 and not local.startswith('"'):
        return inner[colon + 1 :]
    return inner


def parse_mailbox(text: str, *, utf8: bool = False, default_domain: str | None = None) -> Mailbox:
    """Validate ``local@domain``. Without ``@``, ``default_domain`` is used if given
    (OpenSMTPD makes ``<postmaster>`` into ``postmaster@<hostname>``)."""
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    if not utf8 and not text.isascii():
        raise AddressError("8-bit address without SMTPUTF8")
    at = text.rfind("@")
    if at < 0:
        if default_domain is None:
            raise AddressError("missing domain")
        local, domain = text, default_domain
    else:
        local, domain = text[:at], text[at + 1 :]
        if not domain:
            raise AddressError("empty domain")
    if not valid_local_part(local, utf8):
        raise AddressError("bad local part")
    if not valid_domain(domain, utf8):
        raise AddressError("bad domain")
    return Mailbox(unquote_local_part(local, utf8), domain)


def unquote_local_part(local: str, utf8: bool = False) -> str:
    """``"alice"`` is the mailbox ``alice`` (RFC 5321 section 4.1.2: a quoted string that
    needs no quoting is the same local part): looked up, matched and relayed unquoted. A
    local part that needs its quotes (``"a b"``, ``"x@y"``) keeps them."""
    if not local.startswith('"'):
        return local
    inner = re.sub(r"\\(.)", r"\1", local[1:-1])
    return inner if valid_dot_atom(inner, utf8) else local


def parse_path(
    text: str,
    *,
    allow_null: bool,
    utf8: bool = False,
    default_domain: str | None = None,
) -> tuple[str, str]:
    """Parse a reverse-path or forward-path at the start of ``text``.

    Returns ``(address, rest)``: the address without brackets or source route (``""`` for
    the null path ``<>``, only when ``allow_null``), and what follows ``>`` with leading
    spaces removed (the ESMTP parameters). Raises :class:`AddressError`.
    """
    if not text.startswith("<"):
        raise AddressError("path must start with '<'")
    close = _find_closing_bracket(text)
    if close < 0:
        raise AddressError("missing '>'")
    # OpenSMTPD does not insist on a space between ">" and the first parameter.
    inner, rest = text[1:close], text[close + 1 :].lstrip(" ")
    if inner == "" or inner == "@":  # OpenSMTPD reads "<@>" as the null path too
        if not allow_null:
            raise AddressError("null path not allowed here")
        return "", rest
    mailbox = parse_mailbox(
        _strip_source_route(inner, utf8), utf8=utf8, default_domain=default_domain
    )
    return str(mailbox), rest


# -- ESMTP parameters -----------------------------------------------------------------


def _valid_keyword(key: str) -> bool:
    return (
        bool(key)
        and key.isascii()
        and key[0].isalnum()
        and all(c.isalnum() or c == "-" for c in key)
    )


def _valid_param_value(value: str) -> bool:
    # esmtp-value = 1*(%d33-60 / %d62-126); RFC 6531 also allows UTF-8 here.
    return bool(value) and all(
        (33 <= ord(c) <= 126 and c != "=") or (not c.isascii() and c.isprintable()) for c in value
    )


def parse_params(text: str) -> list[tuple[str, str | None, str]]:
    """Split ``KEY=VALUE KEY2 ...`` into ``(KEY upper-cased, value or None, raw token)``.

    Tokens are separated by spaces (empty ones skipped, as OpenSMTPD). A malformed token
    raises :class:`AddressError` whose message is the raw token.
    """
    out: list[tuple[str, str | None, str]] = []
    for token in text.split(" "):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if not _valid_keyword(key) or (sep and not _valid_param_value(value)):
            raise AddressError(token)
        out.append((key.upper(), value if sep else None, token))
    return out


# -- xtext (RFC 3461 section 4) -------------------------------------------------------

_HEX = "0123456789ABCDEF"


def valid_xtext(text: str) -> bool:
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                return False
            i += 3
            continue
        if not (33 <= ord(ch) <= 126) or ch == "=":
            return False
        i += 1
    return True


def xtext_decode(text: str) -> str:
    """Decode ``+HH`` escapes (upper-case hex, as RFC 3461 says); bytes are read as UTF-8."""
    if not valid_xtext(text):
        raise AddressError(f"invalid xtext: {text!r}")
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += text[i].encode("ascii")
            i += 1
    return raw.decode("utf-8", "replace")


def xtext_encode(text: str) -> str:
    """Encode ``+``, ``=``, controls, space and non-ASCII (as UTF-8 bytes) as ``+HH``."""
    out: list[str] = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
