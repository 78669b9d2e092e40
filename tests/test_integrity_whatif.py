"""what-if: the files at stake if disks failed, and how many failures the pool survives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.maintenance.whatif import failures_survivable, what_if
from integrity_support import cli, data_of, fragment_paths, make_pool, write_files


def what_if_json(capsys: pytest.CaptureFixture[str], pool_dir: Path,
                 *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli("what-if", str(pool_dir), *args, "--json")
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, disks=6)
    write_files(pool_dir, {"x/big": data_of("big", 200_000), "small": data_of("small", 100)})
    return pool_dir


def test_one_or_two_failed_disks_cost_ec_4_2_redundancy_but_no_file(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, r = what_if_json(capsys, pool_dir, "--fail", "1")
    assert code == 0 and not r["loses_data"]
    assert r["unreadable"] == [] and r["extents_unreadable"] == 0
    assert [(f["path"], f["margin"]) for f in r["less_redundant"]] == [("/small", 1),
                                                                      ("/x/big", 1)]
    assert (r["survivable_now"], r["survivable_after"]) == (2, 1)
    code, r = what_if_json(capsys, pool_dir, "--fail", "1", "2")
    assert code == 0 and r["survivable_after"] == 0
    assert {f["margin"] for f in r["less_redundant"]} == {0}


def test_three_failed_disks_make_ec_4_2_files_unreadable_and_the_command_says_so(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, r = what_if_json(capsys, pool_dir, "--fail", "1", "--fail", "2",
                           str(tmp_path / "disk2"))
    assert code == 1 and r["loses_data"]
    assert [d["id"] for d in r["disks"]] == [1, 2, 3]
    assert [f["path"] for f in r["unreadable"]] == ["/small", "/x/big"]
    assert r["less_redundant"] == []
    capsys.readouterr()
    assert cli("what-if", str(pool_dir), "--fail", "1", "2", "3") == 1
    out = capsys.readouterr().out
    assert "would become unreadable (2)" in out and "/x/big" in out


def test_what_if_counts_disks_that_already_failed(pool_dir: Path) -> None:
    with Pool.open(pool_dir) as pool:
        set_disk_health(pool, "6", "failed")
        assert failures_survivable(pool) == 1
        report = what_if(pool, ["1", "2"])
        assert report.loses_data and report.survivable_after == 0


def test_failures_survivable_follows_policy_and_known_damage(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=4, policy="replicate:3")
    with Pool.open(pool_dir) as pool:
        assert failures_survivable(pool) == 4  # nothing stored: any disk may go
    write_files(pool_dir, {"f": data_of("f", 150_000)})
    with Pool.open(pool_dir) as pool:
        assert failures_survivable(pool) == 2
    for fragment in fragment_paths(pool_dir, "f")[0]:
        fragment.unlink()
    with Pool.open(pool_dir) as pool:
        assert failures_survivable(pool) == 2  # the metadata alone cannot tell
        scrub(pool)
        assert failures_survivable(pool) == 0  # the scrub found an unreadable extent


def test_an_unknown_disk_is_a_one_line_error(pool_dir: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli("what-if", str(pool_dir), "--fail", "42") == 1
    err = capsys.readouterr().err
    assert err.startswith("dynamicfs: error: unknown disk '42'") and len(err.splitlines()) == 1
    assert cli("what-if", str(pool_dir)) != 0
