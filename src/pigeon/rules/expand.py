"""Recipient expansion at RCPT time: rule match, virtual/alias tables, sub-addresses, the
user base, ``~/.forward``, and re-matching of the addresses these produce.

Order for a recipient (OpenSMTPD lka_session.c / delivery-queue.md 2.6):
1. the ruleset picks the action; relay actions deliver to the address as is;
2. local actions with ``virtual``: lookup ``user+tag@domain``, ``user@domain``, ``user+tag``,
   ``user``, ``@domain``, ``@`` (a miss is ``524 5.2.4``);
   otherwise the address becomes its user name;
3. a user name: ``alias`` table (``user+tag`` then ``user``), unless the name came from the
   same user (``root: root, bob``); with ``virtual``, ``user@`` then ``user`` in that table;
4. no alias: sub-address stripped, user base lookup (unknown -> ``550 Invalid recipient``),
   then ``~/.forward`` of that user; nothing there -> deliver to the user.
Addresses produced by expansion are matched again (as ``from local``), to depth 10. A node
seen before in the same expansion is skipped, which is what ends alias loops.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import re
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from pigeon.config.model import Action, Config
from pigeon.delivery.local import DAEMON_ACCOUNT
from pigeon.errors import SMTPError
from pigeon.rules.ruleset import MatchContext, Ruleset
from pigeon.tables.base import Service, Table, TableError, TableResolver
from pigeon.tables.static import split_mailaddr

log = logging.getLogger("pigeon.expand")

EXPAND_DEPTH = 10
MAX_NODES = 100  # per alias/forward value
FORWARD_MAX_SIZE = 4096
_USER_RE = re.compile(r"^[A-Za-z0-9_.+=-]+$")
_ADDR_RE = re.compile(r"^[^@\s,\"<>|/]+@[^@\s,\"<>]+$")
_ERROR_RE = re.compile(r"^:?error:\s*([45]\d\d)\s+(.*)$", re.IGNORECASE | re.DOTALL)
_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Destination:
    dispatcher: str  # the action name
    rcpt: str  # the RCPT TO address as given
    dest: str  # final user@domain after expansion
    user: str | None  # local user to deliver as/to (None: relay, or lmtp without user)
    mda_exec: str | None  # "|command" or "/file" from an alias/.forward
    subaddress: str | None
    internal: bool  # produced by alias/virtual/.forward (SRS rewrites these)


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class Node:
    """One expansion item: kind is address, username, filename, pipe, include or error."""

    kind: str
    value: str


async def getpwnam_userinfo(name: str) -> UserInfo | None:
    try:
        pw = await asyncio.to_thread(pwd.getpwnam, name)
    except KeyError:
        return None
    return UserInfo(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def split_expansion_list(text: str) -> list[str]:
    """Split an aliases(5) value on commas that are neither quoted nor escaped."""
    items: list[str] = []
    buf: list[str] = []
    quote: str | None = None
    escaped = False
    for c in text:
        if escaped:
            buf.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif quote:
            if c == quote:
                quote = None
            else:
                buf.append(c)
        elif c in "\"'":
            quote = c
        elif c == ",":
            items.append("".join(buf).strip())
            buf = []
        else:
            buf.append(c)
    items.append("".join(buf).strip())
    return [i for i in items if i]


def parse_node(item: str, *, allow_include: bool = True) -> Node | None:
    """Classify one expansion value (aliases.c ``alias_parse``); None if invalid."""
    if _ERROR_RE.match(item):
        return Node("error", item)
    lowered = item.lower()
    for prefix in (":include:", "include:"):
        if lowered.startswith(prefix):
            return Node("include", item[len(prefix) :].strip()) if allow_include else None
    if item.startswith("|"):
        return Node("pipe", item[1:].strip())
    if item.startswith("/"):
        return Node("filename", item)
    if "@" in item:
        return Node("address", item) if _ADDR_RE.match(item) else None
    if _USER_RE.match(item):
        return Node("username", item.lower())
    return None


def parse_values(text: str, *, allow_include: bool = True) -> list[Node]:
    nodes: list[Node] = []
    for item in split_expansion_list(text):
        node = parse_node(item, allow_include=allow_include)
        if node is None:
            raise ValueError(f"invalid expansion entry: {item!r}")
        nodes.append(node)
    return nodes[:MAX_NODES]


def parse_userinfo(name: str, value: str) -> UserInfo | None:
    """A user base value ``uid:gid:home``."""
    parts = value.split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
        return None
    return UserInfo(name, int(parts[0]), int(parts[1]), parts[2])


class ForwardError(Exception):
    """A ``.forward`` that may not be used (forward(5): it is rejected, as in smtpd): the
    recipient is refused, 524 when ``permanent`` (an unsafe file), else 424."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


