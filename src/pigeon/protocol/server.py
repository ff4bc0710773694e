"""The ESMTP server side as a pure state machine (no I/O), in the style of h11.

The session feeds received bytes with :meth:`ServerConnection.receive_data`, pulls events
with :meth:`ServerConnection.next_event`, answers the events that need an answer with
:meth:`~ServerConnection.accept` or :meth:`~ServerConnection.reject`, and writes whatever
:meth:`~ServerConnection.data_to_send` returns. Peer input never raises; misuse of this
API by the application raises :class:`ProtocolError`.

Behaviour and reply texts follow OpenSMTPD's ``smtp_session.c``. Deliberate differences:

* Lines: a command line may end in CRLF or a bare LF (OpenSMTPD accepts both). In DATA
  only ``<CRLF>.<CRLF>`` ends the message. A bare CR, bare LF or NUL anywhere in the data
  makes the whole message refused after the real end (SMTP smuggling defence); OpenSMTPD
  instead treats a bare LF as a line end.
* Command lines are limited to ``max_command_length`` bytes (OpenSMTPD's ``LINE_MAX``
  buffer: 2047 + CRLF); longer ones get ``500 5.0.0 Command line too long`` and the
  session is closed, as OpenSMTPD does. Data lines are limited to ``max_line_length``
  bytes (OpenSMTPD's ``SMTP_LINE_MAX`` 65535 including CRLF, far above RFC 5321's 1000);
  a longer one refuses the message, not the session (OpenSMTPD closes the session).
* PIPELINING is advertised and honoured (OpenSMTPD refuses pipelined input), and so is
  SMTPUTF8 (8-bit addresses only in a transaction whose MAIL FROM carried SMTPUTF8).
* ``MAIL FROM ... SIZE=n`` above the limit is refused with 552 (OpenSMTPD ignores SIZE).
* ``<user@>`` is refused (OpenSMTPD turns it into ``user@<hostname>``); quoted local parts
  are accepted (OpenSMTPD refuses them). ``<user>`` still becomes ``user@<hostname>``.
* Parameter values are checked (RET, BODY, NOTIFY words, ENVID and ORCPT xtext); OpenSMTPD
  ignores unknown RET and NOTIFY words. RCPT parameter errors carry an enhanced code.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from dataclasses import dataclass, field

from pigeon.protocol.address import AddressError, parse_params, parse_path, valid_domain
from pigeon.protocol.address import valid_xtext as _valid_xtext
from pigeon.protocol.replies import Reply

__all__ = [
    "AuthCredentials",
    "CommandRejected",
    "ConnectionLost",
    "DataBegin",
    "DataChunk",
    "Event",
    "FilteredCommand",
    "Helo",
    "MailFrom",
    "MessageEnd",
    "MessageRejected",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "Reset",
    "ServerConfig",
    "ServerConnection",
    "StartTLS",
]

CRLF = b"\r\n"
MAX_ENVID = 100  # RFC 3461 section 4.4
SUPPORTED_AUTH = ("PLAIN", "LOGIN")


class ProtocolError(Exception):
    """The application used the state machine wrongly (never raised for peer input)."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    max_message_size: int = 36700160
    max_rcpt: int = 1000
    max_mails: int = 100
    dsn: bool = True
    starttls: bool = False
    tls_required: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    auth_required: bool = False
    pipelining: bool = True  # advertise PIPELINING (pipelined input is always buffered)
    smtputf8: bool = True  # advertise SMTPUTF8 and accept 8-bit addresses after it
    max_command_length: int = 2047  # bytes of a command line, without its line ending
    max_line_length: int = 65535  # bytes of a DATA line, with its CRLF
    software: str = "Pigeon"  # the word after ESMTP in the banner
    # Verbs among RSET, QUIT, NOOP and HELP that become FilteredCommand events awaiting an
    # answer instead of being answered at once (filtered sessions: the filters decide).
    filtered_commands: frozenset[str] = frozenset()


# -- events ---------------------------------------------------------------------------


class Event:
    """Base class of everything next_event() returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Helo(Event):
    """HELO or EHLO (answer)."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM (answer). ``address`` is "" for ``<>``; params keys are upper-case, values
    of BODY and RET upper-cased, others (ENVID, AUTH: xtext) as sent."""

    address: str
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO (answer). NOTIFY is upper-cased; ORCPT as sent (``type;xtext``)."""

    address: str
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class DataBegin(Event):
    """DATA with at least one accepted recipient (answer; accept sends 354)."""


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    """Message bytes: whole lines, CRLF-terminated, dot-unstuffed (no answer)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd(Event):
    """``<CRLF>.<CRLF>`` after a good message (answer). ``size``: bytes of DataChunks."""

    size: int = 0


@dataclass(frozen=True, slots=True)
class MessageRejected(Event):
    """The message ended but the protocol refused it; ``reply`` is already queued."""

    reply: Reply
    reason: str


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """STARTTLS (answer; accept sends 220, then upgrade and call tls_started())."""


@dataclass(frozen=True, slots=True)
class AuthCredentials(Event):
    """Decoded AUTH PLAIN / LOGIN credentials (answer; accept sends 235)."""

    mechanism: str
    username: str
    password: str
    authzid: str = ""
    # The AUTH command's arguments as sent (the filters' auth parameter); not part of equality.
    arguments: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """RSET, already answered with 250."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT, already answered with 221; the connection is now closed."""


