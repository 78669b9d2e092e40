"""FaultyDisk does what its rules say, on real directories; a pool survives a disk that
stops persisting writes (a crash of that disk) and rebuilds what it lost."""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.directory import DirectoryDisk, FragmentRef
from dynamicfs.disks.faulty import (
    ENV_VAR,
    FaultRule,
    FaultSpecError,
    FaultyDisk,
    parse_spec,
    wrap_backends,
)
from test_engine_support import (
    EC42,
    KiB,
    PoolMaker,
    fragment_ref,
    fragments,
    read_fresh,
    store,
)


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


@pytest.fixture
def disk(tmp_path: Path) -> DirectoryDisk:
    (tmp_path / "d").mkdir()
    disk = DirectoryDisk(tmp_path / "d")
    disk.prepare()
    return disk


def write(d: DirectoryDisk | FaultyDisk, fid: int, payload: bytes = b"payload") -> FragmentRef:
    header = fragfmt.make_header(1, fid, 0, payload)
    segment, offset = d.write_fragment(fid, header, payload)
    return FragmentRef(fid, segment, offset, len(header) + len(payload))


def ids_on(disk: DirectoryDisk) -> list[int]:
    return sorted(ref.id for ref, _ in disk.list_fragments())


def test_the_third_write_fails_and_the_others_pass(disk: DirectoryDisk) -> None:
    faulty = FaultyDisk(disk, [FaultRule("write", "eio", after=2, times=1)])
    outcomes = []
    for fid in range(1, 6):
        try:
            write(faulty, fid)
            outcomes.append("ok")
        except OSError as exc:
            outcomes.append(errno.errorcode[exc.errno or 0])
    assert outcomes == ["ok", "ok", "EIO", "ok", "ok"]
    assert ids_on(disk) == [1, 2, 4, 5]
    assert faulty.injected == [("write", "eio", 3)]


def test_enospc_writes_nothing_and_a_short_write_leaves_half_a_file(disk: DirectoryDisk) -> None:
    full = FaultyDisk(disk, [FaultRule("write", "enospc")])
    with pytest.raises(OSError) as failure:
        write(full, 1)
    assert failure.value.errno == errno.ENOSPC and ids_on(disk) == []
    short = FaultyDisk(disk, [FaultRule("write", "short")])
    payload = bytes(1000)
    with pytest.raises(OSError) as failure:
        write(short, 2, payload)
    assert failure.value.errno == errno.EIO
    # Half a record ends its segment (named after it): the next write starts another.
    assert disk.segment_path(2).stat().st_size == fragfmt.HEADER_SIZE + 500
    assert ids_on(disk) == []
    ref = write(disk, 3)
    assert ref.segment == 3 and ids_on(disk) == [3]


def test_reads_fail_or_come_back_with_one_bit_flipped(disk: DirectoryDisk) -> None:
    ref = write(disk, 1, bytes(100))
    raw = disk.read_fragment(ref)
    flipped = FaultyDisk(disk, [FaultRule("read", "bitflip", at=90, times=1)])
    bad = flipped.read_fragment(ref)
    assert [i for i in range(len(raw)) if raw[i] != bad[i]] == [90]
    assert bin(raw[90] ^ bad[90]).count("1") == 1
    assert flipped.read_fragment(ref) == raw  # times=1
    failing = FaultyDisk(disk, [FaultRule("read", "eio")])
    with pytest.raises(OSError):
        failing.read_fragment(ref)
    assert disk.read_fragment(ref) == raw  # the file itself is untouched


def test_sync_faults_hit_both_sync_calls(disk: DirectoryDisk) -> None:
    ref = write(disk, 1)
    faulty = FaultyDisk(disk, [FaultRule("sync", "eio", after=1)])
    faulty.sync([ref])
    with pytest.raises(OSError):
        faulty.sync([ref])
    with pytest.raises(OSError):
        faulty.sync_filesystem()
    faulty.heal()
    faulty.sync_filesystem()
    assert faulty.calls["sync"] == 4


def test_a_crashed_disk_drops_every_later_write_delete_and_sync(disk: DirectoryDisk) -> None:
    faulty = FaultyDisk(disk, [FaultRule("write", "crash", after=2)])
    refs = [write(faulty, fid) for fid in range(1, 5)]  # no error: the caller cannot tell
    faulty.delete_fragment(refs[0])
    faulty.sync(refs)
    assert faulty.crashed
    assert ids_on(disk) == [1, 2]
    assert not disk.fragment_exists(refs[2])


def test_fault_specs_parse_into_rules_per_disk() -> None:
    rules = parse_spec("disk=2:write:eio:after=3; read:bitflip:times=1:at=100,"
                       "disk=2:sync:EIO")
    assert rules == {
        2: [FaultRule("write", "eio", after=3), FaultRule("sync", "eio")],
        None: [FaultRule("read", "bitflip", times=1, at=100)],
    }
    assert parse_spec("") == {}


@pytest.mark.parametrize("spec", ["write", "disk=x:write:eio", "write:bitflip",
                                  "read:eio:when=3", "erase:eio", "write:melt",
                                  "write:eio:after=-1"])
def test_malformed_fault_specs_are_refused(spec: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_spec(spec)


def test_wrap_backends_reads_the_environment(make_pool: PoolMaker,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool(6)
    monkeypatch.setenv(ENV_VAR, "disk=2:write:enospc;disk=5:read:eio")
    wrapped = wrap_backends(pool)
    assert sorted(wrapped) == [2, 5]
    assert all(pool.backends[d] is wrapped[d] for d in wrapped)
    data = random.Random(1).randbytes(30 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    assert 2 not in {d for _, _, _, d in fragments(pool, extent_id)}
    assert read_fresh(pool, extent_id) == data
    with pytest.raises(FaultSpecError):
        wrap_backends(pool, "disk=99:read:eio")


def test_a_pool_survives_a_disk_that_stopped_persisting_writes(make_pool: PoolMaker) -> None:
    pool = make_pool(6)
    faulty = FaultyDisk(pool.backends[3], [FaultRule("write", "crash", after=4)])
    pool.backends[3] = faulty
    rng = random.Random(2)
    items = [(rng.randbytes(rng.randrange(1, 20 * KiB)), EC42) for _ in range(12)]
    ids = []
    for start in range(0, len(items), 3):
        ids += store(pool, items[start: start + 3])
    assert faulty.crashed
    pool = make_pool.reopen(pool)  # plain disks again: what reached disk 3 is all it has
    lost = [fid for fid, _, _, d in fragments(pool) if d == 3
            and not pool.backends[3].fragment_exists(fragment_ref(pool, fid))]
    assert len(lost) == 12 - 4
    for extent_id, (data, _) in zip(ids, items, strict=True):
        assert read_fresh(pool, extent_id) == data
    assert {pool.store.rebuild(e) for e in ids} == {"healthy", "repaired"}
    pool.meta.commit()
    assert all(pool.backends[d].fragment_exists(fragment_ref(pool, f))
               for f, _, _, d in fragments(pool))
