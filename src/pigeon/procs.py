"""Keep one long-running line-protocol add-on process (a filter or a proc table) alive.

Filters and proc tables have the same shape, so one supervisor serves both. It spawns the
process (``/bin/sh -c "exec COMMAND"`` for a filter, ``table-X NAME CONFIG`` for a table, as
OpenSMTPD runs them), over two pipes or over one socketpair that is the child's fd 0 and
fd 1, as the add-on's user (and chroot). It logs each stderr line as ``warn: NAME: LINE``,
runs the owner's handshake (bounded by a timeout) after each spawn, hands every later stdout
line to the owner and restarts the process with exponential backoff when it exits or the
owner declares it broken. It never raises into the daemon.

Two restart styles, chosen by the owner:

* ``eager`` (filters): a background task restarts the process as soon as the backoff allows;
* ``on-demand`` (tables): :meth:`ProcessSupervisor.ensure_running` starts it for the next
  request once the backoff is over, and refuses at once before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pigeon.launcher import Launcher, RemoteProcess

log = logging.getLogger("pigeon.procs")

LIBEXEC_DIR = "/usr/libexec/opensmtpd"  # where Debian's filters live; relative commands go here
UNPRIVILEGED_USER = "nobody"  # default user of a filter when Pigeon runs as root
STREAM_LIMIT = 1 << 20  # longest line accepted from an add-on
STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when stopping a process
HEALTHY_AFTER = 2.0  # a process that served this long was not crash-looping: reset the backoff


def full_command(command: str) -> str:
    """OpenSMTPD prefixes a command that is not an absolute path with its libexec dir."""
    stripped = command.lstrip()
    if stripped.startswith("/") or not stripped:
        return stripped
    return f"{LIBEXEC_DIR}/{stripped}"


@dataclass(frozen=True)
class ProcCommand:
    """What to execute: ``argv`` (argv[0] may differ from the file run) and ``executable``."""

    argv: tuple[str, ...]
    executable: str

    @classmethod
    def shell(cls, command_line: str) -> ProcCommand:
        """A filter's command line, run as smtpd runs it: ``/bin/sh -c "exec COMMAND"``."""
        return cls(("/bin/sh", "-c", "exec " + full_command(command_line)), "/bin/sh")

    def describe(self) -> str:
        return shlex.join((self.executable, *self.argv[1:]))


@dataclass(frozen=True)
class ProcessSpec:
    """One add-on process. ``name`` is how logs call it; a ``str`` command is a filter's
    command line (see :meth:`ProcCommand.shell`)."""

    name: str
    command: str | ProcCommand
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    socketpair: bool = False  # one socket as fd 0 and fd 1 (smtpd's proc tables), not pipes
    pass_fds: tuple[int, ...] = ()  # also inherited, at the same numbers (the relay worker's log)
    fallback_user: str | None = UNPRIVILEGED_USER  # as root, without user or privsep account

    @property
    def program(self) -> ProcCommand:
        if isinstance(self.command, str):
            return ProcCommand.shell(self.command)
        return self.command


def child_credentials(
    user: str | None, group: str | None, fallback: str | None = UNPRIVILEGED_USER
) -> tuple[int, int] | None:
    """uid/gid an add-on process runs as, or None to stay who we are. Only root can switch;
    started as root, an add-on without ``user`` runs as the account the daemon drops to (as
    smtpd uses _smtpd), else as ``fallback`` (None: stays root)."""
    if os.geteuid() != 0:
        return None
    if user is None:
        from pigeon import privsep

        default = privsep.run_as()
        if default is not None:
            return default.uid, default.gid if group is None else grp.getgrnam(group).gr_gid
        if fallback is None:
            return None
    entry = pwd.getpwnam(user or fallback or UNPRIVILEGED_USER)
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    return entry.pw_uid, gid


