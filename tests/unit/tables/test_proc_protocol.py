"""Table protocol 0.1 against the capture (table-passwd driven as smtpd 7.6+ drives it):
the SDK answers every captured request byte-for-byte, and ProcTable drives a table that
replays the captured answers, writing the same handshake and well-formed requests."""

from __future__ import annotations

import asyncio
import io
import json
import re
import sys
from pathlib import Path

import pytest

from pigeon.protocol.tableproto import decode_table_request
from pigeon.sdk import Table, TableFailure
from pigeon.tables.base import Service, TableError
from pigeon.tables.proc import ProcCommand, ProcTable

CAPTURE = (
    Path(__file__).parents[2] / "data" / "design" / "transcripts" / "table-line-protocol-0.1.txt"
)
HASH = (
    "$6$abcdefgh12345678$Yd5tts/c7.odSLs/KyYTExCV88lJuDPUQESwL2Ww2qRDn6Kfp/uFX9UfsuuCucPOZ5"
    "/IGBVVtIwY/S.YhZ5vb0"
)


def capture_lines() -> list[tuple[str, str]]:
    """(direction, line) pairs: "smtpd" for lines to the table, "table" for its answers."""
    out = []
    for raw in CAPTURE.read_text().splitlines():
        if raw.startswith("smtpd> "):
            out.append(("smtpd", raw[7:]))
        elif raw.startswith("table< "):
            out.append(("table", raw[7:]))
    return out


def passwd_like_table() -> Table:
    """What table-passwd 1.0.2 does with the capture's data, written with the SDK."""
    table = Table()
    users = {"bob@example.com": f"bob@example.com:{HASH}"}
    info = {"vmail": "65534:65534:/var/vmail"}

    def unsupported(*_args: str) -> None:
        raise TableFailure()

    table.lookup("credentials")(lambda key: users.get(key))
    table.check("credentials")(lambda key: bool(unsupported(key)))
    table.lookup("userinfo")(lambda key: info.get(key))
    for service in ("alias", "domain", "netaddr", "mailaddr", "addrname", "mailaddrmap"):
        table.lookup(service)(lambda key: unsupported(key))
    table.fetch("source")(lambda: unsupported())
    return table


def test_sdk_answers_the_capture_byte_for_byte() -> None:
    lines = capture_lines()
    # The captured table exits on the `auth` service (it does not know it); stop before.
    lines = lines[: next(i for i, (_, line) in enumerate(lines) if "|auth|" in line)]
    requests = "".join(f"{line}\n" for who, line in lines if who == "smtpd")
    expected = "".join(f"{line}\n" for who, line in lines if who == "table")
    out = io.StringIO()
    passwd_like_table().serve(io.StringIO(requests), out)
    assert out.getvalue() == expected


def test_sdk_answers_unknown_service_with_error_instead_of_exiting() -> None:
    table = passwd_like_table()
    request = decode_table_request("table|0.1|1.000000|devs|check|auth|c08399ad|bob:Secret")
    assert table.answer(request).status == "error"


def test_sdk_keeps_unknown_config_keys_and_table_name() -> None:
    table = Table()
    table.lookup("alias")(lambda key: "x")
    handshake = "config|smtpd-version|7.8.0\nconfig|future|1\nconfig|tablename|t\nconfig|ready\n"
    out = io.StringIO()
    table.serve(io.StringIO(handshake), out)
    assert out.getvalue() == "register|alias\nregister|ready\n"
    assert table.name == "t" and table.config["future"] == "1"


REPLAY = r"""
import json, sys
answers = json.loads(sys.argv[1])
received = open(sys.argv[2], "w")
for line in sys.stdin:
    received.write(line); received.flush()
    if line == "config|ready\n":
        break
for service in answers["register"]:
    print("register|" + service)
print("register|ready", flush=True)
for line in sys.stdin:
    received.write(line); received.flush()
    f = line.rstrip("\n").split("|", 7)
    op = f[4]
    if op == "update":
        rid, key = f[5], ""
        answer = answers["update"]
    else:
        service, rid = f[5], f[6]
        key = f[7] if len(f) > 7 else ""
        answer = answers[op + "|" + service + "|" + key]
    print(op + "-result|" + rid + "|" + answer, flush=True)
"""


def replay_answers() -> dict[str, object]:
    """(op|service|key) -> the captured answer (id removed), and the registered services."""
    lines = capture_lines()
    answers: dict[str, object] = {"register": [], "update": "ok"}
    asked: dict[str, str] = {}  # request id -> op|service|key
    for who, line in lines:
        f = line.split("|", 7)
        if who == "smtpd" and line.startswith("table|") and f[4] != "update":
            rid = f[6]
            asked[rid] = f"{f[4]}|{f[5]}|{f[7] if len(f) > 7 else ''}"
        elif who == "table" and "-result|" in line:
            _, rid, answer = line.split("|", 2)
            if rid in asked:
                answers[asked[rid]] = answer
    for who, line in lines:
        if who == "table" and line.startswith("register|") and line != "register|ready":
            answers["register"].append(line[9:])  # type: ignore[union-attr]
    return answers


def test_proc_table_against_replayed_capture(tmp_path: Path) -> None:
    script = tmp_path / "replay.py"
    script.write_text(REPLAY)
    received = tmp_path / "received"
    argv = (sys.executable, str(script), json.dumps(replay_answers()), str(received))
    table = ProcTable("devs", ProcCommand(argv, sys.executable), request_timeout=5)

    async def scenario() -> None:
        try:
            await table.start()
            assert {s.value for s in table.services()} == set(replay_answers()["register"])  # type: ignore[arg-type]
            creds = await table.lookup(Service.CREDENTIALS, "Bob@Example.com")
            assert creds == f"bob@example.com:{HASH}"
            assert await table.lookup(Service.USERINFO, "vmail") == "65534:65534:/var/vmail"
            assert await table.lookup(Service.USERINFO, "nobody") is None
            with pytest.raises(TableError):
                await table.check(Service.CREDENTIALS, "vmail")  # captured: error
            with pytest.raises(TableError):
                await table.fetch(Service.SOURCE)
            await table.update()
            # several requests in flight on one table, matched by id
            both = await asyncio.gather(
                table.lookup(Service.CREDENTIALS, "bob@example.com"),
                table.lookup(Service.USERINFO, "vmail"),
            )
            assert both[1] == "65534:65534:/var/vmail"
            assert await table.lookup(Service.USERINFO, "a|b") is None  # key with "|"
            # not registered by this table: refused without asking it
            with pytest.raises(TableError, match="not registered"):
                await table.check(Service.AUTH, "bob@example.com:secret6")
        finally:
            await table.close()

    asyncio.run(scenario())
    sent = received.read_text().splitlines()
    assert sent[:4] == [
        "config|smtpd-version|7.6.0",
        "config|protocol|0.1",
        "config|tablename|devs",
        "config|ready",
    ]
    request = re.compile(
        r"table\|0\.1\|[0-9]+\.[0-9]{6}\|devs\|"
        r"(update\|[0-9a-f]{8}|(lookup|check)\|[a-z]+\|[0-9a-f]{8}\|.+|fetch\|[a-z]+\|[0-9a-f]{8})"
    )
    assert all(request.fullmatch(line) for line in sent[4:]), sent[4:]
    assert "|auth|" not in received.read_text()
    assert any("|lookup|userinfo|" in line and line.endswith("|a|b") for line in sent)
