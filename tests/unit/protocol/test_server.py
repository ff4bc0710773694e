"""The ESMTP server state machine, driven with bytes only."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable

import pytest

from pigeon.protocol.replies import Reply
from pigeon.protocol.server import (
    AuthCredentials,
    CommandRejected,
    ConnectionLost,
    DataBegin,
    DataChunk,
    Event,
    Helo,
    MailFrom,
    MessageEnd,
    MessageRejected,
    ProtocolError,
    Quit,
    RcptTo,
    Reset,
    ServerConfig,
    ServerConnection,
    StartTLS,
)

HOST = "mx.example.test"
CFG = ServerConfig(hostname=HOST)
GREETING = f"220 {HOST} ESMTP Pigeon\r\n".encode()

Policy = Callable[[ServerConnection, Event], None]


def accept_all(conn: ServerConnection, event: Event) -> None:
    conn.accept()


class Driver:
    """Feeds bytes, collects events, answers with ``policy``; output is in ``out``."""

    def __init__(
        self,
        config: ServerConfig = CFG,
        *,
        policy: Policy = accept_all,
        tls: bool = False,
        peer: str = "192.0.2.7",
    ) -> None:
        self.conn = ServerConnection(config, tls_active=tls, peer=peer)
        self.conn.greeting()
        self.policy = policy
        self.events: list[Event] = []
        self.out = self.conn.data_to_send()

    def feed(self, *chunks: bytes) -> Driver:
        for chunk in chunks:
            self.conn.receive_data(chunk)
            self.drain()
        return self

    def drain(self) -> None:
        for _ in range(100_000):
            event = self.conn.next_event()
            if event is None:
                break
            self.events.append(event)
            if self.conn.awaiting_answer is not None:
                self.policy(self.conn, event)
        self.out += self.conn.data_to_send()

    def replies(self) -> list[str]:
        """Output lines after the greeting."""
        return self.out[len(GREETING) :].decode().split("\r\n")[:-1]

    def kinds(self) -> list[type[Event]]:
        return [type(e) for e in self.events]


def session(data: bytes | Iterable[bytes], config: ServerConfig = CFG, **kw: object) -> Driver:
    chunks = [data] if isinstance(data, bytes) else list(data)
    return Driver(config, **kw).feed(*chunks)  # type: ignore[arg-type]


def merged(events: list[Event]) -> list[Event]:
    """Events with adjacent DataChunks joined (chunk boundaries follow arrival)."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + event.data)
        else:
            out.append(event)
    return out


TRANSACTION = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<alice@example.org>\r\n"
    b"RCPT TO:<bob@example.test>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"body\r\n"
    b".\r\n"
    b"QUIT\r\n"
)


# -- greeting and HELO/EHLO -----------------------------------------------------------


def test_greeting_banner() -> None:
    conn = ServerConnection(CFG)
    conn.greeting()
    assert conn.data_to_send() == GREETING


def test_input_waits_for_greeting() -> None:
    conn = ServerConnection(CFG)
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is None
    assert conn.data_to_send() == b""
    conn.greeting()
    assert conn.next_event() is None
    assert conn.data_to_send() == GREETING + b"250 2.0.0 Ok\r\n"


def test_a_554_greeting_waits_for_quit_and_refuses_everything_else() -> None:
    """RFC 5321 section 3.1: after a 554 banner the server MUST wait for QUIT and SHOULD
    answer other commands with 503 (smtpd 6.8 does, after a connect filter's reject)."""
    conn = ServerConnection(CFG)
    conn.greeting(Reply(554, "No SMTP service here", "5.7.1"))
    assert not conn.closed
    assert conn.data_to_send() == b"554 5.7.1 No SMTP service here\r\n"
    conn.receive_data(b"NOOP\r\n")  # as smtpd, NOOP still gets its 250
    while conn.next_event() is not None:
        pass
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n"
    for line in (b"EHLO client.test", b"MAIL FROM:<a@b.c>", b"RCPT TO:<x@y.z>", b"HELP"):
        conn.receive_data(line + b"\r\n")
        event = conn.next_event()
        assert isinstance(event, CommandRejected)
        assert conn.data_to_send() == (
            b"503 5.5.1 Invalid command: Command not allowed at this point.\r\n"
        )
    conn.receive_data(b"QUIT\r\n")
    while conn.next_event() is not None:
        pass
    assert conn.data_to_send() == b"221 2.0.0 Bye\r\n"
    assert conn.closed


def test_a_421_greeting_closes() -> None:
    conn = ServerConnection(CFG)
    conn.greeting(Reply(421, "Too many connections", "4.7.0"))
    assert conn.closed
    assert conn.data_to_send() == b"421 4.7.0 Too many connections\r\n"


def test_ehlo_reply_matches_opensmtpd_without_pigeon_extensions() -> None:
    cfg = ServerConfig(hostname=HOST, pipelining=False, smtputf8=False)
    d = session(b"EHLO client.test\r\n", cfg)
    assert d.events == [Helo("client.test", True)]
    assert d.replies() == [
        f"250-{HOST} Hello client.test [192.0.2.7], pleased to meet you",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-SIZE 36700160",
        "250-DSN",
        "250 HELP",
    ]


