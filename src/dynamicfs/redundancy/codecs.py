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

Encoding calls ISA-L itself (`_DirectEncoder`, through ctypes) when the library pyeclib
uses is at hand and gives, on a test extent, byte for byte what pyeclib gives: the same
layout, pyeclib's headers (they depend only on the extent's length), ISA-L's parity. Not
for speed alone (both take 0.2-0.4 ms for a 1 MiB extent here) but for the GIL: pyeclib
holds it for the whole encode, copies included, while ctypes lets go of it for each copy
and for the parity, so a FUSE request waiting for the GIL is not held up for a whole
extent's encoding. Its output buffers are reused (`_Buffers`). pyeclib still decodes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import os
import struct
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dynamicfs.errors import UnreadableError
from dynamicfs.memory import buffer_address
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


def encode(policy: Policy, data: Payload) -> list[Payload]:
    """Turn an extent into policy.width fragment payloads (index i -> payload)."""
    if policy.kind == "replicate":
        return [_bytes(data)] * policy.width
    direct = _direct_encoder(policy.k, policy.m)
    if direct is not None:
        return direct.encode(data)
    return list(_driver(policy.k, policy.m).encode(_bytes(data)))


@functools.cache
def _isal_library() -> ctypes.CDLL | None:
    """The ISA-L library that pyeclib's wheel ships (pyeclib.libs/ beside the package),
    else the system's; None if neither is there or has the functions needed. Looked
    for once per process."""
    spec = importlib.util.find_spec("pyeclib")
    candidates: list[str] = []
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "pyeclib.libs"
        candidates += sorted(str(p) for p in libs.glob("libisal*.so*"))
    system = ctypes.util.find_library("isal")
    if system is not None:
        candidates.append(system)
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            functions = (lib.gf_gen_cauchy1_matrix, lib.ec_init_tables, lib.ec_encode_data)
        except (OSError, AttributeError):
            continue
        functions[0].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        functions[1].argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        functions[2].argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p]
        for function in functions:
            function.restype = None
        return lib
    return None


class _DirectEncoder:
    """ec:k+m encoding with ISA-L's Cauchy Reed-Solomon, laid out as pyeclib's
    `isa_l_rs_cauchy` lays it out: fragment i is pyeclib's 80-byte header then `size`
    bytes; data fragment i holds extent bytes [i*size, (i+1)*size), zeros past the end;
    the m parity fragments hold ISA-L's parity of those. The headers and `size` depend
    only on the extent's length (and k, m): they come from pyeclib's encoding of that
    many zero bytes, once per length."""

    LAYOUTS = 256  # extent lengths whose layout is remembered

    def __init__(self, lib: ctypes.CDLL, k: int, m: int) -> None:
        self.lib, self.k, self.m = lib, k, m
        matrix = (ctypes.c_ubyte * ((k + m) * k))()
        lib.gf_gen_cauchy1_matrix(matrix, k + m, k)
        self.tables = (ctypes.c_ubyte * (32 * k * m))()
        lib.ec_init_tables(k, m, ctypes.byref(matrix, k * k), self.tables)
        self._layouts: dict[int, tuple[int, list[bytes]]] = {}

    def _layout(self, length: int) -> tuple[int, list[bytes]]:
        layout = self._layouts.get(length)
        if layout is None:
            zeros = _driver(self.k, self.m).encode(bytes(length))
            (size,) = _SIZE.unpack_from(zeros[0], 4)
            layout = (size, [bytes(f[:PYECLIB_HEADER]) for f in zeros])
            if len(self._layouts) >= self.LAYOUTS:
                self._layouts.clear()
            self._layouts[length] = layout
        return layout

    def encode(self, data: Payload) -> list[Payload]:
        """The fragments, as memoryviews of one buffer; the copies and the parity run
        without the GIL (ctypes releases it for each call)."""
        k, m = self.k, self.m
        size, headers = self._layout(len(data))
        step = PYECLIB_HEADER + size
        out = _buffers.take(step * (k + m))
        source = _bytes(data)
        base, at = buffer_address(out), buffer_address(source)
        assert base is not None and at is not None
        for i, header in enumerate(headers):
            out[i * step: i * step + PYECLIB_HEADER] = header
            if i < k:  # a data part: its share of the extent, zeros after the end
                part = base + i * step + PYECLIB_HEADER
                n = max(0, min(size, len(source) - i * size))
                if n:
                    ctypes.memmove(part, at + i * size, n)
                if n < size:  # a reused buffer holds an earlier extent's bytes
                    ctypes.memset(part + n, 0, size - n)
        data_parts = (ctypes.c_void_p * k)(*(base + i * step + PYECLIB_HEADER
                                             for i in range(k)))
        parity = (ctypes.c_void_p * m)(*(base + (k + j) * step + PYECLIB_HEADER
                                         for j in range(m)))
        self.lib.ec_encode_data(size, k, m, self.tables, data_parts, parity)
        view = memoryview(out)
        return [view[i * step: (i + 1) * step] for i in range(k + m)]


