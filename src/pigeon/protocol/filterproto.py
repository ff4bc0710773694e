"""OpenSMTPD filter protocol lines, versions 0.4 to 0.7: encode and decode only.

Pure code: no I/O, no asyncio, nothing else of Pigeon. A line is a ``str`` without its
trailing newline; encoders return such lines and decoders accept them with or without one
``\\n``. Session ids, tokens, message ids and envelope ids are ``int`` and are written in
OpenSMTPD's fixed-width lower-case hex (16, 16, 8 and 16 digits).

Two directions:

* MTA -> filter: ``config|...`` handshake lines, ``report|...`` events (field order depends
  on the protocol version), ``filter|...`` requests and data-line requests.
* filter -> MTA: ``register|...`` lines, ``filter-result|...``, ``filter-dataline|...`` and
  the (buggy in OpenSMTPD) proc ``report|...`` line. Anything malformed raises
  :class:`FilterProtocolError`, so the supervisor can restart the filter instead of dying
  as smtpd does.

The MTA -> filter lines can also be decoded (:func:`decode_smtpd_line`) and the filter ->
MTA lines encoded (:func:`encode_register`, :func:`encode_filter_result`, ...), which is
what a filter written in Python needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Literal, TypeAlias, cast

__all__ = [
    "DATA_END",
    "FILTER_PHASES",
    "REPORT_EVENTS",
    "RESPONSE_PHASE_NAMES",
    "SUPPORTED_VERSIONS",
    "ConfigLine",
    "DataLineOutput",
    "Decision",
    "FilterDataLine",
    "FilterMessage",
    "FilterProtocolError",
    "FilterRegistration",
    "FilterReportEvent",
    "FilterRequest",
    "FilterResponse",
    "FilterResult",
    "FilterVersion",
    "InvalidFilterReply",
    "LinkAuth",
    "LinkConnect",
    "LinkDisconnect",
    "LinkGreeting",
    "LinkIdentify",
    "LinkTls",
    "ProcReport",
    "ProtocolClient",
    "ProtocolServer",
    "RegisterFilter",
    "RegisterReady",
    "RegisterReport",
    "ReportEvent",
    "ReportLine",
    "RequestTracker",
    "SmtpdMessage",
    "Timeout",
    "TxBegin",
    "TxCommit",
    "TxData",
    "TxEnvelope",
    "TxMail",
    "TxRcpt",
    "TxReset",
    "TxRollback",
    "decode_filter_line",
    "decode_smtpd_line",
    "dot_stuff",
    "dot_unstuff",
    "encode_config",
    "encode_connect_request",
    "encode_data_line",
    "encode_filter_dataline",
    "encode_filter_request",
    "encode_filter_result",
    "encode_register",
    "encode_report",
    "link_address",
    "parse_version",
    "stuffed_data_lines",
]

FilterVersion: TypeAlias = Literal["0.4", "0.5", "0.6", "0.7"]
SUPPORTED_VERSIONS: tuple[FilterVersion, ...] = ("0.4", "0.5", "0.6", "0.7")

# The 19 report events smtpd 6.8-7.x knows (register|report|smtp-in|EVENT); "*" means all.
REPORT_EVENTS: frozenset[str] = frozenset(
    {
        "link-connect",
        "link-disconnect",
        "link-greeting",
        "link-identify",
        "link-tls",
        "link-auth",
        "tx-reset",
        "tx-begin",
        "tx-mail",
        "tx-rcpt",
        "tx-envelope",
        "tx-data",
        "tx-commit",
        "tx-rollback",
        "protocol-client",
        "protocol-server",
        "filter-report",
        "filter-response",
        "timeout",
    }
)

# Request phases accepted by register|filter (rset..wiz are undocumented but accepted).
FILTER_PHASES: frozenset[str] = frozenset(
    {
        "connect",
        "helo",
        "ehlo",
        "starttls",
        "auth",
        "mail-from",
        "rcpt-to",
        "data",
        "data-line",
        "rset",
        "quit",
        "noop",
        "help",
        "wiz",
        "commit",
    }
)

# The filter-response report names a phase differently from the request for two phases.
RESPONSE_PHASE_NAMES: dict[str, str] = {
    phase: {"connect": "connected", "starttls": "tls"}.get(phase, phase) for phase in FILTER_PHASES
}

DATA_END = "."
"""The line that ends a data-line stream, in both directions."""

SUBSYSTEMS = ("smtp-in", "smtp-out")

_HEX_ID = re.compile(r"[0-9a-fA-F]{1,16}")
_TIMESTAMP = re.compile(r"[0-9]+\.[0-9]{6}")
# util.c valid_smtp_response() plus the 4xx/5xx requirement of a reject/disconnect.
_REJECT_REPLY = re.compile(r"[45][0-9][0-9] .+", re.DOTALL)


class FilterProtocolError(Exception):
    """A filter sent a line that breaks the protocol; the filter should be restarted."""


# ---------------------------------------------------------------------------------------
# versions and small helpers


def parse_version(text: str) -> FilterVersion:
    """Return ``text`` as a supported protocol version, or raise FilterProtocolError."""
    if text not in SUPPORTED_VERSIONS:
        raise FilterProtocolError(f"unsupported filter protocol version {text!r}")
    return text


def _at_least(version: FilterVersion, minimum: FilterVersion) -> bool:
    return SUPPORTED_VERSIONS.index(version) >= SUPPORTED_VERSIONS.index(minimum)


def _timestamp(seconds: float) -> str:
    # smtpd prints "%lld.%06ld"; a double keeps microseconds exact for current epochs.
    return f"{seconds:.6f}"


def _id16(value: int) -> str:
    return f"{value:016x}"


def _id8(value: int) -> str:
    return f"{value:08x}"


def _no_newline(*values: str) -> None:
    for value in values:
        if "\n" in value:
            raise ValueError(f"protocol field contains a newline: {value!r}")


def _strip_newline(line: str) -> str:
    return line[:-1] if line.endswith("\n") else line


def link_address(host: str, port: int) -> str:
    """``src``/``dest`` of link-connect: ``1.2.3.4:25`` or ``[2001:db8::1]:25``."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def dot_stuff(line: str) -> str:
    """Stuff one body line the way it travels in the data-line stream (``.x`` -> ``..x``)."""
    return "." + line if line.startswith(".") else line


