"""Attention of new tokens over a KV cache of encoded keys (`KVCache(encoded=True)`), as the model's layers call it.

- Decoding (T <= `pallas_kernels.decode.MAX_NEW_TOKENS` new tokens): the split-K kernel `decode_attention` reads
  each row's columns starts[b] .. length − 1 once, contiguous or paged, one pass per kv head for its query heads. The
  layer mask becomes the kernel's window and sinks: Causal → neither, SlidingWindow(w) → window w,
  SinksAndWindow(s, w) → both (the sinks being the first s tokens of the row's sequence).
- Prefill (longer T) under the causal mask: the new tokens attend to themselves causally (q_offset 0, so the
  block-sparse flash kernels take it and no T × T score matrix is built) and to the cached columns before them with
  no mask at all; the two parts merge by log-sum-exp (`longctx.attention.merge_attention`). A prefill from an empty
  cache skips the second part. A 128K-token prompt therefore prefills in one call, in the memory of flash attention.
- Prefill under any other mask runs `longctx.attention.attention` over the whole cache with a traced q_offset,
  which only the dense implementations take (T × S scores: prefill such prompts in chunks).

`impl` (the model's `attention_impl`) picks how decoding attends: "pallas", "cudnn" and "auto" through the device's
decoding kernel ("auto" on CPU, or where the kernel lacks the head dim, through its jnp reference; under a mask the
kernel cannot take, through `longctx.attention.attention`; logged), "pallas_interpret" through the Triton kernel in
interpret mode; "xla" and "reference" decode through `longctx.attention.attention` over the whole cache with that
implementation (with "xla", `jax.nn.dot_product_attention`: the baseline of `scripts/bench_decode.py`).
"""

import logging

import jax
import jax.numpy as jnp

from pallas_kernels import masks

from longctx.attention import attention, merge_attention
from longctx.infer.kv_cache import CacheView
from pallas_kernels import decode_attention
from pallas_kernels.decode.attention import MAX_NEW_TOKENS, plan

logger = logging.getLogger("longctx.infer")
_LOGGED_FALLBACKS: set[str] = set()


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


def _log_fallback(reason: str, instead: str) -> None:
    if reason not in _LOGGED_FALLBACKS:
        _LOGGED_FALLBACKS.add(reason)
        logger.info("attention impl=auto decodes through %s: %s", instead, reason)


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


def encoded(q: jax.Array, k: jax.Array, v: jax.Array, keys: jax.Array, values: jax.Array, view: CacheView,
            layer: jax.Array | int, *, mask: masks.Mask, segment_ids: jax.Array, impl: str) -> jax.Array:
    """q [B, T, Hq, D] and the new tokens' k, v [B, T, Hkv, D], all encoded, against every layer's cached keys and
    values (the new ones written) at layer `layer` → [B, T, Hq, D]. segment_ids [B, T]: 0 on the new tokens that are
    padding."""
    B, T = q.shape[:2]
    kernel = decoding_kernel(impl, q, keys, view, mask) if T <= MAX_NEW_TOKENS else None
    if kernel is not None:
        lengths = jnp.full((B,), view.length, jnp.int32)
        return decode_attention(q, keys, values, lengths, layer=layer, starts=view.starts,
                                block_tables=view.block_tables, **kernel)
    cached_k, cached_v = view.contiguous(keys, layer), view.contiguous(values, layer)
    if T <= MAX_NEW_TOKENS or not isinstance(mask, masks.Causal):
        return attention(q, cached_k, cached_v, mask=mask, segment_ids=segment_ids,
                         kv_segment_ids=view.segment_ids(), q_offset=view.offset, impl=impl)
    new = attention(q, k, v, mask=mask, segment_ids=segment_ids, impl=impl, return_lse=True)
    column = jnp.arange(view.columns, dtype=jnp.int32)[None]
    earlier = ((column >= view.starts[:, None]) & (column < view.offset)).astype(jnp.int32)

    def with_earlier():
        before = attention(q, cached_k, cached_v, mask=masks.Full(), segment_ids=segment_ids, kv_segment_ids=earlier,
                           impl=impl, return_lse=True)
        return merge_attention([new, before])

    return jax.lax.cond(view.offset > 0, with_earlier, lambda: new[0])
