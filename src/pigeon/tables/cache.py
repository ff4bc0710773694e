"""A short-lived answer cache for tables on remote servers (``redis:``, ``postgres:``).

Every session asks the same few keys again and again (the domain check of each recipient,
the credentials of each login); a few seconds of caching removes most round trips while a
changed row is still seen by every node within ``ttl`` seconds. Only answers are cached,
never failures (a failure is retried on the next lookup). ``fetch`` is never cached (it
rotates). ``update`` (``pigeon update table NAME``, SIGHUP) empties the cache.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from pigeon.tables.base import Service, Table

DEFAULT_TTL = 5.0
DEFAULT_SIZE = 10_000

_MISSING = object()


class AnswerCache:
    """(op, service, key) -> answer, each kept ``ttl`` seconds; at most ``size`` entries
    (the oldest are dropped first). ``ttl`` 0 disables caching."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, object]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> object:
        """The cached answer, or :data:`MISSING`."""
        entry = self._entries.get(key)
        if entry is None:
            return _MISSING
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[key]
            return _MISSING
        return value

    def put(self, key: tuple[str, str, str], value: object) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (self.clock() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


MISSING = _MISSING


def cache_ttl(conf: dict[str, str], default: float = DEFAULT_TTL) -> float:
    """The ``cache_ttl SECONDS`` key of a table config file (a Pigeon extension)."""
    value = conf.get("cache_ttl")
    if value is None:
        return default
    try:
        ttl = float(value)
    except ValueError:
        raise ValueError(f"bad value for cache_ttl: {value!r}") from None
    if ttl < 0:
        raise ValueError(f"bad value for cache_ttl: {value!r}")
    return ttl


class CachedTable(Table):
    """A table whose answers come from a server: subclasses implement ``_remote_lookup`` and
    ``_remote_check``; answers are kept in :attr:`cache`."""

    cache: AnswerCache

    @abstractmethod
    async def _remote_lookup(self, service: Service, key: str) -> str | None: ...

    @abstractmethod
    async def _remote_check(self, service: Service, key: str) -> bool: ...

    async def _lookup(self, service: Service, key: str) -> str | None:
        cache_key = ("lookup", service.value, key)
        hit = self.cache.get(cache_key)
        if hit is not MISSING:
            return cast("str | None", hit)
        value = await self._remote_lookup(service, key)
        self.cache.put(cache_key, value)
        return value

    async def _check(self, service: Service, key: str) -> bool:
        cache_key = ("check", service.value, key)
        hit = self.cache.get(cache_key)
        if hit is not MISSING:
            return bool(hit)
        found = await self._remote_check(service, key)
        self.cache.put(cache_key, found)
        return found
