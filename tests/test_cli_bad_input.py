"""Bad input to the admin commands: one line on stderr, a non-zero exit, no traceback,
and the pool unchanged (its tables, apart from the epoch every open bumps, and every
file of the pool directory and of its disks)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from admin_support import (
    assert_one_line_error,
    data_of,
    db_snapshot,
    make_pool,
    program,
    read_only_view,
    run,
    run_program,
    tree,
    write_files,
)
from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.drain import remove_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.disks.faulty import ENV_VAR
from dynamicfs.engine.pool import Pool

# Every command that opens a pool, with the arguments that follow POOL, in the
# positional form and in the option form.
POOL_COMMANDS: dict[str, tuple[list[str], list[str]]] = {
    "list-disks": ([], []),
    "add-disk": (["{new}"], ["--disk", "{new}"]),
    "set-disk-health": (["1", "suspect"], ["--disk", "1", "--state", "suspect"]),
    "fail-disk": (["1"], ["--disk", "1"]),
    "probe-disks": ([], []),
    "remove-disk": (["1"], ["--disk", "1"]),
    "status": ([], []),
    "list-extents": ([], ["--file", "/f"]),
    "show-redundancy": ([], ["--file", "/f"]),
}
FORMS = ("positional", "option")
# Those that only read the pool (the rest change it).
REPORTS = {"list-disks", "status", "list-extents", "show-redundancy"}


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        # disk0 directly in tmp_path, disk1 nested one level down, so that a directory
        # containing a disk but not the pool exists: tmp_path/outer.
        self.pool = make_pool(tmp_path, [None])
        self.outer = tmp_path / "outer"
        (self.outer / "inner").mkdir(parents=True)
        with Pool.open(self.pool) as pool:
            add_disk(pool, self.outer / "inner")
        write_files(self.pool, {"/f": data_of("f", 70_000)})
        self.new_disk = tmp_path / "new"
        self.new_disk.mkdir()

    def state(self) -> tuple[Any, ...]:
        return (db_snapshot(self.pool), tree(self.pool), tree(self.tmp / "disk0"),
                tree(self.outer), tree(self.new_disk))

    def argv(self, command: str, form: str, pool: Path | str) -> list[str]:
        positional, option = POOL_COMMANDS[command]
        rest = positional if form == "positional" else option
        rest = [a.replace("{new}", str(self.new_disk)) for a in rest]
        if form == "positional":
            return [command, str(pool), *rest]
        return [command, "--pool", str(pool), *rest]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def refused(env: Env, capsys: pytest.CaptureFixture[str], argv: list[Any]) -> str:
    """Run argv, check it is refused in one line and changed nothing; the message."""
    before = env.state()
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err)
    assert env.state() == before
    return err


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", sorted(POOL_COMMANDS))
def test_a_missing_pool_is_refused(env: Env, capsys: pytest.CaptureFixture[str],
                                   command: str, form: str) -> None:
    err = refused(env, capsys, env.argv(command, form, env.tmp / "nowhere"))
    assert "does not exist" in err
    assert not (env.tmp / "nowhere").exists()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", sorted(POOL_COMMANDS))
def test_a_directory_that_is_not_a_pool_is_refused(
        env: Env, capsys: pytest.CaptureFixture[str], command: str, form: str) -> None:
    plain = env.tmp / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    err = refused(env, capsys, env.argv(command, form, plain))
    assert "is not a DynamicFS pool" in err
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("command", sorted(POOL_COMMANDS.keys() - REPORTS))
def test_a_read_only_pool_directory_refuses_what_would_change_the_pool(
        env: Env, capsys: pytest.CaptureFixture[str], command: str, form: str) -> None:
    with read_only_view(env.pool, env.tmp / "ro-view") as view:
        err = refused(env, capsys, env.argv(command, form, view))
    assert f"pool directory {view} is read-only, and {command} would change the pool; " \
           "remount it read-write" in err


@pytest.mark.parametrize("command", sorted(REPORTS))
def test_a_read_only_pool_directory_still_gives_its_reports(
        env: Env, capsys: pytest.CaptureFixture[str], command: str) -> None:
    before = env.state()
    with read_only_view(env.pool, env.tmp / "ro-view") as view:
        code, out, err = run(capsys, *env.argv(command, "positional", view))
    assert code == 0 and out
    assert err.startswith(f"note: pool directory {view} is read-only")
    assert env.state() == before


@pytest.mark.parametrize("command", ["status", "list-disks", "add-disk", "remove-disk"])
def test_a_pool_of_a_newer_format_is_refused(
        env: Env, capsys: pytest.CaptureFixture[str], command: str) -> None:
    conn = sqlite3.connect(env.pool / "pool.db")
    with conn:
        conn.execute("UPDATE pool SET format_version = 99")
    conn.close()
    err = refused(env, capsys, env.argv(command, "positional", env.pool))
    assert "newer" in err and "upgrade DynamicFS" in err


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("disk", ["7", "/no/such/disk", "00000000-0000-4000-8000-000000000000"])
@pytest.mark.parametrize("command,extra", [("set-disk-health", ["failed"]),
                                           ("fail-disk", []), ("remove-disk", [])])
def test_an_unknown_disk_is_refused(env: Env, capsys: pytest.CaptureFixture[str],
                                    command: str, extra: list[str], disk: str,
                                    form: str) -> None:
    if form == "positional":
        argv = [command, env.pool, disk, *extra]
    else:
        argv = [command, "--pool", env.pool, "--disk", disk,
                *(["--state", *extra] if extra else [])]
    err = refused(env, capsys, argv)
    assert f"unknown disk {disk!r}" in err


def test_an_unknown_health_state_is_refused(env: Env,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(env, capsys, ["set-disk-health", env.pool, "1", "broken"])
    assert "unknown health state 'broken'" in err


@pytest.mark.parametrize("args,said", [
    (["--address", "127.0.0.1:19464", "--port", "19465"], "names port 19464 and --port 19465"),
    (["--address", "127.0.0.1:http"], "malformed metrics address '127.0.0.1:http'"),
    (["--address", "[::1]:70000"], "malformed metrics address '[::1]:70000'"),
])
def test_metrics_server_refuses_a_malformed_or_doubled_port(
        env: Env, capsys: pytest.CaptureFixture[str], args: list[str], said: str) -> None:
    assert said in refused(env, capsys, ["metrics-server", env.pool, *args])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("policy", ["ec:0+2", "replicate:0", "ec:4+", "raid5"])
def test_init_refuses_a_malformed_policy(env: Env, capsys: pytest.CaptureFixture[str],
                                         policy: str, form: str) -> None:
    target = env.tmp / "fresh"
    pool_args = [target] if form == "positional" else ["--pool", target]
    err = refused(env, capsys, ["init", *pool_args, "--default-policy", policy])
    assert f"malformed policy {policy!r}" in err
    assert not target.exists()


@pytest.mark.parametrize("form", FORMS)
def test_init_refuses_a_malformed_extent_size(env: Env, capsys: pytest.CaptureFixture[str],
                                              form: str) -> None:
    target = env.tmp / "fresh"
    pool_args = [target] if form == "positional" else ["--pool", target]
    for size in ("abc", ""):
        err = refused(env, capsys, ["init", *pool_args, "--extent-size", size])
        assert f"malformed size {size!r}" in err
        assert not target.exists()


@pytest.mark.parametrize("form", FORMS)
def test_init_refuses_an_existing_pool(env: Env, capsys: pytest.CaptureFixture[str],
                                       form: str) -> None:
    pool_args = [env.pool] if form == "positional" else ["--pool", env.pool]
    err = refused(env, capsys, ["init", *pool_args])
    assert "already a DynamicFS pool" in err


def test_init_refuses_a_read_only_directory(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    empty = env.tmp / "empty"
    empty.mkdir()
    with read_only_view(empty, env.tmp / "ro-empty") as view:
        err = refused(env, capsys, ["init", view])
    assert "Read-only file system" in err
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("capacity", ["12XB", "abc", "0", "-5G", "99999999999999999999T",
                                      "9" * 400])
def test_add_disk_refuses_a_malformed_capacity(env: Env, capsys: pytest.CaptureFixture[str],
                                               capacity: str, form: str) -> None:
    argv = (["add-disk", env.pool, env.new_disk] if form == "positional"
            else ["add-disk", "--pool", env.pool, "--disk", env.new_disk])
    err = refused(env, capsys, [*argv, f"--capacity={capacity}"])
    assert "size" in err


def _other_pool_disk(env: Env) -> Path:
    other = env.tmp / "other"
    other.mkdir()
    init_pool(other / "pool")
    (other / "disk").mkdir()
    with Pool.open(other / "pool") as pool:
        add_disk(pool, other / "disk")
    return other / "disk"


def _a_file(env: Env) -> Path:
    path = env.tmp / "a-file"
    path.write_text("x")
    return path


ADD_DISK_REFUSALS: dict[str, tuple[Callable[[Env], Path], str]] = {
    "a disk of this pool": (lambda e: e.tmp / "disk0", "already disk 1 of this pool"),
    "a disk of this pool, by a relative path": (
        lambda e: Path("disk0"), "already disk 1 of this pool"),
    "a disk of another pool": (_other_pool_disk, "belongs to another pool"),
    "the pool directory": (lambda e: e.pool, "overlaps the pool directory"),
    "a directory inside the pool": (lambda e: e.pool / "logs", "overlaps the pool directory"),
    "a directory inside a disk": (lambda e: e.tmp / "disk0" / "sub", "overlaps disk 1"),
    "a directory containing a disk": (lambda e: e.outer, "overlaps disk 2"),
    "a missing directory": (lambda e: e.tmp / "missing", "does not exist"),
    "a file": (_a_file, "is not a directory"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(ADD_DISK_REFUSALS))
def test_add_disk_refuses(env: Env, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch, case: str, form: str) -> None:
    make, message = ADD_DISK_REFUSALS[case]
    monkeypatch.chdir(env.tmp)
    (env.pool / "logs").mkdir(exist_ok=True)
    (env.tmp / "disk0" / "sub").mkdir(exist_ok=True)
    disk = make(env)
    argv = (["add-disk", env.pool, disk] if form == "positional"
            else ["add-disk", "--pool", env.pool, "--disk", disk])
    err = refused(env, capsys, argv)
    assert message in err


@pytest.mark.parametrize("form", FORMS)
def test_add_disk_refuses_a_read_only_directory(env: Env, capsys: pytest.CaptureFixture[str],
                                                form: str) -> None:
    with read_only_view(env.new_disk, env.tmp / "ro-disk") as view:
        argv = (["add-disk", env.pool, view] if form == "positional"
                else ["add-disk", "--pool", env.pool, "--disk", view])
        err = refused(env, capsys, argv)
    assert "not writable" in err


def test_add_disk_refuses_a_directory_whose_label_outlived_its_removal(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    disk0 = env.tmp / "disk0"
    label = (disk0 / "dynamicfs.label").read_bytes()
    with Pool.open(env.pool) as pool:
        remove_disk(pool, "1", force=True)
    assert not (disk0 / "dynamicfs.label").exists()
    (disk0 / "dynamicfs.label").write_bytes(label)  # as if the disk had been unreachable
    err = refused(env, capsys, ["add-disk", env.pool, disk0])
    assert "has been removed" in err and "dynamicfs.label" in err


def test_the_installed_program_prints_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    for argv, message in [(["status", tmp_path / "nowhere"], "does not exist"),
                          (["init", tmp_path / "p", "--default-policy", "ec:4+"],
                           "malformed policy"),
                          (["add-disk", tmp_path / "nowhere", tmp_path, "--capacity", "12XB"],
                           "malformed size")]:
        done = run_program(*argv)
        assert_one_line_error(done.returncode, done.stderr)
        assert message in done.stderr
        assert done.stdout == ""


def test_sync_refuses_a_path_outside_any_mount_and_says_an_unmounted_pool_has_nothing(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    plain = env.tmp / "plain"
    plain.mkdir()
    for target, message in [(plain, "neither a pool nor inside a DynamicFS mount"),
                            (env.tmp / "nowhere", "does not exist")]:
        err = refused(env, capsys, ["sync", target])
        assert message in err
    before = env.state()
    code, out, err = run(capsys, "sync", env.pool)
    assert (code, err) == (0, "")
    assert out.strip() == f"pool {env.pool} is not mounted: nothing is buffered"
    assert env.state() == before


def test_a_pool_held_by_another_command_names_that_command(env: Env) -> None:
    """A command that finds the pool open in another (an offline scrub whose reads are
    slow) says which command holds it and what to do, not that the pool is mounted."""
    slow = {**os.environ, ENV_VAR: "read:slow:at=3000"}
    scrub = subprocess.Popen([program(), "scrub", str(env.pool)], env=slow,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        holder = f"{scrub.pid} dynamicfs scrub".encode()  # not this test's own earlier line
        while not (env.pool / "pool.lock").read_bytes().startswith(holder):
            assert scrub.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        done = run_program("status", env.pool)
        assert_one_line_error(done.returncode, done.stderr)
        assert done.returncode == 3
        assert (f"is in use by 'dynamicfs scrub {env.pool}' (pid {scrub.pid}); wait for it "
                "to finish") in done.stderr, done.stderr
        assert "mounted" not in done.stderr
    finally:
        scrub.kill()
        scrub.wait()
