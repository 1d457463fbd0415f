"""Entropy-aware ABF: RoPE with an adjusted base, and queries scaled so that attention entropy stays put past the
training length.

Zhang et al., "Extending LLMs' Context Window with 100 Samples" (2024). On top of ABF (base theta · base_scale), the
query at position p is multiplied by

    λ(p) = max(1, log(p + 1) / log(L)),    L = original_max_position_embeddings (the training length),

so logits grow with log(p) beyond L and stay untouched within it. The scale applies in every layer (the paper leaves
its first two layers unscaled; a longctx scheme hands all layers one encoding).
"""

import jax
import jax.numpy as jnp

from longctx.positions.base import AttendFn, PositionEncoding
from longctx.positions.registry import register
from longctx.positions.rope import ABF, RotaryEncoding
from longctx.positions.rope_scaling import check_train_length


class ScaledQueryEncoding(RotaryEncoding):
    """Rotary tables and a per-position query scale [B, T] float32 (the whole query, pass-through dims included)."""

    query_scale: jax.Array

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        scaled = (q.astype(jnp.float32) * self.query_scale[:, :, None, None]).astype(q.dtype)
        return attend_fn(*self.rotate(scaled, k), v)


@register("entropy_abf")
class EntropyABF(ABF):
    """ABF plus the query scale λ(p) = max(1, log(p + 1) / log L)."""

    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_train_length(self)
        if self.original_max_position_embeddings < 2:
            raise ValueError(f"positions.original_max_position_embeddings must be >= 2 (log L divides), got "
                             f"{self.original_max_position_embeddings}")

    def query_scale(self, positions: jax.Array) -> jax.Array:
        """λ at each position: [B, T] float32."""
        log_length = jnp.log(jnp.float32(self.original_max_position_embeddings))
        return jnp.maximum(1.0, jnp.log(positions.astype(jnp.float32) + 1.0) / log_length)

    def hf_rope_parameters(self) -> dict:
        raise NotImplementedError("entropy_abf scales queries by position, which no HF rope type does")

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        encoding = self.rotary_encoding(positions, kv_positions)
        return ScaledQueryEncoding(q_cos=encoding.q_cos, q_sin=encoding.q_sin, k_cos=encoding.k_cos,
                                   k_sin=encoding.k_sin, query_scale=self.query_scale(positions))
