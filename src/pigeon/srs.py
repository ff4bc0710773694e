"""Sender Rewriting Scheme (SRS), wire-compatible with OpenSMTPD 6.6+.

OpenSMTPD's SRS is its own scheme, not libsrs2's:

* hash = first 4 characters of URL-safe base64 of ``SHA1(key || data)`` (plain SHA-1 of
  the concatenation, not HMAC), where ``data`` is everything after ``SRSx=HHHH=``,
  forward domain included, case kept;
* the hash is compared case-sensitively, so a bounce whose address was case-folded fails;
* day stamps are 10 bits (days since the epoch mod 1024) in two base32 characters, valid
  from ``srs ttl`` days back (default 4) to one day ahead.

Everything here is pure: the clock is an explicit ``now`` (unix seconds). Work is done on
UTF-8 bytes because OpenSMTPD's offsets and length limits are byte offsets.

An optional compatibility mode also verifies addresses minted by postsrsd 1.x (libsrs2:
HMAC-SHA1 over case-folded fields, standard base64, case-insensitive, 21 days), so a
forwarder moving from Postfix+postsrsd keeps its pending bounces working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from pigeon.errors import SMTPError
from pigeon.protocol.replies import Reply

DAY = 86400
DEFAULT_TTL_DAYS = 4
DEFAULT_TTL = DEFAULT_TTL_DAYS * DAY
# Stamps are 10 bits of day number, so they wrap every 1024 days.
TIMESTAMP_SLOTS = 1024
# A stamp up to this many days in the future is accepted (clock skew between forwarders).
FUTURE_SKEW_DAYS = 1
# OpenSMTPD's buffers (SMTPD_MAXMAILADDRSIZE etc.): a result must fit in 255 bytes.
MAX_ADDRESS_BYTES = 255
MAX_LOCALPART_BYTES = 255
MAX_DOMAIN_BYTES = 255
# OpenSMTPD copies the address into a LINE_MAX buffer before splitting it.
MAX_PARSE_BYTES = 2047
HASH_LENGTH = 4
# libsrs2's defaults, which postsrsd 1.x keeps unless started with -n/-N/-a.
POSTSRSD_MAX_AGE_DAYS = 21
POSTSRSD_HASH_LENGTH = 4

B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_URLSAFE = bytes.maketrans(b"+/", b"-_")
# Separators accepted after a hash or stamp (OpenSMTPD reads them in a few places only).
_SEPARATORS = (b"=", b"+", b"-")

# Proposed reply when a null-sender message is addressed to an SRS address of ours that
# does not verify (bad hash, expired, malformed). OpenSMTPD has no such reply: it logs
# "SRS failed to decode" and lets the ruleset decide, which can relay the forged address.
SRS_REJECT_CODE = 550
SRS_REJECT_ENHANCED = "5.7.1"
SRS_REJECT_TEXT = "Invalid SRS address"
SRS_REJECT_REPLY = Reply(SRS_REJECT_CODE, SRS_REJECT_TEXT, SRS_REJECT_ENHANCED)


class SRSFailure(StrEnum):
    """Why an address did not decode. The value is the text shown to users."""

    NOT_SRS = "not SRS"
    BAD_HASH = "bad hash"
    EXPIRED = "expired"
    MALFORMED = "malformed"


class SRSError(ValueError):
    """An SRS address that does not decode; ``reason`` says why."""

    def __init__(self, reason: SRSFailure, *, hash_verified: bool = False) -> None:
        super().__init__(reason.value)
        self.reason = reason
        # True when a key vouched for the address and a later check failed: used to pick
        # the most telling reason when several schemes are tried.
        self.hash_verified = hash_verified

    def smtp_error(self) -> SMTPError:
        """The refusal to give a bounce addressed to this SRS address (SRS_REJECT_REPLY)."""
        return SMTPError(SRS_REJECT_CODE, SRS_REJECT_ENHANCED, SRS_REJECT_TEXT)


# ---------------------------------------------------------------------------------------
# Building blocks


def srs_day(now: int) -> int:
    """The 10-bit day number OpenSMTPD stamps into SRS0 addresses."""
    return (now // DAY) % TIMESTAMP_SLOTS


def srs_timestamp(now: int) -> str:
    """The two-character day stamp for ``now``, e.g. ``JN`` on 2026-11-24 UTC."""
    day = srs_day(now)
    return chr(B32[(day >> 5) & 31]) + chr(B32[day & 31])


def timestamp_in_window(stamp: int, today: int, ttl_days: int) -> bool:
    """True if day ``stamp`` is at most ``ttl_days`` old or one day ahead (mod 1024)."""
    age = (today - stamp) % TIMESTAMP_SLOTS
    ahead = (stamp - today) % TIMESTAMP_SLOTS
    return age <= ttl_days or ahead <= FUTURE_SKEW_DAYS


def srs_hash(key: str, data: str) -> str:
    """OpenSMTPD's 4-character SRS hash of ``data`` (str form of :func:`_hash`)."""
    return _hash(_key_bytes(key), data.encode()).decode()


