"""Dataset Decomposition with a variable-sequence-length curriculum.

Pouransari et al., "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum",
NeurIPS 2024 (arXiv 2405.13226); reference code: github.com/apple/ml-dataset-decomposition.

Decomposition (paper §2.1; `get_binary` in the reference `make_dd_buckets.py`, non-random variant). A document of
length l is cut, from its start, into pieces of `seq_len` tokens while at least `seq_len` remain; the remainder
r = 2^i1 + 2^i2 + ... (i1 > i2 > ...) is cut by its binary representation into contiguous pieces of 2^i1, 2^i2, ...
tokens, longest first, in document order (1300 → 1024 + 256 + 16 + 4). A piece of 2^i tokens goes to bucket D_i;
pieces shorter than `min_len` are dropped (the paper's D_{≥256} mixtures drop them too). Every token appears in at
most one piece and every piece comes from one document, so no sequence ever mixes documents.

Batches. Every step draws one bucket and a batch of `tokens_per_step // 2^i` pieces of it: one piece per row, segment
id 1 throughout, positions 0..2^i-1, no padding, so every step holds `tokens_per_step` tokens (paper §2.2). Within a
bucket, the pieces of several components are mixed by weight (grain `MapDataset.mix`), each component's pieces
shuffled and repeated, reshuffled every epoch.

Which bucket step t draws is a pure function of (seed, t, curriculum, `bucket_weights`, steps, cycles, odds_base),
so data shards that build their own iterators draw the same bucket at every step (pass them the same
`bucket_weights`: see `decomposed_batches`). `bucket_weights[i]` is the share of the training tokens that bucket i
provides; by default the natural mix, each bucket's share of the components' tokens (paper Table 1 "Natural").
Curricula (`CURRICULA`):

- "fixed": every step draws bucket i independently with probability `bucket_weights[i]`.
- "short_to_long" (paper Algorithm 1 with c = 1 cycle; "Grow-P<odds_base>" of Table 2): the `steps` steps hold
  n_i = round(steps · bucket_weights[i]) batches of bucket i. Step by step, a bucket is drawn with probability
  ∝ n_i · o_i among the buckets with batches left, where o_i = odds_base^(K-1-i) for the K buckets from shortest
  (i = 0) to longest: short buckets are used up first, long ones fill the end. The odds are multiplied by n_i as in
  the reference `get_dd_params.py` (Algorithm 1 lists o_i alone, for buckets of equal size); so odds_base = 1 is no
  curriculum (a uniformly random order of the batches), 2 is the paper's Grow-P2, 100 its Grow-P100.
- "cyclic" (Algorithm 1 with c = `cycles`, Table 2's "8 cycles"): the steps split into `cycles` consecutive cycles
  of about steps / cycles steps, each holding its own n_i and drawn as in "short_to_long".

After `steps` the schedule starts again (new draws, same shape). Drawing "with batches left, in proportion to the
odds" is simulated exactly with competing exponential clocks: bucket i's batches arrive at the jumps of a Poisson
process of rate n_i · o_i, and the cycle's order is the order of arrival.
"""

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

CURRICULA = ("fixed", "short_to_long", "cyclic")
_FIXED_BLOCK = 4096  # "fixed" draws the buckets of steps [k·block, (k+1)·block) from one generator.


