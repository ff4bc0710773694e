"""``pigeon check``: validate a configuration like ``smtpd -n``."""

from __future__ import annotations

import sys

from pigeon.config.issues import ConfigError
from pigeon.config.parser import load_config

DEFAULT_PATH = "/etc/pigeon/smtpd.conf"


def check_main(path: str | None, macros: dict[str, str]) -> int:
    """Print ``configuration OK`` (exit 0) or every issue on stderr (exit 1)."""
    try:
        load_config(path or DEFAULT_PATH, macros)
    except ConfigError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        return 1
    print("configuration OK")
    return 0
