"""The offline queue: mail submitted with ``sendmail`` while the daemon is down.

Each file in ``<spool>/offline/`` holds one submission: a JSON line with the envelope, then
the message bytes. The directory is ``3733`` (anyone may drop a file, nobody may list or
touch another user's; files inherit the daemon's group) like OpenSMTPD's ``1733`` plus its
setgid ``_smtpq`` trick; files are ``0640``, owned by the submitting user,
fsync'd (file and directory) before ``sendmail`` reports success. The daemon picks them up
at start and every few seconds while running, and removes a file only once the mail is
queued.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from pigeon.durable import fsync_path

OFFLINE_DIR = "offline"
# Sticky (no one removes another's file) and setgid (files get the daemon's group, so a
# daemon that dropped root can still read them; other users cannot).
DIR_MODE = 0o3733
FILE_MODE = 0o640
MAX_HEADER = 1024 * 1024


class OfflineError(Exception):
    pass


@dataclass
class Submission:
    """One message to enqueue, with its SMTP envelope."""

    sender: str
    recipients: list[str]
    message: bytes
    ret: str = ""  # RET=FULL|HDRS
    envid: str = ""
    notify: str = ""  # NOTIFY=... for every recipient
    orcpts: dict[str, str] = field(default_factory=dict)

    def header(self) -> dict[str, object]:
        return {
            "version": 1,
            "sender": self.sender,
            "recipients": self.recipients,
            "ret": self.ret,
            "envid": self.envid,
            "notify": self.notify,
            "orcpts": self.orcpts,
        }

    @classmethod
    def from_header(cls, header: dict[str, object], message: bytes) -> Submission:
        recipients = header.get("recipients")
        orcpts = header.get("orcpts") or {}
        if not isinstance(recipients, list) or not isinstance(orcpts, dict):
            raise OfflineError("malformed envelope")
        return cls(
            sender=str(header.get("sender", "")),
            recipients=[str(r) for r in recipients],
            message=message,
            ret=str(header.get("ret") or ""),
            envid=str(header.get("envid") or ""),
            notify=str(header.get("notify") or ""),
            orcpts={str(k): str(v) for k, v in orcpts.items()},
        )


def offline_dir(spool: Path) -> Path:
    return spool / OFFLINE_DIR


def ensure_dir(spool: Path) -> Path:
    """Create ``offline/`` with the sticky, write-only mode (the daemon does this at start)."""
    path = offline_dir(spool)
    path.mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def write(spool: Path, sub: Submission) -> Path:
    """Store ``sub`` durably; returns the file. Raises OfflineError when it cannot."""
    directory = offline_dir(spool)
    data = json.dumps(sub.header()).encode() + b"\n" + sub.message
    for _ in range(100):
        path = directory / f"{int(time.time())}.{secrets.token_hex(6)}"
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
            )
        except FileExistsError:
            continue
        except OSError as exc:
            raise OfflineError(f"cannot create a file in {directory}: {exc.strerror}") from exc
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise OfflineError(f"cannot write {path}: {exc.strerror}") from exc
        os.close(fd)
        # Not every user can open the 1733 directory for reading: best effort then (the file
        # itself is synced, and its directory entry is on the journal of most file systems).
        with contextlib.suppress(OSError):
            fsync_path(directory)
        return path
    raise OfflineError(f"cannot find a free name in {directory}")


def pending(spool: Path) -> list[Path]:
    """Files waiting, oldest first."""
    try:
        names = sorted(os.listdir(offline_dir(spool)))
    except FileNotFoundError:
        return []
    return [offline_dir(spool) / n for n in names if not n.startswith(".")]


def read(path: Path) -> tuple[Submission, int]:
    """The submission in ``path`` and the uid that owns it. Refuses anything but a plain,
    single-link file (a link could smuggle another user's file into the queue)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise OfflineError(f"cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise OfflineError("not a plain file with a single link")
        first = f.readline(MAX_HEADER)
        message = f.read()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OfflineError("malformed envelope line") from exc
    if not isinstance(header, dict) or header.get("version") != 1:
        raise OfflineError("unknown offline file version")
    return Submission.from_header(header, message), st.st_uid
