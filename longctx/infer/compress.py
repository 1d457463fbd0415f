"""KV-cache compression after the prefill: every layer's kv heads keep a fixed budget of the prompt's tokens.

A policy picks, for each layer, row and kv head, k_b = min(budget_b, n_b) of the row's n_b prompt tokens, where
budget_b is `budget` tokens or ceil(fraction · n_b); decoding then runs over a cache of max_b k_b columns (plus the
new tokens) instead of the prompt's width. Kept tokens stay in their order, right-aligned (row b starts at column
max_b k_b − k_b), and keep the keys they were encoded with, so compression needs a cache of encoded keys
(`KVCache(encoded=True)`): the heads of one row keep different tokens, so cached positions are no longer tracked.

Policies (`POLICIES`):
- "sinks_window": attention sinks and a recent window (StreamingLLM, Xiao et al. 2023; LM-Infinite's Λ, Han et al.
  2023): the first `sinks` tokens of each sequence and its last k_b − sinks, alike in every head.
- "snapkv": SnapKV's prompt-end voting (Li et al. 2024). The last w = `observation_window` prompt tokens keep
  themselves and vote for the earlier ones: with their encoded queries q_i (sown by the prefill, `Llama(observe=w)`)
  and the cached keys k_j of the same layer, kv head h collects

    votes_h(j) = Σ_{i in window} Σ_{query heads g of h} softmax_j(q_{i,g} · k_{j,h} / sqrt(D))    (j before the window)

  (the softmax over all the keys query i sees, the window's included), max-pooled over `pool_size` neighbouring
  earlier tokens so that a kept token brings its context; the k_b − w earlier tokens of most votes are kept.
  One query head per kv head (MHA) gives each query head its own tokens; under GQA a group shares its kv head's.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from longctx.infer.kv_cache import KVCache

POLICIES = ("sinks_window", "snapkv")


@dataclasses.dataclass(frozen=True)
class Compression:
    """A policy and its budget: `budget` tokens per kv head or a `fraction` of each prompt (exactly one of them).
    sinks: "sinks_window"'s leading tokens; observation_window, pool_size: "snapkv"'s voting window and pooling."""

    policy: str
    budget: int | None = None
    fraction: float | None = None
    sinks: int = 4
    observation_window: int = 32
    pool_size: int = 7

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"compression policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if (self.budget is None) == (self.fraction is None):
            raise ValueError(f"compression takes a budget (tokens per head) or a fraction of the prompt, exactly "
                             f"one; got budget={self.budget!r}, fraction={self.fraction!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"compression budget must be a positive int, got {self.budget!r}")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"compression fraction must be in (0, 1], got {self.fraction!r}")
        for name in ("sinks", "observation_window", "pool_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sinks" else 1):
                raise ValueError(f"compression {name} must be an int >= {0 if name == 'sinks' else 1}, got {value!r}")
        if self.pool_size % 2 == 0:
            raise ValueError(f"compression pool_size must be odd (centred on the token), got {self.pool_size}")

    @property
    def observes(self) -> int:
        """Trailing prompt tokens whose queries the prefill must sow."""
        return self.observation_window if self.policy == "snapkv" else 0

    def budgets(self, prompt_lengths: np.ndarray) -> np.ndarray:
        """k_b: int32 [B], the tokens row b keeps per kv head."""
        prompt_lengths = np.asarray(prompt_lengths)
        if self.budget is not None:
            wanted = np.full(prompt_lengths.shape, self.budget)
        else:
            wanted = np.ceil(self.fraction * prompt_lengths)
        return np.minimum(wanted, prompt_lengths).astype(np.int32)


def compression_of(policy: str, budget: int | None = None, fraction: float | None = None) -> Compression | None:
    """The Compression a command line names (--kv_policy, --kv_budget, --kv_fraction): None for policy "none"."""
    if policy == "none":
        if budget is not None or fraction is not None:
            raise ValueError("--kv_budget and --kv_fraction need a --kv_policy other than none")
        return None
    return Compression(policy, budget=budget, fraction=fraction)


def sinks_window_keep(starts: jax.Array, width: int, budgets: jax.Array, sinks: int) -> jax.Array:
    """bool [B, width]: the first min(sinks, k_b) tokens from each row's start and its last k_b − that."""
    column = jnp.arange(width)[None]
    lead = jnp.minimum(sinks, budgets)[:, None]
    return (column >= starts[:, None]) & ((column < starts[:, None] + lead) | (column >= width - (budgets[:, None]
                                                                                                   - lead)))


