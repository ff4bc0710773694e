"""Pigeon SDK: write OpenSMTPD-compatible proc filters in Python (see pigeon.sdk.filter)
and proc tables (see pigeon.sdk.table)."""

from pigeon.sdk.filter import (
    Decision,
    Filter,
    MessageResult,
    Session,
    disconnect,
    junk,
    proceed,
    reject,
    report,
    rewrite,
)
from pigeon.sdk.table import Table, TableFailure

__all__ = [
    "Decision",
    "Filter",
    "MessageResult",
    "Session",
    "Table",
    "TableFailure",
    "disconnect",
    "junk",
    "proceed",
    "reject",
    "report",
    "rewrite",
]
