"""The oracle of pallas_kernels: attention written out densely in jnp, float32 at highest precision.

For query row t (absolute position i = q_offset + t), key s and query head h (kv head h // G, G = Hq // Hkv):

    allowed[h, t, s] = mask(i, s, h) and q_segment_ids[t] == kv_segment_ids[s] != 0   (segments if given)
    softmax:   out[t, h] = Σ_s softmax_s(scale · q·k where allowed) v[s]
               lse[t, h] = log Σ_{s allowed} exp(scale · q·k)
    softplus:  the weights of `normalizers.Softplus` (its own scores, no lse)

A row with nothing allowed gives out = 0 and lse = -inf. Differentiable with jax.grad: the gradients of the kernels
are checked against this function's. It shares nothing with the kernels but the mask's `__call__`.
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels import masks as masks_lib
from pallas_kernels.flash import normalizers

_HIGHEST = jax.lax.Precision.HIGHEST


def allowed_mask(mask: masks_lib.Mask, T: int, S: int, num_heads: int, *, q_offset: int = 0,
                 q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None) -> jax.Array:
    """bool [B or 1, Hq, T, S]."""
    allowed = jnp.asarray(masks_lib.materialize(mask, T, S, q_offset=q_offset, num_heads=num_heads))[None]
    if q_segment_ids is not None:
        q_seg, kv_seg = q_segment_ids[:, None, :, None], kv_segment_ids[:, None, None, :]
        allowed = allowed & (q_seg == kv_seg) & (q_seg != 0)
    return allowed


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _l1(x: jax.Array) -> jax.Array:
    total = jnp.sum(x, axis=-1, keepdims=True)
    return x / jnp.where(total > 0, total, 1.0)


def softplus_weights(q: jax.Array, k: jax.Array, allowed: jax.Array, normalizer: normalizers.Softplus) -> jax.Array:
    """q [B, Hq, T, D], k [B, Hq, S, D] float32, allowed bool [.., T, S] → weights [B, Hq, T, S]."""
    cosine = jnp.einsum("bhtd,bhsd->bhts", _unit(q), _unit(k), precision=_HIGHEST)
    num_keys = jnp.sum(allowed, axis=-1, keepdims=True).astype(jnp.float32)
    scores = math.log(q.shape[-1]) * jnp.log(jnp.maximum(num_keys, 1.0)) * cosine
    weights = _l1(jnp.where(allowed, jax.nn.softplus(scores), 0.0))
    if not normalizer.reweight:
        return weights
    offset = jnp.where(num_keys <= normalizer.offset_free_keys, 0.0, normalizer.offset)
    excess = jax.nn.relu(num_keys * weights - offset)
    peak = jnp.max(excess, axis=-1, keepdims=True)
    sharpened = (excess / jnp.where(peak > 0, peak, 1.0)) ** normalizer.power
    return jnp.where(peak > 0, _l1(sharpened), weights)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks_lib.Mask = masks_lib.Causal(),
                        segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        normalizer: str | normalizers.Normalizer = "softmax", scale: float | None = None,
                        q_offset: int = 0, return_lse: bool = False):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] → out [B, T, Hq, D] in q.dtype (and lse [B, T, Hq] float32)."""
    normalizer = normalizers.get(normalizer)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    allowed = allowed_mask(mask, T, S, Hq, q_offset=q_offset, q_segment_ids=segment_ids,
                           kv_segment_ids=kv_segment_ids)
    qh = jnp.swapaxes(q, 1, 2).astype(jnp.float32)
    kh = jnp.repeat(jnp.swapaxes(k, 1, 2).astype(jnp.float32), Hq // Hkv, axis=1)
    vh = jnp.repeat(jnp.swapaxes(v, 1, 2).astype(jnp.float32), Hq // Hkv, axis=1)
    lse = None
    if isinstance(normalizer, normalizers.Softplus):
        weights = softplus_weights(qh, kh, allowed, normalizer)
    else:
        scale = D ** -0.5 if scale is None else scale
        logits = jnp.where(allowed, jnp.einsum("bhtd,bhsd->bhts", qh, kh, precision=_HIGHEST) * scale, -jnp.inf)
        nonempty = jnp.any(allowed, axis=-1, keepdims=True)
        row_max = jax.lax.stop_gradient(jnp.where(nonempty, jnp.max(logits, axis=-1, keepdims=True), 0.0))
        unnormalized = jnp.exp(logits - row_max)
        total = jnp.sum(unnormalized, axis=-1, keepdims=True)
        weights = unnormalized / jnp.where(nonempty, total, 1.0)
        lse = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)[..., 0]
    out = jnp.swapaxes(jnp.einsum("bhts,bhsd->bhtd", weights, vh, precision=_HIGHEST), 1, 2).astype(q.dtype)
    if return_lse:
        return out, jnp.swapaxes(lse, 1, 2)
    return out
