"""Glue between one SMTP session (``server/session.py``) and its filter chain.

The session calls four hooks and otherwise runs as if unfiltered:

* :meth:`SessionFilters.observe` for every event it handles inline (reports only; False
  sends HELO/EHLO, MAIL and DATA to the async path, where filters can be asked);
* :meth:`SessionFilters.handle` for every event needing an answer: runs the phase through
  the chain, applies the verdict (reject, disconnect, rewrite, junk) and otherwise lets the
  session's own handler (``_dispatch_async``) answer, then emits the report events;
* :meth:`SessionFilters.message` with the message about to be queued: ``X-Spam: yes``,
  the data-line stream and the commit phase;
* :meth:`SessionFilters.close` when the connection is gone.

Report order follows OpenSMTPD 6.8 where it matters (filter-protocol.md section 3): for a
MAIL, filter request, filter-response, reply, tx-begin, tx-mail.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from pigeon import metrics
from pigeon.filters.chain import FILTER_TEMPFAIL, JUNK_HEADER, FilterChain, Verdict
from pigeon.filters.rdns import client_rdns
from pigeon.protocol import filterproto
from pigeon.protocol import server as proto
from pigeon.protocol.address import AddressError, parse_path
from pigeon.protocol.replies import Reply

if TYPE_CHECKING:
    from pigeon.server.session import SMTPSession, Transaction

log = logging.getLogger("pigeon.filters")

_BAD_SENDER = Reply(501, "Sender address syntax error", "5.1.7")
_BAD_RCPT = Reply(501, "Recipient address syntax error", "5.1.3")


class FilterConnect(proto.Event):
    """Pseudo-event: the connection was accepted; run link-connect and the connect phase."""

    __slots__ = ()


class SessionFilters:
    def __init__(self, session: SMTPSession, chain: FilterChain) -> None:
        self.session = session
        self.fs = chain.new_session(int(session.id, 16))
        self._msgid: int | None = None
        self._size = 0
        self.closed = False

    # -- helpers -------------------------------------------------------------------

    @property
    def _conn(self) -> proto.ServerConnection:
        conn = self.session.conn
        assert conn is not None
        return conn

    def _answer(self, verdict: Verdict, default: Reply) -> None:
        """Send a reject/disconnect verdict to the client instead of running the command."""
        conn = self._conn
        reply = verdict.reply or default
        if conn.awaiting_answer is not None:
            conn.reject(reply)
        if verdict.closes and not conn.closed:
            conn.close()

    # -- connection ----------------------------------------------------------------

    async def connect(self) -> None:
        session = self.session
        conn = self._conn
        ip = session.peer_ip
        try:
            rdns, fcrdns = await client_rdns(ip)
            facts = self.fs.facts
            facts.rdns, facts.fcrdns, facts.src = rdns, fcrdns == "pass", ip or "local"
            self.fs.open()
            src, dest = self._addresses()
            self.fs.report(filterproto.LinkConnect(rdns, fcrdns, src, dest))
            address = ip if ":" not in ip else f"[{ip}]"
            verdict = await self.fs.phase("connect", f"{rdns}|{address or 'local'}")
        except Exception:
            log.exception("%s smtp filter error at connect", session.id)
            verdict = Verdict("disconnect", FILTER_TEMPFAIL)
        if verdict.stops:
            conn.greeting(verdict.reply or FILTER_TEMPFAIL)
            return
        if session.tls_info is not None:  # smtps: the handshake came before the banner
            self.fs.report(filterproto.LinkTls(_link_tls(session.tls_info)))
        conn.greeting()
        self.fs.report(filterproto.LinkGreeting(session.listener.hostname))

    def _addresses(self) -> tuple[str, str]:
        transport = self.session.transport
        if transport is None or self.session.listener.socket:
            return "unix:/var/run/smtpd.sock", "unix:/var/run/smtpd.sock"
        out = []
        for key in ("peername", "sockname"):
            name = transport.get_extra_info(key)
            if isinstance(name, tuple) and len(name) >= 2:
                out.append(filterproto.link_address(str(name[0]), int(name[1])))
            else:
                out.append("unix:/var/run/smtpd.sock")
        return out[0], out[1]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._msgid is not None:
            self._end_tx(rollback=True)
        self.fs.close()

    def timeout(self) -> None:
        self.fs.report(filterproto.Timeout())

    def server_output(self, data: bytes) -> None:
        """protocol-server: one report per reply line."""
        if not self.fs.wants("protocol-server"):
            return
        for line in data.decode("utf-8", "replace").split("\r\n"):
            if line:
                self.fs.report(filterproto.ProtocolServer(line))

    # -- inline events ---------------------------------------------------------------

    def observe(self, event: object) -> bool:
        """Reports for an event the session handles inline; False: take the async path."""
        if isinstance(event, proto.Helo | proto.MailFrom | proto.DataBegin):
            return False
        if isinstance(event, proto.MessageRejected):
            self._end_tx(rollback=True)
        elif isinstance(event, proto.CommandRejected):
            # refused before any phase (unknown, out of sequence, bad syntax): the filter
            # still sees the command before the reply, as smtpd reports every line
            line = event.line
            if line.startswith("AUTH ") and line.endswith(")"):
                line = "********"  # a credential line (smtpd reports it so)
            self.fs.report(filterproto.ProtocolClient(line))
        elif isinstance(event, proto.Reset | proto.Quit):
            verb = "RSET" if isinstance(event, proto.Reset) else "QUIT"
            if verb not in self._conn.config.filtered_commands:  # else reported in _command
                self.fs.report(filterproto.ProtocolClient(verb))
            self._end_tx(rollback=True)
        return True

    def _end_tx(self, *, rollback: bool) -> None:
        msgid = self._msgid
        if msgid is None:
            return
        self._msgid = None
        if rollback:
            self.fs.report(filterproto.TxRollback(msgid))
        else:
            self.fs.report(filterproto.TxCommit(msgid, self._size))
        self.fs.report(filterproto.TxReset(msgid))
        self.fs.end_transaction()

    # -- events that need an answer ----------------------------------------------------

    async def handle(self, event: object) -> None:
        session = self.session
        if isinstance(event, FilterConnect):
            await self.connect()
            return
        if isinstance(event, proto.Helo):
            await self._helo(event)
        elif isinstance(event, proto.MailFrom):
            await self._mail(event)
        elif isinstance(event, proto.RcptTo):
            await self._rcpt(event)
        elif isinstance(event, proto.DataBegin):
            await self._data()
        elif isinstance(event, proto.StartTLS):
            self.fs.report(filterproto.ProtocolClient("STARTTLS"))
            verdict = await self.fs.phase("starttls")
            if verdict.stops:
                self._answer(verdict, FILTER_TEMPFAIL)
                return
            await session._dispatch_async(event)
            if session.tls_info is not None and self._conn.tls_active:
                self.fs.report(filterproto.LinkTls(_link_tls(session.tls_info)))
        elif isinstance(event, proto.FilteredCommand):
            await self._command(event)
        elif isinstance(event, proto.AuthCredentials):
            # (the auth phase was asked at the AUTH command: _command)
            await session._dispatch_async(event)
            result = "pass" if session.auth_user is not None else "fail"
            self.fs.report(filterproto.LinkAuth(event.username, result))
            if session.auth_user is not None:
                self.fs.facts.auth_user = session.auth_user
        elif isinstance(event, proto.MessageEnd):
            before = session.messages
            await session._dispatch_async(event)
            self._end_tx(rollback=session.messages == before)
        else:
            await session._dispatch_async(event)

    async def _command(self, event: proto.FilteredCommand) -> None:
        """RSET, QUIT, NOOP, HELP, AUTH: the filters decide, then the protocol machine
        answers (AUTH: goes on to its challenges, as smtpd asks the phase at the command)."""
        if event.verb == "AUTH":
            mechanism, _, initial = event.argument.partition(" ")
            shown = f"AUTH {mechanism} ********" if initial.strip() else f"AUTH {mechanism}"
            self.fs.report(filterproto.ProtocolClient(shown))
            # As smtpd: the AUTH arguments as sent, credentials included (not masked).
            verdict = await self.fs.phase("auth", event.argument)
        else:
            self.fs.report(filterproto.ProtocolClient(event.verb))
            verdict = await self.fs.phase(event.verb.lower())
        if verdict.stops:
            self._answer(verdict, FILTER_TEMPFAIL)
            return
        self._conn.accept()

    async def _helo(self, event: proto.Helo) -> None:
        verb = "EHLO" if event.extended else "HELO"
        self.fs.report(filterproto.ProtocolClient(f"{verb} {event.name}"))
        self.fs.facts.helo = event.name
        verdict = await self.fs.phase(verb.lower(), event.name)
        if verdict.stops:
            self._answer(verdict, FILTER_TEMPFAIL)
            return
        if verdict.kind == "rewrite" and verdict.value:
            event = dataclasses.replace(event, name=verdict.value)
            self.fs.facts.helo = event.name
        # A new HELO ends any transaction (smtpd: tx-rollback).
        self._end_tx(rollback=True)
        self.fs.report(filterproto.LinkIdentify(verb, event.name))
        session = self.session
        session.helo = event.name
        session.esmtp = event.extended
        self._conn.accept()

    async def _mail(self, event: proto.MailFrom) -> None:
        session = self.session
        self.fs.report(filterproto.ProtocolClient(f"MAIL FROM:<{event.address}>"))
        self.fs.facts.mail_from = event.address
        self.fs.begin_transaction()
        verdict = await self.fs.phase("mail-from", event.address)
        if verdict.stops:
            self.fs.end_transaction()
            self._answer(verdict, FILTER_TEMPFAIL)
            return
        original = event.address
        if verdict.kind == "rewrite":
            try:
                address, _ = parse_path(verdict.value or "", allow_null=True)
            except AddressError:
                self.fs.end_transaction()
                self._conn.reject(_BAD_SENDER)
                return
            event = dataclasses.replace(event, address=address)
        junk_tx = self.fs.junk_tx
        if session.listener.senders is not None and session.auth_user is not None:
            await session._check_sender(event)
        else:
            session._mail_from(event)
        txn = session.txn
        if txn is None:
            self.fs.end_transaction()
            self.fs.report(filterproto.TxMail(0, "permfail", original))
            return
        # _mail_from ended any previous transaction: restore this one's junk mark.
        self.fs.begin_transaction()
        self.fs.junk_tx = junk_tx
        self._msgid = txn.msgid & 0xFFFFFFFF
        self.fs.facts.mail_from = txn.sender
        self.fs.report(filterproto.TxBegin(self._msgid))
        self.fs.report(filterproto.TxMail(self._msgid, "ok", original))

    async def _rcpt(self, event: proto.RcptTo) -> None:
        session = self.session
        self.fs.report(filterproto.ProtocolClient(f"RCPT TO:<{event.address}>"))
        self.fs.facts.rcpt_to = event.address
        verdict = await self.fs.phase("rcpt-to", event.address)
        if verdict.stops:
            self._answer(verdict, FILTER_TEMPFAIL)
            code = (verdict.reply or FILTER_TEMPFAIL).code
            result = "tempfail" if 400 <= code < 500 else "permfail"
            self.fs.report(filterproto.TxRcpt(self._msgid or 0, result, event.address))
            return
        original = event.address
        if verdict.kind == "rewrite":
            try:
                address, _ = parse_path(verdict.value or "", allow_null=False)
            except AddressError:
                self._conn.reject(_BAD_RCPT)
                return
            event = dataclasses.replace(event, address=address)
        txn = session.txn
        before = len(txn.envelopes) if txn is not None else 0
        await session._dispatch_async(event)
        txn = session.txn
        msgid = self._msgid or 0
        if txn is not None and len(txn.envelopes) > before:
            for env in txn.envelopes[before:]:
                self.fs.report(filterproto.TxEnvelope(msgid, env.evpid))
            self.fs.report(filterproto.TxRcpt(msgid, "ok", original))
        else:
            self.fs.report(filterproto.TxRcpt(msgid, "permfail", original))

    async def _data(self) -> None:
        self.fs.report(filterproto.ProtocolClient("DATA"))
        verdict = await self.fs.phase("data")
        msgid = self._msgid or 0
        if verdict.stops:
            self._answer(verdict, FILTER_TEMPFAIL)
            self.fs.report(filterproto.TxData(msgid, "permfail"))
            return
        self._conn.accept()
        self.fs.report(filterproto.TxData(msgid, "ok"))

    # -- the message -----------------------------------------------------------------

    async def message(self, txn: Transaction, message: bytes) -> bytes | None:
        """The message to queue after the data-line filters and the commit phase, or None
        when a filter refused it (the client has its reply; the transaction is aborted)."""
        self.fs.report(filterproto.ProtocolClient("."))
        if self.fs.junk:
            message = JUNK_HEADER.encode() + b"\r\n" + message
            reason = "filter-session" if self.fs.junk_session else "filter-transaction"
            metrics.count("messages_junked", reason=reason)
        if self.fs.filters_data:
            text = message.decode("utf-8", "surrogateescape")
            if text.endswith("\r\n"):
                text = text[:-2]
            lines = [filterproto.dot_stuff(line) for line in text.split("\r\n")]
            out = await self.fs.data_lines(lines)
            if isinstance(out, Verdict):
                self._refuse_message(out)
                return None
            unstuffed = [filterproto.dot_unstuff(line) for line in out]
            message = ("\r\n".join(unstuffed) + "\r\n").encode("utf-8", "surrogateescape")
        verdict = await self.fs.phase("commit")
        if verdict.stops:
            self._refuse_message(verdict)
            return None
        self._size = len(message)
        return message

    def _refuse_message(self, verdict: Verdict) -> None:
        self._answer(verdict, FILTER_TEMPFAIL)
        self.session._abort_transaction()
        self._end_tx(rollback=True)


def _link_tls(description: str) -> str:
    """smtpd's link-tls is VERSION:CIPHER:BITS; the session's description also ends in the
    client certificate check (for the Received header), left out here."""
    return description.rsplit(":", 1)[0]
