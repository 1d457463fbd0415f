"""The pure-jnp attention oracle that every kernel is tested against, and the argument checks all implementations share.

For query t (absolute position i = q_offset + t) and query head h, with G = Hq // Hkv and kv head h // G:

    allowed[h, t, s] = mask(i, s, h) and segment_ids[t] == kv_segment_ids[s] != 0
    logits[h, t, s]  = scale · q[t, h] · k[s, h // G]  −  alibi_slopes[h] · |i − s|     (ALiBi term if slopes given)
    out[t, h]        = Σ_s softmax_s(logits[h, t, s] where allowed, else -inf) · v[s, h // G]
    lse[t, h]        = log Σ_{s allowed} exp(logits[h, t, s])

The mask is one of `pallas_kernels.masks` (the kernels' own vocabulary); one that is not `per_head` gives every head
the same pattern, and `allowed` then has a single head row.

With normalizer `Softplus` the weights are those of `normalizers.Softplus.weights` instead (their own scores; no
scale, no ALiBi, no lse).

With segment ids the mask sees positions within the segment: mask(i - f, s - f) where f is the first key of the
segment (each segment is one run of equal ids, as packing writes it), so a packed document gets the mask it would get
alone. Masks that are `relative` give the same on row indices and skip that shift.

A row with nothing allowed outputs exactly 0 and has lse = -inf; its gradients are 0, never NaN. Logits, softmax and
lse are float32 at highest matmul precision whatever the input dtype; the output is cast to q.dtype. Grouped-query
attention reshapes q to [B, T, Hkv, G, D] instead of repeating K/V heads.
"""

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import masks

from longctx.attention import normalizers

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_segment_ids(name: str, ids: jax.Array | np.ndarray, batch: int, length: int, length_name: str) -> None:
    if tuple(ids.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, {length_name}] = {(batch, length)}, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array (int32), got {ids.dtype}")


