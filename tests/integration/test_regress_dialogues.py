"""The SMTP dialogues of OpenSMTPD's old regression suite (regress/smtp: greeting, HELO and
EHLO, MAIL FROM and RCPT TO address forms and parameters, command order, RSET, the
100-messages-per-session limit), replayed over a socket against a running daemon.

Each step is a line sent or a reply class expected: ``ok`` is 2xx or 3xx, ``helo`` a 250,
``permfail`` 5xx, ``tempfail`` 4xx, ``closed`` the server hanging up. Where today's
OpenSMTPD (6.8, checked side by side) answers differently from the old suite, Pigeon
follows today's: ``MAIL FROM:<a>`` is taken as ``a@<hostname>``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from harness import PigeonDaemon, Workdir, free_port

Step = tuple[str, str]  # ("send", line) or ("expect", reply class)

CLASSES = {"ok": "23", "helo": "2", "permfail": "5", "tempfail": "4"}


def send(line: str) -> Step:
    return ("send", line)


def expect(kind: str) -> Step:
    return ("expect", kind)


GREETING = [expect("ok")]
HELO = [*GREETING, send("HELO regress"), expect("helo")]
EHLO = [*GREETING, send("EHLO l"), expect("helo")]
NULL_SENDER = [*HELO, send("MAIL FROM: <>"), expect("ok")]
SENDER = "MAIL FROM:<opensmtpd@opensmtpd.org>"


def mail_from(arg: str, kind: str) -> list[Step]:
    return [*HELO, send(f"MAIL FROM: {arg}"), expect(kind)]


def rcpt_to(arg: str, kind: str) -> list[Step]:
    return [*NULL_SENDER, send(f"RCPT TO: {arg}"), expect(kind)]


def one_message(pipelined: bool) -> list[Step]:
    commands = ["MAIL FROM: <eric@blabla>", "RCPT TO: <root@localhost>", "DATA"]
    if pipelined:
        head = [*map(send, commands), *[expect("ok")] * 3]
    else:
        head = [step for c in commands for step in (send(c), expect("ok"))]
    return [*head, send("foo"), send("."), expect("ok")]


DIALOGUES: dict[str, list[Step]] = {
    "mailfrom.empty": mail_from("<>", "ok"),
    "mailfrom.at-sign": mail_from("<@>", "ok"),  # the null sender too
    "mailfrom.no-at-sign": mail_from("<a>", "ok"),  # a@<hostname>, as OpenSMTPD 6.8
    "mailfrom.no-domain": mail_from("<a@>", "permfail"),
    "mailfrom.no-user": mail_from("<@a>", "permfail"),
    "mailfrom.src-route": mail_from("<whatever:a@a>", "ok"),
    "mailfrom.src-route-no-user": mail_from("<a:@a>", "permfail"),
    "mailfrom.space-as-user": mail_from("< @a>", "permfail"),
    "mailfrom.space-as-domain": mail_from("<a@ >", "permfail"),
    "mailfrom.option": mail_from("<user@domain> OPT", "permfail"),
    "mailfrom.option-size": mail_from("<user@domain> SIZE=3005", "ok"),
    "mailfrom.option-7bit": mail_from("<user@domain> BODY=7BIT", "ok"),
    "mailfrom.option-8bitmime": mail_from("<user@domain> BODY=8BITMIME", "ok"),
    "mailfrom.option-8bitmime-size": mail_from("<user@domain> BODY=8BITMIME SIZE=100", "ok"),
    "mailfrom.option-auth": mail_from("<user@domain> AUTH=WHATEVER", "ok"),
    "rcptto.empty": rcpt_to("<>", "permfail"),
    "rcptto.at-sign": rcpt_to("<@>", "permfail"),
    "rcptto.no-at-sign": rcpt_to("<a>", "permfail"),
    "rcptto.no-domain": rcpt_to("<a@>", "permfail"),
    "rcptto.no-user": rcpt_to("<@a>", "permfail"),
    "rcptto.src-route": rcpt_to("<whatever:a@a>", "ok"),
    "rcptto.src-route-no-user": rcpt_to("<a:@a>", "permfail"),
    "rcptto.space-as-user": rcpt_to("< @a>", "permfail"),
    "rcptto.space-as-domain": rcpt_to("<a@ >", "permfail"),
    "rcptto.option": rcpt_to("<user@domain> OPT", "permfail"),
    "rcptto.option-size": rcpt_to("<user@domain> SIZE=3005", "permfail"),
    "rcptto.option-7bit": rcpt_to("<user@domain> BODY=7BIT", "permfail"),
    "rcptto.option-8bitmime": rcpt_to("<user@domain> BODY=8BITMIME", "permfail"),
    "rcptto.option-auth": rcpt_to("<user@domain> AUTH=WHATEVER", "permfail"),
    "quit": [*GREETING, send("QUIT"), expect("ok"), expect("closed")],
    "helo.empty": [*GREETING, send("HELO"), expect("permfail")],
    "ehlo.empty": [*GREETING, send("EHLO"), expect("permfail")],
    "helo.space": [*GREETING, send("HELO "), expect("permfail")],
    "helo.leading-space": [*GREETING, send(" HELO "), expect("permfail")],
    "helo.one-letter": [*GREETING, send("HELO l"), expect("helo")],
    "ehlo.one-letter": EHLO,
    "mail.before-helo": [*GREETING, send("MAIL FROM: <me@localhost>"), expect("permfail")],
    "rcpt.before-mail": [*EHLO, send("RCPT TO:"), expect("permfail")],
    "data.before-mail": [*EHLO, send("DATA"), expect("permfail")],
    "mail.no-colon": [*EHLO, send("MAIL FROM"), expect("permfail")],
    "data.before-rcpt": [*EHLO, send(SENDER), expect("ok"), send("DATA"), expect("permfail")],
    "rcpt.empty": [*EHLO, send(SENDER), expect("ok"), send("RCPT TO:"), expect("permfail")],
    "rset.then-data": [
        *EHLO,
        *(send(SENDER), expect("ok"), send("RCPT TO:<root@localhost>"), expect("ok")),
        *(send("RSET"), expect("ok"), send("DATA"), expect("permfail")),
    ],
    "rset.then-mail-data": [
        *EHLO,
        *(send(SENDER), expect("ok"), send("RCPT TO:<root@localhost>"), expect("ok")),
        *(send("RSET"), expect("ok"), send(SENDER), expect("ok")),
        *(send("DATA"), expect("permfail")),
    ],
    "rset.then-full": [
        *EHLO,
        *(send(SENDER), expect("ok"), send("RCPT TO:<root@localhost>"), expect("ok")),
        *(send("RSET"), expect("ok"), send(SENDER), expect("ok")),
        *(send("RCPT TO:<root@localhost>"), expect("ok"), send("DATA"), expect("ok")),
    ],
    "mail.size": [*EHLO, send(f"{SENDER} SIZE=1000"), expect("ok")],
    "message": [*EHLO, *one_message(False), send("QUIT"), expect("ok"), expect("closed")],
    "message.pipelined": [
        *EHLO,
        *one_message(True),
        *(send("QUIT"), expect("ok"), expect("closed")),
    ],
    "limit.100-messages": [
        *EHLO,
        *(one_message(False) * 100),
        *(send("MAIL FROM: <eric@blabla>"), expect("tempfail")),
    ],
}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    work = Workdir()
    port = free_port()
    # Mail is only queued (delivery paused): these dialogues are about the SMTP side.
    config = f"""
