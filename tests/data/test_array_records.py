"""ArrayRecord corpora: written tokens are the tokenizer's framing of the texts; both splits; dtypes; safe writes."""

import json
import os
import pickle

import grain
import numpy as np
import pytest

from longctx.data import array_records
from longctx.data.array_records import ArrayRecordSource
from longctx.data.corpus_writer import write_corpus
from longctx.data.sources import load_documents, open_source
from longctx.data.tokenizers import ByteTokenizer


class WideByteTokenizer(ByteTokenizer):
    """Bytes shifted past uint16: ids 65000..65255, BOS/EOS/PAD 65256..65258; vocab_size 70000."""

    vocab_size, pad_id, bos_id, eos_id, name = 70_000, 65_256, 65_257, 65_258, "wide"

    def encode(self, text):
        return super().encode(text) + 65_000


class BatchRecordingTokenizer(ByteTokenizer):
    """A byte tokenizer that records the size of every `encode_batch` call and may fail on a given call."""

    def __init__(self, fail_on_call=None):
        self.batches, self.fail_on_call = [], fail_on_call

    def encode_batch(self, texts):
        self.batches.append(len(texts))
        if len(self.batches) == self.fail_on_call:
            raise RuntimeError("tokenizer died")
        return super().encode_batch(texts)


