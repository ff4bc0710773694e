"""Filter phases Pigeon once answered itself, the auth parameter, and the filtered local
socket listener (``listen on socket filter NAME``), through a real daemon."""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

HOST = "mx.phases.test"
BIN = Path(__file__).parent / "filterbin"
PASSWORD = "phases secret"
SENDMAIL = [sys.executable, "-m", "pigeon.sendmail"]


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        d = self.work.path
        self.mail = self.work.mailroot()
        self.log = self.work.mailroot("logs") / "phases.log"
        uid, gid = mail_uid_gid()
        (d / "users").write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        digest = subprocess.run(
            [sys.executable, "-m", "pigeon.control.cli", "encrypt", PASSWORD],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        (d / "creds").write_text(f"alice {digest}\n")
        cert = trustme.CA().issue_cert(HOST)
        cert.private_key_pem.write_to_path(str(d / "mx.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / "mx.crt"))
        self.port = free_port()
        self.smtps = free_port()
        config = f"""
pki {HOST} cert "{d / "mx.crt"}"
pki {HOST} key "{d / "mx.key"}"
table users file:{d / "users"}
table creds file:{d / "creds"}
proc phases "{sys.executable} {BIN / "phases.py"} {self.log}"
filter phases proc phases
filter sockjunk phase mail-from match mail-from regex {{ "^junk@" }} junk
filter local_chain chain {{ phases, sockjunk }}
listen on socket filter local_chain
listen on 127.0.0.1 port {self.port} hostname {HOST} filter phases
listen on 127.0.0.1 port {self.smtps} hostname {HOST} smtps pki {HOST} auth <creds> \\
    filter phases
action "local" maildir junk userbase <users>
match from any for any action "local"
"""
        self.daemon = PigeonDaemon(d, config, port=self.port)

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def sendmail(self, sender: str, subject: str) -> subprocess.CompletedProcess[bytes]:
        message = f"From: {sender}\nTo: alice@{HOST}\nSubject: {subject}\n\nhello\n".encode()
        return subprocess.run(
            [*SENDMAIL, "--spool", str(self.daemon.spool), "-f", sender, f"alice@{HOST}"],
            input=message,
            capture_output=True,
            timeout=30,
        )

    def find(self, subject: str) -> tuple[bytes, bool]:
        """(the delivered message, whether it was filed as junk)."""
        maildir = self.mail / "alice" / "Maildir"
        found: list[tuple[bytes, bool]] = []

        def arrived() -> bool:
            for junk, box in ((False, maildir), (True, maildir / ".Junk")):
                for m in maildir_messages(box):
                    if f"Subject: {subject}".encode() in m:
                        found.append((m, junk))
            return bool(found)

        wait_for(arrived, what=f"delivery of {subject}")
        return found[0]


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start(timeout=30)
    try:
        yield s
    finally:
        s.daemon.stop()
        s.work.cleanup()


def test_noop_and_help_are_decided_by_the_filter(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=15) as client:
        client.ehlo("client.example.net")
        assert client.noop() == (550, b"5.7.1 NOOP refused by filter")
        assert client.docmd("HELP") == (502, b"5.5.1 no help from the filter")
        assert client.docmd("HELP", "me")[0] == 500  # refused by syntax: no filter asked
        assert client.rset()[0] == 250
    assert "noop|" in site.lines() and "help|" in site.lines()
    assert site.lines().count("help|") == 1


def test_rset_and_quit_reach_the_filter(site: Site) -> None:
    before = site.lines()
    with smtplib.SMTP("127.0.0.1", site.port, timeout=15) as client:
        client.ehlo("client.example.net")
        client.mail("a@example.net")
        assert client.rset()[0] == 250
        assert client.quit()[0] == 221
    new = site.lines()[len(before) :]
    assert new.index("rset|") < new.index("quit|")


def test_auth_phase_gets_the_arguments_as_sent(site: Site) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", site.smtps, timeout=15, context=context) as client:
        client.ehlo("client.example.net")
        client.auth("PLAIN", lambda challenge=None: f"\0alice\0{PASSWORD}")
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert f"auth|PLAIN {blob}" in site.lines()


def test_link_tls_is_version_cipher_bits_as_smtpd(site: Site) -> None:
    """Three fields, as smtpd 6.8 and 7.x send (Pigeon sent a fourth, the client
    certificate check, which a filter reading the last field as the bits would choke on)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", site.smtps, timeout=15, context=context) as client:
        client.ehlo("client.example.net")
    wait_for(lambda: any(x.startswith("link-tls|") for x in site.lines()), what="link-tls")
    value = next(x for x in site.lines() if x.startswith("link-tls|")).split("|", 1)[1]
    version, cipher, bits = value.split(":")
    assert version.startswith("TLSv1.") and cipher and bits.isdigit()


def test_auth_phase_is_asked_at_the_command_before_credentials(site: Site) -> None:
    """As smtpd: a filter refusing AUTH LOGIN answers the AUTH line itself; no 334
    challenge, so the client never sends a credential."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", site.smtps, timeout=15, context=context) as client:
        client.ehlo("client.example.net")
        assert client.docmd("AUTH", "LOGIN") == (535, b"5.7.8 LOGIN refused by filter")
        assert client.rset()[0] == 250  # the session goes on
    assert "auth|LOGIN" in site.lines()


def test_local_socket_sessions_are_filtered(site: Site) -> None:
    refused = site.sendmail("refused@example.net", "socket-refused")
    assert refused.returncode != 0
    assert b"sender refused by filter" in refused.stderr
    ok = site.sendmail("ok@example.net", "socket-ok")
    assert ok.returncode == 0, ok.stderr
    message, junk = site.find("socket-ok")
    assert not junk and b"X-Spam" not in message
    assert "connect|localhost|local" in site.lines()


def test_builtin_junk_in_the_socket_listener_chain(site: Site) -> None:
    result = site.sendmail("junk@example.net", "socket-junk")
    assert result.returncode == 0, result.stderr
    message, junk = site.find("socket-junk")
    assert junk and b"X-Spam: yes" in message
