"""Records the namespace hands out: attributes, directory entries, filesystem stats."""

from __future__ import annotations

from dataclasses import dataclass

ROOT_INO = 1
NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
POLICY_XATTR = b"user.dynamicfs.policy"
LAYOUT_XATTR = b"user.dynamicfs.layout"


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_offset: int


@dataclass(frozen=True)
class FsStats:
    block_size: int
    fragment_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int = NAME_MAX
