"""Masks (`pallas_kernels.masks`, the one vocabulary of every path): dense matrices against hand-written ones,
evaluation on traced arrays, hashing, the registry, spec strings and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks


def _matrix(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)


def _dense(mask, T, S, q_offset=0):
    return masks.materialize(mask, T, S, q_offset=q_offset)[0]


@pytest.mark.parametrize("mask, T, S, q_offset, expected", [
    (masks.Full(), 2, 3, 0, "111 111"),
    (masks.Causal(), 4, 4, 0, "1000 1100 1110 1111"),
    (masks.Causal(), 2, 4, 2, "1110 1111"),
    (masks.Causal(), 3, 2, 0, "10 11 11"),
    (masks.SlidingWindow(1), 3, 3, 0, "100 010 001"),
    (masks.SlidingWindow(2), 4, 4, 0, "1000 1100 0110 0011"),
    (masks.SlidingWindow(2), 2, 5, 3, "00110 00011"),
    (masks.SinksAndWindow(1, 2), 5, 5, 0, "10000 11000 11100 10110 10011"),
    (masks.SinksAndWindow(2, 1), 2, 5, 3, "11010 11001"),
    (masks.Distant(2), 4, 4, 0, "0000 0000 1000 1100"),
    (masks.Prefix(2), 2, 4, 0, "1100 1100"),
    (masks.ChunkedLocal(2), 4, 4, 0, "1000 1100 0010 0011"),
    (masks.BlockMask(_matrix("10 11"), 2, 2), 4, 4, 0, "1100 1100 1111 1111"),
    (masks.Explicit(_matrix("01 10 11")), 3, 2, 0, "01 10 11"),
    (masks.SlidingWindow(1) | masks.SinksAndWindow(1, 1), 3, 3, 0, "100 110 101"),
    (masks.Causal() & masks.Explicit(_matrix("011 111 110")), 3, 3, 0, "000 110 110"),
])
def test_materialize_matches_hand_written(mask, T, S, q_offset, expected):
    np.testing.assert_array_equal(_dense(mask, T, S, q_offset), _matrix(expected))


def test_per_head_masks_differ_by_head():
    strided = masks.materialize(masks.StridedHeads(block=1, local_blocks=1, stride=2), 4, 4, num_heads=2)
    np.testing.assert_array_equal(strided[0], _matrix("1000 1100 1010 1011"))
    np.testing.assert_array_equal(strided[1], _matrix("1000 0100 0110 0101"))
    per_head_blocks = masks.BlockMask(np.stack([np.eye(2, dtype=bool), ~np.eye(2, dtype=bool)]), 1, 1)
    np.testing.assert_array_equal(masks.materialize(per_head_blocks, 2, 2, num_heads=2),
                                  [np.eye(2, dtype=bool), ~np.eye(2, dtype=bool)])


@pytest.mark.parametrize("mask", [
    masks.Full(), masks.Causal(), masks.SlidingWindow(3), masks.SinksAndWindow(2, 3), masks.ChunkedLocal(3),
    masks.StridedHeads(2, 1, 3), masks.BlockMask(np.tril(np.ones((3, 5), bool)), 2, 2),
    masks.SlidingWindow(2) | masks.SinksAndWindow(1, 4), masks.Causal() & masks.SlidingWindow(5),
])
def test_call_on_traced_indices_matches_materialize(mask):
    T, S, q_offset, heads = 4, 9, 5, 3

    @jax.jit
    def dense(offset):
        q_idx = jnp.arange(T)[None, :, None] + offset
        return jnp.broadcast_to(mask(q_idx, jnp.arange(S)[None, None, :], jnp.arange(heads)[:, None, None]),
                                (heads, T, S))

    np.testing.assert_array_equal(dense(jnp.int32(q_offset)),
                                  masks.materialize(mask, T, S, q_offset=q_offset, num_heads=heads))


@pytest.mark.parametrize("mask, relative", [
    (masks.Full(), True), (masks.Causal(), True), (masks.SlidingWindow(3), True), (masks.Distant(2), True),
    (masks.Causal() & masks.SlidingWindow(2), True), (masks.SinksAndWindow(1, 3), False), (masks.Prefix(2), False),
    (masks.ChunkedLocal(2), False), (masks.StridedHeads(2, 1, 2), False),
    (masks.Explicit(np.tril(np.ones((6, 6), bool))), False), (masks.Causal() | masks.SinksAndWindow(2, 2), False),
])
def test_relative_masks_are_shift_invariant(mask, relative):
    """`relative` is what lets attention skip per-segment positions; check it against a shift of both positions."""
    assert mask.relative is relative
    if relative:
        for shift in (1, 3):
            np.testing.assert_array_equal(_dense(mask, 3, 6, q_offset=shift)[:, shift:], _dense(mask, 3, 6 - shift))


def test_explicit_call_on_traced_indices():
    array = np.random.default_rng(0).random((3, 5)) < 0.5
    mask = masks.Explicit(array)
    out = jax.jit(lambda q, kv: mask(q, kv))(jnp.arange(3)[:, None], jnp.arange(5)[None, :])
    np.testing.assert_array_equal(out, array)


def test_masks_are_hashable_static_jit_arguments():
    traces = []

    @jax.jit(static_argnames="mask")
    def count(x, mask):
        traces.append(mask)
        return x + 1

    array = np.tril(np.ones((3, 3), dtype=bool))
    for mask in (masks.Causal(), masks.Causal(), masks.SlidingWindow(4), masks.SlidingWindow(4),
                 masks.Explicit(array), masks.Explicit(array.copy()), masks.Causal() | masks.Full(),
                 masks.Causal() | masks.Full(), masks.BlockMask(array, 8, 8), masks.BlockMask(array.copy(), 8, 8)):
        count(jnp.zeros(()), mask=mask)
    assert len(traces) == 5


def test_explicit_equality_is_by_content():
    array = np.eye(3, dtype=bool)
    assert masks.Explicit(array) == masks.Explicit(array.copy())
    assert hash(masks.Explicit(array)) == hash(masks.Explicit(array.copy()))
    assert masks.Explicit(array) != masks.Explicit(~array)
    assert masks.Explicit(array) != masks.Explicit(np.eye(3, 4, dtype=bool))
    array[0, 1] = True
    assert masks.Explicit(np.eye(3, dtype=bool)) != masks.Explicit(array)


def test_explicit_copies_its_array():
    array = np.eye(2, dtype=bool)
    mask = masks.Explicit(array)
    array[0, 1] = True
    np.testing.assert_array_equal(_dense(mask, 2, 2), np.eye(2, dtype=bool))


@pytest.mark.parametrize("build, match", [
    (lambda: masks.SlidingWindow(0), r"SlidingWindow: window must be a positive int, got 0"),
    (lambda: masks.SlidingWindow(-3), r"window must be a positive int"),
    (lambda: masks.SlidingWindow(2.5), r"window must be a positive int, got 2.5"),
    (lambda: masks.SlidingWindow(True), r"window must be a positive int, got True"),
    (lambda: masks.SinksAndWindow(0, 4), r"SinksAndWindow: sinks must be a positive int, got 0"),
    (lambda: masks.SinksAndWindow(4, "8"), r"SinksAndWindow: window must be a positive int, got '8'"),
    (lambda: masks.StridedHeads(16, 1, 0), r"StridedHeads: stride must be a positive int, got 0"),
    (lambda: masks.Explicit(np.ones((2, 2))), r"Explicit: array must be a bool array \[T, S\]"),
    (lambda: masks.Explicit(np.ones(4, dtype=bool)), r"Explicit: array must be a bool array \[T, S\]"),
    (lambda: masks.BlockMask(np.ones(4, bool), 8, 8), r"BlockMask: blocks must be a bool array"),
    (lambda: masks.Causal() | "causal", r"Union: both operands must be pallas_kernels masks"),
])
def test_construction_validates(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_explicit_refuses_other_shapes_and_offsets():
    mask = masks.Explicit(np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"Explicit mask has shape \(2, 3\) but the attention is \[T, S\] = \(3, 3\)"):
        _dense(mask, 3, 3)
    with pytest.raises(ValueError, match=r"Explicit mask needs a static q_offset of 0.*got 1"):
        _dense(mask, 2, 3, q_offset=1)
    with pytest.raises(ValueError, match=r"Explicit mask has shape"):
        _dense(masks.Causal() & mask, 3, 3)


def test_materialize_validates_sizes():
    with pytest.raises(ValueError, match=r"materialize: q_offset must be a non-negative int, got -1"):
        _dense(masks.Causal(), 2, 2, q_offset=-1)


def test_explicit_refuses_positions_outside_its_array():
    mask = masks.Explicit(np.ones((2, 3), bool))
    allowed = mask(np.array([[-1], [0], [2]]), np.array([[-1, 0, 2, 3]]))
    np.testing.assert_array_equal(allowed, [[False] * 4, [False, True, True, False], [False] * 4])


REGISTERED = ["block_mask", "causal", "chunked_local", "distant", "explicit", "full", "prefix", "sinks_window",
              "sliding_window", "strided_heads"]


def test_registry():
    assert masks.names() == REGISTERED
    assert masks.get("causal") == masks.Causal()
    assert masks.get("sliding_window", window=128) == masks.SlidingWindow(128)
    assert masks.get("sinks_window", 4, window=128) == masks.SinksAndWindow(4, 128)
    assert masks.get("strided_heads", block=64, local_blocks=2, stride=4) == masks.StridedHeads(64, 2, 4)


@pytest.mark.parametrize("name, params, match", [
    ("diagonal", {}, r"unknown mask 'diagonal'; registered masks: block_mask, causal, chunked_local, distant"),
    ("sliding_window", {}, r"mask 'sliding_window' needs parameter\(s\): window \(a positive int\)"),
    ("sinks_window", {"window": 8}, r"needs parameter\(s\): sinks \(a positive int\)"),
    ("causal", {"window": 8}, r"mask 'causal' has no parameter 'window'; it takes: no parameters"),
    ("sliding_window", {"window": 8, "sinks": 2}, r"has no parameter 'sinks'; it takes: window"),
    ("sliding_window", {"window": 0}, r"window must be a positive int, got 0"),
])
def test_registry_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        masks.get(name, **params)


@pytest.mark.parametrize("spec, expected", [
    ("causal", masks.Causal()),
    (" sliding_window(window=4096) ", masks.SlidingWindow(4096)),
    ("sliding_window(64)", masks.SlidingWindow(64)),
    ("sinks_window(sinks=4, window=1024)", masks.SinksAndWindow(4, 1024)),
    ("chunked_local(chunk=8192)", masks.ChunkedLocal(8192)),
    ("strided_heads(block=128, local_blocks=8, stride=16)", masks.StridedHeads(128, 8, 16)),
    ("causal & prefix(length=4) | sliding_window(window=16)",
     (masks.Causal() & masks.Prefix(4)) | masks.SlidingWindow(16)),
    ("causal & (prefix(4) | distant(3))", masks.Causal() & (masks.Prefix(4) | masks.Distant(3))),
    ("block_mask(blocks=[[True, False], [True, True]], block_q=64, block_kv=32)",
     masks.BlockMask(_matrix("10 11"), 64, 32)),
])
def test_parse_reads_a_spec_and_spec_writes_it_back(spec, expected):
    assert masks.parse(spec) == expected
    assert masks.parse(expected.spec) == expected


def test_parse_reads_arrays_from_npy_files(tmp_path):
    np.save(tmp_path / "blocks.npy", _matrix("01 11"))
    mask = masks.parse(f"block_mask(blocks={str(tmp_path / 'blocks.npy')!r}, block_q=16, block_kv=16)")
    assert mask == masks.BlockMask(_matrix("01 11"), 16, 16)
    with pytest.raises(FileNotFoundError, match=r"BlockMask: blocks='missing.npy' names no .npy file"):
        masks.parse("block_mask(blocks='missing.npy', block_q=16, block_kv=16)")


@pytest.mark.parametrize("spec, match", [
    ("diagonal", r"unknown mask 'diagonal'; registered masks: block_mask, causal"),
    ("sliding_window", r"mask 'sliding_window' needs parameter\(s\): window"),
    ("sliding_window(window=)", r"mask spec 'sliding_window\(window=\)' is not a registered mask's name"),
    ("causal + full", r"'causal \+ full' is not a registered mask's name, a call with its parameters"),
    ("sliding_window(window=w)", r"the parameters of 'sliding_window' must be literals"),
    ("sliding_window(1, window=2)", r"mask 'sliding_window': parameter 'window' given twice"),
    ("causal(1)", r"mask 'causal' takes 0 parameter\(s\) \(none\), got 1 positional"),
    (7, r"a mask spec must be a string"),
])
def test_parse_errors_name_the_spec_and_what_is_allowed(spec, match):
    with pytest.raises(ValueError, match=match):
        masks.parse(spec)
