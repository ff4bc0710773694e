"""rspamd client: ask rspamd about a message at end of data and apply its answer.

Used two ways, with the same code: in-process as the built-in filter kind ``rspamd``
(``filter NAME rspamd url URL ...`` in smtpd.conf) and as the proc filter command
``pigeon-filter-rspamd`` (:mod:`pigeon.filters.rspamd_cli`, also runs under OpenSMTPD).

The pieces are plain functions over plain data, so each can be tested alone:

* :func:`request_headers` -- the HTTP headers of rspamd's protocol from a :class:`ScanContext`;
* :func:`post_checkv2` -- POST ``/checkv2`` over HTTP(S) or a unix socket, streaming the
  message with a Content-Length (plain asyncio streams: no dependency, unix sockets for free);
* :func:`parse_reply` -- the JSON answer into a :class:`RspamdReply` (garbage raises
  :class:`RspamdError`);
* :func:`decide` -- reply + :class:`RspamdSettings` -> :class:`Verdict` and SMTP reply text;
* :func:`edit_message` -- the header edits (X-Spam*, Subject, milter add/remove, DKIM);
* :class:`RspamdScanner` -- all of the above with the error policy, a log line per scan and
  counters per action. It never raises: whatever rspamd sends, the outcome is a decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import ssl
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pigeon import metrics
from pigeon.sdk.filter import Session

__all__ = [
    "ACTIONS",
    "DEFAULT_ACTIONS",
    "HeaderEdit",
    "OnError",
    "RspamdError",
    "RspamdReply",
    "RspamdScanner",
    "RspamdSettings",
    "ScanContext",
    "ScanOutcome",
    "Verdict",
    "context_from_session",
    "decide",
    "edit_message",
    "parse_link_tls",
    "parse_reply",
    "post_checkv2",
    "request_headers",
    "smtp_reply",
]

log = logging.getLogger("pigeon.filters.rspamd")

MAX_REPLY_BYTES = 16 * 1024 * 1024  # rspamd's JSON is a few KiB; anything huge is garbage
_CHUNK = 64 * 1024
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 field name: printable ASCII except ":"
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class Verdict(StrEnum):
    """What Pigeon does with the message; the right-hand side of the action mapping."""

    ACCEPT = "accept"
    JUNK = "junk"  # accept with "X-Spam: yes" (OpenSMTPD's meaning of junk)
    REWRITE_SUBJECT = "rewrite-subject"
    TEMPFAIL = "tempfail"  # 451, the session stays up
    REJECT = "reject"  # 550


class OnError(StrEnum):
    """What to do when rspamd is down, slow or answers garbage."""

    TEMPFAIL = "tempfail"
    ACCEPT = "accept"
    ACCEPT_WITH_HEADER = "accept-with-header"


# rspamd's action names (rspamd 3.x), in the order of its metric thresholds.
ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action")

# filter-rspamd 0.1.7 behaviour, kept: greylist proceeds (rspamd's greylist *module* answers
# "soft reject"; a bare "greylist" action only appears when that module is off).
DEFAULT_ACTIONS: Mapping[str, Verdict] = {
    "reject": Verdict.REJECT,
    "soft reject": Verdict.TEMPFAIL,
    "rewrite subject": Verdict.REWRITE_SUBJECT,
    "add header": Verdict.JUNK,
    "greylist": Verdict.ACCEPT,
    "no action": Verdict.ACCEPT,
}

SPAM_VERDICTS = frozenset({Verdict.JUNK, Verdict.REWRITE_SUBJECT, Verdict.TEMPFAIL, Verdict.REJECT})


class RspamdError(Exception):
    """rspamd could not be asked or its answer makes no sense (the error policy applies)."""


@dataclass(frozen=True)
class RspamdSettings:
    """Configuration of one rspamd filter; every default is documented in docs/rspamd.md."""

    url: str = "http://localhost:11333"  # http(s)://host:port[/base] or a unix socket path
    settings_id: str | None = None
    connect_timeout: float = 5.0
    scan_timeout: float = 15.0  # above rspamd's own task_timeout (8 s)
    on_error: OnError = OnError.TEMPFAIL
    actions: Mapping[str, Verdict] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    skip_authenticated: bool = True  # no spam verdict for AUTH users; DKIM/milter still apply
    score_headers: bool = True  # X-Spam-Score, X-Spam-Action, X-Spam-Symbols
    extra_headers: tuple[tuple[str, str], ...] = ()
    mta_name: str | None = None  # overrides the listener hostname sent as MTA-Name
    error_header: str = "X-Spam-Scan"  # on-error accept-with-header: "<name>: failed (<why>)"

    def verdict_for(self, action: str) -> Verdict:
        return self.actions.get(action, DEFAULT_ACTIONS.get(action, Verdict.ACCEPT))


@dataclass(frozen=True)
class ScanContext:
    """What rspamd is told about the session and transaction (all optional)."""

    ip: str = ""
    hostname: str = ""  # rDNS name of the client
    helo: str = ""
    mail_from: str = ""
    rcpts: tuple[str, ...] = ()
    queue_id: str = ""
    user: str | None = None  # authenticated user (AUTH passed)
    mta_name: str = ""  # the listener's hostname (rspamd's authserv-id)
    tls_version: str | None = None
    tls_cipher: str | None = None
    session_id: str = ""  # for the log line only


def parse_link_tls(value: str | None) -> tuple[str | None, str | None]:
    """``TLSv1.3:TLS_AES_256_GCM_SHA384:256`` (link-tls) -> (version, cipher)."""
    if not value:
        return None, None
    parts = value.split(":")
    version = parts[0] or None
    cipher = parts[1] if len(parts) > 1 and parts[1] else None
    return version, cipher


def _client_ip(src: str | None) -> str:
    """``1.2.3.4:25`` / ``[2001:db8::1]:25`` / ``unix:/path`` (link-connect) -> the IP."""
    if not src:
        return ""
    if src.startswith("unix:"):
        return src
    if src.startswith("["):
        return src[1 : src.index("]")] if "]" in src else src[1:]
    return src.rsplit(":", 1)[0] if src.count(":") == 1 else src


def context_from_session(session: Session, *, mta_name: str = "") -> ScanContext:
    """The request context from an SDK session (``session.data["mta_name"]`` holds the
    link-greeting hostname when the filter registered for it)."""
    tls_version, tls_cipher = parse_link_tls(session.tls)
    rdns = session.rdns or ""
    return ScanContext(
        ip=_client_ip(session.src),
        hostname="unknown" if rdns in ("", "<unknown>") else rdns,  # Postfix/rspamd spelling
        helo=session.helo or "",
        mail_from=session.mail_from or "",
        rcpts=tuple(session.rcpt_to),
        queue_id=f"{session.msgid:08x}" if session.msgid is not None else "",
        user=session.auth_user,
        mta_name=str(session.data.get("mta_name") or mta_name),
        tls_version=tls_version,
        tls_cipher=tls_cipher,
        session_id=f"{session.id:016x}",
    )


def _clean_header_value(value: str) -> str:
    # A CR or LF in a request header would let a client inject HTTP headers.
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _request_ip(ip: str) -> str:
    ip = ip.strip()
    if ip.startswith("unix:") or not ip:
        return "127.0.0.1"  # what filter-rspamd sends for local (unix socket) sources
    if ip.startswith("[") and "]" in ip:
        ip = ip[1 : ip.index("]")]
    return ip.removeprefix("IPv6:")


def request_headers(ctx: ScanContext, settings: RspamdSettings) -> list[tuple[str, str]]:
    """The HTTP request headers of rspamd's protocol (``/checkv2``), in a stable order."""
    headers: list[tuple[str, str]] = [("Pass", "all"), ("Ip", _request_ip(ctx.ip))]
    optional = (
        ("Hostname", ctx.hostname),
        ("Helo", ctx.helo),
        ("From", ctx.mail_from),
    )
    headers += [(name, value) for name, value in optional if value]
    headers += [("Rcpt", rcpt) for rcpt in ctx.rcpts if rcpt]
    mta_name = settings.mta_name or ctx.mta_name
    more = (
        ("Queue-Id", ctx.queue_id),
        ("User", ctx.user or ""),
        ("MTA-Name", mta_name),
        ("Settings-ID", settings.settings_id or ""),
        ("TLS-Version", ctx.tls_version or ""),
        ("TLS-Cipher", ctx.tls_cipher or ""),
    )
    headers += [(name, value) for name, value in more if value]
    headers += list(settings.extra_headers)
    return [(name, _clean_header_value(value)) for name, value in headers]


