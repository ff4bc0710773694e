"""Write OpenSMTPD proc filters in Python.

A filter built with this module runs unchanged under Pigeon and under OpenSMTPD (6.6 to
7.x): it speaks the line protocol on stdin/stdout through :mod:`pigeon.protocol.filterproto`
and uses nothing else of Pigeon. See ``docs/filters.md`` for a tutorial.

::

    f = Filter("example")

    @f.on_filter("mail-from")
    async def check(session: Session, param: str) -> Decision:
        return reject("550 5.7.1 go away") if param.endswith("@spam.test") else proceed()

    f.run()

Design:

* Every message of one session (report events, filter requests, the whole message of a
  data-line stream) is handled in arrival order by one asyncio task per session, so one
  session's requests are answered in order while different sessions run concurrently.
* The SDK registers the report events it needs to keep :class:`Session` up to date.
* A handler that raises never wedges the session: the request is answered ``proceed``
  (or ``reject|451 ...`` with ``Filter(fail="tempfail")``) and the traceback goes to stderr,
  which both Pigeon and OpenSMTPD log.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

from pigeon.protocol import filterproto
from pigeon.protocol.filterproto import (
    ConfigLine,
    FilterRequest,
    FilterVersion,
    ReportLine,
)

__all__ = [
    "Decision",
    "Filter",
    "MessageResult",
    "Session",
    "disconnect",
    "junk",
    "proceed",
    "reject",
    "report",
    "rewrite",
]

# The report events the SDK itself needs to keep Session up to date.
_STATE_EVENTS = (
    "link-connect",
    "link-disconnect",
    "link-identify",
    "link-tls",
    "link-auth",
    "tx-begin",
    "tx-mail",
    "tx-rcpt",
    "tx-reset",
    "tx-rollback",
    "tx-commit",
)
# Phases a handler registered with on_filter may not take: the SDK drives them.
_MESSAGE_PHASES = ("data-line", "commit")
_TEMPFAIL = "451 4.3.0 filter error, try again later"


@dataclass(frozen=True)
class Decision:
    """The answer to one filter request (build it with :func:`proceed`, :func:`reject`...)."""

    kind: filterproto.Decision
    param: str | None = None


def proceed() -> Decision:
    return Decision(filterproto.Decision.PROCEED)


def junk() -> Decision:
    """Mark the transaction (or, before MAIL FROM, the whole session) as spam."""
    return Decision(filterproto.Decision.JUNK)


def reject(reply: str) -> Decision:
    """Answer the client ``reply`` (``"550 5.7.1 text"``; must start with 4 or 5)."""
    return Decision(filterproto.Decision.REJECT, reply)


def disconnect(reply: str) -> Decision:
    """Answer the client ``reply`` and close the connection."""
    return Decision(filterproto.Decision.DISCONNECT, reply)


def rewrite(value: str) -> Decision:
    """Replace the command's parameter (``"<new@example.org>"`` for MAIL/RCPT)."""
    return Decision(filterproto.Decision.REWRITE, value)


def report(text: str) -> Decision:
    """Proceed and have the MTA report ``text`` (protocol 0.7; plain proceed before)."""
    return Decision(filterproto.Decision.REPORT, text)


@dataclass
class MessageResult:
    """What an :meth:`Filter.on_message` handler returns.

    ``lines`` replaces the message (unstuffed, without the final ``.``); None keeps it.
    ``decision`` is answered at the commit phase. A ``junk()`` decision cannot be answered
    there (the headers are already written), so the SDK prepends ``X-Spam: yes`` to the
    lines instead and proceeds.
    """

    lines: list[str] | None = None
    decision: Decision = field(default_factory=proceed)


@dataclass
class Session:
    """One SMTP session as the filter sees it, kept up to date from report events."""

    id: int
    rdns: str | None = None
    fcrdns: str | None = None
    src: str | None = None
    dest: str | None = None
    helo: str | None = None
    tls: str | None = None
    auth_user: str | None = None
    mail_from: str | None = None
    rcpt_to: list[str] = field(default_factory=list)
    msgid: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        """True for the local socket and loopback clients."""
        if self.src is None:
            return False
        if self.src.startswith("unix:"):
            return True
        host = self.src.rsplit(":", 1)[0].strip("[]")
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def apply(self, event: filterproto.ReportEvent) -> None:
        """Update the fields from one report event."""
        if isinstance(event, filterproto.LinkConnect):
            self.rdns, self.fcrdns, self.src, self.dest = (
                event.rdns,
                event.fcrdns,
                event.src,
                event.dest,
            )
        elif isinstance(event, filterproto.LinkIdentify):
            self.helo = event.identity
        elif isinstance(event, filterproto.LinkTls):
            self.tls = event.tls
        elif isinstance(event, filterproto.LinkAuth):
            self.auth_user = event.username if event.result == "pass" else None
        elif isinstance(event, filterproto.TxBegin):
            self._new_transaction(event.msgid)
        elif isinstance(event, filterproto.TxRcpt):
            if event.result == "ok":
                self.rcpt_to.append(event.address)
        elif isinstance(event, filterproto.TxMail):
            if event.result == "ok":
                self.mail_from = event.address
        elif isinstance(event, filterproto.TxReset | filterproto.TxRollback):
            self._new_transaction(None)

    def _new_transaction(self, msgid: int | None) -> None:
        self.msgid = msgid
        self.mail_from = None
        self.rcpt_to = []


