"""``pigeon sendmail``: the sendmail(8) interface, installable as ``/usr/sbin/sendmail``.

Reads a message on standard input and submits it through the control socket, where the
daemon runs it through the ``listen on socket`` listener like any local mail. When the
daemon is down (or refuses for now), the message goes to the offline queue, which the
daemon picks up when it runs; either way exit status 0 means the mail is safely stored.
(OpenSMTPD exits 75 after storing offline and only scans the offline queue at start.)

Options as OpenSMTPD's: ``-f``/``-r`` sender, ``-F`` full name, ``-t`` recipients from the
headers, ``-N`` DSN notify, ``-R`` DSN ret, ``-V`` DSN envid; ``-i``, ``-oi``, ``-b*``,
``-o*`` and the other sendmail options are accepted and ignored. Input is read up to end
of file (as OpenSMTPD; a lone "." does not end it).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import sys
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses
from pathlib import Path
from typing import BinaryIO

from pigeon.control.client import exchange
from pigeon.mailname import mailname
from pigeon.queue import offline

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75

# Options taking a value (attached, or as the next argument).
WITH_VALUE = set("fFrNRVBLpeAhOCX")
# Options without value that Pigeon ignores.
IGNORED_FLAGS = set("iEmxUvSGn")
SUBMIT_TIMEOUT = 300.0


class UsageError(Exception):
    pass


@dataclass
class Options:
    sender: str | None = None
    fullname: str | None = None
    from_headers: bool = False  # -t
    notify: str = ""
    ret: str = ""
    envid: str = ""
    recipients: list[str] = field(default_factory=list)
    spool: Path | None = None
    mode: str = "m"  # -b mode: m = deliver (default)


def parse_args(argv: list[str]) -> Options:
    opts = Options()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            opts.recipients += list(args)
            break
        if arg.startswith("--spool"):  # Pigeon extension, for tests and odd layouts
            value = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not value:
                raise UsageError("--spool needs a directory")
            opts.spool = Path(value)
            continue
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        letter, rest = arg[1], arg[2:]
        if letter == "b":
            opts.mode = rest or "m"
        elif letter == "o":
            if not rest:  # "-o X": the option letter came separately
                next(args, None)
        elif letter == "q":
            raise UsageError("-q: queue runs are not supported (the daemon schedules retries)")
        elif letter == "t":
            opts.from_headers = True
        elif letter in WITH_VALUE:
            value = rest if rest else next(args, None)
            if value is None:
                raise UsageError(f"option -{letter} needs a value")
            _set_value(opts, letter, value)
        elif letter in IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option -{letter}")
    return opts


def _set_value(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value.strip().removeprefix("<").removesuffix(">")
    elif letter == "F":
        opts.fullname = value
    elif letter == "N":
        words = [w.strip().upper() for w in value.split(",") if w.strip()]
        if not words or any(w not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for w in words):
            raise UsageError(f"-N: invalid notify value {value!r}")
        if "NEVER" in words and len(words) > 1:
            raise UsageError("-N: NEVER cannot be combined")
        opts.notify = ",".join(words)
    elif letter == "R":
        if value.upper() not in ("FULL", "HDRS"):
            raise UsageError(f"-R: expected full or hdrs, got {value!r}")
        opts.ret = value.upper()
    elif letter == "V":
        opts.envid = value
    # B, L, p, e, A, h, O, C, X: accepted and ignored, as OpenSMTPD does.


# ---------------------------------------------------------------------- message


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (each with its line end, continuation lines separate) and the body."""
    lines = data.splitlines(keepends=True)
    headers: list[bytes] = []
    for index, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            return headers, b"".join(lines[index + 1 :])
        is_continuation = line[:1] in (b" ", b"\t") and headers
        name, colon, _ = line.partition(b":")
        if not is_continuation and not (colon and name and b" " not in name.strip(b"\t")):
            return headers, b"".join(lines[index:])  # no blank line: the body starts here
        headers.append(line)
    return headers, b""


def _fields(headers: list[bytes]) -> list[tuple[str, str, list[int]]]:
    """(lowercase name, unfolded value, indexes of its lines) per header field."""
    out: list[tuple[str, str, list[int]]] = []
    for index, line in enumerate(headers):
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text[:1] in (" ", "\t") and out:
            name, value, idx = out[-1]
            out[-1] = (name, value + " " + text.strip(), [*idx, index])
        else:
            name, _, value = text.partition(":")
            out.append((name.strip().lower(), value.strip(), [index]))
    return out