class _Buffers:
    """Output buffers for _DirectEncoder, used again once nothing refers to them: a
    fresh 1.5 MiB bytearray cost 0.2-0.45 ms here (zeroed, its pages faulted in), as
    much as the encoding itself, with the GIL held. A buffer is free when this pool
    holds the only reference to it: the fragments handed out are memoryviews of it,
    and each memoryview (or anything made from one) refers to it while it lives.

    At most `keep` bytes of buffers are kept; trim() lets go of those that were not
    taken since the trim before (the namespace calls it every few seconds), back to the
    allocator for the process's other uses (glibc keeps freed heap: see memory.py)."""

    # sys.getrefcount() of a free buffer met in a loop over the pool: the pool's list,
    # the loop variable and getrefcount's own argument.
    FREE = 3

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._kept: list[bytearray] = []
        self._taken: set[int] = set()  # id() of kept buffers taken since the last trim

    def take(self, size: int) -> bytearray:
        with self._lock:
            for buf in self._kept:
                if len(buf) == size and sys.getrefcount(buf) == self.FREE:
                    self._taken.add(id(buf))
                    return buf
            buf = bytearray(size)
            kept = sum(len(b) for b in self._kept)
            if kept + size > self.keep:  # make room: let go of free buffers
                still = []
                for b in self._kept:
                    if sys.getrefcount(b) > self.FREE:
                        still.append(b)
                    else:
                        self._taken.discard(id(b))
                        kept -= len(b)
                self._kept = still
            if kept + size <= self.keep:
                self._kept.append(buf)
                self._taken.add(id(buf))
            return buf

    def trim(self) -> None:
        with self._lock:
            self._kept = [b for b in self._kept  # the comprehension's `b`: FREE holds
                          if id(b) in self._taken or sys.getrefcount(b) > self.FREE]
            self._taken = set()

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._kept)


# The fragments of what a mount may have in flight: 64 MiB of extents written back,
# 16 MiB more being encoded, at 1.5 times that under ec:4+2.
_buffers = _Buffers(keep=128 << 20)
_encoders: dict[tuple[int, int], _DirectEncoder | None] = {}


def trim_buffers() -> None:
    """Let go of encoding buffers unused since the last call (a daemon done writing)."""
    _buffers.trim()


def _direct_encoder(k: int, m: int) -> _DirectEncoder | None:
    """The direct encoder for k+m if ISA-L is at hand and agrees byte for byte with
    pyeclib on a test extent (whose last data part is short), else None."""
    with _drivers_lock:
        if (k, m) in _encoders:
            return _encoders[(k, m)]
    lib = _isal_library()
    encoder = _DirectEncoder(lib, k, m) if lib is not None else None
    if encoder is not None:
        sample = os.urandom(k * 4096 + 1000)
        if [bytes(f) for f in encoder.encode(sample)] != _driver(k, m).encode(sample):
            encoder = None
    with _drivers_lock:
        return _encoders.setdefault((k, m), encoder)


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