def test_ehlo_reply_full() -> None:
    cfg = ServerConfig(
        hostname=HOST,
        max_message_size=1000,
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_requires_tls=False,
    )
    d = session(b"EHLO client.test\r\n", cfg)
    assert d.replies()[1:] == [
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-SIZE 1000",
        "250-DSN",
        "250-STARTTLS",
        "250-AUTH PLAIN LOGIN",
        "250-PIPELINING",
        "250-SMTPUTF8",
        "250 HELP",
    ]


def test_ehlo_no_dsn_no_auth_without_tls() -> None:
    cfg = ServerConfig(hostname=HOST, dsn=False, auth_mechanisms=("PLAIN",))
    d = session(b"EHLO c\r\n", cfg)
    assert "250-DSN" not in d.replies()
    assert not any("AUTH" in line for line in d.replies())


def test_helo_single_line_and_ipv6_peer_without_brackets() -> None:
    d = session(b"HELO client.test\r\n", peer="2001:db8::1")
    assert d.events == [Helo("client.test", False)]
    assert d.replies() == [f"250 {HOST} Hello client.test 2001:db8::1, pleased to meet you"]


def test_helo_without_peer() -> None:
    d = session(b"HELO c\r\n", peer="")
    assert d.replies() == [f"250 {HOST} Hello c, pleased to meet you"]


def test_helo_address_literal_accepted() -> None:
    d = session(b"EHLO [192.0.2.1]\r\n")
    assert d.events[0] == Helo("[192.0.2.1]", True)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"HELO\r\n", "501 5.5.1 Invalid command: HELO requires domain name"),
        (b"EHLO\r\n", "501 5.5.1 Invalid command: EHLO requires domain name"),
        (b"EHLO bad name\r\n", "501 5.5.4 Invalid command arguments: Invalid domain name"),
        (b"EHLO trailing.\r\n", "501 5.5.4 Invalid command arguments: Invalid domain name"),
        (b"EHLO [300.1.1.1]\r\n", "501 5.5.4 Invalid command arguments: Invalid domain name"),
    ],
)
def test_helo_argument_errors(line: bytes, reply: str) -> None:
    d = session(line)
    assert d.replies() == [reply]
    assert isinstance(d.events[0], CommandRejected)
    assert d.events[0].reply.code == int(reply[:3])


def test_second_ehlo_is_refused_like_opensmtpd() -> None:
    d = session(b"EHLO a\r\nEHLO b\r\n")
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Already identified"


def test_rejected_helo_can_be_retried() -> None:
    answers = iter([Reply(550, "Go away", "5.7.1"), None])

    def policy(conn: ServerConnection, event: Event) -> None:
        reply = next(answers)
        conn.reject(reply) if reply else conn.accept()

    d = session(b"EHLO a\r\nEHLO b\r\n", policy=policy)
    assert d.replies()[0] == "550 5.7.1 Go away"
    assert d.conn.helo_name == "b"


def test_custom_accept_reply_is_used() -> None:
    d = session(b"HELO a\r\n", policy=lambda c, e: c.accept(Reply(250, "hi")))
    assert d.replies() == ["250 hi"]


# -- whole transaction ------------------------------------------------------------------


def accept_with_msgid(conn: ServerConnection, event: Event) -> None:
    if isinstance(event, MessageEnd):
        conn.accept(Reply(250, "1a2b3c4d Message accepted for delivery", "2.0.0"))
    else:
        conn.accept()


