"""LM-Infinite: a Λ-shaped mask and a distance cap, so a RoPE model reads past its training length without tuning.

Han et al., "LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models" (NAACL 2024). With
L = original_max_position_embeddings (the training length) and n_global leading tokens, query i sees

    key j at its true distance i − j     when i − j < L          (the local window, the Λ's right arm)
    key j at distance L                  when i − j >= L, j < n_global   (the global tokens, distance capped)

and no other key. Both branches attend with RoPE; the capped one rotates the query at position L and leaves the key
at position 0, and the two are merged by log-sum-exp (`attention.merge_attention`), which equals one softmax over the
union. With packed documents, j < n_global counts from each document's start.
Rotations follow the positions; the branch masks count distance in rows (q_offset + t − s), which is the same
within a packed document, whose positions run 0, 1, 2, ... The layers' mask must be causal (`check_mask`).
"""

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import masks

from longctx.attention import merge_attention
from longctx.positions.base import AttendFn, PositionEncoding, require_causal_mask
from longctx.positions.registry import register
from longctx.positions.rope import RoPE, RotaryEncoding, apply_rotary, check_positive, rotary_tables
from longctx.positions.rope_scaling import check_train_length


class LMInfiniteEncoding(RotaryEncoding):
    """Rotary tables for the window, the query's tables at the capped distance, and the Λ's sizes."""

    capped_q_cos: jax.Array
    capped_q_sin: jax.Array
    window: int = struct.field(pytree_node=False)
    n_global: int = struct.field(pytree_node=False)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        near = attend_fn(*self.rotate(q, k), v, within=masks.SlidingWindow(self.window), return_lse=True)
        far_keys = masks.SinksAndWindow(self.n_global, self.window) & masks.Distant(self.window)
        far = attend_fn(apply_rotary(q, self.capped_q_cos, self.capped_q_sin), k, v, within=far_keys,
                        return_lse=True)
        return merge_attention([near, far])


@register("lm_infinite")
class LMInfinite(RoPE):
    """RoPE with LM-Infinite's Λ-shaped mask (n_global tokens + a window of L) and distance cap L."""

    n_global: int = 10
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive("n_global", self.n_global, integer=True)
        check_train_length(self)

    def hf_rope_parameters(self) -> dict:
        raise NotImplementedError("lm_infinite changes the attention mask and caps distances; HF has no rope type "
                                  "for it")

    def check_mask(self, mask: masks.Mask) -> None:
        require_causal_mask(self.scheme_name, mask)

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        encoding = self.rotary_encoding(positions, kv_positions)
        cap = self.original_max_position_embeddings
        capped_cos, capped_sin = rotary_tables(jnp.full_like(positions, cap), self.inv_freq(), self.attention_factor())
        return LMInfiniteEncoding(q_cos=encoding.q_cos, q_sin=encoding.q_sin, k_cos=encoding.k_cos,
                                  k_sin=encoding.k_sin, capped_q_cos=capped_cos, capped_q_sin=capped_sin,
                                  window=cap, n_global=self.n_global)
