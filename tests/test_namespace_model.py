"""File data through the namespace matches a bytearray model, whatever the mix of writes at
any offset, truncates, reads, fsyncs, reopens of the file and reopens of the whole pool.

The pool uses 64 KiB extents so that small writes cross extent boundaries often. After
every sync the metadata is checked too: exactly the chunks holding a non-zero byte have
an extent (holes store nothing), and no extent outlives the last file that refers to it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.engine.pool import Pool
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import POLICY_XATTR, ROOT_INO
from test_engine_support import KiB, PoolMaker

E = 64 * KiB
MAX_SIZE = 12 * E


class Harness:
    """A namespace over a real pool that can be closed and reopened like a mount."""

    def __init__(self, maker: PoolMaker, policy: str, commit_interval: float) -> None:
        self.maker = maker
        self.commit_interval = commit_interval
        self.pool = maker(6, extent_size=E)
        self.ns = Namespace(self.pool, commit_interval=commit_interval)
        self.ns.setxattr(ROOT_INO, POLICY_XATTR, policy.encode())

    def remount(self) -> None:
        self.ns.close()
        self.pool = self.maker.reopen(self.pool)
        self.ns = Namespace(self.pool, commit_interval=self.commit_interval)

    def close(self) -> None:
        self.ns.close()


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


def boundary_offset(rng: random.Random, size: int) -> int:
    """Offsets near extent boundaries, inside the file, at its end or beyond."""
    choice = rng.random()
    if choice < 0.5:
        return max(0, rng.randrange(0, MAX_SIZE // E + 1) * E + rng.randint(-3, 3))
    if choice < 0.7:
        return size
    return rng.randrange(0, MAX_SIZE)


def payload(rng: random.Random, n: int) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return bytes(n)  # zeros: may turn a chunk into a hole
    if kind < 0.3:
        return bytes([rng.randrange(1, 256)]) * n
    return rng.randbytes(n)


def check_metadata(pool: Pool, ino: int, model: bytearray) -> None:
    with pool.meta.read() as conn:
        chunks = {r[0] for r in conn.execute(
            "SELECT chunk FROM file_extents WHERE ino = ?", (ino,))}
        extents = conn.execute("SELECT count(*) FROM extents").fetchone()[0]
        referenced = conn.execute(
            "SELECT count(DISTINCT extent_id) FROM file_extents").fetchone()[0]
        dangling = conn.execute("SELECT count(*) FROM file_extents f LEFT JOIN extents e "
                                "ON e.id = f.extent_id WHERE e.id IS NULL").fetchone()[0]
    nonzero = {c for c in range((len(model) + E - 1) // E) if any(model[c * E:(c + 1) * E])}
    assert chunks == nonzero
    assert extents == referenced
    assert dangling == 0


def check_contents(ns: Namespace, ino: int, model: bytearray) -> None:
    assert ns.getattr(ino).size == len(model)
    assert ns.read(ino, 0, MAX_SIZE * 2) == bytes(model)


@pytest.mark.parametrize(("seed", "policy", "commit_interval"), [
    (1, "replicate:2", 5.0),
    (2, "ec:4+2", 5.0),
    (3, "replicate:3", 0.01),  # the background committer runs between the operations
    (4, "ec:2+1", 0.01),
])
def test_file_data_matches_a_model_through_random_operations(
        make_pool: PoolMaker, seed: int, policy: str, commit_interval: float) -> None:
    rng = random.Random(seed)
    h = Harness(make_pool, policy, commit_interval)
    ino = h.ns.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    model = bytearray()
    is_open = True
    try:
        for step in range(220):
            op = rng.random()
            if not is_open:
                h.ns.open(ino)
                is_open = True
            if op < 0.40:
                offset = boundary_offset(rng, len(model))
                n = min(rng.choice([1, 7, 4096, E - 1, E, E + 1, 2 * E + 5, 3 * E]),
                        MAX_SIZE - offset)
                if n <= 0:
                    continue
                data = payload(rng, n)
                assert h.ns.write(ino, offset, data) == n
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset: offset + n] = data
            elif op < 0.52:
                size = rng.choice([0, rng.randrange(0, len(model) + 1), boundary_offset(
                    rng, len(model)), len(model) + rng.randrange(1, 2 * E)])
                size = min(size, MAX_SIZE)
                h.ns.setattr(ino, size=size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.75:
                offset = boundary_offset(rng, len(model))
                n = rng.choice([1, 100, E, 2 * E + 3, MAX_SIZE])
                assert h.ns.read(ino, offset, n) == bytes(model[offset: offset + n]), step
            elif op < 0.85:
                h.ns.fsync(ino)
                check_metadata(h.pool, ino, model)
            elif op < 0.95:
                h.ns.release(ino)
                is_open = False
            else:
                h.ns.release(ino)
                is_open = False
                h.remount()
                check_metadata(h.pool, ino, model)
                check_contents(h.ns, ino, model)
        check_contents(h.ns, ino, model)
        if is_open:
            h.ns.release(ino)
        h.remount()
        check_contents(h.ns, ino, model)
        check_metadata(h.pool, ino, model)
    finally:
        h.close()


def test_two_files_sharing_nothing_stay_independent(make_pool: PoolMaker) -> None:
    rng = random.Random(9)
    h = Harness(make_pool, "replicate:2", 5.0)
    inos = [h.ns.create(ROOT_INO, name, 0o644, 0, 0).ino for name in (b"a", b"b")]
    models = [bytearray(), bytearray()]
    try:
        for _ in range(80):
            i = rng.randrange(2)
            offset = boundary_offset(rng, len(models[i]))
            data = payload(rng, rng.choice([1, E, E + 3]))
            h.ns.write(inos[i], offset, data)
            models[i].extend(bytes(max(0, offset - len(models[i]))))
            models[i][offset: offset + len(data)] = data
        for ino in inos:
            h.ns.release(ino)
        h.remount()
        for ino, model in zip(inos, models, strict=True):
            check_contents(h.ns, ino, model)
    finally:
        h.close()
