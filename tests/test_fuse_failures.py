"""Failures seen through a real mount: full disks, disks that fail writes, reads or syncs
(the mount daemon runs over fault-injecting disks when DYNAMICFS_FAULTS is set, see
disks/faulty.py), and damaged fragments under files.

What must hold each time: the program gets a clear errno (ENOSPC when nothing fits, EIO
when data cannot be stored or read), never wrong bytes; what was fsynced before reads
back exactly; and the pool stays consistent (fsck and scrub clean once unmounted).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.disks.faulty import ENV_VAR
from fragment_spot import FragmentSpot
from fusehelpers import Mount, cli, is_mounted, make_pool, mounted_pool

pytestmark = pytest.mark.fuse

KiB, MiB = 1024, 1024 * 1024


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def faults(spec: str) -> Iterator[None]:
    """DYNAMICFS_FAULTS=spec for the mount daemons started inside."""
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = spec
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = old


def write_file(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write, fsync and close, closing even when a step fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    os.close(fd)


def assert_clean(pool: Path, *, repair: bool = False) -> None:
    """fsck and scrub of an unmounted pool find nothing wrong. With `repair`, extents
    stored with fewer fragments than their policy (as a write may when disks fail it,
    DESIGN invariant 6) are allowed, and `dynamicfs repair` must complete them."""
    done = cli("fsck", pool, "--json", check=False)
    assert done.returncode == 0, json.loads(done.stdout)["problems"]
    done = cli("scrub", pool, "--json", check=False)
    scrub = json.loads(done.stdout)
    if repair and scrub["unreadable"] == 0 and scrub["under_redundant"]:
        cli("repair", pool)
        done = cli("scrub", pool, "--json", check=False)
        scrub = json.loads(done.stdout)
    assert done.returncode == 0, scrub["problems"]


def remount_clean(m: Mount) -> None:
    m.unmount()
    assert_clean(m.pool)
    m.mount()


class LogWatch:
    """The JSON events the daemon logged after `offset` (default: from now on)."""

    def __init__(self, pool: Path, offset: int | None = None) -> None:
        self.path = pool / "logs" / "dynamicfs.log"
        if offset is None:
            offset = self.path.stat().st_size if self.path.exists() else 0
        self.offset = offset

    def events(self, name: str) -> list[dict]:  # type: ignore[type-arg]
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            lines = f.read().decode().splitlines()
        return [e for e in map(json.loads, lines) if e.get("event") == name]

    def wait_for(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.events(name):
            assert time.monotonic() < deadline, f"no {name!r} in the log"
            time.sleep(0.05)


# ---------------------------------------------------------------------- write-back
def test_data_whose_write_back_failed_reads_eio_never_zeros(
        tmp_path: Path, fuse_available: None) -> None:
    # Each disk stores one fragment, then reports a full disk: the first file takes three
    # of the four disks, so the second one's write-back (after close) cannot be stored.
    with faults("write:enospc:after=1"), mounted_pool(tmp_path, disks=4) as m:
        first, second = os.urandom(300 * KiB), os.urandom(300 * KiB)
        write_file(m / "first", first)
        write_file(m / "second", second, fsync=False)  # close comes before the write-back

        # Nothing reads it before the write-back has failed: pages read earlier would
        # stay in the kernel's cache (keep_cache) and serve the bytes from there.
        LogWatch(m.pool, offset=0).wait_for("write-back failed")
        time.sleep(0.2)
        fd = os.open(m / "second", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as read:
                os.pread(fd, 4096, 0)
            assert read.value.errno == errno.EIO
        finally:
            with pytest.raises(OSError) as closed:
                os.close(fd)  # the write-back error, reported once
        assert closed.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as again:
            (m / "second").read_bytes()
        assert again.value.errno == errno.EIO
        assert (m / "first").read_bytes() == first

        os.truncate(m / "second", 0)  # cut away, the lost data no longer fails reads
        assert (m / "second").read_bytes() == b""
        log = (m.pool / "logs" / "dynamicfs.log").read_text()
        assert '"write-back failed"' in log and '"read failed"' in log
    assert_clean(m.pool)


def test_data_whose_write_back_failed_still_reads_eio_after_a_remount(
        tmp_path: Path, fuse_available: None) -> None:
    # As above, and the second file overwrote an older version of itself: neither zeros
    # nor the older bytes may come back once the daemon has forgotten what it lost. Six
    # disks of one fragment each: the first file and the old version take them all.
    with faults("write:enospc:after=1"), mounted_pool(tmp_path, disks=6) as m:
        first, old, new = (os.urandom(300 * KiB) for _ in range(3))
        write_file(m / "first", first)
        write_file(m / "second", old)
        write_file(m / "second", new, fsync=False)  # its write-back comes after close
        LogWatch(m.pool, offset=0).wait_for("write-back failed")
        with pytest.raises(OSError):
            os.close(os.open(m / "second", os.O_RDONLY))  # the error, reported once
        m.unmount()
        fsck = cli("fsck", m.pool, "--json", check=False)
        problems = json.loads(fsck.stdout)["problems"]
        assert fsck.returncode != 0
        assert [(p["kind"], p["paths"]) for p in problems] == [("lost-chunk", ["/second"])]
        status = json.loads(cli("status", m.pool, "--json").stdout)
        assert status["files_at_risk"] == ["/second"]
        health = cli("health", m.pool, "--json", check=False)
        assert health.returncode == 2  # unreadable data
        assert json.loads(health.stdout)["at_risk"]["unreadable"] == ["/second"]
    with mounted_pool_again(m) as m:
        assert os.stat(m / "second").st_size == len(new)
        layout = os.getxattr(m / "second", "user.dynamicfs.layout").decode()
        assert layout == "chunk 0 extent 0 lost: its write-back failed\n"
        with pytest.raises(OSError) as read:
            (m / "second").read_bytes()
        assert read.value.errno == errno.EIO
        assert (m / "first").read_bytes() == first
        write_file(m / "second", new)  # a whole new version replaces the lost chunk
        assert (m / "second").read_bytes() == new
    assert_clean(m.pool)


def test_unmount_names_files_whose_data_no_program_was_told_was_lost(
        tmp_path: Path, fuse_available: None) -> None:
    # As in the first test, the second file's write-back fails after its close. Nothing
    # opens it again, so no program hears of it: unmount must say so and fail, and the
    # pool must still close cleanly (the lost chunk is recorded).
    with faults("write:enospc:after=1"), mounted_pool(tmp_path, disks=4) as m:
        first, second = os.urandom(300 * KiB), os.urandom(300 * KiB)
        write_file(m / "first", first)
        (m / "sub").mkdir()
        write_file(m / "sub" / "second", second, fsync=False)
        LogWatch(m.pool, offset=0).wait_for("write-back failed")
        done = cli("unmount", m.mnt, check=False)
        assert done.returncode == 1, done.stderr
        assert not is_mounted(m.mnt)
        message = done.stderr.strip()
        assert message.startswith(f"dynamicfs: error: unmounted {m.mnt}, but data last "
                                  "written to 1 file could not be stored (No space left on "
                                  "device): /sub/second."), message
        assert message.endswith("dynamicfs.log") and "\n" not in message
    with mounted_pool_again(m) as m:
        with pytest.raises(OSError) as read:
            (m / "sub" / "second").read_bytes()
        assert read.value.errno == errno.EIO
        assert (m / "first").read_bytes() == first
        os.unlink(m / "sub" / "second")
        done = cli("unmount", m.mnt)  # nothing lost this time: a plain unmount
        assert done.stdout.startswith(f"unmounted {m.mnt} (pool ")


@contextlib.contextmanager
def mounted_pool_again(m: Mount) -> Iterator[Mount]:
    """Mount `m` again (without the faults of before); always unmounted at the end."""
    m.mount()
    try:
        yield m
    finally:
        if is_mounted(m.mnt):
            m.unmount()
        m.force_unmount()


# ---------------------------------------------------------------------- full disks
def small_disk_pool(root: Path, disks: int, capacity: int) -> Mount:
    pool_dir, paths = make_pool(root, disks, capacity=capacity)
    (root / "mnt").mkdir()
    return Mount(pool_dir, root / "mnt", paths)


def fill(mnt: Path, prefix: str, size: int, limit: int = 1000
         ) -> tuple[dict[str, bytes], int, str]:
    """Up to `limit` fsynced files of `size` bytes, until one fails: (the files that
    were fsynced, errno (0: none failed), the step that failed)."""
    files: dict[str, bytes] = {}
    for i in range(limit):
        name, data = f"{prefix}{i}", os.urandom(size)
        fd = os.open(mnt / name, os.O_WRONLY | os.O_CREAT, 0o644)
        step = "write"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            step = "fsync"
            os.fsync(fd)
            step = "close"
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            never_wrong_then_gone(mnt / name, data)
            return files, exc.errno or 0, step
        try:
            os.close(fd)
        except OSError as exc:
            never_wrong_then_gone(mnt / name, data)
            return files, exc.errno or 0, step
        files[name] = data
    return files, 0, ""


def never_wrong_then_gone(path: Path, data: bytes) -> None:
    """A file whose writing failed reads back as what was written of it, or fails with
    EIO where that was lost; never other bytes. Then it is removed, as a program would.
    (A failed sync rolls back the commit that would have named the file: it is gone.)"""
    try:
        got = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        assert exc.errno == errno.EIO, exc
    else:
        assert got == data[: len(got)]
    path.unlink()


def run_dd(path: Path) -> subprocess.CompletedProcess[str]:
    """dd of 12.5 MiB of random bytes (zeros would be stored as holes), fsynced."""
    return subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=64k", "count=200",
                           "conv=fsync"], capture_output=True, text=True, timeout=120)


def test_a_full_pool_fails_writes_with_enospc_and_keeps_what_was_written(
        tmp_path: Path, fuse_available: None) -> None:
    m = small_disk_pool(tmp_path, disks=4, capacity=4 * MiB)
    m.mount()
    try:
        files, code, step = fill(m.mnt, "f", 256 * KiB)
        assert code == errno.ENOSPC, f"{step} failed with {errno.errorcode.get(code)}"
        assert len(files) >= 12  # 16 MiB of disks hold over 5 MiB at three copies
        dd = run_dd(m.mnt / "dd.out")
        assert dd.returncode != 0 and "No space left on device" in dd.stderr
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        # What dd handed over before the pool was full, and that could not be stored
        # after it, is lost: fsck names the file, and it reads as an I/O error after a
        # remount too (never as zeros).
        m.unmount()
        fsck = json.loads(cli("fsck", m.pool, "--json", check=False).stdout)["problems"]
        assert {(p["kind"], tuple(p["paths"])) for p in fsck} <= {("lost-chunk", ("/dd.out",))}
        m.mount()
        if fsck:
            with pytest.raises(OSError) as lost:
                (m / "dd.out").read_bytes()
            assert lost.value.errno == errno.EIO
        os.unlink(m / "dd.out")
        remount_clean(m)
        for name, data in files.items():
            assert (m / name).read_bytes() == data

        for name in list(files)[::2]:
            os.unlink(m / name)
            del files[name]
        more, code, _ = fill(m.mnt, "g", 256 * KiB)
        assert len(more) >= 4 and code == errno.ENOSPC
        files.update(more)
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        m.unmount()
    finally:
        m.force_unmount()
    assert_clean(m.pool)


def test_files_closed_without_fsync_on_a_filling_pool_are_kept_or_refused(
        tmp_path: Path, fuse_available: None) -> None:
    """Data written without fsync goes to the disks after close(); once the pool is
    nearly full, a write must fail with ENOSPC at once rather than be taken and lost
    at write-back: every file whose close() succeeded reads back whole, also after a
    remount."""
    m = small_disk_pool(tmp_path, disks=3, capacity=4 * MiB)
    m.mount()
    try:
        kept: dict[str, bytes] = {}
        failed = 0
        for i in range(200):
            name, data = f"c{i}", os.urandom(60_000)
            try:
                with open(m / name, "wb") as f:
                    f.write(data)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                failed += 1
                if failed == 3:
                    break
                continue
            kept[name] = data
        assert failed == 3 and len(kept) >= 40  # 12 MiB of disks, three copies
        cli("sync", m.mnt)
        for name, data in kept.items():
            assert (m / name).read_bytes() == data, name
        m.unmount()
        m.mount()
        for name, data in kept.items():
            assert (m / name).read_bytes() == data, name
        m.unmount()
    finally:
        m.force_unmount()


def test_a_full_pool_directory_refuses_new_files_and_loses_none(
        tmp_path: Path, fuse_available: None) -> None:
    """The pool directory's filesystem running out of room: while under the metadata
    reserve, creates and writes fail with ENOSPC and nothing already taken is lost
    (a failed group commit would drop every change since the one before); deletes still
    work; once there is room again the mount carries on. Unmounted, a pool whose
    directory's filesystem is full gets a one-line error."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100M", "tmpfs", str(small)],
                   check=True)
    try:
        pool_dir, paths = small / "pool", []
        cli("init", pool_dir)
        for i in range(3):
            paths.append(tmp_path / f"disk{i}")
            paths[-1].mkdir()
            cli("add-disk", pool_dir, paths[-1])
        (tmp_path / "mnt").mkdir()
        m = Mount(pool_dir, tmp_path / "mnt", paths)
        m.mount()
        try:
            kept = {f"a{i}": os.urandom(3000) for i in range(50)}
            for name, data in kept.items():
                (m / name).write_bytes(data)
            filler = small / "filler"
            # Leaves less than the 64 MiB reserve, looked at again after 0.1 s.
            subprocess.run(["fallocate", "-l", str(70 << 20), str(filler)], check=True)
            time.sleep(0.2)
            for action in (lambda: (m / "b").write_bytes(b"x"), lambda: (m / "d").mkdir(),
                           lambda: os.symlink("a0", m / "s")):
                with pytest.raises(OSError) as refused:
                    action()
                assert refused.value.errno == errno.ENOSPC
            os.unlink(m / "a49")
            del kept["a49"]
            cli("sync", m.mnt)
            filler.unlink()
            time.sleep(0.2)
            kept["c"] = os.urandom(5000)
            (m / "c").write_bytes(kept["c"])
            m.unmount()
            m.mount()
            assert sorted(os.listdir(m.mnt)) == sorted(kept)
            for name, data in kept.items():
                assert (m / name).read_bytes() == data, name
            m.unmount()
        finally:
            m.force_unmount()
        with open(small / "filler", "wb") as f:  # every byte of it
            with contextlib.suppress(OSError):
                while True:
                    f.write(bytes(1 << 20))
        done = cli("status", pool_dir, check=False)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines() == [
            f"dynamicfs: error: cannot open the metadata database {pool_dir / 'pool.db'}: "
            "its filesystem is full; free some space there"]
        (small / "filler").unlink()
        assert cli("status", pool_dir).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# ---------------------------------------------------------------------- injected faults
