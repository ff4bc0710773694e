"""One filter process (``proc`` or ``proc-exec``) shared by every session that uses it.

Speaks the filter protocol through :mod:`pigeon.protocol.filterproto` on top of a
:class:`~pigeon.procs.ProcessSupervisor`. Unlike OpenSMTPD, nothing a filter
does can stop the daemon: a protocol violation, an exit or a request that is not answered
within the timeout fails the requests in flight with :class:`FilterFailure` (the session
answers 421/451), and the process is restarted with backoff. Sessions that were open in
the old process are told apart by :attr:`FilterProc.generation`: the new process never saw
their earlier events, so they are failed too rather than filtered half-blind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pigeon import metrics
from pigeon.procs import Channel, ProcessSpec, ProcessSupervisor
from pigeon.protocol import filterproto
from pigeon.protocol.filterproto import FilterVersion

log = logging.getLogger("pigeon.filters")

DEFAULT_PROTOCOL: FilterVersion = "0.7"
DEFAULT_REQUEST_TIMEOUT = 60  # seconds; OpenSMTPD has none (a hung filter stalls the session)
SMTPD_VERSION = {"0.4": "6.6.4", "0.5": "6.6.4", "0.6": "6.8.0p2", "0.7": "7.6.0"}
_tokens = itertools.count(1)


class FilterFailure(Exception):
    """The filter could not answer: the session must get a temporary failure."""


@dataclass
class _Pending:
    token: int
    phase: str
    future: asyncio.Future[filterproto.FilterResult | list[str]]
    output: filterproto.DataLineOutput | None = None


@dataclass
class ProcSettings:
    admd: str
    protocol: FilterVersion = DEFAULT_PROTOCOL
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    handshake_timeout: float = 10.0
    session_timeout: int = 300
    backoff_initial: float = 0.5


@dataclass
class _Stats:
    requests: int = 0
    failures: int = 0
    restarts: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class FilterProc:
    """A running filter process; see the module docstring."""

    def __init__(
        self,
        spec: ProcessSpec,
        settings: ProcSettings,
        *,
        on_proc_report: Callable[[int, str, str], None] | None = None,
    ) -> None:
        self.name = spec.name
        self.settings = settings
        self.version: FilterVersion = settings.protocol
        self.registration = filterproto.FilterRegistration()
        self.tracker = filterproto.RequestTracker()
        self.stats = _Stats()
        self._pending: dict[int, _Pending] = {}
        self._on_proc_report = on_proc_report
        self.supervisor = ProcessSupervisor(
            spec,
            handshake=self._handshake,
            on_line=self._on_line,
            on_down=self._on_down,
            handshake_timeout=settings.handshake_timeout,
            backoff_initial=settings.backoff_initial,
            logger=log,
        )

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> bool:
        return await self.supervisor.start()

    async def stop(self) -> None:
        self._fail_all("Pigeon is shutting down")
        await self.supervisor.stop()

    @property
    def generation(self) -> int:
        return self.supervisor.generation

    @property
    def ready(self) -> bool:
        return self.supervisor.ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        if self.ready:
            return True
        try:
            await asyncio.wait_for(self.supervisor.ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _handshake(self, channel: Channel) -> None:
        registration = filterproto.FilterRegistration()
        for line in filterproto.encode_config(
            self.version,
            smtpd_version=SMTPD_VERSION[self.version],
            admd=self.settings.admd,
            session_timeout=self.settings.session_timeout,
        ):
            channel.write_line(line)
        await channel.writer.drain()
        while not registration.ready:
            answer = await channel.read_line()
            if answer is None:
                raise filterproto.FilterProtocolError("exited during the handshake")
            registration.feed(filterproto.decode_filter_line(answer, self.version))
        self.registration = registration
        self.tracker = filterproto.RequestTracker()

    # -- sessions and reports ------------------------------------------------------

    def open_session(self, session: int) -> None:
        self.tracker.open_session(session)

    def close_session(self, session: int) -> None:
        self.tracker.close_session(session)
        pending = self._pending.pop(session, None)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(FilterFailure("session closed"))

    def wants_report(self, event: str) -> bool:
        return self.registration.wants_report(event)

    def wants_phase(self, phase: str) -> bool:
        return self.registration.wants_phase(phase)

    def report(self, timestamp: float, session: int, event: filterproto.ReportEvent) -> None:
        if self.ready and self.registration.wants_report(event.name):
            self.supervisor.write_line(
                filterproto.encode_report(self.version, timestamp, session, event)
            )

    # -- requests ------------------------------------------------------------------

    async def request(self, session: int, phase: str, param: str) -> filterproto.FilterResult:
        """Ask for a decision on one phase (``param`` for connect is ``RDNS|ADDRESS``)."""
        token = next(_tokens)
        now = time.time()
        if phase == "connect":
            rdns, _, address = param.partition("|")
            line = filterproto.encode_connect_request(
                self.version, now, session, token, rdns, address
            )
        else:
            line = filterproto.encode_filter_request(
                self.version, now, session, token, phase, param
            )
        result = await self._exchange(session, token, phase, [line])
        assert isinstance(result, filterproto.FilterResult)
        return result

    async def data_lines(self, session: int, lines: list[str]) -> list[str]:
        """Stream one message (stuffed lines, without ``.``); returns the filter's lines."""
        token = next(_tokens)
        now = time.time()
        out = [
            filterproto.encode_data_line(self.version, now, session, token, line)
            for line in [*lines, filterproto.DATA_END]
        ]
        result = await self._exchange(session, token, "data-line", out)
        assert isinstance(result, list)
        return result

    async def _exchange(
        self, session: int, token: int, phase: str, lines: list[str]
    ) -> filterproto.FilterResult | list[str]:
        if not self.ready:
            raise FilterFailure("filter is not running")
        if session in self._pending:
            raise FilterFailure("a request is already in flight for this session")
        try:
            self.tracker.sent(session, token, phase)
        except ValueError as exc:
            raise FilterFailure(str(exc)) from None
        future: asyncio.Future[filterproto.FilterResult | list[str]] = (
            asyncio.get_running_loop().create_future()
        )
        pending = _Pending(token, phase, future)
        if phase == "data-line":
            pending.output = filterproto.DataLineOutput()
        self._pending[session] = pending
        self.stats.requests += 1
        channel = self.supervisor.channel
        assert channel is not None
        for line in lines:
            channel.write_line(line)
        try:
            await asyncio.wait_for(channel.writer.drain(), self.settings.request_timeout)
            return await asyncio.wait_for(asyncio.shield(future), self.settings.request_timeout)
        except TimeoutError:
            self.stats.failures += 1
            metrics.count("filter_failures", filter=self.name, reason="timeout")
            self.supervisor.declare_broken(
                f"no answer to the {phase} request within {self.settings.request_timeout:g}s"
            )
            raise FilterFailure("filter timed out") from None
        except (ConnectionError, OSError) as exc:
            raise FilterFailure(f"filter pipe broken: {exc}") from None
        finally:
            if self._pending.get(session) is pending:
                del self._pending[session]

    # -- lines from the filter -----------------------------------------------------

    def _on_line(self, line: str) -> None:
        try:
            message = filterproto.decode_filter_line(line, self.version)
        except filterproto.InvalidFilterReply as exc:
            # smtpd's own behaviour: not fatal, the client gets 421 and is dropped.
            log.warning("warn: %s: %s", self.name, exc)
            metrics.count("filter_failures", filter=self.name, reason="bad-reply")
            bad = exc.result
            fixed = filterproto.FilterResult(
                bad.session,
                bad.token,
                filterproto.Decision.DISCONNECT,
                "421 Internal server error",
            )
            self._deliver(fixed)
            return
        except filterproto.FilterProtocolError as exc:
            self._violation(str(exc))
            return
        if isinstance(message, filterproto.ProcReport):
            # smtpd crashes on this line (filter-protocol.md section 7); we broadcast it.
            log.info(
                "info: %s: filter report session=%016x: %s",
                self.name,
                message.session,
                message.message,
            )
            if self._on_proc_report is not None:
                self._on_proc_report(message.session, self.name, message.message)
            return
        if isinstance(message, filterproto.FilterResult | filterproto.FilterDataLine):
            self._deliver(message)
            return
        self._violation(f"unexpected line after register|ready: {line!r}")

    def _deliver(self, message: filterproto.FilterResult | filterproto.FilterDataLine) -> None:
        try:
            phase = self.tracker.received(message)
        except filterproto.FilterProtocolError as exc:
            self._violation(str(exc))
            return
        pending = self._pending.get(message.session)
        if phase is None or pending is None or pending.future.done():
            return  # the session went away meanwhile: a late answer, ignored as smtpd does
        if isinstance(message, filterproto.FilterDataLine):
            assert pending.output is not None
            if pending.output.feed(message.line):
                pending.future.set_result(list(pending.output.lines))
            return
        if message.decision is filterproto.Decision.REPORT:
            log.info("info: %s: filter report: %s", self.name, message.param)
        pending.future.set_result(message)

    def _violation(self, reason: str) -> None:
        self.stats.failures += 1
        metrics.count("filter_failures", filter=self.name, reason="protocol")
        log.warning("warn: %s: protocol error: %s", self.name, reason)
        self._fail_all(f"filter protocol error: {reason}")
        self.supervisor.declare_broken("protocol error")

    def _on_down(self, reason: str) -> None:
        self.stats.restarts += 1
        # A kill after a timeout or protocol error was counted with its own reason.
        if reason.startswith("exited"):
            metrics.count("filter_failures", filter=self.name, reason="exit")
        elif reason.startswith(("cannot start", "handshake")):
            metrics.count("filter_failures", filter=self.name, reason="start")
        elif reason == "line too long":
            metrics.count("filter_failures", filter=self.name, reason="protocol")
        self._fail_all(f"filter went away: {reason}")

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for item in pending.values():
            if not item.future.done():
                item.future.set_exception(FilterFailure(reason))
