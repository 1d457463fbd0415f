"""Attention of new tokens over a KV cache, as the model's layers call it.

- Decoding (T <= `pallas_kernels.decode.MAX_NEW_TOKENS` new tokens) over a cache of encoded keys
  (`KVCache(encoded=True)`): the split-K kernel `decode_attention` reads each row's columns starts[b] .. length − 1
  once, contiguous or paged, one pass per kv head for its query heads. The layer mask becomes the kernel's window and
  sinks: Causal → neither, SlidingWindow(w) → window w, SinksAndWindow(s, w) → both (the sinks being the first s
  tokens of the row's sequence).
- Prefill (longer T), either cache, through `over_cache`: the new tokens sit at a traced column offset (the cache's
  length before the call), which the block-sparse flash kernels cannot take (their block layout is built at trace
  time). Under a `relative` mask (decided by query − key distance: causal, sliding window, Self-Extend's branches)
  the cache's columns are rotated so that the new tokens' last column becomes the last, which makes the offset the
  static S − T: column c moves to (c − length) mod S, every written column keeps its distance to every query, and
  the columns not written yet wrap to the front as segment 0, which attends to nothing. The flash kernels then run
  at a static layout, and their segment-range skipping visits only the written columns' blocks, so a chunk of T
  tokens at any offset costs the causal work of its columns and no T × S score matrix is built (one rotated copy of
  the layer's keys and values per call). A mask that is not relative (sinks, chunked, prefix) runs at the traced
  offset, which only the dense implementations take (T × S scores; logged once).

`impl` (the model's `attention_impl`) picks how decoding attends: "pallas", "cudnn" and "auto" through the device's
decoding kernel ("auto" on CPU, or where the kernel lacks the head dim, through its jnp reference; under a mask the
kernel cannot take, through `longctx.attention.attention`; logged), "pallas_interpret" through the Triton kernel in
interpret mode; "xla" and "reference" decode through `longctx.attention.attention` over the whole cache with that
implementation (with "xla", `jax.nn.dot_product_attention`: the baseline of `scripts/bench_decode.py`). Prefill
runs `longctx.attention.attention` with `impl` as it is.
"""

import logging

import jax
import jax.numpy as jnp

from pallas_kernels import masks

from longctx.attention import attention
from longctx.infer.kv_cache import CacheView
from pallas_kernels import decode_attention
from pallas_kernels.decode.attention import MAX_NEW_TOKENS, plan

logger = logging.getLogger("longctx.infer")
_LOGGED_FALLBACKS: set[str] = set()
FLASH_MIN_ROWS = 16  # the flash kernels' smallest query block (Triton's)


def decoding_kernel(impl: str, q: jax.Array, keys: jax.Array, view: CacheView, mask: masks.Mask) -> dict | None:
    """The decode_attention arguments (backend, interpret, window, sinks) that serve a decoding step under the
    model's attention implementation, or None where it decodes through `longctx.attention.attention` ("xla",
    "reference"). "auto" takes the jnp reference of the kernel where the device's kernel cannot serve the step (a
    head dim it lacks, say), and logs why; an explicit implementation raises."""
    if impl in ("xla", "reference"):
        return None
    if impl == "pallas_interpret":
        backend, interpret = "triton", True
    elif impl in ("pallas", "cudnn") or jax.devices()[0].platform in ("gpu", "tpu"):
        backend, interpret = "auto", False
    else:
        backend, interpret = "reference", False
    try:
        window, sinks = window_and_sinks(mask)
    except NotImplementedError as e:
        if impl != "auto":
            raise
        _log_fallback(str(e), "longctx.attention.attention over the whole cache")
        return None
    try:
        plan(q.shape, keys.shape, q.dtype, sinks=sinks, window=window, backend=backend, interpret=interpret,
             left_padded=True, block_tables_shape=None if view.block_tables is None else view.block_tables.shape)
    except NotImplementedError as e:
        if impl != "auto" or backend == "reference":
            raise
        _log_fallback(str(e), "the decoding kernel's jnp reference")
        backend, interpret = "reference", False
    return dict(backend=backend, interpret=interpret, window=window, sinks=sinks)


