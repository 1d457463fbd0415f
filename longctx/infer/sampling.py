"""Choosing the next token from logits: greedy, temperature and nucleus (top-p) sampling.

Temperature T scales the logits, p_i ∝ exp(logit_i / T); T = 0 is greedy (argmax). Nucleus sampling (Holtzman et
al., "The Curious Case of Neural Text Degeneration", ICLR 2020) keeps the smallest set of most probable tokens whose
probabilities sum to at least `top_p` (ties at the boundary broken by token order, at least one token kept) and
renormalises over it; top_p = 1 keeps every token.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `next_tokens` picks: temperature 0 is greedy; top_p in (0, 1]."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def nucleus_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """`logits` [..., V] with every token outside the top-p nucleus set to -inf."""
    if top_p >= 1:
        return logits
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more probable tokens
    keep_sorted = mass_before < top_p  # the first token always (mass_before = 0)
    keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def next_tokens(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B] next tokens from float logits [B, V] under `sampling` (`rng` unused when greedy)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = nucleus_logits(logits.astype(jnp.float32) / sampling.temperature, sampling.top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
