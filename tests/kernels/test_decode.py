"""pallas_kernels.decode_attention: every backend against a naive numpy oracle written here (float64 loops over
sequence, token and head), on contiguous and paged caches, MHA and GQA, lengths 0, 1, off the block grid and full,
NaN past every length, windows and sinks, several new tokens, left-padded caches (NaN before every start), bfloat16,
one layer of a stacked cache; and the visit plan, the lowering for GPU and TPU, and the argument checks.

Interpret-mode classes run the Pallas kernels on CPU (make test); the compiled ones run where the device is present.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flash_test_base import INTERPRET_COMPILER_OPTIONS
from pallas_kernels import decode_attention
from pallas_kernels.decode import attention

F32_TOLERANCE = 2e-5  # float32 kernels against the float64 oracle
BF16_TOLERANCE = 3e-2  # bfloat16 inputs (the oracle sees the same rounded values), float32 accumulation
B, S, HKV = 4, 128, 2
LENGTHS = (0, 1, 45, S)  # empty, one key, off the block grid, the full cache
HEADS = {"mha": 2, "gqa": 8}  # Hq over Hkv = 2: groups of 1 and 4


def numpy_decode(q, k, v, lengths, *, starts=None, sinks=0, window=None, scale=None):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] contiguous → [B, T, Hq, D] float64, key by key; sequence b's keys from
    column starts[b] (default 0)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    Bq, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    starts = np.zeros(Bq, np.int32) if starts is None else starts
    out = np.zeros(q.shape)
    for b in range(Bq):
        start = int(starts[b])
        for t in range(T):
            i = int(lengths[b]) - T + t
            keys = [j for j in range(start, min(int(lengths[b]), i + 1))
                    if window is None or i - j < window or j - start < sinks]
            if not keys:
                continue
            for h in range(Hq):
                logits = k[b, keys, h // group] @ q[b, t, h] * scale
                weights = np.exp(logits - logits.max())
                out[b, t, h] = weights / weights.sum() @ v[b, keys, h // group]
    return out


def _inputs(Hq, *, D=64, T=None, dtype=jnp.float32, lengths=LENGTHS, seed=0):
    """q ([B, Hq, D], or [B, T, Hq, D] when T is given), k, v [B, S, Hkv, D] with NaN from each length on."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, Hq, D) if T is None else (B, T, Hq, D))
    k, v = rng.normal(size=(B, S, HKV, D)), rng.normal(size=(B, S, HKV, D))
    q, k, v = (np.array(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))  # as the kernels see them
    for b, length in enumerate(lengths):
        k[b, length:], v[b, length:] = np.nan, np.nan
    return q, k, v, np.asarray(lengths, np.int32)


def _nan_where_unseen(k, v, lengths, *, starts=(0,) * B, num_new=1, sinks=0, window=None, block=16):
    """NaN in every key block of k, v [B, S, Hkv, D] (in place) that none of the num_new queries may see, which a
    kernel that loaded it would spread through 0 · NaN."""
    for b, (length, start) in enumerate(zip(lengths, starts)):
        for block_start in range(0, S, block):
            keys = np.arange(block_start, block_start + block)
            near = True if window is None else (length - num_new - keys < window) | (keys - start < sinks)
            if not np.any((keys >= start) & (keys < length) & near):
                k[b, block_start:block_start + block], v[b, block_start:block_start + block] = np.nan, np.nan


def _paged(cache, lengths, page_size, seed=1, starts=(0,) * B):
    """The contiguous cache [B, S, Hkv, D] as pages [B·S/page_size + 2, page_size, Hkv, D] in a random order, two
    spare pages of NaN, and the block table; table entries of pages past a length or before a start point far out of
    range."""
    rng = np.random.default_rng(seed)
    per_sequence = S // page_size
    num_pages = B * per_sequence + 2
    order = rng.permutation(num_pages)[:B * per_sequence].reshape(B, per_sequence)
    pages = np.full((num_pages, page_size, *cache.shape[2:]), np.nan, cache.dtype)
    for b in range(B):
        for p in range(per_sequence):
            pages[order[b, p]] = cache[b, p * page_size:(p + 1) * page_size]
    page_start = np.arange(per_sequence)[None] * page_size
    used = (page_start < np.asarray(lengths)[:, None]) & (page_start + page_size > np.asarray(starts)[:, None])
    return pages, np.where(used, order, 1 << 20).astype(np.int32)


def _as(x, dtype):
    return jnp.asarray(x, jnp.float32).astype(dtype)


