"""Crash consistency through a real mount (DESIGN invariant 5): two file workloads
(tests/crashload.py) run side by side in the mount, the mount daemon is killed with
SIGKILL at a random moment, and then

- the pool mounts again at once, although the dead daemon left mount.json, mount.pid
  and its control socket behind;
- every file a workload fsynced (and journalled outside the mount) reads back byte
  for byte, every retired one is gone, every one replaced by a new copy renamed over
  it (not fsynced) holds the old or the new content whole, and every file in the
  mount is readable;
- `dynamicfs fsck` finds nothing wrong, `cleanup-orphans --older-than 0s` removes the
  fragments the crash left unreferenced, and `dynamicfs scrub` finds every extent
  healthy.

One pool serves every trial, so later crashes also check the files of earlier trials.
Each trial is seeded (the workloads, and how long they run before the kill): a failing
seed replays, as far as the timing of two processes replays. DYNAMICFS_CRASH_TRIALS=N
runs N trials (default 20), starting at seed DYNAMICFS_CRASH_SEED (default 0).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crashload import digest, expected
from fusehelpers import PY, Mount, cli, is_mounted, make_pool, wait_gone

pytestmark = pytest.mark.fuse

CRASHLOAD = Path(__file__).with_name("crashload.py")
TRIALS = int(os.environ.get("DYNAMICFS_CRASH_TRIALS", "20"))
FIRST_SEED = int(os.environ.get("DYNAMICFS_CRASH_SEED", "0"))
KEEP_TRIALS = 3  # trial directories kept (and checked again) after their trial
WORKLOADS = 2  # per trial, side by side: races between requests show up in a few trials


@dataclass
class CrashPool:
    mount: Mount
    journals: Path
    trials: list[int] = field(default_factory=list)  # seeds whose files are still there

    def workloads(self, seed: int) -> list[tuple[str, int, Path]]:
        """(directory in the mount, workload seed, journal) of each workload of a trial."""
        return [(f"t{seed}-{k}", seed * 10 + k, self.journals / f"t{seed}-{k}.jsonl")
                for k in range(WORKLOADS)]


@pytest.fixture(scope="module")
def crash_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashPool]:
    root = tmp_path_factory.mktemp("crash")
    pool_dir, disks = make_pool(root, 6, extent_size=256 * 1024)
    (root / "mnt").mkdir()
    (root / "journals").mkdir()
    m = Mount(pool_dir, root / "mnt", disks)
    try:
        yield CrashPool(m, root / "journals")
    finally:
        m.force_unmount()


def started(workdirs: list[Path], loads: list[subprocess.Popen[bytes]],
            timeout: float = 30) -> None:
    """Wait until the workloads have made their directories: the kill must hit their
    work, not the start of the Python interpreter."""
    deadline = time.monotonic() + timeout
    while not all(w.exists() for w in workdirs):
        assert all(p.poll() is None for p in loads), "a workload stopped at its start"
        assert time.monotonic() < deadline, "the workloads did not start"
        time.sleep(0.01)


def crash(m: Mount, loads: list[subprocess.Popen[bytes]], clear_with_unmount: bool) -> None:
    """SIGKILL the mount daemon (and the workloads), then clear the dead mount: with
    `dynamicfs unmount` (which also drops the files the daemon left) or with
    `fusermount3 -uz` (which leaves them for the next mount to ignore)."""
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    for load in loads:
        load.kill()
        load.wait()
    wait_gone(m.pid)
    m.pid = None
    assert (m.pool / "mount.json").exists(), "the killed daemon left no mount.json behind"
    if clear_with_unmount:
        cli("unmount", m.mnt)
    else:
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], check=True)
    assert not is_mounted(m.mnt)


def check_journal(journal: Path, root: Path) -> int:
    """Every sealed file as journalled, every retired one gone; returns files checked."""
    checked = 0
    for rel, want in expected(journal).items():
        path = root / rel
        if want.gone or (want.may_be_gone and not path.exists()):
            assert not path.exists(), f"{rel} was unlinked and the directory fsynced"
            continue
        data = path.read_bytes()
        assert (len(data), digest(data)) in [(want.size, want.blake2b), want.instead], \
            f"{rel} differs from what was fsynced ({len(data)} bytes, {want.size} expected" + \
            (f" or {want.instead[0]} replacing it)" if want.instead else ")")
        checked += 1
    return checked


def read_everything(root: Path) -> int:
    """Read every file under root; any EIO fails the test. Returns the bytes read."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


def run_json(*args: str | os.PathLike[str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    done = cli(*args, "--json", check=False)
    try:
        return done.returncode, dict(json.loads(done.stdout))
    except ValueError:
        raise AssertionError(f"dynamicfs {args[0]}: {done.stderr.strip()}") from None


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + TRIALS))
def test_fsynced_files_survive_a_kill_9_of_the_mount_daemon(
        crash_pool: CrashPool, seed: int, fuse_available: None) -> None:
    m = crash_pool.mount
    rng = random.Random(seed)
    if is_mounted(m.mnt):  # an earlier trial failed half-way
        m.force_unmount()
    m.mount()
    mine = crash_pool.workloads(seed)
    loads = []
    for name, load_seed, journal in mine:
        with open(journal.with_suffix(".out"), "wb") as out:
            loads.append(subprocess.Popen([PY, str(CRASHLOAD), str(m.mnt / name), str(journal),
                                           "--seed", str(load_seed)], stdout=out, stderr=out))
    try:
        started([m.mnt / name for name, _, _ in mine], loads)
        time.sleep(rng.uniform(0.2, 2.0))
        for (_, _, journal), load in zip(mine, loads, strict=True):
            assert load.poll() is None, \
                f"a workload stopped early: {journal.with_suffix('.out').read_text()}"
    finally:
        crash(m, loads, clear_with_unmount=seed % 2 == 1)
    crash_pool.trials.append(seed)

    m.mount()
    checked = sum(check_journal(journal, m.mnt / name)
                  for s in crash_pool.trials for name, _, journal in crash_pool.workloads(s))
    assert checked > 0 or not any(expected(j) for _, _, j in mine), "nothing was checked"
    read_everything(m.mnt)
    while len(crash_pool.trials) > KEEP_TRIALS:
        for name, _, _ in crash_pool.workloads(crash_pool.trials.pop(0)):
            if (m.mnt / name).exists():  # a directory never fsynced may be lost in a crash
                shutil.rmtree(m.mnt / name)
    m.unmount()

    code, fsck = run_json("fsck", m.pool)
    assert code == 0 and fsck["problems"] == [], fsck["problems"]
    cli("cleanup-orphans", m.pool, "--older-than", "0s")
    code, orphans = run_json("detect-orphans", m.pool)
    assert code == 0, orphans
    code, scrub = run_json("scrub", m.pool)
    assert code == 0 and scrub["clean"], scrub
