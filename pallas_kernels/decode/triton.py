"""The Pallas Triton backend of decode_attention: split-K over the KV cache, any CUDA GPU.

Grid (B, Hkv, num_splits). Program (b, h, s) holds the [rows, D] queries of kv head h (T new tokens × G query heads,
padded to a power of two >= 16 for tl.dot) and loops over its share of the sequence's visited key blocks
(`attention.visit_plan`, `split_range`): per block one page-table lookup, K and V [block_k, D] loaded once (rows
before the start or at or past the length masked to 0 in the load, so no padding is read), scores [rows, block_k]
masked by position, the online softmax of FlashAttention-2 in base 2. It writes its normalised output and lse;
`attention.combine` merges the splits. The cache stays in its [layers, pages, page_size, Hkv, D] layout: the BlockSpec
picks kv head h and the kernel indexes (layer, page, token) itself, so a layer of a stacked cache is read in place.

After jax.experimental.pallas.ops.gpu.decode_attention and paged_attention (split-K decoding in Pallas Triton).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode import attention
from pallas_kernels.flash import block_math

HEAD_DIMS = (64, 128, 256)
block_k_rule = "triton key blocks are powers of two >= 16 dividing the page size"
# Bytes of K plus V per key block: 32 KiB (bfloat16: block_k 128 at D 64, 64 at D 128), three of them in flight.
BLOCK_BYTES = 32 * 1024
NUM_STAGES = 3


def default_block_k(problem: attention.DecodeProblem) -> int | None:
    itemsize = jnp.dtype(problem.dtype).itemsize
    largest = max(16, BLOCK_BYTES // (2 * problem.head_dim * itemsize))
    return attention.largest_block(problem.page_size, largest, 16, power_of_two=True)


def default_num_splits(problem: attention.DecodeProblem) -> int:
    return attention.default_gpu_splits(problem)


def unsupported_reason(problem: attention.DecodeProblem) -> str | None:
    if problem.head_dim not in HEAD_DIMS:
        return f"the triton decode kernel takes head dims {HEAD_DIMS}, got {problem.head_dim}"
    bk = problem.block_k
    if bk < 16 or bk & (bk - 1):
        return f"{block_k_rule}, got block_k={bk}"
    return None


def padded_rows(problem: attention.DecodeProblem) -> int:
    return max(16, pl.next_power_of_2(problem.rows))


def _dot(problem: attention.DecodeProblem, a, b, *, trans_b=False):
    precision = jax.lax.Precision.HIGHEST if problem.dtype == "float32" else None
    return plgpu.dot(a, b, trans_b=trans_b, precision=precision)


def _kernel(q_ref, length_ref, start_ref, count_ref, sink_first_ref, sink_blocks_ref, window_first_ref, layer_ref,
            block_table_ref, k_ref, v_ref, out_ref, lse_ref, *, problem: attention.DecodeProblem):
    b, split = pl.program_id(0), pl.program_id(2)
    bk, rows = problem.block_k, q_ref.shape[0]
    layer, length, start = layer_ref[0], length_ref[b], start_ref[b]
    sink_first, sink_blocks, window_first = sink_first_ref[b], sink_blocks_ref[b], window_first_ref[b]
    begin, end = attention.split_range(count_ref[b], split, problem.num_splits)
    q = q_ref[...]
    query_pos = attention.query_positions(problem, length, jnp.arange(rows, dtype=jnp.int32))[:, None]
    offsets = jnp.arange(bk, dtype=jnp.int32)

    def step(n, carry):
        acc, m, l = carry
        kv_start = attention.visited_block(n, sink_first, sink_blocks, window_first) * bk
        page = block_table_ref[kv_start // problem.page_size]
        span = pl.ds(pl.multiple_of(kv_start % problem.page_size, bk), bk)
        key_pos = kv_start + offsets
        present = ((key_pos >= start) & (key_pos < length))[:, None]
        k = plgpu.load(k_ref.at[layer, page, span, :], mask=present, other=0.0)
        v = plgpu.load(v_ref.at[layer, page, span, :], mask=present, other=0.0)
        scores = _dot(problem, q, k, trans_b=True) * (problem.scale * block_math.LOG2_E)
        scores = jnp.where(attention.allowed(problem, query_pos, key_pos[None, :], start), scores, -jnp.inf)
        p, alpha, m, l = block_math.online_softmax(scores, m, l)
        return alpha[:, None] * acc + _dot(problem, p.astype(v.dtype), v), m, l

    acc, m, l = jax.lax.fori_loop(begin, end, step, (jnp.zeros((rows, problem.head_dim), jnp.float32),
                                                     jnp.full((rows,), -jnp.inf, jnp.float32),
                                                     jnp.zeros((rows,), jnp.float32)))
    out_ref[...] = acc / jnp.where(l > 0, l, 1.0)[:, None]
    lse_ref[...] = block_math.softmax_lse(m, l)


def _whole(array):
    return pl.BlockSpec(array.shape, lambda *_: (0,) * array.ndim)


def partials(problem: attention.DecodeProblem, q, k_cache, v_cache, layer, block_tables, visits):
    """q [B, Hkv, rows, D] over layer layer[0] of the caches → out [B, Hkv, splits, rows, D] and lse [B, Hkv, splits,
    rows], float32."""
    B, Hkv, rows, D = q.shape
    splits = problem.num_splits
    cache_spec = pl.BlockSpec((problem.num_layers, problem.num_pages, problem.page_size, None, D),
                              lambda b, h, s: (0, 0, 0, h, 0))
    scalars = [visits[name] for name in ("length", "start", "count", "sink_first", "sink_blocks", "window_first")]
    scalars.append(layer)
    in_specs = [pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
                *(_whole(x) for x in scalars),
                pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),
                cache_spec, cache_spec]
    out_shape = [jax.ShapeDtypeStruct((B, Hkv, splits, rows, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, splits, rows), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0)),
                 pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))]
    return pl.pallas_call(
        functools.partial(_kernel, problem=problem), grid=(B, Hkv, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=NUM_STAGES),
        interpret=problem.interpret, name="decode_attention_split_k",
    )(q, *scalars, block_tables, k_cache, v_cache)


def decode(problem: attention.DecodeProblem, q, k_cache, v_cache, layer, lengths, starts, block_tables):
    return attention.split_k_decode(problem, q, k_cache, v_cache, layer, lengths, starts, block_tables,
                                    partials=partials, rows=padded_rows(problem))
