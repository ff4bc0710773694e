"""``sqlite:`` tables, reading the config file of OpenSMTPD's table-sqlite (table-sqlite(5)).

``table x sqlite:/etc/mail/sqlite.conf`` works unchanged::

    dbpath /etc/mail/smtp.sqlite
    query_alias SELECT destination FROM virtuals WHERE email=?;
    query_credentials SELECT email, password FROM credentials WHERE email=?;
    query_domain SELECT domain FROM domains WHERE domain=?;
    fetch_source SELECT address FROM sources;

One ``query_<service>`` per service (alias, domain, credentials, netaddr, userinfo, source,
mailaddr, addrname, mailaddrmap), each with one ``?`` parameter, the lower-cased key.
``check`` is "the query returns a row"; ``lookup`` builds the value as table-sqlite does:
alias and mailaddrmap join every row's first column with ``", "``, credentials is
``col1:col2``, userinfo ``uid:gid:home``, the others the first column of the first row.
``fetch_source`` (with ``fetch_source_expire`` seconds, default 60, and
``fetch_source_refresh`` calls, default 1000) gives the addresses ``fetch source`` rotates
through. A service without a query is not offered. ``update`` re-reads the config file and
reopens the database, swapping only on success.

The config-file parser and the value builders are shared with ``postgres:`` (same format).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pigeon.config.model import Config, TableDecl
from pigeon.tables.base import Service, Table, TableError

log = logging.getLogger("pigeon.tables")

# Services a SQL table can serve, with the number of columns their query must return.
SQL_SERVICES: dict[Service, int] = {
    Service.ALIAS: 1,
    Service.DOMAIN: 1,
    Service.CREDENTIALS: 2,
    Service.NETADDR: 1,
    Service.USERINFO: 3,
    Service.SOURCE: 1,
    Service.MAILADDR: 1,
    Service.ADDRNAME: 1,
    Service.MAILADDRMAP: 1,
}
DEFAULT_SOURCE_EXPIRE = 60
DEFAULT_SOURCE_REFRESH = 1000


def parse_table_config(text: str, name: str = "<config>") -> dict[str, str]:
    """The ``key value`` lines of a table-sqlite/postgres/redis config file.

    As the C tables do: blank lines and lines starting with ``#`` are skipped, the key runs to
    the first blank or ``:``, the value starts after blanks (and a ``:`` followed by a blank).
    A key without a value is an error; a repeated key keeps its first value (with a warning).
    """
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cut = len(line)
        for sep in (" ", "\t", ":"):
            i = line.find(sep)
            if i != -1:
                cut = min(cut, i)
        key, rest = line[:cut], line[cut + 1 :]
        i = 0
        while i < len(rest) and (
            rest[i] in " \t" or (rest[i] == ":" and rest[i + 1 : i + 2] in (" ", "\t"))
        ):
            i += 1
        value = rest[i:]
        if not value:
            raise TableError(f"{name}:{lineno}: missing value for key {key}")
        if key in out:
            log.warning("warn: %s:%d: duplicate key %s ignored", name, lineno, key)
            continue
        out[key] = value
    return out


def read_table_config(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise TableError(f"{path}: {exc.strerror}") from exc
    return parse_table_config(text, path)


def config_int(conf: dict[str, str], key: str, default: int, maximum: int = 2**31 - 1) -> int:
    value = conf.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise TableError(f"bad value for {key}: {value!r}") from None
    if not 0 <= number <= maximum:
        raise TableError(f"bad value for {key}: {value!r} out of range")
    return number


def queries_from(conf: dict[str, str]) -> dict[Service, str]:
    return {s: conf[f"query_{s.value}"] for s in SQL_SERVICES if f"query_{s.value}" in conf}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def value_from_rows(service: Service, rows: Sequence[Sequence[Any]]) -> str | None:
    """The lookup value table-sqlite/postgres build from a query's rows (None: not found)."""
    if not rows:
        return None
    need = SQL_SERVICES.get(service, 1)
    if len(rows[0]) < need:
        raise TableError(f"{service.value} query returns {len(rows[0])} column(s), needs {need}")
    if service in (Service.ALIAS, Service.MAILADDRMAP):
        return ", ".join(_text(row[0]) for row in rows)
    if service is Service.CREDENTIALS:
        return f"{_text(rows[0][0])}:{_text(rows[0][1])}"
    if service is Service.USERINFO:
        return ":".join(_text(v) for v in rows[0][:3])
    return _text(rows[0][0])


