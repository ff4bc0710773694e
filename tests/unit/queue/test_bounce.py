"""DSN messages parse back as RFC 3464 reports with the right fields."""

from __future__ import annotations

import email
import email.policy

from pigeon.queue.bounce import BounceItem, build_report, status_code, wants_report
from pigeon.queue.envelope import DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope, new_evpid

ORIGINAL = b"From: alice@example.test\r\nSubject: the original\r\n\r\nbody line\r\n"


def env(**kw: object) -> Envelope:
    base: dict[str, object] = dict(
        evpid=new_evpid(0xCAFE0001),
        dispatcher="relay",
        type="mta",
        sender="alice@example.test",
        rcpt="bob@remote.test",
        dest="bob@remote.test",
        ctime=1_800_000_000,
    )
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_failed_report_fields() -> None:
    e = env(dsn_orcpt="rfc822;orig@remote.test", dsn_envid="ENV-42", last_try=1_800_000_100)
    rcpt, raw = build_report(
        "failed", [BounceItem(e, "550 5.1.1 No such user here")], ORIGINAL, hostname="mx.test"
    )
    assert rcpt == "alice@example.test"
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Delivery status notification: failed"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    report = raw.decode()
    assert "Reporting-MTA: dns; mx.test" in report
    assert "Original-Envelope-Id: ENV-42" in report
    assert "Original-Recipient: rfc822;orig@remote.test" in report
    assert "Final-Recipient: rfc822; bob@remote.test" in report
    assert "Action: failed" in report
    assert "Status: 5.1.1" in report  # the remote's own enhanced code
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in report
    assert "body line" in report  # RET default: the whole message


def test_ret_hdrs_attaches_headers_only() -> None:
    e = env(dsn_ret="HDRS")
    _, raw = build_report("failed", [BounceItem(e, "550 no")], ORIGINAL, hostname="mx.test")
    parts = list(parse(raw).iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"body line" not in raw
    assert b"Subject: the original" in raw


def test_delayed_report_says_delayed_with_retry_until() -> None:
    e = env()
    _, raw = build_report(
        "delayed",
        [BounceItem(e, "451 4.3.0 Try again later")],
        ORIGINAL,
        hostname="mx.test",
        now=1_800_014_400,
        expires_at=1_800_345_600,
    )
    text = raw.decode()
    assert "Action: delayed" in text
    assert "Status: 4.3.0" in text
    assert "Will-Retry-Until:" in text
    assert "You DO NOT NEED to re-send" in text


def test_status_code_defaults() -> None:
    assert status_code("Error (permanent failure)", "failed") == "5.0.0"
    assert status_code("451 temporary", "failed") == "4.0.0"
    assert status_code("anything", "delivered") == "2.0.0"


def test_who_gets_a_report() -> None:
    assert not wants_report(env(sender=""), "failed")  # no bounce for a bounce
    assert not wants_report(env(dsn_notify=DSN_NEVER), "failed")
    assert wants_report(env(), "failed")
    assert wants_report(env(), "delayed")
    assert not wants_report(env(), "delivered")
    assert wants_report(env(dsn_notify=DSN_SUCCESS), "delivered")
    assert not wants_report(env(dsn_notify=DSN_FAILURE), "delayed")
