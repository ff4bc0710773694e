"""Restarting add-ons as their configured user after the daemon gave up root.

Started as root, Pigeon starts each proc filter as its ``user``/``group``/``chroot`` before
dropping privileges. A filter that crashes later, or that a reload starts again, would then
only run as the daemon's own user: ``filter-dkimsign ... user _dkimsign`` could no longer
read its key, and every session of its listener would get 421 until a restart.

So the privileged helper (see ``privsep.py``) also launches add-ons, under a rule that keeps
it from being a general "run this as that user" service for the internet-facing daemon: it
launches only the exact specs (command line, user, group, chroot) the configuration names,
read by root itself: at start, before any client connected, and again when the daemon
reloads (the helper rereads the file it was started with; the daemon's word is never taken
for a command or a user). It hands the daemon the
process's pipes (SCM_RIGHTS over a SOCK_SEQPACKET socketpair), signals only processes it
launched itself, and reports their exit.

Messages are JSON datagrams. Daemon to helper: ``{"op": "launch", "handle": H, "spec":
{...}}``, ``{"op": "signal", "handle": H, "sig": N}`` and ``{"op": "reread", "handle": H}``.
Helper to daemon: ``{"op": "launched", "handle": H, "pid": P}`` with the fds (stdin,
stdout, stderr; or socket, stderr), ``{"op": "launched", "handle": H, "error": "..."}``,
``{"op": "exited", "handle": H, "status": S}`` and ``{"op": "reread", "handle": H,
"allowed": [...]}`` (or ``"error"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pigeon.procs import ProcessSpec, child_credentials, privilege_dropper

if TYPE_CHECKING:
    from pigeon.config.model import Config

log = logging.getLogger("pigeon.privsep")

MAX_DATAGRAM = 64 * 1024
MAX_FDS = 3


def spec_key(spec: ProcessSpec) -> dict[str, Any]:
    """What identifies a launchable spec (its name is only how logs call it)."""
    program = spec.program
    return {
        "argv": list(program.argv),
        "executable": program.executable,
        "user": spec.user,
        "group": spec.group,
        "chroot": spec.chroot,
        "socketpair": spec.socketpair,
    }


def needs_root(spec: ProcessSpec, run_as: str) -> bool:
    """Whether the daemon, once dropped to ``run_as``, could not start ``spec`` as configured."""
    return bool(spec.chroot) or (spec.user is not None and spec.user != run_as)


def launchable(config: Config, run_as: str) -> list[dict[str, Any]]:
    """The specs of ``config`` the helper may launch for a daemon running as ``run_as``."""
    from pigeon.filters.runtime import filter_specs

    return [spec_key(s) for s in filter_specs(config).values() if needs_root(s, run_as)]


def _frozen(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


# ---------------------------------------------------------------------- the helper's side


class LaunchServer:
    """In the root helper: launches allowed specs for the daemon, signals and reaps them."""

    def __init__(
        self,
        sock: socket.socket,
        allowed: Iterable[dict[str, Any]],
        reread: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.sock = sock
        self.allowed = {_frozen(key) for key in allowed}
        self._reread = reread  # the launchable specs of the configuration file, read again
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._send_lock = threading.Lock()

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._readable)

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode()
        with self._send_lock, contextlib.suppress(OSError):
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the daemon is gone
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            return
        try:
            message = json.loads(data)
            if not isinstance(message, dict):
                raise ValueError("not an object")
            op = message.get("op")
            handle = message.get("handle")
            if not isinstance(handle, int) or isinstance(handle, bool) or handle <= 0:
                raise ValueError("bad handle")
            if op == "launch":
                self._launch(handle, message.get("spec"))
            elif op == "signal":
                self._signal(handle, message.get("sig"))
            elif op == "reread":
                self._reread_config(handle)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, TypeError) as exc:
            log.error("warn: privileged helper: rejected launch request: %s", exc)

    def _launch(self, handle: int, key: object) -> None:
        if not isinstance(key, dict) or _frozen(key) not in self.allowed:
            log.error("warn: privileged helper: refused to launch a program not configured")
            self._send({"op": "launched", "handle": handle, "error": "not configured at start"})
            return
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        try:
            creds = child_credentials(key["user"], key["group"], None)
            io: int = subprocess.PIPE
            if key["socketpair"]:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                io = theirs.fileno()
            # The reaper threads run meanwhile: no Python code between fork and exec
            # (Popen switches user itself) unless a chroot needs it.
            switch: dict[str, Any] = {}
            if key["chroot"]:
                switch["preexec_fn"] = privilege_dropper(creds, key["chroot"])
            elif creds is not None:
                switch.update(user=creds[0], group=creds[1], extra_groups=[creds[1]])
            proc = subprocess.Popen(
                key["argv"],
                executable=key["executable"],
                stdin=io,
                stdout=io,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd="/",
                **switch,
            )
        except (OSError, KeyError, subprocess.SubprocessError) as exc:
            for end in (ours, theirs):
                if end is not None:
                    end.close()
            self._send({"op": "launched", "handle": handle, "error": str(exc)})
            return
        if theirs is not None:
            theirs.close()
        assert proc.stderr is not None
        if ours is not None:
            fds = [ours.fileno(), proc.stderr.fileno()]
        else:
            assert proc.stdin is not None and proc.stdout is not None
            fds = [proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()]
        self._children[handle] = proc
        self._send({"op": "launched", "handle": handle, "pid": proc.pid}, fds)
        for stream in (proc.stdin, proc.stdout, proc.stderr, ours):  # the daemon has them
            if stream is not None:
                stream.close()
        threading.Thread(target=self._reap, args=(handle, proc), daemon=True).start()

    def _reread_config(self, handle: int) -> None:
        if self._reread is None:
            self._send({"op": "reread", "handle": handle, "error": "no configuration file"})
            return
        try:
            keys = self._reread()
        except Exception as exc:  # a bad file: the daemon's reload fails on it too
            self._send({"op": "reread", "handle": handle, "error": str(exc)})
            return
        self.allowed = {_frozen(key) for key in keys}
        self._send({"op": "reread", "handle": handle, "allowed": keys})

    def _reap(self, handle: int, proc: subprocess.Popen[bytes]) -> None:
        status = proc.wait()
        self._children.pop(handle, None)
        self._send({"op": "exited", "handle": handle, "status": status})

    def _signal(self, handle: int, sig: object) -> None:
        if not isinstance(sig, int) or isinstance(sig, bool) or sig not in (15, 9):
            raise ValueError("bad signal")
        proc = self._children.get(handle)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)


# ---------------------------------------------------------------------- the daemon's side


class LaunchError(Exception):
    pass


class RemoteProcess:
    """An add-on the helper launched: what ProcessSupervisor uses of an asyncio Process."""

    def __init__(self, launcher: Launcher, handle: int, pid: int) -> None:
        self._launcher = launcher
        self.handle = handle
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr: asyncio.StreamReader | None = None
        self.socket: socket.socket | None = None  # a socketpair spec's end
        self._exited = asyncio.get_running_loop().create_future()

    def _set_exited(self, status: int) -> None:
        self.returncode = status
        if not self._exited.done():
            self._exited.set_result(status)

    async def wait(self) -> int:
        status: int = await asyncio.shield(self._exited)
        return status

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._launcher.signal(self.handle, sig)


class Launcher:
    """The daemon's end: ``await launcher.launch(spec, limit)`` gives a RemoteProcess."""

    def __init__(self, sock: socket.socket, allowed: Iterable[dict[str, Any]]) -> None:
        self.sock = sock
        self.allowed = {_frozen(key) for key in allowed}
        self._next = 1
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._live: dict[int, RemoteProcess] = {}
        self._early_exits: dict[int, int] = {}  # exited before launch() took it in hand
        self._reading = False
        self._gone = False

    def allows(self, spec: ProcessSpec) -> bool:
        return not self._gone and _frozen(spec_key(spec)) in self.allowed

    def _start_reading(self) -> None:
        if not self._reading:
            self.sock.setblocking(False)
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)
            self._reading = True

    def _readable(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_DATAGRAM, MAX_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._lost()
                return
            try:
                message = json.loads(data)
                handle = int(message["handle"])
            except (ValueError, KeyError, TypeError):
                for fd in fds:
                    os.close(fd)
                continue
            if message.get("op") == "exited":
                proc = self._live.pop(handle, None)
                if proc is not None:
                    proc._set_exited(int(message.get("status", -1)))
                else:
                    self._early_exits[handle] = int(message.get("status", -1))
                continue
            future = self._pending.pop(handle, None)
            if future is None or future.done():
                for fd in fds:
                    os.close(fd)
                continue
            future.set_result((message, fds))

    def _lost(self) -> None:
        self._gone = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LaunchError("privileged helper is gone"))
        self._pending.clear()
        for proc in self._live.values():
            proc._set_exited(-1)
        self._live.clear()

    async def reread(self) -> None:
        """Have the helper read the configuration file again (a reload): filters the new
        configuration names become launchable, those it dropped no longer are."""
        message, fds = await self._ask({"op": "reread"})
        for fd in fds:
            os.close(fd)
        if "error" in message:
            raise LaunchError(str(message["error"]))
        self.allowed = {_frozen(key) for key in message.get("allowed") or []}

    async def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if self._gone:
            raise LaunchError("privileged helper is gone")
        self._start_reading()
        handle = self._next
        self._next += 1
        future: asyncio.Future[tuple[dict[str, Any], list[int]]]
        future = asyncio.get_running_loop().create_future()
        self._pending[handle] = future
        try:
            self.sock.send(json.dumps({**request, "handle": handle}).encode())
        except OSError as exc:
            self._pending.pop(handle, None)
            raise LaunchError(f"privileged helper: {exc}") from None
        try:
            return await asyncio.wait_for(future, 10.0)
        except TimeoutError:
            self._pending.pop(handle, None)
            raise LaunchError("privileged helper did not answer") from None

    def signal(self, handle: int, sig: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(json.dumps({"op": "signal", "handle": handle, "sig": sig}).encode())

    async def launch(self, spec: ProcessSpec, limit: int) -> RemoteProcess:
        loop = asyncio.get_running_loop()
        message, fds = await self._ask({"op": "launch", "spec": spec_key(spec)})
        handle = int(message["handle"])
        if "error" in message:
            for fd in fds:
                os.close(fd)
            raise LaunchError(str(message["error"]))
        proc = RemoteProcess(self, handle, int(message["pid"]))
        status = self._early_exits.pop(handle, None)
        if status is None:
            self._live[handle] = proc
        else:
            proc._set_exited(status)
        try:
            if spec.socketpair:
                own, err = fds
                proc.socket = socket.socket(fileno=own)
            else:
                stdin, stdout, err = fds
                proc.stdin = await _writer(loop, stdin)
                proc.stdout = await _reader(loop, stdout, limit)
            proc.stderr = await _reader(loop, err, limit)
        except (ValueError, OSError):
            proc.send_signal(9)
            raise LaunchError("privileged helper sent unusable pipes") from None
        return proc


async def _reader(loop: asyncio.AbstractEventLoop, fd: int, limit: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    pipe = os.fdopen(fd, "rb", buffering=0)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    return reader


async def _writer(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.StreamWriter:
    pipe = os.fdopen(fd, "wb", buffering=0)
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop), pipe
    )
    return asyncio.StreamWriter(transport, protocol, None, loop)


_launcher: Launcher | None = None


def set_launcher(launcher: Launcher | None) -> None:
    global _launcher
    _launcher = launcher


def launcher() -> Launcher | None:
    """The root helper's launcher, in a daemon started as root (None otherwise)."""
    return _launcher
