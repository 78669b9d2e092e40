"""Erasure-coding and checksum throughput on one extent, for choosing the codec.

Measures ec:4+2 encode and decode (with all data fragments present, and with two data
fragments lost) for zfec and for pyeclib's ISA-L and liberasurecode Reed-Solomon
backends, and BLAKE3 hashing, on 1 MiB and 4 MiB extents; single-threaded, in MB/s of
extent bytes (10^6 bytes per second). docs/CODECS.md records the results.

    python benchmarks/bench_codecs.py [--seconds 0.5] [--sizes 1,4]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import blake3
import zfec.easyfec
from pyeclib.ec_iface import ECDriver

K, M = 4, 2
PYECLIB_BACKENDS = ["isa_l_rs_vand", "isa_l_rs_cauchy", "liberasurecode_rs_vand"]
MIB = 1024 * 1024


@dataclass
class Codec:
    """One backend prepared for one extent: encode, and decode from chosen fragments."""

    name: str
    encode: Callable[[], object]
    decode_all: Callable[[], bytes]
    decode_lost2: Callable[[], bytes]


def zfec_codec(data: bytes) -> Codec:
    encoder = zfec.easyfec.Encoder(K, K + M)
    decoder = zfec.easyfec.Decoder(K, K + M)
    shares = encoder.encode(data)
    padlen = -len(data) % K

    def decode(nums: list[int]) -> bytes:
        return bytes(decoder.decode([shares[i] for i in nums], nums, padlen))

    return Codec(
        "zfec",
        lambda: encoder.encode(data),
        lambda: decode([0, 1, 2, 3]),
        lambda: decode([2, 3, 4, 5]),
    )


def pyeclib_codec(backend: str, data: bytes) -> Codec:
    driver = ECDriver(k=K, m=M, ec_type=backend)
    fragments = driver.encode(data)
    return Codec(
        f"pyeclib {backend}",
        lambda: driver.encode(data),
        lambda: bytes(driver.decode(fragments[0:4])),
        lambda: bytes(driver.decode(fragments[2:6])),
    )


def blake3_digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def throughput(run: Callable[[], object], nbytes: int, seconds: float) -> float:
    """Best MB/s over three timed runs of about `seconds` each."""
    run()  # warm up: allocations, lazy tables
    best = 0.0
    for _ in range(3):
        count = 0
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < seconds:
            run()
            count += 1
            elapsed = time.perf_counter() - start
        best = max(best, count * nbytes / elapsed / 1e6)
    return best


def bench_extent(size: int, seconds: float) -> list[tuple[str, float, float, float]]:
    data = os.urandom(size)
    codecs = [zfec_codec(data)] + [pyeclib_codec(b, data) for b in PYECLIB_BACKENDS]
    rows = []
    for codec in codecs:
        assert codec.decode_all() == data and codec.decode_lost2() == data, codec.name
        rows.append(
            (
                codec.name,
                throughput(codec.encode, size, seconds),
                throughput(codec.decode_all, size, seconds),
                throughput(codec.decode_lost2, size, seconds),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--sizes", default="1,4", help="extent sizes in MiB, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]

    print(f"ec:{K}+{M}, one thread, MB/s of extent bytes (best of 3 x {args.seconds} s)")
    header = f"{'codec':<32} {'extent':>6} {'encode':>9} {'decode':>9} {'decode -2':>10}"
    print(header)
    print("-" * len(header))
    for size in sizes:
        for name, enc, dec, dec2 in bench_extent(size, args.seconds):
            mib = f"{size // MIB} MiB"
            print(f"{name:<32} {mib:>6} {enc:>9.0f} {dec:>9.0f} {dec2:>10.0f}")
    print()
    print(f"{'checksum':<32} {'extent':>6} {'hash':>9}")
    for size in sizes:
        data = os.urandom(size)
        rate = throughput(partial(blake3_digest, data), size, args.seconds)
        print(f"{'blake3':<32} {f'{size // MIB} MiB':>6} {rate:>9.0f}")
    print("decode -2: two data fragments (0 and 1) lost, rebuilt from the parity fragments")


if __name__ == "__main__":
    main()
