"""reference_attention against a naive float64 numpy oracle written here, over masks × heads × segments × q_offset.

Tolerances: float32 inputs atol = rtol = 1e-5 (out and lse); bfloat16 inputs, compared with the oracle on the same
bf16-rounded values, atol = rtol = 1e-2 on the bf16 output (half a bf16 ulp is 0.4 %) and 1e-4 on the float32 lse.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx.attention import reference_attention
from oracles import naive_allowed, naive_attention

S = 8
EXPLICIT = np.random.default_rng(1).random((S, S)) < 0.5
EXPLICIT[2] = False
MASKS = {
    "full": (masks.Full(), lambda i, j: True),
    "causal": (masks.Causal(), lambda i, j: j <= i),
    "sliding_window": (masks.SlidingWindow(3), lambda i, j: j <= i and i - j < 3),
    "sinks_window": (masks.SinksAndWindow(1, 2), lambda i, j: j <= i and (j < 1 or i - j < 2)),
    "explicit": (masks.Explicit(EXPLICIT), lambda i, j: EXPLICIT[i, j]),
}
HEADS = {"gqa": (4, 2), "mha": (2, 2)}
LAYOUTS = {"self": (S, 0), "suffix": (4, S - 4)}
KV_SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [0, 3, 3, 3, 3, 4, 4, 4]], np.int32)


def make_qkv(T, Hq, Hkv, D=16, B=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, Hq, D)).astype(np.float32), rng.normal(size=(B, S, Hkv, D)).astype(np.float32),
            rng.normal(size=(B, S, Hkv, D)).astype(np.float32))


CASES = [(m, h, layout, seg) for m, h, layout, seg in itertools.product(MASKS, HEADS, LAYOUTS, (False, True))
         if not (m == "explicit" and layout == "suffix")]


@pytest.mark.parametrize("mask_name, heads, layout, with_segments", CASES)
def test_reference_matches_numpy_oracle(mask_name, heads, layout, with_segments):
    mask, rule = MASKS[mask_name]
    (Hq, Hkv), (T, q_offset) = HEADS[heads], LAYOUTS[layout]
    q, k, v = make_qkv(T, Hq, Hkv)
    seg_kv = KV_SEGMENTS if with_segments else None
    seg_q = None if seg_kv is None else seg_kv[:, q_offset:q_offset + T]
    out, lse = reference_attention(q, k, v, mask=mask, segment_ids=seg_q, kv_segment_ids=seg_kv, q_offset=q_offset,
                                   return_lse=True)
    allowed = naive_allowed(rule, T, S, q_offset, seg_q, seg_kv)
    expected_out, expected_lse = naive_attention(q, k, v, allowed, scale=16 ** -0.5)
    assert out.shape == (2, T, Hq, 16) and out.dtype == jnp.float32
    assert lse.shape == (2, T, Hq) and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-5, rtol=1e-5)
    empty = ~allowed.any(-1)
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
    assert np.all(np.isneginf(np.asarray(lse)[empty]))


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_reference_bfloat16_against_float64_oracle(mask_name):
    mask, rule = MASKS[mask_name]
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in make_qkv(S, 4, 2, seed=2))
    out, lse = reference_attention(q, k, v, mask=mask, segment_ids=KV_SEGMENTS, return_lse=True)
    expected_out, expected_lse = naive_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)),
                                                 naive_allowed(rule, S, S, 0, KV_SEGMENTS, KV_SEGMENTS), scale=0.25)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected_out, atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-4, rtol=1e-4)


def test_scale_and_single_output():
    q, k, v = make_qkv(S, 4, 2)
    allowed = naive_allowed(MASKS["causal"][1], S, S, 0, None, None)
    out = reference_attention(q, k, v, mask=masks.Causal(), scale=0.7)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(out, naive_attention(q, k, v, allowed, scale=0.7)[0], atol=1e-5, rtol=1e-5)


def test_gradients_finite_with_fully_masked_rows():
    q, k, v = make_qkv(S, 4, 2)

    def loss(q, k, v):
        out, lse = reference_attention(q, k, v, mask=masks.Explicit(EXPLICIT), segment_ids=KV_SEGMENTS,
                                       return_lse=True)
        return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    padding = KV_SEGMENTS == 0
    np.testing.assert_array_equal(np.asarray(grads[0])[padding], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[1])[padding], 0.0)


def test_traced_q_offset_matches_static():
    q, k, v = make_qkv(4, 4, 2)
    mask = masks.SinksAndWindow(1, 2)
    traced = jax.jit(lambda offset: reference_attention(q, k, v, mask=mask, q_offset=offset))(jnp.int32(3))
    np.testing.assert_allclose(traced, reference_attention(q, k, v, mask=mask, q_offset=3), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask_name", ["sinks_window", "causal"])
def test_query_segments_need_not_be_a_slice_of_the_keys(mask_name):
    """Queries whose segment is absent from the keys attend to nothing; a traced q_offset gives the same result."""
    mask, rule = MASKS[mask_name]
    q, k, v = make_qkv(4, 4, 2, seed=3)
    seg_q = np.array([[2, 2, 9, 0], [4, 3, 4, 4]], np.int32)  # 9 is in no key row; row 1 is not a slice of its keys
    expected, _ = naive_attention(q, k, v, naive_allowed(rule, 4, S, 4, seg_q, KV_SEGMENTS), scale=0.25)
    run = jax.jit(lambda offset: reference_attention(q, k, v, mask=mask, segment_ids=seg_q,
                                                     kv_segment_ids=KV_SEGMENTS, q_offset=offset))
    np.testing.assert_allclose(run(jnp.int32(4)), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(run(jnp.int32(4)))[0, 2:], 0.0)
