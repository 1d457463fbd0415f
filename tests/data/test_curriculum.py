"""Dataset Decomposition: the decomposition, one-bucket batches of constant tokens, the curricula, shards, resume."""


import grain
import numpy as np
import pytest

from longctx.data.curriculum import (CURRICULA, BucketSchedule, batch_shapes, bucket_lengths, bucket_token_counts,
                                     check, decompose, decomposed_batches, natural_bucket_weights)
from resume_checks import assert_batches_equal, assert_orbax_round_trip, assert_resumes_from_state

SEQ_LEN, MIN_LEN, TOKENS = 256, 16, 1024
LENGTHS = bucket_lengths(SEQ_LEN, MIN_LEN)  # [16, 32, 64, 128, 256]


def documents(num_docs: int = 200, seed: int = 0, offset: int = 0) -> list[np.ndarray]:
    """Documents of 1..3·SEQ_LEN tokens; token (d + offset)·10_000 + k is token k of document d."""
    rng = np.random.default_rng(seed)
    return [(d + offset) * 10_000 + np.arange(int(rng.integers(1, 3 * SEQ_LEN)), dtype=np.int32)
            for d in range(num_docs)]


def component(docs: list[np.ndarray], weight: float = 1.0):
    return grain.MapDataset.source(docs), np.array([len(d) for d in docs]), weight


def make(docs=None, **kwargs):
    args = dict(seq_len=SEQ_LEN, min_len=MIN_LEN, tokens_per_step=TOKENS, curriculum="cyclic", steps=40, cycles=2,
                seed=0)
    args.update(kwargs)
    return decomposed_batches([component(documents() if docs is None else docs)], **args)


def test_decompose_follows_the_binary_representation_longest_first():
    assert decompose(1300, 2048, 4) == [(0, 1024), (1024, 256), (1280, 16), (1296, 4)]
    assert decompose(1300, 2048, 64) == [(0, 1024), (1024, 256)]  # 16 + 4 tokens dropped.
    assert decompose(2500, 1024, 256) == [(0, 1024), (1024, 1024), (2048, 256)]  # Longer than seq_len: cut first.
    assert decompose(100, 1024, 256) == []
    for length in np.random.default_rng(0).integers(1, 5000, size=300).tolist():
        pieces = decompose(length, 1024, 32)
        assert all(size in bucket_lengths(1024, 32) for _, size in pieces)
        assert all(start + size <= next_start for (start, size), (next_start, _) in zip(pieces, pieces[1:]))
        assert [size for _, size in pieces] == sorted((size for _, size in pieces), reverse=True)
        assert length - sum(size for _, size in pieces) == length % 1024 % 32, "only the bits below min_len drop"


def test_bucket_token_counts_match_decompose():
    lengths = np.random.default_rng(1).integers(0, 3000, size=500)
    counts, dropped = bucket_token_counts(lengths, seq_len=1024, min_len=64)
    pieces = [size for length in lengths.tolist() for _, size in decompose(length, 1024, 64)]
    assert counts.tolist() == [sum(s for s in pieces if s == length) for length in bucket_lengths(1024, 64)]
    assert counts.sum() + dropped == lengths.sum()


def test_batch_shapes_keep_tokens_per_step():
    assert bucket_lengths(SEQ_LEN, MIN_LEN) == [16, 32, 64, 128, 256]
    assert batch_shapes(seq_len=SEQ_LEN, min_len=MIN_LEN, tokens_per_step=TOKENS) == [
        (64, 16), (32, 32), (16, 64), (8, 128), (4, 256)]


def test_every_batch_is_one_bucket_of_whole_pieces_with_constant_tokens():
    docs = documents()
    iterator = make(docs)
    seen_lengths = set()
    for _ in range(60):
        batch = next(iterator)
        rows, length = batch["tokens"].shape
        seen_lengths.add(length)
        assert rows * length == TOKENS and length in LENGTHS
        assert batch["tokens"].dtype == batch["segment_ids"].dtype == batch["positions"].dtype == np.int32
        assert np.all(batch["segment_ids"] == 1)
        assert np.all(batch["positions"] == np.arange(length))
        for row in batch["tokens"]:
            doc, start = divmod(int(row[0]), 10_000)
            np.testing.assert_array_equal(row, docs[doc][start:start + length])
            assert (start, length) in decompose(len(docs[doc]), SEQ_LEN, MIN_LEN), "a piece of the decomposition"
    assert len(seen_lengths) > 2


