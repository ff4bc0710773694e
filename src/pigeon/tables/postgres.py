"""``postgres:`` tables, reading the config file of OpenSMTPD's table-postgres
(table-postgres(5))::

    conninfo host='db.example.com' user='maildba' password='...' dbname='opensmtpdb'
    query_domain SELECT domain FROM domains WHERE domain=$1;
    query_alias SELECT destination FROM virtuals WHERE email=$1;
    query_credentials SELECT email, password FROM credentials WHERE email=$1;
    query_userinfo SELECT uid, gid, home FROM users WHERE name=$1;
    query_mailaddrmap SELECT address FROM senders WHERE login=$1;
    fetch_source SELECT address FROM sources;
    cache_ttl 5                 # Pigeon: seconds answers are cached (0: off)

Queries take the lower-cased key as ``$1`` and are sent as they are written (server-side
parameters, like libpq's PQexecPrepared in table-postgres). Values are built as for
``sqlite:`` (see :mod:`pigeon.tables.sqlite`). A lost connection is re-established and the
query retried once; a server that stays down is a temporary failure, never a crash (the C
table exits at startup if it cannot connect).

Library: ``psycopg`` 3 (the maintained successor of psycopg2, typed, native asyncio). Its
``AsyncRawCursor`` takes PostgreSQL's own ``$1`` placeholders, so table-postgres queries
need no rewriting (asyncpg would too, but is untyped and adds its own protocol stack).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import psycopg

from pigeon.config.model import Config, TableDecl
from pigeon.tables.base import Service, TableError
from pigeon.tables.cache import AnswerCache, CachedTable, cache_ttl
from pigeon.tables.sqlite import (
    DEFAULT_SOURCE_EXPIRE,
    DEFAULT_SOURCE_REFRESH,
    SourceRotation,
    config_int,
    queries_from,
    read_table_config,
    value_from_rows,
)

log = logging.getLogger("pigeon.tables")

CONNECT_TIMEOUT = 5
QUERY_TIMEOUT = 5.0


class PostgresTable(CachedTable):
    def __init__(self, name: str, config_path: str) -> None:
        self.name = name
        self.config_path = config_path
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._connecting = asyncio.Lock()
        self._load()

    def _load(self) -> None:
        conf = read_table_config(self.config_path)
        conninfo = conf.get("conninfo")
        if conninfo is None:
            raise TableError(f'{self.config_path}: missing "conninfo" configuration directive')
        try:
            self.cache = AnswerCache(cache_ttl(conf))
        except ValueError as exc:
            raise TableError(f"{self.config_path}: {exc}") from exc
        self.conninfo = conninfo
        self.queries = queries_from(conf)
        self.fetch_source = conf.get("fetch_source")
        self.rotation = SourceRotation(
            config_int(conf, "fetch_source_expire", DEFAULT_SOURCE_EXPIRE),
            config_int(conf, "fetch_source_refresh", DEFAULT_SOURCE_REFRESH),
        )

    def services(self) -> frozenset[Service]:
        found = set(self.queries)
        if self.fetch_source is not None:
            found.add(Service.SOURCE)
        return frozenset(found)

    async def start(self) -> None:
        """Connect now; a server that is down is logged and retried on the first query."""
        try:
            await self._connection()
        except TableError as exc:
            log.warning("warn: %s", exc)

    async def update(self) -> None:
        try:
            self._load()
        except TableError as exc:
            raise TableError(f"table {self.name}: reload failed: {exc}") from exc
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        async with self._connecting:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT,
                    cursor_factory=psycopg.AsyncRawCursor,
                )
            except psycopg.Error as exc:
                raise TableError(f"table {self.name}: cannot connect: {exc}") from exc
            self._conn = conn
            return conn

    async def _rows(self, query: str, params: tuple[str, ...]) -> list[Any]:
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                async with conn.cursor() as cursor:
                    await asyncio.wait_for(cursor.execute(query, params), QUERY_TIMEOUT)
                    return await cursor.fetchall()
            except psycopg.OperationalError as exc:
                # Connection lost (server restart, network): reconnect and retry once.
                await self.close()
                if attempt == 2:
                    raise TableError(f"table {self.name}: {exc}") from exc
            except TimeoutError:
                await self.close()
                raise TableError(f"table {self.name}: query timed out") from None
            except psycopg.Error as exc:
                raise TableError(f"table {self.name}: {exc}") from exc
        raise AssertionError("unreachable")

    def _query(self, service: Service) -> str:
        query = self.queries.get(service)
        if query is None:
            raise TableError(f"table {self.name}: no query_{service.value}")
        return query

    async def _remote_lookup(self, service: Service, key: str) -> str | None:
        return value_from_rows(service, await self._rows(self._query(service), (key,)))

    async def _remote_check(self, service: Service, key: str) -> bool:
        return bool(await self._rows(self._query(service), (key,)))

    async def _fetch(self, service: Service) -> str | None:
        if service is not Service.SOURCE or self.fetch_source is None:
            raise TableError(f"table {self.name}: cannot fetch {service.value}")
        now = time.monotonic()
        if self.rotation.stale(now):
            rows = await self._rows(self.fetch_source, ())
            self.rotation.load([str(r[0]) for r in rows], now)
        return self.rotation.next()


def postgres_from_decl(decl: TableDecl, config: Config) -> PostgresTable:
    if not decl.config:
        raise TableError(f"table {decl.name}: postgres needs a config file")
    try:
        return PostgresTable(decl.name, decl.config)
    except TableError as exc:
        raise TableError(f"table {decl.name}: {exc}") from exc
