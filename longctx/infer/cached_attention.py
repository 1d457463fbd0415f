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

`impl` (the model's `attention_impl`) picks the decoding backend too: "pallas" and "auto" the device's kernel
("auto" on CPU the jnp reference), "pallas_interpret" the Triton kernel in interpret mode, "xla", "cudnn" and
"reference" the jnp reference of the decoding kernel.
"""

import jax
import jax.numpy as jnp

from longctx.attention import attention, masks, merge_attention
from longctx.infer.kv_cache import CacheView
from pallas_kernels import decode_attention
from pallas_kernels.decode.attention import MAX_NEW_TOKENS


def decoding_backend(impl: str) -> tuple[str, bool]:
    """(decode_attention backend, interpret) for the model's attention implementation."""
    if impl == "pallas_interpret":
        return "triton", True
    if impl == "pallas" or (impl == "auto" and jax.devices()[0].platform in ("gpu", "tpu")):
        return "auto", False
    return "reference", False


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
    window, sinks = window_and_sinks(mask)
    B, T = q.shape[:2]
    if T <= MAX_NEW_TOKENS:
        backend, interpret = decoding_backend(impl)
        lengths = jnp.full((B,), view.length, jnp.int32)
        return decode_attention(q, keys[layer], values[layer], lengths, starts=view.starts,
                                block_tables=view.block_tables, sinks=sinks, window=window, backend=backend,
                                interpret=interpret)
    cached_k, cached_v = view.contiguous(keys, layer), view.contiguous(values, layer)
    if not isinstance(mask, masks.Causal):
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
