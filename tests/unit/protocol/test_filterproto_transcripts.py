"""Replay the captured OpenSMTPD 6.8 (protocol 0.6) filter sessions.

Every line smtpd sent must be reproduced exactly by our encoders, every line a real
filter sent must decode (or fail the way smtpd failed), and the request tracker must
accept the real request/answer interleaving.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pigeon.protocol.filterproto import (
    ConfigLine,
    Decision,
    FilterDataLine,
    FilterMessage,
    FilterProtocolError,
    FilterRegistration,
    FilterRequest,
    FilterResponse,
    FilterResult,
    InvalidFilterReply,
    LinkConnect,
    LinkDisconnect,
    LinkGreeting,
    LinkIdentify,
    ProcReport,
    ProtocolClient,
    ProtocolServer,
    RegisterFilter,
    RegisterReady,
    RegisterReport,
    ReportEvent,
    ReportLine,
    RequestTracker,
    TxBegin,
    TxCommit,
    TxData,
    TxEnvelope,
    TxMail,
    TxRcpt,
    TxReset,
    decode_filter_line,
    decode_smtpd_line,
    encode_config,
    encode_connect_request,
    encode_data_line,
    encode_filter_dataline,
    encode_filter_request,
    encode_filter_result,
    encode_register,
    encode_report,
)

# Copies of the captures from the design specs, kept in the repository.
TRANSCRIPTS = Path(__file__).resolve().parents[2] / "data" / "design" / "transcripts"

LOGFILTER_FILES = [
    "filter-handshake.txt",
    "filter-session-full.txt",
    "filter-session-reject-rset.txt",
    "filter-session-abrupt.txt",
    "filter-active-decisions.txt",
    "filter-misbehaviour.txt",
]
TIMED_FILES = ["senderscore-session.txt", "dkimsign-session.txt"]
TIMED_LINE = re.compile(r"^\s*[0-9.]+ (S>F|F>S) (.*)$")

Exchange = list[tuple[str, str]]  # ("<" smtpd -> filter | ">" filter -> smtpd, line)


def load(name: str) -> Exchange:
    """The protocol lines of a capture, in order, exactly as they were on the wire."""
    lines: Exchange = []
    for raw in (TRANSCRIPTS / name).read_text().split("\n"):
        if name in TIMED_FILES:
            match = TIMED_LINE.match(raw)
            if match:
                lines.append(("<" if match[1] == "S>F" else ">", match[2]))
        elif raw.startswith(("< ", "> ")):
            lines.append((raw[0], raw[2:]))
    return lines


def split_dkimsign(exchange: Exchange) -> list[Exchange]:
    """dkimsign-session.txt holds two filters' transcripts; each restarts at config."""
    parts: list[Exchange] = []
    for direction, line in exchange:
        if line.startswith("config|smtpd-version|"):
            parts.append([])
        parts[-1].append((direction, line))
    return parts


ALL_FILES = LOGFILTER_FILES + TIMED_FILES


def test_every_capture_has_lines() -> None:
    for name in ALL_FILES:
        assert len(load(name)) > 5, name


# --- smtpd -> filter: our encoders produce the captured bytes ----------------------------


def reencode(message: ReportLine | FilterRequest) -> str:
    if isinstance(message, ReportLine):
        return encode_report(message.version, message.timestamp, message.session, message.event)
    args = (message.version, message.timestamp, message.session, message.token)
    if message.phase == "connect":
        return encode_connect_request(*args, message.rdns, message.address)
    if message.phase == "data-line":
        return encode_data_line(*args, message.param)
    return encode_filter_request(*args, message.phase, message.param)


@pytest.mark.parametrize("name", [n for n in ALL_FILES if n != "filter-handshake.txt"])
def test_smtpd_lines_reencode_identically(name: str) -> None:
    count = 0
    for direction, line in load(name):
        if direction != "<":
            continue
        message = decode_smtpd_line(line)
        if isinstance(message, ConfigLine):
            continue  # checked as a block below
        assert reencode(message) == line
        count += 1
    assert count > 0


@pytest.mark.parametrize("name", ["filter-handshake.txt", *TIMED_FILES])
def test_config_block_matches(name: str) -> None:
    sent = [line for direction, line in load(name) if line.startswith("config|")]
    expected = encode_config("0.6", smtpd_version="6.8.0p2", admd="vm")
    copies = len(sent) // len(expected)
    assert copies >= 1 and sent == expected * copies


