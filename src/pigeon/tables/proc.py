"""Proc tables: a child process that speaks OpenSMTPD's table protocol 0.1.

``table NAME BACKEND:CONFIG`` (any backend Pigeon has no built-in for) runs ``table-BACKEND``
from OpenSMTPD's add-on directory (or Pigeon's own) exactly as smtpd 7.6+ does: argv[0] is the
table name, argv[1] the config (absent if none), and one end of a socketpair is the child's
fd 0 *and* fd 1; stderr lines go to the log. ``table NAME proc-exec "command line"`` runs a
command line through ``/bin/sh -c`` instead, like ``filter NAME proc-exec``. The process is
kept by :class:`pigeon.procs.ProcessSupervisor`, as filters are (restarts on demand here).

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
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pigeon.config.builder import PROC_TABLE_DIRS  # OpenSMTPD's add-on dirs, then Pigeon's
from pigeon.config.model import Config, TableDecl
from pigeon.procs import (
    Channel,
    ProcCommand,
    ProcessNotRunning,
    ProcessSpec,
    ProcessStartFailed,
    ProcessSupervisor,
)
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

__all__ = ["ProcCommand", "ProcTable", "command_for", "find_table_program", "proc_from_decl"]

log = logging.getLogger("pigeon.tables")

SMTPD_VERSION = "7.6.0"  # what we announce in config|smtpd-version: the protocol we follow
REQUEST_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
MAX_TIMEOUTS = 3
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0


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


class SupervisedTable(Table):
    """A table served by a child process that a :class:`ProcessSupervisor` keeps, started
    again on demand; what the two table protocols (0.1 here, imsg in ``imsg.py``) share."""

    name: str
    supervisor: ProcessSupervisor
    _closed: bool = False

    def _supervise(
        self,
        command: ProcCommand,
        *,
        handshake: Callable[[Channel], Awaitable[None]],
        on_line: Callable[[Any], None],
        on_down: Callable[[str], None],
        handshake_timeout: float,
        backoff_min: float,
        backoff_max: float,
        read_message: Callable[[Channel], Awaitable[Any]] | None = None,
    ) -> ProcessSupervisor:
        # Started as root, a table program runs as Pigeon's unprivileged user (or stays root
        # when the daemon does not drop privileges: no fallback to nobody).
        spec = ProcessSpec(f"table {self.name}", command, socketpair=True, fallback_user=None)
        return ProcessSupervisor(
            spec,
            handshake=handshake,
            on_line=on_line,
            on_down=on_down,
            handshake_timeout=handshake_timeout,
            backoff_initial=backoff_min,
            backoff_max=backoff_max,
            restart="on-demand",
            logger=log,
            read_message=read_message,
        )

    @property
    def restarts(self) -> int:
        """Processes started after the first one (for logs and tests)."""
        return self.supervisor.restarts

    async def start(self) -> None:
        """Start the process now (the daemon does this at startup, so ``services()`` is
        known before listeners decide between ``auth`` and ``credentials``)."""
        await self._ensure_running()

    async def _ensure_running(self) -> Channel:
        if self._closed:
            raise TableError(f"table {self.name}: closed")
        try:
            return await self.supervisor.ensure_running()
        except ProcessStartFailed as exc:
            why = str(exc).removeprefix("cannot start: ")
            raise TableError(f"table {self.name}: cannot start: {why}") from None
        except ProcessNotRunning as exc:
            raise TableError(f"table {self.name}: {exc}") from None


class ProcTable(SupervisedTable):
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
        self.max_timeouts = max_timeouts
        self.supervisor = self._supervise(
            command,
            handshake=self._handshake,
            on_line=self._on_line,
            on_down=self._on_down,
            handshake_timeout=handshake_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
        )
        self._pending: dict[str, tuple[TableOp, asyncio.Future[TableResult]]] = {}
        self._expired: deque[str] = deque(maxlen=256)  # ids given up on: late replies are fine
        self._process_services: frozenset[Service] = frozenset()
        self._services: frozenset[Service] | None = None
        self._timeouts = 0
        self._closed = False

    # ------------------------------------------------------------------ Table interface

    def services(self) -> frozenset[Service]:
        """The services the table registered; before its first handshake, every service (as
        smtpd's parse-time check assumes)."""
        return self._services if self._services is not None else frozenset(Service)

    async def close(self) -> None:
        self._closed = True
        self._fail_pending("table closed")
        await self.supervisor.stop()

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
        channel = await self._ensure_running()
        if service is not None and service not in self._process_services:
            raise TableError(f"table {self.name}: service {service.value} not registered")
        request_id = format_request_id(secrets.randbits(32))
        while request_id in self._pending:
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
        self._pending[request_id] = (op, future)
        try:
            channel.write_line(line)
            await channel.writer.drain()
            result = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            self._expired.append(request_id)
            self._timeouts += 1
            log.warning(
                "warn: table %s: no answer to %s within %gs", self.name, op, self.request_timeout
            )
            if self._timeouts >= self.max_timeouts:
                self.supervisor.declare_broken(f"{self._timeouts} requests timed out: table hung")
            raise TableError(f"table {self.name}: request timed out") from None
        except (ConnectionError, OSError) as exc:
            self.supervisor.declare_broken(f"cannot write: {exc}")
            raise TableError(f"table {self.name}: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
        self._timeouts = 0
        self.supervisor.healthy()  # a good answer: the next failure restarts quickly again
        if result.status is TableStatus.ERROR:
            raise TableError(f"table {self.name}: {op} failed: {result.value or 'error'}")
        return result

    # ------------------------------------------------------------------ the process's side

    async def _handshake(self, channel: Channel) -> None:
        for config_line in encode_config(smtpd_version=SMTPD_VERSION, table_name=self.name):
            channel.write_line(config_line)
        await channel.writer.drain()
        registration = TableRegistration()
        while not registration.ready:
            line = await channel.read_line()
            if line is None:
                raise TableProtocolError("end of file during the handshake")
            registration.feed(decode_table_line(line))
        services = frozenset(Service(s) for s in registration.services)
        self._process_services = self._services = services
        self._expired.clear()  # ids the old process was asked
        names = ", ".join(sorted(s.value for s in services))
        log.info("info: table %s: registered %s", self.name, names)

    def _on_line(self, line: str) -> None:
        """An answer: complete the request with its id; anything else breaks the process."""
        try:
            message = decode_table_line(line)
            if not isinstance(message, TableResult):
                raise TableProtocolError(f"unexpected message: {line!r}")
            entry = self._pending.get(message.id)
            if entry is None:
                if message.id in self._expired:
                    return  # the answer to a request that timed out: harmless
                raise TableProtocolError(f"answer to unknown request id {message.id!r}")
            request_op, future = entry
            if request_op is not message.op:
                raise TableProtocolError(f"{message.op}-result for a {request_op} request")
        except TableProtocolError as exc:
            self.supervisor.declare_broken(f"protocol error: {exc}")
            return
        if not future.done():
            future.set_result(message)

    def _on_down(self, reason: str) -> None:
        """The process went away (or never came up): what was in flight fails temporarily."""
        self._timeouts = 0
        self._fail_pending(reason)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for _op, future in pending.values():
            if not future.done():
                future.set_exception(TableError(f"table {self.name}: {reason}"))


def proc_from_decl(decl: TableDecl, config: Config) -> Table:
    """Factory for ``open_tables``: ``proc``, ``proc-exec`` and any ``X:`` without a
    built-in backend. A program of the old table API (Debian's opensmtpd-extras) is spoken
    to in imsg, as smtpd 6.8 does (``imsg.py``)."""
    from pigeon.tables.imsg import ImsgTable, speaks_imsg

    command = command_for(decl)
    if decl.backend != "proc-exec" and speaks_imsg(command.executable):
        return ImsgTable(decl.name, command)
    return ProcTable(decl.name, command)
