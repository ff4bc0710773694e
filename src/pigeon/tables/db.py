"""``db:`` tables: Pigeon's own map file, written by ``pigeon makemap``.

OpenSMTPD's ``db:`` files are Berkeley DB hashes, which need a C binding Python no longer
ships. Pigeon's format is an SQLite 3 database instead, because it is:

* in the standard library (``sqlite3``) and readable with the ``sqlite3`` shell for debugging;
* indexed (a lookup is one B-tree probe, not a scan), so multi-million-entry maps stay fast;
* safe to replace while the daemon runs: makemap writes a temporary file, fsyncs it and
  renames it over the old one; the table notices the new inode/mtime and reopens it (as
  OpenSMTPD reopens a db whose mtime changed).

Schema (``PRAGMA user_version = 1``)::

    CREATE TABLE pigeon_map (key TEXT PRIMARY KEY, value TEXT);   -- value NULL in a list
    CREATE TABLE pigeon_meta (name TEXT PRIMARY KEY, value TEXT); -- kind = list | mapping

Keys are stored lower-cased. Matching is the static backend's: exact key for lookups and
string checks; glob (domain), CIDR (netaddr), mailaddr and regex matching over every key
for the other checks; ``fetch`` rotates through the keys.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from pigeon.config.model import Config, TableDecl
from pigeon.durable import fsync_path
from pigeon.tables.base import Service, Table, TableError
from pigeon.tables.static import (
    ALL_SERVICES,
    domain_match,
    mailaddr_match,
    netaddr_match,
    regex_match,
)

FORMAT_VERSION = 1
_SCAN_SERVICES = (Service.DOMAIN, Service.NETADDR, Service.MAILADDR, Service.REGEX)


class DbFormatError(TableError):
    """The file is not a Pigeon map (for instance an OpenSMTPD Berkeley DB file)."""


def write_map(
    path: str | os.PathLike[str],
    kind: str,
    entries: Iterable[tuple[str, str | None]],
) -> int:
    """Write a map file atomically (temporary file, fsync, rename); returns the entry count."""
    if kind not in ("list", "mapping"):
        raise ValueError(f"invalid map kind {kind!r}")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    count = 0
    db = sqlite3.connect(tmp)
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("CREATE TABLE pigeon_map (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE pigeon_meta (name TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO pigeon_meta VALUES ('kind', ?)", (kind,))
        for key, value in entries:
            db.execute(
                "INSERT OR REPLACE INTO pigeon_map VALUES (?, ?)",
                (key.lower(), value if kind == "mapping" else None),
            )
            count += 1
        db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        db.commit()
    except BaseException:
        db.close()
        tmp.unlink(missing_ok=True)
        raise
    db.close()
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)
    return count


class MapFile:
    """An opened map file (read-only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
            self.identity = (st.st_ino, st.st_mtime_ns, st.st_size)
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            row = self.db.execute("SELECT value FROM pigeon_meta WHERE name = 'kind'").fetchone()
        except OSError as exc:
            raise TableError(f"{path}: {exc.strerror}") from exc
        except sqlite3.Error as exc:
            raise DbFormatError(
                f"{path}: not a Pigeon map ({exc}); rebuild it with `pigeon makemap` "
                "(Berkeley DB files of OpenSMTPD's makemap cannot be read)"
            ) from exc
        if version != FORMAT_VERSION or row is None:
            self.db.close()
            raise DbFormatError(f"{path}: unsupported map format version {version}")
        self.kind: str = row[0]
        self._keys: list[str] | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # gone: keep serving what we have until a new file appears
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self.identity

    def get(self, key: str) -> tuple[bool, str | None]:
        row = self.db.execute("SELECT value FROM pigeon_map WHERE key = ?", (key,)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def keys(self) -> list[str]:
        if self._keys is None:
            rows = self.db.execute("SELECT key FROM pigeon_map ORDER BY rowid").fetchall()
            self._keys = [r[0] for r in rows]
        return self._keys

    def items(self) -> list[tuple[str, str | None]]:
        return list(self.db.execute("SELECT key, value FROM pigeon_map ORDER BY rowid"))

    def close(self) -> None:
        self.db.close()


class DbTable(Table):
    """A ``db:`` table. Lookups are single indexed reads of a local file, done inline: a
    thread hop would cost more than the read."""

    def __init__(self, name: str, path: str, *, subaddr_delim: str = "+") -> None:
        self.name = name
        self.path = path
        self.subaddr_delim = subaddr_delim
        self._map = MapFile(path)
        self._cursor = 0

    def services(self) -> frozenset[Service]:
        return ALL_SERVICES

    @property
    def kind(self) -> str:
        return self._map.kind

    def _current(self) -> MapFile:
        if self._map.changed():
            self._reopen()
        return self._map

    def _reopen(self) -> None:
        new = MapFile(self.path)
        old, self._map = self._map, new
        old.close()

    async def update(self) -> None:
        try:
            self._reopen()
        except TableError as exc:
            raise TableError(f"table {self.name}: reload failed: {exc}") from exc

    async def close(self) -> None:
        self._map.close()

    async def _lookup(self, service: Service, key: str) -> str | None:
        current = self._current()
        if current.kind != "mapping":
            return None
        try:
            return current.get(key)[1]
        except sqlite3.Error as exc:
            raise TableError(f"table {self.name}: {exc}") from exc

    async def _check(self, service: Service, key: str) -> bool:
        current = self._current()
        try:
            if service not in _SCAN_SERVICES:
                return current.get(key)[0]
            keys = current.keys()
        except sqlite3.Error as exc:
            raise TableError(f"table {self.name}: {exc}") from exc
        if service is Service.DOMAIN:
            return any(domain_match(key, entry) for entry in keys)
        if service is Service.NETADDR:
            return any(netaddr_match(key, entry) for entry in keys)
        if service is Service.MAILADDR:
            return any(mailaddr_match(key, e, self.subaddr_delim) for e in keys)
        return any(regex_match(key, entry) for entry in keys)

    async def _fetch(self, service: Service) -> str | None:
        keys = self._current().keys()
        if not keys:
            return None
        value = keys[self._cursor % len(keys)]
        self._cursor += 1
        return value


def db_from_decl(decl: TableDecl, config: Config) -> DbTable:
    if not decl.config:
        raise TableError(f"table {decl.name}: db needs a file")
    try:
        return DbTable(decl.name, decl.config, subaddr_delim=config.smtp.sub_addr_delim)
    except TableError as exc:
        raise TableError(f"table {decl.name}: {exc}") from exc
