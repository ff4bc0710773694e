"""The daemon's filters: start the processes, build each listener's chain, stop them."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from pigeon.config.model import Config, TableRef
from pigeon.filters.chain import ChainMember, FilterChain, FilterSession
from pigeon.filters.proc import DEFAULT_REQUEST_TIMEOUT, FilterProc, ProcSettings
from pigeon.procs import LIBEXEC_DIR, ProcessSpec, full_command
from pigeon.protocol import filterproto
from pigeon.tables.base import Table

if TYPE_CHECKING:
    from pigeon.filters.builtin import TableGetter

log = logging.getLogger("pigeon.filters")


def default_protocol(command: str) -> str:
    """The protocol spoken to a filter without ``protocol``: 0.6 for a program of Debian's
    add-on directory (its ``opensmtpd-filter-*`` packages are built for smtpd 6.8, which
    speaks 0.6: filter-rspamd reads ``link-auth`` in that order), 0.7 otherwise (7.6+)."""
    words = full_command(command).split(maxsplit=1)
    program = words[0] if words else ""
    return "0.6" if program.startswith(LIBEXEC_DIR + "/") else "0.7"


def filter_specs(config: Config) -> dict[str, ProcessSpec]:
    """The process of every ``proc`` a filter uses, by name."""
    used = {f.proc for f in config.filters.values() if f.proc is not None}
    specs = {}
    for name in sorted(used):
        decl = config.procs[name]
        specs[name] = ProcessSpec(name, decl.command, decl.user, decl.group, decl.chroot)
    return specs


class FilterManager:
    """Every ``proc`` used by a filter runs once and serves all sessions of all listeners."""

    def __init__(
        self,
        config: Config,
        table: TableGetter,
        *,
        admd: str,
        request_timeout: float | None = None,
        backoff_initial: float = 0.5,
    ) -> None:
        self.config = config
        self.table: TableGetter = table
        self.sessions: dict[int, FilterSession] = {}
        self.procs: dict[str, FilterProc] = {}
        for name, spec in filter_specs(config).items():
            decl = config.procs[name]
            version = filterproto.parse_version(decl.protocol or default_protocol(decl.command))
            timeout = decl.timeout or request_timeout or DEFAULT_REQUEST_TIMEOUT
            settings = ProcSettings(
                admd=admd,
                protocol=version,
                request_timeout=timeout,
                backoff_initial=backoff_initial,
            )
            self.procs[name] = FilterProc(spec, settings, on_proc_report=self._proc_report)
        self._chains: dict[str, FilterChain] = {}

    async def start(self) -> None:
        """Start every process and wait for its ``register|ready`` (as smtpd does before
        serving sessions); one that fails is logged and retried in the background."""
        results = await asyncio.gather(*(p.start() for p in self.procs.values()))
        for proc, ok in zip(self.procs.values(), results, strict=True):
            if not ok:
                log.warning("warn: %s: filter not ready at start, still trying", proc.name)

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs.values()))

    def chain(self, name: str | None) -> FilterChain | None:
        """The chain a listener's ``filter NAME`` refers to (None: not filtered)."""
        if name is None:
            return None
        chain = self._chains.get(name)
        if chain is None:
            chain = FilterChain(name, [self._member(n) for n in self._flatten(name)], self)
            self._chains[name] = chain
        return chain

    def _flatten(self, name: str) -> list[str]:
        decl = self.config.filters[name]
        if decl.kind == "chain":
            return [n for member in decl.chain for n in self._flatten(member)]
        return [name]

    def _member(self, name: str) -> ChainMember:
        decl = self.config.filters[name]
        if decl.kind == "builtin":
            return ChainMember(name, builtin=decl.builtin)
        if decl.kind == "rspamd":  # in-process, FilterProc-shaped (filters/rspamd_builtin.py)
            from pigeon.filters.rspamd_builtin import RspamdInProcess, settings_from_words

            inproc = RspamdInProcess(name, settings_from_words(decl.options))
            return ChainMember(name, proc=cast("FilterProc", inproc))
        assert decl.proc is not None
        return ChainMember(name, proc=self.procs[decl.proc])

    def _proc_report(self, session_id: int, proc_name: str, message: str) -> None:
        """A proc's own ``report|`` line: broadcast it as filter-report (smtpd crashes)."""
        session = self.sessions.get(session_id)
        if session is not None:
            session.report(filterproto.FilterReportEvent("proc", proc_name, message))


def table_getter(resolver: object) -> TableGetter:
    """Adapt the daemon's TableResolver to what builtins need."""

    def get(ref: TableRef) -> Table:
        table: Table = resolver.get(ref)  # type: ignore[attr-defined]
        return table

    return get