def dot_unstuff(line: str) -> str:
    """Undo :func:`dot_stuff` on one line received from a data-line filter."""
    return line[1:] if line.startswith(".") else line


def stuffed_data_lines(lines: Iterable[str]) -> Iterator[str]:
    """Turn unstuffed message lines into a data-line stream: stuffed, then ``.``."""
    for line in lines:
        yield dot_stuff(line)
    yield DATA_END


# ---------------------------------------------------------------------------------------
# MTA -> filter: config handshake


def encode_config(
    version: FilterVersion,
    *,
    smtpd_version: str,
    admd: str,
    session_timeout: int = 300,
    subsystem: str = "smtp-in",
) -> list[str]:
    """The ``config|...`` lines ending in ``config|ready``, in smtpd's order.

    ``config|protocol|VERSION`` is only sent for 0.7, as smtpd 7.6+ does; 6.x (0.4-0.6)
    never sent it and old filters may not ignore it gracefully.
    """
    _no_newline(smtpd_version, admd, subsystem)
    lines = [f"config|smtpd-version|{smtpd_version}"]
    if _at_least(version, "0.7"):
        lines.append(f"config|protocol|{version}")
    lines += [
        f"config|smtp-session-timeout|{session_timeout}",
        f"config|subsystem|{subsystem}",
        f"config|admd|{admd}",
        "config|ready",
    ]
    return lines


# ---------------------------------------------------------------------------------------
# MTA -> filter: report events


@dataclass(frozen=True)
class ReportEvent:
    """Base of the report events; ``params`` gives the fields after the session id."""

    name: ClassVar[str]

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class LinkConnect(ReportEvent):
    name: ClassVar[str] = "link-connect"
    rdns: str  # PTR name, or "<unknown>" (what 6.8 sends when there is none)
    fcrdns: str  # "pass" | "fail" | "error"
    src: str  # see link_address(); "unix:/var/run/smtpd.sock" on the local socket
    dest: str

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.rdns, self.fcrdns, self.src, self.dest)


