"""``file:`` tables: the static backend's line format (table(5), OpenSMTPD table_static.c).

* blank lines and whole-line ``#`` comments are skipped (``#`` later in a line is data);
  ``# @list`` before the first entry forces a list;
* the first entry decides: ``key value`` / ``key: value`` / ``key:value`` is a mapping, a lone
  word a list; mixing the two is an error;
* a key starting with ``[`` runs to the matching ``]`` (``[::1] localhost``);
* keys are lower-cased by the table layer; a repeated key: the last one wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class TableFileError(ValueError):
    """The file cannot be used as a table (message says which line and why)."""


@dataclass(frozen=True)
class ParsedTable:
    kind: Literal["list", "mapping"]
    values: tuple[str, ...]
    mapping: tuple[tuple[str, str], ...]


def _split_entry(line: str) -> tuple[str, str | None]:
    if line.startswith("["):
        end = line.find("]")
        if end == -1:
            return line, None
        key, rest = line[: end + 1], line[end + 1 :]
    else:
        cut = len(line)
        for sep in (" ", "\t", ":"):
            i = line.find(sep)
            if i != -1:
                cut = min(cut, i)
        key, rest = line[:cut], line[cut:]
        rest = rest[1:] if rest else rest  # the separator itself
    # skip blanks, and ": " (aliases style) before the value
    i = 0
    while i < len(rest) and (
        rest[i] in " \t" or (rest[i] == ":" and rest[i + 1 : i + 2] in (" ", "\t"))
    ):
        i += 1
    value = rest[i:]
    return key, (value or None)


def parse_table_text(text: str, name: str = "<table>") -> ParsedTable:
    kind: Literal["list", "mapping"] | None = None
    forced_list = False
    values: dict[str, None] = {}
    mapping: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if kind is None and line[1:].strip() == "@list":
                kind = "list"
                forced_list = True
            continue
        key, value = _split_entry(line)
        if kind is None:
            kind = "mapping" if value is not None else "list"
        if kind == "mapping":
            if value is None:
                raise TableFileError(f"{name}:{lineno}: invalid map entry (no value)")
            mapping[key.lower()] = value
        else:
            if value is not None and not forced_list:
                raise TableFileError(f"{name}:{lineno}: invalid list entry (a key and a value)")
            values[line.lower() if value is not None else key.lower()] = None
    # An empty file is a mapping, as smtpd 6.8 takes it (fine for aliases and virtual
    # users, refused where a list is needed).
    return ParsedTable(kind or "mapping", tuple(values), tuple(mapping.items()))


def load_table_file(path: str) -> ParsedTable:
    """Read and parse; OSError and TableFileError propagate to the caller."""
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    return parse_table_text(text, path)
