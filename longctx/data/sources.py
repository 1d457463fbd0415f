"""Documents as strings: the interpreter's own standard library (the default) or local `.txt` / `.jsonl` files.

Every document belongs to exactly one split, chosen by a stable hash of its key (not Python's salted `hash`):
it is in "valid" iff `int(md5(key)) % 10_000 < valid_fraction * 10_000`. Keys are paths relative to the corpus root,
so a corpus splits the same wherever it lives: for the stdlib the path under `sysconfig.get_paths()["stdlib"]`; for
a `.txt` file its path under the fixed (wildcard-free) directory of its pattern; for a line of a `.jsonl` file
`"<that path>:<line number>"`. Documents whose text is only whitespace are skipped.
"""

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator

SPLITS = ("train", "valid")
EXTENSIONS = (".txt", ".jsonl")
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages")
HASH_BUCKETS = 10_000


def in_valid_split(key: str, valid_fraction: float) -> bool:
    """Whether the document with `key` is held out: a stable md5 bucket below `valid_fraction` of the buckets."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % HASH_BUCKETS
    return bucket < valid_fraction * HASH_BUCKETS


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of every `.py` file of the running interpreter's stdlib, sorted by the former."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(files)


def _pattern_root(pattern: str) -> str:
    """The longest leading directory of `pattern` without wildcards: what keys of its files are relative to."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or "."


def matched_files(source: str) -> list[tuple[str, str]]:
    """(key, path) of every file that the comma-separated paths/globs of `data.source` name, in order, deduplicated.

    Raises FileNotFoundError for a pattern that matches no file and ValueError for an unsupported extension.
    """
    files, seen = [], set()
    for pattern in (p.strip() for p in source.split(",")):
        pattern = os.path.expanduser(pattern)
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"data.source: {pattern!r} matches no file")
        root = _pattern_root(pattern)
        for path in paths:
            if os.path.splitext(path)[1] not in EXTENSIONS:
                raise ValueError(f"data.source: {path!r} is not one of {', '.join(EXTENSIONS)} "
                                 f"(data.source is \"stdlib\" or comma-separated paths/globs of such files)")
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return files


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _jsonl_documents(key: str, path: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(key:line_no, text) of every non-blank line of a `.jsonl` file; line numbers count from 1."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"data.source: {path} line {line_no} is not JSON: {error}") from error
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                has = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise ValueError(f"data.text_field: {path} line {line_no} has no string field {text_field!r}; "
                                 f"it has {has}")
            yield f"{key}:{line_no}", record[text_field]


def _all_documents(source: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(key, text) of every document of `source`; every file is found and checked before the first is read."""
    if source == "stdlib":
        for key, path in stdlib_files():
            yield key, _read_text(path)
        return
    for key, path in matched_files(source):
        if path.endswith(".txt"):
            yield key, _read_text(path)
        else:
            yield from _jsonl_documents(key, path, text_field)


def load_documents(source: str, split: str, *, text_field: str = "text", valid_fraction: float = 0.05,
                   max_documents: int | None = None) -> list[str]:
    """The texts of `split` ("train" or "valid") of `source`, in corpus order (sorted paths, then line order).

    `source` is "stdlib" or comma-separated paths/globs (`**` recursive) of `.txt` files (a file is a document) and
    `.jsonl` files (a line is a document, its text under `text_field`). `max_documents` keeps the first ones.
    Raises FileNotFoundError / ValueError naming the config field at fault, before reading any file where it can.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"data.valid_fraction must be in (0, 1), got {valid_fraction!r}")
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
    want_valid = split == "valid"
    documents, total = [], 0
    for key, text in _all_documents(source, text_field):
        if not text.strip():
            continue
        total += 1
        if in_valid_split(key, valid_fraction) == want_valid:
            documents.append(text)
            if len(documents) == max_documents:
                break
    if not documents:
        raise ValueError(f"data.source: split {split!r} of {source!r} is empty ({total} documents in all with "
                         f"data.valid_fraction={valid_fraction}); add documents or change data.valid_fraction")
    return documents
