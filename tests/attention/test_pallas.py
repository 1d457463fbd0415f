"""impl="pallas" through longctx dispatch: the kernels (Triton backend in interpret mode on CPU, compiled on a GPU)
against longctx's own reference on every kind of mask (per-head ones included), segment ids and softplus, forward,
lse and gradients; and every refusal named before any work.

Tolerances: float32, 5e-5 (atol and rtol; gradients relative to their largest magnitude).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_test_base import INTERPRET_COMPILER_OPTIONS
from pallas_kernels import masks

from longctx.attention import attention, dispatch, normalizers, pallas
from longctx.attention.dispatch import Request

T = 128
SEGMENTS = np.array([[1] * 50 + [2] * 78, [1] * 20 + [2] * 80 + [0] * 28], np.int32)
IMPL = "pallas" if jax.devices()[0].platform == "gpu" else "pallas_interpret"


def _qkv(B=2, T=T, S=T, Hq=4, Hkv=2, D=64, dtype=jnp.float32):
    """Standard normal q, k, v, drawn in numpy (jax.random would compile a sampler for every shape)."""
    rng = np.random.default_rng(3)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))


def _value(result, return_lse):
    """The loss on attention's result: Σ out² (+ 0.3 Σ lse over finite lse)."""
    if not return_lse:
        return jnp.sum(result ** 2)
    out, lse = result
    return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.3)


def _loss(impl, return_lse, **kwargs):
    return lambda q, k, v: _value(attention(q, k, v, impl=impl, return_lse=return_lse, **kwargs), return_lse)


def _forward_and_gradients(impl, return_lse, q, k, v, **kwargs):
    """(out or (out, lse), the gradients (dq, dk, dv) of `_value`) from one pass: the forward runs once."""
    def loss(q, k, v):
        result = attention(q, k, v, impl=impl, return_lse=return_lse, **kwargs)
        return _value(result, return_lse), result
    (_, result), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return result, grads


@pytest.mark.parametrize("case", [
    dict(mask=masks.Causal()),
    dict(mask=masks.SlidingWindow(20), segment_ids=SEGMENTS),
    dict(mask=masks.SinksAndWindow(4, 20)),
    dict(mask=masks.Distant(30) | masks.SlidingWindow(8)),
    dict(mask=masks.Causal(), segment_ids=SEGMENTS, normalizer="softplus"),
    dict(mask=masks.SlidingWindow(40), segment_ids=SEGMENTS, normalizer=normalizers.Softplus(reweight=True)),
    dict(mask=masks.StridedHeads(block=32, local_blocks=1, stride=2)),
    dict(mask=masks.BlockMask(np.stack([np.eye(2, dtype=bool), np.tril(np.ones((2, 2), bool))] * 2), 64, 64)),
], ids=["causal", "window_packed", "sinks_window", "union", "softplus_packed", "softplus_reweighted_packed",
        "s2_strided_heads", "per_head_block_mask"])
def test_pallas_matches_reference(case):
    q, k, v = _qkv()
    return_lse = case.get("normalizer", "softmax") == "softmax"
    with jax.default_matmul_precision("highest"):
        # The kernels under jit: forward and backward compile as one program (eagerly, each kernel and op apart),
        # in interpret mode as the kernel tests compile them.
        ours, grads = jax.jit(lambda q, k, v: _forward_and_gradients(IMPL, return_lse, q, k, v, **case),
                              compiler_options=INTERPRET_COMPILER_OPTIONS if IMPL == "pallas_interpret" else None)(
            q, k, v)
        theirs, expected = _forward_and_gradients("reference", return_lse, q, k, v, **case)
    ours, theirs, grads, expected = jax.tree.map(np.asarray, (ours, theirs, grads, expected))
    for got, want in zip(ours if return_lse else (ours,), theirs if return_lse else (theirs,)):
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
        np.testing.assert_allclose(np.where(np.isinf(got), 0, got), np.where(np.isinf(want), 0, want), atol=5e-5,
                                   rtol=5e-5)
    for got, want in zip(grads, expected):
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(got / scale, want / scale, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("changes, match", [
    (dict(mask=masks.Explicit(np.tril(np.ones((T, T), bool)))),
     r"Explicit\(<128x128 bool, 8256 allowed>\) leaves partial .* blocks but cannot be evaluated in a kernel"),
    (dict(mask=masks.SinksAndWindow(4, 20), segment_ids=SEGMENTS),
     r"with segment ids longctx evaluates a mask that is not relative on positions within each document"),
    (dict(alibi_slopes=np.ones(4, np.float32)), r"add no ALiBi bias"),
    (dict(q=_qkv(T=100, S=100)[0], k=_qkv(T=100, S=100)[1], v=_qkv(T=100, S=100)[2]), r"block sizes"),
])
def test_pallas_refuses_before_any_work(changes, match):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v, "mask": masks.Causal(), **changes}
    with pytest.raises(NotImplementedError, match=match):
        attention(impl=IMPL, **args)


def test_pallas_refuses_a_traced_q_offset():
    q, k, v = _qkv(T=64)
    with pytest.raises(NotImplementedError, match="static q_offset"):
        jax.jit(lambda offset: attention(q, k, v, q_offset=offset, impl=IMPL))(64)


@pytest.mark.skipif(jax.devices()[0].platform in ("gpu", "tpu"), reason="checks the refusal off accelerators")
def test_compiled_pallas_needs_an_accelerator():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"impl='pallas'.*need a CUDA GPU or a TPU \(backend is cpu\)"):
        attention(q, k, v, impl="pallas")


def test_auto_prefers_pallas_for_sparse_masks_and_cudnn_for_dense_ones():
    q, k, _ = _qkv(dtype=jnp.bfloat16)

    def choice(mask):
        return dispatch.choose_impl(Request(q.shape, k.shape, q.dtype, mask, "gpu", (9, 0)))

    assert choice(masks.Causal()) == "cudnn"
    assert choice(masks.SlidingWindow(32)) == "pallas"
    assert choice(masks.Explicit(np.tril(np.ones((T, T), bool)))) == "xla"


def test_hopper_runs_mosaic_gpu_where_it_can_and_triton_for_the_rest():
    q, k, _ = _qkv(dtype=jnp.bfloat16)

    def backend(dtype=jnp.bfloat16, normalizer=normalizers.Softmax(), capability=(9, 0)):
        request = Request(q.shape, k.shape, dtype, masks.SlidingWindow(32), "gpu", capability, normalizer=normalizer)
        return pallas.choose_backend(request)[0]

    assert backend() == "mosaic_gpu"
    assert backend(capability=(8, 0)) == "triton"
    assert backend(dtype=jnp.float32) == "triton"
    assert backend(normalizer=normalizers.Softplus()) == "triton"


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU")
def test_pallas_in_bfloat16_on_a_gpu():
    """The compiled kernels longctx picks for bfloat16 (Mosaic GPU on Hopper) against the reference: 2 % of the
    largest reference magnitude, forward and gradients."""
    q, k, v = _qkv(T=256, S=256, D=128, dtype=jnp.bfloat16)
    case = dict(mask=masks.SlidingWindow(100), segment_ids=np.repeat(SEGMENTS, 2, axis=1))
    pairs = [(attention(q, k, v, impl="pallas", **case), attention(q, k, v, impl="reference", **case))]
    pairs += zip(jax.grad(_loss("pallas", False, **case), (0, 1, 2))(q, k, v),
                 jax.grad(_loss("reference", False, **case), (0, 1, 2))(q, k, v))
    for got, want in pairs:
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max(), rtol=0)
