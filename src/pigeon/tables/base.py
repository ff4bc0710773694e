"""The table interface: services, the three operations, and opening a config's tables.

Every key is lower-cased here, once, before any backend sees it (as OpenSMTPD's
``table_lookup`` does), except the password half of an ``auth`` key.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping

from pigeon import metrics
from pigeon.config.model import Config, TableDecl, TableRef

log = logging.getLogger("pigeon.tables")


class Service(enum.Enum):
    ALIAS = "alias"
    DOMAIN = "domain"
    CREDENTIALS = "credentials"
    NETADDR = "netaddr"
    USERINFO = "userinfo"
    SOURCE = "source"
    MAILADDR = "mailaddr"
    ADDRNAME = "addrname"
    MAILADDRMAP = "mailaddrmap"
    RELAYHOST = "relayhost"
    STRING = "string"
    REGEX = "regex"
    AUTH = "auth"


class TableError(Exception):
    """A temporary backend failure: callers turn it into a 4xx / deferral."""


MAX_KEY = 1024


def normalize_key(service: Service, key: str) -> str:
    if len(key) >= MAX_KEY:
        raise TableError(f"table key too long ({len(key)} chars)")
    if service is Service.AUTH and ":" in key:
        user, password = key.split(":", 1)
        return f"{user.lower()}:{password}"
    return key.lower()


class Table(ABC):
    """A named table. Subclasses implement the ``_`` methods on normalised keys."""

    name: str

    async def lookup(self, service: Service, key: str) -> str | None:
        key = normalize_key(service, key)
        with _measured(self.name):
            return await self._lookup(service, key)

    async def check(self, service: Service, key: str) -> bool:
        key = normalize_key(service, key)
        with _measured(self.name):
            return await self._check(service, key)

    async def fetch(self, service: Service) -> str | None:
        with _measured(self.name):
            return await self._fetch(service)

    async def update(self) -> None:  # noqa: B027 - optional for backends
        """Reload from the source (``smtpctl update table``); no-op for inline tables."""

    async def start(self) -> None:  # noqa: B027 - optional for backends
        """Open connections / start processes now (the daemon calls it at startup)."""

    async def close(self) -> None:  # noqa: B027 - optional for backends
        """Release processes, connections and files (the daemon calls it at exit)."""

    @abstractmethod
    def services(self) -> frozenset[Service]: ...

    @abstractmethod
    async def _lookup(self, service: Service, key: str) -> str | None: ...

    @abstractmethod
    async def _check(self, service: Service, key: str) -> bool: ...

    async def _fetch(self, service: Service) -> str | None:
        return None


@contextlib.contextmanager
def _measured(table: str) -> Iterator[None]:
    """``table_lookup_seconds`` for every lookup/check/fetch; ``table_failures`` for each
    one that fails (TableError: the caller sees a temporary failure)."""
    with metrics.timed("table_lookup_seconds", table=table):
        try:
            yield
        except TableError:
            metrics.count("table_failures", table=table)
            raise


TableFactory = Callable[[TableDecl, Config], Table]


def open_tables(
    config: Config, backends: Mapping[str, TableFactory] | None = None
) -> dict[str, Table]:
    """Open every named table of ``config``. ``backends`` adds or overrides backend
    factories by name. Built-in backends: static/file, getpwnam, db, sqlite, redis,
    postgres, proc, proc-exec; any other backend ``X`` is a proc table running ``table-X``
    (TableError if no such program)."""
    from pigeon.tables.static import GetpwnamTable, static_from_decl

    factories: dict[str, TableFactory] = {
        "static": static_from_decl,
        "getpwnam": lambda decl, _c: GetpwnamTable(decl.name),
        **BUILTIN_FACTORIES,
    }
    factories.update(backends or {})
    tables: dict[str, Table] = {}
    for name, decl in config.tables.items():
        # Built-in names take precedence; any other backend X runs the program table-X.
        factory = factories.get(decl.backend, factories["proc"])
        tables[name] = factory(decl, config)
    tables.setdefault("<getpwnam>", GetpwnamTable("<getpwnam>"))
    return tables


def _lazy(module: str, function: str) -> TableFactory:
    """A factory imported on first use: redis/psycopg load only if a config uses them."""

    def factory(decl: TableDecl, config: Config) -> Table:
        import importlib

        made: Table = getattr(importlib.import_module(module), function)(decl, config)
        return made

    return factory


BUILTIN_FACTORIES: dict[str, TableFactory] = {
    "db": _lazy("pigeon.tables.db", "db_from_decl"),
    "sqlite": _lazy("pigeon.tables.sqlite", "sqlite_from_decl"),
    "redis": _lazy("pigeon.tables.redis", "redis_from_decl"),
    "postgres": _lazy("pigeon.tables.postgres", "postgres_from_decl"),
    "proc": _lazy("pigeon.tables.proc", "proc_from_decl"),
    "proc-exec": _lazy("pigeon.tables.proc", "proc_from_decl"),
}


async def start_tables(tables: Iterable[Table]) -> None:
    """Start every table (proc tables handshake, so their services are known); a table that
    fails to start is logged and retried on its first lookup."""
    for table in tables:
        try:
            await table.start()
        except TableError as exc:
            log.warning("warn: %s", exc)


async def close_tables(tables: Iterable[Table]) -> None:
    for table in tables:
        try:
            await table.close()
        except Exception as exc:  # closing must go on for the other tables
            log.warning("warn: table %s: close failed: %s", table.name, exc)


async def update_table(table: Table) -> None:
    """``pigeon update table NAME``: reload ``table`` (TableError if it failed)."""
    await table.update()
    log.info("info: table %s updated", table.name)


class TableResolver:
    """Finds the table a directive refers to; anonymous inline tables are built once."""

    def __init__(self, config: Config, tables: Mapping[str, Table]) -> None:
        self._config = config
        self._tables = tables
        self._inline: dict[TableDecl, Table] = {}

    def get(self, ref: TableRef) -> Table:
        from pigeon.tables.static import static_from_decl

        if ref.name is not None:
            return self._tables[ref.name]
        assert ref.inline is not None
        key = ref.inline
        table = self._inline.get(key)
        if table is None:
            table = static_from_decl(ref.inline, self._config)
            self._inline[key] = table
        return table
