"""``sqlite:`` with table-sqlite's config file, and ``db:`` files written by makemap."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from pigeon.config import parse_config_text
from pigeon.control.cli import main as pigeon_main
from pigeon.tables.base import Service, TableError, open_tables
from pigeon.tables.db import DbFormatError, DbTable
from pigeon.tables.sqlite import SqliteTable, parse_table_config


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def sqlite_conf(tmp_path: Path) -> Path:
    """The example of table-sqlite(5), unchanged."""
    db = tmp_path / "smtp.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        """
        CREATE TABLE virtuals (id INTEGER PRIMARY KEY, email VARCHAR(255), destination TEXT);
        CREATE TABLE credentials (id INTEGER PRIMARY KEY, email VARCHAR(255), password TEXT);
        CREATE TABLE domains (id INTEGER PRIMARY KEY, domain VARCHAR(255));
        CREATE TABLE users (name TEXT, uid INTEGER, gid INTEGER, home TEXT);
        CREATE TABLE sources (address TEXT);
        INSERT INTO domains VALUES (1, 'example.com'), (2, 'example.net');
        INSERT INTO virtuals VALUES (1, 'abuse@example.com', 'bob@example.com'),
            (2, 'bob@example.com', 'vmail'), (3, 'team@example.com', 'bob@example.com'),
            (4, 'team@example.com', 'alice@example.net');
        INSERT INTO credentials VALUES (1, 'bob@example.com', '$2b$08$hash');
        INSERT INTO users VALUES ('vmail', 2000, 2000, '/var/vmail');
        INSERT INTO sources VALUES ('192.0.2.1'), ('192.0.2.2');
        """
    )
    con.commit()
    con.close()
    conf = tmp_path / "sqlite.conf"
    conf.write_text(
        f"""# table-sqlite(5) example
