"""SMTP AUTH password checks, the ``senders`` restriction and the ``masquerade`` rewrite.

Password sources (``listen ... auth [<table>]``):

* with a table that provides the ``auth`` service, the table decides: it gets
  ``check auth user:password`` (OpenSMTPD 7.6+ offloading, for LDAP/PAM-like tables);
* with any other table, ``lookup credentials <user>`` gives ``user:HASH`` or ``HASH`` and the
  password is checked against the crypt(3) hash (see :mod:`pigeon.crypt_hash`);
* without a table, system users: the hash comes from the shadow file (``/etc/shadow``,
  readable by root or the ``shadow`` group) or, without an entry there, from the passwd
  entry; the user must exist in the passwd database. Locked (``!``/``*``) and empty
  hashes never match: unlike crypt_checkpass, an account without a password cannot log in
  over SMTP. OpenSMTPD uses PAM (or getspnam + crypt) here; Pigeon does not use PAM.

A missing user or a wrong password is ``False`` (the session answers ``535``); a table
failure raises :class:`~pigeon.tables.base.TableError` (the session answers ``421``).

``senders <table> [masquerade]`` (only for authenticated sessions on that listener): the
``mailaddrmap`` lookup of the authenticated user name gives a comma list of ``user``,
``@domain`` or ``user@domain`` entries (``@`` alone matches everything); MAIL FROM must match
one of them, or the session answers ``530 Sender rejected`` (a table failure:
``421 4.3.0 Temporary Error``). With ``masquerade``, the addresses of the message's
``From:`` header are then replaced by the envelope sender (:func:`masquerade_from`).
"""

from __future__ import annotations

import asyncio
import logging
import pwd
from collections.abc import Awaitable, Callable

from pigeon.crypt_hash import verify_password
from pigeon.protocol.replies import Reply
from pigeon.rules.expand import split_expansion_list
from pigeon.tables.base import TableError
from pigeon.tables.static import mailaddr_match

log = logging.getLogger(__name__)

Lookup = Callable[[str, str], Awaitable[str | None]]  # (service, key) -> value or None
AuthCheck = Callable[[str], Awaitable[bool]]  # ``auth`` service check of "user:password"

SHADOW_PATH = "/etc/shadow"
SENDER_REJECTED = Reply(530, "Sender rejected")
SENDER_TEMPFAIL = Reply(421, "Temporary Error", "4.3.0")


def parse_credentials(key: str, value: str) -> tuple[str, str]:
    """A ``credentials`` value: ``user:HASH``, or ``HASH`` alone (the user is then the key).
    Values shorter than 3 characters are refused, as OpenSMTPD does."""
    if len(value) < 3:
        raise TableError(f'invalid credentials for "{key}"')
    user, sep, hashed = value.partition(":")
    if not sep:
        return key, value
    return user, hashed


def read_shadow_hash(username: str, path: str = SHADOW_PATH) -> str | None:
    """The hash field of ``username`` in a shadow(5) file; None if absent or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 2 and fields[0] == username:
                    return fields[1]
    except OSError as exc:
        log.warning("cannot read %s (%s): system users cannot authenticate", path, exc.strerror)
    return None


def check_system_password(username: str, password: str, shadow_path: str = SHADOW_PATH) -> bool:
    """Blocking: the system-user check described in the module docstring."""
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        return False
    hashed = read_shadow_hash(username, shadow_path)
    if hashed is None:
        hashed = entry.pw_passwd
    if not hashed or hashed[0] in "!*" or hashed == "x":
        return False
    return verify_password(password, hashed)


class CredentialsChecker:
    """Checks AUTH credentials for one listener. ``lookup`` is the listener's table (None:
    system users); ``auth_check`` is given when that table provides the ``auth`` service.
    An instance can be used directly as the listener's authenticator."""

    def __init__(
        self,
        lookup: Lookup | None = None,
        *,
        auth_check: AuthCheck | None = None,
        shadow_path: str = SHADOW_PATH,
    ) -> None:
        self._lookup = lookup
        self._auth_check = auth_check
        self._shadow_path = shadow_path

    async def check(self, username: str, password: str) -> bool:
        if self._auth_check is not None:
            return await self._auth_check(f"{username}:{password}")
        if self._lookup is None:
            return await asyncio.to_thread(
                check_system_password, username, password, self._shadow_path
            )
        value = await self._lookup("credentials", username)
        if value is None:
            return False
        _, hashed = parse_credentials(username, value)
        # hashing costs milliseconds (bcrypt: tens of them): keep it off the event loop
        return await asyncio.to_thread(verify_password, password, hashed)

    async def __call__(self, username: str, password: str) -> bool:
        return await self.check(username, password)


async def sender_allowed(user: str, mail_from: str, lookup: Lookup, delim: str = "+") -> bool:
    """May the authenticated ``user`` use ``mail_from`` (``user@domain``, or ``""`` for
    ``<>``) as MAIL FROM? A user the table does not know may use none."""
    value = await lookup("mailaddrmap", user)
    if value is None:
        return False
    return any(mailaddr_match(mail_from, entry, delim) for entry in split_expansion_list(value))


def _split_top_level(value: str) -> list[str]:
    """Split a header value on the commas outside quotes, comments and escapes."""
    parts: list[str] = []
    start = 0
    escape = quote = False
    comment = 0
    for i, c in enumerate(value):
        if escape:
            escape = False
        elif c == "\\":
            escape = True
        elif quote:
            quote = c != '"'
        elif c == '"' and not comment:
            quote = True
        elif c == "(":
            comment += 1
        elif c == ")" and comment:
            comment -= 1
        elif c == "," and not comment:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def _rewrite_one(part: str, address: str) -> str:
    escape = quote = False
    comment = bracket = 0
    bracket_begin = bracket_end = -1
    last = -1  # last character outside comments that is not a space
    for i, c in enumerate(part):
        if escape:
            escape = False
        elif c == "\\":
            escape = True
        elif quote:
            quote = c != '"'
        elif c == '"' and not comment:
            quote = True
        elif c == "(":
            comment += 1
        elif c == ")" and comment:
            comment -= 1
            continue
        elif comment:
            continue
        elif c == "<" and not bracket:
            bracket, bracket_begin = 1, i + 1
        elif c == ">" and bracket:
            bracket, bracket_end = 0, i
        elif c == ":":
            return part  # a group: left alone
        if not comment and not c.isspace():
            last = i
    if escape or quote or comment or bracket:
        return part  # unparsable: left alone
    if bracket_begin >= 0:
        return part[:bracket_begin] + address + part[bracket_end:]
    if last < 0:
        return part  # no address at all
    begin = last
    while begin > 0 and not (part[begin - 1].isspace() or part[begin - 1] == ")"):
        begin -= 1
    return part[:begin] + address + part[last + 1 :]


def masquerade_from(value: str, sender: str) -> str:
    """The ``From:`` header value with each address replaced by ``sender`` (the envelope
    MAIL FROM), keeping display names, comments and folding; groups and unparsable
    addresses are kept as they are. This is what ``senders <t> masquerade`` does to the
    messages of authenticated sessions."""
    return ",".join(_rewrite_one(part, sender) for part in _split_top_level(value))
