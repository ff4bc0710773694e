"""Configurations Debian's smtpd 6.8 accepts (or refuses) that an audit of 1,441 configs run
through both ``smtpd -n`` and ``pigeon check`` found Pigeon treating differently."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pigeon.config import ConfigError, parse_config_text
from pigeon.config.model import Config

RULES = 'action "l" maildir\nmatch from any for any action "l"\n'
PKI = 'pki mail.example.com cert "/dev/null"\npki mail.example.com key "/dev/null"\n'


def parse(text: str, macros: dict[str, str] | None = None) -> Config:
    return parse_config_text(text, "t.conf", macros, check_files=False)


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "t.conf", None, check_files=False)
    return [str(issue) for issue in info.value.issues]


def test_tls_without_pki_takes_the_pki_of_the_hostname_or_star() -> None:
    config = parse(PKI + "listen on lo tls hostname mail.example.com\n" + RULES)
    assert config.listeners[1].pki == ()  # the daemon picks mail.example.com's
    parse(PKI.replace("mail.example.com", '"*"') + "listen on lo smtps hostname x.org\n" + RULES)
    parse(PKI + "listen on lo tls-require\n" + RULES)  # the server's name: known at start
    # no pki of that name: smtpd takes the config (and fails every handshake); the daemon
    # serves the first pki with a warning
    parse(PKI + "listen on lo tls hostname other.example.com\n" + RULES)
    assert errors("listen on lo tls hostname other.example.com\n" + RULES) == [
        "t.conf:1:11: invalid listen option: tls/smtps needs a pki declared"
    ]


def test_pki_and_ca_names_are_case_insensitive() -> None:
    config = parse(PKI + "listen on lo tls pki Mail.Example.COM\n" + RULES)
    assert config.listeners[1].pki == ("mail.example.com",)


def test_lmtp_takes_a_user_as_in_6_8() -> None:
    config = parse(
        'action "vmail" lmtp "/var/run/dovecot/lmtp" rcpt-to user vmail\n'
        'match from any for any action "vmail"\n'
    )
    assert config.actions["vmail"].user == "vmail"


def test_a_tag_of_32_characters_is_fine_33_is_not() -> None:
    parse(f"listen on lo tag {'t' * 32}\n" + RULES)
    assert errors(f"listen on lo tag {'t' * 33}\n" + RULES) == ["t.conf:1:18: tag name too long"]


def test_an_undeclared_relay_pki_is_reported_with_its_column() -> None:
    assert errors('action "r" relay pki nope.example.com\nmatch for any action "r"\n') == [
        "t.conf:1:22: pki name not found: nope.example.com"
    ]


def test_a_comment_ending_in_a_backslash_goes_on_over_the_next_line() -> None:
    config = parse(
        "listen on lo\n"
        '#action "relay" relay host smtp+tls://mx.example.com \\\n'
        "\tauth <secrets>\n" + RULES
    )
    assert list(config.actions) == ["l"]
    # so a commented-out first line also takes the match it was continued into
    assert (
        "no rules, nothing to do"
        in errors('listen on lo\naction "l" maildir\n# old rule \\\nmatch for any action "l"\n')[0]
    )


def test_a_backslash_before_a_blank_is_a_blank() -> None:
    config = parse("listen on lo \\ \n" + RULES)
    assert config.listeners[1].interface == "lo"
    config = parse('action "a\\ b" maildir\nmatch for any action "a b"\n')
    assert "a b" in config.actions
    config = parse('action "l" \\maildir\nmatch for any action "l"\n')  # an escaped letter
    assert config.actions["l"].method == "maildir"


def test_a_macro_and_the_characters_after_it_make_one_word() -> None:
    config = parse('h = "mail"\nlisten on lo hostname $h.example.com\n' + RULES)
    assert config.listeners[1].hostname == "mail.example.com"
    # a "#" in a value starts a comment there, which ends the line (as in parse.y)
    config = parse('opts = "port 2525 # the rest is a comment"\nlisten on lo $opts tls\n' + RULES)
    assert config.listeners[1].port == 2525 and not config.listeners[1].tls


def test_timeout_and_protocol_are_not_reserved_words() -> None:
    config = parse(
        'timeout = "x"\nlisten on lo tag timeout\nlisten on lo port 26 tag protocol\n' + RULES
    )
    assert [lst.tag for lst in config.listeners[1:]] == ["timeout", "protocol"]
    config = parse(
        'filter f proc-exec "/bin/cat" timeout 30s protocol "0.6"\nlisten on lo filter f\n' + RULES
    )
    assert config.procs["f"].timeout == 30 and config.procs["f"].protocol == "0.6"
    assert errors('filter f proc-exec "/bin/cat" frobnicate 3\n' + RULES) == [
        't.conf:1:31: syntax error: unexpected "frobnicate"'
    ]


def test_an_empty_table_file_is_a_mapping(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    text = f"table e file:{empty}\nlisten on lo\n"
    parse_config_text(
        text + 'action "l" maildir virtual <e>\nmatch for any action "l"\n', "t.conf", None
    )
    with pytest.raises(ConfigError, match="may not be used for 'for' lookups"):
        parse_config_text(text + RULES.replace("for any", "for domain <e>"), "t.conf", None)


def test_from_auth_then_auth_is_one_field_twice() -> None:
    assert errors(
        'listen on lo\naction l maildir\nmatch from auth auth "alice" for any action l\n'
    )[0] == ("t.conf:3:17: auth already specified for this rule")
    parse('listen on lo\naction l maildir\nmatch auth "alice" from auth for any action l\n')


def test_a_db_table_must_be_a_map_not_its_source(tmp_path: Path) -> None:
    source = tmp_path / "aliases"
    source.write_text("root: alice\n")
    with pytest.raises(ConfigError, match="not a map built by makemap"):
        parse_config_text(
            f"table a db:{source}\nlisten on lo\n" + RULES.replace("maildir", "maildir alias <a>"),
            "t.conf",
            None,
        )
    built = tmp_path / "aliases.db"
    with sqlite3.connect(built) as conn:
        conn.execute("CREATE TABLE t (k TEXT)")
    parse_config_text(f"table a db:{built}\nlisten on lo\n" + RULES, "t.conf", None)


def test_a_queue_encryption_key_has_32_characters() -> None:
    parse("queue encryption " + "k" * 32 + "\nlisten on lo\n" + RULES)
    parse("queue encryption stdin\nlisten on lo\n" + RULES)
    assert errors("queue encryption short\nlisten on lo\n" + RULES) == [
        "t.conf:1:18: invalid key for queue encryption (32 characters)"
    ]
