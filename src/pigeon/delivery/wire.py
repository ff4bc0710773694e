"""What the daemon and the relay worker process say to each other (``worker.py``).

One socketpair, newline-terminated JSON lines. Each line is a JSON *list* of messages: both
ends gather what they have to say during one event-loop iteration and send it as one line,
so a busy queue costs one write and one read per batch of deliveries, not per message.

Daemon -> worker:

* ``{"op": "configure", "settings": ..., "dns": ..., "levels": {logger: level}, "log": L}``:
  the first message after a spawn (the worker answers ``{"op": "ready"}``), and again after a
  reload. ``L`` says where the daemon's log lines go (``pigeon.log.describe_for_child``), so
  the worker writes its own there; null: the worker sends them as ``log`` messages;
* ``{"op": "route", "rid": N, "route": ...}``: a relay route (an action's options with its
  tables looked up), numbered; ``{"op": "forget-routes"}`` drops every number (the daemon
  then numbers anew);
* ``{"op": "deliver", "id": N, "rid": N, "envelopes": [[field values], ...], "sender": S,
  "body": [segment path, offset, length], "dsn": bool}``: the body is read from the journal
  segment by the worker itself, so it never crosses the socket. An envelope travels as the
  values of ``ENVELOPE_FIELDS`` (what the relay agent reads, and what an Envelope needs);
* ``{"op": "levels", "levels": {logger: level}}``: after ``log verbose`` or ``trace``;
* ``{"op": "show", "id": N, "view": V}``.

Worker -> daemon:

* ``{"id": N, "outcomes": [[evpid, status, line], ...], "dsn_relayed": [evpid, ...],
  "logged": true}``: ``logged`` when the worker wrote the delivery lines itself (it writes
  its lines where the daemon's go when ``configure`` said where: ``"log"``);
* ``{"id": N, "lines": [...]}`` or ``{"id": N, "error": "..."}``;
* ``{"op": "log", "level": N, "name": LOGGER, "msg": TEXT}``: the worker's log records,
  written by the daemon's logging like its own.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pigeon.delivery.dns import DNSSettings
from pigeon.delivery.relay import DomainLimits, RelaySettings
from pigeon.delivery.routes import RelayRoute
from pigeon.queue.envelope import Envelope
from pigeon.scheduler.scheduler import Outcome

__all__ = [
    "ENVELOPE_FIELDS",
    "decode_batch",
    "decode_envelope",
    "decode_outcomes",
    "decode_route",
    "decode_settings",
    "encode_batch",
    "encode_envelope",
    "encode_outcomes",
    "encode_route",
    "encode_settings",
]


def encode_batch(messages: list[dict[str, Any]]) -> str:
    """One line (without its newline) carrying ``messages``."""
    return json.dumps(messages, separators=(",", ":"), ensure_ascii=True)


def decode_batch(line: str | bytes) -> list[dict[str, Any]]:
    """The messages of one line; ValueError when it is not a list of objects."""
    value = json.loads(line)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError("a line must be a JSON list of objects")
    return value


# The Envelope fields the relay agent uses (and those without a default): the rest of an
# envelope (about thirty fields) is the daemon's business and need not be encoded per message.
ENVELOPE_FIELDS = (
    "evpid",
    "dispatcher",
    "type",
    "sender",
    "rcpt",
    "dest",
    "ctime",
    "dsn_notify",
    "dsn_ret",
    "dsn_envid",
    "dsn_orcpt",
)


def encode_envelope(env: Envelope) -> list[Any]:
    return [
        env.evpid,
        env.dispatcher,
        env.type,
        env.sender,
        env.rcpt,
        env.dest,
        env.ctime,
        env.dsn_notify,
        env.dsn_ret,
        env.dsn_envid,
        env.dsn_orcpt,
    ]


def decode_envelope(values: list[Any]) -> Envelope:
    if len(values) != len(ENVELOPE_FIELDS):
        raise ValueError("an envelope has the wrong number of fields")
    return Envelope(**dict(zip(ENVELOPE_FIELDS, values, strict=True)))


def encode_settings(settings: RelaySettings, dns: DNSSettings) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(settings), "dns": dataclasses.asdict(dns)}


def decode_settings(message: dict[str, Any]) -> tuple[RelaySettings, DNSSettings]:
    raw = dict(message["settings"])
    limits = {name: DomainLimits(**value) for name, value in raw.pop("domain_limits").items()}
    return RelaySettings(**raw, domain_limits=limits), DNSSettings(**message["dns"])


def encode_route(route: RelayRoute) -> dict[str, Any]:
    return dataclasses.asdict(route)


def decode_route(data: dict[str, Any]) -> RelayRoute:
    # JSON has no tuples; the agent uses these as parts of hashable pool keys.
    auth = data.get("auth")
    cert = data.get("client_cert")
    return RelayRoute(
        **{
            **data,
            "auth": tuple(auth) if auth is not None else None,
            "client_cert": tuple(cert) if cert is not None else None,
        }
    )


def encode_outcomes(outcomes: dict[int, Outcome]) -> list[list[Any]]:
    return [[evpid, o.status, o.line] for evpid, o in outcomes.items()]


def decode_outcomes(data: list[list[Any]], *, logged: bool = False) -> dict[int, Outcome]:
    """``logged``: the worker wrote their delivery lines (the daemon must not repeat them)."""
    return {int(evpid): Outcome(str(status), str(line), logged) for evpid, status, line in data}
