"""SMTP client wire details: reply parsing, dot-stuffing, and property tests on random input."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol.client import (
    ClientConfig,
    ClientConnection,
    Closed,
    DataReady,
    DeliveryResult,
    Event,
    Extensions,
    MailRejected,
    NeedStartTLS,
    Ready,
    RecipientResult,
    RecipientSpec,
    SessionFailed,
    Transaction,
    TransactionResult,
    _BadReply,
    _BodyEncoder,
    _ReplyParser,
)
from pigeon.protocol.replies import Reply

# ---- reply parser ------------------------------------------------------------------------------


def parse_all(data: bytes) -> list[Reply]:
    parser = _ReplyParser()
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def test_parser_multiline_with_enhanced_codes_on_every_line() -> None:
    data = b"550-5.1.1 The email account does not exist.\r\n550 5.1.1 Try again.\r\n"
    assert parse_all(data) == [Reply(550, "The email account does not exist.\nTry again.", "5.1.1")]


def test_parser_enhanced_code_of_another_class_stays_text() -> None:
    assert parse_all(b"250 5.1.1 odd\r\n") == [Reply(250, "5.1.1 odd")]


def test_parser_bare_code_and_empty_texts() -> None:
    assert parse_all(b"250\r\n250-\r\n250 \r\n") == [Reply(250, ""), Reply(250, "\n")]


def test_parser_keeps_partial_lines_for_later() -> None:
    parser = _ReplyParser()
    parser.feed(b"250-first\r\n250 sec")
    assert parser.next_reply() is None and parser.has_data
    parser.feed(b"ond\r\n")
    assert parser.next_reply() == Reply(250, "first\nsecond")
    assert not parser.has_data


def test_parser_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse_all(b"250 caf\xe9\r\n") == [Reply(250, "caf\ufffd")]


_ENHANCED_LIKE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}( |$)")
reply_text_line = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=40
).filter(lambda line: not _ENHANCED_LIKE.match(line))


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 599))
    lines = draw(st.lists(reply_text_line, min_size=1, max_size=5))
    enhanced = None
    if code // 100 != 3 and draw(st.booleans()):  # RFC 3463 has no class 3
        enhanced = f"{code // 100}.{draw(st.integers(0, 9))}.{draw(st.integers(0, 999))}"
    return Reply(code, "\n".join(lines), enhanced)


@given(st.lists(replies(), min_size=1, max_size=5), st.data())
@settings(max_examples=200, deadline=None)
def test_parser_round_trips_formatted_replies(original: list[Reply], data: st.DataObject) -> None:
    wire = b"".join(reply.to_bytes() for reply in original)
    cut = data.draw(st.integers(0, len(wire)))
    parser = _ReplyParser()
    parsed = []
    for part in (wire[:cut], wire[cut:]):
        parser.feed(part)
        while (reply := parser.next_reply()) is not None:
            parsed.append(reply)
    assert parsed == original


# ---- body encoding -----------------------------------------------------------------------------


def encode(*chunks: bytes) -> bytes:
    encoder = _BodyEncoder()
    return b"".join(encoder.encode(chunk) for chunk in chunks) + encoder.finish()


def test_dot_stuffing() -> None:
    body = b".hidden\r\n..two\r\n.\r\nnot.start\r\n"
    assert encode(body) == b"..hidden\r\n...two\r\n..\r\nnot.start\r\n.\r\n"


def test_missing_final_crlf_is_added() -> None:
    assert encode(b"no newline") == b"no newline\r\n.\r\n"
    assert encode(b"") == b".\r\n"
    assert encode(b"line\r\n") == b"line\r\n.\r\n"


def test_bare_lf_becomes_crlf() -> None:
    assert encode(b"a\nb\n.c\n") == b"a\r\nb\r\n..c\r\n.\r\n"


def test_chunk_boundaries_do_not_break_stuffing_or_crlf() -> None:
    assert encode(b"a\r", b"\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert encode(b"a\r\n", b".b", b".c\r\n") == b"a\r\n..b.c\r\n.\r\n"
    assert encode(b"a\r") == b"a\r\n.\r\n"
    assert encode(b"a\rb") == b"a\rb\r\n.\r\n"  # a bare CR inside a line is left alone


def reference_lines(body: bytes) -> list[bytes]:
    """What the server must see after removing the stuffing: CRLF lines, final CRLF added."""
    body = re.sub(rb"\r?\n", b"\r\n", body)
    if body.endswith(b"\r"):
        body += b"\n"
    elif body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body.split(b"\r\n")[:-1] if body else []


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
@settings(max_examples=300, deadline=None)
def test_encoded_body_unstuffs_to_the_original(body: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    out = encode(*chunks)
    assert out.endswith(b".\r\n")
    assert out.count(b"\n") == out.count(b"\r\n")  # every line ends in CRLF
    lines = out[:-3].split(b"\r\n")
    assert lines.pop() == b""  # the data part ends with CRLF
    assert b"." not in lines  # no line could end DATA early
    assert [line[1:] if line.startswith(b".") else line for line in lines] == reference_lines(body)


# ---- random server input never raises ----------------------------------------------------------

EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250-DSN\r\n250 STARTTLS\r\n"


def drain(conn: ClientConnection) -> list[Event]:
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


@given(
    st.sampled_from(["fresh", "ready", "in-transaction", "body-due", "lmtp-body-sent"]),
    st.lists(st.binary(max_size=80), max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(stage: str, chunks: list[bytes]) -> None:
    lmtp = stage.startswith("lmtp")
    conn = ClientConnection(ClientConfig("relay.test", lmtp=lmtp, want_starttls=False))
    if stage != "fresh":
        conn.receive_data(b"220 mx.test\r\n")
        conn.data_to_send()
        conn.receive_data(EHLO)
        if stage != "ready":
            conn.start_transaction(Transaction("a@b", [RecipientSpec("c@d"), RecipientSpec("e@f")]))
            conn.data_to_send()
        if stage in ("body-due", "lmtp-body-sent"):
            conn.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        if stage == "lmtp-body-sent":
            conn.send_body(b"x\r\n")
    drain(conn)
    conn.data_to_send()
    for chunk in chunks:
        conn.receive_data(chunk)
    conn.receive_data(b"")  # and then the server hangs up
    events = drain(conn)
    assert all(not isinstance(e, Ready | NeedStartTLS) or stage == "fresh" for e in events)
    ends = [i for i, e in enumerate(events) if isinstance(e, SessionFailed | Closed)]
    assert ends == [len(events) - 1]  # exactly one end, and nothing after it
    assert conn.finished


REPLY_CODES = [220, 221, 235, 250, 251, 334, 354, 421, 450, 451, 452, 454, 500, 503, 535, 550, 554]


@st.composite
def reply_streams(draw: st.DrawFn) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(1, 40))):
        # Mostly 250 (which every stage takes as "go on"), so sessions get deep into
        # transactions; sometimes any common code; rarely anything at all.
        pick = draw(st.integers(0, 19))
        if pick == 0:
            code = draw(st.integers(100, 699))
        elif pick <= 6:
            code = draw(st.sampled_from(REPLY_CODES))
        else:
            code = 250
        extra = draw(st.lists(st.sampled_from(["PIPELINING", "DSN", "STARTTLS", "AUTH PLAIN"])))
        lines = [f"{code}-{word}" for word in extra] + [f"{code} text"]
        out.append("".join(line + "\r\n" for line in lines).encode())
    if draw(st.booleans()):
        out.append(draw(st.binary(max_size=20)))  # and maybe some junk at the end
    return out


@given(
    reply_streams(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_scripted_sessions_keep_their_promises(
    stream: list[bytes], lmtp: bool, pipelining: bool, with_auth: bool, require_tls: bool
) -> None:
    """A caller that reacts to every event: whatever the server says, nothing raises, the
    session ends once, and every recipient is decided at most once (and only if accepted)."""
    config = ClientConfig(
        "relay.test",
        lmtp=lmtp,
        pipelining=pipelining,
        auth=("u", "p") if with_auth and not lmtp else None,
        require_tls=require_tls and not lmtp,
    )
    conn = ClientConnection(config)
    transactions_left = 3
    accepted: set[int] = set()
    decided: set[int] = set()
    terminal_seen = True
    ended = False

    def react(event: Event) -> None:
        nonlocal transactions_left, terminal_seen, ended
        assert not ended, "event after the end of the session"
        if isinstance(event, SessionFailed | Closed):
            ended = True
        elif isinstance(event, NeedStartTLS):
            conn.tls_started()
        elif isinstance(event, DataReady):
            conn.send_body(b".x\r\n")
        elif isinstance(event, RecipientResult):
            assert event.index not in decided
            if event.reply.positive:
                accepted.add(event.index)
            else:
                decided.add(event.index)
        elif isinstance(event, DeliveryResult):
            assert event.index in accepted and event.index not in decided
            decided.add(event.index)
        elif isinstance(event, MailRejected | TransactionResult):
            assert not terminal_seen
            terminal_seen = True
        session_idle = isinstance(event, Ready | MailRejected | TransactionResult)
        if session_idle and conn.can_start_transaction:
            if transactions_left:
                transactions_left -= 1
                accepted.clear()
                decided.clear()
                terminal_seen = False
                rcpts = [RecipientSpec(f"r{i}@x", {"NOTIFY": "NEVER"}) for i in range(3)]
                conn.start_transaction(Transaction("s@x", rcpts, {"RET": "HDRS"}))
            else:
                conn.quit()

    for chunk in [*stream, b""]:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not None:
            react(event)
        conn.data_to_send()  # written before the server's next chunk
    assert ended and conn.finished


def test_extensions_from_ehlo() -> None:
    ext = Extensions.from_ehlo(
        Reply(250, "mx.test greets you\nsize\nAUTH LOGIN\nAUTH=PLAIN\nsmtputf8\n8bitmime")
    )
    assert ext.size == 0  # SIZE without a number: no announced limit
    assert ext.auth_mechanisms == {"LOGIN", "PLAIN"}
    assert ext.smtputf8 and ext.eightbitmime and "SmtpUtf8" in ext
    assert not ext.dsn and "MX.TEST" not in ext  # the greeting line is not an extension
    assert Extensions.from_ehlo(Reply(250, "mx\nSIZE 12x")).size == 0


# ---- shared replies: the parser reuses objects of repeated single-line replies ----------


def test_a_repeated_line_gives_the_same_reply() -> None:
    first = parse_all(b"250 2.1.0 Sender ok\r\n")
    again = parse_all(b"250 2.1.0 Sender ok\n250 2.1.0 Sender ok\r\n")
    assert first == [Reply(250, "Sender ok", "2.1.0")]
    assert again == first * 2


def test_a_known_line_ending_a_multiline_reply_is_not_taken_alone() -> None:
    assert parse_all(b"250 done\r\n") == [Reply(250, "done")]
    assert parse_all(b"250-first\r\n250 done\r\n") == [Reply(250, "first\ndone")]


def test_a_known_line_after_a_line_of_another_code_is_still_refused() -> None:
    parse_all(b"250 done\r\n")
    with pytest.raises(_BadReply):
        parse_all(b"550-no\r\n250 done\r\n")


def test_lines_split_across_reads_and_mixed_endings() -> None:
    parser = _ReplyParser()
    out = []
    for piece in (b"25", b"0 2.0.0 Ok\r", b"\n354 go\n2", b"50 2.0.0 Ok\r\n"):
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    assert out == [Reply(250, "Ok", "2.0.0"), Reply(354, "go"), Reply(250, "Ok", "2.0.0")]
    assert not parser.has_data
