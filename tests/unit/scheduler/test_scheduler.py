"""Scheduler on a manual clock: retries at OpenSMTPD's times, expiry, pause, schedule now."""

from __future__ import annotations

import asyncio

from pigeon.queue.envelope import Envelope, new_evpid
from pigeon.scheduler import policy
from pigeon.scheduler.scheduler import ManualClock, Scheduler

T0 = 1_800_000_000


def env(kind: str = "mda", retry: int = 0, ttl: int = 0) -> Envelope:
    return Envelope(
        evpid=new_evpid(0x1234ABCD),
        dispatcher="local",
        type=kind,
        sender="a@x",
        rcpt="b@y",
        dest="b@y",
        ctime=T0,
        retry=retry,
        ttl=ttl,
    )


def test_retry_schedule_matches_opensmtpd() -> None:
    for n, local, relay in [(1, 10, 400), (2, 40, 1600), (3, 90, 3600), (5, 250, 10000)]:
        e = env("mda", retry=n)
        assert policy.next_attempt(e, T0 + 1) == T0 + local
        e = env("mta", retry=n)
        assert policy.next_attempt(e, T0 + 1) == T0 + relay


def test_retry_time_is_always_in_the_future() -> None:
    e = env("mda", retry=1)
    # The first retry slot (ctime + 10) has passed: take the next square that lies ahead.
    assert policy.next_attempt(e, T0 + 15) == T0 + 40


class Harness:
    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.dispatched: list[int] = []
        self.expired: list[int] = []
        self.sched = Scheduler(self.dispatch, clock=self.clock, queue_ttl=3600, expire=self.expire)

    async def dispatch(self, e: Envelope) -> None:
        self.dispatched.append(e.evpid)

    async def expire(self, e: Envelope) -> None:
        self.expired.append(e.evpid)
        self.sched.done(e.evpid)

    async def tick(self) -> None:
        tasks = await self.sched.run_due()
        await asyncio.gather(*tasks)


def test_due_now_then_retry_after_backoff() -> None:
    async def scenario() -> None:
        h = Harness()
        e = env()
        h.sched.add(e)
        await h.tick()
        assert h.dispatched == [e.evpid]
        e.retry = 1
        h.sched.retried(e)
        h.clock.advance(9)
        await h.tick()
        assert h.dispatched == [e.evpid]  # not yet: ctime + 10
        h.clock.advance(1)
        await h.tick()
        assert h.dispatched == [e.evpid, e.evpid]
        assert h.sched.next_wakeup() is not None

    asyncio.run(scenario())


def test_expiry_fires_at_ctime_plus_ttl_even_before_next_retry() -> None:
    async def scenario() -> None:
        h = Harness()
        e = env("mta", retry=3)  # next attempt at ctime + 3600 s
        h.sched.add(e)
        h.clock.advance(3599)
        await h.tick()
        assert h.expired == []
        h.clock.advance(1)
        await h.tick()
        assert h.expired == [e.evpid]
        assert e.evpid not in h.sched

    asyncio.run(scenario())


def test_paused_kind_waits_and_schedule_now_jumps_the_queue() -> None:
    async def scenario() -> None:
        h = Harness()
        e = env("mda", retry=2)
        h.sched.add(e)
        h.sched.pause("mda")
        h.clock.advance(100)
        await h.tick()
        assert h.dispatched == []
        h.sched.resume("mda")
        await h.tick()
        assert h.dispatched == [e.evpid]
        e.retry = 3
        h.sched.retried(e)
        assert h.sched.schedule_now(e.evpid)
        await h.tick()
        assert h.dispatched == [e.evpid, e.evpid]

    asyncio.run(scenario())


def test_inflight_cap_holds_back_extra_envelopes() -> None:
    async def scenario() -> None:
        h = Harness()
        h.sched.max_inflight = 2
        envs = [env() for _ in range(5)]
        for e in envs:
            h.sched.add(e)
        await h.tick()
        assert len(h.dispatched) == 2

    asyncio.run(scenario())


def test_claimed_envelopes_get_no_task_and_stay_in_flight_until_done() -> None:
    async def scenario() -> None:
        h = Harness()
        claimed: list[Envelope] = []

        def claim(due: list[Envelope]) -> list[Envelope]:
            claimed.extend(e for e in due if e.type == "mta")
            return [e for e in due if e.type != "mta"]

        h.sched = Scheduler(h.dispatch, clock=h.clock, queue_ttl=3600, claim=claim)
        relayed, local = env("mta"), env("mda")
        h.sched.add(relayed)
        h.sched.add(local)
        await h.tick()
        assert claimed == [relayed] and h.dispatched == [local.evpid]
        assert relayed.evpid in h.sched.inflight
        await h.tick()  # in flight: not offered again
        assert claimed == [relayed]
        h.sched.done(relayed.evpid)
        assert relayed.evpid not in h.sched and relayed.evpid not in h.sched.inflight

    asyncio.run(scenario())


def test_a_failing_claim_starts_nothing_twice_and_retries_later() -> None:
    async def scenario() -> None:
        h = Harness()

        def claim(due: list[Envelope]) -> list[Envelope]:
            raise RuntimeError("a bug")

        h.sched = Scheduler(h.dispatch, clock=h.clock, queue_ttl=3600, claim=claim)
        e = env("mta")
        h.sched.add(e)
        await h.tick()
        assert h.dispatched == []  # it may have been sent: not dispatched as well
        assert e.evpid in h.sched and e.evpid not in h.sched.inflight
        assert h.sched.scheduled_at(e.evpid) == T0 + 300  # BUG_RETRY_DELAY

    asyncio.run(scenario())


def test_stop_lets_attempts_under_way_finish_within_the_grace_then_cancels() -> None:
    async def scenario() -> None:
        finished: list[int] = []
        cancelled: list[int] = []
        quick, stuck = env(), env()

        async def dispatch(e: Envelope) -> None:
            try:
                await asyncio.sleep(0.01 if e is quick else 60)
                finished.append(e.evpid)
            except asyncio.CancelledError:
                cancelled.append(e.evpid)
                raise

        sched = Scheduler(dispatch, clock=ManualClock(T0))
        sched.add(quick)
        sched.add(stuck)
        await sched.run_due()
        await asyncio.wait_for(sched.stop(grace=0.2), timeout=5)
        assert finished == [quick.evpid]
        assert cancelled == [stuck.evpid]
        assert sched.stopping

    asyncio.run(scenario())
