"""The fragment format: an 80-byte header followed by the payload (a record of a
segment file, or a fragment file of its own in pools written before segments).

A fragment can be checked on its own: the header names its extent, fragment id and
index, the payload length and the payload's BLAKE3, and is itself covered by a short
checksum. Layout (little-endian), see docs/FORMAT.md:

    0   8  magic b"DYNFSFRG"
    8   2  format version (u16)
    10  2  fragment index (u16)
    12  4  reserved, zero
    16  8  extent id (u64)
    24  8  fragment id (u64)
    32  8  payload length (u64)
    40 32  BLAKE3 of the payload
    72  8  first 8 bytes of BLAKE3 of bytes 0..71
    80  .. payload
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

FRAGMENT_MAGIC = b"DYNFSFRG"
# A freed fragment's record in a segment: its magic is overwritten with this (the rest
# of the header stays, so the segment can still be walked past it).
FREED_MAGIC = b"DYNFSFRE"
FRAGMENT_VERSION = 1
_HEAD = struct.Struct("<8sHHIQQQ32s")
HEADER_SIZE = _HEAD.size + 8


class FragmentError(Exception):
    """A fragment failed a check; str() says which."""


@dataclass(frozen=True)
class FragmentHeader:
    extent_id: int
    fragment_id: int
    index: int
    length: int
    checksum: bytes

    def pack(self) -> bytes:
        head = _HEAD.pack(FRAGMENT_MAGIC, FRAGMENT_VERSION, self.index, 0, self.extent_id,
                          self.fragment_id, self.length, self.checksum)
        return head + blake3.blake3(head).digest(length=8)


def checksum(payload: bytes | memoryview) -> bytes:
    return blake3.blake3(payload).digest()


def make_header(extent_id: int, fragment_id: int, index: int, payload: bytes) -> bytes:
    return FragmentHeader(extent_id, fragment_id, index, len(payload), checksum(payload)).pack()


def parse_header(raw: bytes | memoryview, *, freed_ok: bool = False) -> FragmentHeader:
    """Check and unpack the first HEADER_SIZE bytes of a fragment (its payload unread).
    With freed_ok, the header of a freed record is accepted too (see FREED_MAGIC)."""
    if freed_ok and raw[:8] == FREED_MAGIC:
        raw = FRAGMENT_MAGIC + raw[8:]
    if len(raw) < HEADER_SIZE:
        raise FragmentError(f"truncated header ({len(raw)} bytes)")
    head, head_sum = raw[: _HEAD.size], raw[_HEAD.size: HEADER_SIZE]
    if blake3.blake3(head).digest(length=8) != head_sum:
        raise FragmentError("header checksum mismatch")
    magic, version, index, _, extent_id, fragment_id, length, digest = _HEAD.unpack(head)
    if magic != FRAGMENT_MAGIC:
        raise FragmentError("bad magic")
    if version > FRAGMENT_VERSION:
        raise FragmentError(f"fragment format {version} is newer than this DynamicFS")
    return FragmentHeader(extent_id, fragment_id, index, length, digest)


def parse(raw: bytes | memoryview, *,
          hash_payload: bool = True) -> tuple[FragmentHeader, memoryview]:
    """Split and check a whole fragment. Raises FragmentError on any mismatch. Without
    hash_payload the payload's BLAKE3 is not compared (the caller checks those bytes
    another way: see ExtentStore._read_joined)."""
    head = parse_header(raw)
    payload = memoryview(raw)[HEADER_SIZE:]
    if len(payload) != head.length:
        raise FragmentError(f"payload has {len(payload)} bytes, header says {head.length}")
    if hash_payload and checksum(payload) != head.checksum:
        raise FragmentError("payload checksum mismatch")
    return head, payload
