"""Wiring: config -> tables -> rules -> queue -> scheduler -> delivery -> listeners -> control."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pigeon import metrics
from pigeon.config.expand import FormatContext, FormatError, expand_format
from pigeon.config.model import Action, Config, TableRef
from pigeon.control.server import ControlServer
from pigeon.delivery.dns import DNSSettings
from pigeon.delivery.lmtp import deliver_lmtp
from pigeon.delivery.local import DAEMON_ACCOUNT, LocalTarget, LocalUser, daemon_account
from pigeon.delivery.local import deliver as deliver_local
from pigeon.delivery.logline import format_delay, log_delivery
from pigeon.delivery.relay import DomainLimits, RelaySettings
from pigeon.delivery.relay_service import InProcessRelay, RelayService, WorkerRelay
from pigeon.delivery.routes import RelayRoute, parse_credentials, parse_relay_url, route_for
from pigeon.errors import SMTPError
from pigeon.filters.runtime import FilterManager, table_getter
from pigeon.mailname import mailname
from pigeon.queue import bounce
from pigeon.queue.envelope import (
    FLAG_BOUNCE,
    Envelope,
    evpid_hex,
    msgid_hex,
    new_evpid,
)
from pigeon.queue.journal import JournalStore, QueueError
from pigeon.reload import Reloader
from pigeon.rules.expand import Expander
from pigeon.rules.ruleset import MatchContext, Ruleset
from pigeon.scheduler import policy
from pigeon.scheduler.scheduler import Clock, Outcome, Scheduler
from pigeon.server.auth import CredentialsChecker
from pigeon.server.listener import ListenerRuntime, bound_ports, resolve_interface, start_listener
from pigeon.server.localaddr import local_addresses
from pigeon.server.services import Services
from pigeon.server.tls import TLSConfigError, server_context
from pigeon.srs import SRSContext
from pigeon.tables.base import (
    Service,
    Table,
    TableError,
    TableResolver,
    close_tables,
    open_tables,
    start_tables,
    update_table,
)

log = logging.getLogger("pigeon")

SWEEP_INTERVAL = 5.0
SESSION_TIMEOUT = 300.0
COMPACT_INTERVAL = 30.0
# At shutdown, how long deliveries under way may take to end (see _finish_deliveries).
SHUTDOWN_GRACE = 5.0
# A relay action's route (its host, auth and src tables looked up) is used again for this
# long: a message each needs it, and a proc or remote table would be asked every time.
# `pigeon update table` forgets it at once.
ROUTE_CACHE_SECONDS = 1.0


@dataclass
class DaemonOptions:
    spool: Path
    paused: frozenset[str] = frozenset()  # "mda", "mta", "smtp" paused at start
    clock: Clock | None = None
    session_timeout: float = SESSION_TIMEOUT
    dns: DNSSettings | None = None  # None: the system resolver (/etc/resolv.conf)
    mx_port: int = 25  # port used toward MX hosts (tests aim it at loopback sinks)
    # What a reload reads again (`pigeon run -f FILE -D NAME=VALUE`); None: the built-in config.
    config_file: str | None = None
    macros: Mapping[str, str] = field(default_factory=dict)
    # Local delivery, when it must go through the privileged helper (privsep.py).
    local_delivery: Callable[[LocalTarget, Envelope, bytes], Awaitable[Outcome]] | None = None
    # Remote delivery in a relay worker process (its own core) or, if False, in the daemon.
    # The worker is the default: on two cores it relayed ~15% more mail per second
    # (bench/relay.py), as the daemon's core is then left to receiving.
    relay_worker: bool = True


def relay_settings(config: Config, helo: str, mx_port: int) -> RelaySettings:
    """The relay agent's settings, with the default (not per-domain) ``mta limit`` values."""
    limits: dict[str, int] = {}
    for entry in config.mta_limits:
        if entry.domain is None:
            limits.update(entry.values)
    settings = RelaySettings(helo=helo, mx_port=mx_port)
    # Pigeon's per-destination cap counts sessions per address and port: a route and a
    # host are the same thing for it, so the tighter of the two limits applies.
    conn = [limits[k] for k in ("max-conn-per-host", "max-conn-per-route") if k in limits]
    if conn:
        settings.max_conn_per_host = max(1, min(conn))
    if "session-mail-max" in limits:
        settings.max_mails_per_session = max(1, limits["session-mail-max"])
    if "session-keepalive" in limits:
        settings.keepalive = float(limits["session-keepalive"])
    if "max-failures-per-session" in limits:
        settings.max_failures_per_session = max(1, limits["max-failures-per-session"])
    # `mta limit for domain D ...`: D's own values over the defaults, for mail to D.
    for entry in config.mta_limits:
        if entry.domain is None:
            continue
        base = settings.domain_limits.get(entry.domain.lower()) or settings.limits_for("")
        values = entry.values
        conn = [values[k] for k in ("max-conn-per-host", "max-conn-per-route") if k in values]
        settings.domain_limits[entry.domain.lower()] = DomainLimits(
            max_conn_per_host=max(1, min(conn)) if conn else base.max_conn_per_host,
            max_mails_per_session=max(1, values["session-mail-max"])
            if "session-mail-max" in values
            else base.max_mails_per_session,
            keepalive=float(values.get("session-keepalive", base.keepalive)),
            max_failures_per_session=max(1, values["max-failures-per-session"])
            if "max-failures-per-session" in values
            else base.max_failures_per_session,
        )
    return settings


