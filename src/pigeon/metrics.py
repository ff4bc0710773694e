"""Prometheus metrics: counters and histograms any module may update, gauges read at scrape time.

Off by default. ``metrics listen on ADDRESS port PORT`` in smtpd.conf turns the endpoint on
(``GET /metrics``). Until then every call here returns after one flag test, so call sites need
no guard of their own::

    from pigeon import metrics
    metrics.count("smtp_sessions")
    metrics.count("deliveries", agent="maildir", result="ok", destination="example.org")
    with metrics.timed("table_lookup_seconds", table="aliases"):
        ...

Metric names are declared once below (``METRICS``); an unknown name or a wrong label set is a
programming error and raises ``KeyError``/``ValueError`` even when metrics are off, so tests
catch it. Queue size and age are computed only when Prometheus scrapes (``set_gauge_source``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pigeon.metrics")

PREFIX = "pigeon_"
MAX_DESTINATIONS = 500  # distinct destination domains tracked before lumping into "other"
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

METRICS: dict[str, MetricSpec] = {
    "smtp_sessions": MetricSpec("counter", "SMTP sessions opened"),
    "smtp_transactions": MetricSpec("counter", "SMTP transactions started (MAIL FROM accepted)"),
    "messages_accepted": MetricSpec("counter", "Messages accepted into the queue"),
    "recipients_accepted": MetricSpec("counter", "Envelopes queued for accepted messages"),
    "smtp_rejected": MetricSpec(
        "counter",
        "SMTP commands refused, by command and status (enhanced code, or the reply code)",
        ("command", "reason"),
    ),
    "messages_junked": MetricSpec("counter", "Messages or sessions marked as junk", ("reason",)),
    "deliveries": MetricSpec(
        "counter",
        "Delivery attempts by agent (maildir, mbox, mda, lmtp, relay), result and domain",
        ("agent", "result", "destination"),
    ),
    "delivery_seconds": MetricSpec("histogram", "Time spent on one delivery attempt", ("agent",)),
    "envelopes_expired": MetricSpec("counter", "Envelopes removed because they outlived the ttl"),
    "filter_seconds": MetricSpec("histogram", "Filter round-trip time per phase", ("filter",)),
    "filter_failures": MetricSpec(
        "counter", "Filter failures (timeout, crash, protocol error)", ("filter", "reason")
    ),
    "table_lookup_seconds": MetricSpec("histogram", "Table lookup time", ("table",)),
    "table_failures": MetricSpec("counter", "Table lookups that failed", ("table",)),
    "rspamd_verdicts": MetricSpec("counter", "rspamd verdicts by action", ("action",)),
    "config_reloads": MetricSpec("counter", "Configuration reloads", ("result",)),
}

_BUCKETS = {
    "delivery_seconds": _DELIVERY_BUCKETS,
    "filter_seconds": _LATENCY_BUCKETS,
    "table_lookup_seconds": _LATENCY_BUCKETS,
}

GaugeSource = Callable[[], Mapping[str, float]]

# Gauges sampled at scrape time: name -> help. The gauge source returns values by these names.
GAUGES: dict[str, str] = {
    "smtp_sessions_active": "SMTP sessions open now",
    "queue_messages": "Messages in the queue",
    "queue_envelopes": "Envelopes in the queue",
    "queue_envelopes_inflight": "Envelopes being delivered now",
    "queue_oldest_age_seconds": "Age of the oldest envelope in the queue",
    "uptime_seconds": "Seconds since the daemon started",
}


class _State:
    """The live registry, present only while metrics are enabled."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # type: ignore[no-untyped-call]  # `_created` series double the output and nobody graphs them
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics: dict[str, Any] = {}
        for name, spec in METRICS.items():
            if spec.kind == "counter":
                self.metrics[name] = Counter(
                    PREFIX + name, spec.help, spec.labels, registry=self.registry
                )
            else:
                self.metrics[name] = Histogram(
                    PREFIX + name,
                    spec.help,
                    spec.labels,
                    registry=self.registry,
                    buckets=_BUCKETS.get(name, _LATENCY_BUCKETS),
                )
        self.gauge_source: GaugeSource | None = None
        self.destinations: set[str] = set()
        self.registry.register(_GaugeCollector(self))


class _GaugeCollector:
    def __init__(self, state: _State) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        source = self.state.gauge_source
        values: Mapping[str, float] = {}
        if source is not None:
            try:
                values = source()
            except Exception:  # a scrape must never take the daemon down
                log.exception("warn: metrics: gauge source failed")
        for name, help_text in GAUGES.items():
            if name in values:
                yield GaugeMetricFamily(PREFIX + name, help_text, value=float(values[name]))

    def describe(self) -> Iterator[Any]:
        return iter(())


