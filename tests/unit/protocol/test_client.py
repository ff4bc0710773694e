"""SMTP/LMTP client state machine: handshake, STARTTLS, AUTH, session failures (bytes in/out)."""

from __future__ import annotations

import base64

import pytest

from pigeon.protocol.client import (
    ClientConfig,
    ClientConnection,
    ClientProtocolError,
    Closed,
    Event,
    NeedStartTLS,
    Ready,
    RecipientSpec,
    SessionFailed,
    Transaction,
)
from pigeon.protocol.replies import Reply

EHLO_PLAIN = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250-DSN", "250 SIZE 10240000"]
EHLO_TLS = ["250-mx.test", "250-PIPELINING", "250-STARTTLS", "250 8BITMIME"]


def wire(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


class Session:
    """A client under test, with the server side scripted line by line."""

    def __init__(self, **config: object) -> None:
        config.setdefault("helo", "relay.test")
        self.conn = ClientConnection(ClientConfig(**config))  # type: ignore[arg-type]
        self.written = b""

    def server(self, *lines: str) -> list[Event]:
        return self.server_bytes(wire(*lines))

    def server_bytes(self, data: bytes) -> list[Event]:
        # The server answers only what the client wrote: put the client's output on the wire.
        self.written += self.conn.data_to_send()
        self.conn.receive_data(data)
        return self.events()

    def events(self) -> list[Event]:
        out = []
        while (event := self.conn.next_event()) is not None:
            out.append(event)
        return out

    def sent(self) -> str:
        """What the client wrote since the last call."""
        out = self.written + self.conn.data_to_send()
        self.written = b""
        return out.decode()


def only(events: list[Event], kind: type) -> object:
    assert len(events) == 1 and isinstance(events[0], kind), events
    return events[0]


# ---- greeting and EHLO -------------------------------------------------------------------------


def test_greeting_then_ehlo_then_ready_with_extensions() -> None:
    s = Session()
    assert s.sent() == ""  # the server speaks first
    assert s.server("220 sink.test ESMTP") == []
    assert s.sent() == "EHLO relay.test\r\n"
    ready = only(s.server(*EHLO_PLAIN), Ready)
    assert isinstance(ready, Ready)
    assert ready.esmtp and not ready.tls
    ext = ready.extensions
    assert ext.pipelining and ext.dsn and ext.eightbitmime and not ext.starttls
    assert ext.size == 10240000
    assert s.conn.extensions is ext
    assert s.conn.can_start_transaction
    assert s.sent() == ""


def test_multiline_greeting_and_byte_by_byte_input() -> None:
    s = Session()
    for byte in wire("220-sink.test ESMTP", "220-welcome", "220 go"):
        s.conn.receive_data(bytes([byte]))
    assert s.events() == []
    assert s.sent() == "EHLO relay.test\r\n"
    for byte in wire(*EHLO_PLAIN):
        s.conn.receive_data(bytes([byte]))
    assert isinstance(only(s.events(), Ready), Ready)


def test_ehlo_reply_from_smtp_sink_with_empty_last_line() -> None:
    # Verbatim from smtpd-mta-trace.txt: postfix smtp-sink ends its EHLO reply with "250 ".
    s = Session()
    s.server("220 sink.r-queue.test ESMTP")
    s.sent()
    events = s.server(
        "250-sink.r-queue.test",
        "250-PIPELINING",
        "250-8BITMIME",
        "250-AUTH PLAIN LOGIN",
        "250-XCLIENT NAME HELO",
        "250-XFORWARD NAME ADDR PROTO HELO",
        "250-ENHANCEDSTATUSCODES",
        "250-DSN",
        "250 ",
    )
    ready = only(events, Ready)
    assert isinstance(ready, Ready)
    assert ready.extensions.auth_mechanisms == {"PLAIN", "LOGIN"}
    assert "xforward" in ready.extensions and ready.extensions.enhanced_status_codes
    assert ready.extensions.size is None


@pytest.mark.parametrize(("code", "enhanced"), [(421, "4.3.2"), (554, "5.7.1")])
def test_rejected_greeting_fails_the_session_and_says_quit(code: int, enhanced: str) -> None:
    s = Session()
    failed = only(s.server(f"{code} {enhanced} go away"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reply == Reply(code, "go away", enhanced)
    assert failed.reason == "greeting rejected"
    assert s.sent() == "QUIT\r\n"
    assert s.conn.finished


def test_ehlo_rejected_falls_back_to_helo() -> None:
    s = Session()
    s.server("220 old.test")
    s.sent()
    assert s.server("502 5.5.1 command not implemented") == []
    assert s.sent() == "HELO relay.test\r\n"
    ready = only(s.server("250 old.test"), Ready)
    assert isinstance(ready, Ready)
    assert not ready.esmtp and not ready.extensions.keywords


@pytest.mark.parametrize("reply", ["421 busy", "550 no"])
def test_ehlo_any_failure_falls_back_to_helo(reply: str) -> None:
    s = Session()
    s.server("220 old.test")
    s.sent()
    s.server(reply)
    assert s.sent() == "HELO relay.test\r\n"


def test_helo_rejected_fails() -> None:
    s = Session()
    s.server("220 old.test")
    s.server("500 no EHLO")
    s.sent()
    failed = only(s.server("550 no HELO either"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reason == "HELO rejected" and failed.reply is not None
    assert failed.reply.code == 550


@pytest.mark.parametrize(
    "config",
    [{"require_tls": True}, {"auth": ("user", "secret")}],
    ids=["tls-required", "auth"],
)
def test_ehlo_rejection_is_fatal_when_tls_or_auth_is_required(config: dict[str, object]) -> None:
    s = Session(**config)
    s.server("220 old.test")
    s.sent()
    failed = only(s.server("500 what"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reason == "EHLO rejected"
    assert s.sent() == "QUIT\r\n"


# ---- STARTTLS ----------------------------------------------------------------------------------


def start_tls_session(**config: object) -> Session:
    s = Session(**config)
    s.server("220 mx.test ESMTP")
    s.sent()
    assert s.server(*EHLO_TLS) == []
    assert s.sent() == "STARTTLS\r\n"
    return s


def test_opportunistic_starttls_then_ehlo_again() -> None:
    s = start_tls_session()
    assert isinstance(only(s.server("220 2.0.0 go ahead"), NeedStartTLS), NeedStartTLS)
    assert s.sent() == ""
    assert not s.conn.tls_active
    s.conn.tls_started()
    assert s.sent() == "EHLO relay.test\r\n"
    # What was advertised in clear text is forgotten: only the new list counts.
    assert not s.conn.extensions.keywords
    ready = only(s.server("250-mx.test", "250 AUTH PLAIN"), Ready)
    assert isinstance(ready, Ready)
    assert ready.tls and s.conn.tls_active
    assert not ready.extensions.pipelining and not ready.extensions.starttls


@pytest.mark.parametrize("reply", ["454 4.7.0 TLS not available", "502 no"])
def test_starttls_refused_continues_in_clear_text(reply: str) -> None:
    s = start_tls_session()
    ready = only(s.server(reply), Ready)
    assert isinstance(ready, Ready)
    assert not ready.tls and ready.extensions.pipelining


def test_starttls_refused_with_tls_required_fails() -> None:
    s = start_tls_session(require_tls=True)
    failed = only(s.server("454 4.7.0 TLS not available"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reason == "STARTTLS rejected"
    assert s.sent() == "QUIT\r\n"


def test_tls_required_but_not_offered_fails_without_trying() -> None:
    s = Session(require_tls=True)
    s.server("220 sink.test")
    s.sent()
    failed = only(s.server(*EHLO_PLAIN), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert "TLS required" in failed.reason and failed.reply is None
    assert s.sent() == "QUIT\r\n"


def test_starttls_not_wanted_is_not_used() -> None:
    s = Session(want_starttls=False)
    s.server("220 mx.test")
    s.sent()
    ready = only(s.server(*EHLO_TLS), Ready)
    assert isinstance(ready, Ready) and not ready.tls
    assert s.sent() == ""


def test_required_tls_uses_starttls_even_if_not_wanted() -> None:
    s = Session(want_starttls=False, require_tls=True)
    s.server("220 mx.test")
    s.sent()
    s.server(*EHLO_TLS)
    assert s.sent() == "STARTTLS\r\n"


def test_clear_text_after_starttls_reply_in_same_read_is_rejected() -> None:
    # STARTTLS response injection: a line behind "220" arrived before the handshake.
    s = start_tls_session()
    events = s.server("220 go ahead", "250-fake.test", "250 AUTH PLAIN")
    assert isinstance(events[0], NeedStartTLS)
    failed = events[1]
    assert isinstance(failed, SessionFailed)
    assert "before the TLS handshake" in failed.reason
    s.conn.tls_started()  # a no-op now
    assert s.sent() == ""


def test_data_before_tls_started_is_rejected() -> None:
    s = start_tls_session()
    s.server("220 go ahead")
    failed = only(s.server("250 early"), SessionFailed)
    assert isinstance(failed, SessionFailed)


def test_tls_started_without_request_is_a_caller_error() -> None:
    s = Session()
    with pytest.raises(ClientProtocolError):
        s.conn.tls_started()


def test_implicit_tls_skips_starttls_and_allows_auth() -> None:
    s = Session(implicit_tls=True, auth=("joe", "pw"))
    s.server("220 mx.test")
    s.sent()
    s.server(*EHLO_TLS[:-1], "250 AUTH PLAIN")
    assert s.sent().startswith("AUTH PLAIN ")


# ---- AUTH --------------------------------------------------------------------------------------


def tls_ready_for_auth(auth_line: str, **config: object) -> Session:
    s = start_tls_session(auth=("joe@example.test", "s3cret"), **config)
    s.server("220 go ahead")
    s.conn.tls_started()
    assert s.sent() == "EHLO relay.test\r\n"
    s.server("250-mx.test", "250-PIPELINING", auth_line)
    return s


def test_auth_plain_after_tls() -> None:
    s = tls_ready_for_auth("250 AUTH LOGIN PLAIN")
    token = base64.b64encode(b"\0joe@example.test\0s3cret").decode()
    assert s.sent() == f"AUTH PLAIN {token}\r\n"
    ready = only(s.server("235 2.7.0 Authentication successful"), Ready)
    assert isinstance(ready, Ready) and ready.tls


def test_auth_plain_rejected_fails_the_session() -> None:
    s = tls_ready_for_auth("250 AUTH PLAIN")
    s.sent()
    failed = only(s.server("535 5.7.8 bad credentials"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reason == "AUTH rejected"
    assert failed.reply == Reply(535, "bad credentials", "5.7.8")
    assert s.sent() == "QUIT\r\n"


def test_auth_login_when_plain_is_not_offered() -> None:
    s = tls_ready_for_auth("250 AUTH LOGIN")
    assert s.sent() == "AUTH LOGIN\r\n"
    assert s.server("334 VXNlcm5hbWU6") == []
    assert s.sent() == base64.b64encode(b"joe@example.test").decode() + "\r\n"
    assert s.server("334 UGFzc3dvcmQ6") == []
    assert s.sent() == base64.b64encode(b"s3cret").decode() + "\r\n"
    assert isinstance(only(s.server("235 ok"), Ready), Ready)


def test_old_style_auth_equals_keyword_is_understood() -> None:
    s = tls_ready_for_auth("250 AUTH=LOGIN")
    assert s.sent() == "AUTH LOGIN\r\n"


@pytest.mark.parametrize("step", [0, 1, 2])
def test_auth_login_rejected_at_any_step(step: int) -> None:
    s = tls_ready_for_auth("250 AUTH LOGIN")
    for _ in range(step):
        s.server("334 next")
    failed = only(s.server("535 no"), SessionFailed)
    assert isinstance(failed, SessionFailed) and failed.reason == "AUTH rejected"


def test_auth_is_never_sent_in_clear_text() -> None:
    s = Session(auth=("joe", "pw"))
    s.server("220 sink.test")
    s.sent()
    failed = only(s.server("250-sink.test", "250 AUTH PLAIN LOGIN"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert "unencrypted" in failed.reason
    assert s.sent() == "QUIT\r\n"


def test_auth_after_refused_starttls_is_refused() -> None:
    s = start_tls_session(auth=("joe", "pw"))
    failed = only(s.server("454 TLS not available"), SessionFailed)
    assert isinstance(failed, SessionFailed) and "unencrypted" in failed.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [("250 8BITMIME", "AUTH not advertised"), ("250 AUTH CRAM-MD5", "no supported AUTH")],
)
def test_auth_impossible(line: str, reason: str) -> None:
    s = start_tls_session(auth=("joe", "pw"))
    s.server("220 go")
    s.conn.tls_started()
    s.sent()
    failed = only(s.server("250-mx.test", line), SessionFailed)
    assert isinstance(failed, SessionFailed) and reason in failed.reason
    assert s.sent() == "QUIT\r\n"


# ---- LMTP --------------------------------------------------------------------------------------


def test_lmtp_says_lhlo_and_skips_starttls() -> None:
    s = Session(lmtp=True, helo="localhost")
    s.server("220 dovecot ready")
    assert s.sent() == "LHLO localhost\r\n"
    ready = only(s.server("250-dovecot", "250-PIPELINING", "250 STARTTLS"), Ready)
    assert isinstance(ready, Ready) and not ready.tls
    assert s.sent() == ""


def test_lhlo_rejected_fails() -> None:
    s = Session(lmtp=True)
    s.server("220 lmtp")
    failed = only(s.server("500 no"), SessionFailed)
    assert isinstance(failed, SessionFailed) and failed.reason == "LHLO rejected"


@pytest.mark.parametrize(
    "config",
    [
        {"helo": "two words"},
        {"helo": ""},
        {"helo": "x\r\nRSET"},
        {"helo": "x", "lmtp": True, "auth": ("a", "b")},
        {"helo": "x", "lmtp": True, "require_tls": True},
        {"helo": "x", "auth": ("a\0", "b")},
    ],
)
def test_invalid_configs_are_refused(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ClientConfig(**config)  # type: ignore[arg-type]


# ---- broken servers, EOF, QUIT -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"22\r\n",
        b"199 too low\r\n",
        b"600 too high\r\n",
        b"2x0 letters\r\n",
        b"220_underscore separator\r\n",
        b"220-first\r\n250 second code differs\r\n",
        b"220 " + b"x" * 5000,
        b"".join(b"220-line\r\n" for _ in range(1100)),
    ],
)
def test_garbage_replies_fail_the_session(data: bytes) -> None:
    s = Session()
    failed = only(s.server_bytes(data), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reason.startswith("bad reply from server") and failed.reply is None
    assert s.sent() == ""  # no QUIT to a server that talks garbage


def test_bare_lf_replies_are_accepted() -> None:
    s = Session()
    s.server_bytes(b"220 lf.test\n")
    assert s.sent() == "EHLO relay.test\r\n"
    assert isinstance(only(s.server_bytes(b"250-lf.test\n250 DSN\n"), Ready), Ready)


def ready_session(*ehlo: str, **config: object) -> Session:
    s = Session(**config)
    s.server("220 sink.test ESMTP")
    s.server(*(ehlo or EHLO_PLAIN))
    s.sent()
    return s


def test_unexpected_reply_when_idle_fails() -> None:
    s = ready_session()
    failed = only(s.server("250 nobody asked"), SessionFailed)
    assert isinstance(failed, SessionFailed) and failed.reason == "unexpected reply"


def test_unsolicited_421_when_idle_is_a_session_end() -> None:
    s = ready_session()
    failed = only(s.server("421 4.4.2 idle timeout"), SessionFailed)
    assert isinstance(failed, SessionFailed)
    assert failed.reply is not None and failed.reply.code == 421
    assert failed.reason == "server is closing the session"


def test_eof_during_handshake_fails() -> None:
    s = Session()
    s.server("220 x")
    s.conn.receive_data(b"")
    failed = only(s.events(), SessionFailed)
    assert isinstance(failed, SessionFailed) and "closed" in failed.reason


def test_quit_then_221_closes() -> None:
    s = ready_session()
    s.conn.quit()
    assert s.sent() == "QUIT\r\n"
    s.conn.quit()  # idempotent
    assert s.sent() == ""
    assert isinstance(only(s.server("221 2.0.0 bye"), Closed), Closed)
    assert s.conn.finished
    s.conn.receive_data(b"")
    assert s.events() == []


def test_quit_then_eof_without_reply_closes() -> None:
    s = ready_session()
    s.conn.quit()
    s.conn.receive_data(b"")
    assert isinstance(only(s.events(), Closed), Closed)


def test_quit_before_greeting_waits_for_it() -> None:
    s = Session()
    s.conn.quit()
    assert s.sent() == ""  # the greeting comes first
    assert s.server("220 x") == []
    assert s.sent() == "QUIT\r\n"  # and no EHLO
    assert isinstance(only(s.server("221 bye"), Closed), Closed)


def test_everything_is_a_no_op_after_failure() -> None:
    s = ready_session()
    s.server("garbage")
    s.events()
    s.conn.start_transaction(Transaction("a@b", [RecipientSpec("c@d")]))
    s.conn.send_body(b"x")
    s.conn.tls_started()
    s.conn.quit()
    s.conn.receive_data(b"250 ok\r\n")
    s.conn.receive_data(b"")
    assert s.sent() == "" and s.events() == []


def test_start_transaction_before_ready_is_a_caller_error() -> None:
    s = Session()
    with pytest.raises(ClientProtocolError):
        s.conn.start_transaction(Transaction("a@b", [RecipientSpec("c@d")]))


def test_reply_to_a_command_not_yet_written_is_a_violation() -> None:
    # Greeting and an "EHLO reply" in one read: the server answered before we said EHLO.
    conn = ClientConnection(ClientConfig("relay.test"))
    conn.receive_data(wire("220 mx.test", "250 mx.test"))
    events = [conn.next_event(), conn.next_event()]
    assert isinstance(events[0], SessionFailed)
    assert events[0].reason == "reply received before the command was sent"
    assert events[1] is None


def test_pipelined_replies_must_follow_the_written_commands() -> None:
    s = ready_session()
    s.conn.start_transaction(Transaction("a@b", [RecipientSpec("c@d")]))
    # The caller has not written MAIL/RCPT/DATA yet, so these cannot be their answers.
    s.conn.receive_data(wire("250 ok"))
    failed = only(s.events(), SessionFailed)
    assert isinstance(failed, SessionFailed) and "before the command" in failed.reason