def _hash(key: bytes, data: bytes) -> bytes:
    digest = hashlib.sha1(key + data).digest()
    return base64.b64encode(digest).translate(_URLSAFE)[:HASH_LENGTH]


def _key_bytes(key: str) -> bytes:
    if not key:
        # An empty key makes every hash computable by anyone: refuse it outright.
        raise ValueError("the SRS key must not be empty")
    return key.encode()


def _has_prefix(address: bytes, tag: bytes) -> bool:
    """``SRS0=`` / ``SRS1=`` compared ASCII case-insensitively, as strncasecmp does."""
    return address[:5].lower() == tag.lower()


def _split_mailaddr(text: bytes) -> tuple[bytes, bytes] | None:
    """Split at the last ``@`` like OpenSMTPD's text_to_mailaddr, with its size limits.

    Without an ``@`` the whole text is the user part. None if a part is too long.
    """
    if len(text) > MAX_PARSE_BYTES:
        return None
    user, at, domain = text.rpartition(b"@")
    if not at:
        user, domain = text, b""
    if len(user) > MAX_LOCALPART_BYTES or len(domain) > MAX_DOMAIN_BYTES:
        return None
    return user, domain


def _b32_day(first: int, second: int) -> int | None:
    """The day number of a two-character stamp; upper-case base32 only, like OpenSMTPD."""
    hi, lo = B32.find(first), B32.find(second)
    if hi < 0 or lo < 0:
        return None
    return hi << 5 | lo


