"""SRS against the vectors recorded from OpenSMTPD 6.8 and postsrsd 1.10, plus edge cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pigeon.srs import (
    DAY,
    SRS_REJECT_REPLY,
    SRSContext,
    SRSError,
    SRSFailure,
    is_srs,
    postsrsd_hash,
    srs_decode,
    srs_encode,
    srs_hash,
    srs_timestamp,
    timestamp_in_window,
)

VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "design" / "srs-vectors.json"
VECTOR_DAY = 20781  # every vector was recorded on this day (2026-11-24 UTC), stamp "JN"
NOW = VECTOR_DAY * DAY + 20 * 3600 + 15 * 60  # the recording ran at about 20:15 UTC
KEY = "s3cr3t-Alpha"
BACKUP = "another secret 2"


def _vectors(source: str, kind: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())
    return [v for v in vectors if v["source"] == source and v["kind"] == kind]


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [f"{i}-{v['note'][:40]}" for i, v in enumerate(vectors)]


OPENSMTPD_ENCODE = _vectors("opensmtpd-6.8", "encode")
OPENSMTPD_DECODE = _vectors("opensmtpd-6.8", "decode")
POSTSRSD_ENCODE = _vectors("postsrsd-1.10", "encode")
POSTSRSD_DECODE = _vectors("postsrsd-1.10", "decode")


def test_vector_file_has_what_the_spec_promises() -> None:
    assert len(OPENSMTPD_ENCODE) == 13
    assert len(OPENSMTPD_DECODE) == 22
    assert len(POSTSRSD_ENCODE) + len(POSTSRSD_DECODE) == 18
    assert srs_timestamp(NOW) == "JN"


# --- OpenSMTPD vectors -----------------------------------------------------------------


@pytest.mark.parametrize("vector", OPENSMTPD_ENCODE, ids=_ids(OPENSMTPD_ENCODE))
def test_opensmtpd_mail_from_of_forwarded_mail(vector: dict[str, Any]) -> None:
    context = SRSContext(vector["secret"])
    sent = context.rewrite_sender(
        vector["sender"], vector["rcpt_original"], vector["final_rcpt"], now=NOW
    )
    assert sent == vector["expected"]
    assert (sent != vector["sender"]) == vector["srs_applied"]


@pytest.mark.parametrize(
    "vector", [v for v in OPENSMTPD_ENCODE if v["srs_applied"]], ids=lambda v: v["note"][:40]
)
def test_opensmtpd_encode_function(vector: dict[str, Any]) -> None:
    encoded = srs_encode(vector["sender"], vector["forward_domain"], vector["secret"], NOW)
    assert encoded == vector["expected"]


@pytest.mark.parametrize("vector", OPENSMTPD_DECODE, ids=_ids(OPENSMTPD_DECODE))
def test_opensmtpd_bounce_recipient_decoding(vector: dict[str, Any]) -> None:
    context = SRSContext(
        vector["secret"], vector["secret_backup"], ttl=vector["srs_ttl_days"] * DAY
    )
    mail_from = "" if vector["mail_from"] == "<>" else vector["mail_from"]
    try:
        decoded = context.decode_bounce_rcpt(mail_from, vector["rcpt"], now=NOW)
    except SRSError:
        decoded = None
    assert decoded == vector["srs_decode_result"]


NULL_SENDER_DECODE = [v for v in OPENSMTPD_DECODE if v["mail_from"] == "<>"]


@pytest.mark.parametrize("vector", NULL_SENDER_DECODE, ids=_ids(NULL_SENDER_DECODE))
def test_postsrsd_compat_keeps_opensmtpd_verdicts(vector: dict[str, Any]) -> None:
    """Turning compat on accepts postsrsd's addresses and nothing else OpenSMTPD refuses."""
    keys = [k for k in (vector["secret"], vector["secret_backup"]) if k]
    minted_by_postsrsd = vector["rcpt"].startswith("SRS0=+sA3=")
    expected = "alice@example.org" if minted_by_postsrsd else vector["srs_decode_result"]
    try:
        decoded = srs_decode(vector["rcpt"], keys, NOW, vector["srs_ttl_days"], True)
    except SRSError:
        decoded = None
    assert decoded == expected


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("SRS0=cO_V=JN=example.org=alice@forwarder.test", SRSFailure.BAD_HASH),
        ("srs0=co_u=jn=example.org=alice@forwarder.test", SRSFailure.BAD_HASH),
        ("SRS0=cO_U=JN=example.org=alice@FORWARDER.TEST", SRSFailure.BAD_HASH),
        ("SRS0=7cfI=JI=example.org=alice@forwarder.test", SRSFailure.EXPIRED),
        ("SRS0=1gLi=JP=example.org=alice@forwarder.test", SRSFailure.EXPIRED),
        ("SRS1=KTi5=hop1.test==abcd=AB=example.org=alice@forwarder.test", SRSFailure.EXPIRED),
        ("SRS0=-VbC=jn=example.org=alice@forwarder.test", SRSFailure.MALFORMED),
        ("alice@example.org", SRSFailure.NOT_SRS),
        ("SRS0+abcd=AB=example.org=alice@hop1.test", SRSFailure.NOT_SRS),
        ("SRS2=cO_U=JN=example.org=alice@forwarder.test", SRSFailure.NOT_SRS),
        ("", SRSFailure.NOT_SRS),
        ("SRS0=ab@x", SRSFailure.MALFORMED),
    ],
)
def test_failure_reasons(address: str, reason: SRSFailure) -> None:
    with pytest.raises(SRSError) as caught:
        srs_decode(address, [KEY, BACKUP], NOW)
    assert caught.value.reason is reason
    assert str(caught.value) == reason.value


