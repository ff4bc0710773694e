"""pigeon.sdk.filter over in-memory streams: handshake, protocol version, per-session order,
concurrency across sessions, data-line stuffing, on_message, and handler exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pigeon.protocol import filterproto
from pigeon.protocol.filterproto import Decision as D
from pigeon.protocol.filterproto import FilterVersion
from pigeon.sdk import (
    Decision,
    Filter,
    MessageResult,
    Session,
    disconnect,
    junk,
    proceed,
    reject,
    report,
    rewrite,
)

TS = 1700000000.0
CONFIG_07 = ["config|protocol|0.7", "config|smtpd-version|7.6.0", "config|ready"]
CONFIG_06 = ["config|smtpd-version|6.8.0p2", "config|ready"]


class Collector:
    """A LineWriter keeping every line written."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, data: bytes) -> object:
        self.lines += data.decode().splitlines()
        return None

    async def drain(self) -> None:
        return None


def req(phase: str, session: int = 1, token: int = 9, param: str = "", v: str = "0.7") -> str:
    version: FilterVersion = filterproto.parse_version(v)
    if phase == "connect":
        rdns, _, address = param.partition("|")
        return filterproto.encode_connect_request(version, TS, session, token, rdns, address)
    if phase == "data-line":
        return filterproto.encode_data_line(version, TS, session, token, param)
    return filterproto.encode_filter_request(version, TS, session, token, phase, param)


def rep(event: filterproto.ReportEvent, session: int = 1, v: str = "0.7") -> str:
    return filterproto.encode_report(filterproto.parse_version(v), TS, session, event)


async def _serve(f: Filter, lines: list[str], done: Callable[[list[str]], bool]) -> list[str]:
    """Feed ``lines``, wait (at most 5 s) until ``done(output)``, then close the input."""
    reader = asyncio.StreamReader()
    out = Collector()
    task = asyncio.ensure_future(f.serve(reader, out))
    reader.feed_data("".join(line + "\n" for line in lines).encode())
    for _ in range(500):
        if done(out.lines):
            break
        await asyncio.sleep(0.01)
    reader.feed_eof()
    await asyncio.wait_for(task, 5)
    return out.lines


def serve(
    f: Filter,
    lines: list[str],
    results: int,
    *,
    config: list[str] = CONFIG_07,
) -> list[str]:
    """Run ``f`` on the handshake plus ``lines`` until ``results`` answers (result lines or
    data lines) came back; return the answers, registration lines excluded."""

    def enough(out: list[str]) -> bool:
        return len([x for x in out if x.startswith("filter-")]) >= results

    out = asyncio.run(_serve(f, config + lines, enough))
    return [x for x in out if x.startswith("filter-")]


def results(lines: list[str], version: FilterVersion = "0.7") -> list[filterproto.FilterResult]:
    out = []
    for line in lines:
        message = filterproto.decode_filter_line(line, version)
        if isinstance(message, filterproto.FilterResult):
            out.append(message)
    return out


# -- handshake and registration ------------------------------------------------------


def test_handshake_registers_after_config_ready_and_ends_with_ready() -> None:
    f = Filter("t")

    @f.on_filter("mail-from")
    def check(session: Session, param: str) -> Decision:
        return proceed()

    @f.on_report("protocol-client")
    def seen(session: Session, event: filterproto.ReportLine) -> None:
        pass

    out = asyncio.run(_serve(f, CONFIG_07, lambda o: "register|ready" in o))
    assert out[-1] == "register|ready"
    assert "register|filter|smtp-in|mail-from" in out
    assert "register|report|smtp-in|protocol-client" in out
    assert "register|report|smtp-in|link-connect" in out  # the SDK's own state events
    assert "register|filter|smtp-in|data-line" not in out  # no on_message handler
    assert f.config["smtpd-version"] == "7.6.0"


def test_on_message_registers_data_line_and_commit() -> None:
    f = Filter("t")
    f.on_message(lambda session, lines: None)
    lines = f.registration_lines()
    assert "register|filter|smtp-in|data-line" in lines
    assert "register|filter|smtp-in|commit" in lines


@pytest.mark.parametrize("phase", ["data-line", "commit", "nonsense"])
def test_on_filter_refuses_phases_the_sdk_drives(phase: str) -> None:
    with pytest.raises(ValueError):
        Filter("t").on_filter(phase)


