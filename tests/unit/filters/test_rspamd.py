"""rspamd filter logic without sockets: request headers, reply parsing, decisions, edits."""

from __future__ import annotations

import json

import pytest
from rspamdserver import canned_replies

from pigeon.filters.rspamd import (
    OnError,
    RspamdError,
    RspamdSettings,
    ScanContext,
    Verdict,
    context_from_session,
    decide,
    edit_message,
    parse_reply,
    request_headers,
    smtp_reply,
)
from pigeon.protocol import filterproto
from pigeon.sdk.filter import Session

CANNED = canned_replies()
REAL = canned_replies("rspamd-clean.txt")

# The message of the captured fake-* cases, as the filter sees it (un-stuffed).
MESSAGE = [
    "Received: from client.example.test (localhost [127.0.0.1])",
    "\tby mx.example.test (OpenSMTPD) with ESMTP id 26ea5f3a",
    "\tfor <bob@example.test>;",
    "\tTue, 24 Nov 2026 20:11:18 +0000 (UTC)",
    "From: Alice <alice@example.test>",
    "To: bob@example.test",
    "Subject: fake mode=add-header",
    "Date: Tue, 24 Nov 2026 20:00:00 +0000",
    "Message-ID: <fakexmodexaddxheaderx@example.test>",
    "X-Spam: bogus-preexisting",
    "X-Remove-Me: first",
    "X-Remove-Me: second",
    "  folded continuation",
    "",
    "Body for mode add-header",
    ".leading dot line",
    "",
]


def headers_of(lines: list[str]) -> list[str]:
    return lines[: lines.index("")]


def reply_of(case: str) -> object:
    return parse_reply(CANNED[case][1])


# -- request headers -----------------------------------------------------------------------


def test_request_headers_carry_the_whole_context() -> None:
    ctx = ScanContext(
        ip="192.0.2.7",
        hostname="mail.client.test",
        helo="client.example.test",
        mail_from="alice@example.test",
        rcpts=("bob@example.test", "carol@example.test"),
        queue_id="26ea5f3a",
        user="alice",
        mta_name="mx.example.test",
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
    )
    settings = RspamdSettings(settings_id="inbound", extra_headers=(("X-Site", "eu-1"),))
    headers = request_headers(ctx, settings)
    assert ("Rcpt", "bob@example.test") in headers and ("Rcpt", "carol@example.test") in headers
    as_dict = dict(headers)
    assert as_dict["Ip"] == "192.0.2.7"
    assert as_dict["Hostname"] == "mail.client.test"
    assert as_dict["Helo"] == "client.example.test"
    assert as_dict["From"] == "alice@example.test"
    assert as_dict["Queue-Id"] == "26ea5f3a"
    assert as_dict["User"] == "alice"
    assert as_dict["MTA-Name"] == "mx.example.test"
    assert as_dict["Settings-ID"] == "inbound"
    assert as_dict["TLS-Version"] == "TLSv1.3"
    assert as_dict["TLS-Cipher"] == "TLS_AES_256_GCM_SHA384"
    assert as_dict["X-Site"] == "eu-1"


def test_request_headers_leave_out_what_is_unknown() -> None:
    names = {n for n, _ in request_headers(ScanContext(ip="unix:/run/s.sock"), RspamdSettings())}
    assert names == {"Pass", "Ip"}
    assert dict(request_headers(ScanContext(ip="unix:/x"), RspamdSettings()))["Ip"] == "127.0.0.1"


def test_request_headers_cannot_be_injected_by_the_client() -> None:
    ctx = ScanContext(helo="evil\r\nSettings-ID: admin", mail_from="a@b\nX: y")
    for _name, value in request_headers(ctx, RspamdSettings()):
        assert "\r" not in value and "\n" not in value


def test_mta_name_setting_overrides_the_listener_hostname() -> None:
    ctx = ScanContext(mta_name="mx.example.test")
    headers = dict(request_headers(ctx, RspamdSettings(mta_name="mx2.example.test")))
    assert headers["MTA-Name"] == "mx2.example.test"


def _session_from(lines: list[str]) -> Session:
    session = Session(0x2208BD2B321FB7DA)
    for line in lines:
        message = filterproto.decode_smtpd_line(line)
        assert isinstance(message, filterproto.ReportLine)
        session.apply(message.event)
    return session