def snapkv_votes(queries: jax.Array, keys: jax.Array, starts: jax.Array) -> jax.Array:
    """One layer's votes [B, Hkv, width] float32: queries [B, w, Hq, D] of the prompt's last w columns and the
    layer's keys [B, width, Hkv, D] (module docstring; keys before a row's start get none)."""
    B, w, Hq, D = queries.shape
    width, Hkv = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(B, w, Hkv, Hq // Hkv, D)
    logits = jnp.einsum("bihgd,bjhd->bhgij", grouped.astype(jnp.float32), keys.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * D ** -0.5
    column = jnp.arange(width)
    query_column = width - w + jnp.arange(w)
    seen = (column[None, None, :] >= starts[:, None, None]) & (column[None, None, :] <= query_column[None, :, None])
    logits = jnp.where(seen[:, None, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(seen[:, None, None], weights, 0.0)  # rows of padding queries see nothing
    return weights.sum(axis=(2, 3))


def snapkv_keep(votes: jax.Array, starts: jax.Array, budgets: jax.Array, window: int, pool_size: int) -> jax.Array:
    """bool [B, Hkv, width]: each row's last min(window, k_b) tokens and the k_b − that earlier tokens of most votes,
    max-pooled over the earlier tokens alone (ties to the earlier token)."""
    column = jnp.arange(votes.shape[-1])[None, None]
    kept_window = jnp.minimum(window, budgets)[:, None, None]
    in_window = column >= votes.shape[-1] - kept_window
    real = column >= starts[:, None, None]
    candidate = real & ~in_window
    pooled = jax.lax.reduce_window(jnp.where(candidate, votes, -jnp.inf), -jnp.inf, jax.lax.max, (1, 1, pool_size),
                                   (1, 1, 1), "SAME")
    ranked = jnp.argsort(jnp.where(candidate, -pooled, jnp.inf), axis=-1, stable=True)
    rank = jnp.argsort(ranked, axis=-1)  # each column's place in the ranking
    return (candidate & (rank < budgets[:, None, None] - kept_window)) | (in_window & real)


def observed_queries(intermediates, num_layers: int) -> jax.Array:
    """The prefill's sown queries (`Llama(observe=w)`, scanned or not) as [num_layers, B, w, Hq, D]."""
    if "layers" in intermediates:
        return intermediates["layers"]["attn"]["queries"][0]
    return jnp.stack([intermediates[f"layers_{i}"]["attn"]["queries"][0] for i in range(num_layers)])


def compress(cache: KVCache, compression: Compression, prompt_lengths, *, capacity: int,
             queries: jax.Array | None = None) -> KVCache:
    """The prefilled `cache` (its length the prompts' width W, row b's prompt of prompt_lengths[b] tokens in
    columns W − n_b .. W − 1) kept to `compression.budgets(prompt_lengths)` tokens per kv head, in a new cache of
    `capacity` columns (at least the largest budget), contiguous or paged as `cache` is (the same page size).
    queries: `observed_queries` of the prefill, for "snapkv"."""
    if not cache.encoded:
        raise ValueError("KV compression keeps tokens with the keys they were encoded with: it needs a cache of "
                         "encoded keys (KVCache encoded=True), for a position scheme that encodes keys once")
    if compression.policy == "snapkv" and queries is None:
        raise ValueError("snapkv votes with the prompt's last queries: prefill with observe=observation_window")
    budgets = compression.budgets(prompt_lengths)
    top = int(budgets.max())
    if capacity < top:
        raise ValueError(f"a compressed cache of capacity {capacity} cannot hold budgets of up to {top} tokens")
    page_size = None if cache.block_tables is None else cache.keys.shape[2]
    num_layers, _, _, num_kv_heads, head_dim = cache.keys.shape
    result = KVCache.empty(num_layers=num_layers, batch_size=len(budgets), max_length=capacity,
                           num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=cache.keys.dtype,
                           starts=top - budgets, encoded=True, page_size=page_size)
    return _compressed(cache, result, jnp.asarray(budgets), queries, compression=compression, top=top)


@functools.partial(jax.jit, static_argnames=("compression", "top"), donate_argnums=1)
def _compressed(cache: KVCache, result: KVCache, budgets: jax.Array, queries, *, compression: Compression,
                top: int) -> KVCache:
    """`result` (empty) holding, right-aligned in each row's first `top` columns, the tokens each layer's kv heads
    keep of `cache`'s prompts."""
    width = cache.max_length
    view = cache.view(0)
    num_layers = cache.keys.shape[0]
    layer_keys = [view.contiguous(cache.keys, layer) for layer in range(num_layers)]
    layer_values = [view.contiguous(cache.values, layer) for layer in range(num_layers)]
    # the prompts end at column W = cache.length: shift every row right so they end at the last column
    shift = width - cache.length
    starts = cache.starts + shift
    layer_keys = [jnp.roll(k, shift, axis=1) for k in layer_keys]
    layer_values = [jnp.roll(v, shift, axis=1) for v in layer_values]
    B, _, num_kv_heads, _ = layer_keys[0].shape
    if compression.policy == "sinks_window":
        keep = sinks_window_keep(starts, width, budgets, compression.sinks)[:, None]
        keeps = [jnp.broadcast_to(keep, (B, num_kv_heads, width))] * num_layers
    else:
        window = min(compression.observation_window, width)
        keeps = [snapkv_keep(snapkv_votes(queries[layer], layer_keys[layer], starts), starts, budgets, window,
                             compression.pool_size) for layer in range(num_layers)]
    column = jnp.arange(width)
    slot = jnp.clip(jnp.arange(top)[None] - (top - budgets[:, None]), 0)  # [B, top]: the row's kept token of a slot
    write = result.view(top)
    keys, values = result.keys, result.values
    for layer, keep in enumerate(keeps):
        order = jnp.argsort(jnp.where(keep, column, width + column), axis=-1)  # kept columns first, in order
        source = jnp.take_along_axis(order, jnp.broadcast_to(slot[:, None], (B, num_kv_heads, top)), axis=-1)
        source = source.transpose(0, 2, 1)[..., None]  # [B, top, Hkv, 1]
        keys = write.write(keys, layer, jnp.take_along_axis(layer_keys[layer], source, axis=1))
        values = write.write(values, layer, jnp.take_along_axis(layer_values[layer], source, axis=1))
    written = result.with_tokens(jnp.zeros((B, top), jnp.int32))
    return written.replace(keys=keys, values=values)
