#!/usr/bin/env python3
"""A proc filter with one answer (stdlib only, no Pigeon import), as the stub of
OpenSMTPD's regression suite: ``stub.py PHASE ACTION [MESSAGE]`` registers for PHASE of
smtp-in and answers every request there with ACTION (proceed, junk, reject, disconnect)."""

import sys

phase, action = sys.argv[1], sys.argv[2]
message = sys.argv[3] if len(sys.argv) > 3 else ""
DEFAULTS = {"reject": "550 5.7.0 Rejected by filter", "disconnect": "421 4.3.0 Go away"}


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


for raw in sys.stdin:
    if raw.rstrip("\n") == "config|ready":
        break
out(f"register|filter|smtp-in|{phase}")
out("register|ready")
for raw in sys.stdin:
    fields = raw.rstrip("\n").split("|")
    if len(fields) < 7 or fields[0] != "filter" or fields[4] != phase:
        continue
    session, token = fields[5], fields[6]
    if action in DEFAULTS:
        out(f"filter-result|{session}|{token}|{action}|{message or DEFAULTS[action]}")
    else:
        out(f"filter-result|{session}|{token}|{action}")