def _log_fallback(reason: str, instead: str, what: str = "attention impl=auto decodes") -> None:
    if reason not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(reason)
        logger.info("%s through %s: %s", what, instead, reason)


def window_and_sinks(mask: masks.Mask) -> tuple[int | None, int]:
    """The decoding kernel's (window, sinks) for a layer mask; NotImplementedError for masks it cannot take."""
    if isinstance(mask, masks.Causal):
        return None, 0
    if isinstance(mask, masks.SlidingWindow):
        return mask.window, 0
    if isinstance(mask, masks.SinksAndWindow):
        return mask.window, mask.sinks
    raise NotImplementedError(f"decoding over a cache of encoded keys takes the causal, sliding-window and "
                              f"sinks-and-window masks, not model.attention.mask={mask!r}; a cache of raw keys "
                              f"(KVCache encoded=False) takes every mask")


def over_cache(q: jax.Array, keys: jax.Array, values: jax.Array, view: CacheView, *, mask: masks.Mask,
               segment_ids: jax.Array, impl: str, **overrides):
    """`longctx.attention.attention` of q [B, T, Hq, D], the new tokens at columns view.offset .. length − 1, over a
    layer's cached keys and values [B, S, Hkv, D] (the new ones written); `overrides` go to it (return_lse).

    A prefill under a relative mask runs at the static q_offset S − T over the rotated columns (module docstring). So
    does a decoding step (T <= MAX_NEW_TOKENS) whose `impl` names the flash kernels, its queries padded at the front
    to the kernels' smallest query block; other implementations decode at the traced offset ([T, S] scores, T
    small)."""
    T, S = q.shape[1], keys.shape[1]
    kv_segment_ids = view.segment_ids()
    decoding, flash = T <= MAX_NEW_TOKENS, impl in ("pallas", "pallas_interpret")
    if not mask.relative or (decoding and not flash):
        if not decoding:
            _log_fallback(f"{mask!r} is not relative: the prefill cannot rotate the cache to a static offset",
                          "attention at a traced q_offset (dense implementations only)", what="prefills")
        return attention(q, keys, values, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                         q_offset=view.offset, impl=impl, **overrides)
    pad = max(0, FLASH_MIN_ROWS - T) if decoding else 0  # padding rows: segment 0, attending to nothing
    if pad:
        q = jnp.pad(q, ((0, 0), (pad, 0), (0, 0), (0, 0)))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (pad, 0)))
    keys, values, kv_segment_ids = (rotated(x, view.length) for x in (keys, values, kv_segment_ids))
    result = attention(q, keys, values, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                       q_offset=S - T - pad, impl=impl, **overrides)
    return jax.tree.map(lambda x: x[:, pad:], result)


def rotated(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x [B, S, ...] with column c moved to (c − shift) mod S, for a traced shift (what jnp.roll(x, -shift, 1)
    computes, without its trial of the shift as a constant, which costs tracing a raised error per call)."""
    S = x.shape[1]
    return jax.lax.dynamic_slice_in_dim(jnp.concatenate([x, x], axis=1), shift % S, S, axis=1)


def encoded(q: jax.Array, keys: jax.Array, values: jax.Array, view: CacheView, layer: jax.Array | int, *,
            mask: masks.Mask, segment_ids: jax.Array, impl: str) -> jax.Array:
    """q [B, T, Hq, D], all encoded, against every layer's cached keys and values (the new tokens' written) at layer
    `layer` → [B, T, Hq, D]. segment_ids [B, T]: 0 on the new tokens that are padding."""
    B, T = q.shape[:2]
    kernel = decoding_kernel(impl, q, keys, view, mask) if T <= MAX_NEW_TOKENS else None
    if kernel is not None:
        lengths = jnp.full((B,), view.length, jnp.int32)
        return decode_attention(q, keys, values, lengths, layer=layer, starts=view.starts,
                                block_tables=view.block_tables, **kernel)
    return over_cache(q, view.contiguous(keys, layer), view.contiguous(values, layer), view, mask=mask,
                      segment_ids=segment_ids, impl=impl)
