"""Mask specs: dense matrices against hand-written ones, evaluation on traced arrays, hashing, registry and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.attention import masks


def _matrix(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)


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
    (masks.Explicit(_matrix("01 10 11")), 3, 2, 0, "01 10 11"),
    (masks.SlidingWindow(1) | masks.SinksAndWindow(1, 1), 3, 3, 0, "100 110 101"),
    (masks.Causal() & masks.Explicit(_matrix("011 111 110")), 3, 3, 0, "000 110 110"),
])
def test_materialize_matches_hand_written(mask, T, S, q_offset, expected):
    np.testing.assert_array_equal(mask.materialize(T, S, q_offset), _matrix(expected))


@pytest.mark.parametrize("mask", [
    masks.Full(), masks.Causal(), masks.SlidingWindow(3), masks.SinksAndWindow(2, 3),
    masks.SlidingWindow(2) | masks.SinksAndWindow(1, 4), masks.Causal() & masks.SlidingWindow(5),
])
def test_call_on_traced_indices_matches_materialize(mask):
    T, S, q_offset = 4, 9, 5

    @jax.jit
    def dense(offset):
        return jnp.broadcast_to(mask(jnp.arange(T)[:, None] + offset, jnp.arange(S)[None, :]), (T, S))

    np.testing.assert_array_equal(dense(jnp.int32(q_offset)), mask.materialize(T, S, q_offset))


@pytest.mark.parametrize("mask, relative", [
    (masks.Full(), True), (masks.Causal(), True), (masks.SlidingWindow(3), True),
    (masks.Causal() & masks.SlidingWindow(2), True), (masks.SinksAndWindow(1, 3), False),
    (masks.Explicit(np.tril(np.ones((6, 6), bool))), False), (masks.Causal() | masks.SinksAndWindow(2, 2), False),
])
def test_relative_masks_are_shift_invariant(mask, relative):
    """`relative` is what lets attention skip per-segment positions; check it against a shift of both positions."""
    assert mask.relative is relative
    if relative:
        for shift in (1, 3):
            np.testing.assert_array_equal(mask.materialize(3, 6, q_offset=shift)[:, shift:],
                                          mask.materialize(3, 6 - shift, q_offset=0))


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
                 masks.Causal() | masks.Full()):
        count(jnp.zeros(()), mask=mask)
    assert len(traces) == 4


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
    np.testing.assert_array_equal(mask.materialize(2, 2), np.eye(2, dtype=bool))


@pytest.mark.parametrize("build, match", [
    (lambda: masks.SlidingWindow(0), r"SlidingWindow: window must be a positive int, got 0"),
    (lambda: masks.SlidingWindow(-3), r"window must be a positive int"),
    (lambda: masks.SlidingWindow(2.5), r"window must be a positive int, got 2.5"),
    (lambda: masks.SlidingWindow(True), r"window must be a positive int, got True"),
    (lambda: masks.SinksAndWindow(0, 4), r"SinksAndWindow: sinks must be a positive int, got 0"),
    (lambda: masks.SinksAndWindow(4, "8"), r"SinksAndWindow: window must be a positive int, got '8'"),
    (lambda: masks.Explicit(np.ones((2, 2))), r"Explicit: array must be a 2-D boolean array"),
    (lambda: masks.Explicit(np.ones(4, dtype=bool)), r"Explicit: array must be a 2-D boolean array"),
    (lambda: masks.Causal() | "causal", r"Union: both operands must be masks"),
])
def test_construction_validates(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_explicit_refuses_other_shapes_and_offsets():
    mask = masks.Explicit(np.ones((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"Explicit mask has shape \(2, 3\) but the attention is \[T, S\] = \(3, 3\)"):
        mask.materialize(3, 3)
    with pytest.raises(ValueError, match=r"Explicit mask needs a static q_offset of 0.*got 1"):
        mask.materialize(2, 3, q_offset=1)
    with pytest.raises(ValueError, match=r"Explicit mask has shape"):
        (masks.Causal() & mask).materialize(3, 3)


def test_materialize_validates_sizes():
    with pytest.raises(ValueError, match=r"materialize: q_offset must be a non-negative int, got -1"):
        masks.Causal().materialize(2, 2, q_offset=-1)


def test_registry():
    assert masks.names() == ["causal", "distant", "explicit", "full", "sinks_window", "sliding_window"]
    assert masks.get("causal") == masks.Causal()
    assert masks.get("full") == masks.Full()
    assert masks.get("sliding_window", window=128) == masks.SlidingWindow(128)
    assert masks.get("sinks_window", sinks=4, window=128) == masks.SinksAndWindow(4, 128)


@pytest.mark.parametrize("name, params, match", [
    ("diagonal", {}, r"unknown mask 'diagonal'; registered masks: causal, distant, explicit, full, sinks_window, "
                     r"sliding_window"),
    ("sliding_window", {}, r"mask 'sliding_window' needs parameter\(s\): window \(a positive int\)"),
    ("sinks_window", {"window": 8}, r"needs parameter\(s\): sinks \(a positive int\)"),
    ("causal", {"window": 8}, r"mask 'causal' has no parameter 'window'; it takes: no parameters"),
    ("sliding_window", {"window": 8, "sinks": 2}, r"has no parameter 'sinks'; it takes: window"),
    ("sliding_window", {"window": 0}, r"window must be a positive int, got 0"),
])
def test_registry_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        masks.get(name, **params)


def test_explicit_refuses_positions_outside_its_array():
    mask = masks.Explicit(np.ones((2, 3), bool))
    allowed = mask(np.array([[-1], [0], [2]]), np.array([[-1, 0, 2, 3]]))
    np.testing.assert_array_equal(allowed, [[False] * 4, [False, True, True, False], [False] * 4])