FAULT_CASES = {
    # spec: the errno the writer must get at last (None: every write must succeed)
    "disk=2:write:eio": None,  # one disk fails every write: fragments go elsewhere
    "write:eio:after=2": errno.EIO,  # every disk fails after two fragments
    "disk=1:write:short:times=3;disk=4:write:short:after=1:times=1": None,
    "write:short:after=2": errno.EIO,
    "disk=3:write:enospc": None,
    "write:enospc:after=2": errno.ENOSPC,
    "disk=1:sync:eio:after=1:times=1": errno.EIO,  # one fsync fails, the next ones work
}


@pytest.mark.parametrize("spec", list(FAULT_CASES))
def test_injected_write_faults_leave_a_consistent_pool_and_fsynced_files_intact(
        tmp_path: Path, fuse_available: None, spec: str) -> None:
    expected = FAULT_CASES[spec]
    with faults(spec), mounted_pool(tmp_path, disks=6) as m:
        files, code, step = fill(m.mnt, "f", 200 * KiB, limit=10)
        assert code == (expected or 0), f"{step}: {errno.errorcode.get(code)}"
        if expected == errno.EIO and "sync" in spec:
            more, code, step = fill(m.mnt, "g", 200 * KiB, limit=4)  # the pool carries on
            assert (len(more), code) == (4, 0), f"{step}: {errno.errorcode.get(code)}"
            files.update(more)
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        log = (m.pool / "logs" / "dynamicfs.log").read_text()
        assert "sync" in spec or '"kind": "write"' in log, "no write fault was injected"
    assert_clean(m.pool, repair=True)
    m.mount()
    for name, data in files.items():
        assert (m / name).read_bytes() == data
    m.unmount()


