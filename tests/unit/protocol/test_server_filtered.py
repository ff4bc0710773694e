"""ServerConfig.filtered_commands: RSET, QUIT, NOOP and HELP become FilteredCommand events
the application answers (filtered sessions ask their filters); AUTH keeps its arguments."""

from __future__ import annotations

import base64

from pigeon.protocol.replies import Reply
from pigeon.protocol.server import (
    AuthCredentials,
    CommandRejected,
    Event,
    FilteredCommand,
    Quit,
    Reset,
    ServerConfig,
    ServerConnection,
)

FILTERED = ServerConfig("mx.test", filtered_commands=frozenset({"RSET", "QUIT", "NOOP", "HELP"}))


def started(config: ServerConfig = FILTERED, *, tls: bool = False) -> ServerConnection:
    conn = ServerConnection(config, tls_active=tls, peer="192.0.2.1")
    conn.greeting()
    conn.receive_data(b"EHLO client.test\r\n")
    event = conn.next_event()
    assert event is not None
    conn.accept()
    conn.data_to_send()
    return conn


def feed(conn: ServerConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    events = []
    for _ in range(20):
        event = conn.next_event()
        if event is None:
            break
        events.append(event)
    return events


def test_noop_waits_for_the_answer_then_runs() -> None:
    conn = started()
    assert feed(conn, b"NOOP\r\nHELP\r\n") == [FilteredCommand("NOOP")]
    assert conn.data_to_send() == b""  # nothing until the application answers
    assert conn.next_event() is None  # HELP waits behind it
    conn.accept()
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n"
    assert conn.next_event() == FilteredCommand("HELP")
    conn.reject(Reply(502, "not today", "5.5.1"))
    assert conn.data_to_send() == b"502 5.5.1 not today\r\n"


def test_rset_accepted_resets_and_yields_reset() -> None:
    conn = started()
    feed(conn, b"MAIL FROM:<a@b.test>\r\n")
    conn.accept()
    assert conn.in_transaction
    assert feed(conn, b"RSET\r\n") == [FilteredCommand("RSET")]
    assert conn.in_transaction  # not yet: the filters may refuse it
    conn.accept()
    assert conn.next_event() == Reset()
    assert not conn.in_transaction
    assert conn.data_to_send().endswith(b"250 2.0.0 Reset state\r\n")


def test_rejected_rset_keeps_the_transaction() -> None:
    conn = started()
    feed(conn, b"MAIL FROM:<a@b.test>\r\n")
    conn.accept()
    feed(conn, b"RSET\r\n")
    conn.reject(Reply(550, "no reset for you", "5.7.1"))
    assert conn.in_transaction and conn.next_event() is None


def test_quit_accepted_closes() -> None:
    conn = started()
    assert feed(conn, b"QUIT\r\n") == [FilteredCommand("QUIT")]
    assert not conn.closed
    conn.accept()
    assert conn.next_event() == Quit()
    assert conn.closed and conn.data_to_send() == b"221 2.0.0 Bye\r\n"


def test_a_421_reject_closes_the_session() -> None:
    conn = started()
    feed(conn, b"NOOP\r\n")
    conn.reject(Reply(421, "filter failure", "4.3.0"))
    assert conn.closed


def test_invalid_commands_are_refused_without_asking() -> None:
    conn = started()
    events = feed(conn, b"HELP me\r\nNOOP\r\n")
    assert isinstance(events[0], CommandRejected) and events[1] == FilteredCommand("NOOP")


def test_unfiltered_config_answers_at_once() -> None:
    conn = started(ServerConfig("mx.test"))
    assert feed(conn, b"NOOP\r\nRSET\r\n") == [Reset()]
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n250 2.0.0 Reset state\r\n"


def test_auth_credentials_keep_the_arguments_as_sent() -> None:
    config = ServerConfig("mx.test", auth_mechanisms=("PLAIN", "LOGIN"))
    conn = started(config, tls=True)
    blob = base64.b64encode(b"\0alice\0pw").decode()
    (event,) = feed(conn, f"AUTH plain {blob}\r\n".encode())
    assert isinstance(event, AuthCredentials)
    assert event.arguments == f"plain {blob}"
    conn.accept()
    conn2 = started(config, tls=True)
    feed(conn2, b"AUTH LOGIN\r\n" + base64.b64encode(b"bob") + b"\r\n")
    (login,) = feed(conn2, base64.b64encode(b"pw") + b"\r\n")
    assert isinstance(login, AuthCredentials) and login.arguments == "LOGIN"


AUTH_FILTERED = ServerConfig(
    "mx.test",
    auth_mechanisms=("PLAIN", "LOGIN"),
    filtered_commands=frozenset({"AUTH"}),
)


def test_a_filtered_auth_is_asked_at_the_command_before_any_credential() -> None:
    """As smtpd's auth filter phase: AUTH LOGIN gets no 334 until the answer; refused, no
    credential is ever asked for."""
    conn = started(AUTH_FILTERED, tls=True)
    assert feed(conn, b"AUTH LOGIN\r\n") == [FilteredCommand("AUTH", "LOGIN")]
    assert conn.data_to_send() == b""
    conn.reject(Reply(535, "not from here", "5.7.8"))
    assert conn.data_to_send() == b"535 5.7.8 not from here\r\n"
    assert conn.authenticated_user is None
    # accepted: the challenges, then the credentials
    assert feed(conn, b"AUTH LOGIN\r\n") == [FilteredCommand("AUTH", "LOGIN")]
    conn.accept()
    assert conn.data_to_send() == b"334 VXNlcm5hbWU6\r\n"
    assert feed(conn, base64.b64encode(b"bob") + b"\r\n") == []
    assert conn.data_to_send() == b"334 UGFzc3dvcmQ6\r\n"
    (login,) = feed(conn, base64.b64encode(b"pw") + b"\r\n")
    assert login == AuthCredentials("LOGIN", "bob", "pw")


def test_a_filtered_auth_plain_with_its_response_keeps_the_arguments() -> None:
    conn = started(AUTH_FILTERED, tls=True)
    blob = base64.b64encode(b"\0alice\0pw").decode()
    assert feed(conn, f"AUTH PLAIN {blob}\r\n".encode()) == [
        FilteredCommand("AUTH", f"PLAIN {blob}")
    ]
    conn.accept()
    event = conn.next_event()
    assert event == AuthCredentials("PLAIN", "alice", "pw") and event.arguments == f"PLAIN {blob}"


def test_an_invalid_auth_is_refused_without_asking() -> None:
    conn = started(AUTH_FILTERED, tls=True)
    events = feed(conn, b"AUTH CRAM-MD5\r\nAUTH\r\n")
    assert [type(e) for e in events] == [CommandRejected, CommandRejected]
    assert conn.data_to_send().startswith(b"504 ")
