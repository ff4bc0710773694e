"""Privilege separation: bind and read keys as root, then run as an unprivileged user.

Started as root, ``pigeon run``:

1. resolves the run-as user (``_pigeon``, or ``--user NAME``) and hands it the spool;
2. forks the **privileged helper**, a small root process whose jobs are local delivery as
   the recipient user (maildir, mbox, mda), requested by the daemon over a socketpair, and
   starting again, as their own user, the proc filters the configuration file names
   (``launcher.py``);
3. builds the daemon, binds its ports and reads its TLS keys as root;
4. drops to the run-as user (groups, gid, uid; checked irreversibly).

The daemon keeps the original pid (what systemd and scripts signal); the helper is its child.
The helper trusts the daemon for *what* to deliver, like OpenSMTPD's parent trusts its lookup
process, but it accepts nothing else: one well-formed request type, never uid or gid 0, and
every delivery runs in a child that has already switched to the user. For add-ons it takes
the daemon's word for nothing but *which* of the configured filters to start (launcher.py).
It ignores SIGINT, SIGTERM and SIGHUP and exits when the daemon's end of the socket closes
(the daemon exits or dies), so it can never outlive the daemon.

Started as an ordinary user, nothing here happens: everything runs as that user.

Wire format (both directions): ``>I`` length + JSON header; requests then carry the message
(``header["size"]`` bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pigeon.delivery.local import LocalTarget, LocalUser
from pigeon.delivery.local import deliver as deliver_local
from pigeon.launcher import Launcher, LaunchServer
from pigeon.queue.envelope import Envelope
from pigeon.scheduler.scheduler import Outcome

log = logging.getLogger("pigeon.privsep")

DEFAULT_USER = "_pigeon"
MAX_HEADER = 64 * 1024
MAX_MESSAGE = 1 << 30
METHODS = frozenset({"maildir", "mbox", "mda"})
_LEN = struct.Struct(">I")


class PrivsepError(Exception):
    pass


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account the daemon runs as."""

    name: str
    uid: int
    gid: int
    home: str


def resolve_run_as(name: str | None) -> tuple[RunAs | None, str | None]:
    """The account to drop to, and a warning to log.

    Not root: ``(None, None)``, nothing to drop. ``name`` given: that account, or
    ``PrivsepError`` if it does not exist or is root. Default ``_pigeon`` missing (a pip install
    without packaging): keep running as root, with a warning.
    """
    if os.geteuid() != 0:
        return None, None
    wanted = name or DEFAULT_USER
    try:
        entry = pwd.getpwnam(wanted)
    except KeyError:
        if name is not None:
            raise PrivsepError(f"unknown user {wanted}") from None
        return None, (
            f"warn: user {DEFAULT_USER} does not exist: running as root "
            "(create it with packaging/pigeon-create-user, or pass --user NAME)"
        )
    if entry.pw_uid == 0:
        if name is not None:
            return None, f"warn: --user {wanted} is root: running as root"
        raise PrivsepError(f"user {wanted} has uid 0")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir), None


_run_as: RunAs | None = None


def set_run_as(user: RunAs | None) -> None:
    """Record the account the daemon is (or will be) dropping to (``pigeon run`` does)."""
    global _run_as
    _run_as = user


def run_as() -> RunAs | None:
    """The account a root-started daemon runs as, None otherwise: the default user for helper
    processes (proc filters, proc tables) that have no ``user`` of their own, as OpenSMTPD
    runs them as ``_smtpd``."""
    return _run_as


def give_spool(spool: Path, user: RunAs) -> None:
    """Make the spool and everything in it belong to ``user`` (files a root run left too)."""
    os.chown(spool, user.uid, user.gid)
    for root, dirs, files in os.walk(spool):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(root, name), user.uid, user.gid)


def drop_privileges(user: RunAs, spool: Path | None = None) -> None:
    """Become ``user`` for good. Files created in ``spool`` until now are handed over first."""
    if spool is not None:
        give_spool(spool, user)
    os.setgroups([user.gid])
    os.setgid(user.gid)
    os.setuid(user.uid)
    if os.getuid() != user.uid or os.geteuid() != user.uid or os.getegid() != user.gid:
        raise PrivsepError("privilege drop did not take")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivsepError("could regain root after dropping privileges")
    os.environ.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    log.info("info: running as %s (uid %d, gid %d)", user.name, user.uid, user.gid)


# ---------------------------------------------------------------------- wire format


def encode_request(ident: int, target: LocalTarget, env: Envelope, body: bytes) -> bytes:
    header = {
        "id": ident,
        "method": target.method,
        "target": target.target,
        "junk": target.junk,
        "user": {
            "name": target.user.name,
            "uid": target.user.uid,
            "gid": target.user.gid,
            "home": target.user.home,
        },
        "sender": env.sender,
        "rcpt": env.rcpt,
        "dest": env.dest,
        "subaddress": env.mda_subaddress,
        "size": len(body),
    }
    data = json.dumps(header).encode()
    return _LEN.pack(len(data)) + data + body


def _text(value: object, *, empty: bool = True) -> str:
    if not isinstance(value, str) or "\0" in value or (not empty and not value):
        raise PrivsepError("bad string field")
    return value


