"""SMTP/LMTP client state machine: mail transactions, pipelining, per-recipient outcomes."""

from __future__ import annotations

import pytest

from pigeon.protocol.client import (
    ClientConfig,
    ClientConnection,
    ClientProtocolError,
    Closed,
    DataReady,
    DeliveryResult,
    Event,
    MailRejected,
    RecipientResult,
    RecipientSpec,
    SessionFailed,
    Transaction,
    TransactionResult,
)
from pigeon.protocol.replies import Reply

EHLO_PIPELINING = ["250-sink.test", "250-PIPELINING", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"]
EHLO_DSN = ["250-sink.test", "250-PIPELINING", "250-DSN", "250 ENHANCEDSTATUSCODES"]
EHLO_SIMPLE = ["250-sink.test", "250 ENHANCEDSTATUSCODES"]

OK_250 = Reply(250, "Ok", "2.0.0")


def wire(*lines: str) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode()


class Session:
    def __init__(self, ehlo: list[str], **config: object) -> None:
        config.setdefault("helo", "relay.test")
        self.conn = ClientConnection(ClientConfig(**config))  # type: ignore[arg-type]
        self.written = b""
        self.server("220 sink.test ESMTP")
        self.server(*ehlo)
        self.sent()
        self.events()  # Ready

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


def txn(*rcpts: str, sender: str = "alice@example.test") -> Transaction:
    return Transaction(sender, [RecipientSpec(r) for r in rcpts])


# ---- happy paths -------------------------------------------------------------------------------


def test_pipelined_transaction_sends_mail_rcpts_and_data_in_one_write() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("dave@sink.test", "eve@sink.test"))
    assert s.sent() == (
        "MAIL FROM:<alice@example.test>\r\n"
        "RCPT TO:<dave@sink.test>\r\n"
        "RCPT TO:<eve@sink.test>\r\n"
        "DATA\r\n"
    )
    events = s.server(
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"
    )
    assert events == [
        RecipientResult(0, Reply(250, "Ok", "2.1.5")),
        RecipientResult(1, Reply(250, "Ok", "2.1.5")),
        DataReady(),
    ]
    assert not s.conn.can_start_transaction
    s.conn.send_body(b"Subject: hi\r\n\r\nto sink\r\n")
    assert s.sent() == "Subject: hi\r\n\r\nto sink\r\n.\r\n"
    events = s.server("250 2.0.0 Ok: queued as 37d9e971")
    done = Reply(250, "Ok: queued as 37d9e971", "2.0.0")
    assert events == [
        DeliveryResult(0, done),
        DeliveryResult(1, done),
        TransactionResult(((0, done), (1, done)), "eom"),
    ]
    assert s.conn.can_start_transaction
    assert s.sent() == ""  # no RSET after a successful transaction


def test_without_pipelining_one_command_at_a_time() -> None:
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(txn("dave@sink.test", "eve@sink.test"))
    assert s.sent() == "MAIL FROM:<alice@example.test>\r\n"
    assert s.server("250 2.1.0 Ok") == []
    assert s.sent() == "RCPT TO:<dave@sink.test>\r\n"
    assert s.server("250 2.1.5 Ok") == [RecipientResult(0, Reply(250, "Ok", "2.1.5"))]
    assert s.sent() == "RCPT TO:<eve@sink.test>\r\n"
    s.server("250 2.1.5 Ok")
    assert s.sent() == "DATA\r\n"
    assert s.server("354 go") == [DataReady()]
    s.conn.send_body(b"x\r\n")
    assert s.sent() == "x\r\n.\r\n"
    assert s.server("250 ok")[-1] == TransactionResult(
        ((0, Reply(250, "ok")), (1, Reply(250, "ok"))), "eom"
    )


def test_pipelining_disabled_by_config() -> None:
    s = Session(EHLO_PIPELINING, pipelining=False)
    s.conn.start_transaction(txn("dave@sink.test"))
    assert s.sent() == "MAIL FROM:<alice@example.test>\r\n"


