"""Debian's real OpenSMTPD filters, unmodified, under Pigeon (filter protocol 0.6 and 0.7).

filter-rspamd against a real rspamd (tests/rspamdserver.py), filter-dkimsign with a key made
here (verified with dkimpy). Skipped only when the Debian packages are missing; CI installs
them (Makefile TEST_DEBS).
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for
from rspamdserver import GTUBE, GTUBE_ADD_HEADER, shared_rspamd

LIBEXEC = Path("/usr/libexec/opensmtpd")
HOST = "mx.example.test"


def need(binary: str) -> Path:
    path = LIBEXEC / binary
    if not path.exists():
        pytest.skip(f"{path} missing (Debian package opensmtpd-{binary})")
    return path


class Site:
    def __init__(self, rspamd_url: str) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        uid, gid = mail_uid_gid()
        users = self.work.path / "users"
        users.write_text(f"alice {uid}:{gid}:{self.mail / 'alice'}\n")
        keydir = self.work.mailroot("dkim")
        self.key = keydir / "rsa.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(self.key), "2048"], check=True, capture_output=True
        )
        os.chmod(self.key, 0o644)  # the filter runs unprivileged
        self.ports = {name: free_port() for name in ("rspamd", "rspamd06", "dkim")}
        rspamd = need("filter-rspamd")
        dkim = need("filter-dkimsign")
        config = f"""
table users file:{users}
proc rsp "{rspamd} -url {rspamd_url}"
proc rsp06 "{rspamd} -url {rspamd_url}" protocol "0.6"
filter rspamd proc rsp
filter rspamd06 proc rsp06
filter dkimsign proc-exec "{dkim} -d example.test -s sel1 -k {self.key}"
listen on 127.0.0.1 port {self.ports["rspamd"]} hostname {HOST} filter rspamd
listen on 127.0.0.1 port {self.ports["rspamd06"]} hostname {HOST} filter rspamd06
listen on 127.0.0.1 port {self.ports["dkim"]} hostname {HOST} filter dkimsign
action "local" maildir junk userbase <users>
match from any for any action "local"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.ports["rspamd"])

    def find(self, subject: str) -> bytes:
        found: list[bytes] = []
        maildir = self.mail / "alice" / "Maildir"

        def arrived() -> bool:
            every = maildir_messages(maildir) + maildir_messages(maildir / ".Junk")
            found[:] = [m for m in every if f"Subject: {subject}".encode() in m]
            return bool(found)

        wait_for(arrived, what=subject)
        return found[0]

    def is_junk(self, subject: str) -> bool:
        junk = maildir_messages(self.mail / "alice" / "Maildir" / ".Junk")
        return any(f"Subject: {subject}".encode() in m for m in junk)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    need("filter-rspamd")
    need("filter-dkimsign")
    rspamd = shared_rspamd()
    s = Site(rspamd.url)
    s.daemon.start(timeout=30)
    yield s
    s.daemon.stop()
    s.work.cleanup()


def send(site: Site, listener: str, subject: str, body: str) -> None:
    with smtplib.SMTP("127.0.0.1", site.ports[listener], timeout=60) as client:
        client.ehlo("client.example.net")
        message = (
            f"From: bob@example.test\r\nTo: alice@{HOST}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.test>\r\n\r\n{body}\r\n"
        )
        client.sendmail("bob@example.test", [f"alice@{HOST}"], message)


# filter-rspamd 0.1.7 joins the lines it sends rspamd without a final newline, and rspamd
# does not see a test pattern on an unterminated last line: as under OpenSMTPD, the pattern
# must not be the message's last line.
TRAILER = "\r\n-- \r\nsent by the compat test"


@pytest.mark.parametrize("listener", ["rspamd", "rspamd06"])
def test_rspamd_gtube_is_rejected_with_550(site: Site, listener: str) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(site, listener, f"gtube-{listener}", GTUBE + TRAILER)
    assert info.value.smtp_code == 550
    assert b"Gtube" in info.value.smtp_error or b"spam" in info.value.smtp_error.lower()


@pytest.mark.parametrize("listener", ["rspamd", "rspamd06"])
def test_rspamd_add_header_delivers_with_x_spam_yes(site: Site, listener: str) -> None:
    subject = f"addheader-{listener}"
    send(site, listener, subject, GTUBE_ADD_HEADER + TRAILER)
    message = site.find(subject)
    assert b"X-Spam: yes" in message
    assert site.is_junk(subject)


def test_rspamd_clean_message_gets_rspamd_headers(site: Site) -> None:
    send(site, "rspamd", "clean", "just a friendly note")
    message = site.find("clean")
    assert b"X-Spam" not in message.split(b"\n\n", 1)[0].replace(b"X-Spamd-Bar", b"")
    assert not site.is_junk("clean")


def test_dkimsign_signature_verifies(site: Site) -> None:
    dkim = pytest.importorskip("dkim")
    send(site, "dkim", "signed", "signed body\r\n.leading dot")
    message = site.find("signed")
    assert b"DKIM-Signature:" in message
    public = subprocess.run(
        ["openssl", "rsa", "-in", str(site.key), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name.startswith(b"sel1._domainkey.example.test")
        return record

    # Verify what was signed: drop the lines the delivery agent added on top.
    lines = message.split(b"\n")
    while not lines[0].startswith((b"DKIM-Signature", b"Received", b"X-Spam")):
        lines.pop(0)
    signed = b"\r\n".join(lines)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
