"""A misbehaving proc table never takes the daemon down: requests fail temporarily (quickly)
and the table is restarted with a backoff."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest

from pigeon.config.model import TableDecl
from pigeon.tables.base import Service, TableError
from pigeon.tables.proc import ProcCommand, ProcTable, command_for, find_table_program

# A table whose behaviour for a key is chosen by the key itself. State survives restarts in
# a counter file, so tests can see how many processes ran.
FAULTY = r"""
import os, sys, time
counter = sys.argv[1]
n = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
open(counter, "w").write(str(n))
for line in sys.stdin:
    if line == "config|ready\n":
        break
mode = sys.argv[2] if len(sys.argv) > 2 else ""
if mode == "no-services":
    print("register|ready", flush=True); time.sleep(5); sys.exit(0)
if mode == "bad-handshake":
    print("hello", flush=True); time.sleep(5); sys.exit(0)
print("register|alias\nregister|domain\nregister|ready", flush=True)
print("table started", n, file=sys.stderr, flush=True)
held = []
for line in sys.stdin:
    f = line.rstrip("\n").split("|", 7)
    op, service, rid, key = f[4], f[5], f[6], f[7] if len(f) > 7 else ""
    if key == "exit":
        sys.exit(3)
    if key == "hang":
        continue
    if key == "wrong-id":
        print(op + "-result|deadbeef|not-found", flush=True); continue
    if key == "garbage":
        print("lookup-result", flush=True); continue
    if key.startswith("slow"):  # answered after the next request: out of order
        held.append(rid); continue
    for old in held:
        print(op + "-result|" + old + "|found|slow-answer", flush=True)
    held = []
    print(op + "-result|" + rid + "|found|value-" + key, flush=True)
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "faulty.py"
    path.write_text(FAULTY)
    return path


def make_table(script: Path, tmp_path: Path, mode: str = "", **kw: float) -> ProcTable:
    argv = (sys.executable, str(script), str(tmp_path / "count"), *([mode] if mode else []))
    options = {"request_timeout": 0.5, "handshake_timeout": 2.0, "backoff_min": 0.05}
    options.update(kw)
    return ProcTable("faulty", ProcCommand(argv, sys.executable), **options)  # type: ignore[arg-type]


def starts(tmp_path: Path) -> int:
    return int((tmp_path / "count").read_text())


async def eventually(table: ProcTable, key: str, timeout: float = 5.0) -> str | None:
    """Retry until the restarted table answers (the backoff refuses requests meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await table.lookup(Service.ALIAS, key)
        except TableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_table_that_exits_fails_the_request_and_is_restarted(script: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path)
        try:
            assert await table.lookup(Service.ALIAS, "a") == "value-a"
            with pytest.raises(TableError, match="exited"):
                await table.lookup(Service.ALIAS, "exit")
            assert await eventually(table, "b") == "value-b"
            assert starts(tmp_path) == 2 and table.restarts == 1
        finally:
            await table.close()

    asyncio.run(scenario())


def test_hung_table_times_out_then_is_restarted(script: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path, request_timeout=0.3, max_timeouts=2)
        try:
            t0 = time.monotonic()
            with pytest.raises(TableError, match="timed out"):
                await table.lookup(Service.ALIAS, "hang")
            assert time.monotonic() - t0 < 2  # a temporary failure, not a hang
            assert starts(tmp_path) == 1  # one timeout: the table is kept
            with pytest.raises(TableError, match="timed out"):
                await table.lookup(Service.ALIAS, "hang")
            assert await eventually(table, "c") == "value-c"
            assert starts(tmp_path) == 2
        finally:
            await table.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("key", ["wrong-id", "garbage"])
def test_wrong_id_or_garbage_restarts_the_table(script: Path, tmp_path: Path, key: str) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path)
        try:
            with pytest.raises(TableError, match="protocol error"):
                await table.lookup(Service.ALIAS, key)
            assert await eventually(table, "d") == "value-d"
            assert starts(tmp_path) == 2
        finally:
            await table.close()

    asyncio.run(scenario())


def test_out_of_order_answers_are_matched_by_id(script: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path, request_timeout=3)
        try:
            slow = asyncio.ensure_future(table.lookup(Service.ALIAS, "slow"))
            await asyncio.sleep(0.2)
            fast = await table.lookup(Service.ALIAS, "fast")
            assert fast == "value-fast"
            assert await slow == "slow-answer"
        finally:
            await table.close()

    asyncio.run(scenario())


def test_backoff_grows_between_failed_starts(script: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path, "no-services", backoff_min=0.2)
        try:
            with pytest.raises(TableError, match="without any registered service"):
                await table.start()
            with pytest.raises(TableError, match="restarting in"):
                await table.start()  # refused at once during the backoff, not retried
            assert starts(tmp_path) == 1
            await asyncio.sleep(0.25)
            with pytest.raises(TableError, match="cannot start"):
                await table.start()
            assert starts(tmp_path) == 2
            with pytest.raises(TableError, match=r"restarting in 0\.[34]"):
                await table.start()  # the wait doubled
        finally:
            await table.close()

    asyncio.run(scenario())


def test_bad_handshake_is_a_temporary_failure(script: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path, "bad-handshake")
        try:
            with pytest.raises(TableError, match=r"non-register|unknown table message"):
                await table.lookup(Service.ALIAS, "x")
        finally:
            await table.close()

    asyncio.run(scenario())


def test_stderr_goes_to_the_log_and_unregistered_services_are_not_asked(
    script: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        table = make_table(script, tmp_path)
        try:
            await table.start()
            assert table.services() == {Service.ALIAS, Service.DOMAIN}
            with pytest.raises(TableError, match="not registered"):
                await table.lookup(Service.CREDENTIALS, "bob")
            assert await table.check(Service.DOMAIN, "example.org")
            for _ in range(40):
                if "table started 1" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        finally:
            await table.close()

    with caplog.at_level(logging.INFO, logger="pigeon.tables"):
        asyncio.run(scenario())
    assert "table faulty: table started 1" in caplog.text


def test_program_lookup_in_addon_dirs(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    program = second / "table-demo"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    dirs = (str(first), str(second))
    assert find_table_program("demo", dirs) == str(program)
    assert find_table_program("../b/table-demo", dirs) is None
    decl = TableDecl("users", "demo", "/etc/demo.conf", "dynamic")
    command = command_for(decl, dirs)
    # as smtpd 7.6+: argv[0] is the table name, argv[1] the config
    assert command.executable == str(program)
    assert command.argv == ("users", "/etc/demo.conf")
    with pytest.raises(TableError, match='backend "nothere" does not exist'):
        command_for(TableDecl("x", "nothere", None, "dynamic"), dirs)
    shell = command_for(TableDecl("x", "proc-exec", "my-table --opt 1", "dynamic"))
    assert shell.argv == ("/bin/sh", "-c", "my-table --opt 1")