class DecodeTests:
    backend: str = ""
    interpret: bool = True
    head_dim = 64
    kernel_options = {"block_k": 16, "num_splits": 3}  # 8 blocks of the full cache, 3 uneven splits

    def attend(self, **kwargs):
        """decode_attention(q, k, v, lengths, **arrays) under jit, with kwargs static and the class's kernel options
        unless given: the kernel and the ops around it compile as one program (in interpret mode with the flash
        tests' INTERPRET_COMPILER_OPTIONS), once for every call of the result."""
        options = {} if self.backend == "reference" else self.kernel_options
        kwargs = {**options, **kwargs}
        return jax.jit(lambda q, k, v, lengths, **arrays: decode_attention(
            q, k, v, lengths, backend=self.backend, interpret=self.interpret, **arrays, **kwargs),
            compiler_options=INTERPRET_COMPILER_OPTIONS if self.interpret else None)

    def decode(self, q, k, v, lengths, dtype=jnp.float32, **kwargs):
        arrays = {name: jnp.asarray(kwargs.pop(name), jnp.int32) for name in ("starts", "block_tables")
                  if kwargs.get(name) is not None}
        return self.attend(**kwargs)(_as(q, dtype), _as(k, dtype), _as(v, dtype), jnp.asarray(lengths), **arrays)

    def check(self, out, expected, tolerance=F32_TOLERANCE):
        out = np.asarray(jnp.asarray(out).astype(jnp.float32))
        assert np.all(np.isfinite(out)), "NaN past a length (or in a skipped block) reached the output"
        np.testing.assert_allclose(out, expected, atol=tolerance, rtol=tolerance)

    @pytest.mark.parametrize("heads", sorted(HEADS))
    def test_contiguous_and_paged_caches(self, heads):
        q, k, v, lengths = _inputs(HEADS[heads], D=self.head_dim)
        out = self.decode(q, k, v, lengths)
        self.check(out, numpy_decode(q[:, None], k, v, lengths)[:, 0])
        assert np.all(np.asarray(out[0]) == 0), "a sequence of length 0 must give 0"
        (k_pages, block_tables), (v_pages, _) = _paged(k, lengths, 32), _paged(v, lengths, 32)
        paged = self.decode(q, k_pages, v_pages, lengths, block_tables=jnp.asarray(block_tables))
        np.testing.assert_array_equal(np.asarray(paged), np.asarray(out), err_msg="paged != contiguous")

    @pytest.mark.parametrize("sinks,window", [(0, 20), (5, 20)])
    def test_window_and_sinks(self, sinks, window):
        """Lengths shorter than the window and than the sinks too; NaN in every key block no query may see, which a
        kernel that loaded it would spread through 0 · NaN."""
        lengths = (3, 17, 45, S)
        q, k, v, lengths = _inputs(HEADS["gqa"], D=self.head_dim, lengths=lengths)
        _nan_where_unseen(k, v, lengths, sinks=sinks, window=window)
        out = self.decode(q, k, v, lengths, sinks=sinks, window=window)
        self.check(out, numpy_decode(q[:, None], k, v, lengths, sinks=sinks, window=window)[:, 0])

    def test_several_new_tokens(self):
        """q [B, T, Hq, D]: T = 3 tokens causal among themselves, a window and sinks, and a sequence shorter than T."""
        q, k, v, lengths = _inputs(HEADS["gqa"], D=self.head_dim, T=3, lengths=(2, 17, 45, S))
        out = self.decode(q, k, v, lengths, sinks=2, window=20, scale=0.3)
        self.check(out, numpy_decode(q, k, v, lengths, sinks=2, window=20, scale=0.3))

    @pytest.mark.parametrize("num_new,sinks,window,starts", [
        (1, 0, None, (20, 5, 30, 60)), (1, 5, 20, (20, 5, 30, 60)), (3, 2, 20, (20, 16, 30, 60))])
    def test_left_padded_cache(self, num_new, sinks, window, starts):
        """starts: a start past its length (no keys, 0), inside the first block, past the first block, and (sinks 5)
        sinks straddling two blocks before the window; T = 3 with a start after the first tokens, which see nothing.
        NaN before every start and in every block no query may see; the paged cache gives the contiguous answer."""
        lengths = (3, 17, 45, S)
        q, k, v, lengths = _inputs(HEADS["gqa"], D=self.head_dim, T=None if num_new == 1 else num_new, lengths=lengths)
        for b, start in enumerate(starts):
            k[b, :start], v[b, :start] = np.nan, np.nan
        _nan_where_unseen(k, v, lengths, starts=starts, num_new=num_new, sinks=sinks, window=window)
        options = dict(starts=starts, sinks=sinks, window=window)
        out = self.decode(q, k, v, lengths, **options)
        tokens = q if num_new > 1 else q[:, None]
        expected = numpy_decode(tokens, k, v, lengths, **options)
        self.check(out, expected if num_new > 1 else expected[:, 0])
        assert np.all(np.asarray(out[0]) == 0), "a sequence starting past its length must give 0"
        (k_pages, block_tables), (v_pages, _) = (_paged(x, lengths, 32, starts=starts) for x in (k, v))
        paged = self.decode(q, k_pages, v_pages, lengths, block_tables=jnp.asarray(block_tables), **options)
        np.testing.assert_array_equal(np.asarray(paged), np.asarray(out), err_msg="paged != contiguous")

    def test_bfloat16(self):
        q, k, v, lengths = _inputs(HEADS["gqa"], D=self.head_dim, dtype=jnp.bfloat16)
        out = self.decode(q, k, v, lengths, dtype=jnp.bfloat16)
        assert out.dtype == jnp.bfloat16
        self.check(out, numpy_decode(q[:, None], k, v, lengths)[:, 0], tolerance=BF16_TOLERANCE)

    @pytest.mark.parametrize("paged,sinks,window", [(False, 0, None), (True, 5, 20)])
    def test_layer_of_a_stacked_cache(self, paged, sinks, window):
        """Caches [3, ..] of three different layers (left-padded) with layer=l give exactly the answer of k[l], v[l],
        l an int and, under jit, traced (clipped: layer 7 is layer 2). Each compiled call serves every layer it can."""
        lengths, starts = (3, 17, 45, S), (20, 5, 30, 60)
        q, _, _, lengths = _inputs(HEADS["gqa"], D=self.head_dim, lengths=lengths)
        k, v = (np.stack(x) for x in zip(*(_inputs(HEADS["gqa"], D=self.head_dim, lengths=lengths, seed=seed)[1:3]
                                            for seed in range(3))))
        for b, start in enumerate(starts):
            k[:, b, :start], v[:, b, :start] = np.nan, np.nan
        arrays = dict(starts=jnp.asarray(starts, jnp.int32))
        if paged:
            arrays["block_tables"] = jnp.asarray(_paged(k[0], lengths, 32, starts=starts)[1])
            k, v = (np.stack([_paged(layer, lengths, 32, starts=starts)[0] for layer in x]) for x in (k, v))
        q, k, v, lengths = (jnp.asarray(x) for x in (q, k, v, lengths))
        one_layer = self.attend(sinks=sinks, window=window)
        expected = {l: np.asarray(one_layer(q, k[l], v[l], lengths, **arrays)) for l in (0, 2)}
        assert not np.array_equal(expected[0], expected[2])
        traced = self.attend(sinks=sinks, window=window)
        for l in (0, 2):
            np.testing.assert_array_equal(
                np.asarray(self.attend(sinks=sinks, window=window, layer=l)(q, k, v, lengths, **arrays)), expected[l])
            np.testing.assert_array_equal(np.asarray(traced(q, k, v, lengths, layer=jnp.int32(l), **arrays)),
                                          expected[l])
        np.testing.assert_array_equal(np.asarray(traced(q, k, v, lengths, layer=jnp.int32(7), **arrays)), expected[2])

    def test_num_splits_do_not_change_the_answer(self):
        if self.backend == "reference":
            pytest.skip("the reference has no splits")
        q, k, v, lengths = _inputs(HEADS["gqa"], D=self.head_dim)
        one, many = (self.decode(q, k, v, lengths, num_splits=n) for n in (1, 7))
        np.testing.assert_allclose(np.asarray(one), np.asarray(many), atol=1e-6, rtol=1e-6)


