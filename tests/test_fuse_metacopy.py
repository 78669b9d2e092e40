"""Metadata copies made by the mount daemon: at unmount (and every minute while the
metadata changes) the database is copied to three disks; when `pool.db` is lost,
`recover-metadata` brings the pool back and every file reads back."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.metacopy import PeriodicCopier
from fusehelpers import cli, mounted_pool


def copies(disks: list[Path]) -> list[Path]:
    return sorted(p for d in disks for p in (d / "metadata").glob("pool-*.db"))


@pytest.mark.fuse
def test_the_daemon_copies_metadata_at_unmount_and_a_lost_database_is_recovered(
        tmp_path: Path, fuse_available: None) -> None:
    data = random.Random(5).randbytes(300_000)
    with mounted_pool(tmp_path) as m:
        (m / "keep").write_bytes(data)
        m.unmount()
        assert len({p.parent for p in copies(m.disks)}) == 3
        (m.pool / "pool.db").unlink()
        for extra in ("pool.db-wal", "pool.db-shm"):
            (m.pool / extra).unlink(missing_ok=True)
        refused = cli("mount", m.pool, m.mnt, check=False)
        assert refused.returncode != 0 and "recover-metadata" in refused.stderr
        cli("recover-metadata", m.pool)
        m.mount()
        assert (m / "keep").read_bytes() == data


def test_a_periodic_copy_follows_changes_only(tmp_path: Path) -> None:
    init_pool(tmp_path / "pool")
    with Pool.open(tmp_path / "pool") as pool:
        disks = []
        for i in range(3):
            disk = tmp_path / f"disk{i}"
            disk.mkdir()
            add_disk(pool, disk)
            disks.append(disk)
        copier = PeriodicCopier(pool, interval=0.05)
        assert copier.copy_if_changed()  # a first copy
        assert not copier.copy_if_changed()  # nothing changed since
        pool.record_event("test", {})
        pool.meta.commit()
        copier.start()
        deadline = time.monotonic() + 10
        while len(copies(disks)) < 2 * 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        copier.stop()
        assert len(copies(disks)) == 2 * 3  # two generations on each of three disks
        assert all(os.path.getsize(p) > 0 for p in copies(disks))
