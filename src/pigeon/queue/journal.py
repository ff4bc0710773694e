"""The durable queue: an append-only journal with group commit.

Why a journal: an fsync'd file per message caps near 1,000 msg/s on this kind of disk
(perf-anchors.md), while one ``fdatasync`` can cover every record appended since the last
one. Sessions that finish DATA at the same time append their message records and wait on
the same sync; only then do they send ``250``.

Layout under ``<spool>/queue/``: segment files ``00000001.log``, ``00000002.log``, ...
Each holds records (see ``records.py``): MESSAGE (metadata with all envelopes + body),
UPDATE (an envelope's new state after a failed attempt) and DELETE (envelopes done).
Replaying the segments in order rebuilds the queue. Segments are removed oldest first, and
only once none of their messages is alive; the live messages of the oldest segment are
copied forward (a new MESSAGE record with the current envelopes) so a message stuck in
retry never pins the journal. Removing strictly oldest-first keeps DELETE records from being
lost while the MESSAGE record they cancel still exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pigeon.durable import fsync_path
from pigeon.queue import records
from pigeon.queue.envelope import Envelope, msgid_of, new_msgid

log = logging.getLogger("pigeon.queue")

SEGMENT_SIZE = 64 * 1024 * 1024
LAZY_SYNC_DELAY = 0.5  # seconds: how long an UPDATE/DELETE may wait for its fdatasync


class QueueError(Exception):
    """The queue could not store or read something (disk full, I/O error)."""


class QueueLocked(QueueError):
    """Another daemon already runs on this spool."""


@dataclass(slots=True)
class StoredMessage:
    msgid: int
    segment: int
    body_offset: int  # absolute offset of the body in the segment file
    body_length: int
    envelopes: dict[int, Envelope] = field(default_factory=dict)


def _segment_name(number: int) -> str:
    return f"{number:08d}.log"


class JournalStore:
    """Queue storage. All methods run on the event loop's thread."""

    def __init__(self, spool: Path, *, readonly: bool = False) -> None:
        self.spool = Path(spool)
        self.directory = self.spool / "queue"
        self.readonly = readonly
        self.messages: dict[int, StoredMessage] = {}
        self._segments: dict[int, set[int]] = {}  # segment number -> live msgids in it
        self._reserved: set[int] = set()
        self._current = 0
        self._fd = -1
        self._size = 0
        self._read_fds: dict[int, int] = {}
        self._pinned: dict[int, int] = {}  # msgid -> readers elsewhere (the relay worker)
        self._paths: dict[int, str] = {}  # segment number -> its path, as text
        self._lock_fd = -1
        self._appended = 0  # records appended (buffered or written)
        self._written = 0  # records in the file (os.write done)
        self._synced = 0  # records known durable
        # Records appended during one loop iteration leave in one os.write (see _append).
        self._buffer: list[bytes] = []
        self._flushed_size = 0  # size of the file itself; _size also counts the buffer
        self._flush_handle: asyncio.Handle | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._committing: dict[int, int] = {}  # segment -> commits waiting for their sync
        self._executor: ThreadPoolExecutor | None = None
        self.stats = {"syncs": 0, "records": 0}

    # ----------------------------------------------------------------- opening, replay

    def open(self) -> None:
        """Lock the spool, replay every segment, and open the current one for appends."""
        if not self.readonly:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.spool / "pigeon.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = -1
                raise QueueLocked(f"another pigeon daemon is using {self.spool}") from None
        numbers = self._segment_numbers()
        for i, number in enumerate(numbers):
            self._replay_segment(number, last=(i == len(numbers) - 1))
        if self.readonly:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-fsync")
        if numbers:
            self._current = numbers[-1]
            path = self.directory / _segment_name(self._current)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            self._size = self._flushed_size = os.fstat(self._fd).st_size
        else:
            self._new_segment()
        self._drop_dead_segments()

    def _segment_numbers(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        out = []
        for entry in self.directory.iterdir():
            name = entry.name
            if name.endswith(".log") and name[:-4].isdigit():
                out.append(int(name[:-4]))
        return sorted(out)

    def _replay_segment(self, number: int, *, last: bool) -> None:
        path = self.directory / _segment_name(number)
        data = path.read_bytes()
        self._segments.setdefault(number, set())
        good_end = 0
        try:
            for rec in records.iter_records(data):
                self._apply(number, rec)
                good_end = rec.end
        except records.CorruptRecord as exc:
            if last and not self.readonly:
                # A torn append from a crash: never acknowledged, cut it off.
                log.warning("queue: truncating %s at %d (%s)", path.name, good_end, exc)
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                log.error(
                    "queue: %s is damaged at %d (%s); later records skipped",
                    path.name,
                    good_end,
                    exc,
                )

    def _apply(self, segment: int, rec: records.Record) -> None:
        if rec.kind == records.MESSAGE:
            meta = records.decode_message_meta(rec.payload)
            msgid = int(meta["msgid"])
            old = self.messages.get(msgid)
            if old is not None:  # copied forward from an older segment: this copy wins
                self._segments.get(old.segment, set()).discard(msgid)
            body_start = rec.offset + records.body_offset_in_record(rec.payload)
            msg = StoredMessage(msgid, segment, body_start, rec.end - body_start)
            for env in meta["envelopes"]:
                e = Envelope.from_dict(env)
                msg.envelopes[e.evpid] = e
            if msg.envelopes:
                self.messages[msgid] = msg
                self._segments.setdefault(segment, set()).add(msgid)
            else:
                self.messages.pop(msgid, None)
        elif rec.kind == records.UPDATE:
            e = Envelope.from_dict(records.decode_json(rec.payload))
            msg2 = self.messages.get(e.msgid)
            if msg2 is not None and e.evpid in msg2.envelopes:
                msg2.envelopes[e.evpid] = e
        elif rec.kind == records.DELETE:
            for evpid in records.decode_json(rec.payload):
                self._forget(int(evpid))

    def _forget(self, evpid: int) -> None:
        msgid = msgid_of(evpid)
        msg = self.messages.get(msgid)
        if msg is None:
            return
        msg.envelopes.pop(evpid, None)
        if not msg.envelopes:
            del self.messages[msgid]
            self._segments.get(msg.segment, set()).discard(msgid)

    # ----------------------------------------------------------------- queries

    def envelopes(self) -> Iterable[Envelope]:
        for msg in list(self.messages.values()):
            yield from list(msg.envelopes.values())

    def envelope(self, evpid: int) -> Envelope | None:
        msg = self.messages.get(msgid_of(evpid))
        return None if msg is None else msg.envelopes.get(evpid)

    def read_body(self, msgid: int) -> bytes:
        msg = self.messages.get(msgid)
        if msg is None:
            raise QueueError(f"no message {msgid:08x}")
        self._flush()
        fd = self._read_fds.get(msg.segment)
        if fd is None:
            fd = os.open(self.directory / _segment_name(msg.segment), os.O_RDONLY)
            self._read_fds[msg.segment] = fd
        data = os.pread(fd, msg.body_length, msg.body_offset)
        if len(data) != msg.body_length:
            raise QueueError(f"short read of message {msgid:08x}")
        return data

    def body_location(self, msgid: int) -> tuple[str, int, int]:
        """Where the body is: (segment path, offset, length), for a reader in another
        process. Pin the message while that reader may use it (see :meth:`pin`)."""
        msg = self.messages.get(msgid)
        if msg is None:
            raise QueueError(f"no message {msgid:08x}")
        self._flush()
        path = self._paths.get(msg.segment)
        if path is None:
            if len(self._paths) > 64:
                self._paths.clear()
            path = self._paths[msg.segment] = str(self.directory / _segment_name(msg.segment))
        return path, msg.body_offset, msg.body_length

    def pin(self, msgid: int) -> None:
        """Compaction leaves the message where it is until :meth:`unpin`: a location handed
        out by :meth:`body_location` stays valid meanwhile."""
        self._pinned[msgid] = self._pinned.get(msgid, 0) + 1

    def unpin(self, msgid: int) -> None:
        count = self._pinned.get(msgid, 0) - 1
        if count > 0:
            self._pinned[msgid] = count
        else:
            self._pinned.pop(msgid, None)

    def reserve_msgid(self) -> int:
        while True:
            msgid = new_msgid()
            if msgid not in self._reserved and msgid not in self.messages:
                break
        self._reserved.add(msgid)
        return msgid

    def release_msgid(self, msgid: int) -> None:
        self._reserved.discard(msgid)

    # ----------------------------------------------------------------- writes

    def _append(self, data: bytes | Sequence[bytes]) -> int:
        """Queue a record (bytes, or its parts in order) for the file; return its offset in
        the current segment.

        Records appended during one event-loop iteration are written together by one
        ``os.write`` (scheduled with ``call_soon``, so before the loop waits for I/O again),
        and always before an ``fdatasync``, a rotation, a body read and at close. Outside an
        event loop (tools, tests) the record is written at once.
        """
        if self.readonly:
            raise QueueError("queue opened read-only")
        parts = [data] if isinstance(data, bytes) else data
        length = sum(map(len, parts))
        if self._size + length > SEGMENT_SIZE and self._size > 0:
            self._rotate()
        start = self._size
        self._buffer.extend(parts)
        self._size = start + length
        self._appended += 1
        self.stats["records"] += 1
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush()
                return start
            self._flush_handle = loop.call_soon(self._flush_soon)
        return start

    def _flush_soon(self) -> None:
        self._flush_handle = None
        with contextlib.suppress(QueueError):  # their waiters got the error; it is logged
            self._flush()

    def _flush(self) -> None:
        """Write the buffered records. On failure (disk full, I/O error) nothing of them
        stays in the file, every waiter of a record not written gets the QueueError, and
        the QueueError is raised."""
        if not self._buffer:
            return
        parts, self._buffer = self._buffer, []
        start = self._flushed_size
        try:
            total = _write_all(self._fd, parts)
        except OSError as exc:
            # Leave no half record behind, so later appends stay readable.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            self._size = start
            self._appended = self._written  # those records are gone
            err = QueueError(f"queue write failed: {exc.strerror}")
            self._fail_waiters(lambda want: want > self._written, err)
            log.error("queue: write failed: %s", exc)
            raise err from exc
        self._flushed_size = start + total
        self._written = self._appended

    def _fail_waiters(self, affected: Callable[[int], bool], err: QueueError) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for want, fut in self._waiters:
            if affected(want):
                if not fut.done():
                    fut.set_exception(err)
            else:
                still.append((want, fut))
        self._waiters = still

    def _rotate(self) -> None:
        # Make the old segment durable before records land in the new one.
        self._flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._new_segment()

    def _new_segment(self) -> None:
        self._current += 1
        path = self.directory / _segment_name(self._current)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._size = self._flushed_size = 0
        self._segments.setdefault(self._current, set())
        fsync_path(self.directory)

    async def commit(
        self, msgid: int, body: bytes | Sequence[bytes], envelopes: list[Envelope]
    ) -> None:
        """Store a new message with its envelopes; return once it is on disk (fsync'd).
        ``body`` may come in parts (a Received header, then what the client sent): they
        are written one after the other, never joined in memory."""
        meta = {"msgid": msgid, "envelopes": [e.to_dict() for e in envelopes]}
        body_parts = [body] if isinstance(body, bytes) else list(body)
        body_len = sum(map(len, body_parts))
        parts = records.encode_message_parts(meta, body_parts)
        start = self._append(parts)
        body_start = start + sum(map(len, parts)) - body_len
        msg = StoredMessage(msgid, self._current, body_start, body_len)
        for e in envelopes:
            msg.envelopes[e.evpid] = e
        # Until it is indexed, the message keeps its segment alive: a rotation plus a
        # compaction while it waits for its sync must not unlink the file it is in.
        self._committing[msg.segment] = self._committing.get(msg.segment, 0) + 1
        try:
            await self.sync()
        except QueueError:
            # The client gets a 4xx: make sure a later replay does not deliver it anyway.
            with contextlib.suppress(QueueError):
                self._append(records.encode_json(records.DELETE, [e.evpid for e in envelopes]))
            self._reserved.discard(msgid)
            raise
        finally:
            left = self._committing.pop(msg.segment) - 1
            if left:
                self._committing[msg.segment] = left
        self.messages[msgid] = msg
        # Its own segment: another append may have rotated to a new one meanwhile.
        self._segments.setdefault(msg.segment, set()).add(msgid)
        self._reserved.discard(msgid)

    def update(self, envelope: Envelope) -> None:
        """Record an envelope's new state. Durable at the next sync."""
        msg = self.messages.get(envelope.msgid)
        if msg is None or envelope.evpid not in msg.envelopes:
            return
        msg.envelopes[envelope.evpid] = envelope
        self._append(records.encode_json(records.UPDATE, envelope.to_dict()))
        self._schedule_lazy_sync()

    def delete(self, evpids: Iterable[int]) -> None:
        """Mark envelopes as done. Durable at the next sync; written to the file at once,
        so a killed daemon does not deliver them again."""
        ids = [e for e in evpids if self.envelope(e) is not None]
        if not ids:
            return
        self._append(records.encode_delete(ids))
        for evpid in ids:
            self._forget(evpid)
        self._schedule_lazy_sync()

    def _schedule_lazy_sync(self) -> None:
        """Bookkeeping records ride on the next commit's sync, or a timer's within
        LAZY_SYNC_DELAY: they are in the file already (a killed daemon keeps them), and
        losing one to a power cut only means a delivery is tried again."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._schedule_sync()
            return
        if self._lazy_timer is None:
            self._lazy_timer = loop.call_later(LAZY_SYNC_DELAY, self._lazy_fire)

    def _lazy_fire(self) -> None:
        self._lazy_timer = None
        if self._fd >= 0:
            self._schedule_sync()

    def _schedule_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used outside the daemon (tools, tests): sync right away
            self._flush()
            os.fdatasync(self._fd)
            self._synced = self._written
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self._sync_loop())

    async def sync(self) -> None:
        """Wait until every record appended so far is durable (group commit)."""
        target = self._appended
        if self._synced >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._schedule_sync()
        await fut

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._synced < self._appended:
            with contextlib.suppress(QueueError):  # its records' waiters have the error
                self._flush()
            target = self._written
            if self._synced >= target:
                continue
            fd = self._fd
            try:
                await loop.run_in_executor(self._executor, os.fdatasync, fd)
            except OSError as exc:
                err = QueueError(f"queue sync failed: {exc.strerror}")
                self._fail_waiters(lambda _want: True, err)
                log.error("queue: fdatasync failed: %s", exc)
                return
            self.stats["syncs"] += 1
            self._synced = target
            still: list[tuple[int, asyncio.Future[None]]] = []
            for want, fut in self._waiters:
                if want <= target:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((want, fut))
            self._waiters = still

    # ----------------------------------------------------------------- compaction

    async def compact(self) -> None:
        """Drop finished segments; copy the live messages of the oldest one forward."""
        self._drop_dead_segments()
        numbers = sorted(self._segments)
        if len(numbers) < 2:
            return
        oldest = numbers[0]
        if oldest in self._committing:
            return  # a commit there is still waiting for its sync: next time
        if any(msgid in self._pinned for msgid in self._segments[oldest]):
            return  # a body there is being read elsewhere: next time
        for msgid in list(self._segments[oldest]):
            msg = self.messages[msgid]
            body = self.read_body(msgid)
            meta = {"msgid": msgid, "envelopes": [e.to_dict() for e in msg.envelopes.values()]}
            data = records.encode_message(meta, body)
            start = self._append(data)
            self._flush()  # raises before the message is pointed at a copy not written
            msg.segment = self._current
            msg.body_offset = start + len(data) - len(body)
            self._segments[oldest].discard(msgid)
            self._segments[self._current].add(msgid)
        await self.sync()
        self._drop_dead_segments()

    def _drop_dead_segments(self) -> None:
        removed = False
        for number in sorted(self._segments):
            if number == self._current or self._segments[number] or number in self._committing:
                break  # oldest first only
            fd = self._read_fds.pop(number, None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(number)).unlink()
            del self._segments[number]
            removed = True
        if removed and not self.readonly:
            fsync_path(self.directory)

    def segment_count(self) -> int:
        return len(self._segments)

    # ----------------------------------------------------------------- closing

    async def close(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._sync_task is not None:
            with contextlib.suppress(Exception):
                await self._sync_task
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._fd >= 0:
            with contextlib.suppress(QueueError):
                self._flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _write_all(fd: int, parts: list[bytes]) -> int:
    """Write ``parts`` in order with as few ``writev`` calls as the OS allows (IOV_MAX
    buffers each, partial writes resumed); returns the byte count."""
    total = 0
    views = [memoryview(p) for p in parts if p]
    i = 0
    while i < len(views):
        batch = views[i : i + _IOV_MAX]
        written = os.writev(fd, batch)
        total += written
        for view in batch:  # skip what went out, cut the first buffer only partly sent
            if written >= len(view):
                written -= len(view)
                i += 1
            else:
                views[i] = view[written:]
                break
    return total


_IOV_MAX = 1024  # Linux's UIO_MAXIOV: buffers per writev