def test_full_transaction_in_one_read() -> None:
    d = session(TRANSACTION, policy=accept_with_msgid)
    assert d.events == [
        Helo("client.test", True),
        MailFrom("alice@example.org", {}),
        RcptTo("bob@example.test", {}),
        DataBegin(),
        DataChunk(b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"),
        MessageEnd(35),
        Quit(),
    ]
    assert d.replies()[-5:] == [
        "250 2.0.0 Ok",
        "250 2.1.5 Destination address valid: Recipient ok",
        '354 Enter mail, end with "." on a line by itself',
        "250 2.0.0 1a2b3c4d Message accepted for delivery",
        "221 2.0.0 Bye",
    ]
    assert d.conn.closed
    assert d.conn.mail_count == 1


def test_byte_by_byte_gives_same_events_and_output() -> None:
    whole = session(TRANSACTION)
    split = session([TRANSACTION[i : i + 1] for i in range(len(TRANSACTION))])
    assert split.out == whole.out
    assert merged(split.events) == merged(whole.events)


def test_default_message_accepted_reply() -> None:
    d = session(TRANSACTION)
    assert "250 2.0.0 Message accepted for delivery" in d.replies()


def test_transaction_resets_after_message_and_next_one_works() -> None:
    msg = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\n"
    d = session(b"EHLO c\r\n" + msg + b"RCPT TO:<g@h.i>\r\n" + msg)
    assert d.kinds().count(MessageEnd) == 2
    assert "503 5.5.1 Invalid command: Command not allowed at this point." in d.replies()
    assert d.conn.mail_count == 2


def test_pipelined_commands_wait_for_answers() -> None:
    conn = ServerConnection(CFG)
    conn.greeting()
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nNOOP\r\n")
    assert conn.next_event() == Helo("c", True)
    assert conn.next_event() is None  # nothing more until answered
    assert conn.data_to_send() == b""
    conn.accept()
    assert conn.next_event() == MailFrom("a@b.c", {})
    conn.accept()
    assert conn.in_transaction
    assert conn.next_event() == RcptTo("d@e.f", {})
    conn.reject(Reply(550, "No such user", "5.1.1"))
    assert conn.next_event() is None
    out = conn.data_to_send().decode().split("\r\n")
    assert out[-5:] == [
        "250 HELP",
        "250 2.0.0 Ok",
        "550 5.1.1 No such user",
        "250 2.0.0 Ok",
        "",
    ]


def test_commands_are_case_insensitive_and_bare_lf_ends_a_command() -> None:
    d = session(b"ehlo c\nmail from:<a@b.c>\nrcpt to:<d@e.f>\ndata\n")
    assert d.kinds() == [Helo, MailFrom, RcptTo, DataBegin]


def test_space_after_colon_is_accepted() -> None:
    d = session(b"EHLO c\r\nMAIL FROM: <a@b.c>\r\nRCPT TO:  <d@e.f>\r\n")
    assert d.kinds() == [Helo, MailFrom, RcptTo]


# -- simple commands ------------------------------------------------------------------


def test_noop_help_rset_quit() -> None:
    d = session(b"NOOP anything\r\nHELP\r\nEHLO c\r\nRSET\r\nQUIT\r\n")
    assert d.replies()[:5] == [
        "250 2.0.0 Ok",
        "214-2.0.0 This is Pigeon",
        "214-2.0.0 To report bugs in the implementation, please contact the postmaster",
        "214-2.0.0 with full details",
        "214 2.0.0 End of HELP info",
    ]
    assert d.replies()[-2:] == ["250 2.0.0 Reset state", "221 2.0.0 Bye"]
    assert d.kinds() == [Helo, Reset, Quit]
    assert d.conn.closed


def test_rset_drops_transaction() -> None:
    d = session(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRSET\r\nRCPT TO:<d@e.f>\r\n")
    assert not d.conn.in_transaction
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Command not allowed at this point."


def test_vrfy_neither_confirms_nor_denies() -> None:
    d = session(b"VRFY root\r\n")
    assert d.replies() == [
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"
    ]
    assert d.events == []


def test_input_after_quit_is_ignored() -> None:
    d = session(b"QUIT\r\nNOOP\r\n")
    assert d.replies() == ["221 2.0.0 Bye"]
    d.feed(b"NOOP\r\n")
    assert d.replies() == ["221 2.0.0 Bye"]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"VRFY", "501 5.5.4 Syntax error: VRFY needs an argument"),
        (b"EXPN staff", "500 5.5.1 Invalid command: Command unrecognized"),
        (b"BDAT 10", "500 5.5.1 Invalid command: Command unrecognized"),
        (b"", "500 5.5.1 Invalid command: Command unrecognized"),
        (b"MAIL <a@b.c>", "500 5.5.1 Invalid command: Command unrecognized"),
        (b"WIZ", "500 5.5.1 Invalid command: this feature is not supported yet ;-)"),
        (b"QUIT now", "500 5.5.4 Invalid command arguments: command does not accept arguments."),
        (b"HELP me", "500 5.5.4 Invalid command arguments: command does not accept arguments."),
        (b"RSET x", "500 5.5.4 Invalid command arguments: command does not accept arguments."),
        (b"RSET", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"MAIL FROM:<a@b.c>", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"RCPT TO:<a@b.c>", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"DATA", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"STARTTLS", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"AUTH PLAIN", "503 5.5.1 Invalid command: Command not allowed at this point."),
        (b"\xff\xfe", "500 5.5.1 Invalid command: Command unrecognized"),
    ],
)
def test_refused_before_helo(line: bytes, reply: str) -> None:
    d = session(line + b"\r\n")
    assert d.replies() == [reply]
    assert len(d.events) == 1
    event = d.events[0]
    assert isinstance(event, CommandRejected)
    assert str(event.reply) == reply
    assert not d.conn.closed


def test_command_rejected_line_is_printable() -> None:
    d = session(b"XYZZY \xff\r\n")
    event = d.events[0]
    assert isinstance(event, CommandRejected)
    assert event.line == "XYZZY \\xff"
    event.line.encode("utf-8")  # no surrogates


def test_data_errors() -> None:
    d = session(b"EHLO c\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nDATA\r\nDATA now\r\n")
    assert d.replies()[-4:] == [
        "503 5.5.1 Invalid command: Command not allowed at this point.",
        "250 2.0.0 Ok",
        "503 5.5.4 Invalid command arguments: No recipient specified",
        "500 5.5.4 Invalid command arguments: command does not accept arguments.",
    ]


