"""Logging in OpenSMTPD's line format: ``<session-id> smtp connected address=...``."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path


def setup_logging(*, foreground: bool, verbose: bool, spool: Path | None = None) -> None:
    # Every message logs several lines: skip what our format never prints (caller frame
    # lookup, thread and process names) to keep each line cheap.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("pigeon")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter(f"pigeon[{os.getpid()}]: %(message)s"))
    else:
        target = (spool or Path(".")) / "pigeon.log"
        handler = logging.FileHandler(target)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root.addHandler(handler)
