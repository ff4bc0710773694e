"""Builtin filters (``filter NAME phase PHASE match [!]CONDITION ACTION``): every condition,
negation, table and regex forms, the phases they apply in, and every action, parsed from
real smtpd.conf lines and run through a filter chain (filter-protocol.md section 6)."""

from __future__ import annotations

import asyncio

import pytest

from pigeon.config import parse_config_text
from pigeon.config.issues import ConfigError
from pigeon.filters.builtin import SessionFacts, builtin_matches, has_rdns
from pigeon.filters.chain import BAD_FILTER_REPLY, FilterSession, Verdict
from pigeon.filters.runtime import FilterManager, table_getter
from pigeon.protocol import filterproto
from pigeon.tables.base import TableResolver, open_tables

TABLES = """
table domains { "client.example.net", "example.org" }
table nets { "192.0.2.0/24", "127.0.0.1" }
table froms { "spam@evil.test", "@junk.test" }
table logins { "alice", "bob@example.org" }
"""
TAIL = 'action "a" maildir\nmatch from any for any action "a"\n'


def manager(filters: str, attach: str) -> FilterManager:
    config = parse_config_text(f"{TABLES}{filters}\nlisten on 127.0.0.1 filter {attach}\n{TAIL}")
    resolver = TableResolver(config, open_tables(config))
    return FilterManager(config, table_getter(resolver), admd="mx.test")


def session(filters: str, attach: str = "f", **facts: object) -> FilterSession:
    chain = manager(filters, attach).chain(attach)
    assert chain is not None
    fs = chain.new_session(1)
    for key, value in facts.items():
        setattr(fs.facts, key, value)
    return fs


def matches(
    condition: str, phase: str = "mail-from", evaluate_in: str | None = None, **facts: object
) -> bool:
    """Whether the condition of ``filter f phase PHASE match CONDITION junk`` holds when
    evaluated in ``evaluate_in`` (default: its own phase)."""
    fs = session(f"filter f phase {phase} match {condition} junk", **facts)
    spec = fs.chain.members[0].builtin
    assert spec is not None
    where = evaluate_in or phase
    return asyncio.run(builtin_matches(spec, where, fs.facts, fs.manager.table))


FULL = {
    "rdns": "client.example.net",
    "fcrdns": True,
    "src": "192.0.2.7",
    "helo": "client.example.net",
    "auth_user": "alice",
    "mail_from": "spam@evil.test",
    "rcpt_to": "bob@example.org",
}


@pytest.mark.parametrize(
    ("condition", "facts", "expected"),
    [
        ("fcrdns", {"fcrdns": True}, True),
        ("fcrdns", {"fcrdns": False}, False),
        ("!fcrdns", {"fcrdns": False}, True),
        ("rdns", {"rdns": "client.example.net"}, True),
        ("rdns", {"rdns": "<unknown>"}, False),
        ("rdns", {"rdns": "192.0.2.7"}, False),  # an address is not a name
        ("!rdns", {"rdns": "<unknown>"}, True),
        ("rdns <domains>", {"rdns": "client.example.net"}, True),
        ("rdns <domains>", {"rdns": "other.example.net"}, False),
        ("!rdns <domains>", {"rdns": "other.example.net"}, True),
        ('rdns regex { "^client[.]" }', {"rdns": "client.example.net"}, True),
        ('rdns regex { "^client[.]" }', {"rdns": "mail.example.net"}, False),
        ("src <nets>", {"src": "192.0.2.200"}, True),  # CIDR entry
        ("src <nets>", {"src": "127.0.0.1"}, True),
        ("src <nets>", {"src": "198.51.100.1"}, False),
        ("!src <nets>", {"src": "198.51.100.1"}, True),
        ('src regex { "^198[.]51[.]" }', {"src": "198.51.100.1"}, True),
        ("helo <domains>", {"helo": "client.example.net"}, True),
        ("helo <domains>", {"helo": "x.example.net"}, False),
        ('helo regex { "^bad" }', {"helo": "bad.example.net"}, True),
        ('!helo regex { "^bad" }', {"helo": "good.example.net"}, True),
        ("auth", {"auth_user": "alice"}, True),
        ("auth", {}, False),
        ("!auth", {}, True),
        ("auth <logins>", {"auth_user": "alice"}, True),
        ("auth <logins>", {"auth_user": "carol"}, False),
        ("auth <logins>", {"auth_user": "bob@example.org"}, True),  # mailaddr lookup
        ('auth regex { "^al" }', {"auth_user": "alice"}, True),
        ("mail-from <froms>", {"mail_from": "spam@evil.test"}, True),
        ("mail-from <froms>", {"mail_from": "anyone@junk.test"}, True),  # @domain entry
        ("mail-from <froms>", {"mail_from": "ham@good.test"}, False),
        ("!mail-from <froms>", {"mail_from": "ham@good.test"}, True),
        ('mail-from regex { "@evil[.]test$" }', {"mail_from": "spam@evil.test"}, True),
    ],
)
def test_condition(condition: str, facts: dict[str, object], expected: bool) -> None:
    assert matches(condition, **facts) is expected


@pytest.mark.parametrize(
    ("condition", "phase"),
    [
        ("auth <logins>", "mail-from"),  # the client did not authenticate
        ("!auth <logins>", "mail-from"),
        ('!auth regex { "^x" }', "rcpt-to"),
        ("rdns <domains>", "connect"),  # no PTR name
        ("!rdns <domains>", "connect"),
    ],
)
def test_condition_on_data_the_session_lacks_is_false_even_negated(
    condition: str, phase: str
) -> None:
    assert matches(condition, phase=phase) is False


