"""The ``Received:`` header, in OpenSMTPD's shape (delivery-queue.md 2.10).

    Received: from HELO (RDNS [1.2.3.4])
    \tby HOSTNAME (Pigeon) with ESMTPSA id MSGID (TLSv1.3:CIPHER:256:NO) auth=yes user=bob
    \tfor <rcpt@example.org>;
    \tMon, 2 Nov 2026 09:31:48 +0100 (CET)

``S``: the session used TLS; ``A``: it authenticated. The TLS details end with ``YES`` when a
client certificate was verified (listener ``verify``). ``auth=...`` appears with the
listener's ``received-auth``, on TLS sessions only, as in OpenSMTPD. ``for <...>`` only when
the message has one recipient. With ``mask-src`` the ``from`` part is left out; OpenSMTPD
then writes ``Received: `` followed by a folded ``by`` line, Pigeon puts ``by`` on the first
line (the same header once unfolded). The product name is ``Pigeon`` where OpenSMTPD writes
``OpenSMTPD``.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass


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


def _source_address(ip: str) -> str:
    """OpenSMTPD's ``[1.2.3.4]``, ``IPv6:::1`` (no brackets) or ``[local]``."""
    if not ip:
        return "[local]"
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f"IPv6:{ip}"
    except ValueError:
        pass
    return f"[{ip}]"


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def received_date(when: float | None = None) -> str:
    """Local time as OpenSMTPD's ``time_to_text``: ``Mon, 2 Nov 2026 09:31:48 +0100 (CET)``
    (day of month not padded, the zone's abbreviation in parentheses)."""
    t = time.localtime(time.time() if when is None else when)
    offset = (t.tm_gmtoff or 0) // 60
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d} "
        f"({t.tm_zone})"
    )


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
        source = _source_address(info.ip)
        lines.append(f"Received: from {info.helo} ({info.rdns} {source})")
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
    lines.append(f"\t{received_date(when)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