def test_backup_key_is_only_for_verifying() -> None:
    signed_with_backup = "SRS0=sWGl=JN=example.org=alice@forwarder.test"
    assert srs_decode(signed_with_backup, [KEY, BACKUP], NOW) == "alice@example.org"
    with pytest.raises(SRSError, match="bad hash"):
        srs_decode(signed_with_backup, [KEY], NOW)
    context = SRSContext(KEY, BACKUP)
    assert context.encode("alice@example.org", "forwarder.test", now=NOW).startswith("SRS0=cO_U=")


def test_only_the_prefix_is_case_insensitive() -> None:
    assert srs_decode("sRs0=cO_U=JN=example.org=alice@forwarder.test", [KEY], NOW) == (
        "alice@example.org"
    )
    lowered_hash = "SRS0=co_U=JN=example.org=alice@forwarder.test"
    with pytest.raises(SRSError, match="bad hash"):
        srs_decode(lowered_hash, [KEY], NOW)


def test_decoded_address_keeps_case() -> None:
    encoded = srs_encode("Alice.Smith@Example.ORG", "forwarder.test", KEY, NOW)
    assert srs_decode(encoded, [KEY], NOW) == "Alice.Smith@Example.ORG"


def test_srs1_decodes_to_the_first_hop() -> None:
    address = "SRS1=UgVH=hop1.test==abcd=JN=example.org=alice@forwarder.test"
    assert srs_decode(address, [KEY], NOW) == "SRS0=abcd=JN=example.org=alice@hop1.test"


# --- encoding edge cases ----------------------------------------------------------------


def test_hash_is_sha1_of_key_and_data_url_safe() -> None:
    # Values from the vectors: hashes with "_" and "-" prove the URL-safe alphabet.
    assert srs_hash(KEY, "JN=example.org=alice@forwarder.test") == "cO_U"
    assert srs_hash(KEY, "JN=sub.example.co.uk=user@forwarder.test") == "_0ba"


@pytest.mark.parametrize("sender", ["", "postmaster", "SRS0=abcd"])
def test_sender_without_at_sign_is_never_rewritten(sender: str) -> None:
    assert srs_encode(sender, "forwarder.test", KEY, NOW) == sender


def test_srs1_without_room_for_a_hash_is_left_alone() -> None:
    # OpenSMTPD needs "HHHH" followed by = + or - before it re-signs an SRS1 address.
    assert srs_encode("SRS1=ab@hop2.test", "forwarder.test", KEY, NOW) == "SRS1=ab@hop2.test"
    assert srs_encode("SRS1=abcdXhop@hop2.test", "fwd.test", KEY, NOW) == "SRS1=abcdXhop@hop2.test"


