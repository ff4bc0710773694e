"""Tables served by a process speaking the old imsg table API (``tableimsg.py``).

``table NAME X:CONFIG`` runs ``table-X``; when that program is one of the old ones (Debian's
``opensmtpd-extras`` 6.7: ``table-passwd``, ``table-sqlite``, ``table-ldap``, ...), which is
recognised by its use of imsg, Pigeon speaks to it as smtpd 6.8 does: one end of a socketpair
as its fd 0, OPEN with the table's name, then one request at a time. It answers every service
of that API but ``auth`` (the listener then looks up ``credentials`` and checks the hash).

As for line-protocol tables (``proc.py``), a table that exits, breaks the protocol or does
not answer in time is killed, the request fails temporarily (4xx), and it is started again at
the next request after a backoff; smtpd 6.8 exits in those cases.
"""

from __future__ import annotations

import asyncio
import logging

from pigeon.procs import Channel, ProcCommand
from pigeon.protocol.tableimsg import (
    HEADER,
    SERVICE_BITS,
    ImsgAnswer,
    ImsgError,
    ImsgType,
    decode_answer,
    encode_close,
    encode_open,
    encode_query,
    encode_update,
    frame_length,
)
from pigeon.tables.base import Service, TableError
from pigeon.tables.proc import SupervisedTable

log = logging.getLogger("pigeon.tables")

REQUEST_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
SCAN_LIMIT = 16 << 20  # bytes of a program read to tell which protocol it speaks
_SERVICES = frozenset(s for s in Service if s.value in SERVICE_BITS)


def speaks_imsg(program: str) -> bool:
    """Whether ``program`` is a table of the old API: it reads imsg frames (libutil's
    ``imsg_get``), which no table of the line protocol has a use for."""
    try:
        with open(program, "rb") as f:
            data = f.read(SCAN_LIMIT)
    except OSError:
        return False
    return b"imsg_get" in data


async def _read_frame(channel: Channel) -> bytes | None:
    try:
        header = await channel.reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    try:
        length = frame_length(header)
    except ImsgError as exc:
        raise ConnectionError(f"protocol error: {exc}") from None
    try:
        return header + await channel.reader.readexactly(length - HEADER.size)
    except asyncio.IncompleteReadError:
        return None


class ImsgTable(SupervisedTable):
    def __init__(
        self,
        name: str,
        command: ProcCommand,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.name = name
        self.command = command
        self.request_timeout = request_timeout
        self.supervisor = self._supervise(
            command,
            handshake=self._handshake,
            on_line=self._on_frame,
            on_down=self._on_down,
            handshake_timeout=handshake_timeout,
            backoff_min=backoff_min,
            backoff_max=backoff_max,
            read_message=_read_frame,
        )
        self._lock = asyncio.Lock()  # the API is strictly one request, then its answer
        self._waiting: tuple[ImsgType, asyncio.Future[ImsgAnswer]] | None = None
        self._closed = False

    def services(self) -> frozenset[Service]:
        return _SERVICES

    async def close(self) -> None:
        self._closed = True
        channel = self.supervisor.channel
        if channel is not None:  # as smtpd 7.5 does; 6.8 just closes the socket
            channel.writer.write(encode_close())
        self._fail_waiting("table closed")
        await self.supervisor.stop()

    async def update(self) -> None:
        answer = await self._request(ImsgType.UPDATE, encode_update())
        if answer.result != 1:
            raise TableError(f"table {self.name}: update failed")

    async def _lookup(self, service: Service, key: str) -> str | None:
        answer = await self._query(ImsgType.LOOKUP, service, key)
        return answer.value if answer.result == 1 else None

    async def _check(self, service: Service, key: str) -> bool:
        return (await self._query(ImsgType.CHECK, service, key)).result == 1

    async def _fetch(self, service: Service) -> str | None:
        answer = await self._query(ImsgType.FETCH, service, None)
        return answer.value if answer.result == 1 else None

    async def _query(self, kind: ImsgType, service: Service, key: str | None) -> ImsgAnswer:
        try:
            frame = encode_query(kind, service.value, key)
        except ValueError as exc:
            raise TableError(f"table {self.name}: {exc}") from None
        answer = await self._request(kind, frame)
        if answer.result < 0:
            raise TableError(f"table {self.name}: {kind.name.lower()} {service.value} failed")
        return answer

    async def _request(self, kind: ImsgType, frame: bytes) -> ImsgAnswer:
        async with self._lock:
            channel = await self._ensure_running()
            future: asyncio.Future[ImsgAnswer] = asyncio.get_running_loop().create_future()
            self._waiting = (kind, future)
            try:
                channel.writer.write(frame)
                await channel.writer.drain()
                answer = await asyncio.wait_for(future, self.request_timeout)
            except TimeoutError:
                # One answer at a time: a late one would be taken for the next request's.
                self.supervisor.declare_broken("request timed out: table hung")
                raise TableError(f"table {self.name}: request timed out") from None
            except (ConnectionError, OSError) as exc:
                self.supervisor.declare_broken(f"cannot write: {exc}")
                raise TableError(f"table {self.name}: {exc}") from exc
            finally:
                self._waiting = None
        self.supervisor.healthy()
        return answer

    async def _handshake(self, channel: Channel) -> None:
        channel.writer.write(encode_open(self.name))
        await channel.writer.drain()
        frame = await _read_frame(channel)
        if frame is None:
            raise ImsgError("end of file during the handshake")
        decode_answer(ImsgType.OPEN, frame)
        log.info("info: table %s: opened (table API of OpenSMTPD 6.x, imsg)", self.name)

    def _on_frame(self, frame: bytes) -> None:
        waiting = self._waiting
        if waiting is None:
            self.supervisor.declare_broken("protocol error: an answer nobody asked for")
            return
        kind, future = waiting
        try:
            answer = decode_answer(kind, frame)
        except ImsgError as exc:
            self.supervisor.declare_broken(f"protocol error: {exc}")
            return
        if not future.done():
            future.set_result(answer)

    def _on_down(self, reason: str) -> None:
        self._fail_waiting(reason)

    def _fail_waiting(self, reason: str) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting[1].done():
            waiting[1].set_exception(TableError(f"table {self.name}: {reason}"))
