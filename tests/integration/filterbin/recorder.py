#!/usr/bin/env python3
"""A proc filter that records every line it gets (argv[1]) and answers proceed; with
argv[2] == "dataline" it also echoes the data-line stream unchanged (stdlib only)."""

import sys

LOG = sys.argv[1]
DATALINE = len(sys.argv) > 2 and sys.argv[2] == "dataline"
PHASES = ["connect", "helo", "ehlo", "mail-from", "rcpt-to", "data", "commit"]


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


for raw in sys.stdin:
    line = raw.rstrip("\n")
    with open(LOG, "a") as f:
        f.write(line + "\n")
    if line == "config|ready":
        out("register|report|smtp-in|*")
        for phase in PHASES + (["data-line"] if DATALINE else []):
            out(f"register|filter|smtp-in|{phase}")
        out("register|ready")
        continue
    f = line.split("|")
    if f[0] != "filter":
        continue
    version, phase, sid, token = f[1], f[4], f[5], f[6]
    ids = f"{sid}|{token}" if version != "0.4" else f"{token}|{sid}"
    if phase == "data-line":
        out(f"filter-dataline|{ids}|{'|'.join(f[7:])}")
    else:
        out(f"filter-result|{ids}|proceed")