def test_condition_names_refused_in_phases_before_their_data() -> None:
    with pytest.raises(ConfigError, match="not allowed in phase connect"):
        session("filter f phase connect match helo <domains> junk")


def test_rcpt_to_condition_only_exists_in_the_rcpt_to_phase() -> None:
    assert matches("rcpt-to <logins>", phase="rcpt-to", **FULL) is True
    assert matches("!rcpt-to <logins>", phase="rcpt-to", rcpt_to="x@y.test") is True
    assert matches('rcpt-to regex { "^bob@" }', phase="rcpt-to", **FULL) is True
    assert matches("rcpt-to <logins>", "rcpt-to", evaluate_in="data", **FULL) is False
    assert matches("!rcpt-to <logins>", "rcpt-to", evaluate_in="data", rcpt_to="x") is False


def test_auth_phase_never_matches_as_in_opensmtpd() -> None:
    assert matches("auth", phase="auth", auth_user="alice") is False
    assert matches("!auth", phase="auth") is False


def test_has_rdns() -> None:
    assert has_rdns("mx.example.net")
    assert not has_rdns("<unknown>")
    assert not has_rdns("")
    assert not has_rdns("[2001:db8::1]")


@pytest.mark.parametrize(
    "phase", ["connect", "helo", "ehlo", "auth", "mail-from", "rcpt-to", "data", "commit"]
)
def test_a_builtin_runs_only_in_its_own_phase(phase: str) -> None:
    # !fcrdns is true all along: the filter acts exactly in its phase (auth: never).
    fs = session(f'filter f phase {phase} match !fcrdns reject "550 5.7.1 no"')
    for other in ("connect", "helo", "ehlo", "auth", "mail-from", "rcpt-to", "data", "commit"):
        verdict = asyncio.run(fs.phase(other))
        expected = other == phase and phase != "auth"
        assert (verdict.kind == "reject") is expected, other


# -- actions ---------------------------------------------------------------------------


def run(fs: FilterSession, phase: str, param: str = "") -> Verdict:
    return asyncio.run(fs.phase(phase, param))


def test_action_junk() -> None:
    fs = session("filter f phase connect match src <nets> junk", src="127.0.0.1")
    assert run(fs, "connect").kind == "junk"
    assert fs.junk_session


def test_action_reject_keeps_the_session() -> None:
    fs = session('filter f phase helo match !rdns reject "550 5.7.1 who are you"')
    verdict = run(fs, "helo", "x")
    assert verdict.kind == "reject" and verdict.stops and not verdict.closes
    assert verdict.reply is not None and str(verdict.reply) == "550 5.7.1 who are you"


def test_action_reject_with_421_closes() -> None:
    fs = session('filter f phase helo match !rdns reject "421 4.7.0 later"')
    assert run(fs, "helo", "x").closes


def test_action_disconnect() -> None:
    fs = session('filter f phase connect match !rdns disconnect "550 GO AWAY"')
    verdict = run(fs, "connect")
    assert verdict.kind == "disconnect" and verdict.closes
    assert verdict.reply is not None and verdict.reply.code == 550


@pytest.mark.parametrize("text", ["250 fine", "hello", "699 nope"])
def test_invalid_reply_text_becomes_421_internal_server_error(text: str) -> None:
    fs = session(f'filter f phase helo match !rdns reject "{text}"')
    verdict = run(fs, "helo", "x")
    assert verdict.reply == BAD_FILTER_REPLY and verdict.closes


def test_action_rewrite() -> None:
    fs = session('filter f phase rcpt-to match rcpt-to <logins> rewrite "<alice@example.org>"')
    fs.facts.rcpt_to = "bob@example.org"
    verdict = run(fs, "rcpt-to", "bob@example.org")
    assert verdict == Verdict("rewrite", value="<alice@example.org>")


def test_action_report_emits_filter_report_and_goes_on() -> None:
    fs = session(
        'filter note phase connect match !rdns report "seen"\n'
        'filter stop phase connect match !rdns reject "550 5.7.1 no"\n'
        "filter c chain { note, stop }",
        attach="c",
    )
    reported: list[filterproto.ReportEvent] = []
    fs.report = reported.append  # type: ignore[method-assign]
    assert run(fs, "connect").kind == "reject"  # the chain went on after the report
    assert filterproto.FilterReportEvent("builtin", "note", "seen") in reported


def test_action_bypass_skips_the_rest_of_the_chain_for_that_phase_only() -> None:
    fs = session(
        "filter trust phase mail-from match fcrdns bypass\n"
        "filter junk_all phase mail-from match !auth junk\n"
        "filter junk_rcpt phase rcpt-to match !auth junk\n"
        "filter c chain { trust, junk_all, junk_rcpt }",
        attach="c",
        fcrdns=True,
    )
    fs.begin_transaction()
    assert run(fs, "mail-from", "a@b.test").kind == "proceed"
    assert not fs.junk
    assert run(fs, "rcpt-to", "c@d.test").kind == "junk"  # bypass was for mail-from only


def test_no_match_proceeds() -> None:
    fs = session('filter f phase connect match !fcrdns disconnect "550 no"', fcrdns=True)
    assert run(fs, "connect") == Verdict("proceed")


def test_table_failure_is_a_temporary_failure() -> None:
    fs = session("filter f phase mail-from match mail-from <froms> junk", mail_from="a@b.c")

    def broken(ref: object) -> object:
        raise OSError("backend down")

    fs.manager.table = broken  # type: ignore[assignment]
    verdict = run(fs, "mail-from", "a@b.c")
    assert verdict.kind == "reject"
    assert verdict.reply is not None and verdict.reply.code == 451


def test_session_facts_defaults() -> None:
    facts = SessionFacts()
    assert (facts.rdns, facts.fcrdns, facts.src) == ("<unknown>", False, "local")
