"""``redis:`` tables, reading the config file of OpenSMTPD's table-redis (table-redis(5)).

    master 127.0.0.1            # or unix:/path/to/socket
    master_port 6379
    slave 10.0.0.2              # optional, used when the master is unreachable
    slave_port 6379
    database 0
    password secret
    query_domain SISMEMBER domains %s
    query_alias LRANGE aliases:%s 0 -1
    query_credentials HMGET user:%s login passwd
    query_userinfo HMGET user:%s uid gid maildir
    cache_ttl 5                 # Pigeon: seconds answers are cached (0: off)

Each query is a Redis command; its words are split on blanks and every ``%s`` becomes the
lower-cased key. A service without a ``query_`` uses ``GET <service>:%s`` as table-redis does
(alias, domain, credentials, netaddr, userinfo, source, mailaddr, addrname; mailaddrmap only
when configured). ``check`` is found for a non-zero integer, a string or an array, not found
for nil or 0. ``lookup``: a string is the value; an array is joined with ``", "`` (alias,
mailaddrmap) or ``":"`` (credentials, userinfo: ``login:hash``, ``uid:gid:home``); nil or
an empty array is not found (table-redis reports nil as an error there). Library:
``redis`` (redis-py) asyncio client, the reference Python client.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pigeon.config.model import Config, TableDecl
from pigeon.tables.base import Service, TableError
from pigeon.tables.cache import AnswerCache, CachedTable, cache_ttl
from pigeon.tables.sqlite import config_int, read_table_config

log = logging.getLogger("pigeon.tables")

DEFAULT_QUERIES: dict[Service, str] = {
    s: f"GET {s.value}:%s"
    for s in (
        Service.ALIAS,
        Service.DOMAIN,
        Service.CREDENTIALS,
        Service.NETADDR,
        Service.USERINFO,
        Service.SOURCE,
        Service.MAILADDR,
        Service.ADDRNAME,
    )
}
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 5.0


def command_words(query: str, key: str) -> list[str]:
    """``HMGET user:%s uid gid`` + ``bob`` -> ``["HMGET", "user:bob", "uid", "gid"]``."""
    return [word.replace("%s", key) for word in query.split()]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def reply_found(reply: Any) -> bool:
    if reply is None:
        return False
    if isinstance(reply, int):
        return reply != 0
    if isinstance(reply, (list, tuple, set)):
        return True  # table-redis: any array, even empty
    return True


def reply_value(service: Service, reply: Any) -> str | None:
    if reply is None:
        return None
    if isinstance(reply, (list, tuple, set)):
        items = list(reply)
        if not items:
            return None
        if any(item is None for item in items):
            return None  # HMGET of a missing hash: every field nil
        sep = ", " if service in (Service.ALIAS, Service.MAILADDRMAP) else ":"
        return sep.join(_text(item) for item in items)
    if isinstance(reply, int):
        return str(reply)
    return _text(reply) or None


def _client(address: str, port: int, database: int, password: str | None) -> aioredis.Redis:
    common: dict[str, Any] = {
        "db": database,
        "password": password,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": COMMAND_TIMEOUT,
    }
    if address.startswith("unix:"):
        return aioredis.Redis(unix_socket_path=address[5:], **common)
    return aioredis.Redis(host=address, port=port, **common)


class RedisTable(CachedTable):
    def __init__(self, name: str, config_path: str) -> None:
        self.name = name
        self.config_path = config_path
        self._load()

    def _load(self) -> None:
        conf = read_table_config(self.config_path)
        try:
            self.cache = AnswerCache(cache_ttl(conf))
        except ValueError as exc:
            raise TableError(f"{self.config_path}: {exc}") from exc
        self.queries = dict(DEFAULT_QUERIES)
        for service in (*DEFAULT_QUERIES, Service.MAILADDRMAP):
            query = conf.get(f"query_{service.value}")
            if query is not None:
                self.queries[service] = query
        password = conf.get("password")
        database = config_int(conf, "database", 0, 256)
        self.master = _client(
            conf.get("master", "127.0.0.1"),
            config_int(conf, "master_port", 6379, 65535),
            database,
            password,
        )
        slave = conf.get("slave")
        self.slave = (
            None
            if slave is None
            else _client(slave, config_int(conf, "slave_port", 6380, 65535), database, password)
        )

    def services(self) -> frozenset[Service]:
        return frozenset(self.queries)

    async def update(self) -> None:
        old = (self.master, self.slave)
        try:
            self._load()
        except TableError as exc:
            raise TableError(f"table {self.name}: reload failed: {exc}") from exc
        for client in old:
            if client is not None:
                await client.aclose()

    async def close(self) -> None:
        await self.master.aclose()
        if self.slave is not None:
            await self.slave.aclose()

    async def _command(self, service: Service, key: str) -> Any:
        query = self.queries.get(service)
        if query is None:
            raise TableError(f"table {self.name}: no query for {service.value}")
        words = command_words(query, key)
        errors = []
        for client in (self.master, self.slave):
            if client is None:
                continue
            try:
                command = client.execute_command(*words)  # type: ignore[no-untyped-call]
                return await asyncio.wait_for(command, COMMAND_TIMEOUT)
            except (RedisError, OSError, TimeoutError) as exc:
                errors.append(f"{exc}" or type(exc).__name__)
        raise TableError(f"table {self.name}: redis: {'; '.join(errors)}")

    async def _remote_lookup(self, service: Service, key: str) -> str | None:
        return reply_value(service, await self._command(service, key))

    async def _remote_check(self, service: Service, key: str) -> bool:
        return reply_found(await self._command(service, key))

    async def _fetch(self, service: Service) -> str | None:
        raise TableError(f"table {self.name}: redis tables cannot fetch")  # as table-redis


def redis_from_decl(decl: TableDecl, config: Config) -> RedisTable:
    if not decl.config:
        raise TableError(f"table {decl.name}: redis needs a config file")
    try:
        return RedisTable(decl.name, decl.config)
    except TableError as exc:
        raise TableError(f"table {decl.name}: {exc}") from exc