# -- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    host: str | None
    port: int
    unix_path: str | None
    tls: bool
    path: str  # request target of /checkv2
    host_header: str


def _endpoint(url: str) -> _Endpoint:
    """http(s)://host[:port][/base], or a unix socket: ``/path``, ``unix:/path``."""
    if not url.startswith(("http://", "https://")):
        path = url.removeprefix("unix:").removeprefix("//")
        if not path:
            raise RspamdError(f"bad rspamd url: {url!r}")
        return _Endpoint(None, 0, path, False, "/checkv2", "localhost")
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:
        raise RspamdError(f"bad rspamd url: {url!r}") from exc
    if not parts.hostname:
        raise RspamdError(f"bad rspamd url: {url!r}")
    base = parts.path.rstrip("/")
    return _Endpoint(parts.hostname, port, None, tls, f"{base}/checkv2", parts.netloc)


def _body_chunks(lines: Iterable[str]) -> Iterator[bytes]:
    """The message with CRLF line ends, in chunks of about 64 KiB."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode("utf-8", "surrogateescape") + b"\r\n"
        batch.append(data)
        size += len(data)
        if size >= _CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def _body_length(lines: Sequence[str]) -> int:
    return sum(len(line.encode("utf-8", "surrogateescape")) + 2 for line in lines)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        total = 0
        while True:  # bounded by MAX_REPLY_BYTES and the scan timeout
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";")[0].strip() or b"x", 16)
            except ValueError as exc:
                raise RspamdError("bad chunked encoding from rspamd") from exc
            if size == 0:
                break
            total += size
            if total > MAX_REPLY_BYTES:
                raise RspamdError("rspamd reply too large")
            parts.append(await reader.readexactly(size))
            await reader.readline()
        return b"".join(parts)
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError as exc:
            raise RspamdError("bad Content-Length from rspamd") from exc
        if not 0 <= length <= MAX_REPLY_BYTES:
            raise RspamdError("rspamd reply too large")
        return await reader.readexactly(length)
    data = await reader.read(MAX_REPLY_BYTES + 1)
    if len(data) > MAX_REPLY_BYTES:
        raise RspamdError("rspamd reply too large")
    return data


async def _exchange(
    endpoint: _Endpoint,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    headers: Sequence[tuple[str, str]],
    lines: Sequence[str],
) -> tuple[int, bytes]:
    head = [
        f"POST {endpoint.path} HTTP/1.1",
        f"Host: {endpoint.host_header}",
        "Connection: close",
        f"Content-Length: {_body_length(lines)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    for chunk in _body_chunks(lines):
        writer.write(chunk)
        await writer.drain()
    await writer.drain()
    status_line = await reader.readline()
    match = re.match(rb"HTTP/1\.[01] (\d{3})", status_line)
    if match is None:
        raise RspamdError(f"not an HTTP reply from rspamd: {status_line[:80]!r}")
    reply_headers: dict[str, str] = {}
    for _ in range(200):  # a bounded header section
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        reply_headers[name.strip().lower()] = value.strip()
    else:
        raise RspamdError("too many HTTP headers from rspamd")
    return int(match.group(1)), await _read_body(reader, reply_headers)


async def post_checkv2(
    settings: RspamdSettings, headers: Sequence[tuple[str, str]], lines: Sequence[str]
) -> tuple[int, bytes]:
    """POST the message to ``<url>/checkv2``; returns (HTTP status, body).

    Raises :class:`RspamdError` for a bad URL, a refused or timed-out connection (connect
    timeout), no complete answer within the scan timeout, or a malformed HTTP reply.
    """
    endpoint = _endpoint(settings.url)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            if endpoint.unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    endpoint.unix_path, limit=_CHUNK
                )
            else:
                context = ssl.create_default_context() if endpoint.tls else None
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=context, limit=_CHUNK
                )
    except TimeoutError as exc:
        raise RspamdError(f"connect timeout ({settings.connect_timeout:g}s)") from exc
    except OSError as exc:
        raise RspamdError(f"cannot connect: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(settings.scan_timeout):
            return await _exchange(endpoint, reader, writer, headers, lines)
    except TimeoutError as exc:
        raise RspamdError(f"scan timeout ({settings.scan_timeout:g}s)") from exc
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        raise RspamdError(f"connection to rspamd failed: {exc!r}") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


# -- the answer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderEdit:
    """One header rspamd asks to add (``milter.add_headers``)."""

    name: str
    value: str
    order: int  # >= 0: near the top (sorted); < 0: at the end of the header section


@dataclass(frozen=True)
class RspamdReply:
    action: str
    score: float | None = None
    required_score: float | None = None
    symbols: Mapping[str, float] = field(default_factory=dict)
    smtp_message: str | None = None
    subject: str | None = None
    dkim_signatures: tuple[str, ...] = ()
    add_headers: tuple[HeaderEdit, ...] = ()
    remove_headers: tuple[tuple[str, int], ...] = ()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _add_header_entries(name: str, value: Any) -> Iterator[HeaderEdit]:
    """A milter.add_headers value: a string, ``{value, order}``, or a list of those."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str):
            # Old rspamd (and plain routines) send strings: filter-rspamd prepended them.
            yield HeaderEdit(name, item, 0)
        elif isinstance(item, dict) and isinstance(item.get("value"), str):
            order = _number(item.get("order"))
            yield HeaderEdit(name, item["value"], int(order) if order is not None else 0)


