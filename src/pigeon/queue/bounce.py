"""Delivery status notifications (RFC 3464) for failed, delayed and delivered mail.

Pigeon writes a proper ``multipart/report; report-type=delivery-status`` (OpenSMTPD 6.8 uses
multipart/mixed and drops several fields: delivery-queue.md 1.10 lists them).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import formatdate

from pigeon.queue.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope

_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")

SUBJECTS = {
    "failed": "Delivery status notification: failed",
    "delayed": "Delivery status notification: delayed",
    "delivered": "Delivery status notification: delivered",
    "relayed": "Delivery status notification: relayed",
}

INTROS = {
    "failed": (
        "Hi!\r\n\r\n"
        "This is the MAILER-DAEMON, please DO NOT REPLY to this email.\r\n\r\n"
        "An error has occurred while attempting to deliver a message for\r\n"
        "the following list of recipients:\r\n"
    ),
    "delayed": (
        "Hi!\r\n\r\n"
        "This is the MAILER-DAEMON, please DO NOT REPLY to this email.\r\n\r\n"
        "A message is delayed for more than {delay} for the following\r\n"
        "list of recipients:\r\n"
    ),
    "delivered": (
        "Hi!\r\n\r\n"
        "This is the MAILER-DAEMON, please DO NOT REPLY to this email.\r\n\r\n"
        "Your message was successfully delivered to these recipients.\r\n"
    ),
    "relayed": (
        "Hi!\r\n\r\n"
        "This is the MAILER-DAEMON, please DO NOT REPLY to this email.\r\n\r\n"
        "Your message was relayed to these recipients, to a server that does not\r\n"
        "report their delivery: no further notification is to be expected.\r\n"
    ),
}

OUTROS = {
    "delayed": (
        "\r\nPlease note that this is only a temporary failure report.\r\n"
        "The message is kept in the queue until {until}.\r\n"
        "You DO NOT NEED to re-send the message to these recipients.\r\n"
    ),
}


@dataclass(frozen=True, slots=True)
class BounceItem:
    envelope: Envelope
    line: str  # the reply or error, e.g. "550 5.1.1 No such user"


def status_code(line: str, kind: str) -> str:
    """The enhanced status for the report: the remote's own when it gave one."""
    m = _ENHANCED.match(line)
    if m:
        return m.group(1)
    if line.startswith("Envelope expired"):
        return "4.4.7"  # delivery time expired (RFC 3463), with Action: failed
    if kind == "delivered":
        return "2.0.0"
    if kind == "delayed":
        return "4.0.0"
    if line.startswith("4"):
        return "4.0.0"
    return "5.0.0"


def _diagnostic(line: str) -> str | None:
    return f"smtp; {line}" if re.match(r"^\d{3}\b", line) else None


def _human_delay(seconds: int) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def header_part(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def build_report(
    kind: str,
    items: Sequence[BounceItem],
    original: bytes,
    *,
    hostname: str,
    now: float | None = None,
    expires_at: float | None = None,
) -> tuple[str, bytes]:
    """Return ``(recipient, message)`` of the DSN for ``items`` (same message, same sender)."""
    now = time.time() if now is None else now
    first = items[0].envelope
    boundary = f"{secrets.randbits(62)}/{hostname}"
    intro = INTROS.get(kind, INTROS["failed"]).format(delay=_human_delay(int(now - first.ctime)))
    lines = "".join(f"\r\n{i.envelope.dest}: {i.line}\r\n" for i in items)
    outro = OUTROS.get(kind, "").format(
        until=formatdate(expires_at, localtime=False) if expires_at else "it expires"
    )
    report = [f"Reporting-MTA: dns; {hostname}"]
    if first.dsn_envid:
        report.append(f"Original-Envelope-Id: {first.dsn_envid}")
    report.append(f"Arrival-Date: {formatdate(first.ctime)}")
    action = {"failed": "failed", "delayed": "delayed", "delivered": "delivered"}.get(
        kind, "relayed"
    )
    for item in items:
        env = item.envelope
        report.append("")
        if env.dsn_orcpt:
            report.append(f"Original-Recipient: {env.dsn_orcpt}")
        report.append(f"Final-Recipient: rfc822; {env.dest}")
        report.append(f"Action: {action}")
        report.append(f"Status: {status_code(item.line, kind)}")
        diag = _diagnostic(item.line)
        if diag:
            report.append(f"Diagnostic-Code: {diag}")
        if env.last_try:
            report.append(f"Last-Attempt-Date: {formatdate(env.last_try)}")
        if kind == "delayed" and expires_at:
            report.append(f"Will-Retry-Until: {formatdate(expires_at)}")
    headers_only = first.dsn_ret.upper() == "HDRS" or kind in ("delayed", "delivered", "relayed")
    if headers_only:
        attached_type = "text/rfc822-headers"
        attached = header_part(original)
    else:
        attached_type = "message/rfc822"
        attached = original
    msgid = f"<{secrets.token_hex(8)}@{hostname}>"
    head = (
        f"Subject: {SUBJECTS.get(kind, SUBJECTS['failed'])}\r\n"
        f"From: Mailer Daemon <MAILER-DAEMON@{hostname}>\r\n"
        f"To: {first.sender}\r\n"
        f"Date: {formatdate(now, localtime=True)}\r\n"
        f"Message-ID: {msgid}\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Notification\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"{intro}{lines}{outro}"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Delivery Report\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n" + "\r\n".join(report) + "\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: {'Message headers' if headers_only else 'Undelivered message'}\r\n"
        f"Content-Type: {attached_type}\r\n"
        f"\r\n"
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    if not attached.endswith(b"\r\n"):
        attached += b"\r\n"
    return first.sender, head.encode() + attached + tail


def wants_report(env: Envelope, kind: str) -> bool:
    """No bounce for a bounce; NOTIFY=NEVER/SUCCESS/DELAY/FAILURE honoured."""

    if not env.sender:
        return False
    notify = env.dsn_notify
    if notify & DSN_NEVER:
        return False
    if kind == "delivered":
        return bool(notify & DSN_SUCCESS)
    if kind == "delayed":
        return notify == 0 or bool(notify & DSN_DELAY)
    return notify == 0 or bool(notify & DSN_FAILURE)
