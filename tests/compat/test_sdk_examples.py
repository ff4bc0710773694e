"""The SDK's example filters (examples/filters/) under Debian's real OpenSMTPD 6.8 and
under Pigeon, with the same configuration lines: both MTAs must behave the same.

OpenSMTPD runs in a private mount namespace (tests/opensmtpd68.py) and needs root; CI runs
the suite as root. Under smtpd the filters run as root so that they import Pigeon's SDK
from this checkout, whoever owns it.
"""

from __future__ import annotations

import smtplib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from opensmtpd68 import OpenSmtpd68, skip_reason

EXAMPLES = Path(__file__).parents[2] / "examples" / "filters"
HOST = "mx.example.test"
LIMIT = 1


def filter_lines(ports: dict[str, int]) -> str:
    py = sys.executable
    return (
        f'filter stamp proc-exec "{py} {EXAMPLES / "add_header.py"} X-Stamp example" '
        "user root group root\n"
        f'filter sesslimit proc-exec "{py} {EXAMPLES / "session_limit.py"} {LIMIT}" '
        "user root group root\n"
        f"listen on 127.0.0.1 port {ports['stamp']} hostname {HOST} filter stamp\n"
        f"listen on 127.0.0.1 port {ports['limit']} hostname {HOST} filter sesslimit\n"
    )


class Mta:
    """One MTA under test: where to connect and where its mail lands."""

    def __init__(self, name: str, ports: dict[str, int], maildir: Path) -> None:
        self.name = name
        self.ports = ports
        self.maildir = maildir

    def find(self, subject: str) -> bytes:
        found: list[bytes] = []

        def arrived() -> bool:
            found[:] = [
                m for m in maildir_messages(self.maildir) if f"Subject: {subject}".encode() in m
            ]
            return bool(found)

        wait_for(arrived, timeout=30, what=f"{self.name} delivery of {subject}")
        return found[0]


@pytest.fixture(scope="module")
def smtpd() -> Iterator[Mta]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    ports = {"stamp": free_port(), "limit": free_port()}
    server = OpenSmtpd68(filter_lines(ports), ports["stamp"])
    try:
        server.wait_listening()
        yield Mta("smtpd", ports, server.maildir)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pigeon() -> Iterator[Mta]:
    work = Workdir()
    mail = work.mailroot()
    uid, gid = mail_uid_gid()
    (work.path / "users").write_text(f"bob {uid}:{gid}:{mail / 'bob'}\n")
    ports = {"stamp": free_port(), "limit": free_port()}
    config = (
        f"table users file:{work.path / 'users'}\n"
        + filter_lines(ports)
        + 'action "local" maildir userbase <users>\nmatch from any for any action "local"\n'
    )
    daemon = PigeonDaemon(work.path, config, port=ports["stamp"])
    daemon.start(timeout=30)
    try:
        yield Mta("pigeon", ports, mail / "bob" / "Maildir")
    finally:
        daemon.stop()
        work.cleanup()


@pytest.fixture(params=["smtpd", "pigeon"])
def mta(request: pytest.FixtureRequest) -> Mta:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def header_names(message: bytes) -> list[str]:
    """Header names in order, continuation lines folded in."""
    names = []
    for line in message.split(b"\n\n", 1)[0].split(b"\n"):
        if line[:1] not in (b" ", b"\t"):
            names.append(line.split(b":", 1)[0].decode())
    return names


def test_add_header_puts_its_header_right_after_received(mta: Mta) -> None:
    subject = f"stamped via {mta.name}"
    body = "first line\r\n.leading dot\r\nlast line\r\n"
    with smtplib.SMTP("127.0.0.1", mta.ports["stamp"], timeout=30) as client:
        client.ehlo("client.example.org")
        client.sendmail(
            "alice@example.org",
            [f"bob@{HOST}" if mta.name == "pigeon" else "bob@example.test"],
            f"From: alice@example.org\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Date: Tue, 24 Nov 2026 20:00:00 +0000\r\nMessage-ID: <{time.time()}@x.test>\r\n"
            f"\r\n{body}",
        )
    message = mta.find(subject)
    names = header_names(message)
    at = names.index("Received")
    assert names[at : at + 3] == ["Received", "X-Stamp", "From"]
    assert b"\nX-Stamp: example\n" in message
    assert message.split(b"\n\n", 1)[1] == body.replace("\r\n", "\n").encode()


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        return s.recv(200)


def test_session_limit_refuses_a_client_over_the_limit(mta: Mta) -> None:
    port = mta.ports["limit"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
        assert first.recv(200).startswith(b"220")
        second = _banner(port)
        assert second == b"421 4.7.0 too many sessions from your address (limit 1)\r\n"
    # The first session's link-disconnect report lowers the count again.
    wait_for(lambda: _banner(port).startswith(b"220"), timeout=10, what="the limit freed")
