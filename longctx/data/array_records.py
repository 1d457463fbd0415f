"""Pre-tokenised corpora in ArrayRecord files: `ArrayRecordSource` reads what `corpus_writer.write_corpus` wrote.

A corpus directory (`data.source = "arrayrecord:<dir>"`) holds

    metadata.json                           format_version; the tokenizer (spec, repr, vocab_size, bos_id, eos_id,
                                            pad_id); dtype; the valid_fraction and text_field it was written with;
                                            per split: files, documents per file, documents, tokens, source spec
    lengths-<split>.npy                     int64 [documents]: tokens of each document, in record order
    <split>-00000-of-0000N.array_record     one record per document, `[BOS] + ids + [EOS]` as little-endian `dtype`

`dtype` is uint16 when vocab_size <= 65536, else int32; the reader returns int32. Records are written with
group_size 1, so reading one document decodes only that document. Record order is the source's document order, the
shards of a split being consecutive runs of it.
"""

import json
import os

import grain
import numpy as np

from longctx.data.document_source import SPLITS, DocumentSource
from longctx.data.tokenizers import Tokenizer

FORMAT_VERSION = 1
KNOWN_FORMAT_VERSIONS = (1,)
METADATA_FILE = "metadata.json"
WRITER_OPTIONS = "group_size:1"
UINT16_MAX_VOCAB = 65_536


def lengths_file(split: str) -> str:
    return f"lengths-{split}.npy"


def record_files(split: str, num_shards: int) -> list[str]:
    return [f"{split}-{shard:05d}-of-{num_shards:05d}.array_record" for shard in range(num_shards)]


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else little-endian int32."""
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<i4")


def read_metadata(directory: str) -> dict:
    """The checked `metadata.json` of a corpus directory; FileNotFoundError / ValueError name `data.source`."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data.source: arrayrecord directory {directory!r} does not exist")
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.source: {directory!r} has no {METADATA_FILE}; an arrayrecord corpus is a "
                                f"directory that scripts/tokenize_corpus.py wrote")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"data.source: {path} is not JSON: {error}") from error
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if version not in KNOWN_FORMAT_VERSIONS:
        raise ValueError(f"data.source: {path} has format_version {version!r}; this longctx reads format versions "
                         f"{', '.join(map(str, KNOWN_FORMAT_VERSIONS))} (rewrite it with scripts/tokenize_corpus.py)")
    missing = [k for k in ("tokenizer", "vocab_size", "bos_id", "eos_id", "pad_id", "dtype", "splits")
               if k not in metadata]
    if missing:
        raise ValueError(f"data.source: {path} lacks {', '.join(missing)}")
    return metadata


class ArrayRecordSource(DocumentSource):
    """The documents of one split of a corpus directory: int32 `[BOS] + ids + [EOS]` arrays, via grain's reader.

    `metadata` is the corpus's metadata.json; `lengths()` its lengths-<split>.npy. Use `check_tokenizer` to
    confirm that the configured tokenizer is the one the corpus was written with.
    """

    tokenized = True

    def __init__(self, directory: str, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.directory, self.split = directory, split
        self.metadata = read_metadata(directory)
        info = self.metadata["splits"].get(split)
        if info is None:
            raise ValueError(f"data.source: {directory!r} has no split {split!r}; it has "
                             f"{', '.join(self.metadata['splits'])}")
        missing = [k for k in ("files", "documents_per_file", "num_documents") if k not in info]
        if missing:
            raise ValueError(f"data.source: split {split!r} of {directory!r} lacks {', '.join(missing)} in "
                             f"{METADATA_FILE}")
        self._files = list(info["files"])
        paths = [os.path.join(directory, name) for name in self._files]
        for path in paths + [os.path.join(directory, lengths_file(split))]:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.source: {path} is missing; {METADATA_FILE} lists it")
        self._dtype = np.dtype(self.metadata["dtype"]).newbyteorder("<")
        self._lengths = np.load(os.path.join(directory, lengths_file(split)))
        self._first_record = np.cumsum([0] + list(info["documents_per_file"]))
        if not len(self._lengths):
            raise ValueError(f"data.source: split {split!r} of {directory!r} is empty")
        self._records = grain.sources.ArrayRecordDataSource(paths)
        counts = {"metadata.json": info["num_documents"], lengths_file(split): len(self._lengths),
                  "the record files": len(self._records), "documents_per_file": int(self._first_record[-1])}
        if len(set(counts.values())) != 1:
            raise ValueError(f"data.source: {directory!r} split {split!r} is inconsistent, document counts: "
                             f"{counts}; rewrite it with scripts/tokenize_corpus.py")

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._records[self._checked_index(index)], self._dtype).astype(np.int32)

    def key(self, index: int) -> str:
        index = self._checked_index(index)
        shard = int(np.searchsorted(self._first_record, index, side="right")) - 1
        return f"{self._files[shard]}:{index - self._first_record[shard]}"

    def lengths(self) -> np.ndarray:
        return self._lengths

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """ValueError naming `data.tokenizer` if `tokenizer`'s vocab_size or BOS/EOS/PAD ids are not the corpus's."""
        ours = {k: getattr(tokenizer, k) for k in ("vocab_size", "bos_id", "eos_id", "pad_id")}
        theirs = {k: self.metadata[k] for k in ours}
        if ours != theirs:
            raise ValueError(f"data.tokenizer: {tokenizer!r} has {ours}, but {self.directory!r} was written with "
                             f"{self.metadata['tokenizer']!r}, which has {theirs}")

    def describe(self) -> str:
        return (f"ArrayRecordSource({self.directory!r}, split={self.split!r}: {len(self)} documents, "
                f"{int(self._lengths.sum())} tokens, tokenizer {self.metadata['tokenizer']!r})")
