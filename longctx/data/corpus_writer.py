"""`write_corpus`: a text source tokenized once into an ArrayRecord corpus directory (format in `array_records.py`).

`scripts/tokenize_corpus.py` is its command line; training reads the result with `data.source = "arrayrecord:<dir>"`.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from longctx.data.array_records import (FORMAT_VERSION, METADATA_FILE, WRITER_OPTIONS, lengths_file, record_files,
                                        token_dtype)
from longctx.data.document_source import SPLITS, DocumentSource
from longctx.data.sources import open_source
from longctx.data.tokenizers import Tokenizer


def _write_split(directory: str, split: str, source_spec: str, documents: DocumentSource, tokenizer: Tokenizer,
                 dtype: np.dtype, *, num_shards: int, batch_size: int, progress: bool) -> dict:
    """Tokenizes and writes one split; returns its metadata entry."""
    num_shards = min(num_shards, len(documents))
    files = record_files(split, num_shards)
    bounds = np.linspace(0, len(documents), num_shards + 1).round().astype(int)
    lengths = np.empty(len(documents), np.int64)
    bar = tqdm.tqdm(total=len(documents), unit="doc", desc=f"tokenizing {split}", disable=not progress)
    writer, shard = None, -1
    try:
        for start in range(0, len(documents), batch_size):
            stop = min(start + batch_size, len(documents))
            batch = tokenizer.encode_batch([documents[i] for i in range(start, stop)])
            for index, ids in zip(range(start, stop), batch):
                if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                    raise ValueError(f"data.tokenizer: {tokenizer!r} gave ids outside [0, {tokenizer.vocab_size}) "
                                     f"for {documents.key(index)}")
                while index >= bounds[shard + 1]:
                    if writer is not None:
                        writer.close()
                    shard += 1
                    writer = ArrayRecordWriter(os.path.join(directory, files[shard]), WRITER_OPTIONS)
                framed = tokenizer.frame(ids, dtype)
                writer.write(framed.tobytes())
                lengths[index] = len(framed)
            bar.update(stop - start)
            bar.set_postfix(tokens=int(lengths[:stop].sum()), refresh=False)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    np.save(os.path.join(directory, lengths_file(split)), lengths)
    return {"files": files, "documents_per_file": np.diff(bounds).tolist(), "num_documents": len(documents),
            "num_tokens": int(lengths.sum()), "source": source_spec, "description": documents.describe()}


def write_corpus(out_dir: str, source_spec: str, tokenizer: Tokenizer, tokenizer_spec: str, *, num_shards: int = 1,
                 valid_fraction: float = 0.05, text_field: str = "text", on_error: str = "fatal",
                 batch_size: int = 256, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenizes both splits of text source `source_spec` into the corpus directory `out_dir`; returns its metadata.

    Each split is tokenized `batch_size` documents at a time with `tokenizer.encode_batch` and written to at most
    `num_shards` record files. `tokenizer_spec` is what `data.tokenizer` must name to train on the corpus. Both
    splits are opened (so every file is checked) before anything is written. The corpus is built in a temporary
    sibling directory and renamed to `out_dir` at the end, so an interrupted run leaves nothing under `out_dir`.
    Raises FileExistsError if `out_dir` exists and is not an empty directory, unless `overwrite`.
    """
    for name, value in (("num_shards", num_shards), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir!r} exists and is not an empty directory; pass overwrite=True "
                              f"(--overwrite) to replace it")
    sources = {split: open_source(source_spec, split, text_field=text_field, valid_fraction=valid_fraction,
                                  on_error=on_error) for split in SPLITS}
    if sources["train"].tokenized:
        raise ValueError(f"data.source: {source_spec!r} is already tokenized; write_corpus reads text sources")
    dtype = token_dtype(tokenizer.vocab_size)
    metadata = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_spec, "tokenizer_repr": repr(tokenizer),
                "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                "pad_id": tokenizer.pad_id, "dtype": dtype.name, "framing": "[BOS] + ids + [EOS]",
                "valid_fraction": valid_fraction, "text_field": text_field, "splits": {}}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.incomplete-", dir=parent)
    try:
        for split, documents in sources.items():
            metadata["splits"][split] = _write_split(work_dir, split, source_spec, documents, tokenizer, dtype,
                                                     num_shards=num_shards, batch_size=batch_size, progress=progress)
        with open(os.path.join(work_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
        os.chmod(work_dir, 0o755)  # mkdtemp makes it private to us; a corpus is for everyone who trains on it.
        _move_into_place(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return metadata


def _move_into_place(work_dir: str, out_dir: str) -> None:
    """Renames `work_dir` to `out_dir`, replacing whatever is there (the caller has checked it may)."""
    if os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(work_dir, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.replaced-", dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "corpus"))
    os.rename(work_dir, out_dir)
    shutil.rmtree(old)