def parse_reply(body: bytes) -> RspamdReply:
    """rspamd's JSON answer; fields of the wrong type are ignored, no action is an error."""
    try:
        data = json.loads(body.decode("utf-8", "replace"))
    except ValueError as exc:
        raise RspamdError(f"invalid JSON from rspamd: {body[:60]!r}") from exc
    if not isinstance(data, dict):
        raise RspamdError("rspamd reply is not a JSON object")
    action = data.get("action")
    if not isinstance(action, str) or not action:
        raise RspamdError("rspamd reply has no action")
    symbols: dict[str, float] = {}
    raw_symbols = data.get("symbols")
    if isinstance(raw_symbols, dict):
        for name, info in raw_symbols.items():
            score = _number(info.get("score")) if isinstance(info, dict) else None
            symbols[str(name)] = score if score is not None else 0.0
    messages = data.get("messages")
    smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
    milter = data.get("milter")
    milter = milter if isinstance(milter, dict) else {}
    add = milter.get("add_headers")
    adds = [
        edit
        for name, value in (add.items() if isinstance(add, dict) else ())
        for edit in _add_header_entries(str(name), value)
    ]
    remove = milter.get("remove_headers")
    removes = [
        (str(name), int(index))
        for name, index in (remove.items() if isinstance(remove, dict) else ())
        if _number(index) is not None
    ]
    subject = data.get("subject")
    return RspamdReply(
        action=action,
        score=_number(data.get("score")),
        required_score=_number(data.get("required_score")),
        symbols=symbols,
        smtp_message=smtp_message if isinstance(smtp_message, str) else None,
        subject=subject if isinstance(subject, str) else None,
        dkim_signatures=_strings(data.get("dkim-signature")),
        add_headers=tuple(adds),
        remove_headers=tuple(removes),
    )


