"""Document sources behind one interface: `open_source(spec, split)` returns a `DocumentSource` (`len`, `[i]`, `key`).

`spec` is `data.source`, one of:

    "stdlib"                            the `.py` files of the running interpreter's standard library
    "files:<glob>[,<glob>...]"          local files; `**` matches any depth of directories. A `.txt` file is one
    "<glob>[,<glob>...]"                document; a line of a `.jsonl` file is one (its text under `data.text_field`);
                                        a row of a `.parquet` file is one (column `data.text_field`)
    "arrayrecord:<dir>"                 a pre-tokenised corpus that `scripts/tokenize_corpus.py` wrote
                                        (`longctx.data.array_records`)
    "tfds:<name>[/<config>][:<version>]"  a tfds data set prepared as ArrayRecord in `data.tfds_data_dir`
                                        (`longctx.data.tfds_source`); nothing is downloaded

Text sources ("stdlib", files, tfds) yield `str`; a tokenized source ("arrayrecord") yields int32 arrays
`[BOS] + ids + [EOS]` and knows every document's length up front (`lengths()`).

The split of "stdlib" and files: every document belongs to exactly one split, chosen by a stable hash of its key (not
Python's salted `hash`): it is in "valid" iff `int(md5(key)) % 10_000 < valid_fraction * 10_000`. Keys are paths
relative to the corpus root, so a corpus splits the same wherever it lives: for the stdlib the path under
`sysconfig.get_paths()["stdlib"]`; for a `.txt` file its path under the fixed (wildcard-free) directory of its
pattern; for a line of a `.jsonl` file `"<that path>:<line number>"` (from 1); for a row of a `.parquet` file
`"<that path>:<row>"` (from 0). Documents whose text is only whitespace are skipped. An arrayrecord corpus was split
when it was written (its metadata records how); a tfds data set brings its own splits (`data.tfds_train_split`,
`data.tfds_valid_split`), so `valid_fraction` and `on_error` apply to "stdlib" and files only.

Opening a "stdlib" or files source reads every file once, checks every document, and keeps an index of the split's
documents (file, byte offset and size, line or row), not their texts; `source[i]` reads one document. Bad input is
found by that scan: a `.jsonl` line that is not JSON or has no string `data.text_field`, bytes that are not UTF-8, a
`.parquet` file that cannot be read or lacks the column, a null in the column. With `on_error="fatal"` the first one
raises ValueError naming the file and its line (or row); with "skip" such documents (or files) are left out and one
warning on the "longctx.data" logger counts them and lists the first few. Stdlib files are read the way Python reads
them (`tokenize.open`, honouring a PEP 263 coding cookie); the few that Python itself refuses to decode (CPython's
own bad-encoding test fixtures) are not part of the corpus.
"""

import array
import collections
import glob
import hashlib
import json
import logging
import os
import sysconfig
import threading
import tokenize
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx.data.array_records import ArrayRecordSource
from longctx.data.document_source import SPLITS, DocumentSource

ON_ERROR = ("fatal", "skip")
EXTENSIONS = (".txt", ".jsonl", ".parquet")
FILES_PREFIX, ARRAYRECORD_PREFIX, TFDS_PREFIX = "files:", "arrayrecord:", "tfds:"
SPEC_GRAMMAR = ('"stdlib", "files:<glob>[,<glob>...]" (or bare comma-separated globs) of .txt/.jsonl/.parquet '
                'files, "arrayrecord:<dir>" or "tfds:<name>"')
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages")
HASH_BUCKETS = 10_000
PARQUET_CACHED_ROW_GROUPS = 4  # row groups of text that a reading process keeps decoded (per source)
SKIPPED_SHOWN = 5  # bad documents that the on_error="skip" warning lists by location

