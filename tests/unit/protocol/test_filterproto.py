"""Filter protocol lines: encoding per version, decoding, errors, small state helpers."""

from __future__ import annotations

import pytest

from pigeon.protocol.filterproto import (
    REPORT_EVENTS,
    RESPONSE_PHASE_NAMES,
    DataLineOutput,
    Decision,
    FilterDataLine,
    FilterProtocolError,
    FilterRegistration,
    FilterRequest,
    FilterResponse,
    FilterResult,
    InvalidFilterReply,
    LinkAuth,
    LinkConnect,
    LinkDisconnect,
    ProcReport,
    RegisterFilter,
    RegisterReady,
    RegisterReport,
    ReportLine,
    RequestTracker,
    Timeout,
    TxMail,
    TxRcpt,
    decode_filter_line,
    decode_smtpd_line,
    dot_stuff,
    dot_unstuff,
    encode_config,
    encode_connect_request,
    encode_data_line,
    encode_filter_dataline,
    encode_filter_request,
    encode_filter_result,
    encode_report,
    link_address,
    parse_version,
    stuffed_data_lines,
)

SID = 0xB49A69F0B40BCA0D
TOK = 0xF12DF0A9CE778607
TS = 1795550885.021745


# --- config -------------------------------------------------------------------------


def test_config_06_matches_smtpd_68_handshake() -> None:
    assert encode_config("0.6", smtpd_version="6.8.0p2", admd="vm") == [
        "config|smtpd-version|6.8.0p2",
        "config|smtp-session-timeout|300",
        "config|subsystem|smtp-in",
        "config|admd|vm",
        "config|ready",
    ]


def test_config_07_announces_protocol_after_smtpd_version() -> None:
    lines = encode_config("0.7", smtpd_version="7.8.0", admd="mx.example", session_timeout=120)
    assert lines[:3] == [
        "config|smtpd-version|7.8.0",
        "config|protocol|0.7",
        "config|smtp-session-timeout|120",
    ]
    assert lines[-1] == "config|ready"


def test_parse_version() -> None:
    assert parse_version("0.5") == "0.5"
    with pytest.raises(FilterProtocolError):
        parse_version("0.8")


# --- reports ------------------------------------------------------------------------


def test_report_link_connect_exact_line() -> None:
    event = LinkConnect("localhost", "pass", "127.0.0.1:48778", "127.0.0.1:11025")
    assert encode_report("0.6", TS, SID, event) == (
        "report|0.6|1795550885.021745|smtp-in|link-connect|b49a69f0b40bca0d"
        "|localhost|pass|127.0.0.1:48778|127.0.0.1:11025"
    )


def test_report_without_params_has_no_trailing_pipe() -> None:
    line = encode_report("0.6", TS, SID, LinkDisconnect())
    assert line == "report|0.6|1795550885.021745|smtp-in|link-disconnect|b49a69f0b40bca0d"
    assert encode_report("0.7", TS, SID, Timeout()).endswith("|timeout|b49a69f0b40bca0d")


@pytest.mark.parametrize(
    ("version", "tail"),
    [
        ("0.4", "c3b694fd|a|b@example.net|ok"),
        ("0.5", "c3b694fd|a|b@example.net|ok"),
        ("0.6", "c3b694fd|ok|a|b@example.net"),
        ("0.7", "c3b694fd|ok|a|b@example.net"),
    ],
)
def test_tx_mail_and_rcpt_field_order(version: str, tail: str) -> None:
    v = parse_version(version)
    mail = encode_report(v, TS, SID, TxMail(0xC3B694FD, "ok", "a|b@example.net"))
    rcpt = encode_report(v, TS, SID, TxRcpt(0xC3B694FD, "ok", "a|b@example.net"))
    assert mail.endswith("|tx-mail|b49a69f0b40bca0d|" + tail)
    assert rcpt.endswith("|tx-rcpt|b49a69f0b40bca0d|" + tail)
    # ...and the address with a pipe survives decoding in every layout
    decoded = decode_smtpd_line(mail)
    assert isinstance(decoded, ReportLine)
    assert decoded.event == TxMail(0xC3B694FD, "ok", "a|b@example.net")


@pytest.mark.parametrize(
    ("version", "tail"),
    [("0.6", "user|x|pass"), ("0.7", "pass|user|x")],
)
def test_link_auth_moved_fields_in_07(version: str, tail: str) -> None:
    v = parse_version(version)
    line = encode_report(v, TS, SID, LinkAuth(username="user|x", result="pass"))
    assert line.endswith("|link-auth|b49a69f0b40bca0d|" + tail)
    decoded = decode_smtpd_line(line)
    assert isinstance(decoded, ReportLine)
    assert decoded.event == LinkAuth(username="user|x", result="pass")


