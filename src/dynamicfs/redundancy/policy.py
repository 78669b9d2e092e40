"""Redundancy policies: parsing `replicate:N`, `ec:K+M` and `auto`, and resolving `auto`.

A policy names how an extent is stored. `auto` is not a layout: it resolves, per file
size and per number of healthy disks, to a concrete `replicate:N` or `ec:K+M`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from dynamicfs.errors import PolicyError

AUTO = "auto"
AUTO_EC_THRESHOLD = 4 * 1024 * 1024
MAX_FRAGMENTS = 32
# The Reed-Solomon backend (isa_l_rs_vand, see codecs.py) uses a Vandermonde matrix that
# can rebuild an extent from *every* k of its k+m fragments only in some layouts: ec:6+5
# and ec:22+4, for instance, each have loss patterns of m fragments it cannot decode.
# Within these bounds every such pattern decodes (checked exhaustively in
# tests/test_codecs.py), so an ec policy never promises more than it can deliver.
MAX_EC_PARITY = 4
MAX_EC_WIDTH = 24

_REPLICATE = re.compile(r"^replicate:(\d+)$")
_EC = re.compile(r"^ec:(\d+)\+(\d+)$")


@dataclass(frozen=True)
class Policy:
    """A concrete layout. kind is 'replicate' (k=1, m=N-1) or 'ec' (k data + m parity)."""

    kind: str
    k: int
    m: int

    @property
    def width(self) -> int:
        """How many fragments a fully redundant extent has."""
        return self.k + self.m

    @property
    def minimum(self) -> int:
        """Fewest fragments a write may store (DESIGN invariant 6)."""
        if self.kind == "replicate":
            return 1 if self.width == 1 else 2
        return self.k + 1

    @property
    def overhead(self) -> float:
        """Raw bytes stored per byte of data."""
        return self.width / self.k

    def __str__(self) -> str:
        if self.kind == "replicate":
            return f"replicate:{self.width}"
        return f"ec:{self.k}+{self.m}"


def replicate(n: int) -> Policy:
    return Policy("replicate", 1, n - 1)


def ec(k: int, m: int) -> Policy:
    return Policy("ec", k, m)


@functools.lru_cache(maxsize=256)  # the write path parses each extent's policy
def parse_policy(text: str, allow_auto: bool = True) -> Policy | str:
    """Parse a policy string. Returns AUTO or a Policy (immutable, so shared); raises
    PolicyError with a hint."""
    value = text.strip().lower()
    if value == AUTO and allow_auto:
        return AUTO
    hint = (
        f"use replicate:N (1-{MAX_FRAGMENTS}), "
        f"ec:K+M (K>=1, 1<=M<={MAX_EC_PARITY}, K+M<={MAX_EC_WIDTH}) or auto"
    )
    if m := _REPLICATE.match(value):
        n = int(m.group(1))
        if 1 <= n <= MAX_FRAGMENTS:
            return replicate(n)
    elif m := _EC.match(value):
        k, parity = int(m.group(1)), int(m.group(2))
        if k >= 1 and 1 <= parity <= MAX_EC_PARITY and k + parity <= MAX_EC_WIDTH:
            return ec(k, parity)
    raise PolicyError(f"malformed policy {text!r}: {hint}")


def parse_concrete(text: str) -> Policy:
    """Parse a stored, concrete policy (never 'auto')."""
    policy = parse_policy(text, allow_auto=False)
    assert isinstance(policy, Policy)
    return policy


def resolve_auto(file_size: int, healthy_disks: int) -> Policy:
    """What `auto` means for a file of this size on a pool with this many healthy disks.

    replicate:3 under 4 MiB, ec:4+2 from 4 MiB; with fewer disks, the strongest layout
    that fits: keep two parity fragments while possible, never ask for more disks
    than there are.
    """
    n = max(1, healthy_disks)
    if file_size >= AUTO_EC_THRESHOLD and n >= 4:
        return ec(min(4, n - 2), 2)
    return replicate(min(3, n))


def describe_auto(healthy_disks: int) -> str:
    small = resolve_auto(0, healthy_disks)
    large = resolve_auto(AUTO_EC_THRESHOLD, healthy_disks)
    return f"{small} under 4 MiB, {large} from 4 MiB"
