"""Debian's opensmtpd-extras tables (the old imsg table API of OpenSMTPD 6.x) run unchanged:
``table users passwd:/etc/mail/passwd`` as a Debian host with smtpd 6.8 has it."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from harness import (
    PigeonDaemon,
    Workdir,
    free_port,
    mail_uid_gid,
    maildir_messages,
    pigeon_encrypt,
    wait_for,
)

from pigeon.config.model import TableDecl
from pigeon.procs import ProcCommand
from pigeon.tables.base import Service, TableError
from pigeon.tables.imsg import ImsgTable, speaks_imsg
from pigeon.tables.proc import ProcTable, proc_from_decl

EXTRAS = Path("/usr/libexec/opensmtpd")
TABLE_PASSWD = EXTRAS / "table-passwd"
TABLE_SQLITE = EXTRAS / "table-sqlite"
MX = "mx.extras.test"
PASSWORD = "bob's old-table secret"

pytestmark = pytest.mark.skipif(
    not os.access(TABLE_PASSWD, os.X_OK), reason="Debian package opensmtpd-extras not installed"
)


class Site:
    def __init__(self) -> None:
        self.work = Workdir()
        self.mail = self.work.mailroot()
        d = self.work.path
        uid, gid = mail_uid_gid()
        self.hash = pigeon_encrypt(PASSWORD)
        self.passwd = d / "passwd"
        self.passwd.write_text(
            f"bob:{self.hash}:{uid}:{gid}::{self.mail / 'bob'}:/bin/sh\n"
            f"carol:*:{uid}:{gid}::{self.mail / 'carol'}:/bin/sh\n"
        )
        self.passwd.chmod(0o644)
        ca = trustme.CA()
        cert = ca.issue_cert(MX)
        cert.private_key_pem.write_to_path(str(d / "mx.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / "mx.crt"))
        self.client_context = ssl.create_default_context()
        self.client_context.check_hostname = False  # connecting to 127.0.0.1; the CA is ours
        ca.configure_trust(self.client_context)
        self.port = free_port()
        self.port_smtps = free_port()
        config = f"""
