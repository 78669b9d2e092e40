"""Mounting and unmounting as a user does it: `dynamicfs mount`/`unmount`, signals,
fusermount3, the fstab helper, refusals, and admin commands on a mounted pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusehelpers import (
    PY,
    Mount,
    alive,
    cli,
    daemon_pid,
    is_mounted,
    make_pool,
    snapshot,
    wait_gone,
)

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1 << 20
MOUNT_FILES = ("mount.json", "mount.pid", "control.sock")


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Mount]:
    """A pool of four disks with an empty mountpoint, not mounted yet."""
    pool_dir, disks = make_pool(tmp_path, 4)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(pool_dir, mnt, disks)
    try:
        yield m
    finally:
        try:
            if is_mounted(mnt):
                m.unmount()
        finally:
            m.force_unmount()


def one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dynamicfs: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def log_events(pool_dir: Path) -> list[str]:
    text = (pool_dir / "logs" / "dynamicfs.log").read_text()
    return [json.loads(line)["event"] for line in text.splitlines() if line.strip()]


def test_mount_starts_a_daemon_and_unmount_waits_for_it(pool: Mount) -> None:
    before = time.time()
    pool.mount()
    info = json.loads((pool.pool / "mount.json").read_text())
    assert info["mountpoint"] == str(pool.mnt)
    assert info["pid"] == pool.pid and alive(info["pid"])
    assert before - 1 <= info["started"] <= time.time() + 1
    assert (pool.pool / "mount.pid").read_text().strip() == str(pool.pid)
    assert (pool.pool / "control.sock").exists()
    assert "mounted" in log_events(pool.pool)
    found = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(pool.mnt)],
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == [str(pool.pool), "fuse.dynamicfs"]
    dev = os.stat(pool.mnt).st_dev
    ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert ra.read_text().strip() == "1024"

    (pool / "hello").write_bytes(b"world")
    pid = pool.pid
    assert pid is not None
    done = cli("unmount", pool.pool)  # the pool path works as well as the mountpoint
    assert "unmounted" in done.stdout
    assert not alive(pid) and not is_mounted(pool.mnt)
    for name in MOUNT_FILES:
        assert not (pool.pool / name).exists(), name
    assert log_events(pool.pool)[-1] == "pool closed"
    pool.pid = None
    pool.mount()  # at once: the lock is free
    assert (pool / "hello").read_bytes() == b"world"


def test_mount_refusals_print_one_line_and_exit_nonzero(pool: Mount, tmp_path: Path) -> None:
    one_error_line(cli("mount", pool.pool, tmp_path / "nowhere", check=False),
                   "does not exist", "mkdir")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_bytes(b"")
    one_error_line(cli("mount", pool.pool, busy, check=False), "not empty", "nonempty")
    one_error_line(cli("mount", tmp_path / "disk0", pool.mnt, check=False),
                   "not a DynamicFS pool")
    one_error_line(cli("mount", pool.pool, pool.mnt, "-o", "no_such_option", check=False),
                   "no_such_option")

    pool.mount()
    other = tmp_path / "other"
    other.mkdir()
    one_error_line(cli("mount", pool.pool, other, check=False),
                   "already mounted", str(pool.mnt), str(pool.pid))
    assert daemon_pid(pool.pool) == pool.pid and not is_mounted(other)
    pool.unmount()

    pool.mnt, pool.options = busy, ["nonempty"]
    pool.mount()
    assert os.listdir(busy) == []  # the pool's root hides what was there
    pool.unmount()
    assert os.listdir(busy) == ["file"]


def test_data_metadata_and_inode_numbers_survive_rename_and_remount(pool: Mount) -> None:
    pool.mount()
    top = pool / "top"
    (top / "a" / "b").mkdir(parents=True)
    data = os.urandom(2 * MiB + 3)
    (top / "a" / "file").write_bytes(data)
    (top / "a" / "file").chmod(0o751)
    os.setxattr(top / "a" / "file", "user.k", b"v")
    os.symlink("a/file", top / "sym")
    os.link(top / "a" / "file", top / "a" / "b" / "hard")
    os.setxattr(top / "a", "user.dynamicfs.policy", b"replicate:2")
    ino = (top / "a" / "file").stat().st_ino
    dir_ino = (top / "a" / "b").stat().st_ino
    (top / "a" / "file").rename(top / "moved")
    (top / "a" / "b").rename(top / "b2")
    os.utime(top / "moved", ns=(1_111_111_111_000_000_001, 1_222_222_222_000_000_002))
    assert (top / "moved").stat().st_ino == ino and (top / "b2").stat().st_ino == dir_ino
    before = snapshot(top)
    pool.remount()
    assert snapshot(top) == before
    assert (top / "moved").stat().st_ino == ino
    assert (top / "b2").stat().st_ino == dir_ino
    assert (top / "b2" / "hard").stat().st_ino == ino
    assert (top / "moved").read_bytes() == data
    assert os.getxattr(top / "a", "user.dynamicfs.policy") == b"replicate:2"


def test_sigterm_and_fusermount_flush_and_end_the_daemon(pool: Mount) -> None:
    pool.mount()
    data = os.urandom(3 * MiB + 100)
    with open(pool / "unsynced", "wb") as f:  # no fsync: the daemon must flush at exit
        f.write(data)
    pid = pool.pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(pool.mnt)
    for name in MOUNT_FILES:
        assert not (pool.pool / name).exists(), name
    assert "stopping on signal" in log_events(pool.pool)

    pool.mount()
    assert (pool / "unsynced").read_bytes() == data
    (pool / "second").write_bytes(data[::-1])
    pid = pool.pid
    assert pid is not None
    subprocess.run(["fusermount3", "-u", str(pool.mnt)], check=True)
    wait_gone(pid)
    for name in MOUNT_FILES:
        assert not (pool.pool / name).exists(), name
    pool.mount()
    assert (pool / "second").read_bytes() == data[::-1]


def helper_command() -> list[str]:
    installed = Path(sys.executable).parent / "mount.fuse.dynamicfs"
    if installed.exists():
        return [str(installed)]
    return [PY, "-m", "dynamicfs.cli.mount_helper"]


def test_fstab_helper_mounts_with_the_arguments_mount8_passes(pool: Mount) -> None:
    # fstab: POOL MOUNTPOINT fuse.dynamicfs defaults 0 0  ->  mount(8) runs:
    done = subprocess.run([*helper_command(), str(pool.pool), str(pool.mnt), "-o", "rw"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert is_mounted(pool.mnt)
    pid = daemon_pid(pool.pool)
    assert pid is not None
    (pool / "via-fstab").write_bytes(b"ok")
    subprocess.run(["umount", str(pool.mnt)], check=True)  # what `umount MOUNTPOINT` does
    wait_gone(pid)
    assert not (pool.pool / "mount.json").exists()

    bad = subprocess.run([*helper_command(), str(pool.pool / "missing"), str(pool.mnt),
                          "-o", "rw,noatime"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 32
    assert len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr
    pool.mount()
    assert (pool / "via-fstab").read_bytes() == b"ok"


def test_admin_commands_reach_the_mounted_pool(pool: Mount, tmp_path: Path) -> None:
    pool.mount()
    small, large = os.urandom(10_000), os.urandom(5 * MiB)
    (pool / "small").write_bytes(small)
    (pool / "large").write_bytes(large)
    disks = json.loads(cli("list-disks", pool.pool, "--json").stdout)
    assert len(disks) == 4

    new_disk = tmp_path / "disk-new"
    new_disk.mkdir()
    added = json.loads(cli("add-disk", pool.pool, new_disk, "--json").stdout)
    assert len(json.loads(cli("list-disks", pool.pool, "--json").stdout)) == 5
    (pool / "wide").mkdir()
    os.setxattr(pool / "wide", "user.dynamicfs.policy", b"replicate:5")
    with open(pool / "wide" / "f", "wb") as f:
        f.write(b"five copies")
        f.flush()
        os.fsync(f.fileno())  # stored: the layout shows it
    layout = os.getxattr(pool / "wide" / "f", "user.dynamicfs.layout").decode()
    assert f"@disk{added['id']}" in layout and layout.count("@disk") == 5

    pool.remount()  # cold caches: what follows reads from the disks
    victim = disks[0]
    cli("fail-disk", pool.pool, str(victim["id"]))
    states = {d["id"]: d["state"] for d in json.loads(cli("list-disks", pool.pool,
                                                          "--json").stdout)}
    assert states[victim["id"]] == "failed"
    os.rename(victim["path"], victim["path"] + ".gone")  # the failed disk is really gone
    try:
        assert (pool / "small").read_bytes() == small
        assert (pool / "large").read_bytes() == large
        assert (pool / "wide" / "f").read_bytes() == b"five copies"
    finally:
        os.rename(victim["path"] + ".gone", victim["path"])


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("option, others_may", [(None, False), ("allow_other", True),
                                                ("allow_root", False)])
def test_other_users_reach_the_mount_only_with_allow_other(
        tmp_path: Path, option: str | None, others_may: bool) -> None:
    """Without an option only the user who mounted (and with allow_root root too) gets
    in; allow_other lets everyone in, with permissions checked as usual."""
    pool_dir, disks = make_pool(tmp_path, 3)
    # A mountpoint every user can reach (tmp_path itself is private to root).
    top = Path(tempfile.mkdtemp(prefix="dfs-allow-", dir="/tmp"))
    top.chmod(0o755)
    m = Mount(pool_dir, top / "mnt", disks, [option] if option else [])
    m.mnt.mkdir()
    m.mount()
    try:
        (m.mnt / "public").write_bytes(b"for everyone\n")
        (m.mnt / "private").write_bytes(b"root only\n")
        (m.mnt / "private").chmod(0o600)
        info = json.loads((pool_dir / "mount.json").read_text())
        shown = set(info["options"])
        assert ({"allow_other", "allow_root"} & shown) == ({option} if option else set())
        public = _as_nobody("cat", str(m.mnt / "public"))
        private = _as_nobody("cat", str(m.mnt / "private"))
        if others_may:
            assert public.returncode == 0 and public.stdout == "for everyone\n"
            assert private.returncode != 0 and "Permission denied" in private.stderr
        else:
            assert public.returncode != 0 and "Permission denied" in public.stderr
        assert (m.mnt / "private").read_bytes() == b"root only\n"  # root, the owner
    finally:
        try:
            m.unmount()
        finally:
            m.force_unmount()
            subprocess.run(["rm", "-rf", str(top)], check=False)


def test_unmount_refuses_a_busy_mount(pool: Mount) -> None:
    pool.mount()
    with open(pool / "held", "wb") as f:
        f.write(b"open")
        one_error_line(cli("unmount", pool.mnt, check=False), "busy")
        assert is_mounted(pool.mnt)
    one_error_line(cli("unmount", pool.mnt.parent, check=False), "not a DynamicFS mount")
    pool.unmount()


def test_unmount_clears_the_mount_of_a_killed_daemon(pool: Mount) -> None:
    pool.mount()
    with open(pool / "kept", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())  # commits the file and its directory entry
    assert pool.pid is not None
    os.kill(pool.pid, signal.SIGKILL)
    wait_gone(pool.pid)
    pool.pid = None
    with pytest.raises(OSError):
        os.listdir(pool.mnt)
    one_error_line(cli("mount", pool.pool, pool.mnt, check=False), "is not connected", "unmount")
    done = cli("unmount", pool.mnt)
    assert "no mount daemon was running" in done.stdout
    assert not is_mounted(pool.mnt)
    for name in MOUNT_FILES:
        assert not (pool.pool / name).exists(), name
    pool.mount()
    assert (pool / "kept").read_bytes() == b"durable"


def test_foreground_mount_stops_on_ctrl_c(pool: Mount) -> None:
    proc = subprocess.Popen([PY, "-m", "dynamicfs.cli.main", "mount", "-f", str(pool.pool),
                             str(pool.mnt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pool.pool / "mount.json").exists() or not is_mounted(pool.mnt):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "foreground mount never became ready"
            time.sleep(0.05)
        (pool / "fg").write_bytes(b"foreground")
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "mounted" in err and not is_mounted(pool.mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pool.mount()
    assert (pool / "fg").read_bytes() == b"foreground"
