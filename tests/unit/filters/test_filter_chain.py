"""Filter chain semantics (filter-protocol.md sections 4-6), with in-memory proc filters:
order, first reject wins, junk marking the session or the transaction, bypass, data-line
chaining, filter failures, the filter-response reports, and the metrics recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import pytest

from pigeon import metrics
from pigeon.config import parse_config_text
from pigeon.filters.chain import (
    FILTER_TEMPFAIL,
    ChainMember,
    FilterChain,
    FilterSession,
    Verdict,
)
from pigeon.filters.proc import FilterFailure, FilterProc
from pigeon.filters.runtime import FilterManager, table_getter
from pigeon.protocol import filterproto
from pigeon.protocol.filterproto import Decision, FilterResult
from pigeon.tables.base import TableResolver, open_tables

Answer = Callable[[str, str], FilterResult | None]  # (phase, param) -> result (None: proceed)


class FakeProc:
    """FilterProc-shaped: answers from ``answer``, logs what it was asked and told."""

    def __init__(
        self,
        name: str,
        phases: set[str],
        answer: Answer | None = None,
        transform: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.name = name
        self.phases = phases
        self.answer = answer
        self.transform = transform
        self.generation = 1
        self.asked: list[tuple[str, str]] = []
        self.reports: list[filterproto.ReportEvent] = []
        self.fail_with: str | None = None

    def wants_phase(self, phase: str) -> bool:
        return phase in self.phases

    def wants_report(self, event: str) -> bool:
        return True

    def report(self, timestamp: float, session: int, event: filterproto.ReportEvent) -> None:
        self.reports.append(event)

    def open_session(self, session: int) -> None:
        pass

    def close_session(self, session: int) -> None:
        pass

    async def request(self, session: int, phase: str, param: str) -> FilterResult:
        self.asked.append((phase, param))
        if self.fail_with is not None:
            raise FilterFailure(self.fail_with)
        result = self.answer(phase, param) if self.answer else None
        return result or FilterResult(session, 1, Decision.PROCEED)

    async def data_lines(self, session: int, lines: list[str]) -> list[str]:
        self.asked.append(("data-line", "\n".join(lines)))
        if self.fail_with is not None:
            raise FilterFailure(self.fail_with)
        return self.transform(lines) if self.transform else lines


def decide(decision: Decision, param: str | None = None, only: str | None = None) -> Answer:
    def answer(phase: str, _: str) -> FilterResult | None:
        if only is not None and phase != only:
            return None
        return FilterResult(1, 1, decision, param)

    return answer


def make_session(*members: FakeProc | str, builtins: str = "") -> FilterSession:
    """A session of a chain of fake procs and builtins (named in ``builtins`` lines)."""
    text = builtins + '\nlisten on 127.0.0.1\naction "a" maildir\nmatch from any action "a"\n'
    config = parse_config_text(text)
    resolver = TableResolver(config, open_tables(config))
    manager = FilterManager(config, table_getter(resolver), admd="mx.test")
    chain_members = []
    for member in members:
        if isinstance(member, str):
            chain_members.append(ChainMember(member, builtin=config.filters[member].builtin))
        else:
            chain_members.append(ChainMember(member.name, proc=cast(FilterProc, member)))
    fs = FilterChain("c", chain_members, manager).new_session(7)
    fs.open()
    return fs


def run(fs: FilterSession, phase: str, param: str = "") -> Verdict:
    return asyncio.run(fs.phase(phase, param))


def test_members_are_asked_in_chain_order_with_the_same_parameter() -> None:
    a, b = FakeProc("a", {"mail-from"}), FakeProc("b", {"mail-from"})
    order: list[str] = []
    a.answer = lambda phase, param: order.append("a")  # type: ignore[func-returns-value]
    b.answer = lambda phase, param: order.append("b")  # type: ignore[func-returns-value]
    fs = make_session(a, b)
    assert run(fs, "mail-from", "x@y.test").kind == "proceed"
    assert order == ["a", "b"]
    assert a.asked == b.asked == [("mail-from", "x@y.test")]


def test_a_member_that_did_not_register_the_phase_is_skipped() -> None:
    a, b = FakeProc("a", {"helo"}), FakeProc("b", {"mail-from"})
    fs = make_session(a, b)
    run(fs, "mail-from", "x@y.test")
    assert a.asked == [] and b.asked == [("mail-from", "x@y.test")]


def test_first_reject_wins_and_stops_the_chain() -> None:
    a = FakeProc("a", {"rcpt-to"}, decide(Decision.REJECT, "550 5.7.1 first"))
    b = FakeProc("b", {"rcpt-to"}, decide(Decision.REJECT, "451 4.7.1 second"))
    fs = make_session(a, b)
    verdict = run(fs, "rcpt-to", "r@x.test")
    assert verdict.kind == "reject" and str(verdict.reply) == "550 5.7.1 first"
    assert b.asked == []


def test_disconnect_stops_and_closes() -> None:
    a = FakeProc("a", {"helo"}, decide(Decision.DISCONNECT, "421 4.7.0 bye"))
    b = FakeProc("b", {"helo"})
    verdict = run(make_session(a, b), "helo", "x")
    assert verdict.closes and b.asked == []


def test_junk_before_the_transaction_marks_the_whole_session() -> None:
    a = FakeProc("a", {"connect"}, decide(Decision.JUNK))
    fs = make_session(a)
    assert run(fs, "connect", "rdns|1.2.3.4").kind == "junk"
    assert fs.junk_session
    fs.begin_transaction()
    fs.end_transaction()
    assert fs.junk  # still junk for the next message


def test_junk_in_a_transaction_marks_only_that_transaction() -> None:
    a = FakeProc("a", {"mail-from"}, decide(Decision.JUNK))
    fs = make_session(a)
    fs.begin_transaction()
    run(fs, "mail-from", "spam@x.test")
    assert fs.junk_tx and not fs.junk_session and fs.junk
    fs.end_transaction()
    assert not fs.junk


def test_junk_ends_the_chain_for_that_phase() -> None:
    a = FakeProc("a", {"data"}, decide(Decision.JUNK))
    b = FakeProc("b", {"data"}, decide(Decision.REJECT, "550 5.7.1 never asked"))
    fs = make_session(a, b)
    fs.begin_transaction()
    assert run(fs, "data").kind == "junk"
    assert b.asked == []


def test_builtin_bypass_skips_procs_later_in_the_chain() -> None:
    later = FakeProc("later", {"mail-from"}, decide(Decision.REJECT, "550 5.7.1 no"))
    fs = make_session("trust", later, builtins="filter trust phase mail-from match !auth bypass")
    assert run(fs, "mail-from", "a@b.test").kind == "proceed"
    assert later.asked == []
    fs2 = make_session("trust", later, builtins="filter trust phase mail-from match auth bypass")
    assert run(fs2, "mail-from", "a@b.test").kind == "reject"  # no match: chain goes on


def test_rewrite_is_returned_to_the_session() -> None:
    a = FakeProc("a", {"rcpt-to"}, decide(Decision.REWRITE, "<new@x.test>"))
    assert run(make_session(a), "rcpt-to", "old@x.test") == Verdict("rewrite", value="<new@x.test>")


def test_proc_report_decision_is_reported_and_the_chain_goes_on() -> None:
    a = FakeProc("a", {"ehlo"}, decide(Decision.REPORT, "noted"))
    b = FakeProc("b", {"ehlo"})
    fs = make_session(a, b)
    assert run(fs, "ehlo", "x").kind == "proceed"
    assert b.asked == [("ehlo", "x")]
    assert filterproto.FilterResponse("ehlo", "report", "noted") in a.reports


def test_every_phase_outcome_is_reported_as_filter_response() -> None:
    a = FakeProc("a", {"connect"}, decide(Decision.REJECT, "554 5.7.1 no"))
    fs = make_session(a)
    run(fs, "connect", "r|1.2.3.4")
    run(fs, "noop")  # nobody registered it: still reported, as smtpd does
    responses = [e for e in a.reports if isinstance(e, filterproto.FilterResponse)]
    assert responses == [
        filterproto.FilterResponse("connected", "reject", "554 5.7.1 no"),
        filterproto.FilterResponse("noop", "proceed", None),
    ]


def test_data_lines_go_through_data_line_filters_in_chain_order() -> None:
    a = FakeProc("a", {"data-line"}, transform=lambda lines: ["A: 1", *lines])
    skip = FakeProc("skip", {"mail-from"})
    b = FakeProc("b", {"data-line"}, transform=lambda lines: ["B: 2", *lines])
    fs = make_session(a, skip, b)
    assert fs.filters_data
    out = asyncio.run(fs.data_lines(["Subject: x", "", "..dot"]))
    assert out == ["B: 2", "A: 1", "Subject: x", "", "..dot"]  # B's header above A's
    assert skip.asked == []


def test_a_failing_filter_fails_this_and_every_later_phase_of_the_session() -> None:
    a = FakeProc("a", {"helo", "mail-from"})
    a.fail_with = "filter timed out"
    fs = make_session(a)
    assert run(fs, "helo", "x") == Verdict("disconnect", FILTER_TEMPFAIL)
    a.fail_with = None
    assert run(fs, "mail-from", "a@b.test") == Verdict("disconnect", FILTER_TEMPFAIL)
    assert asyncio.run(fs.data_lines(["x"])) == Verdict("disconnect", FILTER_TEMPFAIL)
    assert a.asked == [("helo", "x")]


def test_a_filter_restarted_during_the_session_fails_it() -> None:
    a = FakeProc("a", {"mail-from"})
    fs = make_session(a)
    a.generation = 2  # the new process never saw this session's earlier events
    assert run(fs, "mail-from", "a@b.test") == Verdict("disconnect", FILTER_TEMPFAIL)
    assert a.asked == []


@pytest.fixture
def metrics_on() -> object:
    metrics.enable()
    yield None
    metrics.disable()


def test_filter_time_and_table_failures_are_measured(metrics_on: None) -> None:
    a = FakeProc("timed", {"helo"})
    fs = make_session(a)
    run(fs, "helo", "x")
    asyncio.run(fs.data_lines(["x"]))
    broken = make_session(
        "f", builtins='table t { "a@b.test" }\nfilter f phase mail-from match mail-from <t> junk'
    )
    broken.facts.mail_from = "a@b.test"

    def down(ref: object) -> object:
        raise OSError("backend down")

    broken.manager.table = down  # type: ignore[assignment]
    run(broken, "mail-from", "a@b.test")
    text = metrics.exposition()[0].decode()
    assert 'pigeon_filter_seconds_count{filter="timed"} 1.0' in text
    assert 'pigeon_filter_failures_total{filter="f",reason="table"} 1.0' in text
