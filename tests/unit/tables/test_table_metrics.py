"""Every table lookup is timed and every failed one counted, per table, once metrics are on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon import metrics
from pigeon.tables.base import Service, Table, TableError


class _Flaky(Table):
    """Answers "ok" for any key but "down", which is a backend failure."""

    def __init__(self, name: str) -> None:
        self.name = name

    def services(self) -> frozenset[Service]:
        return frozenset({Service.ALIAS})

    async def _lookup(self, service: Service, key: str) -> str | None:
        if key == "down":
            raise TableError(f"table {self.name}: backend down")
        return "ok"

    async def _check(self, service: Service, key: str) -> bool:
        return await self._lookup(service, key) is not None


@pytest.fixture
def enabled() -> Iterator[None]:
    metrics.enable()
    yield
    metrics.disable()


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_lookups_are_timed_and_failures_counted_per_table(enabled: None) -> None:
    async def scenario() -> None:
        table = _Flaky("aliases")
        assert await table.lookup(Service.ALIAS, "bob") == "ok"
        assert await table.check(Service.ALIAS, "bob")
        with pytest.raises(TableError):
            await table.lookup(Service.ALIAS, "down")

    asyncio.run(scenario())
    got = _samples()
    label = (("table", "aliases"),)
    assert got[("pigeon_table_lookup_seconds_count", label)] == 3
    assert got[("pigeon_table_failures_total", label)] == 1


def test_a_too_long_key_is_not_a_table_failure(enabled: None) -> None:
    async def scenario() -> None:
        with pytest.raises(TableError, match="too long"):
            await _Flaky("aliases").lookup(Service.ALIAS, "x" * 2000)

    asyncio.run(scenario())
    assert ("pigeon_table_failures_total", (("table", "aliases"),)) not in _samples()
