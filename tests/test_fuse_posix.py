"""POSIX behaviour through a real mount: copying trees with real programs, random I/O
checked against a model file, concurrency, big offsets, mmap, renameat2."""

from __future__ import annotations

import ctypes
import errno
import mmap
import multiprocessing
import os
import random
import re
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamicfs.fuse.adapter import kernel_keeps_cache_right_around_direct_writes
from fusehelpers import Mount, cli, diff_r, have, mounted_pool, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    from conftest import fuse_missing_reason

    reason = fuse_missing_reason()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    with mounted_pool(tmp_path_factory.mktemp("posix")) as m:
        yield m


@pytest.fixture
def work(fs: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory in the mount for one test."""
    path = fs.mnt / request.node.name
    path.mkdir()
    return path


def build_tree(root: Path, seed: int = 1) -> None:
    """A small tree with every kind of thing cp -a, tar and rsync -aHX must keep."""
    rng = random.Random(seed)
    root.mkdir()
    nested = root / "dir one" / "nested" / "deeper"
    nested.mkdir(parents=True)
    files = {
        "empty": b"",
        "small.txt": b"hello\n",
        "odd": rng.randbytes(4095),
        "one-extent": rng.randbytes(MiB),
        "big.bin": rng.randbytes(3 * MiB + 17),
        "dir one/ünïcode-名前": b"unicode\n",
        "dir one/nested/deeper/file": rng.randbytes(70_000),
        "zeros": bytes(2 * MiB),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "private").write_bytes(b"secret")
    (root / "private").chmod(0o600)
    (root / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "tool").chmod(0o755)
    (root / "closed").mkdir(mode=0o700)
    (root / "closed" / "inside").write_bytes(b"in")
    (root / "shared").mkdir()
    (root / "shared").chmod(0o2775)
    os.symlink("small.txt", root / "link-rel")
    os.symlink("nowhere/at/all", root / "link-dangling")
    os.symlink("../big.bin", root / "dir one" / "link-up")
    os.link(root / "small.txt", root / "dir one" / "hard")
    os.link(root / "big.bin", root / "dir one" / "nested" / "hard-big")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "small.txt", "user.color", b"blue")
    os.setxattr(root / "dir one", "user.note", b"a directory\x00with a nul")
    os.setxattr(root / "big.bin", "user.empty", b"")
    for i, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        if not path.is_symlink():
            os.utime(path, ns=(1_600_000_000_000_000_000 + i, 1_500_000_000_123_456_789 + i * 7))


def test_cp_a_tree_in_and_out_is_identical(fs: Mount, work: Path, tmp_path: Path) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    build_tree(src)
    subprocess.run(["cp", "-a", str(src), str(work / "copy")], check=True)
    subprocess.run(["cp", "-a", str(work / "copy"), str(back)], check=True)
    diff_r(src, work / "copy")
    diff_r(src, back)
    assert snapshot(work / "copy") == snapshot(src)
    assert snapshot(back) == snapshot(src)


def test_tar_extraction_matches_a_local_extraction(work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src, seed=2)
    tarball = tmp_path / "t.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(src, arcname="t")
    local = tmp_path / "local"
    local.mkdir()
    for where in (local, work):
        subprocess.run(["tar", "-xpf", str(tarball), "--xattrs", "--xattrs-include=user.*",
                        "-C", str(where)], check=True)
    diff_r(local / "t", work / "t")
    assert snapshot(work / "t") == snapshot(local / "t")


@pytest.mark.skipif(not have("rsync"), reason="rsync is not installed (./scripts/setup)")
def test_rsync_aHX_round_trip_and_nothing_left_to_do(work: Path, tmp_path: Path) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    build_tree(src, seed=3)
    subprocess.run(["rsync", "-aHX", f"{src}/", f"{work}/r/"], check=True)
    subprocess.run(["rsync", "-aHX", f"{work}/r/", f"{back}/"], check=True)
    assert snapshot(work / "r") == snapshot(src)
    assert snapshot(back) == snapshot(src)
    again = subprocess.run(["rsync", "-aHXi", "--dry-run", f"{src}/", f"{work}/r/"],
                           check=True, capture_output=True, text=True)
    changed = [line for line in again.stdout.splitlines() if not line.startswith(".d")]
    assert changed == [], "rsync sees differences after a full copy"


class ModelRun:
    """A file in the mount and a model file on the local filesystem, changed alike by
    seeded random operations: sizes compared after each, contents at the end."""

    def __init__(self, path: Path, model_path: Path, seed: int) -> None:
        self.path, self.model_path = path, model_path
        self.rng = random.Random(seed)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.model = os.open(model_path, os.O_RDWR | os.O_CREAT, 0o644)

    def run(self, steps: int, step: Callable[[int, float, int], None]) -> None:
        """step(number, a random float in [0, 1), the model's size) does one operation."""
        try:
            for number in range(steps):
                step(number, self.rng.random(), os.fstat(self.model).st_size)
                assert os.fstat(self.fd).st_size == os.fstat(self.model).st_size, \
                    f"step {number}"
        finally:
            os.close(self.fd)
            os.close(self.model)
        assert self.path.read_bytes() == self.model_path.read_bytes()

    def check_read(self, number: int, off: int, n: int) -> None:
        assert os.pread(self.fd, n, off) == os.pread(self.model, n, off), f"step {number}"

    def reopen(self) -> None:
        """Close and reopen: hands buffered data to the flusher."""
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)


def test_random_writes_reads_and_truncates_match_a_model_file(work: Path,
                                                              tmp_path: Path) -> None:
    m = ModelRun(work / "random.bin", tmp_path / "model.bin", 20240601)
    rng, limit = m.rng, 5 * MiB

    def step(number: int, op: float, size: int) -> None:
        if op < 0.45:
            off = rng.randrange(limit)
            data = rng.randbytes(rng.choice([1, 17, 4096, rng.randrange(1, 300_000)]))
            assert os.pwrite(m.fd, data, off) == len(data)
            os.pwrite(m.model, data, off)
        elif op < 0.85:
            m.check_read(number, rng.randrange(size + 4096), rng.randrange(1, 400_000))
        elif op < 0.95:
            new = rng.choice([0, rng.randrange(limit), rng.randrange(size + 1)])
            os.ftruncate(m.fd, new)
            os.ftruncate(m.model, new)
        elif op < 0.98:
            os.fsync(m.fd)
        else:
            m.reopen()

    m.run(2000, step)


KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE = 0x01, 0x02, 0x08, 0x10


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_fallocate_modes_match_a_model_file(work: Path, tmp_path: Path) -> None:
    """Holes punched, ranges zeroed and sizes set by fallocate(2), mixed with writes,
    read back exactly as ext4 gives them (seeded)."""
    m = ModelRun(work / "alloc.bin", tmp_path / "model.bin", 20261122)
    rng, limit = m.rng, 6 * MiB

    def step(number: int, op: float, size: int) -> None:
        off = rng.randrange(limit)
        n = rng.choice([1, 4095, MiB, rng.randrange(1, 3 * MiB)])
        if op < 0.4:
            data = rng.randbytes(min(n, 400_000))
            os.pwrite(m.fd, data, off)
            os.pwrite(m.model, data, off)
        elif op < 0.75:
            mode = rng.choice([0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE,
                               ZERO_RANGE | KEEP_SIZE])
            _fallocate(m.fd, mode, off, n)
            _fallocate(m.model, mode, off, n)
        elif op < 0.95:
            m.check_read(number, rng.randrange(size + 4096), n)
        else:
            m.reopen()

    m.run(600, step)


def _stored_chunks(path: Path) -> list[int]:
    """The chunks of a file that have an extent (user.dynamicfs.layout; 1 MiB extents)."""
    layout = os.getxattr(path, "user.dynamicfs.layout").decode()
    return [int(c) for c in re.findall(r"^chunk (\d+) ", layout, re.M)]


def test_fallocate_frees_punched_extents_and_checks_room(work: Path) -> None:
    f = work / "f"
    data = os.urandom(4 * MiB + 100)
    f.write_bytes(data)
    with open(f, "r+b") as fh:
        os.fsync(fh.fileno())
        assert _stored_chunks(f) == [0, 1, 2, 3, 4]
        # Whole extents in the range are unmapped, the ends rewritten with zeros.
        _fallocate(fh.fileno(), PUNCH_HOLE | KEEP_SIZE, MiB - 10, 2 * MiB + 20)
        os.fsync(fh.fileno())
    assert _stored_chunks(f) == [0, 3, 4] and f.stat().st_size == len(data)
    assert f.read_bytes() == data[:MiB - 10] + bytes(2 * MiB + 20) + data[3 * MiB + 10:]
    # The fallocate program: a size with nothing stored, no room for a petabyte, and a
    # mode a copy-on-write pool does not offer.
    subprocess.run(["fallocate", "-l", "3M", str(work / "g")], check=True)
    assert (work / "g").stat().st_size == 3 * MiB and (work / "g").stat().st_blocks == 0
    for args, reason in ((["-l", "1P"], "No space left on device"),
                         (["-c", "-o", "0", "-l", "1M"], "Operation not supported")):
        run = subprocess.run(["fallocate", *args, str(work / "g")],
                             capture_output=True, text=True)
        assert run.returncode != 0 and reason in run.stderr, run.stderr
    assert (work / "g").stat().st_size == 3 * MiB


def _writer(args: tuple[str, int]) -> None:
    shared, n = args
    rng = random.Random(n)
    own = f"{shared}.{n}"
    blocks = list(range(16))
    rng.shuffle(blocks)
    fd_own = os.open(own, os.O_WRONLY | os.O_CREAT, 0o644)
    fd_shared = os.open(shared, os.O_WRONLY)
    for b in blocks:
        os.pwrite(fd_own, bytes([n + 1]) * 128 * 1024, b * 128 * 1024)
        # Each writer owns every 4th 64 KiB slot of the shared file.
        os.pwrite(fd_shared, bytes([n + 1]) * 64 * 1024, (b * 4 + n) * 64 * 1024)
    os.fsync(fd_own)
    os.close(fd_own)
    os.close(fd_shared)


def test_concurrent_writers_in_separate_processes(work: Path) -> None:
    shared = work / "shared.bin"
    shared.write_bytes(b"")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as procs:
        procs.map(_writer, [(str(shared), n) for n in range(4)])
    for n in range(4):
        assert Path(f"{shared}.{n}").read_bytes() == bytes([n + 1]) * 16 * 128 * 1024
    data = shared.read_bytes()
    assert len(data) == 64 * 64 * 1024
    for slot in range(64):
        assert data[slot * 65536:(slot + 1) * 65536] == bytes([slot % 4 + 1]) * 65536, slot


def test_unlinked_but_open_file_stays_readable(work: Path) -> None:
    payload = random.Random(5).randbytes(3 * MiB + 5)
    path = work / "doomed"
    path.write_bytes(payload)
    with open(path, "r+b") as f:
        path.unlink()
        assert not path.exists()
        assert os.fstat(f.fileno()).st_nlink == 0
        assert f.read() == payload
        f.seek(MiB)
        f.write(b"still writable")
        f.flush()
        os.fsync(f.fileno())
        f.seek(MiB)
        assert f.read(14) == b"still writable"
    assert "doomed" not in os.listdir(work)


def test_offsets_past_4_GiB_are_sparse(work: Path) -> None:
    path = work / "sparse"
    with open(path, "wb") as f:
        os.pwrite(f.fileno(), b"x" * 4096, 5 * GiB)
        os.pwrite(f.fileno(), b"across", 4 * GiB - 3)
    st = path.stat()
    assert st.st_size == 5 * GiB + 4096
    assert st.st_blocks * 512 < 4 * MiB, "holes must not be stored"
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 4096, 5 * GiB) == b"x" * 4096
        assert os.pread(f.fileno(), 8, 4 * GiB - 4) == b"\0across\0"
        assert os.pread(f.fileno(), 1000, 3 * GiB) == bytes(1000)


