"""The scenarios of OpenSMTPD's regression suite (regress/args-*.pl): a client sends one
message, smtpd delivers it to an LMTP sink, and the suite checks the client's reply, the
daemon's log (``stat=Delivered``, ``smtp disconnected``, ``Exiting``) and the RCPT the sink
saw. Its configurations put tables, filters, actions and matches before ``listen on``; so
does this one, with one tagged listener per scenario so that one daemon serves them all.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from harness import PigeonDaemon, Workdir, free_port, wait_for
from sinks import RecordingHandler

STUB = Path(__file__).parent / "filterbin" / "stub.py"
SCENARIOS = ("static", "file", "aliases", "db", "sqlite", "junk", "reject")
MAKEMAP = "/usr/sbin/makemap"  # OpenSMTPD's own (Debian package opensmtpd, a test dependency)


class LmtpController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler)


class Site:
    def __init__(self) -> None:
        self.sink = RecordingHandler()
        self.lmtp = LmtpController(self.sink, hostname="127.0.0.1", port=free_port())
        self.lmtp.start()
        self.work = Workdir()
        (self.work.path / "vusers.txt").write_text("doom@localhost doom\n")
        (self.work.path / "aliases-test.txt").write_text("alias-test\tdoom\n")
        # args-table-db: a Berkeley DB map built by OpenSMTPD's makemap
        self.has_makemap = shutil.which(MAKEMAP) is not None
        vusers_db = self.work.path / "vusers-db"
        vusers_db.write_text("dbtest@localhost\tdoom\n")
        if self.has_makemap:
            subprocess.run([MAKEMAP, str(vusers_db)], check=True, timeout=30)
        # args-table-sqlite: table-sqlite's configuration file and database
        database = self.work.path / "vusers.sqlite"
        with sqlite3.connect(database) as db:
            db.execute("CREATE TABLE virtual (source TEXT, destination TEXT)")
            db.execute("INSERT INTO virtual VALUES ('sqltest@localhost', 'doom')")
        (self.work.path / "sqlite-vusers.conf").write_text(
            f"dbpath {database}\nquery_alias SELECT destination FROM virtual WHERE source=?;\n"
        )
        self.ports = {name: free_port() for name in SCENARIOS}
        lmtp = f'lmtp "127.0.0.1:{self.lmtp.port}"'
        stub = f"/usr/bin/python3 {STUB}"
        config = f"""