pki {MX} cert "{d / "mx.crt"}"
pki {MX} key "{d / "mx.key"}"
table users passwd:{self.passwd}
listen on 127.0.0.1 port {self.port} hostname {MX}
listen on 127.0.0.1 port {self.port_smtps} hostname {MX} smtps pki {MX} auth <users>
action "local" maildir userbase <users>
match from any for domain "extras.test" action "local"
match from any auth for any action "local"
"""
        self.daemon = PigeonDaemon(d, config, port=self.port)

    def table_pids(self) -> list[int]:
        assert self.daemon.proc is not None
        path = Path(f"/proc/{self.daemon.proc.pid}/task/{self.daemon.proc.pid}/children")
        pids = []
        for pid in path.read_text().split():
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if exe == str(TABLE_PASSWD):
                pids.append(int(pid))
        return pids


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    yield s
    s.daemon.stop()
    s.work.cleanup()


def _login(site: Site, password: str) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", site.port_smtps, timeout=10, context=site.client_context
    ) as client:
        client.login("bob", password)


def test_debian_extras_tables_are_recognised_as_the_old_api() -> None:
    assert speaks_imsg(str(TABLE_PASSWD))
    assert not speaks_imsg(str(EXTRAS / "filter-rspamd"))  # a line-protocol program
    table = proc_from_decl(TableDecl("users", "passwd", "/etc/mail/passwd"), None)  # type: ignore[arg-type]
    assert isinstance(table, ImsgTable)
    assert isinstance(
        proc_from_decl(TableDecl("t", "proc-exec", "table-passwd x"), None),  # type: ignore[arg-type]
        ProcTable,
    )


def test_auth_against_table_passwd(site: Site) -> None:
    _login(site, PASSWORD)
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        _login(site, "not the password")
    assert refused.value.smtp_code == 535


def test_delivery_as_userinfo_from_table_passwd(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        client.sendmail("a@example.org", ["bob@extras.test"], "Subject: old table\r\n\r\nhi\r\n")
    wait_for(lambda: maildir_messages(site.mail / "bob" / "Maildir"), what="bob's mail")
    [message] = maildir_messages(site.mail / "bob" / "Maildir")
    assert b"Subject: old table" in message


def test_a_user_table_passwd_does_not_know_is_refused(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.port, timeout=10) as client:
        refused = client.sendmail("a@example.org", ["nosuch@extras.test", "bob@extras.test"], "x")
    assert refused["nosuch@extras.test"][0] == 550


def test_a_killed_table_is_started_again(site: Site) -> None:
    wait_for(site.table_pids, what="the table process")
    [first] = site.table_pids()
    os.kill(first, signal.SIGKILL)

    def logs_in() -> bool:
        try:
            _login(site, PASSWORD)
        except smtplib.SMTPResponseException as exc:
            assert exc.smtp_code in (421, 454), exc  # while it restarts: a temporary failure
            return False
        except smtplib.SMTPServerDisconnected:  # a 421 the client read as the server closing
            return False
        return True

    wait_for(logs_in, timeout=20, what="AUTH through the restarted table")
    assert site.table_pids() and site.table_pids() != [first]


# ---------------------------------------------------------------- the table API directly


@pytest.mark.skipif(not os.access(TABLE_SQLITE, os.X_OK), reason="no table-sqlite")
def test_table_sqlite_of_the_extras_answers_every_service_it_has(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
            CREATE TABLE virtuals (email TEXT, destination TEXT);
            CREATE TABLE domains (domain TEXT);
            CREATE TABLE users (name TEXT, uid INT, gid INT, home TEXT);
            INSERT INTO virtuals VALUES ('abuse@example.com', 'bob@example.com');
            INSERT INTO domains VALUES ('example.com');
            INSERT INTO users VALUES ('vmail', 65534, 65534, '/var/vmail');
            """
        )
    conf = tmp_path / "sqlite.conf"
    conf.write_text(
        f"dbpath {db}\n"
        "query_alias SELECT destination FROM virtuals WHERE email=?;\n"
        "query_domain SELECT domain FROM domains WHERE domain=?;\n"
        "query_userinfo SELECT uid, gid, home FROM users WHERE name=?;\n"
    )

    async def main() -> None:
        table = ImsgTable("sqltab", ProcCommand(("sqltab", str(conf)), str(TABLE_SQLITE)))
        try:
            assert await table.lookup(Service.ALIAS, "ABUSE@example.com") == "bob@example.com"
            assert await table.lookup(Service.ALIAS, "nobody@example.com") is None
            assert await table.check(Service.DOMAIN, "example.com")
            assert not await table.check(Service.DOMAIN, "example.org")
            assert await table.lookup(Service.USERINFO, "vmail") == "65534:65534:/var/vmail"
            with pytest.raises(TableError):  # no query_netaddr: the table says -1
                await table.check(Service.NETADDR, "127.0.0.1")
            assert await table.lookup(Service.ALIAS, "abuse@example.com") == "bob@example.com"
            await table.update()
            with pytest.raises(TableError):  # the old API has no auth service
                await table.check(Service.AUTH, "bob:secret")
            assert Service.AUTH not in table.services()
        finally:
            await table.close()

    asyncio.run(main())


def test_a_table_that_is_not_one_fails_cleanly(tmp_path: Path) -> None:
    """A program that exits at once: a temporary error, not a hang."""

    async def main() -> None:
        table = ImsgTable("t", ProcCommand(("t",), "/bin/false"), handshake_timeout=5)
        try:
            with pytest.raises(TableError, match=r"cannot start|handshake"):
                await table.lookup(Service.ALIAS, "x")
        finally:
            await table.close()

    asyncio.run(main())
