"""`decode_attention`: the new token(s) of each sequence against its KV cache, split-K (flash-decoding).

One decoding step reads the whole cache once and computes little, so it is bound by memory bandwidth and needs
parallelism from the sequence axis as well: Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023) splits each sequence's
cached keys into `num_splits` chunks processed in parallel, each writing its partial output and log-sum-exp, and a
small combine merges them:

    out = Σ_s exp(lse_s − lse) · out_s,    lse = log Σ_s exp(lse_s)   (a split that saw nothing has lse_s = −inf).

Grid (batch, kv head, split): one program reads a key block once for all G = Hq / Hkv query heads of its group (and
all T new tokens), a [T·G, D] × [D, block_k] product, so grouped-query attention costs the memory traffic of Hkv heads.

Which keys count. Sequence b holds its valid tokens in columns s = starts[b] .. L−1, L = lengths[b] (a left-padded
cache: columns before s are padding; starts default to 0), the T new ones last, at L−T..L−1; query t sits at column
i = L − T + t and may see key column j iff

    s <= j <= i   and   (window is None  or  i − j < window  or  j − s < sinks)

(StreamingLLM's attention sinks, Xiao et al. 2023, the first `sinks` valid keys; LM-Infinite's Λ-shaped mask, Han et
al. 2023). Keys before s and at L and beyond are never used and may hold anything, NaN included; key blocks no query
may see (wholly before s, past L, or between the sinks and the window) are never loaded: each sequence's visited
blocks (`visit_plan`) are divided evenly among the splits.

Caches, BTHD like the rest of pallas_kernels:
    contiguous: k_cache, v_cache [B, S, Hkv, D]
    paged:      k_cache, v_cache [num_pages, page_size, Hkv, D] and block_tables int32 [B, max_pages], vLLM-style:
                logical page p of sequence b (tokens p·page_size ..) lives in physical page block_tables[b, p]; only
                the entries of pages holding visited keys are read.
A contiguous cache is handled as the paged one with a page per sequence (page_size S, block table [[0], [1], ..]).
With `layer`, both caches carry a leading layers axis, [num_layers, B, S, Hkv, D] or [num_layers, num_pages,
page_size, Hkv, D] (every layer's cache in one array, as a model scanned over its layers keeps it), and the call
attends over layer `layer` (an int32 scalar, may be traced; clipped to [0, num_layers)) exactly as if k_cache[layer],
v_cache[layer] had been passed. The kernels read that layer in place: slicing it out first would copy the layer's
whole cache each step (a read and a write), tripling the memory traffic of decoding. Without `layer` the cache is the
one layer of a [1, ..] stack (a free reshape).

Backends (`BACKENDS`): "triton" (Pallas Triton, any CUDA GPU), "tpu" (Pallas Mosaic TPU) and "reference" (pure jnp,
`pallas_kernels.decode.reference`, the oracle). "auto" picks the device's kernel. What a backend cannot serve raises
NotImplementedError naming the combination before any work; `interpret=True` runs the kernels in Pallas interpret
mode (on CPU in the tests).
"""

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("bfloat16", "float16", "float32")
MAX_NEW_TOKENS = 16  # T of q [B, T, Hq, D]: speculative / multi-token decoding, not prefill

