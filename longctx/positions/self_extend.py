"""Self-Extend: neighbour attention at true distances, grouped attention with floor-divided positions beyond.

Jin et al., "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning" (ICML 2024). With group size G and
neighbour window W, query at position p_q and key at p_k, d = p_q − p_k:

    d < W:   the key is seen at distance d                        (ordinary RoPE)
    d >= W:  the query sits at p_q // G + (W − W // G), the key at p_k // G, so the key is seen at distance
             p_q // G − p_k // G + W − W // G

(the shift makes the two branches meet at d = W). Each branch attends with its own rotary tables over its own keys
and they are merged by log-sum-exp, which equals one softmax over all keys with the per-pair distances above — the
flash-attention form of the paper's implementation.
Rotations follow the positions; the branch masks count distance in rows (q_offset + t − s), which is the same
within a packed document, whose positions run 0, 1, 2, ... The layers' mask must be causal (`check_mask`).
"""

import jax
from flax import struct

from pallas_kernels import masks

from longctx.attention import merge_attention
from longctx.positions.base import AttendFn, PositionEncoding, require_causal_mask
from longctx.positions.registry import register
from longctx.positions.rope import RoPE, RotaryEncoding, apply_rotary, check_positive, rotary_tables
from longctx.positions.rope_scaling import check_train_length


class SelfExtendEncoding(RotaryEncoding):
    """Rotary tables of the neighbour branch, those of the grouped branch, and W."""

    grouped_q_cos: jax.Array
    grouped_q_sin: jax.Array
    grouped_k_cos: jax.Array
    grouped_k_sin: jax.Array
    neighbor_window: int = struct.field(pytree_node=False)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        near = attend_fn(*self.rotate(q, k), v, within=masks.SlidingWindow(self.neighbor_window), return_lse=True)
        grouped_q = apply_rotary(q, self.grouped_q_cos, self.grouped_q_sin)
        grouped_k = apply_rotary(k, self.grouped_k_cos, self.grouped_k_sin)
        far = attend_fn(grouped_q, grouped_k, v, within=masks.Distant(self.neighbor_window), return_lse=True)
        return merge_attention([near, far])


@register("self_extend")
class SelfExtend(RoPE):
    """RoPE with Self-Extend's grouped attention beyond a neighbour window.

    `neighbor_window` W defaults to a quarter of `original_max_position_embeddings` (the training length), e.g.
    1024 for a 4K model with the default `group_size` G = 8.
    """

    group_size: int = 8
    neighbor_window: int | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive("group_size", self.group_size, integer=True)
        if self.neighbor_window is None:
            check_train_length(self)
            object.__setattr__(self, "neighbor_window", max(1, self.original_max_position_embeddings // 4))
        check_positive("neighbor_window", self.neighbor_window, integer=True)

    def grouped_positions(self, q_positions: jax.Array, kv_positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Positions of the grouped branch: (p_q // G + W − W // G, p_k // G)."""
        G, W = self.group_size, self.neighbor_window
        return q_positions // G + (W - W // G), kv_positions // G

    def hf_rope_parameters(self) -> dict:
        raise NotImplementedError("self_extend attends twice with two position maps; HF has no rope type for it")

    def check_mask(self, mask: masks.Mask) -> None:
        require_causal_mask(self.scheme_name, mask)

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        encoding = self.rotary_encoding(positions, kv_positions)
        grouped_q, grouped_k = self.grouped_positions(positions, positions if kv_positions is None else kv_positions)
        inv_freq, factor = self.inv_freq(), self.attention_factor()
        q_cos, q_sin = rotary_tables(grouped_q, inv_freq, factor)
        k_cos, k_sin = rotary_tables(grouped_k, inv_freq, factor)
        return SelfExtendEncoding(q_cos=encoding.q_cos, q_sin=encoding.q_sin, k_cos=encoding.k_cos,
                                  k_sin=encoding.k_sin, grouped_q_cos=q_cos, grouped_q_sin=q_sin,
                                  grouped_k_cos=k_cos, grouped_k_sin=k_sin, neighbor_window=self.neighbor_window)