def lost_root_note(spec: ProcessSpec, *, euid: int | None = None) -> str | None:
    """Why ``spec`` cannot run as configured, when it is (re)started by a daemon that was
    started as root and has dropped to its own user: it then runs as that user, outside
    its chroot, rather than not at all (its sessions would get 421/451 until a restart)."""
    from pigeon import privsep

    dropped = privsep.run_as()
    if (os.geteuid() if euid is None else euid) == 0 or dropped is None:
        return None
    wanted = []
    if spec.user is not None and spec.user != dropped.name:
        wanted.append(f"user {spec.user}")
    if spec.chroot:
        wanted.append(f"chroot {spec.chroot}")
    if not wanted:
        return None
    return (
        f"runs as {dropped.name} without its {' and '.join(wanted)}: the daemon no longer "
        "has root (restart Pigeon to run it as configured)"
    )


def privilege_dropper(
    creds: tuple[int, int] | None, chroot: str | None = None
) -> Callable[[], None] | None:
    """A preexec function entering ``chroot`` and switching the child to ``creds``."""
    if creds is None and not chroot:
        return None

    def drop() -> None:
        if chroot:
            os.chroot(chroot)
            os.chdir("/")
        if creds is not None:
            uid, gid = creds
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
        """The next line without its newline, or None at EOF (or a last unterminated line)."""
        raw = await self.reader.readline()
        if not raw.endswith(b"\n"):
            return None
        return raw.decode("utf-8", "surrogateescape").rstrip("\r\n")


