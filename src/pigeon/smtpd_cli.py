"""``pigeon-smtpd``: Pigeon started the way smtpd(8) is, for scripts, service files and
test harnesses written for OpenSMTPD (a packager may install it as ``/usr/sbin/smtpd``).

    pigeon-smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]

``-n`` checks the configuration (``pigeon check``); otherwise the daemon runs
(``pigeon run``): ``-d`` in the foreground logging to stderr, ``-F`` in the foreground
logging to syslog, neither in the background. ``-T`` is accepted for compatibility: tracing
is turned on at run time with ``pigeon trace SUBSYSTEM``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from pigeon import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpd", add_help=False)
    parser.add_argument("-d", action="store_true", help="foreground, log to stderr")
    parser.add_argument("-F", action="store_true", help="foreground, log to syslog")
    parser.add_argument("-h", action="store_true", help="print the version")
    parser.add_argument("-n", action="store_true", help="check the configuration only")
    parser.add_argument("-v", action="count", default=0, help="verbose logging")
    parser.add_argument("-D", action="append", default=[], metavar="macro=value")
    parser.add_argument("-f", metavar="file")
    parser.add_argument("-P", action="append", default=[], choices=("mda", "mta", "smtp"))
    parser.add_argument("-T", action="append", default=[], metavar="trace")
    return parser


USAGE = "usage: smtpd [-dFhnv] [-D macro=value] [-f file] [-P system] [-T trace]"


def translate(argv: list[str]) -> list[str] | None:
    """The ``pigeon`` command line for an smtpd(8) one; None for ``-h``."""
    args = _parser().parse_args(argv)
    if args.h:
        return None
    if args.T:
        print("smtpd: -T is ignored: use `pigeon trace SUBSYSTEM`", file=sys.stderr)
    common: list[str] = ["-f", args.f] if args.f else []
    for macro in args.D:
        common += ["-D", macro]
    if args.n:
        return ["check", *common]
    run = ["run", *common]
    if args.d or args.F:
        run.append("-d")
    if args.F:
        run += ["--log", "syslog"]
    if args.v:
        run.append("-v")
    for system in args.P:
        run += ["-P", system]
    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pigeon_argv = translate(argv)
    if pigeon_argv is None:  # as smtpd -h
        print(f"version: Pigeon {__version__}")
        print(USAGE)
        return 0
    from pigeon.control.cli import main as pigeon_main

    if pigeon_argv[0] == "check":  # smtpd -n says "configuration OK" on stderr
        with contextlib.redirect_stdout(sys.stderr):
            return pigeon_main(pigeon_argv)
    return pigeon_main(pigeon_argv)


if __name__ == "__main__":
    sys.exit(main())
