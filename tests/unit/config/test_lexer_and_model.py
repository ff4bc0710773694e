"""Lexical rules and what parsed statements mean (model values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config import ConfigError, parse_config_text
from pigeon.config.expand import FormatContext, FormatError, expand_format
from pigeon.config.lexer import Lexer

RULE = '\naction "a" mbox\nmatch for any action "a"\n'


def lex(text: str) -> list[tuple[str, str]]:
    return [(t.type, t.value) for t in Lexer("t", text, lambda _n: None).tokens() if t.type != "NL"]


def errors(text: str, macros: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "t.conf", macros, check_files=False)
    return [str(i) for i in e.value.issues]


def test_numbers_sizes_and_words() -> None:
    assert lex("25 -3 35M 4h 10.0.0.0/8 10,11") == [
        ("NUMBER", "25"), ("NUMBER", "-3"), ("STRING", "35M"), ("STRING", "4h"),
        ("STRING", "10.0.0.0/8"), ("NUMBER", "10"), ("COMMA", ","), ("NUMBER", "11"),
    ]  # fmt: skip


def test_keywords_only_when_unquoted() -> None:
    assert lex('relay "relay" mail-from') == [
        ("RELAY", "relay"),
        ("STRING", "relay"),
        ("MAIL_FROM", "mail-from"),
    ]


def test_backslashes_in_quotes() -> None:
    assert lex(r'"a\"b" "\.x\d" "sp\ ace" ' + "'it\\'s'") == [
        ("STRING", 'a"b'),
        ("STRING", r"\.x\d"),
        ("STRING", "sp ace"),  # Debian's smtpd 6.8 drops it (checked side by side)
        ("STRING", "it's"),
    ]


def test_continuation_and_comments() -> None:
    assert lex('a \\\n b # c "d"\n"x\\\ny"') == [("STRING", "a"), ("STRING", "b"), ("STRING", "xy")]


def test_arrow_and_punctuation() -> None:
    assert [t for t, _ in lex("{ k => v, k2 = v2 } <t> !")] == [
        "LBRACE", "STRING", "ARROW", "STRING", "COMMA", "STRING", "EQ", "STRING", "RBRACE",
        "LT", "STRING", "GT", "BANG",
    ]  # fmt: skip


def test_macro_defined_in_file_and_overridden_by_command_line() -> None:
    text = 'addr = "127.0.0.1"\nlisten on $addr port 2525' + RULE
    assert parse_config_text(text, check_files=False).listeners[1].interface == "127.0.0.1"
    config = parse_config_text(text, macros={"addr": "::1"}, check_files=False)
    assert config.listeners[1].interface == "::1"


def test_macro_is_not_expanded_inside_quotes() -> None:
    config = parse_config_text('x = "y"\naction "a" mda "run $x"\nmatch for any action "a"')
    assert config.actions["a"].mda_command == "run $x"


def test_macro_value_is_lexed_again_keywords_included() -> None:
    config = parse_config_text('opts = "tag LAN mask-src"\nlisten on socket $opts' + RULE)
    assert config.listeners[0].tag == "LAN" and config.listeners[0].mask_src


def test_keyword_cannot_name_a_macro() -> None:
    assert errors('host = "x"' + RULE)[0].startswith('t.conf:1:1: syntax error: unexpected "host"')


def test_undefined_macro() -> None:
    assert errors("listen on $nope" + RULE) == ["t.conf:1:11: macro 'nope' not defined"]


def test_unterminated_quote() -> None:
    assert errors('action "a mbox\n') == [
        "t.conf:1:8: reached end of file while parsing quoted string",
        "t.conf: no rules, nothing to do",
    ]


def test_newlines_inside_braces_are_separators() -> None:
    config = parse_config_text('table t {\n "a"\n "b",\n "c"\n}' + RULE)
    assert config.tables["t"].values == ("a", "b", "c")


def test_defaults_from_local_for_local() -> None:
    config = parse_config_text('action "a" mbox\nmatch action "a"')
    (rule,) = config.matches
    assert [c.kind for c in rule.criteria] == ["from-local", "for-local"]


def test_from_auth_means_from_any_plus_auth() -> None:
    config = parse_config_text('action "a" mbox\nmatch !from auth for any action "a"')
    kinds = {c.kind: c.negated for c in config.matches[0].criteria}
    assert kinds == {"from-any": False, "auth": True, "for-any": False}


def test_conf_11_values() -> None:
    text = Path("/work/shared/design/confs/11-limits-queue-misc.conf")
    if not text.exists():
        pytest.skip("design confs not available")
    c = parse_config_text(text.read_text(), check_files=False)
    assert c.smtp.max_message_size == 50 * 1024 * 1024
    assert (c.smtp.sub_addr_delim, c.smtp.max_mails, c.smtp.max_rcpt) == ("-", 50, 200)
    assert c.bounce_warn_interval == (3600, 6 * 3600, 2 * 86400)
    assert c.queue.ttl == 3 * 86400 and c.queue.compression and c.queue.encryption
    assert c.admd == "mx.example.org" and c.mta_max_deferred == 50
    lan = c.listeners[1]
    assert (lan.interface, lan.port, lan.tag, lan.hostname, lan.no_dsn) == (
        "127.0.0.1",
        10025,
        "LAN",
        "mx.example.org",
        True,
    )
    assert c.listeners[0].kind == "socket" and c.listeners[0].tag == "LOCAL"
    md = c.actions["md"]
    assert md.method == "maildir" and md.user == "vmail"
    assert md.maildir_path == "/var/mail/%{rcpt.domain}/%{rcpt.user:lowercase}/Maildir"
    relay = c.actions["relay"]
    assert (relay.tls, relay.backup, relay.backup_mx) == ("no-verify", True, "mx1.example.org")
    assert c.actions["wrapped"].ttl == 2 * 86400 and c.actions["wrapped"].wrapper == "spamassassin"
    assert c.matches[-1].action is None  # reject
    assert c.mda_limits["max-session-per-user"] == 2


def test_listener_defaults() -> None:
    c = parse_config_text("listen on lo\nlisten on socket" + RULE)
    sock, lo = c.listeners
    assert not sock.implicit and lo.effective_port == 25 and lo.kind == "inet"
    c = parse_config_text(RULE)
    assert c.listeners[0].implicit


def test_format_expansion() -> None:
    ctx = FormatContext("", "Bob+x@Example.org", "bob@example.org", "bob", "/home/bob")
    assert expand_format("%{mbox.from} %{rcpt.user:strip|lowercase}", ctx) == "MAILER-DAEMON bob"
    assert expand_format("~/%{dest.domain[0:2]}", ctx) == "/home/bob/exa"
    assert expand_format("%{rcpt:raw}/%{rcpt.user[-3:]}", ctx) == "Bob+x@Example.org/b+x"
    weird = FormatContext("a/b|c@x", "r@x", "r@x")
    assert expand_format("%{sender.user}", weird) == "a:b:c"
    with pytest.raises(FormatError):
        expand_format("%{nope}", ctx)
    with pytest.raises(FormatError):
        expand_format("%{rcpt.user[40]}", ctx)
