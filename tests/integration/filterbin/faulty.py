#!/usr/bin/env python3
"""A proc filter that misbehaves on demand (stdlib only, no Pigeon import).

The MAIL FROM local part chooses: crash, hang, garbage, wrongtoken, badword, wrongphase,
report (a filter-originated report| line, then proceed), anything else proceeds. Every
line received is appended to the file named by argv[1], if given.
"""

import os
import sys

LOG = sys.argv[1] if len(sys.argv) > 1 else None


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    for raw in sys.stdin:
        line = raw.rstrip("\n")
        if LOG:
            with open(LOG, "a") as f:
                f.write(line + "\n")
        if line == "config|ready":
            out("register|report|smtp-in|*")
            out("register|filter|smtp-in|mail-from")
            out("register|ready")
            continue
        f = line.split("|")
        if f[0] != "filter":
            continue
        sid, token, param = f[5], f[6], "|".join(f[7:])
        what = param.split("@", 1)[0]
        if what == "crash":
            os._exit(3)
        if what == "hang":
            continue  # never answer this one; keep serving the others
        if what == "garbage":
            out("this is not the protocol")
        elif what == "wrongtoken":
            out(f"filter-result|{sid}|00000000deadbeef|proceed")
        elif what == "badword":
            out(f"filter-result|{sid}|{token}|maybe")
        elif what == "wrongphase":
            out(f"filter-dataline|{sid}|{token}|hello")
        elif what == "report":
            out(f"report|1700000000.000000|smtp-in|{sid}|hello from the filter")
            out(f"filter-result|{sid}|{token}|proceed")
        else:
            out(f"filter-result|{sid}|{token}|proceed")


if __name__ == "__main__":
    main()
