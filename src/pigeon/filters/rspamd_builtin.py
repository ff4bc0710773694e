"""The rspamd filter in-process: ``filter NAME rspamd url URL ...`` in smtpd.conf.

:class:`RspamdInProcess` has the shape of :class:`pigeon.filters.proc.FilterProc` (the
methods :class:`pigeon.filters.chain.FilterSession` calls), so a chain runs it exactly like
a proc filter that registered ``data-line`` and ``commit``, without a process or a pipe:
reports update an SDK :class:`~pigeon.sdk.filter.Session`, the message goes through the
same :class:`~pigeon.filters.rspamd.RspamdScanner` as ``pigeon-filter-rspamd``, and the
verdict is answered at ``commit``. Config words are the CLI options without dashes
(:func:`settings_from_words`), so both forms take the same knobs.
"""

from __future__ import annotations

from collections.abc import Sequence

from pigeon.filters.rspamd import RspamdScanner, RspamdSettings, context_from_session
from pigeon.filters.rspamd_cli import parse_args, settings_from_args
from pigeon.protocol import filterproto
from pigeon.sdk.filter import Session

__all__ = ["RspamdInProcess", "config_words_to_argv", "settings_from_words"]

_EVENTS = frozenset(
    {
        "link-connect",
        "link-greeting",
        "link-identify",
        "link-tls",
        "link-auth",
        "tx-begin",
        "tx-mail",
        "tx-rcpt",
        "tx-reset",
        "tx-rollback",
    }
)
_FLAGS = {"skip-authenticated", "score-headers"}  # take yes|no
_PAIRS = {"map": "action", "header": "header"}  # take two words: KEY=VALUE


def config_words_to_argv(words: Sequence[str]) -> list[str]:
    """``url U on-error accept map reject junk header X-A b`` -> CLI arguments.

    Raises ValueError for a keyword without its value(s).
    """
    argv: list[str] = []
    i = 0
    while i < len(words):
        key = words[i]
        if key in _PAIRS:
            if i + 2 >= len(words):
                raise ValueError(f"rspamd option {key!r} needs two values")
            argv += [f"--{_PAIRS[key]}", f"{words[i + 1]}={words[i + 2]}"]
            i += 3
        elif key in _FLAGS:
            if i + 1 >= len(words) or words[i + 1] not in ("yes", "no"):
                raise ValueError(f"rspamd option {key!r} needs yes or no")
            argv.append(f"--{key}" if words[i + 1] == "yes" else f"--no-{key}")
            i += 2
        else:
            if i + 1 >= len(words):
                raise ValueError(f"rspamd option {key!r} needs a value")
            argv += [f"--{key}", words[i + 1]]
            i += 2
    return argv


def settings_from_words(words: Sequence[str]) -> RspamdSettings:
    """The settings of a ``filter NAME rspamd ...`` line; ValueError with a readable reason."""
    return settings_from_args(parse_args(config_words_to_argv(words), exit_on_error=False))


class RspamdInProcess:
    """A FilterProc look-alike running the rspamd scan in the daemon's event loop."""

    def __init__(self, name: str, settings: RspamdSettings) -> None:
        self.name = name
        self.scanner = RspamdScanner(settings, name=name)
        self.generation = 0  # never restarted: sessions are never stale
        self.ready = True
        self._sessions: dict[int, Session] = {}
        self._replies: dict[int, str] = {}  # the commit answer of a rejected message

    async def start(self) -> bool:
        return True

    async def stop(self) -> None:
        self._sessions.clear()
        self._replies.clear()

    async def wait_ready(self, timeout: float) -> bool:
        return True

    def open_session(self, session: int) -> None:
        self._sessions[session] = Session(session)

    def close_session(self, session: int) -> None:
        self._sessions.pop(session, None)
        self._replies.pop(session, None)

    def wants_report(self, event: str) -> bool:
        return event in _EVENTS

    def wants_phase(self, phase: str) -> bool:
        return phase in ("data-line", "commit")

    def report(self, timestamp: float, session: int, event: filterproto.ReportEvent) -> None:
        state = self._sessions.get(session)
        if state is None:
            return
        state.apply(event)
        if isinstance(event, filterproto.LinkGreeting):
            state.data["mta_name"] = event.hostname
        if isinstance(event, filterproto.TxReset | filterproto.TxRollback):
            self._replies.pop(session, None)

    async def request(self, session: int, phase: str, param: str) -> filterproto.FilterResult:
        reply = self._replies.pop(session, None) if phase == "commit" else None
        if reply is None:
            return filterproto.FilterResult(session, 0, filterproto.Decision.PROCEED)
        return filterproto.FilterResult(session, 0, filterproto.Decision.REJECT, reply)

    async def data_lines(self, session: int, lines: list[str]) -> list[str]:
        """Stuffed lines in, stuffed lines out (the FilterProc contract)."""
        state = self._sessions.get(session) or Session(session)
        unstuffed = [filterproto.dot_unstuff(line) for line in lines]
        outcome = await self.scanner.scan(context_from_session(state), unstuffed)
        if outcome.reply is not None:
            self._replies[session] = outcome.reply
        return [filterproto.dot_stuff(line) for line in outcome.lines]
