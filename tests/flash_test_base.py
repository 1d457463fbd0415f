"""The tests every flash-attention backend passes: forward, lse and gradients against pallas_kernels.reference on every
mask, segment ids, grouped-query heads, q_offset, dtypes and head dims, and proof that empty blocks are never read.

A backend's test file subclasses `FlashAttentionTests` with `backend` set; `interpret = True` runs the kernels in
Pallas interpret mode on CPU (make test), `interpret = False` on the accelerator (skipped elsewhere). `dtype` is the
input dtype of the tests that take no dtype of their own (float32; a backend without float32 kernels runs them in
bfloat16 or float16, compared at LOW_TOLERANCE).

Sizes. Interpret mode compiles every kernel configuration anew and simulates every grid step (batch × heads ×
blocks), so the inputs are as small as what they test allows, measured in blocks of `block` positions (the kernels'
block edge, 32; 64 for a backend whose kernels take no smaller blocks): sequences of four blocks (full, partial and
empty blocks for every mask), masks and documents whose edges fall inside blocks (`suite_masks`, `_packed_segments`:
the values were chosen at 64 and scale with the block), one kv head shared by two query heads (a group of 2: query
head h reads kv head h // 2) and a batch of one unless the test packs documents. The per-head mask runs two kv heads
of two query heads each, so a query head's kv head is checked beyond the first.

Compilation. A check takes the kernels' forward, lse and gradients from one `jax.value_and_grad` under one jit (the
forward runs once; the kernels and the ops around them compile as one program, in interpret mode with
INTERPRET_COMPILER_OPTIONS), shared by the checks of a class with the same static arguments and shapes. The oracle
runs eagerly, its ops compiled once per shape for every test, and the comparisons run in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Softplus, flash_attention, flash_attention_backward, masks, reference_attention

F32_TOLERANCE = 5e-5  # float32 kernels against the float32 oracle (interpret mode computes exactly in float32)
LOW_TOLERANCE = {jnp.bfloat16: 3e-2, jnp.float16: 5e-3}  # inputs rounded to the dtype, products accumulated in f32
BLOCKS = 4  # query and key blocks a side of the suite's square problems
# Interpret mode runs a kernel as an XLA program on the CPU, whose compilation is most of a test's time: LLVM's
# optimisations off compile it faster, and a program that runs a few grid steps once does not miss them. (The
# values are those of the optimised program up to rounding, far inside the tolerances.)
INTERPRET_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _scaled(n: int, block: int) -> int:
    """n positions at 64-position blocks, at `block`-position blocks."""
    return n * block // 64


def _normal(shape, dtype=jnp.float32, seed=0) -> jax.Array:
    """Standard normal values drawn in numpy (jax.random would compile a sampler for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32)).astype(dtype)


def _inputs(B=1, T=256, S=256, Hq=2, Hkv=1, D=64, dtype=jnp.float32, seed=0):
    shapes = ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D))
    return tuple(_normal(shape, dtype, seed=(seed, n)) for n, shape in enumerate(shapes))


def _packed_segments(B: int, block: int = 64) -> jax.Array:
    """[B, BLOCKS · block]: documents of uneven lengths, and a padded tail in the second row."""
    T, n = BLOCKS * block, functools.partial(_scaled, block=block)
    rows = [[1] * n(100) + [2] * n(60) + [3] * (T - n(160)), [1] * n(30) + [2] * n(150) + [0] * (T - n(180))]
    return jnp.asarray(rows[:B], jnp.int32)


def _random_block_mask(block: int = 64, seed=0) -> masks.BlockMask:
    blocks = np.random.default_rng(seed).random((BLOCKS, BLOCKS)) < 0.5
    blocks[2, :] = False  # a query block that sees nothing
    blocks[:, 1] = False  # a key block nobody sees
    blocks[0, 0] = True
    return masks.BlockMask(blocks, block, block)


@functools.cache
def suite_masks(block: int) -> dict[str, masks.Mask]:
    """Every kind of mask, by name, over four blocks of `block` positions: at 64, a window of 40 (a band over the
    diagonal and the block below it), 4 sinks, chunks of 48 and S2 blocks of 32 (edges inside the blocks), keys 70
    and more behind (partial, then full blocks) and a random block mask with a query block that sees nothing and a
    key block nobody sees."""
    n = functools.partial(_scaled, block=block)
    return {
        "causal": masks.Causal(),
        "full": masks.Full(),
        "sliding_window": masks.SlidingWindow(n(40)),
        "sinks_window": masks.SinksAndWindow(n(4), n(40)),
        "chunked_local": masks.ChunkedLocal(n(48)),
        "s2_strided_heads": masks.StridedHeads(block=n(32), local_blocks=2, stride=2),
        "distant": masks.Distant(n(70)),
        "block_mask": _random_block_mask(block),
    }