def check_arguments(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks.Mask,
                    segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None,
                    normalizer: str | normalizers.Normalizer, q_offset: int | jax.Array, scale: float | None = None,
                    alibi_slopes: jax.Array | None = None, return_lse: bool = False):
    """Raises ValueError naming the first argument that does not fit; returns the resolved
    (segment_ids, kv_segment_ids, q_offset, normalizer): each segment-id array defaults to the other when S == T, a
    static q_offset becomes a Python int (a traced one is returned as an int32 scalar), a normalizer name its
    `normalizers` object."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 ({name}: [B, {'T, Hq' if name == 'q' else 'S, Hkv'}, D]), "
                             f"got shape {np.shape(x)}")
    (B, T, Hq, D), (Bk, S, Hkv, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, S, Hkv, D], got {k.shape} and {v.shape}")
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {Bk}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim D, got {D} and {Dk}")
    if Hq % Hkv:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the number of kv heads Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    normalizer = normalizers.get(normalizer)
    if isinstance(normalizer, normalizers.Softplus):
        given = [name for name, value in (("scale", scale), ("alibi_slopes", alibi_slopes), ("return_lse", return_lse))
                 if value is not None and value is not False]
        if given:
            raise ValueError(f"normalizer='softplus' sets its own scores (log d · log N · cosine) and has no "
                             f"log-sum-exp; it cannot take {', '.join(given)}")
    if alibi_slopes is not None and tuple(np.shape(alibi_slopes)) != (Hq,):
        raise ValueError(f"alibi_slopes must have shape [Hq] = ({Hq},), got {tuple(np.shape(alibi_slopes))}")
    if not isinstance(mask, masks.Mask):
        raise ValueError(f"mask must be a pallas_kernels.masks.Mask (e.g. masks.Causal(), or masks.parse(spec)), "
                         f"got {mask!r}")

    if S != T and (segment_ids is None) != (kv_segment_ids is None):
        missing = "kv_segment_ids" if kv_segment_ids is None else "segment_ids"
        raise ValueError(f"{missing} is required when the other is given and S != T (S={S}, T={T})")
    segment_ids = kv_segment_ids if segment_ids is None else segment_ids
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    if segment_ids is not None:
        _check_segment_ids("segment_ids", segment_ids, B, T, "T")
        _check_segment_ids("kv_segment_ids", kv_segment_ids, B, S, "S")

    if isinstance(q_offset, numbers.Integral) and not isinstance(q_offset, bool):
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        q_offset = int(q_offset)
    elif np.shape(q_offset) == () and jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
        q_offset = jnp.asarray(q_offset, jnp.int32)
    else:
        raise ValueError(f"q_offset must be an int or an integer scalar array, got {q_offset!r}")
    mask.validate(T, S, q_offset)
    return segment_ids, kv_segment_ids, q_offset, normalizer


def attention_mask(mask: masks.Mask, T: int, S: int, *, q_offset: int | jax.Array = 0,
                   segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                   num_heads: int = 1) -> jax.Array:
    """Where query t of head h may attend to key s: bool [1 or B, Hm, T, S] (B with segment ids; Hm = num_heads for
    a `per_head` mask, else 1).

    The mask is evaluated on iotas (q_offset may be traced), so XLA fuses it rather than embedding a [T, S] constant.
    With segment ids, a mask that is not `relative` is evaluated on positions within each segment.
    """
    q_idx = jnp.arange(T, dtype=jnp.int32)[None, None, :, None] + q_offset
    kv_idx = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
    heads = jnp.arange(num_heads if mask.per_head else 1, dtype=jnp.int32)[None, :, None, None]
    if segment_ids is None:
        return jnp.broadcast_to(mask(q_idx, kv_idx, heads), (1, heads.shape[1], T, S))
    q_seg, kv_seg = segment_ids[:, None, :, None], kv_segment_ids[:, None, None, :]
    same_segment = q_seg == kv_seg
    if not mask.relative:
        first_key = jnp.min(jnp.where(same_segment, kv_idx, S), axis=-1, keepdims=True)  # [B, 1, T, 1]; S if none
        q_idx, kv_idx = q_idx - first_key, kv_idx - run_starts(kv_segment_ids)[:, None, None, :]
    return mask(q_idx, kv_idx, heads) & same_segment & (q_seg != 0)


def run_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, S] int ids → int32 [B, S]: the index where each key's run of equal ids begins, in O(S)."""
    S = segment_ids.shape[1]
    iota = jnp.arange(S, dtype=jnp.int32)
    begins = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(begins, iota, 0), axis=1)


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [B, T, Hq, D] → [B, T, Hkv, G, D] (query head h = kv_head · G + g)."""
    B, T, Hq, D = q.shape
    return q.reshape(B, T, num_kv_heads, Hq // num_kv_heads, D)


def grouped_allowed(allowed: jax.Array, num_kv_heads: int) -> jax.Array:
    """allowed [B or 1, Hq or 1, T, S] → [B or 1, Hkv or 1, G or 1, T, S], to broadcast against grouped logits."""
    B, H, T, S = allowed.shape
    if H == 1:
        return allowed[:, :, None]
    return allowed.reshape(B, num_kv_heads, H // num_kv_heads, T, S)


def _grouped_logits(q: jax.Array, k: jax.Array, scale: float, alibi_slopes: jax.Array | None = None,
                    q_offset: int | jax.Array = 0) -> jax.Array:
    """q [B, T, Hq, D], k [B, S, Hkv, D] → float32 logits [B, Hkv, G, T, S], with the ALiBi term if slopes given."""
    Hkv = k.shape[2]
    logits = jnp.einsum("btkgd,bskd->bkgts", _grouped(q, Hkv), k, preferred_element_type=jnp.float32,
                        precision=_HIGHEST) * scale
    if alibi_slopes is not None:
        logits = logits + alibi_bias(alibi_slopes, q.shape[1], k.shape[1], q_offset).reshape(
            1, Hkv, -1, q.shape[1], k.shape[1])
    return logits


def alibi_bias(alibi_slopes: jax.Array, T: int, S: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """−slope_h · |i − s| for query i = q_offset + t and key s: float32 [Hq, T, S]."""
    distance = jnp.abs(jnp.arange(T, dtype=jnp.int32)[:, None] + q_offset - jnp.arange(S, dtype=jnp.int32)[None, :])
    return -jnp.asarray(alibi_slopes, jnp.float32)[:, None, None] * distance.astype(jnp.float32)


def _masked_softmax(logits: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis restricted to `allowed`, and its logsumexp; all-masked rows give 0 and -inf.

    The row max is taken over allowed entries only and replaced by 0 in empty rows, so no inf - inf is ever formed
    and every gradient stays finite.
    """
    masked = jnp.where(allowed, logits, -jnp.inf)
    nonempty = jnp.any(allowed, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(nonempty, jnp.max(masked, axis=-1, keepdims=True), 0.0))
    unnormalized = jnp.exp(masked - row_max)
    denom = jnp.sum(unnormalized, axis=-1, keepdims=True)
    safe_denom = jnp.where(nonempty, denom, 1.0)
    probs = unnormalized / safe_denom
    lse = jnp.where(nonempty, row_max + jnp.log(safe_denom), -jnp.inf)
    return probs, lse[..., 0]


def _heads_last(x: jax.Array) -> jax.Array:
    """[B, Hkv, G, T] → [B, T, Hq] with query head h = kv_head · G + g."""
    B, Hkv, G, T = x.shape
    return x.transpose(0, 3, 1, 2).reshape(B, T, Hkv * G)