@dataclass(frozen=True, slots=True)
class FilteredCommand(Event):
    """RSET, QUIT, NOOP, HELP or AUTH named in ``ServerConfig.filtered_commands`` (answer).

    ``accept()`` runs the command as if unfiltered (RSET then also yields Reset, QUIT
    yields Quit and closes, AUTH goes on to its challenges or credentials);
    ``reject(reply)`` sends ``reply`` instead. For AUTH, a valid command only, asked before
    any credential is read (as smtpd's auth filter phase): ``argument`` is the AUTH
    arguments as sent.
    """

    verb: str
    argument: str = ""


@dataclass(frozen=True, slots=True)
class CommandRejected(Event):
    """The machine refused a command itself (for the ``smtp failed-command`` log line).

    ``line`` is the command as received, with AUTH credentials masked. ``bad_input`` marks
    the cases OpenSMTPD logs as ``smtp bad-input`` (line too long).
    """

    line: str
    reply: Reply
    bad_input: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """The peer closed its side (receive_data(b"")) and every complete line was handled."""


_ANSWERED = (
    Helo,
    MailFrom,
    RcptTo,
    DataBegin,
    MessageEnd,
    StartTLS,
    AuthCredentials,
    FilteredCommand,
)


# -- replies (OpenSMTPD's texts; "esc description: detail") -----------------------------

R_VRFY = Reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.2")
R_VRFY_SYNTAX = Reply(501, "Syntax error: VRFY needs an argument", "5.5.4")
R_OK = Reply(250, "Ok", "2.0.0")
R_RCPT_OK = Reply(250, "Destination address valid: Recipient ok", "2.1.5")
R_DATA = Reply(354, 'Enter mail, end with "." on a line by itself')
R_ACCEPTED = Reply(250, "Message accepted for delivery", "2.0.0")
R_RESET = Reply(250, "Reset state", "2.0.0")
R_BYE = Reply(221, "Bye", "2.0.0")
R_TLS_READY = Reply(220, "Ready to start TLS", "2.0.0")
R_AUTH_OK = Reply(235, "Authentication succeeded", "2.0.0")
R_AUTH_FAILED = Reply(535, "Authentication failed", "5.7.8")
R_HELP = Reply(
    214,
    "This is Pigeon\nTo report bugs in the implementation, please contact the postmaster\n"
    "with full details\nEnd of HELP info",
    "2.0.0",
)
R_UNRECOGNIZED = Reply(500, "Invalid command: Command unrecognized", "5.5.1")
R_WIZ = Reply(500, "Invalid command: this feature is not supported yet ;-)", "5.5.1")
R_NO_ARGS = Reply(500, "Invalid command arguments: command does not accept arguments.", "5.5.4")
R_BAD_SEQUENCE = Reply(503, "Invalid command: Command not allowed at this point.", "5.5.1")
R_ALREADY_IDENTIFIED = Reply(503, "Invalid command: Already identified", "5.5.1")
R_BAD_DOMAIN = Reply(501, "Invalid command arguments: Invalid domain name", "5.5.4")
R_NOT_SUPPORTED = Reply(503, "Invalid command: Command not supported", "5.5.1")
R_ALREADY_SECURE = Reply(503, "Invalid command: Channel already secured", "5.5.1")
R_NO_PARAMS_ALLOWED = Reply(501, "Invalid command arguments: No parameters allowed", "5.5.4")
R_ALREADY_AUTH = Reply(503, "Invalid command: Already authenticated", "5.5.1")
R_AUTH_NO_PARAMS = Reply(501, "Invalid command arguments: No parameters given", "5.5.4")
R_AUTH_SYNTAX = Reply(501, "Syntax error: Syntax error", "5.5.2")
R_NEED_TLS = Reply(530, "Invalid command: Must issue a STARTTLS command first", "5.5.1")
R_NEED_AUTH = Reply(530, "Invalid command: Must issue an AUTH command first", "5.5.1")
R_TOO_MANY_MAILS = Reply(452, "Too many recipients: Too many messages sent", "4.5.3")
R_TOO_MANY_RCPTS = Reply(451, "Too many recipients: Too many recipients", "4.5.3")
R_SENDER_SYNTAX = Reply(553, "Sender address syntax error", "5.1.0")
R_RCPT_SYNTAX = Reply(501, "Recipient address syntax error", "5.1.3")
R_SIZE_EXCEEDED = Reply(552, "Message size exceeds fixed maximum message size", "5.3.4")
R_NO_RCPT = Reply(503, "Invalid command arguments: No recipient specified", "5.5.4")
R_NOTIFY_NEVER = Reply(553, "NOTIFY option NEVER cannot be combined with other options", "5.5.4")
R_ORCPT_SYNTAX = Reply(553, "ORCPT address syntax error", "5.5.4")
R_COMMAND_TOO_LONG = Reply(500, "Command line too long", "5.0.0")
R_TOO_BIG = Reply(554, "Message too big for system: Transaction failed, message too big", "5.3.4")
R_LINE_TOO_LONG = Reply(500, "Line too long", "5.0.0")
R_BARE_CR_LF = Reply(550, "Message refused: bare CR or LF in data", "5.5.2")
R_NUL = Reply(550, "Message refused: NUL character in data", "5.5.2")


