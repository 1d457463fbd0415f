"""Naive float64 numpy oracles the tests share: masks pair by pair, attention by loops, RoPE pair by pair."""

import itertools

import numpy as np


def naive_allowed(rule, T, S, q_offset, seg_q, seg_kv, B=2):
    """bool [B, T, S]: rule(i, j) on absolute positions (query i = q_offset + t); with segments, same non-padding
    segment and the rule on positions counted from the segment's first key."""
    allowed = np.zeros((B, T, S), bool)
    for b, t, s in itertools.product(range(B), range(T), range(S)):
        if seg_q is None:
            allowed[b, t, s] = rule(q_offset + t, s)
        elif seg_q[b, t] == seg_kv[b, s] != 0:
            first = list(seg_kv[b]).index(seg_kv[b, s])
            allowed[b, t, s] = rule(q_offset + t - first, s - first)
    return allowed


def naive_attention(q, k, v, allowed, scale, bias=None):
    """Softmax attention by loops: q [B, T, Hq, D], k, v [B, S, Hkv, D], allowed [B, T, S], bias [Hq, T, S] added
    to the logits → out [B, T, Hq, D], lse [B, T, Hq] (-inf on rows that allow nothing)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    B, T, H, D = q.shape
    out, lse = np.zeros((B, T, H, D)), np.full((B, T, H), -np.inf)
    for b, t, h in itertools.product(range(B), range(T), range(H)):
        keep = allowed[b, t]
        if keep.any():
            logits = k[b, keep, h] @ q[b, t, h] * scale
            if bias is not None:
                logits = logits + bias[h, t, keep]
            weights = np.exp(logits - logits.max())
            out[b, t, h] = weights @ v[b, keep, h] / weights.sum()
            lse[b, t, h] = logits.max() + np.log(weights.sum())
    return out, lse


def rotate(x, position, theta, rotary_dim):
    """x [..., D] rotated by `position` (a number) pair by pair in float64: (x_i, x_{i+R/2}) by position·theta^(-2i/R);
    dims past R unchanged."""
    out = np.asarray(x, np.float64).copy()
    half = rotary_dim // 2
    for i in range(half):
        angle = position * theta ** (-2.0 * i / rotary_dim)
        a, c = out[..., i].copy(), out[..., i + half].copy()
        out[..., i] = a * np.cos(angle) - c * np.sin(angle)
        out[..., i + half] = c * np.cos(angle) + a * np.sin(angle)
    return out


def naive_rope(x, pos, theta, rotary_dim):
    """x [B, T, H, D] with token (b, t) rotated by pos[b, t]."""
    out = np.asarray(x, np.float64).copy()
    for b, t in itertools.product(range(x.shape[0]), range(x.shape[1])):
        out[b, t] = rotate(x[b, t], pos[b, t], theta, rotary_dim)
    return out
