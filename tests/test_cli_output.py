"""What the installed `dynamicfs` program prints: tables that scripts can read when
piped, JSON that parses, and a progress bar on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from admin_support import data_of, make_pool, program, run_program, write_files


def test_piped_tables_keep_every_row_on_one_line(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "disk-with-a-long-name"
    deep.mkdir(parents=True)
    pool_dir = make_pool(tmp_path, [None])
    assert run_program("add-disk", pool_dir, deep, "--tier", "fast").returncode == 0

    done = run_program("list-disks", pool_dir)

    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if str(deep) in line]
    assert len(rows) == 1
    assert "fast" in rows[0] and "healthy" in rows[0]
    assert len(rows[0]) > 120


def test_json_output_parses(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3)
    write_files(pool_dir, {"/f": data_of("f", 1000)})
    for argv in (["status", pool_dir], ["list-disks", pool_dir], ["list-extents", pool_dir],
                 ["show-redundancy", pool_dir, "--file", "/f"], ["probe-disks", pool_dir]):
        done = run_program(*argv, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)


def test_remove_disk_on_a_terminal_shows_progress_and_a_summary(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, extent_size=64 * 1024)
    write_files(pool_dir, {"/f": data_of("f", 1_000_000)})
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([program(), "remove-disk", str(pool_dir), "1"],
                                stdin=follower, stdout=follower, stderr=follower)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closes when the program exits
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=120) == 0, output
    finally:
        os.close(leader)
    assert b"removed disk 1" in output


def test_a_long_table_is_printed_as_plain_columns(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None], policy="replicate:1", extent_size=4096)
    write_files(pool_dir, {"/many": data_of("many", 2100 * 4096)})

    done = run_program("list-extents", pool_dir)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["extent", "file", "chunk", "length", "policy", "fragments",
                                "state"]
    assert len(lines) == 2101
    assert lines[-1].split()[1:] == ["/many", "2099", "4096", "replicate:1", "1/1", "healthy"]