@dataclass(frozen=True)
class LinkGreeting(ReportEvent):
    name: ClassVar[str] = "link-greeting"
    hostname: str

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.hostname,)


@dataclass(frozen=True)
class LinkIdentify(ReportEvent):
    name: ClassVar[str] = "link-identify"
    method: str  # "HELO" | "EHLO"
    identity: str

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.method, self.identity)


@dataclass(frozen=True)
class LinkTls(ReportEvent):
    name: ClassVar[str] = "link-tls"
    tls: str  # "TLSv1.3:TLS_AES_256_GCM_SHA384:256"

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.tls,)


@dataclass(frozen=True)
class LinkAuth(ReportEvent):
    name: ClassVar[str] = "link-auth"
    username: str
    result: str  # "pass" | "fail" | "error"

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        # 0.7 moved the user name last: it is the only field that may contain "|".
        if _at_least(version, "0.7"):
            return (self.result, self.username)
        return (self.username, self.result)


@dataclass(frozen=True)
class LinkDisconnect(ReportEvent):
    name: ClassVar[str] = "link-disconnect"


@dataclass(frozen=True)
class TxReset(ReportEvent):
    name: ClassVar[str] = "tx-reset"
    msgid: int

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid),)


@dataclass(frozen=True)
class TxBegin(ReportEvent):
    name: ClassVar[str] = "tx-begin"
    msgid: int

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid),)


@dataclass(frozen=True)
class TxMail(ReportEvent):
    name: ClassVar[str] = "tx-mail"
    msgid: int
    result: str  # "ok" | "permfail" | "tempfail"
    address: str  # without <> and ESMTP parameters, as the client sent it

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        # 0.6 moved the address last for the same reason as link-auth in 0.7.
        if _at_least(version, "0.6"):
            return (_id8(self.msgid), self.result, self.address)
        return (_id8(self.msgid), self.address, self.result)


@dataclass(frozen=True)
class TxRcpt(TxMail):
    name: ClassVar[str] = "tx-rcpt"


@dataclass(frozen=True)
class TxEnvelope(ReportEvent):
    name: ClassVar[str] = "tx-envelope"
    msgid: int
    evpid: int

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid), _id16(self.evpid))


@dataclass(frozen=True)
class TxData(ReportEvent):
    name: ClassVar[str] = "tx-data"
    msgid: int
    result: str  # "ok" | "permfail" | "tempfail"

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid), self.result)


@dataclass(frozen=True)
class TxCommit(ReportEvent):
    name: ClassVar[str] = "tx-commit"
    msgid: int
    size: int  # bytes written to the spool, the MTA's own headers included

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid), str(self.size))


@dataclass(frozen=True)
class TxRollback(ReportEvent):
    name: ClassVar[str] = "tx-rollback"
    msgid: int

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (_id8(self.msgid),)


@dataclass(frozen=True)
class ProtocolClient(ReportEvent):
    name: ClassVar[str] = "protocol-client"
    line: str  # AUTH credentials must already be masked by the caller

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.line,)


@dataclass(frozen=True)
class ProtocolServer(ReportEvent):
    name: ClassVar[str] = "protocol-server"
    line: str  # one physical reply line ("250-8BITMIME")

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.line,)


@dataclass(frozen=True)
class FilterReportEvent(ReportEvent):
    """``filter-report``: a builtin ``report`` action or a proc's report."""

    name: ClassVar[str] = "filter-report"
    kind: str  # "builtin" | "proc"
    filter_name: str
    message: str

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        return (self.kind, self.filter_name, self.message)


@dataclass(frozen=True)
class FilterResponse(ReportEvent):
    """``filter-response``: what the chain decided for a phase.

    ``phase`` is the report's own phase name (see RESPONSE_PHASE_NAMES: ``connected``,
    ``tls``); ``response`` a :class:`Decision` value; ``param`` the reject/disconnect text
    or the rewrite value.
    """

    name: ClassVar[str] = "filter-response"
    phase: str
    response: str
    param: str | None = None

    def params(self, version: FilterVersion) -> tuple[str, ...]:
        if self.param is None:
            return (self.phase, self.response)
        return (self.phase, self.response, self.param)


@dataclass(frozen=True)
class Timeout(ReportEvent):
    name: ClassVar[str] = "timeout"