def test_srs1_rewrap_accepts_plus_and_minus_after_the_old_hash() -> None:
    rewrapped = srs_encode("SRS1=wxyz+hop1.test==abcd=AB=x=y@hop2.test", "f.test", KEY, NOW)
    data = "hop1.test==abcd=AB=x=y@f.test"
    assert rewrapped == f"SRS1={srs_hash(KEY, data)}={data}"


@pytest.mark.parametrize(("local_length", "rewritten"), [(215, True), (216, False)])
def test_result_must_fit_in_255_bytes(local_length: int, rewritten: bool) -> None:
    # SRS0= HHHH= TT= example.org= <local> @forwarder.test is 40 bytes plus the local part.
    sender = "a" * local_length + "@example.org"
    encoded = srs_encode(sender, "forwarder.test", KEY, NOW)
    assert (encoded != sender) is rewritten
    if rewritten:
        assert len(encoded) == 255
        assert srs_decode(encoded, [KEY], NOW) == sender


def test_length_limit_counts_utf8_bytes() -> None:
    sender = "é" * 108 + "@example.org"  # 216 bytes of local part
    assert srs_encode(sender, "forwarder.test", KEY, NOW) == sender
    shorter = "é" * 107 + "@example.org"
    assert srs_decode(srs_encode(shorter, "forwarder.test", KEY, NOW), [KEY], NOW) == shorter


def test_local_part_with_equals_and_at_signs_round_trips() -> None:
    sender = '"a=b@c"=d@example.org'
    encoded = srs_encode(sender, "forwarder.test", KEY, NOW)
    assert encoded.endswith('=example.org="a=b@c"=d@forwarder.test')
    assert srs_decode(encoded, [KEY], NOW) == sender


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        srs_encode("alice@example.org", "forwarder.test", "", NOW)
    with pytest.raises(ValueError):
        srs_decode("SRS0=cO_U=JN=example.org=alice@forwarder.test", [], NOW)
    with pytest.raises(ValueError):
        SRSContext(KEY, backup_key="")


def test_signed_but_malformed_addresses() -> None:
    data = "JN=no-separator@forwarder.test"
    with pytest.raises(SRSError, match="malformed") as caught:
        srs_decode(f"SRS0={srs_hash(KEY, data)}={data}", [KEY], NOW)
    assert caught.value.hash_verified
    srs1_data = "hop1.test==ab@forwarder.test"  # inner part too short for HHHH=TT=
    with pytest.raises(SRSError, match="malformed"):
        srs_decode(f"SRS1={srs_hash(KEY, srs1_data)}={srs1_data}", [KEY], NOW)


# --- timestamp window -------------------------------------------------------------------


def _at_day(day: int) -> int:
    """A unix time during the day whose 10-bit SRS stamp is ``day`` (mod 1024)."""
    return (VECTOR_DAY - VECTOR_DAY % 1024 + 2048 + day) * DAY + 12 * 3600


def _minted_on(day: int) -> str:
    return srs_encode("alice@example.org", "forwarder.test", KEY, _at_day(day))


@pytest.mark.parametrize(
    ("minted", "today", "ttl", "ok"),
    [
        (300, 301, 4, True),
        (297, 301, 4, True),  # ttl days old
        (296, 301, 4, False),  # ttl + 1
        (302, 301, 4, True),  # one day of skew forward
        (303, 301, 4, False),
        (294, 301, 7, True),
        (293, 301, 7, False),
        (300, 301, 1, True),
        (299, 301, 1, False),
        (1021, 1, 4, True),  # wraps below zero
        (1020, 1, 4, False),
        (1020, 0, 4, True),
        (0, 1023, 4, True),  # one day ahead across the wrap
        (1, 1023, 4, False),
        (1023, 1023, 4, True),
        (3, 1022, 4, False),
    ],
)
def test_timestamp_window(minted: int, today: int, ttl: int, ok: bool) -> None:
    assert timestamp_in_window(minted, today, ttl) is ok
    address = _minted_on(minted)
    if ok:
        assert srs_decode(address, [KEY], _at_day(today), ttl) == "alice@example.org"
    else:
        with pytest.raises(SRSError, match="expired"):
            srs_decode(address, [KEY], _at_day(today), ttl)


