"""The configuration as immutable data: what the daemon needs, with the line of each object.

Times are in seconds, sizes in bytes. Defaults are OpenSMTPD's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

TableKind = Literal["list", "mapping", "dynamic"]


@dataclass(frozen=True)
class TableDecl:
    """A table: named (``table NAME ...``) or anonymous (inline in a directive).

    ``backend`` is ``static`` for inline tables and ``file`` tables (as in OpenSMTPD, where
    ``file`` is an alias of ``static``), ``db``, ``getpwnam``, ``proc`` or another backend
    name. ``kind`` is known for static tables (list or mapping) and ``dynamic`` otherwise, or
    when the file was not read (``check_files=False``).
    """

    name: str
    backend: str
    config: str | None = None
    kind: TableKind = "list"
    values: tuple[str, ...] = ()
    mapping: tuple[tuple[str, str], ...] = ()
    anonymous: bool = False
    file: str = ""
    line: int = 0

    @property
    def is_static(self) -> bool:
        return self.backend == "static"


@dataclass(frozen=True)
class TableRef:
    """A reference to a table from a directive: ``<name>`` (``name`` set) or an anonymous
    inline table (``inline`` set; a bare string is a one-element list)."""

    name: str | None = None
    inline: TableDecl | None = None

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        assert self.inline is not None
        return self.inline.name


@dataclass(frozen=True)
class Listener:
    kind: Literal["inet", "socket"]
    interface: str = ""
    port: int | None = None  # None: 25, or 465 with smtps
    family: Literal["inet4", "inet6"] | None = None
    hostname: str | None = None
    tag: str | None = None
    tls: bool = False  # STARTTLS offered
    tls_require: bool = False
    verify: bool = False
    smtps: bool = False
    pki: tuple[str, ...] = ()
    ca: str | None = None
    ciphers: str | None = None
    protocols: str | None = None
    auth: bool = False  # AUTH required before MAIL
    auth_optional: bool = False
    auth_table: TableRef | None = None
    mask_src: bool = False
    received_auth: bool = False
    no_dsn: bool = False
    proxy_v2: bool = False
    senders: TableRef | None = None
    masquerade: bool = False
    filter: str | None = None
    hostnames: TableRef | None = None
    implicit: bool = False  # the socket listener that exists without a `listen on socket`
    line: int = 0

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 465 if self.smtps else 25


LocalMethod = Literal["mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only"]
Method = Literal["mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only", "relay"]
RelayTLS = Literal["opportunistic", "required", "no-verify"]


@dataclass(frozen=True)
class Action:
    name: str
    method: Method
    ttl: int | None = None  # seconds; None = queue ttl
    # local delivery
    maildir_path: str | None = None  # None = ~/Maildir
    junk: bool = False
    lmtp_dest: str | None = None
    lmtp_rcpt_to: bool = False
    mda_command: str | None = None
    user: str | None = None
    alias: TableRef | None = None
    virtual: TableRef | None = None
    userbase: TableRef | None = None  # None = getpwnam
    wrapper: str | None = None
    # relay
    host: TableRef | None = None
    domain: TableRef | None = None
    backup: bool = False
    backup_mx: str | None = None
    helo: str | None = None
    helo_src: TableRef | None = None
    src: TableRef | None = None
    pki: str | None = None
    ca: str | None = None
    tls: RelayTLS = "opportunistic"
    auth: TableRef | None = None
    mail_from: str | None = None
    srs: bool = False
    filter: str | None = None
    ciphers: str | None = None
    protocols: str | None = None
    line: int = 0

    @property
    def is_local(self) -> bool:
        return self.method != "relay"


@dataclass(frozen=True)
class Criterion:
    """One ``match`` condition. ``kind`` is one of: tag, helo, tls, auth, mail-from, rcpt-to,
    from-socket, from-local, from-any, from-src, from-rdns, for-local, for-any, for-domain.
    (``from auth``/``from mail-from``/``for rcpt-to`` are stored as auth/mail-from/rcpt-to
    criteria, which is what they mean.) ``table`` is None for the forms without one."""

    kind: str
    negated: bool = False
    regex: bool = False
    table: TableRef | None = None


@dataclass(frozen=True)
class Match:
    criteria: tuple[Criterion, ...]
    action: str | None  # None = reject
    line: int = 0

    def criterion(self, kind: str) -> Criterion | None:
        for c in self.criteria:
            if c.kind == kind:
                return c
        return None

    @property
    def reject(self) -> bool:
        return self.action is None


@dataclass(frozen=True)
class BuiltinFilter:
    """``filter NAME phase PHASE match [!]COND ACTION``."""

    phase: str
    condition: str  # fcrdns, rdns, src, helo, auth, mail-from, rcpt-to
    negated: bool
    regex: bool
    table: TableRef | None
    decision: str  # junk, bypass, reject, disconnect, rewrite, report
    argument: str | None  # the reply/rewrite/report text


@dataclass(frozen=True)
class Filter:
    name: str
    kind: Literal["proc", "proc-exec", "builtin", "chain", "rspamd"]
    proc: str | None = None  # the proc name (proc) or the filter's own name (proc-exec)
    command: str | None = None  # proc-exec command
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    chain: tuple[str, ...] = ()
    builtin: BuiltinFilter | None = None
    anonymous: bool = False  # an inline `filter { a, b }` chain
    options: tuple[str, ...] = ()  # `filter NAME rspamd WORDS...` (Pigeon extension)
    line: int = 0


@dataclass(frozen=True)
class Proc:
    name: str
    command: str
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    line: int = 0
    # Pigeon extensions (`protocol "0.6"`, `timeout 30s`): see docs/filters.md.
    protocol: str | None = None  # filter protocol version spoken with this process
    timeout: int | None = None  # seconds a filter may take to answer one request


@dataclass(frozen=True)
class Pki:
    name: str
    cert: str | None = None
    key: str | None = None
    dhe: Literal["none", "auto", "legacy"] = "none"
    line: int = 0


@dataclass(frozen=True)
class Ca:
    name: str
    cert: str
    line: int = 0


@dataclass(frozen=True)
class SmtpOptions:
    max_mails: int = 100
    max_rcpt: int = 1000
    max_message_size: int = 36700160
    sub_addr_delim: str = "+"
    ciphers: str = "HIGH:!aNULL:!MD5"


@dataclass(frozen=True)
class QueueOptions:
    ttl: int = 4 * 86400
    compression: bool = False
    encryption: bool = False
    encryption_key: str | None = None  # None with encryption: key from the environment; "stdin"


@dataclass(frozen=True)
class SrsOptions:
    key: str | None = None
    backup_key: str | None = None
    ttl: int = 4 * 86400
    postsrsd_compat: bool = False  # Pigeon extension: `srs compat postsrsd`


@dataclass(frozen=True)
class MtaLimits:
    """``mta limit`` values (keys as written, e.g. ``max-conn-per-host``) for one domain or
    the default (``domain`` None)."""

    domain: str | None = None
    family: Literal["inet4", "inet6"] | None = None
    values: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class MetricsListen:
    """Pigeon extension: ``metrics listen on ADDRESS port PORT``."""

    address: str
    port: int
    line: int = 0


def _empty() -> Mapping[str, object]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Config:
    file: str = "<string>"
    listeners: tuple[Listener, ...] = ()
    tables: Mapping[str, TableDecl] = field(default_factory=_empty)  # type: ignore[arg-type]
    actions: Mapping[str, Action] = field(default_factory=_empty)  # type: ignore[arg-type]
    matches: tuple[Match, ...] = ()
    filters: Mapping[str, Filter] = field(default_factory=_empty)  # type: ignore[arg-type]
    procs: Mapping[str, Proc] = field(default_factory=_empty)  # type: ignore[arg-type]
    pkis: Mapping[str, Pki] = field(default_factory=_empty)  # type: ignore[arg-type]
    cas: Mapping[str, Ca] = field(default_factory=_empty)  # type: ignore[arg-type]
    smtp: SmtpOptions = SmtpOptions()
    queue: QueueOptions = QueueOptions()
    srs: SrsOptions = SrsOptions()
    bounce_warn_interval: tuple[int, ...] = (14400,)
    mta_max_deferred: int = 100
    mta_limits: tuple[MtaLimits, ...] = ()
    mda_limits: Mapping[str, int] = field(default_factory=_empty)  # type: ignore[arg-type]
    mda_wrappers: Mapping[str, str] = field(default_factory=_empty)  # type: ignore[arg-type]
    scheduler_limits: Mapping[str, int] = field(default_factory=_empty)  # type: ignore[arg-type]
    admd: str | None = None
    metrics: MetricsListen | None = None
    macros: Mapping[str, str] = field(default_factory=_empty)  # type: ignore[arg-type]
