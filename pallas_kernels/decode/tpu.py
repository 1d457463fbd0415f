"""The Pallas Mosaic TPU backend of decode_attention: split-K over the KV cache.

Grid (B, Hkv, num_splits, steps), the last axis walking one split's share of the sequence's visited key blocks
(`attention.visit_plan`, `split_range`). The visit plan, the block tables and the layer are scalar-prefetched into
SMEM and the K/V index maps look the page up, so the pipeline DMAs only visited blocks; steps past the end of a split
keep its last block (nothing fetched) and compute nothing. The running max, sum and output of the online softmax live
in VMEM scratch across the steps, as in the flash forward (`pallas_kernels.tpu.flash`); the last step writes the
split's normalised output and lse, and `attention.combine` merges the splits.

The cache is read in place: [layers, pages, page_size, Hkv, D] viewed as [layers, pages, page_size, Hkv·D] (a free
reshape), a K block being (block_k, D) of the layer's page at column block h, so D must fill whole 128-lane tiles
(D % 128 == 0). One program serves the G query heads (and T tokens) of kv head h as a [rows, D] × [D, block_k]
product. V rows before the start and at or past the length are zeroed on the blocks holding them, so what lies there
(NaN) never reaches the output.

After jax.experimental.pallas.ops.tpu.paged_attention (block tables in SMEM, page looked up by the index map).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode import attention
from pallas_kernels.flash import block_math

HEAD_DIMS = (128, 256)
LANES = 128
LARGEST_BLOCK_K = 512  # a grid step costs ~0.35 us: 512 keys × D 128 × K and V in bfloat16 are 256 KiB per step
block_k_rule = "tpu key blocks are multiples of 8 (the sublane tile) dividing the page size"
PREFETCH = ("length", "start", "count", "sink_first", "sink_blocks", "window_first", "block_tables", "layer")


def default_block_k(problem: attention.DecodeProblem) -> int | None:
    return attention.largest_block(problem.page_size, LARGEST_BLOCK_K, 8, power_of_two=False)


def default_num_splits(problem: attention.DecodeProblem) -> int:
    """One TensorCore walks the grid in order, so splits only help to feed both cores of a megacore chip."""
    return 1 if problem.batch * problem.num_kv_heads >= 2 else min(2, problem.max_visits)


def unsupported_reason(problem: attention.DecodeProblem) -> str | None:
    if problem.head_dim not in HEAD_DIMS:
        return (f"the tpu decode kernel takes head dims {HEAD_DIMS} (a head's K block is a column block of the "
                f"[.., Hkv·D] cache rows and must fill 128 lanes), got {problem.head_dim}")
    if problem.block_k % 8:
        return f"{block_k_rule}, got block_k={problem.block_k}"
    if problem.dtype == "float16" and not problem.interpret:
        return ("float16 is not compiled for TPU (no float16 matrix unit): cast to bfloat16, or run with "
                "interpret=True")
    return None


def padded_rows(problem: attention.DecodeProblem) -> int:
    tile = 8 if problem.dtype == "float32" else 16
    return -(-problem.rows // tile) * tile


def _dot(problem: attention.DecodeProblem, a, b, contract):
    """a·b in float32, contracting dim contract[0] of a with contract[1] of b: (1, 0) a@b, (1, 1) a@bᵀ."""
    precision = jax.lax.Precision.HIGHEST if problem.dtype == "float32" else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _visit(problem: attention.DecodeProblem, prefetch, b, split, step):
    """(visit index this step reads, clamped into the split's range; whether it computes)."""
    start, end = attention.split_range(prefetch["count"][b], split, problem.num_splits)
    return jnp.maximum(jnp.minimum(start + step, end - 1), 0), start + step < end


def _kv_block_index(problem: attention.DecodeProblem, b, h, split, step, *refs):
    prefetch = dict(zip(PREFETCH, refs))
    n, _ = _visit(problem, prefetch, b, split, step)
    kv_start = attention.visited_block(n, prefetch["sink_first"][b], prefetch["sink_blocks"][b],
                                       prefetch["window_first"][b]) * problem.block_k
    page = jnp.clip(prefetch["block_tables"][b, kv_start // problem.page_size], 0, problem.num_pages - 1)
    return prefetch["layer"][0], page, (kv_start % problem.page_size) // problem.block_k, h


def _kernel(*refs, problem: attention.DecodeProblem):
    names = (*PREFETCH, "q", "k", "v", "out", "lse", "m", "l", "acc")
    refs = dict(zip(names, refs))
    b, split, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    bk = problem.block_k
    length, start = refs["length"][b], refs["start"][b]
    n, computes = _visit(problem, refs, b, split, step)
    kv_start = attention.visited_block(n, refs["sink_first"][b], refs["sink_blocks"][b], refs["window_first"][b]) * bk

    @pl.when(step == 0)
    def _init():
        refs["acc"][...] = jnp.zeros_like(refs["acc"])
        refs["l"][...] = jnp.zeros_like(refs["l"])
        refs["m"][...] = jnp.full_like(refs["m"], -jnp.inf)

    def body(straddles: bool):
        v = refs["v"][...]
        if straddles:  # the block holding the start or key L−1: what lies outside may be NaN, and 0 · NaN is NaN
            v_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where((v_pos >= start) & (v_pos < length), v, jnp.zeros_like(v))
        qk = _dot(problem, refs["q"][...], refs["k"][...], (1, 1))
        query_pos = attention.query_positions(problem, length, jax.lax.broadcasted_iota(jnp.int32, qk.shape, 0))
        key_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, qk.shape, 1)
        scores = jnp.where(attention.allowed(problem, query_pos, key_pos, start),
                           qk * (problem.scale * block_math.LOG2_E), -jnp.inf)
        m_prev, l_prev = refs["m"][:, :1], refs["l"][:, :1]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that saw nothing stays at m = -inf, l = 0
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(scores - m_safe)
        refs["m"][...] = jnp.broadcast_to(m_next, refs["m"].shape)
        refs["l"][...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True), refs["l"].shape)
        refs["acc"][...] = alpha * refs["acc"][...] + _dot(problem, p.astype(v.dtype), v, (1, 0))

    straddles = (kv_start < start) | (kv_start + bk > length)
    pl.when(computes & straddles)(functools.partial(body, True))
    pl.when(computes & jnp.logical_not(straddles))(functools.partial(body, False))

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        total = refs["l"][...]
        refs["out"][...] = refs["acc"][...] / jnp.where(total[:, :1] > 0, total[:, :1], 1.0)
        refs["lse"][...] = block_math.softmax_lse(refs["m"][...], total)


def partials(problem: attention.DecodeProblem, q, k_cache, v_cache, layer, block_tables, visits):
    """q [B, Hkv, rows, D] over layer layer[0] of the caches → out [B, Hkv, splits, rows, D] and lse [B, Hkv, splits,
    rows], float32."""
    B, Hkv, rows, D = q.shape
    splits, bk = problem.num_splits, problem.block_k
    steps = -(-problem.max_visits // splits)
    flat = (problem.num_layers, problem.num_pages, problem.page_size, Hkv * D)
    kv_spec = pl.BlockSpec((None, None, bk, D), functools.partial(_kv_block_index, problem))
    prefetch = {**visits, "block_tables": block_tables, "layer": layer}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(PREFETCH), grid=(B, Hkv, splits, steps),
        in_specs=[pl.BlockSpec((None, None, rows, D), lambda b, h, s, t, *_: (b, h, 0, 0)), kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, s, t, *_: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows, LANES), lambda b, h, s, t, *_: (b, h, s, 0, 0))],
        scratch_shapes=[pltpu.VMEM((rows, LANES), jnp.float32), pltpu.VMEM((rows, LANES), jnp.float32),
                        pltpu.VMEM((rows, D), jnp.float32)])
    out, lse = pl.pallas_call(
        functools.partial(_kernel, problem=problem), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, splits, rows, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, splits, rows, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if problem.interpret else False, name="decode_attention_split_k",
    )(*(prefetch[name] for name in PREFETCH), q, k_cache.reshape(flat), v_cache.reshape(flat))
    return out, lse[..., 0]


def decode(problem: attention.DecodeProblem, q, k_cache, v_cache, layer, lengths, starts, block_tables):
    return attention.split_k_decode(problem, q, k_cache, v_cache, layer, lengths, starts, block_tables,
                                    partials=partials, rows=padded_rows(problem))
