"""Pigeon SDK: write OpenSMTPD-compatible proc filters in Python (see pigeon.sdk.filter)."""

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

__all__ = [
    "Decision",
    "Filter",
    "MessageResult",
    "Session",
    "disconnect",
    "junk",
    "proceed",
    "reject",
    "report",
    "rewrite",
]
