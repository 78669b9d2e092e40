"""The audit trail and the JSON log: who changed the pool, by which path, with what result."""

from __future__ import annotations

import json
import logging
import os
import pwd
from pathlib import Path

import pytest

from admin_support import make_pool, run, sql
from dynamicfs.control import client
from dynamicfs.control.server import ControlServer
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.observability import log as logmod
from dynamicfs.observability.audit import read_audit


@pytest.fixture(autouse=True)
def quiet_log() -> object:
    yield
    logmod.configure()  # drop the handlers a test pointed at its pool


def audit_rows(pool_dir: Path) -> list[dict[str, object]]:
    rows = sql(pool_dir, "SELECT kind, detail FROM events WHERE kind LIKE 'audit:%' ORDER BY id")
    return [{"event": str(k).removeprefix("audit:"), **json.loads(str(d))} for k, d in rows]


def log_lines(pool_dir: Path) -> list[dict[str, object]]:
    text = (pool_dir / "logs" / "dynamicfs.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_offline_change_is_audited_with_user_and_outcome(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None])
    disk = tmp_path / "more"
    disk.mkdir()
    code, _, _ = run(capsys, "add-disk", pool_dir, disk, "--tier", "fast")
    assert code == 0
    record = read_audit(pool_dir)[-1]
    me = pwd.getpwuid(os.getuid()).pw_name
    assert record["event"] == "admin" and record["op"] == "add-disk"
    assert (record["uid"], record["user"], record["via"]) == (os.getuid(), me, "cli")
    assert record["outcome"] == "ok"
    assert record["args"] == {"path": str(disk), "capacity": None, "tier": "fast"}
    stored = audit_rows(pool_dir)[-1]
    assert (stored["op"], stored["user"], stored["request"]) == ("add-disk", me,
                                                                 record["request"])
    assert (pool_dir / "logs" / "audit.log").stat().st_mode & 0o077 == 0


def test_refused_change_is_audited_with_its_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None])
    code, _, err = run(capsys, "add-disk", pool_dir, tmp_path / "missing")
    assert code != 0
    record = read_audit(pool_dir)[-1]
    assert (record["op"], record["outcome"]) == ("add-disk", "refused")
    assert "does not exist" in str(record["error"])
    assert str(record["error"]) in err


def test_read_only_operations_leave_no_audit_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None, None])
    before = len(read_audit(pool_dir))
    for args in (["list-disks"], ["health"], ["metrics"], ["audit-log"]):
        code, _, _ = run(capsys, args[0], pool_dir, *args[1:])
        assert code == 0
    assert len(read_audit(pool_dir)) == before


def test_control_socket_audits_the_peer_and_tags_log_lines_with_the_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None])
    disk = tmp_path / "more"
    disk.mkdir()
    with Pool.open(pool_dir) as pool:
        logmod.configure_for_pool(pool_dir)
        server = ControlServer(pool)
        server.start()
        try:
            client.call(pool_dir, "add-disk", {"path": str(disk)})
            with pytest.raises(DynamicFSError, match="not a directory|does not exist"):
                client.call(pool_dir, "add-disk", {"path": str(tmp_path / "missing")})
            records = client.call(pool_dir, "audit-log", {"limit": 2})
        finally:
            server.stop()
    ok, refused = read_audit(pool_dir)[-2:]
    assert (ok["via"], ok["uid"], ok["pid"], ok["outcome"]) == ("control", os.getuid(),
                                                               os.getpid(), "ok")
    assert refused["outcome"] == "refused"
    assert [r["outcome"] for r in records] == ["ok", "refused"]
    tagged = [line for line in log_lines(pool_dir) if line.get("request") == ok["request"]]
    assert tagged and all(line["pool"] == str(pool_dir) for line in tagged)
    assert {"time", "level", "event"} <= set(tagged[0])
    assert audit_rows(pool_dir)[-1]["outcome"] == "refused"  # committed by the server

    code, out, _ = run(capsys, "audit-log", pool_dir)
    assert code == 0 and "control" in out and "refused" in out


def test_log_level_comes_from_the_option_or_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNAMICFS_LOG", "debug")
    logmod.configure_for_pool(tmp_path)
    logmod.debug("seen at debug", disk=3, extent=7)
    logmod.configure_for_pool(tmp_path, level="warning")
    logmod.log("hidden at warning")
    logmod.warn("seen at warning", inode=5)
    monkeypatch.setenv("DYNAMICFS_LOG", "no-such-level")
    assert logmod.level_from(None) == logging.INFO
    lines = log_lines(tmp_path)
    assert [line["event"] for line in lines] == ["seen at debug", "seen at warning"]
    assert lines[0]["level"] == "debug" and lines[0]["disk"] == 3 and lines[0]["extent"] == 7
    assert lines[1]["inode"] == 5 and lines[1]["pool"] == str(tmp_path)
    assert str(lines[0]["time"]).endswith("Z")
