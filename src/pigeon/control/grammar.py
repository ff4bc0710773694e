"""smtpctl's command words: unambiguous prefixes are accepted, as smtpctl(8) does.

``expand(["sh", "q"])`` gives ``["show", "queue"]``. A word matching several keywords, or
none, raises :class:`Ambiguous` with the full commands possible at that point, which the
command line prints after ``possibilities are:`` (exit 255, like smtpctl).
"""

from __future__ import annotations

from dataclasses import dataclass

# One entry per command; placeholders in angle brackets take any word.
# "[<id>]" marks an optional last argument. Order is smtpctl's listing order.
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("pause", "envelope", "<id>"),
    ("pause", "mda"),
    ("pause", "mta"),
    ("pause", "smtp"),
    ("resume", "envelope", "<id>"),
    ("resume", "mda"),
    ("resume", "mta"),
    ("resume", "smtp"),
    ("show", "mta", "paused"),
    ("show", "envelope", "<id>"),
    ("show", "hoststats"),
    ("show", "message", "<id>"),
    ("show", "queue", "[<id>]"),
    ("show", "hosts"),
    ("show", "relays"),
    ("show", "routes"),
    ("show", "stats"),
    ("show", "status"),
    ("log", "brief"),
    ("log", "verbose"),
    ("monitor",),
    ("remove", "<id>"),
    ("schedule", "<id>"),
    ("trace", "<subsystem>"),
    ("untrace", "<subsystem>"),
    ("stop",),
    ("update", "table", "<name>"),
    ("reload",),  # Pigeon extension
    ("encrypt", "[<string>]"),
)


@dataclass
class Ambiguous(Exception):
    """No single command matches; ``possibilities`` are what could come instead."""

    possibilities: list[str]


def _is_placeholder(word: str) -> bool:
    return word.startswith("<") or word.startswith("[<")


def expand(words: list[str]) -> list[str]:
    """The full command for possibly abbreviated ``words``."""
    candidates = list(COMMANDS)
    out: list[str] = []
    for position, word in enumerate(words):
        keywords: dict[str, None] = {}
        takes_argument = []
        for cmd in candidates:
            if position >= len(cmd):
                continue
            if _is_placeholder(cmd[position]):
                takes_argument.append(cmd)
            else:
                keywords.setdefault(cmd[position], None)
        exact = [k for k in keywords if k == word]
        prefixed = exact or [k for k in keywords if k.startswith(word)]
        if len(prefixed) == 1:
            chosen = prefixed[0]
            candidates = [c for c in candidates if position < len(c) and c[position] == chosen]
            out.append(chosen)
            continue
        if takes_argument and not prefixed:
            candidates = takes_argument
            out.append(word)
            continue
        pool = [c for c in candidates if position < len(c)]
        if prefixed:
            pool = [c for c in pool if c[position] in prefixed]
        raise Ambiguous(_listing(pool, position))
    complete = [c for c in candidates if _complete(c, len(out))]
    if not complete:
        raise Ambiguous(_listing(candidates, len(out)))
    return out


def _complete(cmd: tuple[str, ...], given: int) -> bool:
    if given == len(cmd):
        return True
    return given == len(cmd) - 1 and cmd[-1].startswith("[")


def _listing(pool: list[tuple[str, ...]], position: int) -> list[str]:
    """What smtpctl prints: the commands up to and including the word in question."""
    seen: dict[str, None] = {}
    for cmd in pool:
        shown = cmd[: position + 1]
        seen.setdefault(" ".join(w for w in shown), None)
    return list(seen)