def _ident(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
        raise PrivsepError("bad numeric field")
    return value


def decode_request(header: dict[str, Any]) -> tuple[int, LocalTarget, Envelope, int]:
    """Validate a request header; ``PrivsepError`` for anything not exactly as expected."""
    expected = {"id", "method", "target", "junk", "user", "sender", "rcpt", "dest"}
    if set(header) != expected | {"subaddress", "size"}:
        raise PrivsepError("unexpected request fields")
    ident = _ident(header["id"])
    method = header["method"]
    if method not in METHODS:
        raise PrivsepError(f"method not allowed: {method!r}")
    user = header["user"]
    if not isinstance(user, dict) or set(user) != {"name", "uid", "gid", "home"}:
        raise PrivsepError("bad user")
    uid, gid = user["uid"], user["gid"]
    for value in (uid, gid):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 32:
            raise PrivsepError("bad uid/gid")
    if uid == 0 or gid == 0:
        raise PrivsepError("refusing to deliver as root")
    size = header["size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_MESSAGE:
        raise PrivsepError("bad size")
    if not isinstance(header["junk"], bool):
        raise PrivsepError("bad junk flag")
    local_user = LocalUser(_text(user["name"], empty=False), uid, gid, _text(user["home"]))
    target = LocalTarget(method, _text(header["target"], empty=False), local_user, header["junk"])
    env = Envelope(
        evpid=1,
        dispatcher="",
        type="mda",
        sender=_text(header["sender"]),
        rcpt=_text(header["rcpt"]),
        dest=_text(header["dest"]),
        ctime=0,
        mda_subaddress=_text(header["subaddress"]),
    )
    return ident, target, env, size


# ---------------------------------------------------------------------- the root side


def start_helper(
    launchable: Sequence[dict[str, Any]] = (),
    reread: Callable[[], list[dict[str, Any]]] | None = None,
) -> HelperClient:
    """Fork the privileged helper (call as root, before the event loop and any thread).
    ``launchable``: the add-on specs (``launcher.spec_key``) it may start again later;
    ``reread``: how it finds them again in the configuration file, at a reload."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    launch_ours, launch_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the helper
        code = 0
        try:
            ours.close()
            launch_ours.close()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            asyncio.run(_serve(theirs, LaunchServer(launch_theirs, launchable, reread)))
        except BaseException:
            log.exception("warn: privileged helper failed")
            code = 1
        finally:
            os._exit(code)
    theirs.close()
    launch_theirs.close()
    return HelperClient(ours, pid, Launcher(launch_ours, launchable))


async def _serve(sock: socket.socket, launches: LaunchServer | None = None) -> None:
    if launches is not None:
        launches.serve(asyncio.get_running_loop())
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    tasks: set[asyncio.Task[None]] = set()
    lock = asyncio.Lock()

    async def answer(ident: int, outcome: Outcome) -> None:
        data = json.dumps({"id": ident, "status": outcome.status, "line": outcome.line}).encode()
        async with lock:
            writer.write(_LEN.pack(len(data)) + data)
            await writer.drain()

    async def run(ident: int, target: LocalTarget, env: Envelope, body: bytes) -> None:
        try:
            outcome = await deliver_local(target, env, body)
        except Exception as exc:  # the daemon must always get an answer
            log.exception("warn: privileged helper: delivery failed")
            outcome = Outcome.tempfail(f"internal error: {exc}")
        with contextlib.suppress(ConnectionError):
            await answer(ident, outcome)

    while True:
        try:
            (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
            if length > MAX_HEADER:
                raise PrivsepError("request header too large")
            header = json.loads(await reader.readexactly(length))
            if not isinstance(header, dict):
                raise PrivsepError("request is not an object")
            ident, target, env, size = decode_request(header)
            body = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            break  # the daemon is gone: so are we
        except (PrivsepError, ValueError) as exc:
            # A daemon that speaks garbage may be compromised: stop serving it.
            log.error("warn: privileged helper: rejected request: %s", exc)
            break
        task = asyncio.get_running_loop().create_task(run(ident, target, env, body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    writer.close()


# ---------------------------------------------------------------------- the daemon side


class HelperClient:
    """The daemon's end: ``await client.deliver(target, env, body)`` as ``local.deliver``."""

    def __init__(self, sock: socket.socket, pid: int, launcher: Launcher | None = None) -> None:
        self.sock = sock
        self.pid = pid
        self.launcher = launcher  # restarts add-ons as their own user (launcher.py)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Outcome]] = {}
        self._next_id = 1
        self._connect_lock: asyncio.Lock | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._gone = False

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._writer is None:
                reader, self._writer = await asyncio.open_unix_connection(sock=self.sock)
                self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                answer = json.loads(await reader.readexactly(length))
                future = self._pending.pop(int(answer["id"]), None)
                if future is not None and not future.done():
                    future.set_result(Outcome(str(answer["status"]), str(answer["line"])))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError):
            pass
        self._gone = True
        log.error("warn: privileged helper exited: local deliveries will be retried")
        for future in self._pending.values():
            if not future.done():
                future.set_result(Outcome.tempfail("privileged helper is gone"))
        self._pending.clear()

    async def deliver(self, target: LocalTarget, env: Envelope, body: bytes) -> Outcome:
        if target.user.uid == 0 or target.user.gid == 0:
            return Outcome.permfail(f"not allowed to deliver to: {target.user.name}")
        if self._gone:
            return Outcome.tempfail("privileged helper is gone")
        writer = await self._connect()
        ident = self._next_id
        self._next_id = self._next_id % (1 << 30) + 1
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            writer.write(encode_request(ident, target, env, body))
            await writer.drain()
        except ConnectionError:
            self._pending.pop(ident, None)
            return Outcome.tempfail("privileged helper is gone")
        return await future

    def close(self) -> None:
        """Close our end: the helper sees EOF and exits."""
        if self._writer is not None:
            self._writer.close()
        else:
            self.sock.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
