"""Match rules at run time: first match wins, defaults, negation, every criterion."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from pigeon.config import parse_config_text
from pigeon.rules.ruleset import MatchContext, Ruleset
from pigeon.tables.base import open_tables

LOCAL_NAMES = frozenset({"localhost", "mx.example.org"})
CTX = MatchContext(
    local=False,
    socket=False,
    src_ip="203.0.113.5",
    rdns="mail.sender.example",
    helo="mail.sender.example",
    auth_user=None,
    tls=False,
    tag=None,
    mail_from="alice@sender.example",
    rcpt_to="bob@example.org",
)


def first(conf: str, **changes: object) -> str | None:
    """The action name of the first matching rule; "REJECT" or None when none matches."""
    config = parse_config_text(conf, check_files=False)
    rules = Ruleset(config, open_tables(config), local_names=LOCAL_NAMES)
    rule = asyncio.run(rules.match(replace(CTX, **changes)))  # type: ignore[arg-type]
    if rule is None:
        return None
    return rule.action or "REJECT"


ACTIONS = 'action "a" mbox\naction "b" mbox\naction "r" relay\n'


def test_first_match_wins_and_no_match_is_none() -> None:
    conf = (
        ACTIONS
        + 'match from any for domain "example.org" action "a"\nmatch from any for any action "b"'
    )
    assert first(conf) == "a"
    assert first(conf, rcpt_to="x@other.example") == "b"
    assert first(ACTIONS + 'match from any for domain "x.test" action "a"') is None


def test_defaults_are_from_local_for_local() -> None:
    conf = ACTIONS + 'match action "a"'
    assert first(conf) is None  # remote client
    assert first(conf, local=True, rcpt_to="bob@mx.example.org") == "a"
    assert first(conf, socket=True, rcpt_to="bob@LOCALHOST") == "a"
    assert first(conf, local=True, rcpt_to="bob@example.org") is None


def test_reject_rule() -> None:
    conf = (
        ACTIONS
        + 'match from any mail-from "@spam.example" for any reject\n'
        + 'match from any for any action "a"'
    )
    assert first(conf, mail_from="x@spam.example") == "REJECT"
    assert first(conf) == "a"


def test_negation_and_antiforgery_example() -> None:
    conf = (
        ACTIONS + "table relays { 192.0.2.0/24 }\n"
        'match !from src <relays> mail-from "@example.org" for any reject\n'
        'match from any for any action "a"'
    )
    assert first(conf, mail_from="ceo@example.org") == "REJECT"
    assert first(conf, mail_from="ceo@example.org", src_ip="192.0.2.9") == "a"


def test_from_socket_rdns_src_regex() -> None:
    assert first(ACTIONS + 'match from socket for any action "a"', socket=True) == "a"
    assert first(ACTIONS + 'match from socket for any action "a"', local=True) is None
    assert first(ACTIONS + 'match from rdns for any action "a"', rdns=None) is None
    assert first(ACTIONS + 'match from rdns for any action "a"') == "a"
    conf = ACTIONS + 'match from rdns regex "\\.sender\\.example$" for any action "a"'
    assert first(conf) == "a"
    assert first(ACTIONS + 'match from src regex "^203\\." for any action "a"') == "a"


def test_tag_helo_tls_auth() -> None:
    assert first(ACTIONS + 'match tag LAN from any for any action "a"', tag="lan") == "a"
    assert first(ACTIONS + 'match tag LAN from any for any action "a"') is None
    assert first(ACTIONS + 'match helo "*.sender.example" from any for any action "a"') == "a"
    assert first(ACTIONS + 'match tls from any for any action "a"', tls=True) == "a"
    assert first(ACTIONS + 'match auth from any for any action "a"') is None
    assert first(ACTIONS + 'match from auth for any action "a"', auth_user="bob") == "a"
    conf = ACTIONS + 'match auth { "bob" } from any for any action "a"'
    assert first(conf, auth_user="BOB") == "a" and first(conf, auth_user="eve") is None
    conf = ACTIONS + 'match auth { "@example.org" } from any for any action "a"'
    assert first(conf, auth_user="bob@example.org") == "a"


def test_for_rcpt_to_and_domain_table() -> None:
    conf = ACTIONS + 'match from any for rcpt-to "list@example.org" action "a"'
    assert first(conf, rcpt_to="LIST@example.org") == "a"
    assert first(conf) is None
    conf = (
        ACTIONS
        + 'table d { "*.example.org", "example.org" }\nmatch from any for domain <d> action "a"'
    )
    assert first(conf, rcpt_to="x@a.example.org") == "a"