_EVENT_TYPES: dict[str, type[ReportEvent]] = {
    cls.name: cls
    for cls in (
        LinkConnect,
        LinkGreeting,
        LinkIdentify,
        LinkTls,
        LinkAuth,
        LinkDisconnect,
        TxReset,
        TxBegin,
        TxMail,
        TxRcpt,
        TxEnvelope,
        TxData,
        TxCommit,
        TxRollback,
        ProtocolClient,
        ProtocolServer,
        FilterReportEvent,
        FilterResponse,
        Timeout,
    )
}


def encode_report(
    version: FilterVersion,
    timestamp: float,
    session: int,
    event: ReportEvent,
    subsystem: str = "smtp-in",
) -> str:
    """``report|VERSION|TS|smtp-in|EVENT|SESSION[|PARAMS...]`` in the version's field order.

    Only the last parameter may contain ``|`` unambiguously; smtpd prints other fields as
    they are and so do we (only a newline, which would break framing, is refused).
    """
    params = event.params(version)
    _no_newline(subsystem, *params)
    head = f"report|{version}|{_timestamp(timestamp)}|{subsystem}|{event.name}|{_id16(session)}"
    return "|".join((head, *params)) if params else head


# ---------------------------------------------------------------------------------------
# MTA -> filter: filter requests and data lines


def encode_filter_request(
    version: FilterVersion, timestamp: float, session: int, token: int, phase: str, param: str = ""
) -> str:
    """``filter|VERSION|TS|smtp-in|PHASE|SESSION|TOKEN|PARAM`` for every phase but connect
    and data-line (use :func:`encode_connect_request` and :func:`encode_data_line`).

    ``param`` is the HELO/EHLO name, the AUTH arguments, the MAIL/RCPT address without
    ``<>`` and parameters, and empty for the other phases (the line then ends in ``|``).
    """
    if phase not in FILTER_PHASES:
        raise ValueError(f"unknown filter phase {phase!r}")
    if phase in ("connect", "data-line"):
        raise ValueError(f"use the dedicated encoder for the {phase} phase")
    return _request(version, timestamp, session, token, phase, param)


def encode_connect_request(
    version: FilterVersion, timestamp: float, session: int, token: int, rdns: str, address: str
) -> str:
    """The connect request: ``...|connect|SESSION|TOKEN|RDNS|ADDRESS``.

    ``address`` is the bare client address (``127.0.0.1``, ``[2001:db8::1]``, or ``local``
    for the local socket).
    """
    _no_newline(rdns)
    return _request(version, timestamp, session, token, "connect", f"{rdns}|{address}")


def encode_data_line(
    version: FilterVersion, timestamp: float, session: int, token: int, line: str
) -> str:
    """One data-line request; ``line`` is still dot-stuffed, ``.`` ends the message."""
    return _request(version, timestamp, session, token, "data-line", line)


def _request(
    version: FilterVersion, timestamp: float, session: int, token: int, phase: str, param: str
) -> str:
    _no_newline(param)
    return (
        f"filter|{version}|{_timestamp(timestamp)}|smtp-in|{phase}"
        f"|{_id16(session)}|{_id16(token)}|{param}"
    )


# ---------------------------------------------------------------------------------------
# filter -> MTA: decoded messages


class Decision(StrEnum):
    PROCEED = "proceed"
    JUNK = "junk"
    REJECT = "reject"
    DISCONNECT = "disconnect"
    REWRITE = "rewrite"
    REPORT = "report"  # 0.7 only: report PARAM as filter-response and proceed


@dataclass(frozen=True)
class RegisterReport:
    subsystem: str  # "smtp-in" (or "smtp-out": accepted, never emitted)
    event: str  # one of REPORT_EVENTS, or "*"


@dataclass(frozen=True)
class RegisterFilter:
    subsystem: str  # always "smtp-in" (normalised to lower case)
    phase: str  # one of FILTER_PHASES


@dataclass(frozen=True)
class RegisterReady:
    pass


@dataclass(frozen=True)
class FilterResult:
    session: int
    token: int
    decision: Decision
    param: str | None = None  # reply text for reject/disconnect, value for rewrite/report


