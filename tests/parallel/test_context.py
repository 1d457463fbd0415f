"""Context-parallel attention on 8 CPU devices (mesh data 2 × sequence 4) against single-device reference attention:
forward, lse and gradients of every strategy and token layout, on causal, sliding-window, document-masked (packed,
with padding) and grouped-query inputs; the Pallas-kernel steps in interpret mode; and the requests each strategy
refuses. Tolerances: float32 throughout, reference at highest precision; merging by lse reorders sums (about 1e-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx.attention import attention
from longctx.parallel import context, layout as layout_lib

N = 4  # devices on the sequence axis
B, T, HQ, HKV, D = 2, 128, 8, 4, 16
TOLERANCE = 2e-5
SEGMENTS = jnp.asarray([[1] * 40 + [2] * 60 + [3] * 28, [1] * 80 + [2] * 32 + [0] * 16], jnp.int32)
CASES = {
    "causal": (masks.Causal(), None),
    "sliding_window": (masks.SlidingWindow(13), None),
    "documents": (masks.Causal(), SEGMENTS),
    "documents_sinks_window": (masks.SinksAndWindow(3, 9), SEGMENTS),
}


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 2 * N:
        pytest.skip(f"needs {2 * N} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((2, N), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _inputs(num_kv_heads=HKV):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (B, T, HQ, D)), jax.random.normal(keys[1], (B, T, num_kv_heads, D)),
            jax.random.normal(keys[2], (B, T, num_kv_heads, D)))


def _loss(attend):
    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out ** 2) + jnp.sum(jnp.sin(jnp.where(jnp.isinf(lse), 0.0, lse)))
    return loss


def check(mesh, strategy, layout, mask, segment_ids, impl, num_kv_heads=HKV):
    q, k, v = _inputs(num_kv_heads)

    def sharded(q, k, v):
        ids = None if segment_ids is None else layout_lib.to_layout(segment_ids, layout, N)
        out, lse = context.attention(*(layout_lib.to_layout(x, layout, N) for x in (q, k, v)), strategy=strategy,
                                     layout=layout, mask=mask, segment_ids=ids, impl=impl, return_lse=True,
                                     mesh=mesh)
        return layout_lib.from_layout(out, layout, N), layout_lib.from_layout(lse, layout, N)

    def single(q, k, v):
        return attention(q, k, v, mask=mask, segment_ids=segment_ids, impl="reference", return_lse=True)

    (out, lse), grads = jax.jit(lambda *a: (sharded(*a), jax.grad(_loss(sharded), (0, 1, 2))(*a)))(q, k, v)
    expected, expected_lse = single(q, k, v)
    expected_grads = jax.grad(_loss(single), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected_lse))
    np.testing.assert_allclose(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(expected_lse), 0, expected_lse),
                               atol=TOLERANCE, rtol=TOLERANCE)
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, expected_grads):
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("layout", layout_lib.LAYOUTS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", context.STRATEGIES)
def test_equals_single_device_attention(mesh, strategy, case, layout):
    check(mesh, strategy, layout, *CASES[case], impl="reference")


@pytest.mark.parametrize("strategy", context.STRATEGIES)
def test_each_strategy_under_the_default_axes_of_jax_make_mesh(mesh, strategy):
    """jax 0.11's jax.make_mesh makes Explicit axes: plain, unsharded inputs under jax.set_mesh are resharded to what
    the strategy needs, eagerly and under jit (forward, lse and gradients), with single-device attention's result."""
    explicit = jax.make_mesh((2, N), ("data", "sequence"))
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    check(explicit, strategy, "zigzag", *CASES["documents"], impl="reference")
    q, k, v = _inputs()
    with jax.set_mesh(explicit):
        out = context.attention(q, k, v, strategy=strategy, mask=masks.Causal(), impl="reference")
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", "sequence", None, None)
    np.testing.assert_allclose(out, attention(q, k, v, mask=masks.Causal(), impl="reference"), atol=TOLERANCE,
                               rtol=TOLERANCE)


