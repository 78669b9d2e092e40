"""Self-healing in a real mount: when a disk fails, the mount daemon rebuilds every
extent that had a fragment there in the background, while files stay readable, and
`status` reports the rebuild."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from fusehelpers import cli, mounted_pool

pytestmark = pytest.mark.fuse


def _status(pool: Path) -> dict:  # type: ignore[type-arg]
    return dict(json.loads(cli("status", pool, "--json").stdout))


def test_a_failed_disk_is_rebuilt_in_the_background_while_files_stay_readable(
        tmp_path: Path, fuse_available: None) -> None:
    rng = random.Random(7)
    with mounted_pool(tmp_path, disks=7) as m:
        files = {f"f{i}": rng.randbytes(rng.choice([3000, 300_000, 5 * 1024 * 1024]))
                 for i in range(12)}
        for name, data in files.items():
            with open(m / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        listing = json.loads(cli("list-disks", m.pool, "--json").stdout)
        victim = max(listing, key=lambda d: d["fragments"])["id"]
        cli("fail-disk", m.pool, str(victim), "--force")
        deadline = time.monotonic() + 90
        while True:
            status = _status(m.pool)
            # The pass's state is saved when its round ends, just after its last record.
            rebuild = status.get("rebuild")
            if status["under_redundant"] == 0 and status["unreadable"] == 0 and \
                    rebuild is not None and not rebuild["active"]:
                break
            assert time.monotonic() < deadline, f"rebuild did not finish: {status}"
            time.sleep(0.5)
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        rebuild = status.get("rebuild")
        assert rebuild is not None and rebuild["done"] > 0 and not rebuild["active"]
        listing = json.loads(cli("list-disks", m.pool, "--json").stdout)
        assert [d["fragments"] for d in listing if d["id"] == victim] == [0]
