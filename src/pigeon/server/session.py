"""One SMTP session: moves bytes between a socket and the pure protocol machine.

Built on ``asyncio.Protocol`` rather than streams so an idle connection costs no task and
little memory (the 5,000-idle-connections target). Whenever the machine hands out an event
that needs I/O (recipient expansion, the queue commit, STARTTLS), one task runs until the
machine has nothing more to say; reading is paused meanwhile so a pipelining client cannot
make us buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from pigeon import metrics
from pigeon.errors import SMTPError
from pigeon.filters.smtp import FilterConnect, SessionFilters
from pigeon.protocol import server as proto
from pigeon.protocol.replies import Reply
from pigeon.queue.envelope import (
    FLAG_AUTHENTICATED,
    FLAG_INTERNAL,
    Envelope,
    evpid_hex,
    msgid_hex,
    new_evpid,
    parse_dsn_notify,
)
from pigeon.queue.journal import QueueError
from pigeon.rules.ruleset import MatchContext
from pigeon.server.auth import SENDER_REJECTED, SENDER_TEMPFAIL, masquerade_from, sender_allowed
from pigeon.server.localaddr import is_local
from pigeon.server.received import ReceivedInfo, received_header
from pigeon.server.tls import ciphers_text
from pigeon.srs import SRS_REJECT_REPLY, SRSError
from pigeon.tables.base import TableError

if TYPE_CHECKING:
    from pigeon.server.listener import ListenerRuntime
    from pigeon.server.services import Services

log = logging.getLogger("pigeon.smtp")

MAX_HOPS = 100


@dataclass
class Transaction:
    msgid: int
    sender: str
    mail_params: dict[str, str | None]
    envelopes: list[Envelope] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


def new_session_id() -> str:
    return secrets.token_hex(8)


def _header_lines(body: bytes) -> Iterator[bytes]:
    """The lines of the header section, up to the first empty line (the body, which may
    be megabytes, is not split)."""
    start = 0
    while start < len(body):
        end = body.find(b"\r\n", start)
        if end < 0:
            end = len(body)
        if end == start:
            return
        yield body[start:end]
        start = end + 2


def _count_received(body: bytes) -> int:
    return sum(1 for line in _header_lines(body) if line[:9].lower() == b"received:")


def _has_header(body: bytes, name: bytes) -> bool:
    prefix = name.lower() + b":"
    return any(line[: len(prefix)].lower() == prefix for line in _header_lines(body))


def _header_first(chunks: list[bytes]) -> list[bytes]:
    """The message's chunks with the first one holding the whole header section (the
    chunks up to the one where it ends, joined): what looks at headers gets one bytes
    object, and the body is not copied."""
    tail = b""
    for i, chunk in enumerate(chunks):
        window = tail + chunk[:3]
        at_start = i == 0 and chunk.startswith(b"\r\n")  # no header at all
        if at_start or b"\r\n\r\n" in window or b"\r\n\r\n" in chunk:
            return [b"".join(chunks[: i + 1]), *chunks[i + 1 :]] if i else list(chunks)
        tail = (tail + chunk)[-3:]
    return [b"".join(chunks)]


def _masquerade(body: bytes, sender: str) -> bytes:
    """Replace the addresses of the (possibly folded) ``From:`` header by the sender."""
    end = body.find(b"\r\n\r\n")
    head = body if end < 0 else body[: end + 2]
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:5].lower() != b"from:":
            continue
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
            j += 1
        value = b"\r\n".join(lines[i:j])[5:].decode("utf-8", "surrogateescape")
        new = masquerade_from(value, sender).encode("utf-8", "surrogateescape")
        lines[i:j] = (b"From:" + new).split(b"\r\n")
        break
    return b"\r\n".join(lines) + (body[end + 2 :] if end >= 0 else b"")


class SMTPSession(asyncio.Protocol):
    def __init__(self, services: Services, listener: ListenerRuntime) -> None:
        self.services = services
        self.listener = listener
        self.id = new_session_id()
        self.transport: asyncio.Transport | None = None
        self.conn: proto.ServerConnection | None = None
        self.peer_ip = ""
        self.rdns = "localhost"
        self.local = False
        self.helo = ""
        self.esmtp = False
        self.auth_user: str | None = None
        self.tls_info: str | None = None
        self.txn: Transaction | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        self.closed = False
        # The disconnected line's reason, as smtpd's: quit (the session ended in the
        # protocol, QUIT or a closing 421), disconnect (the client went away), timeout,
        # io-error, tls-error.
        self.end_reason: str | None = None
        self.messages = 0
        self.filters: SessionFilters | None = None  # set when the listener has a filter chain

    # ------------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: trust the interface.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0])
            self.local = is_local(self.peer_ip)
        elif self.listener.socket:
            self.peer_ip = ""
            self.local = True
        self.rdns = "localhost" if self.local or not self.peer_ip else self.peer_ip
        self.services.sessions.add(self)
        self.services.stats.incr("smtp.session")
        family = "local" if not self.peer_ip else ("inet6" if ":" in self.peer_ip else "inet4")
        self.services.stats.incr(f"smtp.session.{family}")  # smtpctl's per-family totals
        metrics.count("smtp_sessions")
        host = self.peer_ip or "local"
        log.info("%s smtp connected address=%s host=%s", self.id, host, self.rdns)
        if self.services.smtp_paused:
            transport.write(Reply(421, "Service temporarily unavailable", "4.3.0").to_bytes())
            self.end_reason = "quit"
            transport.close()
            return
        if len(self.services.sessions) > self.services.max_sessions:
            transport.write(Reply(421, "Too many connections", "4.7.0").to_bytes())
            self.end_reason = "quit"
            transport.close()
            return
        self.conn = proto.ServerConnection(
            self.listener.server_config(tls_active=self.listener.smtps),
            tls_active=self.listener.smtps,
            peer=self.peer_ip or "local",
        )
        if self.listener.smtps:
            self.tls_info = self._tls_description()
            self._log_tls()
        if self.listener.filter_chain is not None:
            # The connect phase decides the banner: greet from a task (reading paused).
            self.filters = SessionFilters(self, self.listener.filter_chain)
            transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(self._run(FilterConnect()))
            return
        self.conn.greeting()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.conn is None:
            return
        self.conn.receive_data(data)
        if self.task is None:
            self._process()

    def eof_received(self) -> bool | None:
        if self.conn is not None:
            self.conn.receive_data(b"")
            if self.task is None:
                self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.services.sessions.discard(self)
        if self.task is not None:
            self.task.cancel()
        self._abort_transaction()
        if self.filters is not None:
            self.filters.close()
        reason = self.end_reason or ("disconnect" if exc is None else "io-error")
        log.info("%s smtp disconnected reason=%s", self.id, reason)

    def timeout(self) -> None:
        """Called by the daemon's sweeper when the session sat idle too long."""
        if self.filters is not None:
            self.filters.timeout()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(Reply(421, "Session timed out", "4.4.2").to_bytes())
            self.end_reason = "timeout"
            self.transport.close()

    # ------------------------------------------------------------------ event loop

    def _flush(self) -> None:
        if self.conn is None or self.transport is None:
            return
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)
            if self.filters is not None:
                self.filters.server_output(out)
        if self.conn.closed and not self.transport.is_closing():
            self.end_reason = self.end_reason or "quit"
            self.transport.close()

    def _process(self) -> None:
        """Handle events that need no I/O inline; hand the first one that does to a task."""
        conn = self.conn
        if conn is None:
            return
        while True:
            event = conn.next_event()
            if event is None:
                break
            if self._handle_sync(event):
                continue
            # Needs I/O: stop reading until the task has answered it.
            if self.transport is not None:
                self.transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(self._run(event))
            break
        self._flush()

    async def _run(self, event: object) -> None:
        try:
            await self._handle_async(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s smtp internal error", self.id)
            if self.conn is not None and self.conn.awaiting_answer is not None:
                self.conn.reject(Reply(421, "Temporary failure", "4.3.0"))
                self._abort_transaction()
        finally:
            self.task = None
        if self.closed:
            return
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()
        self._process()

    def _handle_sync(self, event: object) -> bool:
        conn = self.conn
        assert conn is not None
        if self.filters is not None and not self.filters.observe(event):
            return False  # filters are asked first, from a task
        if isinstance(event, proto.Helo):
            self.helo = event.name
            self.esmtp = event.extended
            conn.accept()
        elif isinstance(event, proto.MailFrom):
            if self.listener.senders is not None and self.auth_user is not None:
                return False  # the senders table is asked first
            self._mail_from(event)
        elif isinstance(event, proto.DataBegin):
            conn.accept()
        elif isinstance(event, proto.DataChunk):
            txn = self.txn
            if txn is not None:
                txn.chunks.append(event.data)
                txn.size += len(event.data)
        elif isinstance(event, proto.MessageRejected):
            self._log_failed("DATA", event.reply)
            self._abort_transaction()
        elif isinstance(event, (proto.Reset, proto.Quit)):
            self._abort_transaction()
        elif isinstance(event, proto.CommandRejected):
            self._log_failed(event.line, event.reply)
        elif isinstance(event, proto.ConnectionLost):
            self.end_reason = self.end_reason or "disconnect"
            self._abort_transaction()
            if self.transport is not None:
                self.transport.close()
        else:
            return False
        return True

    async def _handle_async(self, event: object) -> None:
        if self.filters is not None:
            await self.filters.handle(event)  # the filter phase, then _dispatch_async
            return
        await self._dispatch_async(event)

    async def _dispatch_async(self, event: object) -> None:
        conn = self.conn
        assert conn is not None
        if isinstance(event, proto.MailFrom):
            await self._check_sender(event)
        elif isinstance(event, proto.RcptTo):
            await self._rcpt_to(event)
        elif isinstance(event, proto.MessageEnd):
            await self._message_end()
        elif isinstance(event, proto.StartTLS):
            await self._starttls()
        elif isinstance(event, proto.AuthCredentials):
            await self._auth(event)
        else:  # an event this session does not know: refuse rather than hang
            conn.reject(Reply(502, "Command not implemented", "5.5.1"))

    # ------------------------------------------------------------------ commands

    def _mail_from(self, event: proto.MailFrom) -> None:
        conn = self.conn
        assert conn is not None
        self._abort_transaction()
        msgid = self.services.store.reserve_msgid()
        self.txn = Transaction(msgid=msgid, sender=event.address, mail_params=event.params)
        metrics.count("smtp_transactions")
        conn.accept(Reply(250, "Ok", "2.0.0"))

    async def _check_sender(self, event: proto.MailFrom) -> None:
        """``senders <table>``: an authenticated user may only use the addresses it maps to."""
        conn = self.conn
        lookup = self.listener.senders
        assert conn is not None and lookup is not None and self.auth_user is not None
        try:
            allowed = await sender_allowed(
                self.auth_user, event.address, lookup, self.services.config.smtp.sub_addr_delim
            )
        except TableError:
            conn.reject(SENDER_TEMPFAIL)
            return
        if not allowed:
            conn.reject(SENDER_REJECTED)
            self._log_failed(f"MAIL FROM:<{event.address}>", SENDER_REJECTED)
            return
        self._mail_from(event)

    def _match_context(self, rcpt: str) -> MatchContext:
        txn = self.txn
        return MatchContext(
            local=self.local,
            socket=self.listener.socket,
            src_ip=self.peer_ip,
            rdns=self.rdns,
            helo=self.helo,
            auth_user=self.auth_user,
            tls=self.tls_info is not None,
            tag=self.listener.tag,
            mail_from=txn.sender if txn else "",
            rcpt_to=rcpt,
        )

    async def _rcpt_to(self, event: proto.RcptTo) -> None:
        conn = self.conn
        txn = self.txn
        assert conn is not None
        if txn is None:
            conn.reject(Reply(503, "Invalid command: Command not allowed at this point.", "5.5.1"))
            return
        route_to = event.address
        srs = self.services.srs
        if srs is not None:
            # A bounce to an address we rewrote goes back to the original sender; a forged
            # or expired one is refused here instead of falling through to the rules.
            try:
                decoded = srs.decode_bounce_rcpt(txn.sender, event.address, now=int(time.time()))
            except SRSError as exc:
                conn.reject(SRS_REJECT_REPLY)
                self._log_failed(f"RCPT TO:<{event.address}> ({exc})", SRS_REJECT_REPLY)
                return
            if decoded is not None:
                route_to = decoded
        try:
            destinations = await self.services.expander.expand(self._match_context(route_to))
        except SMTPError as err:
            conn.reject(err.reply())
            self._log_failed(f"RCPT TO:<{event.address}>", err.reply())
            return
        if not destinations:
            reply = Reply(550, f"Invalid recipient: <{event.address}>", "5.1.1")
            conn.reject(reply)
            self._log_failed(f"RCPT TO:<{event.address}>", reply)
            return
        now = int(time.time())
        notify = parse_dsn_notify(event.params.get("NOTIFY"))
        orcpt = event.params.get("ORCPT") or ""
        for dest in destinations:
            action = self.services.config.actions.get(dest.dispatcher)
            kind = "mta" if action is not None and action.method == "relay" else "mda"
            flags = []
            if dest.internal:
                flags.append(FLAG_INTERNAL)
            if self.auth_user or self.listener.socket:
                flags.append(FLAG_AUTHENTICATED)
            txn.envelopes.append(
                Envelope(
                    evpid=new_evpid(txn.msgid),
                    dispatcher=dest.dispatcher,
                    type=kind,
                    sender=txn.sender,
                    rcpt=event.address,
                    dest=dest.dest,
                    ctime=now,
                    smtpname=self.listener.hostname,
                    helo=self.helo,
                    hostname=self.rdns,
                    sockaddr=self.peer_ip or "local",
                    tag=self.listener.tag or "",
                    username=self.auth_user or "",
                    flags=flags,
                    dsn_notify=notify,
                    dsn_ret=(txn.mail_params.get("RET") or "").upper(),
                    dsn_envid=txn.mail_params.get("ENVID") or "",
                    dsn_orcpt=orcpt,
                    mda_exec=dest.mda_exec or "",
                    mda_subaddress=dest.subaddress or "",
                    mda_user=dest.user or "",
                )
            )
        txn.rcpts.append(event.address)
        conn.accept(Reply(250, "Destination address valid: Recipient ok", "2.1.5"))

    def _build_message(self, txn: Transaction, parts: list[bytes]) -> list[bytes]:
        """The message as stored, in parts: our header lines, then what the client sent
        (``parts``: the header section first, see _header_first), never joined."""
        first = parts[0]
        info = ReceivedInfo(
            helo=self.helo or self.peer_ip,
            rdns=self.rdns,
            ip=self.peer_ip,
            hostname=self.listener.hostname,
            msgid=msgid_hex(txn.msgid),
            esmtp=self.esmtp,
            tls=self.tls_info,
            authenticated=self.auth_user is not None or self.listener.socket,
            auth_user=self.auth_user,
            received_auth=self.listener.received_auth,
            mask_src=self.listener.mask_src,
            single_rcpt=txn.rcpts[0] if len(txn.rcpts) == 1 else None,
        )
        if self.listener.masquerade and self.auth_user is not None:
            first = _masquerade(first, txn.sender)
        return [received_header(info), first, *parts[1:]]

    def _complete_headers(self, message: list[bytes]) -> list[bytes]:
        """Submission from our own host or a user: add the Date and Message-ID a bare client
        left out, at the end of the header section and after the filters (as smtpd does:
        rspamd must still see them missing)."""
        if not (self.local or self.auth_user is not None or self.listener.socket):
            return message
        # The header section is in the first part (filtered) or the first two (ours, then
        # the client's, see _build_message).
        at = 1 if len(message) > 1 else 0
        part = message[at]
        extra = b""
        if not any(_has_header(p, b"date") for p in message[: at + 1]):
            from email.utils import formatdate

            extra += f"Date: {formatdate(localtime=True)}\r\n".encode()
        if not any(_has_header(p, b"message-id") for p in message[: at + 1]):
            extra += f"Message-ID: <{self.id}@{self.listener.hostname}>\r\n".encode()
        if not extra:
            return message
        if part.startswith(b"\r\n"):  # no header of the client's own
            cut = 0
        else:
            end = part.find(b"\r\n\r\n")
            cut = len(part) if end < 0 else end + 2
        return [*message[:at], part[:cut] + extra + part[cut:], *message[at + 1 :]]

    async def _message_end(self) -> None:
        conn = self.conn
        txn = self.txn
        assert conn is not None
        if txn is None or not txn.envelopes:
            conn.reject(Reply(503, "Invalid command: No recipients", "5.5.1"))
            return
        parts = _header_first(txn.chunks) if txn.chunks else [b""]
        txn.chunks = []  # the parts hold the message now
        if _count_received(parts[0]) >= MAX_HOPS:
            reply = Reply(500, "Routing loop detected: Loop detected", "5.4.6")
            conn.reject(reply)
            self._log_failed("DATA", reply)
            self._abort_transaction()
            return
        message = self._build_message(txn, parts)
        del parts
        if self.filters is not None:
            filtered = await self.filters.message(txn, b"".join(message))
            if filtered is None:
                return  # a filter refused it and answered the client
            message = [filtered]
        message = self._complete_headers(message)
        self.txn = None
        size = sum(map(len, message))
        try:
            await self.services.store.commit(txn.msgid, message, txn.envelopes)
        except QueueError as exc:
            log.error("%s smtp queue commit failed: %s", self.id, exc)
            self.services.store.release_msgid(txn.msgid)
            conn.reject(Reply(421, "Temporary failure", "4.3.0"))
            if self.transport is not None:
                self.end_reason = "quit"
                self._flush()
                self.transport.close()
            return
        self.messages += 1
        mid = msgid_hex(txn.msgid)
        proto_name = "ESMTP" if self.esmtp else "SMTP"
        log.info(
            "%s smtp message msgid=%s size=%d nrcpt=%d proto=%s",
            self.id,
            mid,
            size,
            len(txn.rcpts),
            proto_name,
        )
        for env in txn.envelopes:
            log.info(
                "%s smtp envelope evpid=%s from=<%s> to=<%s>",
                self.id,
                evpid_hex(env.evpid),
                env.sender,
                env.dest,
            )
        self.services.accepted(txn.envelopes)
        metrics.count("messages_accepted")
        metrics.count("recipients_accepted", len(txn.envelopes))
        conn.accept(Reply(250, f"{mid} Message accepted for delivery", "2.0.0"))

    async def _starttls(self) -> None:
        conn = self.conn
        assert conn is not None
        context = self.listener.ssl_context
        if context is None or self.transport is None:
            conn.reject(Reply(502, "Command not supported", "5.5.1"))
            return
        conn.accept()
        self._flush()
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(self.transport, self, context, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.end_reason = f"tls-error ({exc})"
            self.transport.close()
            return
        if new_transport is None:
            self.transport.close()
            return
        self.transport = new_transport
        self.tls_info = self._tls_description()
        self._log_tls()
        conn.tls_started()

    def _log_tls(self) -> None:
        ciphers = ciphers_text(self.transport)
        if ciphers is not None:
            log.info("%s smtp tls ciphers=%s", self.id, ciphers)

    def _tls_description(self) -> str | None:
        if self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        if cipher is None:
            return None
        name, version, bits = cipher
        # getpeercert() is non-empty only for a client certificate that was verified (the
        # listener's `verify`); without `verify` none is asked for: OpenSMTPD's YES/NO.
        verified = "YES" if obj.getpeercert() else "NO"
        return f"{version}:{name}:{bits}:{verified}"

    async def _auth(self, event: proto.AuthCredentials) -> None:
        conn = self.conn
        assert conn is not None
        authenticator = self.listener.authenticator
        ok = False
        if authenticator is not None:
            try:
                ok = await authenticator(event.username, event.password)
            except SMTPError as err:
                conn.reject(err.reply())
                return
        result = "ok" if ok else "permfail"
        user = event.username.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        log.info("%s smtp authentication user=%s result=%s", self.id, user, result)
        if ok:
            self.auth_user = event.username
            conn.accept()
        else:
            conn.reject(Reply(535, "Authentication failed", "5.7.8"))

    # ------------------------------------------------------------------ helpers

    def _abort_transaction(self) -> None:
        if self.txn is not None:
            self.services.store.release_msgid(self.txn.msgid)
            self.txn = None

    def _log_failed(self, command: str, reply: Reply) -> None:
        log.info('%s smtp failed-command command="%s" result="%s"', self.id, command, str(reply))
        metrics.count(
            "smtp_rejected",
            command=metrics.command_label(command),
            reason=metrics.reject_reason(reply.code, reply.enhanced),
        )
