"""In-memory scheduler: which envelope is tried when.

Storage is durable and dumb; scheduling is smart and in memory. At start the scheduler is
rebuilt from the queue store. Time comes from an injectable clock so tests never sleep:
they move a ``ManualClock`` and call ``run_due()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pigeon.queue.envelope import Envelope
from pigeon.scheduler import policy

log = logging.getLogger("pigeon.scheduler")

BUG_RETRY_DELAY = 300.0


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a delivery attempt gave for one envelope."""

    status: str  # "ok", "tempfail", "permfail", "loop"
    line: str  # the reply or error text, e.g. "550 5.1.1 No such user"
    logged: bool = False  # its delivery line is written already (by the relay worker)

    @classmethod
    def ok(cls, line: str = "Delivered") -> Outcome:
        return cls("ok", line)

    @classmethod
    def tempfail(cls, line: str) -> Outcome:
        return cls("tempfail", line)

    @classmethod
    def permfail(cls, line: str) -> Outcome:
        return cls("permfail", line)


# The scheduler hands a due envelope to this; it returns once the attempt is over.
Dispatch = Callable[[Envelope], Awaitable[None]]
# Offered every envelope due in one pass before any task starts: returns those it did not
# take. Those it took stay in flight until it calls ``done`` or ``retried`` (or ``failed``)
# for them: deliveries that need no coroutine of their own (a busy relay) skip a task each.
Claim = Callable[[list[Envelope]], list[Envelope]]


