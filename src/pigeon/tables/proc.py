"""Proc tables: a child process that speaks OpenSMTPD's table protocol 0.1.

``table NAME BACKEND:CONFIG`` (any backend Pigeon has no built-in for) runs ``table-BACKEND``
from OpenSMTPD's add-on directory (or Pigeon's own) exactly as smtpd 7.6+ does: argv[0] is the
table name, argv[1] the config (absent if none), and one end of a socketpair is the child's
fd 0 *and* fd 1; stderr lines go to the log. ``table NAME proc-exec "command line"`` runs a
command line through ``/bin/sh -c`` instead, like ``filter NAME proc-exec``.

Where smtpd is fragile, Pigeon is not:

* several requests may be in flight on one table; replies are matched by id;
* every request has a timeout: a slow table is a temporary failure (451/421), not a hang;
  after :data:`MAX_TIMEOUTS` timeouts in a row the table is considered hung and restarted;
* a table that exits, writes garbage or answers an id nobody asked is killed, the requests in
  flight fail temporarily, and the table is started again on the next request after a backoff
  (0.1 s doubling to 30 s, reset by a good answer); smtpd exits in all these cases;
* a table that registered only some services is only asked for those: any other service is a
  temporary error without a round trip (smtpd would send the request anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pigeon import privsep
from pigeon.config.builder import PROC_TABLE_DIRS  # OpenSMTPD's add-on dirs, then Pigeon's
from pigeon.config.model import Config, TableDecl
from pigeon.filters.supervisor import privilege_dropper
from pigeon.protocol.tableproto import (
    TableOp,
    TableProtocolError,
    TableRegistration,
    TableRequest,
    TableResult,
    TableStatus,
    decode_table_line,
    encode_config,
    encode_request,
    format_request_id,
)
from pigeon.tables.base import Service, Table, TableError

log = logging.getLogger("pigeon.tables")

SMTPD_VERSION = "7.6.0"  # what we announce in config|smtpd-version: the protocol we follow
REQUEST_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
MAX_TIMEOUTS = 3
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ProcCommand:
    """What to execute: ``argv`` (argv[0] may differ from the file run) and ``executable``."""

    argv: tuple[str, ...]
    executable: str

    def describe(self) -> str:
        return shlex.join((self.executable, *self.argv[1:]))


def find_table_program(backend: str, dirs: Sequence[str] = PROC_TABLE_DIRS) -> str | None:
    """The path of ``table-<backend>`` in the first directory that has it."""
    if "/" in backend:
        return None
    for directory in dirs:
        path = os.path.join(directory, f"table-{backend}")
        if os.access(path, os.X_OK):
            return path
    return None


def command_for(decl: TableDecl, dirs: Sequence[str] = PROC_TABLE_DIRS) -> ProcCommand:
    """The command of a proc table declaration (raises TableError if there is none).

    * ``proc-exec`` + command line: ``/bin/sh -c "command line"``;
    * ``proc:/path/to/program`` (Pigeon: smtpd 7.x cannot run this form): that program;
    * ``X:CONFIG``: ``table-X`` with argv ``[NAME, CONFIG]``.
    """
    if decl.backend == "proc-exec":
        if not decl.config:
            raise TableError(f"table {decl.name}: proc-exec needs a command line")
        return ProcCommand(("/bin/sh", "-c", decl.config), "/bin/sh")
    if decl.backend == "proc":
        if not decl.config or not os.access(decl.config, os.X_OK):
            raise TableError(
                f'table {decl.name}: backend "proc": no executable program {decl.config}'
            )
        return ProcCommand((decl.name,), decl.config)
    program = find_table_program(decl.backend, dirs)
    if program is None:
        raise TableError(f'table {decl.name}: table backend "{decl.backend}" does not exist')
    argv = (decl.name,) if decl.config is None else (decl.name, decl.config)
    return ProcCommand(argv, program)


class _Child:
    """One running table process: its socket streams, its reader tasks, and its requests."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.pending: dict[str, tuple[TableOp, asyncio.Future[TableResult]]] = {}
        self.expired: deque[str] = deque(maxlen=256)  # ids given up on: late replies are fine
        self.services: frozenset[Service] = frozenset()
        self.tasks: list[asyncio.Task[None]] = []
        self.dead = False


