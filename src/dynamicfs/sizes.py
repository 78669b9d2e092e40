"""Parsing and printing byte sizes ('1MiB', '64k', '2G')."""

from __future__ import annotations

import re

from dynamicfs.errors import SizeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = (1 << 63) - 1  # what SQLite's INTEGER (and a file offset) holds


def parse_size(text: str) -> int:
    """'1MiB' -> 1048576. Binary units for bare letters (k, M, G, T), SI for kB, MB, GB."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise SizeError(f"malformed size {text!r}: use a number with an optional unit, "
                        "e.g. 512K, 1MiB, 20G")
    try:
        value = int(float(match.group(1)) * _UNITS[unit])
    except OverflowError:  # float('1' * 400) is inf
        value = MAX_SIZE + 1
    if value > MAX_SIZE:
        raise SizeError(f"size {text!r} is too large (at most 8 EiB)")
    if value <= 0:
        raise SizeError(f"size {text!r} must be greater than zero")
    return value


def format_size(n: int | float) -> str:
    """1048576 -> '1.0 MiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