def test_filter_response_with_and_without_param() -> None:
    assert encode_report("0.6", TS, SID, FilterResponse("connected", "proceed")).endswith(
        "|filter-response|b49a69f0b40bca0d|connected|proceed"
    )
    rejected = FilterResponse("rcpt-to", "reject", "550 5.7.1 no | way")
    line = encode_report("0.6", TS, SID, rejected)
    assert line.endswith("|rcpt-to|reject|550 5.7.1 no | way")
    decoded = decode_smtpd_line(line)
    assert isinstance(decoded, ReportLine) and decoded.event == rejected


def test_response_phase_names() -> None:
    assert RESPONSE_PHASE_NAMES["connect"] == "connected"
    assert RESPONSE_PHASE_NAMES["starttls"] == "tls"
    assert RESPONSE_PHASE_NAMES["rcpt-to"] == "rcpt-to"


def test_newline_in_a_field_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_report("0.6", TS, SID, TxMail(1, "ok", "evil\nreport|x"))
    with pytest.raises(ValueError):
        encode_data_line("0.6", TS, SID, TOK, "two\nlines")


def test_link_address_brackets_ipv6() -> None:
    assert link_address("127.0.0.1", 25) == "127.0.0.1:25"
    assert link_address("2001:db8::1", 587) == "[2001:db8::1]:587"


# --- filter requests ------------------------------------------------------------------


def test_filter_requests() -> None:
    assert encode_connect_request("0.6", TS, SID, TOK, "<unknown>", "127.0.0.2") == (
        "filter|0.6|1795550885.021745|smtp-in|connect|b49a69f0b40bca0d|f12df0a9ce778607"
        "|<unknown>|127.0.0.2"
    )
    assert encode_filter_request("0.7", TS, SID, TOK, "data").endswith("|f12df0a9ce778607|")
    assert encode_filter_request("0.6", TS, SID, TOK, "ehlo", "client.test").endswith(
        "|ehlo|b49a69f0b40bca0d|f12df0a9ce778607|client.test"
    )
    assert encode_data_line("0.6", TS, SID, TOK, "last line|with a pipe").endswith(
        "|data-line|b49a69f0b40bca0d|f12df0a9ce778607|last line|with a pipe"
    )


@pytest.mark.parametrize("phase", ["connect", "data-line", "bogus"])
def test_filter_request_refuses_wrong_phase(phase: str) -> None:
    with pytest.raises(ValueError):
        encode_filter_request("0.6", TS, SID, TOK, phase)


def test_decode_connect_request() -> None:
    line = encode_connect_request("0.6", TS, SID, TOK, "localhost", "[2001:db8::1]")
    request = decode_smtpd_line(line)
    assert isinstance(request, FilterRequest)
    assert (request.phase, request.session, request.token) == ("connect", SID, TOK)
    assert (request.rdns, request.address) == ("localhost", "[2001:db8::1]")


# --- decoding filter output ---------------------------------------------------------


def test_register_lines() -> None:
    assert decode_filter_line("register|ready\n", "0.6") == RegisterReady()
    assert decode_filter_line("register|report|smtp-in|*", "0.6") == RegisterReport("smtp-in", "*")
    assert decode_filter_line("register|filter|SMTP-IN|rcpt-to", "0.6") == RegisterFilter(
        "smtp-in", "rcpt-to"
    )


@pytest.mark.parametrize(
    "line",
    [
        "register|report|smtp-in|link-nonsense",
        "register|filter|smtp-in|greeting",
        "register|filter|smtp-out|connect",
        "register|report|smtp-sideways|tx-begin",
        "register|report|smtp-in",
        "register|readyy",
        "register",
        "hello",
        "filter-results|b49a69f0b40bca0d|f12df0a9ce778607|proceed",
    ],
)
def test_garbage_is_a_protocol_error(line: str) -> None:
    with pytest.raises(FilterProtocolError):
        decode_filter_line(line, "0.6")


def test_filter_result_session_then_token_since_05() -> None:
    line = "filter-result|b49a69f0b40bca0d|f12df0a9ce778607|proceed"
    assert decode_filter_line(line, "0.5") == FilterResult(SID, TOK, Decision.PROCEED)
    # 0.4 filters put the token first
    assert decode_filter_line(line, "0.4") == FilterResult(TOK, SID, Decision.PROCEED)
    old = FilterResult(SID, TOK, Decision.JUNK)
    assert encode_filter_result("0.4", old) == (
        "filter-result|f12df0a9ce778607|b49a69f0b40bca0d|junk"
    )
    assert decode_filter_line(encode_filter_result("0.4", old), "0.4") == old


