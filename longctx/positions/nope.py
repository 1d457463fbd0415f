"""NoPE: no position encoding at all; causal attention alone tells tokens apart.

Kazemnejad et al., "The Impact of Positional Encoding on Length Generalization in Transformers" (NeurIPS 2023).
Attention is `softmax(q·kᵀ / sqrt(d))` with q and k untouched.
"""

import jax

from longctx.positions.base import PositionEncoding, PositionScheme
from longctx.positions.registry import register


@register("none")
class NoPE(PositionScheme):
    """No position information: every layer attends with the plain `PositionEncoding`."""

    def encodes_keys_once(self) -> bool:
        return True

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        return PositionEncoding()
