"""Next-token cross-entropy over packed sequences; chunked, it never holds every token's logits at once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def next_token_losses(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None):
    """Per-position loss of predicting tokens[:, t+1] from logits[:, t], and whether it counts.

    logits [B, T, V] float32, tokens [B, T] int32, segment_ids [B, T] int32 (0 = padding) or None.
    Returns (nll [B, T-1] float32, weights [B, T-1] float32): a pair counts when both tokens lie in the same
    non-padding segment, so no loss crosses a document boundary or touches padding.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    if segment_ids is None:
        weights = jnp.ones_like(nll)
    else:
        weights = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)).astype(nll.dtype)
    return nll, weights


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None):
    """(sum of the counted per-position losses, their count): see `next_token_losses`."""
    nll, weights = next_token_losses(logits, tokens, segment_ids)
    return jnp.sum(nll * weights), jnp.sum(weights)


def next_token_targets(tokens: np.ndarray, segment_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets [B, T] int32, weights [B, T] float32) aligned with the inputs: position t predicts tokens[t+1] with
    the weight of `next_token_losses` (the last position predicts nothing). Computed on the host before a batch's
    tokens are permuted into a context-parallel layout, so the loss needs no neighbour across devices."""
    targets = np.zeros_like(tokens, dtype=np.int32)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.zeros(tokens.shape, np.float32)
    if segment_ids is None:
        weights[:, :-1] = 1.0
    else:
        weights[:, :-1] = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return targets, weights


def weighted_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(Σ weights · cross-entropy(logits, targets), Σ weights)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights), jnp.sum(weights)


def chunked_weighted_loss(hidden: jax.Array, output: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int):
    """`weighted_loss` of the logits hidden · output, computed `chunk` tokens of each row at a time, so that only
    [B, chunk, V] logits exist at once, forward and backward (each chunk's logits are recomputed for its gradient:
    `jax.checkpoint`). The memory of [B, T, V] float32 logits — 16 GiB for one 32K row of a 128K vocabulary —
    becomes that of a chunk, for one more matmul over the head in the backward pass.

    hidden [B, T, E] (the model's final-normed states, compute dtype: `Llama(hidden_only=True)`), output [E, V]
    (`longctx.models.output_weights`, cast to hidden's dtype as the model's head casts it), targets and weights
    [B, T]. Chunk i holds tokens i, i + T/chunk, i + 2·T/chunk, ... of every row: a strided set, so that a sequence
    split over devices (context parallelism) stays split the same way inside each chunk. `chunk` must divide T.
    """
    batch, length, width = hidden.shape
    if length % chunk:
        raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {length}")
    num_chunks = length // chunk

    def to_chunks(x):  # [B, T, ...] -> [num_chunks, B, chunk, ...], chunk i = tokens i, i + num_chunks, ...
        x = x.reshape(batch, chunk, num_chunks, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    @jax.checkpoint
    def chunk_loss(output, hidden_chunk, targets_chunk, weights_chunk):
        # cast inside the chunk, so that the head's gradient sums over chunks in float32
        logits = jnp.einsum("bce,ev->bcv", hidden_chunk, output.astype(hidden_chunk.dtype)).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets_chunk)
        return jnp.sum(nll * weights_chunk)

    def body(total, xs):
        return total + chunk_loss(output, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return total, jnp.sum(weights)
