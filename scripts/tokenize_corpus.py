"""Tokenize a text corpus once into an ArrayRecord corpus that training reads as `data.source="arrayrecord:<dir>"`.

    python scripts/tokenize_corpus.py --source "files:corpus/**/*.jsonl" --tokenizer tokenizer.json \
        --out corpora/mine [--num_shards 8] [--valid_fraction 0.05] [--text_field text] [--on_error skip] \
        [--batch_size 256] [--overwrite]

--source is any text `data.source` ("stdlib", "files:<glob>,...", "tfds:<name>"); --tokenizer any `data.tokenizer`.
Both splits are written (split as `longctx.data.sources` splits them), each with a progress bar in documents; the
layout is in `longctx/data/array_records.py`. The last line of output sums up: documents, tokens and tokens/s.
"""

import argparse
import time

from longctx.data.corpus_writer import write_corpus
from longctx.data.sources import ON_ERROR
from longctx.data.tokenizers import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="text data.source spec")
    parser.add_argument("--tokenizer", required=True, help='data.tokenizer spec: "byte", a tokenizer.json or a .model')
    parser.add_argument("--out", required=True, help="corpus directory to create")
    parser.add_argument("--num_shards", type=int, default=1, help="record files per split (at most)")
    parser.add_argument("--valid_fraction", type=float, default=0.05, help="share of documents held out")
    parser.add_argument("--text_field", default="text", help="field / column / feature that holds the text")
    parser.add_argument("--on_error", choices=ON_ERROR, default="fatal", help="bad documents: stop, or leave out")
    parser.add_argument("--batch_size", type=int, default=256, help="documents per tokenizer.encode_batch call")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()

    start = time.perf_counter()
    metadata = write_corpus(args.out, args.source, load_tokenizer(args.tokenizer), args.tokenizer,
                            num_shards=args.num_shards, valid_fraction=args.valid_fraction,
                            text_field=args.text_field, on_error=args.on_error, batch_size=args.batch_size,
                            overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    splits = metadata["splits"]
    tokens = sum(s["num_tokens"] for s in splits.values())
    print(f"wrote {args.out}: " + ", ".join(f"{name} {s['num_documents']} documents {s['num_tokens']} tokens"
                                             for name, s in splits.items())
          + f"; {tokens / seconds:,.0f} tokens/s ({seconds:.1f} s, dtype {metadata['dtype']})")


if __name__ == "__main__":
    main()