@pytest.mark.parametrize(("spec", "expected"), [
    ("disk=2:read:eio;disk=3:read:bitflip", 0),  # two bad fragments at most: M=2
    ("read:eio:after=1", errno.EIO),  # every disk fails all but its first read
])
def test_injected_read_faults_give_the_right_bytes_or_eio(
        tmp_path: Path, fuse_available: None, spec: str, expected: int) -> None:
    with mounted_pool(tmp_path, disks=6) as m:
        files = write_policy_files(m, "ec:4+2", {"a": 1200 * KiB})
        write_file(m / "b", os.urandom(700 * KiB))  # replicate:3
        files["b"] = (m / "b").read_bytes()
        m.unmount()
        with faults(spec):
            m.mount()
        watch = LogWatch(m.pool)
        for name, data in files.items():
            try:
                assert (m / name).read_bytes() == data
            except OSError as exc:
                assert exc.errno == expected, f"{name}: {exc}"
            else:
                assert expected == 0, f"{name} read although every disk fails"
        kinds = {e["kind"] for e in watch.events("fragment error")}
        assert kinds == ({"read", "checksum"} if expected == 0 else {"read"}), kinds
        m.unmount()
    assert_clean(m.pool, repair=True)


def disk_rows(pool: Path) -> dict[int, dict]:  # type: ignore[type-arg]
    return {d["id"]: d for d in json.loads(cli("list-disks", pool, "--json").stdout)}


