"""Where and how a relay action sends mail: relay URLs, the route handed to the relay agent.

Relay URLs are OpenSMTPD's (smtpd.conf(5) ``host``): ``[scheme://][label@]host[:port]`` with
scheme ``smtp`` (opportunistic STARTTLS, the default), ``smtp+tls`` (mandatory STARTTLS),
``smtp+notls``, ``smtps`` (TLS from the first byte, port 465) or ``lmtp``. ``label`` picks the
credentials in the action's ``auth`` table, whose values are ``username:password``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from pigeon.config.model import Action

__all__ = [
    "DEFAULT_PORTS",
    "RelayRoute",
    "RelayURL",
    "RouteTLS",
    "TLSPlan",
    "parse_credentials",
    "parse_relay_url",
    "route_for",
    "tls_plan",
]

RouteTLS = Literal["opportunistic", "required", "no-verify", "none"]
Scheme = Literal["smtp", "smtp+tls", "smtp+notls", "smtps", "lmtp"]

DEFAULT_PORTS: dict[str, int] = {
    "smtp": 25,
    "smtp+tls": 25,
    "smtp+notls": 25,
    "smtps": 465,
    "lmtp": 24,
}


@dataclass(frozen=True)
class RelayURL:
    scheme: Scheme
    host: str  # a name or an address (IPv6 without brackets)
    port: int
    label: str | None = None


def parse_relay_url(text: str) -> RelayURL:
    """Parses a relay URL; raises ValueError with a readable reason."""
    scheme_text, sep, rest = text.partition("://")
    if not sep:
        scheme_text, rest = "smtp", text
    scheme = scheme_text.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"unsupported relay URL scheme: {scheme_text}://")
    label: str | None = None
    if "@" in rest:
        label, _, rest = rest.rpartition("@")
        if not label:
            raise ValueError(f"empty credentials label in relay URL: {text}")
    if rest.endswith("/"):
        rest = rest[:-1]
    host, port_text = _split_host_port(rest, text)
    if not host or any(c in host for c in "/ \t@"):
        raise ValueError(f"invalid host in relay URL: {text}")
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"invalid port in relay URL: {text}")
        port = int(port_text)
    return RelayURL(scheme, host, port, label)  # type: ignore[arg-type]


def _split_host_port(rest: str, text: str) -> tuple[str, str | None]:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"unterminated [address] in relay URL: {text}")
        host, after = rest[1:end], rest[end + 1 :]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"invalid [address] in relay URL: {text}") from None
        if not after:
            return host, None
        if not after.startswith(":"):
            raise ValueError(f"invalid relay URL: {text}")
        return host, after[1:]
    if rest.count(":") > 1:
        raise ValueError(f"IPv6 addresses must be written in brackets: {text}")
    host, sep, port = rest.partition(":")
    return host, (port if sep else None)


def parse_credentials(value: str) -> tuple[str, str]:
    """An ``auth`` table value ``username:password`` -> (username, password)."""
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError("credentials must be written username:password")
    return user, password


@dataclass(frozen=True)
class RelayRoute:
    """How to relay one message. ``smarthost`` None: to the recipient domain's MX hosts.

    ``tls``: ``opportunistic`` (STARTTLS when offered, certificate not checked), ``required``
    (STARTTLS or smtps, certificate checked), ``no-verify`` (required, not checked), ``none``.
    The URL scheme tightens it (``smtp+tls``, ``smtps`` need TLS; ``smtp+notls``/``lmtp`` never).
    ``backup``: act as a backup MX, using only MX hosts better than ``backup_mx`` (default: the
    agent's HELO name). ``source``: local address to connect from.
    ``client_cert``: (certificate file, key file) presented to the server (``pki``).
    """

    smarthost: str | None = None
    tls: RouteTLS = "opportunistic"
    auth: tuple[str, str] | None = None
    helo: str | None = None
    mail_from: str | None = None
    backup: bool = False
    backup_mx: str | None = None
    source: str | None = None
    client_cert: tuple[str, str] | None = None


TLSMode = Literal["none", "opportunistic", "starttls", "smtps"]


@dataclass(frozen=True)
class TLSPlan:
    mode: TLSMode
    verify: bool


def tls_plan(scheme: Scheme | None, tls: RouteTLS) -> TLSPlan:
    """What the URL scheme (None for MX delivery) and the action's ``tls`` option mean together.
    Raises ValueError for ``smtp+notls``/``lmtp`` with mandatory TLS (OpenSMTPD refuses it)."""
    required = tls in ("required", "no-verify")
    verify = tls != "no-verify"
    if scheme in ("smtp+notls", "lmtp"):
        if required:
            raise ValueError(f"TLS is required but the relay URL says {scheme}://")
        return TLSPlan("none", False)
    if scheme == "smtps":
        return TLSPlan("smtps", verify)
    if scheme == "smtp+tls":
        return TLSPlan("starttls", verify)
    if tls == "none":
        return TLSPlan("none", False)
    if required:
        return TLSPlan("starttls", verify)
    return TLSPlan("opportunistic", False)


def route_for(
    action: Action,
    *,
    smarthost: str | None = None,
    credentials: tuple[str, str] | None = None,
    source: str | None = None,
    client_cert: tuple[str, str] | None = None,
) -> RelayRoute:
    """The route for a relay action. Tables are the caller's: ``smarthost`` is the value of the
    action's ``host`` table, ``credentials`` the ``auth`` table's entry for the URL's label (see
    ``parse_relay_url`` and ``parse_credentials``), ``source`` one address of the ``src`` table,
    ``client_cert`` the files of the ``pki`` named by the action."""
    return RelayRoute(
        smarthost=smarthost,
        tls=action.tls,
        auth=credentials,
        helo=action.helo,
        mail_from=action.mail_from,
        backup=action.backup,
        backup_mx=action.backup_mx,
        source=source,
        client_cert=client_cert,
    )
