"""The README's first command: the demo survives two disk failures and ends clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_survives_two_disk_failures_and_ends_clean(
        tmp_path: Path, fuse_available: None) -> None:
    done = subprocess.run([sys.executable, "-m", "dynamicfs.demo", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    checks = re.findall(r"checked (\d+) files: (\d+) identical, (\d+) different", out)
    assert len(checks) == 2  # after the failures, and after the rebuild and a remount
    assert all(total == same and int(total) > 100 and diff == "0"
               for total, same, diff in checks), checks
    assert "0 under-redundant, 0 unreadable" in out
    assert "scrub: no problems left" in out
    assert "every file matched, before and after the rebuild" in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
