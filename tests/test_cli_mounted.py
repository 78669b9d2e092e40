"""Admin commands on a mounted pool go through its control socket and act on the live
filesystem: a disk drains while files are read through the mount, and refusals come
back as one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from admin_support import assert_one_line_error, data_of, interrupt_remove_disk, sql
from dynamicfs.control.protocol import ANSWER_TIMEOUT_ENV
from fusehelpers import PY, cli, mounted_pool, wait_gone
from test_fuse_failures import faults

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1024 * 1024


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_remove_disk_while_mounted_keeps_files_readable_through_the_mount(
        tmp_path: Path) -> None:
    files = {"a": data_of("a", 3 * MiB), "dir/b": data_of("b", MiB + 7),
             "c": data_of("c", 4096)}
    with mounted_pool(tmp_path, disks=5, default_policy="replicate:3",
                      extent_size=256 * 1024) as m:
        for name, data in files.items():
            _write(m / name, data)
        disk_id = sql(m.pool, "SELECT disk_id FROM fragments GROUP BY disk_id "
                              "ORDER BY count(*) DESC LIMIT 1")[0][0]
        bad_reads: list[str] = []
        stop = threading.Event()

        def read_all() -> None:
            while not stop.is_set():
                for name, data in files.items():
                    if (m / name).read_bytes() != data:
                        bad_reads.append(name)

        reader = threading.Thread(target=read_all)
        reader.start()
        try:
            done = cli("remove-disk", m.pool, str(disk_id), "--json")
        finally:
            stop.set()
            reader.join()

        report = json.loads(done.stdout)
        assert report["removed"] and report["fragments_moved"] > 0
        assert report["under_redundant"] == 0
        assert bad_reads == []
        for name, data in files.items():
            assert (m / name).read_bytes() == data
        status = json.loads(cli("status", m.pool, "--json").stdout)
        assert status["extents"] == status["healthy"] > 0
        assert [d["id"] for d in status["disks"]] == [i for i in range(1, 6) if i != disk_id]
        assert sql(m.pool, "SELECT count(*) FROM fragments WHERE disk_id = ?",
                   (disk_id,)) == [(0,)]
        m.remount()
        for name, data in files.items():
            assert (m / name).read_bytes() == data


def test_ctrl_c_in_a_command_leaves_the_mount_daemon_to_finish(tmp_path: Path) -> None:
    """Ctrl-C in remove-disk on a mounted pool stops only the command: it says that the
    daemon carries on, and the daemon finishes the drain without logging a crash."""
    with mounted_pool(tmp_path, disks=4, default_policy="replicate:2",
                      extent_size=64 * 1024) as m, faults("read:slow:at=300"):
        _write(m / "f", data_of("f", MiB))
        m.remount()  # the daemon now reads every fragment 0.3 s late
        code, err = interrupt_remove_disk(m.pool, 1)
        deadline = time.monotonic() + 60
        assert_one_line_error(code, err)
        assert code == 130 and "the mount daemon carries on with remove-disk" in err
        while sql(m.pool, "SELECT count(*) FROM disks WHERE id = 1") != [(0,)]:
            assert time.monotonic() < deadline, "the daemon did not finish the drain"
            time.sleep(0.05)
        assert (m / "f").read_bytes() == data_of("f", MiB)
        assert "crashed" not in (m.pool / "logs" / "dynamicfs.log").read_text()


def test_a_refusal_through_the_control_socket_is_one_line(tmp_path: Path) -> None:
    with mounted_pool(tmp_path, disks=2, default_policy="replicate:2") as m:
        _write(m / "precious", data_of("p", 10_000))
        done = cli("remove-disk", m.pool, "1", check=False)
        assert_one_line_error(done.returncode, done.stderr)
        assert "/precious" in done.stderr
        done = cli("fail-disk", "--pool", m.pool, "--disk", "9", check=False)
        assert_one_line_error(done.returncode, done.stderr)
        assert "unknown disk '9'" in done.stderr
        assert (m / "precious").read_bytes() == data_of("p", 10_000)


def test_sync_makes_the_buffered_data_of_an_open_file_survive_a_crash(tmp_path: Path) -> None:
    """An open file's data below an extent stays in the daemon's memory until close or
    fsync; `dynamicfs sync` on a path in the mount writes it out and commits it, so it
    outlives SIGKILL of the daemon."""
    data = data_of("open", 300 * 1024)
    with mounted_pool(tmp_path) as m:
        (m / "dir").mkdir()
        f = open(m / "dir" / "open.bin", "wb")  # noqa: SIM115 (still open at the crash)
        try:
            f.write(data)
            f.flush()
            done = cli("sync", m / "dir")
            assert done.stdout.startswith(f"synced {m.mnt} (pool {m.pool}) in ")
            assert m.pid is not None
            os.kill(m.pid, signal.SIGKILL)
            wait_gone(m.pid)
        finally:
            with contextlib.suppress(OSError):
                f.close()
        m.pid = None
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
        m.mount()
        assert (m / "dir" / "open.bin").read_bytes() == data
        assert json.loads(cli("sync", m.pool, "--json").stdout)["mountpoint"] == str(m.mnt)
        # Without a path: every DynamicFS mount of the machine, this one among them.
        assert f"synced {m.mnt} (pool {m.pool}) in " in cli("sync").stdout
        assert {"pool": str(m.pool), "mountpoint": str(m.mnt)}.items() <= \
            next(d for d in json.loads(cli("sync", "--json").stdout)
                 if d["mountpoint"] == str(m.mnt)).items()


def test_commands_on_a_mount_whose_daemon_died_name_the_mount_and_the_way_out(
        tmp_path: Path) -> None:
    """After kill -9 of the daemon every path in the mount gives ENOTCONN: commands given
    such a path (or the pool) say which mount is dead and how to clear it, in one line;
    `sync` never claims to have synced it; `unmount` clears it."""
    with mounted_pool(tmp_path) as m:
        (m / "sub").mkdir()
        cli("sync", m.mnt)
        assert m.pid is not None
        os.kill(m.pid, signal.SIGKILL)
        wait_gone(m.pid)
        m.pid = None
        way_out = f"the DynamicFS mount at {m.mnt} is not connected"
        for args in (("sync", m.mnt), ("sync", m.mnt / "sub"), ("sync", m.pool),
                     ("status", m.mnt / "sub"), ("scrub", m.mnt),
                     ("mount", m.pool, m.mnt / "sub")):
            done = cli(*args, check=False)
            assert_one_line_error(done.returncode, done.stderr)
            assert way_out in done.stderr, (args, done.stderr)
            assert f"'dynamicfs unmount {m.mnt}'" in done.stderr
            assert f"synced {m.mnt} " not in done.stdout
        cli("unmount", m.mnt)
        m.mount()
        assert (m / "sub").is_dir()
        assert cli("sync", m.mnt).stdout.startswith(f"synced {m.mnt}")


def test_commands_give_up_on_a_stopped_daemon_but_wait_for_a_slow_operation(
        tmp_path: Path) -> None:
    """A daemon that does not answer (SIGSTOP) makes status and sync fail in one line
    after DYNAMICFS_ANSWER_TIMEOUT seconds instead of waiting forever; an operation
    that runs longer than that without progress (the daemon sends heartbeats) ends
    normally."""
    env = {**os.environ, ANSWER_TIMEOUT_ENV: "2"}
    with mounted_pool(tmp_path) as m:
        (m / "f").write_bytes(data_of("f", 300_000))
        assert m.pid is not None
        os.kill(m.pid, signal.SIGSTOP)
        try:
            for args in (("status", m.pool), ("sync", m.pool)):
                done = subprocess.run([PY, "-m", "dynamicfs.cli.main", *map(str, args)],
                                      capture_output=True, text=True, env=env, timeout=60)
                assert_one_line_error(done.returncode, done.stderr)
                assert "has not answered for 2s" in done.stderr, done.stderr
        finally:
            os.kill(m.pid, signal.SIGCONT)
        m.unmount()
        # A scrub whose reads take 9 s each (a disk that answers late): longer than the
        # client waits for a line, and it sends no progress until its first extent is
        # done; the daemon's heartbeats keep the client waiting to the end.
        with faults("read:slow:at=9000"):
            m.mount()
        done = subprocess.run([PY, "-m", "dynamicfs.cli.main", "scrub", str(m.pool)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, ANSWER_TIMEOUT_ENV: "7"})
        assert done.returncode == 0, done.stderr
        assert "has not answered" not in done.stderr


def test_disk_paths_are_the_callers_and_never_inside_the_pools_own_mount(
        tmp_path: Path) -> None:
    """A mounted pool's commands run in its daemon, whose working directory is /: a
    relative disk path is the caller's all the same. A disk inside the pool's own mount
    (the daemon would wait on itself) and a mountpoint hiding the pool directory or one
    of its disks are refused in one line."""
    with mounted_pool(tmp_path, disks=4) as m:
        (tmp_path / "extra").mkdir()
        done = cli("add-disk", m.pool, "extra", "--json", cwd=tmp_path)
        assert json.loads(done.stdout)["path"] == str(tmp_path / "extra")
        done = cli("fail-disk", m.pool, "extra/", "--json", cwd=tmp_path)
        assert json.loads(done.stdout)["state"] == "failed"
        (m / "inside").mkdir()
        done = cli("add-disk", m.pool, m / "inside", check=False)
        assert_one_line_error(done.returncode, done.stderr)
        assert "the mount of this pool" in done.stderr
        assert not (m / "inside" / "dynamicfs.label").exists()
        for where in (m.mnt, m / "inside"):  # given where the pool belongs
            done = cli("list-disks", where, check=False)
            assert_one_line_error(done.returncode, done.stderr)
            assert f"that mount's pool is {m.pool}" in done.stderr
        (m / "f").write_bytes(b"still answers")
        assert (m / "f").read_bytes() == b"still answers"
    disk = next(p for p in tmp_path.iterdir() if p.name.startswith("disk"))
    for mountpoint, what in ((disk, "holds disk"), (tmp_path, "holds the pool directory")):
        done = cli("mount", m.pool, mountpoint, "-o", "nonempty", check=False, timeout=30)
        assert_one_line_error(done.returncode, done.stderr)
        assert what in done.stderr
