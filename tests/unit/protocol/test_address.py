"""Paths, mailboxes, ESMTP parameters and xtext."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.protocol.address import (
    AddressError,
    Mailbox,
    parse_mailbox,
    parse_params,
    parse_path,
    split_address,
    valid_domain,
    valid_xtext,
    xtext_decode,
    xtext_encode,
)


@pytest.mark.parametrize(
    ("text", "address", "rest"),
    [
        ("<a@b.c>", "a@b.c", ""),
        ("<a@b.c> SIZE=1 BODY=8BITMIME", "a@b.c", "SIZE=1 BODY=8BITMIME"),
        ("<a.b+tag@sub.b-c.d>", "a.b+tag@sub.b-c.d", ""),
        ("<@r1.test,@r2.test:a@b.c>", "a@b.c", ""),
        # OpenSMTPD's looser route: an unquoted local part up to its first ":" goes.
        ("<r1.test:a@b.c>", "a@b.c", ""),
        ("<whatever:a@a>", "a@a", ""),
        ("<@r1.test:x:a@b.c>", "a@b.c", ""),
        ('<"a:b"@c.d>', '"a:b"@c.d', ""),  # quoted: the colon is part of the name
        ('<"a b"@c.d>', '"a b"@c.d', ""),
        ('<"a>b"@c.d> X', '"a>b"@c.d', "X"),
        ('<"a\\"b"@c.d>', '"a\\"b"@c.d', ""),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]", ""),
        ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", ""),
        ("<a@under_score.test>", "a@under_score.test", ""),
        ("<a@b.c>>", "a@b.c", ">"),  # the rest is for the parameter parser to refuse
    ],
)
def test_parse_path_ok(text: str, address: str, rest: str) -> None:
    assert parse_path(text, allow_null=False) == (address, rest)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<> RET=FULL", allow_null=True) == ("", "RET=FULL")
    assert parse_path("<@>", allow_null=True) == ("", "")  # as OpenSMTPD
    for text in ("<>", "<@>"):
        with pytest.raises(AddressError):
            parse_path(text, allow_null=False)


def test_default_domain_for_local_only_address() -> None:
    assert parse_path("<postmaster>", allow_null=False, default_domain="mx.test") == (
        "postmaster@mx.test",
        "",
    )
    with pytest.raises(AddressError):
        parse_path("<postmaster>", allow_null=False)


@pytest.mark.parametrize(
    "text",
    [
        "a@b.c",
        "<a@b.c",
        "<a@>",
        "<@b.c>",
        "< a@b.c>",
        "<a@b.c >",
        "<.a@b.c>",
        "<a.@b.c>",
        "<a..b@c.d>",
        "<a@b..c>",
        "<a@b.c.>",
        "<a@b@c.d>",
        "<a@-b c>",
        "<a\tb@c.d>",
        "<a@[300.1.1.1]>",
        "<a@[IPv6:1.2.3.4]>",
        "<a@[tag:x]>",
        "<@r1.test:>",
        "<@r1.test a@b.c>",
        "<a:@a>",  # nothing left of the local part once the route is gone
        "<a:b:c@d.e>",
        "<@a:>",
        '<"unterminated@b.c>',
        '<"a"b@c.d>',
        "<j\u00f6rg@b.c>",
        "<a@" + "x" * 64 + ".test>",
        "<" + "a" * 256 + "@b.c>",
    ],
)
def test_parse_path_refused(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text, allow_null=True)


def test_utf8_addresses_need_the_flag() -> None:
    text = "<j\u00f6rg@b\u00fccher.test>"
    assert parse_path(text, allow_null=False, utf8=True) == ("j\u00f6rg@b\u00fccher.test", "")
    with pytest.raises(AddressError):
        parse_path(text, allow_null=False)


def test_mailbox_and_split() -> None:
    assert parse_mailbox("a@b.c") == Mailbox("a", "b.c")
    assert str(Mailbox("a", "b.c")) == "a@b.c"
    assert split_address('"x@y"@b.c') == ('"x@y"', "b.c")
    assert split_address("local") == ("local", "")
    assert split_address("") == ("", "")


@pytest.mark.parametrize(
    ("domain", "ok"),
    [
        ("example.test", True),
        ("localhost", True),
        ("[127.0.0.1]", True),
        ("[::1]", True),  # OpenSMTPD accepts a v6 literal without the tag
        ("", False),
        ("a..b", False),
        ("a.b.", False),
        ("a b", False),
        ("[1.2.3]", False),
    ],
)
def test_valid_domain(domain: str, ok: bool) -> None:
    assert valid_domain(domain) is ok


def test_parse_params() -> None:
    assert parse_params("size=10  BODY=8BITMIME SMTPUTF8 ") == [
        ("SIZE", "10", "size=10"),
        ("BODY", "8BITMIME", "BODY=8BITMIME"),
        ("SMTPUTF8", None, "SMTPUTF8"),
    ]
    assert parse_params("") == []


@pytest.mark.parametrize("text", ["=x", "A=", "-A=1", "A=b=c", "A_B=1", "A=\x01"])
def test_parse_params_refused(text: str) -> None:
    with pytest.raises(AddressError, match="^" + text.replace("\x01", ".") + "$"):
        parse_params(text)


def test_xtext() -> None:
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert xtext_decode("a+2Bb+3Dc+20d+C3+A9") == "a+b=c d\u00e9"
    assert valid_xtext("rfc822+3Bx")
    for bad in ("+2b", "+2", "a=b", "a b", "+ZZ"):
        assert not valid_xtext(bad)
        with pytest.raises(AddressError):
            xtext_decode(bad)


@settings(max_examples=200)
@given(st.text())
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert valid_xtext(encoded)
    assert xtext_decode(encoded) == text


@settings(max_examples=200)
@given(st.text(max_size=80))
def test_parse_path_never_raises_anything_else(text: str) -> None:
    try:
        _address, rest = parse_path(text, allow_null=True, utf8=True, default_domain="d.test")
    except AddressError:
        return
    assert text.startswith("<")
    assert rest == rest.lstrip(" ")


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ('<"alice"@example.test>', "alice@example.test"),  # needless quotes: the same mailbox
        ('<"a.b"@example.test>', "a.b@example.test"),
        ('<"a\\lice"@example.test>', "alice@example.test"),  # a quoted pair of a plain char
        ('<"user%other"@example.test>', "user%other@example.test"),  # as if sent unquoted
        ('<"a b"@example.test>', '"a b"@example.test'),  # needs its quotes: kept
        ('<"x@y"@example.test>', '"x@y"@example.test'),  # an "@" inside: kept, never split
        ('<".a"@example.test>', '".a"@example.test'),
        ('<""@example.test>', '""@example.test'),
    ],
)
def test_a_quoted_local_part_that_needs_no_quotes_is_the_unquoted_mailbox(
    path: str, address: str
) -> None:
    assert parse_path(path, allow_null=False) == (address, "")