def _read_forward_sync(user: UserInfo) -> str | None:
    """``~/.forward`` with forward(5)'s safety rules; None = no file. A sticky home
    directory is a temporary failure (OpenSMTPD does the same); an unsafe file (writable by
    others, not the user's, a symlink, in a home others can write) or one too large is a
    :class:`ForwardError`: the user's forwarding must not silently stop or change."""
    try:
        home = os.stat(user.home)
    except OSError:
        return None
    if home.st_mode & stat.S_ISVTX:
        raise TableError(f"home directory of {user.name} is sticky")
    path = os.path.join(user.home, ".forward")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForwardError(f"{path}: unsecure file (a symbolic link)", permanent=True) from None
        return None  # unreadable: as if there were none
    try:
        st = os.fstat(fd)
        if home.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or home.st_uid not in (0, user.uid):
            raise ForwardError(f"{path}: unsecure file (home directory)", permanent=True)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != user.uid:
            raise ForwardError(f"{path}: unsecure file (owner)", permanent=True)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ForwardError(f"{path}: unsecure file (permissions)", permanent=True)
        if st.st_size >= FORWARD_MAX_SIZE:
            raise ForwardError(f"{path}: too large", permanent=False)
        data = os.read(fd, FORWARD_MAX_SIZE)
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace")


async def read_forward(user: UserInfo) -> str | None:
    return await asyncio.to_thread(_read_forward_sync, user)


def parse_forward(text: str) -> list[Node]:
    """forward(5): values per line, ``#`` comments, ``\\`` continuation, no includes
    (ignored), at most 100 nodes."""
    joined = re.sub(r"\\\n", "", text)
    nodes: list[Node] = []
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        for item in split_expansion_list(line):
            if item.lower().startswith((":include:", "include:")):
                continue
            node = parse_node(item, allow_include=False)
            if node is None:  # smtpd refuses the file, not just the line
                raise ValueError(f"invalid entry {item!r}")
            nodes.append(node)
    return nodes[:MAX_NODES]


def _invalid(rcpt: str) -> SMTPError:
    return SMTPError(550, None, f"Invalid recipient: <{rcpt}>")


def _expansion_problem(rcpt: str) -> SMTPError:
    return SMTPError(524, "5.2.4", f"Mailing list expansion problem: <{rcpt}>")


def _temporary(rcpt: str) -> SMTPError:
    return SMTPError(451, "4.2.0", f"Temporary failure: <{rcpt}>")


def _error_node(value: str) -> SMTPError:
    m = _ERROR_RE.match(value)
    assert m is not None
    code, text = int(m.group(1)), m.group(2).strip()
    enhanced = None
    e = _ENHANCED_RE.match(text)
    if e and e.group(1)[0] == str(code)[0]:
        enhanced, text = e.group(1), e.group(2)
    return SMTPError(code, enhanced, text)


@dataclass
class _Run:
    ctx: MatchContext
    seen: set[tuple[str, str, str]]
    results: dict[tuple[str, str, str | None, str | None], Destination]