@pytest.mark.parametrize("strategy, layout, case", [
    ("ring", "zigzag", "causal"), ("ring", "contiguous", "sliding_window"), ("ring", "striped", "documents"),
    ("ring_bidirectional", "zigzag", "documents"), ("ring_bidirectional", "striped", "causal"),
    ("all_gather", "zigzag", "sliding_window"), ("all_gather", "striped", "causal"),
])
def test_pallas_kernel_steps(mesh, strategy, layout, case):
    """The same, with every step on the Pallas kernels (interpret mode): static calls per device and step."""
    check(mesh, strategy, layout, *CASES[case], impl="pallas_interpret")


def test_multi_query_ring(mesh):
    check(mesh, "ring", "zigzag", masks.Causal(), SEGMENTS, impl="reference", num_kv_heads=1)


def test_zigzag_plans_are_balanced():
    """Every zigzag ring step after the first gives each device one full call over half its queries or keys."""
    from longctx.parallel.blocks import plan_calls

    shard = T // N
    for step in range(1, N):
        for rank in range(N):
            calls = plan_calls(masks.Causal(), layout_lib.pieces("zigzag", rank, N, shard),
                               layout_lib.pieces("zigzag", (rank - step) % N, N, shard))
            assert len(calls) == 1 and calls[0].mask == masks.Full()
            area = (calls[0].q_rows[1] - calls[0].q_rows[0]) * (calls[0].kv_rows[1] - calls[0].kv_rows[0])
            assert area == shard * shard // 2


def test_refuses_what_a_strategy_cannot_serve(mesh):
    q, k, v = _inputs()
    with pytest.raises(NotImplementedError, match="striped runs serve the causal and full masks"):
        context.attention(q, k, v, strategy="ring", layout="striped", mask=masks.SlidingWindow(13),
                          impl="pallas_interpret", mesh=mesh)
    with pytest.raises(NotImplementedError, match="positions within each document"):
        context.attention(q, k, v, strategy="ring", mask=masks.SinksAndWindow(3, 9), segment_ids=SEGMENTS,
                          impl="pallas_interpret", mesh=mesh)
    with pytest.raises(NotImplementedError, match="normalizer='softplus'"):
        context.attention(q, k, v, strategy="all_gather", normalizer="softplus", impl="reference", mesh=mesh)
    with pytest.raises(NotImplementedError, match="kv heads per device .1. divisible by the sequence axis size .4."):
        context.attention(q, k[:, :, :1], v[:, :, :1], strategy="ulysses", impl="reference", mesh=mesh)
    with pytest.raises(NotImplementedError, match="cudnn"):
        context.attention(q, k, v, strategy="ring", impl="cudnn", mesh=mesh)
    with pytest.raises(ValueError, match="divisible by 8"):
        context.attention(q[:, :100], k[:, :100], v[:, :100], strategy="ring", layout="zigzag", impl="reference",
                          mesh=mesh)
    with pytest.raises(ValueError, match="strategy must be one of"):
        context.attention(q, k, v, strategy="tree", impl="reference", mesh=mesh)


def test_ulysses_serves_softplus(mesh):
    q, k, v = _inputs()
    out = context.attention(q, k, v, strategy="ulysses", layout="zigzag", normalizer="softplus", impl="reference",
                            mesh=mesh)
    expected = layout_lib.to_layout(attention(*(layout_lib.from_layout(x, "zigzag", N) for x in (q, k, v)),
                                              normalizer="softplus", impl="reference"), "zigzag", N)
    np.testing.assert_allclose(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_layout_round_trip():
    x = np.arange(2 * 48).reshape(2, 48)
    for layout in layout_lib.LAYOUTS:
        np.testing.assert_array_equal(layout_lib.from_layout(layout_lib.to_layout(x, layout, 4), layout, 4), x)
    np.testing.assert_array_equal(layout_lib.permutation("zigzag", 16, 2), [0, 1, 2, 3, 12, 13, 14, 15,
                                                                           4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(layout_lib.permutation("striped", 8, 2), [0, 2, 4, 6, 1, 3, 5, 7])