def test_fault_injection_survives_adding_a_disk_to_the_mounted_pool(
        tmp_path: Path, fuse_available: None) -> None:
    with faults("disk=1:write:eio"), mounted_pool(tmp_path, disks=4) as m:
        files: dict[str, bytes] = {}
        more, code, _ = fill(m.mnt, "a", 100 * KiB, limit=2)
        files.update(more)
        errors_before = disk_rows(m.pool)[1]["write_errors"]
        assert code == 0 and errors_before > 0
        (tmp_path / "disk4").mkdir()
        cli("add-disk", m.pool, tmp_path / "disk4")  # through the control socket
        more, code, _ = fill(m.mnt, "b", 100 * KiB, limit=4)
        files.update(more)
        assert code == 0
        disks = disk_rows(m.pool)
        assert len(disks) == 5 and disks[1]["fragments"] == 0
        assert disks[1]["write_errors"] > errors_before, "disk 1 lost its faults"
        for name, data in files.items():
            assert (m / name).read_bytes() == data



# ---------------------------------------------------------------------- degraded reads
POLICIES = {"replicate:3": 2, "ec:4+2": 2}  # policy: fragments it may lose (M)


def fragment_files(disks: list[Path]) -> dict[tuple[int, int], FragmentSpot]:
    """(extent id, fragment index) -> where that fragment is, from the records on the disks."""
    out = {}
    for disk in disks:
        for ref, _ in DirectoryDisk(disk).list_fragments():
            spot = FragmentSpot(disk, ref)
            head, _ = fragfmt.parse(spot.read_bytes())
            out[(head.extent_id, head.index)] = spot
    return out


