"""fsck: check the metadata against itself and against the disks, and fix what is safe.

Checks, in the order repairs are made (each check sees the earlier repairs):
1. every directory entry names an existing inode, inside an existing directory;
2. every file_extents row belongs to an existing inode;
3. every fragment row belongs to an existing extent, within its policy's width, and no
   two fragments of an extent share a disk;
4. every inode but the root is reachable from the root; inodes with no links left are
   removed (not while the pool is mounted: they may be open files, unlinked);
   reachable-from-nowhere inodes that still have links are reconnected under
   /lost+found as `#<ino>`;
5. link counts: a file has one link per entry, a directory 2 + its subdirectories;
6. extents no file refers to are freed; extents that files refer to exist and have
   fragments; chunks whose write-back failed (LOST_EXTENT) are listed with their files;
7. every fragment row has its bytes on its disk: its segment file is there and long
   enough, and the header at its offset names it with the recorded size (missing or
   short ones are rebuilt by ExtentStore.rebuild from the others);
8. each disk's `used` is the sum of its fragments' sizes.

Safe repairs change only what cannot be right as it is and lose nothing that could be
read; anything else is listed as not repaired, with what to do about it.
"""

from __future__ import annotations

import collections
import os
import stat
import time
from dataclasses import dataclass, field
from sqlite3 import Connection
from typing import TYPE_CHECKING

from dynamicfs.disks import health
from dynamicfs.disks.directory import FragmentRef
from dynamicfs.engine.pool import ID_BITS, mount_info
from dynamicfs.errors import DynamicFSError, UnreadableError
from dynamicfs.maintenance.scrub import blocker_note, check_disks, rebuild, repair_blockers
from dynamicfs.meta.paths import ROOT_INO, PathResolver
from dynamicfs.meta.schema import LOST_EXTENT
from dynamicfs.redundancy.policy import parse_concrete

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

LOST_FOUND = b"lost+found"
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR


@dataclass
class FsckProblem:
    kind: str
    detail: str
    paths: list[str] = field(default_factory=list)
    repaired: bool = False
    hint: str = ""


@dataclass
class FsckReport:
    repair: bool
    mounted: bool
    checked: dict[str, int]
    problems: list[FsckProblem]
    duration: float

    @property
    def remaining(self) -> int:
        return sum(1 for p in self.problems if not p.repaired)

    @property
    def repaired(self) -> int:
        return sum(1 for p in self.problems if p.repaired)

    @property
    def clean(self) -> bool:
        return self.remaining == 0


