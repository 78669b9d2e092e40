"""Real pools for the integrity tests: built with admin functions, filled through the
namespace in-process, damaged by touching real segment files and disk directories."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.cli.main import main
from dynamicfs.disks.directory import FragmentRef
from dynamicfs.engine.pool import Pool
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO
from fragment_spot import FragmentSpot

EXTENT = 64 * 1024


def make_pool(tmp_path: Path, disks: int = 6, policy: str = "ec:4+2",
              extent_size: int = EXTENT) -> Path:
    pool_dir = tmp_path / "pool"
    init_pool(pool_dir, extent_size, policy)
    with Pool.open(pool_dir) as pool:
        for i in range(disks):
            disk = tmp_path / f"disk{i}"
            disk.mkdir()
            add_disk(pool, disk)
    return pool_dir


def data_of(name: str, size: int) -> bytes:
    """Deterministic, incompressible bytes, different per name."""
    return blake3.blake3(name.encode()).digest(length=size)


def _lookup_parent(ns: Namespace, path: str, create: bool) -> tuple[int, bytes]:
    parts = [p for p in path.split("/") if p]
    parent = ROOT_INO
    for name in parts[:-1]:
        try:
            parent = ns.lookup(parent, name.encode()).ino
        except OSError:
            if not create:
                raise
            parent = ns.mkdir(parent, name.encode(), 0o755, 0, 0).ino
    return parent, parts[-1].encode()


def write_files(pool_dir: Path, files: dict[str, bytes]) -> None:
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        try:
            for path, data in files.items():
                parent, name = _lookup_parent(ns, path, create=True)
                ino = ns.create(parent, name, 0o644, 0, 0).ino
                ns.write(ino, 0, data)
                ns.release(ino)
            ns.sync_all()
        finally:
            ns.close()


def read_file(pool_dir: Path, path: str) -> bytes:
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        try:
            parent, name = _lookup_parent(ns, path, create=False)
            attr = ns.lookup(parent, name)
            assert stat.S_ISREG(attr.mode)
            return ns.read(attr.ino, 0, attr.size)
        finally:
            ns.close()


def fragment_paths(pool_dir: Path, path: str) -> list[list[FragmentSpot]]:
    """Per extent of the file (in chunk order): its fragments, in index order."""
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        try:
            parent, name = _lookup_parent(ns, path, create=False)
            ino = ns.lookup(parent, name).ino
        finally:
            ns.close()
        with pool.meta.read() as conn:
            extents = [r[0] for r in conn.execute(
                "SELECT extent_id FROM file_extents WHERE ino = ? ORDER BY chunk", (ino,))]
            out = []
            for extent_id in extents:
                rows = conn.execute("SELECT disk_id, id, segment, offset, size FROM fragments "
                                    "WHERE extent_id = ? ORDER BY idx", (extent_id,)).fetchall()
                out.append([FragmentSpot(pool.disks[r[0]].path, FragmentRef(*r[1:]))
                            for r in rows])
        return out


def flip_byte(where: FragmentSpot | Path, offset: int = -10) -> None:
    """Invert one byte of a fragment, or of a file (negative offsets count from the end)."""
    if isinstance(where, FragmentSpot):
        where.flip(offset)
        return
    with open(where, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def cli(*args: str) -> int:
    """Run the dynamicfs command line in-process; returns its exit code."""
    return main(list(args))