class Expander:
    def __init__(
        self,
        config: Config,
        tables: Mapping[str, Table],
        ruleset: Ruleset,
        *,
        userinfo: Callable[[str], Awaitable[UserInfo | None]] | None = None,
        forward: Callable[[UserInfo], Awaitable[str | None]] | None = None,
    ) -> None:
        self.config = config
        self.ruleset = ruleset
        self.tables = TableResolver(config, tables)
        self.userinfo = userinfo or getpwnam_userinfo
        self.forward = forward or read_forward
        self.delim = config.smtp.sub_addr_delim

    async def expand(self, ctx: MatchContext) -> list[Destination]:
        """Every destination of one RCPT, deduplicated, or SMTPError."""
        run = _Run(ctx, set(), {})
        try:
            await self._address(run, ctx.rcpt_to, depth=0, internal=False, action=None)
        except TableError as e:
            raise _temporary(ctx.rcpt_to) from e
        if not run.results:
            raise _expansion_problem(ctx.rcpt_to)
        return list(run.results.values())

    # -- nodes -----------------------------------------------------------------------

    async def _address(
        self, run: _Run, address: str, depth: int, internal: bool, action: Action | None
    ) -> None:
        rcpt = run.ctx.rcpt_to
        if depth >= EXPAND_DEPTH:
            raise _expansion_problem(rcpt)
        if internal:
            # expansion output is matched as mail from this host
            ctx = replace(run.ctx, rcpt_to=address, local=True, socket=False, src_ip="local")
        else:
            ctx = run.ctx
        rule = await self.ruleset.match(ctx)
        if rule is None or rule.action is None:
            raise _invalid(rcpt)
        action = self.config.actions[rule.action]
        if not self._first_visit(run, "address", address.lower(), action.name):
            return
        if not action.is_local:
            self._deliver(run, action, address, None, None, None, internal)
            return
        user, domain = split_mailaddr(address)
        if action.virtual is not None:
            nodes = await self._virtual_lookup(action, user.lower(), domain.lower())
            if nodes is None:
                raise _expansion_problem(rcpt)
            await self._children(
                run, nodes, address, depth + 1, action, parent_user=None, owner=None
            )
            return
        await self._username(run, user.lower(), address, depth, internal, action, parent_user=None)

    async def _username(
        self,
        run: _Run,
        name: str,
        dest: str,
        depth: int,
        internal: bool,
        action: Action,
        parent_user: str | None,
    ) -> None:
        rcpt = run.ctx.rcpt_to
        if depth >= EXPAND_DEPTH:
            raise _expansion_problem(rcpt)
        if not self._first_visit(run, "username", name, action.name) and name != parent_user:
            return
        if name != parent_user:
            nodes = None
            if action.alias is not None:
                nodes = await self._alias_lookup(action, name)
            elif action.virtual is not None:
                nodes = await self._virtual_lookup(action, name, "")
            if nodes is not None:
                # an alias list belongs to no user: its commands and files run as the
                # daemon's account (smtpd: its own user), whoever the recipient is
                await self._children(
                    run, nodes, dest, depth + 1, action, parent_user=name, owner=None
                )
                return
        base, _, tag = name.partition(self.delim)
        subaddress = tag or None
        info = await self._user_lookup(action, base)
        if action.method == "lmtp" and (info is None or name == parent_user):
            # LMTP names the user the address resolved to (after alias or virtual), as
            # smtpd's mail.lmtp -u, unless the action has a user of its own; the LMTP
            # server knows its users: no local account is needed (one that exists may
            # have a .forward, followed below as smtpd does).
            self._deliver(run, action, dest, action.user or base, None, subaddress, internal)
            return
        # With `user NAME` too the recipient must be a user (its formats, its .forward):
        # NAME only gives the delivery its uid and gid, as in smtpd.
        if info is None:
            raise _invalid(rcpt)
        # a name produced by the same user's alias/.forward ("bob: \\bob, x") is delivered
        # as is: reading the .forward again would loop
        try:
            text = await self.forward(info) if name != parent_user else None
            forward_nodes = parse_forward(text) if text else []
        except ForwardError as exc:
            log.warning("warn: %s: %s", rcpt, exc)
            if exc.permanent:
                raise _expansion_problem(rcpt) from None
            raise SMTPError(424, "4.2.4", f"Mailing list expansion problem: <{rcpt}>") from None
        except ValueError as exc:
            log.warning("warn: %s: ~%s/.forward: %s", rcpt, info.name, exc)
            raise SMTPError(424, "4.2.4", f"Mailing list expansion problem: <{rcpt}>") from None
        if forward_nodes:
            if action.method == "forward-only" and any(
                n.kind in ("pipe", "filename", "error") for n in forward_nodes
            ):
                raise SMTPError(424, "4.2.4", f"Mailing list expansion problem: <{rcpt}>")
            await self._children(
                run, forward_nodes, dest, depth + 1, action, parent_user=base, owner=info.name
            )
            return
        if action.method == "forward-only":
            raise SMTPError(424, "4.2.4", f"Mailing list expansion problem: <{rcpt}>")
        if action.method == "expand-only":
            raise _expansion_problem(rcpt)
        if action.method == "lmtp":
            self._deliver(run, action, dest, action.user or base, None, subaddress, internal)
            return
        self._deliver(run, action, dest, info.name, None, subaddress, internal)

    async def _children(
        self,
        run: _Run,
        nodes: list[Node],
        dest: str,
        depth: int,
        action: Action,
        parent_user: str | None,
        owner: str | None,
    ) -> None:
        """``owner``: the user whose ``.forward`` gave ``nodes`` (its commands and files
        run as that user); None for an alias or virtual list (they run as the daemon's
        account, :data:`DAEMON_ACCOUNT`)."""
        rcpt = run.ctx.rcpt_to
        if depth >= EXPAND_DEPTH:
            raise _expansion_problem(rcpt)
        for node in nodes:
            if node.kind == "error":
                raise _error_node(node.value)
            if node.kind == "address":
                await self._address(run, node.value, depth, True, action)
            elif node.kind == "username":
                await self._username(run, node.value, dest, depth, True, action, parent_user)
            elif node.kind in ("pipe", "filename"):
                if action.method == "forward-only":
                    raise SMTPError(424, "4.2.4", f"Mailing list expansion problem: <{rcpt}>")
                exec_ = f"|{node.value}" if node.kind == "pipe" else node.value
                user = action.user or owner or DAEMON_ACCOUNT
                self._deliver(run, action, dest, user, exec_, None, True)
            elif node.kind == "include":
                included = await self._read_include(node.value)
                await self._children(run, included, dest, depth + 1, action, parent_user, owner)

    # -- lookups -----------------------------------------------------------------------

    async def _alias_lookup(self, action: Action, name: str) -> list[Node] | None:
        assert action.alias is not None
        table = self.tables.get(action.alias)
        keys = [name]
        if self.delim in name:
            keys.append(name.split(self.delim, 1)[0])
        for key in keys:
            value = await table.lookup(Service.ALIAS, key)
            if value is not None:
                return self._values(value)
        return None

    async def _virtual_lookup(self, action: Action, user: str, domain: str) -> list[Node] | None:
        assert action.virtual is not None
        table = self.tables.get(action.virtual)
        base = user.split(self.delim, 1)[0] if self.delim in user else user
        keys: list[str] = []
        for candidate in (f"{user}@{domain}", f"{base}@{domain}", user, base):
            if candidate not in keys:
                keys.append(candidate)
        if domain:
            keys += [f"@{domain}", "@"]
        for key in keys:
            value = await table.lookup(Service.ALIAS, key)
            if value is not None:
                return self._values(value)
        return None

    def _values(self, value: str) -> list[Node]:
        try:
            return parse_values(value)
        except ValueError as e:
            raise TableError(str(e)) from e

    async def user_info(self, action: Action, name: str) -> UserInfo | None:
        """The account a local delivery runs as (the action's userbase, else the system)."""
        try:
            return await self._user_lookup(action, name)
        except TableError as e:
            raise SMTPError(451, "4.3.0", f"user lookup failed: {e}") from e

    async def _user_lookup(self, action: Action, name: str) -> UserInfo | None:
        if action.userbase is None:
            return await self.userinfo(name)
        value = await self.tables.get(action.userbase).lookup(Service.USERINFO, name)
        return parse_userinfo(name, value) if value is not None else None

    async def _read_include(self, path: str) -> list[Node]:
        def read() -> str:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read(1 << 20)

        try:
            text = await asyncio.to_thread(read)
        except OSError as e:
            raise TableError(f"cannot read include file {path}: {e}") from e
        text = re.sub(r"\\\n", "", text)
        nodes: list[Node] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            nodes.extend(self._values(line))
        return nodes

    # -- results -----------------------------------------------------------------------

    def _first_visit(self, run: _Run, kind: str, value: str, action: str) -> bool:
        key = (kind, value, action)
        if key in run.seen:
            return False
        run.seen.add(key)
        return True

    def _deliver(
        self,
        run: _Run,
        action: Action,
        dest: str,
        user: str | None,
        mda_exec: str | None,
        subaddress: str | None,
        internal: bool,
    ) -> None:
        key = (action.name, dest.lower(), user, mda_exec)
        if key in run.results:
            return
        run.results[key] = Destination(
            action.name, run.ctx.rcpt_to, dest, user, mda_exec, subaddress, internal
        )