class _Fsck:
    def __init__(self, pool: Pool, repair: bool) -> None:
        self.pool = pool
        self.repair = repair
        self.mounted = mount_info(pool.path) is not None
        self.problems: list[FsckProblem] = []
        self.checked: dict[str, int] = {}

    def problem(self, kind: str, detail: str, *, repaired: bool = False,
                paths: list[str] | None = None, hint: str = "") -> None:
        self.problems.append(FsckProblem(kind, detail, paths or [], repaired, hint))

    # -- 1. directory entries ------------------------------------------------------------
    def dentries(self, conn: Connection) -> None:
        self.checked["dentries"] = conn.execute("SELECT count(*) FROM dentries").fetchone()[0]
        rows = conn.execute(
            "SELECT d.id, d.parent, d.name, d.ino, i.ino IS NULL, p.ino IS NULL, p.mode "
            "FROM dentries d LEFT JOIN inodes i ON i.ino = d.ino "
            "LEFT JOIN inodes p ON p.ino = d.parent "
            f"WHERE i.ino IS NULL OR p.ino IS NULL OR (p.mode & {_S_IFMT}) != {_S_IFDIR}"
        ).fetchall()
        for dentry_id, parent, name, ino, no_inode, no_parent, _ in rows:
            shown = os.fsdecode(bytes(name))
            if no_inode:
                what = f"entry {shown!r} in directory {parent} names missing inode {ino}"
            elif no_parent:
                what = f"entry {shown!r} (inode {ino}) is in missing directory {parent}"
            else:
                what = f"entry {shown!r} (inode {ino}) is in inode {parent}, not a directory"
            if self.repair:
                conn.execute("DELETE FROM dentries WHERE id = ?", (dentry_id,))
            self.problem("dangling-entry", what, repaired=self.repair)

    # -- 2. file_extents of missing inodes -------------------------------------------------
    def file_extents(self, conn: Connection) -> None:
        rows = conn.execute("SELECT DISTINCT x.ino FROM file_extents x LEFT JOIN inodes i "
                            "ON i.ino = x.ino WHERE i.ino IS NULL").fetchall()
        for (ino,) in rows:
            if self.repair:
                extents = [r[0] for r in conn.execute(
                    "SELECT extent_id FROM file_extents WHERE ino = ?", (ino,))]
                conn.execute("DELETE FROM file_extents WHERE ino = ?", (ino,))
                self.pool.store.free_if_unreferenced(conn, extents)
            self.problem("dangling-file-extents", f"extent map of missing inode {ino}",
                         repaired=self.repair)

    # -- 3. fragment rows -------------------------------------------------------------------
    def fragment_rows(self, conn: Connection) -> None:
        self.checked["fragments"] = conn.execute("SELECT count(*) FROM fragments").fetchone()[0]
        rows = conn.execute("SELECT f.id, f.extent_id FROM fragments f LEFT JOIN extents e "
                            "ON e.id = f.extent_id WHERE e.id IS NULL").fetchall()
        for fragment_id, extent_id in rows:
            if self.repair:  # the file, if any, becomes an orphan for cleanup-orphans
                conn.execute("DELETE FROM fragments WHERE id = ?", (fragment_id,))
            self.problem("dangling-fragment",
                         f"fragment {fragment_id} of missing extent {extent_id}",
                         repaired=self.repair)
        for extent_id, policy_text, idx in conn.execute(
                "SELECT e.id, e.policy, f.idx FROM fragments f JOIN extents e "
                "ON e.id = f.extent_id").fetchall():
            if idx >= parse_concrete(policy_text).width:
                self.problem("fragment-index", f"extent {extent_id} has fragment index "
                             f"{idx}, beyond its {policy_text} width",
                             hint="run 'dynamicfs scrub --repair'")
        for extent_id, disk_id in conn.execute(
                "SELECT extent_id, disk_id FROM fragments GROUP BY extent_id, disk_id "
                "HAVING count(*) > 1").fetchall():
            self.problem("shared-disk", f"extent {extent_id} has several fragments on "
                         f"disk {disk_id}", hint="run 'dynamicfs repair'")

    # -- 4. reachability --------------------------------------------------------------------
    def reachability(self, conn: Connection) -> None:
        inodes = {ino: (mode, nlink) for ino, mode, nlink in
                  conn.execute("SELECT ino, mode, nlink FROM inodes")}
        self.checked["inodes"] = len(inodes)
        children: dict[int, list[int]] = {}
        parents: dict[int, list[int]] = {}
        for parent, ino in conn.execute("SELECT parent, ino FROM dentries"):
            children.setdefault(parent, []).append(ino)
            parents.setdefault(ino, []).append(parent)
        reached = {ROOT_INO}
        todo = [ROOT_INO]
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in reached:
                    reached.add(child)
                    if child in inodes and (inodes[child][0] & _S_IFMT) == _S_IFDIR:
                        todo.append(child)
        if ROOT_INO not in inodes:
            self.problem("root-missing", "the root directory (inode 1) is missing",
                         hint="run 'dynamicfs recover-metadata'")
            return
        lost = sorted(set(inodes) - reached)
        for ino in lost:
            mode, nlink = inodes[ino]
            linked_from_lost = any(p in inodes and p != ino and p not in reached
                                   for p in parents.get(ino, ()))
            if linked_from_lost:
                continue  # inside an unreachable directory: reconnecting that one is enough
            if nlink <= 0 and not parents.get(ino):
                self._unlinked(conn, ino)
            else:
                self._reconnect(conn, ino, mode)

    def _unlinked(self, conn: Connection, ino: int) -> None:
        detail = f"inode {ino} has no links left"
        if self.repair and not self.mounted:
            self.pool.store.free_if_unreferenced(conn, self._drop_inode(conn, ino))
            self.problem("unlinked-inode", detail, repaired=True)
        elif self.repair:
            self.problem("unlinked-inode", detail + " (left alone while mounted: it may be "
                         "an open file)", hint="unmount and run 'dynamicfs fsck --repair'")
        else:
            self.problem("unlinked-inode", detail)

    def _drop_inode(self, conn: Connection, ino: int) -> list[int]:
        extents = [r[0] for r in conn.execute("SELECT extent_id FROM file_extents WHERE ino = ?",
                                              (ino,))]
        conn.execute("DELETE FROM file_extents WHERE ino = ?", (ino,))
        conn.execute("DELETE FROM xattrs WHERE ino = ?", (ino,))
        conn.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        return extents

    def _reconnect(self, conn: Connection, ino: int, mode: int) -> None:
        kind = "directory" if (mode & _S_IFMT) == _S_IFDIR else "file"
        detail = f"{kind} inode {ino} is not reachable from the root"
        if not self.repair:
            self.problem("unreachable-inode", detail)
            return
        lost_found = self._lost_found(conn)
        name = f"#{ino}".encode()
        conn.execute("DELETE FROM dentries WHERE ino = ? AND parent NOT IN "
                     "(SELECT ino FROM inodes)", (ino,))
        conn.execute("INSERT OR REPLACE INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                     (lost_found, name, ino))
        if kind == "file":
            conn.execute("UPDATE inodes SET nlink = max(nlink, 1) WHERE ino = ?", (ino,))
        self.problem("unreachable-inode", detail + f"; reconnected as /lost+found/#{ino}",
                     repaired=True)

    def _lost_found(self, conn: Connection) -> int:
        row = conn.execute("SELECT d.ino FROM dentries d JOIN inodes i ON i.ino = d.ino "
                           f"WHERE d.parent = ? AND d.name = ? AND (i.mode & {_S_IFMT}) = "
                           f"{_S_IFDIR}", (ROOT_INO, LOST_FOUND)).fetchone()
        if row is not None:
            return int(row[0])
        if conn.execute("SELECT 1 FROM dentries WHERE parent = ? AND name = ?",
                        (ROOT_INO, LOST_FOUND)).fetchone():
            raise DynamicFSError("/lost+found exists and is not a directory; rename it and "
                                 "run 'dynamicfs fsck --repair' again")
        now = time.time_ns()
        cur = conn.execute("INSERT INTO inodes (mode, uid, gid, nlink, size, atime_ns, mtime_ns, "
                           "ctime_ns) VALUES (?, 0, 0, 2, 0, ?, ?, ?)",
                           (_S_IFDIR | 0o700, now, now, now))
        ino = int(cur.lastrowid or 0)
        conn.execute("INSERT INTO dentries (parent, name, ino) VALUES (?, ?, ?)",
                     (ROOT_INO, LOST_FOUND, ino))
        return ino

    # -- 5. link counts ---------------------------------------------------------------------
    def link_counts(self, conn: Connection) -> None:
        rows = conn.execute(
            "SELECT i.ino, i.mode, i.nlink, "
            "(SELECT count(*) FROM dentries d WHERE d.ino = i.ino), "
            "(SELECT count(*) FROM dentries d JOIN inodes c ON c.ino = d.ino "
            f" WHERE d.parent = i.ino AND (c.mode & {_S_IFMT}) = {_S_IFDIR}) FROM inodes i"
        ).fetchall()
        resolver = PathResolver(conn)
        for ino, mode, nlink, links, subdirs in rows:
            is_dir = (mode & _S_IFMT) == _S_IFDIR
            if is_dir and links > 1:
                self.problem("directory-links", f"directory inode {ino} has {links} entries",
                             paths=resolver.paths(ino),
                             hint="remove the extra entries by hand (rename/rmdir)")
                continue
            if links == 0 and ino != ROOT_INO:
                continue  # unreachable or unlinked: reported above
            want = 2 + subdirs if is_dir else links
            if nlink == want:
                continue
            if self.repair:
                conn.execute("UPDATE inodes SET nlink = ? WHERE ino = ?", (want, ino))
            self.problem("link-count", f"inode {ino} has link count {nlink}, should be {want}",
                         paths=resolver.paths(ino), repaired=self.repair)

    # -- 6. extents -------------------------------------------------------------------------
    def extents(self, conn: Connection) -> None:
        self.checked["extents"] = conn.execute("SELECT count(*) FROM extents").fetchone()[0]
        resolver = PathResolver(conn)
        for ino, chunk, extent_id in conn.execute(
                "SELECT x.ino, x.chunk, x.extent_id FROM file_extents x LEFT JOIN extents e "
                "ON e.id = x.extent_id WHERE e.id IS NULL").fetchall():
            if extent_id == LOST_EXTENT:
                self.problem("lost-chunk", f"inode {ino} chunk {chunk} was never stored (its "
                             "write-back failed): that part of the file reads as an I/O error",
                             paths=resolver.paths(ino),
                             hint="restore the file from a copy, or overwrite or truncate it")
                continue
            self.problem("missing-extent", f"inode {ino} chunk {chunk} names missing extent "
                         f"{extent_id}: that part of the file reads as an I/O error",
                         paths=resolver.paths(ino),
                         hint="restore the file from a copy, or overwrite or truncate it")
        for (extent_id,) in conn.execute(
                "SELECT e.id FROM extents e WHERE NOT EXISTS (SELECT 1 FROM fragments f "
                "WHERE f.extent_id = e.id) AND EXISTS (SELECT 1 FROM file_extents x "
                "WHERE x.extent_id = e.id)").fetchall():
            self.problem("extent-without-fragments", f"extent {extent_id} has no fragments: "
                         "its files read as I/O errors there",
                         paths=resolver.paths_of_extent(extent_id),
                         hint="restore these files from a copy")
        rows = conn.execute("SELECT e.id FROM extents e WHERE NOT EXISTS (SELECT 1 FROM "
                            "file_extents x WHERE x.extent_id = e.id)").fetchall()
        for (extent_id,) in rows:
            if self.mounted and extent_id >> ID_BITS >= self.pool.config.epoch:
                continue  # may be in the middle of being written by the mount
            if self.repair:
                self.pool.store.delete_extent(conn, extent_id)
            self.problem("unreferenced-extent", f"extent {extent_id} is not used by any file",
                         repaired=self.repair)

    # -- 7. fragments on the disks ----------------------------------------------------------
    def fragment_files(self) -> None:
        pool = self.pool
        checks = check_disks(pool)
        bad_disks = {d.id: d.problem for d in checks}
        blockers = repair_blockers(pool, checks)
        for disk_id, problem in bad_disks.items():
            if pool.disks[disk_id].state == health.FAILED:
                continue
            with pool.meta.read() as conn:
                count = conn.execute("SELECT count(*) FROM fragments WHERE disk_id = ?",
                                     (disk_id,)).fetchone()[0]
            self.problem("disk-unavailable", f"{problem}; {count} fragments are recorded there",
                         hint="bring the disk back, or 'dynamicfs fail-disk' it and run "
                         "'dynamicfs repair'")
        broken: dict[int, list[str]] = {}
        with pool.meta.read() as conn:
            rows = conn.execute("SELECT disk_id, extent_id, id, segment, offset, size "
                                "FROM fragments ORDER BY disk_id, segment, offset").fetchall()
            in_pool = set(pool.disks)
        extent_of: dict[int, int] = {}
        per_disk: dict[int, list[FragmentRef]] = collections.defaultdict(list)
        for disk_id, extent_id, *where in rows:
            ref = FragmentRef(*where)
            if disk_id not in in_pool:
                broken.setdefault(extent_id, []).append(
                    f"fragment {ref.id} is on disk {disk_id}, which the pool does not have")
                continue
            if disk_id in bad_disks:
                continue
            extent_of[ref.id] = extent_id
            per_disk[disk_id].append(ref)
        for disk_id, refs in per_disk.items():
            for ref, what in pool.backends[disk_id].find_problems(refs):
                broken.setdefault(extent_of[ref.id], []).append(
                    f"fragment {ref.id} on disk {disk_id}: {what}")
        self.checked["fragment_files"] = sum(len(refs) for refs in per_disk.values())
        for extent_id, details in sorted(broken.items()):
            with pool.meta.read() as conn:
                if conn.execute("SELECT 1 FROM extents WHERE id = ?",
                                (extent_id,)).fetchone() is None:
                    continue  # freed since the listing
                paths = PathResolver(conn).paths_of_extent(extent_id)
            detail = "; ".join(details)
            if not self.repair or blockers:
                self.problem("fragment-file", detail, paths=paths,
                             hint=blocker_note(blockers) if blockers else
                             "run 'dynamicfs fsck --repair' or 'dynamicfs repair'")
                continue
            try:
                outcome = rebuild(pool, extent_id)
            except (UnreadableError, DynamicFSError, OSError) as exc:
                self.problem("fragment-file", f"{detail}; rebuild failed: {exc}", paths=paths,
                             hint="restore these files from a copy")
                continue
            done = outcome in ("repaired", "healthy", "gone")
            self.problem("fragment-file", detail + ("" if done else f"; rebuild {outcome}"),
                         paths=paths, repaired=done,
                         hint="" if done else "add disks or free space, then 'dynamicfs repair'")

    # -- 8. used counters -------------------------------------------------------------------
    def used_counters(self, conn: Connection) -> None:
        sums = dict(conn.execute("SELECT disk_id, sum(size) FROM fragments GROUP BY disk_id"))
        for disk_id, used in conn.execute("SELECT id, used FROM disks").fetchall():
            want = int(sums.get(disk_id) or 0)
            if used == want:
                continue
            if self.repair:
                conn.execute("UPDATE disks SET used = ? WHERE id = ?", (want, disk_id))
                live = self.pool.disks.get(disk_id)
                if live is not None:  # keep bytes written but not yet recorded
                    live.used = max(0, live.used + want - used)
            self.problem("used-counter", f"disk {disk_id} counts {used} bytes used, its "
                         f"fragments add up to {want}", repaired=self.repair)


def fsck(pool: Pool, repair: bool = False) -> FsckReport:
    start = time.monotonic()
    check = _Fsck(pool, repair)
    with pool.meta.write() if repair else pool.meta.read() as conn:
        check.dentries(conn)
        check.file_extents(conn)
        check.fragment_rows(conn)
        check.reachability(conn)
        check.link_counts(conn)
        check.extents(conn)
    pool.meta.commit()
    check.fragment_files()
    with pool.meta.write() if repair else pool.meta.read() as conn:
        check.used_counters(conn)
    if repair and check.problems:
        pool.record_event("fsck", {"repaired": sum(p.repaired for p in check.problems),
                                   "remaining": sum(not p.repaired for p in check.problems)})
    pool.meta.commit()
    return FsckReport(repair, check.mounted, check.checked, check.problems,
                      round(time.monotonic() - start, 3))