def _is_power_of_two(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and value > 0 and value & (value - 1) == 0


def _check_lengths(seq_len: int, min_len: int) -> None:
    if not _is_power_of_two(seq_len):
        raise ValueError(f"Dataset Decomposition needs data.seq_len to be a power of two, got {seq_len!r}")
    if not _is_power_of_two(min_len) or min_len > seq_len:
        raise ValueError(f"data.decomposition.min_len must be a power of two <= data.seq_len={seq_len}, "
                         f"got {min_len!r}")


def bucket_lengths(seq_len: int, min_len: int) -> list[int]:
    """The bucket lengths min_len, 2·min_len, ..., seq_len, shortest first."""
    _check_lengths(seq_len, min_len)
    return [1 << i for i in range(min_len.bit_length() - 1, seq_len.bit_length())]


def batch_shapes(*, seq_len: int, min_len: int, tokens_per_step: int) -> list[tuple[int, int]]:
    """Every (rows, length) a batch can have, shortest length first: `tokens_per_step // length` rows of each
    bucket length (whether or not the data fills that bucket)."""
    _check_tokens_per_step(tokens_per_step, seq_len)
    return [(tokens_per_step // length, length) for length in bucket_lengths(seq_len, min_len)]


def decompose(length: int, seq_len: int, min_len: int) -> list[tuple[int, int]]:
    """The (start, size) pieces of a document of `length` tokens, in document order (see the module docstring)."""
    _check_lengths(seq_len, min_len)
    pieces = [(start, seq_len) for start in range(0, length - seq_len + 1, seq_len)]
    start, rest = len(pieces) * seq_len, length % seq_len
    for bit in reversed(range(rest.bit_length())):
        size = 1 << bit
        if rest & size:
            if size >= min_len:
                pieces.append((start, size))
            start += size
    return pieces


def _piece_index(lengths: np.ndarray, seq_len: int, min_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per bucket (shortest first), the (document index, start) of each of its pieces, in document order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    full, rest = lengths // seq_len, lengths % seq_len
    index = []
    for length in bucket_lengths(seq_len, min_len)[:-1]:
        docs = np.flatnonzero(rest & length)
        index.append((docs, full[docs] * seq_len + (rest[docs] & -(2 * length))))
    docs = np.repeat(np.arange(len(lengths)), full)
    first_of_doc = np.repeat(np.cumsum(full) - full, full)
    index.append((docs, (np.arange(len(docs)) - first_of_doc) * seq_len))
    return index


def bucket_token_counts(lengths: np.ndarray, *, seq_len: int, min_len: int) -> tuple[np.ndarray, int]:
    """(tokens in each bucket, shortest first, as int64 [K]; tokens dropped in pieces shorter than min_len)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rest = lengths % seq_len
    counts = [int(np.sum(rest & length)) for length in bucket_lengths(seq_len, min_len)[:-1]]
    counts.append(int(np.sum(lengths - rest)))
    return np.array(counts, dtype=np.int64), int(np.sum(rest & (min_len - 1)))


def natural_bucket_weights(components: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """The natural mix: bucket i's share Σ_c w_c · tokens_ci / Σ_j tokens_cj of the components, given as
    (`bucket_token_counts(...)[0]`, weight w_c) pairs. Sum per-shard counts first to get every shard's common mix."""
    mix = None
    for counts, weight in components:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.sum() > 0 and weight > 0:
            share = weight * counts / counts.sum()
            mix = share if mix is None else mix + share
    if mix is None:
        raise ValueError("Dataset Decomposition found no piece of at least min_len tokens in any component")
    return mix / mix.sum()


def _check_tokens_per_step(tokens_per_step: int, seq_len: int) -> None:
    if not isinstance(tokens_per_step, (int, np.integer)) or tokens_per_step < seq_len or tokens_per_step % seq_len:
        raise ValueError(f"tokens_per_step must be a positive multiple of seq_len={seq_len} (train.batch_size × "
                         f"data.seq_len per data shard), got {tokens_per_step!r}")


def _check_curriculum(curriculum: str, steps: int, cycles: int, odds_base: float) -> None:
    if curriculum not in CURRICULA:
        raise ValueError(f"data.decomposition.curriculum must be one of {CURRICULA}, got {curriculum!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"the curriculum's steps (train.steps) must be a positive int, got {steps!r}")
    if not isinstance(cycles, (int, np.integer)) or not 1 <= cycles <= steps:
        raise ValueError(f"data.decomposition.cycles must be an int in [1, train.steps={steps}], got {cycles!r}")
    if curriculum != "cyclic" and cycles != 1:
        raise ValueError(f"data.decomposition.cycles={cycles} needs data.decomposition.curriculum='cyclic', "
                         f"got {curriculum!r}")
    if not odds_base > 0:
        raise ValueError(f"odds_base must be > 0, got {odds_base!r}")


def check(*, seq_len: int, min_len: int, curriculum: str, cycles: int = 1, steps: int | None = None,
          odds_base: float = 2.0) -> None:
    """Raises ValueError naming the first decomposition setting that `decomposed_batches` would refuse (cycles are
    checked against steps only when steps is given)."""
    _check_lengths(seq_len, min_len)
    _check_curriculum(curriculum, steps if steps is not None else max(cycles, 1), cycles, odds_base)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers n_i >= 0 with Σ n_i = total closest to total · weights (largest remainders; ties to the shorter)."""
    exact = total * weights
    counts = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(weights)), -(exact - counts)))
    counts[order[:total - counts.sum()]] += 1
    return counts


def _cycle_order(cycle: int, length: int, weights: np.ndarray, odds_base: float, seed: int) -> np.ndarray:
    """The bucket of each step of one cycle: Algorithm 1's draws, as the arrival order of competing Poisson
    processes (bucket i: n_i arrivals at rate n_i · o_i)."""
    counts = _apportion(length, weights)
    odds = counts * float(odds_base) ** np.arange(len(weights) - 1, -1, -1, dtype=np.float64)
    rng = np.random.default_rng([seed, cycle, 1])
    buckets = np.repeat(np.arange(len(weights)), counts)
    times = np.concatenate([np.cumsum(rng.exponential(1.0, n)) / rate for n, rate in zip(counts, odds) if n])
    return buckets[np.argsort(times, kind="stable")]


class BucketSchedule:
    """The bucket of every step (see the module docstring); `buckets(start, stop)` for steps [start, stop)."""

    def __init__(self, *, curriculum: str, bucket_weights: Sequence[float], steps: int, cycles: int = 1,
                 seed: int = 0, odds_base: float = 2.0):
        _check_curriculum(curriculum, steps, cycles, odds_base)
        weights = np.asarray(bucket_weights, dtype=np.float64)
        if weights.ndim != 1 or not len(weights) or np.any(weights < 0) or not np.isfinite(weights).all() \
                or weights.sum() <= 0:
            raise ValueError(f"bucket_weights must be non-negative numbers, not all 0, got {bucket_weights!r}")
        self.curriculum, self.steps, self.cycles, self.seed, self.odds_base = curriculum, steps, cycles, seed, odds_base
        self.weights = weights / weights.sum()
        self._bounds = [j * steps // cycles for j in range(cycles + 1)]
        self._cache: dict[int, np.ndarray] = {}

    def _block(self, key: int) -> np.ndarray:
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            if self.curriculum == "fixed":
                rng = np.random.default_rng([self.seed, key, 0])
                order = rng.choice(len(self.weights), size=_FIXED_BLOCK, p=self.weights)
            else:
                j = key % self.cycles
                order = _cycle_order(key, self._bounds[j + 1] - self._bounds[j], self.weights, self.odds_base,
                                     self.seed)
            self._cache[key] = order
        return self._cache[key]

    def buckets(self, start: int, stop: int) -> np.ndarray:
        """Bucket indices (0 = shortest) of steps [start, stop)."""
        parts = []
        step = start
        while step < stop:
            if self.curriculum == "fixed":
                key, offset = divmod(step, _FIXED_BLOCK)
                end = min(stop, (key + 1) * _FIXED_BLOCK)
            else:
                epoch, in_epoch = divmod(step, self.steps)
                j = int(np.searchsorted(self._bounds, in_epoch, side="right")) - 1
                key, offset = epoch * self.cycles + j, in_epoch - self._bounds[j]
                end = min(stop, epoch * self.steps + self._bounds[j + 1])
            parts.append(self._block(key)[offset:offset + end - step])
            step = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class _ReadPiece:
    """Piece k of one component's bucket → `length` tokens of its document."""

    def __init__(self, documents: grain.MapDataset, doc_index: np.ndarray, starts: np.ndarray, length: int):
        self.documents, self.doc_index, self.starts, self.length = documents, doc_index, starts, length

    def __call__(self, k: int) -> np.ndarray:
        doc, start = int(self.doc_index[k]), int(self.starts[k])
        piece = np.asarray(self.documents[doc], dtype=np.int32)[start:start + self.length]
        if len(piece) != self.length:
            raise ValueError(f"document {doc} is shorter than its given length (piece [{start}, "
                             f"{start + self.length}) has {len(piece)} tokens): the lengths passed with a component "
                             f"must be its documents' token counts")
        return piece


class DecomposedBatches(grain.DatasetIterator):
    """The iterator of `decomposed_batches`. Its state is JSON: {"step", "consumed"} (batches drawn so far from each
    bucket), so `grain.checkpoint.CheckpointSave` / `CheckpointRestore` save and restore it."""

    def __init__(self, buckets: Sequence[grain.MapDataset | None], lengths: Sequence[int], schedule: BucketSchedule,
                 start_step: int):
        super().__init__()
        self._buckets, self._lengths, self.schedule = list(buckets), list(lengths), schedule
        self._set_position(start_step, self._consumed_before(start_step))

    def _consumed_before(self, step: int) -> list[int]:
        counts = np.zeros(len(self._buckets), dtype=np.int64)
        for start in range(0, step, 1 << 20):
            counts += np.bincount(self.schedule.buckets(start, min(step, start + (1 << 20))),
                                  minlength=len(self._buckets))
        return [int(c) for c in counts]

    def _set_position(self, step: int, consumed: Sequence[int]) -> None:
        self._step, self._consumed = int(step), [int(c) for c in consumed]

    def __next__(self) -> dict[str, np.ndarray]:
        bucket = int(self.schedule.buckets(self._step, self._step + 1)[0])
        length = self._lengths[bucket]
        tokens = np.asarray(self._buckets[bucket][self._consumed[bucket]], dtype=np.int32)
        self._consumed[bucket] += 1
        self._step += 1
        return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()}

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "consumed": list(self._consumed)}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["consumed"]) != len(self._buckets):
            raise ValueError(f"the saved decomposition state has {len(state['consumed'])} buckets, this iterator "
                             f"{len(self._buckets)}: resume with the data.seq_len and min_len that saved it")
        self._set_position(state["step"], state["consumed"])


def decomposed_batches(components: Sequence[tuple[grain.MapDataset, np.ndarray, float]], *, seq_len: int,
                       min_len: int, tokens_per_step: int, curriculum: str, steps: int, cycles: int = 1,
                       seed: int = 0, start_step: int = 0, odds_base: float = 2.0,
                       bucket_weights: Sequence[float] | None = None) -> DecomposedBatches:
    """The endless iterator of Dataset Decomposition batches (see the module docstring).

    components: (documents: random-access grain MapDataset of 1-D int documents, their lengths [num_docs] int,
      mixture weight) per source; within a bucket, pieces are drawn from the components in proportion to weight.
    tokens_per_step: tokens of every batch, a multiple of seq_len; a batch of bucket length L has
      tokens_per_step // L rows (`batch_shapes`).
    steps, cycles, odds_base: the curriculum (module docstring); start_step: the first step to yield.
    bucket_weights: each bucket's share of the tokens (shortest first; `natural_bucket_weights`). Default: the
      natural mix of these components. Data shards holding different documents must all pass the same weights
      (e.g. from the summed `bucket_token_counts` of every shard), or they draw different buckets.
    """
    _check_curriculum(curriculum, steps, cycles, odds_base)
    lengths = bucket_lengths(seq_len, min_len)
    _check_tokens_per_step(tokens_per_step, seq_len)
    if not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
    if not components:
        raise ValueError("decomposed_batches needs at least one (documents, lengths, weight) component")
    indexed = []
    for c, (documents, doc_lengths, weight) in enumerate(components):
        doc_lengths = np.asarray(doc_lengths)
        if doc_lengths.ndim != 1 or len(doc_lengths) != len(documents):
            raise ValueError(f"component {c}: {len(documents)} documents but lengths of shape {doc_lengths.shape}")
        if not weight >= 0:
            raise ValueError(f"component {c}: the mixture weight must be >= 0, got {weight!r}")
        indexed.append((documents, _piece_index(doc_lengths, seq_len, min_len), float(weight)))
    if bucket_weights is None:
        bucket_weights = natural_bucket_weights(
            [(np.array([len(docs) * length for (docs, _), length in zip(index, lengths)]), weight)
             for _, index, weight in indexed])
    if len(bucket_weights) != len(lengths):
        raise ValueError(f"bucket_weights needs one weight per bucket length {lengths}, got {len(bucket_weights)}")
    schedule = BucketSchedule(curriculum=curriculum, bucket_weights=bucket_weights, steps=steps, cycles=cycles,
                              seed=seed, odds_base=odds_base)
    seeds = np.random.SeedSequence([seed, 2]).spawn(len(components) * len(lengths))
    buckets = []
    for i, length in enumerate(lengths):
        parts, weights = [], []
        for c, (documents, index, weight) in enumerate(indexed):
            doc_index, starts = index[i]
            if len(doc_index) and weight > 0:
                shuffle_seed = int(seeds[c * len(lengths) + i].generate_state(1)[0])
                parts.append(grain.MapDataset.range(len(doc_index)).shuffle(seed=shuffle_seed).repeat()
                             .map(_ReadPiece(documents, doc_index, starts, length)))
                weights.append(weight)
        if not parts:
            if schedule.weights[i] > 0:
                raise ValueError(f"bucket {length} has weight {schedule.weights[i]:.3g} but no piece of {length} "
                                 f"tokens in these components: give it weight 0 in bucket_weights")
            buckets.append(None)
            continue
        mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
        buckets.append(mixed.batch(tokens_per_step // length))
    return DecomposedBatches(buckets, lengths, schedule, int(start_step))
