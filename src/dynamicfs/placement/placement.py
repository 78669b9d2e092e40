"""Choosing disks for the fragments of an extent.

Fragments of one extent go to distinct disks (DESIGN invariant 1), only to disks that
accept new fragments (healthy), preferring the disks with the most free capacity: the
disks' free space evens out as they fill, so unequal disks fill in proportion and the
usable capacity is as large as it can be.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    disk_id: int
    free: int
    tier: str = ""


def choose_disks(candidates: list[Candidate], count: int, fragment_size: int,
                 exclude: frozenset[int] | set[int] = frozenset(),
                 prefer_tier: str | None = None) -> list[int]:
    """Up to `count` distinct disk ids, most free first, each with room for a fragment.

    Returns fewer than `count` when fewer disks qualify; the caller decides whether
    that is enough (invariant 6). Ties keep the candidates' order.
    """
    usable = [c for c in candidates if c.disk_id not in exclude and c.free >= fragment_size]
    if prefer_tier:
        usable.sort(key=lambda c: (c.tier != prefer_tier, -c.free))
    else:
        usable.sort(key=lambda c: -c.free)
    return [c.disk_id for c in usable[:count]]


def usable_capacity(free_by_disk: list[int], width: int, k: int) -> int:
    """Data bytes that still fit under a policy of `width` fragments (k of them data).

    Greedy bound for "fill the emptiest disks first": with fragments of size s spread
    over `width` distinct disks, the number of stripes T satisfies
    sum(min(free_i, T*s)) >= T*s*width. Binary search for the largest T (in bytes of
    one fragment column) and return T*k.
    """
    disks = sorted((f for f in free_by_disk if f > 0), reverse=True)
    if len(disks) < width:
        return 0
    lo, hi = 0, sum(disks) // width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(f, mid) for f in disks) >= mid * width:
            lo = mid
        else:
            hi = mid - 1
    return lo * k