def test_second_mail_in_transaction_refused() -> None:
    d = session(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n")
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Command not allowed at this point."


def test_rejected_data_begin_keeps_transaction() -> None:
    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, DataBegin):
            conn.reject(Reply(451, "Try later", "4.3.0"))
        else:
            conn.accept()

    d = session(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n", policy=policy)
    assert d.replies()[-1] == "451 4.3.0 Try later"
    assert d.conn.in_transaction


# -- MAIL FROM / RCPT TO --------------------------------------------------------------


def mail(line: bytes, config: ServerConfig = CFG) -> Driver:
    return session(b"EHLO c\r\n" + line + b"\r\n", config)


@pytest.mark.parametrize(
    ("line", "address", "params"),
    [
        (b"MAIL FROM:<>", "", {}),
        (b"MAIL FROM:<a@b.c> SIZE=1000", "a@b.c", {"SIZE": "1000"}),
        (b"MAIL FROM:<a@b.c> body=8bitmime", "a@b.c", {"BODY": "8BITMIME"}),
        (b"MAIL FROM:<a@b.c> BODY=7BIT", "a@b.c", {"BODY": "7BIT"}),
        (b"MAIL FROM:<a@b.c> RET=hdrs ENVID=QQ+2B42", "a@b.c", {"RET": "HDRS", "ENVID": "QQ+2B42"}),
        (b"MAIL FROM:<a@b.c> AUTH=<>", "a@b.c", {"AUTH": "<>"}),
        (b"MAIL FROM:<a@b.c>  SIZE=1  ", "a@b.c", {"SIZE": "1"}),
        (b"MAIL FROM:<a@b.c>SIZE=1", "a@b.c", {"SIZE": "1"}),
        (b"MAIL FROM:<postmaster>", f"postmaster@{HOST}", {}),
        (b"MAIL FROM:<@relay.test,@r2.test:a@b.c>", "a@b.c", {}),
        (b'MAIL FROM:<"john doe"@b.c>', '"john doe"@b.c', {}),
        (b"MAIL FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", {}),
        (
            "MAIL FROM:<j\u00f6rg@b\u00fccher.test> SMTPUTF8".encode(),
            "j\u00f6rg@b\u00fccher.test",
            {"SMTPUTF8": None},
        ),
    ],
)
def test_mail_from_accepted(line: bytes, address: str, params: dict[str, str | None]) -> None:
    d = mail(line)
    assert d.events[-1] == MailFrom(address, params)
    assert d.replies()[-1] == "250 2.0.0 Ok"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:a@b.c", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<a@b.c", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<a@>", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<@b.c>", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<a..b@c.d>", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:< a@b.c>", "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<a@b.c.>", "553 5.1.0 Sender address syntax error"),
        ("MAIL FROM:<j\u00f6rg@b.c>".encode(), "553 5.1.0 Sender address syntax error"),
        (b"MAIL FROM:<a\xff@b.c> SMTPUTF8", "553 5.1.0 Sender address syntax error"),
        (
            b"MAIL FROM:<a@b.c> SIZE=36700161",
            "552 5.3.4 Message size exceeds fixed maximum message size",
        ),
        (
            b"MAIL FROM:<a@b.c> FOO=bar",
            "503 5.5.4 Invalid command arguments: Unsupported option FOO=bar",
        ),
        (
            b"MAIL FROM:<a@b.c> SIZE=big",
            "503 5.5.4 Invalid command arguments: Unsupported option SIZE=big",
        ),
        (
            b"MAIL FROM:<a@b.c> BODY=BINARYMIME",
            "503 5.5.4 Invalid command arguments: Unsupported option BODY=BINARYMIME",
        ),
        (
            b"MAIL FROM:<a@b.c> RET=ALL",
            "503 5.5.4 Invalid command arguments: Unsupported option RET=ALL",
        ),
        (
            b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2",
            "503 5.5.4 Invalid command arguments: Unsupported option SIZE=2",
        ),
        (
            b"MAIL FROM:<a@b.c> =x",
            "503 5.5.4 Invalid command arguments: Unsupported option =x",
        ),
        (
            b"MAIL FROM:<a@b.c> ENVID=" + b"x" * 101,
            "503 5.5.4 Invalid command arguments: option too large, truncated: " + "x" * 101,
        ),
    ],
)
def test_mail_from_refused(line: bytes, reply: str) -> None:
    d = mail(line)
    assert d.replies()[-1] == reply
    assert isinstance(d.events[-1], CommandRejected)
    assert not d.conn.in_transaction


def test_dsn_params_refused_when_dsn_off() -> None:
    cfg = ServerConfig(hostname=HOST, dsn=False)
    d = mail(b"MAIL FROM:<a@b.c> RET=FULL", cfg)
    assert d.replies()[-1] == "503 5.5.4 Invalid command arguments: Unsupported option RET=FULL"


def test_smtputf8_off_refuses_8bit_and_param() -> None:
    cfg = ServerConfig(hostname=HOST, smtputf8=False)
    d = mail("MAIL FROM:<j\u00f6rg@b.c> SMTPUTF8".encode(), cfg)
    assert d.replies()[-1] == "553 5.1.0 Sender address syntax error"
    d = mail(b"MAIL FROM:<a@b.c> SMTPUTF8", cfg)
    assert d.replies()[-1].startswith("503 5.5.4")


def rcpt(line: bytes, mail_line: bytes = b"MAIL FROM:<a@b.c>", cfg: ServerConfig = CFG) -> Driver:
    return session(b"EHLO c\r\n" + mail_line + b"\r\n" + line + b"\r\n", cfg)


