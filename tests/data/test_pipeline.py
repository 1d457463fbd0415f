"""The config-driven pipeline: every source kind, packing mode and curriculum from config alone; data shards that are
disjoint and cover the corpus; token-share mixtures; the sharded iterator's state; config errors."""

import json

import grain
import numpy as np
import pytest

from longctx.config import base_config, validate
from longctx.data import ByteTokenizer, pipeline
from longctx.data.corpus_writer import write_corpus
from resume_checks import assert_resumes_from_state

TOKENIZER = ByteTokenizer()
SEQ_LEN, BATCH = 256, 4


def write_jsonl(path, texts) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


def texts_of(letter: str, count: int, length: int, seed: int = 0) -> list[str]:
    """`count` documents of `letter` and digits (the document's number), `length` characters on average."""
    rng = np.random.default_rng(seed)
    return [f"{i}:" + letter * int(rng.integers(length // 2, 3 * length // 2)) for i in range(count)]


def make_config(source: str, packing: str = "first_fit", **data):
    config = base_config()
    config.data.update(source=source, seq_len=SEQ_LEN, packing=packing, **data)
    config.train.update(batch_size=BATCH, steps=100, warmup_steps=10)
    if packing == "decomposition":
        config.data.decomposition.min_len = 32
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", texts_of("a", 120, 150))


def document_numbers(batch) -> set[str]:
    """The numbers of the documents whose first piece a batch holds (text after BOS up to ':')."""
    numbers = set()
    for row, segments in zip(batch["tokens"], batch["segment_ids"]):
        for segment in set(segments[segments > 0].tolist()):
            piece = row[segments == segment]
            if piece[0] == TOKENIZER.bos_id:
                numbers.add(TOKENIZER.decode(piece).split(":")[0])
    return numbers


@pytest.mark.parametrize("packing", pipeline.PACKINGS)
@pytest.mark.parametrize("kind", ["files", "arrayrecord", "mixture"])
def test_config_alone_switches_sources_and_packing(tmp_path, corpus, kind, packing):
    source = {"files": corpus, "arrayrecord": f"arrayrecord:{tmp_path / 'ar'}", "mixture": pipeline.MIXTURE}[kind]
    if kind == "arrayrecord":
        write_corpus(str(tmp_path / "ar"), corpus, TOKENIZER, "byte", progress=False)
    config = make_config(source, packing)
    if kind == "mixture":
        config.data.mixture = {"short": {"source": corpus, "weight": 1.0},
                               "long": {"source": write_jsonl(tmp_path / "b.jsonl", texts_of("b", 30, 600)),
                                        "weight": 1.0}}
    validate(config)
    iterator = pipeline.train_batches(config, TOKENIZER, [0], 1)
    for _ in range(3):
        batch = next(iterator)
        rows, length = batch["tokens"].shape
        assert rows * length == BATCH * SEQ_LEN
        assert (rows, length) in pipeline.batch_shapes(config)
        assert batch["tokens"].dtype == batch["segment_ids"].dtype == batch["positions"].dtype == np.int32


def test_shards_are_disjoint_and_cover_the_documents(corpus):
    """Each of 3 shards reads its own documents; over an epoch of every shard, each document once."""
    config = make_config(corpus)
    corpora = pipeline.training_corpora(config, TOKENIZER)
    seen = []
    for shard in range(3):
        (part,) = pipeline.components(corpora, 0.0, shard_index=shard, num_shards=3)
        seen.append({TOKENIZER.decode(part.documents[i]).split(":")[0] for i in range(len(part.documents))})
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    everything = corpora[0].documents
    assert set.union(*seen) == {TOKENIZER.decode(everything[i]).split(":")[0] for i in range(len(everything))}
    assert sum(map(len, seen)) == len(everything)
    # The first epochs of shard 0's stream hold only shard 0's documents.
    iterator = pipeline.train_batches(config, TOKENIZER, [0], 3)
    assert set.union(*(document_numbers(next(iterator)) for _ in range(10))) <= seen[0]


def test_a_process_with_two_shards_reads_both_halves_of_each_batch(corpus):
    config = make_config(corpus)
    both = pipeline.train_batches(config, TOKENIZER, [0, 1], 2)
    halves = [pipeline.train_batches(config, TOKENIZER, [shard], 2) for shard in (0, 1)]
    for _ in range(3):
        batch, parts = next(both), [next(half) for half in halves]
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([part[key] for part in parts]))
    assert halves[1].row_offset(8) == 4 and both.row_offset(8) == 0


@pytest.mark.parametrize("packing", pipeline.PACKINGS)
def test_restored_state_yields_the_same_batches(corpus, packing):
    config = make_config(corpus, packing)
    state = assert_resumes_from_state(lambda: pipeline.train_batches(config, TOKENIZER, [0, 1], 2), skip=3, count=3)
    with pytest.raises(ValueError, match=r"shards \[0, 1\] of 2.*this process reads shards \[1\] of 2"):
        pipeline.train_batches(config, TOKENIZER, [1], 2).set_state(state)


def test_mixture_weights_are_shares_of_tokens(tmp_path):
    """Short documents (~50 tokens) and long ones (~400) at token weights 3:1: a quarter of the tokens are long."""
    config = make_config(pipeline.MIXTURE, "concat")
    config.data.mixture = {
        "short": {"source": write_jsonl(tmp_path / "a.jsonl", texts_of("a", 400, 50)), "weight": 3.0},
        "long": {"source": write_jsonl(tmp_path / "b.jsonl", texts_of("b", 100, 400, seed=1)), "weight": 1.0}}
    iterator = pipeline.train_batches(config, TOKENIZER, [0], 1)
    tokens = np.concatenate([next(iterator)["tokens"].ravel() for _ in range(200)])
    share_long = np.sum(tokens == ord("b")) / np.sum((tokens == ord("a")) | (tokens == ord("b")))
    assert share_long == pytest.approx(0.25, abs=0.03)


def test_passkey_fraction_is_a_share_of_documents(corpus):
    config = make_config(corpus, passkey_fraction=0.2)
    corpora = pipeline.training_corpora(config, TOKENIZER)
    assert [c.name for c in corpora] == ["source", "passkey"] and corpora[1].synthetic
    parts = pipeline.components(corpora, 0.2, shard_index=0, num_shards=1)
    assert [part.weight for part in parts] == pytest.approx([0.8, 0.2])


def test_decomposition_shards_draw_the_same_bucket_every_step(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(20, 700, size=200)]
    config = make_config(write_jsonl(tmp_path / "d.jsonl", texts), "decomposition")
    config.data.decomposition.curriculum = "fixed"
    shards = [pipeline.train_batches(config, TOKENIZER, [shard], 2) for shard in (0, 1)]
    lengths = [[next(shard)["tokens"].shape[1] for _ in range(60)] for shard in shards]
    assert lengths[0] == lengths[1] and len(set(lengths[0])) > 1


def test_untie_knots_batches_carry_loss_weights(corpus):
    config = make_config(corpus, "untie_knots")
    batch = next(pipeline.train_batches(config, TOKENIZER, [0], 1))
    assert batch["weights"].shape == batch["tokens"].shape
    assert 0 < batch["weights"].mean() < 1


def test_eval_documents_read_every_source_kind_alike(tmp_path, corpus):
    write_corpus(str(tmp_path / "ar"), corpus, TOKENIZER, "byte", progress=False)
    for split in ("train", "valid"):
        from_text = pipeline.eval_documents(make_config(corpus).data, split, TOKENIZER)
        from_records = pipeline.eval_documents(make_config(f"arrayrecord:{tmp_path / 'ar'}").data, split, TOKENIZER)
        assert len(from_text) == len(from_records) > 0
        for a, b in zip(from_text, from_records):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change, message", [
    ({"source": "mixture"}, "data.source='mixture' needs components in data.mixture"),
    ({"mixture": {"a": {"source": "stdlib", "weight": 1.0}}}, "data.mixture is only read when"),
    ({"source": "mixture", "mixture": {"a": {"source": "stdlib", "weight": 0}}}, "data.mixture.a.weight"),
    ({"source": "mixture", "mixture": {"a": {"source": "stdlib"}}}, "data.mixture.a must have exactly"),
    ({"packing": "shuffle"}, "data.packing must be one of concat, first_fit, best_fit, untie_knots"),
    ({"on_error": "ignore"}, "data.on_error must be one of fatal, skip"),
    ({"num_packing_bins": 8, "packing": "concat"}, "data.num_packing_bins=8 has no effect"),
    ({"num_shards": -1}, "data.num_shards must be an int >= 0"),
])
def test_bad_data_config_is_refused(change, message):
    config = base_config()
    with config.unlocked():
        config.data.update(change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(config)


def test_settings_of_an_unused_packing_are_refused():
    config = base_config()
    config.data.decomposition.curriculum = "cyclic"
    with pytest.raises(ValueError, match="data.decomposition is set .* but data.packing is 'first_fit'"):
        validate(config)
    config = base_config()
    config.data.untie_knots.restore = True
    with pytest.raises(ValueError, match="data.untie_knots is set"):
        validate(config)


def test_an_empty_shard_is_an_error_not_an_endless_loop(tmp_path):
    config = make_config(write_jsonl(tmp_path / "few.jsonl", texts_of("a", 40, 50)))
    corpora = pipeline.training_corpora(config, TOKENIZER)
    with pytest.raises(ValueError, match="data shard 50 of 64 .* holds no documents"):
        pipeline.components(corpora, 0.0, shard_index=50, num_shards=64)


def test_a_corpus_tokenised_with_another_tokenizer_is_refused(tmp_path, corpus):
    write_corpus(str(tmp_path / "ar"), corpus, TOKENIZER, "byte", progress=False)
    metadata_path = tmp_path / "ar" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["vocab_size"] = 32000
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="data.tokenizer: ByteTokenizer.* was written with 'byte'"):
        pipeline.train_batches(make_config(f"arrayrecord:{tmp_path / 'ar'}"), TOKENIZER, [0], 1)


def test_document_stream_is_a_grain_dataset(corpus):
    (part,) = pipeline.components(pipeline.training_corpora(make_config(corpus), TOKENIZER), 0.0, shard_index=0,
                                  num_shards=1)
    assert isinstance(pipeline.document_stream([part], seed=0), grain.IterDataset)
