"""The arithmetic the kernels of every backend share, on values already loaded from a block (plain jnp).

Softmax runs in base 2 as FlashAttention-2 does: scores are scaled by scale · log2(e), so exp2 replaces exp and the
natural-log lse is (m + log2 l) · ln 2. Softplus helpers follow `normalizers.Softplus` (LSSA).
"""

import math

import jax
import jax.numpy as jnp

from pallas_kernels.flash import normalizers

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


def block_allowed(mask, q_start, kv_start, block_q: int, block_kv: int, head, *, partial: bool,
                  q_segment_ids=None, kv_segment_ids=None, iota_2d: bool = False):
    """bool [block_q, block_kv] of what queries q_start.. may see of keys kv_start.., or None when all is allowed.

    The mask is evaluated only on partial blocks; segment ids (int [block_q] and [block_kv]) always apply. iota_2d
    builds positions with 2-D iotas (Mosaic TPU has no 1-D vector layout to broadcast from)."""
    allowed = None
    if partial:
        if iota_2d:
            q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
            kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
        else:
            q_idx = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
            kv_idx = kv_start + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        allowed = mask(q_idx, kv_idx, head)
    if q_segment_ids is not None:
        q_seg, kv_seg = q_segment_ids.reshape(block_q, 1), kv_segment_ids.reshape(1, block_kv)
        same = (q_seg == kv_seg) & (q_seg != 0)
        allowed = same if allowed is None else allowed & same
    return allowed


def segments_meet(q_min, q_max, kv_min, kv_max):
    """Whether a query block with segment ids in [q_min, q_max] can see a key block with ids in [kv_min, kv_max]
    (ids >= 0; 0 is padding and sees nothing)."""
    return (q_min <= kv_max) & (kv_min <= q_max) & (q_max > 0) & (kv_max > 0)


def online_softmax(s, m_prev, l_prev):
    """One step of the online softmax on base-2 scores s [bq, bk] (-inf where masked) → (p, alpha, m, l): p = 2^(s -
    m), alpha rescales the previous sums. A row that has seen nothing keeps m = -inf and l = 0, never NaN."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    return p, alpha, m_next, alpha * l_prev + jnp.sum(p, axis=-1)


def softmax_lse(m, l):
    """Natural-log lse from the base-2 running max m and sum l; -inf on rows that saw nothing."""
    return jnp.where(l > 0, (m + jnp.log2(jnp.where(l > 0, l, 1.0))) * LN_2, -jnp.inf)


def backward_lse2(lse):
    """The base-2 lse the backward subtracts: +inf on empty rows, so their probabilities 2^(s − lse) are 0."""
    return jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2_E)


def _exp_neg_abs(x):
    return jnp.exp2(-jnp.abs(x) * LOG2_E)


def _log1p_small(e):
    """log(1 + e) for e in (0, 1]: a Taylor series below 2^-6 (where 1 + e would round e away), else log2."""
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return jnp.where(e < 2.0 ** -6, series, jnp.log2(1.0 + e) * LN_2)


def softplus(x):
    """log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), from one exp2 and one log2 (no libdevice log1p)."""
    return jnp.maximum(x, 0.0) + _log1p_small(_exp_neg_abs(x))


def sigmoid(x):
    e = _exp_neg_abs(x)
    return jnp.where(x >= 0, 1.0, e) / (1.0 + e)


def softplus_and_sigmoid(x):
    """(softplus(x), sigmoid(x)) sharing e = e^-|x|: sigmoid is 1 / (1 + e) for x >= 0 and e / (1 + e) below."""
    e = _exp_neg_abs(x)
    return jnp.maximum(x, 0.0) + _log1p_small(e), jnp.where(x >= 0, 1.0, e) / (1.0 + e)


def softplus_row_factor(num_keys, row_scale, head_dim: int):
    """f_i = log(d) · log(max(N_i, 1)) / |q_i|: scores are f_i · (q_i·k_j) · u_j."""
    return math.log(head_dim) * jnp.log(jnp.maximum(num_keys, 1.0)) * row_scale


def _offset(normalizer: normalizers.Softplus, num_keys):
    return jnp.where(num_keys <= normalizer.offset_free_keys, 0.0, normalizer.offset)


def reweight_peak(normalizer: normalizers.Softplus, num_keys, row_sum, largest):
    """P_i = relu(N_i · max_j softplus_ij / L_i − O_i), the largest excess of the row (0 when L_i = 0)."""
    inverse = 1.0 / jnp.where(row_sum > 0, row_sum, 1.0)
    return jnp.maximum(num_keys * largest * inverse - _offset(normalizer, num_keys), 0.0)


def reweighted(normalizer: normalizers.Softplus, softplus, num_keys, row_sum, peak):
    """Re-weighting's unnormalised weights and excesses from softplus_ij [bq, bk] (0 where masked) and the row's
    N_i, L_i, P_i [bq, 1]: e_ij = relu(N_i softplus_ij / L_i − O_i) and g_ij = (e_ij / P_i)^p on rows with P_i > 0,
    softplus_ij on the others (which keep the LSSA weights)."""
    inverse = 1.0 / jnp.where(row_sum > 0, row_sum, 1.0)
    excess = jnp.maximum(num_keys * softplus * inverse - _offset(normalizer, num_keys), 0.0)
    ratio = excess / jnp.where(peak > 0, peak, 1.0)
    sharpened = jnp.where(ratio > 0, jnp.exp2(normalizer.power * jnp.log2(jnp.where(ratio > 0, ratio, 1.0))), 0.0)
    return jnp.where(peak > 0, sharpened, softplus), excess


def check_normalizer(normalizer) -> str | None:
    """Why a backend without re-weighting cannot serve `normalizer` (the Triton kernels have it), or None."""
    if isinstance(normalizer, normalizers.Softplus) and normalizer.reweight:
        return "the softplus normaliser's re-weighting (reweight=True) is in the triton kernels only"
    return None
