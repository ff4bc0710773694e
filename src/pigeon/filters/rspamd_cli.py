"""``pigeon-filter-rspamd``: the rspamd filter as a proc filter (Pigeon or OpenSMTPD).

::

    filter "rspamd" proc-exec "pigeon-filter-rspamd --url http://127.0.0.1:11333"

filter-rspamd's own spellings (``-url``, ``-settings-id``) are accepted too, so the command
drops in for ``/usr/libexec/opensmtpd/filter-rspamd`` in an existing smtpd.conf. The scan
itself is :class:`pigeon.filters.rspamd.RspamdScanner`; this module only parses options and
wires the scanner to :mod:`pigeon.sdk.filter`. Options and defaults: docs/rspamd.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from pigeon.filters.rspamd import (
    ACTIONS,
    OnError,
    RspamdScanner,
    RspamdSettings,
    Verdict,
    context_from_session,
)
from pigeon.protocol.filterproto import LinkGreeting, ReportLine
from pigeon.sdk.filter import Filter, MessageResult, Session, proceed, reject

__all__ = ["build_filter", "main", "parse_args", "settings_from_args"]


def _action_name(text: str) -> str:
    """``soft-reject``, ``soft_reject`` and ``soft reject`` are the same rspamd action."""
    return " ".join(text.replace("-", " ").replace("_", " ").lower().split())


def _mapping(text: str) -> tuple[str, Verdict]:
    action, sep, verdict = text.rpartition("=")
    action = _action_name(action)
    if not sep or action not in ACTIONS:
        raise argparse.ArgumentTypeError(
            f"expected ACTION=VERDICT with ACTION one of {', '.join(ACTIONS)}: {text!r}"
        )
    try:
        return action, Verdict(verdict.strip().lower())
    except ValueError:
        choices = ", ".join(v.value for v in Verdict)
        raise argparse.ArgumentTypeError(f"verdict must be one of {choices}: {text!r}") from None


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or any(c in name for c in ": \t\r\n"):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name.strip(), value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds out of range (0, 3600]: {text!r}")
    return value


class _RaisingParser(argparse.ArgumentParser):
    """For smtpd.conf: a bad option is a config error, not an exit."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    cls = argparse.ArgumentParser if exit_on_error else _RaisingParser
    p = cls(
        prog="pigeon-filter-rspamd",
        description="Scan messages with rspamd (OpenSMTPD/Pigeon proc filter).",
    )
    p.add_argument("--url", "-url", default=RspamdSettings.url, help="rspamd base URL or socket")
    p.add_argument("--settings-id", "-settings-id", default=None, help="rspamd Settings-ID")
    p.add_argument("--connect-timeout", type=_seconds, default=RspamdSettings.connect_timeout)
    p.add_argument("--scan-timeout", type=_seconds, default=RspamdSettings.scan_timeout)
    p.add_argument(
        "--on-error",
        choices=[o.value for o in OnError],
        default=RspamdSettings.on_error.value,
        help="when rspamd is down, slow or answers garbage",
    )
    p.add_argument(
        "--action",
        type=_mapping,
        action="append",
        default=[],
        metavar="ACTION=VERDICT",
        help="map an rspamd action to accept|junk|rewrite-subject|tempfail|reject",
    )
    p.add_argument(
        "--greylist",
        choices=[Verdict.ACCEPT.value, Verdict.TEMPFAIL.value],
        default=None,
        help="shortcut for --action greylist=VERDICT (default accept)",
    )
    p.add_argument(
        "--skip-authenticated",
        action=argparse.BooleanOptionalAction,
        default=RspamdSettings.skip_authenticated,
        help="no spam verdict for authenticated senders (signing still applies)",
    )
    p.add_argument(
        "--score-headers",
        action=argparse.BooleanOptionalAction,
        default=RspamdSettings.score_headers,
        help="add X-Spam-Score, X-Spam-Action and X-Spam-Symbols",
    )
    p.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra HTTP header sent to rspamd",
    )
    p.add_argument("--mta-name", default=None, help="MTA-Name (default: listener hostname)")
    p.add_argument("--quiet", action="store_true", help="no log line per scan")
    return p


def parse_args(
    argv: Sequence[str] | None = None, *, exit_on_error: bool = True
) -> argparse.Namespace:
    """Command-line options; ``exit_on_error=False`` raises ValueError instead of exiting."""
    return _parser(exit_on_error).parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> RspamdSettings:
    actions = dict(RspamdSettings().actions)
    if args.greylist is not None:
        actions["greylist"] = Verdict(args.greylist)
    actions.update(dict(args.action))
    return RspamdSettings(
        url=args.url,
        settings_id=args.settings_id,
        connect_timeout=args.connect_timeout,
        scan_timeout=args.scan_timeout,
        on_error=OnError(args.on_error),
        actions=actions,
        skip_authenticated=args.skip_authenticated,
        score_headers=args.score_headers,
        extra_headers=tuple(args.header),
        mta_name=args.mta_name,
    )


def build_filter(scanner: RspamdScanner) -> Filter:
    """An SDK filter that scans every message with ``scanner`` at end of data."""
    f = Filter(scanner.name)

    @f.on_report("link-greeting")
    def greeting(session: Session, line: ReportLine) -> None:
        if isinstance(line.event, LinkGreeting):
            session.data["mta_name"] = line.event.hostname

    @f.on_message
    async def scan(session: Session, lines: list[str]) -> MessageResult:
        outcome = await scanner.scan(context_from_session(session), lines)
        if outcome.reply is not None:
            return MessageResult(lines=None, decision=reject(outcome.reply))
        return MessageResult(lines=outcome.lines, decision=proceed())

    return f


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
    )
    scanner = RspamdScanner(settings_from_args(args))
    try:
        build_filter(scanner).run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