# The session of filter-session-full.txt, written down from its client side (swaks).
# Each entry becomes one smtpd -> filter line; timestamps, session id and tokens are the
# only things taken from the capture.
MSGID = 0xC3B694FD
FULL_SESSION: list[ReportEvent | tuple[str, ...]] = [
    LinkConnect("localhost", "pass", "127.0.0.1:48778", "127.0.0.1:11025"),
    ("connect", "localhost", "127.0.0.1"),
    FilterResponse("connected", "proceed"),
    ProtocolServer("220 mx.test.local ESMTP OpenSMTPD"),
    LinkGreeting("mx.test.local"),
    ProtocolClient("EHLO client.test"),
    ("ehlo", "client.test"),
    FilterResponse("ehlo", "proceed"),
    LinkIdentify("EHLO", "client.test"),
    ProtocolServer("250-mx.test.local Hello client.test [127.0.0.1], pleased to meet you"),
    ProtocolServer("250-8BITMIME"),
    ProtocolServer("250-ENHANCEDSTATUSCODES"),
    ProtocolServer("250-SIZE 36700160"),
    ProtocolServer("250-DSN"),
    ProtocolServer("250 HELP"),
    ProtocolClient("MAIL FROM:<sender@example.net>"),
    ("mail-from", "sender@example.net"),
    FilterResponse("mail-from", "proceed"),
    ProtocolServer("250 2.0.0 Ok"),
    TxBegin(MSGID),
    TxMail(MSGID, "ok", "sender@example.net"),
    ProtocolClient("RCPT TO:<alice@example.org>"),
    ("rcpt-to", "alice@example.org"),
    FilterResponse("rcpt-to", "proceed"),
    TxEnvelope(MSGID, 0xC3B694FD3DFB4553),
    ProtocolServer("250 2.1.5 Destination address valid: Recipient ok"),
    TxRcpt(MSGID, "ok", "alice@example.org"),
    ProtocolClient("RCPT TO:<bob@example.org>"),
    ("rcpt-to", "bob@example.org"),
    FilterResponse("rcpt-to", "proceed"),
    TxEnvelope(MSGID, 0xC3B694FD80092A85),
    ProtocolServer("250 2.1.5 Destination address valid: Recipient ok"),
    TxRcpt(MSGID, "ok", "bob@example.org"),
    ProtocolClient("DATA"),
    ("data", ""),
    FilterResponse("data", "proceed"),
    ("data-line", "Received: from client.test (localhost [127.0.0.1])"),
    ("data-line", "\tby mx.test.local (OpenSMTPD) with ESMTP id c3b694fd;"),
    ("data-line", "\tTue, 24 Nov 2026 20:08:05 +0000 (UTC)"),
    ProtocolServer('354 Enter mail, end with "." on a line by itself'),
    TxData(MSGID, "ok"),
    ("data-line", "Subject: filter test 1"),
    ("data-line", "From: sender@example.net"),
    ("data-line", "To: a@example.org"),
    ("data-line", ""),
    ("data-line", "line one"),
    ("data-line", "..leading dot line"),
    ("data-line", "...two leading dots"),
    ("data-line", ""),
    ("data-line", "last line|with a pipe"),
    ("data-line", ""),
    ("data-line", "."),
    ProtocolClient("."),
    ("commit", ""),
    FilterResponse("commit", "proceed"),
    ProtocolServer("250 2.0.0 c3b694fd Message accepted for delivery"),
    TxCommit(MSGID, 514),
    TxReset(MSGID),
    ProtocolClient("QUIT"),
    FilterResponse("quit", "proceed"),
    ProtocolServer("221 2.0.0 Bye"),
    LinkDisconnect(),
]


def test_full_session_encodes_to_the_capture() -> None:
    captured = [line for direction, line in load("filter-session-full.txt") if direction == "<"]
    assert len(captured) == len(FULL_SESSION)
    for step, line in zip(FULL_SESSION, captured, strict=True):
        fields = line.split("|")
        timestamp, session = float(fields[2]), int(fields[5], 16)
        if isinstance(step, ReportEvent):
            assert encode_report("0.6", timestamp, session, step) == line
            continue
        token = int(fields[6], 16)
        phase, *params = step
        if phase == "connect":
            ours = encode_connect_request("0.6", timestamp, session, token, *params)
        elif phase == "data-line":
            ours = encode_data_line("0.6", timestamp, session, token, params[0])
        else:
            ours = encode_filter_request("0.6", timestamp, session, token, phase, params[0])
        assert ours == line