class Backoff:
    """Delays between restarts: ``initial``, doubling up to ``maximum`` until reset."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.current = 0.0

    def next(self) -> float:
        self.current = min(self.maximum, max(self.initial, self.current * 2))
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class ProcessNotRunning(Exception):
    """``ensure_running`` could not provide a ready process: it waits for its backoff."""


class ProcessStartFailed(ProcessNotRunning):
    """``ensure_running`` tried to start the process and failed; the message says why."""


Handshake = Callable[[Channel], Awaitable[None]]
RestartStyle = Literal["eager", "on-demand"]


class ProcessSupervisor:
    """One add-on process: spawn, handshake, read lines, restart with backoff.

    ``handshake`` runs on every (re)spawn and must return once the process is ready (or
    raise to have it restarted); it is bounded by ``handshake_timeout``. ``on_line`` gets
    every stdout line after the handshake; ``on_down`` is called with a reason each time
    the process goes away or fails to start, before the restart delay.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        *,
        handshake: Handshake,
        on_line: Callable[[Any], None],
        on_down: Callable[[str], None],
        handshake_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        restart: RestartStyle = "eager",
        logger: logging.Logger = log,
        read_message: Callable[[Channel], Awaitable[Any]] | None = None,
    ) -> None:
        self.spec = spec
        # What one read gives ``on_line`` after the handshake: a line (the default), or a
        # binary frame for an add-on that does not speak in lines (None: end of file).
        self._read_message = read_message
        self._handshake = handshake
        self._on_line = on_line
        self._on_down = on_down
        self.handshake_timeout = handshake_timeout
        self.backoff = Backoff(backoff_initial, backoff_max)
        self.restart = restart
        self.log = logger
        self.generation = 0  # bumped at each successful handshake
        self.restarts = 0  # processes spawned after the first one
        self.ready = asyncio.Event()
        self._spawned = 0
        self._not_before = 0.0  # monotonic time before which no new process is started
        self._ready_since: float | None = None
        self._io: Channel | None = None  # the live process's streams, ready or not
        self._proc: asyncio.subprocess.Process | RemoteProcess | None = None
        self._reading: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stderr_tasks: set[asyncio.Task[None]] = set()  # held so they are not collected
        self._starting = asyncio.Lock()
        self._broken = asyncio.Event()
        self._broken_reason = "protocol error"
        self._read_waiter: asyncio.Task[None] | None = None  # the task in _read_loop
        self._stopping = False

    @property
    def channel(self) -> Channel | None:
        return self._io if self.ready.is_set() else None

    # -- the owner's controls ------------------------------------------------------

    async def start(self) -> bool:
        """Start the process; returns whether the first handshake succeeded in time.

        Eager: supervision goes on in the background either way. On demand: a failure
        waits for the next :meth:`ensure_running` after the backoff."""
        if self.restart == "on-demand":
            try:
                await self.ensure_running()
            except ProcessNotRunning:
                return False  # why was logged
            return True
        self._task = asyncio.get_running_loop().create_task(self._supervise())
        try:
            await asyncio.wait_for(self.ready.wait(), self.handshake_timeout + 1)
        except TimeoutError:
            return False
        return True

    async def ensure_running(self) -> Channel:
        """The ready process, started now if the backoff allows: ProcessNotRunning
        (``restarting in N s``) if it does not, ProcessStartFailed (why) if starting failed."""
        channel = self.channel
        if channel is not None:
            return channel
        if self._stopping:
            raise ProcessNotRunning("stopped")
        async with self._starting:
            channel = self.channel
            if channel is not None:
                return channel
            wait = self._not_before - time.monotonic()
            if wait > 0:
                raise ProcessNotRunning(f"restarting in {wait:.1f}s")
            reason = await self._start_once()
            channel = self.channel
            if channel is None:
                raise ProcessStartFailed(reason or "went away at once")
            return channel

    def write_line(self, line: str) -> bool:
        channel = self.channel
        if channel is None:
            return False
        channel.write_line(line)
        return True

    def declare_broken(self, reason: str) -> None:
        """The owner saw a protocol violation or a hang: kill and restart the process."""
        if self.ready.is_set():
            self.log.warning("warn: %s: %s; restarting", self.spec.name, reason)
            self.ready.clear()  # nothing more is sent to it
            self._broken_reason = reason
            self._broken.set()
            waiter = self._read_waiter
            if waiter is not None and waiter is not asyncio.current_task():
                waiter.cancel()

    def healthy(self) -> None:
        """The process answered well: the next failure restarts it quickly again."""
        self.backoff.reset()

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._task, self._reading):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self.ready.clear()
        await self._kill()

    # -- internals -----------------------------------------------------------------

    async def _supervise(self) -> None:
        while not self._stopping:
            await asyncio.sleep(max(0.0, self._not_before - time.monotonic()))
            if await self._start_once() is None and self._reading is not None:
                await self._reading

    async def _start_once(self) -> str | None:
        """Spawn and handshake; None once ready (a reader task then serves the process),
        else the reason it failed (the process is then down and its restart scheduled)."""
        if self._spawned:
            self.restarts += 1
        self._spawned += 1
        reason = await self._spawn_and_handshake()
        if reason is not None:
            await self._went_down(reason)
            return reason
        self._reading = asyncio.get_running_loop().create_task(self._serve())
        return None

    async def _spawn_and_handshake(self) -> str | None:
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
        self.generation += 1
        self._broken = asyncio.Event()
        self._ready_since = time.monotonic()
        self.ready.set()
        return None

    async def _serve(self) -> None:
        channel = self._io
        assert channel is not None
        reason = await self._read_loop(channel)
        await self._went_down(reason)

    async def _went_down(self, reason: str) -> None:
        self.ready.clear()
        await self._kill()
        if self._stopping:
            return
        self._on_down(reason)
        served = self._ready_since is not None and time.monotonic() - self._ready_since
        self._ready_since = None
        if served and served >= HEALTHY_AFTER:
            self.backoff.reset()  # it served for a while: not a crash loop
        delay = self.backoff.next()
        self._not_before = time.monotonic() + delay
        self.log.warning("warn: %s: %s, restarting in %.1fs", self.spec.name, reason, delay)

    async def _read_loop(self, channel: Channel) -> str:
        # It awaits the read alone (a busy add-on sends many lines: no asyncio.wait per
        # line); declare_broken interrupts the read by cancelling this task.
        task = asyncio.current_task()
        while not self._broken.is_set():
            self._read_waiter = task
            try:
                if self._read_message is None:
                    line = await channel.read_line()
                else:
                    line = await self._read_message(channel)
            except asyncio.CancelledError:
                if self._stopping or not self._broken.is_set() or task is None:
                    raise
                task.uncancel()
                break
            except (ValueError, asyncio.LimitOverrunError):
                return "line too long"
            except (ConnectionError, OSError) as exc:
                return f"read error: {exc}"
            finally:
                self._read_waiter = None
            if line is None:
                code = await self._exit_code()
                return f"exited (status {code})"
            try:
                self._on_line(line)
            except Exception as exc:  # an owner bug must not kill supervision
                self.log.exception("warn: %s: cannot handle %r", self.spec.name, line)
                return f"internal error: {exc}"
        return self._broken_reason

    async def _spawn(self) -> Channel:
        spec = self.spec
        program = spec.program
        note = lost_root_note(spec)
        if note is not None:  # a restart after the daemon gave up root
            from pigeon.launcher import LaunchError, launcher

            helper = launcher()
            if helper is not None and helper.allows(spec):  # as configured, by root
                try:
                    return await self._spawn_by_helper(helper)
                except LaunchError as exc:
                    self.log.warning("warn: %s: privileged helper: %s", spec.name, exc)
            self.log.warning("warn: %s: %s", spec.name, note)  # else run it anyway
        creds = child_credentials(spec.user, spec.group, spec.fallback_user)
        chroot = None if note is not None else spec.chroot
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        child_io: int = asyncio.subprocess.PIPE
        if spec.socketpair:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            child_io = theirs.fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                *program.argv,
                executable=program.executable,
                stdin=child_io,
                stdout=child_io,
                stderr=asyncio.subprocess.PIPE,
                limit=STREAM_LIMIT,
                start_new_session=True,  # its own group: stopping it stops its children too
                pass_fds=spec.pass_fds,
                preexec_fn=privilege_dropper(creds, chroot),
                cwd="/",  # where smtpd (a daemon) runs them from
            )
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()
        self._proc = proc
        assert proc.stderr is not None
        self._follow_stderr(proc.stderr)
        self.log.info("info: %s: started %s (pid %d)", spec.name, program.describe(), proc.pid)
        if ours is not None:
            reader, writer = await asyncio.open_unix_connection(sock=ours, limit=STREAM_LIMIT)
            self._io = Channel(reader, writer)
        else:
            assert proc.stdin is not None and proc.stdout is not None
            self._io = Channel(proc.stdout, proc.stdin)
        return self._io

    async def _spawn_by_helper(self, helper: Launcher) -> Channel:
        spec = self.spec
        proc = await helper.launch(spec, STREAM_LIMIT)
        self._proc = proc
        assert proc.stderr is not None
        self._follow_stderr(proc.stderr)
        self.log.info(
            "info: %s: started %s (pid %d) as %s by the privileged helper",
            spec.name,
            spec.program.describe(),
            proc.pid,
            spec.user or "the daemon's user",
        )
        if proc.socket is not None:
            reader, writer = await asyncio.open_unix_connection(
                sock=proc.socket, limit=STREAM_LIMIT
            )
            self._io = Channel(reader, writer)
        else:
            assert proc.stdin is not None and proc.stdout is not None
            self._io = Channel(proc.stdout, proc.stdin)
        return self._io

    def _follow_stderr(self, stream: asyncio.StreamReader) -> None:
        stderr_task = asyncio.get_running_loop().create_task(self._log_stderr(stream))
        self._stderr_tasks.add(stderr_task)
        stderr_task.add_done_callback(self._stderr_tasks.discard)

    async def _log_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while True:
                raw = await stream.readline()
                if not raw:
                    return
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.log.warning("warn: %s: %s", self.spec.name, text)

    async def _exit_code(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return await asyncio.wait_for(proc.wait(), 2.0)
        except TimeoutError:
            return None

    async def _kill(self) -> None:
        """Close our end, then SIGTERM the process group and SIGKILL it if it lingers."""
        proc, self._proc = self._proc, None
        channel, self._io = self._io, None
        if channel is not None:
            with contextlib.suppress(Exception):
                channel.writer.close()
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
        from pigeon.launcher import RemoteProcess

        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                return
            if isinstance(proc, RemoteProcess):  # not ours to signal: the helper's child
                proc.send_signal(sig)
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
