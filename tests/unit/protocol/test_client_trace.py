"""The client state machine's trace record (``conn.trace``): what ``pigeon trace mta`` shows of
the commands sent, with credentials masked and the body reduced to its size."""

from __future__ import annotations

import base64

from pigeon.protocol.client import (
    ClientConfig,
    ClientConnection,
    DataReady,
    RecipientSpec,
    Transaction,
)


def wire(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


class Traced:
    """A traced client; the server side scripted. Replies only come after the client handed
    out what they answer, as on a real connection."""

    def __init__(self, **config: object) -> None:
        config.setdefault("helo", "relay.test")
        self.conn = ClientConnection(ClientConfig(**config))  # type: ignore[arg-type]
        self.conn.trace = []
        self.written = b""

    def server(self, *lines: str) -> list[object]:
        self.written += self.conn.data_to_send()
        self.conn.receive_data(wire(*lines))
        events: list[object] = []
        while (event := self.conn.next_event()) is not None:
            events.append(event)
        return events

    def take(self) -> tuple[bytes, list[str]]:
        """What the client wrote since the last call, and the trace lines of it (then
        cleared, as the caller does once it logged them)."""
        trace = self.conn.trace
        assert trace is not None
        out, lines = self.written + self.conn.data_to_send(), list(trace)
        self.written = b""
        trace.clear()
        return out, lines


def test_a_transaction_is_traced_command_by_command_and_the_body_as_its_size() -> None:
    c = Traced()
    c.server("220 mx.test ESMTP")
    assert c.take() == (b"EHLO relay.test\r\n", ["EHLO relay.test"])
    c.server("250-mx.test", "250-PIPELINING", "250 DSN")
    txn = Transaction(
        "alice@example.test",
        [RecipientSpec("dave@sink.test", {"NOTIFY": "SUCCESS,FAILURE"})],
        {"RET": "HDRS"},
    )
    c.conn.start_transaction(txn)
    out, lines = c.take()
    assert lines == [
        "MAIL FROM:<alice@example.test> RET=HDRS",
        "RCPT TO:<dave@sink.test> NOTIFY=SUCCESS,FAILURE",
        "DATA",
    ]
    assert out.decode() == "".join(line + "\r\n" for line in lines)  # pipelined, one write
    events = c.server("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go ahead")
    assert any(isinstance(e, DataReady) for e in events)
    body = b"Subject: hi\n\n.dot\nsecret content\n"  # LFs become CRLF, the dot is doubled
    c.conn.send_body(body)
    out, lines = c.take()
    assert out.endswith(b"\r\n.\r\n")
    assert lines == [f"[...{len(out) - 3} bytes...]", "."]
    assert len(out) - 3 == len(body) + 5  # 4 CRs added, 1 dot doubled
    assert not any("secret" in line for line in lines)


def test_a_body_in_chunks_without_final_newline_counts_the_added_crlf() -> None:
    c = Traced(pipelining=False)
    c.server("220 mx.test ESMTP")
    c.server("250 mx.test")
    c.take()
    c.conn.start_transaction(Transaction("a@b.test", [RecipientSpec("c@d.test")]))
    assert c.take()[1] == ["MAIL FROM:<a@b.test>"]
    c.server("250 ok")
    assert c.take()[1] == ["RCPT TO:<c@d.test>"]
    c.server("250 ok")
    assert c.take()[1] == ["DATA"]
    assert any(isinstance(e, DataReady) for e in c.server("354 go"))
    c.conn.send_body_chunk(b"abc")
    c.conn.send_body_chunk(b"def")
    c.conn.end_body()
    out, lines = c.take()
    assert out == b"abcdef\r\n.\r\n"
    assert lines == ["[...8 bytes...]", "."]


def tls_session_with_auth(mechanisms: str) -> Traced:
    c = Traced(auth=("joe@example.test", "s3cret"))
    c.server("220 mx.test ESMTP")
    c.server("250-mx.test", "250 STARTTLS")
    c.server("220 go ahead")
    c.conn.tls_started()
    c.server("250-mx.test", f"250 AUTH {mechanisms}")
    return c


def test_auth_plain_is_traced_masked() -> None:
    c = tls_session_with_auth("PLAIN LOGIN")
    token = base64.b64encode(b"\0joe@example.test\0s3cret").decode()
    out, lines = c.take()
    assert out.endswith(f"AUTH PLAIN {token}\r\n".encode())  # the server gets the real one
    assert lines == ["EHLO relay.test", "STARTTLS", "EHLO relay.test", "AUTH PLAIN ********"]


def test_auth_login_continuation_lines_are_traced_masked() -> None:
    c = tls_session_with_auth("LOGIN")
    assert c.take()[1][-1] == "AUTH LOGIN"
    c.server("334 VXNlcm5hbWU6")
    out, lines = c.take()
    assert out == base64.b64encode(b"joe@example.test") + b"\r\n"
    assert lines == ["********"]
    c.server("334 UGFzc3dvcmQ6")
    out, lines = c.take()
    assert out == base64.b64encode(b"s3cret") + b"\r\n"
    assert lines == ["********"]


def test_the_quit_after_a_failure_and_the_rset_after_a_refusal_are_traced() -> None:
    c = Traced()
    c.server("554 go away")
    assert c.take() == (b"QUIT\r\n", ["QUIT"])
    c = Traced()
    c.server("220 mx.test ESMTP")
    c.server("250-mx.test", "250 PIPELINING")
    c.conn.start_transaction(Transaction("a@b.test", [RecipientSpec("c@d.test")]))
    c.take()
    c.written = c.conn.data_to_send()
    c.conn.receive_data(wire("550 no", "250 ok", "503 no valid recipients"))
    out, lines = c.take()
    assert out == b"RSET\r\n" and lines == ["RSET"]


def test_nothing_is_recorded_without_a_trace_list() -> None:
    conn = ClientConnection(ClientConfig(helo="relay.test"))
    conn.receive_data(wire("220 mx.test ESMTP"))
    assert conn.data_to_send() == b"EHLO relay.test\r\n"
    assert conn.trace is None
