"""SMTP and LMTP client state machine, sans-I/O (bytes in, events out; calls in, bytes out).

Used by ``delivery/relay.py`` (SMTP to an MX or smarthost) and ``delivery/lmtp.py``. The caller owns
the socket, TLS and timeouts; this module only decides what to send and what the replies mean.
Behaviour follows OpenSMTPD's ``mta_session.c`` (see ``delivery-queue.md`` 2.7 and 2.8), with two
additions: PIPELINING is used when advertised, and LMTP 5xx replies are permanent per recipient.

Driving it::

    conn = ClientConnection(ClientConfig(helo="mx.example.org"))
    loop:
        conn.receive_data(await sock.read())     # b"" means the server closed the connection
        while (event := conn.next_event()) is not None:
            Ready        -> conn.start_transaction(Transaction(...))
            NeedStartTLS -> upgrade the socket, then conn.tls_started()
            DataReady    -> conn.send_body(body)  (or send_body_chunk(...) ... end_body())
            RecipientResult / DeliveryResult -> per-recipient outcome, as it becomes known
            MailRejected / TransactionResult -> this transaction is over; start the next or quit()
            SessionFailed / Closed -> send what data_to_send() holds, then close the socket
        await sock.write(conn.data_to_send())   # before reading again: see below

Tracing (``pigeon trace mta``): set ``conn.trace = []`` and every command put into
``data_to_send()`` is also appended to that list as a trace shows it - credentials masked
(``AUTH PLAIN ********``), the body as its size (``[...361 bytes...]``) then ``.``. The caller
logs and clears the list when it writes the bytes; None (the default) records nothing.

Replies must answer commands already handed out by ``data_to_send()``; a reply that arrives
earlier is a protocol violation (OpenSMTPD: "Remote host sent too much data").

Every recipient gets exactly one deciding event: a non-2xx ``RecipientResult``, a
``DeliveryResult``, a ``MailRejected`` for the whole transaction, or - if the session fails first -
nothing, which the caller must treat as a temporary failure.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum, auto
from typing import Literal, TypeAlias

from pigeon.protocol.replies import Reply

__all__ = [
    "ClientConfig",
    "ClientConnection",
    "ClientProtocolError",
    "Closed",
    "DataReady",
    "DeliveryResult",
    "Event",
    "Extensions",
    "MailRejected",
    "NeedStartTLS",
    "Ready",
    "RecipientResult",
    "RecipientSpec",
    "SessionFailed",
    "Transaction",
    "TransactionResult",
]


class ClientProtocolError(RuntimeError):
    """The caller used the machine wrongly (e.g. ``send_body`` before ``DataReady``)."""


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """How to run one client session.

    ``implicit_tls`` says the socket is already TLS (smtps, port 465): STARTTLS is skipped and
    AUTH is allowed. LMTP sessions (``lmtp=True``) send LHLO and never use STARTTLS or AUTH,
    like OpenSMTPD's ``lmtp://`` relays; ``want_starttls`` is ignored for them.
    """

    helo: str
    lmtp: bool = False
    want_starttls: bool = True
    require_tls: bool = False
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None
    pipelining: bool = True

    def __post_init__(self) -> None:
        if not self.helo or any(c in self.helo for c in " \t\r\n\0"):
            raise ValueError(f"invalid HELO name: {self.helo!r}")
        if self.lmtp and (self.require_tls or self.auth is not None):
            raise ValueError("LMTP sessions use neither STARTTLS nor AUTH")
        if self.auth is not None:
            for part in self.auth:
                if "\0" in part:
                    raise ValueError("AUTH credentials must not contain NUL")


@dataclass(frozen=True, slots=True)
class RecipientSpec:
    """One ``RCPT TO``. ``address`` without angle brackets; ``params`` e.g.
    ``{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a@b"}`` (a value of None: keyword only)."""

    address: str
    params: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One mail transaction. ``sender`` "" gives ``MAIL FROM:<>``.

    Parameters are sent only when the server advertised what they need (RET/ENVID/NOTIFY/ORCPT:
    DSN, SIZE: SIZE, BODY: 8BITMIME, any other keyword: an EHLO keyword of the same name) and
    dropped silently otherwise, as OpenSMTPD does for DSN. Checking that a message *needs*
    SMTPUTF8 or fits the advertised SIZE is the caller's job (see ``Extensions``).
    """

    sender: str
    recipients: Sequence[RecipientSpec]
    mail_params: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server advertised in its EHLO/LHLO reply: keyword (upper case) -> parameters."""

    keywords: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        keywords: dict[str, str] = {}
        # The first line is the server's greeting name; every further line is one extension.
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            keyword = keyword.upper()
            if not keyword:
                continue
            if keyword.startswith("AUTH="):
                # Pre-RFC 4954 servers say "AUTH=LOGIN PLAIN": same meaning as "AUTH LOGIN PLAIN".
                params = f"{keyword[5:]} {params}"
                keyword = "AUTH"
            if keyword == "AUTH" and keyword in keywords:
                params = f"{keywords[keyword]} {params}"
            keywords[keyword] = params.strip()
        return cls(keywords)

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.keywords

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def enhanced_status_codes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords

    @property
    def size(self) -> int | None:
        """The advertised SIZE limit; 0 when SIZE has no (valid) number, None when absent."""
        if "SIZE" not in self:
            return None
        value = self.keywords["SIZE"].split(" ", 1)[0]
        return int(value) if value.isascii() and value.isdigit() else 0

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.keywords.get("AUTH", "").upper().split())


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Ready:
    """Greeting, EHLO/HELO/LHLO, STARTTLS and AUTH are done: ``start_transaction`` may be called."""

    extensions: Extensions
    esmtp: bool
    tls: bool