def test_mmap_reads_and_writes_reach_the_pool(fs: Mount, work: Path) -> None:
    rng = random.Random(9)
    payload = bytearray(rng.randbytes(3 * MiB))
    path = work / "mapped"
    path.write_bytes(payload)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        assert m[MiB - 10:MiB + 10] == payload[MiB - 10:MiB + 10]
        assert m[:] == payload
        m[100:105] = b"HELLO"
        m[2 * MiB:2 * MiB + 3] = b"abc"
        m.flush()
    payload[100:105] = b"HELLO"
    payload[2 * MiB:2 * MiB + 3] = b"abc"
    assert path.read_bytes() == payload
    fs.remount()  # what the daemon stored, not the kernel's page cache
    assert path.read_bytes() == payload


@pytest.mark.parametrize("release, direct", [
    ("6.18.44-fc-v669", True), ("6.18.10", True), ("6.18.9", False), ("6.19", True),
    ("7.1.0-rc2", True), ("6.12.80-1-amd64", False), ("5.10.0", False), ("unknown", False)])
def test_write_only_opens_are_direct_only_on_kernels_that_keep_caches_right(
        release: str, direct: bool) -> None:
    assert kernel_keeps_cache_right_around_direct_writes(release) is direct


def _requests(fs: Mount, op: str) -> int:
    """How many `op` requests the mount's daemon has answered (`dynamicfs metrics`)."""
    text = cli("metrics", fs.pool).stdout
    found = re.search(rf'^dynamicfs_fuse_op_seconds_count\{{op="{op}"\}} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def test_misses_are_cached_and_names_made_through_the_mount_replace_them(
        fs: Mount, work: Path) -> None:
    """A lookup of a name that does not exist is answered as a cacheable miss (as
    `PATH` searches, imports and builds repeat them); creating the name any way through
    the mount makes it visible at once."""
    makers = {
        "file": lambda p: p.write_bytes(b"x"),
        "dir": lambda p: p.mkdir(),
        "symlink": lambda p: p.symlink_to("target"),
        "link": lambda p: os.link(work / "existing", p),
        "rename": lambda p: os.rename(work / "moved", p),
        "mknod": lambda p: os.mkfifo(p),
    }
    (work / "existing").write_bytes(b"e")
    (work / "moved").write_bytes(b"m")
    for kind, make in makers.items():
        path = work / f"missing-{kind}"
        before = _requests(fs, "lookup")
        for _ in range(50):
            assert not os.path.lexists(path)
        asked = _requests(fs, "lookup") - before
        assert 1 <= asked < 10, f"{asked} lookups for 50 stat() of a missing name"
        make(path)
        assert os.path.lexists(path), kind
    assert (work / "missing-rename").read_bytes() == b"m" and not (work / "moved").exists()
    os.unlink(work / "missing-file")
    assert not (work / "missing-file").exists()


