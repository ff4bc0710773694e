"""Filter chains and the per-session filter state the SMTP session drives.

:class:`FilterSession` is the only thing ``server/session.py`` talks to: it emits the report
events, runs each phase through the chain (builtins in-process, procs over their pipes),
keeps the junk marks, and streams the message through the data-line filters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pigeon import metrics
from pigeon.config.model import BuiltinFilter
from pigeon.filters.builtin import SessionFacts, TableGetter, builtin_matches
from pigeon.filters.proc import FilterFailure, FilterProc
from pigeon.protocol import filterproto
from pigeon.protocol.replies import Reply

if TYPE_CHECKING:
    from pigeon.filters.runtime import FilterManager

log = logging.getLogger("pigeon.filters")

JUNK_HEADER = "X-Spam: yes"  # OpenSMTPD writes "Yes"; maildir junk reads either
FILTER_TEMPFAIL = Reply(421, "Temporary failure in a mail filter, try again later", "4.3.0")
BAD_FILTER_REPLY = Reply(421, "Internal server error")
# The phases whose junk marks the transaction; earlier ones mark the whole session.
TX_PHASES = frozenset({"mail-from", "rcpt-to", "data", "commit"})

VerdictKind = Literal["proceed", "junk", "reject", "disconnect", "rewrite"]


@dataclass(frozen=True)
class Verdict:
    """What the chain decided for one phase."""

    kind: VerdictKind
    reply: Reply | None = None  # reject / disconnect (a 421 reject is a disconnect)
    value: str | None = None  # rewrite

    @property
    def stops(self) -> bool:
        """The command must not be executed: the reply goes to the client instead."""
        return self.kind in ("reject", "disconnect")

    @property
    def closes(self) -> bool:
        return self.kind == "disconnect" or (self.reply is not None and self.reply.code == 421)


PROCEED = Verdict("proceed")


@dataclass(frozen=True)
class ChainMember:
    name: str
    builtin: BuiltinFilter | None = None
    proc: FilterProc | None = None


@dataclass
class FilterChain:
    name: str
    members: list[ChainMember]
    manager: FilterManager

    def new_session(self, session_id: int) -> FilterSession:
        return FilterSession(self.manager, self, session_id)

    @property
    def procs(self) -> list[FilterProc]:
        return [m.proc for m in self.members if m.proc is not None]


def _reply(text: str | None) -> Reply:
    if text is None:
        return BAD_FILTER_REPLY
    try:
        reply = Reply.parse(text)
    except ValueError:
        return BAD_FILTER_REPLY
    return BAD_FILTER_REPLY if reply.positive else reply


@dataclass
class FilterSession:
    """One SMTP session's view of its listener's filter chain."""

    manager: FilterManager
    chain: FilterChain
    id: int
    facts: SessionFacts = field(default_factory=SessionFacts)
    junk_session: bool = False
    junk_tx: bool = False
    in_tx: bool = False
    failed: bool = False  # a filter failed us: every later phase gets FILTER_TEMPFAIL
    closed: bool = False  # link-disconnect sent: nothing more goes to the filters
    _generations: dict[str, int] = field(default_factory=dict)

    @property
    def junk(self) -> bool:
        return self.junk_session or self.junk_tx

    # -- reports -------------------------------------------------------------------

    def wants(self, event: str) -> bool:
        return any(p.wants_report(event) for p in self.chain.procs)

    def report(self, event: filterproto.ReportEvent) -> None:
        if self.closed:  # smtpd sends nothing after link-disconnect; filters count on it
            return
        now = time.time()
        for proc in self.chain.procs:
            proc.report(now, self.id, event)

    def open(self) -> None:
        """Before link-connect: register the session with every proc of the chain."""
        self.manager.sessions[self.id] = self
        for proc in self.chain.procs:
            proc.open_session(self.id)
            self._generations[proc.name] = proc.generation

    def close(self) -> None:
        self.report(filterproto.LinkDisconnect())
        self.closed = True
        for proc in self.chain.procs:
            proc.close_session(self.id)
        self.manager.sessions.pop(self.id, None)

    def begin_transaction(self) -> None:
        self.in_tx = True
        self.junk_tx = False

    def end_transaction(self) -> None:
        self.in_tx = False
        self.junk_tx = False
        self.facts.mail_from = None
        self.facts.rcpt_to = None

    # -- phases --------------------------------------------------------------------

    async def phase(self, phase: str, param: str = "") -> Verdict:
        """Run one phase through the chain and report the outcome (filter-response)."""
        verdict = await self._run_phase(phase, param)
        response = "junk" if verdict.kind == "junk" else verdict.kind
        text: str | None = None
        if verdict.reply is not None:
            text = str(verdict.reply).split("\n", 1)[0]
        elif verdict.value is not None:
            text = verdict.value
        name = filterproto.RESPONSE_PHASE_NAMES.get(phase, phase)
        self.report(filterproto.FilterResponse(name, response, text))
        if verdict.kind == "junk":
            self._mark_junk(phase)
        return verdict

    def _mark_junk(self, phase: str) -> None:
        if phase in TX_PHASES or self.in_tx:
            self.junk_tx = True
        else:
            self.junk_session = True

    async def _run_phase(self, phase: str, param: str) -> Verdict:
        if self.failed:
            return Verdict("disconnect", FILTER_TEMPFAIL)
        for member in self.chain.members:
            if member.builtin is not None:
                if member.builtin.phase != phase:
                    continue
                verdict = await self._builtin(member.name, member.builtin, phase)
            else:
                assert member.proc is not None
                if not member.proc.wants_phase(phase):
                    continue
                verdict = await self._ask(member.proc, phase, param)
            if verdict is not None:
                return verdict
        return PROCEED

    async def _builtin(self, name: str, spec: BuiltinFilter, phase: str) -> Verdict | None:
        tables: TableGetter = self.manager.table
        try:
            matched = await builtin_matches(spec, phase, self.facts, tables)
        except Exception as exc:  # a table backend failing: temporary, like smtpd's lookups
            log.warning("warn: filter %s: table lookup failed: %s", name, exc)
            metrics.count("filter_failures", filter=name, reason="table")
            return Verdict("reject", Reply(451, "Temporary failure", "4.3.0"))
        if not matched:
            return None
        action = spec.decision
        if action == "report":
            self.report(filterproto.FilterReportEvent("builtin", name, spec.argument or ""))
            return None
        if action == "bypass":
            return PROCEED
        if action == "junk":
            return Verdict("junk")
        if action == "rewrite":
            return Verdict("rewrite", value=spec.argument or "")
        reply = _reply(spec.argument)
        return Verdict("disconnect" if action == "disconnect" else "reject", reply)

    def _stale(self, proc: FilterProc) -> bool:
        return self._generations.get(proc.name) != proc.generation

    async def _ask(self, proc: FilterProc, phase: str, param: str) -> Verdict | None:
        if self._stale(proc):
            return self._fail(proc, "filter was restarted during the session")
        start = time.monotonic()
        try:
            result = await proc.request(self.id, phase, param)
        except FilterFailure as exc:
            if self.closed:  # the client left while the filter thought: not its fault
                return Verdict("disconnect", FILTER_TEMPFAIL)
            return self._fail(proc, str(exc))
        finally:
            metrics.observe("filter_seconds", time.monotonic() - start, filter=proc.name)
        decision = result.decision
        if decision is filterproto.Decision.PROCEED:
            return None
        if decision is filterproto.Decision.REPORT:
            self.report(filterproto.FilterResponse(phase, "report", result.param))
            return None
        if decision is filterproto.Decision.JUNK:
            return Verdict("junk")
        if decision is filterproto.Decision.REWRITE:
            return Verdict("rewrite", value=result.param or "")
        reply = _reply(result.param)
        if decision is filterproto.Decision.DISCONNECT:
            return Verdict("disconnect", reply)
        return Verdict("reject", reply)

    def _fail(self, proc: FilterProc, reason: str) -> Verdict:
        log.warning(
            "warn: %016x smtp filter-failure filter=%s reason=%s; session gets a temporary failure",
            self.id,
            proc.name,
            reason,
        )
        self.failed = True
        return Verdict("disconnect", FILTER_TEMPFAIL)

    # -- the message -----------------------------------------------------------------

    @property
    def filters_data(self) -> bool:
        return any(p.wants_phase("data-line") for p in self.chain.procs)

    async def data_lines(self, lines: list[str]) -> list[str] | Verdict:
        """Stream the message (dot-stuffed lines, no final ``.``) through every data-line
        filter in chain order; returns the output lines or a failure verdict."""
        if self.failed:
            return Verdict("disconnect", FILTER_TEMPFAIL)
        for proc in self.chain.procs:
            if not proc.wants_phase("data-line"):
                continue
            if self._stale(proc):
                return self._fail(proc, "filter was restarted during the session")
            start = time.monotonic()
            try:
                lines = await proc.data_lines(self.id, lines)
            except FilterFailure as exc:
                if self.closed:
                    return Verdict("disconnect", FILTER_TEMPFAIL)
                return self._fail(proc, str(exc))
            finally:
                metrics.observe("filter_seconds", time.monotonic() - start, filter=proc.name)
        return lines
