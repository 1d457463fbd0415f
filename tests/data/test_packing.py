"""Packing: the batch invariants, no token lost, and exact resumption from the iterator's state."""

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from longctx.data import ByteTokenizer, packed_batches, padding_fraction, split_into_pieces, tokenize_documents

SEQ_LEN, BATCH, PAD = 16, 4, 256


def random_pieces(num_docs: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Documents of 1..3·SEQ_LEN random byte tokens, cut into pieces; tokens never equal PAD."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 256, size=int(rng.integers(1, 3 * SEQ_LEN)), dtype=np.int32) for _ in range(num_docs)]
    return split_into_pieces(docs, SEQ_LEN)


def segments(batch: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The token tuple of every segment of every row."""
    found = []
    for tokens, segment_ids in zip(batch["tokens"], batch["segment_ids"]):
        found += [tuple(tokens[segment_ids == s].tolist()) for s in range(1, segment_ids.max() + 1)]
    return found


def check_batch(batch: dict[str, np.ndarray]) -> None:
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    for value in batch.values():
        assert value.shape == (BATCH, SEQ_LEN) and value.dtype == np.int32
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


def test_batches_keep_the_invariants():
    iterator = iter(packed_batches(random_pieces(), seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD))
    batches = [next(iterator) for _ in range(30)]
    for batch in batches:
        check_batch(batch)
    assert 0 < np.mean([padding_fraction(b) for b in batches]) < 0.5


def test_one_epoch_holds_every_piece_intact():
    """With num_packing_bins == batch_size a batch is one packing round; rounds take the stream in order, so the
    first batches holding >= len(pieces) segments hold all of the first epoch plus part of one round of the next."""
    pieces = random_pieces()
    iterator = iter(packed_batches(pieces, seq_len=SEQ_LEN, batch_size=BATCH, seed=3, pad_id=PAD))
    seen = collections.Counter()
    last_batch_segments = 0
    while seen.total() < len(pieces):
        batch_segments = segments(next(iterator))
        seen.update(batch_segments)
        last_batch_segments = len(batch_segments)
    expected = collections.Counter(tuple(p.tolist()) for p in pieces)
    assert not expected - seen, "a piece of the first epoch is missing"
    assert set(seen) <= set(expected), "a segment is not one of the pieces"
    assert seen.total() - len(pieces) < last_batch_segments


def test_same_seed_same_batches_other_seed_other_order():
    def first(seed):
        iterator = iter(packed_batches(random_pieces(), seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, pad_id=PAD))
        return np.stack([next(iterator)["tokens"] for _ in range(5)])

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_shards_split_the_pieces():
    pieces = [np.full(5, i, dtype=np.int32) for i in range(24)]  # Distinct pieces, three to a row.
    per_shard = []
    for shard in range(2):
        dataset = packed_batches(pieces, seq_len=SEQ_LEN, batch_size=2, seed=0, pad_id=PAD,
                                 shard_index=shard, shard_count=2)
        iterator = iter(dataset)
        per_shard.append({s for _ in range(2) for s in segments(next(iterator))})
    assert not per_shard[0] & per_shard[1]
    assert per_shard[0] | per_shard[1] == {tuple(p.tolist()) for p in pieces}


@pytest.mark.parametrize("num_packing_bins", [None, 3 * BATCH])  # The second leaves states in mid-round.
def test_restored_iterator_yields_the_same_batches(num_packing_bins):
    def make():
        return iter(packed_batches(random_pieces(), seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD,
                                   num_packing_bins=num_packing_bins))

    original = make()
    for _ in range(7):
        next(original)
    state = original.get_state()
    expected = [next(original) for _ in range(6)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_orbax_round_trip_of_the_iterator(tmp_path):
    def make():
        return iter(packed_batches(random_pieces(), seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD))

    original = make()
    for _ in range(5):
        next(original)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(original)))
        manager.wait_until_finished()
        restored = make()
        manager.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
    for _ in range(4):
        np.testing.assert_array_equal(next(restored)["tokens"], next(original)["tokens"])


def test_bad_inputs_are_refused_before_iterating():
    pieces = random_pieces()
    too_long = pieces + [np.zeros(SEQ_LEN + 1, dtype=np.int32)]
    with pytest.raises(ValueError, match=f"{SEQ_LEN + 1} tokens > seq_len={SEQ_LEN}.*split_into_pieces"):
        packed_batches(too_long, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD)
    with pytest.raises(ValueError, match="at least one piece"):
        packed_batches([], seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD)
    with pytest.raises(ValueError, match="shard_index"):
        packed_batches(pieces, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, pad_id=PAD, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        packed_batches(pieces, seq_len=SEQ_LEN, batch_size=0, seed=0, pad_id=PAD)