def prepare(data: bytes, opts: Options, sender: str, hostname: str) -> tuple[bytes, list[str]]:
    """The message as submitted (From/Date/Message-ID added when missing, Bcc removed with
    ``-t``) and its recipients."""
    headers, body = split_message(data)
    fields = _fields(headers)
    names = {name for name, _, _ in fields}
    recipients = list(_addresses(opts.recipients))
    if opts.from_headers:
        for name, value, _ in fields:
            if name in ("to", "cc", "bcc"):
                recipients += _addresses([value])
    drop = {i for name, _, idx in fields if name == "bcc" for i in idx}
    kept = [line for i, line in enumerate(headers) if i not in drop]
    eol = b"\r\n" if data.find(b"\r\n") >= 0 else b"\n"
    head: list[bytes] = []
    if "from" not in names:
        addr = formataddr((opts.fullname, sender)) if opts.fullname else sender
        head.append(f"From: {addr}".encode() + eol)
    if "date" not in names:
        head.append(f"Date: {formatdate(localtime=True)}".encode() + eol)
    tail: list[bytes] = []
    if "message-id" not in names:
        tail.append(f"Message-ID: <{secrets.token_hex(8)}@{hostname}>".encode() + eol)
    message = b"".join(head + kept + tail) + eol + body
    unique = list(dict.fromkeys(r for r in recipients if r))
    return message, unique


def _addresses(values: list[str]) -> list[str]:
    return [addr for _, addr in getaddresses(values) if addr]


def default_sender(hostname: str) -> str:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return f"{user}@{hostname}"


def default_spool() -> Path:
    env = os.environ.get("PIGEON_SPOOL")
    if env:
        return Path(env)
    system = Path("/var/spool/pigeon")
    if system.is_dir() or os.geteuid() == 0:
        return system
    from pigeon.control.cli import default_spool as cli_spool

    return cli_spool()


# ---------------------------------------------------------------------- submission


def submit_online(spool: Path, sub: offline.Submission) -> tuple[bool, str]:
    """(accepted, reply). Raises OSError when the daemon cannot be reached."""
    request = {
        "command": ["enqueue"],
        "submission": {
            **sub.header(),
            "message": base64.b64encode(sub.message).decode(),
        },
    }
    data = exchange(spool, request, SUBMIT_TIMEOUT)
    if not data:
        raise ConnectionResetError("the daemon closed the connection")
    response = json.loads(data)
    return bool(response.get("ok")), str(response.get("output", ""))


def sendmail_main(argv: list[str], stdin: BinaryIO | None = None) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    if opts.mode == "p":  # -bp = mailq
        from pigeon.control.cli import main as cli_main

        return cli_main(["show", "queue", "--spool", str(opts.spool or default_spool())])
    if opts.mode == "i":  # -bi = newaliases: tables are read by the daemon itself
        return EX_OK
    hostname = mailname()
    sender = opts.sender if opts.sender is not None else default_sender(hostname)
    data = (stdin or sys.stdin.buffer).read()
    message, recipients = prepare(data, opts, sender or default_sender(hostname), hostname)
    if not recipients:
        print("sendmail: no recipients", file=sys.stderr)
        return EX_USAGE
    sub = offline.Submission(
        sender=sender,
        recipients=recipients,
        message=message,
        ret=opts.ret,
        envid=opts.envid,
        notify=opts.notify,
    )
    spool = opts.spool or default_spool()
    try:
        ok, reply = submit_online(spool, sub)
    except (OSError, ValueError):
        ok, reply = False, ""  # not running (or gone): store it offline
    if ok:
        return EX_OK
    if reply.startswith("5"):
        print(f"sendmail: command failed: {reply}", file=sys.stderr)
        return EX_DATAERR
    if not offline.offline_dir(spool).is_dir():
        try:  # never started yet: root (or the spool's owner) may create it
            spool.mkdir(parents=True, exist_ok=True, mode=0o711)
            offline.ensure_dir(spool)
        except OSError:
            pass  # the write below reports it
    try:
        offline.write(spool, sub)
    except offline.OfflineError as exc:
        print(f"sendmail: cannot queue the message: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


def main() -> None:
    """Console entry point (``/usr/sbin/sendmail``)."""
    sys.exit(sendmail_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
