"""The integrity commands on a mounted pool: they run inside the mount daemon, through
its control socket, and what they repair is read back through the mount."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from dynamicfs.disks.directory import FragmentRef
from fragment_spot import FragmentSpot
from fusehelpers import cli, mounted_pool

pytestmark = pytest.mark.fuse


def fragment_files(pool_dir: Path, name: str) -> list[Path]:
    """The fragments of the first extent of the file called `name`."""
    conn = sqlite3.connect(f"file:{pool_dir / 'pool.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT d.path, f.id, f.segment, f.offset, f.size FROM fragments f "
            "JOIN disks d ON d.id = f.disk_id "
            "WHERE f.extent_id = (SELECT x.extent_id FROM file_extents x JOIN dentries e "
            "ON e.ino = x.ino WHERE e.name = ? ORDER BY x.chunk LIMIT 1) ORDER BY f.idx",
            (name.encode(),)).fetchall()
    finally:
        conn.close()
    return [FragmentSpot(r[0], FragmentRef(*r[1:])) for r in rows]


def test_scrub_fsck_and_friends_run_inside_the_mount_daemon(
        tmp_path: Path, fuse_available: None) -> None:
    data = os.urandom(600_000)
    with mounted_pool(tmp_path, disks=7, default_policy="ec:4+2",
                      extent_size=128 * 1024) as m:
        with open(m / "file", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        frags = fragment_files(m.pool, "file")
        assert len(frags) == 6
        frags[0].unlink()
        frags[4].write_bytes(b"rot")

        done = cli("scrub", m.pool, "--repair", "--json")
        r = json.loads(done.stdout)
        assert r["repaired"] == 1 and r["clean"]
        assert [p["paths"] for p in r["problems"]] == [["/file"]]
        assert (m / "file").read_bytes() == data

        assert json.loads(cli("fsck", m.pool, "--json").stdout)["clean"]
        r = json.loads(cli("what-if", m.pool, "--fail", "1", "--json").stdout)
        assert not r["loses_data"]
        assert cli("detect-orphans", m.pool, check=False).returncode == 0
        r = json.loads(cli("copy-metadata", m.pool, "--json").stdout)
        assert r["generation"] == 1 and len(r["disks"]) == 3

        refused = cli("recover-metadata", m.pool, "--force", check=False)
        assert refused.returncode != 0
        assert "mounted" in refused.stderr and len(refused.stderr.splitlines()) == 1