@pytest.mark.parametrize(
    ("line", "address", "params"),
    [
        (b"RCPT TO:<d@e.f>", "d@e.f", {}),
        (b"RCPT TO:<Postmaster>", f"Postmaster@{HOST}", {}),
        (b"RCPT TO:<d@e.f> NOTIFY=success,failure", "d@e.f", {"NOTIFY": "SUCCESS,FAILURE"}),
        (b"RCPT TO:<d@e.f> NOTIFY=NEVER", "d@e.f", {"NOTIFY": "NEVER"}),
        (
            b"RCPT TO:<d@e.f> ORCPT=rfc822;orig+2Bd@e.f",
            "d@e.f",
            {"ORCPT": "rfc822;orig+2Bd@e.f"},
        ),
    ],
)
def test_rcpt_to_accepted(line: bytes, address: str, params: dict[str, str | None]) -> None:
    d = rcpt(line)
    assert d.events[-1] == RcptTo(address, params)
    assert d.replies()[-1] == "250 2.1.5 Destination address valid: Recipient ok"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", "501 5.1.3 Recipient address syntax error"),
        (b"RCPT TO:d@e.f", "501 5.1.3 Recipient address syntax error"),
        (b"RCPT TO:<d@>", "501 5.1.3 Recipient address syntax error"),
        ("RCPT TO:<d\u00e9@e.f>".encode(), "501 5.1.3 Recipient address syntax error"),
        (b"RCPT TO:<d@e.f> FOO", "503 5.5.4 Unsupported option FOO"),
        (b"RCPT TO:<d@e.f> NOTIFY=SOMETIMES", "503 5.5.4 Unsupported option NOTIFY=SOMETIMES"),
        (
            b"RCPT TO:<d@e.f> NOTIFY=NEVER,SUCCESS",
            "553 5.5.4 NOTIFY option NEVER cannot be combined with other options",
        ),
        (b"RCPT TO:<d@e.f> ORCPT=rfc822", "553 5.5.4 ORCPT address syntax error"),
        (b"RCPT TO:<d@e.f> ORCPT=rfc822;a+zz", "553 5.5.4 ORCPT address syntax error"),
    ],
)
def test_rcpt_to_refused(line: bytes, reply: str) -> None:
    d = rcpt(line)
    assert d.replies()[-1] == reply
    assert isinstance(d.events[-1], CommandRejected)


def test_utf8_recipient_after_smtputf8() -> None:
    d = rcpt("RCPT TO:<d\u00e9@e.f>".encode(), b"MAIL FROM:<a@b.c> SMTPUTF8")
    assert d.events[-1] == RcptTo("d\u00e9@e.f", {})


def test_max_rcpt() -> None:
    cfg = ServerConfig(hostname=HOST, max_rcpt=2)
    lines = b"".join(b"RCPT TO:<r%d@e.f>\r\n" % i for i in range(3))
    d = session(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n" + lines, cfg)
    assert d.kinds().count(RcptTo) == 2
    assert d.replies()[-1] == "451 4.5.3 Too many recipients: Too many recipients"


def test_rejected_recipients_do_not_count_towards_max_rcpt() -> None:
    cfg = ServerConfig(hostname=HOST, max_rcpt=1)

    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, RcptTo) and event.address.startswith("bad"):
            conn.reject(Reply(550, "No such user", "5.1.1"))
        else:
            conn.accept()

    data = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bad@e.f>\r\nRCPT TO:<ok@e.f>\r\n"
    d = session(data, cfg, policy=policy)
    assert d.replies()[-1] == "250 2.1.5 Destination address valid: Recipient ok"


def test_max_mails() -> None:
    cfg = ServerConfig(hostname=HOST, max_mails=1)
    msg = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\n"
    d = session(b"EHLO c\r\n" + msg + b"MAIL FROM:<a@b.c>\r\n", cfg)
    assert d.replies()[-1] == "452 4.5.3 Too many recipients: Too many messages sent"


def test_tls_and_auth_required() -> None:
    cfg = ServerConfig(hostname=HOST, starttls=True, tls_required=True)
    assert mail(b"MAIL FROM:<a@b.c>", cfg).replies()[-1] == (
        "530 5.5.1 Invalid command: Must issue a STARTTLS command first"
    )
    cfg = ServerConfig(hostname=HOST, auth_mechanisms=("PLAIN",), auth_required=True)
    d = session(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n", cfg, tls=True)
    assert d.replies()[-1] == "530 5.5.1 Invalid command: Must issue an AUTH command first"


# -- DATA -----------------------------------------------------------------------------

OPEN = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"


def body_of(d: Driver) -> bytes:
    return b"".join(e.data for e in d.events if isinstance(e, DataChunk))


def test_empty_message() -> None:
    d = session(OPEN + b".\r\n")
    assert d.events[-1] == MessageEnd(0)
    assert body_of(d) == b""


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..x\r\n", b".x\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..\r\n", b".\r\n"),
        (b". \r\n", b" \r\n"),
        (b"x.\r\n.x\r\n", b"x.\r\nx\r\n"),
        (b"\r\n\r\n", b"\r\n\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, content: bytes) -> None:
    d = session(OPEN + wire + b".\r\n")
    assert body_of(d) == content
    assert d.events[-1] == MessageEnd(len(content))


def test_data_chunks_are_whole_lines_as_they_arrive() -> None:
    d = session([OPEN, b"line one\r\nline t", b"wo\r\n", b".\r", b"\n"])
    chunks = [e.data for e in d.events if isinstance(e, DataChunk)]
    assert chunks == [b"line one\r\n", b"line two\r\n"]
    assert d.kinds().count(MessageEnd) == 1


def test_data_pipelined_before_354_is_kept() -> None:
    d = session(OPEN + b"hello\r\n.\r\nQUIT\r\n")
    assert d.kinds()[-4:] == [DataBegin, DataChunk, MessageEnd, Quit]


def test_rejected_message_end() -> None:
    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, MessageEnd):
            conn.reject(Reply(550, "Spam", "5.7.1"))
        else:
            conn.accept()

    d = session(OPEN + b"x\r\n.\r\nMAIL FROM:<a@b.c>\r\n", policy=policy)
    assert d.replies()[-2:] == ["550 5.7.1 Spam", "250 2.0.0 Ok"]
    assert d.conn.mail_count == 0


def test_temporary_failure_421_closes() -> None:
    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, MessageEnd):
            conn.reject(Reply(421, "Temporary failure", "4.3.0"))
        else:
            conn.accept()

    d = session(OPEN + b"x\r\n.\r\nNOOP\r\n", policy=policy)
    assert d.replies()[-1] == "421 4.3.0 Temporary failure"
    assert d.conn.closed


