"""The tests every flash-attention backend passes: forward, lse and gradients against pallas_kernels.reference on every
mask, segment ids, grouped-query heads, q_offset, dtypes and head dims, and proof that empty blocks are never read.

A backend's test file subclasses `FlashAttentionTests` with `backend` set; `interpret = True` runs the kernels in
Pallas interpret mode on CPU (make test), `interpret = False` on the accelerator (skipped elsewhere). `dtype` is the
input dtype of the tests that take no dtype of their own (float32; a backend without float32 kernels runs them in
bfloat16 or float16, compared at LOW_TOLERANCE).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Softplus, flash_attention, flash_attention_backward, masks, reference_attention

F32_TOLERANCE = 5e-5  # float32 kernels against the float32 oracle (interpret mode computes exactly in float32)
LOW_TOLERANCE = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}  # inputs rounded to the dtype, products accumulated in f32


def _inputs(B=1, T=256, S=256, Hq=4, Hkv=2, D=64, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, S, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, S, Hkv, D), jnp.float32).astype(dtype)
    return q, k, v


def _packed_segments(B: int, T: int) -> jax.Array:
    """Documents of uneven lengths, and a padded tail in the second row."""
    rows = [[1] * 100 + [2] * 60 + [3] * (T - 160), [1] * 30 + [2] * 150 + [0] * (T - 180)]
    return jnp.asarray(rows[:B], jnp.int32)


def _random_block_mask(seed=0) -> masks.BlockMask:
    blocks = np.random.default_rng(seed).random((4, 4)) < 0.5
    blocks[2, :] = False  # a query block that sees nothing
    blocks[:, 1] = False  # a key block nobody sees
    blocks[0, 0] = True
    return masks.BlockMask(blocks, 64, 64)


MASKS = {
    "causal": masks.Causal(),
    "full": masks.Full(),
    "sliding_window": masks.SlidingWindow(40),
    "sinks_window": masks.SinksAndWindow(4, 40),
    "chunked_local": masks.ChunkedLocal(48),
    "s2_strided_heads": masks.StridedHeads(block=32, local_blocks=2, stride=2),
    "distant": masks.Distant(70),
    "block_mask": _random_block_mask(),
}


def _masked_lse(lse):
    return jnp.where(jnp.isinf(lse), 0.0, lse)


def _loss(attend, return_lse):
    def loss(q, k, v):
        result = attend(q, k, v)
        if not return_lse:
            return jnp.sum(result.astype(jnp.float32) ** 2)
        out, lse = result
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(_masked_lse(lse)))
    return loss


class FlashAttentionTests:
    backend: str = ""
    interpret: bool = True
    block_sizes = BlockSizes(64, 64, 64, 64, 64, 64)
    low_precision_dtypes = (jnp.bfloat16, jnp.float16)
    head_dims = (64, 128, 256)
    supports_softplus = True
    supports_reweight = False
    dtype = jnp.float32  # inputs of every test but test_low_precision

    @property
    def tolerance(self) -> float:
        return F32_TOLERANCE if jnp.dtype(self.dtype) == jnp.float32 else LOW_TOLERANCE[self.dtype]

    def attend(self, q, k, v, **kwargs):
        kwargs.setdefault("block_sizes", self.block_sizes)
        return flash_attention(q, k, v, backend=self.backend, interpret=self.interpret, **kwargs)

    def check(self, q, k, v, tolerance=None, grads=True, **kwargs):
        tolerance = self.tolerance if tolerance is None else tolerance
        return_lse = kwargs.get("normalizer", "softmax") == "softmax"
        attend_kwargs = {**kwargs}
        reference_kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ != "block_sizes"}
        out, *lse = self.attend(q, k, v, return_lse=return_lse, **attend_kwargs) if return_lse else \
            (self.attend(q, k, v, **attend_kwargs),)
        expected, *expected_lse = reference_attention(q, k, v, return_lse=return_lse, **reference_kwargs) \
            if return_lse else (reference_attention(q, k, v, **reference_kwargs),)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tolerance,
                                   rtol=tolerance)
        if return_lse:
            np.testing.assert_array_equal(np.isinf(lse[0]), np.isinf(expected_lse[0]))
            np.testing.assert_allclose(_masked_lse(lse[0]), _masked_lse(expected_lse[0]), atol=tolerance,
                                       rtol=tolerance)
        if not grads:
            return
        ours = jax.grad(_loss(lambda *a: self.attend(*a, return_lse=return_lse, **attend_kwargs), return_lse),
                        (0, 1, 2))(q, k, v)
        theirs = jax.grad(_loss(lambda *a: reference_attention(*a, return_lse=return_lse, **reference_kwargs),
                                return_lse), (0, 1, 2))(q, k, v)
        for name, a, b in zip("dq dk dv".split(), ours, theirs):
            assert np.all(np.isfinite(np.asarray(a, np.float32))), name
            scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
            np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale,
                                       atol=tolerance, rtol=tolerance, err_msg=name)

    @pytest.mark.parametrize("mask_name", sorted(MASKS))
    def test_mask_forward_lse_and_gradients(self, mask_name):
        self.check(*_inputs(dtype=self.dtype), mask=MASKS[mask_name])

    @pytest.mark.parametrize("mask_name", ["causal", "sliding_window"])
    def test_packed_documents_and_padding(self, mask_name):
        q, k, v = _inputs(B=2, dtype=self.dtype)
        self.check(q, k, v, mask=MASKS[mask_name], segment_ids=_packed_segments(2, 256))

    def test_queries_at_an_offset_into_longer_keys(self):
        q, k, v = _inputs(T=128, S=256, dtype=self.dtype)
        self.check(q, k, v, mask=masks.Causal(), q_offset=128)
        self.check(q, k, v, mask=masks.SlidingWindow(100), q_offset=128)

    def test_multi_query_heads(self):
        self.check(*_inputs(Hq=4, Hkv=1, dtype=self.dtype), mask=masks.SlidingWindow(70))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_low_precision(self, dtype):
        if dtype not in self.low_precision_dtypes:
            pytest.skip(f"{self.backend} does not take {jnp.dtype(dtype).name}")
        q, k, v = _inputs(dtype=dtype)
        self.check(q, k, v, tolerance=LOW_TOLERANCE[dtype], mask=masks.SlidingWindow(100))

    @pytest.mark.parametrize("head_dim", [64, 128, 256])
    def test_head_dims(self, head_dim):
        """With the backend's default block sizes, which must fit the head dim (shared memory, VMEM)."""
        q, k, v = _inputs(T=128, S=128, Hq=2, Hkv=1, D=head_dim, dtype=self.dtype)
        self.check(q, k, v, mask=masks.Causal(), grads=head_dim == 256, block_sizes=BlockSizes())

    def test_softplus(self):
        if not self.supports_softplus:
            pytest.skip(f"{self.backend} has no softplus normaliser")
        q, k, v = _inputs(B=2, dtype=self.dtype)
        self.check(q, k, v, mask=masks.Causal(), normalizer="softplus")
        self.check(q, k, v, mask=masks.SlidingWindow(70), normalizer="softplus", segment_ids=_packed_segments(2, 256))

    def test_softplus_reweighted(self):
        if not self.supports_reweight:
            pytest.skip(f"{self.backend} has no softplus re-weighting")
        q, k, v = _inputs(B=2, dtype=self.dtype)
        normalizer = Softplus(reweight=True)
        self.check(q, k, v, mask=masks.Causal(), normalizer=normalizer)
        self.check(q, k, v, mask=masks.SlidingWindow(70), normalizer=normalizer, segment_ids=_packed_segments(2, 256))

    def test_empty_blocks_are_never_read(self):
        """NaN in every key/value block nobody may see, and in every query block that sees nothing: a kernel that
        loaded any of them into a product would return NaN (0 · NaN); the forward, dQ and dK/dV stay finite."""
        mask = _random_block_mask()
        q, k, v = _inputs(dtype=self.dtype)
        k = k.at[:, 64:128].set(jnp.nan)
        v = v.at[:, 64:128].set(jnp.nan)
        q = q.at[:, 128:192].set(jnp.nan)

        def loss(q, k, v):
            out = self.attend(q, k, v, mask=mask)
            return jnp.sum(jnp.where(jnp.isnan(out), 0.0, out) ** 2), out

        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
        assert np.all(np.isfinite(np.asarray(out))), "forward read an empty block"
        assert np.all(np.asarray(out[:, 128:192]) == 0), "a query block that sees nothing must output 0"
        for name, grad, rows in (("dq", grads[0], slice(0, 128)), ("dk", grads[1], slice(128, 256)),
                                 ("dv", grads[2], slice(128, 256))):
            assert np.all(np.isfinite(np.asarray(grad[:, rows]))), f"{name} read an empty block"

    @pytest.mark.parametrize("mask_name", ["causal", "sliding_window"])
    def test_backward_with_the_statistics_of_more_keys(self, mask_name):
        """Keys split in two shards, as ring attention splits them: each shard's backward with the out and lse of
        attention over both gives its share of the full gradient (dq summed, dk/dv concatenated)."""
        q, k, v = _inputs(B=2, T=128, S=256, dtype=self.dtype)
        mask, segment_ids = MASKS[mask_name], _packed_segments(2, 256)
        full = dict(mask=mask, segment_ids=segment_ids[:, 128:], kv_segment_ids=segment_ids, q_offset=128)
        (out, lse), vjp = jax.vjp(lambda *a: reference_attention(*a, return_lse=True, **full), q, k, v)
        dout = jax.random.normal(jax.random.key(3), out.shape, jnp.float32).astype(self.dtype)
        expected = vjp((dout, jnp.zeros_like(lse)))
        shards = [flash_attention_backward(
            q, k[:, s], v[:, s], out, lse, dout, mask=mask, segment_ids=segment_ids[:, 128:],
            kv_segment_ids=segment_ids[:, s], q_offset=offset, backend=self.backend, interpret=self.interpret,
            block_sizes=self.block_sizes) for s, offset in ((slice(0, 128), 128), (slice(128, 256), 0))]
        ours = (shards[0][0].astype(jnp.float32) + shards[1][0].astype(jnp.float32),
                jnp.concatenate([shards[0][1], shards[1][1]], 1), jnp.concatenate([shards[0][2], shards[1][2]], 1))
        for name, a, b in zip("dq dk dv".split(), ours, expected):
            scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
            np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b, np.float32) / scale,
                                       atol=self.tolerance, rtol=self.tolerance, err_msg=name)

    def test_rejects_what_it_cannot_serve(self):
        q, k, v = _inputs(dtype=self.dtype)
        if not self.supports_reweight:
            with pytest.raises(NotImplementedError, match="reweight"):
                self.attend(q, k, v, normalizer=Softplus(reweight=True))
        with pytest.raises(ValueError, match="block sizes must divide"):
            self.attend(q[:, :200], k[:, :200], v[:, :200], block_sizes=BlockSizes(64, 64, 64, 64, 64, 64))
