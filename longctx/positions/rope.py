"""Rotary position embedding (RoPE) and the rotary machinery its extensions share.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). For a head of rotary width R
(`R = head_dim · partial_rotary_factor`, even), frequency i ∈ [0, R/2) is

    inv_freq_i = theta^(-2i / R),    angle(p, i) = p · inv_freq_i,

and each pair (x_i, x_{i+R/2}) of a query or key at position p is rotated by angle(p, i) — the "rotate-half" layout of
GPT-NeoX and HF transformers, so HF checkpoints load unchanged. Dimensions past R pass through (partial rotary, as in
GPT-NeoX / Phi). Then q_m·k_n depends on m − n only. Extensions (PI, NTK, YaRN, ...) subclass `RoPE` and change
`inv_freq` and `attention_factor`; the factor multiplies cos and sin, so logits scale by its square (HF semantics).
"""

import jax
import jax.numpy as jnp
import numpy as np

from longctx.positions.base import AttendFn, PositionEncoding, PositionScheme
from longctx.positions.registry import register


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first R dims of each head of x (rotate-half layout); computes in float32, returns x.dtype.

    x: [B, T, H, D]; cos, sin: [B, T, R/2] with R <= D.
    """
    half = cos.shape[-1]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half : 2 * half], x32[..., 2 * half :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array, attention_factor: float | jax.Array = 1.0):
    """cos and sin of `positions ⊗ inv_freq`, times `attention_factor`: positions [B, T] → two [B, T, R/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


class RotaryEncoding(PositionEncoding):
    """Rotary tables for queries and keys: each [B, T, R/2] (keys [B, S, R/2]) float32."""

    q_cos: jax.Array
    q_sin: jax.Array
    k_cos: jax.Array
    k_sin: jax.Array

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        return attend_fn(apply_rotary(q, self.q_cos, self.q_sin), apply_rotary(k, self.k_cos, self.k_sin), v)


@register("rope")
class RoPE(PositionScheme):
    """Default RoPE with base `theta` on the first `partial_rotary_factor` of each head."""

    theta: float = 10000.0
    partial_rotary_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.theta > 0:
            raise ValueError(f"positions.theta must be > 0, got {self.theta}")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"positions.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotary width head_dim · partial_rotary_factor = {self.head_dim} · {self.partial_rotary_factor} "
                f"= {self.rotary_dim} must be an even number >= 2"
            )

    @property
    def rotary_dim(self) -> int:
        """R: how many leading dims of each head rotate (HF: `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        """[R/2] float32: theta^(-2i/R), computed in float32 as HF does."""
        exponents = np.arange(0, self.rotary_dim, 2, dtype=np.float32) / np.float32(self.rotary_dim)
        return (np.float32(1.0) / np.float32(self.theta) ** exponents).astype(np.float32)

    def attention_factor(self, seq_len: int | None = None) -> float:
        """Multiplier of cos and sin (1 for plain RoPE)."""
        return 1.0

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None) -> RotaryEncoding:
        inv_freq, factor = self.inv_freq(), self.attention_factor()
        q_cos, q_sin = rotary_tables(positions, inv_freq, factor)
        if kv_positions is None:
            k_cos, k_sin = q_cos, q_sin
        else:
            k_cos, k_sin = rotary_tables(kv_positions, inv_freq, factor)
        return RotaryEncoding(q_cos=q_cos, q_sin=q_sin, k_cos=k_cos, k_sin=k_sin)
