"""Retry and expiry policy, as OpenSMTPD's ramqueue scheduler computes it."""

from __future__ import annotations

import math

from pigeon.queue.envelope import Envelope

# Backoff bases in seconds (scheduler_ramqueue.c): relay 400 s, local 10 s.
BASE_MTA = 400
BASE_MDA = 10
BASE_BOUNCE = 10

DEFAULT_QUEUE_TTL = 4 * 86400
BOUNCE_TTL = 7 * 86400


def base_delay(kind: str) -> int:
    return {"mta": BASE_MTA, "mda": BASE_MDA}.get(kind, BASE_BOUNCE)


def next_attempt(env: Envelope, now: float) -> float:
    """``ctime + base * n**2`` for the smallest n >= retry that lies in the future."""
    if env.retry == 0:
        return float(env.ctime)
    base = base_delay(env.type)
    n = max(env.retry, math.isqrt(max(0, int(now) - env.ctime) // base))
    while env.ctime + base * n * n <= now:
        n += 1
    return float(env.ctime + base * n * n)


def expiry(env: Envelope, default_ttl: int) -> float:
    ttl = env.ttl or (BOUNCE_TTL if env.type == "bounce" else default_ttl)
    return float(env.ctime + ttl)