def test_message_too_big() -> None:
    cfg = ServerConfig(hostname=HOST, max_message_size=10)
    d = session(OPEN + b"12345678\r\n" + b"more\r\n" * 3 + b".\r\nRCPT TO:<x@y.z>\r\n", cfg)
    assert MessageEnd not in d.kinds()
    rejected = [e for e in d.events if isinstance(e, MessageRejected)]
    assert len(rejected) == 1
    assert rejected[0].reason == "message too big"
    # Never more than the limit reaches the application (which discards it anyway).
    assert len(body_of(d)) <= 10 and b"more" not in body_of(d)
    assert d.replies()[-2:] == [
        "554 5.3.4 Message too big for system: Transaction failed, message too big",
        "503 5.5.1 Invalid command: Command not allowed at this point.",
    ]


def test_message_exactly_at_size_limit_is_accepted() -> None:
    cfg = ServerConfig(hostname=HOST, max_message_size=10)
    d = session(OPEN + b"12345678\r\n.\r\n", cfg)
    assert d.events[-1] == MessageEnd(10)


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r.\r\n",
    b"\r\n.\r\r\n",
    b"\n\n",
    b"\r\r\n",
    b"\rx\r\n",
]


@pytest.mark.parametrize("payload", SMUGGLING)
@pytest.mark.parametrize("bytewise", [False, True])
def test_smuggling_never_ends_data(payload: bytes, bytewise: bool) -> None:
    smuggled = b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@e.f>\r\nDATA\r\nforged\r\n"
    wire = OPEN + b"Subject: x\r\n\r\nbody" + payload + smuggled + b".\r\nNOOP\r\n"
    d = session([wire[i : i + 1] for i in range(len(wire))] if bytewise else wire)
    kinds = d.kinds()
    assert MessageEnd not in kinds
    assert kinds.count(MessageRejected) == 1
    assert kinds.count(MailFrom) == 1  # the smuggled MAIL FROM never became a command
    assert kinds[-1] == MessageRejected
    assert d.replies()[-2][:10] == "550 5.5.2 "
    assert d.replies()[-1] == "250 2.0.0 Ok"  # the NOOP after the real end


def test_dot_line_after_bare_lf_is_data_and_next_dot_line_ends() -> None:
    d = session(OPEN + b"a\r\n\n.\r\n")
    assert MessageEnd not in d.kinds() and MessageRejected not in d.kinds()  # no end yet
    d.feed(b".\r\n")
    assert d.kinds()[-1] == MessageRejected
    assert d.replies()[-1] == "550 5.5.2 Message refused: bare CR or LF in data"


def test_nul_reason() -> None:
    d = session(OPEN + b"a\x00b\r\n.\r\n")
    event = d.events[-1]
    assert isinstance(event, MessageRejected)
    assert event.reason == "NUL character in data"


def test_data_line_limit() -> None:
    cfg = ServerConfig(hostname=HOST, max_line_length=12)
    ok = session(OPEN + b"x" * 10 + b"\r\n.\r\n", cfg)
    assert ok.events[-1] == MessageEnd(12)
    d = session(OPEN + b"x" * 11 + b"\r\nnext\r\n.\r\nNOOP\r\n", cfg)
    assert d.kinds()[-1] == MessageRejected
    assert d.replies()[-2:] == ["500 5.0.0 Line too long", "250 2.0.0 Ok"]
    assert not d.conn.closed


def test_long_data_line_is_not_buffered_whole() -> None:
    cfg = ServerConfig(hostname=HOST, max_line_length=100)
    d = session(OPEN, cfg)
    for _ in range(50):
        d.feed(b"y" * 1000)
        assert d.conn.buffered < 100
    d.feed(b"\r\n.\r\n")
    assert d.kinds()[-1] == MessageRejected


def test_eof_inside_data_gives_no_message_end() -> None:
    d = session([OPEN + b"partial\r\nline wi", b""])
    assert MessageEnd not in d.kinds()
    assert d.kinds()[-1] == ConnectionLost
    assert d.conn.closed


# -- line limits and EOF --------------------------------------------------------------


