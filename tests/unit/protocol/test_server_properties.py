"""Property tests: whatever the peer sends, in whatever pieces, the machine behaves."""

from __future__ import annotations

import base64
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pigeon.protocol.replies import Reply
from pigeon.protocol.server import (
    ConnectionLost,
    DataBegin,
    DataChunk,
    Event,
    MessageEnd,
    MessageRejected,
    ServerConfig,
    ServerConnection,
    StartTLS,
)

CONFIGS = [
    ServerConfig(hostname="mx.test"),
    ServerConfig(
        hostname="mx.test",
        max_message_size=200,
        max_rcpt=2,
        max_mails=2,
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_requires_tls=False,
        max_command_length=100,
        max_line_length=50,
    ),
]

ANSWERS = [
    None,
    Reply(550, "No", "5.7.1"),
    Reply(451, "Later", "4.3.0"),
    Reply(421, "Bye", "4.3.0"),
]


class Run:
    """Drive one connection, check per-event invariants, record events and output."""

    def __init__(self, config: ServerConfig, answers: list[int]) -> None:
        self.conn = ServerConnection(config, peer="192.0.2.1")
        self.conn.greeting()
        self.answers = answers or [0]
        self.answered = 0
        self.events: list[Event] = []
        self.out = bytearray(self.conn.data_to_send())
        self.fed = 0
        self.in_data = False
        self.chunk_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self.fed += len(chunk)
        self.conn.receive_data(chunk)
        for _ in range(10_000):
            event = self.conn.next_event()
            if event is None:
                break
            self.check(event)
            if self.conn.awaiting_answer is not None:
                self.answer(event)
        else:
            raise AssertionError("next_event() never ran dry")
        self.out += self.conn.data_to_send()

    def check(self, event: Event) -> None:
        if self.events and isinstance(self.events[-1], ConnectionLost):
            raise AssertionError(f"{event!r} after ConnectionLost")
        self.events.append(event)
        if isinstance(event, DataChunk):
            assert self.in_data
            self.chunk_bytes += len(event.data)
            assert self.chunk_bytes <= self.fed
            assert event.data.endswith(b"\r\n")
        if isinstance(event, MessageEnd | MessageRejected):
            assert self.in_data, "two message ends for one DATA"
            self.in_data = False

    def answer(self, event: Event) -> None:
        choice = ANSWERS[self.answers[self.answered % len(self.answers)]]
        self.answered += 1
        if choice is None:
            self.conn.accept()
            if isinstance(event, DataBegin):
                self.in_data = True
            # An accepted STARTTLS is never followed by tls_started(): the rest of the
            # input is then plaintext after STARTTLS and must be discarded.
        else:
            self.conn.reject(choice)


def play(config: ServerConfig, data: bytes, cuts: list[int], answers: list[int]) -> Run:
    run = Run(config, answers)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        run.feed(data[start:end])
    run.feed(b"")
    assert isinstance(run.events[-1], ConnectionLost)
    assert run.conn.closed
    return run


def merged(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def check_split_invariance(
    config: ServerConfig, data: bytes, cuts: list[int], answers: list[int]
) -> None:
    whole = play(config, data, [], answers)
    split = play(config, data, cuts, answers)
    bytewise = play(config, data, list(range(len(data))), answers) if len(data) < 400 else split
    assert split.out == whole.out == bytewise.out
    assert merged(split.events) == merged(whole.events) == merged(bytewise.events)


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


LINES = st.sampled_from(
    [
        b"EHLO client.test",
        b"HELO client.test",
        b"ehlo [192.0.2.9]",
        b"MAIL FROM:<a@b.test>",
        b"MAIL FROM:<> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x+2B",
        b"mail from:<a@b.test> SMTPUTF8",
        b"MAIL FROM:<bad",
        b"MAIL FROM:<a@b.test> SIZE=999999999999",
        b"RCPT TO:<c@d.test>",
        b"RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.test",
        b"RCPT TO:<postmaster>",
        b"RCPT TO:<>",
        b"DATA",
        b"Subject: x",
        b"",
        b".",
        b"..",
        b"..stuffed",
        b"x" * 60,
        b"y" * 120,
        b"RSET",
        b"NOOP",
        b"HELP",
        b"VRFY root",
        b"QUIT",
        b"STARTTLS",
        b"AUTH PLAIN",
        b"AUTH PLAIN " + b64(b"\0user\0pass"),
        b"AUTH LOGIN",
        b64(b"\0user\0pass"),
        b64(b"user"),
        b"*",
        b"\x00\xff garbage",
    ]
)
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
FRAGMENTS = st.sampled_from([b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\x00"])

PIECE = st.one_of(st.tuples(LINES, ENDINGS).map(lambda t: t[0] + t[1]), FRAGMENTS)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    pieces=st.lists(PIECE, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    answers=st.lists(st.integers(min_value=0, max_value=len(ANSWERS) - 1), max_size=8),
)
def test_command_sequences(
    config: ServerConfig, pieces: list[bytes], cuts: list[int], answers: list[int]
) -> None:
    check_split_invariance(config, b"".join(pieces), cuts, answers)


@settings(max_examples=200, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    answers=st.lists(st.integers(min_value=0, max_value=len(ANSWERS) - 1), max_size=8),
)
def test_random_bytes(
    config: ServerConfig, data: bytes, cuts: list[int], answers: list[int]
) -> None:
    check_split_invariance(config, data, cuts, answers)


@settings(max_examples=200, deadline=None)
@given(
    body=st.lists(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"\x00", b"\r\n.\r", b"\r\n..\r\n"]),
        ),
        max_size=30,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_message_bodies_end_only_at_crlf_dot_crlf(body: list[bytes], cuts: list[int]) -> None:
    opening = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
    data = b"".join(body)
    run = play(CONFIGS[0], opening + data + b"\r\n.\r\nNOOP\r\n", cuts, [0])
    ends = [e for e in run.events if isinstance(e, MessageEnd | MessageRejected)]
    assert len(ends) == 1
    # The independent oracle: the message is everything up to the first "<CRLF>.<CRLF>"
    # (the CRLF of the DATA line counts as the first CRLF).
    wire = b"\r\n" + data + b"\r\n.\r\n"
    first_end = wire.find(b"\r\n.\r\n")
    content = wire[2 : first_end + 2]
    unpaired = content.replace(b"\r\n", b"")
    clean = b"\r" not in unpaired and b"\n" not in unpaired and b"\x00" not in unpaired
    if clean:
        assert isinstance(ends[0], MessageEnd)
        lines = content.split(b"\r\n")[:-1]
        expected = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        got = b"".join(e.data for e in run.events if isinstance(e, DataChunk))
        assert got == expected
    else:
        assert isinstance(ends[0], MessageRejected)
    if first_end == len(wire) - 5:  # no real end inside the body: nothing was smuggled
        kinds = [type(e) for e in run.events]
        after_data = kinds[kinds.index(DataBegin) + 1 :]
        assert set(after_data) <= {DataChunk, MessageEnd, MessageRejected, ConnectionLost}
        replies = bytes(run.out).split(b"354 ", 1)[1].split(b"\r\n")[1:-1]
        assert len(replies) == 2 and replies[1] == b"250 2.0.0 Ok"


def test_starttls_accepted_then_everything_discarded() -> None:
    data = b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.test>\r\n"
    run = play(CONFIGS[1], data, [3, 9, 20], [0])
    assert [type(e) for e in run.events][-2:] == [StartTLS, ConnectionLost]
