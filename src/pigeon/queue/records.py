"""On-disk record format of the queue journal.

A record is a 13-byte header followed by a payload::

    magic  b"PJ"      2 bytes
    kind   1 byte     MESSAGE, UPDATE or DELETE
    length 4 bytes    payload length, big endian
    crc    4 bytes    CRC-32 of kind + payload
    pad    2 bytes    zero (keeps the header a fixed, easily recognised size)

A torn write (crash in the middle of an append) leaves a record whose length runs past the end
of the file or whose CRC does not match: replay stops there and the tail is cut off. Such a
record was never acknowledged (the 250 is only sent after the fdatasync that follows the
write), so dropping it loses nothing that was accepted.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"PJ"
HEADER = struct.Struct(">2sBII2x")
HEADER_SIZE = HEADER.size

MESSAGE = 1  # a new message: metadata (JSON) + body
UPDATE = 2  # an envelope's new state (JSON)
DELETE = 3  # envelopes that are done (JSON list of evpids)

_META_LEN = struct.Struct(">I")


class CorruptRecord(Exception):
    """The bytes at this offset are not a complete, valid record."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    offset: int  # where the record header starts in its segment
    payload: bytes

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + len(self.payload)


def encode(kind: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(bytes([kind])))
    return HEADER.pack(MAGIC, kind, len(payload), crc) + payload


def encode_message(meta: dict[str, Any], body: bytes) -> bytes:
    """A MESSAGE record; the body sits at a fixed offset from the record start."""
    return b"".join(encode_message_parts(meta, [body]))


def encode_message_parts(meta: dict[str, Any], body: Sequence[bytes]) -> list[bytes]:
    """The MESSAGE record of a body given in parts, as parts: the body is not copied (a
    message may be tens of megabytes; the journal writes the parts with one writev)."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    head = _META_LEN.pack(len(meta_bytes)) + meta_bytes
    crc = zlib.crc32(head, zlib.crc32(bytes([MESSAGE])))
    length = len(head)
    for part in body:
        crc = zlib.crc32(part, crc)
        length += len(part)
    return [HEADER.pack(MAGIC, MESSAGE, length, crc), head, *body]


def body_offset_in_record(payload: bytes) -> int:
    """Offset of the body within a MESSAGE record, counted from the record's header start."""
    (meta_len,) = _META_LEN.unpack_from(payload, 0)
    return HEADER_SIZE + _META_LEN.size + int(meta_len)


def decode_message_meta(payload: bytes) -> dict[str, Any]:
    (meta_len,) = _META_LEN.unpack_from(payload, 0)
    meta: dict[str, Any] = json.loads(payload[_META_LEN.size : _META_LEN.size + meta_len])
    return meta


def encode_json(kind: int, value: Any) -> bytes:
    return encode(kind, json.dumps(value, separators=(",", ":")).encode())


def encode_delete(evpids: list[int]) -> bytes:
    """A DELETE record: the JSON list of the envelope ids, built without the json module
    (one is written per delivery, and integers need no escaping)."""
    return encode(DELETE, f"[{','.join(map(str, evpids))}]".encode())


def decode_json(payload: bytes) -> Any:
    return json.loads(payload)


def iter_records(data: bytes | memoryview, start: int = 0) -> Iterator[Record]:
    """Yield valid records from ``start``; raise CorruptRecord at the first invalid one."""
    view = memoryview(data)
    pos = start
    total = len(view)
    while pos < total:
        if total - pos < HEADER_SIZE:
            raise CorruptRecord(f"truncated header at {pos}")
        magic, kind, length, crc = HEADER.unpack_from(view, pos)
        if magic != MAGIC or kind not in (MESSAGE, UPDATE, DELETE):
            raise CorruptRecord(f"bad header at {pos}")
        end = pos + HEADER_SIZE + length
        if end > total:
            raise CorruptRecord(f"truncated record at {pos}")
        payload = bytes(view[pos + HEADER_SIZE : end])
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise CorruptRecord(f"checksum mismatch at {pos}")
        yield Record(kind, pos, payload)
        pos = end