def _table_credentials() -> tuple[int, int] | None:
    """The daemon's unprivileged account when it runs as root and will drop to one."""
    user = privsep.run_as()
    if user is None or os.geteuid() != 0:
        return None
    return user.uid, user.gid


class ProcTable(Table):
    """A table served by a child process speaking protocol 0.1 (see the module docstring)."""

    def __init__(
        self,
        name: str,
        command: ProcCommand,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_timeouts: int = MAX_TIMEOUTS,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.name = name
        self.command = command
        self.request_timeout = request_timeout
        self.handshake_timeout = handshake_timeout
        self.max_timeouts = max_timeouts
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.restarts = 0  # processes started after the first one (for logs and tests)
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._services: frozenset[Service] | None = None
        self._backoff = 0.0
        self._not_before = 0.0
        self._timeouts = 0
        self._started_once = False
        self._closed = False

    # ------------------------------------------------------------------ Table interface

    def services(self) -> frozenset[Service]:
        """The services the table registered; before its first handshake, every service (as
        smtpd's parse-time check assumes)."""
        return self._services if self._services is not None else frozenset(Service)

    async def start(self) -> None:
        """Start the process now (the daemon does this at startup, so ``services()`` is
        known before listeners decide between ``auth`` and ``credentials``)."""
        await self._ensure_child()

    async def close(self) -> None:
        self._closed = True
        child, self._child = self._child, None
        if child is not None:
            await self._stop_child(child, "table closed")

    async def update(self) -> None:
        result = await self._request(TableOp.UPDATE, None, None)
        if result.status is not TableStatus.OK:
            raise TableError(f"table {self.name}: update failed: {result.value or 'error'}")

    async def _lookup(self, service: Service, key: str) -> str | None:
        result = await self._request(TableOp.LOOKUP, service, key)
        return result.value if result.status is TableStatus.FOUND else None

    async def _check(self, service: Service, key: str) -> bool:
        result = await self._request(TableOp.CHECK, service, key)
        return result.status is TableStatus.FOUND

    async def _fetch(self, service: Service) -> str | None:
        result = await self._request(TableOp.FETCH, service, None)
        return result.value if result.status is TableStatus.FOUND else None

    # ------------------------------------------------------------------ requests

    async def _request(self, op: TableOp, service: Service | None, key: str | None) -> TableResult:
        child = await self._ensure_child()
        if service is not None and service not in child.services:
            raise TableError(f"table {self.name}: service {service.value} not registered")
        request_id = format_request_id(secrets.randbits(32))
        while request_id in child.pending:
            request_id = format_request_id(secrets.randbits(32))
        try:
            line = encode_request(
                TableRequest(
                    time.time(),
                    self.name,
                    op,
                    request_id,
                    service.value if service else None,
                    key,
                )
            )
        except ValueError as exc:
            raise TableError(f"table {self.name}: {exc}") from exc
        future: asyncio.Future[TableResult] = asyncio.get_running_loop().create_future()
        child.pending[request_id] = (op, future)
        try:
            child.writer.write(line.encode("utf-8", "surrogateescape") + b"\n")
            await child.writer.drain()
            result = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            child.expired.append(request_id)
            self._timeouts += 1
            log.warning(
                "warn: table %s: no answer to %s within %gs", self.name, op, self.request_timeout
            )
            if self._timeouts >= self.max_timeouts:
                await self._fail(child, f"{self._timeouts} requests timed out: table hung")
            raise TableError(f"table {self.name}: request timed out") from None
        except (ConnectionError, OSError) as exc:
            await self._fail(child, f"cannot write: {exc}")
            raise TableError(f"table {self.name}: {exc}") from exc
        finally:
            child.pending.pop(request_id, None)
        self._timeouts = 0
        self._backoff = 0.0  # a good answer: the next failure restarts quickly again
        if result.status is TableStatus.ERROR:
            raise TableError(f"table {self.name}: {op} failed: {result.value or 'error'}")
        return result

    # ------------------------------------------------------------------ process supervision

    async def _ensure_child(self) -> _Child:
        if self._closed:
            raise TableError(f"table {self.name}: closed")
        child = self._child
        if child is not None and not child.dead:
            return child
        async with self._starting:
            child = self._child
            if child is not None and not child.dead:
                return child
            wait = self._not_before - time.monotonic()
            if wait > 0:
                raise TableError(f"table {self.name}: restarting in {wait:.1f}s")
            try:
                child = await self._spawn()
            except (OSError, TableProtocolError, TimeoutError, UnicodeDecodeError) as exc:
                self._schedule_restart()
                raise TableError(f"table {self.name}: cannot start: {exc}") from exc
            self._child = child
            return child

    def _schedule_restart(self) -> None:
        self._backoff = min(self.backoff_max, max(self.backoff_min, self._backoff * 2))
        self._not_before = time.monotonic() + self._backoff

    async def _spawn(self) -> _Child:
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command.argv,
                executable=self.command.executable,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own group: we can stop `sh -c` and its children
                # Started as root, a table program runs as Pigeon's unprivileged user.
                preexec_fn=privilege_dropper(_table_credentials()),
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_LINE)
        child = _Child(process, reader, writer)
        child.tasks.append(asyncio.create_task(self._log_stderr(process)))
        log.info(
            "info: table %s: started %s (pid %d)", self.name, self.command.describe(), process.pid
        )
        try:
            await asyncio.wait_for(self._handshake(child), self.handshake_timeout)
        except BaseException:
            await self._stop_child(child, "handshake failed")
            raise
        child.tasks.append(asyncio.create_task(self._read_replies(child)))
        return child

    async def _handshake(self, child: _Child) -> None:
        lines = encode_config(smtpd_version=SMTPD_VERSION, table_name=self.name)
        child.writer.write("".join(f"{line}\n" for line in lines).encode())
        await child.writer.drain()
        registration = TableRegistration()
        while not registration.ready:
            raw = await child.reader.readline()
            if not raw.endswith(b"\n"):
                raise TableProtocolError("end of file during the handshake")
            registration.feed(decode_table_line(raw.decode("utf-8")))
        child.services = frozenset(Service(s) for s in registration.services)
        self._services = child.services
        names = ", ".join(sorted(s.value for s in child.services))
        log.info("info: table %s: registered %s", self.name, names)

    async def _read_replies(self, child: _Child) -> None:
        reason = "exited"
        try:
            while True:
                raw = await child.reader.readline()
                if not raw.endswith(b"\n"):
                    break
                message = decode_table_line(raw.decode("utf-8", "surrogateescape"))
                if not isinstance(message, TableResult):
                    raise TableProtocolError(f"unexpected message: {raw!r}")
                entry = child.pending.get(message.id)
                if entry is None:
                    if message.id in child.expired:
                        continue  # the answer to a request that timed out: harmless
                    raise TableProtocolError(f"answer to unknown request id {message.id!r}")
                request_op, future = entry
                if request_op is not message.op:
                    raise TableProtocolError(f"{message.op}-result for a {request_op} request")
                if not future.done():
                    future.set_result(message)
        except TableProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (ConnectionError, ValueError, OSError) as exc:
            reason = f"read error: {exc}"
        if self._child is child:
            await self._fail(child, reason)

    async def _fail(self, child: _Child, reason: str) -> None:
        """Drop a misbehaving or dead child; the next request starts another after a backoff."""
        if child.dead:
            return
        log.warning("warn: table %s: %s; restarting it", self.name, reason)
        if self._child is child:
            self._child = None
        self._timeouts = 0
        self._schedule_restart()
        await self._stop_child(child, reason)

    async def _stop_child(self, child: _Child, reason: str) -> None:
        child.dead = True
        for _op, future in child.pending.values():
            if not future.done():
                future.set_exception(TableError(f"table {self.name}: {reason}"))
        child.pending.clear()
        with contextlib.suppress(Exception):
            child.writer.close()
        process = child.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 2.0)
        current = asyncio.current_task()
        for task in child.tasks:
            if task is not current:
                task.cancel()

    async def _log_stderr(self, process: asyncio.subprocess.Process) -> None:
        stream = process.stderr
        if stream is None:
            return
        for _ in range(1 << 30):  # until EOF
            raw = await stream.readline()
            if not raw:
                return
            text = raw.decode("utf-8", "replace").rstrip("\n")
            log.warning("table %s: %s", self.name, text)


def proc_from_decl(decl: TableDecl, config: Config) -> ProcTable:
    """Factory for ``open_tables``: ``proc``, ``proc-exec`` and any ``X:`` without a
    built-in backend."""
    return ProcTable(decl.name, command_for(decl))
