"""Against a real rspamd on 127.0.0.1: the client alone (HTTP and unix socket), then
``pigeon-filter-rspamd`` (proc-exec) and the built-in ``filter NAME rspamd`` form in a real
Pigeon daemon, with real SMTP."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from rspamdserver import (
    GTUBE,
    GTUBE_ADD_HEADER,
    GTUBE_REWRITE_SUBJECT,
    RspamdServer,
    shared_rspamd,
)

from pigeon.filters.rspamd import RspamdScanner, RspamdSettings, ScanContext, ScanOutcome, Verdict

HOSTNAME = "mx.example.test"
CTX = ScanContext(
    ip="192.0.2.10",
    hostname="client.example.org",
    helo="client.example.org",
    mail_from="alice@example.org",
    rcpts=("bob@example.test",),
    queue_id="0a1b2c3d",
    mta_name=HOSTNAME,
)


def message(body: str, subject: str = "hello") -> list[str]:
    return [
        "From: Alice <alice@example.org>",
        "To: bob@example.test",
        f"Subject: {subject}",
        "Date: Tue, 24 Nov 2026 20:00:00 +0000",
        "Message-ID: <real-test@example.org>",
        "X-Spam: bogus-preexisting",
        "",
        body,
        "..",
    ]


@pytest.fixture(scope="module")
def rspamd() -> RspamdServer:
    return shared_rspamd()


def scan(url: str, lines: list[str]) -> ScanOutcome:
    scanner = RspamdScanner(RspamdSettings(url=url))
    return asyncio.run(asyncio.wait_for(scanner.scan(CTX, lines), 60))


def test_clean_message_gets_rspamds_headers(rspamd: RspamdServer) -> None:
    outcome = scan(rspamd.url, message("Hello Bob, a clean message."))
    assert outcome.error is None, rspamd.log()[-2000:]
    assert outcome.verdict is Verdict.ACCEPT and outcome.action == "no action"
    head = outcome.lines[: outcome.lines.index("")]
    # MTA-Name reached rspamd: it is the authserv-id of Authentication-Results.
    assert any(h.startswith(f"Authentication-Results: {HOSTNAME}") for h in head)
    assert any(h.startswith("X-Rspamd-Queue-Id: 0a1b2c3d") for h in head)
    assert "X-Spam: bogus-preexisting" not in head  # rspamd asked to remove it
    assert any(h.startswith("X-Spam-Action: no action") for h in head)


def test_gtube_is_rejected_with_rspamds_message(rspamd: RspamdServer) -> None:
    outcome = scan(rspamd.url, message(GTUBE))
    assert (outcome.verdict, outcome.reply) == (Verdict.REJECT, "550 Gtube pattern")


def test_gtube_add_header_variant_is_junk(rspamd: RspamdServer) -> None:
    outcome = scan(rspamd.url, message(GTUBE_ADD_HEADER))
    head = outcome.lines[: outcome.lines.index("")]
    assert outcome.verdict is Verdict.JUNK
    assert "X-Spam: yes" in head and "X-Spam-Action: add header" in head
    assert any(h.startswith("X-Spam-Score: 6 / ") for h in head)


def test_gtube_rewrite_subject_over_the_unix_socket(rspamd: RspamdServer) -> None:
    outcome = scan(rspamd.socket_path, message(GTUBE_REWRITE_SUBJECT, subject="buy now"))
    assert outcome.verdict is Verdict.REWRITE_SUBJECT
    assert "Subject: *** SPAM *** buy now" in outcome.lines


# -- Pigeon with pigeon-filter-rspamd as a proc-exec filter ---------------------------------


class Site:
    def __init__(self, rspamd_url: str, *, builtin: bool = False) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"bob {uid}:{gid}:{self.mail / 'bob'}\n")
        self.port = free_port()
        command = f"{sys.executable} -m pigeon.filters.rspamd_cli -url {rspamd_url}"
        declaration = (
            f'filter "rspamd" rspamd url "{rspamd_url}" map greylist tempfail'
            if builtin
            else f'filter "rspamd" proc-exec "{command}"'
        )
        config = f"""
table users file:{users}
{declaration}
listen on 127.0.0.1 port {self.port} hostname {HOSTNAME} filter "rspamd"
action "local" maildir userbase <users>
match from any for domain "{HOSTNAME}" action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    @property
    def maildir(self) -> Path:
        return self.mail / "bob" / "Maildir"


@pytest.fixture(scope="module", params=["proc-exec", "builtin"])
def site(rspamd: RspamdServer, request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(rspamd.url, builtin=request.param == "builtin")
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def send(site: Site, body: str, subject: str) -> tuple[int, bytes]:
    text = "\r\n".join(message(body, subject)[:-1]).replace("bob@example.test", f"bob@{HOSTNAME}")
    with smtplib.SMTP("127.0.0.1", site.port, timeout=60) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt(f"bob@{HOSTNAME}")
        return client.data(text.encode())


def delivered(site: Site, subject_part: str) -> email.message.Message:
    def find() -> email.message.Message | None:
        for raw in maildir_messages(site.maildir) if site.maildir.exists() else []:
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            if subject_part in str(msg["Subject"]):
                return msg
        return None

    wait_for(lambda: find() is not None, timeout=30, what=f"delivery of {subject_part!r}")
    found = find()
    assert found is not None
    return found


def test_pigeon_delivers_clean_mail_with_rspamd_headers(site: Site) -> None:
    code, _ = send(site, "A perfectly clean message.", "clean one")
    assert code == 250, site.daemon.log()[-3000:]
    msg = delivered(site, "clean one")
    assert str(msg["Authentication-Results"]).startswith(HOSTNAME)
    assert msg["X-Spam-Action"] == "no action"
    assert msg["X-Spam"] is None


def test_pigeon_rejects_gtube_with_550_and_keeps_the_session(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=60) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt(f"bob@{HOSTNAME}")
        code, text = client.data(f"Subject: gtube\r\n\r\n{GTUBE}\r\n".encode())
        assert (code, text) == (550, b"Gtube pattern"), site.daemon.log()[-3000:]
        assert client.noop()[0] == 250  # the connection stays up


def test_pigeon_junks_and_rewrites(site: Site) -> None:
    assert send(site, GTUBE_ADD_HEADER, "addheader one")[0] == 250
    assert send(site, GTUBE_REWRITE_SUBJECT, "rewrite one")[0] == 250
    junk = delivered(site, "addheader one")
    assert junk["X-Spam"] == "yes" and junk["X-Spam-Action"] == "add header"
    rewritten = delivered(site, "*** SPAM *** rewrite one")
    assert rewritten["X-Spam-Action"] == "rewrite subject"