def test_the_fixed_curriculum_draws_buckets_in_proportion_to_the_weights():
    weights = np.array([0.1, 0.0, 0.2, 0.3, 0.4])
    buckets = BucketSchedule(curriculum="fixed", bucket_weights=weights, steps=10).buckets(0, 20_000)
    np.testing.assert_allclose(np.bincount(buckets, minlength=5) / len(buckets), weights, atol=0.015)
    assert not np.any(buckets == 1), "an empty bucket is never drawn"


def test_short_to_long_uses_the_short_buckets_first():
    schedule = BucketSchedule(curriculum="short_to_long", bucket_weights=np.ones(5), steps=1000, odds_base=2.0)
    buckets = schedule.buckets(0, 1000)
    assert np.bincount(buckets).tolist() == [200] * 5, "every bucket's share, exactly"
    mean_log_length = [np.mean(np.log2(np.array(LENGTHS)[part])) for part in np.split(buckets, 5)]
    assert mean_log_length[0] < 5 and mean_log_length[-1] > 7.5
    assert np.all(np.diff(mean_log_length) > 0), "the mean length grows"
    no_curriculum = BucketSchedule(curriculum="short_to_long", bucket_weights=np.ones(5), steps=1000, odds_base=1.0)
    flat = [np.mean(part) for part in np.split(no_curriculum.buckets(0, 1000), 2)]
    assert abs(flat[0] - flat[1]) < 0.3, "odds_base 1 orders the batches at random"
    steep = BucketSchedule(curriculum="short_to_long", bucket_weights=np.ones(5), steps=1000, odds_base=100.0)
    assert np.all(np.diff(steep.buckets(0, 1000)[::100]) >= 0), "Grow-P100 is nearly sorted"


def test_cyclic_repeats_the_short_to_long_schedule_each_cycle():
    weights = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
    schedule = BucketSchedule(curriculum="cyclic", bucket_weights=weights, steps=1200, cycles=4, seed=3)
    cycles = np.split(schedule.buckets(0, 1200), 4)
    for cycle in cycles:
        assert np.bincount(cycle, minlength=5).tolist() == [90, 90, 60, 30, 30]
        first, last = np.split(cycle, 2)
        assert first.mean() < last.mean()
    assert not np.array_equal(cycles[0], cycles[1]), "each cycle draws anew"
    np.testing.assert_array_equal(schedule.buckets(1200, 1500), BucketSchedule(
        curriculum="cyclic", bucket_weights=weights, steps=1200, cycles=4, seed=3).buckets(1200, 1500))
    after = schedule.buckets(1200, 1500)
    assert np.bincount(after, minlength=5).tolist() == [90, 90, 60, 30, 30], "after `steps` the cycles go on"


@pytest.mark.parametrize("curriculum,cycles", [("fixed", 1), ("short_to_long", 1), ("cyclic", 3)])
def test_the_schedule_is_a_pure_function_of_the_step(curriculum, cycles):
    schedule = BucketSchedule(curriculum=curriculum, bucket_weights=[1, 2, 3, 4, 5], steps=5000, cycles=cycles,
                              seed=7)
    whole = schedule.buckets(0, 12_000)
    fresh = BucketSchedule(curriculum=curriculum, bucket_weights=[1, 2, 3, 4, 5], steps=5000, cycles=cycles, seed=7)
    pieces = [fresh.buckets(start, stop) for start, stop in [(9000, 12_000), (0, 1), (1, 4999), (4999, 9000)]]
    np.testing.assert_array_equal(np.concatenate([pieces[1], pieces[2], pieces[3], pieces[0]]), whole)
    other_seed = BucketSchedule(curriculum=curriculum, bucket_weights=[1, 2, 3, 4, 5], steps=5000, cycles=cycles,
                                seed=8)
    assert not np.array_equal(other_seed.buckets(0, 12_000), whole)


