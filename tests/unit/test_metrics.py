"""pigeon.metrics: counting is a no-op until enabled, then shows in the exposition text."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pigeon import metrics


@pytest.fixture
def enabled() -> Iterator[None]:
    metrics.enable()
    yield
    metrics.disable()


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_disabled_counting_is_a_no_op_but_checks_names() -> None:
    metrics.disable()
    metrics.count("smtp_sessions")
    metrics.observe("delivery_seconds", 0.5, agent="maildir")
    with metrics.timed("table_lookup_seconds", table="aliases"):
        pass
    assert metrics.exposition()[0] == b""
    with pytest.raises(KeyError):
        metrics.count("smtp_sessionz")


def test_counters_and_labels(enabled: None) -> None:
    metrics.count("smtp_sessions")
    metrics.count("smtp_sessions")
    metrics.count("deliveries", agent="relay", result="ok", destination="Example.ORG")
    metrics.count("smtp_rejected", command="RCPT", reason="5.1.1")
    got = samples()
    assert got[("pigeon_smtp_sessions_total", ())] == 2
    key = (("agent", "relay"), ("destination", "example.org"), ("result", "ok"))
    assert got[("pigeon_deliveries_total", key)] == 1
    assert got[("pigeon_smtp_rejected_total", (("command", "RCPT"), ("reason", "5.1.1")))] == 1
    assert not any(name.endswith("_created") for name, _ in got)


def test_wrong_labels_raise(enabled: None) -> None:
    with pytest.raises(ValueError):
        metrics.count("deliveries", agent="relay")


def test_histogram_timed(enabled: None) -> None:
    with metrics.timed("filter_seconds", filter="rspamd"):
        pass
    got = samples()
    assert got[("pigeon_filter_seconds_count", (("filter", "rspamd"),))] == 1


def test_destination_cardinality_is_bounded(enabled: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_DESTINATIONS", 2)
    for domain in ("a.test", "b.test", "c.test", "d.test", "a.test"):
        metrics.count("deliveries", agent="mda", result="ok", destination=domain)
    dests = {
        dict(labels)["destination"]
        for (name, labels) in samples()
        if name == "pigeon_deliveries_total"
    }
    assert dests == {"a.test", "b.test", "other"}


def test_gauges_sampled_at_scrape(enabled: None) -> None:
    calls = []

    def source() -> dict[str, float]:
        calls.append(1)
        return {"queue_envelopes": 7, "queue_oldest_age_seconds": 12.5}

    metrics.set_gauge_source(source)
    got = samples()
    assert got[("pigeon_queue_envelopes", ())] == 7
    assert got[("pigeon_queue_oldest_age_seconds", ())] == 12.5
    samples()
    assert len(calls) == 2


def test_broken_gauge_source_does_not_break_the_scrape(enabled: None) -> None:
    def source() -> dict[str, float]:
        raise RuntimeError("boom")

    metrics.set_gauge_source(source)
    metrics.count("smtp_sessions")
    assert samples()[("pigeon_smtp_sessions_total", ())] == 1


def test_command_label_bounds_garbage() -> None:
    assert metrics.command_label("RCPT TO:<x@y>") == "RCPT"
    assert metrics.command_label("mail from:<x@y>") == "MAIL"
    assert metrics.command_label("GET / HTTP/1.0") == "other"
    assert metrics.reject_reason(550, "5.1.1") == "5.1.1"
    assert metrics.reject_reason(500, None) == "500"


def test_http_endpoint(enabled: None) -> None:
    async def main() -> tuple[int, bytes, int]:
        server = await metrics.serve("127.0.0.1", 0)
        port = metrics.bound_port(server)
        metrics.count("messages_accepted")

        def fetch(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, b""

        status, body = await asyncio.to_thread(fetch, "/metrics")
        missing, _ = await asyncio.to_thread(fetch, "/other")
        server.close()
        return status, body, missing

    status, body, missing = asyncio.run(main())
    assert status == 200
    assert b"pigeon_messages_accepted_total 1.0" in body
    assert missing == 404