# -- decision --------------------------------------------------------------------------------

_DEFAULT_TEXT = {
    Verdict.REJECT: "5.7.1 Message rejected as spam",
    Verdict.TEMPFAIL: "4.7.1 Try again later",
}


def smtp_reply(verdict: Verdict, message: str | None) -> str:
    """``550 <text>`` / ``451 <text>``; rspamd's message wins, made safe for one SMTP line.

    An enhanced status code in the message whose class disagrees with the reply code (a
    ``5.7.1`` text mapped to a tempfail) gets its class fixed.
    """
    code = "550" if verdict is Verdict.REJECT else "451"
    text = " ".join((message or "").replace("\r", " ").replace("\n", " ").split())
    text = "".join(ch for ch in text if ch.isprintable())[:400]
    if not text:
        text = _DEFAULT_TEXT.get(verdict, "4.7.1 Try again later")
    match = _ENHANCED.match(text)
    if match and match.group(1) != code[0]:
        text = f"{code[0]}{text[1:]}"
    return f"{code} {text}"


def decide(
    reply: RspamdReply, settings: RspamdSettings, *, authenticated: bool
) -> tuple[Verdict, str | None]:
    """(verdict, SMTP reply for tempfail/reject or None)."""
    verdict = settings.verdict_for(reply.action)
    if authenticated and settings.skip_authenticated and verdict in SPAM_VERDICTS:
        return Verdict.ACCEPT, None
    if verdict in (Verdict.REJECT, Verdict.TEMPFAIL):
        return verdict, smtp_reply(verdict, reply.smtp_message)
    return verdict, None


# -- header edits ----------------------------------------------------------------------------


