"""Lexical corners of smtpd.conf (smtpd-conf.md section 1) checked on the values they
produce, ``-D name=value`` on the command line, and ``include``."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.config import ConfigError, load_config, parse_config_text
from pigeon.control.cli import main as pigeon_main

GOLDEN = Path(__file__).with_name("golden")
RULES = 'action "l" mbox\nmatch from any for any action "l"\n'


def issues(text: str, macros: dict[str, str] | None = None) -> list[str]:
    try:
        parse_config_text(text, "t.conf", macros, check_files=False)
    except ConfigError as e:
        return [str(i) for i in e.issues]
    return []


def test_accepted_corners_give_parse_y_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)
    config = load_config("lexical-ok.conf", check_files=False)
    assert config.tables["t"].values == (
        "ab",  # outside quotes a backslash escapes the next character
        "$notamacro",  # no macros inside quotes
        "foo$bar",  # nor in the middle of a word
        "keep backslash",  # dropped before a blank (smtpd 6.8 -n, side by side)
        "keep\\.dot",  # any other backslash is kept: regexes survive
        "joined",  # backslash-newline inside quotes joins the lines
        "it's",
    )
    by_port = {lst.port: lst for lst in config.listeners if lst.kind == "inet"}
    assert by_port[2525].interface == "127.0.0.1"  # the last definition of a macro counts
    assert by_port[2526].hostname == "mx.example.org"  # a macro value is lexed again
    assert by_port[2527].interface == "127.0.0.1"  # continuation line
    assert by_port[2528].interface == "127.0.0.1"  # tabs are blanks
    assert config.smtp.max_message_size == 35 * 1024 * 1024


def test_command_line_macro_overrides_the_file() -> None:
    text = 'where = "lo"\nlisten on $where port 2525\n' + RULES
    config = parse_config_text(text, "t.conf", {"where": "127.0.0.1"}, check_files=False)
    assert [lst.interface for lst in config.listeners if lst.kind == "inet"] == ["127.0.0.1"]


def test_command_line_macro_value_is_lexed_again() -> None:
    text = "listen on 127.0.0.1 $opts\n" + RULES
    config = parse_config_text(
        text, "t.conf", {"opts": "port 2600 hostname mx.example.org"}, check_files=False
    )
    (listener,) = [lst for lst in config.listeners if lst.kind == "inet"]
    assert (listener.port, listener.hostname) == (2600, "mx.example.org")


def test_dos_line_endings_are_named() -> None:
    (issue,) = issues("listen on lo\r\n" + RULES)
    assert issue == (
        't.conf:1:13: syntax error: unexpected "\\r" '
        "(the file has DOS line endings: convert it to Unix ones)"
    )


def test_a_nul_byte_in_a_quoted_string_is_a_syntax_error() -> None:
    assert issues('table t { "a\0b" }\n' + RULES) == ["t.conf:1:11: syntax error"]


def test_a_dollar_in_a_macro_value_is_not_expanded_again() -> None:
    text = 'a = "lo"\nb = "$a"\nlisten on $b\n' + RULES
    assert issues(text) == [
        't.conf:3:11: syntax error: unexpected "$", expected one of "socket", a string'
    ]


# ---------------------------------------------------------------------------- pigeon check -D


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_pigeon_check_uses_dash_d(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write(tmp_path / "smtpd.conf", "listen on $iface port 2525\n" + RULES)
    assert pigeon_main(["check", "-f", conf]) == 1
    assert "smtpd.conf:1:11: macro 'iface' not defined" in capsys.readouterr().err
    assert pigeon_main(["check", "-f", conf, "-D", "iface=127.0.0.1"]) == 0
    assert capsys.readouterr().out.strip() == "configuration OK"
    # the value is a macro value like any other: lexed again, so it can be wrong
    assert pigeon_main(["check", "-f", conf, "-D", "iface=127.0.0.1 port"]) == 1
    assert 'unexpected "port"' in capsys.readouterr().err


def test_dash_d_splits_at_the_last_equal_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As smtpd's cmdline_symset: ``-D a=b=c`` defines ``a=b`` (unusable), not ``a``."""
    conf = write(tmp_path / "smtpd.conf", "listen on $a port 2525\n" + RULES)
    assert pigeon_main(["check", "-f", conf, "-D", "a=b=lo"]) == 1
    assert "macro 'a' not defined" in capsys.readouterr().err


def test_dash_d_without_equal_sign_is_refused(tmp_path: Path) -> None:
    conf = write(tmp_path / "smtpd.conf", RULES)
    with pytest.raises(SystemExit, match="-D expects name=value"):
        pigeon_main(["check", "-f", conf, "-D", "novalue"])


# ---------------------------------------------------------------------------- include


def test_include_absolute_and_nested(tmp_path: Path) -> None:
    inner = write(tmp_path / "inner.inc", 'action "l" mbox\n')
    middle = write(tmp_path / "middle.inc", f'include "{inner}"\nlisten on lo port 2525\n')
    top = write(tmp_path / "smtpd.conf", f'include "{middle}"\nmatch from any for any action "l"\n')
    config = load_config(top, check_files=False)
    assert "l" in config.actions
    assert [lst.port for lst in config.listeners if lst.kind == "inet"] == [2525]


def test_relative_include_is_relative_to_the_including_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "actions.inc", 'action "l" mbox\n')
    top = write(tmp_path / "smtpd.conf", 'include "conf.d/actions.inc"\n' + RULES.split("\n")[1])
    monkeypatch.chdir("/")
    assert "l" in load_config(top, check_files=False).actions


def test_errors_in_an_included_file_name_that_file(tmp_path: Path) -> None:
    inc = write(tmp_path / "part.inc", "\n\nlisten on lo port x\n")
    top = write(tmp_path / "smtpd.conf", f'include "{inc}"\n' + RULES)
    with pytest.raises(ConfigError) as err:
        load_config(top, check_files=False)
    assert next(str(i) for i in err.value.issues).startswith(f"{inc}:3:19: ")


def test_macros_cross_include_boundaries(tmp_path: Path) -> None:
    inc = write(tmp_path / "macros.inc", 'where = "127.0.0.1"\n')
    top = write(tmp_path / "smtpd.conf", f'include "{inc}"\nlisten on $where\n' + RULES)
    config = load_config(top, check_files=False)
    assert [lst.interface for lst in config.listeners if lst.kind == "inet"] == ["127.0.0.1"]


def test_missing_include_names_the_include_line(tmp_path: Path) -> None:
    top = write(tmp_path / "smtpd.conf", RULES + f'include "{tmp_path}/nope.inc"\n')
    with pytest.raises(ConfigError) as err:
        load_config(top, check_files=False)
    (issue,) = [str(i) for i in err.value.issues]
    assert issue.startswith(f"{top}:3:9: failed to include file {tmp_path}/nope.inc")
