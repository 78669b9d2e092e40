"""Races the crash workload (tests/crashload.py) found, each checked on its own through
a real mount.

- A file destroyed while its data is still being written back must not disturb other
  files: their fsync succeeds, their size stays what was written, and after a crash of
  the mount daemon they read back as fsynced. (The namespace once waited for such
  write-back in the middle of the unlink's metadata change: meanwhile a concurrent
  fsync failed with EIO, and the size and mtime another writer had just set were
  dropped from the inode cache, so the file came back short.)
- Truncating a file just closed (its data still in flight) and extending it again
  reads zeros past the cut. (The truncate once trimmed the last chunk in a file state
  the flusher had just dropped, so the old bytes came back.)
- A file being written while another one is fsynced: after a crash it is shorter, or
  empty, never padded with zeros. (The group commit once stored the size of every file
  as the writers had set it, although the bytes still sat in the daemon's buffers:
  after a kill -9 the file read as zeros where they belonged.)
- A file written (not fsynced) and renamed over another, then the directory fsynced,
  then a crash: the name holds the old file or the new one whole. (Until the rename
  waited for the new file's data to be recorded, the directory's fsync committed the
  rename alone, and the name came back as an empty file.)
- Fragments dropped without ever being named by metadata (the data of a file
  destroyed while it was written back) are deleted only once a sync in flight is
  done with them. (They were once deleted under a commit's sync, which then failed:
  the fsync that started it got ENOENT and the whole transaction was rolled back, so
  files other programs had just created vanished.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.disks.faulty import FaultyDisk
from fusehelpers import mounted_pool, wait_gone
from test_engine_support import REP3, KiB, PoolMaker

pytestmark = pytest.mark.fuse


def churn(mnt: Path, stop: threading.Event, errors: list[str]) -> None:
    """Write a few MiB to a file and unlink it while its write-back is in flight."""
    i = 0
    while not stop.is_set():
        i += 1
        path = mnt / f"big{i}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, os.urandom(3 << 20))
            os.unlink(path)  # still open: destroyed at release, with data in flight
            os.close(fd)
        except OSError as exc:
            errors.append(f"churn: {exc}")


def append_and_fsync(path: Path, errors: list[str]) -> bytes:
    """Append lines for 3 seconds, fsync every fourth, check the size after each."""
    record = b""
    with open(path, "wb", buffering=0) as f:
        deadline = time.monotonic() + 3
        n = 0
        while time.monotonic() < deadline and not errors:
            n += 1
            line = f"{n:08d}\n".encode() * 16
            try:
                f.write(line)
                record += line
                if n % 4 == 0:
                    os.fsync(f.fileno())
            except OSError as exc:
                errors.append(f"write or fsync {n}: {exc}")
            size = os.fstat(f.fileno()).st_size
            if size != len(record):
                errors.append(f"size {size} after writing {len(record)} bytes")
        try:
            os.fsync(f.fileno())
        except OSError as exc:
            errors.append(f"last fsync: {exc}")
    return record


def test_unlinking_a_file_with_data_in_flight_leaves_other_files_alone(
        tmp_path: Path, fuse_available: None) -> None:
    with mounted_pool(tmp_path, disks=6) as m:
        stop = threading.Event()
        errors: list[str] = []
        other = threading.Thread(target=churn, args=(m.mnt, stop, errors))
        other.start()
        try:
            record = append_and_fsync(m / "log", errors)
        finally:
            stop.set()
            other.join()
        assert errors == []
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        wait_gone(m.pid)
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
        m.pid = None
        m.mount()
        assert (m / "log").read_bytes() == record


def test_truncate_then_extend_right_after_close_reads_zeros_past_the_cut(
        tmp_path: Path, fuse_available: None) -> None:
    with mounted_pool(tmp_path, disks=4) as m:
        wrong = []
        for i in range(30):
            path = m / f"f{i}"
            data = os.urandom(72_020)
            path.write_bytes(data)  # the release, and so the write-back, comes after close
            os.truncate(path, 49_165)
            os.truncate(path, 171_291)
            if path.read_bytes() != data[:49_165] + bytes(171_291 - 49_165):
                wrong.append(path.name)
        assert wrong == []
        m.remount()
        assert [p.name for p in sorted(m.mnt.iterdir())
                if p.read_bytes()[49_165:] != bytes(171_291 - 49_165)] == []


def test_a_file_written_but_not_synced_comes_back_short_after_a_crash_never_zero_padded(
        tmp_path: Path, fuse_available: None) -> None:
    data = {name: os.urandom(size) for name, size in
            (("small", 300 * 1024), ("across", 2_500_000))}
    with mounted_pool(tmp_path, disks=4) as m:
        with open(m / "appended", "wb") as f:
            f.write(b"kept" * 4096)
            f.flush()
            os.fsync(f.fileno())
        handles = {name: open(m / name, "wb") for name in data}  # noqa: SIM115
        appended = open(m / "appended", "ab")  # noqa: SIM115
        try:
            for name, f in handles.items():
                f.write(data[name])
                f.flush()
            appended.write(b"more" * 4096)
            appended.flush()
            with open(m / "synced", "wb") as f:  # its fsync commits the others' metadata
                f.write(b"synced")
                f.flush()
                os.fsync(f.fileno())
            assert m.pid is not None
            os.kill(m.pid, signal.SIGKILL)
            wait_gone(m.pid)
        finally:
            for f in [*handles.values(), appended]:
                with contextlib.suppress(OSError):
                    f.close()
        m.pid = None
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
        m.mount()
        assert (m / "synced").read_bytes() == b"synced"
        for name, written in data.items():
            back = (m / name).read_bytes()
            assert written.startswith(back), f"{name}: {len(back)} bytes, not a prefix"
        back = (m / "appended").read_bytes()
        assert (b"kept" * 4096 + b"more" * 4096).startswith(back)
        assert back.startswith(b"kept" * 4096)


def test_a_file_renamed_over_another_comes_back_old_or_new_whole_after_a_crash(
        tmp_path: Path, fuse_available: None) -> None:
    old, new = os.urandom(200_000), os.urandom(300_000)
    with mounted_pool(tmp_path, disks=4) as m:
        (m / "d").mkdir()
        names = [f"config{i}" for i in range(5)]
        for name in names:
            with open(m / "d" / name, "wb") as f:
                f.write(old)
                f.flush()
                os.fsync(f.fileno())
        dirfd = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in names:  # the usual replace: write a copy, close, rename over
                (m / "d" / f"{name}.tmp").write_bytes(new)
                os.rename(m / "d" / f"{name}.tmp", m / "d" / name)
                os.fsync(dirfd)  # commits at once: it waits for no file's data
        finally:
            os.close(dirfd)
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        wait_gone(m.pid)
        m.pid = None
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
        m.mount()
        back = {name: (m / "d" / name).read_bytes() for name in names}
        assert {name: len(b) for name, b in back.items() if b not in (old, new)} == {}


class SlowSync(FaultyDisk):
    """A disk whose sync() waits until `release` is set (and says when it started)."""

    def __init__(self, inner: DirectoryDisk) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def sync(self, fragment_ids: Iterable[int]) -> None:
        ids = list(fragment_ids)
        self.entered.set()
        self.release.wait(30)
        super().sync(ids)


def wait_any(events: list[threading.Event], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not any(e.is_set() for e in events):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_fragments_dropped_during_a_sync_are_deleted_after_it(tmp_path: Path) -> None:
    with PoolMaker(tmp_path) as make:
        pool = make(3)
        store = pool.store
        slow = {d: SlowSync(b) for d, b in pool.backends.items()}
        pool.backends.update(slow)  # type: ignore[arg-type]
        written = store.write([(os.urandom(64 * KiB), REP3)])
        outcome: list[BaseException | None] = []

        def sync() -> None:
            try:
                store.sync_pending()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        syncing = threading.Thread(target=sync)
        syncing.start()
        assert wait_any([s.entered for s in slow.values()]), "no sync started"
        dropping = threading.Thread(target=store.discard, args=(written,))
        dropping.start()
        time.sleep(0.3)  # discard, if it does not wait, deletes the files now
        for s in slow.values():
            s.release.set()
        syncing.join(30)
        dropping.join(30)
        assert outcome == [None]
        assert not any(pool.backends[r.disk_id].fragment_exists(r.ref)
                       for w in written for r in w.info.fragments)
