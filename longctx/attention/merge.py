"""Merging attention over disjoint key sets from each part's output and log-sum-exp.

If keys split into disjoint sets K_1..K_n and part m attended over K_m giving out_m and lse_m, softmax attention over
all of them is

    out = Σ_m exp(lse_m − lse) · out_m,    lse = log Σ_m exp(lse_m),

the merge of FlashAttention's split-K and of ring attention. A part that saw no key (lse = −inf) weighs 0, and a row
with no key in any part gives 0. Self-Extend and LM-Infinite use it to combine keys seen under two position maps.
"""

import jax
import jax.numpy as jnp


def merge_attention(parts: list[tuple[jax.Array, jax.Array]], return_lse: bool = False):
    """parts: (out [B, T, H, D], lse [B, T, H] float32) pairs over disjoint keys → out [B, T, H, D] in out's dtype
    (and lse [B, T, H] if `return_lse`). Differentiable; never NaN."""
    lses = jnp.stack([lse for _, lse in parts])  # [P, B, T, H]
    top = jax.lax.stop_gradient(jnp.max(lses, axis=0))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lses - top)  # exp(-inf) = 0 for empty parts
    total = jnp.sum(weights, axis=0)
    safe_total = jnp.where(total > 0, total, 1.0)
    out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts)) / safe_total[..., None]
    out = out.astype(parts[0][0].dtype)
    if not return_lse:
        return out
    return out, jnp.where(total > 0, top + jnp.log(safe_total), -jnp.inf)
