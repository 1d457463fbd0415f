"""Context-parallel attention on 8 CPU devices (mesh data 2 × sequence 4) against single-device reference attention:
forward, lse and gradients of every strategy and token layout, on causal, sliding-window, document-masked (packed,
with padding) and grouped-query inputs; the Pallas-kernel steps in interpret mode; and the requests each strategy
refuses. Tolerances: float32 throughout, reference at highest precision; merging by lse reorders sums (about 1e-6)."""

import functools

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
    """loss(q, k, v) → (a scalar of out and lse, (out, lse)): value_and_grad of it gives the outputs and the gradients
    from one forward pass."""
    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out ** 2) + jnp.sum(jnp.sin(jnp.where(jnp.isinf(lse), 0.0, lse))), (out, lse)
    return loss


def _outputs_and_gradients(loss, inputs):
    """(out, lse, (dq, dk, dv)) of `loss` at `inputs`."""
    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*inputs)
    return out, lse, grads


def sharded_attention(mesh, strategy, layout, case, impl):
    """attend(q, k, v) → (out, lse): context-parallel attention of inputs in natural token order, put in `layout`'s
    order for `context.attention` and the results back."""
    mask, segment_ids = CASES[case]

    def attend(q, k, v):
        ids = None if segment_ids is None else layout_lib.to_layout(segment_ids, layout, N)
        out, lse = context.attention(*(layout_lib.to_layout(x, layout, N) for x in (q, k, v)), strategy=strategy,
                                     layout=layout, mask=mask, segment_ids=ids, impl=impl, return_lse=True,
                                     mesh=mesh)
        return layout_lib.from_layout(out, layout, N), layout_lib.from_layout(lse, layout, N)
    return attend


def sharded_results(mesh, runs, impl, num_kv_heads=HKV):
    """{(strategy, layout, case): (out, lse, grads)} for every run in `runs`, all in one jitted function: XLA compiles
    them together once, in about half the time of one compile each (compiling dominates these tests)."""
    inputs = _inputs(num_kv_heads)
    losses = {run: _loss(sharded_attention(mesh, *run, impl)) for run in runs}
    return jax.jit(lambda *x: {run: _outputs_and_gradients(loss, x) for run, loss in losses.items()})(*inputs)


@functools.cache
def single_device_results(case, num_kv_heads=HKV):
    """(out, lse, grads) of single-device reference attention, computed once per process for every test."""
    mask, segment_ids = CASES[case]

    def single(q, k, v):
        return attention(q, k, v, mask=mask, segment_ids=segment_ids, impl="reference", return_lse=True)
    return jax.jit(lambda *x: _outputs_and_gradients(_loss(single), x))(*_inputs(num_kv_heads))


def assert_equal_results(results, expected, what):
    (out, lse, grads), (expected_out, expected_lse, expected_grads) = results, expected
    np.testing.assert_allclose(out, expected_out, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"{what}: out")
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected_lse), err_msg=f"{what}: lse infinities")
    np.testing.assert_allclose(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(expected_lse), 0, expected_lse),
                               atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"{what}: lse")
    for name, ours, theirs in zip(("dq", "dk", "dv"), grads, expected_grads):
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=TOLERANCE, err_msg=f"{what}: {name}")


def check(mesh, runs, impl, num_kv_heads=HKV):
    """Every (strategy, layout, case) of `runs` gives single-device attention's out, lse and gradients; a failure
    names every run that differs."""
    results = sharded_results(mesh, runs, impl, num_kv_heads)
    failures = []
    for run in runs:
        try:
            assert_equal_results(results[run], single_device_results(run[2], num_kv_heads), "-".join(run))
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("strategy", context.STRATEGIES)
def test_equals_single_device_attention(mesh, strategy):
    """Every case and layout of a strategy, in one compile (a test per strategy, so that pytest-xdist's workers
    never compile the same function twice)."""
    check(mesh, [(strategy, layout, case) for case in sorted(CASES) for layout in layout_lib.LAYOUTS],
          impl="reference")


@pytest.mark.parametrize("strategy", context.STRATEGIES)
def test_each_strategy_under_the_default_axes_of_jax_make_mesh(mesh, strategy):
    """jax 0.11's jax.make_mesh makes Explicit axes: plain, unsharded inputs under jax.set_mesh are resharded to what
    the strategy needs, eagerly and under jit (forward, lse and gradients), with single-device attention's result."""
    explicit = jax.make_mesh((2, N), ("data", "sequence"))
    assert set(explicit.axis_types) == {jax.sharding.AxisType.Explicit}
    check(explicit, [(strategy, "zigzag", "documents")], impl="reference")
    q, k, v = _inputs()
    with jax.set_mesh(explicit):
        out = context.attention(q, k, v, strategy=strategy, mask=masks.Causal(), impl="reference")
    assert out.sharding.spec == jax.sharding.PartitionSpec("data", "sequence", None, None)
    np.testing.assert_allclose(out, single_device_results("causal")[0], atol=TOLERANCE, rtol=TOLERANCE)


PALLAS_RUNS = [
    ("ring", "zigzag", "causal"), ("ring", "contiguous", "sliding_window"), ("ring", "striped", "documents"),
    ("ring_bidirectional", "zigzag", "documents"), ("ring_bidirectional", "striped", "causal"),
    ("all_gather", "zigzag", "sliding_window"), ("all_gather", "striped", "causal"),
]


@pytest.mark.parametrize("strategy", ["ring", "ring_bidirectional", "all_gather"])
def test_pallas_kernel_steps(mesh, strategy):
    """The same, with every step on the Pallas kernels (interpret mode): static calls per device and step."""
    check(mesh, [run for run in PALLAS_RUNS if run[0] == strategy], impl="pallas_interpret")


def test_multi_query_ring(mesh):
    check(mesh, [("ring", "zigzag", "documents")], impl="reference", num_kv_heads=1)


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
