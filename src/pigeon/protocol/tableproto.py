"""OpenSMTPD 7.6+ table line protocol 0.1: encode and decode only.

Pure code: no I/O, nothing else of Pigeon. Lines are ``str`` without the trailing newline
(decoders accept one). The MTA sends ``config|...`` lines then requests::

    table|0.1|<sec.usec>|<table>|update|<id>
    table|0.1|<sec.usec>|<table>|check|<service>|<id>|<key>
    table|0.1|<sec.usec>|<table>|lookup|<service>|<id>|<key>
    table|0.1|<sec.usec>|<table>|fetch|<service>|<id>

and the table answers ``register|<service>`` ... ``register|ready``, then one
``<op>-result|<id>|...`` per request. Request ids are opaque strings the table echoes:
smtpd 7.6 writes a random number in decimal, later versions 8 hex digits.
Garbage from the table raises :class:`TableProtocolError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeAlias

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICES",
    "SERVICE_NAMES",
    "TableMessage",
    "TableOp",
    "TableProtocolError",
    "TableReady",
    "TableRegister",
    "TableRegistration",
    "TableRequest",
    "TableResult",
    "TableStatus",
    "decode_table_line",
    "decode_table_request",
    "encode_config",
    "encode_register",
    "encode_request",
    "encode_result",
    "format_request_id",
]

PROTOCOL_VERSION = "0.1"

# Wire names of the table services in smtpd's order (table_service_name()); "auth" is 7.6+.
SERVICE_NAMES: tuple[str, ...] = (
    "alias",
    "domain",
    "credentials",
    "netaddr",
    "userinfo",
    "source",
    "mailaddr",
    "addrname",
    "mailaddrmap",
    "relayhost",
    "string",
    "regex",
    "auth",
)
SERVICES: frozenset[str] = frozenset(SERVICE_NAMES)

_TIMESTAMP = re.compile(r"[0-9]+\.[0-9]{6}")


class TableProtocolError(Exception):
    """A table process sent a line that breaks the protocol; restart the table."""


class TableOp(StrEnum):
    UPDATE = "update"
    CHECK = "check"
    LOOKUP = "lookup"
    FETCH = "fetch"


class TableStatus(StrEnum):
    OK = "ok"  # update only
    FOUND = "found"
    NOT_FOUND = "not-found"
    ERROR = "error"  # a temporary failure (-1 in smtpd)


def format_request_id(number: int) -> str:
    """A request id as current smtpd writes it: 8 lower-case hex digits of a 32-bit number."""
    return f"{number & 0xFFFFFFFF:08x}"


def _no_newline(*values: str) -> None:
    for value in values:
        if "\n" in value or "\r" in value:
            # smtpd 7.8 refuses keys with CR or LF as well: they would break framing.
            raise ValueError(f"protocol field contains a line break: {value!r}")


def _strip_newline(line: str) -> str:
    return line[:-1] if line.endswith("\n") else line


# ---------------------------------------------------------------------------------------
# MTA -> table


def encode_config(*, smtpd_version: str, table_name: str) -> list[str]:
    """The handshake lines, ending in ``config|ready``, in smtpd's order."""
    _no_newline(smtpd_version, table_name)
    return [
        f"config|smtpd-version|{smtpd_version}",
        f"config|protocol|{PROTOCOL_VERSION}",
        f"config|tablename|{table_name}",
        "config|ready",
    ]


@dataclass(frozen=True)
class TableRequest:
    """One request. ``service`` is None for update, ``key`` is set for check/lookup only."""

    timestamp: float
    table: str
    op: TableOp
    id: str
    service: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        needs_service = self.op is not TableOp.UPDATE
        needs_key = self.op in (TableOp.CHECK, TableOp.LOOKUP)
        if needs_service != (self.service is not None) or needs_key != (self.key is not None):
            raise ValueError(f"wrong fields for a {self.op} request: {self!r}")
        if self.service is not None and self.service not in SERVICES:
            raise ValueError(f"unknown table service {self.service!r}")
        if not self.id or "|" in self.id:
            raise ValueError(f"invalid request id {self.id!r}")


def encode_request(request: TableRequest) -> str:
    """``table|0.1|TS|TABLE|OP[|SERVICE]|ID[|KEY]``; only the key may contain ``|``."""
    _no_newline(request.table, request.id, request.key or "")
    if "|" in request.table:
        raise ValueError(f"table name contains '|': {request.table!r}")
    head = f"table|{PROTOCOL_VERSION}|{request.timestamp:.6f}|{request.table}|{request.op}"
    if request.service is None:
        return f"{head}|{request.id}"
    line = f"{head}|{request.service}|{request.id}"
    return line if request.key is None else f"{line}|{request.key}"


# ---------------------------------------------------------------------------------------
# table -> MTA


@dataclass(frozen=True)
class TableRegister:
    service: str


@dataclass(frozen=True)
class TableReady:
    pass


