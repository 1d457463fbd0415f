"""How attention turns scores into weights: softmax, or softplus with the l1 normaliser (LSSA) and its re-weighting.

A normalizer is a frozen, hashable dataclass (a static argument under jit); `attention(normalizer=...)` takes one or
its name ("softmax", "softplus" with default settings).

Softplus attention follows Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large
Language Models" (2025, arXiv 2501.13428). For query i with N_i visible keys (mask and segments), unit vectors
q̂_i = q_i / |q_i|, k̂_j = k_j / |k_j| and head dim d:

    s_ij = log(d) · log(N_i) · q̂_i·k̂_j                     (length-scaled cosine scores; no 1/sqrt(d))
    a_ij = softplus(s_ij) / Σ_j' softplus(s_ij')             over visible keys (LSSA: softplus for exp, l1 norm)

and, with `reweight`, the sharpening that needs no fine-tuning:

    r_ij = relu(N_i · a_ij − O_i)^p,   a'_ij = r_ij / Σ_j' r_ij'

with power p, offset O_i = `offset` (0 for rows that see at most `offset_free_keys` keys, the paper's first three
rows). Keys at or below the uniform weight 1/N_i drop out; the rest are sharpened. r is computed as (x / max x)^p,
which is the same after normalisation and cannot overflow; a row where every key is at or below the offset (a
uniform row) keeps the LSSA weights. The formulas follow the paper's description as reported in its ICML notes and
reviews (the authors' code was not available to us); tests pin them with a numpy transcription.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.flash import normalizers as kernel_normalizers


@dataclasses.dataclass(frozen=True)
class Softmax(kernel_normalizers.Softmax):
    """exp(scale · q·k) normalised over the visible keys (the usual attention)."""


@dataclasses.dataclass(frozen=True)
class Softplus(kernel_normalizers.Softplus):
    """Length-scaled softplus attention with the l1 normaliser, optionally re-weighted (see the module docstring).
    Its fields and their checks are those of the kernels' normaliser (`pallas_kernels.Softplus`), so the pallas
    kernels take it as it is."""

    def weights(self, q: jax.Array, k: jax.Array, allowed: jax.Array) -> jax.Array:
        """Attention weights float32 [B, Hkv, G, T, S] of grouped q [B, T, Hkv, G, D] and k [B, S, Hkv, D] where
        `allowed` (bool, broadcasting to [B, Hkv, G, T, S]); rows that see nothing are all 0."""
        d = q.shape[-1]
        q_hat = _unit(q.astype(jnp.float32))
        k_hat = _unit(k.astype(jnp.float32))
        cosine = jnp.einsum("btkgd,bskd->bkgts", q_hat, k_hat, precision=jax.lax.Precision.HIGHEST)
        num_keys = jnp.sum(allowed, axis=-1, keepdims=True).astype(jnp.float32)  # N_i, [B, Hkv or 1, G or 1, T, 1]
        scores = math.log(d) * jnp.log(jnp.maximum(num_keys, 1.0)) * cosine
        weights = _l1_normalise(jnp.where(allowed, jax.nn.softplus(scores), 0.0))
        if not self.reweight:
            return weights
        offset = jnp.where(num_keys <= self.offset_free_keys, 0.0, self.offset)
        excess = jax.nn.relu(num_keys * weights - offset)
        peak = jnp.max(excess, axis=-1, keepdims=True)
        sharpened = (excess / jnp.where(peak > 0, peak, 1.0)) ** self.power
        return jnp.where(peak > 0, _l1_normalise(sharpened), weights)


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _l1_normalise(x: jax.Array) -> jax.Array:
    total = jnp.sum(x, axis=-1, keepdims=True)
    return x / jnp.where(total > 0, total, 1.0)


Normalizer = Softmax | Softplus
NAMES = {"softmax": Softmax, "softplus": Softplus}


def get(normalizer: str | Normalizer) -> Normalizer:
    """The normalizer `normalizer` names (default settings), or `normalizer` itself; ValueError otherwise."""
    if isinstance(normalizer, (Softmax, Softplus)):
        return normalizer
    if isinstance(normalizer, str) and normalizer in NAMES:
        return NAMES[normalizer]()
    raise ValueError(f"normalizer must be one of {', '.join(map(repr, NAMES))} or a "
                     f"longctx.attention.normalizers.Softmax/Softplus, got {normalizer!r}")