def test_replies_split_across_reads_give_the_same_events() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("dave@sink.test", "eve@sink.test"))
    s.sent()
    events = []
    for byte in wire("250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 no", "354 go"):
        s.conn.receive_data(bytes([byte]))
        events += s.events()
    assert events == [
        RecipientResult(0, Reply(250, "Ok", "2.1.5")),
        RecipientResult(1, Reply(550, "no", "5.1.1")),
        DataReady(),
    ]


def test_null_sender() -> None:
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(txn("dave@sink.test", sender=""))
    assert s.sent() == "MAIL FROM:<>\r\n"


def test_multiline_final_reply_with_enhanced_codes() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("dave@sink.test"))
    s.server("250 ok", "250 ok", "354 go")
    s.conn.send_body(b"x\r\n")
    events = s.server("250-2.0.0 Ok", "250-2.0.0 queued", "250 2.0.0 as ABC")
    assert events[0] == DeliveryResult(0, Reply(250, "Ok\nqueued\nas ABC", "2.0.0"))


# ---- parameters --------------------------------------------------------------------------------

DSN_TXN = Transaction(
    "alice@example.test",
    [
        RecipientSpec(
            "dave@sink.test",
            {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;orig+dave@sink.test"},
        )
    ],
    {"RET": "HDRS", "ENVID": "envid-QQ42"},
)


def test_dsn_parameters_passed_through_when_advertised() -> None:
    # The exact lines of smtpd-mta-trace.txt.
    s = Session(EHLO_DSN)
    s.conn.start_transaction(DSN_TXN)
    assert s.sent() == (
        "MAIL FROM:<alice@example.test> RET=HDRS ENVID=envid-QQ42\r\n"
        "RCPT TO:<dave@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+dave@sink.test\r\n"
        "DATA\r\n"
    )


def test_dsn_parameters_dropped_when_not_advertised() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(DSN_TXN)
    assert s.sent() == "MAIL FROM:<alice@example.test>\r\nRCPT TO:<dave@sink.test>\r\nDATA\r\n"


def test_other_parameters_need_their_extension() -> None:
    params: dict[str, str | None] = {"SIZE": "350", "BODY": "8BITMIME", "SMTPUTF8": None}
    t = Transaction("al@example.test", [RecipientSpec("d@sink.test")], params)
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(t)
    assert s.sent() == "MAIL FROM:<al@example.test>\r\n"
    s = Session(["250-sink.test", "250-SIZE 1000", "250-8BITMIME", "250 SMTPUTF8"])
    s.conn.start_transaction(t)
    assert s.sent() == "MAIL FROM:<al@example.test> SIZE=350 BODY=8BITMIME SMTPUTF8\r\n"


def test_utf8_addresses_are_sent_as_utf8() -> None:
    s = Session(["250-sink.test", "250 SMTPUTF8"])
    s.conn.start_transaction(
        Transaction("jörg@example.test", [RecipientSpec("δ@sink.test")], {"SMTPUTF8": None})
    )
    assert s.conn.data_to_send() == "MAIL FROM:<jörg@example.test> SMTPUTF8\r\n".encode()


@pytest.mark.parametrize(
    "bad",
    [
        Transaction("a@b\r\nRSET", [RecipientSpec("c@d")]),
        Transaction("a@b", [RecipientSpec("c@d>\nDATA")]),
        Transaction("a@b", [RecipientSpec("c@d", {"NOTIFY": "x y"})]),
        Transaction("a@b", [RecipientSpec("c@d")], {"RET=": "x"}),
        Transaction("a@b", [RecipientSpec("c@d")], {"ENVID": ""}),
        Transaction("a@b", []),
    ],
)
def test_transactions_that_could_inject_commands_are_refused(bad: Transaction) -> None:
    s = Session(EHLO_DSN)
    with pytest.raises(ValueError):
        s.conn.start_transaction(bad)


# ---- refusals ----------------------------------------------------------------------------------


def test_recipient_mix_only_accepted_ones_get_the_final_reply() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test", "b@sink.test", "c@sink.test"))
    s.sent()
    events = s.server("250 ok", "250 2.1.5 ok", "450 4.2.0 busy", "550 5.1.1 unknown", "354 go")
    assert [e for e in events if isinstance(e, RecipientResult)] == [
        RecipientResult(0, Reply(250, "ok", "2.1.5")),
        RecipientResult(1, Reply(450, "busy", "4.2.0")),
        RecipientResult(2, Reply(550, "unknown", "5.1.1")),
    ]
    assert events[1].reply.temporary and events[2].reply.permanent  # type: ignore[union-attr]
    s.conn.send_body(b"x\r\n")
    assert s.server("250 2.0.0 Ok") == [
        DeliveryResult(0, OK_250),
        TransactionResult(((0, OK_250),), "eom"),
    ]


def test_all_recipients_refused_without_pipelining_resets_instead_of_data() -> None:
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(txn("a@reject.test", "b@reject.test"))
    assert s.sent() == "MAIL FROM:<alice@example.test>\r\n"
    s.server("250 ok")
    s.server("550 5.1.1 no")
    assert s.sent() == "RCPT TO:<a@reject.test>\r\nRCPT TO:<b@reject.test>\r\n"
    events = s.server("450 4.1.1 later")
    assert events == [
        RecipientResult(1, Reply(450, "later", "4.1.1")),
        TransactionResult((), "rcpt"),
    ]
    assert s.sent() == "RSET\r\n"  # like smtp-sink's view of OpenSMTPD: RCPT, RSET
    assert s.conn.can_start_transaction
    s.conn.start_transaction(txn("c@sink.test"))
    assert s.sent() == ""  # waits for the RSET reply
    assert s.server("250 2.0.0 reset") == []
    assert s.sent() == "MAIL FROM:<alice@example.test>\r\n"


def test_all_recipients_refused_with_pipelining_swallows_the_data_reply() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@reject.test"))
    s.sent()
    events = s.server("250 ok", "550 5.1.1 no")
    assert events[-1] == TransactionResult((), "rcpt")
    assert s.sent() == ""  # RSET waits for the answer to DATA
    assert s.server("554 5.5.1 no valid recipients") == []
    assert s.sent() == "RSET\r\n"
    assert s.server("250 ok") == []


def test_data_accepted_after_all_recipients_refused_sends_an_empty_message() -> None:
    # A broken server says 354 though no RCPT succeeded: end DATA at once, then RSET.
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@reject.test"))
    s.sent()
    s.server("250 ok", "550 no", "354 go")
    assert s.sent() == ".\r\n"
    assert s.server("250 queued nothing") == []
    assert s.sent() == "RSET\r\n"


@pytest.mark.parametrize("reply", ["451 4.3.0 try later", "550 5.7.1 sender refused"])
def test_mail_refused_without_pipelining(reply: str) -> None:
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(txn("a@sink.test", "b@sink.test"))
    s.sent()
    (rejected,) = s.server(reply)
    assert isinstance(rejected, MailRejected)
    assert rejected.reply.code == int(reply[:3])
    assert s.sent() == "RSET\r\n"  # and no RCPT
    assert s.conn.can_start_transaction


def test_mail_refused_with_pipelining_ignores_answers_to_rcpt_and_data() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test", "b@sink.test"))
    s.sent()
    events = s.server("550 5.7.1 no", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 no")
    assert events == [MailRejected(Reply(550, "no", "5.7.1"))]
    assert s.sent() == "RSET\r\n"


@pytest.mark.parametrize("reply", ["451 4.3.0 later", "554 5.5.1 no"])
def test_data_refused_decides_every_accepted_recipient(reply: str) -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test", "b@sink.test"))
    s.sent()
    events = s.server("250 ok", "250 ok", "550 no b", reply)
    refused = events[2]
    assert isinstance(refused, DeliveryResult) and refused.index == 0
    assert refused.reply.code == int(reply[:3])
    assert events[3] == TransactionResult(((0, refused.reply),), "data")
    assert s.sent() == "RSET\r\n"


@pytest.mark.parametrize("reply", ["451 4.3.0 later", "552 5.3.4 too big"])
def test_final_refusal_applies_to_all_accepted_recipients(reply: str) -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test", "b@sink.test"))
    s.sent()
    s.server("250 ok", "250 ok", "250 ok", "354 go")
    s.conn.send_body(b"x\r\n")
    s.sent()
    events = s.server(reply)
    final = events[-1]
    assert isinstance(final, TransactionResult)
    assert [index for index, _ in final.results] == [0, 1]
    assert {r.code for _, r in final.results} == {int(reply[:3])}
    assert s.sent() == ""
    assert s.conn.can_start_transaction


def test_consecutive_rcpt_failures_are_counted_across_transactions() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@x", "b@x"))
    s.server("250 ok", "550 no", "550 no", "503 no")
    assert s.conn.consecutive_rcpt_failures == 2
    s.server("250 reset")
    s.conn.start_transaction(txn("c@x", "d@x"))
    s.server("250 ok", "550 no", "250 ok", "354 go")
    assert s.conn.consecutive_rcpt_failures == 0


# ---- LMTP --------------------------------------------------------------------------------------


def lmtp_session() -> Session:
    return Session(["250-lmtp.test", "250-PIPELINING", "250 ENHANCEDSTATUSCODES"], lmtp=True)


def test_lmtp_one_reply_per_accepted_recipient_after_the_dot() -> None:
    s = lmtp_session()
    s.conn.start_transaction(txn("alice@lmtp.test", "nobody@lmtp.test", "bob@lmtp.test"))
    assert s.sent().endswith("DATA\r\n")
    s.server("250 ok", "250 ok", "550 5.1.1 unknown", "250 ok", "354 go")
    s.conn.send_body(b"hello\r\n")
    assert s.sent() == "hello\r\n.\r\n"
    # Replies come one by one; each decides its own recipient at once.
    assert s.server("250 2.0.0 <alice> saved") == [
        DeliveryResult(0, Reply(250, "<alice> saved", "2.0.0"))
    ]
    quota = Reply(552, "<bob> mailbox full", "5.2.2")
    events = s.server("552 5.2.2 <bob> mailbox full")
    assert events == [
        DeliveryResult(2, quota),
        TransactionResult(((0, Reply(250, "<alice> saved", "2.0.0")), (2, quota)), "eom"),
    ]
    # A 5xx after the dot is permanent for that recipient (not a tempfail of everything).
    assert quota.permanent
    assert s.conn.can_start_transaction


def test_lmtp_connection_lost_between_replies_keeps_the_decided_ones() -> None:
    s = lmtp_session()
    s.conn.start_transaction(txn("a@lmtp.test", "b@lmtp.test"))
    s.server("250 ok", "250 ok", "250 ok", "354 go")
    s.conn.send_body(b"x\r\n")
    assert s.server("250 a saved") == [DeliveryResult(0, Reply(250, "a saved"))]
    s.conn.receive_data(b"")
    (failed,) = s.events()
    assert isinstance(failed, SessionFailed)


# ---- connection reuse and QUIT ------------------------------------------------------------------


def test_two_transactions_in_one_session_then_quit() -> None:
    # The smtp-sink view in smtpd-mta-trace.txt: MAIL/RCPT/DATA/. twice, then QUIT.
    s = Session(EHLO_SIMPLE)
    log = []
    for sender in ("alice@example.test", "bob@example.test"):
        s.conn.start_transaction(txn("dave@sink.test", sender=sender))
        for reply in ("250 2.1.0 Ok", "250 2.1.5 Ok", "354 go"):
            log.append(s.sent())
            s.server(reply)
        s.conn.send_body(b"body\r\n")
        log.append(s.sent())
        assert isinstance(s.server("250 2.0.0 Ok")[-1], TransactionResult)
    s.conn.quit()
    log.append(s.sent())
    assert log == [
        "MAIL FROM:<alice@example.test>\r\n",
        "RCPT TO:<dave@sink.test>\r\n",
        "DATA\r\n",
        "body\r\n.\r\n",
        "MAIL FROM:<bob@example.test>\r\n",
        "RCPT TO:<dave@sink.test>\r\n",
        "DATA\r\n",
        "body\r\n.\r\n",
        "QUIT\r\n",
    ]
    assert s.server("221 2.0.0 Bye") == [Closed()]


def test_next_transaction_pipelines_behind_a_pending_rset() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    s.sent()
    s.server("451 4.3.0 later")  # MAIL refused; RCPT and DATA answers still due
    s.conn.start_transaction(txn("b@sink.test"))
    assert s.sent() == ""
    s.server("503 no", "503 no")
    assert s.sent() == "RSET\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<b@sink.test>\r\nDATA\r\n"
    events = s.server("250 reset", "250 ok", "250 ok", "354 go")
    assert events == [RecipientResult(0, Reply(250, "ok")), DataReady()]


def test_quit_during_a_transaction_waits_for_its_replies() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    s.sent()
    s.conn.quit()
    assert s.sent() == ""  # DATA is still pending
    s.server("250 ok", "250 ok", "354 go")
    s.conn.send_body(b"x\r\n")
    assert s.sent() == "x\r\n.\r\n"  # not QUIT in the middle of the body
    events = s.server("250 ok")
    assert isinstance(events[-1], TransactionResult)
    assert s.sent() == "QUIT\r\n"
    assert s.server("221 bye") == [Closed()]


def test_eof_in_the_middle_of_a_transaction_fails() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    s.conn.quit()
    s.server("250 ok")
    s.conn.receive_data(b"")
    (failed,) = s.events()
    assert isinstance(failed, SessionFailed) and "closed" in failed.reason


def test_reply_while_waiting_for_the_body_is_a_violation() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    s.server("250 ok", "250 ok", "354 go")
    (failed,) = s.server("250 what body")
    assert isinstance(failed, SessionFailed) and failed.reason == "unexpected reply"


# ---- caller mistakes --------------------------------------------------------------------------


def test_body_before_data_ready_is_a_caller_error() -> None:
    s = Session(EHLO_PIPELINING)
    with pytest.raises(ClientProtocolError):
        s.conn.send_body(b"x")
    s.conn.start_transaction(txn("a@sink.test"))
    with pytest.raises(ClientProtocolError):
        s.conn.end_body()


def test_second_transaction_while_one_is_running_is_a_caller_error() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    with pytest.raises(ClientProtocolError):
        s.conn.start_transaction(txn("b@sink.test"))


def test_quit_while_the_body_is_due_is_a_caller_error() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.start_transaction(txn("a@sink.test"))
    s.server("250 ok", "250 ok", "354 go")
    with pytest.raises(ClientProtocolError):
        s.conn.quit()


def test_no_transaction_after_quit() -> None:
    s = Session(EHLO_PIPELINING)
    s.conn.quit()
    assert not s.conn.can_start_transaction
    with pytest.raises(ClientProtocolError):
        s.conn.start_transaction(txn("a@sink.test"))


def test_a_2xx_answer_to_data_also_starts_the_body() -> None:
    # OpenSMTPD's mta goes to the body on any 2xx/3xx answer to DATA; so do we.
    s = Session(EHLO_SIMPLE)
    s.conn.start_transaction(txn("a@sink.test"))
    s.server("250 ok")
    s.server("250 ok")
    assert s.server("250 send it") == [DataReady()]
