"""A received message is stored in parts (never joined): the header section first."""

from __future__ import annotations

from pigeon.server.session import _count_received, _has_header, _header_first

MESSAGE = (
    b"Received: from a\r\nReceived: from b\r\n\tby c\r\nSubject: parts\r\n\r\n"
    b"body line\r\nDate: not a header\r\n" + b"x" * 200
)


def splits(data: bytes, pieces: int) -> list[list[bytes]]:
    """Every way to cut ``data`` into ``pieces`` chunks at a step of 7 bytes."""
    if pieces == 1:
        return [[data]]
    out = []
    for cut in range(1, len(data), 7):
        for rest in splits(data[cut:], pieces - 1):
            out.append([data[:cut], *rest])
    return out


def test_the_first_part_holds_the_whole_header_wherever_the_chunks_are_cut() -> None:
    header_end = MESSAGE.index(b"\r\n\r\n") + 4
    for pieces in (1, 2, 3):
        for chunks in splits(MESSAGE, pieces):
            parts = _header_first(chunks)
            assert b"".join(parts) == MESSAGE, chunks
            assert len(parts[0]) >= header_end, chunks
            assert _count_received(parts[0]) == 2
            assert _has_header(parts[0], b"subject") and not _has_header(parts[0], b"date")


def test_the_body_chunks_are_kept_not_copied() -> None:
    body = [b"y" * 1000 for _ in range(5)]
    chunks = [b"Subject: s\r\n\r\n", *body]
    parts = _header_first(chunks)
    assert parts[0] == b"Subject: s\r\n\r\n"
    assert all(a is b for a, b in zip(parts[1:], body, strict=True))


def test_no_header_or_no_blank_line() -> None:
    assert _header_first([b"\r\n", b"only a body\r\n"]) == [b"\r\n", b"only a body\r\n"]
    assert _header_first([b"Subject: a\r\n", b"X: b\r\n"]) == [b"Subject: a\r\nX: b\r\n"]