def test_filter_dataline_keeps_pipes_and_empty_lines() -> None:
    line = "filter-dataline|b49a69f0b40bca0d|f12df0a9ce778607|a|b||"
    assert decode_filter_line(line, "0.6") == FilterDataLine(SID, TOK, "a|b||")
    empty = decode_filter_line("filter-dataline|b49a69f0b40bca0d|f12df0a9ce778607|", "0.6")
    assert empty == FilterDataLine(SID, TOK, "")
    assert encode_filter_dataline("0.4", FilterDataLine(SID, TOK, "x")) == (
        "filter-dataline|f12df0a9ce778607|b49a69f0b40bca0d|x"
    )


@pytest.mark.parametrize(
    ("payload", "decision", "param"),
    [
        ("junk", Decision.JUNK, None),
        ("reject|550 5.7.1 rejected", Decision.REJECT, "550 5.7.1 rejected"),
        ("disconnect|421 4.7.0 go away", Decision.DISCONNECT, "421 4.7.0 go away"),
        ("rewrite|<rewritten@example.org>", Decision.REWRITE, "<rewritten@example.org>"),
        ("rewrite|", Decision.REWRITE, ""),
    ],
)
def test_filter_result_decisions(payload: str, decision: Decision, param: str | None) -> None:
    line = f"filter-result|b49a69f0b40bca0d|f12df0a9ce778607|{payload}"
    result = decode_filter_line(line, "0.6")
    assert result == FilterResult(SID, TOK, decision, param)
    assert isinstance(result, FilterResult)
    assert encode_filter_result("0.6", result) == line


@pytest.mark.parametrize(
    "payload",
    [
        "bogus",  # unknown decision without parameter ("Missing parameter" in smtpd)
        "bogus|x",  # unknown decision ("Invalid directive")
        "proceed|extra",
        "junk|extra",
        "reject",  # missing parameter
        "rewrite",
        "report|hello",  # only 0.7 knows it
        "",
    ],
)
def test_bad_filter_results(payload: str) -> None:
    with pytest.raises(FilterProtocolError):
        decode_filter_line(f"filter-result|b49a69f0b40bca0d|f12df0a9ce778607|{payload}", "0.6")


def test_report_decision_in_07() -> None:
    line = "filter-result|b49a69f0b40bca0d|f12df0a9ce778607|report|seen|twice"
    assert decode_filter_line(line, "0.7") == FilterResult(SID, TOK, Decision.REPORT, "seen|twice")


@pytest.mark.parametrize(
    "ids",
    [
        "xyz|f12df0a9ce778607",
        "b49a69f0b40bca0d|",
        "|f12df0a9ce778607",
        "b49a69f0b40bca0d0|f12df0a9ce778607",  # 17 digits: more than 64 bits
        "b49a69f0b40bca0d",
    ],
)
def test_bad_ids(ids: str) -> None:
    with pytest.raises(FilterProtocolError):
        decode_filter_line(f"filter-result|{ids}|proceed", "0.6")


@pytest.mark.parametrize(
    "reply", ["hello world", "250 2.0.0 ok", "55 short", "550", "550-multi", "5500 x", "550 "]
)
def test_reject_needs_a_4xx_or_5xx_reply(reply: str) -> None:
    line = f"filter-result|b49a69f0b40bca0d|f12df0a9ce778607|reject|{reply}"
    with pytest.raises(InvalidFilterReply) as caught:
        decode_filter_line(line, "0.6")
    # the decoded line travels with the error, so the caller can answer 421 as smtpd does
    assert caught.value.result == FilterResult(SID, TOK, Decision.REJECT, reply)
    assert isinstance(caught.value, FilterProtocolError)


def test_proc_report_line() -> None:
    line = "report|1795550947.621293|smtp-in|900f252a85b2e8ed|hello|from|logfilter"
    assert decode_filter_line(line, "0.6") == ProcReport(
        1795550947.621293, "smtp-in", 0x900F252A85B2E8ED, "hello|from|logfilter"
    )
    for bad in (
        "report|1795550947|smtp-in|900f252a85b2e8ed|m",
        "report|1795550947.621293|smtp-out|900f252a85b2e8ed|m",
        "report|1795550947.621293|smtp-in|900f252a85b2e8ed",
    ):
        with pytest.raises(FilterProtocolError):
            decode_filter_line(bad, "0.6")


