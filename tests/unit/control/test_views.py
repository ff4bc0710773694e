"""What admins see: smtpctl's `show queue` field order and `monitor` rows."""

from __future__ import annotations

from pigeon.control.server import MONITOR_HEADER, monitor_line
from pigeon.control.views import queue_row, render_queue_line
from pigeon.queue.envelope import Envelope


def envelope(**kw: object) -> Envelope:
    base: dict[str, object] = {
        "evpid": 0x0CDDAE5A6E2824DA,
        "dispatcher": "tosink",
        "type": "mta",
        "sender": "bob@example.test",
        "rcpt": "dave@sink.test",
        "dest": "dave@sink.test",
        "ctime": 1795551398,
        "sockaddr": "127.0.0.1",
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_queue_line_has_smtpctls_fourteen_fields_in_order() -> None:
    row = queue_row(
        envelope(retry=2, last_try=1795551399, errorline="451 4.3.0 Try again later"),
        runstate="pending",
        delay=1319,
        queue_ttl=600,
        paused=False,
    )
    assert render_queue_line(row) == (
        "0cddae5a6e2824da|inet4|mta||bob@example.test|dave@sink.test|dave@sink.test|"
        "1795551398|1795551998|1795551399|2|pending|1319|451 4.3.0 Try again later"
    )


def test_suspended_envelope_shows_the_suspend_flag_and_offline_has_no_delay() -> None:
    row = queue_row(envelope(), runstate="offline", delay=None, queue_ttl=600, paused=True)
    fields = render_queue_line(row).split("|")
    assert len(fields) == 14
    assert fields[3] == "suspend"
    assert fields[11:13] == ["offline", ""]


def test_local_submission_family() -> None:
    row = queue_row(envelope(sockaddr="local"), runstate="pending", delay=0, queue_ttl=600)
    assert row["family"] == "local"


def test_monitor_rows_are_totals_first_then_increments() -> None:
    assert MONITOR_HEADER.splitlines()[1].split() == [
        "curr", "conn", "disc", "curr", "enq", "deq", "ok", "tmpfail", "prmfail",
        "loop", "expire", "remove", "bounce",
    ]  # fmt: skip
    first = dict.fromkeys(
        ["curr", "conn", "disc", "envcurr", "enq", "deq", "ok", "tmpfail", "prmfail", "loop",
         "expire", "remove", "bounce"], 0,
    )  # fmt: skip
    first.update(curr=0, conn=10, disc=10, envcurr=2, enq=14, deq=12, ok=11, tmpfail=1,
                 prmfail=1, bounce=2)  # fmt: skip
    line = monitor_line(first, {})
    assert line == "   0   10   10     2   14   12   11       1       1    0      0      0      2\n"
    second = dict(first, conn=11, disc=11, enq=16, deq=14, ok=13)
    assert monitor_line(second, first).split() == [
        "0", "1", "1", "2", "2", "2", "2", "0", "0", "0", "0", "0", "0",
    ]  # fmt: skip
