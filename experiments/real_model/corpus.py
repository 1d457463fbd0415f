"""Long documents for the real-model study, built from the running interpreter's standard library.

    python experiments/real_model/corpus.py --out data/long_stdlib [--train_chars 16000000]

A pretrained model's context is measured on documents longer than the longest evaluation length (64K tokens), and
its fine-tunes train on documents longer than their training length (32K). Few single files are that long, so, as
repository-level code corpora do (Code Llama's long-context fine-tune, ProLong's code repositories), a document here
is a whole package read in path order, each file preceded by a `# file: <path>` line:

- `valid.jsonl`: the language reference as prose (the 79 topics of `pydoc_data/topics.py`, the texts `help()` shows,
  in their order: the one long prose document of the stdlib), then the library's own packages with at least
  `--valid_chars` characters (asyncio, email, tkinter, xml, idlelib, ...: code, held out; not `encodings`, whose
  codec tables are neither code nor prose);
- `haystack.txt`: the same prose, for needle-in-a-haystack prompts;
- `train.jsonl`: the test suite, `test/`: each test package one document, the single test files joined in path order
  into documents of at least `--train_document_chars`; at most `--train_chars` in all.

No file is in both. The corpus is written once and carried where it is used, since stdlib trees differ between
Python builds (some ship no `test/`); `manifest.json` records the Python version, the documents and their sizes.
Point a run at it with `--config.data.source=<out>/train.jsonl` (training) and read `valid.jsonl` for evaluation.
"""

import argparse
import ast
import json
import pathlib
import platform
import sys

from longctx.data.sources import stdlib_files

TEST_ROOT = "test/"
PROSE = "pydoc_data/topics.py"
EXCLUDED = ("encodings",)  # codec tables: neither code nor prose a model reads


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="strict") as f:
        return f.read()


def joined(files: list[tuple[str, str]]) -> str:
    """The files (relative path, absolute path), each after a `# file: <relative path>` line."""
    return "".join(f"# file: {key}\n{read(path)}\n" for key, path in files)


def reference_prose(path: str) -> str:
    """The texts of `pydoc_data/topics.py`'s `topics` dict, one after another (a blank line between)."""
    for node in ast.parse(read(path)).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["topics"]:
            return "\n\n".join(ast.literal_eval(node.value).values())
    raise ValueError(f"{path} has no topics dict")


def readable(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The files that are UTF-8 (the stdlib has a few encoding fixtures that are not)."""
    kept = []
    for key, path in files:
        try:
            read(path)
        except (UnicodeDecodeError, ValueError):
            continue
        kept.append((key, path))
    return kept


def build(*, valid_chars: int, train_document_chars: int, train_chars: int) -> dict[str, list[dict]]:
    """{"train": [...], "valid": [...]} documents {"name", "text"}, in a fixed order."""
    files = readable(stdlib_files())
    packages: dict[str, list[tuple[str, str]]] = {}
    for key, path in files:
        if "/" in key and not key.startswith(TEST_ROOT):
            packages.setdefault(key.split("/")[0], []).append((key, path))
    valid = [{"name": PROSE, "text": reference_prose(dict(files)[PROSE])}]
    for name, members in sorted(packages.items()):
        text = joined(members)
        if name != PROSE.split("/")[0] and name not in EXCLUDED and len(text) >= valid_chars:
            valid.append({"name": name, "text": text})
    tests: dict[str, list[tuple[str, str]]] = {}
    for key, path in files:
        if key.startswith(TEST_ROOT):
            rest = key[len(TEST_ROOT):]
            tests.setdefault(rest.split("/")[0] if "/" in rest else "", []).append((key, path))
    train, used = [], 0
    for name, members in sorted((n, m) for n, m in tests.items() if n):
        train.append({"name": TEST_ROOT + name, "text": joined(members)})
    pending: list[tuple[str, str]] = []
    for key, path in tests.get("", []):
        pending.append((key, path))
        if sum(len(read(p)) for _, p in pending) >= train_document_chars:
            train.append({"name": f"{pending[0][0]}..{pending[-1][0]}", "text": joined(pending)})
            pending = []
    kept = []
    for document in sorted(train, key=lambda d: d["name"]):
        if len(document["text"]) >= train_document_chars and used + len(document["text"]) <= train_chars:
            kept.append(document)
            used += len(document["text"])
    return {"train": kept, "valid": valid}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path, help="a directory that does not exist yet")
    parser.add_argument("--valid_chars", type=int, default=240_000, help="a held-out package's least characters")
    parser.add_argument("--train_document_chars", type=int, default=160_000,
                        help="a training document's least characters")
    parser.add_argument("--train_chars", type=int, default=16_000_000, help="the training split's most characters")
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"error: --out {args.out} exists; name a new directory (nothing is overwritten)")
    splits = build(valid_chars=args.valid_chars, train_document_chars=args.train_document_chars,
                   train_chars=args.train_chars)
    if not splits["train"]:
        sys.exit("error: this interpreter's stdlib has no test/ suite to train on; build the corpus with a Python "
                 "that ships one")
    args.out.mkdir(parents=True)
    for split, documents in splits.items():
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for document in documents:
                f.write(json.dumps(document, ensure_ascii=False) + "\n")
    (args.out / "haystack.txt").write_text(splits["valid"][0]["text"], encoding="utf-8")
    manifest = {"python": platform.python_version(),
                **{split: [{"name": d["name"], "chars": len(d["text"])} for d in documents]
                   for split, documents in splits.items()}}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for split, documents in splits.items():
        print(f"{split}: {len(documents)} documents, {sum(len(d['text']) for d in documents):,} characters")


if __name__ == "__main__":
    main()
