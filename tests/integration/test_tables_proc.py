"""A Python proc table written with pigeon.sdk (examples/tables/table-virtual) serves domains,
virtual users, user info and credentials to a running Pigeon: delivery and AUTH both go
through it, and ``pigeon update table`` reloads it without a restart."""

from __future__ import annotations

import smtplib
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid, maildir_messages, wait_for

EXAMPLE = Path(__file__).parents[2] / "examples" / "tables" / "table-virtual"
# `secret6`, sha512-crypt (tables.md section 1.6)
HASH6 = (
    "$6$abcdefgh12345678$Yd5tts/c7.odSLs/KyYTExCV88lJuDPUQESwL2Ww2qRDn6Kfp/uFX9UfsuuCucPOZ5"
    "/IGBVVtIwY/S.YhZ5vb0"
)


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        self.maildir = self.mail / "vmail"
        uid, gid = mail_uid_gid()
        self.users = self.work.path / "virtual-users"
        self.base_users = (
            f"bob@example.org {HASH6} vmail\n"
            "abuse@example.org - bob@example.org\n"
            f"@userinfo vmail {uid}:{gid}:{self.mail}\n"
        )
        self.users.write_text(self.base_users)
        self.users.chmod(0o644)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("mx.example.org", "127.0.0.1")
        cert_path = self.work.path / "cert.pem"
        key_path = self.work.path / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        self.port = free_port()
        command = f"{sys.executable} {EXAMPLE} {self.users}"
        config = f"""pki mx.example.org cert "{cert_path}"
pki mx.example.org key "{key_path}"
table vusers proc-exec "{command}"
listen on 127.0.0.1 port {self.port} hostname mx.example.org tls pki mx.example.org \
    auth-optional <vusers>
action "vmail" maildir "{self.maildir}" virtual <vusers> userbase <vusers>
match from any for domain <vusers> action "vmail"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.port)

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.work.cleanup()


def delivered(site: Site) -> list[bytes]:
    return maildir_messages(site.maildir)


def test_virtual_delivery_goes_through_the_proc_table(site: Site) -> None:
    before = len(delivered(site))
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("someone@remote.test", ["Abuse@Example.org"], "Subject: t1\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("someone@remote.test", ["x@elsewhere.test"], "Subject: no\r\n\r\n")
    wait_for(lambda: len(delivered(site)) == before + 1, what="delivery to vmail")
    assert b"Subject: t1" in delivered(site)[-1]


def test_auth_checks_credentials_from_the_proc_table(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.starttls(context=site.tls())
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login("bob@example.org", "wrong")
        assert refused.value.smtp_code == 535
    before = len(delivered(site))
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.starttls(context=site.tls())
        code, _ = client.login("Bob@Example.org", "secret6")
        assert code == 235
        client.sendmail("bob@example.org", ["bob@example.org"], "Subject: t2\r\n\r\nx\r\n")
    wait_for(lambda: len(delivered(site)) == before + 1, what="authenticated delivery")
    assert "smtp authentication user=Bob@Example.org result=ok" in site.daemon.log()


def test_update_table_reloads_without_restart(site: Site) -> None:
    with (
        smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused),
    ):
        client.sendmail("a@remote.test", ["carol@example.net"], "Subject: early\r\n\r\n")
    site.users.write_text(site.base_users + "carol@example.net - bob@example.org\n")
    site.daemon.ctl("update", "table", "vusers")
    before = len(delivered(site))
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("a@remote.test", ["carol@example.net"], "Subject: t3\r\n\r\nx\r\n")
    wait_for(lambda: len(delivered(site)) == before + 1, what="delivery after update")
    result = site.daemon.ctl("update", "table", "nosuch", check=False)
    assert result.returncode != 0 and "no such table" in result.stderr
