"""Remote delivery ("mta"): MX hosts or a smarthost, STARTTLS, AUTH, connection reuse.

Drives the pure client state machine ``pigeon.protocol.client`` as an asyncio protocol. Behaviour
follows OpenSMTPD's ``mta.c``/``mta_session.c`` (delivery-queue.md 2.7-2.9):

* MX hosts are tried in preference order, every address of each; the next one is tried when
  connecting fails or the greeting/EHLO/STARTTLS/AUTH stage fails. Once a transaction started,
  its replies are final for this attempt: 4xx -> tempfail, 5xx -> permfail, per recipient.
* Opportunistic STARTTLS does not check the certificate, and when its handshake fails the
  session is reconnected in plain text. Mandatory TLS (``tls``, ``smtp+tls://``, ``smtps://``)
  checks name and chain unless ``no-verify``. AUTH only over TLS (the state machine refuses
  otherwise).
* All recipients of one call go in one transaction per destination. An idle session is kept
  ``keepalive`` seconds (OpenSMTPD: 10 s) for the next call to the same destination, at most
  ``max_mails_per_session`` transactions (100). At most ``max_conn_per_host`` sessions per
  address and port carry a transaction at once (10).
* Nothing here raises for network trouble: every envelope gets an Outcome.
* ``pigeon trace mta`` logs each session's dialogue (``mta: 0x...: >>> MAIL FROM:<...>``,
  ``<<< 250 ...``) through the ``pigeon.trace.mta`` logger, credentials masked and the body
  only as its size; while it is off, the cost is one attribute test per read, write and
  transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pigeon.delivery.dns import MXHost, MXResolver
from pigeon.delivery.logline import log_delivery
from pigeon.delivery.routes import (
    RelayRoute,
    RelayURL,
    RouteTLS,
    TLSPlan,
    parse_relay_url,
    route_for,
    tls_plan,
)
from pigeon.errors import SMTPError
from pigeon.protocol.client import (
    ClientConfig,
    ClientConnection,
    ClientProtocolError,
    Closed,
    DataReady,
    DeliveryResult,
    Event,
    Extensions,
    MailRejected,
    NeedStartTLS,
    Ready,
    RecipientResult,
    RecipientSpec,
    SessionFailed,
    Transaction,
    TransactionResult,
)
from pigeon.protocol.replies import Reply
from pigeon.queue.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope
from pigeon.scheduler.scheduler import Outcome
from pigeon.server.tls import ciphers_text

__all__ = [
    "ClientSession",
    "DomainLimits",
    "HandshakeError",
    "RelayAgent",
    "RelayRoute",
    "RelaySettings",
    "mail_params",
    "notify_param",
    "outcome_for",
    "parse_relay_url",
    "rcpt_params",
    "reply_line",
    "route_for",
]

log = logging.getLogger("pigeon.mta")
# ``pigeon trace mta``: the client dialogue, written only while this logger's *own* level is
# DEBUG. ``log verbose`` sets "pigeon" to DEBUG, which this logger inherits; the dialogue must
# stay off then (OpenSMTPD keeps trace flags and verbosity apart too).
trace_log = logging.getLogger("pigeon.trace.mta")
_DEBUG = logging.DEBUG
_MAX_TRACED_LINE = 4096  # a reply line longer than this breaks the session anyway


def tracing() -> bool:
    """``pigeon trace mta`` (or ``transfer``, ``all``) is on."""
    return 0 < trace_log.level <= _DEBUG


_QUIT_TIMEOUT = 5.0  # a polite QUIT is not worth waiting the full command timeout for
_MAX_ADDRESSES = 20  # addresses tried per attempt, whatever the DNS says


# --------------------------------------------------------------------------------------------
# Replies and parameters


def reply_line(reply: Reply) -> str:
    """``550 5.1.1 No such user`` on one line (a multiline text joined with spaces)."""
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    text = " ".join(part for part in reply.text.split("\n") if part)
    return f"{head} {text}" if text else head


# Replies repeat (the parser shares their objects): their lines are worked out once.
_LINES: dict[int, tuple[Reply, str]] = {}


def outcome_for(reply: Reply) -> Outcome:
    known = _LINES.get(id(reply))
    if known is not None and known[0] is reply:
        line = known[1]
    else:
        line = reply_line(reply)
        if len(_LINES) >= 256:
            _LINES.clear()
        _LINES[id(reply)] = (reply, line)
    if 200 <= reply.code < 300:
        return Outcome.ok(line)
    if reply.code >= 500:
        return Outcome.permfail(line)
    return Outcome.tempfail(line)


def notify_param(bits: int) -> str | None:
    """The RCPT ``NOTIFY=`` value for an envelope's DSN bitmask; None when not requested."""
    if not bits:
        return None
    if bits & DSN_NEVER:
        return "NEVER"
    words = [
        word
        for bit, word in ((DSN_SUCCESS, "SUCCESS"), (DSN_FAILURE, "FAILURE"), (DSN_DELAY, "DELAY"))
        if bits & bit
    ]
    return ",".join(words) or None


_SPACE_OR_NUL = re.compile(r"[\s\0]")  # \s: the characters str.isspace() accepts
_NOT_IN_PATH = re.compile(r"[\r\n\0<>]")


def _param_value_ok(value: str) -> bool:
    return bool(value) and value.isascii() and not _SPACE_OR_NUL.search(value)


def rcpt_params(env: Envelope) -> dict[str, str | None]:
    """DSN parameters passed on as received (RFC 3461 relay); dropped by the state machine
    when the next hop does not advertise DSN."""
    params: dict[str, str | None] = {}
    notify = notify_param(env.dsn_notify)
    if notify:
        params["NOTIFY"] = notify
    if env.dsn_orcpt:
        orcpt = env.dsn_orcpt if ";" in env.dsn_orcpt else f"rfc822;{env.dsn_orcpt}"
        if _param_value_ok(orcpt):
            params["ORCPT"] = orcpt
    return params


