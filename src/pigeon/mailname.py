"""The host's mail name: the default ``hostname`` of listeners, HELO, bounces and the
local names, found as smtpd's ``getmailname()`` finds it.

1. the first line of ``/etc/mailname`` (the file Debian's build of OpenSMTPD reads);
2. otherwise ``gethostname()``, and when that has no dot, its canonical name from
   ``getaddrinfo(AI_CANONNAME)`` (``/etc/hosts`` or DNS), as it is when the lookup fails.
"""

from __future__ import annotations

import socket
from functools import cache
from pathlib import Path

MAILNAME_FILE = Path("/etc/mailname")
MAX_NAME = 255


def read_mailname(path: Path = MAILNAME_FILE) -> str | None:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            line = f.readline().rstrip("\n")
    except OSError:
        return None
    return line if line and len(line) <= MAX_NAME else None


def canonical(hostname: str) -> str:
    if "." in hostname:
        return hostname
    try:
        infos = socket.getaddrinfo(hostname, None, flags=socket.AI_CANONNAME)
    except (OSError, UnicodeError):
        return hostname
    name = infos[0][3] if infos else ""
    return name or hostname


@cache
def mailname() -> str:
    return read_mailname() or canonical(socket.gethostname())
