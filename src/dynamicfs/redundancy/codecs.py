"""Codecs: replication and Reed-Solomon erasure coding of one extent.

Replication stores the extent's bytes as every fragment. Reed-Solomon uses pyeclib's
`isa_l_rs_cauchy` backend (ISA-L, measured ~10 GB/s encode here against ~1 GB/s for
zfec; unlike `isa_l_rs_vand` it decodes from every set of k fragments in all layouts we
accept: see docs/CODECS.md). Its fragments carry pyeclib's own 80-byte header, which is part
of our fragment payload and covered by our checksum.

decode() never returns wrong bytes: given fewer than k fragments it raises
UnreadableError; callers verify the extent checksum afterwards anyway. When every data
fragment is at hand, the extent is their data parts joined (`join_data`, no decoding):
the `size` field of pyeclib's header (bytes 4-7, little-endian) says how long each part
is. pyeclib must be given `bytes` (it aborts the process on other buffers), so payloads
that arrive as memoryviews are copied first.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Mapping
from typing import Any

from dynamicfs.errors import UnreadableError
from dynamicfs.redundancy.policy import Policy

RS_BACKEND = "isa_l_rs_cauchy"
PYECLIB_HEADER = 80  # pyeclib's fragment header, ahead of each fragment's data part
_SIZE = struct.Struct("<I")  # its `size` field, at byte 4: length of the data part

Payload = bytes | memoryview

_drivers: dict[tuple[int, int], object] = {}
_drivers_lock = threading.Lock()


def _driver(k: int, m: int) -> Any:
    from pyeclib.ec_iface import ECDriver

    with _drivers_lock:
        drv = _drivers.get((k, m))
        if drv is None:
            drv = ECDriver(k=k, m=m, ec_type=RS_BACKEND)
            _drivers[(k, m)] = drv
        return drv


def _bytes(payload: Payload) -> bytes:
    return payload if isinstance(payload, bytes) else bytes(payload)


def encode(policy: Policy, data: Payload) -> list[bytes]:
    """Turn an extent into policy.width fragment payloads (index i -> payload)."""
    data = _bytes(data)
    if policy.kind == "replicate":
        return [data] * policy.width
    return list(_driver(policy.k, policy.m).encode(data))


def join_data(policy: Policy, fragments: Mapping[int, Payload], length: int) -> bytes | None:
    """The extent as the data parts of its data fragments joined, if all k are here and
    their headers add up to `length`; None otherwise (decode() then). Unchecked: callers
    verify the extent checksum, and decode() when it fails."""
    parts = []
    total = 0
    for index in range(policy.k):
        payload = fragments.get(index)
        if payload is None or len(payload) < PYECLIB_HEADER:
            return None
        (size,) = _SIZE.unpack_from(payload, 4)
        if PYECLIB_HEADER + size > len(payload):
            return None
        parts.append(memoryview(payload)[PYECLIB_HEADER: PYECLIB_HEADER + size])
        total += size
    if total < length:
        return None
    joined = b"".join(parts)
    return joined if total == length else joined[:length]


def decode(policy: Policy, fragments: Mapping[int, Payload], length: int) -> Payload:
    """Rebuild the extent from any k fragments (index -> payload). Under replication this
    is one of the payloads as it is."""
    if policy.kind == "replicate":
        for payload in fragments.values():
            return payload
        raise UnreadableError("no replica left")
    if len(fragments) < policy.k:
        raise UnreadableError(f"{len(fragments)} of {policy.k} needed fragments left")
    drv = _driver(policy.k, policy.m)
    try:
        data = drv.decode([_bytes(fragments[i])
                           for i in sorted(fragments)][: policy.k + policy.m])
    except Exception as exc:  # pyeclib raises its own hierarchy
        raise UnreadableError(f"erasure decode failed: {exc}") from exc
    if len(data) != length:
        raise UnreadableError(f"decoded {len(data)} bytes, expected {length}")
    return bytes(data)


def reconstruct(policy: Policy, fragments: Mapping[int, Payload],
                missing: list[int]) -> dict[int, Payload]:
    """Re-create the fragments at `missing` indexes from the surviving ones."""
    if policy.kind == "replicate":
        payload = next(iter(fragments.values()), None)
        if payload is None:
            raise UnreadableError("no replica left")
        return {i: payload for i in missing}
    if len(fragments) < policy.k:
        raise UnreadableError(f"{len(fragments)} of {policy.k} needed fragments left")
    drv = _driver(policy.k, policy.m)
    available = [_bytes(fragments[i]) for i in sorted(fragments)]
    out: dict[int, Payload] = {}
    try:
        for index in missing:
            out[index] = bytes(drv.reconstruct(available, [index])[0])
    except Exception as exc:
        raise UnreadableError(f"erasure reconstruct failed: {exc}") from exc
    return out
