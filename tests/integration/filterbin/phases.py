#!/usr/bin/env python3
"""An SDK filter for the phases Pigeon used to answer itself (rset, quit, noop, help), the
auth parameter and the local socket listener. Logs ``PHASE|PARAM`` lines to argv[1]."""

from __future__ import annotations

import sys

from pigeon.sdk import Decision, Filter, Session, proceed, reject

LOG = sys.argv[1]
f = Filter("phases")


def note(phase: str, param: str) -> None:
    with open(LOG, "a") as out:
        out.write(f"{phase}|{param}\n")


def recorder(phase: str) -> None:
    @f.on_filter(phase)
    def record(session: Session, param: str) -> Decision:
        note(phase, param)
        return proceed()


for name in ("connect", "rset", "quit"):
    recorder(name)


@f.on_filter("auth")
def no_login(session: Session, param: str) -> Decision:
    note("auth", param)
    if param.upper() == "LOGIN":  # asked at the command, before any credential
        return reject("535 5.7.8 LOGIN refused by filter")
    return proceed()


@f.on_filter("noop")
def no_noop(session: Session, param: str) -> Decision:
    note("noop", param)
    return reject("550 5.7.1 NOOP refused by filter")


@f.on_filter("help")
def no_help(session: Session, param: str) -> Decision:
    note("help", param)
    return reject("502 5.5.1 no help from the filter")


@f.on_filter("mail-from")
def refuse_some(session: Session, param: str) -> Decision:
    note("mail-from", param)
    if param.startswith("refused@"):
        return reject("550 5.7.1 sender refused by filter")
    return proceed()


@f.on_report("link-tls")
def tls(session: Session, line: object) -> None:
    note("link-tls", getattr(getattr(line, "event", None), "tls", ""))


if __name__ == "__main__":
    f.run()