@pytest.fixture
def corpus(tmp_path) -> str:
    """A .jsonl of 40 short documents with non-ASCII text; returns its spec."""
    lines = [json.dumps({"text": f"document {i}: {'é' * (i % 5)} {'word ' * i}"}) for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return f"files:{tmp_path}/corpus.jsonl"


def framed(texts, tokenizer):
    return [np.concatenate([[tokenizer.bos_id], tokenizer.encode(t), [tokenizer.eos_id]]).astype(np.int32)
            for t in texts]


@pytest.mark.parametrize("tokenizer, dtype", [(ByteTokenizer(), "uint16"), (WideByteTokenizer(), "int32")])
def test_round_trip_both_splits(tmp_path, corpus, tokenizer, dtype):
    out = tmp_path / "out"
    metadata = write_corpus(str(out), corpus, tokenizer, tokenizer.name, num_shards=3, valid_fraction=0.3,
                            progress=False)
    assert metadata["dtype"] == dtype and metadata == json.loads((out / "metadata.json").read_text())
    assert (metadata["bos_id"], metadata["eos_id"], metadata["vocab_size"]) == (tokenizer.bos_id, tokenizer.eos_id,
                                                                               tokenizer.vocab_size)
    for split in ("train", "valid"):
        source = open_source(f"arrayrecord:{out}", split)
        assert isinstance(source, ArrayRecordSource) and source.tokenized
        expected = framed(load_documents(corpus, split, valid_fraction=0.3), tokenizer)
        documents = [source[i] for i in range(len(source))]
        assert len(documents) == len(expected) and all(d.dtype == np.int32 for d in documents)
        assert all(np.array_equal(d, e) for d, e in zip(documents, expected))
        assert source.lengths().dtype == np.int64 and source.lengths().tolist() == [len(e) for e in expected]
        info = metadata["splits"][split]
        assert info["num_documents"] == len(expected) and info["num_tokens"] == sum(map(len, expected))
        assert info["files"] == [f"{split}-{s:05d}-of-00003.array_record" for s in range(3)]
        assert sum(info["documents_per_file"]) == len(expected) and info["source"] == corpus
        raw = grain.sources.ArrayRecordDataSource([str(out / f) for f in info["files"]])[0]
        assert np.array_equal(np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")), expected[0])
        assert source.key(0) == f"{split}-00000-of-00003.array_record:0"
        assert source.key(len(source) - 1).startswith(f"{split}-00002-of-00003.array_record:")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # No temporary directory left behind.


def test_grain_reads_it_in_other_processes(tmp_path, corpus):
    write_corpus(str(tmp_path / "out"), corpus, ByteTokenizer(), "byte", progress=False)
    source = pickle.loads(pickle.dumps(open_source(f"arrayrecord:{tmp_path / 'out'}", "train")))
    shuffled = list(grain.MapDataset.source(source).shuffle(seed=1))
    assert sorted(map(bytes, shuffled)) == sorted(bytes(source[i]) for i in range(len(source)))


def test_tokenizes_with_encode_batch_in_batches(tmp_path, corpus):
    tokenizer = BatchRecordingTokenizer()
    metadata = write_corpus(str(tmp_path / "out"), corpus, tokenizer, "byte", batch_size=8, valid_fraction=0.3,
                            progress=False)
    sizes = [metadata["splits"][s]["num_documents"] for s in ("train", "valid")]
    assert tokenizer.batches == [min(8, size - start) for size in sizes for start in range(0, size, 8)]


def test_refuses_to_overwrite_unless_asked(tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()  # An empty directory is fine.
    write_corpus(str(out), corpus, ByteTokenizer(), "byte", num_shards=2, progress=False)
    with pytest.raises(FileExistsError, match="exists and is not an empty directory; pass overwrite=True"):
        write_corpus(str(out), corpus, ByteTokenizer(), "byte", progress=False)
    assert len(open_source(f"arrayrecord:{out}", "train").metadata["splits"]["train"]["files"]) == 2
    write_corpus(str(out), corpus, ByteTokenizer(), "byte", num_shards=1, overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["lengths-train.npy", "lengths-valid.npy", "metadata.json",
                                       "train-00000-of-00001.array_record", "valid-00000-of-00001.array_record"]
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "out"]  # The replaced corpus is gone.


def test_an_interrupted_write_leaves_nothing(tmp_path, corpus):
    with pytest.raises(RuntimeError, match="tokenizer died"):
        write_corpus(str(tmp_path / "out"), corpus, BatchRecordingTokenizer(fail_on_call=2), "byte", batch_size=4,
                     progress=False)
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_bad_corpus_directories(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="data.source: arrayrecord directory '.*nowhere' does not exist"):
        open_source(f"arrayrecord:{tmp_path / 'nowhere'}", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data.source: '.*empty' has no metadata.json"):
        open_source(f"arrayrecord:{tmp_path / 'empty'}", "train")
    out = tmp_path / "out"
    write_corpus(str(out), corpus, ByteTokenizer(), "byte", progress=False)
    metadata = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(ValueError, match="data.source: .*metadata.json has format_version 99; this longctx reads "
                                         "format versions 1"):
        ArrayRecordSource(str(out), "train")
    (out / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="data.source: .*metadata.json is not JSON"):
        ArrayRecordSource(str(out), "train")
    metadata["splits"]["train"]["num_documents"] += 1
    (out / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="data.source: .* split 'train' is inconsistent"):
        ArrayRecordSource(str(out), "train")
    os.remove(out / "lengths-valid.npy")
    with pytest.raises(FileNotFoundError, match="data.source: .*lengths-valid.npy is missing"):
        ArrayRecordSource(str(out), "valid")


def test_check_tokenizer_and_text_only_readers(tmp_path, corpus):
    out = tmp_path / "out"
    write_corpus(str(out), corpus, ByteTokenizer(), "byte", progress=False)
    source = ArrayRecordSource(str(out), "train")
    source.check_tokenizer(ByteTokenizer())
    with pytest.raises(ValueError, match="data.tokenizer: .*'wide'.* was written with 'byte'"):
        source.check_tokenizer(WideByteTokenizer())
    with pytest.raises(ValueError, match="holds token ids, not texts"):
        load_documents(f"arrayrecord:{out}", "train")
    with pytest.raises(ValueError, match="already tokenized"):
        write_corpus(str(tmp_path / "again"), f"arrayrecord:{out}", ByteTokenizer(), "byte", progress=False)
    assert array_records.token_dtype(65_536) == np.uint16 and array_records.token_dtype(65_537) == np.int32