def _header_lines(name: str, value: str) -> list[str]:
    """One header as message lines: folds kept, CRs gone, no line that ends the header."""
    if not _HEADER_NAME.fullmatch(name):
        return []
    pieces = [p.rstrip() for p in re.split(r"\r\n|\r|\n", value)]
    first, rest = pieces[0].strip(), [p for p in pieces[1:] if p.strip()]
    # A continuation must start with white space, else it would be a new (injected) header.
    rest = [p if p[:1] in (" ", "\t") else f"\t{p}" for p in rest]
    return [f"{name}: {first}" if first else f"{name}:", *rest]


def _split_message(lines: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """Header fields (each with its continuation lines) and the rest (blank line + body)."""
    fields: list[list[str]] = []
    for index, line in enumerate(lines):
        if line == "":
            return fields, list(lines[index:])
        if line[:1] in (" ", "\t") and fields:
            fields[-1].append(line)
        elif ":" in line or not fields:
            fields.append([line])
        else:  # not a header: the header section ended without a blank line
            return fields, list(lines[index:])
    return fields, []


def _field_name(header: list[str]) -> str:
    return header[0].split(":", 1)[0].strip().lower()


def _remove(fields: list[list[str]], name: str, index: int) -> list[list[str]]:
    """rspamd's milter semantics: 0 = every copy, n = the nth (1-based), -n = nth from the end."""
    positions = [i for i, f in enumerate(fields) if _field_name(f) == name.lower()]
    if index == 0:
        doomed = set(positions)
    elif 0 < index <= len(positions):
        doomed = {positions[index - 1]}
    elif index < 0 and -index <= len(positions):
        doomed = {positions[index]}
    else:
        doomed = set()
    return [f for i, f in enumerate(fields) if i not in doomed]


# RFC 8617 order within an ARC set, kept when rspamd gives them the same order.
_ARC_RANK = {"arc-seal": 0, "arc-message-signature": 1, "arc-authentication-results": 2}


def _symbols_lines(symbols: Mapping[str, float]) -> list[str]:
    """``X-Spam-Symbols: A(1.25), B(0.30)`` folded under 78 columns."""
    items = [f"{name}({score:.2f})" for name, score in sorted(symbols.items())]
    lines = ["X-Spam-Symbols:"]
    for position, item in enumerate(items):
        text = item + ("," if position < len(items) - 1 else "")
        if len(lines[-1]) + 1 + len(text) > 78 and lines[-1] != "X-Spam-Symbols:":
            lines.append(f"\t{text}")
        else:
            lines[-1] += f" {text}"
    return lines


def _score_text(reply: RspamdReply) -> str:
    score = f"{reply.score:g}" if reply.score is not None else "0"
    return f"{score} / {reply.required_score:g}" if reply.required_score is not None else score


def edit_message(
    lines: Sequence[str],
    reply: RspamdReply,
    verdict: Verdict,
    *,
    score_headers: bool,
) -> list[str]:
    """The message after rspamd's edits (``lines`` without line ends, un-stuffed).

    Top of the result, in order: DKIM-Signature(s); milter headers with order >= 0 (sorted,
    ARC sets in RFC 8617 order); X-Spam: yes (junk); X-Spam-Score/-Action/-Symbols; then the
    original header section minus ``remove_headers`` (and minus forged copies of our score
    headers), the Subject replaced for rewrite-subject, and milter headers with order < 0 at
    its end.
    """
    fields, rest = _split_message(lines)
    for name, index in reply.remove_headers:
        fields = _remove(fields, name, index)
    top: list[str] = []
    for signature in reply.dkim_signatures:
        top += _header_lines("DKIM-Signature", signature)
    ordered = sorted(
        (e for e in reply.add_headers if e.order >= 0),
        key=lambda e: (e.order, _ARC_RANK.get(e.name.lower(), 3)),
    )
    for edit in ordered:
        top += _header_lines(edit.name, edit.value)
    if verdict is Verdict.JUNK and not any(
        _field_name(f) == "x-spam" and f[0].split(":", 1)[1].strip().lower() == "yes"
        for f in fields
    ):
        top.append("X-Spam: yes")
    if score_headers:
        ours = {"x-spam-score", "x-spam-action", "x-spam-symbols"}
        fields = [f for f in fields if _field_name(f) not in ours]
        top.append(f"X-Spam-Score: {_score_text(reply)}")
        top += _header_lines("X-Spam-Action", reply.action)
        if reply.symbols:
            top += _symbols_lines(reply.symbols)
    if verdict is Verdict.REWRITE_SUBJECT and reply.subject is not None:
        new_subject = _header_lines("Subject", reply.subject)
        at = next((i for i, f in enumerate(fields) if _field_name(f) == "subject"), None)
        if at is None:
            fields.append(new_subject)
        else:
            fields[at] = new_subject
    bottom: list[str] = []
    for edit in (e for e in reply.add_headers if e.order < 0):
        bottom += _header_lines(edit.name, edit.value)
    return [*top, *(line for f in fields for line in f), *bottom, *rest]


# -- the scanner -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanOutcome:
    verdict: Verdict
    reply: str | None  # the SMTP reply for tempfail/reject
    lines: list[str]  # the message to pass on (unchanged on error or reject)
    action: str  # rspamd's action, or "error"
    score: float | None
    elapsed: float
    error: str | None = None


_ERROR_REPLY = "451 4.7.1 Spam scanner unavailable, try again later"


class RspamdScanner:
    """Scan messages with one configuration; counts outcomes in :attr:`metrics`."""

    def __init__(self, settings: RspamdSettings, *, name: str = "rspamd") -> None:
        self.settings = settings
        self.name = name
        self.metrics: Counter[str] = Counter()

    async def scan(self, ctx: ScanContext, lines: Sequence[str]) -> ScanOutcome:
        """Never raises: rspamd errors follow ``on_error``; a bug in here accepts unchanged."""
        started = time.monotonic()
        try:
            outcome = await self._scan(ctx, lines, started)
        except RspamdError as exc:
            outcome = self._on_error(lines, str(exc), started)
        except Exception as exc:  # never lose mail nor wedge the session over a bug
            log.exception("%s: internal error, message passed unchanged", self.name)
            outcome = ScanOutcome(
                Verdict.ACCEPT, None, list(lines), "error", None, 0.0, f"internal: {exc!r}"
            )
        self._account(ctx, outcome)
        return outcome

    async def _scan(self, ctx: ScanContext, lines: Sequence[str], started: float) -> ScanOutcome:
        headers = request_headers(ctx, self.settings)
        status, body = await post_checkv2(self.settings, headers, lines)
        if status != 200:
            raise RspamdError(f"HTTP {status} from rspamd: {body[:60]!r}")
        reply = parse_reply(body)
        authenticated = bool(ctx.user)
        verdict, smtp = decide(reply, self.settings, authenticated=authenticated)
        skipped = authenticated and self.settings.skip_authenticated
        if verdict in (Verdict.REJECT, Verdict.TEMPFAIL):
            edited = list(lines)
        else:
            edited = edit_message(
                lines,
                reply,
                verdict,
                score_headers=self.settings.score_headers and not skipped,
            )
        elapsed = time.monotonic() - started
        return ScanOutcome(verdict, smtp, edited, reply.action, reply.score, elapsed)

    def _on_error(self, lines: Sequence[str], why: str, started: float) -> ScanOutcome:
        elapsed = time.monotonic() - started
        policy = self.settings.on_error
        if policy is OnError.TEMPFAIL:
            return ScanOutcome(
                Verdict.TEMPFAIL, _ERROR_REPLY, list(lines), "error", None, elapsed, why
            )
        edited = list(lines)
        if policy is OnError.ACCEPT_WITH_HEADER:
            edited = [*_header_lines(self.settings.error_header, f"failed ({why})"), *edited]
        return ScanOutcome(Verdict.ACCEPT, None, edited, "error", None, elapsed, why)

    def _account(self, ctx: ScanContext, outcome: ScanOutcome) -> None:
        self.metrics["scans"] += 1
        self.metrics[f"action:{outcome.action}"] += 1
        self.metrics[f"verdict:{outcome.verdict}"] += 1
        if outcome.error is not None:
            self.metrics["errors"] += 1
        known = outcome.action in ACTIONS or outcome.action == "error"
        metrics.count("rspamd_verdicts", action=outcome.action if known else "other")
        score = f"{outcome.score:g}" if outcome.score is not None else "-"
        extra = f" error={outcome.error!r}" if outcome.error else ""
        log.info(
            "%s: session=%s queue-id=%s action=%r score=%s verdict=%s time=%.0fms%s",
            self.name,
            ctx.session_id or "-",
            ctx.queue_id or "-",
            outcome.action,
            score,
            outcome.verdict,
            outcome.elapsed * 1000,
            extra,
        )
