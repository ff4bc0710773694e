"""Child process that writes a mailbox as the recipient user.

Run as ``python -m pigeon.delivery.helper maildir|mbox ARGS`` with the message on stdin, by a
daemon running as root that started it with the recipient's uid and gid. Exit codes follow
sysexits like OpenSMTPD's helpers: 0 ok, 75 temporary failure, 1 permanent failure; the last
line on stderr is the reason.
"""

from __future__ import annotations

import argparse
import sys

from pigeon.delivery.mailbox import DeliveryFailure, maildir_deliver, mbox_deliver

EX_OK = 0
EX_PERM = 1
EX_TEMPFAIL = 75


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pigeon-delivery-helper")
    sub = parser.add_subparsers(dest="method", required=True)
    md = sub.add_parser("maildir")
    md.add_argument("path")
    md.add_argument("--junk", action="store_true")
    md.add_argument("--extension")
    mb = sub.add_parser("mbox")
    mb.add_argument("path")
    mb.add_argument("--sender", default="")
    args = parser.parse_args(argv)
    message = sys.stdin.buffer.read()
    try:
        if args.method == "maildir":
            maildir_deliver(args.path, message, junk=args.junk, extension=args.extension)
        else:
            mbox_deliver(args.path, args.sender, message)
    except DeliveryFailure as exc:
        print(exc.text, file=sys.stderr)
        return EX_TEMPFAIL if exc.temporary else EX_PERM
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
