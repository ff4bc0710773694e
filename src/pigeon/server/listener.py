"""Listening sockets and what each listener configures for its sessions."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pigeon.protocol.server import ServerConfig

if TYPE_CHECKING:
    from pigeon.filters.chain import FilterChain
    from pigeon.server.services import Services

BACKLOG = 4096  # OpenSMTPD's backlog of 5 collapses under reconnect storms (perf-anchors.md)

Authenticator = Callable[[str, str], Awaitable[bool]]
FILTERED_COMMANDS = frozenset({"RSET", "QUIT", "NOOP", "HELP", "AUTH"})


@dataclass
class ListenerRuntime:
    """A listener's settings, as sessions need them."""

    hostname: str
    addresses: list[tuple[str, int]] = field(default_factory=list)
    socket: bool = False  # the local enqueue socket
    tag: str | None = None
    smtps: bool = False
    ssl_context: ssl.SSLContext | None = None
    tls_required: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_required: bool = False
    authenticator: Authenticator | None = None
    # `senders <table> [masquerade]`: which MAIL FROM an authenticated user may use.
    senders: Callable[[str, str], Awaitable[str | None]] | None = None
    masquerade: bool = False
    mask_src: bool = False
    received_auth: bool = False
    dsn: bool = True
    max_message_size: int = 36700160
    max_rcpt: int = 1000
    max_mails: int = 100
    # `listen on ... filter NAME`: the chain every session of this listener goes through.
    filter_chain: FilterChain | None = None

    def server_config(self, *, tls_active: bool) -> ServerConfig:
        return ServerConfig(
            hostname=self.hostname,
            max_message_size=self.max_message_size,
            max_rcpt=self.max_rcpt,
            max_mails=self.max_mails,
            dsn=self.dsn,
            starttls=self.ssl_context is not None and not self.smtps,
            tls_required=self.tls_required,
            auth_mechanisms=self.auth_mechanisms,
            auth_requires_tls=not self.socket,
            auth_required=self.auth_required,
            # A filtered session asks its filters about these too (OpenSMTPD's phases).
            filtered_commands=FILTERED_COMMANDS if self.filter_chain is not None else frozenset(),
        )


def resolve_interface(interface: str, family: str | None = None) -> list[str]:
    """Addresses to bind for a ``listen on`` interface word."""
    word = interface.lower()
    if word in ("localhost", "lo", "lo0"):
        hosts = ["127.0.0.1", "::1"]
    elif word == "all":
        hosts = ["0.0.0.0", "::"]
    else:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in interface else socket.AF_INET, interface)
            hosts = [interface]
        except OSError:
            hosts = sorted({str(info[4][0]) for info in socket.getaddrinfo(interface, None)})
    if family == "inet4":
        hosts = [h for h in hosts if ":" not in h]
    elif family == "inet6":
        hosts = [h for h in hosts if ":" in h]
    return hosts


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def start_listener(
    services: Services, runtime: ListenerRuntime, *, serving: bool = True
) -> list[asyncio.Server]:
    """Bind every address of the listener; IPv6 loopback is skipped when the host lacks it.

    ``serving=False`` binds without accepting yet (the daemon drops root in between)."""
    from pigeon.server.session import SMTPSession

    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    ipv6 = _ipv6_available()
    for host, port in runtime.addresses:
        if ":" in host and not ipv6:
            continue
        server = await loop.create_server(
            lambda: SMTPSession(services, runtime),
            host=host,
            port=port,
            backlog=BACKLOG,
            reuse_address=True,
            ssl=runtime.ssl_context if runtime.smtps else None,
            start_serving=serving,
        )
        servers.append(server)
    return servers


def bound_ports(servers: list[asyncio.Server]) -> list[tuple[str, int]]:
    out = []
    for server in servers:
        for sock in server.sockets:
            name = sock.getsockname()
            out.append((str(name[0]), int(name[1])))
    return out