@pytest.mark.parametrize("curriculum,cycles", [("fixed", 1), ("cyclic", 2)])
def test_shards_with_different_documents_draw_the_same_buckets(curriculum, cycles):
    shard_docs = [documents(seed=0), documents(num_docs=150, seed=1, offset=1000)]
    counts = sum(bucket_token_counts([len(d) for d in docs], seq_len=SEQ_LEN, min_len=MIN_LEN)[0]
                 for docs in shard_docs)
    weights = natural_bucket_weights([(counts, 1.0)])
    shards = [make(docs, bucket_weights=weights, curriculum=curriculum, cycles=cycles, steps=150)
              for docs in shard_docs]
    for _ in range(200):
        first, second = next(shards[0]), next(shards[1])
        assert first["tokens"].shape == second["tokens"].shape
        assert (first["tokens"] // 10_000 < 1000).all() and (second["tokens"] // 10_000 >= 1000).all()
    if curriculum == "fixed":  # Each shard's own natural mix differs a little: so do some of its draws.
        own = [make(docs, curriculum=curriculum, cycles=1, steps=150) for docs in shard_docs]
        assert any(next(own[0])["tokens"].shape != next(own[1])["tokens"].shape for _ in range(200))


def test_components_mix_within_a_bucket_by_weight():
    heavy, light = documents(seed=0), documents(seed=1, offset=1000)
    iterator = decomposed_batches([component(heavy, 3.0), component(light, 1.0)], seq_len=SEQ_LEN, min_len=MIN_LEN,
                                  tokens_per_step=TOKENS, curriculum="fixed", steps=10)
    rows = np.concatenate([next(iterator)["tokens"][:, 0] for _ in range(200)])
    assert 0.7 < np.mean(rows // 10_000 < 1000) < 0.8


def test_natural_weights_are_each_buckets_share_of_tokens_and_empty_buckets_get_none():
    docs = [np.arange(n, dtype=np.int32) for n in [16, 16, 48, 256, 256]]  # Nothing for the 64 or 128 buckets.
    iterator = make(docs, curriculum="fixed", cycles=1)
    np.testing.assert_allclose(iterator.schedule.weights, np.array([48, 32, 0, 0, 512]) / 592)
    assert {next(iterator)["tokens"].shape[1] for _ in range(50)} == {16, 32, 256}


@pytest.mark.parametrize("curriculum,cycles", [("fixed", 1), ("cyclic", 3)])
def test_restored_iterator_yields_the_same_batches(curriculum, cycles):
    assert_resumes_from_state(lambda: make(curriculum=curriculum, cycles=cycles, steps=30), skip=17, count=20)
    original, started = (make(curriculum=curriculum, cycles=cycles, steps=30, start_step=s) for s in (0, 17))
    for _ in range(17):
        next(original)
    for _ in range(20):
        assert_batches_equal(next(started), next(original))


def test_orbax_round_trip_of_the_iterator(tmp_path):
    assert_orbax_round_trip(make, tmp_path / "ckpt", skip=5, count=6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="data.seq_len to be a power of two"):
        make(seq_len=300, tokens_per_step=1200)
    with pytest.raises(ValueError, match="data.decomposition.min_len must be a power of two <= data.seq_len"):
        make(min_len=512)
    with pytest.raises(ValueError, match="data.decomposition.min_len must be a power of two"):
        make(min_len=24)
    with pytest.raises(ValueError, match="tokens_per_step must be a positive multiple of seq_len=256"):
        make(tokens_per_step=1000)
    with pytest.raises(ValueError, match=r"curriculum must be one of \('fixed', 'short_to_long', 'cyclic'\)"):
        make(curriculum="grow")
    with pytest.raises(ValueError, match="data.decomposition.cycles=2 needs data.decomposition.curriculum='cyclic'"):
        make(curriculum="short_to_long")
    with pytest.raises(ValueError, match="no piece of at least min_len tokens"):
        make([np.arange(10, dtype=np.int32)] * 5)
    with pytest.raises(ValueError, match="bucket 32 has weight .* but no piece"):
        make([np.arange(16, dtype=np.int32)], bucket_weights=[1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="lengths passed with a component must be"):
        next(decomposed_batches([(grain.MapDataset.source([np.arange(10)]), np.array([256]), 1.0)], seq_len=SEQ_LEN,
                                min_len=MIN_LEN, tokens_per_step=TOKENS, curriculum="fixed", steps=10))
    with pytest.raises(ValueError, match="data.decomposition.cycles must be an int in \\[1, train.steps=40\\]"):
        make(cycles=41)
    check(seq_len=SEQ_LEN, min_len=MIN_LEN, curriculum="cyclic", cycles=8)
    with pytest.raises(ValueError, match="data.decomposition.curriculum must be one of"):
        check(seq_len=SEQ_LEN, min_len=MIN_LEN, curriculum="grow", cycles=1)
    assert CURRICULA == ("fixed", "short_to_long", "cyclic")
