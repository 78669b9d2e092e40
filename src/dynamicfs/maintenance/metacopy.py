"""Copies of the metadata database on the pool's disks, and recovery from them.

`copy_metadata` takes a consistent snapshot of the live database with SQLite's backup
API (after a commit, so the snapshot names only durable fragments), then puts it on up
to COPIES healthy disks as `<disk>/metadata/pool-<generation>.db` next to a manifest
`pool-<generation>.json` (generation, pool UUID, size, BLAKE3; see docs/FORMAT.md).
Each file is written to a temporary name, fsynced and renamed, the manifest last, so
a manifest always describes a complete copy. A disk keeps its KEEP newest generations.
It also writes `POOL/disks.json`, the pool's disk paths and UUIDs, which is how
`recover` finds the disks when `pool.db` is gone (and Pool.open cannot be used).

`recover` restores the newest valid copy into `POOL/pool.db`: it refuses to replace a
valid database unless forced and moves a corrupt one aside. The restored database is
older than the lost one: its epoch is raised above every fragment id found on the
disks, so ids handed out later never collide with files written after the copy
(DESIGN invariant 2); those files are orphans for cleanup-orphans.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.disks.label import LabelError, read_label
from dynamicfs.engine.pool import ID_BITS, PoolLock
from dynamicfs.errors import DiskError, DynamicFSError, PoolError
from dynamicfs.maintenance.periodic import Periodic
from dynamicfs.maintenance.scrub import check_disks
from dynamicfs.meta.store import DB_NAME
from dynamicfs.observability.log import log, warn

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

METADATA_DIR = "metadata"
DISKS_FILE = "disks.json"
COPIES = 3
KEEP = 2
MANIFEST_MAGIC = "DYNFSMETA"
MANIFEST_VERSION = 1
_CHUNK = 4 * 1024 * 1024


@dataclass
class Manifest:
    generation: int
    pool_uuid: str
    disk_uuid: str
    size: int
    blake3: str
    created: float
    schema_version: int
    epoch: int
    magic: str = MANIFEST_MAGIC
    version: int = MANIFEST_VERSION

    def dumps(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str) -> Manifest:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("magic") != MANIFEST_MAGIC:
            raise ValueError("not a DynamicFS metadata manifest")
        if int(doc.get("version", 0)) > MANIFEST_VERSION:
            raise ValueError(f"manifest format {doc['version']} is newer than this DynamicFS")
        return cls(int(doc["generation"]), str(doc["pool_uuid"]), str(doc["disk_uuid"]),
                   int(doc["size"]), str(doc["blake3"]), float(doc["created"]),
                   int(doc["schema_version"]), int(doc["epoch"]), str(doc["magic"]),
                   int(doc["version"]))


def db_name(generation: int) -> str:
    return f"pool-{generation}.db"


def manifest_name(generation: int) -> str:
    return f"pool-{generation}.json"


# -- files ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def file_checksum(path: Path) -> tuple[int, str]:
    """(size, BLAKE3 hex) of a file."""
    h = blake3.blake3()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# -- copying ------------------------------------------------------------------------------
@dataclass
class CopyReport:
    generation: int
    size: int
    blake3: str
    disks: list[dict[str, object]]
    pruned: int
    failed: list[str] = field(default_factory=list)


def _generations(metadata_dir: Path) -> list[int]:
    out = []
    try:
        names = os.listdir(metadata_dir)
    except OSError:
        return []
    for name in names:
        if name.startswith("pool-") and name.endswith((".json", ".db")):
            try:
                out.append(int(name[5:].rsplit(".", 1)[0]))
            except ValueError:
                continue
    return sorted(set(out))


def _targets(pool: Pool, copies: int) -> list[int]:
    """Up to `copies` healthy, present, correctly labelled disks; distinct devices first."""
    bad = {d.id for d in check_disks(pool)}
    disks = [d for d in pool.healthy_disks() if d.id not in bad]
    disks.sort(key=lambda d: (-pool.store.disk_free(d.id), d.id))
    chosen: list[int] = []
    devices: set[int] = set()
    for d in disks:  # one per device while possible, then fill up
        try:
            dev = pool.backends[d.id].device_id()
        except OSError:
            continue
        if dev not in devices:
            devices.add(dev)
            chosen.append(d.id)
    chosen += [d.id for d in disks if d.id not in chosen]
    return chosen[:copies]


def write_disks_file(pool: Pool, generation: int) -> None:
    doc = {"pool_uuid": pool.config.uuid, "generation": generation,
           "disks": [{"id": d.id, "uuid": d.uuid, "path": d.path}
                     for d in sorted(pool.disks.values(), key=lambda d: d.id)]}
    _write_atomic(pool.path / DISKS_FILE, (json.dumps(doc, indent=1) + "\n").encode())


def copy_metadata(pool: Pool, copies: int = COPIES) -> CopyReport:
    """Put a snapshot of the metadata on up to `copies` healthy disks."""
    targets = _targets(pool, copies)
    if not targets:
        raise DiskError("no healthy disk can hold a metadata copy; add a disk or repair one")
    newest = max((g for d in pool.disks.values()
                  for g in _generations(Path(d.path) / METADATA_DIR)), default=0)
    with pool.meta.read() as conn:
        row = conn.execute("SELECT generation FROM metadata_copies WHERE id = 1").fetchone()
    generation = max(newest, row[0] if row else 0) + 1
    with pool.meta.write() as conn:
        conn.execute("INSERT OR REPLACE INTO metadata_copies (id, generation, copied, disks) "
                     "VALUES (1, ?, ?, ?)", (generation, time.time(), json.dumps(targets)))
    snapshot = pool.path / f".{db_name(generation)}.snapshot"
    try:
        _snapshot(pool, snapshot)
        size, digest = file_checksum(snapshot)
        schema, epoch = _db_versions(snapshot)
        done: list[dict[str, object]] = []
        failed: list[str] = []
        pruned = 0
        for disk_id in targets:
            disk = pool.disks[disk_id]
            manifest = Manifest(generation, pool.config.uuid, disk.uuid, size, digest,
                                time.time(), schema, epoch)
            try:
                pruned += _place(Path(disk.path) / METADATA_DIR, snapshot, manifest)
            except OSError as exc:
                failed.append(f"disk {disk_id} ({disk.path}): {exc.strerror}")
                continue
            done.append({"id": disk_id, "path": disk.path})
        write_disks_file(pool, generation)
    finally:
        snapshot.unlink(missing_ok=True)
    if not done:
        raise DiskError(f"no metadata copy could be written: {'; '.join(failed)}")
    pool.record_event("copy-metadata", {"generation": generation, "disks": targets})
    pool.meta.commit()
    return CopyReport(generation, size, digest, done, pruned, failed)


def _snapshot(pool: Pool, dest: Path) -> None:
    dest.unlink(missing_ok=True)
    with pool.meta.lock:
        pool.meta.commit()  # the snapshot then names only durable fragments
        target = sqlite3.connect(dest)
        try:
            pool.meta.conn.backup(target)
        finally:
            target.close()
    target = sqlite3.connect(dest)
    try:  # a copy is one self-contained file: no WAL beside it
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()


def _db_versions(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
        epoch = int(conn.execute("SELECT epoch FROM pool WHERE id = 1").fetchone()[0])
    finally:
        conn.close()
    return schema, epoch


def _place(metadata_dir: Path, snapshot: Path, manifest: Manifest) -> int:
    """Write one copy and its manifest; prune old generations. Returns files removed."""
    metadata_dir.mkdir(exist_ok=True)
    _copy_atomic(snapshot, metadata_dir / db_name(manifest.generation))
    _write_atomic(metadata_dir / manifest_name(manifest.generation), manifest.dumps().encode())
    keep = _generations(metadata_dir)[-KEEP:]
    removed = 0
    for generation in _generations(metadata_dir):
        if generation in keep:
            continue
        for name in (manifest_name(generation), db_name(generation)):
            try:
                (metadata_dir / name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed


# -- finding copies -----------------------------------------------------------------------
@dataclass
class FoundCopy:
    disk: str
    path: str
    generation: int
    pool_uuid: str
    created: float
    size: int
    valid: bool
    problem: str = ""


def check_database(path: Path) -> str:
    """'' when `path` is a readable DynamicFS metadata database, else what is wrong."""
    if not path.exists():
        return "missing"
    try:
        conn = sqlite3.connect(path)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    try:
        result = conn.execute("PRAGMA quick_check").fetchone()
        if not result or result[0] != "ok":
            return f"integrity check failed: {result[0] if result else 'no answer'}"
        row = conn.execute("SELECT uuid FROM pool WHERE id = 1").fetchone()
        if row is None:
            return "no pool row"
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    return ""


def _db_pool_uuid(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT uuid FROM pool WHERE id = 1").fetchone()[0])
    finally:
        conn.close()


def find_copies(disk_dir: Path) -> list[FoundCopy]:
    """Every metadata copy on one disk, newest first, each checked."""
    out = []
    metadata_dir = disk_dir / METADATA_DIR
    try:
        label_pool = read_label(disk_dir).pool_uuid
    except LabelError:
        label_pool = None
    for generation in reversed(_generations(metadata_dir)):
        db = metadata_dir / db_name(generation)
        copy = FoundCopy(str(disk_dir), str(db), generation, "", 0.0, 0, False)
        out.append(copy)
        try:
            manifest = Manifest.loads((metadata_dir / manifest_name(generation)).read_text())
        except (OSError, ValueError, KeyError) as exc:
            copy.problem = f"manifest: {exc}"
            continue
        copy.pool_uuid, copy.created, copy.size = (manifest.pool_uuid, manifest.created,
                                                   manifest.size)
        if label_pool is not None and label_pool != manifest.pool_uuid:
            copy.problem = "the disk's label names another pool"
            continue
        try:
            size, digest = file_checksum(db)
        except OSError as exc:
            copy.problem = f"unreadable: {exc.strerror}"
            continue
        if (size, digest) != (manifest.size, manifest.blake3):
            copy.problem = "size or BLAKE3 differs from the manifest"
            continue
        problem = check_database(db)
        if not problem and _db_pool_uuid(db) != manifest.pool_uuid:
            problem = "the database names another pool"
        copy.problem = problem
        copy.valid = not problem
    return out


# -- recovery -----------------------------------------------------------------------------
@dataclass
class RecoverReport:
    pool: str
    source: str
    generation: int
    copied_at: float
    pool_uuid: str
    epoch: int
    moved_aside: list[str]
    disks_moved: list[str]
    candidates: list[FoundCopy]
    notes: list[str]


def _disks_file(pool_dir: Path) -> tuple[str | None, list[str]]:
    try:
        doc = json.loads((pool_dir / DISKS_FILE).read_text())
        return doc.get("pool_uuid"), [str(d["path"]) for d in doc.get("disks", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, []


def recover(pool_dir: Path | str, disks: list[str] | None = None, from_disk: str | None = None,
            force: bool = False) -> RecoverReport:
    """Restore the newest valid metadata copy into POOL/pool.db."""
    pool_dir = Path(pool_dir).absolute()
    if not pool_dir.is_dir():
        raise PoolError(f"pool directory {pool_dir} does not exist")
    lock = PoolLock(pool_dir)
    had_lock_file = lock.path.exists()
    lock.acquire()
    try:
        return _recover(pool_dir, disks or [], from_disk, force)
    finally:
        lock.release()
        if not had_lock_file and not (pool_dir / DB_NAME).exists():
            lock.path.unlink(missing_ok=True)  # nothing recovered: leave the directory as found


def _recover(pool_dir: Path, disks: list[str], from_disk: str | None,
             force: bool) -> RecoverReport:
    db = pool_dir / DB_NAME
    problem = check_database(db)
    if not problem and not force:
        raise PoolError(f"{db} is a valid metadata database; pass --force to replace it "
                        "with the newest copy from the disks")
    expected, listed = _disks_file(pool_dir)
    if not problem:
        expected = expected or _db_pool_uuid(db)
    dirs = [Path(from_disk).absolute()] if from_disk else \
        list(dict.fromkeys(Path(d).absolute() for d in [*disks, *listed]))
    if not dirs:
        raise PoolError(f"no disks known for {pool_dir} (no {DISKS_FILE}); name each disk "
                        "of the pool with --disk DIR")
    for d in dirs:
        if d.exists() and not d.is_dir():
            raise PoolError(f"disk {d} is not a directory; name the pool's disk directories "
                            "with --disk DIR")
    candidates = [c for d in dirs for c in find_copies(d)]
    valid = [c for c in candidates if c.valid and (expected is None or c.pool_uuid == expected)]
    pools = sorted({c.pool_uuid for c in valid})
    if len(pools) > 1:
        raise PoolError(f"the disks hold metadata of several pools ({', '.join(pools)}); "
                        "pick one disk with --from DISK")
    if not valid:
        where = ", ".join(str(d) for d in dirs)
        raise PoolError(f"no valid metadata copy found on {where}; name the pool's disks "
                        "with --disk DIR")
    best = max(valid, key=lambda c: (c.generation, c.created))
    staged = pool_dir / f".{DB_NAME}.recovering"
    try:
        shutil.copyfile(best.path, staged)
        epoch, moved = _adapt(staged, best.pool_uuid, dirs)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    aside = _move_aside(pool_dir, "replaced" if not problem else "corrupt")
    os.replace(staged, db)
    _fsync_dir(pool_dir)
    notes = [f"changes made after this copy ({time.ctime(best.created)}) are lost: files "
             "written since then may read as I/O errors or be missing",
             "next: 'dynamicfs fsck --repair', then 'dynamicfs scrub' and "
             "'dynamicfs cleanup-orphans'"]
    return RecoverReport(str(pool_dir), best.path, best.generation, best.created,
                         best.pool_uuid, epoch, aside, moved, candidates, notes)


def _adapt(staged: Path, pool_uuid: str, dirs: list[Path]) -> tuple[int, list[str]]:
    """Raise the epoch above every fragment on the disks; follow disks that moved."""
    conn = sqlite3.connect(staged)
    try:
        epoch = int(conn.execute("SELECT epoch FROM pool WHERE id = 1").fetchone()[0])
        known = dict(conn.execute("SELECT uuid, path FROM disks").fetchall())
        paths = set(known.values()) | {str(d) for d in dirs}
        moved = []
        for d in dirs:
            try:
                label = read_label(d)
            except LabelError:
                continue
            if label.pool_uuid == pool_uuid and label.disk_uuid in known \
                    and known[label.disk_uuid] != str(d) and str(d) not in known.values():
                conn.execute("UPDATE disks SET path = ? WHERE uuid = ?", (str(d), label.disk_uuid))
                moved.append(f"disk {label.disk_uuid}: {known[label.disk_uuid]} -> {d}")
        for path in paths:
            disk = DirectoryDisk(path)
            for ref, _ in disk.list_fragments():
                epoch = max(epoch, ref.id >> ID_BITS)
            for seg in disk.segments():  # named after fragment ids, walkable or not
                epoch = max(epoch, seg.segment >> ID_BITS)
        conn.execute("UPDATE pool SET epoch = ? WHERE id = 1", (epoch,))
        conn.commit()
    finally:
        conn.close()
    return epoch, moved


_DB_SUFFIXES = ("", "-wal", "-shm")  # the database and SQLite's files beside it


def _move_aside(pool_dir: Path, why: str) -> list[str]:
    """Rename the database (and its -wal, -shm) to pool.db.WHY-STAMP; STAMP gains a
    counter when that name is taken (two recoveries within a second)."""
    stamp = base = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while any((pool_dir / f"{DB_NAME}.{why}-{stamp}{suffix}").exists()
              for suffix in _DB_SUFFIXES):
        n += 1
        stamp = f"{base}.{n}"
    moved = []
    for suffix in _DB_SUFFIXES:
        path = pool_dir / f"{DB_NAME}{suffix}"
        if path.exists():
            dest = pool_dir / f"{DB_NAME}.{why}-{stamp}{suffix}"
            os.replace(path, dest)
            moved.append(str(dest))
    return moved


class PeriodicCopier(Periodic):
    """In the mount daemon: a metadata copy every INTERVAL seconds while the metadata
    changes (it commits), and one at unmount (`final()`)."""

    INTERVAL = 60.0
    THREAD_NAME = "dynamicfs-metacopy"

    def __init__(self, pool: Pool, interval: float = INTERVAL) -> None:
        super().__init__(interval)
        self.pool = pool
        self._copied_at = -1  # MetaStore.commits right after the last copy

    def tick(self) -> bool:
        return self.copy_if_changed()

    def copy_if_changed(self) -> bool:
        if self.pool.meta.commits == self._copied_at and not self.pool.meta.dirty:
            return False
        try:
            report = copy_metadata(self.pool)
        except (DynamicFSError, OSError, sqlite3.Error) as exc:
            warn("metadata copy failed", reason=str(exc))
            return False
        self._copied_at = self.pool.meta.commits
        log("metadata copied", generation=report.generation, disks=len(report.disks))
        return True

    def final(self) -> None:
        """At unmount, after the last commit: the copies then match the database."""
        self.stop()
        self.copy_if_changed()