def test_decoded_fields_have_the_right_meaning() -> None:
    lines = [line for direction, line in load("filter-active-decisions.txt") if direction == "<"]
    events = [m.event for m in map(decode_smtpd_line, lines) if isinstance(m, ReportLine)]
    assert TxRcpt(0x10396AE0, "permfail", "reject@example.org") in events
    assert FilterResponse("rcpt-to", "rewrite", "<rewritten@example.org>") in events
    assert FilterResponse("connected", "junk") in events
    assert LinkConnect("<unknown>", "fail", "127.0.0.2:33131", "127.0.0.1:11025") in events


# --- filter -> smtpd: every captured answer decodes -------------------------------------


def reencode_filter(message: FilterMessage) -> str:
    if isinstance(message, FilterResult):
        return encode_filter_result("0.6", message)
    if isinstance(message, FilterDataLine):
        return encode_filter_dataline("0.6", message)
    assert isinstance(message, RegisterReport | RegisterFilter | RegisterReady)
    return encode_register(message)


# What smtpd 6.8 did with the deliberately bad lines of filter-misbehaviour.txt.
MISBEHAVIOUR = {
    "filter-result|60119e1d102a74d7|fa32db838b5a5636|reject|hello world": InvalidFilterReply,
    "filter-result|60119e1e07691f0f|fa32db838b5a5636|bogus": FilterProtocolError,
}


@pytest.mark.parametrize("name", ALL_FILES)
def test_filter_lines_decode(name: str) -> None:
    count = 0
    for direction, line in load(name):
        if direction != ">":
            continue
        if line in MISBEHAVIOUR:
            with pytest.raises(MISBEHAVIOUR[line]):
                decode_filter_line(line, "0.6")
            continue
        message = decode_filter_line(line, "0.6")
        count += 1
        if isinstance(message, ProcReport):
            assert message.message == "hello-from-logfilter"
            continue
        assert reencode_filter(message) == line
    assert count > 0


def test_handshake_registration() -> None:
    registration = FilterRegistration()
    for direction, line in load("filter-handshake.txt"):
        if direction == ">":
            registration.feed(decode_filter_line(line, "0.6"))
    assert registration.ready
    assert len(registration.reports) == 19
    assert registration.phases == {
        "connect", "helo", "ehlo", "starttls", "auth",
        "mail-from", "rcpt-to", "data", "data-line", "commit",
    }  # fmt: skip


@pytest.mark.parametrize("name", TIMED_FILES)
def test_real_filters_register(name: str) -> None:
    exchanges = split_dkimsign(load(name)) if name == "dkimsign-session.txt" else [load(name)]
    for exchange in exchanges:
        registration = FilterRegistration()
        for direction, line in exchange:
            if direction == ">" and not registration.ready:
                registration.feed(decode_filter_line(line, "0.6"))
        assert registration.ready
        assert registration.wants_phase("data-line") and registration.wants_phase("commit")


# --- the real interleaving passes the request tracker -----------------------------------


def replay_tracker(exchange: Exchange) -> list[str]:
    tracker = RequestTracker()
    answered: list[str] = []
    for direction, line in exchange:
        if direction == "<":
            message = decode_smtpd_line(line)
            if isinstance(message, FilterRequest):
                tracker.open_session(message.session)
                tracker.sent(message.session, message.token, message.phase)
            elif isinstance(message, ReportLine) and isinstance(message.event, LinkDisconnect):
                tracker.close_session(message.session)
            continue
        answer = decode_filter_line(line, "0.6")
        if isinstance(answer, FilterResult | FilterDataLine):
            phase = tracker.received(answer)
            assert phase is not None, line
            answered.append(phase)
    return answered


@pytest.mark.parametrize("name", [n for n in ALL_FILES if n != "filter-misbehaviour.txt"])
def test_tracker_accepts_real_sessions(name: str) -> None:
    exchanges = split_dkimsign(load(name)) if name == "dkimsign-session.txt" else [load(name)]
    for exchange in exchanges:
        replay_tracker(exchange)


def test_tracker_counts_in_senderscore() -> None:
    answered = replay_tracker(load("senderscore-session.txt"))
    # score=40 is refused at connect: one decision, no data-lines
    assert answered.count("connect") == 4
    assert answered.count("commit") == 3
    junked = [
        decode_filter_line(line, "0.6")
        for direction, line in load("senderscore-session.txt")
        if direction == ">" and line.endswith("|junk")
    ]
    assert [r.decision for r in junked if isinstance(r, FilterResult)] == [Decision.JUNK]
