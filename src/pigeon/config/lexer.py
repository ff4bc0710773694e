"""Tokenizer for smtpd.conf, following OpenSMTPD's hand-written lexer (parse.y ``yylex``).

The rules are subtle and users depend on them, so they are copied on purpose:

* a word starts with a letter, digit, ``:`` or ``_`` and goes on over letters, digits and any
  ASCII punctuation except ``( ) { } < > ! = # ,``; so ``/etc/x`` or ``@dom`` unquoted are
  *not* words (the ``/`` or ``@`` is a lone character token and a syntax error follows);
* a word made only of digits (optionally after ``-``) is a NUMBER when followed by
  whitespace, ``)``, ``,``, ``/``, ``}``, ``=`` or the end of input; ``35M`` is a word;
* a word that is a keyword is that keyword; quoting makes it a plain string;
* inside quotes, ``\\`` before the quote character, a space or a tab is dropped (Debian's
  smtpd 6.8 turns ``"a\\ b"`` into ``a b``), ``\\`` before a newline continues the line,
  any other backslash is kept (regexes survive unchanged);
* outside quotes, ``\\`` + newline joins lines, ``\\`` + a blank is a blank, and ``\\`` +
  any other character yields that character without the backslash;
* ``$name`` at the start of a token is replaced by the macro value, put back into the input
  and read on from there (``$h.example.com`` is one word); macros do not expand inside
  macro values;
* ``#`` at the start of a token comments out the rest of the line, read with the rules
  above: a comment ending in ``\\`` goes on over the next line;
* the end of each file produces one final newline token.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

KEYWORDS: frozenset[str] = frozenset(
    """action admd alias any auth auth-optional backup bounce bypass ca cert chain chroot ciphers
    commit compression connect data data-line dhe disconnect domain ehlo encryption
    expand-only fcrdns filter for forward-only from group helo helo-src host hostname
    hostnames include inet4 inet6 junk key limit listen lmtp local mail-from maildir mask-src
    masquerade match max-deferred max-message-size mbox mda mta mx no-dsn no-verify noop on
    phase pki port proc proc-exec protocols proxy-v2 queue quit rcpt-to rdns received-auth
    recipient regex reject relay report rewrite rset scheduler senders smtp smtp-in smtp-out
    smtps socket src srs sub-addr-delim table tag tagged tls tls-require ttl user userbase
    verify virtual warn-interval wrapper""".split()  # noqa: SIM905
)

# Terminal names used by the grammar for punctuation characters.
PUNCTUATION: dict[str, str] = {
    "{": "LBRACE",
    "}": "RBRACE",
    "<": "LT",
    ">": "GT",
    "!": "BANG",
    ",": "COMMA",
    "=": "EQ",
}

MAX_TOKEN = 8096  # OpenSMTPD's buffer size: longer strings are "string too long"

_PUNCT = set(string.punctuation)
_NOT_IN_WORD = set("(){}<>!=#,")
_ENDS_NUMBER = set(" \t\r\n\v\f),/}=")


def keyword_terminal(word: str) -> str:
    """The grammar terminal name of a keyword: ``mail-from`` -> ``MAIL_FROM``."""
    return word.upper().replace("-", "_")


def _alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _in_word(c: str) -> bool:
    return _alnum(c) or (c in _PUNCT and c not in _NOT_IN_WORD)


@dataclass(frozen=True, slots=True)
class Tok:
    """One token. ``type`` is a grammar terminal name, NL, ERROR or CHAR (an unexpected
    character). ``quoted`` tells a quoted string from a bare word."""

    type: str
    value: str
    file: str
    line: int
    col: int
    quoted: bool = False


class _Source:
    """One file being read; keeps line/column of the next character."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.pos = 0
        self.line = 1
        self.col = 1
        self.eof_reached = False
        # A macro value spliced into the text (as parse.y pushes it back into its input):
        # characters before ``expand_end`` sit at the ``$``'s position and are not expanded
        # again; after them, columns go on as if the ``$name`` were still there.
        self.expand_end = 0
        self.col_after = 0

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def expanding(self) -> bool:
        return self.pos < self.expand_end

    def splice(self, start: int, value: str) -> None:
        """Replace ``text[start:pos]`` (a ``$name``) by ``value`` and read on from it."""
        self.col_after = self.col
        self.text = self.text[:start] + value + self.text[self.pos :]
        self.col -= self.pos - start
        self.pos = start
        self.expand_end = start + len(value)
        if not value:
            self.col = self.col_after

    def advance(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        if self.pos <= self.expand_end:
            if self.pos == self.expand_end:
                self.col = self.col_after
            return c
        if c == "\n":
            self.line += 1
            self.col = 1
        else:
            self.col += 1
        return c


class Lexer:
    """Produces tokens from a stack of files; the parser pushes included files and defines
    macros between statements, which the lexer sees immediately (it is lazy)."""

    def __init__(
        self,
        name: str,
        text: str,
        macro: Callable[[str], str | None],
        *,
        expanding: bool = False,
    ) -> None:
        self._stack: list[_Source] = [_Source(name, text)]
        self._macro = macro
        self._pending: list[Tok] = []
        # lexing a macro value: a "$" there is a plain character, as in parse.y
        self._expanding = expanding

    def push_file(self, name: str, text: str) -> None:
        self._stack.append(_Source(name, text))

    @property
    def depth(self) -> int:
        return len(self._stack)

    def tokens(self) -> Iterator[Tok]:
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            tok = self._next()
            if tok is None:
                return
            yield tok

    # -- character level ---------------------------------------------------------------

    def _getc_plain(self, src: _Source) -> str:
        """Next character outside quotes, with ``\\`` handling (``""`` at end of file)."""
        while True:
            c = src.peek()
            if c != "\\":
                if c:
                    src.advance()
                return c
            nxt = src.peek(1)
            if nxt == "\n":
                src.advance()
                src.advance()
                continue
            src.advance()
            if not nxt:
                return ""
            src.advance()
            return nxt

    # -- token level -------------------------------------------------------------------

    def _next(self) -> Tok | None:
        while self._stack:
            src = self._stack[-1]
            tok = self._lex_one(src)
            if tok is not None:
                return tok
            # end of this file: it already produced its final NL
            self._stack.pop()
        return None

    def _lex_one(self, src: _Source) -> Tok | None:
        # "\" + newline joins lines and "\" + blank is a blank (parse.y's lgetc), so
        # "listen on lo \ " (a blank after the backslash) still ends at the newline.
        while src.peek() in (" ", "\t") or (
            src.peek() == "\\" and src.peek(1) in ("\n", " ", "\t")
        ):
            if src.peek() == "\\":
                src.advance()
            src.advance()
        line, col = src.line, src.col
        c = src.peek()
        if c == "#":
            # Read as parse.y reads it, so a comment ending in "\" goes on over the next
            # line (smtpd.conf(5): commenting out a continued statement comments it all).
            while src.peek() not in ("\n", ""):
                if src.peek() == "\\" and src.peek(1):
                    src.advance()
                src.advance()
            c = src.peek()
        if not c:
            if src.eof_reached:
                return None
            src.eof_reached = True
            return Tok("NL", "\n", src.name, line, col)
        if c == "$" and not self._expanding and not src.expanding():
            return self._macro_tokens(src, line, col)
        if c in ("'", '"'):
            return self._quoted(src, line, col)
        if c == "\n":
            src.advance()
            return Tok("NL", "\n", src.name, line, col)
        if c == "-" or c.isdigit():
            number = self._number(src, line, col)
            if number is not None:
                return number
            c = src.peek()
            if c == "-":
                src.advance()
                return Tok("CHAR", "-", src.name, line, col)
        if c == "=":
            src.advance()
            if src.peek() == ">":
                src.advance()
                return Tok("ARROW", "=>", src.name, line, col)
            return Tok("EQ", "=", src.name, line, col)
        nxt = src.peek(1)
        if _alnum(c) or c in ":_" or (c == "\\" and (_alnum(nxt) or nxt in (":", "_"))):
            return self._word(src, line, col)  # "\maildir" is "maildir", as in parse.y
        c = self._getc_plain(src)
        if not c:  # a backslash at the very end of the file: nothing
            return self._lex_one(src)
        if c == "\n":
            return Tok("NL", "\n", src.name, line, col)
        if c in PUNCTUATION:
            return Tok(PUNCTUATION[c], c, src.name, line, col)
        return Tok("CHAR", c, src.name, line, col)

    def _word(self, src: _Source, line: int, col: int) -> Tok:
        chars: list[str] = []
        while True:
            c = src.peek()
            if c == "\\" and src.peek(1) not in ("\n", ""):
                c = src.peek(1)
                if not _in_word(c) and chars:
                    break
                src.advance()
                src.advance()
                chars.append(c)
                continue
            if c == "\\" and src.peek(1) == "\n":
                src.advance()
                src.advance()
                continue
            if not c or not (_in_word(c) or (not chars and c in ":_")):
                break
            chars.append(src.advance())
        word = "".join(chars)
        if len(word) >= MAX_TOKEN:
            return self._error(src, line, col, "string too long")
        if word in KEYWORDS:
            return Tok(keyword_terminal(word), word, src.name, line, col)
        return Tok("STRING", word, src.name, line, col)

    def _number(self, src: _Source, line: int, col: int) -> Tok | None:
        i = 1 if src.peek() == "-" else 0
        while src.peek(i).isascii() and src.peek(i).isdigit():
            i += 1
        digits = src.text[src.pos : src.pos + i]
        if digits in ("-", ""):
            return None
        after = src.peek(i)
        if after and after not in _ENDS_NUMBER:
            return None
        for _ in range(i):
            src.advance()
        value = int(digits)
        if not -(2**63) <= value < 2**63:
            too = "too large" if value > 0 else "too small"
            return self._error(src, line, col, f'"{digits}" invalid number: {too}')
        return Tok("NUMBER", digits, src.name, line, col)

    def _quoted(self, src: _Source, line: int, col: int) -> Tok:
        quote = src.advance()
        chars: list[str] = []
        while True:
            c = src.peek()
            if not c:
                return self._error(
                    src, line, col, "reached end of file while parsing quoted string"
                )
            src.advance()
            if c == "\n":
                continue
            if c == "\\":
                nxt = src.peek()
                if not nxt:
                    continue
                if nxt in (quote, " ", "\t"):
                    src.advance()
                    c = nxt
                elif nxt == "\n":
                    src.advance()
                    continue
            elif c == quote:
                break
            elif c == "\0":
                return self._error(src, line, col, "syntax error")
            chars.append(c)
            if len(chars) >= MAX_TOKEN - 1:
                return self._error(src, line, col, "string too long")
        return Tok("STRING", "".join(chars), src.name, line, col, quoted=True)

    def _macro_tokens(self, src: _Source, line: int, col: int) -> Tok | None:
        start = src.pos
        src.advance()
        name_chars: list[str] = []
        while _alnum(src.peek()) or src.peek() == "_":
            name_chars.append(src.advance())
        name = "".join(name_chars)
        value = self._macro(name)
        if value is None:
            return self._error(src, line, col, f"macro '{name}' not defined")
        # The value goes back into the input in place of ``$name`` and is read on from
        # there, so ``$h.example.com`` is one word, as in parse.y.
        src.splice(start, value)
        return self._lex_one(src)

    def _error(self, src: _Source, line: int, col: int, message: str) -> Tok:
        """An ERROR token; like ``findeol()`` the rest of the line is skipped."""
        while src.peek() not in ("\n", ""):
            self._getc_plain(src)
        return Tok("ERROR", message, src.name, line, col)


def read_text(path: str) -> str:
    """Configuration files are read as UTF-8 with undecodable bytes kept visible."""
    return Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
