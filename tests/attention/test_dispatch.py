"""attention(): xla against the reference (forward and gradients), document isolation, cudnn refusals, auto's choice,
argument checks.

Tolerances (float32): forward 1e-5, lse 1e-5, gradients 1e-4 (atol and rtol). Matmuls run at highest precision so the
same tolerances hold on GPUs, whose float32 default is TF32-class. On a CUDA GPU, cudnn is also checked against the
reference in bfloat16: 2 % of the largest reference magnitude.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx.attention import attention, dispatch, reference_attention
from longctx.attention.dispatch import Request, cudnn_unsupported_reason

S = 8
EXPLICIT = np.random.default_rng(1).random((S, S)) < 0.5
EXPLICIT[2] = False
MASKS = [masks.Full(), masks.Causal(), masks.SlidingWindow(3), masks.SinksAndWindow(2, 3), masks.Explicit(EXPLICIT)]
KV_SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [0, 3, 3, 3, 3, 4, 4, 4]], np.int32)
CONFIGS = {  # (Hq, Hkv, T, q_offset, segments)
    "gqa_packed": (4, 2, S, 0, True),
    "mha_suffix": (2, 2, 4, S - 4, False),
}


def make_qkv(T, Hq, Hkv, D=16, B=2, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype)
                 for shape in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))


def _compiled(f, impl, q, k, v, **kwargs):
    """f(impl, q, k, v, **kwargs) under jit, the kwargs static: a case's few dozen ops compile faster as one program
    than one by one."""
    return jax.jit(lambda q, k, v: f(impl, q, k, v, **kwargs))(q, k, v)


def _forward_and_gradients(impl, q, k, v, **kwargs):
    """((out, lse), the gradients (dq, dk, dv) of a loss on both) from one pass: the forward runs once."""
    def loss(q, k, v):
        out, lse = attention(q, k, v, impl=impl, return_lse=True, **kwargs)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out * weights) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.3), (out, lse)

    (_, result), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return result, grads


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: type(m).__name__)
def test_xla_matches_reference_forward_and_gradients(mask, config):
    Hq, Hkv, T, q_offset, with_segments = CONFIGS[config]
    if isinstance(mask, masks.Explicit):
        T, q_offset = S, 0
    q, k, v = make_qkv(T, Hq, Hkv)
    kv_seg = KV_SEGMENTS if with_segments else None
    q_seg = None if kv_seg is None else kv_seg[:, q_offset:q_offset + T]
    kwargs = dict(mask=mask, q_offset=q_offset, segment_ids=q_seg, kv_segment_ids=kv_seg)
    with jax.default_matmul_precision("highest"):
        (out, lse), grads = _compiled(_forward_and_gradients, "xla", q, k, v, **kwargs)
        (ref_out, ref_lse), ref_grads = _compiled(_forward_and_gradients, "reference", q, k, v, **kwargs)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_documents_do_not_see_each_other(impl):
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
    q, k, v = make_qkv(S, 4, 2, B=1)
    changed_k = k.at[:, 3:].set(k[:, 3:] * -2.0 + 1.0)
    changed_v = v.at[:, 3:].set(7.0)
    out = attention(q, k, v, segment_ids=segment_ids, impl=impl)
    changed = attention(q, changed_k, changed_v, segment_ids=segment_ids, impl=impl)
    np.testing.assert_array_equal(out[:, :3], changed[:, :3])
    assert not np.allclose(out[:, 3:6], changed[:, 3:6])
    np.testing.assert_array_equal(out[:, 6:], 0.0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_traced_q_offset(impl):
    q, k, v = make_qkv(4, 4, 2)
    run = jax.jit(lambda q_offset: attention(q, k, v, mask=masks.SlidingWindow(3), q_offset=q_offset, impl=impl))
    with jax.default_matmul_precision("highest"):
        traced = run(jnp.int32(S - 4))
        static = attention(q, k, v, mask=masks.SlidingWindow(3), q_offset=S - 4, impl=impl)
    np.testing.assert_allclose(traced, static, atol=1e-6, rtol=1e-6)


def test_cudnn_on_cpu_refuses_loudly():
    q, k, v = make_qkv(S, 4, 2, D=64, dtype=jnp.bfloat16)
    if dispatch.platform_of(q)[0] == "gpu":
        pytest.skip("this checks the refusal off a CUDA GPU")
    with pytest.raises(NotImplementedError, match=r"impl='cudnn'.*cudnn needs a CUDA GPU \(backend is cpu\).*"
                                                  r"impl='xla' runs it"):
        attention(q, k, v, impl="cudnn")


def _request(**changes) -> Request:
    fields = dict(q_shape=(2, 128, 8, 64), k_shape=(2, 128, 2, 64), dtype=jnp.bfloat16, mask=masks.Causal(),
                  platform="gpu", compute_capability=(9, 0))
    return Request(**{**fields, **changes})


@pytest.mark.parametrize("changes", [
    {},
    {"mask": masks.Full()},
    {"mask": masks.SlidingWindow(128)},
    {"dtype": jnp.float16},
    {"q_shape": (2, 128, 2, 64)},
    {"q_shape": (2, 128, 8, 256), "k_shape": (2, 128, 2, 256)},
    {"q_shape": (2, 128, 8, 72), "k_shape": (2, 128, 2, 72), "compute_capability": (8, 0)},
    {"q_shape": (2, 64, 8, 64)},
    {"q_shape": (2, 256, 8, 64)},
    {"q_shape": (2, 64, 8, 64), "mask": masks.SlidingWindow(16)},
    {"mask": masks.Full(), "q_offset": None},
    {"mask": masks.Full(), "q_offset": 64},
])
def test_cudnn_supported_requests(changes):
    assert cudnn_unsupported_reason(_request(**changes)) is None


@pytest.mark.parametrize("changes, match", [
    ({"platform": "cpu"}, r"cudnn needs a CUDA GPU \(backend is cpu\)"),
    ({"platform": "tpu"}, r"cudnn needs a CUDA GPU \(backend is tpu\)"),
    ({"platform": "rocm"}, r"cudnn needs a CUDA GPU \(backend is rocm\)"),
    ({"dtype": jnp.float32}, r"cudnn needs bfloat16 or float16 inputs, got float32"),
    ({"q_shape": (2, 128, 8, 60), "k_shape": (2, 128, 2, 60)}, r"multiple of 8 and at most 256.*got D=60"),
    ({"q_shape": (2, 128, 8, 264), "k_shape": (2, 128, 2, 264)}, r"at most 256.*got D=264"),
    ({"q_shape": (2, 128, 8, 256), "k_shape": (2, 128, 2, 256), "compute_capability": (8, 0)},
     r"at most 128.*got D=256"),
    ({"q_shape": (2, 128, 8, 256), "k_shape": (2, 128, 2, 256), "compute_capability": None},
     r"at most 128.*got D=256"),
    ({"has_segment_ids": True}, r"cudnn cannot honour segment_ids.*no packed-document support"),
    ({"mask": masks.SinksAndWindow(4, 16)}, r"cudnn honours only the masks Full, Causal and SlidingWindow, got "
                                            r"SinksAndWindow\(sinks=4, window=16\)"),
    ({"mask": masks.Explicit(np.ones((128, 128), bool))}, r"only the masks Full, Causal and SlidingWindow, got "
                                                          r"Explicit"),
    ({"mask": masks.Causal() | masks.SlidingWindow(4)}, r"only the masks Full, Causal and SlidingWindow, got Union"),
    ({"mask": masks.Causal() & masks.SlidingWindow(4)}, r"got Intersection"),
    ({"q_offset": 64, "q_shape": (2, 64, 8, 64)}, r"top-left.*q_offset must be a static 0, got 64"),
    ({"q_offset": None, "mask": masks.SlidingWindow(8)}, r"q_offset must be a static 0, got a traced value"),
    ({"q_shape": (2, 256, 8, 64), "mask": masks.SlidingWindow(16)}, r"sliding window needs T <= S, got T=256, S=128"),
    ({"return_lse": True}, r"cudnn cannot return the lse.*no gradient"),
])
def test_cudnn_unsupported_reasons(changes, match):
    reason = cudnn_unsupported_reason(_request(**changes))
    assert reason is not None
    assert re.search(match, reason), reason


def test_auto_on_cpu_chooses_xla_and_logs_once(caplog, monkeypatch):
    q, k, v = make_qkv(S, 4, 2)
    if dispatch.platform_of(q)[0] == "gpu":
        pytest.skip("this checks auto's choice off a CUDA GPU")
    monkeypatch.setattr(dispatch, "_LOGGED_CHOICES", set())
    with caplog.at_level(logging.INFO, logger="longctx.attention"):
        out = attention(q, k, v, impl="auto")
        attention(q, k, v, impl="auto")
    assert [r.getMessage() for r in caplog.records] == [
        "attention impl=auto chose xla: cudnn needs a CUDA GPU (backend is cpu); the pallas kernels need a CUDA GPU "
        "or a TPU (backend is cpu)"]
    np.testing.assert_array_equal(out, attention(q, k, v, impl="xla"))


def _args(**changes):
    q, k, v = make_qkv(S, 4, 2)
    return {"q": q, "k": k, "v": v, **changes}


@pytest.mark.parametrize("changes, match", [
    ({"impl": "flash"}, r"impl must be one of auto, cudnn, pallas, pallas_interpret, reference, xla, got 'flash'"),
    ({"normalizer": "sparsemax"}, r"normalizer must be one of 'softmax', 'softplus' or .*, got 'sparsemax'"),
    ({"normalizer": "softplus", "scale": 0.5}, r"normalizer='softplus' sets its own scores .* cannot take scale"),
    ({"normalizer": "softplus", "return_lse": True}, r"cannot take return_lse"),
    ({"alibi_slopes": np.ones(3, np.float32)}, r"alibi_slopes must have shape \[Hq\] = \(4,\), got \(3,\)"),
    ({"q": jnp.zeros((2, S, 16))}, r"q must have rank 4 \(q: \[B, T, Hq, D\]\), got shape \(2, 8, 16\)"),
    ({"k": jnp.zeros((2, S, 3, 16)), "v": jnp.zeros((2, S, 3, 16))}, r"Hq=4 must be a multiple of .* Hkv=3"),
    ({"k": jnp.zeros((2, S, 2, 8)), "v": jnp.zeros((2, S, 2, 8))}, r"same head dim D, got 16 and 8"),
    ({"v": jnp.zeros((2, S + 1, 2, 16))}, r"k and v must have the same shape"),
    ({"k": jnp.zeros((1, S, 2, 16)), "v": jnp.zeros((1, S, 2, 16))}, r"same batch size, got 2 and 1"),
    ({"v": jnp.zeros((2, S, 2, 16), jnp.bfloat16)}, r"share one floating dtype, got float32, float32, bfloat16"),
    ({"segment_ids": np.ones((2, S + 1), np.int32)}, r"segment_ids must have shape \[B, T\] = \(2, 8\), got \(2, 9\)"),
    ({"segment_ids": np.ones((2, S), np.float32)}, r"segment_ids must be an integer array \(int32\), got float32"),
    ({"q": jnp.zeros((2, 4, 4, 16)), "segment_ids": np.ones((2, 4), np.int32)},
     r"kv_segment_ids is required when the other is given and S != T \(S=8, T=4\)"),
    ({"q": jnp.zeros((2, 4, 4, 16)), "kv_segment_ids": np.ones((2, S), np.int32)}, r"segment_ids is required"),
    ({"mask": "causal"}, r"mask must be a pallas_kernels.masks.Mask .*masks.parse\(spec\)"),
    ({"mask": masks.Explicit(np.ones((4, 4), bool))}, r"Explicit mask has shape \(4, 4\)"),
    ({"q_offset": -1}, r"q_offset must be >= 0, got -1"),
    ({"q_offset": 1.5}, r"q_offset must be an int or an integer scalar array, got 1.5"),
])
def test_argument_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        attention(**_args(**changes))


def test_kv_segment_ids_default_to_segment_ids():
    q, k, v = make_qkv(S, 4, 2)
    expected = attention(q, k, v, segment_ids=KV_SEGMENTS, kv_segment_ids=KV_SEGMENTS, impl="reference")
    np.testing.assert_array_equal(attention(q, k, v, segment_ids=KV_SEGMENTS, impl="reference"), expected)
    np.testing.assert_array_equal(attention(q, k, v, kv_segment_ids=KV_SEGMENTS, impl="reference"), expected)


@pytest.mark.skipif(dispatch.platform_of(jnp.zeros(()))[0] != "gpu", reason="cudnn runs on a CUDA GPU only")
@pytest.mark.parametrize("mask, T", [(masks.Full(), 256), (masks.Causal(), 256), (masks.SlidingWindow(17), 256),
                                     (masks.Causal(), 128), (masks.Causal(), 320), (masks.SlidingWindow(17), 128)])
def test_cudnn_matches_reference_on_gpu(mask, T):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in
               ((2, T, 8, 64), (2, 256, 2, 64), (2, 256, 2, 64)))

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask=mask, impl=impl).astype(jnp.float32) ** 2)

    chosen = dispatch.choose_impl(Request(q.shape, k.shape, q.dtype, mask, *dispatch.platform_of(q)))
    assert chosen == ("pallas" if isinstance(mask, masks.SlidingWindow) else "cudnn")
    pairs = [(attention(q, k, v, mask=mask, impl="cudnn"), reference_attention(q, k, v, mask=mask))]
    pairs += zip(jax.grad(loss("cudnn"), (0, 1, 2))(q, k, v), jax.grad(loss("reference"), (0, 1, 2))(q, k, v))
    for got, expected in pairs:
        got, expected = np.asarray(got.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32))
        np.testing.assert_allclose(got, expected, atol=0.02 * np.abs(expected).max(), rtol=0)