listen on 127.0.0.1 port {port}
action "local" mbox
action "out" relay
match from local for local action "local"
match from local for any action "out"
"""
    daemon = PigeonDaemon(work.path, config, port=port, extra=["-P", "mda", "-P", "mta"])
    daemon.start()
    try:
        yield port
    finally:
        daemon.stop()
        work.cleanup()


def play(port: int, steps: list[Step]) -> list[str]:
    """Runs the dialogue; returns what went wrong (empty when it went as expected)."""
    problems: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        replies = sock.makefile("rb")

        def last_line() -> str | None:
            while True:
                try:
                    line = replies.readline()
                except (TimeoutError, ConnectionResetError):
                    return None
                if not line:
                    return None
                if line[3:4] != b"-":
                    return line.decode("utf-8", "replace").rstrip("\r\n")

        for number, (what, arg) in enumerate(steps):
            if what == "send":
                sock.sendall(arg.encode() + b"\r\n")
                continue
            line = last_line()
            if arg == "closed":
                if line is not None:
                    problems.append(f"step {number}: expected the server to close, got {line!r}")
                continue
            if line is None:
                problems.append(f"step {number}: expected {arg}, the connection ended")
                break
            if line[:1] not in CLASSES[arg] or (arg == "helo" and not line.startswith("250")):
                problems.append(f"step {number}: expected {arg}, got {line!r}")
    return problems


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_regress_dialogue(port: int, name: str) -> None:
    assert play(port, DIALOGUES[name]) == []
