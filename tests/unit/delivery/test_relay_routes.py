"""Pure parts of remote delivery: relay URLs, TLS plans, routes, parameters, outcomes."""

from __future__ import annotations

from typing import Any

import pytest

from pigeon.config.model import Action
from pigeon.delivery.lmtp import parse_destination
from pigeon.delivery.relay import mail_params, notify_param, outcome_for, rcpt_params, reply_line
from pigeon.delivery.routes import (
    RelayRoute,
    RelayURL,
    TLSPlan,
    parse_credentials,
    parse_relay_url,
    route_for,
    tls_plan,
)
from pigeon.protocol.client import Extensions
from pigeon.protocol.replies import Reply
from pigeon.queue.envelope import DSN_DELAY, DSN_FAILURE, DSN_NEVER, DSN_SUCCESS, Envelope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp://mx.example.org", RelayURL("smtp", "mx.example.org", 25)),
        ("mx.example.org", RelayURL("smtp", "mx.example.org", 25)),
        (
            "smtp+tls://bob@smtp.example.org:587",
            RelayURL("smtp+tls", "smtp.example.org", 587, "bob"),
        ),
        ("smtp+notls://10.0.0.1:2525", RelayURL("smtp+notls", "10.0.0.1", 2525)),
        ("smtps://label@mail.example.org", RelayURL("smtps", "mail.example.org", 465, "label")),
        ("lmtp://127.0.0.1:24", RelayURL("lmtp", "127.0.0.1", 24)),
        ("SMTP://[::1]:2525", RelayURL("smtp", "::1", 2525)),
        ("smtp://[IPv6:2001:db8::1]", RelayURL("smtp", "2001:db8::1", 25)),
        ("smtp://mx.example.org:25/", RelayURL("smtp", "mx.example.org", 25)),
    ],
)
def test_relay_urls(text: str, expected: RelayURL) -> None:
    assert parse_relay_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "gopher://mx.example.org",
        "smtp://",
        "smtp://@mx.example.org",
        "smtp://mx.example.org:0",
        "smtp://mx.example.org:99999",
        "smtp://mx.example.org:abc",
        "smtp://2001:db8::1",
        "smtp://[2001:db8::1",
        "smtp://[not-an-ip]:25",
    ],
)
def test_bad_relay_urls(text: str) -> None:
    with pytest.raises(ValueError):
        parse_relay_url(text)


@pytest.mark.parametrize(
    ("scheme", "tls", "plan"),
    [
        (None, "opportunistic", TLSPlan("opportunistic", False)),
        (None, "required", TLSPlan("starttls", True)),
        (None, "no-verify", TLSPlan("starttls", False)),
        (None, "none", TLSPlan("none", False)),
        ("smtp", "opportunistic", TLSPlan("opportunistic", False)),
        ("smtp", "required", TLSPlan("starttls", True)),
        ("smtp+tls", "opportunistic", TLSPlan("starttls", True)),
        ("smtp+tls", "no-verify", TLSPlan("starttls", False)),
        ("smtps", "opportunistic", TLSPlan("smtps", True)),
        ("smtps", "no-verify", TLSPlan("smtps", False)),
        ("smtp+notls", "opportunistic", TLSPlan("none", False)),
        ("lmtp", "opportunistic", TLSPlan("none", False)),
    ],
)
def test_tls_plans(scheme: object, tls: object, plan: TLSPlan) -> None:
    assert tls_plan(scheme, tls) == plan  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["smtp+notls", "lmtp"])
def test_mandatory_tls_conflicts_with_plain_schemes(scheme: object) -> None:
    with pytest.raises(ValueError):
        tls_plan(scheme, "required")  # type: ignore[arg-type]


def test_route_for_takes_the_action_options() -> None:
    action = Action(
        name="out",
        method="relay",
        tls="no-verify",
        helo="mx.example.org",
        mail_from="bounces@example.org",
        backup=True,
        backup_mx="mx2.example.org",
    )

    route = route_for(
        action, smarthost="smtp+tls://bob@smtp.example.org", credentials=("bob", "pw")
    )

    assert route == RelayRoute(
        smarthost="smtp+tls://bob@smtp.example.org",
        tls="no-verify",
        auth=("bob", "pw"),
        helo="mx.example.org",
        mail_from="bounces@example.org",
        backup=True,
        backup_mx="mx2.example.org",
    )


def test_credentials() -> None:
    assert parse_credentials("bob:se:cret") == ("bob", "se:cret")
    with pytest.raises(ValueError):
        parse_credentials("no-colon")


@pytest.mark.parametrize(
    ("bits", "value"),
    [
        (0, None),
        (DSN_SUCCESS, "SUCCESS"),
        (DSN_FAILURE | DSN_SUCCESS, "SUCCESS,FAILURE"),
        (DSN_DELAY | DSN_FAILURE, "FAILURE,DELAY"),
        (DSN_NEVER, "NEVER"),
    ],
)
def test_notify_rendering(bits: int, value: str | None) -> None:
    assert notify_param(bits) == value


def envelope(**kw: Any) -> Envelope:
    return Envelope(
        evpid=1, dispatcher="out", type="mta", sender="a@x", rcpt="b@y", dest="b@y", ctime=0, **kw
    )


def test_rcpt_params_pass_dsn_on() -> None:
    env = envelope(dsn_notify=DSN_SUCCESS | DSN_FAILURE, dsn_orcpt="rfc822;orig+b@y")
    assert rcpt_params(env) == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;orig+b@y"}
    assert rcpt_params(envelope(dsn_orcpt="b@y")) == {"ORCPT": "rfc822;b@y"}
    assert rcpt_params(envelope()) == {}


def test_mail_params() -> None:
    env = envelope(dsn_ret="hdrs", dsn_envid="QQ42")
    utf8 = Extensions({"SMTPUTF8": ""})

    assert mail_params(env, b"abc", ["a@x"], Extensions()) == {
        "RET": "HDRS",
        "ENVID": "QQ42",
        "SIZE": "3",
    }
    assert mail_params(envelope(), "é".encode(), ["jörg@x"], utf8) == {
        "SIZE": "2",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }


def test_outcomes_from_replies() -> None:
    assert outcome_for(Reply(250, "Ok", "2.0.0")).status == "ok"
    assert outcome_for(Reply(451, "later", "4.3.0")).status == "tempfail"
    assert outcome_for(Reply(550, "No such user", "5.1.1")).line == "550 5.1.1 No such user"
    assert reply_line(Reply(554, "line one\nline two")) == "554 line one line two"


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("/var/run/dovecot/lmtp", "/var/run/dovecot/lmtp"),
        ("127.0.0.1:24", ("127.0.0.1", 24)),
        ("lmtp.example.org", ("lmtp.example.org", 24)),
        ("[::1]:2424", ("::1", 2424)),
    ],
)
def test_lmtp_destinations(destination: str, expected: object) -> None:
    assert parse_destination(destination) == expected


@pytest.mark.parametrize("destination", ["::1:24", "host:port", ":24", "[::1"])
def test_bad_lmtp_destinations(destination: str) -> None:
    with pytest.raises(ValueError):
        parse_destination(destination)
