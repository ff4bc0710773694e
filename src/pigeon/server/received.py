"""The ``Received:`` header, in OpenSMTPD's shape (delivery-queue.md 2.10)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from email.utils import formatdate


@dataclass(frozen=True, slots=True)
class ReceivedInfo:
    helo: str
    rdns: str
    ip: str  # "" for the local socket
    hostname: str  # our name (listener hostname)
    msgid: str
    esmtp: bool
    tls: str | None = None  # e.g. "TLSv1.3:TLS_AES_256_GCM_SHA384:256:NO"
    authenticated: bool = False
    auth_user: str | None = None
    received_auth: bool = False
    mask_src: bool = False
    single_rcpt: str | None = None


def _bracketed(ip: str) -> str:
    if not ip:
        return "[local]"
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f"[IPv6:{ip}]"
    except ValueError:
        pass
    return f"[{ip}]"


def received_header(info: ReceivedInfo, when: float | None = None) -> bytes:
    proto = "ESMTP" if info.esmtp else "SMTP"
    if info.tls:
        proto += "S"
    if info.authenticated:
        proto += "A"
    lines = []
    if info.mask_src:
        lines.append(f"Received: by {info.hostname} (Pigeon) with {proto} id {info.msgid}")
    else:
        lines.append(f"Received: from {info.helo} ({info.rdns} {_bracketed(info.ip)})")
        lines.append(f"\tby {info.hostname} (Pigeon) with {proto} id {info.msgid}")
    if info.tls:
        extra = f" ({info.tls})"
        if info.received_auth:
            extra += " auth=yes" if info.authenticated else " auth=no"
            if info.authenticated and info.auth_user:
                extra += f" user={info.auth_user}"
        lines[-1] += extra
    if info.single_rcpt:
        lines.append(f"\tfor <{info.single_rcpt}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{formatdate(when, localtime=True)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
