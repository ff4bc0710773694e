"""Table protocol 0.1 lines: encoding, decoding, errors, and the captured exchange."""

from __future__ import annotations

from pathlib import Path

import pytest

from pigeon.protocol.tableproto import (
    SERVICES,
    TableOp,
    TableProtocolError,
    TableReady,
    TableRegister,
    TableRegistration,
    TableRequest,
    TableResult,
    TableStatus,
    decode_table_line,
    decode_table_request,
    encode_config,
    encode_register,
    encode_request,
    encode_result,
    format_request_id,
)

TS = 1795551091.585944
CAPTURE = (
    Path(__file__).resolve().parents[2]
    / "data"
    / "design"
    / "transcripts"
    / "table-line-protocol-0.1.txt"
)


def capture() -> list[tuple[str, str]]:
    """("smtpd" | "table", line) pairs of the capture, in order."""
    lines = []
    for raw in CAPTURE.read_text().split("\n"):
        for prefix, who in (("smtpd> ", "smtpd"), ("table< ", "table")):
            if raw.startswith(prefix):
                lines.append((who, raw[len(prefix) :]))
    return lines


# --- encoding -------------------------------------------------------------------------


def test_config() -> None:
    assert encode_config(smtpd_version="7.8.0", table_name="devs") == [
        "config|smtpd-version|7.8.0",
        "config|protocol|0.1",
        "config|tablename|devs",
        "config|ready",
    ]


def test_requests() -> None:
    assert encode_request(
        TableRequest(TS, "devs", TableOp.LOOKUP, "3dc0eb68", "credentials", "bob@example.com")
    ) == ("table|0.1|1795551091.585944|devs|lookup|credentials|3dc0eb68|bob@example.com")
    assert encode_request(TableRequest(TS, "devs", TableOp.CHECK, "1", "netaddr", "a|b")) == (
        "table|0.1|1795551091.585944|devs|check|netaddr|1|a|b"
    )
    assert encode_request(TableRequest(TS, "devs", TableOp.FETCH, "31ab63a9", "source")) == (
        "table|0.1|1795551091.585944|devs|fetch|source|31ab63a9"
    )
    assert encode_request(TableRequest(TS, "devs", TableOp.UPDATE, "d1db10e1")) == (
        "table|0.1|1795551091.585944|devs|update|d1db10e1"
    )


@pytest.mark.parametrize(
    ("op", "service", "key"),
    [
        (TableOp.UPDATE, "alias", None),
        (TableOp.CHECK, "domain", None),
        (TableOp.LOOKUP, None, "k"),
        (TableOp.FETCH, "source", "k"),
        (TableOp.CHECK, "none", "k"),
        (TableOp.CHECK, "nosuch", "k"),
    ],
)
def test_request_shape_is_checked(op: TableOp, service: str | None, key: str | None) -> None:
    with pytest.raises(ValueError):
        TableRequest(TS, "t", op, "1", service, key)


def test_request_refuses_line_breaks_and_bad_ids() -> None:
    with pytest.raises(ValueError):
        encode_request(TableRequest(TS, "t", TableOp.LOOKUP, "1", "alias", "a\nb"))
    with pytest.raises(ValueError):
        encode_request(TableRequest(TS, "t", TableOp.LOOKUP, "1", "alias", "a\rb"))
    with pytest.raises(ValueError):
        TableRequest(TS, "t", TableOp.UPDATE, "1|2")
    with pytest.raises(ValueError):
        TableRequest(TS, "t", TableOp.UPDATE, "")


def test_format_request_id() -> None:
    assert format_request_id(0x3DC0EB68) == "3dc0eb68"
    assert format_request_id(5) == "00000005"


