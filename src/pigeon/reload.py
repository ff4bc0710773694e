"""Configuration reload (SIGHUP, ``pigeon reload``) without dropping sessions in flight.

1. Parse and validate the file again (same path and ``-D`` macros as at start).
2. Build everything the configuration decides, off to the side: a second ``Daemon`` object is
   constructed from the new config (tables, rules, expander, SRS, whatever the daemon builds
   from its config) and its listener settings are computed (TLS keys are read here). New
   listening addresses are bound now.
3. Only if all of that worked: swap. Config-built attributes of the live daemon and of its
   ``Services`` are replaced by the new ones; listeners whose address is unchanged keep their
   socket and take the new settings in place; removed addresses stop listening (their open
   sessions go on until they end). The queue, scheduler, relay pool, control socket and
   sessions are left alone, so nothing in flight is lost.

On any failure the old configuration stays and the reason is logged
(``warn: reload failed: ...``) and returned to ``pigeon reload``.

After privileges were dropped, a reload runs as the unprivileged user: new listening ports
below 1024 and key files only root can read make the reload fail (restart instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pigeon import metrics
from pigeon.server.listener import ListenerRuntime, start_listener
from pigeon.tables.base import close_tables, start_tables

if TYPE_CHECKING:
    from pigeon.config.model import Config
    from pigeon.daemon import Daemon

log = logging.getLogger("pigeon")

# Daemon attributes that hold running state, never replaced by a reload.
RUNTIME_ATTRIBUTES = frozenset(
    {
        "options",
        "hostname",
        "store",
        "scheduler",
        "services",
        "servers",
        "listeners",
        "control",
        "relay",
        "started",
        "privsep",
        "metrics_server",
        "metrics_address",
        "reloader",
    }
)
# Services fields that are running state, never replaced by a reload.
RUNTIME_SERVICES = frozenset({"store", "accepted", "stats", "sessions", "smtp_paused"})

ListenerKey = tuple[tuple[tuple[str, int], ...], bool]


class ReloadError(Exception):
    pass


def listener_key(runtime: ListenerRuntime) -> ListenerKey:
    return tuple(sorted(runtime.addresses)), runtime.smtps


@dataclass
class Prepared:
    config: Config
    staged: Daemon
    runtimes: list[ListenerRuntime]
    new_servers: dict[ListenerKey, list[asyncio.Server]] = field(default_factory=dict)


def load(daemon: Daemon) -> Config:
    """Read the configuration the daemon was started with, again."""
    from pigeon.config import load_config, parse_config_text
    from pigeon.control.cli import DEFAULT_CONFIG

    path = daemon.options.config_file
    macros = dict(daemon.options.macros)
    if path is None:
        return parse_config_text(DEFAULT_CONFIG, "<default>", macros)
    return load_config(path, macros)


async def prepare(daemon: Daemon, config: Config) -> Prepared:
    from pigeon.daemon import Daemon

    staged = Daemon(config, daemon.options)
    runtimes = staged.listener_runtimes()
    prepared = Prepared(config, staged, runtimes)
    current = {listener_key(rt) for rt, _ in daemon.listeners}
    try:
        # The new filter and table processes must be ready before anything switches to them.
        await start_tables(staged.tables.values())
        await staged.filters.start()
        for runtime in runtimes:
            key = listener_key(runtime)
            if key not in current and key not in prepared.new_servers:
                prepared.new_servers[key] = await start_listener(daemon.services, runtime)
    except BaseException:
        await discard(prepared)
        raise
    return prepared


async def discard(prepared: Prepared) -> None:
    for servers in prepared.new_servers.values():
        for server in servers:
            server.close()
    staged = prepared.staged
    with contextlib.suppress(Exception):
        await staged.relay.close()
    with contextlib.suppress(Exception):
        await staged.filters.stop()
    with contextlib.suppress(Exception):
        await close_tables(staged.tables.values())


async def retire(daemon: Daemon, filters: Any, tables: list[Any]) -> None:
    """Stop the old filter and table processes once the sessions that may still use them
    (those open at the swap) have ended, or after the session timeout at the latest."""
    waiting = set(daemon.services.sessions)
    deadline = asyncio.get_running_loop().time() + daemon.options.session_timeout + 5
    while waiting & daemon.services.sessions and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(1.0)
    with contextlib.suppress(Exception):
        await filters.stop()
    with contextlib.suppress(Exception):
        await close_tables(tables)


def swap(daemon: Daemon, prepared: Prepared) -> None:
    """Install the prepared configuration. Synchronous: no session runs in the middle."""
    staged = prepared.staged
    for name, value in vars(staged).items():
        if name not in RUNTIME_ATTRIBUTES and not name.startswith("_"):
            setattr(daemon, name, value)
    services = daemon.services
    for f in dataclasses.fields(services):
        if f.name not in RUNTIME_SERVICES:
            setattr(services, f.name, getattr(staged.services, f.name))
    daemon.scheduler.queue_ttl = prepared.config.queue.ttl

    wanted = {listener_key(rt): rt for rt in prepared.runtimes}
    kept: list[tuple[ListenerRuntime, list[asyncio.Server]]] = []
    for runtime, servers in daemon.listeners:
        new = wanted.get(listener_key(runtime))
        if new is None:
            for server in servers:
                server.close()  # stops listening; its open sessions go on
            continue
        # Same socket, new settings: sessions created from now on see them.
        for f in dataclasses.fields(runtime):
            setattr(runtime, f.name, getattr(new, f.name))
        kept.append((runtime, servers))
    for key, servers in prepared.new_servers.items():
        kept.append((wanted[key], servers))
    daemon.listeners = kept
    daemon.servers = [s for _, servers in kept for s in servers]


async def _update_metrics(daemon: Daemon, config: Config) -> None:
    want = config.metrics
    target = (want.address, want.port) if want is not None else None
    if daemon.metrics_address == target:
        return
    if daemon.metrics_server is not None:
        daemon.metrics_server.close()
        daemon.metrics_server = None
        daemon.metrics_address = None
    if want is not None:
        try:
            daemon.metrics_server = await metrics.serve(want.address, want.port)
        except OSError as exc:
            log.warning("warn: reload: cannot listen for metrics: %s", exc)
            return
        daemon.metrics_address = target


async def reload(daemon: Daemon) -> tuple[bool, str]:
    """Reload the configuration; ``(ok, message)``. Never raises for a bad configuration."""
    from pigeon.config import ConfigError

    source = daemon.options.config_file or "<default>"
    try:
        config = load(daemon)
        await _reread_launchable()
        prepared = await prepare(daemon, config)
    except ConfigError as exc:
        return _failed(str(exc))
    except OSError as exc:
        return _failed(f"{exc.filename or source}: {exc.strerror or exc}")
    except Exception as exc:  # a table, key or filter the new config cannot set up
        return _failed(f"{source}: {exc}")
    old_filters, old_tables = daemon.filters, list(daemon.tables.values())
    swap(daemon, prepared)
    with contextlib.suppress(Exception):
        await prepared.staged.relay.close()  # the live relay pool stays
    daemon.relay.reconfigure(prepared.staged.relay.settings)  # with the new `mta limit`s
    daemon.reloader.track(retire(daemon, old_filters, old_tables))
    await _update_metrics(daemon, config)
    metrics.count("config_reloads", result="ok")
    message = f"configuration reloaded from {source}"
    log.info("info: %s", message)
    return True, message


async def _reread_launchable() -> None:
    """Started as root: the helper reads the file too, so that the filters it names can be
    started as their own user (launcher.py)."""
    from pigeon.launcher import LaunchError, launcher

    helper = launcher()
    if helper is None:
        return
    try:
        await helper.reread()
    except LaunchError as exc:  # its filters then run as the daemon's user, with a warning
        log.warning("warn: privileged helper could not read the configuration: %s", exc)


def _failed(reason: str) -> tuple[bool, str]:
    metrics.count("config_reloads", result="failed")
    log.warning("warn: reload failed, keeping the running configuration: %s", reason)
    return False, f"reload failed: {reason}"


class Reloader:
    """Serializes reloads (a SIGHUP storm runs them one after the other)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def reload(self) -> tuple[bool, str]:
        async with self._lock:
            return await reload(self.daemon)

    def track(self, coro: Any) -> None:
        """Run a background clean-up task, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_sighup(self) -> None:
        log.info("info: SIGHUP received: reloading the configuration")
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