def _unsupported(token: str, mail: bool) -> Reply:
    # MAIL says "Invalid command arguments: Unsupported option X"; OpenSMTPD's RCPT says
    # just "503 Unsupported option X" (we add the enhanced code it forgot).
    text = f"Unsupported option {token}"
    return Reply(503, f"Invalid command arguments: {text}" if mail else text, "5.5.4")


def _unknown_mechanism(mechanism: str) -> Reply:
    text = f'Security features not supported: AUTH method "{mechanism}" not supported'
    return Reply(504, text, "5.7.4")


def _printable(line: str) -> str:
    """A command line made safe for logs (undecodable bytes as backslash escapes)."""
    return line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _ascii_upper(text: str) -> str:
    # str.upper() maps some non-ASCII letters to ASCII ones (dotless i -> "I"): no verb.
    return text.upper() if text.isascii() else ""


def _b64_text(text: str) -> str | None:
    """A base64 AUTH response, or None if it is not base64. Bytes that are not UTF-8 (a
    Latin-1 password) are kept as surrogates: the password check hashes the bytes sent."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):  # a non-ASCII line is a ValueError
        return None
    return raw.decode("utf-8", "surrogateescape")


class _State(enum.Enum):
    WAIT_GREETING = "wait-greeting"
    COMMAND = "command"
    AUTH_PLAIN = "auth-plain"
    AUTH_LOGIN_USER = "auth-login-user"
    AUTH_LOGIN_PASS = "auth-login-pass"
    DATA = "data"
    DATA_DONE = "data-done"  # MessageEnd queued or awaiting its answer
    TLS_PENDING = "tls-pending"
    CLOSED = "closed"


@dataclass(slots=True)
class _Transaction:
    sender: str
    utf8: bool
    rcpt_count: int = 0


@dataclass(slots=True)
class _DataState:
    size: int = 0
    error: tuple[Reply, str] | None = None
    prev_crlf: bool = True  # the previous line ended with CRLF: a "." line here ends DATA
    skipping: bool = False  # inside an over-long line, discarding up to its LF
    skip_last_cr: bool = False  # last discarded byte of that line was CR


class ServerConnection:
    """One SMTP server session's protocol state. See the module docstring."""

    def __init__(self, config: ServerConfig, *, tls_active: bool = False, peer: str = "") -> None:
        self.config = config
        self._peer = peer
        self._tls = tls_active
        self._state = _State.WAIT_GREETING
        self._greeting_refused = False  # a 5xx banner: nothing but QUIT from now on
        self._buf = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._eof = False
        self._lost_reported = False
        self._helo: str | None = None
        self._extended = False
        self._auth_user: str | None = None
        self._login_user = ""
        self._auth_args = ""
        self._auth_asked = ("", "")  # mechanism, initial response: an AUTH being filtered
        self._tx: _Transaction | None = None
        self._data = _DataState()
        self._mail_count = 0

    # -- public API -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def awaiting_answer(self) -> Event | None:
        return self._pending

    @property
    def in_transaction(self) -> bool:
        return self._tx is not None

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def helo_name(self) -> str | None:
        return self._helo

    @property
    def extended(self) -> bool:
        """The client greeted with EHLO."""
        return self._extended

    @property
    def authenticated_user(self) -> str | None:
        return self._auth_user

    @property
    def mail_count(self) -> int:
        """Messages accepted (MessageEnd accepted) in this session."""
        return self._mail_count

    @property
    def buffered(self) -> int:
        """Received bytes not processed yet (for back-pressure while an answer is pending)."""
        return len(self._buf)

    def greeting(self, reply: Reply | None = None) -> None:
        """Queue the banner; input is only processed after it. A 5xx banner (a connect
        filter's ``reject``) keeps the session open until QUIT, every other command getting
        503 (RFC 5321 section 3.1; smtpd 6.8 does so); any other non-220 (421) closes it."""
        if self._state is _State.CLOSED:  # the peer left before we greeted it
            return
        if self._state is not _State.WAIT_GREETING:
            raise ProtocolError("greeting() called twice")
        if reply is None:
            reply = Reply(220, f"{self.config.hostname} ESMTP {self.config.software}")
        self._state = _State.COMMAND
        self._send(reply)
        if 500 <= reply.code < 600:
            self._greeting_refused = True
        elif reply.code != 220:
            self._close()

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise ProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
        elif self._state not in (_State.CLOSED, _State.TLS_PENDING):
            # After an accepted STARTTLS, plaintext bytes are never commands (CVE-2011-0411).
            self._buf += data

    def next_event(self) -> Event | None:
        if self._pending is not None:
            return None
        while True:
            if self._events:
                event = self._events.popleft()
                if isinstance(event, _ANSWERED):
                    self._pending = event
                return event
            if not self._step():
                break
        if self._eof and not self._lost_reported:
            self._lost_reported = True
            self._close()
            return ConnectionLost()
        return None

    def accept(self, reply: Reply | None = None) -> None:
        event = self._check_answer()
        if reply is not None:
            self._check_accept_reply(event, reply)
        self._pending = None
        if isinstance(event, Helo):
            self._helo, self._extended = event.name, event.extended
            self._tx = None
            self._send(reply or self._helo_reply(event))
        elif isinstance(event, MailFrom):
            self._tx = _Transaction(event.address, "SMTPUTF8" in event.params)
            self._send(reply or R_OK)
        elif isinstance(event, RcptTo):
            assert self._tx is not None
            self._tx.rcpt_count += 1
            self._send(reply or R_RCPT_OK)
        elif isinstance(event, DataBegin):
            self._data = _DataState()
            self._state = _State.DATA
            self._send(reply or R_DATA)
        elif isinstance(event, MessageEnd):
            self._mail_count += 1
            self._end_transaction()
            self._send(reply or R_ACCEPTED)
        elif isinstance(event, StartTLS):
            self._send(reply or R_TLS_READY)
            self._buf.clear()
            self._state = _State.TLS_PENDING
        elif isinstance(event, AuthCredentials):
            self._auth_user = event.username
            self._send(reply or R_AUTH_OK)
        elif isinstance(event, FilteredCommand):
            self._run_filtered(event.verb, reply)

    def reject(self, reply: Reply) -> None:
        event = self._check_answer()
        if reply.positive:
            raise ProtocolError(f"reject() needs a 4xx/5xx reply, got {reply.code}")
        self._pending = None
        if isinstance(event, MessageEnd):
            self._end_transaction()
        self._send(reply)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The transport is now TLS: forget everything learnt before (RFC 3207 section 4.2)."""
        if self._state is not _State.TLS_PENDING:
            raise ProtocolError("tls_started() without an accepted STARTTLS")
        self._tls = True
        self._helo, self._extended, self._auth_user, self._tx = None, False, None, None
        self._state = _State.COMMAND

    def close(self, reply: Reply | None = None) -> None:
        """The application ends the session (timeout, shutdown): queue ``reply`` if given
        (e.g. ``421 4.4.2 Timeout``); later input is ignored."""
        if reply is not None:
            self._out += reply.to_bytes()
        self._pending = None
        self._events.clear()
        self._close()

    # -- answers ----------------------------------------------------------------------

    def _check_answer(self) -> Event:
        if self._pending is None:
            raise ProtocolError("no event is waiting for an answer")
        return self._pending

    @staticmethod
    def _check_accept_reply(event: Event, reply: Reply) -> None:
        if isinstance(event, DataBegin):
            ok = 300 <= reply.code < 400
        elif isinstance(event, StartTLS):
            ok = reply.code == 220
        else:
            ok = 200 <= reply.code < 300
        if not ok:
            raise ProtocolError(f"accept() of {type(event).__name__} with a {reply.code} reply")

    def _end_transaction(self) -> None:
        self._tx = None
        if self._state is _State.DATA_DONE:
            self._state = _State.COMMAND

    def _helo_reply(self, event: Helo) -> Reply:
        cfg = self.config
        peer = self._peer
        where = "" if not peer else (f" {peer}" if ":" in peer else f" [{peer}]")
        first = f"{cfg.hostname} Hello {event.name}{where}, pleased to meet you"
        if not event.extended:
            return Reply(250, first)
        lines = [first, "8BITMIME", "ENHANCEDSTATUSCODES", f"SIZE {cfg.max_message_size}"]
        if cfg.dsn:
            lines.append("DSN")
        if cfg.starttls and not self._tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(self._mechanisms()))
        if cfg.pipelining:
            lines.append("PIPELINING")
        if cfg.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("HELP")
        return Reply(250, "\n".join(lines))

    def _mechanisms(self) -> list[str]:
        """Configured mechanisms this machine can run, in the configured order."""
        upper = (m.upper() for m in self.config.auth_mechanisms)
        return [m for m in dict.fromkeys(upper) if m in SUPPORTED_AUTH]

    def _auth_offered(self) -> bool:
        return (
            bool(self._mechanisms())
            and (self._tls or not self.config.auth_requires_tls)
            and self._auth_user is None
        )

    # -- output helpers ---------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if reply.closes_session:
            self._close()

    def _refuse(self, line: str, reply: Reply, *, bad_input: bool = False) -> None:
        self._events.append(CommandRejected(_printable(line), reply, bad_input))
        self._send(reply)

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._buf.clear()

    # -- input processing -------------------------------------------------------------

    def _step(self) -> bool:
        """Handle one command line, or every complete DATA line buffered. False: no progress."""
        state = self._state
        if state is _State.DATA:
            return self._step_data()
        if state not in (
            _State.COMMAND,
            _State.AUTH_PLAIN,
            _State.AUTH_LOGIN_USER,
            _State.AUTH_LOGIN_PASS,
        ):
            return False
        buf = self._buf
        limit = self.config.max_command_length
        lf = buf.find(b"\n")
        if lf < 0:
            if len(buf) >= limit + 2:  # the line can only end up too long
                self._command_too_long()
                return True
            return False
        raw = bytes(buf[:lf])
        del buf[: lf + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > limit:
            self._command_too_long()
            return True
        line = raw.decode("utf-8", "surrogateescape")
        if state is _State.COMMAND:
            self._command(line)
        else:
            self._auth_continue(line)
        return True

    def _command_too_long(self) -> None:
        self._refuse("", R_COMMAND_TOO_LONG, bad_input=True)
        self._close()

    def _command(self, line: str) -> None:
        head = _ascii_upper(line[:10])
        if head.startswith("MAIL FROM:"):
            verb, rest = "MAIL FROM", line[10:]
        elif head.startswith("RCPT TO:"):
            verb, rest = "RCPT TO", line[8:]
        else:
            word, _, rest = line.partition(" ")
            verb = _ascii_upper(word)
        args = rest.strip(" \t") or None
        if self._greeting_refused and verb not in ("QUIT", "NOOP"):  # (smtpd: NOOP 250)
            self._refuse(_printable(line), R_BAD_SEQUENCE)
        elif verb in ("HELO", "EHLO"):
            self._cmd_helo(line, args, verb == "EHLO")
        elif verb == "MAIL FROM":
            self._cmd_mail(line, args)
        elif verb == "RCPT TO":
            self._cmd_rcpt(line, args)
        elif verb == "DATA":
            self._cmd_data(line, args)
        elif verb == "RSET":
            self._cmd_rset(line, args)
        elif verb == "QUIT":
            self._cmd_quit(line, args)
        elif verb == "NOOP":
            self._simple("NOOP")
        elif verb == "HELP":
            if args is None:
                self._simple("HELP")
            else:
                self._refuse(line, R_NO_ARGS)
        elif verb == "VRFY":
            # RFC 5321 3.5.3: never confirm or deny a user; say the mail would be tried.
            if args:
                self._send(R_VRFY)
            else:
                self._refuse(line, R_VRFY_SYNTAX)
        elif verb == "WIZ":
            self._refuse(line, R_WIZ if args is None else R_NO_ARGS)
        elif verb == "STARTTLS":
            self._cmd_starttls(line, args)
        elif verb == "AUTH":
            self._cmd_auth(line, args)
        else:
            self._refuse(line, R_UNRECOGNIZED)

    def _cmd_helo(self, line: str, args: str | None, extended: bool) -> None:
        if self._helo is not None:
            self._refuse(line, R_ALREADY_IDENTIFIED)
        elif args is None:
            verb = "EHLO" if extended else "HELO"
            self._refuse(line, Reply(501, f"Invalid command: {verb} requires domain name", "5.5.1"))
        elif not valid_domain(args):
            self._refuse(line, R_BAD_DOMAIN)
        else:
            self._events.append(Helo(args, extended))

    def _cmd_mail(self, line: str, args: str | None) -> None:
        cfg = self.config
        if self._helo is None or self._tx is not None:
            return self._refuse(line, R_BAD_SEQUENCE)
        if cfg.tls_required and not self._tls:
            return self._refuse(line, R_NEED_TLS)
        if cfg.auth_required and self._auth_user is None:
            return self._refuse(line, R_NEED_AUTH)
        if self._mail_count >= cfg.max_mails:
            return self._refuse(line, R_TOO_MANY_MAILS)
        try:
            # 8-bit is checked again below, once we know whether SMTPUTF8 was given.
            _, rest = parse_path(
                args or "", allow_null=True, utf8=True, default_domain=cfg.hostname
            )
        except AddressError:
            return self._refuse(line, R_SENDER_SYNTAX)
        try:
            tokens = parse_params(rest)
        except AddressError as exc:
            return self._refuse(line, _unsupported(str(exc), mail=True))
        utf8 = cfg.smtputf8 and any(key == "SMTPUTF8" for key, _, _ in tokens)
        try:
            address, _ = parse_path(
                args or "", allow_null=True, utf8=utf8, default_domain=cfg.hostname
            )
        except AddressError:
            return self._refuse(line, R_SENDER_SYNTAX)
        params: dict[str, str | None] = {}
        for key, value, token in tokens:
            problem = self._check_mail_param(key, value, token, params)
            if problem is not None:
                return self._refuse(line, problem)
        self._events.append(MailFrom(address, params))
        return None

    def _check_mail_param(
        self, key: str, value: str | None, token: str, params: dict[str, str | None]
    ) -> Reply | None:
        cfg = self.config
        if key in params:
            return _unsupported(token, mail=True)
        upper = value.upper() if value is not None else None
        if key == "SIZE" and value is not None and value.isascii() and value.isdigit():
            if int(value) > cfg.max_message_size:
                return R_SIZE_EXCEEDED
        elif key == "ENVID" and cfg.dsn and value is not None and _valid_xtext(value):
            if len(value) > MAX_ENVID:
                text = f"Invalid command arguments: option too large, truncated: {value}"
                return Reply(503, text, "5.5.4")
        elif (key == "BODY" and upper in ("7BIT", "8BITMIME")) or (
            key == "RET" and cfg.dsn and upper in ("FULL", "HDRS")
        ):
            value = upper
        elif not self._flag_param_ok(key, value):
            return _unsupported(token, mail=True)
        params[key] = value
        return None

    def _flag_param_ok(self, key: str, value: str | None) -> bool:
        if key == "SMTPUTF8":
            return self.config.smtputf8 and value is None
        if key == "AUTH":  # RFC 4954 section 5: the authenticated sender, or <>
            return value is not None and (value == "<>" or _valid_xtext(value))
        return False

    def _cmd_rcpt(self, line: str, args: str | None) -> None:
        cfg = self.config
        tx = self._tx
        if tx is None:
            return self._refuse(line, R_BAD_SEQUENCE)
        if tx.rcpt_count >= cfg.max_rcpt:
            return self._refuse(line, R_TOO_MANY_RCPTS)
        try:
            address, rest = parse_path(
                args or "", allow_null=False, utf8=tx.utf8, default_domain=cfg.hostname
            )
        except AddressError:
            return self._refuse(line, R_RCPT_SYNTAX)
        try:
            tokens = parse_params(rest)
        except AddressError as exc:
            return self._refuse(line, _unsupported(str(exc), mail=False))
        params: dict[str, str | None] = {}
        for key, value, token in tokens:
            problem = self._check_rcpt_param(key, value, token, params)
            if problem is not None:
                return self._refuse(line, problem)
        self._events.append(RcptTo(address, params))
        return None

    def _check_rcpt_param(
        self, key: str, value: str | None, token: str, params: dict[str, str | None]
    ) -> Reply | None:
        if key in params or not self.config.dsn or value is None:
            return _unsupported(token, mail=False)
        if key == "NOTIFY":
            words = value.upper().split(",")
            if any(w not in ("SUCCESS", "FAILURE", "DELAY", "NEVER") for w in words):
                return _unsupported(token, mail=False)
            if "NEVER" in words and len(set(words)) > 1:
                return R_NOTIFY_NEVER
            params[key] = value.upper()
            return None
        if key == "ORCPT":
            addr_type, sep, xtext = value.partition(";")
            if not sep or not addr_type.isascii() or not addr_type or not xtext:
                return R_ORCPT_SYNTAX
            if not _valid_xtext(xtext):
                return R_ORCPT_SYNTAX
            params[key] = value
            return None
        return _unsupported(token, mail=False)

    def _cmd_data(self, line: str, args: str | None) -> None:
        if args is not None:
            self._refuse(line, R_NO_ARGS)
        elif self._tx is None:
            self._refuse(line, R_BAD_SEQUENCE)
        elif self._tx.rcpt_count == 0:
            self._refuse(line, R_NO_RCPT)
        else:
            self._events.append(DataBegin())

    def _cmd_rset(self, line: str, args: str | None) -> None:
        if args is not None:
            self._refuse(line, R_NO_ARGS)
        elif self._helo is None:
            self._refuse(line, R_BAD_SEQUENCE)
        else:
            self._simple("RSET")

    def _cmd_quit(self, line: str, args: str | None) -> None:
        if args is not None:
            self._refuse(line, R_NO_ARGS)
            return
        self._simple("QUIT")

    def _simple(self, verb: str) -> None:
        """A valid RSET/QUIT/NOOP/HELP: run it, or ask the application first."""
        if verb in self.config.filtered_commands:
            self._events.append(FilteredCommand(verb))
        else:
            self._run_filtered(verb, None)

    def _run_filtered(self, verb: str, reply: Reply | None) -> None:
        if verb == "RSET":
            self._tx = None
            self._send(reply or R_RESET)
            self._events.append(Reset())
        elif verb == "QUIT":
            self._send(reply or R_BYE)
            self._events.append(Quit())
            self._close()
        elif verb == "NOOP":
            self._send(reply or R_OK)
        elif verb == "AUTH":
            self._auth_start(*self._auth_asked)
        else:
            self._send(reply or R_HELP)

    def _cmd_starttls(self, line: str, args: str | None) -> None:
        if self._helo is None or self._tx is not None:
            self._refuse(line, R_BAD_SEQUENCE)
        elif not self.config.starttls:
            self._refuse(line, R_NOT_SUPPORTED)
        elif self._tls:
            self._refuse(line, R_ALREADY_SECURE)
        elif args is not None:
            self._refuse(line, R_NO_PARAMS_ALLOWED)
        else:
            self._events.append(StartTLS())

    # -- AUTH (RFC 4954) ----------------------------------------------------------------

    def _cmd_auth(self, line: str, args: str | None) -> None:
        mechanism, _, initial = (args or "").partition(" ")
        mechanism = _ascii_upper(mechanism) or mechanism
        initial = initial.strip(" \t")
        self._auth_args = args or ""
        # Never let a credential reach a log line.
        shown = f"AUTH {mechanism} ********" if initial else line
        if self._helo is None or self._tx is not None:
            return self._refuse(shown, R_BAD_SEQUENCE)
        if self._auth_user is not None:
            return self._refuse(shown, R_ALREADY_AUTH)
        if not self._auth_offered():
            return self._refuse(shown, R_NOT_SUPPORTED)
        if args is None:
            return self._refuse(shown, R_AUTH_NO_PARAMS)
        if mechanism not in self._mechanisms():
            return self._refuse(shown, _unknown_mechanism(_printable(mechanism)))
        if "AUTH" in self.config.filtered_commands:
            self._auth_asked = (mechanism, initial)
            self._events.append(FilteredCommand("AUTH", args))
            return None
        self._auth_start(mechanism, initial)
        return None

    def _auth_start(self, mechanism: str, initial: str) -> None:
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial)
            else:
                self._out += b"334 \r\n"
                self._state = _State.AUTH_PLAIN
        elif initial:
            self._auth_login_user(initial)
        else:
            self._out += b"334 VXNlcm5hbWU6\r\n"
            self._state = _State.AUTH_LOGIN_USER

    def _auth_continue(self, line: str) -> None:
        state = self._state
        self._state = _State.COMMAND
        if state is _State.AUTH_PLAIN:
            self._auth_plain(line)
        elif state is _State.AUTH_LOGIN_USER:
            self._auth_login_user(line)
        else:
            password = _b64_text(line)
            if password is None:
                self._refuse("AUTH LOGIN (password)", R_AUTH_SYNTAX)
            else:
                self._events.append(
                    AuthCredentials("LOGIN", self._login_user, password, "", self._auth_args)
                )
            self._login_user = ""

    def _auth_plain(self, response: str) -> None:
        # "*" (cancel) is not base64 either: 501, as OpenSMTPD.
        decoded = _b64_text(response)
        parts = decoded.split("\0") if decoded is not None else []
        if len(parts) != 3 or not parts[1] or not parts[2]:
            self._refuse("AUTH PLAIN (...)", R_AUTH_SYNTAX)
            return
        authzid, username, password = parts
        self._events.append(AuthCredentials("PLAIN", username, password, authzid, self._auth_args))

    def _auth_login_user(self, response: str) -> None:
        username = _b64_text(response)
        if username is None:
            self._refuse("AUTH LOGIN (username)", R_AUTH_SYNTAX)
            return
        self._login_user = username
        self._out += b"334 UGFzc3dvcmQ6\r\n"
        self._state = _State.AUTH_LOGIN_PASS

    # -- DATA -----------------------------------------------------------------------------

    def _step_data(self) -> bool:
        """Consume every complete line buffered; queue one DataChunk and maybe the end.

        The fast path works on whole blocks with C-level byte operations (count, find,
        replace); the line-by-line path handles the rare recovery from an over-long line.
        """
        ds = self._data
        if ds.skipping:
            return self._step_data_lines()
        buf = self._buf
        limit = self.config.max_line_length
        if ds.prev_crlf and buf.startswith(b".\r\n"):
            block, consumed, finished = b"", 3, True
        else:
            term = buf.find(b"\r\n.\r\n")
            if term >= 0:
                block, consumed, finished = bytes(buf[: term + 2]), term + 5, True
            else:
                lf = buf.rfind(b"\n")
                if lf < 0:
                    if len(buf) >= limit:  # cannot fit any more, whatever follows
                        return self._step_data_lines()
                    return False
                block, consumed, finished = bytes(buf[: lf + 1]), lf + 1, False
                if len(buf) - consumed >= limit:
                    return self._step_data_lines()
        if block:
            self._data_block(ds, block, limit)
            ds.prev_crlf = block.endswith(CRLF)
        del buf[:consumed]
        if finished:
            self._finish_data(ds)
        return True

    def _data_block(self, ds: _DataState, block: bytes, limit: int) -> None:
        """Check and unstuff complete lines (the end-of-data line excluded)."""
        if ds.error is not None:
            return
        crlf = block.count(CRLF)
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self._data_error(ds, R_BARE_CR_LF, "bare CR or LF in data")
            return
        if len(block) > limit and max(map(len, block.split(b"\n"))) + 1 > limit:
            self._data_error(ds, R_LINE_TOO_LONG, "line too long")
            return
        if b"\x00" in block:
            self._data_error(ds, R_NUL, "NUL character in data")
            return
        data = block.replace(b"\r\n.", CRLF)
        if ds.prev_crlf and data.startswith(b"."):
            data = data[1:]
        if ds.size + len(data) > self.config.max_message_size:
            self._data_error(ds, R_TOO_BIG, "message too big")
            return
        ds.size += len(data)
        self._events.append(DataChunk(data))

    def _step_data_lines(self) -> bool:
        """Line by line: used while skipping the rest of an over-long line."""
        buf = self._buf
        ds = self._data
        limit = self.config.max_line_length
        max_size = self.config.max_message_size
        out: list[bytes] = []
        pos, end = 0, len(buf)
        finished = False
        while pos < end:
            lf = buf.find(b"\n", pos)
            if ds.skipping:
                if lf < 0:
                    ds.skip_last_cr = buf[end - 1] == 0x0D
                    pos = end
                    break
                ds.prev_crlf = buf[lf - 1] == 0x0D if lf > pos else ds.skip_last_cr
                ds.skipping = False
                pos = lf + 1
                continue
            if lf < 0:
                if end - pos >= limit:  # cannot fit any more, whatever follows
                    self._data_error(ds, R_LINE_TOO_LONG, "line too long")
                    ds.skipping = True
                    ds.skip_last_cr = buf[end - 1] == 0x0D
                    pos = end
                break
            line = bytes(buf[pos : lf + 1])
            pos = lf + 1
            crlf = line.endswith(CRLF)
            if crlf and ds.prev_crlf and line == b".\r\n":
                finished = True
                break
            ds.prev_crlf = crlf
            if ds.error is not None:
                continue
            if len(line) > limit:
                self._data_error(ds, R_LINE_TOO_LONG, "line too long")
                continue
            content = line[:-2] if crlf else line[:-1]
            if not crlf or b"\r" in content:
                self._data_error(ds, R_BARE_CR_LF, "bare CR or LF in data")
                continue
            if b"\x00" in content:
                self._data_error(ds, R_NUL, "NUL character in data")
                continue
            if content.startswith(b"."):
                line = line[1:]
            if ds.size + len(line) > max_size:
                self._data_error(ds, R_TOO_BIG, "message too big")
                continue
            ds.size += len(line)
            out.append(line)
        del buf[:pos]
        if out:
            self._events.append(DataChunk(b"".join(out)))
        if finished:
            self._finish_data(ds)
        return pos > 0 or bool(out) or finished

    @staticmethod
    def _data_error(ds: _DataState, reply: Reply, reason: str) -> None:
        if ds.error is None:  # the first problem is the one reported
            ds.error = (reply, reason)

    def _finish_data(self, ds: _DataState) -> None:
        if ds.error is None:
            self._state = _State.DATA_DONE
            self._events.append(MessageEnd(ds.size))
            return
        reply, reason = ds.error
        self._state = _State.COMMAND
        self._tx = None
        self._send(reply)
        self._events.append(MessageRejected(reply, reason))