def test_write_only_opens_skip_the_page_cache_and_readers_see_their_writes(
        fs: Mount, work: Path) -> None:
    """Write-only opens are FOPEN_DIRECT_IO where the kernel keeps other openers' cached
    pages right (adapter.WRITE_ONLY_DIRECT_SINCE): their writes skip the page cache and
    with it the `security.capability` getxattr the kernel sends before each cached
    write; a reader with the file's pages cached, read or mapped, sees each write as
    soon as it returns."""
    path = work / "written"
    expected = bytearray(b"a" * 3 * 4096)
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(writer, expected)
        with open(path, "r+b", buffering=0) as reader, \
                mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:] == expected and reader.read() == expected  # cached now
            before = _requests(fs, "getxattr")
            for offset, data in ((4000, b"b" * 200), (0, b"c"), (3 * 4096 - 1, b"d")):
                assert os.pwrite(writer, data, offset) == len(data)
                expected[offset: offset + len(data)] = data
                assert os.pread(reader.fileno(), len(expected), 0) == expected
                assert mapped[:] == expected
            between = _requests(fs, "getxattr")
            os.pwrite(reader.fileno(), b"e", 1)  # a cached write, for comparison
            expected[1:2] = b"e"
            after = _requests(fs, "getxattr")
    finally:
        os.close(writer)
    direct = kernel_keeps_cache_right_around_direct_writes()
    assert (between - before, after - between) == ((0, 1) if direct else (3, 1))
    assert path.read_bytes() == expected


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(old), at_fdcwd, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_renameat2_noreplace_and_exchange(work: Path) -> None:
    noreplace, exchange = 1, 2
    (work / "a").write_bytes(b"A")
    (work / "b").write_bytes(b"B")
    (work / "d").mkdir()
    (work / "d" / "inside").write_bytes(b"D")
    with pytest.raises(OSError) as info:
        _renameat2(work / "a", work / "b", noreplace)
    assert info.value.errno == errno.EEXIST
    assert (work / "b").read_bytes() == b"B"
    _renameat2(work / "a", work / "c", noreplace)
    assert not (work / "a").exists() and (work / "c").read_bytes() == b"A"
    ino_c, ino_d = (work / "c").stat().st_ino, (work / "d").stat().st_ino
    _renameat2(work / "c", work / "d", exchange)
    assert (work / "c" / "inside").read_bytes() == b"D"
    assert (work / "d").read_bytes() == b"A"
    assert (work / "c").stat().st_ino == ino_d and (work / "d").stat().st_ino == ino_c
    with pytest.raises(OSError) as info:
        _renameat2(work / "d", work / "missing", exchange)
    assert info.value.errno == errno.ENOENT


