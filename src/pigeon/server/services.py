"""What sessions need from the daemon, in one place (so sessions never import the daemon)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pigeon.queue.envelope import Envelope
from pigeon.queue.journal import JournalStore
from pigeon.srs import SRSContext

if TYPE_CHECKING:
    from pigeon.config.model import Config
    from pigeon.rules.expand import Expander
    from pigeon.server.session import SMTPSession


class Stats:
    """Counters shown by ``pigeon show stats``."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def incr(self, key: str, n: int = 1) -> None:
        self.counters[key] += n


@dataclass
class Services:
    config: Config
    store: JournalStore
    expander: Expander
    accepted: Callable[[list[Envelope]], None]
    stats: Stats = field(default_factory=Stats)
    sessions: set[SMTPSession] = field(default_factory=set)
    srs: SRSContext | None = None  # set when the config has an `srs key`
    smtp_paused: bool = False
    max_sessions: int = 20000
