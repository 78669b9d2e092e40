"""Real pools for the admin and CLI tests: made with the admin functions, filled and read
back through the namespace in-process, inspected through SQLite, and run through the
`dynamicfs` command (in-process `main()`, or the installed program)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blake3
import pytest

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.cli.main import main
from dynamicfs.engine.pool import Pool
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO

MiB = 1024 * 1024


def make_pool(tmp_path: Path, capacities: list[int | None], *, policy: str = "auto",
              extent_size: int = 256 * 1024) -> Path:
    """A pool in tmp_path/pool with one disk tmp_path/diskN per capacity (None: no cap)."""
    pool_dir = tmp_path / "pool"
    init_pool(pool_dir, extent_size, policy)
    with Pool.open(pool_dir) as pool:
        for i, capacity in enumerate(capacities):
            disk = tmp_path / f"disk{i}"
            disk.mkdir()
            add_disk(pool, disk, capacity=capacity)
    return pool_dir


def data_of(name: str, size: int) -> bytes:
    """Deterministic, incompressible bytes, different per name."""
    return blake3.blake3(name.encode()).digest(length=size)


def _walk(ns: Namespace, path: str, create_dirs: bool = False) -> tuple[int, bytes]:
    parts = [p.encode() for p in path.split("/") if p]
    parent = ROOT_INO
    for part in parts[:-1]:
        try:
            parent = ns.lookup(parent, part).ino
        except OSError:
            if not create_dirs:
                raise
            parent = ns.mkdir(parent, part, 0o755, 0, 0).ino
    return parent, parts[-1]


def write_files(pool_dir: Path, files: dict[str, bytes],
                dir_policies: dict[str, str] | None = None) -> None:
    """Create directories (with their policies) and files, fsync, close the pool."""
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        try:
            for directory, policy in (dir_policies or {}).items():
                parent, name = _walk(ns, directory + "/x", create_dirs=True)
                ns.set_policy(parent, policy)
            for path, data in files.items():
                parent, name = _walk(ns, path, create_dirs=True)
                ino = ns.create(parent, name, 0o644, 0, 0).ino
                ns.write(ino, 0, data)
                ns.fsync(ino)
                ns.release(ino)
        finally:
            ns.close()


def read_files(pool_dir: Path, paths: list[str]) -> dict[str, bytes]:
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        try:
            out = {}
            for path in paths:
                parent, name = _walk(ns, path)
                attr = ns.lookup(parent, name)
                out[path] = ns.read(attr.ino, 0, attr.size)
            return out
        finally:
            ns.close()


def db_snapshot(pool_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, leaving out what a refused command may change: the
    pool's epoch (every open bumps it) and the audit records of refusals (with the
    `events` id counter they move)."""
    conn = sqlite3.connect(pool_dir / "pool.db")
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        snap = {}
        for table in tables:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in cols if not (table == "pool" and c == "epoch")]
            rows = conn.execute(f"SELECT {', '.join(keep)} FROM {table} ORDER BY 1").fetchall()
            if table == "events":
                rows = [r for r in rows if not _refusal_audit(r)]
            elif table == "sqlite_sequence":  # the events counter moves with audit records
                rows = [r for r in rows if r[0] != "events"]
            snap[table] = rows
        return snap
    finally:
        conn.close()


def _refusal_audit(row: tuple[object, ...]) -> bool:
    _, _, kind, detail = row
    if not str(kind).startswith("audit:"):
        return False
    try:
        return bool(json.loads(str(detail)).get("outcome") == "refused")
    except ValueError:
        return False


def tree(root: Path) -> dict[str, int]:
    """Files under root with their sizes; the database (compared through db_snapshot),
    the lock file and pools' logs are left out."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        if "logs" in dirs and (Path(dirpath) / "pool.db").exists():
            dirs.remove("logs")  # a pool's logs
        for name in names:
            if name.startswith("pool.db") or name == "pool.lock":
                continue
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = path.stat().st_size
    return out


def sql(pool_dir: Path, query: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(pool_dir / "pool.db")
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run `dynamicfs ARGS` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def program() -> str:
    """The installed `dynamicfs` program, next to this Python."""
    return shutil.which("dynamicfs", path=os.path.dirname(sys.executable)) or "dynamicfs"


def run_program(*args: object) -> subprocess.CompletedProcess[str]:
    """Run the installed `dynamicfs` program."""
    return subprocess.run([program(), *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=120)


def assert_one_line_error(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dynamicfs: error: "), err


@contextmanager
def read_only_view(source: Path, view: Path) -> Iterator[Path]:
    """`view` shows `source` through a read-only bind mount (root ignores chmod)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("read-only bind mounts need root and mount(8)")
    view.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True,
                       capture_output=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True, capture_output=True)


def interrupt_remove_disk(pool_dir: Path, disk_id: int,
                          env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `dynamicfs remove-disk POOL DISK` and press Ctrl-C (SIGINT) as soon as the
    disk is draining: (exit code, stderr)."""
    proc = subprocess.Popen([program(), "remove-disk", str(pool_dir), str(disk_id)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sql(pool_dir, "SELECT state FROM disks WHERE id = ?", (disk_id,)) \
                != [("draining",)]:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err
