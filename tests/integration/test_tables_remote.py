"""``redis:`` and ``postgres:`` tables against real servers started here, with the config
files of OpenSMTPD's table-redis / table-postgres; two Pigeon daemons sharing one
PostgreSQL both see a changed row within the cache TTL."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PigeonDaemon, Workdir, free_port, mail_uid_gid

from pigeon.tables.base import Service, TableError
from pigeon.tables.postgres import PostgresTable
from pigeon.tables.redis import RedisTable

REDIS_SERVER = shutil.which("redis-server")
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------- redis


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (Debian package redis-server)")
    work = Workdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(work.path),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc, "redis-server")
        yield port
    finally:
        stop(proc)
        work.cleanup()


def test_redis_table_with_table_redis_config(redis_port: int, tmp_path: Path) -> None:
    import redis

    r = redis.Redis(port=redis_port)
    r.sadd("domains", "example.net")
    r.hset("user:bob@example.net", mapping={"uid": 2000, "gid": 2000, "maildir": "/m/bob"})
    r.hset("user:bob@example.net", mapping={"login": "bob@example.net", "passwd": "$6$x$y"})
    r.rpush("aliases:team@example.net", "bob@example.net", "carol@example.net")
    r.set("alias:postmaster", "bob@example.net")  # the default query: GET alias:%s
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"""master 127.0.0.1
master_port {redis_port}
query_domain SISMEMBER domains %s
query_userinfo HMGET user:%s uid gid maildir
query_credentials HMGET user:%s login passwd
query_mailaddrmap LRANGE aliases:%s 0 -1
cache_ttl 0.3
"""
    )

    async def scenario() -> None:
        table = RedisTable("r", str(conf))
        try:
            assert await table.check(Service.DOMAIN, "Example.NET")
            assert not await table.check(Service.DOMAIN, "example.org")
            assert await table.lookup(Service.USERINFO, "bob@example.net") == "2000:2000:/m/bob"
            assert await table.lookup(Service.USERINFO, "nobody@example.net") is None
            creds = await table.lookup(Service.CREDENTIALS, "bob@example.net")
            assert creds == "bob@example.net:$6$x$y"
            assert await table.lookup(Service.MAILADDRMAP, "team@example.net") == (
                "bob@example.net, carol@example.net"
            )
            assert await table.lookup(Service.ALIAS, "postmaster") == "bob@example.net"
            assert await table.lookup(Service.ALIAS, "nobody") is None  # nil: not found
            # cached briefly, then the change is seen
            r.srem("domains", "example.net")
            assert await table.check(Service.DOMAIN, "example.net")
            await asyncio.sleep(0.4)
            assert not await table.check(Service.DOMAIN, "example.net")
            with pytest.raises(TableError):
                await table.fetch(Service.SOURCE)
        finally:
            await table.close()

    asyncio.run(scenario())


def test_redis_down_is_a_temporary_failure(tmp_path: Path) -> None:
    conf = tmp_path / "redis.conf"
    conf.write_text(f"master 127.0.0.1\nmaster_port {free_port()}\n")

    async def scenario() -> None:
        table = RedisTable("r", str(conf))
        try:
            with pytest.raises(TableError, match="redis"):
                await table.check(Service.DOMAIN, "example.net")
        finally:
            await table.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- postgres


class Postgres:
    def __init__(self) -> None:
        assert PG_BIN is not None
        self.work = Workdir()
        self.data = self.work.path / "pgdata"
        self.port = free_port()
        as_root = os.geteuid() == 0
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        self.prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        self.data.mkdir()
        if as_root:
            shutil.chown(self.data, "postgres", "postgres")
        user = "postgres" if as_root else os.environ.get("USER", "postgres")
        subprocess.run(
            [
                *self.prefix,
                f"{PG_BIN}/initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                user,
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                f"{PG_BIN}/postgres",
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.data),
                "-c",
                "fsync=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.conninfo = f"host=127.0.0.1 port={self.port} user={user} dbname=postgres"
        wait_port(self.port, self.proc, "postgres")
        self.sql_retry("SELECT 1")

    def sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            conn.execute(statement)

    def sql_retry(self, statement: str) -> None:
        import psycopg

        for _ in range(100):  # the port opens before the server accepts logins
            try:
                self.sql(statement)
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        self.sql(statement)

    def close(self) -> None:
        stop(self.proc)
        self.work.cleanup()


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    if PG_BIN is None:
        pytest.skip("PostgreSQL not installed (Debian package postgresql)")
    server = Postgres()
    try:
        server.sql(
            """
            CREATE TABLE domains (domain TEXT);
            CREATE TABLE virtuals (email TEXT, destination TEXT);
            CREATE TABLE credentials (email TEXT, password TEXT);
            CREATE TABLE users (name TEXT, uid INT, gid INT, home TEXT);
            CREATE TABLE senders (login TEXT, address TEXT);
            CREATE TABLE sources (address TEXT);
            INSERT INTO domains VALUES ('example.com');
            INSERT INTO virtuals VALUES ('abuse@example.com', 'bob@example.com'),
                ('bob@example.com', 'vmail');
            INSERT INTO credentials VALUES ('bob@example.com', '$2b$08$hash');
            INSERT INTO senders VALUES ('bob@example.com', 'bob@example.com'),
                ('bob@example.com', '@example.com');
            INSERT INTO sources VALUES ('192.0.2.1'), ('192.0.2.2');
            """
        )
        yield server
    finally:
        server.close()


def pg_conf(path: Path, pg: Postgres, ttl: float) -> Path:
    uid, gid = mail_uid_gid()
    path.write_text(
        f"""conninfo {pg.conninfo}
