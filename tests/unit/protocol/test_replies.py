"""Reply formatting and parsing."""

from __future__ import annotations

import pytest

from pigeon.protocol.replies import Reply


def test_single_and_multi_line_formatting() -> None:
    assert Reply(250, "Ok", "2.0.0").to_bytes() == b"250 2.0.0 Ok\r\n"
    assert Reply(250, "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"
    assert Reply(214, "x\ny", "2.0.0").lines() == ["214-2.0.0 x", "214 2.0.0 y"]
    assert Reply(550, "No", "5.1.1").to_bytes(enhanced_codes=False) == b"550 No\r\n"


def test_classes() -> None:
    assert Reply(451, "t").temporary and not Reply(451, "t").permanent
    assert Reply(554, "p").permanent and not Reply(554, "p").positive
    assert Reply(354, "go").positive
    assert Reply(421, "bye").closes_session and not Reply(450, "x").closes_session


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        ("550 5.7.1 Go away", Reply(550, "Go away", "5.7.1")),
        ("421 Internal server error", Reply(421, "Internal server error", None)),
        ("250 2.0.0 Ok\r\n", Reply(250, "Ok", "2.0.0")),
        ("550 4.7.1 class mismatch", Reply(550, "4.7.1 class mismatch", None)),
        ("451", Reply(451, "", None)),
        ("250 5.5", Reply(250, "5.5", None)),
    ],
)
def test_parse(line: str, reply: Reply) -> None:
    assert Reply.parse(line) == reply


@pytest.mark.parametrize("line", ["", "25 x", "650 no", "abc def", "250x"])
def test_parse_refuses_non_replies(line: str) -> None:
    with pytest.raises(ValueError):
        Reply.parse(line)


def test_parse_round_trips_formatting() -> None:
    reply = Reply(553, "Sender address syntax error", "5.1.0")
    assert Reply.parse(reply.lines()[0]) == reply
