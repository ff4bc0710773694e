"""The host's own addresses: what ``from local`` means.

OpenSMTPD's ``local`` is a client connecting from one of the host's own addresses (or the
local socket), not the whole loopback range: a client bound to 127.0.0.2 is not local.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache


def _ipv4_local() -> set[str]:
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    last = ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif stripped.startswith("/32 host LOCAL") and last:
            found.add(last)
    return found


def _ipv6_local() -> set[str]:
    found: set[str] = set()
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError, IndexError):
        pass
    return found


@lru_cache(maxsize=1)
def local_addresses() -> frozenset[str]:
    addrs = _ipv4_local() | _ipv6_local() | {"127.0.0.1", "::1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            addrs.add(str(info[4][0]))
    except OSError:
        pass
    return frozenset(addrs)


def is_local(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr) in local_addresses()