def _text(raw: bytes) -> str | None:
    """Back to str; None if slicing at OpenSMTPD's byte offsets cut a UTF-8 sequence."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _fits(address: bytes) -> bool:
    return len(address) <= MAX_ADDRESS_BYTES


# ---------------------------------------------------------------------------------------
# Encoding (MAIL FROM of forwarded mail)


def srs_encode(sender: str, forward_domain: str, key: str, now: int) -> str:
    """Rewrite ``sender`` for mail forwarded through ``forward_domain``, as OpenSMTPD does.

    A plain sender becomes ``SRS0=HHHH=TT=domain=local@forward_domain``; an ``SRS0=``
    sender is wrapped into ``SRS1=``; an ``SRS1=`` sender is re-signed for the new domain.
    A sender without ``@`` (the null sender among them) is never rewritten, and a sender
    whose rewritten form would not fit in 255 bytes is kept as is.
    """
    key_bytes = _key_bytes(key)
    raw = sender.encode()
    if b"@" not in raw:
        return sender
    fwd = forward_domain.encode()
    if _has_prefix(raw, b"SRS0="):
        encoded = _wrap_srs0(raw[5:], fwd, key_bytes)
    elif _has_prefix(raw, b"SRS1="):
        encoded = _rewrap_srs1(raw[5:], fwd, key_bytes)
    else:
        encoded = _encode_srs0(raw, fwd, key_bytes, now)
    if encoded is None or not _fits(encoded):
        return sender
    return _text(encoded) or sender


def _encode_srs0(sender: bytes, fwd: bytes, key: bytes, now: int) -> bytes | None:
    parts = _split_mailaddr(sender)
    if parts is None:
        return None
    user, domain = parts
    data = srs_timestamp(now).encode() + b"=" + domain + b"=" + user + b"@" + fwd
    return b"SRS0=" + _hash(key, data) + b"=" + data


def _wrap_srs0(rest: bytes, fwd: bytes, key: bytes) -> bytes | None:
    # The previous hop's hash and stamp are kept untouched: only it can check them.
    parts = _split_mailaddr(rest)
    if parts is None:
        return None
    user, hop = parts
    data = hop + b"==" + user + b"@" + fwd
    return b"SRS1=" + _hash(key, data) + b"=" + data


def _rewrap_srs1(rest: bytes, fwd: bytes, key: bytes) -> bytes | None:
    # Keep the first hop and its opaque part, drop the previous forwarder's hash and domain.
    parts = _split_mailaddr(rest)
    if parts is None:
        return None
    user, _previous_domain = parts
    tmp = user + b"@" + fwd
    if len(tmp) < 5 or tmp[4:5] not in _SEPARATORS:
        return None
    data = tmp[5:]
    return b"SRS1=" + _hash(key, data) + b"=" + data


# ---------------------------------------------------------------------------------------
# Decoding (RCPT TO of a bounce)


def is_srs(address: str, postsrsd_compat: bool = False) -> bool:
    """True if ``address`` looks like SRS: ``SRS0=``/``SRS1=``, any case.

    With ``postsrsd_compat`` the separators ``+`` and ``-`` also count, as in libsrs2.
    """
    raw = address.encode()
    if _has_prefix(raw, b"SRS0=") or _has_prefix(raw, b"SRS1="):
        return True
    return postsrsd_compat and _postsrsd_tag(raw) is not None


def srs_decode(
    address: str,
    keys: Sequence[str],
    now: int,
    ttl_days: int = DEFAULT_TTL_DAYS,
    postsrsd_compat: bool = False,
) -> str:
    """Return the address that ``address`` was rewritten from, or raise :class:`SRSError`.

    ``keys`` are tried in order (main key, then backup). An SRS0 address gives the original
    sender; an SRS1 address gives the first hop's SRS0 address at the first hop's domain.
    ``ttl_days`` is how old a stamp may be (``srs ttl``); one day ahead is always accepted.
    With ``postsrsd_compat``, an address that fails OpenSMTPD's check is also tried as a
    postsrsd 1.x (libsrs2) address signed with one of ``keys``.
    """
    if not keys:
        raise ValueError("at least one SRS key is needed to decode")
    key_bytes = [_key_bytes(key) for key in keys]
    if ttl_days < 1:
        raise ValueError("the SRS ttl must be at least one day")
    raw = address.encode()
    today = srs_day(now)
    errors: list[SRSError] = []
    if _has_prefix(raw, b"SRS0=") or _has_prefix(raw, b"SRS1="):
        try:
            return _decode_opensmtpd(raw, key_bytes, today, ttl_days)
        except SRSError as error:
            errors.append(error)
    if postsrsd_compat and _postsrsd_tag(raw) is not None:
        try:
            return _decode_postsrsd(raw, key_bytes, today)
        except SRSError as error:
            errors.append(error)
    if not errors:
        raise SRSError(SRSFailure.NOT_SRS)
    raise _most_telling(errors)


def _most_telling(errors: list[SRSError]) -> SRSError:
    """A failure after a hash matched says more than a bad hash, which says more than junk."""
    for error in errors:
        if error.hash_verified:
            return error
    for error in errors:
        if error.reason is SRSFailure.BAD_HASH:
            return error
    return errors[0]


def _decode_opensmtpd(raw: bytes, keys: list[bytes], today: int, ttl_days: int) -> str:
    is_srs0 = _has_prefix(raw, b"SRS0=")
    rest = raw[5:]
    if len(rest) < 5:
        raise SRSError(SRSFailure.MALFORMED)
    # The hash covers everything after "HHHH=" (the separator itself is not checked).
    signed = rest[5:]
    if not any(hmac.compare_digest(_hash(key, signed), rest[:4]) for key in keys):
        raise SRSError(SRSFailure.BAD_HASH)
    if is_srs0:
        decoded = _open_srs0(signed, today, ttl_days)
    else:
        decoded = _open_srs1(signed, today, ttl_days)
    text = _text(decoded) if _fits(decoded) else None
    if text is None:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    return text


def _check_stamp(first: int, second: int, today: int, ttl_days: int) -> None:
    stamp = _b32_day(first, second)
    if stamp is None:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    if not timestamp_in_window(stamp, today, ttl_days):
        raise SRSError(SRSFailure.EXPIRED, hash_verified=True)


def _open_srs0(signed: bytes, today: int, ttl_days: int) -> bytes:
    """``TT=domain=local@fwd`` -> ``local@domain``."""
    if len(signed) < 3:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    _check_stamp(signed[0], signed[1], today, ttl_days)
    user = _user_part(signed[3:])
    domain, eq, local = user.partition(b"=")
    if not eq:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    return local + b"@" + domain


def _open_srs1(signed: bytes, today: int, ttl_days: int) -> bytes:
    """``hop==HHHH=TT=domain=local@fwd`` -> ``SRS0=HHHH=TT=domain=local@hop``.

    The inner hash belongs to the first hop and cannot be checked here, but its day stamp
    can, and OpenSMTPD does.
    """
    user = _user_part(signed)
    hop, eq, opaque = user.partition(b"=")
    if not eq:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    decoded = b"SRS0" + opaque + b"@" + hop
    # opaque is "=HHHH=TT=...": skip "=HHHH=", then expect the stamp and a separator.
    inner = opaque[6:]
    if len(opaque) < 6 or len(inner) < 3 or inner[2:3] not in _SEPARATORS:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    _check_stamp(inner[0], inner[1], today, ttl_days)
    return decoded


def _user_part(text: bytes) -> bytes:
    parts = _split_mailaddr(text)
    if parts is None:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    return parts[0]


# ---------------------------------------------------------------------------------------
# postsrsd 1.x (libsrs2) compatibility: verification only, Pigeon never mints these.


def _postsrsd_tag(raw: bytes) -> bytes | None:
    """``0`` or ``1`` if ``raw`` starts with libsrs2's SRS0/SRS1 tag and a separator."""
    if raw[:3].lower() == b"srs" and raw[3:4] in (b"0", b"1") and raw[4:5] in _SEPARATORS:
        return raw[3:4]
    return None