query_domain SELECT domain FROM domains WHERE domain=$1;
query_alias SELECT destination FROM virtuals WHERE email=$1;
query_credentials SELECT email, password FROM credentials WHERE email=$1;
query_userinfo SELECT uid, gid, home FROM users WHERE name=$1;
query_mailaddrmap SELECT address FROM senders WHERE login=$1;
fetch_source SELECT address FROM sources;
cache_ttl {ttl}
"""
    )
    pg.sql(f"DELETE FROM users; INSERT INTO users VALUES ('vmail', {uid}, {gid}, '/nonexistent')")
    return path


def test_postgres_table_with_table_postgres_config(pg: Postgres, tmp_path: Path) -> None:
    conf = pg_conf(tmp_path / "pg.conf", pg, 0)

    async def scenario() -> None:
        table = PostgresTable("p", str(conf))
        try:
            await table.start()
            assert await table.check(Service.DOMAIN, "EXAMPLE.com")
            assert not await table.check(Service.DOMAIN, "example.org")
            assert await table.lookup(Service.ALIAS, "abuse@example.com") == "bob@example.com"
            assert await table.lookup(Service.ALIAS, "x@example.com") is None
            creds = await table.lookup(Service.CREDENTIALS, "bob@example.com")
            assert creds == "bob@example.com:$2b$08$hash"
            uid, gid = mail_uid_gid()
            assert await table.lookup(Service.USERINFO, "vmail") == f"{uid}:{gid}:/nonexistent"
            senders = await table.lookup(Service.MAILADDRMAP, "bob@example.com")
            assert senders == "bob@example.com, @example.com"
            assert {await table.fetch(Service.SOURCE) for _ in range(2)} == {
                "192.0.2.1",
                "192.0.2.2",
            }
            # the server drops our connection: reconnected transparently
            pg.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = 'postgres'"
            )
            assert await table.check(Service.DOMAIN, "example.com")
        finally:
            await table.close()

    asyncio.run(scenario())


def test_postgres_down_is_a_temporary_failure(tmp_path: Path) -> None:
    conf = tmp_path / "pg.conf"
    conf.write_text(
        f"conninfo host=127.0.0.1 port={free_port()} dbname=x\n"
        "query_domain SELECT domain FROM domains WHERE domain=$1;\n"
    )

    async def scenario() -> None:
        table = PostgresTable("p", str(conf))
        await table.start()  # logged, not fatal
        with pytest.raises(TableError, match="cannot connect"):
            await table.check(Service.DOMAIN, "example.com")

    asyncio.run(scenario())


def rcpt_accepted(port: int, rcpt: str) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("test.example")
        client.mail("someone@remote.test")
        code, _ = client.rcpt(rcpt)
        client.rset()
    return code == 250


def test_two_daemons_share_one_postgres(pg: Postgres) -> None:
    ttl = 1.0
    nodes: list[tuple[PigeonDaemon, Workdir]] = []
    try:
        for _ in range(2):
            work = Workdir()
            conf = pg_conf(work.path / "pg.conf", pg, ttl)
            mail = work.mailroot()
            port = free_port()
            config = f"""table domains postgres:{conf}
table virtuals postgres:{conf}
listen on 127.0.0.1 port {port}
action "vmail" maildir "{mail}/vmail" virtual <virtuals> userbase <virtuals>
match from any for domain <domains> action "vmail"
"""
            daemon = PigeonDaemon(work.path, config, port=port)
            nodes.append((daemon, work))
            daemon.start()
        for daemon, _ in nodes:
            assert rcpt_accepted(daemon.port, "abuse@example.com")
            assert not rcpt_accepted(daemon.port, "sales@example.org")  # domain unknown: cached
        pg.sql(
            "INSERT INTO domains VALUES ('example.org');"
            "INSERT INTO virtuals VALUES ('sales@example.org', 'bob@example.com')"
        )
        changed = time.monotonic()
        pending = {daemon.port for daemon, _ in nodes}
        while pending and time.monotonic() - changed < ttl + 5:
            pending = {p for p in pending if not rcpt_accepted(p, "sales@example.org")}
            time.sleep(0.1)
        assert not pending, "a node never saw the new row"
        assert time.monotonic() - changed <= ttl + 2  # within the cache TTL (+ slack)
    finally:
        for daemon, work in nodes:
            daemon.stop()
            work.cleanup()