logger = logging.getLogger("longctx.data")


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

    A leading "files:" is dropped. Raises FileNotFoundError for a pattern that matches no file and ValueError for an
    unsupported extension.
    """
    files, seen = [], set()
    for pattern in (p.strip() for p in source.removeprefix(FILES_PREFIX).split(",")):
        pattern = os.path.expanduser(pattern)
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"data.source: {pattern!r} matches no file (data.source is {SPEC_GRAMMAR})")
        root = _pattern_root(pattern)
        for path in paths:
            if os.path.splitext(path)[1] not in EXTENSIONS:
                raise ValueError(f"data.source: {path!r} is not one of {', '.join(EXTENSIONS)} "
                                 f"(data.source is {SPEC_GRAMMAR})")
            if os.path.realpath(path) not in seen:
                seen.add(os.path.realpath(path))
                files.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return files


class _Problems:
    """Bad input found by a scan: raised at once (on_error="fatal") or counted and warned about once ("skip")."""

    def __init__(self, spec: str, on_error: str):
        self.spec, self.on_error = spec, on_error
        self.count, self.first = 0, []

    def report(self, field: str, location: str, what: str) -> None:
        if self.on_error == "fatal":
            raise ValueError(f"{field}: {location} {what} (data.on_error='fatal'; 'skip' leaves such input out)")
        self.count += 1
        if len(self.first) < SKIPPED_SHOWN:
            self.first.append(f"{location} {what}")

    def warn(self) -> None:
        if self.count:
            logger.warning("data.source: left out %d bad documents or files of %r (data.on_error='skip'); "
                           "the first: %s", self.count, self.spec, "; ".join(self.first))


def _utf8(data: bytes, path: str, line_no: int | None, problems: _Problems) -> str | None:
    """`data` decoded strictly; a decoding error is reported at its line (counted in `data` unless `line_no`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line_no if line_no is not None else data.count(b"\n", 0, error.start) + 1
        problems.report("data.source", f"{path} line {line}", f"is not UTF-8 ({error.reason} at byte {error.start})")
        return None


def _universal_newlines(text: str) -> str:
    """Line ends as text-mode `open` reads them: \\r\\n and \\r become \\n."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _jsonl_text(line: bytes, path: str, line_no: int, text_field: str, problems: _Problems) -> str | None:
    """The `text_field` string of one `.jsonl` line, or None after reporting what is wrong with it."""
    decoded = _utf8(line, path, line_no, problems)
    if decoded is None:
        return None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        problems.report("data.source", f"{path} line {line_no}", f"is not JSON: {error}")
        return None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        has = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
        problems.report("data.text_field", f"{path} line {line_no}",
                        f"has no string field {text_field!r}; it has {has}")
        return None
    return record[text_field]


def _parquet_texts(parquet: pq.ParquetFile, row_group: int, text_field: str) -> pa.Array:
    """Column `text_field` of one row group as large_binary (UTF-8 is checked by whoever decodes a value)."""
    return parquet.read_row_group(row_group, columns=[text_field]).column(0).combine_chunks().cast(pa.large_binary())


class TextFileSource(DocumentSource):
    """The documents of one split of "stdlib" or of files (`.txt`, `.jsonl`, `.parquet`), read one at a time.

    Opening scans every file and checks every document (see the module docstring); the index it keeps holds per
    document a file id, a byte offset and size (`.jsonl`), a row group and row (`.parquet`) and a line or row number.
    A `.parquet` read decodes the document's whole row group; the last `PARQUET_CACHED_ROW_GROUPS` stay cached, so
    reads in row order are cheap and shuffled reads of a large parquet corpus are not: tokenize it once with
    `scripts/tokenize_corpus.py` instead.
    """

    tokenized = False

    def __init__(self, spec: str, split: str, *, text_field: str = "text", valid_fraction: float = 0.05,
                 on_error: str = "fatal"):
        _check_arguments(split, valid_fraction, on_error)
        self.spec, self.split, self.text_field = spec, split, text_field
        files = stdlib_files() if spec == "stdlib" else matched_files(spec)
        self._file_keys = [key for key, _ in files]
        self._paths = [path for _, path in files]
        index = array.array("q")  # Per document of the split: file id, offset, size, line or row number.
        problems, total, want_valid = _Problems(spec, on_error), 0, split == "valid"
        for file_id, (key, path) in enumerate(files):
            for number, offset, size in self._scan(path, problems):
                total += 1
                if in_valid_split(key if number < 0 else f"{key}:{number}", valid_fraction) == want_valid:
                    index.extend((file_id, offset, size, number))
        problems.warn()
        if not index:
            raise ValueError(f"data.source: split {split!r} of {spec!r} is empty ({total} documents in all with "
                             f"data.valid_fraction={valid_fraction}); add documents or change data.valid_fraction")
        self._index = np.frombuffer(index, np.int64).reshape(-1, 4)
        self._init_readers()

    def _init_readers(self) -> None:
        self._lock = threading.Lock()
        self._parquet_files: dict[int, pq.ParquetFile] = {}
        self._row_groups: collections.OrderedDict[tuple[int, int], pa.Array] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_parquet_files", "_row_groups"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_readers()

    def _scan(self, path: str, problems: _Problems) -> Iterator[tuple[int, int, int]]:
        """(line or row number or -1 for a whole file, offset, size) of every good non-blank document of a file."""
        if self.spec == "stdlib":
            try:
                with tokenize.open(path) as f:
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError):  # Not Python source that Python can read: not in the corpus.
                return
            if text.strip():
                yield -1, 0, 0
        elif path.endswith(".txt"):
            with open(path, "rb") as f:
                text = _utf8(f.read(), path, None, problems)
            if text is not None and text.strip():
                yield -1, 0, 0
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:
                offset = 0
                for line_no, line in enumerate(f, start=1):
                    start, offset = offset, offset + len(line)
                    if line.strip():
                        text = _jsonl_text(line, path, line_no, self.text_field, problems)
                        if text is not None and text.strip():
                            yield line_no, start, len(line)
        else:
            yield from self._scan_parquet(path, problems)

    def _scan_parquet(self, path: str, problems: _Problems) -> Iterator[tuple[int, int, int]]:
        """(row, row group, row within the group) of every good non-blank row of a `.parquet` file."""
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... on a file that is not parquet.
            problems.report("data.source", path, f"is not a readable parquet file: {error}")
            return
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            problems.report("data.text_field", path, f"has no column {self.text_field!r}; it has columns {names}")
            return
        column_type = parquet.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)):
            problems.report("data.text_field", path, f"column {self.text_field!r} holds {column_type}, not text")
            return
        row = 0
        for group in range(parquet.num_row_groups):
            try:
                values = _parquet_texts(parquet, group, self.text_field).to_pylist()
            except Exception as error:  # A corrupt row group: pyarrow's errors carry the reason.
                problems.report("data.source", f"{path} row group {group}", f"cannot be read: {error}")
                row += parquet.metadata.row_group(group).num_rows
                continue
            for index, value in enumerate(values):
                if value is None:
                    problems.report("data.text_field", f"{path} row {row + index}",
                                    f"has no {self.text_field!r} (null)")
                    continue
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    problems.report("data.source", f"{path} row {row + index}",
                                    f"is not UTF-8 ({error.reason} at byte {error.start})")
                    continue
                if text.strip():
                    yield row + index, group, index
            row += len(values)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> str:
        file_id, offset, size, number = self._index[self._checked_index(index)].tolist()
        path = self._paths[file_id]
        if self.spec == "stdlib":
            with tokenize.open(path) as f:
                return f.read()
        if path.endswith(".parquet"):
            return self._parquet_value(file_id, offset, size).decode("utf-8")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if path.endswith(".txt") else f.read(size)
        problems = _Problems(self.spec, "fatal")
        if path.endswith(".txt"):
            return _universal_newlines(_utf8(data, path, None, problems))
        return _jsonl_text(data, path, number, self.text_field, problems)

    def _parquet_value(self, file_id: int, group: int, row: int) -> bytes:
        """Row `row` of row group `group` of parquet file `file_id`, through the small row-group cache.

        One read at a time: a `pq.ParquetFile` must not be read from two threads at once (grain reads with several).
        """
        with self._lock:
            texts = self._row_groups.get((file_id, group))
            if texts is None:
                if file_id not in self._parquet_files:
                    self._parquet_files[file_id] = pq.ParquetFile(self._paths[file_id])
                texts = _parquet_texts(self._parquet_files[file_id], group, self.text_field)
                self._row_groups[(file_id, group)] = texts
                while len(self._row_groups) > PARQUET_CACHED_ROW_GROUPS:
                    self._row_groups.popitem(last=False)
            else:
                self._row_groups.move_to_end((file_id, group))
        return texts[row].as_py()

    def key(self, index: int) -> str:
        file_id, _, _, number = self._index[self._checked_index(index)].tolist()
        file_key = self._file_keys[file_id]
        return file_key if number < 0 else f"{file_key}:{number}"

    def describe(self) -> str:
        return (f"TextFileSource({self.spec!r}, split={self.split!r}: {len(self)} documents from "
                f"{len(self._paths)} files)")


def _check_arguments(split: str, valid_fraction: float, on_error: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0 <= valid_fraction <= 1:
        raise ValueError(f"data.valid_fraction must be in [0, 1], got {valid_fraction!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"data.on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


def open_source(spec: str, split: str, *, text_field: str = "text", valid_fraction: float = 0.05,
                on_error: str = "fatal", tfds_data_dir: str = "", tfds_train_split: str = "train",
                tfds_valid_split: str = "validation") -> DocumentSource:
    """The documents of `split` ("train" or "valid") of `data.source` `spec` (grammar in the module docstring).

    Every file is found and checked here, before any training work: FileNotFoundError / ValueError name the config
    field at fault. An empty split is a ValueError.
    """
    _check_arguments(split, valid_fraction, on_error)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data.source must be {SPEC_GRAMMAR}; got {spec!r}")
    if spec.startswith(ARRAYRECORD_PREFIX):
        return ArrayRecordSource(spec.removeprefix(ARRAYRECORD_PREFIX), split)
    if spec.startswith(TFDS_PREFIX):
        from longctx.data.tfds_source import TfdsSource  # tensorflow_datasets takes a second to import.
        return TfdsSource(spec.removeprefix(TFDS_PREFIX), split, data_dir=tfds_data_dir, text_field=text_field,
                          train_split=tfds_train_split, valid_split=tfds_valid_split)
    return TextFileSource(spec, split, text_field=text_field, valid_fraction=valid_fraction, on_error=on_error)


def load_documents(source: str, split: str, *, text_field: str = "text", valid_fraction: float = 0.05,
                   max_documents: int | None = None) -> list[str]:
    """The texts of `split` ("train" or "valid") of text source `source`, in corpus order (sorted paths, then lines).

    `source` is any text spec of `open_source` ("stdlib", files, "tfds:..." in tfds's default data dir), read with
    on_error="fatal"; `max_documents` keeps the first ones. Raises FileNotFoundError / ValueError naming the config
    field at fault, before reading any document where it can; ValueError for a tokenized ("arrayrecord:") source.
    """
    if max_documents is not None and (not isinstance(max_documents, int) or max_documents < 1):
        raise ValueError(f"max_documents must be a positive int or None, got {max_documents!r}")
    documents = open_source(source, split, text_field=text_field, valid_fraction=valid_fraction)
    if documents.tokenized:
        raise ValueError(f"data.source: {source!r} holds token ids, not texts; load_documents reads text sources")
    return [documents[i] for i in range(min(len(documents), max_documents or len(documents)))]