def postsrsd_hash(key: str, *fields: str) -> str:
    """libsrs2's hash: standard base64 of HMAC-SHA1 over the case-folded fields, 4 chars."""
    return _postsrsd_hash(_key_bytes(key), [field.encode() for field in fields]).decode()


def _postsrsd_hash(key: bytes, fields: Sequence[bytes]) -> bytes:
    mac = hmac.new(key, b"".join(field.lower() for field in fields), hashlib.sha1)
    return base64.b64encode(mac.digest())[:POSTSRSD_HASH_LENGTH]


def _postsrsd_hash_ok(given: bytes, keys: list[bytes], fields: Sequence[bytes]) -> bool:
    if len(given) != POSTSRSD_HASH_LENGTH:
        return False
    # libsrs2 compares hashes case-insensitively (strncasecmp).
    return any(
        hmac.compare_digest(_postsrsd_hash(key, fields).lower(), given.lower()) for key in keys
    )


def _decode_postsrsd(raw: bytes, keys: list[bytes], today: int) -> str:
    tag = _postsrsd_tag(raw)
    # libsrs2 ignores everything from the first "@" on: the forward domain is not signed.
    user = raw.partition(b"@")[0]
    fields = user[5:].split(b"=", 1 if tag == b"1" else 3)
    if tag == b"1":
        decoded = _open_postsrsd_srs1(fields, keys)
    else:
        decoded = _open_postsrsd_srs0(fields, keys, today)
    text = _text(decoded) if _fits(decoded) else None
    if text is None:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    return text


