"""The daemon's side of remote delivery: in a worker process (the default) or in-process.

Both kinds offer the same calls to the daemon: ``start``, ``deliver`` (a message of the
queue by its envelopes: the body is looked up in the journal), ``show`` (the queue views),
``reconfigure`` (a reload) and ``close``.

:class:`WorkerRelay` runs :mod:`pigeon.delivery.worker` under a
:class:`~pigeon.procs.ProcessSupervisor` (restarted with backoff when it dies; as root, run
as the unprivileged user) and talks to it as ``wire.py`` describes. Several deliveries are
in flight at once, matched by id. While the worker is down, deliveries tempfail at once and
those in flight when it died tempfail too: the scheduler tries them again later (a message
the worker had already handed over may then go out twice, never zero times).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pigeon.delivery import wire
from pigeon.delivery.dns import DNSSettings, MXResolver
from pigeon.delivery.relay import RelayAgent, RelaySettings
from pigeon.delivery.routes import RelayRoute
from pigeon.log import describe_for_child, logger_levels
from pigeon.procs import Channel, ProcCommand, ProcessSpec, ProcessSupervisor
from pigeon.queue.envelope import Envelope
from pigeon.queue.journal import JournalStore, QueueError
from pigeon.scheduler.scheduler import Outcome

__all__ = ["InProcessRelay", "RelayService", "WorkerRelay"]

log = logging.getLogger("pigeon.mta")

WORKER_NAME = "relay worker"
MAX_ROUTES = 256  # routes the worker is told about before both ends start afresh


class RelayService(Protocol):
    settings: RelaySettings

    async def start(self) -> None: ...

    async def deliver(
        self,
        route: RelayRoute,
        envelopes: Sequence[Envelope],
        *,
        sender: str | None = None,
        dsn_relayed: set[int] | None = None,
    ) -> dict[int, Outcome]: ...

    async def show(self, view: str) -> list[str]: ...

    def reconfigure(self, settings: RelaySettings) -> None: ...

    def sync_log_levels(self) -> None: ...

    async def drain(self, timeout: float) -> int:
        """At shutdown: wait at most ``timeout`` seconds for deliveries under way to be
        answered; returns how many were still unanswered when it started."""
        ...

    async def close(self) -> None: ...


def _every(envelopes: Sequence[Envelope], line: str) -> dict[int, Outcome]:
    return {e.evpid: Outcome.tempfail(line) for e in envelopes}


class InProcessRelay:
    """The relay agent on the daemon's own event loop (``pigeon run --relay in-process``)."""

    def __init__(self, store: JournalStore, settings: RelaySettings, dns: DNSSettings) -> None:
        self.store = store
        self.settings = settings
        self.agent = RelayAgent(settings, MXResolver(dns))

    async def start(self) -> None:
        pass

    async def deliver(
        self,
        route: RelayRoute,
        envelopes: Sequence[Envelope],
        *,
        sender: str | None = None,
        dsn_relayed: set[int] | None = None,
    ) -> dict[int, Outcome]:
        if not envelopes:
            return {}
        try:
            body = self.store.read_body(envelopes[0].msgid)
        except QueueError as exc:
            return _every(envelopes, str(exc))
        return await self.agent.deliver(
            route, envelopes, body, sender=sender, dsn_relayed=dsn_relayed
        )

    async def show(self, view: str) -> list[str]:
        return self.agent.show(view)

    def reconfigure(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.agent.reconfigure(settings)

    def sync_log_levels(self) -> None:
        pass  # same process, same loggers

    async def drain(self, timeout: float) -> int:
        return 0  # its deliveries are the scheduler's tasks: Scheduler.stop waits for them

    async def close(self) -> None:
        await self.agent.close()


class WorkerRelay:
    """Remote delivery in a supervised worker process."""

    def __init__(
        self,
        store: JournalStore,
        settings: RelaySettings,
        dns: DNSSettings,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.store = store
        self.settings = settings
        self.dns = dns
        self._ids = itertools.count(1)
        # Requests waiting for their answer: what to call with it, and the pinned messages.
        self._pending: dict[int, tuple[Callable[[dict[str, Any]], None], list[int]]] = {}
        self._outgoing: list[dict[str, Any]] = []
        self._drained: asyncio.Future[None] | None = None  # set when _pending empties
        # Routes the worker knows by number: a delivery names its route, not all its fields.
        self._route_ids: dict[RelayRoute, int] = {}
        # The worker writes its lines (a delivery line per relayed envelope, as smtpd's mta)
        # where ours go, itself: forwarding them would cost this process as much as writing.
        self._log = describe_for_child()
        pass_fds: tuple[int, ...] = ()
        if self._log is not None and self._log["target"] == "fd":
            fd = os.dup(int(self._log["fd"]))  # not 0-2: those are the child's own
            self._log = {**self._log, "fd": fd}
            pass_fds = (fd,)
        self.supervisor = ProcessSupervisor(
            ProcessSpec(
                WORKER_NAME,
                ProcCommand((sys.executable, "-m", "pigeon.delivery.worker"), sys.executable),
                socketpair=True,
                pass_fds=pass_fds,
                fallback_user=None,  # as root without a run-as account: stays root, as we do
            ),
            handshake=self._handshake,
            on_line=self._on_line,
            on_down=self._on_down,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            logger=log,
        )
        self._started = False

    @property
    def pid(self) -> int | None:
        """The running worker's process id (tests, ``show``)."""
        proc = self.supervisor._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # ---- lifecycle

    async def start(self) -> None:
        self._started = True
        if not await self.supervisor.start():
            log.warning("warn: %s: not ready yet; relayed mail waits for it", WORKER_NAME)

    def _configure_message(self) -> dict[str, Any]:
        level = logging.getLogger("pigeon.mta").getEffectiveLevel()
        return {
            "op": "configure",
            **wire.encode_settings(self.settings, self.dns),
            "level": level,
            "levels": logger_levels(),
            "log": self._log,
        }

    async def _handshake(self, channel: Channel) -> None:
        self._route_ids.clear()  # a new worker knows none
        channel.write_line(wire.encode_batch([self._configure_message()]))
        line = await channel.read_line()
        if line is None:
            raise ConnectionError("closed during the handshake")
        if not any(m.get("op") == "ready" for m in wire.decode_batch(line)):
            raise ValueError(f"unexpected answer {line[:100]!r}")

    def reconfigure(self, settings: RelaySettings) -> None:
        self.settings = settings
        if self.supervisor.ready.is_set():
            self._send(self._configure_message())
        # else: the next spawn's handshake sends them

    def sync_log_levels(self) -> None:
        """After ``log verbose|brief`` or ``trace``: the worker filters as we do."""
        if self.supervisor.ready.is_set():
            self._send({"op": "levels", "levels": logger_levels()})

    async def drain(self, timeout: float) -> int:
        waiting = len(self._pending)
        if not waiting or timeout <= 0:
            return waiting
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except TimeoutError:
            pass
        finally:
            self._drained = None
        return waiting

    async def close(self) -> None:
        if self._started:
            await self.supervisor.stop()
        self._fail_pending("relay worker stopped")
        if self._log is not None and self._log["target"] == "fd":
            with contextlib.suppress(OSError):
                os.close(int(self._log["fd"]))
            self._log = None

    # ---- requests

    def _send(self, message: dict[str, Any]) -> None:
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(message)

    def _flush(self) -> None:
        messages, self._outgoing = self._outgoing, []
        if messages and not self.supervisor.write_line(wire.encode_batch(messages)):
            for message in messages:  # went down in between: _on_down answered the rest
                self._answer(message.get("id"), {"error": "relay worker is not running"})

    def _request(self, message: dict[str, Any], pinned: list[int]) -> asyncio.Future[Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def resolve(answer: dict[str, Any]) -> None:
            if not fut.done():
                fut.set_result(answer)

        self._call(message, pinned, resolve)
        return fut

    def _call(
        self, message: dict[str, Any], pinned: list[int], then: Callable[[dict[str, Any]], None]
    ) -> None:
        ident = next(self._ids)
        self._pending[ident] = (then, pinned)
        message["id"] = ident
        self._send(message)

    def _answer(self, ident: Any, message: dict[str, Any]) -> None:
        entry = self._pending.pop(ident, None) if isinstance(ident, int) else None
        if entry is None:
            return
        then, pinned = entry
        for msgid in pinned:
            self.store.unpin(msgid)
        try:
            then(message)
        except Exception:  # one bad answer handler must not stop the others
            log.exception("warn: %s: handling an answer failed", WORKER_NAME)
        if not self._pending and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _route_id(self, route: RelayRoute) -> int:
        """The route's number in the worker, telling it the route first if it is new."""
        rid = self._route_ids.get(route)
        if rid is None:
            if len(self._route_ids) >= MAX_ROUTES:
                self._route_ids.clear()
                self._send({"op": "forget-routes"})
            rid = self._route_ids[route] = next(self._ids)
            self._send({"op": "route", "rid": rid, "route": wire.encode_route(route)})
        return rid

    def _deliver_request(
        self, route: RelayRoute, envelopes: Sequence[Envelope], sender: str | None, location: Any
    ) -> dict[str, Any]:
        return {
            "op": "deliver",
            "rid": self._route_id(route),
            "envelopes": [wire.encode_envelope(e) for e in envelopes],
            "sender": sender,
            "body": location,
            "dsn": True,
        }

    @staticmethod
    def _outcomes(
        answer: dict[str, Any], envelopes: Sequence[Envelope]
    ) -> tuple[dict[int, Outcome], set[int]]:
        """The outcomes an answer gives, and the envelopes relayed with their DSN request."""
        if "outcomes" not in answer:
            error = str(answer.get("error", "no answer from the relay worker"))
            return _every(envelopes, error), set()
        outcomes = wire.decode_outcomes(answer["outcomes"], logged=bool(answer.get("logged")))
        return outcomes, {int(e) for e in answer.get("dsn_relayed", ())}

    async def deliver(
        self,
        route: RelayRoute,
        envelopes: Sequence[Envelope],
        *,
        sender: str | None = None,
        dsn_relayed: set[int] | None = None,
    ) -> dict[int, Outcome]:
        if not envelopes:
            return {}
        fut: asyncio.Future[tuple[dict[int, Outcome], set[int]]]
        fut = asyncio.get_running_loop().create_future()

        def then(outcomes: dict[int, Outcome], relayed: set[int]) -> None:
            if not fut.done():
                fut.set_result((outcomes, relayed))

        if not self.submit(route, envelopes, sender, then):
            return _every(envelopes, self._why_not(envelopes[0].msgid))
        outcomes, relayed = await fut
        if dsn_relayed is not None:
            dsn_relayed.update(relayed)
        return outcomes

    def _why_not(self, msgid: int) -> str:
        """Why ``submit`` refused a message."""
        if not self.supervisor.ready.is_set():
            return "relay worker is not running"
        try:
            self.store.body_location(msgid)
        except QueueError as exc:
            return str(exc)
        return "relay worker is not running"

    def submit(
        self,
        route: RelayRoute,
        envelopes: Sequence[Envelope],
        sender: str | None,
        then: Callable[[dict[int, Outcome], set[int]], None],
    ) -> bool:
        """``deliver`` without a coroutine: ``then(outcomes, dsn_relayed)`` is called with
        the answer. False (and nothing sent) when the worker is not ready or the body is
        not found: ``deliver`` then says why."""
        if not envelopes or not self.supervisor.ready.is_set():
            return False
        msgid = envelopes[0].msgid
        try:
            location = self.store.body_location(msgid)
        except QueueError:
            return False
        self.store.pin(msgid)
        self._call(
            self._deliver_request(route, envelopes, sender, location),
            [msgid],
            lambda answer: then(*self._outcomes(answer, envelopes)),
        )
        return True

    async def show(self, view: str) -> list[str]:
        if view not in ("hosts", "relays", "routes", "hoststats"):
            raise ValueError(f"unknown view: {view}")
        if not self.supervisor.ready.is_set():
            return []  # a worker that is restarting has nothing to show yet
        answer = await self._request({"op": "show", "view": view}, [])
        if "lines" not in answer:
            raise ValueError(str(answer.get("error", "no answer from the relay worker")))
        return [str(line) for line in answer["lines"]]

    # ---- what the worker says

    def _on_line(self, line: str) -> None:
        for message in wire.decode_batch(line):
            if "id" in message:
                self._answer(message["id"], message)
            elif message.get("op") == "log":
                logging.getLogger(str(message.get("name", "pigeon.mta"))).log(
                    int(message.get("level", logging.INFO)), "%s", message.get("msg", "")
                )
            # "ready" after a reconfigure needs nothing

    def _on_down(self, reason: str) -> None:
        self._fail_pending(f"relay worker went away ({reason})")

    def _fail_pending(self, reason: str) -> None:
        for ident in list(self._pending):
            self._answer(ident, {"error": reason})
