"""A fragment's bytes on a directory disk, as tests damage them: read, overwrite, cut
short, flip a bit, remove. Works on the real segment file (or, for fragments of older
pools, the fragment file); nothing in DynamicFS is bypassed but the disk itself."""

from __future__ import annotations

import os
from pathlib import Path

from dynamicfs.disks.directory import DirectoryDisk, FragmentRef


class FragmentSpot:
    def __init__(self, root: Path | str, ref: FragmentRef) -> None:
        self.disk = DirectoryDisk(root)
        self.ref = ref
        self.path = (self.disk.legacy_path(ref.id) if ref.segment is None
                     else self.disk.segment_path(ref.segment))
        self.offset = 0 if ref.segment is None else ref.offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FragmentSpot) and (self.path, self.ref) == (other.path, other.ref)

    def __hash__(self) -> int:
        return hash((self.path, self.ref))

    def __repr__(self) -> str:
        return f"FragmentSpot({str(self.path)!r} @ {self.offset}, {self.ref.size} bytes)"

    @property
    def size(self) -> int:
        return self.ref.size

    def stat(self) -> os.stat_result:
        """The stat of the file that holds the fragment, its size the fragment's."""
        st = list(os.stat(self.path))
        st[6] = self.ref.size  # st_size
        return os.stat_result(st)

    def exists(self) -> bool:
        return self.disk.fragment_exists(self.ref)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.ref.size)

    def write_bytes(self, data: bytes) -> None:
        """The fragment's bytes become `data`; what is left of the fragment past it reads
        as zeros. b"" removes it (see unlink)."""
        assert len(data) <= self.ref.size, "a fragment cannot grow in its segment"
        if not data:
            self.unlink()
            return
        with open(self.path, "r+b") as f:
            f.seek(self.offset)
            f.write(data + bytes(self.ref.size - len(data)))

    def truncate(self, length: int) -> None:
        """Cut the fragment short after `length` bytes, as a crash cuts the tail of a
        file: the file that holds it ends there (in a segment, the records after it go
        too)."""
        os.truncate(self.path, self.offset + length)

    def unlink(self) -> None:
        """Remove the fragment behind the pool's back: its file, or (in a segment) its
        record, freed the way the disk frees one."""
        self.disk.delete_fragment(self.ref)

    def flip(self, offset: int = -10) -> None:
        """Invert one byte, counted from the fragment's start (or, negative, its end)."""
        at = self.offset + (offset if offset >= 0 else self.ref.size + offset)
        with open(self.path, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0xFF]))
            f.flush()
            os.fsync(f.fileno())