_state: _State | None = None


def enabled() -> bool:
    return _state is not None


def enable() -> None:
    """Create the registry (idempotent). Counting starts from zero."""
    global _state
    if _state is None:
        _state = _State()


def disable() -> None:
    """Drop the registry: counting becomes a no-op again (tests, or metrics removed on reload)."""
    global _state
    _state = None


def set_gauge_source(source: GaugeSource | None) -> None:
    if _state is not None:
        _state.gauge_source = source


def _check(name: str, labels: Mapping[str, str]) -> MetricSpec:
    spec = METRICS[name]
    if len(labels) != len(spec.labels) or any(k not in labels for k in spec.labels):
        raise ValueError(f"metric {name} takes labels {spec.labels}, got {tuple(labels)}")
    return spec


def count(name: str, amount: float = 1.0, **labels: str) -> None:
    """Add ``amount`` to counter ``name``."""
    state = _state
    if state is None:
        METRICS[name]  # a misspelt name fails in every configuration
        return
    _check(name, labels)
    if "destination" in labels:
        labels["destination"] = _destination(state, labels["destination"])
    metric = state.metrics[name]
    (metric.labels(**labels) if labels else metric).inc(amount)


def observe(name: str, value: float, **labels: str) -> None:
    """Record ``value`` (seconds) in histogram ``name``."""
    state = _state
    if state is None:
        METRICS[name]
        return
    _check(name, labels)
    metric = state.metrics[name]
    (metric.labels(**labels) if labels else metric).observe(value)


@contextlib.contextmanager
def timed(name: str, **labels: str) -> Iterator[None]:
    """Observe the time spent in the ``with`` block (also when it raises)."""
    if _state is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        observe(name, time.monotonic() - start, **labels)


def _destination(state: _State, domain: str) -> str:
    """Bound the label's cardinality: a spammer's random domains must not eat memory."""
    domain = domain.lower() or "local"
    if domain in state.destinations:
        return domain
    if len(state.destinations) >= MAX_DESTINATIONS:
        return "other"
    state.destinations.add(domain)
    return domain


_VERBS = frozenset(
    [
        "HELO",
        "EHLO",
        "LHLO",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT",
        "RSET",
        "QUIT",
        "NOOP",
        "HELP",
        "VRFY",
        "EXPN",
        "STARTTLS",
        "AUTH",
    ]
)


def command_label(command: str) -> str:
    """The ``command`` label: the SMTP verb of a command line, ``other`` for anything else
    (a client's garbage must not create label values)."""
    verb = command.split(":", 1)[0].split(" ", 1)[0].upper()
    return verb if verb in _VERBS else "other"


def reject_reason(reply_code: int, enhanced: str | None) -> str:
    """The ``reason`` label of ``smtp_rejected``: the enhanced status code when there is one."""
    return enhanced or str(reply_code)


def exposition() -> tuple[bytes, str]:
    """The text served at /metrics, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if _state is None:
        return b"", CONTENT_TYPE_LATEST
    return generate_latest(_state.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------- HTTP endpoint


def _response(
    status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", *, head: bool = False
) -> bytes:
    """An HTTP/1.1 response; ``head`` keeps the headers of ``body`` but sends no body."""
    lines = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return lines.encode() + (b"" if head else body)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            out = _response("400 Bad Request", b"bad request\n")
        elif parts[0] not in ("GET", "HEAD"):
            out = _response("405 Method Not Allowed", b"method not allowed\n")
        elif parts[1].split("?", 1)[0] != "/metrics":
            out = _response("404 Not Found", b"try /metrics\n")
        else:
            body, ctype = exposition()
            out = _response("200 OK", body, ctype, head=parts[0] == "HEAD")
        writer.write(out)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # a broken or slow scraper: just hang up
    finally:
        writer.close()


async def serve(address: str, port: int, *, serving: bool = True) -> asyncio.AbstractServer:
    """Start the /metrics listener (enables metrics if needed); ``serving=False`` only binds."""
    enable()
    server = await asyncio.start_server(
        _handle,
        host=address,
        port=port,
        limit=MAX_REQUEST,
        reuse_address=True,
        start_serving=serving,
    )
    log.info("info: metrics listening on %s port %d", address, port)
    return server


def bound_port(server: asyncio.AbstractServer) -> int:
    for sock in getattr(server, "sockets", ()) or ():
        return int(sock.getsockname()[1])
    return 0
