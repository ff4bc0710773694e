"""The root helper's launcher, both ends in one process (no root needed: without it the
launched program simply runs as the test's user)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import pytest

from pigeon.launcher import Launcher, LaunchError, LaunchServer, needs_root, spec_key
from pigeon.procs import ProcCommand, ProcessSpec

# Launched as `nobody` when the tests run as root: an interpreter every user can run
# (these programs need only the standard library).
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

ECHO = ProcessSpec(
    "echo",
    ProcCommand(
        (PYTHON, "-c", "import sys\nfor l in sys.stdin: print(l, end='', flush=True)"),
        PYTHON,
    ),
    user="nobody",
)
SOCKET_ECHO = ProcessSpec(
    "sock",
    ProcCommand(
        (
            PYTHON,
            "-c",
            "import os\nwhile (d := os.read(0, 100)): os.write(1, d.upper())",
        ),
        PYTHON,
    ),
    user="nobody",
    socketpair=True,
)
STDERR = ProcessSpec(
    "err",
    ProcCommand((PYTHON, "-c", "import sys; sys.stderr.write('oops\\n')"), PYTHON),
    chroot="/",
)


async def _pair(allowed: list[ProcessSpec]) -> tuple[Launcher, LaunchServer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keys = [spec_key(s) for s in allowed]
    server = LaunchServer(theirs, keys)
    server.serve(asyncio.get_running_loop())
    return Launcher(ours, keys), server


Body = Callable[[Launcher, LaunchServer], Awaitable[None]]


def run(body: Body) -> None:
    async def main() -> None:
        client, server = await _pair([ECHO, SOCKET_ECHO, STDERR])
        try:
            await asyncio.wait_for(body(client, server), 30)
        finally:
            loop = asyncio.get_running_loop()
            for sock in (client.sock, server.sock):
                loop.remove_reader(sock.fileno())
                sock.close()

    asyncio.run(main())


def test_only_specs_that_need_root_are_launchable() -> None:
    assert needs_root(ECHO, "_pigeon")
    assert not needs_root(ECHO, "nobody")  # the daemon's own user: it starts it itself
    assert needs_root(STDERR, "_pigeon")  # a chroot needs root
    assert not needs_root(ProcessSpec("plain", "filter-x"), "_pigeon")


def test_a_launched_program_talks_through_the_pipes_it_was_given() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        assert client.allows(ECHO)
        proc = await client.launch(ECHO, 1 << 16)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"config|ready\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"config|ready\n"
        proc.stdin.close()  # EOF: it ends, and the helper reports its exit status
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert proc.returncode == 0

    run(body)


def test_a_socketpair_program_gets_one_socket() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        proc = await client.launch(SOCKET_ECHO, 1 << 16)
        assert proc.socket is not None and proc.stdin is None
        reader, writer = await asyncio.open_unix_connection(sock=proc.socket)
        writer.write(b"lookup|x\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"LOOKUP|X\n"
        writer.close()
        assert await asyncio.wait_for(proc.wait(), 10) == 0

    run(body)


def test_stderr_comes_back_too() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        proc = await client.launch(STDERR, 1 << 16)
        assert proc.stderr is not None
        assert await asyncio.wait_for(proc.stderr.readline(), 10) == b"oops\n"
        assert await asyncio.wait_for(proc.wait(), 10) == 0

    run(body)


def test_signals_go_through_the_helper() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        proc = await client.launch(ECHO, 1 << 16)
        proc.send_signal(15)
        assert await asyncio.wait_for(proc.wait(), 10) == -15

    run(body)


def test_a_program_not_configured_at_start_is_refused() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        other = ProcessSpec("evil", "/bin/sh -c 'id > /tmp/owned'", user="root")
        assert not client.allows(other)
        with pytest.raises(LaunchError, match="not configured at start"):
            await client.launch(other, 1 << 16)  # what a compromised daemon could try
        changed = ProcessSpec(ECHO.name, ECHO.command, user="root")  # same program, other user
        with pytest.raises(LaunchError, match="not configured at start"):
            await client.launch(changed, 1 << 16)

    run(body)


def test_the_helper_accepts_only_the_two_signals_it_needs() -> None:
    async def body(client: Launcher, _server: LaunchServer) -> None:
        proc = await client.launch(ECHO, 1 << 16)
        client.signal(proc.handle, 19)  # SIGSTOP: refused (logged), the process runs on
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"still there\n")
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"still there\n"
        proc.send_signal(9)
        assert await asyncio.wait_for(proc.wait(), 10) == -9

    run(body)


def test_a_gone_helper_fails_launches_and_ends_waits() -> None:
    async def body(client: Launcher, server: LaunchServer) -> None:
        proc = await client.launch(ECHO, 1 << 16)
        asyncio.get_running_loop().remove_reader(server.sock.fileno())
        server.sock.shutdown(socket.SHUT_RDWR)
        assert await asyncio.wait_for(proc.wait(), 10) == -1
        assert not client.allows(ECHO)
        with pytest.raises(LaunchError, match="gone"):
            await client.launch(ECHO, 1 << 16)
        proc.send_signal(9)  # already considered gone: a no-op
        assert proc.stdin is not None
        proc.stdin.close()

    run(body)


def test_a_reread_replaces_what_may_be_launched() -> None:
    """At a reload the helper reads the file again: a spec the new configuration names
    becomes launchable, one it dropped no longer is; a file that fails to load keeps the
    previous list and says why."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        files = [[spec_key(SOCKET_ECHO)]]

        def reread() -> list[dict[str, object]]:
            if not files:
                raise ValueError("smtpd.conf:3:1: syntax error")
            return files.pop()

        server = LaunchServer(theirs, [spec_key(ECHO)], reread)
        loop = asyncio.get_running_loop()
        server.serve(loop)
        client = Launcher(ours, [spec_key(ECHO)])
        try:
            assert client.allows(ECHO) and not client.allows(SOCKET_ECHO)
            await client.reread()
            assert client.allows(SOCKET_ECHO) and not client.allows(ECHO)
            with pytest.raises(LaunchError, match="not configured"):
                await client.launch(ECHO, 1 << 16)
            proc = await client.launch(SOCKET_ECHO, 1 << 16)
            proc.send_signal(9)
            assert await asyncio.wait_for(proc.wait(), 10) == -9
            with pytest.raises(LaunchError, match="syntax error"):
                await client.reread()
            assert client.allows(SOCKET_ECHO)
        finally:
            for sock in (ours, theirs):
                loop.remove_reader(sock.fileno())
                sock.close()

    asyncio.run(main())
