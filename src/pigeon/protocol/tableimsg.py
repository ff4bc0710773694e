"""The old table protocol (OpenSMTPD up to 7.5, opensmtpd-extras up to 6.7): imsg frames.

Debian's ``opensmtpd-extras`` tables (``table-passwd``, ``table-sqlite``, ``table-ldap``,
``table-mysql``, ``table-postgres``, ``table-redis``, ``table-socketmap``) speak it: what
``table users passwd:/etc/mail/passwd`` runs on a Debian host with OpenSMTPD 6.8. Pure
encoding and decoding, no I/O (``pigeon.tables.imsg`` drives a process with it).

A frame is a 16-byte header in host byte order (``type``, ``len`` of header and payload,
``flags``, ``peerid``, ``pid``) and a payload. The requests, strictly one at a time:

* OPEN: ``uint32 version=2`` and the table name NUL-padded to ``LINE_MAX`` (2048) bytes;
  answered by an empty OK;
* CHECK and LOOKUP: ``int32 service`` (a bit, below), ``size_t nparams`` (always 0) and the
  key, NUL-terminated; FETCH: service and nparams only;
* UPDATE: nothing; CLOSE: nothing, and no answer.

Every answer is type OK with ``int32 r`` (1 found, 0 not found, -1 error or a service the
table does not serve), and for a found LOOKUP or FETCH the value, NUL-terminated.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass

HEADER = struct.Struct("=IHHII")  # host byte order, as libutil's imsg
MAX_FRAME = 16384  # MAX_IMSGSIZE
VERSION = 2
LINE_MAX = 2048
_INT = struct.Struct("=i")
_PARAMS = struct.Struct("=iQ")  # service, nparams (size_t: 8 bytes on 64-bit Linux)

# The service bits of the old API (the new protocol names them); it has no ``auth``.
SERVICE_BITS = {
    "alias": 0x1,
    "domain": 0x2,
    "credentials": 0x4,
    "netaddr": 0x8,
    "userinfo": 0x10,
    "source": 0x20,
    "mailaddr": 0x40,
    "addrname": 0x80,
    "mailaddrmap": 0x100,
    "relayhost": 0x200,
    "string": 0x400,
    "regex": 0x800,
}


class ImsgType(enum.IntEnum):
    OK = 0
    FAIL = 1
    OPEN = 2
    CLOSE = 3
    UPDATE = 4
    CHECK = 5
    LOOKUP = 6
    FETCH = 7


class ImsgError(Exception):
    """A frame that breaks the protocol: the table process is restarted."""


@dataclass(frozen=True)
class ImsgAnswer:
    result: int  # 1 found, 0 not found, -1 error; OPEN's answer has none (1)
    value: str | None = None


def _frame(kind: ImsgType, payload: bytes = b"") -> bytes:
    length = HEADER.size + len(payload)
    if length > MAX_FRAME:
        raise ValueError(f"table request too long ({length} bytes)")
    return HEADER.pack(kind, length, 0, 0, os.getpid()) + payload


def encode_open(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= LINE_MAX:
        raise ValueError("table name too long")
    return _frame(ImsgType.OPEN, struct.pack("=I", VERSION) + raw.ljust(LINE_MAX, b"\0"))


def encode_query(kind: ImsgType, service: str, key: str | None = None) -> bytes:
    """CHECK or LOOKUP (with ``key``), or FETCH (without)."""
    bit = SERVICE_BITS.get(service)
    if bit is None:
        raise ValueError(f"service {service} does not exist in the old table protocol")
    payload = _PARAMS.pack(bit, 0)
    if kind is not ImsgType.FETCH:
        if key is None or "\0" in key:
            raise ValueError("a key is needed, without NUL")
        payload += key.encode() + b"\0"
    return _frame(kind, payload)


def encode_update() -> bytes:
    return _frame(ImsgType.UPDATE)


def encode_close() -> bytes:
    return _frame(ImsgType.CLOSE)


def frame_length(header: bytes) -> int:
    """The whole frame's length, from its 16-byte header (ImsgError if impossible)."""
    length: int = HEADER.unpack(header)[1]
    if not HEADER.size <= length <= MAX_FRAME:
        raise ImsgError(f"frame length {length} out of range")
    return length


def decode_answer(request: ImsgType, frame: bytes) -> ImsgAnswer:
    """The answer to ``request`` carried by one whole frame."""
    kind, length, _flags, _peer, _pid = HEADER.unpack_from(frame)
    if length != len(frame):
        raise ImsgError("frame length does not match its header")
    if kind != ImsgType.OK:
        raise ImsgError(f"answer of type {kind}, expected OK")
    payload = frame[HEADER.size :]
    if request is ImsgType.OPEN:
        if payload:
            raise ImsgError("OPEN answered with a payload")
        return ImsgAnswer(1)
    if len(payload) < _INT.size:
        raise ImsgError("answer without a result")
    (result,) = _INT.unpack_from(payload)
    if result not in (-1, 0, 1):
        raise ImsgError(f"result {result} out of range")
    rest = payload[_INT.size :]
    if request in (ImsgType.LOOKUP, ImsgType.FETCH) and result == 1:
        if not rest.endswith(b"\0") or b"\0" in rest[:-1]:
            raise ImsgError("value is not one NUL-terminated string")
        return ImsgAnswer(1, rest[:-1].decode("utf-8", "surrogateescape"))
    if rest:
        raise ImsgError("unexpected bytes after the result")
    return ImsgAnswer(result)