@dataclass(frozen=True)
class TableResult:
    """``<op>-result|<id>|<status>[|<value>]``.

    ``value`` is the found value of a lookup/fetch, or the optional message of an error.
    """

    op: TableOp
    id: str
    status: TableStatus
    value: str | None = None


TableMessage: TypeAlias = TableRegister | TableReady | TableResult

_ALLOWED: dict[TableOp, tuple[TableStatus, ...]] = {
    TableOp.UPDATE: (TableStatus.OK, TableStatus.ERROR),
    TableOp.CHECK: (TableStatus.FOUND, TableStatus.NOT_FOUND, TableStatus.ERROR),
    TableOp.LOOKUP: (TableStatus.FOUND, TableStatus.NOT_FOUND, TableStatus.ERROR),
    TableOp.FETCH: (TableStatus.FOUND, TableStatus.NOT_FOUND, TableStatus.ERROR),
}


def decode_table_line(line: str) -> TableMessage:
    """Decode one line written by a table process."""
    line = _strip_newline(line)
    keyword, sep, rest = line.partition("|")
    if keyword == "register" and sep:
        if rest == "ready":
            return TableReady()
        if rest not in SERVICES:  # includes "none", which smtpd refuses too
            raise TableProtocolError(f"unknown table service: {line!r}")
        return TableRegister(rest)
    if not keyword.endswith("-result") or not sep:
        raise TableProtocolError(f"unknown table message: {line!r}")
    try:
        op = TableOp(keyword.removesuffix("-result"))
    except ValueError:
        raise TableProtocolError(f"unknown table message: {line!r}") from None
    request_id, sep, answer = rest.partition("|")
    if not request_id or not sep:
        raise TableProtocolError(f"missing fields: {line!r}")
    word, sep, value = answer.partition("|")
    try:
        status = TableStatus(word)
    except ValueError:
        raise TableProtocolError(f"unknown table status: {line!r}") from None
    if status not in _ALLOWED[op]:
        raise TableProtocolError(f"{status} is not an answer to {op}: {line!r}")
    if status is TableStatus.ERROR:
        return TableResult(op, request_id, status, value if sep else None)
    if status is TableStatus.FOUND and op in (TableOp.LOOKUP, TableOp.FETCH):
        if not value:  # smtpd: "empty response", fatal
            raise TableProtocolError(f"found without a value: {line!r}")
        return TableResult(op, request_id, status, value)
    # check's "found" may carry trailing text (smtpd compares 5 characters); drop it.
    if sep and not (op is TableOp.CHECK and status is TableStatus.FOUND):
        raise TableProtocolError(f"unexpected value: {line!r}")
    return TableResult(op, request_id, status)


@dataclass
class TableRegistration:
    """The services a table registered, and whether it said ``register|ready``.

    Raises TableProtocolError for anything but register lines before ready, for a register
    line after it, and for ``ready`` with no service registered (all fatal in smtpd).
    """

    services: set[str] = field(default_factory=set)
    ready: bool = False

    def feed(self, message: TableMessage) -> None:
        if self.ready:
            raise TableProtocolError(f"message during the handshake after ready: {message!r}")
        if isinstance(message, TableRegister):
            self.services.add(message.service)
        elif isinstance(message, TableReady):
            if not self.services:
                raise TableProtocolError("register|ready without any registered service")
            self.ready = True
        else:
            raise TableProtocolError(f"non-register message during the handshake: {message!r}")


# ---------------------------------------------------------------------------------------
# table side (for tables written in Python, and transcript tests)


def decode_table_request(line: str) -> TableRequest:
    """Decode a request line as a table process receives it."""
    line = _strip_newline(line)
    fields = line.split("|", 5)
    if len(fields) != 6 or fields[0] != "table":
        raise TableProtocolError(f"not a table request: {line!r}")
    _, version, timestamp, table, op_text, rest = fields
    if version != PROTOCOL_VERSION:
        raise TableProtocolError(f"unsupported table protocol version: {line!r}")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise TableProtocolError(f"invalid timestamp: {line!r}")
    try:
        op = TableOp(op_text)
    except ValueError:
        raise TableProtocolError(f"unknown table operation: {line!r}") from None
    service: str | None = None
    key: str | None = None
    if op is TableOp.UPDATE:
        request_id = rest
    elif op is TableOp.FETCH:
        service, _, request_id = rest.partition("|")
    else:
        parts = rest.split("|", 2)
        if len(parts) != 3:
            raise TableProtocolError(f"missing fields: {line!r}")
        service, request_id, key = parts
    try:
        return TableRequest(float(timestamp), table, op, request_id, service, key)
    except ValueError as exc:
        raise TableProtocolError(f"{exc}: {line!r}") from None


def encode_register(message: TableRegister | TableReady) -> str:
    if isinstance(message, TableReady):
        return "register|ready"
    return f"register|{message.service}"


def encode_result(result: TableResult) -> str:
    line = f"{result.op}-result|{result.id}|{result.status}"
    if result.value is None:
        return line
    _no_newline(result.value)
    return f"{line}|{result.value}"
