"""How queue and stats look to admins: smtpctl's field order, plus a JSON form."""

from __future__ import annotations

import ipaddress
from typing import Any

from pigeon.queue.envelope import Envelope, evpid_hex
from pigeon.scheduler import policy


def family(sockaddr: str) -> str:
    if not sockaddr or sockaddr == "local":
        return "local"
    try:
        return "inet6" if ipaddress.ip_address(sockaddr).version == 6 else "inet4"
    except ValueError:
        return "local"


def queue_row(
    env: Envelope, *, runstate: str, delay: int | None, queue_ttl: int, paused: bool = False
) -> dict[str, Any]:
    flags = list(env.flags)
    if paused:
        flags.append("suspend")
    return {
        "evpid": evpid_hex(env.evpid),
        "family": family(env.sockaddr),
        "type": env.type,
        "flags": ",".join(flags),
        "sender": env.sender,
        "rcpt": env.rcpt,
        "dest": env.dest,
        "ctime": env.ctime,
        "expire": int(policy.expiry(env, queue_ttl)),
        "lasttry": env.last_try,
        "retry": env.retry,
        "runstate": runstate,
        "delay": delay,
        "errorline": env.errorline,
    }


def render_queue_line(row: dict[str, Any]) -> str:
    fields = [
        row["evpid"],
        row["family"],
        row["type"],
        row["flags"],
        row["sender"],
        row["rcpt"],
        row["dest"],
        str(row["ctime"]),
        str(row["expire"]),
        str(row["lasttry"]),
        str(row["retry"]),
        row["runstate"],
        "" if row["delay"] is None else str(row["delay"]),
        row["errorline"],
    ]
    return "|".join(fields)


def human_duration(seconds: int) -> str:
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out + f"{seconds}s" if (seconds or not out) else out
