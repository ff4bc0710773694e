"""Turns parsed statements into the model, with the checks ``smtpd -n`` makes.

Error texts follow OpenSMTPD's parse.y where it has one, so people can search for them.
Deliberate difference: an object whose declaration had an error is still registered, so a
later reference does not produce a second, misleading error ("no such dispatcher" after a
bad table file): Pigeon reports the cause once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Literal, cast

from lark import Token, Tree

from pigeon.config.issues import ConfigIssue
from pigeon.config.lexer import Tok
from pigeon.config.model import (
    Action,
    BuiltinFilter,
    Ca,
    Config,
    Criterion,
    Filter,
    Listener,
    Match,
    MetricsListen,
    MtaLimits,
    Pki,
    Proc,
    QueueOptions,
    SmtpOptions,
    SrsOptions,
    TableDecl,
    TableKind,
    TableRef,
)
from pigeon.config.validate import (
    MDA_LIMIT_KEYS,
    MTA_LIMIT_KEYS,
    SCHEDULER_LIMIT_KEYS,
    SMTP_LIMIT_KEYS,
    parse_delay,
    parse_size,
    service_port,
    valid_hostname,
)
from pigeon.tables.file import TableFileError, load_table_file

PROC_TABLE_DIRS = ("/usr/libexec/opensmtpd", "/usr/local/libexec/smtpd", "/usr/lib/pigeon")
BUILTIN_BACKENDS = frozenset(
    ("static", "file", "db", "getpwnam", "proc", "proc-exec", "sqlite", "redis", "postgres")
)
TAG_SIZE = 32
MAX_BOUNCE_WARN = 4

# Which builtin-filter conditions each phase accepts (parse.y filter_phase_*_options).
_GLOBAL = {"fcrdns", "rdns", "src"}
_PHASE_CONDITIONS: dict[str, set[str]] = {
    "connect": _GLOBAL,
    "helo": _GLOBAL | {"helo"},
    "ehlo": _GLOBAL | {"helo"},
    "auth": _GLOBAL | {"helo", "auth"},
    "mail-from": _GLOBAL | {"helo", "auth", "mail-from"},
    "rcpt-to": _GLOBAL | {"helo", "auth", "mail-from", "rcpt-to"},
    "data": _GLOBAL | {"helo", "auth", "mail-from"},
    "commit": _GLOBAL | {"helo", "auth", "mail-from"},
}


class StatementError(Exception):
    """Aborts the current statement (like YYERROR) after an issue was recorded."""


def _children(tree: Tree[Token]) -> list[Any]:
    return list(tree.children)


class Builder:
    def __init__(self, filename: str, macros: Mapping[str, str], check_files: bool) -> None:
        self.filename = filename
        self.check_files = check_files
        self.cmdline_macros = dict(macros)
        self.macros: dict[str, str] = dict(macros)
        self.issues: list[ConfigIssue] = []
        self.relay_refs: list[tuple[str, str, Tok]] = []  # a relay's pki and ca names
        self.toks: list[Tok] = []
        self.tables: dict[str, TableDecl] = {}
        self.actions: dict[str, Action] = {}
        self.matches: list[Match] = []
        self.filters: dict[str, Filter] = {}
        self.procs: dict[str, Proc] = {}
        self.pkis: dict[str, Pki] = {}
        self.cas: dict[str, Ca] = {}
        self.listeners: list[Listener] = []
        self.socket_listener: Listener | None = None
        self.wrappers: dict[str, str] = {}
        self.mda_limits: dict[str, int] = {}
        self.scheduler_limits: dict[str, int] = {}
        self.mta_limits: dict[str | None, MtaLimits] = {}
        self.mta_max_deferred = 100
        self.smtp = SmtpOptions()
        self.queue = QueueOptions()
        self.srs = SrsOptions()
        self.bounce: tuple[int, ...] = (14400,)
        self.admd: str | None = None
        self.metrics: MetricsListen | None = None
        self.anon_count = 0
        self.dynchain_count = 0
        self.pki_tokens: dict[str, tuple[Tok | None, Tok | None]] = {}

    # -- plumbing ----------------------------------------------------------------------

    def macro_value(self, name: str) -> str | None:
        return self.macros.get(name)

    def issue(self, tok: Tok, message: str) -> None:
        self.issues.append(ConfigIssue(tok.file, tok.line, tok.col, message))

    def fail(self, token: Token | Tok, message: str) -> StatementError:
        self.issue(self.tok(token), message)
        return StatementError(message)

    def tok(self, token: Token | Tok) -> Tok:
        if isinstance(token, Tok):
            return token
        return self.toks[token.start_pos or 0]

    def statement(self, tree: Tree[Token], toks: list[Tok]) -> Tok | None:
        """Apply one statement; returns the path token of an ``include``."""
        self.toks = toks
        stmt = tree.children[0]
        assert isinstance(stmt, Tree)
        if stmt.data == "include":
            path = stmt.children[1]
            assert isinstance(path, Token)
            return self.tok(path)
        handler = getattr(self, f"_st_{stmt.data}")
        with contextlib.suppress(StatementError):
            handler(stmt)
        return None

    def placeholder(self, toks: list[Tok]) -> None:
        """A declaration that failed to parse still declares its name, so that later
        references do not add a second, misleading error."""
        if len(toks) < 2 or toks[1].type != "STRING":
            return
        name, kind = toks[1].value, toks[0].type
        if kind == "ACTION":
            self.actions.setdefault(name, Action(name, "relay", line=toks[0].line))
        elif kind == "TABLE":
            self.tables.setdefault(name, TableDecl(name, "static", None, "dynamic"))
        elif kind == "FILTER":
            self.filters.setdefault(name, Filter(name, "chain", line=toks[0].line))

    def line(self, token: Token | Tok) -> int:
        return self.tok(token).line

    # -- simple statements -------------------------------------------------------------

    def _st_varset(self, t: Tree[Token]) -> None:
        name, _, value = t.children
        assert isinstance(name, Token) and isinstance(value, Token)
        if any(c.isspace() for c in str(name)[1:]):
            raise self.fail(name, "macro name cannot contain whitespace")
        if str(name) in self.cmdline_macros:
            return  # -D wins over the file
        self.macros[str(name)] = str(value)

    def _st_admd(self, t: Tree[Token]) -> None:
        value = t.children[1]
        assert isinstance(value, Token)
        if not all(c.isprintable() for c in str(value)):
            raise self.fail(value, "not a valid admd")
        self.admd = str(value)

    def _st_bounce(self, t: Tree[Token]) -> None:
        delays: list[int] = []
        for tok in t.children[2:]:
            assert isinstance(tok, Token)
            if tok.type != "STRING":
                continue
            d = parse_delay(str(tok))
            if d is None:
                raise self.fail(tok, f"invalid bounce delay: {tok}")
            if len(delays) < MAX_BOUNCE_WARN:
                delays.append(d)
        self.bounce = tuple(delays)

    def _name_check(self, tok: Token) -> str:
        if not valid_hostname(str(tok)):
            raise self.fail(tok, f"not a valid domain name: {tok}")
        return str(tok).lower()

    def _st_ca(self, t: Tree[Token]) -> None:
        _, name, _, cert = t.children
        assert isinstance(name, Token) and isinstance(cert, Token)
        key = self._name_check(name)
        self.cas[key] = Ca(key, str(cert), self.line(name))
        self.pki_tokens[f"ca:{key}"] = (self.tok(cert), None)

    def _st_pki(self, t: Tree[Token]) -> None:
        name = t.children[1]
        assert isinstance(name, Token)
        key = self._name_check(name)
        pki = self.pkis.get(key) or Pki(key, line=self.line(name))
        cert_tok, key_tok = self.pki_tokens.get(key, (None, None))
        for param in t.children[2:]:
            assert isinstance(param, Tree)
            value = param.children[1]
            assert isinstance(value, Token)
            if param.data == "pki_cert":
                pki = replace(pki, cert=str(value))
                cert_tok = self.tok(value)
            elif param.data == "pki_key":
                pki = replace(pki, key=str(value))
                key_tok = self.tok(value)
            else:
                dhe = str(value).lower()
                if dhe not in ("none", "auto", "legacy"):
                    raise self.fail(value, f"invalid DHE keyword: {value}")
                pki = replace(pki, dhe=dhe)  # type: ignore[arg-type]
        self.pkis[key] = pki
        self.pki_tokens[key] = (cert_tok, key_tok)

    def _limit_pairs(self, trees: list[Any], keys: frozenset[str], what: str) -> dict[str, int]:
        values: dict[str, int] = {}
        for pair in trees:
            if not isinstance(pair, Tree) or pair.data != "limit_pair":
                continue
            key, number = pair.children
            assert isinstance(key, Token) and isinstance(number, Token)
            if str(key) not in keys:
                raise self.fail(key, f"invalid {what} limit keyword: {key}")
            values[str(key)] = int(number)
        return values

    def _st_mda_limit(self, t: Tree[Token]) -> None:
        self.mda_limits.update(self._limit_pairs(_children(t)[2:], MDA_LIMIT_KEYS, "mda"))

    def _st_mda_wrapper(self, t: Tree[Token]) -> None:
        _, _, name, command = t.children
        assert isinstance(name, Token) and isinstance(command, Token)
        if str(name) in self.wrappers:
            raise self.fail(name, f"mda wrapper already declared with that name: {name}")
        self.wrappers[str(name)] = str(command)

    def _st_scheduler(self, t: Tree[Token]) -> None:
        self.scheduler_limits.update(
            self._limit_pairs(_children(t)[2:], SCHEDULER_LIMIT_KEYS, "scheduler")
        )

    def _st_mta_max_deferred(self, t: Tree[Token]) -> None:
        self.mta_max_deferred = int(t.children[2])  # type: ignore[arg-type]

    def _mta_limits(self, domain: str | None, opts: list[Any]) -> None:
        current = self.mta_limits.get(domain) or self.mta_limits.get(None) or MtaLimits()
        family = current.family
        values = dict(current.values)
        for opt in opts:
            assert isinstance(opt, Tree)
            inner = opt.children[0]
            if isinstance(inner, Token):
                family = "inet4" if inner.type == "INET4" else "inet6"
            else:
                values.update(self._limit_pairs([inner], MTA_LIMIT_KEYS, "mta"))
        self.mta_limits[domain] = MtaLimits(domain, family, MappingProxyType(values))

    def _st_mta_limit(self, t: Tree[Token]) -> None:
        self._mta_limits(None, _children(t)[2:])

    def _st_mta_limit_domain(self, t: Tree[Token]) -> None:
        self._mta_limits(str(t.children[4]), _children(t)[5:])

    def _proc_params(self, params: list[Any], what: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for param in params:
            assert isinstance(param, Tree)
            kw, value = param.children
            assert isinstance(kw, Token) and isinstance(value, Token)
            if kw.type == "STRING" and str(kw) not in ("protocol", "timeout"):
                raise self.fail(kw, f'syntax error: unexpected "{kw}"')
            if str(kw) in found:
                raise self.fail(kw, f"{kw} already specified for this {what}")
            found[str(kw)] = str(value)
        return found

    def _proc_extensions(self, trees: list[Any], params: dict[str, str]) -> dict[str, Any]:
        """The Pigeon-only ``protocol`` and ``timeout`` options of a proc or proc-exec."""
        from pigeon.protocol.filterproto import SUPPORTED_VERSIONS

        def token(keyword: str) -> Token:
            for tree in trees:
                kw, value = tree.children
                if str(kw) == keyword:
                    assert isinstance(value, Token)
                    return value
            raise AssertionError(keyword)  # pragma: no cover

        out: dict[str, Any] = {}
        if "protocol" in params:
            if params["protocol"] not in SUPPORTED_VERSIONS:
                versions = ", ".join(SUPPORTED_VERSIONS)
                raise self.fail(token("protocol"), f"unsupported filter protocol (use {versions})")
            out["protocol"] = params["protocol"]
        if "timeout" in params:
            text = params["timeout"]
            seconds = int(text) if text.isdigit() else parse_delay(text)
            if seconds is None or seconds <= 0:
                raise self.fail(token("timeout"), f"invalid timeout: {params['timeout']}")
            out["timeout"] = seconds
        return out

    def _st_proc(self, t: Tree[Token]) -> None:
        name, command = t.children[1], t.children[2]
        assert isinstance(name, Token) and isinstance(command, Token)
        if str(name) in self.procs:
            raise self.fail(name, f"processor already exists with that name: {name}")
        params = self._proc_params(_children(t)[3:], "processor")
        self.procs[str(name)] = Proc(
            str(name),
            str(command),
            params.get("user"),
            params.get("group"),
            params.get("chroot"),
            self.line(name),
            **self._proc_extensions(_children(t)[3:], params),
        )

    def _st_queue_compression(self, t: Tree[Token]) -> None:
        self.queue = replace(self.queue, compression=True)

    def _st_queue_encryption(self, t: Tree[Token]) -> None:
        key = str(t.children[2]) if len(t.children) > 2 else None
        if key is not None and key.lower() in ("stdin", "-"):
            key = "stdin"
        elif key is not None and len(key.encode()) != 32:  # smtpd 6.8: an AES-256 key
            tok = t.children[2]
            assert isinstance(tok, Token)
            raise self.fail(tok, "invalid key for queue encryption (32 characters)")
        self.queue = replace(self.queue, encryption=True, encryption_key=key)

    def _st_queue_ttl(self, t: Tree[Token]) -> None:
        tok = t.children[2]
        assert isinstance(tok, Token)
        ttl = parse_delay(str(tok))
        if ttl is None:
            raise self.fail(tok, f"invalid ttl delay: {tok}")
        self.queue = replace(self.queue, ttl=ttl)

    def _st_smtp_limit(self, t: Tree[Token]) -> None:
        values = self._limit_pairs(_children(t)[2:], SMTP_LIMIT_KEYS, "session")
        self.smtp = replace(
            self.smtp,
            max_mails=values.get("max-mails", self.smtp.max_mails),
            max_rcpt=values.get("max-rcpt", self.smtp.max_rcpt),
        )

    def _st_smtp_ciphers(self, t: Tree[Token]) -> None:
        self.smtp = replace(self.smtp, ciphers=str(t.children[2]))

    def _st_smtp_max_message_size(self, t: Tree[Token]) -> None:
        size_tree = t.children[2]
        assert isinstance(size_tree, Tree)
        tok = size_tree.children[0]
        assert isinstance(tok, Token)
        size = int(tok) if tok.type == "NUMBER" else parse_size(str(tok))
        if size is None or size < 0:
            raise self.fail(tok, f"invalid size: {tok}")
        self.smtp = replace(self.smtp, max_message_size=size)

    def _st_smtp_sub_addr_delim(self, t: Tree[Token]) -> None:
        tok = t.children[2]
        assert isinstance(tok, Token)
        value = str(tok)
        if len(value) != 1:
            raise self.fail(tok, "subaddressing-delimiter must be one character")
        if value.isspace() or not value.isprintable() or value == "@" or not value.isascii():
            raise self.fail(tok, "sub-addr-delim uses invalid character")
        self.smtp = replace(self.smtp, sub_addr_delim=value)

    def _st_srs_key(self, t: Tree[Token]) -> None:
        self.srs = replace(self.srs, key=str(t.children[2]))

    def _st_srs_key_backup(self, t: Tree[Token]) -> None:
        self.srs = replace(self.srs, backup_key=str(t.children[3]))

    def _st_srs_ttl(self, t: Tree[Token]) -> None:
        tok = t.children[2]
        assert isinstance(tok, Token)
        ttl = parse_delay(str(tok))
        if ttl is None:
            raise self.fail(tok, f'ttl delay "{tok}" is invalid')
        days = ttl // 86400  # OpenSMTPD keeps whole days
        if days == 0:
            raise self.fail(tok, f'ttl delay "{tok}" is too short')
        self.srs = replace(self.srs, ttl=days * 86400)

    def _st_srs_compat(self, t: Tree[Token]) -> None:
        # Pigeon extension: also verify addresses minted by postsrsd (docs/srs.md).
        word, mode = cast(Token, t.children[1]), cast(Token, t.children[2])
        if str(word) != "compat" or self.tok(word).quoted:
            raise self.fail(word, "syntax error")
        if str(mode) != "postsrsd":
            raise self.fail(mode, f"unknown srs compat mode: {mode}")
        self.srs = replace(self.srs, postsrsd_compat=True)

    def _st_metrics(self, t: Tree[Token]) -> None:
        word, _, _, address, _, port = t.children
        assert isinstance(word, Token) and isinstance(port, Token)
        if str(word) != "metrics" or self.tok(word).quoted:
            raise self.fail(word, f'syntax error: unexpected "{word}"')
        if self.metrics is not None:
            raise self.fail(word, "metrics listener already configured")
        number = int(port) if port.type == "NUMBER" else service_port(str(port))
        if number is None or not 0 < number <= 65535:
            raise self.fail(port, f"invalid port: {port}")
        self.metrics = MetricsListen(str(address), number, self.line(word))

    # -- tables --------------------------------------------------------------------------

    def _table_values(
        self, tree: Tree[Token]
    ) -> tuple[TableKind, tuple[str, ...], tuple[tuple[str, str], ...]]:
        inner = tree.children[0]
        assert isinstance(inner, Tree)
        if inner.data == "string_list":
            values = tuple(
                str(c) for c in inner.children if isinstance(c, Token) and c.type == "STRING"
            )
            return "list", values, ()
        pairs = []
        for kv in inner.children:
            if isinstance(kv, Tree):
                key, _, value = kv.children
                pairs.append((str(key), str(value)))
        return "mapping", (), tuple(pairs)

    def _declare_table(self, name: Token, decl: TableDecl) -> None:
        if str(name) in self.tables:
            raise self.fail(name, f'table "{name}" already defined')
        self.tables[str(name)] = decl

    def _st_table_inline(self, t: Tree[Token]) -> None:
        name, vals = t.children[1], t.children[3]
        assert isinstance(name, Token) and isinstance(vals, Tree)
        kind, values, mapping = self._table_values(vals)
        tok = self.tok(name)
        decl = TableDecl(
            str(name), "static", None, kind, values, mapping, False, tok.file, tok.line
        )
        self._declare_table(name, decl)

    def _st_table_backend(self, t: Tree[Token]) -> None:
        name, spec = t.children[1], t.children[2]
        assert isinstance(name, Token) and isinstance(spec, Token)
        text = str(spec)
        config: str | None
        if text.startswith("/"):
            backend, config = "static", text
        elif ":" in text:
            backend, config = text.split(":", 1)
        else:
            backend, config = text, None
        if config is not None and not config.startswith("/"):
            raise self.fail(spec, f"invalid backend parameter for table: {name}")
        if backend == "file":
            backend = "static"
        tok = self.tok(name)
        decl = TableDecl(str(name), backend, config, "dynamic", file=tok.file, line=tok.line)
        if str(name) in self.tables:
            raise self.fail(name, f'table "{name}" already defined')
        # Registered before loading, so a failed load is reported once (no cascade).
        self.tables[str(name)] = decl
        if backend == "static":
            if config is None:
                raise self.fail(spec, f"invalid configuration file for table {name}")
            if not self.check_files:
                return
            try:
                parsed = load_table_file(config)
            except OSError as e:
                raise self.fail(
                    spec, f"invalid configuration file {config} for table {name}: {e.strerror}"
                ) from e
            except TableFileError as e:
                raise self.fail(
                    spec, f"invalid configuration file {config} for table {name}: {e}"
                ) from e
            self.tables[str(name)] = replace(
                decl, kind=parsed.kind, values=parsed.values, mapping=parsed.mapping
            )
            return
        if backend == "getpwnam":
            return
        if not self.check_files:
            return
        helpers = (f"{d}/table-{backend}" for d in PROC_TABLE_DIRS)
        if backend not in BUILTIN_BACKENDS and not any(map(os.path.exists, helpers)):
            raise self.fail(spec, f'table backend "{backend}" does not exist')
        if backend == "db" and config is not None:
            if not os.path.exists(config):
                raise self.fail(
                    spec, f"invalid configuration file {config} for table {name}: no such file"
                )
            from pigeon.tables.db import looks_like_map

            if not looks_like_map(config):  # e.g. the text source, makemap not run
                raise self.fail(
                    spec,
                    f"invalid configuration file {config} for table {name}: not a map "
                    "built by makemap (run `pigeon makemap` or makemap(8) on its source)",
                )

    def _st_table_proc_exec(self, t: Tree[Token]) -> None:
        """Pigeon: ``table NAME proc-exec "command line"`` runs the command as a proc table."""
        name, command = t.children[1], t.children[3]
        assert isinstance(name, Token) and isinstance(command, Token)
        if not str(command).strip():
            raise self.fail(command, f"empty command for table {name}")
        tok = self.tok(name)
        decl = TableDecl(
            str(name), "proc-exec", str(command), "dynamic", file=tok.file, line=tok.line
        )
        self._declare_table(name, decl)

    def _tables(self, tree: Tree[Token]) -> TableRef:
        first = tree.children[0]
        assert isinstance(first, Token)
        tok = self.tok(first)
        if tree.data == "tableref":
            name = tree.children[1]
            assert isinstance(name, Token)
            if str(name) not in self.tables:
                raise self.fail(name, f"no such table: {name}")
            return TableRef(name=str(name))
        self.anon_count += 1
        label = f"<inline:{self.anon_count}>"
        if tree.data == "tablestr":
            decl = TableDecl(
                label, "static", None, "list", (str(first),), (), True, tok.file, tok.line
            )
        else:
            vals = tree.children[1]
            assert isinstance(vals, Tree)
            kind, values, mapping = self._table_values(vals)
            decl = TableDecl(label, "static", None, kind, values, mapping, True, tok.file, tok.line)
        return TableRef(inline=decl)

    def decl(self, ref: TableRef) -> TableDecl:
        if ref.inline is not None:
            return ref.inline
        assert ref.name is not None
        return self.tables[ref.name]

    def _use(self, tree: Tree[Token], want: Literal["list", "mapping"], message: str) -> TableRef:
        """A table reference checked like ``table_check_use``: static tables must be of the
        wanted type; getpwnam only answers userinfo."""
        ref = self._tables(tree)
        decl = self.decl(ref)
        ok = decl.kind in (want, "dynamic")
        if decl.backend == "getpwnam":
            ok = "userbase" in message
        if not ok:
            shown = f'table "{ref.name}"' if ref.name else "inline table"
            raise self.fail(tree.children[0], message.replace("TABLE", shown))  # type: ignore[arg-type]
        return ref

    # -- filters -----------------------------------------------------------------------

    def _chain(self, names: Tree[Token], chain_name: str | None) -> tuple[str, ...]:
        chain: list[str] = []
        procs: set[str] = set()
        for tok in names.children:
            assert isinstance(tok, Token)
            if tok.type != "STRING":
                continue
            name = str(tok)
            f = self.filters.get(name)
            if f is None:
                raise self.fail(tok, f"no filter exist with that name: {name}")
            if f.kind == "chain":
                raise self.fail(tok, f"no filter chain allowed within a filter chain: {name}")
            if name in chain:
                raise self.fail(tok, f"no filter allowed twice within a filter chain: {name}")
            if f.proc is not None:
                if f.proc in procs:
                    raise self.fail(tok, f"no proc allowed twice within a filter chain: {f.proc}")
                procs.add(f.proc)
            chain.append(name)
        return tuple(chain)

    def _filter_opt(self, tree: Tree[Token], already: str | None, where: str) -> str:
        kw = tree.children[0]
        assert isinstance(kw, Token)
        if already is not None:
            raise self.fail(kw, f"filter already specified{where}")
        if tree.data == "filter_named":
            name = tree.children[1]
            assert isinstance(name, Token)
            if str(name) not in self.filters:
                raise self.fail(name, f"no filter exist with that name: {name}")
            return str(name)
        names = tree.children[2]
        assert isinstance(names, Tree)
        chain = self._chain(names, None)
        self.dynchain_count += 1
        label = f"<dynchain:{self.dynchain_count:08x}>"
        self.filters[label] = Filter(
            label, "chain", chain=chain, anonymous=True, line=self.line(kw)
        )
        return label

    def _new_filter_name(self, name: Token) -> str:
        if str(name) in self.filters:
            raise self.fail(name, f"filter already exists with that name: {name}")
        return str(name)

    def _st_filter_proc(self, t: Tree[Token]) -> None:
        name, proc = t.children[1], t.children[3]
        assert isinstance(name, Token) and isinstance(proc, Token)
        fname = self._new_filter_name(name)
        if str(proc) not in self.procs:
            raise self.fail(proc, f"no processor exist with that name: {proc}")
        self.filters[fname] = Filter(fname, "proc", proc=str(proc), line=self.line(name))

    def _st_filter_rspamd(self, t: Tree[Token]) -> None:
        # Pigeon extension: the in-process rspamd filter (docs/rspamd.md).
        from pigeon.filters.rspamd_builtin import settings_from_words

        name, kind = t.children[1], t.children[2]
        assert isinstance(name, Token) and isinstance(kind, Token)
        if str(kind) != "rspamd":
            raise self.fail(kind, f"syntax error: unknown filter kind {kind}")
        fname = self._new_filter_name(name)
        words = tuple(str(w.children[0]) for w in _children(t)[3:])
        try:
            settings_from_words(words)
        except ValueError as exc:
            raise self.fail(kind, f"rspamd filter {fname}: {exc}") from None
        self.filters[fname] = Filter(fname, "rspamd", options=words, line=self.line(name))

    def _st_filter_proc_exec(self, t: Tree[Token]) -> None:
        name, command = t.children[1], t.children[3]
        assert isinstance(name, Token) and isinstance(command, Token)
        fname = self._new_filter_name(name)
        line = self.line(name)
        self.filters[fname] = Filter(
            fname, "proc-exec", proc=fname, command=str(command), line=line
        )
        params = self._proc_params(_children(t)[4:], "processor")
        self.filters[fname] = Filter(
            fname,
            "proc-exec",
            proc=fname,
            command=str(command),
            user=params.get("user"),
            group=params.get("group"),
            chroot=params.get("chroot"),
            line=line,
        )
        self.procs[fname] = Proc(
            fname,
            str(command),
            params.get("user"),
            params.get("group"),
            params.get("chroot"),
            line,
            **self._proc_extensions(_children(t)[4:], params),
        )

    def _st_filter_chain(self, t: Tree[Token]) -> None:
        name, names = t.children[1], t.children[4]
        assert isinstance(name, Token) and isinstance(names, Tree)
        fname = self._new_filter_name(name)
        chain = self._chain(names, fname)
        self.filters[fname] = Filter(fname, "chain", chain=chain, line=self.line(name))

    def _st_filter_builtin(self, t: Tree[Token]) -> None:
        children = _children(t)
        name = children[1]
        phase_tree = children[3]
        fname = self._new_filter_name(name)
        phase_tok = phase_tree.children[0]
        phase = str(phase_tok)
        negated = any(isinstance(c, Token) and c.type == "BANG" for c in children)
        fcond = next(c for c in children if isinstance(c, Tree) and c.data.startswith("f_"))
        faction = next(c for c in children if isinstance(c, Tree) and c.data == "faction")
        cond_tok = fcond.children[0]
        assert isinstance(cond_tok, Token)
        condition = fcond.data[2:].replace("_", "-")
        # Registered first, as OpenSMTPD does, so later references do not cascade.
        placeholder = BuiltinFilter(phase, condition, negated, False, None, "junk", None)
        self.filters[fname] = Filter(fname, "builtin", builtin=placeholder, line=self.line(name))
        if condition not in _PHASE_CONDITIONS[phase]:
            raise self.fail(
                cond_tok, f'syntax error: condition "{cond_tok}" is not allowed in phase {phase}'
            )
        regex = any(isinstance(c, Token) and c.type == "REGEX" for c in fcond.children)
        tables = [c for c in fcond.children if isinstance(c, Tree)]
        table = self._tables(tables[0]) if tables else None
        decision_tok = faction.children[0]
        assert isinstance(decision_tok, Token)
        decision = str(decision_tok)
        argument = str(faction.children[1]) if len(faction.children) > 1 else None
        if phase == "commit" and decision in ("junk", "bypass"):
            raise self.fail(
                decision_tok, f'syntax error: "{decision}" is not allowed in phase commit'
            )
        builtin = BuiltinFilter(phase, condition, negated, regex, table, decision, argument)
        self.filters[fname] = Filter(fname, "builtin", builtin=builtin, line=self.line(name))

    # -- listen ------------------------------------------------------------------------

    def _st_listen_socket(self, t: Tree[Token]) -> None:
        kw = t.children[2]
        assert isinstance(kw, Token)
        opts: dict[str, Any] = {}
        for opt in _children(t)[3:]:
            self._listen_opt(opt, opts)
        if self.socket_listener is not None:
            raise self.fail(kw, "socket listener already configured")
        self.socket_listener = Listener("socket", "socket", line=self.line(kw), **opts)

    def _st_listen_if(self, t: Tree[Token]) -> None:
        iface = t.children[2]
        assert isinstance(iface, Token)
        opts: dict[str, Any] = {}
        for opt in _children(t)[3:]:
            self._listen_opt(opt, opts)
        tls_mode = opts.get("smtps") or opts.get("tls") or opts.get("tls_require")
        if (opts.get("auth") or opts.get("auth_optional")) and not tls_mode:
            raise self.fail(iface, "invalid listen option: auth requires tls/smtps")
        pkis = opts.get("pki", ())
        if pkis and not tls_mode:
            raise self.fail(iface, "invalid listen option: pki requires tls/smtps")
        if not pkis and tls_mode and not self.pkis:
            # smtpd 6.8 then uses the pki named after the listener's hostname, or "*"; the
            # daemon picks it (the default hostname is known only then).
            raise self.fail(iface, "invalid listen option: tls/smtps needs a pki declared")
        for name, tok in opts.pop("_pki_toks", []):
            if name not in self.pkis:
                raise self.fail(tok, f"pki name not found: {name}")
        ca_tok = opts.pop("_ca_tok", None)
        if ca_tok is not None and str(ca_tok).lower() not in self.cas:
            raise self.fail(ca_tok, f"ca name not found: {ca_tok}")
        self.listeners.append(Listener("inet", str(iface), line=self.line(iface), **opts))

    def _listen_opt(self, opt: Tree[Token], opts: dict[str, Any]) -> None:
        if opt.data in ("if_opt", "sock_opt"):
            inner = opt.children[0]
            assert isinstance(inner, Tree)
            opt = inner
        kw = opt.children[0]
        assert isinstance(kw, Token)
        arg = opt.children[1] if len(opt.children) > 1 else None
        data = opt.data

        def once(flag: str, message: str) -> None:
            if flag in opts:
                raise self.fail(kw, message)

        if data in ("filter_named", "filter_anon"):
            opts["filter"] = self._filter_opt(opt, opts.get("filter"), "")
        elif data == "mask_src":
            once("mask_src", "mask-source already specified")
            opts["mask_src"] = True
        elif data == "opt_tag":
            once("tag", "tag already specified")
            assert isinstance(arg, Token)
            if len(str(arg)) > TAG_SIZE:  # smtpd 6.8 takes 32 characters
                raise self.fail(arg, "tag name too long")
            opts["tag"] = str(arg)
        elif data == "opt_no_dsn":
            once("no_dsn", "no-dsn already specified")
            opts["no_dsn"] = True
        elif data in ("opt_inet4", "opt_inet6"):
            once("family", "address family already specified")
            opts["family"] = "inet4" if data == "opt_inet4" else "inet6"
        elif data == "opt_port":
            once("port", "port already specified")
            assert isinstance(arg, Token)
            if arg.type == "NUMBER":
                port: int | None = int(arg)
                if not 0 < int(arg) <= 65535:
                    raise self.fail(arg, f"invalid port: {arg}")
            else:
                port = service_port(str(arg))
                if port is None:
                    raise self.fail(arg, f"invalid port: {arg}")
            opts["port"] = port
        elif data in ("opt_smtps", "opt_tls", "opt_tls_require"):
            if opts.get("smtps") or opts.get("tls") or opts.get("tls_require"):
                raise self.fail(kw, "TLS mode already specified")
            verify = arg is not None
            if data == "opt_smtps":
                opts["smtps"] = True
            elif data == "opt_tls":
                opts["tls"] = True
            else:
                opts["tls"] = True
                opts["tls_require"] = True
            opts["verify"] = verify
        elif data in ("opt_ciphers", "opt_protocols"):
            field = data[4:]
            once(field, f"{field} already specified")
            opts[field] = str(arg)
        elif data == "opt_pki":
            assert isinstance(arg, Token)
            if len(opts.get("pki", ())) >= 32:
                raise self.fail(kw, "too many pki specified")
            # Names are case-insensitive, as smtpd 6.8 lower-cases both sides.
            opts["pki"] = (*opts.get("pki", ()), str(arg).lower())
            opts.setdefault("_pki_toks", []).append((str(arg).lower(), arg))
        elif data == "opt_ca":
            once("ca", "ca already specified")
            opts["ca"] = str(arg).lower()
            opts["_ca_tok"] = arg
        elif data in ("opt_auth", "opt_auth_optional"):
            if "auth" in opts or "auth_optional" in opts:
                raise self.fail(kw, "auth already specified")
            opts["auth" if data == "opt_auth" else "auth_optional"] = True
            if isinstance(arg, Tree):
                opts["auth_table"] = self._tables(arg)
        elif data == "opt_hostname":
            once("hostname", "hostname already specified")
            opts["hostname"] = str(arg)
        elif data == "opt_hostnames":
            once("hostnames", "hostnames already specified")
            assert isinstance(arg, Tree)
            opts["hostnames"] = self._use(
                arg, "mapping", "invalid use of TABLE as HOSTNAMES parameter"
            )
        elif data == "opt_received_auth":
            once("received_auth", "received-auth already specified")
            opts["received_auth"] = True
        elif data == "opt_proxy_v2":
            once("proxy_v2", "proxy-v2 already specified")
            opts["proxy_v2"] = True
        elif data == "opt_senders":
            once("senders", "senders already specified")
            assert isinstance(arg, Tree)
            opts["senders"] = self._use(arg, "mapping", "invalid use of TABLE as SENDERS parameter")
            opts["masquerade"] = len(opt.children) > 2
        else:  # pragma: no cover - grammar and builder out of sync
            raise self.fail(kw, f"unsupported listen option {kw}")

    # -- action ------------------------------------------------------------------------

    def _st_action(self, t: Tree[Token]) -> None:
        children = _children(t)
        name = children[1]
        method = children[2]
        assert isinstance(name, Token) and isinstance(method, Tree)
        if str(name) in self.actions:
            raise self.fail(name, f"dispatcher already declared with that name: {name}")
        fields: dict[str, Any] = {}
        kw = method.children[0]
        assert isinstance(kw, Token)
        kind = method.data[2:].replace("_", "-")
        rest = list(method.children[1:])
        # Register now (as a reject-nothing placeholder) so that match lines naming this
        # action do not report "no such dispatcher" after an error in the action itself.
        self.actions[str(name)] = Action(str(name), kind, line=self.line(name))  # type: ignore[arg-type]
        if kind == "maildir":
            while rest and isinstance(rest[0], Token):
                tok = rest.pop(0)
                assert isinstance(tok, Token)
                if tok.type == "JUNK":
                    fields["junk"] = True
                else:
                    fields["maildir_path"] = str(tok)
        elif kind == "lmtp":
            fields["lmtp_dest"] = str(rest.pop(0))
            if rest and isinstance(rest[0], Token):
                rest.pop(0)
                fields["lmtp_rcpt_to"] = True
        elif kind == "mda":
            fields["mda_command"] = str(rest.pop(0))
        for opt in rest:
            assert isinstance(opt, Tree)
            if kind == "relay":
                self._relay_opt(opt, fields)
            else:
                self._local_opt(kind, opt, fields)
        ttl_seen = False
        for ttl in children[3:]:
            assert isinstance(ttl, Tree)
            value = ttl.children[1]
            assert isinstance(value, Token)
            if ttl_seen:
                raise self.fail(ttl.children[0], "ttl already specified for this dispatcher")  # type: ignore[arg-type]
            ttl_seen = True
            seconds = parse_delay(str(value))
            if seconds is None:
                raise self.fail(value, f'ttl delay "{value}" is invalid')
            fields["ttl"] = seconds
        self.actions[str(name)] = Action(str(name), kind, line=self.line(name), **fields)  # type: ignore[arg-type]

    def _local_opt(self, kind: str, opt: Tree[Token], fields: dict[str, Any]) -> None:
        kw = opt.children[0]
        arg = opt.children[1]
        assert isinstance(kw, Token)
        if opt.data == "lo_user":
            if kind == "mbox":
                raise self.fail(kw, "user may not be specified for this dispatcher")
            if kind in ("forward-only", "expand-only"):
                raise self.fail(kw, f"user may not be specified for {kind}")
            if "user" in fields:  # (smtpd 7.x also refuses it for lmtp; 6.8 takes it)
                raise self.fail(kw, "user already specified for this dispatcher")
            fields["user"] = str(arg)
        elif opt.data in ("lo_alias", "lo_virtual"):
            this, other = ("alias", "virtual") if opt.data == "lo_alias" else ("virtual", "alias")
            if this in fields:
                raise self.fail(kw, f"{this} mapping already specified for this dispatcher")
            if other in fields:
                raise self.fail(kw, f"{other} mapping already specified for this dispatcher")
            assert isinstance(arg, Tree)
            fields[this] = self._use(arg, "mapping", f"TABLE may not be used for {this} lookups")
        elif opt.data == "lo_userbase":
            if "userbase" in fields:
                raise self.fail(kw, "userbase mapping already specified for this dispatcher")
            assert isinstance(arg, Tree)
            fields["userbase"] = self._use(
                arg, "mapping", "TABLE may not be used for userbase lookups"
            )
        elif opt.data == "lo_wrapper":
            if str(arg) not in self.wrappers:
                raise self.fail(arg, f"no mda wrapper with that name: {arg}")  # type: ignore[arg-type]
            fields["wrapper"] = str(arg)

    def _relay_opt(self, opt: Tree[Token], fields: dict[str, Any]) -> None:
        kw = opt.children[0]
        arg = opt.children[1] if len(opt.children) > 1 else None
        data = opt.data[3:]
        if data == "filter":
            assert isinstance(kw, Tree)
            fields["filter"] = self._filter_opt(kw, fields.get("filter"), " for this dispatcher")
            return
        assert isinstance(kw, Token)

        def once(field: str, label: str) -> None:
            if field in fields:
                raise self.fail(kw, f"{label} already specified for this dispatcher")

        if data in ("helo", "pki", "ca", "ciphers", "protocols", "mail_from"):
            once(data, data.replace("_", "-"))
            fields[data] = str(arg)
            if data in ("pki", "ca"):
                assert isinstance(arg, Token)
                self.relay_refs.append((data, str(arg), self.tok(arg)))  # checked at the end
        elif data == "helo_src":
            once("helo_src", "helo-source mapping")
            assert isinstance(arg, Tree)
            fields["helo_src"] = self._use(
                arg, "mapping", "TABLE may not be used for helo-source lookups"
            )
        elif data == "src":
            once("src", "source mapping")
            assert isinstance(arg, Tree)
            fields["src"] = self._use(arg, "list", "TABLE may not be used for source lookups")
        elif data == "backup":
            once("backup", "backup")
            if "host" in fields or "domain" in fields:
                raise self.fail(kw, "backup and host are mutually exclusive")
            fields["backup"] = True
            if len(opt.children) > 2:
                fields["backup_mx"] = str(opt.children[2])
        elif data in ("host", "domain"):
            if "host" in fields or "domain" in fields:
                raise self.fail(kw, "host mapping already specified for this dispatcher")
            if "backup" in fields:
                raise self.fail(kw, f"backup and {data} are mutually exclusive")
            assert isinstance(arg, Tree)
            want: Literal["list", "mapping"] = "list" if data == "host" else "mapping"
            fields[data] = self._use(arg, want, "TABLE may not be used for host lookups")
        elif data == "tls":
            if "tls" in fields:
                raise self.fail(kw, "tls already specified for this dispatcher")
            fields["tls"] = "no-verify" if arg is not None else "required"
        elif data == "auth":
            if "host" not in fields and "domain" not in fields:
                raise self.fail(kw, "auth may not be specified without host on a dispatcher")
            once("auth", "auth mapping")
            assert isinstance(arg, Tree)
            fields["auth"] = self._use(arg, "mapping", "TABLE may not be used for auth lookups")
        elif data == "srs":
            if self.srs.key is None:
                raise self.fail(kw, "an srs key is required for srs to be specified in an action")
            once("srs", "srs")
            fields["srs"] = True

    # -- match -------------------------------------------------------------------------

    def _st_match(self, t: Tree[Token]) -> None:
        children = _children(t)
        seen: set[str] = set()
        criteria: dict[str, Criterion] = {}
        for opt in children[1:]:
            if not isinstance(opt, Tree):
                continue
            negated = isinstance(opt.children[0], Token) and opt.children[0].type == "BANG"
            crit = opt.children[-1]
            assert isinstance(crit, Tree)
            self._criterion(crit, negated, seen, criteria)
        last = children[-1]
        assert isinstance(last, Token)
        action: str | None = None
        if last.type == "STRING":
            action = str(last)
            if action not in self.actions:
                raise self.fail(last, f"no such dispatcher: {action}")
        if "from" not in seen:
            criteria["from"] = Criterion("from-local")
        if "for" not in seen:
            criteria["for"] = Criterion("for-local")
        self.matches.append(Match(tuple(criteria.values()), action, self.line(children[0])))

    def _criterion(
        self, crit: Tree[Token], negated: bool, seen: set[str], criteria: dict[str, Criterion]
    ) -> None:
        toks = [c for c in crit.children if isinstance(c, Token)]
        trees = [c for c in crit.children if isinstance(c, Tree)]
        kw = toks[0]
        regex = any(c.type == "REGEX" for c in toks)
        kind = crit.data[2:].replace("_", "-")
        category = kind.split("-")[0] if kind.startswith(("from-", "for-")) else kind
        if category in seen:
            raise self.fail(kw, f"{category} already specified for this rule")
        seen.add(category)
        labels = {
            "tag": "tag", "helo": "helo", "auth": "auth", "mail-from": "mail-from",
            "rcpt-to": "rcpt-to", "from-src": "from", "from-rdns": "rdns", "from-auth": "from",
            "from-mail-from": "from", "for-domain": "'for'", "for-rcpt-to": "for",
        }  # fmt: skip
        table = None
        if trees:
            table = self._use(trees[0], "list", f"TABLE may not be used for {labels[kind]} lookups")
        if kind in ("from-auth", "from-mail-from", "for-rcpt-to"):
            # `from auth X` = `from any` + `auth X`; the negation applies to the second part
            sub = kind.split("-", 1)[1]
            # One field for both, as in smtpd 6.8: `from auth X auth Y` is refused, while
            # `auth Y from auth X` is taken (the later one counts).
            seen.add(sub)
            criteria[category] = Criterion("from-any" if category == "from" else "for-any")
            criteria[sub] = Criterion(sub, negated, regex, table)
            return
        criteria[category] = Criterion(kind, negated, regex, table)

    # -- end ---------------------------------------------------------------------------

    def finish(self) -> tuple[Config, list[ConfigIssue]]:
        if self.check_files:
            self._check_pki_files()
        self._check_action_refs()
        if (not self.matches and not self.issues) or not self.matches:
            self.issues.append(ConfigIssue(self.filename, 0, None, "no rules, nothing to do"))
        socket = self.socket_listener or Listener("socket", "socket", implicit=True)
        config = Config(
            file=self.filename,
            listeners=(socket, *self.listeners),
            tables=MappingProxyType(dict(self.tables)),
            actions=MappingProxyType(dict(self.actions)),
            matches=tuple(self.matches),
            filters=MappingProxyType(dict(self.filters)),
            procs=MappingProxyType(dict(self.procs)),
            pkis=MappingProxyType(dict(self.pkis)),
            cas=MappingProxyType(dict(self.cas)),
            smtp=self.smtp,
            queue=self.queue,
            srs=self.srs,
            bounce_warn_interval=self.bounce,
            mta_max_deferred=self.mta_max_deferred,
            mta_limits=tuple(self.mta_limits.values()),
            mda_limits=MappingProxyType(dict(self.mda_limits)),
            mda_wrappers=MappingProxyType(dict(self.wrappers)),
            scheduler_limits=MappingProxyType(dict(self.scheduler_limits)),
            admd=self.admd,
            metrics=self.metrics,
            macros=MappingProxyType(dict(self.macros)),
        )
        # file order (the top file's position of each include is not tracked: files are
        # grouped in the order they were first reported); whole-file issues last
        files = list(dict.fromkeys(i.file for i in self.issues))
        issues = sorted(self.issues, key=lambda i: (i.line <= 0, files.index(i.file), i.line))
        return config, issues

    def _check_pki_files(self) -> None:
        for name, pki in self.pkis.items():
            cert_tok, key_tok = self.pki_tokens.get(name, (None, None))
            where = cert_tok or key_tok
            if where is None:
                continue
            if pki.cert is None:
                self.issue(where, f'pki "{name}": no certificate file given')
            elif cert_tok is not None and not os.path.isfile(pki.cert):
                self.issue(cert_tok, f"failed to load certificate file {pki.cert}: No such file")
            if pki.key is None:
                self.issue(where, f'pki "{name}": no key file given')
            elif key_tok is not None and not os.path.exists(pki.key):
                self.issue(key_tok, f"failed to load key file {pki.key}: No such file")
        for name, ca in self.cas.items():
            tok = self.pki_tokens.get(f"ca:{name}", (None, None))[0]
            if tok is not None and not os.path.isfile(ca.cert):
                self.issue(tok, f"failed to load CA file {ca.cert}: No such file")

    def _check_action_refs(self) -> None:
        for kind, name, tok in self.relay_refs:
            known = self.pkis if kind == "pki" else self.cas
            if name.lower() not in known:
                self.issue(tok, f"{kind} name not found: {name}")
