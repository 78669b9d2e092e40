"""The disk label: the 76-byte file `dynamicfs.label` at a disk's root.

It names the pool and the disk, so a disk is recognised wherever it is mounted and a
disk of another pool is refused. Layout (little-endian), see docs/FORMAT.md:

    0   8  magic b"DYNFSLBL"
    8   4  format version (u32)
    12 16  pool UUID (bytes)
    28 16  disk UUID (bytes)
    44 32  BLAKE3 of bytes 0..43
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import blake3

LABEL_NAME = "dynamicfs.label"
LABEL_MAGIC = b"DYNFSLBL"
LABEL_VERSION = 1
_BODY = struct.Struct("<8sI16s16s")
LABEL_SIZE = _BODY.size + 32


class LabelError(Exception):
    """The label is missing, unreadable or corrupt; str() says which."""


@dataclass(frozen=True)
class Label:
    pool_uuid: str
    disk_uuid: str
    version: int = LABEL_VERSION

    def pack(self) -> bytes:
        body = _BODY.pack(LABEL_MAGIC, self.version, uuid.UUID(self.pool_uuid).bytes,
                          uuid.UUID(self.disk_uuid).bytes)
        return body + blake3.blake3(body).digest()


def unpack_label(raw: bytes) -> Label:
    if len(raw) != LABEL_SIZE:
        raise LabelError(f"label has {len(raw)} bytes, expected {LABEL_SIZE}")
    body, digest = raw[: _BODY.size], raw[_BODY.size:]
    magic, version, pool, disk = _BODY.unpack(body)
    if magic != LABEL_MAGIC:
        raise LabelError("not a DynamicFS label (bad magic)")
    if blake3.blake3(body).digest() != digest:
        raise LabelError("label checksum mismatch (corrupt label)")
    if version > LABEL_VERSION:
        raise LabelError(f"label format {version} is newer than this DynamicFS ({LABEL_VERSION})")
    return Label(str(uuid.UUID(bytes=pool)), str(uuid.UUID(bytes=disk)), version)


def read_label(root: Path) -> Label:
    try:
        raw = (root / LABEL_NAME).read_bytes()
    except FileNotFoundError:
        raise LabelError("no label") from None
    except OSError as exc:
        raise LabelError(f"label unreadable: {exc.strerror}") from None
    return unpack_label(raw)


def write_label(root: Path, label: Label) -> None:
    """Write the label durably (file and directory entry fsynced); never overwrites."""
    path = root / LABEL_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, label.pack())
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