def test_context_from_an_sdk_session_built_from_captured_reports() -> None:
    sid = "2208bd2b321fb7da"
    session = _session_from(
        [
            f"report|0.6|1795551078.994990|smtp-in|link-connect|{sid}|localhost|pass|127.0.0.1:52512|"
            "127.0.0.1:11425",
            f"report|0.6|1795551078.994991|smtp-in|link-identify|{sid}|EHLO|client.example.test",
            f"report|0.6|1795551078.994992|smtp-in|link-tls|{sid}|TLSv1.3:TLS_AES_256_GCM_SHA384:256",
            # A '|' in the user name: filter-rspamd 0.1.7 exits on this line (OpenSMTPD #1213).
            f"report|0.6|1795551078.994993|smtp-in|link-auth|{sid}|VBA|spil|pass",
            f"report|0.6|1795551078.994994|smtp-in|tx-begin|{sid}|26ea5f3a",
            f"report|0.6|1795551078.994995|smtp-in|tx-mail|{sid}|26ea5f3a|ok|alice@example.test",
            f"report|0.6|1795551078.994996|smtp-in|tx-rcpt|{sid}|26ea5f3a|ok|bob@example.test",
            f"report|0.6|1795551078.994997|smtp-in|tx-rcpt|{sid}|26ea5f3a|permfail|nobody@example.test",
        ]
    )
    session.data["mta_name"] = "mx.example.test"
    ctx = context_from_session(session)
    assert ctx.ip == "127.0.0.1"
    assert ctx.hostname == "localhost"
    assert ctx.helo == "client.example.test"
    assert ctx.user == "VBA|spil"
    assert ctx.queue_id == "26ea5f3a"
    assert ctx.mail_from == "alice@example.test"
    assert ctx.rcpts == ("bob@example.test",)  # only accepted recipients
    assert ctx.mta_name == "mx.example.test"
    assert (ctx.tls_version, ctx.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")


def test_context_of_an_ipv6_client_without_rdns() -> None:
    session = Session(1, rdns="<unknown>", src="[2001:db8::5]:41000")
    ctx = context_from_session(session, mta_name="mx.example.test")
    assert ctx.ip == "2001:db8::5"
    assert ctx.hostname == "unknown"
    assert ctx.mta_name == "mx.example.test"


# -- reply parsing --------------------------------------------------------------------------


def test_parse_the_real_clean_reply() -> None:
    reply = parse_reply(REAL["clean"][1])
    assert reply.action == "no action"
    assert reply.score == 0.0 and reply.required_score == 15.0
    assert reply.symbols["MIME_GOOD"] == -0.1
    names = [h.name for h in reply.add_headers]
    assert sorted(names) == [
        "Authentication-Results",
        "X-Rspamd-Queue-Id",
        "X-Spam-Status",
        "X-Spamd-Bar",
    ]
    assert ("X-Spam", 0) in reply.remove_headers


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops</html>",
        b"",
        b"[1, 2]",
        b'{"score": 3}',
        b'{"action": 5}',
        b'{"action": ""}',
        b"\xff\xfe{",
    ],
)
def test_garbage_is_an_rspamd_error(body: bytes) -> None:
    with pytest.raises(RspamdError):
        parse_reply(body)


def test_wrong_field_types_are_ignored_not_fatal() -> None:
    body = json.dumps(
        {
            "action": "add header",
            "score": "high",
            "required_score": "15",
            "symbols": {"A": "x", "B": {"score": "y"}, "C": {"score": 1.5}},
            "messages": ["no"],
            "dkim-signature": [1, "v=1; ok"],
            "milter": {"add_headers": {"X-A": 5, "X-B": {"value": 3}}, "remove_headers": []},
        }
    ).encode()
    reply = parse_reply(body)
    assert reply.score is None and reply.required_score is None
    assert reply.symbols == {"A": 0.0, "B": 0.0, "C": 1.5}
    assert reply.dkim_signatures == ("v=1; ok",)
    assert reply.add_headers == () and reply.remove_headers == ()


# -- decisions ------------------------------------------------------------------------------


def test_reject_uses_rspamds_message() -> None:
    verdict, text = decide(reply_of("fake-reject-msg"), RspamdSettings(), authenticated=False)
    assert verdict is Verdict.REJECT
    assert text == "550 5.7.1 Spam message rejected; see https://example.test/why"


def test_reject_without_message_has_a_default() -> None:
    verdict, text = decide(reply_of("fake-reject-nomsg"), RspamdSettings(), authenticated=False)
    assert (verdict, text) == (Verdict.REJECT, "550 5.7.1 Message rejected as spam")


def test_soft_reject_is_451_with_or_without_message() -> None:
    settings = RspamdSettings()
    assert decide(reply_of("fake-soft-reject"), settings, authenticated=False) == (
        Verdict.TEMPFAIL,
        "451 Try again later, you are greylisted",
    )
    assert decide(reply_of("fake-soft-reject-nomsg"), settings, authenticated=False) == (
        Verdict.TEMPFAIL,
        "451 4.7.1 Try again later",
    )


