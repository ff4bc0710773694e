"""The ``pigeon`` command: run, check, and smtpctl-style verbs over the control socket."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = """\
# Pigeon's built-in default: local mail only, on an unprivileged port.
listen on 127.0.0.1 port 2525
action "local" maildir
match from any for local action "local"
"""

# smtpctl verbs forwarded to the daemon as they are.
CONTROL_VERBS = (
    "show",
    "schedule",
    "remove",
    "pause",
    "resume",
    "log",
    "monitor",
    "stop",
    "trace",
    "untrace",
    "reload",
    "update",
)
# Verbs handled here rather than by the daemon (never taken for an abbreviation).
LOCAL_VERBS = ("run", "check", "srs", "encrypt", "sendmail", "makemap")


def default_spool() -> Path:
    env = os.environ.get("PIGEON_SPOOL")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/spool/pigeon")
    return Path("pigeon-spool")


def _macros(values: list[str] | None) -> dict[str, str]:
    out = {}
    for item in values or []:
        name, sep, value = item.rpartition("=")  # the last "=", as smtpd's cmdline_symset
        if not sep or not name:
            raise SystemExit(f"pigeon: -D expects name=value, got {item!r}")
        out[name] = value
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigeon", description="Pigeon mail transfer agent")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def spool_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spool", type=Path, default=None, help="spool directory")

    p = sub.add_parser("check", help="validate a configuration file")
    p.add_argument("-f", dest="file", default=None)
    p.add_argument("-D", dest="macros", action="append", metavar="NAME=VALUE")

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("-f", dest="file", default=None)
    p.add_argument("-d", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-v", dest="verbose", action="store_true")
    p.add_argument("-D", dest="macros", action="append", metavar="NAME=VALUE")
    p.add_argument(
        "-P",
        dest="paused",
        action="append",
        choices=["mda", "mta", "smtp"],
        help="start with this subsystem paused",
    )
    p.add_argument(
        "--resolver",
        action="append",
        metavar="ADDRESS[:PORT]",
        help="DNS server for MX lookups (default: /etc/resolv.conf)",
    )
    p.add_argument("--mx-port", type=int, default=25, help="port used toward MX hosts")
    p.add_argument(
        "--relay",
        dest="relay_mode",
        choices=["in-process", "worker"],
        default=None,
        help="where remote delivery runs: in the daemon or in a relay worker process "
        "(default: $PIGEON_RELAY, else worker)",
    )
    p.add_argument(
        "--user",
        default=None,
        metavar="NAME",
        help="started as root, run as this user (default: _pigeon)",
    )
    p.add_argument(
        "--log",
        dest="log_target",
        choices=["stderr", "syslog"],
        default=None,
        help="where log lines go (default: stderr with -d, syslog otherwise)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="log line format")
    spool_opt(p)

    for verb in CONTROL_VERBS:
        p = sub.add_parser(verb, help=f"{verb} (as smtpctl)")
        p.add_argument("words", nargs="*")
        p.add_argument("--json", action="store_true", help="print JSON")
        spool_opt(p)
    sub.add_parser("srs", help="encode or decode SRS addresses (pigeon srs --help)")
    sub.add_parser("encrypt", help="hash a password for a credentials table, as smtpctl encrypt")
    sub.add_parser("makemap", help="build a db: table file, as makemap(8)")
    sub.add_parser("sendmail", help="submit a message, as sendmail(8) (pigeon sendmail -t < msg)")
    return parser


def _control_args(argv: list[str]) -> argparse.Namespace:
    """Control verbs take ``--spool DIR`` and ``--json`` anywhere after the verb."""
    words: list[str] = []
    spool: Path | None = None
    as_json = False
    rest = iter(argv[1:])
    for word in rest:
        if word == "--spool":
            value = next(rest, None)
            if value is None:
                raise SystemExit("pigeon: --spool needs a directory")
            spool = Path(value)
        elif word.startswith("--spool="):
            spool = Path(word.split("=", 1)[1])
        elif word == "--json":
            as_json = True
        else:
            words.append(word)
    return argparse.Namespace(verb=argv[0], words=words, spool=spool, json=as_json)


def _load(path: str | None, macros: dict[str, str]) -> Any:
    from pigeon.config import parse_config_text

    if path is None:
        return parse_config_text(DEFAULT_CONFIG, "<default>", macros)
    from pigeon.config import load_config

    return load_config(path, macros)


def _load_or_report(args: argparse.Namespace) -> Any:
    """The configuration, or None after printing why it is not valid."""
    from pigeon.config import ConfigError

    try:
        return _load(args.file, _macros(args.macros))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
    except OSError as exc:
        print(f"{args.file}: {exc.strerror}", file=sys.stderr)
    return None


def cmd_check(args: argparse.Namespace) -> int:
    if _load_or_report(args) is None:
        return 1
    print("configuration OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pigeon.daemon import Daemon, DaemonOptions
    from pigeon.log import setup_logging
    from pigeon.queue.journal import QueueLocked
    from pigeon.server.tls import TLSConfigError

    config = _load_or_report(args)
    if config is None:
        return 1
    from pigeon import privsep

    spool = (args.spool or default_spool()).absolute()
    spool.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        run_as, warning = privsep.resolve_run_as(args.user)
    except privsep.PrivsepError as exc:
        print(f"pigeon: {exc}", file=sys.stderr)
        return 1
    if not args.foreground:
        _daemonize()
    setup_logging(
        foreground=args.foreground,
        verbose=args.verbose,
        spool=spool,
        target=args.log_target,
        fmt=args.log_format,
    )
    if warning:
        logging.getLogger("pigeon").warning("%s", warning)
    _raise_nofile()
    helper = None
    if run_as is not None:
        privsep.set_run_as(run_as)
        privsep.give_spool(spool, run_as)
        from pigeon import launcher

        def reread() -> list[dict[str, Any]]:  # in the helper, as root, at a reload
            return launcher.launchable(_load(args.file, _macros(args.macros)), run_as.name)

        helper = privsep.start_helper(  # before the event loop and any thread
            launcher.launchable(config, run_as.name), reread if args.file else None
        )
        launcher.set_launcher(helper.launcher)
    options = DaemonOptions(
        spool=spool,
        paused=frozenset(args.paused or ()),
        dns=_dns_settings(args.resolver),
        mx_port=args.mx_port,
        config_file=str(Path(args.file).absolute()) if args.file else None,
        macros=_macros(args.macros),
        local_delivery=helper.deliver if helper is not None else None,
        relay_worker=(args.relay_mode or os.environ.get("PIGEON_RELAY") or "worker") == "worker",
    )

    async def main() -> int:
        try:
            daemon = Daemon(config, options)
        except TLSConfigError as exc:
            print(f"pigeon: {exc}", file=sys.stderr)
            return 1

        def drop() -> None:
            assert run_as is not None
            try:
                privsep.drop_privileges(run_as, spool)
            except OSError as exc:
                raise privsep.PrivsepError(str(exc)) from exc

        try:
            # Ports bound and keys read, root is no longer needed: dropped before serving.
            await daemon.start(drop if run_as is not None else None)
        except QueueLocked as exc:
            print(f"pigeon: {exc}", file=sys.stderr)
            return 1
        except TLSConfigError as exc:  # e.g. a pki key that does not match its certificate
            print(f"pigeon: {exc}", file=sys.stderr)
            await daemon.shutdown()
            return 1
        except OSError as exc:
            print(f"pigeon: cannot start: {exc}", file=sys.stderr)
            await daemon.shutdown()
            return 1
        except privsep.PrivsepError as exc:
            print(f"pigeon: cannot drop privileges: {exc}", file=sys.stderr)
            await daemon.shutdown()
            return 1
        try:
            await daemon.serve_forever()
        finally:
            if helper is not None:
                helper.close()
        return 0

    return _run_loop(main())


def _raise_nofile() -> None:
    """Each SMTP session is a file descriptor: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _dns_settings(resolvers: list[str] | None) -> Any:
    from pigeon.delivery.dns import DNSSettings

    if not resolvers:
        return None
    port = 53
    servers = []
    for item in resolvers:
        host, sep, port_text = item.rpartition(":")
        if sep and port_text.isdigit() and ("." in host or host.startswith("[")):
            port = int(port_text)
            item = host.strip("[]")
        servers.append(item)
    return DNSSettings(nameservers=servers, port=port)


