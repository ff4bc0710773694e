"""Static and file tables: formats, key case, and each service's matching rule."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pigeon.config import parse_config_text
from pigeon.tables.base import Service, TableError, TableResolver, normalize_key, open_tables
from pigeon.tables.file import TableFileError, parse_table_text
from pigeon.tables.static import StaticTable, mailaddr_match, netaddr_match


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_file_mapping_formats_and_comments() -> None:
    parsed = parse_table_text(
        "# comment\n\nRoot: bob, carol\nabuse   alice\npostmaster:root\n"
        "key\tvalue # not a comment\n"
        "[::1] localhost\n"
    )
    assert parsed.kind == "mapping"
    assert dict(parsed.mapping) == {
        "root": "bob, carol",
        "abuse": "alice",
        "postmaster": "root",
        "key": "value # not a comment",
        "[::1]": "localhost",
    }


def test_file_list_and_forced_list() -> None:
    assert parse_table_text("Example.ORG\n# c\nexample.net\n").values == (
        "example.org",
        "example.net",
    )
    forced = parse_table_text("# @list\n^a b$\n")
    assert forced.kind == "list" and forced.values == ("^a b$",)


def test_file_mixing_list_and_mapping_fails() -> None:
    with pytest.raises(TableFileError, match=r":2: invalid map entry"):
        parse_table_text("a b\nlonely\n")
    with pytest.raises(TableFileError, match=r":2: invalid list entry"):
        parse_table_text("lonely\na b\n")


def test_duplicate_key_last_wins() -> None:
    assert dict(parse_table_text("a 1\nA 2\n").mapping) == {"a": "2"}


def test_keys_are_lowercased_centrally_values_kept() -> None:
    t = StaticTable("t", mapping=[("Bob", "Value")], kind="mapping")
    assert run(t.lookup(Service.ALIAS, "BOB")) == "Value"
    assert run(t.check(Service.STRING, "bob"))


def test_auth_key_keeps_password_case() -> None:
    assert normalize_key(Service.AUTH, "USER:Secret") == "user:Secret"
    assert normalize_key(Service.CREDENTIALS, "USER:Secret") == "user:secret"
    with pytest.raises(TableError):
        normalize_key(Service.ALIAS, "x" * 1024)


def test_netmask_matching() -> None:
    assert netaddr_match("10.1.2.3", "10.0.0.0/8")
    assert not netaddr_match("11.1.2.3", "10.0.0.0/8")
    assert netaddr_match("192.0.2.7", "192.0.2.7")
    assert netaddr_match("[2001:db8::1]", "[2001:db8::]/32")
    assert netaddr_match("2001:db8::1", "IPv6:2001:db8::/32")
    assert not netaddr_match("10.0.0.1", "[::]/0")
    assert netaddr_match("local", "local")
    t = StaticTable("t", ["192.0.2.0/24", "local"])
    assert run(t.check(Service.NETADDR, "192.0.2.200"))
    assert run(t.check(Service.NETADDR, "local"))
    assert not run(t.check(Service.NETADDR, "198.51.100.1"))


def test_mailaddr_forms() -> None:
    assert mailaddr_match("bob@example.com", "@")
    assert mailaddr_match("bob@example.com", "@example.com")
    assert mailaddr_match("bob@sub.example.com", "@*.example.com")
    assert not mailaddr_match("bob@example.org", "@example.com")
    assert mailaddr_match("bob@anywhere.net", "bob")
    assert mailaddr_match("Bob+tag@example.com", "bob@example.com")
    assert not mailaddr_match("bob+tag@example.com", "bob+other@example.com")
    assert mailaddr_match("bob+tag@example.com", "bob+tag@example.com")
    assert mailaddr_match("bob-x@example.com", "bob@example.com", delim="-")


def test_domain_glob_and_regex() -> None:
    t = StaticTable("t", ["*.example.org", "example.net"])
    assert run(t.check(Service.DOMAIN, "mx.EXAMPLE.org"))
    assert run(t.check(Service.DOMAIN, "example.net"))
    assert not run(t.check(Service.DOMAIN, "example.org"))
    rx = StaticTable("rx", [r"^.*\.dyn\..*$"])
    assert run(rx.check(Service.REGEX, "host.DYN.example"))
    assert not run(rx.check(Service.REGEX, "host.static.example"))


def test_fetch_rotates() -> None:
    t = StaticTable("t", ["192.0.2.10", "192.0.2.11"])
    assert [run(t.fetch(Service.SOURCE)) for _ in range(3)] == [
        "192.0.2.10",
        "192.0.2.11",
        "192.0.2.10",
    ]


def test_lookup_on_a_list_finds_nothing() -> None:
    assert run(StaticTable("t", ["a"]).lookup(Service.ALIAS, "a")) is None


def test_open_tables_file_reload_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text("root: bob\n")
    config = parse_config_text(
        f'table aliases file:{path}\naction "a" mbox alias <aliases>\n'
        'match from src { "10.0.0.0/8" } for any action "a"'
    )
    tables = open_tables(config)
    assert run(tables["aliases"].lookup(Service.ALIAS, "ROOT")) == "bob"
    path.write_text("root: carol\n")
    run(tables["aliases"].update())
    assert run(tables["aliases"].lookup(Service.ALIAS, "root")) == "carol"
    path.write_text("broken\nroot: x\n")
    with pytest.raises(TableError):
        run(tables["aliases"].update())
    assert run(tables["aliases"].lookup(Service.ALIAS, "root")) == "carol"  # kept
    inline = config.matches[0].criterion("from-src")
    assert inline is not None and inline.table is not None
    resolver = TableResolver(config, tables)
    assert resolver.get(inline.table) is resolver.get(inline.table)
    assert run(resolver.get(inline.table).check(Service.NETADDR, "10.9.9.9"))


def test_unavailable_backend_is_an_error() -> None:
    config = parse_config_text(
        'table x proc:/x\naction "a" mbox\nmatch action "a"', check_files=False
    )
    with pytest.raises(TableError, match='backend "proc"'):
        open_tables(config)
    tables = open_tables(config, {"proc": lambda d, c: StaticTable(d.name)})
    assert tables["x"].name == "x"


def test_getpwnam_userinfo() -> None:
    config = parse_config_text('action "a" mbox\nmatch action "a"')
    table = open_tables(config)["<getpwnam>"]
    assert run(table.lookup(Service.USERINFO, "root")).startswith("0:0:")
    assert run(table.lookup(Service.USERINFO, "no-such-user-here")) is None