# What each backend module provides: default_block_k(problem) (None: no block fits the pages, block_k_rule says
# why), default_num_splits(problem), unsupported_reason(problem) -> str | None, and decode(problem, q [B, T, Hq, D],
# k_cache, v_cache [num_layers, num_pages, page_size, Hkv, D], layer int32 [1] (in range), lengths, starts,
# block_tables) -> [B, T, Hq, D]; the kernels' decode is `split_k_decode`.
BACKEND_MODULES = {
    "triton": "pallas_kernels.decode.triton",
    "tpu": "pallas_kernels.decode.tpu",
    "reference": "pallas_kernels.decode.reference",
}
BACKENDS = tuple(BACKEND_MODULES)


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """Everything static about one call. The cache as pages: a contiguous cache is B pages of S tokens, one of
    num_layers layers (1 without `layer`)."""

    batch: int
    num_new: int  # T, new tokens per sequence
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_layers: int
    num_pages: int
    page_size: int
    max_pages: int  # pages per sequence (block table columns)
    paged: bool
    sinks: int
    window: int | None
    left_padded: bool  # starts given: the sinks may begin inside a key block
    scale: float
    block_k: int
    num_splits: int
    interpret: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def rows(self) -> int:
        """Query rows per kv head: T new tokens × G query heads, row t·G + g."""
        return self.num_new * self.group

    @property
    def capacity(self) -> int:
        """Tokens a sequence can hold."""
        return self.max_pages * self.page_size

    @property
    def max_visits(self) -> int:
        """A static bound on the key blocks any sequence visits."""
        blocks = self.capacity // self.block_k
        if self.window is None:
            return blocks
        offset = self.block_k - 1 if self.left_padded and self.sinks else 0  # sinks from a start inside a block
        sink_blocks = -(-(self.sinks + offset) // self.block_k)
        return min(blocks, sink_blocks + -(-(self.window + self.num_new - 1) // self.block_k) + 1)


def backend_module(name: str):
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKEND_MODULES[name])


def _auto_backend(interpret: bool) -> str:
    platform = jax.devices()[0].platform
    if platform == "tpu":
        return "tpu"
    if platform == "gpu" or interpret:
        return "triton"
    raise NotImplementedError(f"decode_attention has kernels for GPU and TPU; on {platform} pass interpret=True "
                              f"(Pallas interpret mode) or backend='reference'")


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check(q, k_cache, v_cache, lengths, layer, starts, block_tables, sinks, window, scale, num_splits, block_k):
    """ValueError naming the field for every malformed argument, before any work."""
    if np.ndim(q) not in (3, 4):
        raise ValueError(f"q must be [B, Hq, D] (one new token per sequence) or [B, T, Hq, D], got shape {_shape(q)}")
    if np.ndim(q) == 4 and not 1 <= q.shape[1] <= MAX_NEW_TOKENS:
        raise ValueError(f"q [B, T, Hq, D] takes T <= {MAX_NEW_TOKENS} new tokens (decoding, not prefill: use "
                         f"flash_attention for longer queries), got T={q.shape[1]}")
    B, Hq, D = q.shape[0], q.shape[-2], q.shape[-1]
    layout = "[num_pages, page_size, Hkv, D]" if block_tables is not None else "[B, S, Hkv, D]"
    if layer is not None:
        layout = f"[num_layers, {layout[1:]} (layer is given)"
        if isinstance(layer, bool) or not (isinstance(layer, (int, np.integer)) or (
                np.ndim(layer) == 0 and getattr(layer, "dtype", None) == jnp.int32)):
            raise ValueError(f"layer must be None, an int or an int32 scalar array, got "
                             f"{getattr(layer, 'dtype', type(layer).__name__)} {_shape(layer)}")
    rank = 4 if layer is None else 5
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if np.ndim(cache) != rank:
            raise ValueError(f"{name} must be {layout}, got shape {_shape(cache)}"
                             + (" (pass layer for a cache of every layer)" if np.ndim(cache) == 5 else ""))
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {k_cache.shape} and {v_cache.shape}")
    if k_cache.shape[-1] != D:
        raise ValueError(f"k_cache's head dim must be q's D={D}, got k_cache {k_cache.shape}")
    Hkv = k_cache.shape[-2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the cache's kv heads Hkv={Hkv}")
    if block_tables is None and k_cache.shape[-4] != B:
        raise ValueError(f"k_cache must be {layout} with q's batch B={B}, got {k_cache.shape} (pass "
                         f"block_tables for a paged cache)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or jnp.dtype(q.dtype).name not in DTYPES:
        raise ValueError(f"q, k_cache and v_cache must share one dtype of {', '.join(DTYPES)}; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if _shape(lengths) != (B,) or getattr(lengths, "dtype", None) != jnp.int32:
        raise ValueError(f"lengths must be int32 [B={B}] (valid cached tokens per sequence), got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {_shape(lengths)}")
    if starts is not None and (_shape(starts) != (B,) or getattr(starts, "dtype", None) != jnp.int32):
        raise ValueError(f"starts must be None or int32 [B={B}] (the first valid cache column of each left-padded "
                         f"sequence), got {getattr(starts, 'dtype', type(starts).__name__)} {_shape(starts)}")
    if block_tables is not None and (np.ndim(block_tables) != 2 or block_tables.shape[0] != B
                                     or block_tables.shape[1] < 1 or getattr(block_tables, "dtype", None) != jnp.int32):
        raise ValueError(f"block_tables must be int32 [B={B}, max_pages] (the physical page of each logical page), "
                         f"got {getattr(block_tables, 'dtype', type(block_tables).__name__)} {_shape(block_tables)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (the last `window` keys of each query count), got "
                         f"{window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, (int, np.integer)) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if sinks and window is None:
        raise ValueError(f"sinks={sinks} needs a window: without one every key counts already")
    if scale is not None and not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale)):
        raise ValueError(f"scale must be None (1/sqrt(D)) or a finite float, got {scale!r}")
    for name, value in (("num_splits", num_splits), ("block_k", block_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be None (the backend's default) or an int >= 1, got {value!r}")


def plan(q_shape, cache_shape, dtype, *, block_tables_shape=None, left_padded: bool = False, sinks: int = 0,
         window: int | None = None, scale: float | None = None, num_splits: int | None = None,
         block_k: int | None = None, backend: str = "auto", interpret: bool = False):
    """The static DecodeProblem of a call and the backend module that runs it; cache_shape [.., Hkv, D] with a leading
    num_layers when rank 5. Raises ValueError for a block_k that does not fit the pages, NotImplementedError (naming
    the combination) for what the backend cannot do."""
    if backend == "auto":
        backend = _auto_backend(interpret)
    implementation = backend_module(backend)
    B, Hq, D = q_shape[0], q_shape[-2], q_shape[-1]
    paged = block_tables_shape is not None
    num_layers = cache_shape[0] if len(cache_shape) == 5 else 1
    num_pages, page_size, Hkv = cache_shape[-4:-1]
    problem = DecodeProblem(
        batch=B, num_new=q_shape[1] if len(q_shape) == 4 else 1, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
        dtype=jnp.dtype(dtype).name, num_layers=num_layers, num_pages=num_pages, page_size=page_size,
        max_pages=block_tables_shape[1] if paged else 1, paged=paged, sinks=int(sinks),
        window=None if window is None else int(window), left_padded=bool(left_padded),
        scale=float(D ** -0.5 if scale is None else scale), block_k=0, num_splits=0, interpret=interpret)
    what = "page_size" if paged else "the cache length S"
    if block_k is None:
        block_k = implementation.default_block_k(problem)
        if block_k is None:
            raise NotImplementedError(f"decode_attention backend={backend!r} finds no key block size dividing "
                                      f"{what}={page_size}: {implementation.block_k_rule}")
    elif page_size % block_k:
        raise ValueError(f"block_k={block_k} must divide {what}={page_size} (a key block lies within one page)")
    problem = dataclasses.replace(problem, block_k=int(block_k))
    problem = dataclasses.replace(problem, num_splits=int(num_splits or implementation.default_num_splits(problem)))
    reason = implementation.unsupported_reason(problem)
    if reason is not None:
        raise NotImplementedError(f"decode_attention backend={backend!r} cannot run this call: {reason}")
    return problem, implementation


def default_gpu_splits(problem: DecodeProblem) -> int:
    """Enough programs to fill the GPU twice over, B·Hkv·splits >= 2 × SM count, but no more splits than blocks."""
    device = jax.devices()[0]
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    target = 2 * (cores or 132)  # H100's SM count off the GPU (interpret mode), to exercise the same split sizes
    return max(1, min(-(-target // (problem.batch * problem.num_kv_heads)), problem.max_visits))


def largest_block(page_size: int, largest: int, smallest: int, *, power_of_two: bool) -> int | None:
    """The largest block size in [smallest, largest] dividing page_size (powers of two, or multiples of `smallest`)."""
    candidates = [2 ** n for n in range(12, -1, -1)] if power_of_two else range(largest, 0, -smallest)
    return next((b for b in candidates if smallest <= b <= largest and page_size % b == 0), None)


def visit_plan(problem: DecodeProblem, lengths: jax.Array, starts: jax.Array) -> dict[str, jax.Array]:
    """int32 [B] arrays: `length`, lengths clipped to [0, capacity]; `start`, starts clipped to [0, length]; `count`,
    the key blocks sequence b visits (0 when start = length: no keys); and how the visit index n maps to a key block
    (`visited_block`): sink_first = start // block_k .. sink_first + sink_blocks − 1 (those holding the sinks, columns
    start .. start + sinks − 1, below window_first), then window_first, window_first + 1, .. up to the block holding
    key L−1, window_first holding column max(L − T − window + 1, start). Without a window every block from the start's
    to L−1's."""
    bk, T = problem.block_k, problem.num_new
    length = jnp.clip(lengths, 0, problem.capacity)
    start = jnp.clip(starts, 0, length)
    sink_first = start // bk
    num_blocks = (length + bk - 1) // bk
    if problem.window is None:
        window_first, sink_blocks = sink_first, jnp.zeros_like(length)
    else:
        window_first = jnp.maximum(length - T - problem.window + 1, start) // bk
        sinks_end = jnp.minimum(start + problem.sinks, length)
        sink_end_block = jnp.minimum((sinks_end + bk - 1) // bk, window_first)
        sink_blocks = jnp.where(sinks_end > start, sink_end_block - sink_first, 0)
    count = sink_blocks + jnp.where(start < length, num_blocks - window_first, 0)
    return {"length": length, "start": start, "count": count, "sink_first": sink_first, "sink_blocks": sink_blocks,
            "window_first": window_first}


def visited_block(n, sink_first, sink_blocks, window_first):
    """The key block of visit n (scalars; usable in kernels and index maps)."""
    return jnp.where(n < sink_blocks, sink_first + n, window_first + n - sink_blocks)


def split_range(count, split, num_splits: int):
    """Visits [start, end) of split `split`: each sequence's visits divided evenly among its splits."""
    per_split = (count + num_splits - 1) // num_splits
    start = split * per_split
    return start, jnp.minimum(start + per_split, count)


def query_positions(problem: DecodeProblem, length, row_ids):
    """Position L − T + t of each query row id, t = row // G (padding rows past T·G take the last token), counted by
    comparisons rather than a vector division."""
    token = sum(((row_ids >= t * problem.group).astype(jnp.int32) for t in range(1, problem.num_new)),
                jnp.zeros_like(row_ids))
    return length - problem.num_new + token


def allowed(problem: DecodeProblem, query_pos, key_pos, start):
    """Which keys each query may see, from broadcastable int32 columns and the sequence's start (the module
    docstring's rule)."""
    seen = (key_pos >= start) & (key_pos <= query_pos)
    if problem.window is not None:
        near = query_pos - key_pos < problem.window
        seen = seen & ((near | (key_pos - start < problem.sinks)) if problem.sinks else near)
    return seen


def _grouped_queries(problem: DecodeProblem, q, rows: int):
    """q [B, T, Hq, D] → [B, Hkv, rows, D], row t·G + g holding query head h·G + g of token t, zero-padded."""
    B, T, Hq, D = q.shape
    grouped = q.reshape(B, T, problem.num_kv_heads, problem.group, D).transpose(0, 2, 1, 3, 4)
    grouped = grouped.reshape(B, problem.num_kv_heads, T * problem.group, D)
    return jnp.pad(grouped, ((0, 0), (0, 0), (0, rows - T * problem.group), (0, 0)))


def _ungrouped(problem: DecodeProblem, out):
    """[B, Hkv, rows, D] → [B, T, Hq, D]."""
    B, Hkv, _, D = out.shape
    out = out[:, :, :problem.rows].reshape(B, Hkv, problem.num_new, problem.group, D)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, problem.num_new, problem.num_q_heads, D)


def combine(out, lse):
    """Merges the splits: out [B, Hkv, splits, rows, D] (each normalised over its own keys) and lse [B, Hkv, splits,
    rows] float32 → [B, Hkv, rows, D] float32; 0 where no split saw a key."""
    top = jnp.max(lse, axis=2, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # 0 for splits that saw nothing
    total = jnp.sum(weights, axis=2)
    merged = jnp.einsum("bhsr,bhsrd->bhrd", weights, out, precision=jax.lax.Precision.HIGHEST)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array, *,
                     layer: jax.Array | int | None = None, starts: jax.Array | None = None,
                     block_tables: jax.Array | None = None, sinks: int = 0, window: int | None = None,
                     scale: float | None = None, num_splits: int | None = None, block_k: int | None = None,
                     backend: str = "auto", interpret: bool = False) -> jax.Array:
    """Attention of the new token(s) of each sequence over its KV cache (module docstring: masks, caches, backends).

    q: [B, Hq, D], or [B, T, Hq, D] with T <= 16 new tokens (causal among themselves). k_cache, v_cache:
    [B, S, Hkv, D], or [num_pages, page_size, Hkv, D] with block_tables int32 [B, max_pages]; with `layer` (an int or
    int32 scalar, may be traced) a leading num_layers axis, the call attending over k_cache[layer], v_cache[layer]
    read in place (layer clipped to [0, num_layers)). lengths: int32 [B], the end of each sequence's valid tokens, new
    ones included (values are clipped to [0, S] or [0, max_pages·page_size]). starts: None (0) or int32 [B], the first
    valid column of each sequence in a left-padded cache (values are clipped to [0, length]; columns before it are
    padding, never read). window: only the last `window` keys of each query count; sinks: the first `sinks` valid keys
    count too (needs window). scale defaults to 1/sqrt(D). num_splits, block_k: split-K chunks per sequence and key
    block size (None: the backend's defaults).
    Returns [B, Hq, D] (or [B, T, Hq, D]) in q's dtype, 0 for a query with no key (lengths 0, or starts past it).
    """
    _check(q, k_cache, v_cache, lengths, layer, starts, block_tables, sinks, window, scale, num_splits, block_k)
    problem, implementation = plan(
        q.shape, k_cache.shape, q.dtype, block_tables_shape=None if block_tables is None else block_tables.shape,
        left_padded=starts is not None, sinks=sinks, window=window, scale=scale, num_splits=num_splits,
        block_k=block_k, backend=backend, interpret=interpret)
    tokens = q if q.ndim == 4 else q[:, None]
    if starts is None:
        starts = jnp.zeros_like(lengths)
    if block_tables is None:  # a page per sequence
        block_tables = jnp.arange(problem.batch, dtype=jnp.int32)[:, None]
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, problem.num_layers - 1).reshape(1)
    out = implementation.decode(problem, tokens, k_cache, v_cache, layer, lengths, starts, block_tables)
    return out if q.ndim == 4 else out[:, 0]


def split_k_decode(problem: DecodeProblem, tokens, k_cache, v_cache, layer, lengths, starts, block_tables, *,
                   partials, rows: int):
    """What a kernel backend's `decode` does: group the queries by kv head into `rows` rows, run
    partials(problem, q [B, Hkv, rows, D], k_cache, v_cache, layer, block_tables, visit_plan) → (out [B, Hkv, splits,
    rows, D], lse [B, Hkv, splits, rows]) float32, combine the splits and restore [B, T, Hq, D] in the input dtype.

    Inference only, as a custom_vjp whose backward raises. That also makes an unused call dead code: jax never
    eliminates a bare pallas_call, and flax's nn.scan refuses a layer body holding one that reads the scan's carry
    (it traces the body to find the broadcast variables and requires that trace to depend on no carry)."""
    @jax.custom_vjp
    def decode(tokens, k_cache, v_cache, layer, lengths, starts, block_tables):
        partial_out, lse = partials(problem, _grouped_queries(problem, tokens, rows), k_cache, v_cache, layer,
                                    block_tables, visit_plan(problem, lengths, starts))
        return _ungrouped(problem, combine(partial_out, lse)).astype(tokens.dtype)

    def backward(residuals, cotangent):
        raise NotImplementedError("decode_attention has no gradient: it is for inference (train through "
                                  "longctx.attention.attention or pallas_kernels.flash_attention)")

    decode.defvjp(lambda *args: (decode(*args), None), backward)
    return decode(tokens, k_cache, v_cache, layer, lengths, starts, block_tables)
