"""Making writes survive a crash: what the queue, mailboxes and map files share."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """Flush a file's data, or a directory's entries (after a create or rename in it), to
    disk; raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