MASK_NAMES = sorted(suite_masks(64))
MASK_HEADS = {"s2_strided_heads": (4, 2)}  # (Hq, Hkv) where not (2, 1): a per-head mask over two kv heads
# The block mask runs in test_empty_blocks_are_never_read, with NaN in the blocks it never reads.
CHECKED_MASKS = [name for name in MASK_NAMES if name != "block_mask"]


_COMPILED = {}  # FlashAttentionTests.kernels: (class, static arguments, options) → its jitted evaluation


def _masked_lse(lse):
    return jnp.where(jnp.isinf(lse), 0.0, lse)


def _numpy(x):
    """float32 numpy copies of an array or a tuple of them (compared in numpy: no op to compile per shape)."""
    return tuple(map(_numpy, x)) if isinstance(x, (tuple, list)) else np.asarray(x, np.float32)


def _assert_close_to_largest(a, b, tolerance, name):
    """a ≈ b relative to b's largest magnitude (at least 1): gradients, whose small entries carry no meaning."""
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a / scale, b / scale, atol=tolerance, rtol=tolerance, err_msg=name)


def _evaluate(attend, inputs, return_lse: bool, grads: bool, lse_in_loss: bool = True):
    """(out, lse or None, (dq, dk, dv) or None) of attend(q, k, v): the gradients are those of
    Σ out² (+ Σ sin(lse) over finite lse, unless not lse_in_loss: then lse has no cotangent), taken in the same pass
    as the forward."""
    def loss(q, k, v):
        result = attend(q, k, v)
        out, lse = result if return_lse else (result, None)
        value = jnp.sum(out.astype(jnp.float32) ** 2)
        if return_lse and lse_in_loss:
            value = value + jnp.sum(jnp.sin(_masked_lse(lse)))
        return value, (out, lse)

    if not grads:
        return (*loss(*inputs)[1], None)
    (_, (out, lse)), gradients = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*inputs)
    return out, lse, gradients