def test_window_counts_utc_days_not_hours() -> None:
    minted_late = _at_day(10) + 11 * 3600 + 3599  # 23:59:59 UTC
    address = srs_encode("alice@example.org", "forwarder.test", KEY, minted_late)
    last_ok = _at_day(14) + 11 * 3600 + 3599
    assert srs_decode(address, [KEY], last_ok) == "alice@example.org"
    with pytest.raises(SRSError, match="expired"):
        srs_decode(address, [KEY], last_ok + 1)


def test_srs1_checks_the_inner_stamp_with_the_same_window() -> None:
    inner_old = "SRS0=abcd=" + srs_timestamp(_at_day(296)) + "=example.org=alice@hop1.test"
    inner_ok = "SRS0=abcd=" + srs_timestamp(_at_day(297)) + "=example.org=alice@hop1.test"
    now = _at_day(301)
    wrapped_ok = srs_encode(inner_ok, "forwarder.test", KEY, now)
    assert srs_decode(wrapped_ok, [KEY], now) == inner_ok
    with pytest.raises(SRSError, match="expired"):
        srs_decode(srs_encode(inner_old, "forwarder.test", KEY, now), [KEY], now)


# --- postsrsd compatibility ---------------------------------------------------------------


REWRITTEN_BY_POSTSRSD = [v for v in POSTSRSD_ENCODE if v["srs_applied"]]


@pytest.mark.parametrize("vector", REWRITTEN_BY_POSTSRSD, ids=_ids(REWRITTEN_BY_POSTSRSD))
def test_postsrsd_hash_formula_matches_its_output(vector: dict[str, Any]) -> None:
    user = vector["expected"].partition("@")[0]
    tag, given, rest = user[:4], user[5:9], user[10:]
    if tag == "SRS0":
        stamp, domain, local = rest.split("=", 2)
        assert postsrsd_hash(vector["secret"], stamp, domain, local) == given
    else:
        hop, _, opaque = rest.partition("=")
        assert postsrsd_hash(vector["secret"], hop, opaque) == given


def _reverse_of(sender: str) -> str:
    """What postsrsd's reverse map gives for an address it minted from ``sender``."""
    if sender[:4].upper() == "SRS1":
        user, _, _ = sender.partition("@")
        hop, _, opaque = user[10:].partition("=")
        return f"SRS0{opaque}@{hop}"
    if sender[:4].upper() == "SRS0":
        user, _, hop = sender.partition("@")
        return f"SRS0{user[4:]}@{hop}"
    return sender


@pytest.mark.parametrize("vector", REWRITTEN_BY_POSTSRSD, ids=_ids(REWRITTEN_BY_POSTSRSD))
def test_compat_mode_decodes_what_postsrsd_minted(vector: dict[str, Any]) -> None:
    address = vector["expected"]
    expected = _reverse_of(vector["sender"])
    assert srs_decode(address, [vector["secret"]], NOW, postsrsd_compat=True) == expected
    with pytest.raises(SRSError):
        srs_decode(address, [vector["secret"]], NOW)


@pytest.mark.parametrize("vector", POSTSRSD_DECODE, ids=_ids(POSTSRSD_DECODE))
def test_compat_mode_against_postsrsd_reverse_results(vector: dict[str, Any]) -> None:
    try:
        decoded = srs_decode(vector["rcpt"], [vector["secret"]], NOW, postsrsd_compat=True)
    except SRSError:
        decoded = "REJECT"
    if vector["note"].startswith("opensmtpd-6.8"):
        # postsrsd refuses OpenSMTPD's addresses; Pigeon checks both schemes and keeps
        # OpenSMTPD's verdict for them (secret A: valid SRS0, SRS1 with an old inner stamp).
        expected = {"SRS0=cO_U": "alice@example.org"}.get(vector["rcpt"][:9], "REJECT")
    else:
        expected = vector["expected"]
    assert decoded == expected


