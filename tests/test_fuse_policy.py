"""Redundancy policies through the mount: the user.dynamicfs.policy and
user.dynamicfs.layout xattrs, inheritance, refusal of bad values, and `auto`."""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusehelpers import Mount, have, mounted_pool

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("fuse_available")]

MiB = 1 << 20
POLICY = "user.dynamicfs.policy"
LAYOUT = "user.dynamicfs.layout"
needs_attr_tools = pytest.mark.skipif(not (have("setfattr") and have("getfattr")),
                                      reason="setfattr/getfattr missing (attr package)")


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    from conftest import fuse_missing_reason

    reason = fuse_missing_reason()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")
    with mounted_pool(tmp_path_factory.mktemp("policy"), disks=6) as m:
        yield m


def getfattr(path: Path, name: str) -> str:
    return subprocess.run(["getfattr", "--only-values", "-n", name, str(path)],
                          capture_output=True, text=True, check=True).stdout


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: the layout xattr shows extents once they are stored."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def layout(path: Path) -> list[tuple[int, str, list[int]]]:
    """(chunk, policy, disks of its fragments) per extent, from user.dynamicfs.layout."""
    out = []
    for line in os.getxattr(path, LAYOUT).decode().splitlines():
        m = re.match(r"chunk (\d+) extent \d+ (\S+) \d+ bytes: (.*)$", line)
        assert m, line
        disks = [int(d) for d in re.findall(r"\d+@disk(\d+)", m.group(3))]
        out.append((int(m.group(1)), m.group(2), disks))
    return out


def policies_settle(path: Path, want: str, timeout: float = 60.0) -> list[str]:
    """The extents' policies once they all are `want` (conversion runs after close)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [p for _c, p, _d in layout(path)]
        if set(got) == {want} or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


@needs_attr_tools
def test_directory_policy_is_inherited_by_new_files(fs: Mount) -> None:
    d = fs / "ec"
    d.mkdir()
    subprocess.run(["setfattr", "-n", POLICY, "-v", "ec:4+2", str(d)], check=True)
    (d / "sub").mkdir()
    data = random.Random(1).randbytes(3 * MiB)  # under 4 MiB: auto would say replicate:3
    write_synced(d / "sub" / "f", data)
    assert getfattr(d / "sub", POLICY) == "ec:4+2"
    assert getfattr(d / "sub" / "f", POLICY) == "ec:4+2"
    extents = layout(d / "sub" / "f")
    assert [c for c, _p, _d in extents] == [0, 1, 2]
    for _chunk, policy, disks in extents:
        assert policy == "ec:4+2" and len(set(disks)) == 6
    assert (d / "sub" / "f").read_bytes() == data


@needs_attr_tools
def test_getfattr_shows_the_effective_policy(fs: Mount) -> None:
    (fs / "plain").write_bytes(b"x")
    assert getfattr(fs.mnt, POLICY) == "auto"
    assert getfattr(fs / "plain", POLICY) == "auto"
    subprocess.run(["setfattr", "-n", POLICY, "-v", "replicate:2", str(fs / "plain")],
                   check=True)
    assert getfattr(fs / "plain", POLICY) == "replicate:2"
    assert getfattr(fs.mnt, POLICY) == "auto"


@needs_attr_tools
def test_invalid_policy_is_refused_with_einval_and_changes_nothing(fs: Mount) -> None:
    d = fs / "strict"
    d.mkdir()
    os.setxattr(d, POLICY, b"replicate:2")
    done = subprocess.run(["setfattr", "-n", POLICY, "-v", "ec:9+9", str(d)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Invalid argument" in done.stderr
    # An erasure code needs k+1 disks at least; this pool has six (replication
    # degrades instead: replicate:8 is taken).
    for bad in (b"banana", b"replicate:0", b"ec:4", b"", b"ec:6+1", b"ec:10+2"):
        with pytest.raises(OSError) as info:
            os.setxattr(d, POLICY, bad)
        assert info.value.errno == errno.EINVAL, bad
    assert getfattr(d, POLICY) == "replicate:2"
    write_synced(d / "f", b"y" * 5000)
    assert [p for _c, p, _d in layout(d / "f")] == ["replicate:2"]


def test_layout_lists_every_extent_and_is_read_only(fs: Mount) -> None:
    d = fs / "two"
    d.mkdir()
    os.setxattr(d, POLICY, b"replicate:2")
    write_synced(d / "f", random.Random(2).randbytes(2 * MiB + MiB // 2))
    extents = layout(d / "f")
    assert [c for c, _p, _disks in extents] == [0, 1, 2]
    for _chunk, policy, disks in extents:
        assert policy == "replicate:2" and len(set(disks)) == 2
    (d / "empty").write_bytes(b"")
    assert layout(d / "empty") == []
    with pytest.raises(OSError):
        os.setxattr(d / "f", LAYOUT, b"chunk 0 extent 1")


def test_auto_gives_small_files_replicas_and_large_files_erasure_coding(fs: Mount) -> None:
    rng = random.Random(3)
    small, large = rng.randbytes(10 * 1024), rng.randbytes(5 * MiB)
    (fs / "small").write_bytes(small)
    with open(fs / "large", "wb") as f:  # grows past 4 MiB while written
        for i in range(5):
            f.write(large[i * MiB:(i + 1) * MiB])
    assert policies_settle(fs / "small", "replicate:3") == ["replicate:3"]
    assert policies_settle(fs / "large", "ec:4+2") == ["ec:4+2"] * 5
    assert (fs / "small").read_bytes() == small
    assert (fs / "large").read_bytes() == large
