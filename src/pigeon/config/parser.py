"""Reading smtpd.conf: lexer -> statements -> lark (grammar.lark) -> builder -> Config.

Like OpenSMTPD, each statement is parsed on its own: a syntax error skips to the end of that
statement and parsing goes on, so one run reports every broken line. Semantic checks happen
statement by statement in file order (names must be declared before use).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput, UnexpectedToken
from lark.lexer import Lexer as LarkLexer

from pigeon.config.builder import Builder
from pigeon.config.issues import ConfigError, ConfigIssue
from pigeon.config.lexer import KEYWORDS, Lexer, Tok, keyword_terminal, read_text
from pigeon.config.model import Config

# Keywords that only ever start a statement: used to stop an unclosed "{" from eating the file.
_STATEMENT_STARTERS = frozenset(
    keyword_terminal(k)
    for k in (
        "action", "admd", "bounce", "ca", "include", "listen", "match", "mda", "mta", "pki",
        "proc", "queue", "scheduler", "smtp", "srs", "table",
    )
)  # fmt: skip
_TERMINAL_TEXT = {
    "STRING": "a string",
    "NUMBER": "a number",
    "LBRACE": '"{"',
    "RBRACE": '"}"',
    "LT": '"<"',
    "GT": '">"',
    "BANG": '"!"',
    "COMMA": '","',
    "EQ": '"="',
    "ARROW": '"=>"',
}
_KEYWORD_BY_TERMINAL = {keyword_terminal(k): k for k in KEYWORDS}
_FILTER_CONDITIONS = frozenset(
    ("FCRDNS", "RDNS", "SRC", "HELO", "AUTH", "MAIL_FROM", "RCPT_TO", "BANG")
)


class _TokenFeed(LarkLexer):
    """lark lexer that just hands over tokens already made by pigeon.config.lexer."""

    def __init__(self, lexer_conf: Any) -> None:
        pass

    def lex(self, lexer_state: Any, parser_state: Any = None) -> Iterator[Token]:
        data = lexer_state.text if hasattr(lexer_state, "text") else lexer_state
        yield from data


@cache
def _lark() -> Lark:
    grammar = Path(__file__).with_name("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer=_TokenFeed, maybe_placeholders=False)


@dataclass
class Statement:
    tokens: list[Tok]
    end: Tok  # the newline (or end of file) that closed it
    error: Tok | None = None  # a lexer error inside the statement

    def lark_tokens(self) -> list[Token]:
        return [
            Token(t.type, t.value, start_pos=i, line=t.line, column=t.col)
            for i, t in enumerate(self.tokens)
        ]


def split_statements(tokens: Iterator[Tok]) -> Iterator[Statement]:
    """Group tokens into statements. Newlines inside braces are separators (7.x), except
    that a statement keyword after a newline closes a statement left open by mistake."""
    buf: list[Tok] = []
    depth = 0
    error: Tok | None = None
    pending: Tok | None = None
    while True:
        tok: Tok | None
        if pending is not None:
            tok, pending = pending, None
        else:
            tok = next(tokens, None)
        if tok is None:
            break
        if tok.type == "ERROR":
            error = error or tok
            continue
        if tok.type == "NL":
            if depth > 0:
                pending = next(tokens, None)
                if pending is not None and pending.type not in _STATEMENT_STARTERS:
                    continue
            if buf or error:
                yield Statement(buf, tok, error)
            buf, depth, error = [], 0, None
            continue
        if tok.type == "LBRACE":
            depth += 1
        elif tok.type == "RBRACE" and depth > 0:
            depth -= 1
        buf.append(tok)
    if buf or error:
        last = buf[-1] if buf else error
        assert last is not None
        yield Statement(buf, Tok("NL", "", last.file, last.line, last.col + len(last.value)), error)


def _describe(terminal: str) -> str:
    if terminal in _KEYWORD_BY_TERMINAL:
        return f'"{_KEYWORD_BY_TERMINAL[terminal]}"'
    return _TERMINAL_TEXT.get(terminal, terminal.lower())


def _syntax_message(stmt: Statement, bad: Tok | None, expected: set[str]) -> str:
    if bad is None:
        message = "syntax error: unexpected end of line"
    else:
        shown = bad.value if bad.type != "STRING" or not bad.quoted else f'"{bad.value}"'
        if bad.type == "CHAR" and not shown.isprintable():
            shown = repr(shown)[1:-1]  # a stray control character, e.g. "\r", made visible
        message = (
            f'syntax error: unexpected "{shown}"'
            if not bad.quoted
            else (f"syntax error: unexpected string {shown}")
        )
    hint = _hint(stmt, bad, expected)
    if hint:
        return f"{message} ({hint})"
    names = sorted({_describe(t) for t in expected if t != "CHAR"})
    if names and len(names) <= 6:
        message += ", expected " + (names[0] if len(names) == 1 else "one of " + ", ".join(names))
    return message


def _hint(stmt: Statement, bad: Tok | None, expected: set[str]) -> str | None:
    types = [t.type for t in stmt.tokens]
    if bad is not None and bad.type in _KEYWORD_BY_TERMINAL and "STRING" in expected:
        return f'"{bad.value}" is a keyword: quote it to use it as a name or value'
    if len(types) > 4 and types[0] == "FILTER" and types[2] == "PHASE" and bad is not None:
        if types[3] == "COMMIT" and bad.type in ("JUNK", "BYPASS"):
            return f'"{bad.value}" is not allowed in phase commit'
        if bad.type in _FILTER_CONDITIONS and "MATCH" in types[: stmt.tokens.index(bad)]:
            return "a builtin filter takes exactly one condition"
    if bad is not None and bad.type == "CHAR" and bad.value == "\r":
        return "the file has DOS line endings: convert it to Unix ones"
    if bad is not None and bad.type == "CHAR" and bad.value in "/@~*.[":
        return "a value starting with this character must be quoted"
    return None


class ConfigReader:
    """Drives one read of a configuration (one top-level file plus includes)."""

    def __init__(
        self,
        filename: str,
        text: str,
        macros: Mapping[str, str] | None,
        check_files: bool,
    ) -> None:
        self.filename = filename
        self.builder = Builder(filename, macros or {}, check_files)
        self.lexer = Lexer(filename, text, self.builder.macro_value)

    def read(self) -> Config:
        for stmt in split_statements(self.lexer.tokens()):
            if stmt.error is not None:
                self.builder.issue(stmt.error, stmt.error.value)
                continue
            tree = self._parse(stmt)
            if tree is None:
                self.builder.placeholder(stmt.tokens)
                continue
            include = self.builder.statement(tree, stmt.tokens)
            if include is not None:
                self._include(include, stmt)
        config, issues = self.builder.finish()
        if issues:
            raise ConfigError(issues)
        return config

    def _parse(self, stmt: Statement) -> Tree[Token] | None:
        try:
            tree: Tree[Token] = _lark().parse(stmt.lark_tokens())  # type: ignore[arg-type,unused-ignore]
        except UnexpectedToken as e:
            bad = None if e.token.type == "$END" else stmt.tokens[e.token.start_pos or 0]
            where = bad or stmt.end
            self.builder.issue(where, _syntax_message(stmt, bad, set(e.expected or ())))
            return None
        except UnexpectedInput as e:  # pragma: no cover - custom lexer never raises others
            self.builder.issue(stmt.end, f"syntax error: {e}")
            return None
        return tree

    def _include(self, tok: Tok, stmt: Statement) -> None:
        path = Path(tok.value)
        if not path.is_absolute():
            path = Path(tok.file).parent / path
        if self.lexer.depth > 32:
            self.builder.issue(tok, f"failed to include file {tok.value}: includes nested too deep")
            return
        try:
            text = read_text(str(path))
        except OSError as e:
            self.builder.issue(tok, f"failed to include file {tok.value}: {e.strerror}")
            return
        self.lexer.push_file(str(path), text)


def parse_config_text(
    text: str,
    filename: str = "<string>",
    macros: Mapping[str, str] | None = None,
    *,
    check_files: bool = True,
) -> Config:
    """Parse and validate; raises ConfigError listing every problem."""
    return ConfigReader(filename, text, macros, check_files).read()


def load_config(
    path: str, macros: Mapping[str, str] | None = None, *, check_files: bool = True
) -> Config:
    try:
        text = read_text(path)
    except OSError as e:
        raise ConfigError([ConfigIssue(path, 0, None, f"cannot read: {e.strerror}")]) from e
    return parse_config_text(text, path, macros, check_files=check_files)
