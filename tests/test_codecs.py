"""Codecs and policies: every loss a policy promises to survive decodes to the original
bytes, one loss more fails with UnreadableError, and policy strings parse or are refused
with a one-line message."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamicfs.errors import PolicyError, UnreadableError
from dynamicfs.redundancy import codecs
from dynamicfs.redundancy.policy import (
    AUTO,
    AUTO_EC_THRESHOLD,
    MAX_FRAGMENTS,
    Policy,
    ec,
    parse_concrete,
    parse_policy,
    replicate,
    resolve_auto,
)

EC_POLICIES = [ec(4, 2), ec(2, 1), ec(3, 2), ec(1, 1), ec(6, 3)]
REPLICATE_POLICIES = [replicate(n) for n in (1, 2, 3, 5)]
MAX_EXTENT = 300 * 1024
EDGE_SIZES = [0, 1, 2, 3, 79, 80, 81, 4095, 4096, 4097, 65536, MAX_EXTENT]


@st.composite
def extents(draw: st.DrawFn) -> bytes:
    """Extent contents: edge-case and random sizes up to 300 KiB, random or repetitive."""
    size = draw(
        st.one_of(
            st.sampled_from(EDGE_SIZES),
            st.integers(0, 4096),
            st.integers(4096, MAX_EXTENT),
        )
    )
    if draw(st.booleans()):
        return random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(size)
    return bytes([draw(st.integers(0, 255))]) * size


def losses(policy: Policy, count: int) -> list[tuple[int, ...]]:
    """Every set of up to `count` lost fragment indexes (including none)."""
    return [
        lost for n in range(count + 1) for lost in itertools.combinations(range(policy.width), n)
    ]


def survivors(fragments: list[bytes], lost: tuple[int, ...]) -> dict[int, bytes]:
    return {i: payload for i, payload in enumerate(fragments) if i not in lost}


codec_settings = settings(max_examples=25)


@pytest.mark.parametrize("policy", EC_POLICIES + REPLICATE_POLICIES, ids=str)
@codec_settings
@given(data=extents())
def test_decode_returns_original_bytes_after_any_tolerated_loss(
    policy: Policy, data: bytes
) -> None:
    fragments = codecs.encode(policy, data)
    assert len(fragments) == policy.width
    for lost in losses(policy, policy.m):
        assert codecs.decode(policy, survivors(fragments, lost), len(data)) == data, lost


@pytest.mark.parametrize("policy", EC_POLICIES + REPLICATE_POLICIES, ids=str)
@codec_settings
@given(data=extents())
def test_reconstruct_recreates_identical_lost_fragments(policy: Policy, data: bytes) -> None:
    fragments = codecs.encode(policy, data)
    for lost in losses(policy, policy.m):
        if not lost:
            continue
        rebuilt = codecs.reconstruct(policy, survivors(fragments, lost), list(lost))
        assert rebuilt == {i: fragments[i] for i in lost}, lost


@pytest.mark.parametrize("policy", EC_POLICIES + REPLICATE_POLICIES, ids=str)
@codec_settings
@given(data=extents())
def test_decode_fails_unreadable_when_one_loss_too_many(policy: Policy, data: bytes) -> None:
    fragments = codecs.encode(policy, data)
    for lost in itertools.combinations(range(policy.width), policy.m + 1):
        remaining = survivors(fragments, lost)
        with pytest.raises(UnreadableError):
            codecs.decode(policy, remaining, len(data))
        with pytest.raises(UnreadableError):
            codecs.reconstruct(policy, remaining, list(lost))


@pytest.mark.parametrize("policy", EC_POLICIES, ids=str)
@codec_settings
@given(data=extents())
def test_join_data_of_the_data_fragments_is_the_extent(policy: Policy, data: bytes) -> None:
    # Payloads arrive as memoryviews of fragments read from disk; pyeclib is handed bytes.
    fragments = [memoryview(f) for f in codecs.encode(policy, data)]
    present = dict(enumerate(fragments))
    assert codecs.join_data(policy, present, len(data)) == data
    assert codecs.decode(policy, present, len(data)) == data
    lost_data = {i: f for i, f in present.items() if i != 0}
    assert codecs.join_data(policy, lost_data, len(data)) is None
    assert codecs.decode(policy, lost_data, len(data)) == data


def pyeclib_encode(policy: Policy, data: bytes) -> list[bytes]:
    return list(codecs._driver(policy.k, policy.m).encode(data))


def test_erasure_coding_calls_isa_l_directly_here() -> None:
    # The wheel of pyeclib ships ISA-L; if it stops doing so (or stops agreeing with
    # pyeclib), encoding quietly goes back to pyeclib: this says so.
    assert codecs._direct_encoder(4, 2) is not None


@pytest.mark.parametrize("policy", EC_POLICIES, ids=str)
def test_direct_encoding_is_byte_for_byte_pyeclibs(policy: Policy) -> None:
    rng = random.Random(7)
    # Each length after a longer one of (likely) the same fragment size: a reused buffer
    # then holds the longer extent's bytes where the shorter one's zeros must be.
    for size in [*EDGE_SIZES, 1 << 20, (1 << 20) - 1, 4097 * policy.k, 4097 * policy.k - 1]:
        data = rng.randbytes(size)
        assert [bytes(f) for f in codecs.encode(policy, data)] == pyeclib_encode(policy, data)


def test_fragments_handed_out_are_never_reused_while_referenced() -> None:
    policy = ec(4, 2)
    rng = random.Random(8)
    held = []
    for _ in range(40):
        data = rng.randbytes(256 * 1024)
        held.append((codecs.encode(policy, data), pyeclib_encode(policy, data)))
        codecs.trim_buffers()
    for fragments, expected in held:
        assert [bytes(f) for f in fragments] == expected


def test_trimming_lets_go_of_buffers_unused_since_the_last_trim() -> None:
    policy = ec(4, 2)
    data = random.Random(9).randbytes(64 * 1024)
    kept = codecs.encode(policy, data)  # in use: stays whatever happens
    codecs.encode(policy, data)  # free again at once
    codecs.trim_buffers()
    assert codecs._buffers.kept_bytes() > 0  # both were taken since the last trim
    codecs.trim_buffers()
    assert codecs._buffers.kept_bytes() == len(kept[0].obj)
    assert [bytes(f) for f in kept] == pyeclib_encode(policy, data)
    del kept
    codecs.trim_buffers()
    assert codecs._buffers.kept_bytes() == 0


def test_join_data_declines_fragments_whose_headers_do_not_add_up() -> None:
    policy = ec(4, 2)
    data = random.Random(3).randbytes(5000)
    fragments = dict(enumerate(codecs.encode(policy, data)))
    assert codecs.join_data(policy, fragments, len(data) + 10_000) is None
    short = dict(fragments)
    short[1] = short[1][:60]  # shorter than pyeclib's header
    assert codecs.join_data(policy, short, len(data)) is None
    lying = dict(fragments)
    head = bytearray(lying[2])
    head[4:8] = (10**6).to_bytes(4, "little")  # a data part longer than the fragment
    lying[2] = bytes(head)
    assert codecs.join_data(policy, lying, len(data)) is None


def test_decode_refuses_a_wrong_extent_length() -> None:
    policy = ec(4, 2)
    data = random.Random(7).randbytes(10_000)
    fragments = dict(enumerate(codecs.encode(policy, data)))
    with pytest.raises(UnreadableError):
        codecs.decode(policy, fragments, len(data) + 1)


def accepted_ec_layouts() -> list[Policy]:
    layouts = []
    for k, m in itertools.product(range(1, MAX_FRAGMENTS + 1), repeat=2):
        try:
            layouts.append(parse_concrete(f"ec:{k}+{m}"))
        except PolicyError:
            pass
    return layouts


def test_every_accepted_ec_layout_decodes_from_any_k_fragments() -> None:
    # Reed-Solomon with a Vandermonde matrix can rebuild from *every* k of k+m
    # fragments only for some layouts; parse_policy must accept no other.
    data = random.Random(1).randbytes(997)
    layouts = accepted_ec_layouts()
    assert ec(4, 2) in layouts
    for policy in layouts:
        fragments = codecs.encode(policy, data)
        for lost in itertools.combinations(range(policy.width), policy.m):
            decoded = codecs.decode(policy, survivors(fragments, lost), len(data))
            assert decoded == data, (str(policy), lost)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("replicate:1", replicate(1)),
        ("replicate:3", replicate(3)),
        (f"replicate:{MAX_FRAGMENTS}", replicate(MAX_FRAGMENTS)),
        ("ec:4+2", ec(4, 2)),
        ("ec:1+1", ec(1, 1)),
        ("ec:6+3", ec(6, 3)),
        ("  EC:4+2 ", ec(4, 2)),
        ("auto", AUTO),
        ("AUTO", AUTO),
    ],
)
def test_parse_policy_accepts_valid_policies(text: str, expected: Policy | str) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize("text", ["replicate:3", "ec:4+2", "ec:1+1", "replicate:1"])
def test_policy_prints_as_it_parses(text: str) -> None:
    assert str(parse_concrete(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "ec:0+2",
        "replicate:0",
        "ec:4+",
        "raid5",
        "ec:4+0",
        "",
        "   ",
        "ec:4-2",
        "replicate:-1",
        "replicate:3x",
        f"replicate:{MAX_FRAGMENTS + 1}",
        "ec:30+3",
        "ec:6+5",
        "ec:22+4",
        "ec:4+2\nreplicate:3",
    ],
)
def test_parse_policy_refuses_malformed_policy_in_one_line(text: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        parse_policy(text)
    message = str(excinfo.value)
    assert message
    assert "\n" not in message


def test_parse_concrete_refuses_auto() -> None:
    with pytest.raises(PolicyError):
        parse_concrete("auto")


@pytest.mark.parametrize("disks", range(1, 9))
@pytest.mark.parametrize(
    "size", [0, 1, AUTO_EC_THRESHOLD - 1, AUTO_EC_THRESHOLD, 10 * AUTO_EC_THRESHOLD]
)
def test_resolve_auto_never_asks_for_more_disks_than_there_are(disks: int, size: int) -> None:
    policy = resolve_auto(size, disks)
    assert 1 <= policy.width <= disks
    assert parse_concrete(str(policy)) == policy


@pytest.mark.parametrize("disks", range(6, 12))
def test_resolve_auto_is_replicate3_under_4mib_and_ec42_from_4mib(disks: int) -> None:
    assert resolve_auto(AUTO_EC_THRESHOLD - 1, disks) == replicate(3)
    assert resolve_auto(AUTO_EC_THRESHOLD, disks) == ec(4, 2)


@pytest.mark.parametrize("disks", range(1, 9))
def test_resolve_auto_keeps_the_strongest_layout_that_fits(disks: int) -> None:
    small = resolve_auto(0, disks)
    large = resolve_auto(AUTO_EC_THRESHOLD, disks)
    # As many losses survived as the disks allow, up to the full-size layouts' two.
    assert small.m == min(2, disks - 1)
    assert large.m == min(2, disks - 1)
