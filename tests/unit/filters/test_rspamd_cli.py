"""pigeon-filter-rspamd options: filter-rspamd's spellings, mappings, defaults."""

from __future__ import annotations

import pytest

from pigeon.filters.rspamd import OnError, Verdict
from pigeon.filters.rspamd_builtin import settings_from_words
from pigeon.filters.rspamd_cli import parse_args, settings_from_args


def test_filter_rspamd_spellings_drop_in() -> None:
    settings = settings_from_args(
        parse_args(["-url", "http://127.0.0.1:11435", "-settings-id", "outgoing"])
    )
    assert settings.url == "http://127.0.0.1:11435"
    assert settings.settings_id == "outgoing"


def test_defaults() -> None:
    settings = settings_from_args(parse_args([]))
    assert settings.url == "http://localhost:11333"
    assert settings.on_error is OnError.TEMPFAIL
    assert (settings.connect_timeout, settings.scan_timeout) == (5.0, 15.0)
    assert settings.skip_authenticated and settings.score_headers
    assert settings.verdict_for("greylist") is Verdict.ACCEPT


def test_every_knob() -> None:
    settings = settings_from_args(
        parse_args(
            [
                "--url=/run/rspamd/rspamd.sock",
                "--on-error",
                "accept-with-header",
                "--connect-timeout",
                "1.5",
                "--scan-timeout=20",
                "--action",
                "reject=junk",
                "--action",
                "soft-reject=accept",
                "--greylist",
                "tempfail",
                "--no-skip-authenticated",
                "--no-score-headers",
                "--header",
                "X-Site=eu 1",
                "--mta-name",
                "mx9.example.test",
            ]
        )
    )
    assert settings.url == "/run/rspamd/rspamd.sock"
    assert settings.on_error is OnError.ACCEPT_WITH_HEADER
    assert (settings.connect_timeout, settings.scan_timeout) == (1.5, 20.0)
    assert settings.verdict_for("reject") is Verdict.JUNK
    assert settings.verdict_for("soft reject") is Verdict.ACCEPT
    assert settings.verdict_for("greylist") is Verdict.TEMPFAIL
    assert settings.verdict_for("add header") is Verdict.JUNK  # untouched default
    assert not settings.skip_authenticated and not settings.score_headers
    assert settings.extra_headers == (("X-Site", "eu 1"),)
    assert settings.mta_name == "mx9.example.test"


@pytest.mark.parametrize(
    "argv",
    [
        ["--action", "reject"],
        ["--action", "nonsense=junk"],
        ["--action", "reject=explode"],
        ["--scan-timeout", "0"],
        ["--scan-timeout", "soon"],
        ["--header", "Bad Name=x"],
        ["--on-error", "panic"],
    ],
)
def test_bad_options_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "pigeon-filter-rspamd" in capsys.readouterr().err


# -- the smtpd.conf form: the same options without dashes -----------------------------------


def test_config_words_give_the_same_settings_as_the_command_line() -> None:
    words = [
        "url", "/run/rspamd.sock", "settings-id", "out", "on-error", "accept",
        "map", "soft reject", "accept", "greylist", "tempfail", "skip-authenticated", "no",
        "score-headers", "no", "header", "X-Site", "eu", "scan-timeout", "20",
    ]  # fmt: skip
    settings = settings_from_words(words)
    assert settings.url == "/run/rspamd.sock" and settings.settings_id == "out"
    assert settings.on_error is OnError.ACCEPT
    assert settings.verdict_for("soft reject") is Verdict.ACCEPT
    assert settings.verdict_for("greylist") is Verdict.TEMPFAIL
    assert not settings.skip_authenticated and not settings.score_headers
    assert settings.extra_headers == (("X-Site", "eu"),)
    assert settings.scan_timeout == 20.0


@pytest.mark.parametrize(
    "words",
    [["url"], ["map", "reject"], ["score-headers", "maybe"], ["colour", "blue"], ["map", "x", "y"]],
)
def test_bad_config_words_are_a_value_error_not_an_exit(words: list[str]) -> None:
    with pytest.raises(ValueError):
        settings_from_words(words)
