"""smtpctl-style command words: prefixes, ambiguity listings."""

from __future__ import annotations

import pytest

from pigeon.control.grammar import Ambiguous, expand


@pytest.mark.parametrize(
    ("words", "full"),
    [
        (["sh", "q"], ["show", "queue"]),
        (["show", "queue", "0cddae5a"], ["show", "queue", "0cddae5a"]),
        (["sch", "all"], ["schedule", "all"]),
        (["pa", "env", "0cddae5a"], ["pause", "envelope", "0cddae5a"]),
        (["res", "sm"], ["resume", "smtp"]),
        (["show", "statu"], ["show", "status"]),
        (["tr", "mta"], ["trace", "mta"]),
        (["un", "all"], ["untrace", "all"]),
        (["mon"], ["monitor"]),
        (["show", "hoststat"], ["show", "hoststats"]),
    ],
)
def test_unambiguous_prefixes_expand(words: list[str], full: list[str]) -> None:
    assert expand(words) == full


def test_ambiguous_second_word_lists_the_candidates_as_smtpctl() -> None:
    with pytest.raises(Ambiguous) as info:
        expand(["sh", "st"])
    assert info.value.possibilities == ["show stats", "show status"]


def test_unknown_verb_lists_every_verb() -> None:
    with pytest.raises(Ambiguous) as info:
        expand(["bogus"])
    listing = info.value.possibilities
    assert {"show", "pause", "resume", "schedule", "remove", "monitor", "trace"} <= set(listing)
    assert all(" " not in item for item in listing)


def test_missing_argument_is_refused() -> None:
    with pytest.raises(Ambiguous) as info:
        expand(["remove"])
    assert info.value.possibilities == ["remove <id>"]
    with pytest.raises(Ambiguous):
        expand(["pause", "m"])  # mda or mta


def test_optional_argument_may_be_left_out() -> None:
    assert expand(["show", "queue"]) == ["show", "queue"]


def test_a_word_after_a_complete_command_is_refused() -> None:
    with pytest.raises(Ambiguous):
        expand(["show", "stats", "extra"])
