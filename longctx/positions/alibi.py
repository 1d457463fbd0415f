"""ALiBi: no rotation; a linear penalty on distance added to every head's logits.

Press et al., "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation" (ICLR 2022).
Head h of H adds −m_h · (i − j) to the logit of query i and key j, with slopes the geometric sequence
m_h = 2^(−8h/H), h = 1..H, for H a power of two; otherwise the slopes of the nearest smaller power of two P followed
by every other slope of 2P (the paper's reference code). Attention receives the slopes (`alibi_slopes`) and computes
the bias itself, so no [H, T, S] tensor is built outside the kernel. It measures distance in token rows
(q_offset + t − s), which is the position difference within a packed document, whose positions run 0, 1, 2, ...
"""

import math

import jax
import numpy as np

from longctx.positions.base import AttendFn, PositionEncoding, PositionScheme
from longctx.positions.registry import register


def alibi_slopes(num_heads: int) -> np.ndarray:
    """[num_heads] float32 slopes m_h."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(closest) + geometric(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, np.float32)


class ALiBiEncoding(PositionEncoding):
    """Queries and keys untouched; attention adds the heads' distance penalties."""

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        return attend_fn(q, k, v, alibi_slopes=alibi_slopes(q.shape[2]))


@register("alibi")
class ALiBi(PositionScheme):
    """ALiBi with the paper's slopes for the model's number of query heads."""

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        # Distance is measured in token rows (attention's q_offset), so kv_positions are not needed: a KV cache
        # keeps the columns of a sequence at their distances.
        return ALiBiEncoding()