@dataclass(frozen=True, slots=True)
class NeedStartTLS:
    """The server accepted STARTTLS: upgrade the socket now, then call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The reply to ``RCPT TO`` for ``transaction.recipients[index]``."""

    index: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class DataReady:
    """The server said 354: call ``send_body`` (or ``send_body_chunk`` ... ``end_body``)."""


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The final outcome for an accepted recipient: the DATA refusal, the reply after the final
    dot (SMTP: the same reply for every accepted recipient), or its own LMTP reply."""

    index: int
    reply: Reply


@dataclass(frozen=True, slots=True)
class MailRejected:
    """``MAIL FROM`` was refused: every recipient fails with this reply. Ends the transaction."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """The transaction is over. ``results`` repeats the ``DeliveryResult`` events in recipient
    order; it is empty when no recipient was accepted (``stage == "rcpt"``). ``stage`` says which
    reply decided: ``"rcpt"``, ``"data"`` (DATA refused) or ``"eom"`` (reply to the final dot)."""

    results: tuple[tuple[int, Reply], ...]
    stage: Literal["rcpt", "data", "eom"]


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """The session is unusable (rejected greeting/EHLO/AUTH, TLS required but unavailable,
    garbage from the server, connection lost). Recipients without a deciding event yet are
    temporary failures. ``data_to_send`` may still hold a polite QUIT."""

    reply: Reply | None
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended after our QUIT."""


# The events without fields carry nothing to tell apart: one instance each will do.
_NEED_STARTTLS = NeedStartTLS()
_DATA_READY = DataReady()
_CLOSED = Closed()

Event: TypeAlias = (
    Ready
    | NeedStartTLS
    | RecipientResult
    | DataReady
    | DeliveryResult
    | MailRejected
    | TransactionResult
    | SessionFailed
    | Closed
)


# --------------------------------------------------------------------------------------------
# Reply parsing

_MAX_REPLY_LINE = 4096  # OpenSMTPD uses LINE_MAX; RFC 5321 only guarantees 512
_MAX_REPLY_LINES = 1000


class _BadReply(Exception):
    pass


# Servers repeat the same single-line replies ("250 2.0.0 Ok", "354 ..."): parsing each once
# saves decoding and the enhanced-code regex on every transaction. Reply is immutable, so the
# one object can be shared. Bounded: cleared when full (replies carrying queue ids never repeat).
_REPLY_CACHE: dict[bytes, Reply] = {}
_REPLY_CACHE_SIZE = 256


