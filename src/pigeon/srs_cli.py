"""``pigeon srs encode|decode``: compute or check SRS addresses by hand.

Useful to see what a forwarder will send as MAIL FROM, or to find out why a bounce to an
SRS address was refused. Nothing here touches a running daemon.
"""

from __future__ import annotations

import argparse
import sys
import time

from pigeon.srs import DAY, DEFAULT_TTL_DAYS, SRSContext, SRSError

PROG = "pigeon srs"


def srs_main(argv: list[str]) -> int:
    """Run ``pigeon srs`` with ``argv`` (the words after ``pigeon srs``); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on --help (0) and on usage errors (2); we return instead.
        return exit_.code if isinstance(exit_.code, int) else 2
    now = args.time if args.time is not None else int(time.time())
    if args.command == "encode":
        return _encode(args.key, args.sender, args.forward_domain, now)
    return _decode(args, now)


def _encode(key: str, sender: str, forward_domain: str, now: int) -> int:
    try:
        context = SRSContext(key)
    except ValueError as error:
        print(f"{PROG} encode: {error}", file=sys.stderr)
        return 2
    print(context.encode(sender, forward_domain, now=now))
    return 0


def _decode(args: argparse.Namespace, now: int) -> int:
    try:
        context = SRSContext(
            args.key, args.backup_key, ttl=args.ttl * DAY, postsrsd_compat=args.postsrsd
        )
    except ValueError as error:
        print(f"{PROG} decode: {error}", file=sys.stderr)
        return 2
    try:
        print(context.decode(args.address, now=now))
    except SRSError as error:
        print(f"{PROG} decode: {error.reason}: {args.address}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compute or check Sender Rewriting Scheme addresses."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encode = commands.add_parser(
        "encode",
        help="rewrite a sender as a forwarder would",
        description="Print the MAIL FROM a 'relay srs' action sends for SENDER when the mail "
        "was forwarded through FORWARD_DOMAIN.",
    )
    encode.add_argument("--key", required=True, help="the 'srs key' secret")
    _add_time(encode)
    encode.add_argument("sender", metavar="SENDER", help="the envelope sender to rewrite")
    encode.add_argument(
        "forward_domain",
        metavar="FORWARD_DOMAIN",
        help="the domain of the recipient the mail was forwarded from",
    )

    decode = commands.add_parser(
        "decode",
        help="check an SRS address and print the original address",
        description="Print the address a bounce to ADDRESS is returned to, or exit 1 "
        "with the reason (bad hash, expired, malformed, not SRS).",
    )
    decode.add_argument("--key", required=True, help="the 'srs key' secret")
    decode.add_argument("--backup-key", metavar="KEY", help="the 'srs key backup' secret")
    decode.add_argument(
        "--ttl",
        type=_days,
        default=DEFAULT_TTL_DAYS,
        metavar="DAYS",
        help=f"how many days an address stays valid ('srs ttl'; default {DEFAULT_TTL_DAYS})",
    )
    _add_time(decode)
    decode.add_argument(
        "--postsrsd",
        action="store_true",
        help="also accept addresses signed by postsrsd with one of the keys",
    )
    decode.add_argument("address", metavar="ADDRESS", help="the SRS address to check")
    return parser


def _add_time(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--time",
        type=int,
        metavar="UNIX",
        help="pretend the clock reads this many seconds since the epoch (default: now)",
    )


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError("must be at least 1 day")
    return days