# --- decoding what smtpd sends (for Python filters) -----------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "report|0.6|1795550885.021745|smtp-in|tx-begin|b49a69f0b40bca0d",
        "report|0.6|1795550885.021745|smtp-in|tx-begin|b49a69f0b40bca0d|c3b694fd|extra",
        "report|0.6|1795550885.021745|smtp-in|link-disconnect|b49a69f0b40bca0d|x",
        "report|0.6|1795550885.021745|smtp-in|tx-commit|b49a69f0b40bca0d|c3b694fd|big",
        "report|0.6|1795550885.021745|smtp-in|no-such-event|b49a69f0b40bca0d|x",
        "report|0.9|1795550885.021745|smtp-in|tx-begin|b49a69f0b40bca0d|c3b694fd",
        "report|0.6|1795550885|smtp-in|tx-begin|b49a69f0b40bca0d|c3b694fd",
        "filter|0.6|1795550885.021745|smtp-in|data|b49a69f0b40bca0d|f12df0a9ce778607",
        "filter|0.6|1795550885.021745|smtp-in|dance|b49a69f0b40bca0d|f12df0a9ce778607|",
        "smtpd|hello",
    ],
)
def test_bad_smtpd_lines(line: str) -> None:
    with pytest.raises(FilterProtocolError):
        decode_smtpd_line(line)


# --- registration ---------------------------------------------------------------------


def test_registration_accumulates_until_ready() -> None:
    registration = FilterRegistration()
    for line in (
        "register|report|smtp-in|link-connect",
        "register|report|smtp-out|*",
        "register|filter|smtp-in|rcpt-to",
    ):
        registration.feed(decode_filter_line(line, "0.6"))
    assert not registration.ready
    registration.feed(RegisterReady())
    assert registration.ready
    assert registration.wants_report("link-connect")
    assert not registration.wants_report("tx-begin")
    assert all(registration.wants_report(event, "smtp-out") for event in REPORT_EVENTS)
    assert registration.wants_phase("rcpt-to") and not registration.wants_phase("connect")


def test_registration_wildcard_and_sequence_errors() -> None:
    registration = FilterRegistration()
    registration.feed(RegisterReport("smtp-in", "*"))
    assert registration.reports == {("smtp-in", event) for event in REPORT_EVENTS}
    with pytest.raises(FilterProtocolError):
        registration.feed(FilterResult(SID, TOK, Decision.PROCEED))
    registration.feed(RegisterReady())
    with pytest.raises(FilterProtocolError):
        registration.feed(RegisterFilter("smtp-in", "data"))


# --- request tracking -----------------------------------------------------------------


def test_tracker_matches_answers_to_requests() -> None:
    tracker = RequestTracker()
    tracker.open_session(SID)
    tracker.sent(SID, TOK, "rcpt-to")
    assert tracker.pending(SID) == (TOK, "rcpt-to")
    assert tracker.received(FilterResult(SID, TOK, Decision.PROCEED)) == "rcpt-to"
    assert tracker.pending(SID) is None
    # the same answer again is not owed any more
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterResult(SID, TOK, Decision.PROCEED))


def test_tracker_unknown_token_and_late_answers() -> None:
    tracker = RequestTracker()
    tracker.open_session(SID)
    tracker.sent(SID, TOK, "helo")
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterResult(SID, TOK + 1, Decision.PROCEED))
    tracker.close_session(SID)
    # a session that went away: ignored, as smtpd does
    assert tracker.received(FilterResult(SID, TOK, Decision.PROCEED)) is None


def test_tracker_data_line_stream() -> None:
    tracker = RequestTracker()
    tracker.open_session(SID)
    tracker.sent(SID, TOK, "data-line")
    tracker.sent(SID, TOK, "data-line")
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterResult(SID, TOK, Decision.PROCEED))
    assert tracker.received(FilterDataLine(SID, TOK, "Subject: x")) == "data-line"
    assert tracker.received(FilterDataLine(SID, TOK, ".")) == "data-line"
    assert tracker.pending(SID) is None
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterDataLine(SID, TOK, "late"))


def test_tracker_phase_rules() -> None:
    tracker = RequestTracker()
    tracker.open_session(SID)
    tracker.sent(SID, TOK, "commit")
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterDataLine(SID, TOK, "x"))
    with pytest.raises(FilterProtocolError):
        tracker.received(FilterResult(SID, TOK, Decision.JUNK))
    with pytest.raises(ValueError):
        tracker.sent(SID, TOK + 1, "quit")  # one outstanding request per session
    with pytest.raises(ValueError):
        tracker.sent(SID + 1, TOK, "quit")  # never opened


# --- data lines -----------------------------------------------------------------------


def test_dot_stuffing() -> None:
    assert dot_stuff(".leading dot line") == "..leading dot line"
    assert dot_stuff("plain") == "plain"
    assert dot_unstuff("...two leading dots") == "..two leading dots"
    assert list(stuffed_data_lines(["a", ".b", ""])) == ["a", "..b", "", "."]


def test_data_line_output() -> None:
    output = DataLineOutput()
    assert not output.feed("X-Added: yes")
    assert not output.feed("..dot")
    assert output.feed(".")
    assert output.lines == ["X-Added: yes", "..dot"]
    assert output.unstuffed() == ["X-Added: yes", ".dot"]
    with pytest.raises(FilterProtocolError):
        output.feed("more")
