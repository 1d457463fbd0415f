"""scripts/tokenize_corpus.py writes a corpus that `open_source("arrayrecord:...")` reads, and sums it up."""

import json
import pathlib
import subprocess
import sys

from longctx.data.sources import in_valid_split, open_source
from longctx.data.tokenizers import ByteTokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "tokenize_corpus.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def test_writes_a_readable_corpus_and_refuses_to_overwrite(tmp_path):
    lines = [json.dumps({"body": f"document {i} " + "ab" * i}) for i in range(30)] + ["{broken"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    source, out = f"files:{tmp_path}/c.jsonl", tmp_path / "corpus"
    args = ["--source", source, "--tokenizer", "byte", "--out", out, "--num_shards", "2", "--valid_fraction", "0.2",
            "--text_field", "body"]
    failed = run_script(*args)
    assert failed.returncode != 0 and "c.jsonl line 31 is not JSON" in failed.stderr and not out.exists()
    done = run_script(*args, "--on_error", "skip")
    assert done.returncode == 0, done.stderr
    *_, summary = done.stdout.strip().splitlines()
    train, valid = (open_source(f"arrayrecord:{out}", split) for split in ("train", "valid"))
    assert (f"train {len(train)} documents {train.lengths().sum()} tokens, valid {len(valid)} documents "
            f"{valid.lengths().sum()} tokens;") in summary and "tokens/s" in summary
    assert len(train) + len(valid) == 30 and len(train.metadata["splits"]["train"]["files"]) == 2
    texts = [f"document {i} " + "ab" * i for i in range(30)]
    expected = [t for line, t in enumerate(texts, start=1) if not in_valid_split(f"c.jsonl:{line}", 0.2)]
    tokenizer = ByteTokenizer()
    assert [tokenizer.decode(train[i]) for i in range(len(train))] == expected
    assert all(train[i][0] == tokenizer.bos_id and train[i][-1] == tokenizer.eos_id for i in range(len(train)))
    again = run_script(*args, "--on_error", "skip")
    assert again.returncode != 0 and "exists and is not an empty directory" in again.stderr
