"""``pigeon makemap``: build a ``db:`` table file, as OpenSMTPD's makemap(8) does.

    pigeon makemap [-t aliases|set] [-o dbfile] [-d dbtype] file     # writes file.db
    pigeon makemap -U [-o out] file.db                                # dumps it back as text

The input is read with the ``file:`` table parser (whole-line ``#`` comments, ``key value``
or ``key: value``, ``[...]`` keys). ``-t set`` makes a list (only keys), ``-t aliases`` a
mapping in aliases(5) style (the default ``map`` type accepts both spellings too). ``-d``
(hash/btree) is accepted for compatibility and ignored: the output is always Pigeon's map
format (see :mod:`pigeon.tables.db`). The file is replaced atomically, so a running daemon
never reads half a map; it notices the new file on its next lookup.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pigeon.tables.base import TableError
from pigeon.tables.db import open_map, write_map
from pigeon.tables.file import TableFileError, parse_table_text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pigeon makemap", description="build a db: table file")
    p.add_argument("-t", dest="type", choices=["map", "aliases", "set"], default="map")
    p.add_argument("-o", dest="output", default=None, help="output file (default: FILE.db)")
    p.add_argument("-d", dest="dbtype", choices=["hash", "btree"], default="hash")
    p.add_argument("-U", dest="unmake", action="store_true", help="dump a map file as text")
    p.add_argument("file")
    return p


def makemap(source: str, output: str, map_type: str = "map") -> int:
    """Convert ``source`` (text) to ``output`` (map file); returns the number of entries."""
    text = Path(source).read_text(encoding="utf-8", errors="surrogateescape")
    if map_type == "set":
        text = "# @list\n" + text
    parsed = parse_table_text(text, source)
    if map_type == "aliases" and parsed.kind != "mapping" and parsed.values:
        raise TableFileError(f"{source}: aliases need 'name: value' lines")
    if parsed.kind == "mapping":
        return write_map(output, "mapping", parsed.mapping)
    return write_map(output, "list", ((v, None) for v in parsed.values))


def unmake(path: str) -> str:
    m = open_map(path)
    try:
        lines = [k if v is None else f"{k}\t{v}" for k, v in m.items()]
    finally:
        m.close()
    return "".join(f"{line}\n" for line in lines)


def makemap_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.unmake:
            text = unmake(args.file)
            if args.output:
                Path(args.output).write_text(text)
            else:
                sys.stdout.write(text)
            return 0
        output = args.output or f"{args.file}.db"
        makemap(args.file, output, args.type)
    except OSError as exc:
        print(f"pigeon makemap: {exc.filename or args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    except (TableFileError, TableError) as exc:
        print(f"pigeon makemap: {exc}", file=sys.stderr)
        return 1
    return 0
