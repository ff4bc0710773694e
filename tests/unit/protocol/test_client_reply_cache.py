"""The reply parser shares the objects of repeated single-line replies: that must never change
what a reply means."""

from __future__ import annotations

import pytest

from pigeon.protocol.client import _BadReply, _ReplyParser
from pigeon.protocol.replies import Reply


def parse(data: bytes) -> list[Reply]:
    parser = _ReplyParser()
    parser.feed(data)
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(reply)
    return replies


def test_a_repeated_line_gives_the_same_reply() -> None:
    first = parse(b"250 2.1.0 Sender ok\r\n")
    again = parse(b"250 2.1.0 Sender ok\n250 2.1.0 Sender ok\r\n")
    assert first == [Reply(250, "Sender ok", "2.1.0")]
    assert again == first * 2


def test_a_known_line_ending_a_multiline_reply_is_not_taken_alone() -> None:
    assert parse(b"250 done\r\n") == [Reply(250, "done")]
    assert parse(b"250-first\r\n250 done\r\n") == [Reply(250, "first\ndone")]


def test_a_known_line_after_a_line_of_another_code_is_still_refused() -> None:
    parse(b"250 done\r\n")
    with pytest.raises(_BadReply):
        parse(b"550-no\r\n250 done\r\n")


def test_lines_split_across_reads_and_mixed_endings() -> None:
    parser = _ReplyParser()
    out = []
    for piece in (b"25", b"0 2.0.0 Ok\r", b"\n354 go\n2", b"50 2.0.0 Ok\r\n"):
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    assert out == [Reply(250, "Ok", "2.0.0"), Reply(354, "go"), Reply(250, "Ok", "2.0.0")]
    assert not parser.has_data