class TestReference(DecodeTests):
    backend = "reference"
    interpret = False


class TestTritonInterpret(DecodeTests):
    backend = "triton"


class TestTpuInterpret(DecodeTests):
    backend = "tpu"
    head_dim = 128  # the tpu kernel reads a head as a 128-lane column block of the cache rows


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU")
class TestTritonGPU(DecodeTests):
    backend = "triton"
    interpret = False


@pytest.mark.skipif(jax.devices()[0].platform != "tpu", reason="needs a TPU")
class TestTpuCompiled(DecodeTests):
    backend = "tpu"
    interpret = False
    head_dim = 128


@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("sinks,window,num_new", [(0, None, 1), (0, 20, 1), (5, 20, 1), (40, 10, 1), (3, 7, 3),
                                                  (0, 1, 1), (16, 16, 1)])
def test_visit_plan_covers_exactly_the_blocks_with_a_visible_key(sinks, window, num_new, left_padded):
    """The blocks the kernels visit (each once, split by split, at most max_visits) are those holding a key some query
    may see (the module docstring's rule); left-padded, for every length and starts negative (clipped to 0), at and
    inside blocks, and at and past the length."""
    block_k, num_splits = 16, 3
    problem, _ = attention.plan((B, num_new, 8, 64), (B, S, HKV, 64), jnp.float32, left_padded=left_padded,
                                sinks=sinks, window=window, block_k=block_k, num_splits=num_splits, backend="triton",
                                interpret=True)
    start_options = (-3, 0, 1, 5, 16, 24, 31, 60) if left_padded else (0,)
    pairs = [(length, start) for length in range(S + 1)
             for start in sorted({*start_options, length - 1, length, length + 4} if left_padded else start_options)]
    lengths, starts = (np.asarray(x, np.int32) for x in zip(*pairs))
    problem = attention.dataclasses.replace(problem, batch=len(lengths))
    plan = {name: np.asarray(x)
            for name, x in attention.visit_plan(problem, jnp.asarray(lengths), jnp.asarray(starts)).items()}
    for b, (length, start) in enumerate(pairs):
        visited = []
        for split in range(num_splits):
            begin, end = (int(x) for x in attention.split_range(plan["count"][b], split, num_splits))
            visited += [int(attention.visited_block(n, plan["sink_first"][b], plan["sink_blocks"][b],
                                                    plan["window_first"][b])) for n in range(begin, end)]
        s = min(max(start, 0), length)
        i = np.arange(length - num_new, length)[:, None]
        j = np.arange(S)[None]
        seen = (s <= j) & (j <= i)
        if window is not None:
            seen &= (i - j < window) | (j - s < sinks)
        expected = sorted({int(key) // block_k for key in np.nonzero(seen.any(0))[0]})
        assert visited == expected, f"length {length}, start {start}"
        assert len(visited) <= problem.max_visits


def test_default_splits_fill_the_gpu():
    """B·Hkv·splits >= 2 × the SM count (off a GPU an H100's 132) when the cache has the blocks, else one per block."""
    device = jax.devices()[0]
    cores = (device.core_count if device.platform == "gpu" else None) or 132
    problem, _ = attention.plan((1, 32, 128), (1, 65536, 8, 128), jnp.bfloat16, backend="triton", interpret=True)
    assert problem.num_splits * 8 >= 2 * cores
    problem, _ = attention.plan((1, 32, 128), (1, 64, 8, 128), jnp.bfloat16, backend="triton", interpret=True)
    assert problem.num_splits == problem.max_visits == 1


@pytest.mark.parametrize("layered", [False, True])
@pytest.mark.parametrize("platform,device_kind,backend,head_dim", [
    ("cuda", "NVIDIA H100 80GB HBM3", "triton", 64), ("tpu", "TPU v5 lite", "tpu", 128)])
def test_kernels_lower_for_their_devices(platform, device_kind, backend, head_dim, layered):
    """Pallas → Triton IR and Pallas → Mosaic lowering, on CPU through an abstract device: a paged, left-padded
    bfloat16 GQA call with several tokens, a window and sinks (what the interpret tests run but the lowering can
    refuse); layered, a traced layer of a [3, ..] cache, read in place (no dynamic slice outside the kernel)."""
    abstract = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1,
                                           platform="gpu" if platform == "cuda" else platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=abstract)
    cache = ((3,) if layered else ()) + (64, 128, 8, head_dim)
    shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((2, 3, 32, head_dim), jnp.bfloat16), (cache, jnp.bfloat16), (cache, jnp.bfloat16), ((2,), jnp.int32),
        ((2,), jnp.int32), ((2, 16), jnp.int32), ((), jnp.int32))]
    attend = jax.jit(lambda q, k, v, lengths, starts, tables, layer: decode_attention(
        q, k, v, lengths, layer=layer if layered else None, starts=starts, block_tables=tables, sinks=4, window=1000,
        num_splits=4, backend=backend))
    with jax.sharding.use_abstract_mesh(mesh):
        text = attend.trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert "decode_attention_split_k" in text
    assert "dynamic_slice" not in text


