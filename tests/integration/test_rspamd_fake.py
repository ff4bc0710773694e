"""The rspamd client against a fake rspamd serving the captured replies of every branch real
rspamd cannot be made to take on demand (soft reject, greylist, milter headers, DKIM lists,
broken JSON, timeouts), over TCP and a unix socket, alone and behind the SDK filter."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from harness import free_port
from rspamdserver import FakeRspamd, canned_replies

from pigeon.filters.rspamd import (
    OnError,
    RspamdScanner,
    RspamdSettings,
    ScanContext,
    ScanOutcome,
    Verdict,
)
from pigeon.filters.rspamd_builtin import RspamdInProcess, settings_from_words
from pigeon.filters.rspamd_cli import build_filter
from pigeon.protocol import filterproto

CANNED = canned_replies()
T = TypeVar("T")

MESSAGE = [
    "Received: from client.example.test (localhost [127.0.0.1])",
    "\tby mx.example.test (Pigeon) with ESMTP id 26ea5f3a",
    "From: Alice <alice@example.test>",
    "To: bob@example.test",
    "Subject: fake",
    "X-Spam: bogus-preexisting",
    "X-Remove-Me: first",
    "X-Remove-Me: second",
    "  folded continuation",
    "",
    "Body with ünïcode",
    ".leading dot line",
    "",
]
CTX = ScanContext(
    ip="127.0.0.1",
    hostname="localhost",
    helo="client.example.test",
    mail_from="alice@example.test",
    rcpts=("bob@example.test", "carol@example.test"),
    queue_id="26ea5f3a",
    mta_name="mx.example.test",
    session_id="2208bd2b321fb7da",
)


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


def scan_with(
    fake: FakeRspamd, settings: RspamdSettings | None = None, ctx: ScanContext = CTX
) -> tuple[ScanOutcome, FakeRspamd, RspamdScanner]:
    async def go() -> tuple[ScanOutcome, FakeRspamd, RspamdScanner]:
        async with fake:
            base = settings or RspamdSettings()
            scanner = RspamdScanner(
                RspamdSettings(**{**base.__dict__, "url": fake.url})  # type: ignore[arg-type]
            )
            return await scanner.scan(ctx, MESSAGE), fake, scanner

    return run(go())


def test_request_streams_the_message_with_the_spec_headers() -> None:
    outcome, fake, _ = scan_with(FakeRspamd(), RspamdSettings(settings_id="inbound"))
    assert outcome.verdict is Verdict.ACCEPT
    [request] = fake.requests
    assert (request.method, request.target) == ("POST", "/checkv2")
    assert request.body == ("\r\n".join(MESSAGE) + "\r\n").encode()
    assert request.header("Rcpt") == ["bob@example.test", "carol@example.test"]
    assert request.header("MTA-Name") == ["mx.example.test"]
    assert request.header("Queue-Id") == ["26ea5f3a"]
    assert request.header("Settings-ID") == ["inbound"]
    assert request.header("User") == []  # not authenticated


def test_soft_reject_tempfails_with_rspamds_message() -> None:
    outcome, _, scanner = scan_with(FakeRspamd(CANNED["fake-soft-reject"]))
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reply == "451 Try again later, you are greylisted"
    assert scanner.metrics["action:soft reject"] == 1


def test_reject_with_message() -> None:
    outcome, _, scanner = scan_with(FakeRspamd(CANNED["fake-reject-msg"]))
    assert outcome.reply == "550 5.7.1 Spam message rejected; see https://example.test/why"
    assert outcome.lines == MESSAGE
    assert scanner.metrics["verdict:reject"] == 1


@pytest.mark.parametrize(
    ("greylist", "reply"),
    [(Verdict.ACCEPT, None), (Verdict.TEMPFAIL, "451 Try again later")],
)
def test_greylist_is_configurable(greylist: Verdict, reply: str | None) -> None:
    settings = RspamdSettings(actions={"greylist": greylist})
    outcome, _, _ = scan_with(FakeRspamd(CANNED["fake-greylist"]), settings)
    assert (outcome.verdict, outcome.reply) == (greylist, reply)


def test_add_header_with_milter_edits_over_a_unix_socket() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "rspamd.sock")
        outcome, fake, _ = scan_with(FakeRspamd(CANNED["fake-add-header"], unix_path=path))
    assert len(fake.requests) == 1
    head = outcome.lines[: outcome.lines.index("")]
    assert outcome.verdict is Verdict.JUNK and outcome.reply is None
    assert "X-Spam: yes" in head and "X-Spam-Score: 9.55 / 15" in head
    assert "X-Spamd-Bar: +++++++++" in head
    assert "Authentication-Results: mx.example.test;" in head
    assert "X-Spam: bogus-preexisting" not in head
    assert "X-Remove-Me: first" not in head and "X-Remove-Me: second" in head
    assert not any("\r" in line for line in outcome.lines)


def test_dkim_list_and_chunked_reply() -> None:
    outcome, _, _ = scan_with(FakeRspamd(CANNED["fake-dkim-list"], chunked=True))
    assert [line for line in outcome.lines if line.startswith("DKIM-Signature:")] == [
        "DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; b=SIG1=",
        "DKIM-Signature: v=1; a=ed25519-sha256; d=example.test; s=ed; b=SIG2=",
    ]


def test_authenticated_sender_is_signed_but_not_judged() -> None:
    ctx = ScanContext(**{**CTX.__dict__, "user": "alice"})  # type: ignore[arg-type]
    reply = (200, CANNED["fake-dkim-string"][1].replace(b'"no action"', b'"reject"'))
    outcome, fake, _ = scan_with(FakeRspamd(reply), ctx=ctx)
    assert fake.requests[0].header("User") == ["alice"]
    assert outcome.verdict is Verdict.ACCEPT
    assert outcome.lines[0].startswith("DKIM-Signature: v=1; a=rsa-sha256")
    assert not any(line.startswith(("X-Spam-Score", "X-Spam: yes")) for line in outcome.lines)


@pytest.mark.parametrize(
    ("policy", "verdict", "reply", "header"),
    [
        (OnError.TEMPFAIL, Verdict.TEMPFAIL, "451 4.7.1 Spam scanner unavailable", None),
        (OnError.ACCEPT, Verdict.ACCEPT, None, None),
        (OnError.ACCEPT_WITH_HEADER, Verdict.ACCEPT, None, "X-Spam-Scan: failed (HTTP 500"),
    ],
)
def test_broken_json_follows_the_error_policy(
    policy: OnError, verdict: Verdict, reply: str | None, header: str | None
) -> None:
    outcome, _, scanner = scan_with(
        FakeRspamd(CANNED["fake-badjson"]), RspamdSettings(on_error=policy)
    )
    assert outcome.verdict is verdict
    assert (outcome.reply or "").startswith(reply or "")
    assert outcome.action == "error" and scanner.metrics["errors"] == 1
    if header is None:
        assert outcome.lines == MESSAGE
    else:
        assert outcome.lines[0].startswith(header) and outcome.lines[1:] == MESSAGE


def test_garbage_with_status_200_tempfails() -> None:
    outcome, _, _ = scan_with(FakeRspamd((200, b"{not json")))
    assert outcome.verdict is Verdict.TEMPFAIL and outcome.error is not None
    assert "invalid JSON" in outcome.error


def test_rspamd_closing_without_an_answer_tempfails() -> None:
    outcome, _, _ = scan_with(FakeRspamd(close_early=True))
    assert outcome.verdict is Verdict.TEMPFAIL


def test_slow_rspamd_hits_the_scan_timeout() -> None:
    settings = RspamdSettings(scan_timeout=0.3)
    outcome, _, _ = scan_with(FakeRspamd(delay=5), settings)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.error == "scan timeout (0.3s)"
    assert outcome.elapsed < 3


def test_rspamd_down_tempfails_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    scanner = RspamdScanner(RspamdSettings(url=f"http://127.0.0.1:{free_port()}"))
    with caplog.at_level(logging.INFO, logger="pigeon.filters.rspamd"):
        outcome = run(scanner.scan(CTX, MESSAGE))
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reply is not None and outcome.reply.startswith("451 ")
    assert "cannot connect" in (outcome.error or "")
    [record] = [r for r in caplog.records if r.name == "pigeon.filters.rspamd"]
    assert "action='error'" in record.getMessage() and "queue-id=26ea5f3a" in record.getMessage()


def test_unreachable_unix_socket_accepts_when_told() -> None:
    settings = RspamdSettings(url="/nonexistent/rspamd.sock", on_error=OnError.ACCEPT)
    outcome = run(RspamdScanner(settings).scan(CTX, MESSAGE))
    assert (outcome.verdict, outcome.lines) == (Verdict.ACCEPT, MESSAGE)


# -- behind the SDK, as pigeon-filter-rspamd runs -------------------------------------------

SID = "2208bd2b321fb7da"
TOKEN = "efb606a5ea4f6822"


def _protocol_input(auth_user: str | None = None) -> list[str]:
    lines = [
        "config|smtpd-version|6.8.0p2",
        "config|subsystem|smtp-in",
        "config|ready",
        f"report|0.6|1795551078.994994|smtp-in|link-connect|{SID}|localhost|pass|"
        "127.0.0.1:52512|127.0.0.1:11425",
        f"report|0.6|1795551078.995238|smtp-in|link-greeting|{SID}|mx.example.test",
        f"report|0.6|1795551078.995622|smtp-in|link-identify|{SID}|EHLO|client.example.test",
    ]
    if auth_user is not None:
        lines.append(f"report|0.6|1795551078.995700|smtp-in|link-auth|{SID}|{auth_user}|pass")
    lines += [
        f"report|0.6|1795551078.996313|smtp-in|tx-begin|{SID}|26ea5f3a",
        f"report|0.6|1795551078.996315|smtp-in|tx-mail|{SID}|26ea5f3a|ok|alice@example.test",
        f"report|0.6|1795551078.997291|smtp-in|tx-rcpt|{SID}|26ea5f3a|ok|bob@example.test",
    ]
    stuffed = ["..leading dot line" if line.startswith(".") else line for line in MESSAGE]
    for line in [*stuffed, "."]:
        lines.append(f"filter|0.6|1795551078.998125|smtp-in|data-line|{SID}|{TOKEN}|{line}")
    lines.append(f"filter|0.6|1795551079.000701|smtp-in|commit|{SID}|efb606a60b246f4b|")
    return lines


class _Collect:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, data: bytes) -> object:
        self.lines += data.decode().splitlines()
        return None

    async def drain(self) -> None:
        return None


def _run_filter(
    reply: tuple[int, bytes], auth_user: str | None = None
) -> tuple[list[str], FakeRspamd]:
    async def go() -> tuple[list[str], FakeRspamd]:
        async with FakeRspamd(reply) as fake:
            f = build_filter(RspamdScanner(RspamdSettings(url=fake.url)))
            reader = asyncio.StreamReader()
            reader.feed_data("".join(f"{x}\n" for x in _protocol_input(auth_user)).encode())
            out = _Collect()
            serving = asyncio.ensure_future(f.serve(reader, out))
            for _ in range(500):  # until the commit is answered (serve cancels at EOF)
                if any(x.startswith("filter-result|") for x in out.lines):
                    break
                await asyncio.sleep(0.01)
            reader.feed_eof()
            await serving
            return out.lines, fake

    return run(go())


def test_sdk_filter_rejects_at_commit_with_rspamds_reply() -> None:
    out, fake = _run_filter(CANNED["fake-reject-msg"])
    assert fake.requests[0].header("MTA-Name") == ["mx.example.test"]
    assert out[-1] == (
        f"filter-result|{SID}|efb606a60b246f4b|reject|"
        "550 5.7.1 Spam message rejected; see https://example.test/why"
    )
    datalines = [x.split("|", 3)[3] for x in out if x.startswith("filter-dataline|")]
    assert datalines[-1] == "." and "..leading dot line" in datalines


def test_sdk_filter_streams_edited_message_and_survives_a_pipe_in_the_user() -> None:
    out, fake = _run_filter(CANNED["fake-add-header"], auth_user="VBA|spil")
    assert fake.requests[0].header("User") == ["VBA|spil"]
    assert out[-1] == f"filter-result|{SID}|efb606a60b246f4b|proceed"
    datalines = [x.split("|", 3)[3] for x in out if x.startswith("filter-dataline|")]
    # authenticated: no junk mark, but rspamd's milter edits apply
    assert "X-Spam: yes" not in datalines
    assert "X-Spamd-Bar: +++++++++" in datalines
    assert "..leading dot line" in datalines and datalines[-1] == "."


# -- in-process (the smtpd.conf form), driven the way a filter chain drives a proc ----------


def _drive_in_process(reply: tuple[int, bytes]) -> tuple[list[str], object, FakeRspamd]:
    async def go() -> tuple[list[str], object, FakeRspamd]:
        async with FakeRspamd(reply) as fake:
            proc = RspamdInProcess("rspamd", settings_from_words(["url", fake.url]))
            sid = 0x2208BD2B321FB7DA
            proc.open_session(sid)
            for event in (
                filterproto.LinkConnect("localhost", "pass", "127.0.0.1:52512", "127.0.0.1:25"),
                filterproto.LinkGreeting("mx.example.test"),
                filterproto.LinkIdentify("EHLO", "client.example.test"),
                filterproto.TxBegin(0x26EA5F3A),
                filterproto.TxMail(0x26EA5F3A, "ok", "alice@example.test"),
                filterproto.TxRcpt(0x26EA5F3A, "ok", "bob@example.test"),
            ):
                assert proc.wants_report(event.name)
                proc.report(0.0, sid, event)
            stuffed = [filterproto.dot_stuff(line) for line in MESSAGE]
            out = await proc.data_lines(sid, stuffed)
            result = await proc.request(sid, "commit", "")
            proc.close_session(sid)
            return out, result, fake

    return run(go())


def test_in_process_filter_rejects_at_commit() -> None:
    out, result, fake = _drive_in_process(CANNED["fake-reject-msg"])
    assert fake.requests[0].header("Queue-Id") == ["26ea5f3a"]
    assert fake.requests[0].header("MTA-Name") == ["mx.example.test"]
    assert result == filterproto.FilterResult(
        0x2208BD2B321FB7DA,
        0,
        filterproto.Decision.REJECT,
        "550 5.7.1 Spam message rejected; see https://example.test/why",
    )
    assert "..leading dot line" in out


def test_in_process_filter_edits_and_proceeds() -> None:
    out, result, _ = _drive_in_process(CANNED["fake-add-header"])
    assert isinstance(result, filterproto.FilterResult)
    assert result.decision is filterproto.Decision.PROCEED
    assert "X-Spam: yes" in out and "X-Spamd-Bar: +++++++++" in out
    assert "..leading dot line" in out
