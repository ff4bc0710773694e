"""Logging in OpenSMTPD's line format: ``<session-id> smtp connected address=...``.

Lines go to stderr (``pigeon run -d``, or ``--log stderr``) or to syslog's mail facility, as
``smtpd`` writes them; ``--log-format json`` turns each line into one JSON object whose fields
are parsed from the text (``session``, ``event``, then every ``key=value``), for log shippers.

Verbosity changes at run time with ``pigeon log verbose|brief`` and ``pigeon trace|untrace
SUBSYSTEM`` (as smtpctl; handled by the control server, which sets the subsystem's logger to
DEBUG).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

LOG_TARGETS = ("stderr", "syslog")
LOG_FORMATS = ("text", "json")

_SESSION_ID = re.compile(r"[0-9a-f]{16}")
_FIELD = re.compile(r'([A-Za-z][\w.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def set_verbose(on: bool) -> None:
    logging.getLogger("pigeon").setLevel(logging.DEBUG if on else logging.INFO)


def parse_line(message: str) -> dict[str, str]:
    """Split an OpenSMTPD-style line into fields.

    ``e706f4ed9ca38df3 smtp connected address=127.0.0.1 host=localhost`` gives
    ``{"session": "e706f4ed9ca38df3", "event": "smtp connected", "address": "127.0.0.1",
    "host": "localhost"}``. Quoted values lose their quotes. Lines without ``key=value``
    (``info: Pigeon starting``) have only ``event``.
    """
    out: dict[str, str] = {}
    rest = message
    first, _, tail = rest.partition(" ")
    if _SESSION_ID.fullmatch(first):
        out["session"] = first
        rest = tail
    match = _FIELD.search(rest)
    event = rest if match is None else rest[: match.start()]
    out["event"] = event.strip()
    if match is not None:
        for m in _FIELD.finditer(rest, match.start()):
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"')
            out.setdefault(m.group(1), value)
    return out


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, subsystem, the raw message, parsed fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        data: dict[str, object] = {
            "time": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in parse_line(message).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def _handler(target: str, spool: Path | None) -> logging.Handler:
    if target == "stderr":
        return logging.StreamHandler(sys.stderr)
    if os.path.exists("/dev/log"):
        return logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
    # No syslog daemon (containers): a file in the spool rather than losing the lines.
    handler = logging.FileHandler((spool or Path(".")) / "pigeon.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    return handler


def setup_logging(
    *,
    foreground: bool,
    verbose: bool,
    spool: Path | None = None,
    target: str | None = None,
    fmt: str = "text",
) -> None:
    """Configure the ``pigeon`` loggers. ``target`` defaults to stderr in the foreground and
    syslog otherwise."""
    # Every message logs several lines: skip what our format never prints (caller frame
    # lookup, thread and process names) to keep each line cheap.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("pigeon")
    root.handlers.clear()
    set_verbose(verbose)
    root.propagate = False
    handler = _handler(target or ("stderr" if foreground else "syslog"), spool)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    elif isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(logging.Formatter(f"pigeon[{os.getpid()}]: %(message)s"))
    elif handler.formatter is None:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)


def refresh_syslog_ident() -> None:
    """After a fork the pid in the syslog prefix is stale: rewrite it."""
    for handler in logging.getLogger("pigeon").handlers:
        if isinstance(handler, logging.handlers.SysLogHandler) and not isinstance(
            handler.formatter, JSONFormatter
        ):
            handler.setFormatter(logging.Formatter(f"pigeon[{os.getpid()}]: %(message)s"))


# ---- a child process (the relay worker) writing its lines where the daemon's go


def describe_for_child() -> dict[str, Any] | None:
    """How a child can write where the ``pigeon`` logger writes, or None (then it forwards
    its records to us). ``{"target": "fd", "fd": N}`` names a file descriptor the child must
    inherit (see :func:`child_handler`)."""
    handlers = logging.getLogger("pigeon").handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    fmt = "json" if isinstance(handler.formatter, JSONFormatter) else "text"
    if isinstance(handler, logging.handlers.SysLogHandler):
        if not isinstance(handler.address, str):
            return None
        return {"target": "syslog", "address": handler.address, "format": fmt}
    if isinstance(handler, logging.FileHandler):
        return {"target": "file", "path": handler.baseFilename, "format": fmt}
    if type(handler) is logging.StreamHandler:
        try:
            fd = handler.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        return {"target": "fd", "fd": fd, "format": fmt}
    return None


def child_handler(description: dict[str, Any]) -> logging.Handler:
    """The handler :func:`describe_for_child` described (in the child). Raises OSError."""
    target = description.get("target")
    handler: logging.Handler
    if target == "syslog":
        handler = logging.handlers.SysLogHandler(
            address=str(description["address"]), facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(logging.Formatter(f"pigeon[{os.getpid()}]: %(message)s"))
    elif target == "file":
        handler = logging.FileHandler(str(description["path"]))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    elif target == "fd":
        stream = open(int(description["fd"]), "w", buffering=1, closefd=True)  # noqa: SIM115
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        raise OSError(f"unknown log target {target!r}")
    if description.get("format") == "json":
        handler.setFormatter(JSONFormatter())
    return handler


def logger_levels() -> dict[str, int]:
    """The levels set on ``pigeon`` loggers (``log verbose``, ``trace``), for a child."""
    out: dict[str, int] = {}
    for name, logger in logging.root.manager.loggerDict.items():
        if not (name == "pigeon" or name.startswith("pigeon.")):
            continue
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            out[name] = logger.level
    return out


def apply_levels(levels: dict[str, int]) -> None:
    """Makes this process's ``pigeon`` loggers filter as :func:`logger_levels` said."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("pigeon.") and isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
    logging.getLogger("pigeon").setLevel(levels.get("pigeon", logging.INFO))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