def _valid_call():
    q, k, v, lengths = _inputs(8)
    return dict(q=jnp.asarray(q), k_cache=jnp.asarray(k), v_cache=jnp.asarray(v), lengths=jnp.asarray(lengths))


BAD_CALLS = {
    "q_rank": (lambda c: c.update(q=c["q"][0]), ValueError, "q must be"),
    "too_many_tokens": (lambda c: c.update(q=jnp.zeros((B, 17, 8, 64))), ValueError, "T <= 16"),
    "cache_rank": (lambda c: c.update(k_cache=c["k_cache"][0]), ValueError, "k_cache must be"),
    "cache_rank_with_layer": (lambda c: c.update(layer=1), ValueError, r"k_cache must be \[num_layers"),
    "layers_without_layer": (lambda c: c.update(k_cache=c["k_cache"][None], v_cache=c["v_cache"][None]), ValueError,
                             "pass layer"),
    "layer_dtype": (lambda c: c.update(k_cache=c["k_cache"][None], v_cache=c["v_cache"][None],
                                       layer=jnp.float32(0)), ValueError, "layer must be"),
    "k_v_shapes": (lambda c: c.update(v_cache=c["v_cache"][:, :64]), ValueError, "k_cache and v_cache"),
    "head_dim": (lambda c: c.update(q=c["q"][..., :32]), ValueError, "head dim"),
    "heads": (lambda c: c.update(q=c["q"][:, :3]), ValueError, "Hq=3"),
    "cache_batch": (lambda c: c.update(k_cache=c["k_cache"][:2], v_cache=c["v_cache"][:2]), ValueError, "batch"),
    "dtype": (lambda c: c.update(q=c["q"].astype(jnp.bfloat16)), ValueError, "dtype"),
    "lengths_dtype": (lambda c: c.update(lengths=c["lengths"].astype(jnp.float32)), ValueError, "lengths"),
    "lengths_shape": (lambda c: c.update(lengths=c["lengths"][:2]), ValueError, "lengths"),
    "starts_dtype": (lambda c: c.update(starts=c["lengths"].astype(jnp.float32)), ValueError, "starts"),
    "starts_shape": (lambda c: c.update(starts=c["lengths"][:2]), ValueError, "starts"),
    "block_tables_dtype": (lambda c: c.update(block_tables=jnp.zeros((B, 4), jnp.float32)), ValueError,
                           "block_tables"),
    "block_tables_shape": (lambda c: c.update(block_tables=jnp.zeros((2, 4), jnp.int32)), ValueError,
                           "block_tables"),
    "window": (lambda c: c.update(window=0), ValueError, "window"),
    "sinks_without_window": (lambda c: c.update(sinks=4), ValueError, "sinks"),
    "negative_sinks": (lambda c: c.update(sinks=-1, window=8), ValueError, "sinks"),
    "num_splits": (lambda c: c.update(num_splits=0, backend="triton"), ValueError, "num_splits"),
    "block_k_vs_page": (lambda c: c.update(block_k=48, backend="triton"), ValueError, "block_k=48 must divide"),
    "block_k_power_of_two": (lambda c: c.update(block_k=8, backend="triton"), NotImplementedError,
                             "powers of two >= 16"),
    "backend": (lambda c: c.update(backend="cuda"), ValueError, "backend must be"),
    "reference_splits": (lambda c: c.update(num_splits=2), NotImplementedError, "no num_splits"),
    "triton_head_dim": (lambda c: c.update(q=c["q"][..., :48], k_cache=c["k_cache"][..., :48],
                                           v_cache=c["v_cache"][..., :48], backend="triton"),
                        NotImplementedError, "head dims"),
    "tpu_head_dim_64": (lambda c: c.update(backend="tpu"), NotImplementedError, "head dims"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_rejects_bad_arguments_naming_the_field(name):
    change, error, match = BAD_CALLS[name]
    call = {**_valid_call(), "backend": "reference", "interpret": True}
    change(call)
    with pytest.raises(error, match=match):
        decode_attention(**call)


def test_the_kernels_have_no_gradient_and_say_so():
    call = {**_valid_call(), "backend": "triton", "interpret": True}
    loss = lambda q: decode_attention(**{**call, "q": q}).astype(jnp.float32).sum()
    with pytest.raises(NotImplementedError, match="no gradient: it is for inference"):
        jax.grad(loss)(call["q"])