@dataclass(frozen=True)
class FilterDataLine:
    session: int
    token: int
    line: str  # dot-stuffed; "." ends the filter's output for this message


@dataclass(frozen=True)
class ProcReport:
    """``report|SECONDS.MICROS|smtp-in|SESSION|MESSAGE`` sent by a filter process.

    smtpd (6.6-7.8) crashes on this line; Pigeon should broadcast it as
    ``filter-report|proc|NAME|MESSAGE`` (filter-protocol.md section 7).
    """

    timestamp: float
    subsystem: str
    session: int
    message: str


FilterMessage: TypeAlias = (
    RegisterReport | RegisterFilter | RegisterReady | FilterResult | FilterDataLine | ProcReport
)


class InvalidFilterReply(FilterProtocolError):
    """reject/disconnect text that is not a ``4xx``/``5xx`` SMTP reply.

    smtpd does not treat this as fatal: it answers ``421 Internal server error`` and drops
    the client. ``result`` carries the decoded line so the caller can do the same.
    """

    def __init__(self, message: str, result: FilterResult) -> None:
        super().__init__(message)
        self.result = result


def decode_filter_line(line: str, version: FilterVersion) -> FilterMessage:
    """Decode one line a filter wrote on its stdout.

    ``version`` is the protocol version the MTA speaks with this filter: before 0.5 the
    results carry ``TOKEN|SESSION`` instead of ``SESSION|TOKEN``, and the ``report``
    decision exists only in 0.7.
    """
    line = _strip_newline(line)
    keyword, _, rest = line.partition("|")
    if keyword == "register":
        return _decode_register(line, rest)
    if keyword in ("filter-result", "filter-dataline"):
        first, second, payload = _split_ids(line, rest)
        session, token = (first, second) if _at_least(version, "0.5") else (second, first)
        if keyword == "filter-dataline":
            return FilterDataLine(session, token, payload)
        return _decode_result(line, session, token, payload, version)
    if keyword == "report":
        return _decode_proc_report(line, rest)
    raise FilterProtocolError(f"unknown filter message: {line!r}")


def _decode_register(line: str, rest: str) -> FilterMessage:
    if rest == "ready":
        return RegisterReady()
    fields = rest.split("|")
    if len(fields) != 3 or fields[0] not in ("report", "filter"):
        raise FilterProtocolError(f"invalid register line: {line!r}")
    kind, subsystem, name = fields
    if kind == "report":
        if subsystem not in SUBSYSTEMS:
            raise FilterProtocolError(f"invalid report subsystem: {line!r}")
        if name != "*" and name not in REPORT_EVENTS:
            raise FilterProtocolError(f"unknown report event: {line!r}")
        return RegisterReport(subsystem, name)
    # smtpd compares the filter subsystem case-insensitively, and only smtp-in exists.
    if subsystem.lower() != "smtp-in":
        raise FilterProtocolError(f"invalid filter subsystem: {line!r}")
    if name not in FILTER_PHASES:
        raise FilterProtocolError(f"unknown filter phase: {line!r}")
    return RegisterFilter("smtp-in", name)


def _parse_hex(text: str, what: str, line: str) -> int:
    if not _HEX_ID.fullmatch(text):
        raise FilterProtocolError(f"invalid {what} {text!r}: {line!r}")
    return int(text, 16)


def _split_ids(line: str, rest: str) -> tuple[int, int, str]:
    fields = rest.split("|", 2)
    if len(fields) != 3:
        raise FilterProtocolError(f"missing fields: {line!r}")
    return (
        _parse_hex(fields[0], "id", line),
        _parse_hex(fields[1], "id", line),
        fields[2],
    )


def _decode_result(
    line: str, session: int, token: int, payload: str, version: FilterVersion
) -> FilterResult:
    word, sep, param = payload.partition("|")
    try:
        decision = Decision(word)
    except ValueError:
        raise FilterProtocolError(f"unknown filter decision: {line!r}") from None
    if decision is Decision.REPORT and not _at_least(version, "0.7"):
        raise FilterProtocolError(f"report decision needs protocol 0.7: {line!r}")
    if decision in (Decision.PROCEED, Decision.JUNK):
        # smtpd compares the whole remainder with "proceed"/"junk": a parameter is fatal.
        if sep:
            raise FilterProtocolError(f"unexpected parameter: {line!r}")
        return FilterResult(session, token, decision)
    if not sep:
        raise FilterProtocolError(f"missing parameter: {line!r}")
    result = FilterResult(session, token, decision, param)
    if decision in (Decision.REJECT, Decision.DISCONNECT) and not _REJECT_REPLY.fullmatch(param):
        raise InvalidFilterReply(f"invalid SMTP reply in filter result: {line!r}", result)
    return result