def test_command_line_limit() -> None:
    ok = session(b"NOOP " + b"x" * 2042 + b"\r\n")  # 2047 bytes: the longest allowed
    assert ok.replies() == ["250 2.0.0 Ok"]
    d = session(b"NOOP " + b"x" * 2043 + b"\r\nNOOP\r\n")
    assert d.replies() == ["500 5.0.0 Command line too long"]
    assert d.conn.closed
    event = d.events[0]
    assert isinstance(event, CommandRejected) and event.bad_input


def test_endless_command_line_is_refused_early() -> None:
    d = session([b"x" * 1000] * 3)
    assert d.replies() == ["500 5.0.0 Command line too long"]
    assert d.conn.closed


def test_eof_after_complete_lines_processes_them_first() -> None:
    d = session([b"EHLO c\r\nNOOP\r\nNOO", b""])
    assert d.kinds() == [Helo, ConnectionLost]
    assert d.replies()[-1] == "250 2.0.0 Ok"


# -- STARTTLS -------------------------------------------------------------------------

TLS_CFG = ServerConfig(hostname=HOST, starttls=True)


def test_starttls_not_offered() -> None:
    d = session(b"EHLO c\r\nSTARTTLS\r\n")
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Command not supported"


def test_starttls_discards_pipelined_plaintext_and_resets() -> None:
    d = session(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x.y>\r\n", TLS_CFG)
    assert d.kinds() == [Helo, StartTLS]
    assert d.replies()[-1] == "220 2.0.0 Ready to start TLS"
    d.feed(b"RCPT TO:<also-injected@x.y>\r\n")  # still plaintext: ignored
    d.conn.tls_started()
    assert d.conn.tls_active and d.conn.helo_name is None
    before = len(d.replies())
    d.feed(b"MAIL FROM:<a@b.c>\r\nEHLO c\r\nSTARTTLS\r\n")
    after = d.replies()[before:]
    assert after[0] == "503 5.5.1 Invalid command: Command not allowed at this point."
    assert after[1].startswith("250-")
    assert "250-STARTTLS" not in after
    assert after[-1] == "503 5.5.1 Invalid command: Channel already secured"
    assert MailFrom not in d.kinds()


def test_starttls_errors() -> None:
    d = session(b"EHLO c\r\nSTARTTLS now\r\nMAIL FROM:<a@b.c>\r\nSTARTTLS\r\n", TLS_CFG)
    assert d.replies()[-3] == "501 5.5.4 Invalid command arguments: No parameters allowed"
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Command not allowed at this point."


def test_rejected_starttls_continues_in_plaintext() -> None:
    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, StartTLS):
            conn.reject(Reply(454, "TLS not available", "4.7.0"))
        else:
            conn.accept()

    d = session(b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n", TLS_CFG, policy=policy)
    assert d.replies()[-2:] == ["454 4.7.0 TLS not available", "250 2.0.0 Ok"]


# -- AUTH -----------------------------------------------------------------------------

AUTH_CFG = ServerConfig(hostname=HOST, auth_mechanisms=("PLAIN", "LOGIN"))


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def auth(data: bytes, cfg: ServerConfig = AUTH_CFG, **kw: object) -> Driver:
    return session(b"EHLO c\r\n" + data, cfg, tls=True, **kw)


def test_auth_not_offered_without_tls() -> None:
    d = session(b"EHLO c\r\nAUTH PLAIN " + b64("\0u\0p") + b"\r\n", AUTH_CFG)
    assert d.replies()[-1] == "503 5.5.1 Invalid command: Command not supported"
    event = d.events[-1]
    assert isinstance(event, CommandRejected)
    assert event.line == "AUTH PLAIN ********"


def test_auth_plain_initial_response() -> None:
    d = auth(b"AUTH PLAIN " + b64("admin\0alice\0s3cret") + b"\r\n")
    assert d.events[-1] == AuthCredentials("PLAIN", "alice", "s3cret", "admin")
    assert d.replies()[-1] == "235 2.0.0 Authentication succeeded"
    assert d.conn.authenticated_user == "alice"


def test_auth_plain_challenge() -> None:
    d = auth(b"auth plain\r\n" + b64("\0alice\0pw") + b"\r\n")
    assert d.out.endswith(b"334 \r\n235 2.0.0 Authentication succeeded\r\n")
    assert d.events[-1] == AuthCredentials("PLAIN", "alice", "pw", "")


def test_auth_login() -> None:
    d = auth(b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64("pw") + b"\r\n")
    assert d.replies()[-3:] == [
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "235 2.0.0 Authentication succeeded",
    ]
    assert d.events[-1] == AuthCredentials("LOGIN", "alice", "pw")


def test_auth_credentials_that_are_not_utf8_are_checked_as_sent() -> None:
    """A Latin-1 password is base64 all the same: it goes to the check (which hashes the
    bytes sent), it is not a syntax error; in AUTH LOGIN the password line is then read as
    the password, never as a command (it would reach the log as a failed command)."""
    d = auth(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0p\xe4ss") + b"\r\n")
    creds = d.events[-1]
    assert isinstance(creds, AuthCredentials)
    assert creds.password.encode("utf-8", "surrogateescape") == b"p\xe4ss"
    d = auth(
        b"AUTH LOGIN\r\n"
        + base64.b64encode(b"\xff\xfeuser")
        + b"\r\n"
        + base64.b64encode(b"secret")
        + b"\r\n"
    )
    assert d.replies()[-3:-1] == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"]
    creds = d.events[-1]
    assert isinstance(creds, AuthCredentials)
    assert creds.username.encode("utf-8", "surrogateescape") == b"\xff\xfeuser"
    assert creds.password == "secret"
    assert CommandRejected not in d.kinds()


def test_auth_login_initial_username() -> None:
    d = auth(b"AUTH LOGIN " + b64("alice") + b"\r\n" + b64("pw") + b"\r\n")
    assert d.replies()[-2:] == ["334 UGFzc3dvcmQ6", "235 2.0.0 Authentication succeeded"]


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"AUTH PLAIN !!!\r\n", "AUTH PLAIN (...)"),
        (b"AUTH PLAIN\r\n*\r\n", "AUTH PLAIN (...)"),
        (b"AUTH PLAIN " + b64("alice\0pw") + b"\r\n", "AUTH PLAIN (...)"),
        (b"AUTH PLAIN " + b64("\0\0pw") + b"\r\n", "AUTH PLAIN (...)"),
        (b"AUTH LOGIN\r\n*\r\n", "AUTH LOGIN (username)"),
        (b"AUTH LOGIN\r\n" + b64("u") + b"\r\n%%%\r\n", "AUTH LOGIN (password)"),
    ],
)
def test_auth_syntax_errors(data: bytes, shown: str) -> None:
    d = auth(data + b"NOOP\r\n")
    assert d.replies()[-2:] == ["501 5.5.2 Syntax error: Syntax error", "250 2.0.0 Ok"]
    event = d.events[-1]
    assert isinstance(event, CommandRejected)
    assert event.line == shown
    assert AuthCredentials not in d.kinds()


