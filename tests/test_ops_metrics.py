"""Metrics and health: scraped over HTTP from a real pool, printed by the CLI, and read
from a real mount through its control socket."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from admin_support import data_of, make_pool, run, write_files
from dynamicfs.admin import registry
from dynamicfs.engine.pool import Pool
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO
from dynamicfs.observability import metrics

KiB = 1024
MiB = 1024 * KiB
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        return parse(answer.read().decode())


def get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


@contextmanager
def serving(pool: Pool) -> Iterator[str]:
    server = metrics.serve_metrics(pool, "127.0.0.1:0")
    try:
        yield server.url
    finally:
        server.stop()


def write(ns: Namespace, name: str, data: bytes) -> int:
    ino = ns.create(ROOT_INO, name.encode(), 0o644, 0, 0).ino
    ns.write(ino, 0, data)
    ns.fsync(ino)
    ns.release(ino)
    return ino


def test_scraped_disk_counters_and_extents_move_with_writes_and_reads(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    with Pool.open(pool_dir) as pool, serving(pool) as url:
        before = scrape(url)
        assert total(before, "dynamicfs_disk_written_bytes_total") == 0
        assert value(before, "dynamicfs_extents", state="healthy") == 0
        for disk in ("1", "2", "3"):
            assert value(before, "dynamicfs_disk_state", disk=disk, state="healthy") == 1
            assert value(before, "dynamicfs_disk_state", disk=disk, state="failed") == 0
            assert value(before, "dynamicfs_disk_capacity_bytes", disk=disk) > 0
        ns = Namespace(pool)
        try:
            ino = write(ns, "f", data_of("f", MiB))
            written = scrape(url)
            assert total(written, "dynamicfs_disk_written_bytes_total") >= 2 * MiB
            assert total(written, "dynamicfs_disk_writes_total") == 32
            assert total(written, "dynamicfs_disk_used_bytes") >= 2 * MiB
            assert value(written, "dynamicfs_extents", state="healthy") == 16
            assert value(written, "dynamicfs_extent_bytes", state="healthy") == MiB
            assert total(written, "dynamicfs_disk_read_bytes_total") == 0

            assert ns.read(ino, 0, MiB) == data_of("f", MiB)
            read = scrape(url)
            assert total(read, "dynamicfs_disk_read_bytes_total") >= MiB
            assert total(read, "dynamicfs_disk_reads_total") >= 16
        finally:
            ns.close()


def test_health_endpoint_and_metrics_follow_failed_disks_and_rebuilds(
        tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {f"/f{i}": data_of(f"f{i}", 128 * KiB) for i in range(6)})
    with Pool.open(pool_dir) as pool, serving(pool) as url:
        code, doc = get_json(url + "/health")
        assert (code, doc["status"], doc["exit_code"]) == (200, "healthy", 0)

        registry.run(pool, "set-disk-health", {"ref": "1", "state": "failed"})
        samples = scrape(url)
        on_disk_1 = pool.meta.conn.execute(
            "SELECT count(DISTINCT extent_id) FROM fragments WHERE disk_id = 1").fetchone()[0]
        assert on_disk_1 > 0
        assert value(samples, "dynamicfs_extents", state="under_redundant") == on_disk_1
        assert value(samples, "dynamicfs_extents", state="unreadable") == 0
        assert value(samples, "dynamicfs_disk_state", disk="1", state="failed") == 1
        code, doc = get_json(url + "/health")
        assert (code, doc["status"], doc["exit_code"]) == (503, "degraded", 1)
        assert doc["at_risk"]["under_redundant"]  # type: ignore[index]

        extra = tmp_path / "disk-new"
        extra.mkdir()
        registry.run(pool, "add-disk", {"path": str(extra)})
        registry.run(pool, "repair", {})
        repaired = scrape(url)
        assert value(repaired, "dynamicfs_rebuild_attempts_total") >= on_disk_1
        assert value(repaired, "dynamicfs_rebuild_successes_total") == on_disk_1
        assert value(repaired, "dynamicfs_rebuild_bytes_total") >= on_disk_1 * 64 * KiB
        assert value(repaired, "dynamicfs_extents", state="under_redundant") == 0

        with urllib.request.urlopen(url + "/", timeout=30) as answer:
            assert b"/metrics" in answer.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "/nothing", timeout=30)
        assert missing.value.code == 404


def test_fuse_latency_histogram_counts_observed_requests(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2, policy="replicate:2")
    with Pool.open(pool_dir) as pool:
        name = "dynamicfs_fuse_op_seconds"
        first = parse(metrics.render(pool))

        def grew(samples: Samples, suffix: str, **labels: str) -> float:
            key = (name + suffix, tuple(sorted({"op": "test_op", **labels}.items())))
            return samples.get(key, 0.0) - first.get(key, 0.0)

        for seconds in (0.0002, 3.0, 30.0):
            metrics.observe_fuse("test_op", seconds)
        samples = parse(metrics.render(pool))
        assert grew(samples, "_count") == 3
        assert grew(samples, "_sum") == pytest.approx(33.0002)
        # Buckets are cumulative: le="0.00025" holds one, le="10.0" two, +Inf all three.
        assert [grew(samples, "_bucket", le=le) for le in ("0.0001", "0.00025", "2.5", "5.0",
                                                           "10.0", "+Inf")] == [0, 1, 1, 2, 2, 3]
        assert metrics.last_fuse_request() > 0


def test_metrics_and_health_commands_offline(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/a/file": data_of("a", 200 * KiB), "/b": data_of("b", 10 * KiB)})
    code, out, _ = run(capsys, "metrics", pool_dir)
    assert code == 0
    assert value(parse(out), "dynamicfs_extents", state="healthy") == 5

    code, out, _ = run(capsys, "health", pool_dir)
    assert code == 0 and "HEALTHY" in out

    # A disk directory gone since the last probe: degraded at once, healthy once back.
    disk = Path(json.loads(run(capsys, "list-disks", pool_dir, "--json")[1])[2]["path"])
    disk.rename(disk.with_name("moved"))
    code, out, _ = run(capsys, "health", pool_dir, "--json")
    assert (code, json.loads(out)["status"]) == (1, "degraded")
    assert any(f"disk 3 ({disk}) is missing" in p for p in json.loads(out)["problems"])
    disk.with_name("moved").rename(disk)
    assert run(capsys, "health", pool_dir)[0] == 0

    code, _, _ = run(capsys, "fail-disk", pool_dir, "1")
    assert code == 0
    code, out, _ = run(capsys, "health", pool_dir, "--json")
    doc = json.loads(out)
    assert (code, doc["status"]) == (1, "degraded")
    assert "/a/file" in doc["at_risk"]["under_redundant"]

    code, _, _ = run(capsys, "fail-disk", pool_dir, "2", "--force")
    assert code == 0
    code, out, _ = run(capsys, "health", pool_dir)
    assert code == 2
    assert "UNREADABLE" in out and "/a/file" in out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mounted(pool_dir: Path, mnt: Path, *options: str) -> Iterator[Path]:
    mnt.mkdir()
    cli = [sys.executable, "-m", "dynamicfs.cli.main"]
    subprocess.run([*cli, "mount", str(pool_dir), str(mnt), *options], check=True,
                   capture_output=True, timeout=120)
    try:
        yield mnt
    finally:
        done = subprocess.run([*cli, "unmount", str(mnt)], capture_output=True, timeout=300)
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


@contextmanager
def metrics_server_program(pool_dir: Path, *args: str) -> Iterator[str]:
    """`dynamicfs metrics-server POOL ARGS` in its own process; yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "dynamicfs.cli.main", "metrics-server",
                             str(pool_dir), *args], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(proc.stderr.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(60)
        match = re.search(r"(http://[\d.]+:\d+)/metrics", found[0] if found else "")
        assert match, f"metrics-server said {found!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


@pytest.mark.fuse
def test_mounted_pool_serves_fuse_latency_and_health_through_its_daemon(
        tmp_path: Path, fuse_available: None, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    port = free_port()
    with mounted(pool_dir, tmp_path / "mnt", "--metrics-address", f"127.0.0.1:{port}") as mnt:
        with open(mnt / "file", "wb") as f:
            f.write(data_of("file", 300 * KiB))
            os.fsync(f.fileno())  # the fragments are written once this returns
        from_daemon = scrape(f"http://127.0.0.1:{port}")
        assert value(from_daemon, "dynamicfs_fuse_op_seconds_count", op="create") == 1
        assert get_json(f"http://127.0.0.1:{port}/health")[0] == 200
        # The port in the address, as --metrics-address takes it (0: any free one).
        with metrics_server_program(pool_dir, "--address", "127.0.0.1:0") as url:
            samples = scrape(url)
            assert value(samples, "dynamicfs_fuse_op_seconds_count", op="write") >= 1
            assert value(samples, "dynamicfs_fuse_op_seconds_count", op="create") == 1
            assert total(samples, "dynamicfs_disk_written_bytes_total") >= 600 * KiB
            code, doc = get_json(url + "/health")
            assert (code, doc["status"]) == (200, "healthy")
        assert (mnt / "file").read_bytes() == data_of("file", 300 * KiB)
        code, out, _ = run(capsys, "metrics", pool_dir)
        assert code == 0
        assert value(parse(out), "dynamicfs_fuse_op_seconds_count", op="read") >= 1
        code, out, _ = run(capsys, "health", pool_dir, "--json")
        assert (code, json.loads(out)["status"]) == (0, "healthy")


def test_dashboard_asks_only_for_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((Path(__file__).parent.parent / "dashboards" /
                            "dynamicfs-grafana.json").read_text())
    pool_dir = make_pool(tmp_path, [None], policy="replicate:1")
    with Pool.open(pool_dir) as pool:
        families = list(text_string_to_metric_families(metrics.render(pool)))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",), "info": ("_info",)}
    exported = {f.name + s for f in families for s in suffixes.get(f.type, ("",))}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    asked = set()
    for panel in panels:
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            asked |= set(re.findall(r"\bdynamicfs_[a-z_]+", target["expr"]))
    assert asked and asked <= exported, asked - exported
    assert any("histogram_quantile" in t["expr"] for p in panels for t in p["targets"])


def test_health_reports_metadata_copy_generations_and_scrubs(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/f": data_of("f", 256 * KiB)})
    with Pool.open(pool_dir) as pool:
        never = registry.run(pool, "health", {})
        assert never["metadata_generation"] is None and never["metadata_copies"] == []
        assert any("never been scrubbed" in w for w in never["warnings"])
        registry.run(pool, "copy-metadata", {})
        registry.run(pool, "copy-metadata", {})
        registry.run(pool, "scrub", {})
        report = registry.run(pool, "health", {})
    generation = report["metadata_generation"]["generation"]
    assert generation == 2
    assert report["metadata_copies"] and all(
        c["newest"] == generation and c["generations"] == [1, 2]
        for c in report["metadata_copies"])
    scrubbed = report["last_scrub"]
    assert (scrubbed["kind"], scrubbed["checked"], scrubbed["in_progress"]) == ("manual", 4, False)
    assert report["status"] == "healthy" and report["warnings"] == []