def _decode_proc_report(line: str, rest: str) -> ProcReport:
    fields = rest.split("|", 3)
    if len(fields) != 4:
        raise FilterProtocolError(f"invalid report line: {line!r}")
    timestamp, subsystem, session, message = fields
    if not _TIMESTAMP.fullmatch(timestamp):
        raise FilterProtocolError(f"invalid report timestamp: {line!r}")
    if subsystem != "smtp-in":
        raise FilterProtocolError(f"invalid report subsystem: {line!r}")
    return ProcReport(float(timestamp), subsystem, _parse_hex(session, "session", line), message)


# ---------------------------------------------------------------------------------------
# filter -> MTA: encoding (for filters written in Python, and tests)


def encode_register(message: RegisterReport | RegisterFilter | RegisterReady) -> str:
    if isinstance(message, RegisterReady):
        return "register|ready"
    if isinstance(message, RegisterReport):
        return f"register|report|{message.subsystem}|{message.event}"
    return f"register|filter|{message.subsystem}|{message.phase}"


def encode_filter_result(version: FilterVersion, result: FilterResult) -> str:
    ids = _ids_for(version, result.session, result.token)
    if result.param is None:
        return f"filter-result|{ids}|{result.decision}"
    _no_newline(result.param)
    return f"filter-result|{ids}|{result.decision}|{result.param}"


def encode_filter_dataline(version: FilterVersion, message: FilterDataLine) -> str:
    _no_newline(message.line)
    return f"filter-dataline|{_ids_for(version, message.session, message.token)}|{message.line}"


def _ids_for(version: FilterVersion, session: int, token: int) -> str:
    if _at_least(version, "0.5"):
        return f"{_id16(session)}|{_id16(token)}"
    return f"{_id16(token)}|{_id16(session)}"


# ---------------------------------------------------------------------------------------
# MTA -> filter: decoding (for filters written in Python, and transcript tests)


@dataclass(frozen=True)
class ConfigLine:
    key: str  # "ready" for the last line, then value is ""
    value: str


@dataclass(frozen=True)
class ReportLine:
    version: FilterVersion
    timestamp: float
    subsystem: str
    session: int
    event: ReportEvent


@dataclass(frozen=True)
class FilterRequest:
    """A filter request; for connect ``param`` is ``RDNS|ADDRESS`` (see rdns/address)."""

    version: FilterVersion
    timestamp: float
    phase: str
    session: int
    token: int
    param: str

    @property
    def rdns(self) -> str:
        return self.param.split("|", 1)[0]

    @property
    def address(self) -> str:
        return self.param.split("|", 1)[-1]


SmtpdMessage: TypeAlias = ConfigLine | ReportLine | FilterRequest


def decode_smtpd_line(line: str) -> SmtpdMessage:
    """Decode one line the MTA sends to a filter (the version is in the line itself)."""
    line = _strip_newline(line)
    keyword, _, rest = line.partition("|")
    if keyword == "config":
        key, _, value = rest.partition("|")
        if not key:
            raise FilterProtocolError(f"invalid config line: {line!r}")
        return ConfigLine(key, value)
    if keyword not in ("report", "filter"):
        raise FilterProtocolError(f"unknown smtpd message: {line!r}")
    head = rest.split("|", 5 if keyword == "report" else 6)
    if len(head) < 5:
        raise FilterProtocolError(f"missing fields: {line!r}")
    version = parse_version(head[0])
    if not _TIMESTAMP.fullmatch(head[1]):
        raise FilterProtocolError(f"invalid timestamp: {line!r}")
    timestamp = float(head[1])
    subsystem, name = head[2], head[3]
    session = _parse_hex(head[4], "session", line)
    if keyword == "filter":
        # The parameter field is always there, if empty ("...|TOKEN|" for data).
        if name not in FILTER_PHASES or len(head) != 7:
            raise FilterProtocolError(f"invalid filter request: {line!r}")
        token = _parse_hex(head[5], "token", line)
        return FilterRequest(version, timestamp, name, session, token, head[6])
    params = head[5] if len(head) == 6 else None
    event = _decode_event(line, version, name, params)
    return ReportLine(version, timestamp, subsystem, session, event)


