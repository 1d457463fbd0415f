"""Packing modes: the batch invariants, documents rebuilt from the batches, exact resumption from the state."""

import collections

import grain
import numpy as np
import pytest

from longctx.data.packing import (PACKING_MODES, packed_batches, packing_stats, padding_fraction, split_into_pieces,
                                  tokenize_documents)
from longctx.data.tokenizers import ByteTokenizer
from resume_checks import assert_orbax_round_trip, assert_resumes_from_state

SEQ_LEN, BATCH, PAD, BOS = 16, 4, 256, 257


def random_docs(num_docs: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Framed documents of 2..3·SEQ_LEN tokens: BOS, then random bytes (never PAD or BOS)."""
    rng = np.random.default_rng(seed)
    return [np.concatenate([[BOS], rng.integers(0, 256, size=int(rng.integers(1, 3 * SEQ_LEN)))]).astype(np.int32)
            for _ in range(num_docs)]


def finite(docs: list[np.ndarray]) -> grain.IterDataset:
    return grain.MapDataset.source(docs).to_iter_dataset()


def endless(docs: list[np.ndarray], seed: int = 0) -> grain.IterDataset:
    return grain.MapDataset.source(docs).shuffle(seed=seed).repeat().to_iter_dataset()


def segments(batch: dict[str, np.ndarray]) -> list[list[tuple[int, ...]]]:
    """Per row, the token tuple of each of its segments."""
    return [[tuple(tokens[segment_ids == s].tolist()) for s in range(1, segment_ids.max() + 1)]
            for tokens, segment_ids in zip(batch["tokens"], batch["segment_ids"])]


def check_batch(batch: dict[str, np.ndarray], rows: int = BATCH) -> None:
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for value in batch.values():
        assert value.shape == (rows, SEQ_LEN) and value.dtype == np.int32
    for tokens, segment_ids, positions in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
        used = int(np.count_nonzero(segment_ids))
        assert used > 0 and np.all(segment_ids[used:] == 0), "padding is a suffix of the row"
        steps = np.diff(segment_ids[:used], prepend=0)
        assert set(steps.tolist()) <= {0, 1} and steps[0] == 1, "segments run 1, 2, ..., k"
        starts = steps == 1
        assert np.all(positions[:used][starts] == 0), "positions restart at each segment"
        assert np.all(positions[1:used][~starts[1:]] == positions[:used - 1][~starts[1:]] + 1), "positions count up"
        assert np.all(tokens[used:] == PAD) and np.all(positions[used:] == 0)
        assert np.all(tokens[:used] != PAD)


def test_tokenize_documents_frames_each_document():
    tokenizer = ByteTokenizer()
    docs = tokenize_documents(["ab", "", "é"], tokenizer)
    assert [d.tolist() for d in docs] == [[257, 97, 98, 258], [257, 258], [257, 0xC3, 0xA9, 258]]
    assert all(d.dtype == np.int32 for d in docs)


def test_split_into_pieces_keeps_every_token_in_order():
    docs = [np.arange(10), np.arange(3), np.arange(4)]
    pieces = split_into_pieces(docs, 4)
    assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="max_len"):
        split_into_pieces(docs, 0)


@pytest.mark.parametrize("mode", PACKING_MODES)
def test_batches_keep_the_invariants(mode):
    iterator = iter(packed_batches(endless(random_docs()), mode=mode, seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD))
    batches = [next(iterator) for _ in range(30)]
    for batch in batches:
        check_batch(batch)
    padding = np.mean([padding_fraction(b) for b in batches])
    assert padding == 0 if mode == "concat" else 0 < padding < 0.5


def test_concat_rows_are_the_stream_cut_every_seq_len():
    """Rebuilt in order, the rows are the stream; segments break at every document start and every row start."""
    docs = random_docs()
    batches = list(packed_batches(finite(docs), mode="concat", seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD))
    for batch in batches:
        check_batch(batch, rows=len(batch["tokens"]))  # The stream's last row is padded with PAD.
    rows = [row for batch in batches for row in segments(batch)]
    stream = np.concatenate(docs)
    breaks = sorted(set(np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()) | set(range(0, len(stream), SEQ_LEN)))
    expected = [tuple(piece.tolist()) for piece in np.split(stream, breaks[1:])]
    assert [segment for row in rows for segment in row] == expected
    assert all(sum(map(len, row)) == SEQ_LEN for row in rows[:-1]), "only the stream's last row is short"


@pytest.mark.parametrize("mode", ["first_fit", "best_fit"])
@pytest.mark.parametrize("num_packing_bins", [None, 3])
def test_bin_packing_never_splits_a_document_of_at_most_seq_len(mode, num_packing_bins):
    """The segments are exactly the documents (those longer than SEQ_LEN cut in SEQ_LEN pieces), each once."""
    docs = random_docs()
    assert any(len(d) > SEQ_LEN for d in docs) and any(len(d) <= SEQ_LEN for d in docs)
    found = collections.Counter()
    for batch in packed_batches(finite(docs), mode=mode, seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD,
                                num_packing_bins=num_packing_bins):
        found.update(segment for row in segments(batch) for segment in row)
    assert found == collections.Counter(tuple(p.tolist()) for p in split_into_pieces(docs, SEQ_LEN))


def test_best_fit_puts_a_document_in_the_fullest_row_it_fits():
    docs = [np.full(n, i, dtype=np.int32) for i, n in enumerate([6, 12, 3, 16])]  # 16 fits nowhere: new round.
    first = next(iter(packed_batches(finite(docs), mode="first_fit", seq_len=SEQ_LEN, batch_size=2, pad_id=PAD,
                                     num_packing_bins=2)))
    best = next(iter(packed_batches(finite(docs), mode="best_fit", seq_len=SEQ_LEN, batch_size=2, pad_id=PAD,
                                    num_packing_bins=2)))
    rows = lambda batch: sorted(tuple(sorted(set(row) - {PAD})) for row in batch["tokens"].tolist())
    assert rows(first) == [(0, 2), (1,)]  # 3 goes to the first row with room, [6].
    assert rows(best) == [(0,), (1, 2)]  # 3 goes to the fullest row with room, [12].


def test_same_seed_same_batches_other_seed_other_rows():
    def first(seed):
        iterator = iter(packed_batches(endless(random_docs()), mode="first_fit", seq_len=SEQ_LEN, batch_size=BATCH,
                                       pad_id=PAD, seed=seed, num_packing_bins=2 * BATCH))
        return np.stack([next(iterator)["tokens"] for _ in range(5)])

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


@pytest.mark.parametrize("mode,num_packing_bins", [("concat", None), ("first_fit", None), ("first_fit", 3 * BATCH),
                                                   ("best_fit", 3 * BATCH)])  # 3·BATCH leaves states mid-round.
def test_restored_iterator_yields_the_same_batches(mode, num_packing_bins):
    def make():
        return iter(packed_batches(endless(random_docs()), mode=mode, seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD,
                                   num_packing_bins=num_packing_bins))

    assert_resumes_from_state(make, skip=7)


def test_orbax_round_trip_of_the_iterator(tmp_path):
    def make():
        return iter(packed_batches(endless(random_docs()), mode="best_fit", seq_len=SEQ_LEN, batch_size=BATCH,
                                   pad_id=PAD))

    assert_orbax_round_trip(make, tmp_path / "ckpt", skip=5)


def test_packing_stats_report_each_modes_waste():
    batch = {"tokens": np.array([[BOS, 1, 2, 3, BOS, 5, PAD, PAD], [7, 8, BOS, 9, 9, 9, 9, 9]]),
             "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 2, 2]])}
    stats = packing_stats(batch, bos_id=BOS)
    assert stats == {"padding_fraction": 2 / 16, "segments_per_row": 2.0, "mean_segment_length": 14 / 4,
                     "cut_fraction": 1 / 4}
    assert "cut_fraction" not in packing_stats(batch)

    def mean_stats(mode):
        iterator = iter(packed_batches(endless(random_docs()), mode=mode, seq_len=SEQ_LEN, batch_size=BATCH,
                                       pad_id=PAD))
        return {key: np.mean([packing_stats(next(iterator), bos_id=BOS)[key] for _ in range(20)])
                for key in ("padding_fraction", "cut_fraction")}

    concat, first_fit = mean_stats("concat"), mean_stats("first_fit")
    assert concat["padding_fraction"] == 0 < first_fit["padding_fraction"]
    assert concat["cut_fraction"] > first_fit["cut_fraction"] > 0  # Fit modes cut only documents > SEQ_LEN.


def test_bad_arguments_are_refused_before_iterating():
    docs = endless(random_docs())
    with pytest.raises(ValueError, match=r"data.packing must be one of \('concat', 'first_fit', 'best_fit'\)"):
        packed_batches(docs, mode="greedy", seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD)
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        packed_batches(docs, mode="concat", seq_len=0, batch_size=BATCH, pad_id=PAD)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        packed_batches(docs, mode="first_fit", seq_len=SEQ_LEN, batch_size=0, pad_id=PAD)
    with pytest.raises(ValueError, match="num_packing_bins applies to the first_fit / best_fit"):
        packed_batches(docs, mode="concat", seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD, num_packing_bins=8)
    with pytest.raises(ValueError, match="num_packing_bins must be a positive int"):
        packed_batches(docs, mode="best_fit", seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD, num_packing_bins=0)
    with pytest.raises(ValueError, match="docs must be a grain.IterDataset"):
        packed_batches(random_docs(), mode="concat", seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD)