def test_compat_mode_uses_the_backup_key_too() -> None:
    address = "SRS0=+sA3=JN=example.org=alice@forwarder.test"
    assert srs_decode(address, ["new key", KEY], NOW, postsrsd_compat=True) == ("alice@example.org")


def _postsrsd_srs0(stamp: str, sep: str = "=") -> str:
    given = postsrsd_hash(KEY, stamp, "example.org", "alice")
    return f"SRS0{sep}{given}={stamp}=example.org=alice@forwarder.test"


@pytest.mark.parametrize(("days_old", "ok"), [(0, True), (21, True), (22, False), (-1, False)])
def test_compat_mode_uses_postsrsd_max_age(days_old: int, ok: bool) -> None:
    address = _postsrsd_srs0(srs_timestamp(_at_day(301 - days_old)))
    if ok:
        assert srs_decode(address, [KEY], _at_day(301), postsrsd_compat=True) == (
            "alice@example.org"
        )
    else:
        with pytest.raises(SRSError, match="expired"):
            srs_decode(address, [KEY], _at_day(301), postsrsd_compat=True)


def test_compat_mode_accepts_libsrs2_separators() -> None:
    address = _postsrsd_srs0("JN", sep="+")
    assert is_srs(address, postsrsd_compat=True)
    assert not is_srs(address)
    assert srs_decode(address, [KEY], NOW, postsrsd_compat=True) == "alice@example.org"


def test_compat_mode_still_refuses_forgeries() -> None:
    for address in (
        "SRS0=+sA4=JN=example.org=alice@forwarder.test",
        "SRS0=+sA3=JN=example.org=mallory@forwarder.test",
        "SRS1=zXZt=hop1.test==abcd=AB=example.org=mallory@forwarder.test",
    ):
        with pytest.raises(SRSError, match="bad hash"):
            srs_decode(address, [KEY], NOW, postsrsd_compat=True)


# --- SRSContext: what the relay agent and RCPT handling call -------------------------------


def test_context_settings() -> None:
    context = SRSContext(KEY, BACKUP, ttl=5 * DAY + 3600, domain="forwarder.test")
    assert context.keys == (KEY, BACKUP)
    assert context.ttl_days == 5
    assert context.encode("alice@example.org", now=NOW) == (
        "SRS0=cO_U=JN=example.org=alice@forwarder.test"
    )
    with pytest.raises(ValueError):
        SRSContext(KEY, ttl=DAY - 1)
    with pytest.raises(ValueError):
        SRSContext(KEY).encode("alice@example.org", now=NOW)


def test_context_decode_uses_its_ttl() -> None:
    five_days_old = "SRS0=7cfI=JI=example.org=alice@forwarder.test"
    assert SRSContext(KEY, ttl=5 * DAY).decode(five_days_old, now=NOW) == "alice@example.org"
    with pytest.raises(SRSError, match="expired"):
        SRSContext(KEY).decode(five_days_old, now=NOW)


def test_bounce_rcpt_only_for_null_sender_and_srs_recipient() -> None:
    context = SRSContext(KEY)
    valid = "SRS0=cO_U=JN=example.org=alice@forwarder.test"
    assert context.decode_bounce_rcpt("", valid, now=NOW) == "alice@example.org"
    assert context.decode_bounce_rcpt("bob@example.net", valid, now=NOW) is None
    assert context.decode_bounce_rcpt("", "bob@forwarder.test", now=NOW) is None
    with pytest.raises(SRSError) as caught:
        context.decode_bounce_rcpt("", valid.replace("cO_U", "cO_V"), now=NOW)
    assert caught.value.smtp_error().reply() == SRS_REJECT_REPLY


def test_reject_reply_text() -> None:
    assert str(SRS_REJECT_REPLY) == "550 5.7.1 Invalid SRS address"
    assert SRS_REJECT_REPLY.permanent


def test_separator_after_the_hash_is_not_checked_like_opensmtpd() -> None:
    # OpenSMTPD hashes everything after "SRS0=HHHH?" and never looks at "?" itself.
    address = "SRS0=cO_U+JN=example.org=alice@forwarder.test"
    assert srs_decode(address, [KEY], NOW) == "alice@example.org"
