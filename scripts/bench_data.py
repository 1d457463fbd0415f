"""Throughput of the training data pipeline on this machine's CPU: tokens per second into batches, per packing mode.

    python scripts/bench_data.py [--tokens 20000000] [--seq_len 8192] [--batch_size 8] [--out DIR]

Two corpora from the interpreter's standard library, so nothing is downloaded: "files" (`data.source="stdlib"`,
~1,700 documents of ~5K tokens) and "paragraphs" (its paragraphs of >= 400 characters, one document each, ~100+
tokens: the per-document costs dominate). A byte-level BPE tokenizer (vocabulary 8,192) is trained on part of it
with the `tokenizers` library, then for each corpus:

1. `tokenize`: raw text → BPE ids as scripts/tokenize_corpus.py writes them (`write_corpus`, encode_batch);
2. `read`: the baseline, the pre-tokenised ArrayRecord corpus read through grain (shuffled, one thread) unpacked;
3. `pack/<mode>`: `longctx.data.pipeline.train_batches` over that corpus, for every `data.packing` mode — what the
   trainer's input pipeline delivers, padding included in "tokens", excluded in "real_tokens" — and first_fit again
   with grain's default 16 reading threads instead of longctx's default 0;
4. `text/first_fit`: the same pipeline fed the raw text, tokenising document by document as it goes (streaming).

Each line of output is a JSON record; the last compares against the targets (pre-tokenised >= 300K tokens/s, raw
text tokenisation >= 100K tokens/s on a 2-core CPU: a 1B model at 50% MFU on one H100 eats about 80K tokens/s).
Results go in docs/benchmarks.md.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import grain
import ml_collections
import numpy as np
import tokenizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longctx.config import base_config  # noqa: E402
from longctx.data import pipeline  # noqa: E402
from longctx.data.array_records import ArrayRecordSource  # noqa: E402
from longctx.data.corpus_writer import write_corpus  # noqa: E402
from longctx.data.sources import open_source  # noqa: E402
from longctx.data.tokenizers import HFTokenizer  # noqa: E402

TARGETS = {"pretokenised_tokens_per_s": 300_000, "tokenize_tokens_per_s": 100_000}
BPE_VOCAB = 8192
BPE_TRAIN_DOCUMENTS = 300
MIN_PARAGRAPH_CHARS = 400
GRAIN_DEFAULT_THREADS = 16  # grain.ReadOptions' default; longctx's data.read_threads defaults to 0


def train_bpe(path: str) -> HFTokenizer:
    """A byte-level BPE of BPE_VOCAB ids trained on the first stdlib documents, saved to `path`."""
    source = open_source("stdlib", "train")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((source[i] for i in range(min(BPE_TRAIN_DOCUMENTS, len(source)))), trainer=trainer)
    bpe.save(path)
    return HFTokenizer(path)


def write_paragraphs(path: str) -> str:
    """The short-document corpus: every stdlib paragraph (text between blank lines) of at least
    MIN_PARAGRAPH_CHARS characters, one per line of a .jsonl file; returns its path."""
    source = open_source("stdlib", "train")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(len(source)):
            for paragraph in source[i].split("\n\n"):
                if len(paragraph) >= MIN_PARAGRAPH_CHARS:
                    f.write(json.dumps({"text": paragraph}) + "\n")
    return path


def drain(iterator, tokens: int) -> dict:
    """Pulls batches (or bare documents) until `tokens` tokens have come; their count, real (non-pad) count and the
    seconds it took."""
    seen = real = batches = 0
    start = time.perf_counter()
    while seen < tokens:
        batch = next(iterator)
        if isinstance(batch, dict):
            seen += batch["tokens"].size
            real += int(np.count_nonzero(batch["segment_ids"]))
        else:
            seen += batch.size
            real += batch.size
        batches += 1
    seconds = time.perf_counter() - start
    return {"tokens": seen, "batches": batches, "seconds": round(seconds, 3),
            "tokens_per_s": round(seen / seconds), "real_tokens_per_s": round(real / seconds),
            "padding_fraction": round(1 - real / seen, 4)}


def config_for(source: str, tokenizer_path: str, packing: str, args) -> ml_collections.ConfigDict:
    config = base_config()
    config.data.update(source=source, tokenizer=tokenizer_path, seq_len=args.seq_len, packing=packing)
    config.train.update(batch_size=args.batch_size, steps=10_000)
    if packing == "decomposition":
        config.data.decomposition.min_len = 256
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000, help="tokens pulled per measurement")
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default=None, help="where the tokenizer and corpus go (default: a temporary dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_data-")
    os.makedirs(out, exist_ok=True)
    records = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    tokenizer_path = os.path.join(out, "bpe.json")
    tokenizer = train_bpe(tokenizer_path)
    corpora = {"files": "stdlib", "paragraphs": write_paragraphs(os.path.join(out, "paragraphs.jsonl"))}
    for name, text_source in corpora.items():
        corpus = os.path.join(out, name)
        start = time.perf_counter()
        metadata = write_corpus(corpus, text_source, tokenizer, tokenizer_path, num_shards=4, overwrite=True,
                                progress=False)
        seconds = time.perf_counter() - start
        written = sum(split["num_tokens"] for split in metadata["splits"].values())
        documents = sum(split["num_documents"] for split in metadata["splits"].values())
        emit({"case": "tokenize", "corpus": name, "tokenizer": f"bpe{BPE_VOCAB}", "documents": documents,
              "tokens": written, "seconds": round(seconds, 3), "tokens_per_s": round(written / seconds),
              "cpus": os.cpu_count()})

        source = ArrayRecordSource(corpus, "train")
        stream = iter(grain.MapDataset.source(source).shuffle(seed=0).repeat().to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
        emit({"case": "read", "corpus": name, **drain(stream, args.tokens)})

        for packing in pipeline.PACKINGS:
            config = config_for(f"arrayrecord:{corpus}", tokenizer_path, packing, args)
            if packing == "untie_knots":
                config.data.untie_knots.restore = True
            iterator = pipeline.train_batches(config, tokenizer, [0], 1)
            emit({"case": f"pack/{packing}", "corpus": name, "seq_len": args.seq_len,
                  "batch_size": args.batch_size, **drain(iterator, args.tokens)})

        config = config_for(f"arrayrecord:{corpus}", tokenizer_path, "first_fit", args)
        config.data.read_threads = GRAIN_DEFAULT_THREADS
        emit({"case": f"pack/first_fit/read_threads={GRAIN_DEFAULT_THREADS}", "corpus": name,
              "seq_len": args.seq_len, "batch_size": args.batch_size,
              **drain(pipeline.train_batches(config, tokenizer, [0], 1), args.tokens)})

        config = config_for(text_source, tokenizer_path, "first_fit", args)
        emit({"case": "text/first_fit", "corpus": name, "seq_len": args.seq_len, "batch_size": args.batch_size,
              **drain(pipeline.train_batches(config, tokenizer, [0], 1), args.tokens // 4)})

    packed = [r for r in records if r["case"] in {f"pack/{packing}" for packing in pipeline.PACKINGS}]
    slowest = min(packed, key=lambda r: r["tokens_per_s"])
    tokenize = min(r["tokens_per_s"] for r in records if r["case"] == "tokenize")
    streaming = min(r["tokens_per_s"] for r in records if r["case"] == "text/first_fit")
    emit({"case": "summary", "slowest_packing": f"{slowest['case']} ({slowest['corpus']})",
          "slowest_tokens_per_s": slowest["tokens_per_s"], "pretokenised_target": TARGETS["pretokenised_tokens_per_s"],
          "pretokenised_ok": slowest["tokens_per_s"] >= TARGETS["pretokenised_tokens_per_s"],
          "tokenize_tokens_per_s": tokenize, "streaming_tokenize_tokens_per_s": streaming,
          "tokenize_target": TARGETS["tokenize_tokens_per_s"],
          "tokenize_ok": min(tokenize, streaming) >= TARGETS["tokenize_tokens_per_s"]})


if __name__ == "__main__":
    main()