def test_greylist_proceeds_by_default_and_can_tempfail() -> None:
    reply = reply_of("fake-greylist")
    assert decide(reply, RspamdSettings(), authenticated=False) == (Verdict.ACCEPT, None)
    strict = RspamdSettings(actions={"greylist": Verdict.TEMPFAIL})
    assert decide(reply, strict, authenticated=False) == (Verdict.TEMPFAIL, "451 Try again later")


def test_cautious_site_maps_reject_to_junk() -> None:
    cautious = RspamdSettings(actions={"reject": Verdict.JUNK})
    assert decide(reply_of("fake-reject-msg"), cautious, authenticated=False) == (
        Verdict.JUNK,
        None,
    )


def test_authenticated_senders_skip_spam_verdicts_unless_told_otherwise() -> None:
    reply = reply_of("fake-reject-msg")
    assert decide(reply, RspamdSettings(), authenticated=True) == (Verdict.ACCEPT, None)
    strict = RspamdSettings(skip_authenticated=False)
    assert decide(reply, strict, authenticated=True)[0] is Verdict.REJECT


def test_unknown_action_accepts() -> None:
    reply = parse_reply(b'{"action": "discard", "score": 30}')
    assert decide(reply, RspamdSettings(), authenticated=False) == (Verdict.ACCEPT, None)


def test_smtp_reply_is_one_safe_line_with_a_consistent_status_class() -> None:
    assert smtp_reply(Verdict.TEMPFAIL, "5.7.1 no\r\nway") == "451 4.7.1 no way"
    assert smtp_reply(Verdict.REJECT, "4.2.0 later") == "550 5.2.0 later"
    assert smtp_reply(Verdict.REJECT, "Gtube pattern") == "550 Gtube pattern"
    assert len(smtp_reply(Verdict.REJECT, "x" * 5000)) < 500


# -- message edits --------------------------------------------------------------------------


def test_add_header_case_applies_every_milter_edit() -> None:
    reply = reply_of("fake-add-header")
    out = edit_message(MESSAGE, reply, Verdict.JUNK, score_headers=True)
    head = headers_of(out)
    assert not any("\r" in line for line in out)
    # Every add_headers entry reaches the message (filter-rspamd dropped X-Spamd-Bar).
    assert "X-Plain-String: plain value" in head
    assert "X-Spamd-Bar: +++++++++" in head
    ar = head.index("Authentication-Results: mx.example.test;")
    assert head[ar + 1] == "\tdkim=none"
    # ARC-Seal and Authentication-Results (order 1) above the original headers; X-Spamd-Bar
    # (order -1) at the end of the header section.
    received = head.index(MESSAGE[0])
    assert head.index("ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.test; s=arc; b=AAAA") < (
        received
    )
    assert head[-1] == "X-Spamd-Bar: +++++++++"
    # junk + score headers
    assert head.count("X-Spam: yes") == 1
    assert "X-Spam-Score: 9.55 / 15" in head
    assert "X-Spam-Action: add header" in head
    symbols = head.index(next(h for h in head if h.startswith("X-Spam-Symbols:")))
    folded = " ".join([head[symbols], *[h for h in head[symbols + 1 :] if h.startswith("\t")]])
    assert "BAYES_SPAM(5.10)" in folded and "MIME_GOOD(-0.10)" in folded
    assert all(len(h) <= 78 for h in head if h.startswith(("X-Spam-Symbols", "\t")))
    # remove_headers: X-Spam 0 = every copy; X-Remove-Me 1 = the first one only.
    assert "X-Spam: bogus-preexisting" not in head
    assert "X-Remove-Me: first" not in head
    assert "X-Remove-Me: second" in head and "  folded continuation" in head
    # The body is untouched.
    assert out[out.index("") :] == MESSAGE[MESSAGE.index("") :]


@pytest.mark.parametrize(
    ("index", "kept"),
    [
        (0, []),
        (1, ["X-Remove-Me: second", "  folded continuation"]),
        (2, ["X-Remove-Me: first"]),
        (-1, ["X-Remove-Me: first"]),
        (-2, ["X-Remove-Me: second", "  folded continuation"]),
        (3, ["X-Remove-Me: first", "X-Remove-Me: second", "  folded continuation"]),
    ],
)
def test_remove_headers_index_semantics(index: int, kept: list[str]) -> None:
    reply = parse_reply(
        json.dumps(
            {"action": "no action", "milter": {"remove_headers": {"x-remove-me": index}}}
        ).encode()
    )
    head = headers_of(edit_message(MESSAGE, reply, Verdict.ACCEPT, score_headers=False))
    assert [h for h in head if "Remove-Me" in h or h.startswith("  ")] == kept