def _open_postsrsd_srs0(fields: list[bytes], keys: list[bytes], today: int) -> bytes:
    """``HHHH=TT=domain=local`` -> ``local@domain``."""
    if len(fields) != 4 or not all(fields):
        raise SRSError(SRSFailure.MALFORMED)
    given, stamp, domain, local = fields
    if not _postsrsd_hash_ok(given, keys, (stamp, domain, local)):
        raise SRSError(SRSFailure.BAD_HASH)
    upper = stamp.upper()
    day = _b32_day(upper[0], upper[1]) if len(upper) == 2 else None
    if day is None:
        raise SRSError(SRSFailure.MALFORMED, hash_verified=True)
    # libsrs2 treats a stamp "ahead" of today as 1024 days old: no future skew allowed.
    if (today - day) % TIMESTAMP_SLOTS > POSTSRSD_MAX_AGE_DAYS:
        raise SRSError(SRSFailure.EXPIRED, hash_verified=True)
    return local + b"@" + domain


def _open_postsrsd_srs1(fields: list[bytes], keys: list[bytes]) -> bytes:
    """``HHHH=hop=<sep>opaque`` -> ``SRS0<sep>opaque@hop`` (inner stamp unchecked, as libsrs2)."""
    if len(fields) != 2 or not all(fields):
        raise SRSError(SRSFailure.MALFORMED)
    given, hop_and_user = fields
    hop, eq, opaque = hop_and_user.partition(b"=")
    if not hop or not eq or not opaque:
        raise SRSError(SRSFailure.MALFORMED)
    if not _postsrsd_hash_ok(given, keys, (hop, opaque)):
        raise SRSError(SRSFailure.BAD_HASH)
    return b"SRS0" + opaque + b"@" + hop


# ---------------------------------------------------------------------------------------
# What the relay agent and the RCPT handling call


@dataclass(frozen=True, slots=True)
class SRSContext:
    """The ``srs key``, ``srs key backup`` and ``srs ttl`` settings, ready to use.

    ``ttl`` is in seconds and is used in whole days, like OpenSMTPD. ``domain`` is only a
    fallback forward domain for :meth:`encode`; forwarded mail normally uses the domain of
    the recipient it was sent to (see :meth:`rewrite_sender`).
    """

    key: str
    backup_key: str | None = None
    ttl: int = DEFAULT_TTL
    domain: str | None = None
    postsrsd_compat: bool = False

    def __post_init__(self) -> None:
        _key_bytes(self.key)
        if self.backup_key is not None:
            _key_bytes(self.backup_key)
        if self.ttl < DAY:
            raise ValueError("the SRS ttl must be at least one day")

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys to verify with, main key first."""
        return (self.key,) if self.backup_key is None else (self.key, self.backup_key)

    @property
    def ttl_days(self) -> int:
        return self.ttl // DAY

    def encode(self, sender: str, forward_domain: str | None = None, *, now: int) -> str:
        """:func:`srs_encode` with the main key; ``forward_domain`` defaults to ``domain``."""
        fwd = forward_domain if forward_domain is not None else self.domain
        if fwd is None:
            raise ValueError("no forward domain given and no default domain configured")
        return srs_encode(sender, fwd, self.key, now)

    def rewrite_sender(self, sender: str, original_rcpt: str, final_rcpt: str, *, now: int) -> str:
        """The MAIL FROM a ``relay srs`` action sends for one envelope.

        Only forwarded mail is rewritten: the recipient as received differs (byte for byte)
        from the final one after alias/virtual/.forward expansion. The forward domain is the
        domain of the recipient as received, case kept.
        """
        _, at, forward_domain = original_rcpt.rpartition("@")
        if original_rcpt == final_rcpt or not at:
            return sender
        return srs_encode(sender, forward_domain, self.key, now)

    def decode(self, address: str, *, now: int) -> str:
        """:func:`srs_decode` with this context's keys, ttl and compatibility mode."""
        return srs_decode(address, self.keys, now, self.ttl_days, self.postsrsd_compat)

    def decode_bounce_rcpt(self, mail_from: str, rcpt: str, *, now: int) -> str | None:
        """The address a bounce to ``rcpt`` must go to, or None if SRS does not apply.

        SRS applies only to the null sender (``mail_from == ""``) and an SRS-looking
        recipient; it raises :class:`SRSError` when such a recipient does not verify (the
        caller answers with :data:`SRS_REJECT_REPLY`).
        """
        if mail_from or not is_srs(rcpt, self.postsrsd_compat):
            return None
        return self.decode(rcpt, now=now)
