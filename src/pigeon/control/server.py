"""The control socket: JSON lines over ``<spool>/control.sock``.

Request: ``{"command": ["show", "queue"]}``. Response: ``{"ok": true, "output": "...",
"data": ...}`` then the server closes the connection (``monitor`` streams lines until the
client goes away). ``{"command": ["enqueue"], "submission": {...}}`` submits a message
(sendmail). Words may be abbreviated as with smtpctl (``sh q``).

The socket is ``0666`` so every user can submit mail; everything else is reserved to root
and the daemon's own user (checked with the peer's credentials), as smtpctl does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pigeon.control import grammar
from pigeon.control.enqueue import socket_runtime, submit
from pigeon.control.views import human_duration, queue_row, render_queue_line
from pigeon.queue import offline
from pigeon.queue.envelope import evpid_hex
from pigeon.tables.base import TableError

if TYPE_CHECKING:
    from pigeon.daemon import Daemon
    from pigeon.server.listener import ListenerRuntime

log = logging.getLogger("pigeon.control")

MAX_REQUEST = 64 * 1024 * 1024  # an enqueue request carries the whole message
OFFLINE_INTERVAL = 5.0
MONITOR_LINES = 86400

# `trace <subsystem>`: smtpctl's names and the loggers behind them.
TRACE_LOGGERS: dict[str, tuple[str, ...]] = {
    "imsg": ("pigeon.imsg",),
    "io": ("pigeon.io",),
    "smtp": ("pigeon.smtp", "pigeon.server"),
    "filters": ("pigeon.filters",),
    # pigeon.trace.mta: the relay's SMTP dialogue, on only while traced (not `log verbose`).
    "transfer": ("pigeon.mta", "pigeon.trace.mta"),
    "mta": ("pigeon.mta", "pigeon.trace.mta"),
    "mda": ("pigeon.mda",),
    "bounce": ("pigeon.bounce",),
    "scheduler": ("pigeon.scheduler",),
    "queue": ("pigeon.queue",),
    "expand": ("pigeon.rules",),
    "lookup": ("pigeon.tables",),
    "rules": ("pigeon.rules",),
    "stat": ("pigeon.stat",),
    "mproc": ("pigeon.mproc",),
    "control": ("pigeon.control",),
    "all": ("pigeon", "pigeon.trace.mta"),
}

# Commands any local user may run.
UNPRIVILEGED = {("enqueue",), ("show", "status")}


class CommandError(Exception):
    pass


def parse_id(word: str) -> tuple[str, int]:
    """An 8-hex msgid (whole message) or a 16-hex evpid (one envelope)."""
    text = word.lower()
    try:
        value = int(text, 16)
    except ValueError:
        raise CommandError(f"invalid msgid/evpid: {word}") from None
    if len(text) <= 8:
        return "msg", value
    if len(text) <= 16:
        return "evp", value
    raise CommandError(f"invalid msgid/evpid: {word}")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, daemon: Daemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self._offline_task: asyncio.Task[None] | None = None
        self._offline_refused: set[str] = set()  # files that failed for good: not retried
        self._runtime: ListenerRuntime | None = None

    @property
    def spool(self) -> Path:
        return self.path.parent

    async def start(self, *, serving: bool = True) -> None:
        """Create the socket; ``serving=False`` leaves answering to :meth:`serve`."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(
            self._client, path=str(self.path), limit=MAX_REQUEST, start_serving=serving
        )
        os.chmod(self.path, 0o666)
        if serving:
            await self.serve()

    async def serve(self) -> None:
        """Answer requests and watch the offline queue."""
        if self.server is not None and not self.server.is_serving():
            await self.server.start_serving()
        try:
            offline.ensure_dir(self.spool)
        except OSError as exc:
            log.warning("warn: cannot create the offline queue directory: %s", exc)
        self._offline_task = asyncio.get_running_loop().create_task(self._offline_loop())

    async def stop(self) -> None:
        if self._offline_task is not None:
            self._offline_task.cancel()
            with contextlib.suppress(BaseException):
                await self._offline_task
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _privileged(self, uid: int | None) -> bool:
        return uid is None or uid == 0 or uid == os.geteuid()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.daemon.services.stats.incr("control.session")
        response: dict[str, Any]
        try:
            line = await asyncio.wait_for(reader.readline(), 30)
            request = json.loads(line or b"{}")
            if not isinstance(request, dict):
                raise CommandError("malformed request")
            words = [str(w) for w in request.get("command", [])]
            if words != ["enqueue"]:  # internal (sendmail): never abbreviated
                words = grammar.expand(words)
            unprivileged = tuple(words[:2]) in UNPRIVILEGED or tuple(words[:1]) in UNPRIVILEGED
            if not unprivileged and not self._privileged(peer_uid(writer)):
                raise CommandError("command not permitted")
            if words == ["monitor"]:
                await self._monitor(writer)
                return
            if words == ["enqueue"]:
                response = await self._enqueue(request.get("submission"))
            else:
                output, data = await self.execute(words)
                response = {"ok": True, "output": output, "data": data}
        except grammar.Ambiguous as exc:
            response = {
                "ok": False,
                "output": "invalid command",
                "possibilities": exc.possibilities,
            }
        except CommandError as exc:
            response = {"ok": False, "output": str(exc)}
        except (TimeoutError, ValueError, UnicodeDecodeError):
            response = {"ok": False, "output": "malformed request"}
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
            writer.close()

    # ------------------------------------------------------------------ submission

    def _socket_runtime(self) -> ListenerRuntime:
        if self._runtime is None:
            self._runtime = socket_runtime(
                self.daemon.config, self.daemon.hostname, self.daemon.filters
            )
        return self._runtime

    async def _enqueue(self, raw: object) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise CommandError("enqueue needs a submission")
        try:
            message = base64.b64decode(str(raw.get("message", "")), validate=True)
        except (binascii.Error, ValueError):
            raise CommandError("malformed message encoding") from None
        try:
            sub = offline.Submission.from_header(raw, message)
        except offline.OfflineError as exc:
            raise CommandError(str(exc)) from None
        result = await submit(self.daemon.services, self._socket_runtime(), sub)
        return {"ok": result.ok, "output": result.reply, "data": {"reply": result.reply}}

    async def _offline_loop(self) -> None:
        """Offline submissions: at start, then every few seconds (OpenSMTPD: only at start)."""
        while True:
            try:
                await self.pick_up_offline()
            except Exception:  # never let one bad file stop the pick-up
                log.exception("warn: offline queue pick-up failed")
            await asyncio.sleep(OFFLINE_INTERVAL)

    async def pick_up_offline(self) -> int:
        """Enqueue every waiting offline file; returns how many were queued."""
        queued = 0
        for path in offline.pending(self.spool):
            if path.name in self._offline_refused:
                continue
            try:
                sub, uid = offline.read(path)
            except offline.OfflineError as exc:
                log.warning("warn: offline message %s ignored: %s", path.name, exc)
                self._offline_refused.add(path.name)
                continue
            result = await submit(self.daemon.services, self._socket_runtime(), sub)
            if result.ok:
                path.unlink(missing_ok=True)
                queued += 1
                continue
            log.warning(
                "warn: couldn't enqueue offline message %s (uid %d): %s",
                path.name,
                uid,
                result.reply,
            )
            if not result.temporary:  # kept for the administrator; retried at next start
                self._offline_refused.add(path.name)
        return queued

    # ------------------------------------------------------------------ commands

    async def execute(self, words: list[str]) -> tuple[str, Any]:
        d = self.daemon
        match words:
            case ["show", "queue", *rest]:
                rows = self.queue_rows(rest[0] if rest else None)
                return "\n".join(render_queue_line(r) for r in rows), rows
            case ["show", "stats"]:
                stats = self.stats()
                return "\n".join(f"{k}={v}" for k, v in stats.items()), stats
            case ["show", "status"]:
                s = d.scheduler
                lines = [
                    f"MDA {'paused' if 'mda' in s.paused else 'running'}",
                    f"MTA {'paused' if 'mta' in s.paused else 'running'}",
                    f"SMTP {'paused' if d.services.smtp_paused else 'running'}",
                ]
                return "\n".join(lines), lines
            case ["show", ("hosts" | "relays" | "routes" | "hoststats") as view]:
                # What the relay agent tracks, in smtpctl's line formats.
                shown = await d.relay.show(view)
                return "\n".join(shown), shown
            case ["show", "mta", "paused"]:
                return "", []
            case ["show", "envelope", ident]:
                kind, value = parse_id(ident)
                env = d.store.envelope(value) if kind == "evp" else None
                if env is None:
                    raise CommandError("no such envelope")
                return env.render().rstrip("\n"), env.to_dict()
            case ["show", "message", ident]:
                kind, value = parse_id(ident)
                msgid = value if kind == "msg" else value >> 32
                if msgid not in d.store.messages:
                    raise CommandError("no such message")
                body = d.store.read_body(msgid)
                text = body.replace(b"\r\n", b"\n").decode("utf-8", "replace")
                return text.rstrip("\n"), None
            case ["schedule", target]:
                n = sum(d.scheduler.schedule_now(e) for e in self._select(target))
                return f"{_plural(n, 'envelope')} scheduled", n
            case ["remove", target]:
                n = self._remove(self._select(target))
                return f"{_plural(n, 'envelope')} removed", n
            case ["pause", "envelope", target]:
                n = 0
                for evpid in self._select(target):
                    if evpid in d.scheduler and evpid not in d.scheduler.suspended:
                        d.scheduler.suspended.add(evpid)
                        n += 1
                return f"{_plural(n, 'envelope')} paused", n
            case ["resume", "envelope", target]:
                n = 0
                for evpid in self._select(target):
                    if evpid in d.scheduler.suspended:
                        d.scheduler.suspended.discard(evpid)
                        self._requeue(evpid)
                        n += 1
                return f"{_plural(n, 'envelope')} resumed", n
            case [("pause" | "resume") as verb, ("mda" | "mta" | "smtp") as what]:
                if what == "smtp":
                    d.services.smtp_paused = verb == "pause"
                elif verb == "pause":
                    d.scheduler.pause(what)
                else:
                    d.scheduler.resume(what)
                log.info("info: %s %s", what, "paused" if verb == "pause" else "resumed")
                return "command succeeded", True
            case ["log", ("verbose" | "brief") as level]:
                logging.getLogger("pigeon").setLevel(
                    logging.DEBUG if level == "verbose" else logging.INFO
                )
                self._reset_traces()  # as smtpctl: `log verbose` resets the trace flags
                d.relay.sync_log_levels()
                return "command succeeded", True
            case [("trace" | "untrace") as verb, subsystem]:
                names = TRACE_LOGGERS.get(subsystem)
                if names is None:
                    raise CommandError(f"invalid subsystem: {subsystem}")
                for name in names:
                    logging.getLogger(name).setLevel(
                        logging.DEBUG if verb == "trace" else logging.NOTSET
                    )
                if subsystem == "all" and verb == "untrace":
                    self._reset_traces()
                    logging.getLogger("pigeon").setLevel(logging.INFO)
                d.relay.sync_log_levels()
                return "command succeeded", True
            case ["stop"]:
                d.request_stop()
                return "command succeeded", True
            case ["update", "table", name]:
                try:
                    await d.update_table(name)
                except TableError as exc:
                    raise CommandError(f"update failed: {exc}") from None
                return "command succeeded", True
            case ["reload"]:  # Pigeon extension (smtpctl has none): see pigeon/reload.py
                ok, message = await d.reload()
                if not ok:
                    raise CommandError(message)
                return message, True
        raise CommandError("invalid command: " + " ".join(words))

    @staticmethod
    def _reset_traces() -> None:
        for names in TRACE_LOGGERS.values():
            for name in names:
                if name != "pigeon":
                    logging.getLogger(name).setLevel(logging.NOTSET)

    def _requeue(self, evpid: int) -> None:
        """A resumed envelope goes back at its planned time (or now, if that passed)."""
        s = self.daemon.scheduler
        env = self.daemon.store.envelope(evpid)
        if env is None or evpid not in s or evpid in s.inflight:
            return
        due = s.scheduled_at(evpid)
        s.add(env, when=due if due is not None else None)

    def _remove(self, evpids: list[int]) -> int:
        d = self.daemon
        n = 0
        for evpid in evpids:
            env = d.store.envelope(evpid)
            if env is None:
                continue
            log.info(
                "relay: Remove for %s: from=<%s>, to=<%s>, rcpt=<->, delay=%s, "
                "stat=Removed by administrator",
                evpid_hex(evpid),
                env.sender,
                env.dest,
                human_duration(max(0, int(d.scheduler.clock.now()) - env.ctime)),
            )
            d.scheduler.remove(evpid)
            # In flight: the agent's result deletes it (a delivery and a deletion never race).
            if evpid not in d.scheduler.inflight:
                d.store.delete([evpid])
            d.services.stats.incr("queue.envelope.removed")
            n += 1
        return n

    def _select(self, target: str) -> list[int]:
        store = self.daemon.store
        if target == "all":
            return [e.evpid for e in store.envelopes()]
        kind, value = parse_id(target)
        if kind == "evp":
            return [value] if store.envelope(value) is not None else []
        msg = store.messages.get(value)
        return list(msg.envelopes) if msg is not None else []

    def queue_rows(self, only: str | None = None) -> list[dict[str, Any]]:
        d = self.daemon
        s = d.scheduler
        now = s.clock.now()
        rows = []
        wanted: set[int] | None = None
        if only is not None:
            wanted = set(self._select(only))
        for env in sorted(d.store.envelopes(), key=lambda e: (e.ctime, e.evpid)):
            if wanted is not None and env.evpid not in wanted:
                continue
            inflight = env.evpid in s.inflight
            due = s.scheduled_at(env.evpid)
            if inflight:
                delay = 0
            elif due is None or due <= now:
                delay = -1  # due, held back (paused, suspended, in-flight cap): smtpctl's -1
            else:
                delay = int(due - now)
            rows.append(
                queue_row(
                    env,
                    runstate="inflight" if inflight else "pending",
                    delay=delay,
                    queue_ttl=d.config.queue.ttl,
                    # smtpctl flags suspended envelopes only, not a paused agent's.
                    paused=env.evpid in s.suspended,
                )
            )
        return rows

    def stats(self) -> dict[str, Any]:
        """smtpctl's keys where Pigeon has the same thing, plus Pigeon's queue.* figures."""
        d = self.daemon
        s = d.scheduler
        counters = d.services.stats.counters
        out: dict[str, Any] = {}
        for key in (
            "control.session",
            "scheduler.delivery.ok",
            "scheduler.delivery.permfail",
            "scheduler.delivery.tempfail",
            "scheduler.delivery.loop",
            "scheduler.envelope.expired",
            "smtp.session.inet4",
            "smtp.session.inet6",
            "smtp.session.local",
        ):
            out[key] = counters.get(key, 0)
        envs = s.envelopes()
        inflight = [e for e in envs if e.evpid in s.inflight]
        out["mda.envelope"] = sum(1 for e in inflight if e.type != "mta")
        out["mta.envelope"] = sum(1 for e in inflight if e.type == "mta")
        out["queue.bounce"] = counters.get("queue.bounce", 0)
        out["queue.message"] = len(d.store.messages)
        out["queue.segments"] = d.store.segment_count()
        out["queue.syncs"] = d.store.stats["syncs"]
        out["scheduler.envelope"] = len(envs)
        out["scheduler.envelope.incoming"] = sum(
            len(session.txn.envelopes) for session in d.services.sessions if session.txn
        )
        out["scheduler.envelope.inflight"] = len(s.inflight)
        out["scheduler.ramqueue.envelope"] = len(envs)
        out["scheduler.ramqueue.message"] = len({e.msgid for e in envs})
        out["smtp.session"] = len(d.services.sessions)  # current sessions, as smtpctl
        uptime = int(time.time() - d.started)
        out["uptime"] = uptime
        out["uptime.human"] = human_duration(uptime)
        return dict(sorted(out.items()))

    def monitor_counters(self) -> dict[str, int]:
        """Cumulative figures behind ``monitor``'s columns (curr* are gauges)."""
        d = self.daemon
        c = d.services.stats.counters
        conn = c.get("smtp.session", 0)
        curr = len(d.services.sessions)
        done = (
            c.get("scheduler.delivery.ok", 0)
            + c.get("scheduler.delivery.permfail", 0)
            + c.get("scheduler.delivery.loop", 0)
            + c.get("scheduler.envelope.expired", 0)
            + c.get("queue.envelope.removed", 0)
        )
        return {
            "curr": curr,
            "conn": conn,
            "disc": conn - curr,
            "envcurr": len(d.scheduler.envelopes()),
            "enq": c.get("queue.envelope.enqueued", 0),
            "deq": done,
            "ok": c.get("scheduler.delivery.ok", 0),
            "tmpfail": c.get("scheduler.delivery.tempfail", 0),
            "prmfail": c.get("scheduler.delivery.permfail", 0),
            "loop": c.get("scheduler.delivery.loop", 0),
            "expire": c.get("scheduler.envelope.expired", 0),
            "remove": c.get("queue.envelope.removed", 0),
            "bounce": c.get("queue.bounce", 0),
        }

    async def _monitor(self, writer: asyncio.StreamWriter) -> None:
        """First line: totals since start; then one line of increments a second."""
        writer.write(MONITOR_HEADER.encode())
        previous: dict[str, int] = {}
        for _ in range(MONITOR_LINES):
            now = self.monitor_counters()
            writer.write(monitor_line(now, previous).encode())
            previous = now
            try:
                await writer.drain()
            except ConnectionError:
                return
            if writer.is_closing():
                return
            await asyncio.sleep(1)


MONITOR_HEADER = (
    "--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------\n"
    "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce\n"
)


def monitor_line(now: dict[str, int], previous: dict[str, int]) -> str:
    """One ``monitor`` row; gauges (curr) absolute, the rest as increments."""

    def d(key: str) -> int:
        return now[key] - previous.get(key, 0)

    return (
        f"{now['curr']:4d} {d('conn'):4d} {d('disc'):4d}  {now['envcurr']:4d} "
        f"{d('enq'):4d} {d('deq'):4d} {d('ok'):4d} {d('tmpfail'):7d} {d('prmfail'):7d} "
        f"{d('loop'):4d} {d('expire'):6d} {d('remove'):6d} {d('bounce'):6d}\n"
    )