def _run_loop(coro: Any) -> int:
    """uvloop when installed (PIGEON_EVENT_LOOP=asyncio forces the standard loop)."""
    if os.environ.get("PIGEON_EVENT_LOOP") == "asyncio":
        return int(asyncio.run(coro))
    try:
        import uvloop

        result: int = uvloop.run(coro)
        return result
    except ImportError:
        return int(asyncio.run(coro))


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def control_request(spool: Path, words: list[str], timeout: float = 30.0) -> dict[str, Any]:
    from pigeon.control.client import exchange

    data = exchange(spool, {"command": words}, timeout)
    result: dict[str, Any] = json.loads(data or b"{}")
    return result


def cmd_control(args: argparse.Namespace) -> int:
    from pigeon.control.grammar import Ambiguous, expand

    spool = args.spool or default_spool()
    try:  # smtpctl accepts unambiguous prefixes ("sh q") and lists the choices otherwise
        words = expand([args.verb, *args.words])
    except Ambiguous as exc:
        print("possibilities are:\n" + "\n".join(exc.possibilities), file=sys.stderr)
        return 255
    if words[0] == "monitor":
        return _monitor(spool)
    try:
        response = control_request(spool, words)
    except (FileNotFoundError, ConnectionRefusedError):
        if words[:2] == ["show", "queue"]:
            return _offline_queue(spool, args.json)
        print("pigeon: pigeon doesn't seem to be running", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pigeon: control socket: {exc}", file=sys.stderr)
        return 1
    if not response.get("ok"):
        print(f"pigeon: {response.get('output', 'command failed')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(response.get("data"), indent=2))
    elif response.get("output"):
        print(response["output"])
    return 0


def _offline_queue(spool: Path, as_json: bool) -> int:
    """``show queue`` with the daemon down: read the journal (runstate ``offline``)."""
    from pigeon.control.views import queue_row, render_queue_line
    from pigeon.queue.journal import JournalStore

    store = JournalStore(spool, readonly=True)
    store.open()
    rows = [
        queue_row(env, runstate="offline", delay=None, queue_ttl=4 * 86400)
        for env in sorted(store.envelopes(), key=lambda e: (e.ctime, e.evpid))
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(render_queue_line(row))
    return 0


def _monitor(spool: Path) -> int:
    path = spool / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(json.dumps({"command": ["monitor"]}).encode() + b"\n")
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return 0
                sys.stdout.write(chunk.decode())
                sys.stdout.flush()
    except (FileNotFoundError, ConnectionRefusedError):
        print("pigeon: pigeon doesn't seem to be running", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["run"]:
        import signal

        # `pigeon show queue | head` should end quietly, as smtpctl does.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if argv[:1] == ["srs"]:
        from pigeon.srs_cli import srs_main

        return srs_main(argv[1:])
    if argv[:1] == ["encrypt"]:
        from pigeon.crypt_hash import encrypt_main

        return encrypt_main(argv[1:])
    if argv[:1] == ["makemap"]:
        from pigeon.makemap import makemap_main

        return makemap_main(argv[1:])
    if argv[:1] == ["sendmail"]:
        from pigeon.sendmail import sendmail_main

        return sendmail_main(argv[1:])
    if argv[:1] and argv[0] not in LOCAL_VERBS and not argv[0].startswith("-"):
        return cmd_control(_control_args(argv))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb == "check":
        return cmd_check(args)
    if args.verb == "run":
        return cmd_run(args)
    return cmd_control(args)


if __name__ == "__main__":
    sys.exit(main())