dbpath {db}
query_alias SELECT destination FROM virtuals WHERE email=?;
query_credentials SELECT email, password FROM credentials WHERE email=?;
query_domain SELECT domain FROM domains WHERE domain=?;
query_userinfo: SELECT uid, gid, home FROM users WHERE name=?;
fetch_source SELECT address FROM sources;
"""
    )
    return conf


def test_config_parser_matches_the_c_tables() -> None:
    conf = parse_table_config("# c\n\ndbpath /x\nquery_alias: SELECT 1\nkey\tvalue\ndbpath /y\n")
    assert conf == {"dbpath": "/x", "query_alias": "SELECT 1", "key": "value"}
    with pytest.raises(TableError, match="missing value for key lonely"):
        parse_table_config("lonely\n")


def test_sqlite_table_serves_each_service_like_table_sqlite(sqlite_conf: Path) -> None:
    config = parse_config_text(
        f'table t sqlite:{sqlite_conf}\naction "a" mbox virtual <t>\nmatch action "a"'
    )
    table = open_tables(config)["t"]
    assert isinstance(table, SqliteTable)
    assert table.services() == {
        Service.ALIAS,
        Service.CREDENTIALS,
        Service.DOMAIN,
        Service.USERINFO,
        Service.SOURCE,
    }
    assert run(table.lookup(Service.ALIAS, "Abuse@Example.com")) == "bob@example.com"
    assert run(table.lookup(Service.ALIAS, "team@example.com")) == (
        "bob@example.com, alice@example.net"
    )
    assert run(table.lookup(Service.ALIAS, "nobody@example.com")) is None
    creds = run(table.lookup(Service.CREDENTIALS, "bob@example.com"))
    assert creds == "bob@example.com:$2b$08$hash"
    assert run(table.lookup(Service.USERINFO, "vmail")) == "2000:2000:/var/vmail"
    assert run(table.check(Service.DOMAIN, "EXAMPLE.net"))
    assert not run(table.check(Service.DOMAIN, "example.org"))
    assert [run(table.fetch(Service.SOURCE)) for _ in range(3)] == [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.1",
    ]
    with pytest.raises(TableError, match="no query_netaddr"):
        run(table.check(Service.NETADDR, "192.0.2.1"))


def test_sqlite_update_swaps_only_on_success(sqlite_conf: Path) -> None:
    table = SqliteTable("t", str(sqlite_conf))
    good = sqlite_conf.read_text()
    sqlite_conf.write_text(good + "query_mailaddr SELECT a, b FROM nowhere WHERE x=?;\n")
    with pytest.raises(TableError, match="reload failed"):
        run(table.update())
    assert run(table.lookup(Service.ALIAS, "abuse@example.com")) == "bob@example.com"
    sqlite_conf.write_text(good.replace("query_domain", "query_netaddr"))
    run(table.update())
    assert Service.NETADDR in table.services() and Service.DOMAIN not in table.services()


def test_sqlite_wrong_column_count_and_missing_db_are_errors(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"dbpath {tmp_path / 'missing.sqlite'}\n")
    with pytest.raises(TableError, match=r"missing\.sqlite"):
        SqliteTable("t", str(conf))
    assert not (tmp_path / "missing.sqlite").exists()  # never created by a typo


def test_makemap_writes_a_db_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "aliases"
    source.write_text("# aliases\nroot: bob, carol\nAbuse  alice\n[::1] localhost\n")
    assert pigeon_main(["makemap", "-t", "aliases", str(source)]) == 0
    db_path = tmp_path / "aliases.db"
    config = parse_config_text(f'table a db:{db_path}\naction "a" mbox alias <a>\nmatch action "a"')
    table = open_tables(config)["a"]
    assert isinstance(table, DbTable) and table.kind == "mapping"
    assert run(table.lookup(Service.ALIAS, "ROOT")) == "bob, carol"
    assert run(table.lookup(Service.ALIAS, "abuse")) == "alice"
    assert run(table.lookup(Service.ALIAS, "nobody")) is None
    assert pigeon_main(["makemap", "-U", str(db_path)]) == 0
    assert capsys.readouterr().out == "root\tbob, carol\nabuse\talice\n[::1]\tlocalhost\n"

    # Rebuilt while "running": the table notices the new file on its next lookup.
    source.write_text("root: dave\n")
    assert pigeon_main(["makemap", "-o", str(db_path), str(source)]) == 0
    assert run(table.lookup(Service.ALIAS, "root")) == "dave"
    assert run(table.lookup(Service.ALIAS, "abuse")) is None


def test_db_set_matches_like_static_tables(tmp_path: Path) -> None:
    source = tmp_path / "domains"
    source.write_text("example.org\n*.example.net\n10.0.0.0/8\n@lists.example.com\n")
    assert pigeon_main(["makemap", "-t", "set", str(source)]) == 0
    table = DbTable("d", str(tmp_path / "domains.db"))
    assert table.kind == "list"
    assert run(table.check(Service.DOMAIN, "mx.example.net"))
    assert run(table.check(Service.DOMAIN, "Example.ORG"))
    assert not run(table.check(Service.DOMAIN, "example.com"))
    assert run(table.check(Service.NETADDR, "10.1.2.3"))
    assert run(table.check(Service.MAILADDR, "anyone@lists.example.com"))
    assert run(table.check(Service.STRING, "example.org"))
    assert run(table.lookup(Service.ALIAS, "example.org")) is None  # a list has no values
    assert [run(table.fetch(Service.SOURCE)) for _ in range(5)][4] == "example.org"


def test_db_rejects_foreign_files(tmp_path: Path) -> None:
    bdb = tmp_path / "aliases.db"
    bdb.write_bytes(b"\x00\x06\x15\x61" + os.urandom(2000))  # looks like Berkeley DB
    with pytest.raises(DbFormatError, match="pigeon makemap"):
        DbTable("a", str(bdb))
    assert pigeon_main(["makemap", str(tmp_path / "missing")]) == 1


OPENSMTPD_MAKEMAP = "/usr/sbin/makemap"  # Debian's opensmtpd package (a test dependency)
needs_makemap = pytest.mark.skipif(
    shutil.which(OPENSMTPD_MAKEMAP) is None, reason="OpenSMTPD's makemap is not installed"
)


def opensmtpd_makemap(source: Path, text: str, *args: str) -> Path:
    source.write_text(text)
    subprocess.run([OPENSMTPD_MAKEMAP, *args, str(source)], check=True, timeout=30)
    return source.with_name(source.name + ".db")


@needs_makemap
def test_db_reads_the_berkeley_db_files_of_opensmtpds_makemap(tmp_path: Path) -> None:
    """An admin's existing aliases.db and virtual maps work unchanged."""
    virtuals = opensmtpd_makemap(
        tmp_path / "vusers", "dbtest@localhost\tdoom\nMixed@Example.ORG\tSomeOne\n"
    )
    table = DbTable("v", str(virtuals))
    assert table.kind == "mapping"
    assert run(table.lookup(Service.ALIAS, "dbtest@localhost")) == "doom"
    assert run(table.lookup(Service.ALIAS, "mixed@example.org")) == "SomeOne"  # keys lower-cased
    assert run(table.lookup(Service.ALIAS, "nobody@localhost")) is None
    assert run(table.check(Service.MAILADDR, "dbtest@localhost"))

    aliases = opensmtpd_makemap(tmp_path / "aliases", "root: alice, bob\n", "-t", "aliases")
    assert run(DbTable("a", str(aliases)).lookup(Service.ALIAS, "root")) == "alice, bob"

    domains = opensmtpd_makemap(tmp_path / "domains", "example.org\n*.example.net\n", "-t", "set")
    listed = DbTable("d", str(domains))
    assert listed.kind == "list"
    assert run(listed.check(Service.DOMAIN, "mx.example.net"))
    assert not run(listed.check(Service.DOMAIN, "example.com"))
    assert run(listed.lookup(Service.ALIAS, "example.org")) is None  # a list has no values
    assert pigeon_main(["makemap", "-U", str(aliases)]) == 0


@needs_makemap
def test_a_rebuilt_berkeley_db_map_is_picked_up(tmp_path: Path) -> None:
    path = opensmtpd_makemap(tmp_path / "vusers", "a@x.test\tone\n")
    table = DbTable("v", str(path))
    assert run(table.lookup(Service.ALIAS, "a@x.test")) == "one"
    opensmtpd_makemap(tmp_path / "vusers", "a@x.test\ttwo\n")
    assert run(table.lookup(Service.ALIAS, "a@x.test")) == "two"


def test_a_damaged_berkeley_db_file_is_refused_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "aliases.db"
    bad.write_bytes(bytes(12) + (0x00061561).to_bytes(4, "little") + os.urandom(500))
    with pytest.raises(DbFormatError, match=r"aliases\.db"):
        DbTable("a", str(bad))
