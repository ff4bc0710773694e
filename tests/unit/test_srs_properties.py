"""Property tests: SRS round trips for any address and key, and tampering is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.srs import DAY, SRSError, SRSFailure, srs_decode, srs_encode, srs_timestamp

# Local parts: atext plus "=" and "." (SRS must carry them untouched) and some non-ASCII
# letters (SMTPUTF8). At most 40 characters so that the result always fits in 255 bytes.
LOCAL_CHARS = st.sampled_from(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~.éßжλ"
)
local_parts = st.text(LOCAL_CHARS, min_size=1, max_size=40).filter(
    lambda local: local[:5].upper() not in ("SRS0=", "SRS1=")
)
labels = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789-"), min_size=1, max_size=10
)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)
# Any non-empty key that is valid Unicode (surrogates cannot be encoded to UTF-8).
keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
times = st.integers(min_value=2 * DAY, max_value=2**40)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(addresses, domains, keys, times)
def test_decode_of_encode_is_the_identity(sender: str, fwd: str, key: str, now: int) -> None:
    encoded = srs_encode(sender, fwd, key, now)
    assert encoded.startswith("SRS0=")
    assert encoded.endswith("@" + fwd)
    assert srs_decode(encoded, [key], now) == sender


@given(addresses, domains, keys, times, st.integers(-1, 4), st.integers(0, DAY - 1))
def test_valid_throughout_the_window(
    sender: str, fwd: str, key: str, now: int, days_later: int, second: int
) -> None:
    encoded = srs_encode(sender, fwd, key, now)
    later = (now // DAY + days_later) * DAY + second
    assert srs_decode(encoded, ["other key", key], later) == sender


@given(addresses, domains, keys, times, st.integers(5, 1022), st.integers(0, DAY - 1))
def test_expired_outside_the_window(
    sender: str, fwd: str, key: str, now: int, days_later: int, second: int
) -> None:
    # Stamps wrap every 1024 days, so 1022 days later is "two days early": also refused.
    encoded = srs_encode(sender, fwd, key, now)
    later = (now // DAY + days_later) * DAY + second
    with pytest.raises(SRSError) as caught:
        srs_decode(encoded, [key], later)
    assert caught.value.reason is SRSFailure.EXPIRED


@given(addresses, domains, keys, times, st.integers(0, 3), st.characters(codec="utf-8"))
def test_any_single_character_change_to_the_hash_is_refused(
    sender: str, fwd: str, key: str, now: int, position: int, replacement: str
) -> None:
    encoded = srs_encode(sender, fwd, key, now)
    index = len("SRS0=") + position
    if encoded[index] == replacement:
        replacement = B64URL[(B64URL.index(replacement) + 1) % len(B64URL)]
    tampered = encoded[:index] + replacement + encoded[index + 1 :]
    with pytest.raises(SRSError) as caught:
        srs_decode(tampered, [key], now)
    assert caught.value.reason is SRSFailure.BAD_HASH


@given(addresses, domains, keys, times, st.data())
def test_any_single_character_change_after_the_hash_is_refused(
    sender: str, fwd: str, key: str, now: int, data: st.DataObject
) -> None:
    encoded = srs_encode(sender, fwd, key, now)
    index = data.draw(st.integers(len("SRS0=HHHH="), len(encoded) - 1))
    replacement = data.draw(LOCAL_CHARS.filter(lambda c: c != encoded[index]))
    tampered = encoded[:index] + replacement + encoded[index + 1 :]
    with pytest.raises(SRSError):
        srs_decode(tampered, [key], now)


@given(addresses, domains, domains, domains, keys, keys, keys, times)
def test_a_chain_of_forwarders_unwinds_hop_by_hop(
    sender: str, hop1: str, hop2: str, hop3: str, key1: str, key2: str, key3: str, now: int
) -> None:
    """hop1 -> hop2 -> hop3: each bounce step goes back to the first forwarder's SRS0."""
    srs0 = srs_encode(sender, hop1, key1, now)
    srs1 = srs_encode(srs0, hop2, key2, now)
    assert srs1.startswith("SRS1=") and f"={hop1}==" in srs1
    again = srs_encode(srs1, hop3, key3, now)
    assert again.endswith("@" + hop3)
    # SRS1 reverses straight to the first forwarder, whichever forwarder signed it.
    assert srs_decode(again, [key3], now) == srs0
    assert srs_decode(srs1, [key2], now) == srs0
    assert srs_decode(srs0, [key1], now) == sender


@given(addresses, domains, keys, times)
def test_stamp_is_the_day_of_encoding(sender: str, fwd: str, key: str, now: int) -> None:
    assert srs_encode(sender, fwd, key, now)[10:12] == srs_timestamp(now)