class _ReplyParser:
    """Turns the server's byte stream into ``Reply`` objects (RFC 5321 4.2, RFC 3463).

    Strict where ambiguity would be dangerous: a code outside 2xx-5xx, a separator other than
    space or hyphen, or a multiline reply whose lines carry different codes is an error.
    Lines may end in CRLF or bare LF; text is UTF-8 (invalid bytes replaced).
    """

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0  # start of the first line not parsed yet
        self._scanned = 0  # bytes already searched for LF, so partial reads stay linear
        self._code = 0
        self._lines: list[str] = []

    @property
    def has_data(self) -> bool:
        return self._pos < len(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> None:
        pos = self._pos
        if pos >= len(self._buf):
            self._buf = data  # the usual case: nothing left over, no copy
            self._scanned = 0
        else:
            self._buf = self._buf[pos:] + data  # a partial line (at most a line's length)
            self._scanned -= pos
        self._pos = 0

    def next_reply(self) -> Reply | None:
        buf = self._buf
        while True:
            start = self._pos
            end = buf.find(b"\n", self._scanned)
            if end < 0:
                if len(buf) - start > _MAX_REPLY_LINE:
                    raise _BadReply("reply line too long")
                self._scanned = len(buf)
                return None
            self._pos = self._scanned = end + 1
            if end > start and buf[end - 1] == 13:  # CR
                end -= 1
            raw = buf[start:end]
            if not self._lines:
                cached = _REPLY_CACHE.get(raw)
                if cached is not None:
                    return cached
            if len(raw) > _MAX_REPLY_LINE:
                raise _BadReply("reply line too long")
            code, final, text = self._split_line(raw)
            if self._lines and code != self._code:
                raise _BadReply("inconsistent codes in multiline reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > _MAX_REPLY_LINES:
                raise _BadReply("reply has too many lines")
            if final:
                lines, self._lines = self._lines, []
                reply = Reply.from_lines(code, lines)
                if len(lines) == 1:
                    if len(_REPLY_CACHE) >= _REPLY_CACHE_SIZE:
                        _REPLY_CACHE.clear()
                    _REPLY_CACHE[raw] = reply
                return reply

    @staticmethod
    def _split_line(raw: bytes) -> tuple[int, bool, str]:
        if len(raw) < 3:
            raise _BadReply("reply line too short")
        if raw[0] not in b"2345" or not raw[1:3].isdigit():
            raise _BadReply("reply code out of range")
        if len(raw) == 3:
            return int(raw[:3]), True, ""
        if raw[3:4] not in (b" ", b"-"):
            raise _BadReply("bad separator after reply code")
        return int(raw[:3]), raw[3:4] == b" ", raw[4:].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------
# Body encoding


class _BodyEncoder:
    """Dot-stuffs a body given in chunks and makes every line end in CRLF (bare LF too).

    Only a trailing CR is carried between chunks, so memory stays bounded whatever the body.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def encode(self, chunk: bytes) -> bytes:
        # Whole-block work (bytes.count/replace run in C): a per-line loop costs more than
        # the rest of a relayed transaction for an ordinary message.
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # Might be the first half of a CRLF split across chunks: decide with the next chunk.
            self._pending_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        # Bare LFs: make every one CRLF. With each CRLF overwritten in place (same length:
        # one search, no resizing), an LF left over is a bare one; cheaper than counting.
        if b"\n" in chunk.replace(b"\r\n", b"\r\r"):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if b"\n." in chunk:
            chunk = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        return chunk

    def finish(self) -> bytes:
        out = b"" if self._at_line_start and not self._pending_cr else b"\r\n"
        self._pending_cr = False
        self._at_line_start = True
        return out + b".\r\n"


# --------------------------------------------------------------------------------------------
# The state machine


class _Phase(Enum):
    HANDSHAKE = auto()  # greeting .. EHLO/STARTTLS/AUTH
    TLS_WAIT = auto()  # NeedStartTLS emitted, waiting for tls_started()
    READY = auto()  # idle or a transaction in progress
    BODY = auto()  # DataReady emitted, waiting for the body
    CLOSED = auto()
    FAILED = auto()


class _Kind(IntEnum):  # IntEnum: hashed in C (dict and set lookups per reply)
    GREETING = auto()
    EHLO = auto()
    HELO = auto()
    LHLO = auto()
    STARTTLS = auto()
    AUTH_PLAIN = auto()
    AUTH_LOGIN = auto()
    AUTH_LOGIN_USER = auto()
    AUTH_LOGIN_PASS = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    EOM = auto()  # SMTP: one reply after the final dot
    LMTP_EOM = auto()  # LMTP: one reply per accepted recipient after the final dot
    DISCARD_EOM = auto()  # dot sent only to leave DATA mode of an abandoned transaction
    RSET = auto()
    QUIT = auto()


# RFC 2920: these may be followed by more commands without waiting for their reply.
_PIPELINABLE = frozenset({_Kind.MAIL, _Kind.RCPT, _Kind.RSET})
# ... and these may be sent behind them (DATA and QUIT end a group).
_GROUP_MEMBERS = _PIPELINABLE | {_Kind.DATA, _Kind.QUIT}

# Which EHLO keyword a MAIL/RCPT parameter needs before we may send it.
_PARAM_EXTENSION = {
    "RET": "DSN",
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "SIZE": "SIZE",
    "BODY": "8BITMIME",
}
_PARAM_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_BAD_PARAM_VALUE = re.compile(r"[\s\0]")  # \s: the same characters as str.isspace()
_BAD_PATH = re.compile(r"[\r\n\0<>]")


@dataclass(slots=True)
class _TxnState:
    spec: Transaction
    accepted: list[int] = field(default_factory=list)
    rcpt_replies: int = 0
    results: list[tuple[int, Reply]] = field(default_factory=list)
    finished: bool = False  # terminal event emitted; replies still due are swallowed


@dataclass(slots=True)
class _Command:
    kind: _Kind
    line: bytes
    txn: _TxnState | None = None
    index: int = -1


# Commands whose text is a secret: a trace shows them masked, as OpenSMTPD's reports do.
_MASKED = {
    _Kind.AUTH_PLAIN: "AUTH PLAIN ********",
    _Kind.AUTH_LOGIN_USER: "********",
    _Kind.AUTH_LOGIN_PASS: "********",
}


def _trace_line(command: _Command) -> str:
    masked = _MASKED.get(command.kind)
    if masked is not None:
        return masked
    return command.line.removesuffix(b"\r\n").decode("utf-8", "replace")


def _is_ok(reply: Reply) -> bool:
    return 200 <= reply.code < 300


class ClientConnection:
    """One SMTP/LMTP client session. See the module docstring for how to drive it.

    After ``SessionFailed`` or ``Closed`` every method is a harmless no-op, so a caller still
    handling earlier events of the same read never trips over the failure.
    """

    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self._parser = _ReplyParser()
        self._events: deque[Event] = deque()
        self._out = bytearray()
        self._outbox: deque[_Command] = deque()  # not sent yet (waiting for a sync point)
        self._pending: deque[_Command] = deque()  # sent, reply not yet received
        self._phase = _Phase.HANDSHAKE
        self._tls = config.implicit_tls
        self._esmtp = False
        self._extensions = Extensions()
        self._txn: _TxnState | None = None
        self._encoder: _BodyEncoder | None = None
        self._body_size = 0  # bytes of the current body sent so far, for the trace
        # A list: what goes out is also recorded there, one line per command (see the module
        # docstring). Checked once per batch of commands, so None costs nothing.
        self.trace: list[str] | None = None
        self._quit_requested = False
        self._done = False  # CLOSED or FAILED: see ``finished``
        self._consecutive_rcpt_failures = 0
        # Counted to catch a server answering commands it cannot have seen yet (replies must
        # follow what data_to_send() handed out; OpenSMTPD: "Remote host sent too much data").
        self._commands_sent = 1  # the greeting is "asked for" by connecting
        self._commands_handed_out = 1
        self._replies_received = 0
        self._pending.append(_Command(_Kind.GREETING, b""))

    # ---- state the caller may look at

    @property
    def extensions(self) -> Extensions:
        return self._extensions

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def can_start_transaction(self) -> bool:
        return (
            self._phase is _Phase.READY
            and not self._quit_requested
            and (self._txn is None or self._txn.finished)
        )

    @property
    def consecutive_rcpt_failures(self) -> int:
        """RCPT refusals in a row in this session (OpenSMTPD quits at 25: the caller's call)."""
        return self._consecutive_rcpt_failures

    @property
    def finished(self) -> bool:
        return self._done

    # ---- bytes in, events out

    def receive_data(self, data: bytes) -> None:
        """Feeds bytes read from the server; ``b""`` means the server closed the connection."""
        if self._done:
            return
        if not data:
            self._on_eof()
            return
        if self._phase is _Phase.TLS_WAIT:
            self._fail(None, "data received before the TLS handshake")
            return
        parser = self._parser
        parser.feed(data)
        try:
            while (reply := parser.next_reply()) is not None:
                self._on_reply(reply)
                if self._done:
                    break
                if self._outbox:
                    self._flush()
                if self._waiting_for_tls() and parser.has_data:
                    # Anything behind "220 go ahead" was sent in clear text and must not be
                    # read as if it came over TLS (STARTTLS response injection).
                    self._fail(None, "data received before the TLS handshake")
                    break
        except _BadReply as exc:
            self._fail(None, f"bad reply from server: {exc}")
        if self._outbox:
            self._flush()

    def _waiting_for_tls(self) -> bool:
        # A method, not an inline test: _on_reply changes the phase behind mypy's back.
        return self._phase is _Phase.TLS_WAIT

    @property
    def has_events(self) -> bool:
        """``next_event`` would return an event."""
        return bool(self._events)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Bytes to write to the server now (commands, body); b"" when there is nothing."""
        self._commands_handed_out = self._commands_sent
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # ---- calls in, bytes out

    def start_transaction(self, txn: Transaction) -> None:
        if self._done:
            return
        if not self.can_start_transaction:
            raise ClientProtocolError("not ready for a new transaction")
        if not txn.recipients:
            raise ValueError("a transaction needs at least one recipient")
        state = _TxnState(txn)
        self._txn = state
        params = self._format_params(txn.mail_params)
        self._queue(_Kind.MAIL, f"MAIL FROM:<{_checked_path(txn.sender)}>{params}", state)
        for index, rcpt in enumerate(txn.recipients):
            params = self._format_params(rcpt.params)
            line = f"RCPT TO:<{_checked_path(rcpt.address)}>{params}"
            self._queue(_Kind.RCPT, line, state, index)
        self._queue(_Kind.DATA, "DATA", state)
        self._flush()

    def send_body_chunk(self, chunk: bytes) -> None:
        if self._done:
            return
        if self._phase is not _Phase.BODY or self._encoder is None:
            raise ClientProtocolError("the server has not asked for the body (no DataReady)")
        encoded = self._encoder.encode(chunk)
        self._out += encoded
        self._body_size += len(encoded)

    def end_body(self) -> None:
        if self._done:
            return
        if self._phase is not _Phase.BODY or self._encoder is None or self._txn is None:
            raise ClientProtocolError("the server has not asked for the body (no DataReady)")
        tail = self._encoder.finish()
        self._out += tail
        if self.trace is not None:
            # The size on the wire up to the final dot, never the content (OpenSMTPD's form).
            self.trace += (f"[...{self._body_size + len(tail) - 3} bytes...]", ".")
        self._encoder = None
        self._phase = _Phase.READY
        txn = self._txn
        if self._config.lmtp:
            for index in txn.accepted:
                self._pending.append(_Command(_Kind.LMTP_EOM, b"", txn, index))
            self._commands_sent += len(txn.accepted)
        else:
            self._pending.append(_Command(_Kind.EOM, b"", txn))
            self._commands_sent += 1

    def send_body(self, body: bytes) -> None:
        """The whole body at once; lines may end in CRLF or LF. Dot-stuffed, ends with CRLF.CRLF."""
        self.send_body_chunk(body)
        self.end_body()

    def tls_started(self) -> None:
        """The socket now speaks TLS: forget what was advertised in clear and say EHLO again."""
        if self._done:
            return
        if self._phase is not _Phase.TLS_WAIT:
            raise ClientProtocolError("tls_started() without NeedStartTLS")
        self._tls = True
        self._extensions = Extensions()
        self._phase = _Phase.HANDSHAKE
        self._queue(_Kind.EHLO, f"EHLO {self._config.helo}")
        self._flush()

    def quit(self) -> None:
        """Ends the session politely; replies still due are processed first, then ``Closed``."""
        if self._done or self._quit_requested:
            return
        if self._phase in (_Phase.TLS_WAIT, _Phase.BODY):
            raise ClientProtocolError("cannot QUIT now: close the connection instead")
        self._queue(_Kind.QUIT, "QUIT")
        self._quit_requested = True
        self._flush()

    # ---- internals: sending

    def _queue(self, kind: _Kind, line: str, txn: _TxnState | None = None, index: int = -1) -> None:
        if self._quit_requested:
            return  # nothing may follow QUIT
        self._outbox.append(_Command(kind, line.encode("utf-8") + b"\r\n", txn, index))

    def _flush(self) -> None:
        """Sends queued commands as far as the pipelining rules allow."""
        if not self._outbox or self._phase not in (_Phase.HANDSHAKE, _Phase.READY):
            return  # never a command in the middle of a body or before the TLS handshake
        pipelining = self._config.pipelining and self._extensions.pipelining
        trace = self.trace
        while self._outbox:
            if self._pending:
                # Only whole RFC 2920 groups: behind MAIL/RCPT/RSET, up to and including DATA.
                can_join = pipelining and self._pending[-1].kind in _PIPELINABLE
                if not (can_join and self._outbox[0].kind in _GROUP_MEMBERS):
                    return
            command = self._outbox.popleft()
            self._out += command.line
            if trace is not None:
                trace.append(_trace_line(command))
            self._pending.append(command)
            self._commands_sent += 1

    def _drop_unsent(self, txn: _TxnState) -> None:
        self._outbox = deque(c for c in self._outbox if c.txn is not txn)

    def _format_params(self, params: Mapping[str, str | None]) -> str:
        if not params:
            return ""
        advertised = self._extensions.keywords
        out = ""
        for key, value in params.items():
            keyword = key.upper()
            needs = _PARAM_EXTENSION.get(keyword)
            if needs is None:
                if not _PARAM_KEYWORD_RE.fullmatch(keyword):
                    raise ValueError(f"invalid ESMTP parameter name: {key!r}")
                needs = keyword
            if value is not None and (not value or _BAD_PARAM_VALUE.search(value)):
                raise ValueError(f"invalid value for ESMTP parameter {key}: {value!r}")
            if needs not in advertised:
                continue
            out += f" {keyword}" if value is None else f" {keyword}={value}"
        return out

    # ---- internals: receiving

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _fail(self, reply: Reply | None, reason: str, *, send_quit: bool = False) -> None:
        quit_sent = any(c.kind is _Kind.QUIT for c in self._pending)
        self._phase = _Phase.FAILED
        self._done = True
        self._outbox.clear()
        self._pending.clear()
        if send_quit and not quit_sent:
            self._out += b"QUIT\r\n"
            if self.trace is not None:
                self.trace.append("QUIT")
        self._emit(SessionFailed(reply, reason))

    def _on_eof(self) -> None:
        unfinished = self._txn is not None and not self._txn.finished
        if self._quit_requested and not unfinished:
            self._phase = _Phase.CLOSED
            self._done = True
            self._pending.clear()
            self._outbox.clear()
            self._emit(_CLOSED)
        else:
            self._fail(None, "connection closed by the server")

    def _on_reply(self, reply: Reply) -> None:
        if not self._pending:
            reason = "server is closing the session" if reply.code == 421 else "unexpected reply"
            self._fail(reply, reason)
            return
        if self._replies_received >= self._commands_handed_out:
            self._fail(reply, "reply received before the command was sent")
            return
        self._replies_received += 1
        command = self._pending.popleft()
        _HANDLERS[command.kind](self, command, reply)

    # handshake

    def _on_greeting(self, _command: _Command, reply: Reply) -> None:
        if not _is_ok(reply):
            self._fail(reply, "greeting rejected", send_quit=True)
        elif self._config.lmtp:
            self._queue(_Kind.LHLO, f"LHLO {self._config.helo}")
        else:
            self._queue(_Kind.EHLO, f"EHLO {self._config.helo}")

    def _on_ehlo(self, _command: _Command, reply: Reply) -> None:
        if _is_ok(reply):
            self._esmtp = True
            self._extensions = Extensions.from_ehlo(reply)
            self._after_ehlo()
        elif self._config.require_tls or self._config.auth is not None:
            # HELO could neither do STARTTLS nor AUTH, so there is no point falling back.
            self._fail(reply, "EHLO rejected", send_quit=True)
        else:
            self._queue(_Kind.HELO, f"HELO {self._config.helo}")

    def _on_helo(self, _command: _Command, reply: Reply) -> None:
        if not _is_ok(reply):
            self._fail(reply, "HELO rejected", send_quit=True)
            return
        self._esmtp = False
        self._extensions = Extensions()
        self._become_ready()

    def _on_lhlo(self, _command: _Command, reply: Reply) -> None:
        if not _is_ok(reply):
            self._fail(reply, "LHLO rejected", send_quit=True)
            return
        self._esmtp = True
        self._extensions = Extensions.from_ehlo(reply)
        self._become_ready()

    def _after_ehlo(self) -> None:
        config = self._config
        if not self._tls:
            if self._extensions.starttls and (config.want_starttls or config.require_tls):
                self._queue(_Kind.STARTTLS, "STARTTLS")
                return
            if config.require_tls:
                self._fail(None, "TLS required but not supported by the server", send_quit=True)
                return
        self._start_auth()

    def _on_starttls(self, _command: _Command, reply: Reply) -> None:
        if _is_ok(reply):
            self._phase = _Phase.TLS_WAIT
            self._emit(_NEED_STARTTLS)
        elif self._config.require_tls:
            self._fail(reply, "STARTTLS rejected", send_quit=True)
        else:
            self._start_auth()  # opportunistic TLS: carry on in clear text

    def _start_auth(self) -> None:
        if self._config.auth is None:
            self._become_ready()
            return
        if not self._tls:
            self._fail(None, "refusing to authenticate over an unencrypted session", send_quit=True)
            return
        if "AUTH" not in self._extensions:
            self._fail(None, "AUTH not advertised by the server", send_quit=True)
            return
        user, password = self._config.auth
        mechanisms = self._extensions.auth_mechanisms
        if "PLAIN" in mechanisms:
            token = _b64(b"\0" + user.encode() + b"\0" + password.encode())
            self._queue(_Kind.AUTH_PLAIN, f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            self._queue(_Kind.AUTH_LOGIN, "AUTH LOGIN")
        else:
            self._fail(None, "no supported AUTH mechanism", send_quit=True)

    def _on_auth_final(self, _command: _Command, reply: Reply) -> None:
        if _is_ok(reply):
            self._become_ready()
        else:
            self._fail(reply, "AUTH rejected", send_quit=True)

    def _on_auth_login(self, command: _Command, reply: Reply) -> None:
        if reply.code != 334 or self._config.auth is None:
            self._fail(reply, "AUTH rejected", send_quit=True)
            return
        user, password = self._config.auth
        if command.kind is _Kind.AUTH_LOGIN:
            self._queue(_Kind.AUTH_LOGIN_USER, _b64(user.encode()))
        else:
            self._queue(_Kind.AUTH_LOGIN_PASS, _b64(password.encode()))

    def _become_ready(self) -> None:
        self._phase = _Phase.READY
        self._emit(Ready(self._extensions, self._esmtp, self._tls))

    # transaction

    def _finish(
        self, txn: _TxnState, stage: Literal["rcpt", "data", "eom"], reset: bool = False
    ) -> None:
        txn.finished = True
        self._emit(TransactionResult(tuple(txn.results), stage))
        if reset:
            self._drop_unsent(txn)
            self._queue(_Kind.RSET, "RSET")

    def _on_mail(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        if txn.finished or _is_ok(reply):
            return
        txn.finished = True
        self._emit(MailRejected(reply))
        self._drop_unsent(txn)
        self._queue(_Kind.RSET, "RSET")

    def _on_rcpt(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        if txn.finished:
            return  # answers to a transaction already given up (MAIL refused)
        txn.rcpt_replies += 1
        self._events.append(RecipientResult(command.index, reply))
        if 200 <= reply.code < 300:
            txn.accepted.append(command.index)
            self._consecutive_rcpt_failures = 0
        else:
            self._consecutive_rcpt_failures += 1
        if txn.rcpt_replies == len(txn.spec.recipients) and not txn.accepted:
            self._finish(txn, "rcpt", reset=True)

    def _on_data(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        go_ahead = reply.code < 400  # like OpenSMTPD: 2xx or 3xx both start the body
        if txn.finished:
            if go_ahead:
                # A pipelined DATA the server accepted although nothing is left to send:
                # an empty message ends DATA mode; RSET (already queued) then discards it.
                self._outbox.appendleft(_Command(_Kind.DISCARD_EOM, b".\r\n"))
            return
        if go_ahead:
            self._phase = _Phase.BODY
            self._encoder = _BodyEncoder()
            self._body_size = 0
            self._emit(_DATA_READY)
            return
        for index in txn.accepted:
            txn.results.append((index, reply))
            self._emit(DeliveryResult(index, reply))
        self._finish(txn, "data", reset=True)

    def _on_eom(self, command: _Command, reply: Reply) -> None:
        txn = command.txn
        assert txn is not None
        events = self._events
        for index in txn.accepted:
            txn.results.append((index, reply))
            events.append(DeliveryResult(index, reply))
        self._finish(txn, "eom")

    def _on_lmtp_eom(self, command: _Command, reply: Reply) -> None:
        # Each reply decides its own recipient: 5xx is a permanent failure for that one only
        # (OpenSMTPD 6.8's mail.lmtp turned every error into a tempfail).
        txn = command.txn
        assert txn is not None
        txn.results.append((command.index, reply))
        self._emit(DeliveryResult(command.index, reply))
        if len(txn.results) == len(txn.accepted):
            self._finish(txn, "eom")

    def _on_ignored(self, _command: _Command, _reply: Reply) -> None:
        """RSET and the discarded dot: OpenSMTPD goes on whatever they answer."""

    def _on_quit(self, _command: _Command, _reply: Reply) -> None:
        self._phase = _Phase.CLOSED
        self._done = True
        self._outbox.clear()
        self._pending.clear()
        self._emit(_CLOSED)


_HANDLERS = {
    _Kind.GREETING: ClientConnection._on_greeting,
    _Kind.EHLO: ClientConnection._on_ehlo,
    _Kind.HELO: ClientConnection._on_helo,
    _Kind.LHLO: ClientConnection._on_lhlo,
    _Kind.STARTTLS: ClientConnection._on_starttls,
    _Kind.AUTH_PLAIN: ClientConnection._on_auth_final,
    _Kind.AUTH_LOGIN: ClientConnection._on_auth_login,
    _Kind.AUTH_LOGIN_USER: ClientConnection._on_auth_login,
    _Kind.AUTH_LOGIN_PASS: ClientConnection._on_auth_final,
    _Kind.MAIL: ClientConnection._on_mail,
    _Kind.RCPT: ClientConnection._on_rcpt,
    _Kind.DATA: ClientConnection._on_data,
    _Kind.EOM: ClientConnection._on_eom,
    _Kind.LMTP_EOM: ClientConnection._on_lmtp_eom,
    _Kind.DISCARD_EOM: ClientConnection._on_ignored,
    _Kind.RSET: ClientConnection._on_ignored,
    _Kind.QUIT: ClientConnection._on_quit,
}


def _checked_path(address: str) -> str:
    if _BAD_PATH.search(address):
        raise ValueError(f"invalid address for an SMTP path: {address!r}")
    return address


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
