"""The ``lmtp`` local delivery method: one LMTP transaction to a TCP or UNIX socket server.

Like OpenSMTPD's ``mail.lmtp`` (delivery-queue.md 2.5): ``LHLO <helo>``, ``MAIL FROM:<sender>``,
``RCPT TO:<user>`` (the local user name) or, with ``rcpt-to``, the recipient address, DATA, the
body, QUIT. Two improvements, both noted in the docs: every recipient of a message goes in the
one transaction, and each gets its own result from its own LMTP reply, so a 5xx ("user unknown")
is a permanent failure instead of a retry until expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from pigeon.delivery.relay import ClientSession, HandshakeError, outcome_for
from pigeon.protocol.client import ClientConfig, RecipientSpec, Transaction
from pigeon.protocol.replies import Reply
from pigeon.queue.envelope import Envelope
from pigeon.scheduler.scheduler import Outcome

__all__ = ["LMTP_PORT", "deliver_lmtp", "parse_destination"]

log = logging.getLogger("pigeon.mda")

LMTP_PORT = 24


def parse_destination(destination: str) -> tuple[str, int] | str:
    """``/path/to/socket`` -> the path; ``host:port``, ``[v6addr]:port``, ``host`` -> (host,
    port). Raises ValueError."""
    if destination.startswith("/"):
        return destination
    if destination.startswith("["):
        host, sep, rest = destination[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid LMTP destination: {destination}")
        port_text = rest[1:] if rest else ""
    elif destination.count(":") == 1:
        host, _, port_text = destination.partition(":")
    elif ":" in destination:
        raise ValueError(f"IPv6 LMTP destinations must be written [address]:port: {destination}")
    else:
        host, port_text = destination, ""
    if not host:
        raise ValueError(f"invalid LMTP destination: {destination}")
    if not port_text:
        return host, LMTP_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port in LMTP destination: {destination}")
    return host, int(port_text)


def _recipient(env: Envelope, rcpt_to: bool, users: Mapping[int, str]) -> str:
    if rcpt_to:
        return env.dest
    return users.get(env.evpid) or env.mda_user or env.dest.rpartition("@")[0]


async def deliver_lmtp(
    destination: str,
    envelopes: Sequence[Envelope],
    body: bytes,
    *,
    rcpt_to: bool,
    users: Mapping[int, str],
    helo: str = "localhost",
    timeout: float = 300.0,
) -> dict[int, Outcome]:
    """Delivers one message to the LMTP server; an Outcome per evpid, never raises for
    network trouble. ``users``: evpid -> local user name (default mode)."""
    if not envelopes:
        return {}

    def every(outcome: Outcome) -> dict[int, Outcome]:
        return {env.evpid: outcome for env in envelopes}

    recipients = [_recipient(env, rcpt_to, users) for env in envelopes]
    sender = envelopes[0].sender
    if any(c in address for address in (sender, *recipients) for c in "\r\n\0<>"):
        return every(Outcome.permfail("invalid address for LMTP delivery"))
    try:
        where = parse_destination(destination)
        config = ClientConfig(helo=helo, lmtp=True)
    except ValueError as exc:
        return every(Outcome.tempfail(f"LMTP configuration error: {exc}"))

    try:
        if isinstance(where, str):
            session = await ClientSession.open_unix(
                where, config, connect_timeout=timeout, timeout=timeout
            )
        else:
            session = await ClientSession.open_tcp(
                where[0], where[1], config, connect_timeout=timeout, timeout=timeout
            )
    except TimeoutError:
        return every(Outcome.tempfail(f"LMTP connection to {destination} timed out"))
    except OSError as exc:
        return every(
            Outcome.tempfail(f"LMTP connection to {destination} failed: {exc.strerror or exc}")
        )

    try:
        await session.handshake()
    except HandshakeError as exc:
        log.info("lmtp: %s: %s", destination, exc)
        return every(Outcome.tempfail(f"LMTP session with {destination} failed: {exc}"))

    txn = Transaction(sender=sender, recipients=[RecipientSpec(r) for r in recipients])
    report = await session.transact(txn, body)
    if report.failure is None:
        await session.quit()
    undecided = Outcome.tempfail(f"LMTP session with {destination} failed: {report.failure}")
    return {
        env.evpid: (_outcome(report.replies[i]) if i in report.replies else undecided)
        for i, env in enumerate(envelopes)
    }


def _outcome(reply: Reply) -> Outcome:
    """As smtpd's mail.lmtp, an accepted recipient is "Delivered"; a refusal keeps the
    server's reply (5xx permanent, 4xx temporary)."""
    outcome = outcome_for(reply)
    return DELIVERED if outcome.status == "ok" else outcome


DELIVERED = Outcome.ok("Delivered")