@dataclass
class SourceRotation:
    """``fetch source``: the addresses of ``fetch_source``, re-read after ``expire`` seconds
    or ``refresh`` calls, handed out in turn."""

    expire: int = DEFAULT_SOURCE_EXPIRE
    refresh: int = DEFAULT_SOURCE_REFRESH
    values: list[str] = field(default_factory=list)
    loaded_at: float = -1.0
    calls: int = 0
    cursor: int = 0

    def stale(self, now: float) -> bool:
        return (
            self.loaded_at < 0 or self.calls >= self.refresh or now - self.loaded_at >= self.expire
        )

    def load(self, values: list[str], now: float) -> None:
        self.values = list(dict.fromkeys(values))
        self.loaded_at = now
        self.calls = 0
        self.cursor = 0

    def next(self) -> str | None:
        self.calls += 1
        if not self.values:
            return None
        value = self.values[self.cursor % len(self.values)]
        self.cursor += 1
        return value


class _SqliteState:
    """One opened configuration: connection and queries (replaced as a whole on update)."""

    def __init__(self, config_path: str) -> None:
        conf = read_table_config(config_path)
        dbpath = conf.get("dbpath")
        if dbpath is None:
            raise TableError(f"{config_path}: missing dbpath")
        self.queries = queries_from(conf)
        self.fetch_source = conf.get("fetch_source")
        self.rotation = SourceRotation(
            config_int(conf, "fetch_source_expire", DEFAULT_SOURCE_EXPIRE),
            config_int(conf, "fetch_source_refresh", DEFAULT_SOURCE_REFRESH),
        )
        try:
            # Read-only: a mistyped dbpath is an error, not a new empty database.
            uri = Path(dbpath).absolute().as_uri() + "?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            for service, query in self.queries.items():
                self._check_columns(query, SQL_SERVICES[service])
            if self.fetch_source is not None:
                self._check_columns(self.fetch_source, 1)
        except sqlite3.Error as exc:
            raise TableError(f"{config_path}: {dbpath}: {exc}") from exc
        self.lock = threading.Lock()

    def _check_columns(self, query: str, count: int) -> None:
        cursor = self.db.execute(query, ("",)) if "?" in query else self.db.execute(query)
        if cursor.description is None or len(cursor.description) != count:
            raise TableError(f"invalid columns count for query: {query}")
        cursor.close()

    def rows(self, query: str, params: tuple[str, ...]) -> list[Any]:
        with self.lock:
            return self.db.execute(query, params).fetchall()

    def close(self) -> None:
        self.db.close()


class SqliteTable(Table):
    def __init__(self, name: str, config_path: str) -> None:
        self.name = name
        self.config_path = config_path
        self._state = _SqliteState(config_path)

    def services(self) -> frozenset[Service]:
        found = set(self._state.queries)
        if self._state.fetch_source is not None:
            found.add(Service.SOURCE)
        return frozenset(found)

    async def update(self) -> None:
        try:
            new = await asyncio.to_thread(_SqliteState, self.config_path)
        except TableError as exc:
            raise TableError(f"table {self.name}: reload failed: {exc}") from exc
        old, self._state = self._state, new
        old.close()

    async def close(self) -> None:
        self._state.close()

    async def _rows(self, service: Service, key: str) -> list[Any]:
        state = self._state
        query = state.queries.get(service)
        if query is None:
            raise TableError(f"table {self.name}: no query_{service.value}")
        try:
            return await asyncio.to_thread(state.rows, query, (key,))
        except sqlite3.Error as exc:
            raise TableError(f"table {self.name}: {exc}") from exc

    async def _lookup(self, service: Service, key: str) -> str | None:
        rows = await self._rows(service, key)
        return value_from_rows(service, rows)

    async def _check(self, service: Service, key: str) -> bool:
        return bool(await self._rows(service, key))

    async def _fetch(self, service: Service) -> str | None:
        state = self._state
        if service is not Service.SOURCE or state.fetch_source is None:
            raise TableError(f"table {self.name}: cannot fetch {service.value}")
        now = time.monotonic()
        if state.rotation.stale(now):
            try:
                rows = await asyncio.to_thread(state.rows, state.fetch_source, ())
            except sqlite3.Error as exc:
                raise TableError(f"table {self.name}: {exc}") from exc
            state.rotation.load([_text(r[0]) for r in rows], now)
        return state.rotation.next()


def sqlite_from_decl(decl: TableDecl, config: Config) -> SqliteTable:
    if not decl.config:
        raise TableError(f"table {decl.name}: sqlite needs a config file")
    try:
        return SqliteTable(decl.name, decl.config)
    except TableError as exc:
        raise TableError(f"table {decl.name}: {exc}") from exc