# Number of fields per event; the last one takes the rest of the line.
_EVENT_ARITY: dict[str, int] = {
    "link-connect": 4,
    "link-greeting": 1,
    "link-identify": 2,
    "link-tls": 1,
    "link-auth": 2,
    "link-disconnect": 0,
    "tx-reset": 1,
    "tx-begin": 1,
    "tx-mail": 3,
    "tx-rcpt": 3,
    "tx-envelope": 2,
    "tx-data": 2,
    "tx-commit": 2,
    "tx-rollback": 1,
    "protocol-client": 1,
    "protocol-server": 1,
    "filter-report": 3,
    "timeout": 0,
}


def _decode_event(line: str, version: FilterVersion, name: str, params: str | None) -> ReportEvent:
    if name not in REPORT_EVENTS:
        raise FilterProtocolError(f"unknown report event: {line!r}")
    if name == "filter-response":
        fields = params.split("|", 2) if params is not None else []
        if len(fields) < 2:
            raise FilterProtocolError(f"missing fields: {line!r}")
        return FilterResponse(fields[0], fields[1], fields[2] if len(fields) == 3 else None)
    arity = _EVENT_ARITY[name]
    if arity == 0:
        if params is not None:
            raise FilterProtocolError(f"unexpected parameters: {line!r}")
        return _EVENT_TYPES[name]()
    fields = _split_event_params(name, version, params, arity)
    if len(fields) != arity:
        raise FilterProtocolError(f"wrong field count: {line!r}")
    try:
        return _build_event(name, version, fields)
    except ValueError:
        raise FilterProtocolError(f"invalid report fields: {line!r}") from None


def _split_event_params(
    name: str, version: FilterVersion, params: str | None, arity: int
) -> list[str]:
    """Split so that the one field which may contain ``|`` keeps it.

    That field is last in the current layouts, but it was the address in the middle of
    tx-mail/tx-rcpt before 0.6 and the user name first in link-auth before 0.7.
    """
    if params is None:
        return []
    if name in ("tx-mail", "tx-rcpt") and not _at_least(version, "0.6"):
        msgid, sep, rest = params.partition("|")
        address, sep2, result = rest.rpartition("|")
        return [msgid, address, result] if sep and sep2 else []
    if name == "link-auth" and not _at_least(version, "0.7"):
        return params.rsplit("|", 1)
    return params.split("|", arity - 1)


def _build_event(name: str, version: FilterVersion, f: list[str]) -> ReportEvent:
    if name == "link-connect":
        return LinkConnect(f[0], f[1], f[2], f[3])
    if name == "link-greeting":
        return LinkGreeting(f[0])
    if name == "link-identify":
        return LinkIdentify(f[0], f[1])
    if name == "link-tls":
        return LinkTls(f[0])
    if name == "link-auth":
        if _at_least(version, "0.7"):
            return LinkAuth(username=f[1], result=f[0])
        return LinkAuth(username=f[0], result=f[1])
    if name in ("tx-reset", "tx-begin", "tx-rollback"):
        single = cast(type[TxReset], _EVENT_TYPES[name])
        return single(_hex8(f[0]))
    if name in ("tx-mail", "tx-rcpt"):
        kind = TxRcpt if name == "tx-rcpt" else TxMail
        if _at_least(version, "0.6"):
            return kind(_hex8(f[0]), result=f[1], address=f[2])
        return kind(_hex8(f[0]), result=f[2], address=f[1])
    if name == "tx-envelope":
        return TxEnvelope(_hex8(f[0]), int(f[1], 16))
    if name == "tx-data":
        return TxData(_hex8(f[0]), f[1])
    if name == "tx-commit":
        return TxCommit(_hex8(f[0]), int(f[1]))
    if name == "protocol-client":
        return ProtocolClient(f[0])
    if name == "protocol-server":
        return ProtocolServer(f[0])
    return FilterReportEvent(f[0], f[1], f[2])  # filter-report


