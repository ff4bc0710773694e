"""Write proc tables in Python: one handler per service, the protocol is done for you.

A table written with this module speaks OpenSMTPD's table protocol 0.1 on stdin/stdout, so it
runs unchanged under Pigeon (``table NAME proc-exec "..."`` or as ``table-X``) and under
OpenSMTPD 7.6+ (installed as ``/usr/libexec/opensmtpd/table-X``)::

    from pigeon.sdk import Table, TableFailure

    table = Table()

    @table.lookup("alias")
    def alias(key: str) -> str | None:
        return ALIASES.get(key)          # None: not-found

    @table.check("domain")
    def domain(key: str) -> bool:
        return key in DOMAINS

    @table.fetch("source")
    def source() -> str | None: ...

    @table.on_update
    def reload() -> None: ...           # raise TableFailure to answer update-result|error

    table.run()

A handler that raises :class:`TableFailure` (or any exception: its text goes to stderr, which
the MTA logs) makes the answer ``error`` (a temporary failure for the mail). Only services
with a handler are registered; a request for another one is answered ``error``. Keys arrive
lower-cased by the MTA (the password half of an ``auth`` key keeps its case in Pigeon).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from typing import TextIO, TypeVar

from pigeon.protocol.tableproto import (
    SERVICE_NAMES,
    SERVICES,
    TableOp,
    TableProtocolError,
    TableReady,
    TableRegister,
    TableRequest,
    TableResult,
    TableStatus,
    decode_table_request,
    encode_register,
    encode_result,
)

__all__ = ["Table", "TableFailure"]

LookupHandler = Callable[[str], "str | None"]
CheckHandler = Callable[[str], bool]
FetchHandler = Callable[[], "str | None"]
UpdateHandler = Callable[[], None]
H = TypeVar("H")


class TableFailure(Exception):
    """Raise from a handler to answer ``error`` (a temporary failure); the text is sent
    along as the error message."""


class Table:
    """A proc table: register handlers with the decorators, then call :meth:`run`."""

    def __init__(self) -> None:
        self.name = ""  # the table name, from the handshake (config|tablename)
        self.config: dict[str, str] = {}  # every config|KEY|VALUE of the handshake
        self._lookups: dict[str, LookupHandler] = {}
        self._checks: dict[str, CheckHandler] = {}
        self._fetches: dict[str, FetchHandler] = {}
        self._update: UpdateHandler | None = None

    # ------------------------------------------------------------------ registration

    def lookup(self, service: str) -> Callable[[LookupHandler], LookupHandler]:
        return self._register(self._lookups, service)

    def check(self, service: str) -> Callable[[CheckHandler], CheckHandler]:
        return self._register(self._checks, service)

    def fetch(self, service: str) -> Callable[[FetchHandler], FetchHandler]:
        return self._register(self._fetches, service)

    def on_update(self, handler: UpdateHandler) -> UpdateHandler:
        self._update = handler
        return handler

    @staticmethod
    def _register(registry: dict[str, H], service: str) -> Callable[[H], H]:
        if service not in SERVICES:
            raise ValueError(f"unknown table service {service!r}")

        def decorate(handler: H) -> H:
            registry[service] = handler
            return handler

        return decorate

    def services(self) -> list[str]:
        """The services this table registers, in smtpd's service order."""
        handled = set(self._lookups) | set(self._checks) | set(self._fetches)
        return [s for s in SERVICE_NAMES if s in handled]  # in smtpd's order

    # ------------------------------------------------------------------ protocol

    def run(self) -> None:
        """Serve on stdin/stdout until the MTA closes the connection."""
        if not self.services():
            raise ValueError("a table needs at least one handler")
        # UTF-8 whatever the locale; undecodable bytes survive the round trip.
        rfile = io.TextIOWrapper(
            sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="\n"
        )
        wfile = io.TextIOWrapper(
            sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="\n"
        )
        self.serve(rfile, wfile)

    def serve(self, rfile: TextIO, wfile: TextIO) -> None:
        """Handshake, then answer one request per line, in order, until end of file."""
        for line in _lines(rfile):
            key, _, value = line.removeprefix("config|").partition("|")
            if not line.startswith("config|"):
                raise TableProtocolError(f"unexpected line during the handshake: {line!r}")
            if key == "ready":
                break
            self.config[key] = value  # unknown keys are kept and ignored
        else:
            return
        self.name = self.config.get("tablename", "")
        for service in self.services():
            wfile.write(encode_register(TableRegister(service)) + "\n")
        wfile.write(encode_register(TableReady()) + "\n")
        wfile.flush()
        for line in _lines(rfile):
            try:
                request = decode_table_request(line)
            except TableProtocolError as exc:
                # Without a valid id there is nothing to answer: say why on stderr.
                print(f"table {self.name}: ignoring bad request: {exc}", file=sys.stderr)
                continue
            wfile.write(encode_result(self.answer(request)) + "\n")
            wfile.flush()

    def answer(self, request: TableRequest) -> TableResult:
        """The result for one request (a handler's exception becomes ``error``)."""
        op, rid = request.op, request.id
        try:
            if op is TableOp.UPDATE:
                if self._update is not None:
                    self._update()
                return TableResult(op, rid, TableStatus.OK)
            service = request.service or ""
            if op is TableOp.CHECK:
                check = self._checks.get(service)
                if check is None:
                    lookup = self._lookups.get(service)
                    if lookup is None:
                        return _error(op, rid, f"service {service} not handled")
                    found = lookup(request.key or "") is not None
                else:
                    found = check(request.key or "")
                return TableResult(op, rid, TableStatus.FOUND if found else TableStatus.NOT_FOUND)
            if op is TableOp.LOOKUP:
                handler = self._lookups.get(service)
                if handler is None:
                    return _error(op, rid, f"service {service} not handled")
                return _found(op, rid, handler(request.key or ""))
            fetch = self._fetches.get(service)
            if fetch is None:
                return _error(op, rid, f"service {service} not handled")
            return _found(op, rid, fetch())
        except TableFailure as exc:
            return _error(op, rid, str(exc))
        except Exception as exc:
            print(f"table {self.name}: {op} failed: {exc!r}", file=sys.stderr)
            return _error(op, rid, None)


def _lines(rfile: TextIO) -> Iterator[str]:
    """Lines without their newline, read one at a time (never ahead: answers stay prompt)."""
    for raw in iter(rfile.readline, ""):
        yield raw.rstrip("\n")


def _found(op: TableOp, rid: str, value: str | None) -> TableResult:
    if value is None or value == "":  # an empty value is fatal for smtpd: say not-found
        return TableResult(op, rid, TableStatus.NOT_FOUND)
    if "\n" in value or "\r" in value:
        return _error(op, rid, "value contains a line break")
    return TableResult(op, rid, TableStatus.FOUND, value)


def _error(op: TableOp, rid: str, message: str | None) -> TableResult:
    if message is not None:
        message = message.replace("\n", " ").replace("\r", " ") or None
    return TableResult(op, rid, TableStatus.ERROR, message)
