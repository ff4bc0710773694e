#!/usr/bin/env python3
"""Example proc filter: count open sessions per client address from report events and
refuse a client that has more than LIMIT sessions open at once.

    filter limit proc-exec "/usr/bin/python3 /path/to/session_limit.py 3"
    listen on 0.0.0.0 filter limit

The count comes only from ``link-connect`` and ``link-disconnect`` reports; the decision is
taken in the ``connect`` phase (``421`` and disconnect, as a busy server would). Works
under Pigeon and under OpenSMTPD 6.6 to 7.x.
"""

from __future__ import annotations

import sys
from collections import Counter

from pigeon.protocol.filterproto import ReportLine
from pigeon.sdk import Decision, Filter, Session, disconnect, proceed

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 5

f = Filter("session-limit")
open_sessions: Counter[str] = Counter()


def client(session: Session) -> str:
    """The client address without its port (``unix:...`` for the local socket)."""
    src = session.src or "unknown"
    return src if src.startswith("unix:") else src.rsplit(":", 1)[0]


@f.on_report("link-connect")
def connected(session: Session, event: ReportLine) -> None:
    open_sessions[client(session)] += 1


@f.on_report("link-disconnect")
def disconnected(session: Session, event: ReportLine) -> None:
    key = client(session)
    open_sessions[key] -= 1
    if open_sessions[key] <= 0:
        del open_sessions[key]


@f.on_filter("connect")
def check(session: Session, param: str) -> Decision:
    if open_sessions[client(session)] > LIMIT:
        return disconnect(f"421 4.7.0 too many sessions from your address (limit {LIMIT})")
    return proceed()


if __name__ == "__main__":
    f.run()
