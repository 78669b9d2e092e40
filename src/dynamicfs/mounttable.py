"""The mount table as this process sees it (/proc/self/mountinfo): which filesystem is
mounted where, and which mount a path lies in. No FUSE library needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.dynamicfs"


@dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: str
    fstype: str
    device: str  # "major:minor"


def _unescape(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal."""
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and i + 3 < len(field_) and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    """The mounts this process sees, from /proc/self/mountinfo."""
    entries = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        left, right = before.split(" "), after.split(" ")
        if not sep or len(left) < 5 or len(right) < 2:
            continue
        entries.append(MountEntry(_unescape(right[1]), _unescape(left[4]), right[0], left[2]))
    return entries


def find_mount(mountpoint: Path | str) -> MountEntry | None:
    """The topmost mount on `mountpoint`, or None."""
    target = os.path.abspath(mountpoint)
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def mount_holding(path: Path) -> tuple[Path, MountEntry] | None:
    """The mount `path` lies in: the topmost one on its nearest ancestor that has one."""
    topmost = {e.mountpoint: e for e in mounts()}
    for place in (path, *path.parents):
        entry = topmost.get(str(place))
        if entry is not None:
            return place, entry
    return None
