"""The relay worker process: remote delivery on its own core (OpenSMTPD's ``mta`` process).

Started by the daemon (``python -m pigeon.delivery.worker``, see ``relay_service.py``) with
one end of a socketpair as fd 0; as root-started daemon's child it runs as the unprivileged
user. It runs a :class:`RelayAgent` and answers the requests of ``wire.py``: each delivery
reads the message body from the journal segment named in the request (read-only), so the
daemon only sends envelopes and a file position. It writes its log lines (among them the
``mta delivery`` line of each envelope it relays, as smtpd's mta) where the daemon's go
(stderr, syslog or the log file: the daemon says which in ``configure``), or, when the daemon
cannot say, sends them back to the daemon.

It exits when the daemon's end of the socket closes, ending its kept sessions politely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from typing import Any

from pigeon.delivery import wire
from pigeon.delivery.dns import MXResolver
from pigeon.delivery.logline import log_delivery
from pigeon.delivery.relay import RelayAgent
from pigeon.delivery.routes import RelayRoute
from pigeon.log import apply_levels, child_handler
from pigeon.scheduler.scheduler import Outcome

STREAM_LIMIT = 256 << 20  # a request line (envelopes of one message) may be long
MAX_OPEN_SEGMENTS = 4  # journal segments kept open for reading
ANSWER_LINGER = 0.005  # seconds a delivery's answer may wait for others (see Outbox)
CLOSE_TIMEOUT = 1.5  # for QUITs at exit: the daemon kills a worker that lingers 2 s


class SegmentReader:
    """Reads message bodies out of journal segments, keeping a few files open."""

    def __init__(self) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()

    def read(self, path: str, offset: int, length: int) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[path] = fd
            while len(self._fds) > MAX_OPEN_SEGMENTS:  # compaction removed older ones
                _, old = self._fds.popitem(last=False)
                os.close(old)
        else:
            self._fds.move_to_end(path)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read in {path}")
        return data

    def forget_removed(self) -> None:
        """Close segments compaction unlinked, so their space is freed."""
        for path, fd in list(self._fds.items()):
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_nlink:
                    continue
            os.close(fd)
            del self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class Outbox:
    """Everything said during one loop iteration leaves as one line. Answers to deliveries
    may linger a few milliseconds for others to join them: under load the daemon then reads
    one line per batch of outcomes rather than one per delivery (its CPU is what limits a
    busy host; a relayed message does not mind 5 ms)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[dict[str, Any]] = []
        self._soon = False  # a flush is due at this loop iteration's end
        self._timer: asyncio.TimerHandle | None = None

    def send(self, message: dict[str, Any], *, linger: float = 0.0) -> None:
        self._pending.append(message)
        if self._soon:
            return
        loop = asyncio.get_running_loop()
        if linger <= 0.0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._soon = True
            loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(linger, self._flush)

    def _flush(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        messages, self._pending = self._pending, []
        if messages and not self._writer.is_closing():
            self._writer.write(wire.encode_batch(messages).encode() + b"\n")


class ForwardLogs(logging.Handler):
    """Sends log records to the daemon, which writes them where its own go."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._outbox.send(
                {"op": "log", "level": record.levelno, "name": record.name, "msg": text}
            )
        except Exception:
            self.handleError(record)


class Worker:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.agent: RelayAgent | None = None
        self.segments = SegmentReader()
        self._tasks: set[asyncio.Task[None]] = set()
        self.logs_directly = False  # else log records travel to the daemon
        self.routes: dict[int, RelayRoute] = {}  # by the numbers the daemon gave them

    def handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "deliver":
            task = asyncio.get_running_loop().create_task(self._deliver(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif op == "show":
            self._show(message)
        elif op == "configure":
            self._configure(message)
        elif op == "route":
            self.routes[int(message["rid"])] = wire.decode_route(message["route"])
        elif op == "forget-routes":
            self.routes.clear()
        elif op == "levels":
            apply_levels(dict(message.get("levels") or {}))
        else:
            raise ValueError(f"unknown request {op!r}")

    def _configure(self, message: dict[str, Any]) -> None:
        settings, dns = wire.decode_settings(message)
        if "levels" in message:
            apply_levels(dict(message["levels"] or {}))
        else:
            logging.getLogger("pigeon").setLevel(int(message.get("level", logging.INFO)))
        description = message.get("log")
        if description and not self.logs_directly:
            try:
                handler = child_handler(dict(description))
            except (OSError, ValueError, KeyError) as exc:
                logging.getLogger("pigeon.mta").warning(
                    "warn: relay worker: cannot write logs itself (%s): the daemon does", exc
                )
            else:
                logging.getLogger("pigeon").handlers[:] = [handler]
                self.logs_directly = True
        if self.agent is None:
            self.agent = RelayAgent(settings, MXResolver(dns))
        else:
            self.agent.reconfigure(settings)  # kept sessions and views stay
        self.outbox.send({"op": "ready"})

    def _show(self, message: dict[str, Any]) -> None:
        ident = message["id"]
        try:
            assert self.agent is not None, "not configured"
            self.outbox.send({"id": ident, "lines": self.agent.show(str(message["view"]))})
        except (ValueError, AssertionError) as exc:
            self.outbox.send({"id": ident, "error": str(exc)})

    async def _deliver(self, message: dict[str, Any]) -> None:
        ident = message["id"]
        envelopes = [wire.decode_envelope(e) for e in message["envelopes"]]
        dsn_relayed: set[int] = set()
        try:
            assert self.agent is not None, "not configured"
            path, offset, length = message["body"]
            try:
                body = self.segments.read(path, int(offset), int(length))
            except OSError as exc:
                outcomes = {
                    e.evpid: Outcome.tempfail(f"cannot read the message: {exc}") for e in envelopes
                }
            else:
                outcomes = await self.agent.deliver(
                    self.routes[int(message["rid"])],
                    envelopes,
                    body,
                    sender=message.get("sender"),
                    dsn_relayed=dsn_relayed if message.get("dsn") else None,
                )
        except Exception as exc:  # every request gets its answer
            logging.getLogger("pigeon.mta").exception("warn: relay worker: delivery failed")
            outcomes = {e.evpid: Outcome.tempfail(f"relay worker error: {exc}") for e in envelopes}
        answer: dict[str, Any] = {"id": ident, "outcomes": wire.encode_outcomes(outcomes)}
        if dsn_relayed:
            answer["dsn_relayed"] = sorted(dsn_relayed)
        if self.logs_directly:
            now = time.time()
            for env in envelopes:
                outcome = outcomes.get(env.evpid)
                if outcome is not None and not outcome.logged:  # (the agent logs its own)
                    log_delivery(env, outcome.status, outcome.line, now)
            answer["logged"] = True
        self.outbox.send(answer, linger=ANSWER_LINGER)

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(30.0)
            self.segments.forget_removed()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.agent is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.agent.close(), CLOSE_TIMEOUT)
        self.segments.close()


async def serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=STREAM_LIMIT)
    outbox = Outbox(writer)
    root = logging.getLogger("pigeon")
    root.handlers[:] = [ForwardLogs(outbox)]
    root.propagate = False
    worker = Worker(outbox)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    sweeper = loop.create_task(worker.sweep())
    try:
        while True:
            line = await reader.readline()
            if not line.endswith(b"\n"):
                break  # the daemon closed its end
            for message in wire.decode_batch(line):
                worker.handle(message)
    except asyncio.CancelledError:
        main.uncancel()  # SIGTERM: stop as at EOF, politely
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # already ending: let it end politely
            loop.add_signal_handler(sig, lambda: None)
        sweeper.cancel()
        await worker.close()
        writer.close()


def main() -> int:
    # fd 0 is the socketpair; nothing else may ever write to it by accident.
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # As the daemon's: a line per relayed envelope must stay cheap (no caller frame lookup).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if os.environ.get("PIGEON_EVENT_LOOP") != "asyncio":
        try:
            import uvloop

            uvloop.run(serve(sock))
            return 0
        except ImportError:
            pass
    asyncio.run(serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
