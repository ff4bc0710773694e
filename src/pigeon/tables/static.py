"""Static tables (inline lists/mappings and ``file:`` tables) and the matching rules of
each service, as OpenSMTPD's static backend applies them."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import pwd
import re
from collections.abc import Iterable

from pigeon.config.model import Config, TableDecl
from pigeon.tables.base import Service, Table, TableError
from pigeon.tables.file import TableFileError, load_table_file

ALL_SERVICES = frozenset(Service) - {Service.AUTH}


@functools.lru_cache(maxsize=4096)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else re.escape(c) for c in pattern.lower())
    return re.compile(regex, re.DOTALL)


def domain_match(name: str, pattern: str) -> bool:
    """Case-insensitive match where ``*`` stands for any run of characters."""
    if "*" not in pattern:
        return name.lower() == pattern.lower()
    return _glob_regex(pattern).fullmatch(name.lower()) is not None


def _strip_brackets(text: str) -> str:
    text = text.strip()
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    if text.startswith("["):
        end = text.find("]")
        if end != -1:
            text = text[1:end] + text[end + 1 :]
    return text


def netaddr_match(address: str, entry: str) -> bool:
    """``address`` is ``a.b.c.d``, ``[v6]`` or ``local``; ``entry`` a host or network
    (``10.0.0.0/8``, ``[fe80::]/10``, ``IPv6:...``), or a literal like ``local``."""
    if address.lower() == entry.lower():
        return True
    try:
        addr = ipaddress.ip_address(_strip_brackets(address))
        net = ipaddress.ip_network(_strip_brackets(entry), strict=False)
    except ValueError:
        return False
    return addr.version == net.version and addr in net


def split_mailaddr(text: str) -> tuple[str, str]:
    """``user@domain`` -> (user, domain); ``@domain`` -> ("", domain); ``user`` -> (user, "")."""
    if "@" in text:
        user, domain = text.rsplit("@", 1)
        return user, domain
    return text, ""


def mailaddr_match(address: str, entry: str, delim: str = "+") -> bool:
    """OpenSMTPD ``mailaddr_match``: entry ``@`` is a catch-all, ``@domain`` matches any
    user of the domain (glob), ``user`` any domain; a ``+tag`` on the address is ignored
    unless the entry has one too."""
    euser, edomain = split_mailaddr(entry)
    auser, adomain = split_mailaddr(address)
    if not euser and not edomain:
        return True
    if edomain and not domain_match(adomain, edomain):
        return False
    if euser:
        if delim not in euser and delim in auser:
            auser = auser.split(delim, 1)[0]
        if auser.lower() != euser.lower():
            return False
    return True


def regex_match(key: str, pattern: str) -> bool:
    try:
        return re.search(pattern, key) is not None
    except re.error:
        return False


class StaticTable(Table):
    """A list (keys only) or a mapping, held in memory; keys are lower-cased on load."""

    def __init__(
        self,
        name: str,
        values: Iterable[str] = (),
        mapping: Iterable[tuple[str, str]] = (),
        *,
        kind: str = "list",
        subaddr_delim: str = "+",
        path: str | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.subaddr_delim = subaddr_delim
        self._set(kind, values, mapping)
        self._cursor = 0

    def _set(self, kind: str, values: Iterable[str], mapping: Iterable[tuple[str, str]]) -> None:
        self.kind = kind
        self._map: dict[str, str | None] = {}
        for v in values:
            self._map[v.lower()] = None
        for k, v in mapping:
            self._map[k.lower()] = v

    def services(self) -> frozenset[Service]:
        return ALL_SERVICES

    def keys(self) -> list[str]:
        return list(self._map)

    async def update(self) -> None:
        if self.path is None:
            return
        try:
            parsed = await asyncio.to_thread(load_table_file, self.path)
        except (OSError, TableFileError) as e:
            raise TableError(f"table {self.name}: reload failed: {e}") from e
        self._set(parsed.kind, parsed.values, parsed.mapping)  # swap only on success

    async def _lookup(self, service: Service, key: str) -> str | None:
        if self.kind != "mapping":
            return None
        return self._map.get(key)

    async def _check(self, service: Service, key: str) -> bool:
        if service is Service.DOMAIN:
            return any(domain_match(key, entry) for entry in self._map)
        if service is Service.NETADDR:
            return any(netaddr_match(key, entry) for entry in self._map)
        if service is Service.MAILADDR:
            return any(mailaddr_match(key, e, self.subaddr_delim) for e in self._map)
        if service is Service.REGEX:
            return any(regex_match(key, entry) for entry in self._map)
        return key in self._map

    async def _fetch(self, service: Service) -> str | None:
        keys = list(self._map)
        if not keys:
            return None
        value = keys[self._cursor % len(keys)]
        self._cursor += 1
        return value


class GetpwnamTable(Table):
    """The system password database; answers userinfo as ``uid:gid:home``."""

    def __init__(self, name: str = "<getpwnam>") -> None:
        self.name = name

    def services(self) -> frozenset[Service]:
        return frozenset((Service.USERINFO,))

    async def _lookup(self, service: Service, key: str) -> str | None:
        if service is not Service.USERINFO:
            return None
        try:
            pw = await asyncio.to_thread(pwd.getpwnam, key)
        except KeyError:
            return None
        return f"{pw.pw_uid}:{pw.pw_gid}:{pw.pw_dir}"

    async def _check(self, service: Service, key: str) -> bool:
        return await self._lookup(service, key) is not None


def static_from_decl(decl: TableDecl, config: Config) -> StaticTable:
    """Build a static table from its declaration; ``file`` tables are (re)read now."""
    delim = config.smtp.sub_addr_delim
    if decl.config is not None:
        try:
            parsed = load_table_file(decl.config)
        except (OSError, TableFileError) as e:
            raise TableError(f"table {decl.name}: {e}") from e
        return StaticTable(
            decl.name,
            parsed.values,
            parsed.mapping,
            kind=parsed.kind,
            subaddr_delim=delim,
            path=decl.config,
        )
    return StaticTable(decl.name, decl.values, decl.mapping, kind=decl.kind, subaddr_delim=delim)
