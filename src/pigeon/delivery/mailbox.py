"""Writing a message into a maildir or an mbox file, durably.

These functions block (file I/O and fsync): the daemon calls them in a worker thread when it
may write as itself, or in a child process running as the recipient user (``helper.py``).
They raise ``DeliveryFailure``; ``temporary`` tells whether a retry may succeed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import time
from pathlib import Path

from pigeon.durable import fsync_path

# Errors where waiting may help (disk full, quota, lock contention, I/O hiccup).
_TEMPORARY_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EAGAIN,
    errno.EIO,
    errno.EINTR,
    errno.ENFILE,
    errno.EMFILE,
    errno.ENOMEM,
    errno.EROFS,
    errno.EACCES,  # often a transient permission fix-up by the admin; retry until ttl
    errno.EPERM,
    errno.ENOTDIR,  # a file where the maildir should be: an admin's mistake, as smtpd retries
    errno.EISDIR,
    errno.ENOENT,
    errno.ELOOP,
}


class DeliveryFailure(Exception):
    def __init__(self, text: str, *, temporary: bool) -> None:
        super().__init__(text)
        self.text = text
        self.temporary = temporary


def _failure(what: str, exc: OSError) -> DeliveryFailure:
    return DeliveryFailure(
        f"{what}: {exc.strerror or exc}", temporary=exc.errno in _TEMPORARY_ERRNOS
    )


def to_unix_lines(message: bytes) -> bytes:
    """Mailboxes on disk use LF line ends."""
    return message.replace(b"\r\n", b"\n")


def is_junk(message: bytes) -> bool:
    """True when a header line (before the first empty line) is exactly ``X-Spam: yes`` or
    ``X-Spam-Flag: yes``, ignoring case, as OpenSMTPD's mail.maildir tests it."""
    for raw in message.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line:
            break
        if line.lower() in (b"x-spam: yes", b"x-spam-flag: yes"):
            return True
    return False


def _ensure_maildir(path: Path) -> None:
    for sub in ("", "cur", "new", "tmp"):
        d = path / sub if sub else path
        if not d.is_dir():
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _failure(f"cannot create maildir {d}", exc) from exc


def maildir_deliver(
    maildir: str, message: bytes, *, junk: bool = False, extension: str | None = None
) -> str:
    """Deliver into ``maildir`` (tmp, fsync, rename into new, fsync new). Returns the file.

    With ``junk``, a message marked as spam goes to the ``.Junk`` folder. With an
    ``extension`` (the +subaddress) and an existing ``.<extension>`` folder, it goes there.
    """
    root = Path(maildir)
    _ensure_maildir(root)
    target = root
    if junk:
        _ensure_maildir(root / ".Junk")
    if extension:
        # as smtpd's mail.maildir: a "." stays (Maildir++: user+lists.work is lists/work)
        folder = root / ("." + extension.replace("/", ":"))
        if folder.is_dir():
            target = folder
            _ensure_maildir(target)
    if junk and is_junk(message):
        target = root / ".Junk"
    data = to_unix_lines(message)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    for _ in range(10):
        name = f"{int(time.time())}.{secrets.token_hex(4)}.{host}"
        tmp = target / "tmp" / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _failure("cannot create maildir file", exc) from exc
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _failure("cannot write maildir file", exc) from exc
        os.close(fd)
        final = target / "new" / name
        try:
            os.rename(tmp, final)
            fsync_path(target / "new")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _failure("cannot move maildir file into new/", exc) from exc
        return str(final)
    raise DeliveryFailure("cannot find a unique maildir file name", temporary=True)


def mbox_from_line(sender: str, when: float | None = None) -> bytes:
    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(when))
    return f"From {sender or 'MAILER-DAEMON'} {stamp}\n".encode()


def _mbox_escape(data: bytes) -> bytes:
    """mboxrd quoting: a body line starting with ``>*From `` gets one more ``>``."""
    out = []
    for line in data.split(b"\n"):
        if line.lstrip(b">").startswith(b"From "):
            line = b">" + line
        out.append(line)
    return b"\n".join(out)


def mbox_deliver(path: str, sender: str, message: bytes) -> None:
    """Append to an mbox file under an exclusive lock (flock plus a ``.lock`` dot-lock)."""
    data = _mbox_escape(to_unix_lines(message))
    if not data.endswith(b"\n"):
        data += b"\n"
    record = mbox_from_line(sender) + data + b"\n"
    lock = path + ".lock"
    lock_fd = -1
    for _ in range(50):
        try:
            lock_fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(lock).st_mtime > 300:
                    os.unlink(lock)  # stale dot-lock left by a crashed writer
                    continue
            time.sleep(0.1)
        except OSError:
            break  # no write access to the directory: rely on flock alone
    else:
        raise DeliveryFailure(f"cannot lock mailbox {path}", temporary=True)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _failure(f"cannot open mailbox {path}", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(record)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # never leave half a message in the mailbox
                raise _failure(f"cannot write mailbox {path}", exc) from exc
        finally:
            os.close(fd)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
