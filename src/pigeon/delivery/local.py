"""Local delivery agents: maildir, mbox and mda, run as the recipient user.

When Pigeon runs as root, each delivery happens in a child process that has switched to the
recipient's uid and gid (OpenSMTPD does the same); delivering to root is refused. Run as an
ordinary user, Pigeon writes as itself, in a worker thread so the event loop never blocks on
fsync.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass

from pigeon.delivery.mailbox import DeliveryFailure, maildir_deliver, mbox_deliver
from pigeon.queue.envelope import Envelope
from pigeon.scheduler.scheduler import Outcome

EX_TEMPFAIL = 75
EX_OSERR = 71
MDA_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True, slots=True)
class LocalTarget:
    """Where and how one envelope is delivered, with formats already expanded."""

    method: str  # "maildir", "mbox", "mda"
    target: str  # maildir path, mbox path or mda command line
    user: LocalUser
    junk: bool = False


def prepare_message(env: Envelope, body: bytes) -> bytes:
    """Prepend ``Return-Path`` and ``Delivered-To`` as local delivery does."""
    head = b""
    if env.sender:
        head += f"Return-Path: <{env.sender}>\r\n".encode()
    head += f"Delivered-To: {env.rcpt}\r\n".encode()
    return head + body


def has_delivered_to(body: bytes, dest: str) -> bool:
    """True if the header already holds ``Delivered-To: <dest>``: a mail loop."""
    wanted = dest.lower().encode()
    for raw in body.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            break
        if line.lower().startswith(b"delivered-to:"):
            value = line[len(b"delivered-to:") :].strip().strip(b"<>").lower()
            if value == wanted:
                return True
    return False


def _switch_user(user: LocalUser) -> bool:
    """Whether the delivery must run in a child as another user."""
    return os.geteuid() == 0 and user.uid != os.geteuid()


def mda_environment(env: Envelope, user: LocalUser) -> dict[str, str]:
    local, _, domain = env.dest.rpartition("@")
    rcpt_local = env.rcpt.rpartition("@")[0] or env.rcpt
    values = {
        "PATH": "/bin:/usr/bin",
        "DOMAIN": domain,
        "HOME": user.home,
        "RECIPIENT": env.dest,
        "ORIGINAL_RECIPIENT": env.rcpt,
        "SHELL": "/bin/sh",
        "LOCAL": rcpt_local or local,
        "LOGNAME": user.name,
        "USER": user.name,
        "SENDER": env.sender,
    }
    if env.mda_subaddress:
        values["EXTENSION"] = env.mda_subaddress
    return values


async def _run_child(
    argv: list[str],
    stdin: bytes,
    *,
    user: LocalUser | None,
    env: dict[str, str] | None,
    cwd: str | None,
    timeout: float,
) -> tuple[int | None, str]:
    """Run a delivery child (as ``user`` when given) in a worker thread.

    subprocess.run switches uid/gid/groups for us; uvloop's subprocess API cannot.
    """

    def run() -> tuple[int | None, str]:
        try:
            proc = subprocess.run(
                argv,
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd if cwd is not None and os.path.isdir(cwd) else None,
                timeout=timeout,
                start_new_session=True,
                user=user.uid if user is not None else None,
                group=user.gid if user is not None else None,
                extra_groups=[] if user is not None else None,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, "delivery timed out"
        except OSError as exc:
            return None, f"cannot run delivery: {exc.strerror or exc}"
        lines = [ln for ln in proc.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
        return proc.returncode, (lines[-1] if lines else "")

    return await asyncio.to_thread(run)


def _exit_outcome(code: int | None, last: str) -> Outcome:
    if code == 0:
        return Outcome.ok("Delivered")
    if code is None or code < 0 or code in (EX_TEMPFAIL, EX_OSERR):
        return Outcome.tempfail(f'Error (temporary failure: "{last}")')
    return Outcome.permfail(f'Error (permanent failure: "{last}")')


# The delivery user of an alias's "|command" or "/file": the daemon's own unprivileged
# account (no user name can contain "<"); smtpd runs them as its user too.
DAEMON_ACCOUNT = "<daemon>"
MAIL_SPOOL = "/var/mail"


def _create_spool_mbox(path: str, user: LocalUser) -> None:
    """As mail.local does with root: create the user's own ``/var/mail/USER``, which the
    user cannot (Debian's /var/mail is root:mail 2775), mode 0600 and theirs. Nothing else
    is ever created as root (a .forward names any path)."""
    if path != f"{MAIL_SPOOL}/{user.name}" or "/" in user.name or user.name in ("", ".", ".."):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return  # there already, or not possible: the delivery says why
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


async def deliver(target: LocalTarget, env: Envelope, body: bytes) -> Outcome:
    """Deliver one envelope locally; never raises for delivery problems."""
    if target.user.uid == 0 and os.geteuid() == 0:
        return Outcome.permfail(f"not allowed to deliver to: {target.user.name}")
    if has_delivered_to(body, env.rcpt):
        return Outcome("loop", "Loop detected")
    message = prepare_message(env, body)
    if target.method == "mda":
        code, last = await _run_child(
            ["/bin/sh", "-c", target.target],
            message.replace(b"\r\n", b"\n"),
            user=target.user if _switch_user(target.user) else None,
            env=mda_environment(env, target.user),
            cwd=target.user.home,
            timeout=MDA_TIMEOUT,
        )
        return _exit_outcome(code, last)
    if target.method not in ("maildir", "mbox"):
        return Outcome.permfail(f"unsupported delivery method {target.method}")
    if _switch_user(target.user):
        if target.method == "mbox":
            _create_spool_mbox(target.target, target.user)
        argv = [sys.executable, "-m", "pigeon.delivery.helper", target.method, target.target]
        if target.method == "maildir":
            if target.junk:
                argv.append("--junk")
            if env.mda_subaddress:
                argv += ["--extension", env.mda_subaddress]
        else:
            argv += ["--sender", env.sender]
        code, last = await _run_child(
            argv,
            message,
            user=target.user,
            env={"PATH": "/bin:/usr/bin", "HOME": target.user.home},
            cwd=target.user.home,
            timeout=MDA_TIMEOUT,
        )
        return _exit_outcome(code, last) if code != 0 else Outcome.ok("Delivered")
    try:
        if target.method == "maildir":
            await asyncio.to_thread(
                maildir_deliver,
                target.target,
                message,
                junk=target.junk,
                extension=env.mda_subaddress or None,
            )
        else:
            await asyncio.to_thread(mbox_deliver, target.target, env.sender, message)
    except DeliveryFailure as exc:
        if exc.temporary:
            return Outcome.tempfail(f'Error (temporary failure: "{exc.text}")')
        return Outcome.permfail(f'Error (permanent failure: "{exc.text}")')
    return Outcome.ok("Delivered")


def daemon_account() -> LocalUser:
    """Who an alias's commands and files run as: the account a root-started daemon drops
    to (smtpd: its own user), ``nobody`` for one kept as root, else the daemon's user."""
    import pwd

    from pigeon import privsep

    dropped = privsep.run_as()
    if dropped is not None:
        return LocalUser(dropped.name, dropped.uid, dropped.gid, dropped.home)
    entry = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    return LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
