"""Softplus attention with re-weighting as a position scheme: RoPE, attended with `normalizers.Softplus`.

Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models" (2025):
softplus in place of exp with the l1 normaliser, scores log(d) · log(N) · cos(q, k) (N keys in view: the
entropy-invariance scale), and, with `reweight`, weights relu(N · a − offset)^power renormalised. The formulas are in
`longctx.attention.normalizers`; attention implementations that lack this normalizer raise.
"""

import jax
from flax import struct

from longctx.attention import normalizers
from longctx.positions.base import AttendFn, PositionEncoding
from longctx.positions.registry import register
from longctx.positions.rope import RoPE, RotaryEncoding


class SoftplusEncoding(RotaryEncoding):
    """Rotary tables and the softplus normalizer to attend with."""

    normalizer: normalizers.Softplus = struct.field(pytree_node=False)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        return attend_fn(*self.rotate(q, k), v, normalizer=self.normalizer)


@register("softplus")
class SoftplusAttention(RoPE):
    """RoPE + length-scaled softplus attention; `reweight`, `power`, `offset`, `offset_free_keys` as in
    `normalizers.Softplus`."""

    reweight: bool = False
    power: float = 15.0
    offset: float = 1.0
    offset_free_keys: int = 3

    def __post_init__(self):
        super().__post_init__()
        self.normalizer()  # checks the settings

    def normalizer(self) -> normalizers.Softplus:
        return normalizers.Softplus(reweight=self.reweight, power=self.power, offset=self.offset,
                                    offset_free_keys=self.offset_free_keys)

    def hf_rope_parameters(self) -> dict:
        raise NotImplementedError("softplus attention replaces softmax; HF models have no such attention")

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        encoding = self.rotary_encoding(positions, kv_positions)
        return SoftplusEncoding(q_cos=encoding.q_cos, q_sin=encoding.q_sin, k_cos=encoding.k_cos,
                                k_sin=encoding.k_sin, normalizer=self.normalizer())