def test_attributes_links_and_directories(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"data")
    f.chmod(0o640)
    os.chown(f, 1234, 5678)
    st = f.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    os.utime(f, ns=(1_000_000_000_111_111_111, 1_200_000_000_222_222_222))
    assert f.stat().st_mtime_ns == 1_200_000_000_222_222_222
    assert f.stat().st_atime_ns == 1_000_000_000_111_111_111
    before = os.stat(f).st_mtime_ns
    os.utime(f)  # UTIME_NOW
    assert f.stat().st_mtime_ns > before
    with open(f, "w") as fh:  # O_TRUNC
        fh.write("x")
    assert f.read_bytes() == b"x"
    os.link(f, work / "g")
    assert f.stat().st_nlink == 2 and (work / "g").stat().st_ino == f.stat().st_ino
    os.mkfifo(work / "pipe")
    assert stat.S_ISFIFO((work / "pipe").lstat().st_mode)
    (work / "sub").mkdir()
    (work / "sub" / "x").write_bytes(b"")
    with pytest.raises(OSError) as info:
        (work / "sub").rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    names = {f"entry-{i:04d}-{'x' * (i % 50)}" for i in range(700)}
    (work / "many").mkdir()
    for name in names:
        (work / "many" / name).write_bytes(b"")
    assert set(os.listdir(work / "many")) == names
    vfs = os.statvfs(work)
    assert vfs.f_bavail > 0 and vfs.f_namemax == 255
    with open(work / "alloc", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, MiB)
    assert (work / "alloc").stat().st_size == MiB
