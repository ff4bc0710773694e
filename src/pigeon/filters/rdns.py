"""The client's reverse DNS name and forward-confirmation, as filters see them.

Only filtered sessions need this (``link-connect``, the ``rdns``/``fcrdns`` builtins).
Loopback clients are looked up in ``/etc/hosts`` only: asking DNS for ``127.0.0.2`` is
pointless and slow on hosts without a resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

from pigeon.filters.builtin import UNKNOWN_RDNS

LOOKUP_TIMEOUT = 5.0
HOSTS_FILE = Path("/etc/hosts")


def _hosts_entries(path: Path = HOSTS_FILE) -> list[tuple[str, list[str]]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for raw in text.splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 2:
            out.append((fields[0], fields[1:]))
    return out


def hosts_rdns(ip: str, path: Path = HOSTS_FILE) -> tuple[str, str]:
    """(rdns, fcrdns) from the hosts file: the first name listed for ``ip``."""
    for address, names in _hosts_entries(path):
        if address == ip:
            return names[0], "pass"
    return UNKNOWN_RDNS, "fail"


async def client_rdns(ip: str) -> tuple[str, str]:
    """(rdns name or ``<unknown>``, fcrdns ``pass``/``fail``/``error``) for a client IP."""
    if not ip:
        return "localhost", "pass"  # the local socket
    try:
        if ipaddress.ip_address(ip).is_loopback:
            return hosts_rdns(ip)
    except ValueError:
        return UNKNOWN_RDNS, "error"
    loop = asyncio.get_running_loop()
    try:
        name, _ = await asyncio.wait_for(
            loop.getnameinfo((ip, 0), socket.NI_NAMEREQD), LOOKUP_TIMEOUT
        )
    except (OSError, TimeoutError):
        return UNKNOWN_RDNS, "fail"
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(name, None), LOOKUP_TIMEOUT)
    except (OSError, TimeoutError):
        return name, "error"
    confirmed = any(str(info[4][0]) == ip for info in infos)
    return name, "pass" if confirmed else "fail"
