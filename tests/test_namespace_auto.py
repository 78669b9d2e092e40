"""The `auto` policy in the namespace: a file that grows past 4 MiB while it is written
ends erasure coded once closed; merely reading it later rewrites nothing, even when the
number of healthy disks (and so what `auto` means) has changed."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO
from test_engine_support import PoolMaker

MiB = 1024 * 1024


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    with PoolMaker(tmp_path) as maker:
        namespace = Namespace(maker(6), commit_interval=3600)
        yield namespace
        namespace.close()


def layout(ns: Namespace, ino: int) -> dict[int, tuple[int, str]]:
    with ns.pool.meta.read() as conn:
        rows = conn.execute("SELECT f.chunk, e.id, e.policy FROM file_extents f JOIN extents e "
                            "ON e.id = f.extent_id WHERE f.ino = ?", (ino,)).fetchall()
    return {chunk: (extent, policy) for chunk, extent, policy in rows}


def test_a_file_that_grew_past_4_mib_ends_erasure_coded_after_close(ns: Namespace) -> None:
    data = random.Random(1).randbytes(5 * MiB + 100)
    ino = ns.create(ROOT_INO, b"grows", 0o644, 0, 0).ino
    ns.write(ino, 0, data[:MiB])
    ns.fsync(ino)  # the first MiB is stored while the file is still small
    assert {p for _, p in layout(ns, ino).values()} == {"replicate:3"}
    ns.write(ino, MiB, data[MiB:])
    ns.release(ino)
    ns.sync_all()
    assert {p for _, p in layout(ns, ino).values()} == {"ec:4+2"}
    assert ns.read(ino, 0, len(data)) == data


def test_reading_an_auto_file_after_a_disk_failure_rewrites_nothing(ns: Namespace) -> None:
    data = random.Random(2).randbytes(6 * MiB)
    ino = ns.create(ROOT_INO, b"big", 0o644, 0, 0).ino
    ns.write(ino, 0, data)
    ns.release(ino)
    ns.sync_all()
    before = layout(ns, ino)
    assert {p for _, p in before.values()} == {"ec:4+2"}
    set_disk_health(ns.pool, "6", "failed")  # auto now means ec:3+2 for new data
    ns.open(ino)
    assert ns.read(ino, 0, len(data)) == data
    ns.release(ino)
    ns.sync_all()
    assert layout(ns, ino) == before