class Scheduler:
    def __init__(
        self,
        dispatch: Dispatch,
        *,
        clock: Clock | None = None,
        queue_ttl: int = policy.DEFAULT_QUEUE_TTL,
        max_inflight: int = 64,
        expire: Callable[[Envelope], Awaitable[None]] | None = None,
        claim: Claim | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.queue_ttl = queue_ttl
        self.max_inflight = max_inflight
        self._dispatch = dispatch
        self._expire = expire
        self._claim = claim
        self._heap: list[tuple[float, int]] = []
        self._expiry_heap: list[tuple[float, int]] = []
        self._due: dict[int, float] = {}  # evpid -> scheduled time (authoritative)
        self._envelopes: dict[int, Envelope] = {}
        self.inflight: set[int] = set()
        self.suspended: set[int] = set()
        self.paused: set[str] = set()  # "mda", "mta"
        self._held: list[tuple[float, int]] = []  # due while paused or suspended
        self._wake = asyncio.Event()
        self._sleep_until = 0.0  # when the run loop next looks by itself (0: not sleeping)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ------------------------------------------------------------------ content

    def add(self, env: Envelope, when: float | None = None) -> None:
        self._envelopes[env.evpid] = env
        at = policy.next_attempt(env, self.clock.now()) if when is None else when
        self._due[env.evpid] = at
        heapq.heappush(self._heap, (at, env.evpid))
        heapq.heappush(self._expiry_heap, (policy.expiry(env, self.queue_ttl), env.evpid))
        if at < self._sleep_until and env.type not in self.paused:
            self._wake.set()  # earlier than the loop planned to look again

    def remove(self, evpid: int) -> None:
        self._envelopes.pop(evpid, None)
        self._due.pop(evpid, None)
        self.suspended.discard(evpid)

    def __contains__(self, evpid: int) -> bool:
        return evpid in self._envelopes

    def scheduled_at(self, evpid: int) -> float | None:
        return self._due.get(evpid)

    def schedule_now(self, evpid: int) -> bool:
        """``pigeon schedule``: try this envelope at once."""
        if evpid not in self._envelopes or evpid in self.inflight:
            return False
        self._due[evpid] = self.clock.now()
        heapq.heappush(self._heap, (self._due[evpid], evpid))
        self._wake.set()
        return True

    def pause(self, kind: str) -> None:
        self.paused.add(kind)

    def resume(self, kind: str) -> None:
        self.paused.discard(kind)
        held, self._held = self._held, []
        for item in held:
            heapq.heappush(self._heap, item)
        self._wake.set()

    def retried(self, env: Envelope) -> None:
        """An attempt tempfailed: put the envelope back at its next retry time."""
        self.inflight.discard(env.evpid)
        if env.evpid in self._envelopes:
            self.add(env)

    def done(self, evpid: int) -> None:
        self.inflight.discard(evpid)
        self.remove(evpid)
        self._wake_if_due()

    def failed(self, envelopes: list[Envelope]) -> None:
        """A claimed attempt broke on a bug: try again later, not at once (no hot loop)."""
        for env in envelopes:
            self.inflight.discard(env.evpid)
            if env.evpid in self._envelopes:
                self.add(env, when=self.clock.now() + BUG_RETRY_DELAY)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _wake_if_due(self) -> None:
        """Wakes the run loop when a finished attempt may let a due envelope start (the
        in-flight cap held it back); otherwise its own timer is right already. Waking it
        for every delivery costs a loop turn per message under load."""
        if self._heap and self._heap[0][0] <= self.clock.now():
            self._wake.set()

    # ------------------------------------------------------------------ running

    def _pop_due(self, now: float) -> list[Envelope]:
        out: list[Envelope] = []
        while self._heap and self._heap[0][0] <= now:
            if len(self.inflight) + len(out) >= self.max_inflight:
                break
            at, evpid = heapq.heappop(self._heap)
            if self._due.get(evpid) != at or evpid in self.inflight:
                continue  # stale heap entry
            env = self._envelopes[evpid]
            if evpid in self.suspended or env.type in self.paused:
                # Held aside (not re-queued) so a paused agent costs nothing per wake-up.
                self._held.append((at, evpid))
                continue
            out.append(env)
        return out

    def _expired(self, now: float) -> list[Envelope]:
        out = []
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            at, evpid = heapq.heappop(self._expiry_heap)
            env = self._envelopes.get(evpid)
            if env is None or evpid in self.inflight:
                continue  # gone, or its attempt decides; re-checked when it comes back
            if policy.expiry(env, self.queue_ttl) == at:
                out.append(env)
        return out

    def _top(
        self, heap: list[tuple[float, int]], valid: Callable[[float, int], bool]
    ) -> float | None:
        while heap and not valid(*heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def next_wakeup(self) -> float | None:
        attempt = self._top(self._heap, lambda at, evpid: self._due.get(evpid) == at)
        expiry = self._top(self._expiry_heap, lambda _at, evpid: evpid in self._envelopes)
        candidates = [t for t in (attempt, expiry) if t is not None]
        return min(candidates) if candidates else None

    async def run_due(self) -> list[asyncio.Task[None]]:
        """Start every attempt that is due now; return their tasks."""
        now = self.clock.now()
        started = []
        if self._expire is not None:
            for env in self._expired(now):
                self.inflight.add(env.evpid)
                self._due.pop(env.evpid, None)
                started.append(self._spawn(self._expire(env), env.evpid))
        due = self._pop_due(now)
        for env in due:
            self.inflight.add(env.evpid)
            self._due.pop(env.evpid, None)
        if due and self._claim is not None:
            try:
                due = self._claim(due)
            except Exception:  # a bug: some may be on their way, so none is started twice
                log.exception("scheduler: claiming due envelopes failed")
                self.failed(due)
                due = []
        for env in due:
            started.append(self._spawn(self._dispatch(env), env.evpid))
        return started

    def _spawn(self, coro: Awaitable[None], evpid: int) -> asyncio.Task[None]:
        async def runner() -> None:
            try:
                await coro
            except Exception:  # a bug in an agent must not stop the scheduler
                log.exception("scheduler: delivery of %016x failed unexpectedly", evpid)
                env = self._envelopes.get(evpid)
                self.inflight.discard(evpid)
                if env is not None:  # try again later, not at once: no hot loop on a bug
                    self.add(env, when=self.clock.now() + BUG_RETRY_DELAY)
            finally:
                if evpid in self._envelopes:  # still queued (retry, expiry): re-plan
                    self._wake.set()
                else:
                    self._wake_if_due()

        task = asyncio.get_running_loop().create_task(runner())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        """Main loop: wake at the next due time or when something earlier arrives."""
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None
        while not self._stopping:
            self._wake.clear()
            await self.run_due()
            wake_at = self.next_wakeup()
            now = self.clock.now()
            if wake_at is not None and wake_at <= now:
                # Due but held back by the in-flight cap: a finishing attempt wakes us.
                wake_at = now + 1.0
            delay = 60.0 if wake_at is None else min(60.0, wake_at - now)
            self._sleep_until = now + delay
            timer = loop.call_later(delay, self._wake.set)
            await self._wake.wait()
            timer.cancel()
        self._sleep_until = 0.0

    async def stop(self, grace: float = 0.0) -> None:
        """Start nothing more; attempts under way get ``grace`` seconds to finish (their
        outcome recorded, not tried again after a restart), then are cancelled."""
        self._stopping = True
        self._wake.set()
        if grace > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def envelopes(self) -> list[Envelope]:
        return list(self._envelopes.values())
