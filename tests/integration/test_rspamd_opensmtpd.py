"""Compat: ``pigeon-filter-rspamd`` under Debian's OpenSMTPD 6.8 against a real rspamd.

smtpd 6.8 has its spool (/var/spool/smtpd) and control socket (/var/run/smtpd.sock)
compiled in, so it runs in a private mount namespace (``unshare -m``) where a temporary
directory is bind-mounted over /var/spool and /run: nothing of the host is touched. Needs
root (smtpd refuses to start otherwise, and so does unshare -m).
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import sys
from collections.abc import Iterator

import pytest
from harness import free_port, maildir_messages, wait_for
from opensmtpd68 import OpenSmtpd68, skip_reason
from rspamdserver import GTUBE, GTUBE_ADD_HEADER, RspamdServer, shared_rspamd

HOSTNAME = "mx.example.test"


def start_smtpd(rspamd_url: str) -> OpenSmtpd68:
    port = free_port()
    # Run as root: the filter must import Pigeon from this checkout, whoever owns it.
    command = f"{sys.executable} -m pigeon.filters.rspamd_cli -url {rspamd_url}"
    return OpenSmtpd68(
        f'filter "rspamd" proc-exec "{command}" user root group root\n'
        f'listen on 127.0.0.1 port {port} hostname {HOSTNAME} filter "rspamd"\n',
        port,
    )


@pytest.fixture(scope="module")
def smtpd() -> Iterator[OpenSmtpd68]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    rspamd: RspamdServer = shared_rspamd()
    server = start_smtpd(rspamd.url)
    try:
        server.wait_listening()
        yield server
    finally:
        server.stop()


def _transaction(port: int, subject: str, body: str) -> tuple[int, bytes, int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@example.test")
        code, text = client.data(
            f"From: alice@example.org\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"X-Spam: forged\r\n\r\n{body}\r\n".encode()
        )
        return code, text, client.noop()[0]


def _delivered(smtpd: OpenSmtpd68, subject: str) -> email.message.Message:
    def find() -> email.message.Message | None:
        for raw in maildir_messages(smtpd.maildir):
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
            if msg["Subject"] == subject:
                return msg
        return None

    wait_for(lambda: find() is not None, timeout=30, what=f"smtpd delivery of {subject!r}")
    found = find()
    assert found is not None
    return found


def test_opensmtpd_delivers_clean_mail_scanned_by_pigeon_filter(smtpd: OpenSmtpd68) -> None:
    code, _, _ = _transaction(smtpd.port, "clean via smtpd", "Hello Bob.")
    assert code == 250, smtpd.log()[-3000:]
    msg = _delivered(smtpd, "clean via smtpd")
    assert str(msg["Authentication-Results"]).startswith(HOSTNAME)  # MTA-Name from smtpd
    assert msg["X-Spam-Action"] == "no action"
    assert msg.get_all("X-Spam") is None  # the forged one was removed on rspamd's request


def test_opensmtpd_rejects_gtube_and_keeps_the_session(smtpd: OpenSmtpd68) -> None:
    code, text, after = _transaction(smtpd.port, "gtube via smtpd", GTUBE)
    assert (code, text) == (550, b"Gtube pattern"), smtpd.log()[-3000:]
    assert after == 250


def test_opensmtpd_junk_mark_from_pigeon_filter(smtpd: OpenSmtpd68) -> None:
    code, _, _ = _transaction(smtpd.port, "junk via smtpd", GTUBE_ADD_HEADER)
    assert code == 250
    msg = _delivered(smtpd, "junk via smtpd")
    assert msg["X-Spam"] == "yes" and msg["X-Spam-Action"] == "add header"