def test_arc_set_keeps_rfc8617_order_whatever_the_json_order() -> None:
    reply = parse_reply(
        json.dumps(
            {
                "action": "no action",
                "milter": {
                    "add_headers": {
                        "ARC-Authentication-Results": {"value": "i=1; aar", "order": 1},
                        "ARC-Message-Signature": {"value": "i=1; ams", "order": 1},
                        "ARC-Seal": {"value": "i=1; seal", "order": 1},
                        "X-List": [{"value": "one", "order": 0}, "two"],
                    }
                },
            }
        ).encode()
    )
    head = headers_of(edit_message(MESSAGE, reply, Verdict.ACCEPT, score_headers=False))
    assert head[:5] == [
        "X-List: one",
        "X-List: two",
        "ARC-Seal: i=1; seal",
        "ARC-Message-Signature: i=1; ams",
        "ARC-Authentication-Results: i=1; aar",
    ]


def test_rewrite_subject_replaces_the_whole_folded_subject() -> None:
    message = ["From: a@example.test", "Subject: a very long", " folded subject", "", "body"]
    reply = reply_of("fake-rewrite-subject")
    out = edit_message(message, reply, Verdict.REWRITE_SUBJECT, score_headers=False)
    assert out == ["From: a@example.test", "Subject: *** SPAM *** original subject", "", "body"]


def test_rewrite_subject_adds_one_when_there_is_none() -> None:
    reply = reply_of("fake-rewrite-subject")
    out = edit_message(["From: a@x", "", "b"], reply, Verdict.REWRITE_SUBJECT, score_headers=False)
    assert "Subject: *** SPAM *** original subject" in headers_of(out)


def test_dkim_signature_string_is_folded_without_cr() -> None:
    out = edit_message(MESSAGE, reply_of("fake-dkim-string"), Verdict.ACCEPT, score_headers=False)
    assert out[:2] == [
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=sel;",
        "\th=from:to:subject; bh=BODYHASH=; b=SIG=",
    ]
    assert out[2:] == MESSAGE


def test_dkim_signature_list_gives_one_header_each() -> None:
    out = edit_message(MESSAGE, reply_of("fake-dkim-list"), Verdict.ACCEPT, score_headers=False)
    assert out[:2] == [
        "DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=rsa; b=SIG1=",
        "DKIM-Signature: v=1; a=ed25519-sha256; d=example.test; s=ed; b=SIG2=",
    ]


def test_header_values_cannot_inject_headers_or_end_the_header_section() -> None:
    reply = parse_reply(
        json.dumps(
            {
                "action": "no action",
                "milter": {
                    "add_headers": {
                        "X-A": "one\r\nX-Injected: 1\n\nbody?",
                        "Bad Name": "dropped",
                        "": "dropped",
                    }
                },
            }
        ).encode()
    )
    out = edit_message(MESSAGE, reply, Verdict.ACCEPT, score_headers=False)
    # The blank line became a dropped empty fold; everything else is a continuation line.
    assert out[:3] == ["X-A: one", "\tX-Injected: 1", "\tbody?"]
    assert out.index("") == MESSAGE.index("") + 3
    assert not any(line.startswith(("Bad Name", ":")) for line in out)


def test_forged_score_headers_are_replaced_but_an_earlier_junk_mark_stays() -> None:
    message = ["X-Spam: Yes", "X-Spam-Score: -100", "X-Spam-Action: no action", "", "b"]
    reply = parse_reply(b'{"action": "add header", "score": 7, "required_score": 15}')
    head = headers_of(edit_message(message, reply, Verdict.JUNK, score_headers=True))
    assert "X-Spam: Yes" in head and "X-Spam: yes" not in head  # no second junk mark
    assert [h for h in head if h.startswith("X-Spam-Score")] == ["X-Spam-Score: 7 / 15"]
    assert [h for h in head if h.startswith("X-Spam-Action")] == ["X-Spam-Action: add header"]


def test_message_without_body_or_blank_line_survives() -> None:
    reply = parse_reply(b'{"action": "add header", "score": 7}')
    assert edit_message(["Subject: x"], reply, Verdict.JUNK, score_headers=False) == [
        "X-Spam: yes",
        "Subject: x",
    ]
    assert edit_message([], reply, Verdict.JUNK, score_headers=False) == ["X-Spam: yes"]


def test_settings_defaults_match_the_documentation() -> None:
    s = RspamdSettings()
    assert s.url == "http://localhost:11333"
    assert (s.connect_timeout, s.scan_timeout) == (5.0, 15.0)
    assert s.on_error is OnError.TEMPFAIL
    assert s.skip_authenticated and s.score_headers
    assert s.verdict_for("greylist") is Verdict.ACCEPT
    assert s.verdict_for("soft reject") is Verdict.TEMPFAIL
