"""Perplexity at a given context length, and the unigram baseline beside it.

Perplexity over N windows of L tokens is exp(mean over the N·(L−1) predicted tokens of −log p(x_{t+1} | x_{≤t})).
Windows are the first L tokens of the first N held-out documents at least as long as the longest length evaluated,
so every length reads the same documents and ppl@L differs from ppl@L' only by the tokens L' < t ≤ L and the context
they see. This is the protocol of Position Interpolation (Chen et al., 2023) and YaRN (Peng et al., 2023): each
document truncated at every length. Which documents qualify depends on the longest length asked for, so numbers are
comparable between evaluations with the same --lengths maximum and --num_documents (the report records both).
"""

import jax
import jax.numpy as jnp
import numpy as np

from longctx.train.loss import next_token_losses


def eval_windows(token_docs: list[np.ndarray], lengths: list[int], num_documents: int) -> dict[int, np.ndarray]:
    """{L: [n, L] int32}: the first L tokens of the first `num_documents` documents with at least max(lengths)."""
    longest = max(lengths)
    chosen = [doc for doc in token_docs if len(doc) >= longest][:num_documents]
    if not chosen:
        raise ValueError(
            f"no held-out document has {longest} tokens or more (the longest has "
            f"{max((len(d) for d in token_docs), default=0)}); evaluate at shorter --lengths or on longer documents"
        )
    return {length: np.stack([doc[:length] for doc in chosen]).astype(np.int32) for length in lengths}


def model_nll(model, params, windows: np.ndarray, batch_size: int) -> np.ndarray:
    """Per-position loss [n, L-1] (float64) of `model` on `windows` [n, L], in batches of `batch_size`."""

    @jax.jit
    def batch_nll(params, tokens):
        logits = model.apply({"params": params}, tokens)
        nll, _ = next_token_losses(logits, tokens)
        return nll

    pieces = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        padded = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        pieces.append(np.asarray(batch_nll(params, jnp.asarray(padded)), np.float64)[: len(batch)])
    return np.concatenate(pieces)


def unigram_log_probs(token_docs: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """log p(token) [vocab_size] from counts over `token_docs`, add-one smoothed."""
    counts = np.bincount(np.concatenate(token_docs), minlength=vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def perplexity(nll: np.ndarray) -> dict[str, float]:
    mean = float(np.mean(nll))
    return {"loss": mean, "ppl": float(np.exp(mean)), "tokens": int(nll.size)}


def unigram_nll(log_probs: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The unigram model's loss [n, L-1] on the same predicted tokens as `model_nll`."""
    return -log_probs[windows[:, 1:]]


def sliding_nll(model, params, documents: np.ndarray, window: int, stride: int, batch_size: int) -> np.ndarray:
    """Per-token loss [n, M-1] of `documents` [n, M] read through a sliding window of `window` tokens moved by
    `stride`: the first window predicts its own tokens, each later window [e − window, e) only the `stride` tokens
    that end it (the last may overlap less), so every token is predicted once, with up to window − 1 tokens of
    context. The sliding-window protocol of Press et al. (ALiBi, 2022) and HF's "perplexity of fixed-length models",
    used by Position Interpolation and YaRN (stride 256). At window = M it is `model_nll` on the whole documents."""
    n, M = documents.shape
    if not 1 <= stride <= window <= M:
        raise ValueError(f"sliding-window perplexity needs 1 <= stride <= window <= document length, got stride "
                         f"{stride}, window {window}, length {M}")
    ends = list(range(window, M + 1, stride))
    if ends[-1] != M:
        ends.append(M)
    windows = np.stack([documents[:, end - window:end] for end in ends], axis=1).reshape(-1, window)
    losses = model_nll(model, params, windows, batch_size).reshape(n, len(ends), window - 1)
    nll = np.empty((n, M - 1), np.float64)
    nll[:, : window - 1] = losses[:, 0]
    for i in range(1, len(ends)):
        new = ends[i] - ends[i - 1]  # tokens this window predicts first: the last `new` of its window - 1 targets
        nll[:, ends[i] - 1 - new: ends[i] - 1] = losses[:, i, window - 1 - new:]
    return nll


def loss_by_position(nll: np.ndarray, num_bins: int = 32) -> dict[str, list[float]]:
    """Mean loss [n, L-1] over documents, averaged within `num_bins` log-spaced bins of the predicted token's position
    (1 .. L-1): {"position": each bin's mean position, "loss": its mean loss, "tokens": tokens in it}. The per-position
    curve of LM-Infinite (Han et al., 2024, Fig. 1) and YaRN: loss that stays flat past the training length means
    the model uses (or at least survives) the longer context."""
    positions = np.arange(1, nll.shape[1] + 1)
    edges = np.unique(np.round(np.geomspace(1, nll.shape[1] + 1, num_bins + 1)).astype(int))
    per_position = nll.mean(axis=0)
    curve = {"position": [], "loss": [], "tokens": []}
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (positions >= low) & (positions < high)
        if chosen.any():
            curve["position"].append(float(positions[chosen].mean()))
            curve["loss"].append(float(per_position[chosen].mean()))
            curve["tokens"].append(int(chosen.sum() * nll.shape[0]))
    return curve