def logsumexp(q: jax.Array, k: jax.Array, *, allowed: jax.Array, scale: float,
              alibi_slopes: jax.Array | None = None, q_offset: int | jax.Array = 0) -> jax.Array:
    """log Σ_{s allowed} exp(logits): q [B, T, Hq, D], k [B, S, Hkv, D], allowed bool [B or 1, Hq or 1, T, S]
    → float32 [B, T, Hq], -inf where a row allows nothing. Differentiable."""
    _, lse = _masked_softmax(_grouped_logits(q, k, scale, alibi_slopes, q_offset), grouped_allowed(allowed, k.shape[2]))
    return _heads_last(lse)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *, scale: float,
                      alibi_slopes: jax.Array | None = None, q_offset: int | jax.Array = 0):
    """Softmax attention where `allowed` [B or 1, Hq or 1, T, S] says which keys each query sees: (out [B, T, Hq, D]
    float32, lse [B, T, Hq] float32), 0 and -inf on rows that see nothing."""
    B, T, Hq, D = q.shape
    probs, lse = _masked_softmax(_grouped_logits(q, k, scale, alibi_slopes, q_offset),
                                 grouped_allowed(allowed, k.shape[2]))
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(B, T, Hq, D), _heads_last(lse)


def softmax_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, out: jax.Array,
                               lse: jax.Array, dout: jax.Array, *, scale: float, dlse: jax.Array | None = None):
    """The gradient of softmax attention over these keys given the rows' out [B, T, Hq, D] and lse [B, T, Hq], which
    may be those of attention over more keys (ring attention: this key shard's share of the full gradient):

        P = exp(S − lse) where allowed,  dV = Pᵀ·dO,  dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ out) + dlse),  dQ = scale·dS·K,
        dK = scale·dSᵀ·Q,

    with dlse [B, T, Hq] the cotangent of the rows' lse (None: 0).

    Returns (dq, dk, dv) float32 in the shapes of q, k, v; rows with lse = -inf contribute nothing."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    logits = _grouped_logits(q, k, scale)  # [B, Hkv, G, T, S]
    row_lse = _grouped(lse[..., None], Hkv)[..., 0].transpose(0, 2, 3, 1)[..., None]  # [B, Hkv, G, T, 1]
    row_lse = jnp.where(jnp.isneginf(row_lse), jnp.inf, row_lse)
    probs = jnp.where(grouped_allowed(allowed, Hkv), jnp.exp(logits - row_lse), 0.0)
    dout_g = _grouped(dout.astype(jnp.float32), Hkv)  # [B, T, Hkv, G, D]
    delta = jnp.einsum("btkgd,btkgd->bkgt", dout_g, _grouped(out.astype(jnp.float32), Hkv))
    if dlse is not None:
        delta = delta - _grouped(dlse[..., None].astype(jnp.float32), Hkv)[..., 0].transpose(0, 2, 3, 1)
    dv = jnp.einsum("bkgts,btkgd->bskd", probs, dout_g, precision=_HIGHEST)
    dprobs = jnp.einsum("btkgd,bskd->bkgts", dout_g, v.astype(jnp.float32), precision=_HIGHEST)
    dlogits = probs * (dprobs - delta[..., None]) * scale
    dq = jnp.einsum("bkgts,bskd->btkgd", dlogits, k.astype(jnp.float32), precision=_HIGHEST).reshape(B, T, Hq, D)
    dk = jnp.einsum("bkgts,btkgd->bskd", dlogits, _grouped(q.astype(jnp.float32), Hkv), precision=_HIGHEST)
    return dq, dk, dv


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks.Mask,
                        segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                        normalizer: str | normalizers.Normalizer = "softmax", scale: float | None = None,
                        q_offset: int | jax.Array = 0, alibi_slopes: jax.Array | None = None,
                        return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention by the formula in the module docstring.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; segment_ids: [B, T] int; kv_segment_ids: [B, S] int (defaults to
    segment_ids when S == T); q_offset: absolute position of query row 0 (int or traced int32 scalar); scale defaults
    to 1/sqrt(D); alibi_slopes: [Hq] float. Returns out [B, T, Hq, D] in q.dtype, and lse [B, T, Hq] float32 if
    return_lse.
    """
    segment_ids, kv_segment_ids, q_offset, normalizer = check_arguments(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, normalizer=normalizer,
        q_offset=q_offset, scale=scale, alibi_slopes=alibi_slopes, return_lse=return_lse)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    allowed = attention_mask(mask, T, S, q_offset=q_offset, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                             num_heads=Hq)
    if isinstance(normalizer, normalizers.Softplus):
        probs, lse = normalizer.weights(_grouped(q, Hkv), k, grouped_allowed(allowed, Hkv)), None
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=_HIGHEST)
        out = out.reshape(B, T, Hq, D).astype(q.dtype)
    else:
        out, lse = softmax_attention(q, k, v, allowed, scale=D ** -0.5 if scale is None else scale,
                                     alibi_slopes=alibi_slopes, q_offset=q_offset)
        out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