def mail_params(
    env: Envelope, body: bytes, addresses: Sequence[str], extensions: Extensions
) -> dict[str, str | None]:
    """MAIL FROM parameters: DSN RET/ENVID, SIZE, BODY=8BITMIME and SMTPUTF8 when needed."""
    params: dict[str, str | None] = {}
    if env.dsn_ret.upper() in ("FULL", "HDRS"):
        params["RET"] = env.dsn_ret.upper()
    if env.dsn_envid and _param_value_ok(env.dsn_envid):
        params["ENVID"] = env.dsn_envid
    params["SIZE"] = str(len(body))
    if not body.isascii():
        params["BODY"] = "8BITMIME"
    if extensions.smtputf8 and not all(address.isascii() for address in addresses):
        params["SMTPUTF8"] = None
    return params


def _valid_path(address: str) -> bool:
    return not _NOT_IN_PATH.search(address)


# --------------------------------------------------------------------------------------------
# One client session: an asyncio protocol


class HandshakeError(Exception):
    """Connecting, the greeting, EHLO, STARTTLS or AUTH failed: try the next host."""

    def __init__(self, reason: str, reply: Reply | None = None, *, tls_failed: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.tls_failed = tls_failed

    def __str__(self) -> str:
        return f"{self.reason}: {reply_line(self.reply)}" if self.reply else self.reason


@dataclass
class TransactionReport:
    """What one transaction gave. ``replies``: deciding reply per recipient index (missing:
    undecided, i.e. temporary). ``failure``: why the session broke, if it did."""

    replies: dict[int, Reply] = field(default_factory=dict)
    failure: str | None = None
    answered: bool = False  # the server replied to MAIL or a RCPT of this transaction
    body_sent: bool = False

    @property
    def untouched(self) -> bool:
        """Nothing of this transaction reached the server's decision: safe to try again."""
        return self.failure is not None and not self.answered and not self.body_sent


class ClientSession(asyncio.Protocol):
    """A ``ClientConnection`` on a socket, with a timeout on every wait for the server.

    The session is the socket's asyncio protocol: received bytes go straight into the state
    machine, and a coroutine only parks on a future when it has nothing to do but wait. The
    timeout is a deadline that each wait pushes forward, watched by one timer re-armed only
    when it fires: no timer object per read on the hot path of a kept session.
    """

    def __init__(self, config: ClientConfig, *, timeout: float, peer: str, relay: str = "") -> None:
        self._conn = ClientConnection(config)
        self._timeout = timeout
        self.peer = peer
        self.relay = relay or peer  # how trace lines name where this session goes
        self.mails = 0
        self.on_close: Callable[[], None] | None = None  # called once, when the session ends
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._over_ssl = False
        self._dead = False
        self._lost = False  # connection_lost() came
        self._lost_error: Exception | None = None
        self._write_paused = False
        self._waiter: asyncio.Future[None] | None = None  # a coroutine waiting for the server
        self._deadline = 0.0  # when that wait times out (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None  # close() waiting for connection_lost
        # Kept idle by RelayAgent's pool: until when (loop time), and the timer watching that.
        self.idle_until = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self._trace_tail = b""  # while tracing: the start of a reply line not complete yet
        # The relay agent's sessions log smtpd's `SID mta ...` lines (LMTP delivery's do not).
        self.sid: str | None = None
        self.end_reason = "closed"  # for `mta disconnected reason=`
        if tracing():
            self._conn.trace = []
            self.trace_debug(f"spawned for relay {self.relay}")

    def cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _mark_dead(self) -> None:
        if not self._dead:
            self._dead = True
            if self._conn.trace is not None:
                self.trace_debug("session done")
            if self.sid is not None:
                log.info(
                    "%s mta disconnected reason=%s messages=%d",
                    self.sid,
                    self.end_reason,
                    self.mails,
                )
            self.cancel_idle_timer()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.on_close is not None:
                self.on_close()

    @classmethod
    async def open_tcp(
        cls,
        host: str,
        port: int,
        config: ClientConfig,
        *,
        connect_timeout: float,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: str | None = None,
        relay: str = "",
    ) -> ClientSession:
        """Connects (and with ``ssl_context`` does the TLS handshake: smtps). Raises OSError
        or TimeoutError. ``relay``: the destination as trace lines name it."""
        session = cls(config, timeout=timeout, peer=f"{host}:{port}", relay=relay)
        async with asyncio.timeout(connect_timeout):
            await session._loop.create_connection(
                lambda: session,
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname if ssl_context is not None else None,
                local_addr=(local_address, 0) if local_address else None,
            )
        session._over_ssl = ssl_context is not None
        return session

    @classmethod
    async def open_unix(
        cls, path: str, config: ClientConfig, *, connect_timeout: float, timeout: float
    ) -> ClientSession:
        session = cls(config, timeout=timeout, peer=path)
        async with asyncio.timeout(connect_timeout):
            await session._loop.create_unix_connection(lambda: session, path)
        return session

    @property
    def extensions(self) -> Extensions:
        return self._conn.extensions

    @property
    def tls_ciphers(self) -> str | None:
        """``VERSION:CIPHER:BITS`` once TLS is on (the ``mta tls ciphers=`` log field)."""
        return ciphers_text(self._transport)

    @property
    def source(self) -> str:
        """The local address of the connection ("" when unknown)."""
        transport = self._transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        return str(name[0]) if isinstance(name, tuple) and name else ""

    @property
    def tls_active(self) -> bool:
        return self._conn.tls_active

    @property
    def consecutive_rcpt_failures(self) -> int:
        return self._conn.consecutive_rcpt_failures

    @property
    def usable(self) -> bool:
        """Can carry another transaction (as far as we can tell without asking)."""
        transport = self._transport
        return (
            not self._dead
            and not self._lost
            and transport is not None
            and not transport.is_closing()
            and self._conn.can_start_transaction
        )

    # ---- asyncio.Protocol: called by the transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn.trace is not None:
            self._trace_received(data)
        conn.receive_data(data)
        # What the replies call for (EHLO after the greeting, RSET after a refusal, QUIT)
        # goes out now, without waking the coroutine for it.
        out = conn.data_to_send()
        if out:
            assert self._transport is not None
            self._transport.write(out)
            if conn.trace:
                self._trace_sent(conn.trace)
        waiter = self._waiter
        if waiter is not None:
            if conn.has_events or conn.finished:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                # Part of a reply: the server is alive, so the wait starts again (as a read
                # with its own timeout would).
                self._deadline = self._loop.time() + self._timeout

    def eof_received(self) -> bool:
        self._conn.receive_data(b"")
        self._wake()
        # Plain TCP: stay half-open so that what close() still has to say can go out
        # (asyncio's streams do the same); TLS transports close on their own.
        return not self._over_ssl

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._lost_error = exc
        if exc is None:
            self._conn.receive_data(b"")  # a no-op after eof_received or once finished
        self._wake()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ---- tracing (``pigeon trace mta``): OpenSMTPD's ``mta: 0x...: >>> EHLO ...`` lines

    @property
    def traced(self) -> bool:
        """Its dialogue is being traced (``pigeon trace mta``)."""
        return self._conn.trace is not None

    def trace_debug(self, text: str) -> None:
        trace_log.debug("debug: mta: %#x: %s", id(self), text)

    def _follow_trace(self) -> None:
        """Starts or stops recording the dialogue as ``pigeon trace mta`` now says; looked at
        when a session, a transaction or the QUIT starts."""
        conn = self._conn
        if tracing():
            if conn.trace is None:
                conn.trace = []
        elif conn.trace is not None:
            conn.trace = None
            self._trace_tail = b""

    def _trace_sent(self, lines: list[str]) -> None:
        for line in lines:
            trace_log.debug("mta: %#x: >>> %s", id(self), line)
        lines.clear()

    def _trace_received(self, data: bytes) -> None:
        """Every reply line as it came (each line of a multiline reply on its own)."""
        lines = (self._trace_tail + data).split(b"\n")
        tail = lines.pop()
        self._trace_tail = tail[:_MAX_TRACED_LINE]
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            text = line[:_MAX_TRACED_LINE].decode("utf-8", "replace")
            trace_log.debug("mta: %#x: <<< %s", id(self), text)

    # ---- waiting

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until a protocol callback wakes us. Raises TimeoutError when the server stays
        silent for the timeout, OSError when the connection was lost with an error."""
        error = self._lost_error
        if error is not None:
            raise error if isinstance(error, OSError) else OSError(str(error))
        loop = self._loop
        self._deadline = loop.time() + self._timeout
        if self._timer is None:
            self._timer = loop.call_at(self._deadline, self._check_deadline)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._dead:
            return  # nobody waiting: the next wait arms the timer again
        remaining = self._deadline - self._loop.time()
        if remaining > 0.001:
            self._timer = self._loop.call_at(self._deadline, self._check_deadline)
        else:
            waiter.set_exception(TimeoutError())

    # ---- driving the state machine

    def _write(self) -> bool:
        """Hands the state machine's output to the transport; True when the caller must wait
        for the transport (its buffer is over the high-water mark, or the connection broke)."""
        conn = self._conn
        data = conn.data_to_send()
        if data:
            transport = self._transport
            assert transport is not None
            transport.write(data)  # sends at once what the socket takes
            if conn.trace:
                self._trace_sent(conn.trace)
        return self._write_paused or self._lost_error is not None

    async def _drain(self) -> None:
        while self._write_paused and not self._lost:
            await self._wait()
        if self._lost_error is not None:
            await self._wait()  # raises it

    async def _send(self) -> None:
        if self._write():
            await self._drain()

    def _broken(self, reason: str) -> SessionFailed:
        self.end_reason = reason
        self.abort()
        return SessionFailed(None, reason)

    async def next_event(self) -> Event:
        """The next event, reading as needed. Network trouble comes back as SessionFailed."""
        conn = self._conn
        while True:
            event = conn.next_event()
            if event is not None:
                return event
            if self._dead or conn.finished:
                return self._broken("session is over")
            try:
                if self._write():
                    await self._drain()
                if conn.has_events or conn.finished:
                    continue
                await self._wait()
            except TimeoutError:
                return self._broken(f"timeout after {self._timeout:g}s waiting for {self.peer}")
            except OSError as exc:  # includes ssl.SSLError
                return self._broken(f"connection error: {exc}")

    async def handshake(
        self, starttls: ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> Ready:
        """Greeting up to Ready (STARTTLS with ``starttls``, AUTH). Raises HandshakeError."""
        while True:
            event = await self.next_event()
            if isinstance(event, Ready):
                return event
            if isinstance(event, NeedStartTLS) and starttls is not None:
                await self._start_tls(starttls, server_hostname)
                continue
            if isinstance(event, SessionFailed):
                await self.close()
                raise HandshakeError(event.reason, event.reply)
            self.abort()
            raise HandshakeError(f"unexpected {type(event).__name__} during the handshake")

    async def _start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        transport = self._transport
        assert transport is not None
        try:
            async with asyncio.timeout(self._timeout):
                while self._write_paused and not self._lost:
                    await self._wait()
                tls_transport = await self._loop.start_tls(
                    transport, self, context, server_hostname=server_hostname
                )
        except (OSError, TimeoutError) as exc:
            self.abort()
            detail = str(exc) or type(exc).__name__
            raise HandshakeError(f"TLS handshake failed: {detail}", tls_failed=True) from None
        if tls_transport is None:  # the connection went away during the handshake
            self.abort()
            raise HandshakeError("TLS handshake failed: connection lost", tls_failed=True)
        self._transport = tls_transport
        self._over_ssl = True
        self._conn.tls_started()

    async def transact(self, txn: Transaction, body: bytes) -> TransactionReport:
        """One mail transaction; the session stays open (reuse it or ``quit``)."""
        report = TransactionReport()
        conn = self._conn
        if trace_log.level or conn.trace is not None:  # one look while tracing stays off
            self._follow_trace()
            if conn.trace is not None:
                self.trace_debug(f"handling next task for relay {self.relay}")
        conn.start_transaction(txn)
        while True:
            # Events already decoded need no trip through a coroutine.
            event = conn.next_event() or await self.next_event()
            kind = type(event)
            if kind is RecipientResult:
                assert isinstance(event, RecipientResult)
                report.answered = True
                if not 200 <= event.reply.code < 300:
                    report.replies[event.index] = event.reply
            elif kind is DataReady:
                conn.send_body(body)
                report.body_sent = True
            elif kind is DeliveryResult:
                assert isinstance(event, DeliveryResult)
                report.replies[event.index] = event.reply
            elif kind is TransactionResult:
                assert isinstance(event, TransactionResult)
                if event.stage == "eom":
                    self.mails += 1
                break
            elif isinstance(event, MailRejected) and event.reply.code == 421:
                # The server is closing the session (often a kept one it timed out): nothing
                # was decided, so the caller may try again on a fresh connection.
                self.abort()
                report.failure = f"server closed the session: {reply_line(event.reply)}"
                return report
            elif isinstance(event, MailRejected):
                report.answered = True
                for index in range(len(txn.recipients)):
                    report.replies.setdefault(index, event.reply)
                break
            elif isinstance(event, SessionFailed):
                self.abort()
                report.failure = (
                    f"{event.reason}: {reply_line(event.reply)}" if event.reply else event.reason
                )
                return report
            else:
                self.abort()
                report.failure = f"unexpected {type(event).__name__} during a transaction"
                return report
        try:
            await self._send()  # an RSET queued behind a refusal
        except (OSError, TimeoutError):
            self.abort()
        return report

    # ---- ending

    async def quit(self) -> None:
        """QUIT and close; never raises."""
        if self._dead or self._conn.finished:
            self.abort()
            return
        self._follow_trace()
        self.end_reason = "quit"
        try:
            self._conn.quit()
        except ClientProtocolError:
            self.abort()
            return
        try:
            async with asyncio.timeout(min(self._timeout, _QUIT_TIMEOUT)):
                while not isinstance(await self.next_event(), Closed | SessionFailed):
                    pass
        except TimeoutError:
            pass
        await self.close()

    async def close(self) -> None:
        """Sends what is pending (a polite QUIT after a failure) and closes."""
        if self._dead:
            return
        transport = self._transport
        self._mark_dead()
        if transport is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            data = self._conn.data_to_send()
            if data and not transport.is_closing():
                transport.write(data)
            if self._conn.trace:
                self._trace_sent(self._conn.trace)
        transport.close()
        if not self._lost:
            self._closed = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._closed

    def abort(self) -> None:
        """Drops the connection at once."""
        self._mark_dead()
        if self._transport is not None:
            self._transport.abort()


# --------------------------------------------------------------------------------------------
# The agent


@dataclass
class RelaySettings:
    """Agent-wide settings. ``mx_port``: the port of MX hosts (25; tests aim it at loopback).
    ``ca_file``: trust anchors for verified TLS (None: the system's)."""

    helo: str
    mx_port: int = 25
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    keepalive: float = 10.0
    max_mails_per_session: int = 100
    max_conn_per_host: int = 10
    max_failures_per_session: int = 25
    ca_file: str | None = None
    # ``mta limit for domain D ...``: D (lower case) -> its limits, replacing the defaults
    # above for mail to D (MX delivery: the recipient domain; smarthost: the relay's name).
    domain_limits: dict[str, DomainLimits] = field(default_factory=dict)

    def limits_for(self, domain: str) -> DomainLimits:
        found = self.domain_limits.get(domain.lower()) if self.domain_limits else None
        if found is not None:
            return found
        return DomainLimits(
            self.max_conn_per_host,
            self.max_mails_per_session,
            self.keepalive,
            self.max_failures_per_session,
        )


@dataclass(frozen=True)
class DomainLimits:
    """The session limits that apply to one destination domain."""

    max_conn_per_host: int = 10
    max_mails_per_session: int = 100
    keepalive: float = 10.0
    max_failures_per_session: int = 25


HOSTSTAT_WINDOW = 4 * 3600.0  # OpenSMTPD keeps a domain's last result this long


def _duration(seconds: float) -> str:
    """``4s``, ``3m``, ``2h``, ``1d`` as smtpctl prints ages and timeouts."""
    s = int(max(0.0, seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass
class _HostState:
    """One remote address, for ``show hosts``/``show routes``."""

    name: str
    route_id: int
    source: str | None
    refcount: int = 0  # deliveries using it now
    nconn: int = 0  # sessions open to it (busy or kept idle)
    nerror: int = 0  # failed connections in a row
    lastconn: float | None = None


@dataclass
class _RelayState:
    """One relay (a smarthost, or the MX set of a domain), for ``show relays``."""

    ntask: int = 0  # deliveries under way
    nconn: int = 0
    lastconn: float | None = None


@dataclass(frozen=True)
class _Target:
    name: str  # host name (for TLS verification, SNI and logs)
    address: str
    port: int
    lmtp: bool
    plan: TLSPlan

    def describe(self) -> str:
        return f"{self.name} [{self.address}]:{self.port}"


@dataclass
class _Job:
    """One deliver() call: what every destination of it shares."""

    route: RelayRoute
    sender: str
    body: bytes
    dsn_relayed: set[int] | None
    relay: str = ""  # the relay's name in ``show relays``
    domain: str = ""  # whose ``mta limit for domain`` applies


_PoolKey = tuple[Any, ...]


# The same few smarthosts and HELO names come with every message: work each out once.


class _Smarthost:
    """A smarthost URL with a route's ``tls`` option, parsed, and what follows from them."""

    def __init__(self, text: str, tls: RouteTLS) -> None:
        self.url = parse_relay_url(text)
        self.plan = tls_plan(self.url.scheme, tls)
        self.relay_name = _relay_name(self.url, self.plan)
        self.domain = self.url.host.lower()
        self.literal = _literal_address(self.url.host)  # None: a name to resolve
        self._targets: dict[tuple[str, ...], tuple[_Target, ...]] = {}

    def targets(self, addresses: Sequence[str]) -> tuple[_Target, ...]:
        key = tuple(addresses)
        found = self._targets.get(key)
        if found is None:
            if len(self._targets) >= 16:  # names whose addresses change: stay bounded
                self._targets.clear()
            url = self.url
            lmtp = url.scheme == "lmtp"
            found = tuple(_Target(url.host, a, url.port, lmtp, self.plan) for a in key)
            self._targets[key] = found
        return found


@functools.lru_cache(maxsize=64)
def _smarthost(text: str, tls: RouteTLS) -> _Smarthost:
    """Raises ValueError (not cached: raised again on every call)."""
    return _Smarthost(text, tls)


@functools.lru_cache(maxsize=64)
def _check_helo(helo: str) -> None:
    """Raises ValueError for a name ``ClientConfig`` refuses (not cached: raised again)."""
    ClientConfig(helo=helo)


@functools.lru_cache(maxsize=64)
def _literal_address(host: str) -> tuple[str, ...] | None:
    """A smarthost given as an address: itself, without asking the resolver (and without
    parsing it again for every message). None for a name."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        return None


class _Limiter:
    """A FIFO counting semaphore, cheaper than ``asyncio.Semaphore`` where it matters here: a
    free slot is taken without a coroutine (asyncio's also checks its waiters with a generator).
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        """Takes a slot if one is free and nobody queues for it."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # give_back hands its slot over: _free is not incremented meanwhile
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # handed a slot, but cancelled before taking it: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class _LimiterPair:
    """A domain's own limit and the address's: both held, taken in that order."""

    def __init__(self, first: _Limiter, second: _Limiter) -> None:
        self._first = first
        self._second = second

    def take_now(self) -> bool:
        return False  # rare: the waiting path does for it

    async def take(self) -> None:
        await self._first.take()
        try:
            await self._second.take()
        except BaseException:
            self._first.give_back()
            raise

    def give_back(self) -> None:
        self._second.give_back()
        self._first.give_back()


def _scheme_text(plan: TLSPlan, lmtp: bool) -> str:
    if lmtp:
        return "lmtp"
    return {"smtps": "smtps", "starttls": "smtp+tls", "none": "smtp+notls"}.get(plan.mode, "smtp")


def _relay_name(url: RelayURL, plan: TLSPlan) -> str:
    """A smarthost as smtpctl's ``show relays`` names it: ``[relay:HOST,port=N,SCHEME]``."""
    return f"[relay:{url.host},port={url.port},{_scheme_text(plan, url.scheme == 'lmtp')}]"


def _every(envelopes: Sequence[Envelope], outcome: Outcome) -> dict[int, Outcome]:
    return {env.evpid: outcome for env in envelopes}


def _outcome_for_error(err: SMTPError) -> Outcome:
    return Outcome.tempfail(err.line()) if err.temporary else Outcome.permfail(err.line())


class RelayAgent:
    def __init__(self, settings: RelaySettings, resolver: MXResolver) -> None:
        self.settings = settings
        self._resolver = resolver
        self._idle: dict[_PoolKey, list[ClientSession]] = {}  # kept sessions, newest last
        self._limits: dict[tuple[str | int, ...], _Limiter] = {}
        self._contexts: dict[tuple[bool, tuple[str, str] | None], ssl.SSLContext] = {}
        self._background: set[asyncio.Task[None]] = set()
        # What the queue views show (smtpctl show hosts/relays/routes/hoststats).
        self._hosts: dict[tuple[str, int], _HostState] = {}
        self._relays: dict[str, _RelayState] = {}
        self._hoststats: dict[str, tuple[float, str]] = {}  # domain -> (when, last result)
        self._route_ids = 0

    # ---- public

    async def deliver(
        self,
        route: RelayRoute,
        envelopes: Sequence[Envelope],
        body: bytes,
        *,
        sender: str | None = None,
        dsn_relayed: set[int] | None = None,
    ) -> dict[int, Outcome]:
        """Delivers one message to the envelopes' destinations. ``sender`` overrides the
        envelope sender (e.g. SRS), else ``route.mail_from`` does, else the envelopes' own.

        ``dsn_relayed``, if given, receives the evpids delivered to a next hop that advertised
        DSN: their NOTIFY went on with them, so no local "relayed" notice is due (RFC 3461 6.2).
        """
        if not envelopes:
            return {}
        if sender is None:
            sender = route.mail_from if route.mail_from is not None else envelopes[0].sender
        if not _valid_path(sender):
            return _every(envelopes, Outcome.permfail(f"invalid sender address: {sender!r}"))
        try:
            _check_helo(route.helo or self.settings.helo)  # before anything is resolved
            if route.smarthost is not None:
                smarthost: _Smarthost | None = _smarthost(route.smarthost, route.tls)
            else:
                smarthost = None
                plan = tls_plan(None, route.tls)
        except ValueError as exc:
            return _every(envelopes, Outcome.tempfail(f"relay configuration error: {exc}"))
        if smarthost is not None:
            job = _Job(route, sender, body, dsn_relayed, smarthost.relay_name, smarthost.domain)
            merged = await self._deliver_smarthost(smarthost, job, envelopes)
        else:
            by_domain: dict[str, list[Envelope]] = {}
            for env in envelopes:
                by_domain.setdefault(env.dest.rpartition("@")[2].lower(), []).append(env)
            work = [
                self._deliver_domain(
                    domain,
                    plan,
                    _Job(route, sender, body, dsn_relayed, self._mx_relay_name(domain), domain),
                    group,
                )
                for domain, group in by_domain.items()
            ]
            if len(work) == 1:
                merged = await work[0]
            else:
                merged = {}
                for result in await asyncio.gather(*work):
                    merged.update(result)
        self._note_results(envelopes, merged)
        return merged

    def reconfigure(self, settings: RelaySettings) -> None:
        """New settings (a reload). Kept sessions were opened under the old ones (helo,
        TLS, auth, keepalive): they end now, and the next delivery opens one under the new
        settings. Connection limits apply anew from the next delivery; transactions under
        way finish as they started; what the views show stays."""
        self.settings = settings
        self._limits.clear()
        idle = [session for sessions in self._idle.values() for session in sessions]
        self._idle.clear()
        for session in idle:
            session.cancel_idle_timer()
            self._spawn(session.quit())

    async def close(self) -> None:
        """Ends every kept session (QUIT) and waits for the closings under way."""
        idle = [session for sessions in self._idle.values() for session in sessions]
        self._idle.clear()
        for session in idle:
            session.cancel_idle_timer()
        await asyncio.gather(*(session.quit() for session in idle))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    @property
    def idle_sessions(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    # ---- what the queue views show (smtpctl show hosts, relays, routes, hoststats)

    def show(self, view: str, now: float | None = None) -> list[str]:
        """The lines of ``show hosts``/``relays``/``routes``/``hoststats``, in smtpctl's
        formats (OpenSMTPD's mta.c); only what this agent actually tracks is filled in."""
        now = time.time() if now is None else now

        def age(when: float | None) -> str:
            return "-" if when is None else _duration(now - when)

        if view == "hosts":
            return [
                f"{address} {host.name} refcount={host.refcount + host.nconn} "
                f"nconn={host.nconn} lastconn={age(host.lastconn)}"
                for (address, _port), host in sorted(self._hosts.items())
            ]
        if view == "relays":
            return [
                f"{name} refcount={relay.ntask + relay.nconn} ntask={relay.ntask} "
                f"nconn={relay.nconn} lastconn={age(relay.lastconn)}"
                for name, relay in sorted(self._relays.items())
            ]
        if view == "routes":
            idle = {key[:2] for key, entries in self._idle.items() if entries}
            lines = []
            for (address, port), host in sorted(self._hosts.items(), key=lambda i: i[1].route_id):
                flags = (
                    ("D" if host.nerror else "-")
                    + ("N" if host.lastconn is None else "-")
                    + ("Q" if host.refcount else "-")
                    + ("K" if (address, port) in idle else "-")
                )
                lines.append(
                    f"{host.route_id}. [{host.source or ''}] <-> {address} ({host.name}) "
                    f"{flags} nconn={host.nconn} nerror={host.nerror} penalty=0 timeout=-"
                )
            return lines
        if view == "hoststats":
            self._expire_hoststats(now)
            return [
                f"{domain}|{int(when)}|{line}"
                for domain, (when, line) in sorted(self._hoststats.items())
            ]
        raise ValueError(f"unknown view: {view}")

    def _expire_hoststats(self, now: float) -> None:
        old = [d for d, (when, _) in self._hoststats.items() if now - when > HOSTSTAT_WINDOW]
        for domain in old:
            del self._hoststats[domain]

    def _note_results(self, envelopes: Sequence[Envelope], outcomes: dict[int, Outcome]) -> None:
        """The last result per recipient domain (``show hoststats``)."""
        now = time.time()
        for env in envelopes:
            outcome = outcomes.get(env.evpid)
            if outcome is not None:
                self._hoststats[env.dest.rpartition("@")[2].lower()] = (now, outcome.line)
        if len(self._hoststats) > 10000:  # bounded whatever the recipients' domains
            self._expire_hoststats(now)

    def _host(self, target: _Target, route: RelayRoute) -> _HostState:
        key = (target.address, target.port)
        host = self._hosts.get(key)
        if host is None:
            if len(self._hosts) >= 1000:  # forget unused hosts rather than grow for ever
                for old, state in list(self._hosts.items()):
                    if not state.refcount and not state.nconn:
                        del self._hosts[old]
            self._route_ids += 1
            host = self._hosts[key] = _HostState(target.name, self._route_ids, route.source)
        return host

    def _mx_relay_name(self, domain: str) -> str:
        port = "" if self.settings.mx_port == 25 else f",port={self.settings.mx_port}"
        return f"[relay:{domain}{port},mx]"

    # ---- destinations

    async def _deliver_domain(
        self,
        domain: str,
        plan: TLSPlan,
        job: _Job,
        envelopes: Sequence[Envelope],
    ) -> dict[int, Outcome]:
        try:
            hosts = await self._resolver.mx_hosts(domain)
        except SMTPError as err:
            log.info("mta: %s: %s", domain, err.line())
            return _every(envelopes, _outcome_for_error(err))
        if job.route.backup:
            hosts = self._better_than_us(hosts, job.route.backup_mx or self.settings.helo)
            if not hosts:
                return _every(
                    envelopes, Outcome.tempfail("No MX better than this backup MX for domain")
                )
        targets = [
            _Target(host.name, address, self.settings.mx_port, False, plan)
            for host in hosts
            for address in host.addresses
        ]
        return await self._deliver_targets(targets, job, envelopes)

    @staticmethod
    def _better_than_us(hosts: list[MXHost], our_name: str) -> list[MXHost]:
        """As a backup MX only MXs strictly preferred to our own entry are used."""
        ours = [h.preference for h in hosts if h.name.lower() == our_name.rstrip(".").lower()]
        if not ours:
            return hosts
        return [host for host in hosts if host.preference < min(ours)]

    async def _deliver_smarthost(
        self,
        smarthost: _Smarthost,
        job: _Job,
        envelopes: Sequence[Envelope],
    ) -> dict[int, Outcome]:
        url = smarthost.url
        try:
            addresses = smarthost.literal or await self._resolver.addresses(url.host)
        except SMTPError as err:
            return _every(envelopes, Outcome.tempfail(f"relay host {url.host}: {err.text}"))
        if not addresses:
            return _every(envelopes, Outcome.tempfail(f"relay host {url.host} has no address"))
        return await self._deliver_targets(smarthost.targets(addresses), job, envelopes)

    async def _deliver_targets(
        self,
        targets: Sequence[_Target],
        job: _Job,
        envelopes: Sequence[Envelope],
    ) -> dict[int, Outcome]:
        errors: list[str] = []
        relay = self._relays.get(job.relay)
        if relay is None:
            relay = self._relays[job.relay] = _RelayState()
        relay.ntask += 1
        try:
            for target in targets[:_MAX_ADDRESSES]:
                host = self._host(target, job.route)
                host.refcount += 1
                try:
                    limit = self._limit(target, job)
                    if not limit.take_now():
                        await limit.take()
                    try:
                        result = await self._deliver_via(target, job, envelopes, errors)
                    finally:
                        limit.give_back()
                finally:
                    host.refcount -= 1
                if result is not None:
                    return result
        finally:
            relay.ntask -= 1
        detail = f" ({errors[-1]})" if errors else ""
        return _every(envelopes, Outcome.tempfail(f"Network error on destination MXs{detail}"))

    def _limit(self, target: _Target, job: _Job) -> _Limiter | _LimiterPair:
        """At most ``max-conn-per-host`` transactions at once per address and port; a
        domain with its own limit is also held to that (OpenSMTPD: the relay's limits)."""
        key: tuple[str | int, ...] = (target.address, target.port)
        limit = self._limits.get(key)
        if limit is None:
            limit = self._limits[key] = _Limiter(self.settings.max_conn_per_host)
        own = self.settings.domain_limits.get(job.domain) if self.settings.domain_limits else None
        if own is None:
            return limit
        domain_key = (job.domain, *key)
        domain_limit = self._limits.get(domain_key)
        if domain_limit is None:
            domain_limit = self._limits[domain_key] = _Limiter(own.max_conn_per_host)
        return _LimiterPair(domain_limit, limit)

    async def _deliver_via(
        self,
        target: _Target,
        job: _Job,
        envelopes: Sequence[Envelope],
        errors: list[str],
    ) -> dict[int, Outcome] | None:
        """One host: the outcomes, or None (and the reason in ``errors``) to try the next."""
        key = self._pool_key(target, job.route)
        session = self._take_idle(key)
        reused = session is not None
        for _ in range(2):  # a kept session the server dropped meanwhile: once more, fresh
            if session is None:
                try:
                    session = await self._connect(target, job.route, job)
                except HandshakeError as exc:  # logged as `SID mta error reason=...`
                    log.debug("mta: %s: %s", target.describe(), exc)
                    errors.append(f"{target.describe()}: {exc}")
                    return None
            outcomes, report = await self._transact(session, job, envelopes)
            if report.untouched and reused:
                log.debug("mta: kept session to %s was lost, reconnecting", target.describe())
                session, reused = None, False
                continue
            if session.sid is not None:
                outcomes = self._log_outcomes(session, target, envelopes, outcomes)
            settings = self.settings
            own = settings.domain_limits.get(job.domain) if settings.domain_limits else None
            # Without limits of its own the settings serve as they are (no object per call).
            self._after_transaction(key, session, report, settings if own is None else own)
            return outcomes
        return None  # unreachable: the second round always returns

    @staticmethod
    def _log_outcomes(
        session: ClientSession,
        target: _Target,
        envelopes: Sequence[Envelope],
        outcomes: dict[int, Outcome],
    ) -> dict[int, Outcome]:
        """smtpd's ``mta delivery`` lines, under the session's id with its source and relay;
        the outcomes come back marked as logged (whoever records them must not log again)."""
        now = time.time()
        source = session.source
        relay = f"{target.address} ({target.name})"
        logged: dict[int, Outcome] = {}
        for env in envelopes:
            outcome = outcomes.get(env.evpid)
            if outcome is None:
                continue
            log_delivery(
                env,
                outcome.status,
                outcome.line,
                now,
                session=session.sid,
                source=source,
                relay=relay,
            )
            logged[env.evpid] = Outcome(outcome.status, outcome.line, True)
        return logged

    def _after_transaction(
        self,
        key: _PoolKey,
        session: ClientSession,
        report: TransactionReport,
        limits: DomainLimits | RelaySettings,
    ) -> None:
        if (
            report.failure is None
            and session.usable
            and session.mails < limits.max_mails_per_session
            and session.consecutive_rcpt_failures < limits.max_failures_per_session
            and limits.keepalive > 0
        ):
            self._put_idle(key, session, limits.keepalive)
        else:
            self._spawn(session.quit())

    async def _transact(
        self, session: ClientSession, job: _Job, envelopes: Sequence[Envelope]
    ) -> tuple[dict[int, Outcome], TransactionReport]:
        outcomes: dict[int, Outcome] = {}
        sendable = []
        for env in envelopes:
            if _valid_path(env.dest):
                sendable.append(env)
            else:
                outcomes[env.evpid] = Outcome.permfail(f"invalid recipient address: {env.dest!r}")
        if not sendable:
            return outcomes, TransactionReport()
        extensions = session.extensions
        # Only SMTPUTF8 needs them: mail_params looks at the addresses only then.
        addresses = [job.sender, *(env.dest for env in sendable)] if extensions.smtputf8 else []
        txn = Transaction(
            sender=job.sender,
            recipients=[RecipientSpec(env.dest, rcpt_params(env)) for env in sendable],
            mail_params=mail_params(sendable[0], job.body, addresses, extensions),
        )
        report = await session.transact(txn, job.body)
        replies = report.replies
        undecided: Outcome | None = None
        relayed = job.dsn_relayed if session.extensions.dsn else None
        for index, env in enumerate(sendable):
            reply = replies.get(index)
            if reply is not None:
                outcome = outcome_for(reply)
            else:
                if undecided is None:
                    undecided = Outcome.tempfail(report.failure or "no reply for this recipient")
                outcome = undecided
            outcomes[env.evpid] = outcome
            if relayed is not None and outcome.status == "ok":
                relayed.add(env.evpid)
        return outcomes, report

    # ---- sessions

    def _pool_key(self, target: _Target, route: RelayRoute) -> _PoolKey:
        return (
            target.address,
            target.port,
            target.name.lower(),
            target.lmtp,
            target.plan.mode,  # not the plan itself: a dataclass hashes in Python, slowly
            target.plan.verify,
            route.auth,
            route.helo or self.settings.helo,
            route.source,
            route.client_cert,
        )

    async def _connect(self, target: _Target, route: RelayRoute, job: _Job) -> ClientSession:
        host = self._host(target, route)
        relay = self._relays.setdefault(job.relay, _RelayState())
        host.lastconn = relay.lastconn = time.time()
        try:
            session = await self._connect_once(target, route, job.relay)
        except HandshakeError:
            host.nerror += 1
            raise
        host.nerror = 0
        host.nconn += 1
        relay.nconn += 1

        def closed() -> None:
            host.nconn -= 1
            relay.nconn -= 1

        session.on_close = closed
        return session

    async def _connect_once(self, target: _Target, route: RelayRoute, relay: str) -> ClientSession:
        plan = target.plan
        starttls = plan.mode in ("opportunistic", "starttls")
        try:
            return await self._open(target, route, starttls, relay)
        except HandshakeError as exc:
            if not (exc.tls_failed and plan.mode == "opportunistic"):
                raise
            log.info(
                "mta: %s: opportunistic TLS failed, downgrading to plain (%s)",
                target.describe(),
                exc,
            )
        return await self._open(target, route, False, relay)

    async def _open(
        self, target: _Target, route: RelayRoute, starttls: bool, relay: str
    ) -> ClientSession:
        plan = target.plan
        config = ClientConfig(
            helo=route.helo or self.settings.helo,
            lmtp=target.lmtp,
            want_starttls=starttls,
            require_tls=plan.mode == "starttls",
            implicit_tls=plan.mode == "smtps",
            auth=None if target.lmtp else route.auth,
        )
        context = self._tls_context(plan.verify, route.client_cert) if plan.mode != "none" else None
        scheme = (
            "lmtp"
            if target.lmtp
            else {"smtps": "smtps", "starttls": "smtp+tls"}.get(plan.mode, "smtp")
        )
        # smtpd's mta session id: its connecting, connected, delivery, error and disconnected
        # lines share it. A log correlation id, it needs no cryptographic strength.
        sid = f"{random.getrandbits(64):016x}"
        log.info(
            "%s mta connecting address=%s://%s:%d host=%s",
            sid,
            scheme,
            target.address,
            target.port,
            target.name,
        )
        try:
            session = await self._open_socket(target, config, context, plan.mode, route, relay)
            ready = await session.handshake(context if starttls else None, target.name)
        except HandshakeError as exc:
            log.info("%s mta error reason=%s", sid, exc)
            raise
        session.sid = sid
        if session.traced:  # links the trace's id to the log lines' one
            session.trace_debug(f"session {sid}")
        log.info(
            "%s mta connected address=%s:%d tls=%s esmtp=%s",
            sid,
            target.address,
            target.port,
            "yes" if ready.tls else "no",
            "yes" if ready.esmtp else "no",
        )
        ciphers = session.tls_ciphers if ready.tls else None
        if ciphers is not None:
            log.info("%s mta tls ciphers=%s", sid, ciphers)
        return session

    async def _open_socket(
        self,
        target: _Target,
        config: ClientConfig,
        context: ssl.SSLContext | None,
        mode: str,
        route: RelayRoute,
        relay: str,
    ) -> ClientSession:
        try:
            return await ClientSession.open_tcp(
                target.address,
                target.port,
                config,
                connect_timeout=self.settings.connect_timeout,
                timeout=self.settings.command_timeout,
                ssl_context=context if mode == "smtps" else None,
                server_hostname=target.name,
                local_address=route.source,
                relay=relay,
            )
        except TimeoutError:
            raise HandshakeError(
                f"connection timed out after {self.settings.connect_timeout:g}s",
                tls_failed=False,
            ) from None
        except ssl.SSLError as exc:
            raise HandshakeError(f"TLS handshake failed: {exc}") from None
        except OSError as exc:
            raise HandshakeError(f"connection failed: {exc.strerror or exc}") from None

    def _tls_context(self, verify: bool, client_cert: tuple[str, str] | None) -> ssl.SSLContext:
        key = (verify, client_cert)
        context = self._contexts.get(key)
        if context is None:
            if verify:
                context = ssl.create_default_context(cafile=self.settings.ca_file)
            else:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if client_cert is not None:
                context.load_cert_chain(*client_cert)
            self._contexts[key] = context
        return context

    def _take_idle(self, key: _PoolKey) -> ClientSession | None:
        sessions = self._idle.get(key)
        while sessions:
            session = sessions.pop()
            # Its keepalive timer stays armed: it finds the session busy and lets go, and
            # a session back in the pool before then needs no new timer (see _expire).
            if session.usable:
                return session
            session.abort()
        self._idle.pop(key, None)
        return None

    def _put_idle(self, key: _PoolKey, session: ClientSession, keepalive: float) -> None:
        loop = asyncio.get_running_loop()
        session.idle_until = loop.time() + keepalive
        if session.idle_timer is None:
            session.idle_timer = loop.call_at(session.idle_until, self._expire, key, session)
        sessions = self._idle.get(key)
        if sessions is None:
            self._idle[key] = [session]
        else:
            sessions.append(session)

    def _expire(self, key: _PoolKey, session: ClientSession) -> None:
        session.idle_timer = None
        sessions = self._idle.get(key)
        if sessions is None or session not in sessions:
            return  # carrying a transaction: _put_idle arms a timer again
        loop = asyncio.get_running_loop()
        if session.idle_until - loop.time() > 0.001:  # used again since the timer was set
            session.idle_timer = loop.call_at(session.idle_until, self._expire, key, session)
            return
        sessions.remove(session)
        if not sessions:
            del self._idle[key]
        self._spawn(session.quit())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
