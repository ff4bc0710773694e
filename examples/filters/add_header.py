#!/usr/bin/env python3
"""Example proc filter: add a header to every message, through the data-line stream.

    filter stamp proc-exec "/usr/bin/python3 /path/to/add_header.py X-Stamped 'by pigeon'"
    listen on 0.0.0.0 filter stamp

Arguments: the header name (default ``X-Filtered``) and its value (default ``yes``). The
header goes right after the MTA's own ``Received:`` header, so it sits at the top of the
message the client sent. Works under Pigeon and under OpenSMTPD 6.6 to 7.x.
"""

from __future__ import annotations

import sys

from pigeon.sdk import Filter, MessageResult, Session

NAME = sys.argv[1] if len(sys.argv) > 1 else "X-Filtered"
VALUE = sys.argv[2] if len(sys.argv) > 2 else "yes"

f = Filter("add-header")


def after_received(lines: list[str]) -> int:
    """Index just past the MTA's leading X-Spam/Received header block (and continuations)."""
    i = 0
    while i < len(lines) and lines[i].lower().startswith(("received:", "x-spam:")):
        i += 1
        while i < len(lines) and lines[i][:1] in (" ", "\t"):
            i += 1
    return i


@f.on_message
def stamp(session: Session, lines: list[str]) -> MessageResult:
    at = after_received(lines)
    return MessageResult(lines=[*lines[:at], f"{NAME}: {VALUE}", *lines[at:]])


if __name__ == "__main__":
    f.run()
