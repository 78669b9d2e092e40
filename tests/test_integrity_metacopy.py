"""Metadata copies on the disks, and recovering pool.db from them when it is lost or
corrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import pytest

from dynamicfs.engine.pool import Pool
from integrity_support import cli, data_of, flip_byte, make_pool, read_file, write_files

FIRST = {"a/one": data_of("one", 150_000), "two": data_of("two", 2000)}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli(*args, "--json")
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def lose_database(pool_dir: Path) -> None:
    for name in ("pool.db", "pool.db-wal", "pool.db-shm"):
        (pool_dir / name).unlink(missing_ok=True)


def copies(tmp_path: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in (d / "metadata").iterdir())
            for d in sorted(tmp_path.glob("disk*")) if (d / "metadata").is_dir()}


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, disks=5)
    write_files(pool_dir, FIRST)
    return pool_dir


def test_copy_metadata_puts_checked_copies_on_three_disks(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, r = run_json(capsys, "copy-metadata", str(pool_dir))
    assert code == 0 and r["generation"] == 1 and len(r["disks"]) == 3
    assert len(copies(tmp_path)) == 3
    with Pool.open(pool_dir) as pool:
        uuid = pool.config.uuid
    for d in r["disks"]:
        metadata = Path(str(d["path"])) / "metadata"
        db = (metadata / "pool-1.db").read_bytes()
        manifest = json.loads((metadata / "pool-1.json").read_text())
        assert manifest["magic"] == "DYNFSMETA" and manifest["generation"] == 1
        assert manifest["pool_uuid"] == uuid and manifest["size"] == len(db)
        assert manifest["blake3"] == blake3.blake3(db).hexdigest()
    listed = json.loads((pool_dir / "disks.json").read_text())
    assert listed["pool_uuid"] == uuid and len(listed["disks"]) == 5


def test_each_disk_keeps_the_last_two_generations(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for generation in (1, 2, 3):
        code, r = run_json(capsys, "copy-metadata", str(pool_dir))
        assert code == 0 and r["generation"] == generation
    assert set(map(tuple, copies(tmp_path).values())) == {
        ("pool-2.db", "pool-2.json", "pool-3.db", "pool-3.json")}


def test_a_deleted_database_is_recovered_and_files_read_back(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    later = {"later": data_of("later", 100_000)}
    write_files(pool_dir, later)  # after the copy: lost with the database
    lose_database(pool_dir)
    capsys.readouterr()
    assert cli("list-disks", str(pool_dir)) != 0
    assert "recover-metadata" in capsys.readouterr().err
    code, r = run_json(capsys, "recover-metadata", str(pool_dir))
    assert code == 0 and r["generation"] == 1 and r["moved_aside"] == []
    # Fragment ids handed out from now on never collide with the files written after
    # the copy, which are orphans now.
    write_files(pool_dir, {"new": data_of("new", 150_000)})
    assert read_file(pool_dir, "new") == data_of("new", 150_000)
    for path, data in FIRST.items():
        assert read_file(pool_dir, path) == data
    with pytest.raises(OSError):
        read_file(pool_dir, "later")
    code, r = run_json(capsys, "detect-orphans", str(pool_dir))
    assert code == 1 and len(r["orphans"]) == 10  # "later": 2 extents of 5 fragments
    code, r = run_json(capsys, "fsck", str(pool_dir))
    assert code == 0


def test_a_corrupt_database_is_moved_aside_and_recovered(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    db = pool_dir / "pool.db"
    with open(db, "r+b") as f:
        f.write(b"this is not SQLite" * 10)
    capsys.readouterr()
    assert cli("list-disks", str(pool_dir)) != 0
    assert "recover-metadata" in capsys.readouterr().err
    code, r = run_json(capsys, "recover-metadata", str(pool_dir))
    assert code == 0
    [aside] = r["moved_aside"]
    assert ".corrupt-" in aside and Path(aside).read_bytes().startswith(b"this is not")
    assert read_file(pool_dir, "a/one") == FIRST["a/one"]


def test_a_valid_database_is_replaced_only_with_force(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    capsys.readouterr()
    assert cli("recover-metadata", str(pool_dir)) == 1
    err = capsys.readouterr().err
    assert "valid metadata database" in err and "--force" in err
    code, r = run_json(capsys, "recover-metadata", str(pool_dir), "--force")
    assert code == 0 and ".replaced-" in r["moved_aside"][0]
    assert read_file(pool_dir, "two") == FIRST["two"]


def test_without_disks_json_the_disks_are_named_and_a_damaged_copy_is_skipped(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    write_files(pool_dir, {"three": data_of("three", 500)})
    code, r = run_json(capsys, "copy-metadata", str(pool_dir))
    assert r["generation"] == 2
    for d in r["disks"]:  # every copy of generation 2 rots
        flip_byte(Path(str(d["path"])) / "metadata" / "pool-2.db", 5000)
    lose_database(pool_dir)
    os.unlink(pool_dir / "disks.json")
    capsys.readouterr()
    assert cli("recover-metadata", str(pool_dir)) == 1
    assert "--disk DIR" in capsys.readouterr().err
    disks = [arg for d in sorted(tmp_path.glob("disk*")) for arg in ("--disk", str(d))]
    code, r = run_json(capsys, "recover-metadata", str(pool_dir), *disks)
    assert code == 0 and r["generation"] == 1
    assert {c["problem"] for c in r["candidates"] if not c["valid"]} == {
        "size or BLAKE3 differs from the manifest"}
    assert read_file(pool_dir, "a/one") == FIRST["a/one"]


def test_forced_recoveries_within_one_second_keep_every_database_they_moved_aside(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    capsys.readouterr()
    aside = []
    for _ in range(3):
        code, r = run_json(capsys, "recover-metadata", str(pool_dir), "--force")
        assert code == 0
        aside += r["moved_aside"]
    assert len(set(aside)) == 3 and all(Path(p).is_file() for p in aside)


def test_recover_refuses_a_disk_that_is_a_file_and_leaves_nothing_behind(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("copy-metadata", str(pool_dir)) == 0
    before = sorted(p.name for p in pool_dir.iterdir())
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    capsys.readouterr()
    assert cli("recover-metadata", str(pool_dir), "--force", "--disk", str(afile)) != 0
    err = capsys.readouterr().err
    assert err.startswith("dynamicfs: error: ") and "not a directory" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in pool_dir.iterdir()) == before


def test_recover_into_a_directory_with_nothing_to_recover_leaves_it_as_found(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "not-a-pool"
    empty.mkdir()
    for extra in ([], ["--disk", str(empty)]):
        assert cli("recover-metadata", str(empty), *extra) != 0
        err = capsys.readouterr().err
        assert err.startswith("dynamicfs: error: ") and len(err.strip().splitlines()) == 1
        assert list(empty.iterdir()) == []