def extents_of(pool: Path, name: str) -> list[int]:
    rows = json.loads(cli("list-extents", pool, "--file", f"/{name}", "--json").stdout)
    return [r["id"] for r in sorted(rows, key=lambda r: r["chunk"])]


def damage(spot: FragmentSpot, kind: str) -> None:
    """Damage a fragment on its disk the way disks and people do."""
    if kind == "missing":
        spot.unlink()
    elif kind == "truncated":
        raw = spot.read_bytes()
        spot.write_bytes(raw[: fragfmt.HEADER_SIZE + (len(raw) - fragfmt.HEADER_SIZE) // 2])
    else:
        spot.flip(20 if kind == "header" else fragfmt.HEADER_SIZE + spot.size // 3)


KINDS = ["missing", "payload", "header", "truncated"]


def wait_rebuilt(m: Mount, timeout: float = 60) -> None:
    """Until the mount daemon has nothing left to repair: no queued extent (its health
    report counts those the read path found bad but not yet queued), none short of its
    policy, none unreadable."""
    deadline = time.monotonic() + timeout
    while True:
        report = json.loads(cli("health", m.pool, "--json", check=False).stdout)
        extents = report["extents"]
        left = (report["repair_queue"], extents["under_redundant"], extents["unreadable"])
        if left == (0, 0, 0):
            return
        assert time.monotonic() < deadline, f"not rebuilt (queued, short, unreadable): {left}"
        time.sleep(0.3)


def write_policy_files(m: Mount, policy: str, sizes: dict[str, int]) -> dict[str, bytes]:
    (m / "d").mkdir()
    os.setxattr(m / "d", "user.dynamicfs.policy", policy.encode())
    files = {f"d/{name}": os.urandom(size) for name, size in sizes.items()}
    for name, data in files.items():
        write_file(m / name, data)
    return files


@pytest.mark.parametrize("policy", list(POLICIES))
def test_reads_survive_m_bad_fragments_fail_with_eio_beyond_and_bad_ones_are_rebuilt(
        tmp_path: Path, fuse_available: None, policy: str) -> None:
    budget = POLICIES[policy]
    pool_dir, disks = make_pool(tmp_path, 7, extent_size=256 * KiB)
    (tmp_path / "mnt").mkdir()
    m = Mount(pool_dir, tmp_path / "mnt", disks)
    m.mount()
    try:
        files = write_policy_files(m, policy, {"ok": 1280 * KiB, "lost": 600 * KiB})
        m.unmount()
        where = fragment_files(disks)
        # Every extent of d/ok loses `budget` fragments, each its own way; the fragments
        # read first are the damaged ones, so the read must notice and go around them.
        for i, extent in enumerate(extents_of(pool_dir, "d/ok")):
            for index in range(budget):
                damage(where[(extent, index)], KINDS[(i + index) % len(KINDS)])
        lost_extent = extents_of(pool_dir, "d/lost")[1]
        for index in range(budget + 1):
            damage(where[(lost_extent, index)], KINDS[index % len(KINDS)])

        m.mount()
        watch = LogWatch(pool_dir)
        assert (m / "d/ok").read_bytes() == files["d/ok"]
        with open(m / "d/lost", "rb") as f:
            assert f.read(256 * KiB) == files["d/lost"][: 256 * KiB]  # its first extent
            with pytest.raises(OSError) as failed:
                f.read(256 * KiB)
        assert failed.value.errno == errno.EIO
        ino = os.stat(m / "d/lost").st_ino
        said = [e for e in watch.events("read failed") if e["ino"] == ino]
        assert said and f"extent {lost_extent}" in said[0]["reason"], watch.events("read failed")

        os.unlink(m / "d/lost")
        wait_rebuilt(m)
        m.unmount()
    finally:
        m.force_unmount()
    assert_clean(pool_dir)
    m.mount()
    assert (m / "d/ok").read_bytes() == files["d/ok"]
    m.unmount()


@pytest.mark.parametrize("how", ["failed", "vanished"])
def test_reads_survive_a_lost_disk_and_a_bad_fragment_and_the_pool_heals(
        tmp_path: Path, fuse_available: None, how: str) -> None:
    pool_dir, disks = make_pool(tmp_path, 7, extent_size=256 * KiB)
    (tmp_path / "mnt").mkdir()
    m = Mount(pool_dir, tmp_path / "mnt", disks)
    m.mount()
    try:
        files = write_policy_files(m, "ec:4+2", {"ec": 1280 * KiB})
        write_file(m / "copies", os.urandom(700 * KiB))  # replicate:3 by default
        files["copies"] = (m / "copies").read_bytes()
        m.unmount()
        where = fragment_files(disks)
        lost_disk = disks[3]
        # Besides the lost disk's fragment, each extent loses the first fragment a read
        # tries, so at most two (M) are bad.
        for i, extent in enumerate(extents_of(pool_dir, "d/ec") + extents_of(pool_dir, "copies")):
            index = min(x for (e, x), path in where.items()
                        if e == extent and lost_disk not in path.path.parents)
            damage(where[(extent, index)], KINDS[i % len(KINDS)])
        if how == "failed":
            cli("set-disk-health", pool_dir, lost_disk, "failed")
        else:
            lost_disk.rename(lost_disk.with_name("gone"))

        m.mount()
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        if how == "vanished":
            cli("probe-disks", pool_dir, check=False)  # finds it missing: failed
        wait_rebuilt(m)
        m.unmount()
    finally:
        m.force_unmount()
    assert_clean(pool_dir)


def test_a_bad_fragment_found_just_before_unmount_is_repaired_at_the_next_mount(
        tmp_path: Path, fuse_available: None) -> None:
    with mounted_pool(tmp_path, disks=6) as m:
        data = os.urandom(300 * KiB)
        write_file(m / "f", data)
        m.unmount()
        (extent,) = extents_of(m.pool, "f")
        damage(fragment_files(m.disks)[(extent, 0)], "missing")
        m.mount()
        assert (m / "f").read_bytes() == data
        m.unmount()  # before the rebuilder's next round
        m.mount()
        wait_rebuilt(m)
    assert_clean(m.pool)
