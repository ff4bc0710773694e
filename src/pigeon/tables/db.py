"""``db:`` tables: Pigeon's own map file, written by ``pigeon makemap``, or a Berkeley DB
hash written by OpenSMTPD's makemap(8).

Berkeley DB files are read through the standard library's ``dbm.ndbm`` where it is built
on Berkeley DB, as Debian's Python is (:class:`BerkeleyMap`); an admin's existing
``aliases.db`` then works unchanged. Pigeon writes its own format, an SQLite 3 database,
because it is:

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
from types import ModuleType

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
    """The file is neither a Pigeon map nor a Berkeley DB hash this Python can read."""


SQLITE_MAGIC = b"SQLite format 3\x00"
# A Berkeley DB hash file has its magic number at byte 12, in the writer's byte order.
BDB_HASH_MAGIC = 0x00061561
SET_VALUE = "<set>"  # the value makemap -t set gives every key


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
                f"{path}: not a Pigeon map nor a Berkeley DB hash ({exc}); rebuild it with "
                "`pigeon makemap`"
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


def _berkeley_dbm() -> ModuleType | None:
    """``dbm.ndbm`` when it is built on Berkeley DB (so it reads makemap's files)."""
    try:
        import dbm.ndbm as ndbm
    except ImportError:
        return None
    return ndbm if "Berkeley" in str(getattr(ndbm, "library", "")) else None


def is_berkeley_hash(head: bytes) -> bool:
    magic = head[12:16]
    return len(magic) == 4 and BDB_HASH_MAGIC in (
        int.from_bytes(magic, "little"),
        int.from_bytes(magic, "big"),
    )


class BerkeleyMap:
    """A map written by OpenSMTPD's makemap(8): a Berkeley DB hash whose keys (lower-cased
    by makemap) and values end in a NUL byte. A ``-t set`` map gives every key ``<set>``."""

    def __init__(self, path: str) -> None:
        self.path = path
        ndbm = _berkeley_dbm()
        if ndbm is None:
            raise DbFormatError(
                f"{path}: a Berkeley DB file, and this Python's dbm has no Berkeley DB "
                "support: rebuild it with `pigeon makemap`"
            )
        if not path.endswith(".db"):
            # ndbm adds ".db" to the name it is given
            raise DbFormatError(f"{path}: a Berkeley DB map must have a name ending in .db")
        try:
            st = os.stat(path)
            self.identity = (st.st_ino, st.st_mtime_ns, st.st_size)
            self.db = ndbm.open(path[:-3], "r")
        except ndbm.error as exc:  # (an OSError too: first)
            raise DbFormatError(f"{path}: cannot read this Berkeley DB file: {exc}") from exc
        except OSError as exc:
            raise TableError(f"{path}: {exc.strerror or exc}") from exc
        self._keys: list[str] | None = None
        first = next(iter(self.db.keys()), None)
        first_value = self.db.get(first) if first is not None else None
        is_set = first_value is not None and _text(first_value) == SET_VALUE
        self.kind: str = "list" if is_set else "mapping"

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self.identity

    def get(self, key: str) -> tuple[bool, str | None]:
        value = self.db.get(key.lower().encode("utf-8", "surrogateescape") + b"\x00")
        if value is None:
            return False, None
        return True, (None if self.kind == "list" else _text(value))

    def keys(self) -> list[str]:
        if self._keys is None:
            # (an ndbm object cannot be iterated: keys() is the only way)
            self._keys = sorted(_text(k) for k in self.db.keys())  # noqa: SIM118
        return self._keys

    def items(self) -> list[tuple[str, str | None]]:
        return [(key, self.get(key)[1]) for key in self.keys()]

    def close(self) -> None:
        self.db.close()


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "surrogateescape")


def looks_like_map(path: str) -> bool:
    """Whether ``path`` starts as one of the two map formats does (an unreadable file is
    left to the daemon, which says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return True
    return head.startswith(SQLITE_MAGIC) or is_berkeley_hash(head)


def open_map(path: str) -> MapFile | BerkeleyMap:
    """The map in ``path``, whichever of the two formats it is in."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise TableError(f"{path}: {exc.strerror}") from exc
    if not head.startswith(SQLITE_MAGIC) and is_berkeley_hash(head):
        return BerkeleyMap(path)
    return MapFile(path)


class DbTable(Table):
    """A ``db:`` table. Lookups are single indexed reads of a local file, done inline: a
    thread hop would cost more than the read."""

    def __init__(self, name: str, path: str, *, subaddr_delim: str = "+") -> None:
        self.name = name
        self.path = path
        self.subaddr_delim = subaddr_delim
        self._map = open_map(path)
        self._cursor = 0

    def services(self) -> frozenset[Service]:
        return ALL_SERVICES

    @property
    def kind(self) -> str:
        return self._map.kind

    def _current(self) -> MapFile | BerkeleyMap:
        if self._map.changed():
            self._reopen()
        return self._map

    def _reopen(self) -> None:
        new = open_map(self.path)
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
        except (sqlite3.Error, OSError) as exc:
            raise TableError(f"table {self.name}: {exc}") from exc

    async def _check(self, service: Service, key: str) -> bool:
        current = self._current()
        try:
            if service not in _SCAN_SERVICES:
                return current.get(key)[0]
            keys = current.keys()
        except (sqlite3.Error, OSError) as exc:
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
