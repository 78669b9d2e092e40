"""The FUSE session through a real mount: mount options reach the kernel, and a request
that waits (a read from a disk that answers late) does not hold up the others.

Slow disks come from the fault-injecting disk wrapper (DYNAMICFS_FAULTS, `read:slow`).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from fusehelpers import cli, is_mounted, mounted_pool
from test_fuse_failures import faults, write_file

pytestmark = pytest.mark.fuse

KiB = 1024
SLOW_MS = 4000


def mount_options(mnt: Path) -> set[str]:
    """The mount's options and its filesystem's, as /proc/self/mountinfo shows them."""
    target = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mine, _, theirs = line.rstrip("\n").partition(" - ")
            fields = mine.split(" ")
            if fields[4] == target:
                return set(fields[5].split(",")) | set(theirs.split(" ")[2].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_mount_flags_reach_the_kernel_and_ro_refuses_changes(tmp_path: Path) -> None:
    with mounted_pool(tmp_path, 3) as m:
        write_file(m / "kept", b"x" * 5000)
        m.unmount()
        m.options = ["ro,noexec,noatime"]
        m.mount()
        assert {"ro", "noexec", "noatime", "nosuid", "nodev"} <= mount_options(m.mnt)
        assert (m / "kept").read_bytes() == b"x" * 5000
        for change in (lambda: (m / "new").write_bytes(b"y"),
                       lambda: (m / "kept").unlink(),
                       lambda: os.mkdir(m / "dir")):
            with pytest.raises(OSError) as exc:
                change()
            assert exc.value.errno == errno.EROFS
        m.unmount()
        m.options = []
        m.mount()
        assert "ro" not in mount_options(m.mnt) and "rw" in mount_options(m.mnt)
        assert sorted(os.listdir(m.mnt)) == ["kept"]


def test_unknown_mount_option_is_refused_before_mounting(tmp_path: Path) -> None:
    with mounted_pool(tmp_path, 3) as m:
        m.unmount()
        done = cli("mount", m.pool, m.mnt, "-o", "noatime,bogus_flag", check=False)
        assert done.returncode != 0
        assert done.stderr.count("\n") == 1 and "bogus_flag" in done.stderr
        assert not is_mounted(m.mnt)


def _waiting_in_kernel(pid: int) -> bool:
    """Whether process `pid` is asleep in a system call (its read, here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state in ("S", "D")


def test_a_read_waiting_on_a_slow_disk_does_not_hold_up_other_requests(
        tmp_path: Path) -> None:
    data = os.urandom(256 * KiB)
    with mounted_pool(tmp_path, 3, default_policy="replicate:3") as m:
        write_file(m / "cold", data)
        m.unmount()
        with faults(f"read:slow:at={SLOW_MS}"):
            m.mount()
        copy = tmp_path / "copy"
        reader = subprocess.Popen(["cp", str(m / "cold"), str(copy)])
        try:
            deadline = time.monotonic() + 30
            while not _waiting_in_kernel(reader.pid):
                assert time.monotonic() < deadline, "cp never started reading"
                time.sleep(0.01)
            time.sleep(0.2)  # let the read reach the daemon and the slow disk
            assert reader.poll() is None
            # Meanwhile the mount answers everything that needs no fragment.
            names = os.listdir(m.mnt)
            write_file(m / "meanwhile", b"written while a read waits")
            os.rename(m / "meanwhile", m / "renamed")
            assert (m / "renamed").stat().st_size == 26
            assert sorted(names) == ["cold"]
            assert reader.poll() is None, "the read ended before the others ran"
            assert reader.wait(timeout=SLOW_MS / 1000 * 10 + 60) == 0
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
        assert copy.read_bytes() == data
        assert sorted(os.listdir(m.mnt)) == ["cold", "renamed"]


def test_many_reads_at_once_on_a_slow_disk_all_get_their_bytes(tmp_path: Path) -> None:
    """More reads waiting at once than the session starts workers with: it adds workers,
    and every reader gets its own file's bytes."""
    files = {f"f{i:02d}": os.urandom(64 * KiB + i) for i in range(12)}
    with mounted_pool(tmp_path, 3, default_policy="replicate:2") as m:
        for name, data in files.items():
            write_file(m / name, data)
        m.unmount()
        with faults("read:slow:at=1500"):
            m.mount()
        readers = {name: subprocess.Popen(["cat", str(m / name)], stdout=subprocess.PIPE)
                   for name in files}
        got = {name: proc.communicate(timeout=120)[0] for name, proc in readers.items()}
        assert all(proc.returncode == 0 for proc in readers.values())
        assert got == files


def test_statfs_and_the_mount_table_through_the_session(tmp_path: Path) -> None:
    with mounted_pool(tmp_path, 3) as m:
        st = os.statvfs(m.mnt)
        assert st.f_bsize > 0 and st.f_blocks > 0 and st.f_namemax == 255
        options = mount_options(m.mnt)
        assert {"default_permissions", "max_read=1048576", "user_id=0"} <= options