def test_unknown_report_event_is_refused() -> None:
    with pytest.raises(ValueError):
        Filter("t").on_report("link-nonsense")


# -- protocol version ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"protocol": "0.7", "smtpd-version": "7.6.0"}, "0.7"),
        ({"smtpd-version": "6.8.0p2"}, "0.6"),
        ({"smtpd-version": "7.3.0"}, "0.7"),
        ({}, None),
    ],
)
def test_version_detection(config: dict[str, str], expected: str | None) -> None:
    f = Filter("t")
    f.config.update(config)
    assert f.protocol == expected


def test_forced_protocol_wins() -> None:
    f = Filter("t", protocol="0.5")
    f.config["protocol"] = "0.7"
    assert f.protocol == "0.5"


def test_answers_use_the_04_field_order_when_smtpd_speaks_04() -> None:
    f = Filter("t")
    f.on_filter("helo")(lambda session, param: proceed())
    out = serve(
        f, [req("helo", session=0xAB, token=0xCD, param="x", v="0.4")], 1, config=["config|ready"]
    )
    assert out == ["filter-result|00000000000000cd|00000000000000ab|proceed"]


def test_report_decision_becomes_proceed_before_07() -> None:
    f = Filter("t")
    f.on_filter("helo")(lambda session, param: report("noted"))
    assert results(serve(f, [req("helo", v="0.6")], 1, config=CONFIG_06), "0.6")[0].decision == (
        D.PROCEED
    )
    f2 = Filter("t")
    f2.on_filter("helo")(lambda session, param: report("noted"))
    result = results(serve(f2, [req("helo")], 1))[0]
    assert (result.decision, result.param) == (D.REPORT, "noted")


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (proceed(), "proceed"),
        (junk(), "junk"),
        (reject("550 5.7.1 no"), "reject|550 5.7.1 no"),
        (disconnect("421 4.7.0 bye"), "disconnect|421 4.7.0 bye"),
        (rewrite("<new@x.test>"), "rewrite|<new@x.test>"),
    ],
)
def test_decisions_on_the_wire(decision: Decision, expected: str) -> None:
    f = Filter("t")
    f.on_filter("rcpt-to")(lambda session, param: decision)
    out = serve(f, [req("rcpt-to", session=1, token=2, param="r@x.test")], 1)
    assert out == [f"filter-result|0000000000000001|0000000000000002|{expected}"]


# -- sessions ------------------------------------------------------------------------


def test_session_state_follows_report_events() -> None:
    f = Filter("t")
    seen: list[tuple[str | None, str | None, list[str]]] = []

    @f.on_filter("data")
    def check(session: Session, param: str) -> Decision:
        seen.append((session.helo, session.mail_from, list(session.rcpt_to)))
        return proceed()

    lines = [
        rep(filterproto.LinkConnect("mx.c.test", "pass", "192.0.2.1:4000", "192.0.2.2:25")),
        rep(filterproto.LinkIdentify("EHLO", "c.test")),
        rep(filterproto.TxBegin(5)),
        rep(filterproto.TxMail(5, "ok", "a@c.test")),
        rep(filterproto.TxRcpt(5, "ok", "b@d.test")),
        rep(filterproto.TxRcpt(5, "permfail", "nobody@d.test")),
        req("data"),
    ]
    serve(f, lines, 1)
    assert seen == [("c.test", "a@c.test", ["b@d.test"])]


def test_one_session_is_answered_in_order_while_others_run_concurrently() -> None:
    f = Filter("t")
    release = asyncio.Event()

    @f.on_filter("mail-from")
    async def slow(session: Session, param: str) -> Decision:
        if param == "slow@x.test":
            await release.wait()
        return proceed()

    @f.on_filter("rcpt-to")
    def fast(session: Session, param: str) -> Decision:
        if session.id == 2:
            release.set()  # session 2 got an answer while session 1 still waits
        return proceed()

    lines = [
        req("mail-from", session=1, token=1, param="slow@x.test"),
        req("rcpt-to", session=1, token=2, param="r@x.test"),  # must wait for token 1
        req("rcpt-to", session=2, token=3, param="r@x.test"),
    ]
    out = results(serve(f, lines, 3))
    order = [(r.session, r.token) for r in out]
    assert order.index((2, 3)) < order.index((1, 1)) < order.index((1, 2))