def test_auth_errors() -> None:
    d = auth(b"AUTH\r\nAUTH CRAM-MD5\r\nMAIL FROM:<a@b.c>\r\nAUTH PLAIN\r\n")
    assert d.replies()[-4:] == [
        "501 5.5.4 Invalid command arguments: No parameters given",
        '504 5.7.4 Security features not supported: AUTH method "CRAM-MD5" not supported',
        "250 2.0.0 Ok",
        "503 5.5.1 Invalid command: Command not allowed at this point.",
    ]


def test_auth_mechanism_not_configured() -> None:
    cfg = ServerConfig(hostname=HOST, auth_mechanisms=("PLAIN",))
    d = auth(b"AUTH LOGIN\r\n", cfg)
    assert d.replies()[-1].startswith("504 5.7.4")


def test_only_mechanisms_the_machine_runs_are_advertised() -> None:
    cfg = ServerConfig(hostname=HOST, auth_mechanisms=("cram-md5", "login", "LOGIN"))
    d = auth(b"AUTH CRAM-MD5\r\n", cfg)
    assert "250-AUTH LOGIN" in d.replies()
    assert d.replies()[-1].startswith("504 5.7.4")


def test_auth_twice_and_failure_then_retry() -> None:
    answers = iter([False, True])

    def policy(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, AuthCredentials) and not next(answers):
            conn.reject(Reply(535, "Authentication failed", "5.7.8"))
        else:
            conn.accept()

    creds = b"AUTH PLAIN " + b64("\0u\0p") + b"\r\n"
    d = auth(creds + creds + creds, policy=policy)
    assert d.replies()[-3:] == [
        "535 5.7.8 Authentication failed",
        "235 2.0.0 Authentication succeeded",
        "503 5.5.1 Invalid command: Already authenticated",
    ]


def test_auth_without_tls_when_allowed() -> None:
    cfg = ServerConfig(hostname=HOST, auth_mechanisms=("LOGIN",), auth_requires_tls=False)
    d = session(b"EHLO c\r\n", cfg)
    assert "250-AUTH LOGIN" in d.replies()


# -- API misuse -----------------------------------------------------------------------


def test_api_misuse_raises() -> None:
    conn = ServerConnection(CFG)
    with pytest.raises(ProtocolError):
        conn.accept()
    with pytest.raises(ProtocolError):
        conn.tls_started()
    conn.greeting()
    with pytest.raises(ProtocolError):
        conn.greeting()
    conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    assert isinstance(conn.next_event(), Helo)
    with pytest.raises(ProtocolError):
        conn.reject(Reply(250, "Ok"))
    with pytest.raises(ProtocolError):
        conn.accept(Reply(550, "no"))
    conn.accept()
    conn.next_event()
    conn.accept()
    conn.next_event()
    conn.accept()
    assert isinstance(conn.next_event(), DataBegin)
    with pytest.raises(ProtocolError):
        conn.accept(Reply(250, "Ok"))
    assert isinstance(conn.awaiting_answer, DataBegin)  # still waiting after the error
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.receive_data(b"x")


def test_close_by_application() -> None:
    d = session(b"EHLO c\r\n")
    d.conn.receive_data(b"NOOP\r\n")
    d.conn.close(Reply(421, f"{HOST} Timeout", "4.4.2"))
    assert d.conn.closed
    assert d.conn.next_event() is None
    assert d.conn.data_to_send() == f"421 4.4.2 {HOST} Timeout\r\n".encode()
