"""Keep one long-running line-protocol helper process alive.

Generic on purpose (filters and proc tables have the same shape): the supervisor spawns
``/bin/sh -c "exec COMMAND"`` as OpenSMTPD does, logs each stderr line as
``warn: NAME: LINE``, hands every stdout line to the owner, runs the owner's handshake
after each spawn and restarts the process with exponential backoff when it exits or the
owner declares it broken. It never raises into the daemon: a helper that cannot start
is retried forever, and the owner decides what callers see meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("pigeon.filters")

LIBEXEC_DIR = "/usr/libexec/opensmtpd"  # where Debian's filters live; relative commands go here
UNPRIVILEGED_USER = "nobody"  # default user of a helper when Pigeon runs as root
STREAM_LIMIT = 1 << 20  # longest line accepted from a helper


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str
    user: str | None = None
    group: str | None = None
    chroot: str | None = None


def full_command(command: str) -> str:
    """OpenSMTPD prefixes a command that is not an absolute path with its libexec dir."""
    stripped = command.lstrip()
    if stripped.startswith("/") or not stripped:
        return stripped
    return f"{LIBEXEC_DIR}/{stripped}"


def child_credentials(user: str | None, group: str | None) -> tuple[int, int] | None:
    """uid/gid an add-on process (filter or table) runs as, or None to stay who we are
    (only root can switch; started as root, an add-on without `user` runs as nobody)."""
    if os.geteuid() != 0:
        return None
    if user is None:
        from pigeon import privsep

        default = privsep.run_as()  # the account the daemon drops to, as smtpd uses _smtpd
        if default is not None:
            return default.uid, default.gid if group is None else grp.getgrnam(group).gr_gid
    entry = pwd.getpwnam(user or UNPRIVILEGED_USER)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    return entry.pw_uid, gid


def _credentials(spec: ProcessSpec) -> tuple[int, int] | None:
    return child_credentials(spec.user, spec.group)


def privilege_dropper(creds: tuple[int, int] | None) -> Callable[[], None] | None:
    """A preexec function switching the child to ``creds``."""
    if creds is None:
        return None
    uid, gid = creds

    def drop() -> None:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)

    return drop


class Channel:
    """The owner's view of the running process during the handshake and after it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def write_line(self, line: str) -> None:
        if not self.writer.is_closing():
            self.writer.write(line.encode("utf-8", "surrogateescape") + b"\n")

    async def read_line(self) -> str | None:
        """The next line without its newline, or None at EOF."""
        raw = await self.reader.readline()
        if not raw:
            return None
        return raw.decode("utf-8", "surrogateescape").rstrip("\r\n")


Handshake = Callable[[Channel], Awaitable[None]]


class ProcessSupervisor:
    """One helper process: spawn, handshake, read lines, restart with backoff.

    ``handshake`` runs on every (re)spawn and must return once the helper is ready (or
    raise to have it restarted); it is bounded by ``handshake_timeout``. ``on_line`` gets
    every stdout line after the handshake; ``on_down`` is called with a reason each time
    the process goes away, before the restart delay.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        *,
        handshake: Handshake,
        on_line: Callable[[str], None],
        on_down: Callable[[str], None],
        handshake_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.spec = spec
        self._handshake = handshake
        self._on_line = on_line
        self._on_down = on_down
        self.handshake_timeout = handshake_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.generation = 0  # bumped at each successful handshake
        self.restarts = 0
        self.ready = asyncio.Event()
        self._channel: Channel | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._broken: asyncio.Event = asyncio.Event()
        self._stopping = False

    @property
    def channel(self) -> Channel | None:
        return self._channel if self.ready.is_set() else None

    async def start(self) -> bool:
        """Start supervising; returns whether the first handshake succeeded in time."""
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        try:
            await asyncio.wait_for(self.ready.wait(), self.handshake_timeout + 1)
        except TimeoutError:
            return False
        return True

    def write_line(self, line: str) -> bool:
        channel = self.channel
        if channel is None:
            return False
        channel.write_line(line)
        return True

    def declare_broken(self, reason: str) -> None:
        """The owner saw a protocol violation: kill and restart the process."""
        if self.ready.is_set():
            log.warning("warn: %s: %s; restarting", self.spec.name, reason)
            self._broken_reason = reason
            self._broken.set()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self._kill()

    # -- internals -----------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = self.backoff_initial
        while not self._stopping:
            self._ready_since: float | None = None
            reason = await self._run_once()
            self.ready.clear()
            self._channel = None
            await self._kill()
            if self._stopping:
                return
            self._on_down(reason)
            if self._ready_since is not None and time.monotonic() - self._ready_since >= 2:
                delay = self.backoff_initial  # it served for a while: not a crash loop
            log.warning("warn: %s: %s, restarting in %.1fs", self.spec.name, reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            self.restarts += 1

    async def _run_once(self) -> str:
        try:
            channel = await self._spawn()
        except (OSError, KeyError) as exc:
            return f"cannot start: {exc}"
        try:
            await asyncio.wait_for(self._handshake(channel), self.handshake_timeout)
        except TimeoutError:
            return "handshake timed out"
        except Exception as exc:  # any handshake failure means: restart
            return f"handshake failed: {exc}"
        self._channel = channel
        self.generation += 1
        self._broken = asyncio.Event()
        self._ready_since = time.monotonic()
        self.ready.set()
        log.info("info: %s: filter process ready (pid %s)", self.spec.name, self._pid())
        return await self._read_loop(channel)

    async def _read_loop(self, channel: Channel) -> str:
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            while True:
                reading = asyncio.ensure_future(channel.read_line())
                done, _ = await asyncio.wait({reading, broken}, return_when=asyncio.FIRST_COMPLETED)
                if broken in done:
                    reading.cancel()
                    return getattr(self, "_broken_reason", "protocol error")
                try:
                    line = reading.result()
                except (ValueError, asyncio.LimitOverrunError):
                    return "line too long"
                if line is None:
                    code = await self._exit_code()
                    return f"exited (status {code})"
                self._on_line(line)
        finally:
            broken.cancel()

    def _pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def _spawn(self) -> Channel:
        creds = _credentials(self.spec)
        chroot = self.spec.chroot

        def drop_privileges() -> None:
            if chroot:
                os.chroot(chroot)
                os.chdir("/")
            if creds is not None:
                uid, gid = creds
                os.setgroups([gid])
                os.setgid(gid)
                os.setuid(uid)

        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            "exec " + full_command(self.spec.command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STREAM_LIMIT,
            start_new_session=True,
            preexec_fn=drop_privileges if (creds or chroot) else None,
            cwd="/",
        )
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        asyncio.get_running_loop().create_task(self._log_stderr(proc.stderr))
        return Channel(proc.stdout, proc.stdin)

    async def _log_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while True:
                raw = await stream.readline()
                if not raw:
                    return
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.warning("warn: %s: %s", self.spec.name, text)

    async def _exit_code(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            return None

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5.0)