ReportHandler: TypeAlias = Callable[[Session, ReportLine], Awaitable[None] | None]
FilterHandler: TypeAlias = Callable[[Session, str], Awaitable[Decision] | Decision]
MessageHandler: TypeAlias = Callable[
    [Session, list[str]], Awaitable[MessageResult | None] | MessageResult | None
]


class LineWriter(Protocol):
    """What :meth:`Filter.serve` writes to (an ``asyncio.StreamWriter`` fits)."""

    def write(self, data: bytes) -> object: ...

    async def drain(self) -> None: ...


@dataclass
class _SessionState:
    session: Session
    queue: asyncio.Queue[Callable[[], Awaitable[None]]] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    data_lines: list[str] = field(default_factory=list)  # stuffed, current message
    pending_decision: Decision | None = None  # the on_message decision, answered at commit


class Filter:
    """A proc filter: register handlers, then :meth:`run` (or :meth:`serve` in tests)."""

    def __init__(
        self,
        name: str,
        *,
        protocol: FilterVersion | None = None,
        fail: Literal["proceed", "tempfail"] = "proceed",
    ) -> None:
        self.name = name
        self.forced_protocol = protocol
        self.fail = fail
        self.config: dict[str, str] = {}
        self._reports: dict[str, list[ReportHandler]] = {}
        self._filters: dict[str, FilterHandler] = {}
        self._message: MessageHandler | None = None
        self._sessions: dict[int, _SessionState] = {}
        self._writer: LineWriter | None = None

    # -- registration --------------------------------------------------------------

    def on_report(self, event: str) -> Callable[[ReportHandler], ReportHandler]:
        if event not in filterproto.REPORT_EVENTS:
            raise ValueError(f"unknown report event {event!r}")

        def register(handler: ReportHandler) -> ReportHandler:
            self._reports.setdefault(event, []).append(handler)
            return handler

        return register

    def on_filter(self, phase: str) -> Callable[[FilterHandler], FilterHandler]:
        if phase not in filterproto.FILTER_PHASES or phase in _MESSAGE_PHASES:
            raise ValueError(f"on_filter cannot take phase {phase!r} (use on_message)")

        def register(handler: FilterHandler) -> FilterHandler:
            self._filters[phase] = handler
            return handler

        return register

    def on_message(self, handler: MessageHandler) -> MessageHandler:
        self._message = handler
        return handler

    def registration_lines(self) -> list[str]:
        """The ``register|...`` lines this filter sends, ``register|ready`` last."""
        events = sorted(set(_STATE_EVENTS) | set(self._reports))
        phases = sorted(self._filters)
        if self._message is not None:
            phases += list(_MESSAGE_PHASES)
        lines = [
            filterproto.encode_register(filterproto.RegisterReport("smtp-in", e)) for e in events
        ]
        lines += [
            filterproto.encode_register(filterproto.RegisterFilter("smtp-in", p)) for p in phases
        ]
        lines.append(filterproto.encode_register(filterproto.RegisterReady()))
        return lines

    # -- protocol version ----------------------------------------------------------

    @property
    def protocol(self) -> FilterVersion | None:
        """The version answers are written in: forced, announced, or guessed."""
        if self.forced_protocol is not None:
            return self.forced_protocol
        announced = self.config.get("protocol")
        if announced in filterproto.SUPPORTED_VERSIONS:
            return filterproto.parse_version(announced)
        smtpd = self.config.get("smtpd-version", "")
        if smtpd.startswith("6."):
            return "0.6"
        if smtpd.startswith("7."):
            return "0.7"
        return None

    # -- running -------------------------------------------------------------------

    def run(self) -> None:
        """Serve on stdin/stdout until smtpd closes stdin."""
        asyncio.run(self._run_stdio())

    async def _run_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await self.serve(reader, _StdoutWriter())

    async def serve(self, reader: asyncio.StreamReader, writer: LineWriter) -> None:
        """Run the protocol over any asyncio streams until ``reader`` reaches EOF."""
        self._writer = writer
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
                if line:
                    await self._handle_line(line)
        finally:
            for state in self._sessions.values():
                if state.task is not None:
                    state.task.cancel()
            self._sessions.clear()

    def log(self, text: str) -> None:
        """One line on stderr (the MTA logs it)."""
        for part in text.rstrip("\n").splitlines():
            print(f"{self.name}: {part}", file=sys.stderr, flush=True)

    async def _send(self, line: str) -> None:
        assert self._writer is not None
        self._writer.write(line.encode("utf-8", "surrogateescape") + b"\n")
        await self._writer.drain()

    async def _handle_line(self, line: str) -> None:
        try:
            message = filterproto.decode_smtpd_line(line)
        except filterproto.FilterProtocolError as exc:
            self.log(f"ignoring line: {exc}")
            return
        if isinstance(message, ConfigLine):
            if message.key == "ready":
                for out in self.registration_lines():
                    await self._send(out)
            else:
                self.config[message.key] = message.value
        elif isinstance(message, ReportLine):
            self._on_report_line(message)
        elif message.phase == "data-line":
            self._on_data_line(message)
        else:
            request = message
            self._enqueue(request.session, lambda: self._answer_request(request))

    def _state(self, session_id: int) -> _SessionState:
        state = self._sessions.get(session_id)
        if state is None:
            state = _SessionState(Session(session_id))
            self._sessions[session_id] = state
        return state

    def _enqueue(self, session_id: int, job: Callable[[], Awaitable[None]]) -> None:
        state = self._state(session_id)
        state.queue.put_nowait(job)
        if state.task is None or state.task.done():
            state.task = asyncio.ensure_future(self._drain_session(state))

    async def _drain_session(self, state: _SessionState) -> None:
        while not state.queue.empty():
            job = state.queue.get_nowait()
            await job()

    def _on_report_line(self, line: ReportLine) -> None:
        session_id = line.session

        async def job() -> None:
            state = self._state(session_id)
            state.session.apply(line.event)
            if isinstance(line.event, filterproto.TxReset | filterproto.TxRollback):
                state.data_lines.clear()
                state.pending_decision = None
            for handler in self._reports.get(line.event.name, ()):
                try:
                    await _maybe_await(handler(state.session, line))
                except Exception:
                    self.log(traceback.format_exc())
            if isinstance(line.event, filterproto.LinkDisconnect):
                self._sessions.pop(session_id, None)

        self._enqueue(session_id, job)

    def _on_data_line(self, request: FilterRequest) -> None:
        state = self._state(request.session)
        if request.param != filterproto.DATA_END:
            state.data_lines.append(request.param)
            return
        stuffed, state.data_lines = state.data_lines, []
        self._enqueue(request.session, lambda: self._answer_message(request, stuffed))

    def _version_for(self, request: FilterRequest) -> FilterVersion:
        return self.protocol or request.version

    async def _answer_request(self, request: FilterRequest) -> None:
        state = self._state(request.session)
        if request.phase == "commit":
            decision = state.pending_decision or proceed()
            state.pending_decision = None
        else:
            handler = self._filters.get(request.phase)
            decision = proceed()
            if handler is not None:
                try:
                    decision = await _maybe_await(handler(state.session, request.param))
                except Exception:
                    self.log(traceback.format_exc())
                    decision = self._failure_decision()
        await self._send_decision(request, decision)

    async def _send_decision(self, request: FilterRequest, decision: Decision) -> None:
        version = self._version_for(request)
        kind, param = decision.kind, decision.param
        if kind is filterproto.Decision.REPORT and version != "0.7":
            kind, param = filterproto.Decision.PROCEED, None  # no such decision before 0.7
        result = filterproto.FilterResult(request.session, request.token, kind, param)
        await self._send(filterproto.encode_filter_result(version, result))

    def _failure_decision(self) -> Decision:
        return reject(_TEMPFAIL) if self.fail == "tempfail" else proceed()

    async def _answer_message(self, request: FilterRequest, stuffed: list[str]) -> None:
        state = self._state(request.session)
        lines = [filterproto.dot_unstuff(line) for line in stuffed]
        result: MessageResult | None = None
        if self._message is not None:
            try:
                result = await _maybe_await(self._message(state.session, lines))
            except Exception:
                self.log(traceback.format_exc())
                result = MessageResult(decision=self._failure_decision())
        result = result or MessageResult()
        out = lines if result.lines is None else result.lines
        decision = result.decision
        if decision.kind is filterproto.Decision.JUNK:
            out, decision = ["X-Spam: yes", *out], proceed()
        state.pending_decision = decision
        version = self._version_for(request)
        for line in filterproto.stuffed_data_lines(out):
            message = filterproto.FilterDataLine(request.session, request.token, line)
            await self._send(filterproto.encode_filter_dataline(version, message))


async def _maybe_await(value: Awaitable[Any] | Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class _StdoutWriter:
    """Blocking writes to fd 1: lines are small and the MTA always reads its end."""

    def write(self, data: bytes) -> object:
        view = memoryview(data)
        while view:
            written = os.write(1, view)
            view = view[written:]
        return None

    async def drain(self) -> None:
        return None
