"""merge_attention: attention over disjoint key sets, merged by log-sum-exp, equals attention over their union."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx.attention import attention, merge_attention

SEGMENTS = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 2, 0]], np.int32)


def qkv(seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, 8, h, 16)), jnp.float32) for h in (4, 2, 2))


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("segments", [None, SEGMENTS])
def test_window_and_distant_keys_merge_to_causal_attention(impl, segments):
    q, k, v = qkv()
    parts = [attention(q, k, v, mask=mask, segment_ids=segments, impl=impl, return_lse=True)
             for mask in (masks.SlidingWindow(3), masks.Distant(3))]
    whole, whole_lse = attention(q, k, v, mask=masks.Causal(), segment_ids=segments, impl="reference",
                                 return_lse=True)
    out, lse = merge_attention(parts, return_lse=True)
    np.testing.assert_allclose(out, whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_gradients_match_and_empty_rows_stay_zero():
    q, k, v = qkv(1)

    def merged(q, k, v):
        return merge_attention([attention(q, k, v, mask=mask, segment_ids=SEGMENTS, impl="reference",
                                          return_lse=True) for mask in (masks.SlidingWindow(2), masks.Distant(2))])

    def whole(q, k, v):
        return attention(q, k, v, mask=masks.Causal(), segment_ids=SEGMENTS, impl="reference")

    np.testing.assert_array_equal(merged(q, k, v)[1, 7], 0.0)  # padding row: no key in either part
    for ours, theirs in zip(jax.grad(lambda *a: jnp.sum(jnp.sin(merged(*a))), argnums=(0, 1, 2))(q, k, v),
                            jax.grad(lambda *a: jnp.sum(jnp.sin(whole(*a))), argnums=(0, 1, 2))(q, k, v)):
        assert np.all(np.isfinite(ours))
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_distant_mask_is_the_causal_complement_of_the_window():
    window, distant = masks.materialize(masks.SlidingWindow(3), 6, 6), masks.materialize(masks.Distant(3), 6, 6)
    np.testing.assert_array_equal(window | distant, masks.materialize(masks.Causal(), 6, 6))
    assert not np.any(window & distant)
    assert not np.any(window & distant) and masks.Distant(3).relative
    with pytest.raises(ValueError, match="Distant: distance must be a positive int"):
        masks.Distant(0)
