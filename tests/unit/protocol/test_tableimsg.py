"""The old imsg table API, against the bytes captured between a driver and Debian's
opensmtpd-extras table-sqlite (design/transcripts/table-imsg-python-driver.txt)."""

from __future__ import annotations

import os

import pytest

from pigeon.protocol.tableimsg import (
    HEADER,
    LINE_MAX,
    ImsgAnswer,
    ImsgError,
    ImsgType,
    decode_answer,
    encode_close,
    encode_open,
    encode_query,
    encode_update,
    frame_length,
)


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _without_pid(frame: bytes) -> bytes:
    return frame[:12] + frame[16:]


def test_open_is_version_2_and_the_name_padded_to_line_max() -> None:
    frame = encode_open("sqltab")
    assert len(frame) == 2068 == HEADER.size + 4 + LINE_MAX
    assert frame[:12] == _hex("02 00 00 00 14 08 00 00 00 00 00 00")
    assert frame[12:16] == os.getpid().to_bytes(4, "little")
    assert frame[16:32] == _hex("02 00 00 00 73 71 6c 74 61 62 00 00 00 00 00 00")
    assert frame[32:] == bytes(len(frame) - 32)


@pytest.mark.parametrize(
    ("kind", "service", "key", "captured"),
    [
        (
            ImsgType.CHECK,
            "domain",
            "example.com",
            "05 00 00 00 28 00 00 00 00 00 00 00 48 35 00 00 02 00 00 00 00 00 00 00 "
            "00 00 00 00 65 78 61 6d 70 6c 65 2e 63 6f 6d 00",
        ),
        (
            ImsgType.LOOKUP,
            "alias",
            "abuse@example.com",
            "06 00 00 00 2e 00 00 00 00 00 00 00 48 35 00 00 01 00 00 00 00 00 00 00 "
            "00 00 00 00 61 62 75 73 65 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 00",
        ),
        (
            ImsgType.LOOKUP,
            "mailaddrmap",
            "bob@example.com",
            "06 00 00 00 2c 00 00 00 00 00 00 00 48 35 00 00 00 01 00 00 00 00 00 00 "
            "00 00 00 00 62 6f 62 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 00",
        ),
        (
            ImsgType.FETCH,
            "source",
            None,
            "07 00 00 00 1c 00 00 00 00 00 00 00 48 35 00 00 20 00 00 00 00 00 00 00 00 00 00 00",
        ),
    ],
)
def test_queries_are_byte_for_byte_as_captured(
    kind: ImsgType, service: str, key: str | None, captured: str
) -> None:
    assert _without_pid(encode_query(kind, service, key)) == _without_pid(_hex(captured))


def test_update_and_close_are_bare_headers() -> None:
    assert encode_update()[:12] == _hex("04 00 00 00 10 00 00 00 00 00 00 00")
    assert encode_close()[:12] == _hex("03 00 00 00 10 00 00 00 00 00 00 00")


def test_the_old_api_has_no_auth_service_and_keys_have_no_nul() -> None:
    with pytest.raises(ValueError, match="auth"):
        encode_query(ImsgType.CHECK, "auth", "bob:secret")
    with pytest.raises(ValueError, match="NUL"):
        encode_query(ImsgType.LOOKUP, "alias", "a\0b")
    with pytest.raises(ValueError, match="too long"):
        encode_query(ImsgType.LOOKUP, "alias", "x" * 20000)


@pytest.mark.parametrize(
    ("request_kind", "captured", "answer"),
    [
        (ImsgType.OPEN, "00 00 00 00 10 00 00 00 00 00 00 00 71 35 00 00", ImsgAnswer(1)),
        (
            ImsgType.CHECK,
            "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00",
            ImsgAnswer(1),
        ),
        (
            ImsgType.CHECK,
            "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 00 00 00 00",
            ImsgAnswer(0),
        ),
        (
            ImsgType.LOOKUP,
            "00 00 00 00 24 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00 "
            "62 6f 62 40 65 78 61 6d 70 6c 65 2e 63 6f 6d 00",
            ImsgAnswer(1, "bob@example.com"),
        ),
        (
            ImsgType.LOOKUP,
            "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 00 00 00 00",
            ImsgAnswer(0),
        ),
        (
            ImsgType.FETCH,
            "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 ff ff ff ff",
            ImsgAnswer(-1),
        ),
        (
            ImsgType.UPDATE,
            "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00",
            ImsgAnswer(1),
        ),
    ],
)
def test_captured_answers_decode(request_kind: ImsgType, captured: str, answer: ImsgAnswer) -> None:
    frame = _hex(captured)
    assert frame_length(frame[:16]) == len(frame)
    assert decode_answer(request_kind, frame) == answer


@pytest.mark.parametrize(
    ("request_kind", "frame", "why"),
    [
        (ImsgType.LOOKUP, "01 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00", "type 1"),
        (ImsgType.LOOKUP, "00 00 00 00 10 00 00 00 00 00 00 00 71 35 00 00", "without a result"),
        (ImsgType.CHECK, "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 02 00 00 00", "range"),
        (
            ImsgType.LOOKUP,
            "00 00 00 00 16 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00 61 62",
            "NUL",
        ),
        (ImsgType.CHECK, "00 00 00 00 15 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00 00", "after"),
        (ImsgType.OPEN, "00 00 00 00 14 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00", "payload"),
        (ImsgType.CHECK, "00 00 00 00 20 00 00 00 00 00 00 00 71 35 00 00 01 00 00 00", "length"),
    ],
)
def test_broken_answers_are_protocol_errors(request_kind: ImsgType, frame: str, why: str) -> None:
    with pytest.raises(ImsgError, match=why):
        decode_answer(request_kind, _hex(frame))


def test_a_frame_length_out_of_range_is_refused() -> None:
    with pytest.raises(ImsgError):  # what "config|smtpd..." would look like as a header
        frame_length(b"config|smtpd-ver")
    with pytest.raises(ImsgError):
        frame_length(_hex("00 00 00 00 08 00 00 00 00 00 00 00 00 00 00 00"))