# --- decoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("register|alias", TableRegister("alias")),
        ("register|auth\n", TableRegister("auth")),
        ("register|ready", TableReady()),
        ("update-result|d1|ok", TableResult(TableOp.UPDATE, "d1", TableStatus.OK)),
        ("update-result|d1|error", TableResult(TableOp.UPDATE, "d1", TableStatus.ERROR)),
        (
            "update-result|d1|error|cannot read file",
            TableResult(TableOp.UPDATE, "d1", TableStatus.ERROR, "cannot read file"),
        ),
        ("check-result|7|found", TableResult(TableOp.CHECK, "7", TableStatus.FOUND)),
        ("check-result|7|found|whatever", TableResult(TableOp.CHECK, "7", TableStatus.FOUND)),
        ("check-result|7|not-found", TableResult(TableOp.CHECK, "7", TableStatus.NOT_FOUND)),
        (
            "lookup-result|7|found|a|b:c",
            TableResult(TableOp.LOOKUP, "7", TableStatus.FOUND, "a|b:c"),
        ),
        (
            "fetch-result|7|found|192.0.2.1",
            TableResult(TableOp.FETCH, "7", TableStatus.FOUND, "192.0.2.1"),
        ),
        ("fetch-result|7|not-found", TableResult(TableOp.FETCH, "7", TableStatus.NOT_FOUND)),
    ],
)
def test_decode(line: str, expected: object) -> None:
    assert decode_table_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello",
        "register|",
        "register|none",
        "register|nosuch",
        "register",
        "frobnicate-result|1|ok",
        "check-result",
        "check-result|1",
        "check-result||found",
        "check-result|1|maybe",
        "check-result|1|ok",
        "check-result|1|not-found|extra",
        "update-result|1|found",
        "update-result|1|ok|extra",
        "lookup-result|1|found",
        "lookup-result|1|found|",
        "lookup-result|1|ok",
        "fetch-result|1|found|",
    ],
)
def test_garbage_is_a_protocol_error(line: str) -> None:
    with pytest.raises(TableProtocolError):
        decode_table_line(line)


def test_registration() -> None:
    registration = TableRegistration()
    registration.feed(TableRegister("alias"))
    registration.feed(TableRegister("auth"))
    registration.feed(TableReady())
    assert registration.ready and registration.services == {"alias", "auth"}
    with pytest.raises(TableProtocolError):
        registration.feed(TableRegister("domain"))


def test_registration_errors() -> None:
    with pytest.raises(TableProtocolError):
        TableRegistration().feed(TableReady())  # no service at all
    with pytest.raises(TableProtocolError):
        TableRegistration().feed(TableResult(TableOp.UPDATE, "1", TableStatus.OK))


@pytest.mark.parametrize(
    "line",
    [
        "table|0.2|1795551091.585944|devs|update|1",
        "table|0.1|1795551091|devs|update|1",
        "table|0.1|1795551091.585944|devs|drop|1",
        "table|0.1|1795551091.585944|devs|lookup|alias|1",
        "table|0.1|1795551091.585944|devs|lookup|nosuch|1|k",
        "table|0.1|1795551091.585944|devs|update",
        "tables|0.1|1795551091.585944|devs|update|1",
    ],
)
def test_bad_requests_on_the_table_side(line: str) -> None:
    with pytest.raises(TableProtocolError):
        decode_table_request(line)


# --- the captured exchange with table-passwd 1.0.2 ------------------------------------


def test_capture_handshake() -> None:
    lines = capture()
    assert [line for who, line in lines if line.startswith("config|")] == encode_config(
        smtpd_version="7.8.0", table_name="devs"
    )
    registration = TableRegistration()
    for who, line in lines:
        if who == "table" and line.startswith("register|"):
            message = decode_table_line(line)
            assert isinstance(message, TableRegister | TableReady)
            assert encode_register(message) == line
            registration.feed(message)
    assert registration.ready
    assert registration.services == SERVICES - {"relayhost", "string", "regex", "auth"}


def test_capture_requests_reencode_identically() -> None:
    requests = [
        line for who, line in capture() if who == "smtpd" and not line.startswith("config|")
    ]
    assert len(requests) == 11
    for line in requests:
        assert encode_request(decode_table_request(line)) == line
    # the key keeps its pipe, update and fetch have no key
    assert decode_table_request(requests[9]).key == "a|b"
    assert decode_table_request(requests[6]) == TableRequest(
        1795551091.586424, "devs", TableOp.UPDATE, "d1db10e1"
    )


def test_capture_replies_match_requests() -> None:
    pending: dict[str, TableOp] = {}
    results: list[TableResult] = []
    for who, line in capture():
        if who == "smtpd" and line.startswith("table|"):
            request = decode_table_request(line)
            pending[request.id] = request.op
        elif who == "table" and not line.startswith("register|"):
            result = decode_table_line(line)
            assert isinstance(result, TableResult)
            assert pending.pop(result.id) is result.op
            assert encode_result(result) == line
            results.append(result)
    assert [r.status for r in results] == [
        TableStatus.FOUND,
        TableStatus.FOUND,
        TableStatus.NOT_FOUND,
        TableStatus.ERROR,
        TableStatus.ERROR,
        TableStatus.ERROR,
        TableStatus.OK,
        TableStatus.FOUND,
        TableStatus.FOUND,
        TableStatus.NOT_FOUND,
    ]
    assert results[1].value == "65534:65534:/var/vmail"
    assert results[0].value is not None and results[0].value.startswith("bob@example.com:$6$")
    # the last request (service auth) got no answer: the table exited
    assert list(pending.values()) == [TableOp.CHECK]