class FlashAttentionTests:
    backend: str = ""
    interpret: bool = True
    block = 32  # the suite's block edge (module docstring)
    low_precision_dtypes = (jnp.bfloat16, jnp.float16)
    head_dims = (64, 128, 256)
    supports_softplus = True
    supports_reweight = False
    dtype = jnp.float32  # inputs of every test but test_low_precision

    @property
    def block_sizes(self) -> BlockSizes | None:
        return BlockSizes(*(self.block,) * 6)

    @property
    def length(self) -> int:
        return BLOCKS * self.block

    @property
    def masks(self) -> dict[str, masks.Mask]:
        return suite_masks(self.block)

    def n(self, positions: int) -> int:
        """A length chosen at 64-position blocks, at this suite's block."""
        return _scaled(positions, self.block)

    def inputs(self, B=1, T=None, S=None, **kwargs):
        return _inputs(B=B, T=T or self.length, S=S or self.length, **{"dtype": self.dtype, **kwargs})

    def segments(self, B=2):
        return _packed_segments(B, self.block)

    @property
    def tolerance(self) -> float:
        return F32_TOLERANCE if jnp.dtype(self.dtype) == jnp.float32 else LOW_TOLERANCE[self.dtype]

    def attend(self, q, k, v, **kwargs):
        kwargs.setdefault("block_sizes", self.block_sizes)
        return flash_attention(q, k, v, backend=self.backend, interpret=self.interpret, **kwargs)

    def jit(self, f):
        """f under jit, in interpret mode with INTERPRET_COMPILER_OPTIONS (module docstring)."""
        return jax.jit(f, compiler_options=INTERPRET_COMPILER_OPTIONS if self.interpret else None)

    def kernels(self, return_lse: bool, grads: bool, lse_in_loss: bool = True, **kwargs):
        """_evaluate of self.attend(q, k, v, **kwargs) as a function of (q, k, v, arrays), the array arguments
        (segment ids) apart from the static ones, compiled once for every check of this class with the same static
        arguments and shapes (in one process)."""
        arrays = {name: value for name, value in kwargs.items() if isinstance(value, (jax.Array, np.ndarray))}
        static = tuple(sorted((name, value) for name, value in kwargs.items() if name not in arrays))
        key = (type(self), static, return_lse, grads, lse_in_loss)
        if key not in _COMPILED:
            _COMPILED[key] = self.jit(lambda q, k, v, arrays: _evaluate(
                lambda *a: self.attend(*a, return_lse=return_lse, **dict(static), **arrays), (q, k, v), return_lse,
                grads, lse_in_loss))
        return functools.partial(_COMPILED[key], arrays=arrays)

    def check(self, q, k, v, tolerance=None, grads=True, oracle_inputs=None, lse_in_loss=True, **kwargs):
        """Forward, lse (softmax) and gradients (with grads; of a loss on lse too unless not lse_in_loss) against the
        oracle with the same arguments, on oracle_inputs when given (q, k, v with other values where the kernels
        must not look). Returns ours: (out, lse or None, (dq, dk, dv) or None)."""
        tolerance = self.tolerance if tolerance is None else tolerance
        return_lse = kwargs.get("normalizer", "softmax") == "softmax"
        reference_kwargs = {k_: v_ for k_, v_ in kwargs.items() if k_ != "block_sizes"}
        ours = self.kernels(return_lse, grads, lse_in_loss, **kwargs)(q, k, v)
        theirs = _evaluate(lambda *a: reference_attention(*a, return_lse=return_lse, **reference_kwargs),
                           (q, k, v) if oracle_inputs is None else oracle_inputs, return_lse, grads, lse_in_loss)
        (out, lse, gradients), (expected, expected_lse, expected_gradients) = (
            [None if x is None else _numpy(x) for x in result] for result in (ours, theirs))
        assert np.all(np.isfinite(out)), "the forward gave NaN (read an empty block?)"
        np.testing.assert_allclose(out, expected, atol=tolerance, rtol=tolerance)
        if return_lse:
            np.testing.assert_array_equal(np.isinf(lse), np.isinf(expected_lse))
            np.testing.assert_allclose(*(np.where(np.isinf(x), 0.0, x) for x in (lse, expected_lse)), atol=tolerance,
                                       rtol=tolerance)
        if grads:
            for name, a, b in zip("dq dk dv".split(), gradients, expected_gradients):
                assert np.all(np.isfinite(a)), f"{name} is not finite (read an empty block?)"
                _assert_close_to_largest(a, b, tolerance, name)
        return ours

    @pytest.mark.parametrize("mask_name", CHECKED_MASKS)
    def test_mask_forward_lse_and_gradients(self, mask_name):
        Hq, Hkv = MASK_HEADS.get(mask_name, (2, 1))
        self.check(*self.inputs(Hq=Hq, Hkv=Hkv), mask=self.masks[mask_name])

    @pytest.mark.parametrize("mask_name", ["causal", "sliding_window"])
    def test_packed_documents_and_padding(self, mask_name):
        self.check(*self.inputs(B=2), mask=self.masks[mask_name], segment_ids=self.segments())

    def test_queries_at_an_offset_into_longer_keys(self):
        """The last half of the queries (two blocks) against all the keys (four)."""
        q, k, v = self.inputs(T=self.length // 2)
        offset = self.length // 2
        self.check(q, k, v, mask=masks.Causal(), q_offset=offset)
        self.check(q, k, v, mask=masks.SlidingWindow(self.n(100)), q_offset=offset)

    def test_multi_query_heads(self):
        self.check(*self.inputs(Hq=4, Hkv=1), mask=masks.SlidingWindow(self.n(70)))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_low_precision(self, dtype):
        if dtype not in self.low_precision_dtypes:
            pytest.skip(f"{self.backend} does not take {jnp.dtype(dtype).name}")
        q, k, v = self.inputs(dtype=dtype)
        self.check(q, k, v, tolerance=LOW_TOLERANCE[dtype], mask=masks.SlidingWindow(self.n(100)))

    @pytest.mark.parametrize("head_dim", [64, 128, 256])
    def test_head_dims(self, head_dim):
        """With the backend's default block sizes, which must fit the head dim (shared memory, VMEM): 128 queries
        and keys whatever the suite's block, as the defaults are capped at the lengths."""
        q, k, v = _inputs(T=128, S=128, Hq=2, Hkv=1, D=head_dim, dtype=self.dtype)
        self.check(q, k, v, mask=masks.Causal(), grads=head_dim == 256, block_sizes=BlockSizes())

    def test_softplus(self):
        if not self.supports_softplus:
            pytest.skip(f"{self.backend} has no softplus normaliser")
        q, k, v = self.inputs(B=2)
        self.check(q, k, v, mask=masks.Causal(), normalizer="softplus")
        self.check(q, k, v, mask=masks.SlidingWindow(self.n(70)), normalizer="softplus", segment_ids=self.segments())

    def test_softplus_reweighted(self):
        if not self.supports_reweight:
            pytest.skip(f"{self.backend} has no softplus re-weighting")
        q, k, v = self.inputs(B=2)
        normalizer = Softplus(reweight=True)
        self.check(q, k, v, mask=masks.Causal(), normalizer=normalizer)
        self.check(q, k, v, mask=masks.SlidingWindow(self.n(70)), normalizer=normalizer, segment_ids=self.segments())

    def test_empty_blocks_are_never_read(self):
        """The block mask (whole blocks only) against the oracle, with NaN in every key/value block nobody may see and
        in every query block that sees nothing: a kernel that loaded any of them into a product would return NaN
        (0 · NaN), so the forward, lse, dQ and dK/dV must be finite and equal the oracle's on zeros there. The loss
        leaves lse out, so the backward also runs without an lse cotangent (as for return_lse=False)."""
        b = self.block
        q, k, v = self.inputs()
        unseen = (slice(2 * b, 3 * b), slice(b, 2 * b), slice(b, 2 * b))  # query block 2; key and value block 1

        def fill(value):
            return tuple(x.at[:, rows].set(value) for x, rows in zip((q, k, v), unseen))

        out, _, _ = self.check(*fill(jnp.nan), oracle_inputs=fill(0.0), lse_in_loss=False,
                               mask=self.masks["block_mask"])
        assert np.all(np.asarray(out)[:, unseen[0]] == 0), "a query block that sees nothing must output 0"

    @pytest.mark.parametrize("mask_name", ["causal", "sliding_window"])
    def test_backward_with_the_statistics_of_more_keys(self, mask_name):
        """Keys split in two shards, as ring attention splits them: each shard's backward with the out and lse of
        attention over both gives its share of the full gradient (dq summed, dk/dv concatenated). The last two
        query blocks against four key blocks, two a shard."""
        half = self.length // 2
        q, k, v = self.inputs(B=2, T=half)
        mask, segment_ids = self.masks[mask_name], self.segments()
        full = dict(mask=mask, segment_ids=segment_ids[:, half:], kv_segment_ids=segment_ids, q_offset=half)
        (out, lse), vjp = jax.vjp(lambda *a: reference_attention(*a, return_lse=True, **full), q, k, v)
        dout = _normal(out.shape, self.dtype, seed=3)
        expected = vjp((dout, jnp.zeros_like(lse)))
        shards = self.jit(lambda q, k, v, out, lse, dout: [flash_attention_backward(
            q, k[:, s], v[:, s], out, lse, dout, mask=mask, segment_ids=segment_ids[:, half:],
            kv_segment_ids=segment_ids[:, s], q_offset=offset, backend=self.backend, interpret=self.interpret,
            block_sizes=self.block_sizes) for s, offset in ((slice(0, half), half), (slice(half, None), 0))])(
            q, k, v, out, lse, dout)
        (dq0, dk0, dv0), (dq1, dk1, dv1) = _numpy(shards)
        ours = (dq0 + dq1, np.concatenate([dk0, dk1], 1), np.concatenate([dv0, dv1], 1))
        for name, a, b in zip("dq dk dv".split(), ours, _numpy(expected)):
            _assert_close_to_largest(a, b, self.tolerance, name)

    def test_rejects_what_it_cannot_serve(self):
        q, k, v = self.inputs()
        if not self.supports_reweight:
            with pytest.raises(NotImplementedError, match="reweight"):
                self.attend(q, k, v, normalizer=Softplus(reweight=True))
        cut = self.length - self.block // 2  # longer than a block, not a multiple of one
        with pytest.raises(ValueError, match="block sizes must divide"):
            self.attend(q[:, :cut], k[:, :cut], v[:, :cut], block_sizes=BlockSizes(*(self.block,) * 6))