# -- data lines and on_message --------------------------------------------------------


def message_filter(handler: Callable[[Session, list[str]], object]) -> Filter:
    f = Filter("t")
    f.on_message(handler)  # type: ignore[arg-type]
    return f


def data(lines: list[str], session: int = 1) -> list[str]:
    return [req("data-line", session=session, token=4, param=x) for x in [*lines, "."]]


def datalines(out: list[str]) -> list[str]:
    return [x.split("|", 3)[3] for x in out if x.startswith("filter-dataline|")]


def test_message_lines_are_unstuffed_for_the_handler_and_restuffed_after() -> None:
    got: list[list[str]] = []

    def handler(session: Session, lines: list[str]) -> MessageResult:
        got.append(lines)
        return MessageResult(lines=[*lines, ".added"])

    out = serve(message_filter(handler), data(["Subject: s", "", "..dot", "x|y"]), 6)
    assert got == [["Subject: s", "", ".dot", "x|y"]]
    assert datalines(out) == ["Subject: s", "", "..dot", "x|y", "..added", "."]


def test_no_message_handler_result_echoes_the_message() -> None:
    out = serve(message_filter(lambda s, lines: None), data(["a", "..b"]), 3)
    assert datalines(out) == ["a", "..b", "."]


def test_message_decision_is_answered_at_commit() -> None:
    f = message_filter(lambda s, lines: MessageResult(decision=reject("554 5.7.1 bad body")))
    out = serve(f, [*data(["x"]), req("commit", token=5)], 3)
    result = results(out)[-1]
    assert (result.decision, result.param) == (D.REJECT, "554 5.7.1 bad body")


def test_message_junk_prepends_x_spam_and_commit_proceeds() -> None:
    f = message_filter(lambda s, lines: MessageResult(decision=junk()))
    out = serve(f, [*data(["Subject: s"]), req("commit", token=5)], 4)
    assert datalines(out) == ["X-Spam: yes", "Subject: s", "."]
    assert results(out)[-1].decision is D.PROCEED


def test_aborted_message_leaves_no_pending_decision() -> None:
    f = message_filter(lambda s, lines: MessageResult(decision=reject("554 5.7.1 bad")))
    lines = [
        *data(["x"]),
        rep(filterproto.TxRollback(5)),
        rep(filterproto.TxReset(5)),
        req("commit", token=6),
    ]
    out = serve(f, lines, 3)
    assert results(out)[-1].decision is D.PROCEED


# -- exceptions ----------------------------------------------------------------------


def boom(session: Session, param: str) -> Decision:
    raise RuntimeError("handler bug")


def test_handler_exception_proceeds_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    f = Filter("t")
    f.on_filter("helo")(boom)
    assert results(serve(f, [req("helo")], 1))[0].decision is D.PROCEED
    assert "handler bug" in capsys.readouterr().err


def test_handler_exception_tempfails_when_asked() -> None:
    f = Filter("t", fail="tempfail")
    f.on_filter("helo")(boom)
    result = results(serve(f, [req("helo")], 1))[0]
    assert result.decision is D.REJECT and (result.param or "").startswith("451 ")


def test_message_handler_exception_keeps_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(session: Session, lines: list[str]) -> MessageResult:
        raise ValueError("oops")

    f = Filter("t", fail="tempfail")
    f.on_message(broken)
    out = serve(f, [*data(["x"]), req("commit", token=5)], 3)
    assert datalines(out) == ["x", "."]
    assert results(out)[-1].decision is D.REJECT
    assert "oops" in capsys.readouterr().err


def test_report_handler_exception_does_not_stop_the_session() -> None:
    f = Filter("t")

    @f.on_report("link-identify")
    def broken(session: Session, event: filterproto.ReportLine) -> None:
        raise RuntimeError("report bug")

    f.on_filter("mail-from")(lambda session, param: reject("550 5.7.1 " + (session.helo or "")))
    lines = [rep(filterproto.LinkIdentify("EHLO", "c.test")), req("mail-from", param="a@b.c")]
    assert results(serve(f, lines, 1))[0].param == "550 5.7.1 c.test"


def test_garbage_lines_are_ignored() -> None:
    f = Filter("t")
    f.on_filter("helo")(lambda session, param: proceed())
    assert len(serve(f, ["this is not the protocol", req("helo")], 1)) == 1