filter "junk" proc-exec "{stub} mail-from junk"
filter "reject" proc-exec "{stub} mail-from reject"
table vusers {{ doom@localhost = doom }}
table vfile file:{self.work.path / "vusers.txt"}
table aliases file:{self.work.path / "aliases-test.txt"}
{f"table vdb db:{vusers_db}.db" if self.has_makemap else "table vdb {{ dbtest@localhost = doom }}"}
table vsql sqlite:{self.work.path / "sqlite-vusers.conf"}
action "static" {lmtp} virtual <vusers>
action "file" {lmtp} virtual <vfile>
action "aliases" {lmtp} alias <aliases>
action "db" {lmtp} virtual <vdb>
action "sqlite" {lmtp} virtual <vsql>
action "plain" {lmtp}
match from local tag static for local action "static"
match from local tag file for local action "file"
match from local tag aliases for local action "aliases"
match from local tag db for local action "db"
match from local tag sqlite for local action "sqlite"
match from local tag marked for local action "static"
match from local for local action "plain"
listen on 127.0.0.1 port {self.ports["static"]} tag static
listen on 127.0.0.1 port {self.ports["file"]} tag file
listen on 127.0.0.1 port {self.ports["aliases"]} tag aliases
listen on 127.0.0.1 port {self.ports["db"]} tag db
listen on 127.0.0.1 port {self.ports["sqlite"]} tag sqlite
listen on 127.0.0.1 port {self.ports["junk"]} tag marked filter "junk"
listen on 127.0.0.1 port {self.ports["reject"]} filter "reject"
"""
        self.daemon = PigeonDaemon(self.work.path, config, port=self.ports["static"])

    def send(self, scenario: str, rcpt: str) -> str:
        """The final reply to the message, as the client saw it."""
        with smtplib.SMTP("127.0.0.1", self.ports[scenario], timeout=10) as client:
            client.ehlo("regress")
            client.mail("sender@example.org")
            client.rcpt(rcpt)
            code, text = client.data(f"Subject: {scenario}\r\n\r\nhello\r\n")
            return f"{code} {text.decode()}"

    def delivered(self, scenario: str) -> bytes | None:
        return next((m.data for m in self.sink.with_subject(scenario)), None)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    s.daemon.start()
    try:
        yield s
    finally:
        s.daemon.stop()
        s.lmtp.stop()
        s.work.cleanup()


DELIVERED = re.compile(
    r"^[0-9a-f]{16} mda delivery evpid=[0-9a-f]{16} from=<sender@example\.org> "
    r"to=<(?P<to>[^>]+)> rcpt=<(?P<rcpt>[^>]+)> user=(?P<user>\S+) delay=\d+s "
    r"result=Ok stat=Delivered$",
    re.M,
)


@pytest.mark.parametrize(
    ("scenario", "rcpt"),
    [
        ("static", "doom@localhost"),  # args-table-static: a virtual user in a { } table
        ("file", "doom@localhost"),  # args-table-file: the same in a file table
        ("aliases", "alias-test@localhost"),  # args-table-aliases: an alias to a user
        ("db", "dbtest@localhost"),  # args-table-db: OpenSMTPD's makemap wrote the map
        ("sqlite", "sqltest@localhost"),  # args-table-sqlite: table-sqlite's config file
    ],
)
def test_table_scenarios_deliver_to_the_resolved_user(site: Site, scenario: str, rcpt: str) -> None:
    if scenario == "db" and not site.has_makemap:
        pytest.skip("OpenSMTPD's makemap is not installed")
    reply = site.send(scenario, rcpt)
    assert re.fullmatch(r"250 2\.0\.0 [0-9a-f]{8} Message accepted for delivery", reply), reply
    wait_for(lambda: site.delivered(scenario) is not None, what=f"the {scenario} delivery")
    wait_for(
        lambda: any(m["rcpt"] == rcpt for m in DELIVERED.finditer(site.daemon.log())),
        what="the delivery line",
    )
    line = next(m for m in DELIVERED.finditer(site.daemon.log()) if m["rcpt"] == rcpt)
    assert (line["to"], line["user"]) == (rcpt, "doom")
    with site.sink.lock:
        assert "doom" in site.sink.rcpts  # RCPT TO:<doom>: the local user, not the address


def test_junk_filter_lets_the_message_through_marked(site: Site) -> None:
    reply = site.send("junk", "doom@localhost")
    assert reply.startswith("250 "), reply
    wait_for(lambda: site.delivered("junk") is not None, what="the junk delivery")
    message = site.delivered("junk")
    assert message is not None and message.startswith(b"X-Spam: yes\r\n"), message


def test_reject_filter_refuses_the_sender_and_the_session_ends(site: Site) -> None:
    with smtplib.SMTP("127.0.0.1", site.ports["reject"], timeout=10) as client:
        client.ehlo("regress")
        code, text = client.mail("sender@example.org")
        assert (code, text) == (550, b"5.7.0 Rejected by filter")
    wait_for(lambda: "smtp disconnected" in site.daemon.log(), what="the disconnected line")
    assert site.delivered("reject") is None


def test_the_log_ends_with_exiting_as_smtpds(site: Site) -> None:
    """(The last test using the site: it stops the daemon.) The suite waits for this line."""
    site.daemon.stop()
    assert site.daemon.log().rstrip("\n").endswith("\nExiting")


def test_started_with_smtpds_command_line(tmp_path: Path) -> None:
    """As OpenSMTPD's regression harness starts smtpd: ``smtpd -dv -f smtpd.conf``, here
    ``pigeon-smtpd`` (the spool from $PIGEON_SPOOL); up when it logs ``starting``, down
    when it logs ``Exiting``."""
    port = free_port()
    conf = tmp_path / "smtpd.conf"
    conf.write_text(
        'action "local" mbox\n'
        'match from local for local action "local"\n'
        f"listen on 127.0.0.1 port {port}\n"
    )
    smtpd = Path(sys.executable).with_name("pigeon-smtpd")
    log = tmp_path / "smtpd.log"
    env = {**os.environ, "PIGEON_SPOOL": str(tmp_path / "spool")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(smtpd), "-dv", "-P", "mda", "-f", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: "starting" in log.read_text(), what="the starting line")
        wait_for(lambda: _listening(port), what="the listener")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.org", ["root@localhost"], b"Subject: x\r\n\r\ny\r\n")
        assert " smtp message msgid=" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(20)
    assert log.read_text().rstrip("\n").endswith("Exiting")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
