"""From extents and inodes back to the file paths a user knows.

Integrity reports name files, not extent ids: an extent's inodes come from
`file_extents`, an inode's paths from walking `dentries` up to the root (ino 1). A
file with several hard links has several paths; an inode no entry leads to from the
root is shown as `<inode N>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from sqlite3 import Connection

ROOT_INO = 1
# Hard links are listed up to this many per inode; more would drown the report.
MAX_LINKS = 8
_MAX_DEPTH = 4096


class PathResolver:
    """Resolves inodes to paths through one connection, remembering directories seen."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._dirs: dict[int, str | None] = {ROOT_INO: ""}

    def paths(self, ino: int) -> list[str]:
        """Every path of `ino` (up to MAX_LINKS), or ['<inode N>'] if none reaches the root."""
        if ino == ROOT_INO:
            return ["/"]
        rows = self.conn.execute("SELECT parent, name FROM dentries WHERE ino = ? "
                                 "ORDER BY id LIMIT ?", (ino, MAX_LINKS)).fetchall()
        out = []
        for parent, name in rows:
            prefix = self._dir_path(parent)
            if prefix is not None:
                out.append(f"{prefix}/{os.fsdecode(bytes(name))}")
        return sorted(out) or [f"<inode {ino}>"]

    def _dir_path(self, ino: int) -> str | None:
        """Path of a directory ('' for the root), None when it does not reach the root."""
        chain: list[tuple[int, str]] = []
        seen: set[int] = set()
        current = ino
        while current not in self._dirs:
            if current in seen or len(chain) > _MAX_DEPTH:
                return self._unreachable(chain)
            seen.add(current)
            row = self.conn.execute("SELECT parent, name FROM dentries WHERE ino = ? "
                                    "ORDER BY id LIMIT 1", (current,)).fetchone()
            if row is None:
                return self._unreachable(chain + [(current, "")])
            chain.append((current, os.fsdecode(bytes(row[1]))))
            current = int(row[0])
        base = self._dirs[current]
        if base is None:
            return self._unreachable(chain)
        for dir_ino, name in reversed(chain):
            base = f"{base}/{name}"
            self._dirs[dir_ino] = base
        return base

    def _unreachable(self, chain: list[tuple[int, str]]) -> str | None:
        for dir_ino, _ in chain:
            self._dirs[dir_ino] = None
        return None

    def inodes_of_extent(self, extent_id: int) -> list[int]:
        rows = self.conn.execute("SELECT DISTINCT ino FROM file_extents WHERE extent_id = ? "
                                 "ORDER BY ino", (extent_id,)).fetchall()
        return [int(r[0]) for r in rows]

    def paths_of_extent(self, extent_id: int) -> list[str]:
        out: list[str] = []
        for ino in self.inodes_of_extent(extent_id):
            out.extend(self.paths(ino))
        return out

    def paths_of_extents(self, extent_ids: Iterable[int]) -> dict[int, list[str]]:
        return {e: self.paths_of_extent(e) for e in extent_ids}