class Daemon:
    def __init__(self, config: Config, options: DaemonOptions) -> None:
        self.config = config
        self.options = options
        self.hostname = mailname()
        self.store = JournalStore(options.spool)
        self.tables = open_tables(config)
        self.ruleset = Ruleset(config, self.tables, local_names=self._local_names())
        self.expander = Expander(config, self.tables, self.ruleset)
        self.resolver = TableResolver(config, self.tables)
        self.filters = FilterManager(
            config, table_getter(self.resolver), admd=config.admd or self.hostname
        )
        # Remote delivery runs here, or in a worker process (its own core) if asked to.
        relay_kind = WorkerRelay if options.relay_worker else InProcessRelay
        self.relay: RelayService = relay_kind(
            self.store,
            relay_settings(config, self.hostname, options.mx_port),
            options.dns or DNSSettings(),
        )
        self._routes: dict[int, tuple[Action, RelayRoute, float]] = {}
        # Envelopes of one message due together are delivered in one transaction.
        self._batches: dict[
            tuple[int, str], list[tuple[Envelope, asyncio.Future[None] | None]]
        ] = {}
        self.scheduler = Scheduler(
            self._dispatch,
            clock=options.clock,
            queue_ttl=config.queue.ttl,
            expire=self._expire,
            claim=self._claim_relays,
        )
        self._outcome_batch: list[tuple[Envelope, Outcome]] = []  # see _relayed
        self._report_tasks: set[asyncio.Task[None]] = set()
        self._recording = True  # outcomes are recorded (until shutdown has let them finish)
        for kind in ("mda", "mta"):
            if kind in options.paused:
                self.scheduler.pause(kind)
        self.srs = (
            SRSContext(
                config.srs.key,
                config.srs.backup_key,
                config.srs.ttl,
                postsrsd_compat=config.srs.postsrsd_compat,
            )
            if config.srs.key
            else None
        )
        self.services = Services(
            config=config,
            srs=self.srs,
            store=self.store,
            expander=self.expander,
            accepted=self._accepted,
            smtp_paused="smtp" in options.paused,
        )
        self.servers: list[asyncio.Server] = []
        self.control = ControlServer(self, options.spool / "control.sock")
        self.started = time.time()
        # Each listener's settings with its sockets (a reload updates the settings in place).
        self.listeners: list[tuple[ListenerRuntime, list[asyncio.Server]]] = []
        self.metrics_server: asyncio.AbstractServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.reloader = Reloader(self)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _local_names(self) -> frozenset[str]:
        names = {"localhost", "localhost.localdomain", socket.gethostname().lower()}
        names.add(self.hostname.lower())
        # OpenSMTPD's <localnames> also holds the host's addresses, bare and as literals:
        # without them `user%other@[127.0.0.1]` from a local client would go to the relay.
        for addr in local_addresses():
            names.add(addr.lower())
            names.add(f"[IPv6:{addr}]".lower() if ":" in addr else f"[{addr}]")
        for listener in self.config.listeners:
            if listener.hostname:
                names.add(listener.hostname.lower())
        return frozenset(names)

    # ------------------------------------------------------------------ lifecycle

    def listener_runtimes(self) -> list[ListenerRuntime]:
        out = []
        smtp = self.config.smtp
        for lst in self.config.listeners:
            if lst.kind != "inet":
                continue
            port = lst.port if lst.port is not None else (465 if lst.smtps else 25)
            hosts = resolve_interface(lst.interface, lst.family)
            hostname = lst.hostname or self.hostname
            runtime = ListenerRuntime(
                hostname=hostname,
                addresses=[(h, port) for h in hosts],
                tag=lst.tag,
                smtps=lst.smtps,
                tls_required=lst.tls_require,
                mask_src=lst.mask_src,
                received_auth=lst.received_auth,
                dsn=not lst.no_dsn,
                max_message_size=smtp.max_message_size,
                max_rcpt=smtp.max_rcpt,
                max_mails=smtp.max_mails,
            )
            if lst.tls or lst.tls_require or lst.smtps:
                names = list(lst.pki) or self._default_pkis(hostname)
                runtime.ssl_context = server_context(
                    [self.config.pkis[n] for n in names],
                    ca=self.config.cas.get(lst.ca) if lst.ca else None,
                    verify=lst.verify,
                    ciphers=lst.ciphers or smtp.ciphers,
                    protocols=lst.protocols,
                )
            if lst.auth or lst.auth_optional:
                runtime.auth_mechanisms = ("PLAIN", "LOGIN")
                runtime.auth_required = lst.auth
                runtime.authenticator = self._authenticator(lst.auth_table)
            if lst.senders is not None:
                senders = self.resolver.get(lst.senders)

                async def senders_lookup(service: str, key: str, t: Table = senders) -> str | None:
                    return await t.lookup(Service(service), key)

                runtime.senders = senders_lookup
                runtime.masquerade = lst.masquerade
            runtime.filter_chain = self.filters.chain(lst.filter)
            out.append(runtime)
        return out

    def _default_pkis(self, hostname: str) -> list[str]:
        """A TLS listener without ``pki`` (smtpd 6.8): the pki named after its hostname, or
        the one named ``*``; the others too, chosen by the client's SNI name."""
        pkis = self.config.pkis
        if not pkis:
            raise TLSConfigError(f"listener for {hostname}: tls/smtps needs a pki declared")
        for default in (hostname.lower(), "*"):
            if default in pkis:
                return [default, *(name for name in pkis if name != default)]
        # smtpd would fail every handshake here; serving the first pki keeps TLS working.
        first = next(iter(pkis))
        log.warning(
            'warn: listener for %s: no pki named %s or "*": TLS uses pki %s',
            hostname,
            hostname,
            first,
        )
        return list(pkis)

    def _authenticator(self, ref: TableRef | None) -> CredentialsChecker:
        if ref is None:
            return CredentialsChecker()  # system users
        table = self.resolver.get(ref)

        async def lookup(service: str, key: str) -> str | None:
            return await table.lookup(Service(service), key)

        if Service.AUTH in table.services():
            by_hash = CredentialsChecker(lookup)

            async def auth_check(credentials: str) -> bool:
                # A proc table's services are only known after its handshake (it may start
                # late or be restarted): decide between auth and credentials on each try.
                await table.start()
                if Service.AUTH not in table.services():
                    user, _, password = credentials.partition(":")
                    return await by_hash.check(user, password)
                return await table.check(Service.AUTH, credentials)

            return CredentialsChecker(lookup, auth_check=auth_check)
        return CredentialsChecker(lookup)

    async def start(self, drop_privileges: Callable[[], None] | None = None) -> None:
        """Open the queue, start the helpers, bind every socket, then serve.

        ``drop_privileges`` runs once everything that needs root is done and before any
        client, control request or delivery is handled: nothing is ever served as root."""
        self.store.open()
        for env in self.store.envelopes():
            self.scheduler.add(env)
        count = len(self.scheduler.envelopes())
        log.info("info: Pigeon starting, %d envelope(s) in the queue", count)
        for action in self.config.actions.values():
            if action.wrapper and action.method != "mda":
                log.warning(
                    'warn: action "%s": wrapper %s applies to mda deliveries only: its %s '
                    "deliveries do not go through it",
                    action.name,
                    action.wrapper,
                    action.method,
                )
        if self.config.queue.encryption:  # said at every start: the admin asked for it
            log.warning(
                "warn: queue encryption is not supported: messages are stored unencrypted "
                "in %s (protect it with disk encryption)",
                self.options.spool,
            )
        await self.filters.start()  # like smtpd: every filter is ready before any session
        # Proc tables handshake now: listeners need their services (auth or credentials).
        await start_tables(self.tables.values())
        await self.relay.start()  # as root: the worker drops to the unprivileged user
        for runtime in self.listener_runtimes():
            servers = await start_listener(self.services, runtime, serving=False)
            self.listeners.append((runtime, servers))
            self.servers += servers
        if self.config.metrics is not None:
            m = self.config.metrics
            self.metrics_server = await metrics.serve(m.address, m.port, serving=False)
            self.metrics_address = (m.address, m.port)
        metrics.set_gauge_source(self.gauges)
        await self.control.start(serving=False)
        if drop_privileges is not None:
            drop_privileges()
        for server in self.servers:
            await server.start_serving()
        if self.metrics_server is not None:
            await self.metrics_server.start_serving()
        await self.control.serve()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.scheduler.run()))
        self._tasks.append(loop.create_task(self._sweeper()))
        self._tasks.append(loop.create_task(self._compactor()))
        # RuntimeError: a daemon embedded outside the main thread keeps its caller's signals.
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        with contextlib.suppress(RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.reloader.on_sighup)

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration (SIGHUP, ``pigeon reload``); ``(ok, message)``."""
        return await self.reloader.reload()

    def gauges(self) -> dict[str, float]:
        """Values sampled when Prometheus scrapes /metrics."""
        envelopes = self.scheduler.envelopes()
        now = time.time()
        oldest = min((e.ctime for e in envelopes), default=None)
        return {
            "smtp_sessions_active": len(self.services.sessions),
            "queue_messages": len(self.store.messages),
            "queue_envelopes": len(envelopes),
            "queue_envelopes_inflight": len(self.scheduler.inflight),
            "queue_oldest_age_seconds": max(0.0, now - oldest) if oldest is not None else 0.0,
            "uptime_seconds": now - self.started,
        }

    def ports(self) -> list[tuple[str, int]]:
        return bound_ports(self.servers)

    async def serve_forever(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        log.info("info: Pigeon exiting")
        for server in self.servers:
            server.close()
        for session in list(self.services.sessions):
            if session.transport is not None:
                session.transport.close()
        await self.filters.stop()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self.control.stop()
        await self._finish_deliveries(SHUTDOWN_GRACE)
        await self.relay.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.store.close()
        await close_tables(self.tables.values())
        log.info("Exiting")  # smtpd's last line, which scripts wait for

    async def _finish_deliveries(self, grace: float) -> None:
        """Deliveries under way get ``grace`` seconds to end and have their outcome
        recorded: a message the next hop has taken is not sent again after a restart.
        What is still running then is cut off and stays queued (at least once)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        under_way = len(self.scheduler.inflight)
        if under_way:
            log.info("info: waiting up to %gs for %d delivery(ies) under way", grace, under_way)
        await self.scheduler.stop(grace=grace)
        await self.relay.drain(deadline - loop.time())
        if self._report_tasks:
            await asyncio.wait(list(self._report_tasks), timeout=max(0.0, deadline - loop.time()))
        self._recording = False  # answers from here on are the worker being stopped
        for task in list(self._report_tasks):
            task.cancel()
        if self._outcome_batch:
            self._store_outcome_batch()

    async def update_table(self, name: str) -> None:
        """``pigeon update table NAME``: reload one table in place (TableError on failure;
        the table keeps its previous contents then)."""
        table = self.tables.get(name)
        if table is None:
            raise TableError(f"no such table: {name}")
        await update_table(table)
        self._routes.clear()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            limit = time.monotonic() - self.options.session_timeout
            for session in list(self.services.sessions):
                if session.last_activity < limit and session.task is None:
                    session.timeout()

    async def _compactor(self) -> None:
        while True:
            await asyncio.sleep(COMPACT_INTERVAL)
            try:
                await self.store.compact()
            except (QueueError, OSError) as exc:
                log.error("warn: queue compaction failed: %s", exc)

    # ------------------------------------------------------------------ queue events

    def _accepted(self, envelopes: list[Envelope]) -> None:
        self.services.stats.incr("queue.envelope.enqueued", len(envelopes))
        for env in envelopes:
            action = self.config.actions.get(env.dispatcher)
            if action is not None and action.ttl and not env.ttl:
                env.ttl = action.ttl  # the action's `ttl` overrides `queue ttl`
                self.store.update(env)
            self.scheduler.add(env)

    def _now(self) -> float:
        return self.scheduler.clock.now()

    async def _dispatch(self, env: Envelope) -> None:
        action = self.config.actions.get(env.dispatcher)
        if action is None:
            await self._record_outcome(
                env, Outcome.tempfail(f"no such dispatcher: {env.dispatcher}")
            )
            return
        if action.method in ("relay", "lmtp"):
            await self._dispatch_batch(env, action)
            return
        try:
            body = self.store.read_body(env.msgid)
        except QueueError as exc:
            outcome = Outcome.tempfail(str(exc))
        else:
            with metrics.timed("delivery_seconds", agent=action.method):
                outcome = await self._deliver_local(env, action, body)
        await self._record_outcome(env, outcome)

    async def _dispatch_batch(self, env: Envelope, action: Action) -> None:
        """Relay and LMTP: every envelope of a message that is due now, in one transaction."""
        key = (env.msgid, env.dispatcher)
        batch = self._batches.get(key)
        if batch is not None:  # a sibling is collecting this tick's envelopes: join it
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            batch.append((env, done))
            await done
            return
        batch = [(env, None)]
        stored = self.store.messages.get(env.msgid)
        if stored is not None and len(stored.envelopes) > 1:
            self._batches[key] = batch
            await asyncio.sleep(0)  # the scheduler started its siblings in the same tick
            del self._batches[key]
        envelopes = [e for e, _ in batch]
        dsn_relayed: set[int] = set()
        started = time.monotonic()
        try:
            outcomes = await self._deliver_remote(envelopes, action, dsn_relayed)
        except Exception as exc:  # never leave siblings waiting
            log.exception("warn: %s delivery failed unexpectedly", action.method)
            outcomes = {e.evpid: Outcome.tempfail(f"internal error: {exc}") for e in envelopes}
        if metrics.enabled():  # (a `metrics.timed` block costs even when they are off)
            metrics.observe("delivery_seconds", time.monotonic() - started, agent=action.method)
        results = [
            (e, outcomes.get(e.evpid) or Outcome.tempfail("no result from delivery agent"))
            for e, _ in batch
        ]
        # Recipients that failed (or were delayed) together get one report, sent before
        # their envelopes go (a crash in between duplicates a report, never loses one).
        reports = self._due_reports(results, action.method == "relay", dsn_relayed)
        if reports:
            await self._send_reports(reports)
        await self._record_outcomes(results, reported=True)
        for _, fut in batch:
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _claim_relays(self, due: list[Envelope]) -> list[Envelope]:
        """The scheduler's claim: relayed envelopes go to the relay worker without a task
        each (the busiest path of a relay host); returns the rest, which take the general
        path (``_dispatch``). Taken: relay actions without SRS whose route is known (the
        general path looks it up and keeps it a while), worker ready, body found."""
        relay = self.relay
        if not isinstance(relay, WorkerRelay):
            return due
        rest: list[Envelope] = []
        groups: dict[tuple[int, str], list[Envelope]] = {}
        for env in due:
            action = self.config.actions.get(env.dispatcher)
            if action is None or action.method != "relay" or action.srs:
                rest.append(env)
            else:
                groups.setdefault((env.msgid, env.dispatcher), []).append(env)
        for (_, dispatcher), group in groups.items():
            action = self.config.actions[dispatcher]
            route = self._route_if_cached(action)
            started = time.monotonic()
            sender = action.mail_from or group[0].sender  # one message: one sender

            def then(
                outcomes: dict[int, Outcome],
                dsn_relayed: set[int],
                group: list[Envelope] = group,
                method: str = action.method,
                started: float = started,
            ) -> None:
                self._relayed(group, method, started, outcomes, dsn_relayed)

            if route is None or not relay.submit(route, group, sender, then):
                rest.extend(group)
        return rest

    def _relayed(
        self,
        group: list[Envelope],
        method: str,
        started: float,
        outcomes: dict[int, Outcome],
        dsn_relayed: set[int],
    ) -> None:
        """The worker's answer for claimed envelopes. Outcomes of one event-loop iteration
        are stored together (one DELETE record for a batch of answers)."""
        if not self._recording:
            return  # shut down: they stay queued as they are, tried at the next start
        try:
            if metrics.enabled():
                metrics.observe("delivery_seconds", time.monotonic() - started, agent=method)
            results = [
                (e, outcomes.get(e.evpid) or Outcome.tempfail("no result from delivery agent"))
                for e in group
            ]
            reports = self._due_reports(results, True, dsn_relayed)
            if reports:  # rare (failures, NOTIFY=SUCCESS): reports first, as _dispatch_batch
                task = asyncio.get_running_loop().create_task(
                    self._report_then_store(reports, results)
                )
                self._report_tasks.add(task)
                task.add_done_callback(self._report_tasks.discard)
                return
            if not self._outcome_batch:
                asyncio.get_running_loop().call_soon(self._store_outcome_batch)
            self._outcome_batch.extend(results)
        except Exception:
            log.exception("warn: recording relay outcomes failed")
            self.scheduler.failed(group)

    def _store_outcome_batch(self) -> None:
        results, self._outcome_batch = self._outcome_batch, []
        try:
            self._store_outcomes(results)
        except Exception:
            log.exception("warn: recording relay outcomes failed")
            self.scheduler.failed([e for e, _ in results])

    async def _report_then_store(
        self,
        reports: dict[tuple[str, float | None], list[bounce.BounceItem]],
        results: list[tuple[Envelope, Outcome]],
    ) -> None:
        try:
            await self._send_reports(reports)
            self._store_outcomes(results)
        except Exception:
            log.exception("warn: recording relay outcomes failed")
            self.scheduler.failed([e for e, _ in results])

    async def _deliver_remote(
        self, envelopes: list[Envelope], action: Action, dsn_relayed: set[int] | None = None
    ) -> dict[int, Outcome]:
        if action.method == "lmtp":
            try:
                body = self.store.read_body(envelopes[0].msgid)
            except QueueError as exc:
                return {e.evpid: Outcome.tempfail(str(exc)) for e in envelopes}
            users = {e.evpid: (e.mda_user or e.dest.rpartition("@")[0]) for e in envelopes}
            return await deliver_lmtp(
                action.lmtp_dest or "",
                envelopes,
                body,
                rcpt_to=action.lmtp_rcpt_to,
                users=users,
                helo=self.hostname,
            )
        try:
            route = self._route_if_cached(action) or await self._cached_route(action)
        except SMTPError as err:
            return {e.evpid: Outcome.tempfail(err.line()) for e in envelopes}
        # `relay srs`: forwarded envelopes leave with a rewritten sender, so envelopes of one
        # message may need different MAIL FROMs: one transaction per sender.
        by_sender: dict[str, list[Envelope]] = {}
        for e in envelopes:
            by_sender.setdefault(self._relay_sender(e, action), []).append(e)
        outcomes: dict[int, Outcome] = {}
        for sender, group in by_sender.items():
            outcomes.update(
                await self.relay.deliver(route, group, sender=sender, dsn_relayed=dsn_relayed)
            )
        return outcomes

    def _relay_sender(self, env: Envelope, action: Action) -> str:
        sender = action.mail_from or env.sender
        if not (action.srs and self.srs is not None and env.sender):
            return sender
        # Only forwarded mail (recipient changed by alias/virtual/.forward) is rewritten.
        return self.srs.rewrite_sender(sender, env.rcpt, env.dest, now=int(self._now()))

    def _route_if_cached(self, action: Action) -> RelayRoute | None:
        cached = self._routes.get(id(action))
        if cached is not None and cached[0] is action and cached[2] > time.monotonic():
            return cached[1]
        return None

    async def _cached_route(self, action: Action) -> RelayRoute:
        now = time.monotonic()
        cached = self._routes.get(id(action))
        if cached is not None and cached[0] is action and cached[2] > now:
            return cached[1]
        route = await self.relay_route(action)  # failures are not kept
        if len(self._routes) > 64:
            self._routes.clear()
        self._routes[id(action)] = (action, route, now + ROUTE_CACHE_SECONDS)
        return route

    async def relay_route(self, action: Action) -> RelayRoute:
        """The action's relay options, with its tables looked up."""
        smarthost = None
        credentials = None
        try:
            if action.host is not None:
                smarthost = await self._first_value(self.resolver.get(action.host))
            if action.auth is not None and smarthost is not None:
                label = parse_relay_url(smarthost).label
                if label:
                    value = await self.resolver.get(action.auth).lookup(Service.CREDENTIALS, label)
                    if value is None:
                        raise SMTPError(451, "4.7.0", f"no credentials for label {label}")
                    credentials = parse_credentials(value)
            source = None
            if action.src is not None:
                source = await self._first_value(self.resolver.get(action.src))
        except TableError as exc:
            raise SMTPError(451, "4.3.0", f"table lookup failed: {exc}") from exc
        except ValueError as exc:
            raise SMTPError(451, "4.3.0", f"bad relay setting: {exc}") from exc
        client_cert = None
        pki = self.config.pkis.get(action.pki.lower()) if action.pki is not None else None
        if pki is not None and pki.cert and pki.key:
            client_cert = (pki.cert, pki.key)
        return route_for(
            action,
            smarthost=smarthost,
            credentials=credentials,
            source=source,
            client_cert=client_cert,
        )

    @staticmethod
    async def _first_value(table: Table) -> str | None:
        for service in (Service.RELAYHOST, Service.SOURCE, Service.STRING):
            if service in table.services():
                value = await table.fetch(service)
                if value is not None:
                    return value
        return None

    async def _deliver_local(self, env: Envelope, action: Action, body: bytes) -> Outcome:
        try:
            target = await self.local_target(env, action)
        except SMTPError as err:
            return Outcome(("tempfail" if err.temporary else "permfail"), err.line())
        if self.options.local_delivery is not None:  # root-started: the privileged helper
            return await self.options.local_delivery(target, env, body)
        return await deliver_local(target, env, body)

    async def local_target(self, env: Envelope, action: Action) -> LocalTarget:
        if env.mda_exec:
            # An alias or .forward target: "|command" or "/path/to/mbox-file", run as the
            # .forward's owner, the action's `user`, or for an alias the daemon's account.
            if env.mda_user == DAEMON_ACCOUNT and not action.user:
                user = daemon_account()
            else:
                user = await self._account(action, action.user or env.mda_user)
            # %{...} formats are expanded there too, as smtpd does
            exec_ctx = FormatContext(
                sender=env.sender,
                rcpt=env.rcpt,
                dest=env.dest,
                username=user.name,
                directory=user.home,
                subaddr_delim=self.config.smtp.sub_addr_delim,
            )
            try:
                target = expand_format(env.mda_exec, exec_ctx)
            except FormatError as exc:
                log.warning("warn: cannot expand the alias target %r: %s", env.mda_exec, exc)
                raise SMTPError(550, "5.3.0", "Error in the delivery configuration") from exc
            if target.startswith("|"):
                return LocalTarget("mda", target[1:], user)
            return LocalTarget("mbox", target, user)
        # The recipient's account gives %{user.username}, %{user.directory} and the mbox;
        # the action's `user`, if any, is who the delivery runs as: its uid, gid, HOME and
        # the "~" of a path (smtpd: `maildir ... user bob` with the default ~/Maildir fills
        # bob's maildir).
        name = env.mda_user or env.dest.rpartition("@")[0]
        info = await self.expander.user_info(action, name)
        if info is None:
            raise SMTPError(550, "5.1.1", f"user unknown: {name}")
        user = LocalUser(info.name, info.uid, info.gid, info.home)
        if action.user and action.user != info.name:
            user = await self._account(action, action.user)
        tilde = user.home.replace("%", "%%")
        ctx = FormatContext(
            sender=env.sender,
            rcpt=env.rcpt,
            dest=env.dest,
            username=info.name,
            directory=info.home,
            subaddr_delim=self.config.smtp.sub_addr_delim,
        )

        def expand(fmt: str) -> str:
            if fmt.startswith("~/"):
                fmt = tilde + fmt[1:]
            try:
                return expand_format(fmt, ctx)
            except FormatError as exc:
                # the bounce goes to the sender: it must not quote our configuration
                log.warning('warn: action "%s": cannot expand %r: %s', action.name, fmt, exc)
                raise SMTPError(550, "5.3.0", "Error in the delivery configuration") from exc

        if action.method == "maildir":
            path = expand(action.maildir_path or "~/Maildir")
            return LocalTarget("maildir", path, user, junk=action.junk)
        if action.method == "mbox":
            return LocalTarget("mbox", f"/var/mail/{info.name}", user)
        if action.method == "mda":
            command = expand(action.mda_command or "")
            wrapper = self.config.mda_wrappers.get(action.wrapper) if action.wrapper else None
            if wrapper is not None:  # `mda wrapper NAME "cmd %{mda}"`: run instead
                ctx = replace(ctx, mda=command)
                command = expand(wrapper)
            return LocalTarget("mda", command, user)
        raise SMTPError(550, "5.3.0", f"cannot deliver locally with {action.method}")

    async def _account(self, action: Action, name: str) -> LocalUser:
        """The account an action's ``user`` (or a .forward's owner) names: a system user
        first, as smtpd's getpwnam, else one of the action's userbase."""
        info = await self.expander.userinfo(name) if name == action.user else None
        if info is None:
            info = await self.expander.user_info(action, name)
        if info is None:
            raise SMTPError(550, "5.1.1", f"user unknown: {name}")
        return LocalUser(info.name, info.uid, info.gid, info.home)

    def _due_reports(
        self,
        results: list[tuple[Envelope, Outcome]],
        relayed: bool = False,
        dsn_relayed: set[int] | None = None,
    ) -> dict[tuple[str, float | None], list[bounce.BounceItem]]:
        """The DSNs these outcomes call for, grouped by (kind, expiry of a delay notice).

        A success relayed to a next hop that took the DSN request along is reported there,
        not here; one without DSN gets a local "relayed" notice (RFC 3461 section 6.2).
        """
        reports: dict[tuple[str, float | None], list[bounce.BounceItem]] = {}
        now = self._now()
        for env, outcome in results:
            kind: str | None = None
            expires: float | None = None
            if outcome.status == "ok":
                if relayed and dsn_relayed is not None and env.evpid in dsn_relayed:
                    continue
                kind = "relayed" if relayed else "delivered"
                if not bounce.wants_report(env, "delivered"):
                    continue
            elif outcome.status == "tempfail":
                env.last_try = int(now)
                if env.evpid not in self.scheduler or not self._warn_due(env, now):
                    continue
                kind = "delayed"
                expires = policy.expiry(env, self.config.queue.ttl)
                if not bounce.wants_report(env, kind):
                    continue
            else:
                kind = "failed"
                env.last_try = int(now)
                if not bounce.wants_report(env, kind):
                    continue
            reports.setdefault((kind, expires), []).append(bounce.BounceItem(env, outcome.line))
        return reports

    async def _send_reports(
        self, reports: dict[tuple[str, float | None], list[bounce.BounceItem]]
    ) -> None:
        for (kind, expires), items in reports.items():
            await self._report(kind, items, expires_at=expires)

    def _warn_due(self, env: Envelope, now: float) -> bool:
        """``bounce warn-interval``: one delay notice per crossed threshold; marks it sent."""
        retry = env.retry
        env.retry += 1  # the attempt being recorded counts for the next retry time
        try:
            next_try = policy.next_attempt(env, now)
        finally:
            env.retry = retry
        for delay in self.config.bounce_warn_interval:
            threshold = env.ctime + delay
            if next_try >= threshold and env.last_bounce < threshold:
                env.last_bounce = threshold
                return True
        return False

    async def _record_outcome(
        self, env: Envelope, outcome: Outcome, reported: bool = False
    ) -> None:
        await self._record_outcomes([(env, outcome)], reported=reported)

    async def _record_outcomes(
        self, results: list[tuple[Envelope, Outcome]], reported: bool = False
    ) -> None:
        """Log, count and store what attempts gave."""
        if not reported:
            reports = self._due_reports(results)
            if reports:
                await self._send_reports(reports)
        self._store_outcomes(results)

    def _store_outcomes(self, results: list[tuple[Envelope, Outcome]]) -> None:
        """Envelopes done together leave the journal in one DELETE record."""
        now = self._now()
        stats = self.services.stats
        done: list[int] = []
        for env, outcome in results:
            if not outcome.logged:  # the relay worker logs what it relays
                log_delivery(env, outcome.status, outcome.line, now)
            action = self.config.actions.get(env.dispatcher)
            metrics.count(
                "deliveries",
                agent=action.method if action is not None else env.type,
                result=outcome.status,
                destination=env.dest.rpartition("@")[2],
            )
            stats.incr(f"scheduler.delivery.{outcome.status}")
            if outcome.status == "ok":
                done.append(env.evpid)
                continue
            env.errorline = outcome.line
            env.last_try = int(now)
            if outcome.status != "tempfail":
                done.append(env.evpid)
                continue
            env.retry += 1
            env.esc_class = 4
            if env.evpid not in self.scheduler:  # removed by the administrator while in flight
                done.append(env.evpid)
                continue
            self.store.update(env)
            self.scheduler.retried(env)
        if done:
            self.store.delete(done)
            for evpid in done:
                self.scheduler.done(evpid)

    async def _expire(self, env: Envelope) -> None:
        line = env.errorline or "Envelope expired"
        log.info(
            "relay: Expire for %s: from=<%s>, to=<%s>, rcpt=<->, delay=%s, stat=Envelope expired",
            evpid_hex(env.evpid),
            env.sender,
            env.dest,
            format_delay(self._now() - env.ctime),
        )
        self.services.stats.incr("scheduler.envelope.expired")
        metrics.count("envelopes_expired")
        if bounce.wants_report(env, "failed"):
            item = bounce.BounceItem(env, f"Envelope expired ({line})")
            await self._report("failed", [item])
        self.store.delete([env.evpid])
        self.scheduler.done(env.evpid)

    async def _report(
        self, kind: str, items: list[bounce.BounceItem], *, expires_at: float | None = None
    ) -> None:
        """Queue a DSN to the sender, routed by the rules like any local submission."""
        first = items[0].envelope
        if not first.sender:
            return
        try:
            original = self.store.read_body(first.msgid)
        except QueueError:
            original = b""
        rcpt, message = bounce.build_report(
            kind,
            items,
            original,
            hostname=first.smtpname or self.hostname,
            now=self._now(),
            expires_at=expires_at,
        )
        try:
            await self.inject("", [rcpt], message, flags=[FLAG_BOUNCE])
            self.services.stats.incr("queue.bounce")
        except (SMTPError, QueueError) as exc:
            log.warning(
                "warn: PermFail injecting failure report on message %s to <%s>: %s",
                msgid_hex(first.msgid),
                rcpt,
                exc,
            )

    async def inject(
        self, sender: str, rcpts: Iterable[str], message: bytes, *, flags: list[str] | None = None
    ) -> int:
        """Queue a message generated here (bounces), as a local session would."""
        msgid = self.store.reserve_msgid()
        envelopes: list[Envelope] = []
        now = int(self._now())
        try:
            for rcpt in rcpts:
                ctx = MatchContext(
                    local=True,
                    socket=True,
                    src_ip="",
                    rdns="localhost",
                    helo="localhost",
                    auth_user=None,
                    tls=False,
                    tag=None,
                    mail_from=sender,
                    rcpt_to=rcpt,
                )
                for dest in await self.expander.expand(ctx):
                    action = self.config.actions.get(dest.dispatcher)
                    envelopes.append(
                        Envelope(
                            evpid=new_evpid(msgid),
                            dispatcher=dest.dispatcher,
                            type="mta" if action and action.method == "relay" else "mda",
                            sender=sender,
                            rcpt=rcpt,
                            dest=dest.dest,
                            ctime=now,
                            smtpname=self.hostname,
                            helo="localhost",
                            hostname="localhost",
                            sockaddr="local",
                            flags=list(flags or []),
                            mda_exec=dest.mda_exec or "",
                            mda_subaddress=dest.subaddress or "",
                            mda_user=dest.user or "",
                        )
                    )
            if not envelopes:
                raise SMTPError(550, "5.1.1", "no recipient accepted")
            await self.store.commit(msgid, message, envelopes)
        finally:
            self.store.release_msgid(msgid)
        self._accepted(envelopes)
        return msgid
