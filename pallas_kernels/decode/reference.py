"""The oracle of decode_attention: the cache gathered into [B, capacity, Hkv, D], a dense float32 softmax over the keys
each query may see (`attention.allowed`), at highest precision. Keys no query sees (before the start, past the
length, between the sinks and the window) are replaced by zeros before use, so what they hold (NaN) cannot reach the
output; a query with no key gives 0.

Backend "reference" of decode_attention: one dense softmax, so it takes neither num_splits nor block_k.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.decode import attention

_HIGHEST = jax.lax.Precision.HIGHEST
block_k_rule = "the reference has no key blocks"


def default_block_k(problem: attention.DecodeProblem) -> int:
    return problem.page_size


def default_num_splits(problem: attention.DecodeProblem) -> int:
    return 1


def unsupported_reason(problem: attention.DecodeProblem) -> str | None:
    if problem.num_splits != 1 or problem.block_k != problem.page_size:
        return (f"the reference computes one dense softmax: it takes no num_splits or block_k (got "
                f"num_splits={problem.num_splits}, block_k={problem.block_k})")
    return None


def gather_pages(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[num_pages, page_size, Hkv, D] and [B, max_pages] → [B, max_pages·page_size, Hkv, D]. Out-of-range table
    entries (of pages past the length) are clipped, their keys masked later."""
    pages = jnp.take(cache, block_tables, axis=0, mode="clip")
    B, max_pages, page_size = pages.shape[:3]
    return pages.reshape(B, max_pages * page_size, *cache.shape[2:])


def decode(problem: attention.DecodeProblem, q, k_cache, v_cache, layer, lengths, starts, block_tables):
    """q [B, T, Hq, D] over layer layer[0] of k_cache, v_cache [num_layers, num_pages, page_size, Hkv, D] →
    [B, T, Hq, D] in q's dtype."""
    B, T, Hq, D = q.shape
    k, v = gather_pages(k_cache[layer[0]], block_tables), gather_pages(v_cache[layer[0]], block_tables)
    length = jnp.clip(lengths, 0, problem.capacity)
    start = jnp.clip(starts, 0, length)[:, None, None, None]  # [B, 1, 1, 1]
    length = length[:, None, None, None]
    key_pos = jnp.arange(problem.capacity, dtype=jnp.int32)[None, None, None, :]  # [1, 1, 1, S]
    query_pos = length - T + jnp.arange(T, dtype=jnp.int32)[None, None, :, None]  # [B, 1, T, 1]
    seen = attention.allowed(problem, query_pos, key_pos, start) & (key_pos < length)  # [B, 1, T, S]
    used = jnp.any(seen, axis=2)[:, 0, :, None, None]  # [B, S, 1, 1]: keys some query sees
    k = jnp.where(used, k.astype(jnp.float32), 0.0)
    v = jnp.where(used, v.astype(jnp.float32), 0.0)
    k = jnp.repeat(k, problem.group, axis=2)
    v = jnp.repeat(v, problem.group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k, precision=_HIGHEST) * problem.scale
    logits = jnp.where(seen, logits, -jnp.inf)
    nonempty = jnp.any(seen, axis=-1, keepdims=True)
    weights = jnp.exp(logits - jnp.where(nonempty, jnp.max(logits, axis=-1, keepdims=True), 0.0))
    weights = weights / jnp.where(nonempty, jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    return jnp.einsum("bhts,bshd->bthd", weights, v, precision=_HIGHEST).astype(q.dtype)
