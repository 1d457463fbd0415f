"""Next-token cross-entropy over packed sequences."""

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
