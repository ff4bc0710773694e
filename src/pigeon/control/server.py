"""The control socket: JSON lines over ``<spool>/control.sock``.

Request: ``{"command": ["show", "queue"]}``. Response: ``{"ok": true, "output": "...",
"data": ...}`` then the server closes the connection (``monitor`` streams lines until the
client goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pigeon.control.views import human_duration, queue_row, render_queue_line
from pigeon.queue.envelope import evpid_hex

if TYPE_CHECKING:
    from pigeon.daemon import Daemon

log = logging.getLogger("pigeon.control")

MAX_REQUEST = 64 * 1024


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


class ControlServer:
    def __init__(self, daemon: Daemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.daemon.services.stats.incr("control.session")
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            if len(line) > MAX_REQUEST:
                raise CommandError("request too large")
            request = json.loads(line or b"{}")
            words = [str(w) for w in request.get("command", [])]
            if words[:1] == ["monitor"]:
                await self._monitor(writer)
                return
            output, data = await self.execute(words)
            response: dict[str, Any] = {"ok": True, "output": output, "data": data}
        except CommandError as exc:
            response = {"ok": False, "output": str(exc)}
        except (TimeoutError, json.JSONDecodeError, UnicodeDecodeError):
            response = {"ok": False, "output": "malformed request"}
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
            writer.close()

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
                return f"{n} envelope{'s' if n != 1 else ''} scheduled", n
            case ["remove", target]:
                n = 0
                for evpid in self._select(target):
                    env = d.store.envelope(evpid)
                    if env is None:
                        continue
                    log.info(
                        "relay: Remove for %s: from=<%s>, to=<%s>, rcpt=<->, delay=%s, "
                        "stat=Removed by administrator",
                        evpid_hex(evpid),
                        env.sender,
                        env.dest,
                        human_duration(int(time.time()) - env.ctime),
                    )
                    d.scheduler.remove(evpid)
                    if evpid not in d.scheduler.inflight:
                        d.store.delete([evpid])
                    n += 1
                return f"{n} envelope{'s' if n != 1 else ''} removed", n
            case ["pause", ("mda" | "mta" | "smtp") as what]:
                if what == "smtp":
                    d.services.smtp_paused = True
                else:
                    d.scheduler.pause(what)
                log.info("info: %s paused", what)
                return "command succeeded", True
            case ["resume", ("mda" | "mta" | "smtp") as what]:
                if what == "smtp":
                    d.services.smtp_paused = False
                else:
                    d.scheduler.resume(what)
                log.info("info: %s resumed", what)
                return "command succeeded", True
            case ["log", ("verbose" | "brief") as level]:
                logging.getLogger("pigeon").setLevel(
                    logging.DEBUG if level == "verbose" else logging.INFO
                )
                return "command succeeded", True
            case ["stop"]:
                d.request_stop()
                return "command succeeded", True
        raise CommandError("invalid command: " + " ".join(words))

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
        now = d.scheduler.clock.now()
        rows = []
        wanted: set[int] | None = None
        if only is not None:
            wanted = set(self._select(only))
        for env in sorted(d.store.envelopes(), key=lambda e: (e.ctime, e.evpid)):
            if wanted is not None and env.evpid not in wanted:
                continue
            inflight = env.evpid in d.scheduler.inflight
            due = d.scheduler.scheduled_at(env.evpid)
            delay = 0 if inflight or due is None else max(0, int(due - now))
            rows.append(
                queue_row(
                    env,
                    runstate="inflight" if inflight else "pending",
                    delay=delay,
                    queue_ttl=d.config.queue.ttl,
                    paused=env.type in d.scheduler.paused,
                )
            )
        return rows

    def stats(self) -> dict[str, Any]:
        d = self.daemon
        out: dict[str, Any] = {}
        counters = d.services.stats.counters
        for key in (
            "control.session",
            "scheduler.delivery.ok",
            "scheduler.delivery.permfail",
            "scheduler.delivery.tempfail",
            "scheduler.delivery.loop",
            "scheduler.envelope.expired",
            "smtp.session",
        ):
            out[key] = counters.get(key, 0)
        envs = d.scheduler.envelopes()
        out["queue.message"] = len(d.store.messages)
        out["queue.segments"] = d.store.segment_count()
        out["queue.syncs"] = d.store.stats["syncs"]
        out["scheduler.envelope"] = len(envs)
        out["scheduler.envelope.inflight"] = len(d.scheduler.inflight)
        out["smtp.session.current"] = len(d.services.sessions)
        uptime = int(time.time() - d.started)
        out["uptime"] = uptime
        out["uptime.human"] = human_duration(uptime)
        return dict(sorted(out.items()))

    async def _monitor(self, writer: asyncio.StreamWriter) -> None:
        """One line of counters a second, until the client hangs up."""
        header = (
            "--- client ---  -- envelope --   ---- relay/delivery --- ------- misc -------\n"
            "curr conn disc  curr  enq  deq   ok tmpfail prmfail loop expire remove bounce\n"
        )
        c = self.daemon.services.stats.counters
        previous: dict[str, int] = {}
        writer.write(header.encode())
        for _ in range(86400):
            now = {
                "conn": c.get("smtp.session", 0),
                "ok": c.get("scheduler.delivery.ok", 0),
                "tmp": c.get("scheduler.delivery.tempfail", 0),
                "perm": c.get("scheduler.delivery.permfail", 0),
                "loop": c.get("scheduler.delivery.loop", 0),
                "exp": c.get("scheduler.envelope.expired", 0),
            }
            diff = {k: v - previous.get(k, 0) for k, v in now.items()}
            previous = now
            curr = len(self.daemon.services.sessions)
            envs = len(self.daemon.scheduler.envelopes())
            writer.write(
                f"{curr:4d} {diff['conn']:4d} {0:4d}  {envs:4d} {0:4d} {0:4d} "
                f"{diff['ok']:4d} {diff['tmp']:7d} {diff['perm']:7d} {diff['loop']:4d} "
                f"{diff['exp']:6d} {0:6d} {0:6d}\n".encode()
            )
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(1)