def _hex8(text: str) -> int:
    if len(text) != 8:
        raise ValueError(text)
    return int(text, 16)


# ---------------------------------------------------------------------------------------
# state helpers


@dataclass
class FilterRegistration:
    """What a filter registered during its handshake, and whether it said ``ready``.

    Feed every decoded line until :attr:`ready`; a non-register line before ready (fatal
    in smtpd) or a register line after it raises FilterProtocolError.
    """

    reports: set[tuple[str, str]] = field(default_factory=set)  # (subsystem, event)
    phases: set[str] = field(default_factory=set)
    ready: bool = False

    def feed(self, message: FilterMessage) -> None:
        if self.ready:
            raise FilterProtocolError(f"registration after register|ready: {message!r}")
        if isinstance(message, RegisterReady):
            self.ready = True
        elif isinstance(message, RegisterReport):
            events = REPORT_EVENTS if message.event == "*" else {message.event}
            self.reports.update((message.subsystem, event) for event in events)
        elif isinstance(message, RegisterFilter):
            self.phases.add(message.phase)
        else:
            raise FilterProtocolError(f"non-register message before register|ready: {message!r}")

    def wants_report(self, event: str, subsystem: str = "smtp-in") -> bool:
        return (subsystem, event) in self.reports

    def wants_phase(self, phase: str) -> bool:
        return phase in self.phases


class RequestTracker:
    """The requests one filter process still owes an answer for, per session.

    smtpd asks each filter strictly one phase at a time per session; a data-line request
    stays open until the filter writes the terminating ``.``. :meth:`received` checks an
    answer against that and returns the phase it answers, or None for a session that is
    no longer open (a late answer, ignored as smtpd does).
    """

    def __init__(self) -> None:
        self._open: dict[int, tuple[int, str] | None] = {}

    def open_session(self, session: int) -> None:
        self._open.setdefault(session, None)

    def close_session(self, session: int) -> None:
        self._open.pop(session, None)

    def sent(self, session: int, token: int, phase: str) -> None:
        """Record a request just written (every data-line request may be recorded)."""
        if session not in self._open:
            raise ValueError(f"session {session:016x} is not open")
        pending = self._open[session]
        if pending is not None and pending != (token, phase):
            raise ValueError(f"session {session:016x} already awaits {pending[1]}")
        self._open[session] = (token, phase)

    def pending(self, session: int) -> tuple[int, str] | None:
        return self._open.get(session)

    def received(self, message: FilterResult | FilterDataLine) -> str | None:
        if message.session not in self._open:
            return None
        pending = self._open[message.session]
        if pending is None or pending[0] != message.token:
            raise FilterProtocolError(
                f"answer for no pending request: session {message.session:016x} "
                f"token {message.token:016x}"
            )
        phase = pending[1]
        if isinstance(message, FilterDataLine):
            if phase != "data-line":
                raise FilterProtocolError(f"filter-dataline during the {phase} phase")
            if message.line == DATA_END:
                self._open[message.session] = None
            return phase
        if phase == "data-line":
            raise FilterProtocolError("filter-result during the data-line phase")
        if phase == "commit" and message.decision is Decision.JUNK:
            # smtpd: "filter-reponse junk after DATA"; the headers are already written.
            raise FilterProtocolError("junk decision in the commit phase")
        self._open[message.session] = None
        return phase


class DataLineOutput:
    """Collects one filter's ``filter-dataline`` output for one message, up to ``.``."""

    def __init__(self) -> None:
        self.lines: list[str] = []  # still dot-stuffed, without the final "."
        self.complete = False

    def feed(self, line: str) -> bool:
        """Add one output line; True once the terminating ``.`` has arrived."""
        if self.complete:
            raise FilterProtocolError("filter-dataline after the terminating '.'")
        if line == DATA_END:
            self.complete = True
        else:
            self.lines.append(line)
        return self.complete

    def unstuffed(self) -> list[str]:
        return [dot_unstuff(line) for line in self.lines]
