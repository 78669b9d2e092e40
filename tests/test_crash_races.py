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
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fusehelpers import mounted_pool, wait_gone

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
