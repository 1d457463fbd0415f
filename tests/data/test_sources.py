"""Document sources: the stdlib corpus, .txt/.jsonl/.parquet globs, the stable split, the lazy index, bad input."""

import json
import logging
import os
import pickle
import re
import shutil

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx.data import sources
from longctx.data.sources import in_valid_split, load_documents, open_source


@pytest.fixture(scope="module")
def stdlib_splits() -> dict[str, list[str]]:
    return {split: load_documents("stdlib", split) for split in ("train", "valid")}


def write_jsonl(path, texts, field="text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)))


def test_stdlib_corpus_holds_the_stdlib_and_splits_it(stdlib_splits):
    train, valid = stdlib_splits["train"], stdlib_splits["valid"]
    assert len(train) > 500 and valid
    with open(os.__file__, encoding="utf-8") as f:
        assert f.read() in train + valid
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.09  # valid_fraction 0.05 of ~1,700 files.
    assert all(text.strip() for text in train + valid)


def test_stdlib_corpus_is_deterministic(stdlib_splits):
    assert load_documents("stdlib", "valid") == stdlib_splits["valid"]
    assert load_documents("stdlib", "train", max_documents=5) == stdlib_splits["train"][:5]


def test_split_is_disjoint_complete_and_near_the_fraction(tmp_path):
    texts = [f"document number {i}" for i in range(2000)]
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    train = load_documents(str(tmp_path / "corpus.jsonl"), "train", valid_fraction=0.2)
    valid = load_documents(str(tmp_path / "corpus.jsonl"), "valid", valid_fraction=0.2)
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(texts)
    assert 0.17 < len(valid) / len(texts) < 0.23
    assert train == [t for t in texts if t in set(train)]  # Corpus order is kept.
    # The ends: 0 holds nothing out (a corpus to train on), 1 everything (a corpus to evaluate on).
    assert load_documents(str(tmp_path / "corpus.jsonl"), "train", valid_fraction=0) == texts
    assert load_documents(str(tmp_path / "corpus.jsonl"), "valid", valid_fraction=1) == texts


def test_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    write_jsonl(tmp_path / "a" / "corpus" / "part.jsonl", [f"line {i}" for i in range(200)])
    shutil.copytree(tmp_path / "a" / "corpus", tmp_path / "b" / "elsewhere" / "corpus")
    splits = [load_documents(str(tmp_path / root / "**" / "*.jsonl"), "valid", valid_fraction=0.3)
              for root in ("a", "b/elsewhere")]
    assert splits[0] == splits[1]


def test_txt_and_jsonl_globs(tmp_path):
    (tmp_path / "books" / "deep").mkdir(parents=True)
    txt = {"books/one.txt": "first book\nwith two lines", "books/deep/two.txt": "second book",
           "books/blank.txt": "  \n"}
    for name, text in txt.items():
        (tmp_path / name).write_text(text)
    write_jsonl(tmp_path / "lines.jsonl", ["line one", "line two", "line three"])
    (tmp_path / "lines.jsonl").write_text((tmp_path / "lines.jsonl").read_text() + "\n")  # A trailing blank line.
    source = f"{tmp_path}/books/**/*.txt, {tmp_path}/*.jsonl,{tmp_path}/lines.jsonl"  # The last one is a repeat.
    documents = [d for split in ("train", "valid") for d in load_documents(source, split, valid_fraction=0.4)]
    assert sorted(documents) == sorted(["first book\nwith two lines", "second book", "line one", "line two",
                                        "line three"])


def test_jsonl_text_field(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [f"body {i}" for i in range(50)], field="content")
    documents = load_documents(str(tmp_path / "c.jsonl"), "train", text_field="content", valid_fraction=0.1)
    assert documents and all(d.startswith("body ") for d in documents)


def test_missing_path_names_the_field_and_pattern(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    for source in (str(tmp_path / "nothing" / "*.jsonl"), f"{tmp_path}/ok.txt,{tmp_path}/gone.txt"):
        with pytest.raises(FileNotFoundError, match=r"data.source: '.*(nothing/\*.jsonl|gone.txt)' matches no file"):
            load_documents(source, "train")


def test_unsupported_extension(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data.source: '.*data.csv' is not one of .txt, .jsonl, .parquet"):
        load_documents(str(tmp_path / "*"), "train")


def test_jsonl_line_without_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x", "id": 2}) + "\n")
    with pytest.raises(ValueError, match=r"data.text_field: .*c.jsonl line 2 has no string field 'text'; "
                                         r"it has keys \['body', 'id'\]"):
        load_documents(str(path), "train")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"data.source: .*c.jsonl line 1 is not JSON"):
        load_documents(str(path), "train")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, valid"):
        load_documents("stdlib", "test")
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"data.valid_fraction must be in \[0, 1\]"):
            load_documents("stdlib", "train", valid_fraction=fraction)
    with pytest.raises(ValueError, match=r"split 'train' of 'stdlib' is empty .* data.valid_fraction=1"):
        load_documents("stdlib", "train", valid_fraction=1)
    with pytest.raises(ValueError, match="max_documents"):
        load_documents("stdlib", "train", max_documents=0)


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "only.txt").write_text("a single document")
    splits = []
    for split in ("train", "valid"):
        try:
            splits.append(load_documents(str(tmp_path / "only.txt"), split))
        except ValueError as error:
            assert f"split '{split}'" in str(error) and "data.valid_fraction" in str(error)
    assert len(splits) == 1


# ---- open_source: the lazy index, parquet, keys, bad input ----

def write_parquet(path, texts, field="text", row_group_size=3, type_=None) -> None:
    table = pa.table({"id": list(range(len(texts))), field: pa.array(texts, type=type_)})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture
def mixed_corpus(tmp_path) -> str:
    """3 .txt files, a .jsonl of 30 lines, a .parquet of 20 rows in row groups of 3; returns the source spec."""
    (tmp_path / "txt").mkdir()
    for i in range(3):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"text file {i}\r\nsecond line")
    write_jsonl(tmp_path / "lines.jsonl", [f"json line {i}" for i in range(30)])
    write_parquet(tmp_path / "rows.parquet", [f"parquet row {i}" for i in range(20)])
    return f"files:{tmp_path}/txt/*.txt,{tmp_path}/*.jsonl,{tmp_path}/*.parquet"


def test_open_source_reads_what_load_documents_reads(mixed_corpus):
    documents = {}
    for split in ("train", "valid"):
        source = open_source(mixed_corpus, split, valid_fraction=0.3)
        documents[split] = [source[i] for i in range(len(source))]
        assert documents[split] == load_documents(mixed_corpus, split, valid_fraction=0.3)
        assert not source.tokenized and source.lengths() is None and len(source) == len(documents[split])
        assert source[-1] == documents[split][-1]
        with pytest.raises(IndexError):
            source[len(source)]
        shuffled = np.random.default_rng(0).permutation(len(source))  # Out of order, across parquet row groups.
        assert [source[int(i)] for i in shuffled] == [documents[split][i] for i in shuffled]
        assert list(grain.MapDataset.source(pickle.loads(pickle.dumps(source)))) == documents[split]
    expected = ([f"text file {i}\nsecond line" for i in range(3)] + [f"json line {i}" for i in range(30)]
                + [f"parquet row {i}" for i in range(20)])  # Text mode: \r\n read as \n.
    assert sorted(documents["train"] + documents["valid"]) == sorted(expected)
    assert documents["train"] and documents["valid"]


def test_keys_name_the_file_and_line_or_row(mixed_corpus):
    keys = {}
    for split in ("train", "valid"):
        source = open_source(mixed_corpus, split, valid_fraction=0.3)
        for i in range(len(source)):
            keys[source.key(i)] = source[i]
            assert in_valid_split(source.key(i), 0.3) == (split == "valid")
    assert keys["1.txt"] == "text file 1\nsecond line"  # Relative to the pattern's fixed directory.
    assert keys["lines.jsonl:1"] == "json line 0" and keys["lines.jsonl:30"] == "json line 29"  # Lines from 1.
    assert keys["rows.parquet:0"] == "parquet row 0" and keys["rows.parquet:19"] == "parquet row 19"  # Rows from 0.
    assert len(keys) == 53


def test_parquet_text_field_and_blank_rows(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["one", "  ", "three", "four"], field="body", row_group_size=2)
    read = {}
    for split in ("train", "valid"):
        source = open_source(str(tmp_path / "a.parquet"), split, text_field="body", valid_fraction=0.5)
        read.update({source.key(i): source[i] for i in range(len(source))})
    assert read == {"a.parquet:0": "one", "a.parquet:2": "three", "a.parquet:3": "four"}


def test_stdlib_opens_with_on_error_fatal_and_reads_as_python_does(stdlib_splits, tmp_path, monkeypatch):
    assert len(stdlib_splits["train"]) + len(stdlib_splits["valid"]) > len(sources.stdlib_files()) - 100
    (tmp_path / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    (tmp_path / "plain.py").write_text("x = 1\n")
    (tmp_path / "bad_cookie.py").write_bytes(b"# -*- coding: no-such-codec -*-\nx = 1\n")  # Python refuses it too.
    files = [(p.name, str(p)) for p in sorted(tmp_path.glob("*.py"))]
    monkeypatch.setattr(sources, "stdlib_files", lambda: files)
    texts = {}
    for split in ("train", "valid"):
        try:
            source = open_source("stdlib", split, valid_fraction=0.5)
        except ValueError:  # One of the splits of two documents may be empty.
            continue
        texts.update({source.key(i): source[i] for i in range(len(source))})
    assert texts == {"latin.py": "# -*- coding: latin-1 -*-\nname = 'café'\n", "plain.py": "x = 1\n"}


def _bad_inputs(directory) -> dict[str, tuple[str, list[str]]]:
    """name → (source spec, regex of the fatal error); each source also holds the good documents "good 0", ..."""
    good = [f"good {i}" for i in range(3)]
    lines = [json.dumps({"text": t}) for t in good]
    cases = {
        "not json": (lines[:1] + ["{not json"] + lines[1:], r"data.source: .*bad.jsonl line 2 is not JSON"),
        "no text field": (lines + [json.dumps({"body": "x"})],
                          r"data.text_field: .*bad.jsonl line 4 has no string field 'text'; it has keys \['body'\]"),
        "text not a string": ([json.dumps({"text": 7})] + lines,
                              r"data.text_field: .*bad.jsonl line 1 has no string field 'text'"),
        "not utf-8 jsonl": (lines[:2] + [b'{"text": "caf\xe9"}'] + lines[2:],
                            r"data.source: .*bad.jsonl line 3 is not UTF-8 \(invalid continuation byte"),
    }
    specs = {}
    for name, (rows, message) in cases.items():
        path = directory / name.replace(" ", "_") / "bad.jsonl"
        path.parent.mkdir()
        path.write_bytes(b"\n".join(r if isinstance(r, bytes) else r.encode() for r in rows) + b"\n")
        specs[name] = (str(path), message)
    (directory / "txt").mkdir()
    for i, text in enumerate(good):
        (directory / "txt" / f"good{i}.txt").write_text(text)
    (directory / "txt" / "bad.txt").write_bytes(b"first line\nsecond \xff line\n")
    specs["not utf-8 txt"] = (str(directory / "txt" / "*.txt"), r"data.source: .*bad.txt line 2 is not UTF-8")
    parquet_cases = {
        "unreadable parquet": r"data.source: .*bad.parquet is not a readable parquet file",
        "parquet without the column": r"data.text_field: .*bad.parquet has no column 'text'; it has columns "
                                      r"\['id', 'body'\]",
        "parquet null": r"data.text_field: .*bad.parquet row 1 has no 'text' \(null\)",
        "parquet not utf-8": r"data.source: .*bad.parquet row 2 is not UTF-8",
        "parquet int column": r"data.text_field: .*bad.parquet column 'text' holds int64, not text",
    }
    for name, message in parquet_cases.items():
        (directory / name.replace(" ", "_")).mkdir()
        write_parquet(directory / name.replace(" ", "_") / "good.parquet", good)
        bad = directory / name.replace(" ", "_") / "bad.parquet"
        if name == "unreadable parquet":
            bad.write_bytes(b"PAR1 this is not parquet")
        elif name == "parquet without the column":
            write_parquet(bad, ["x"], field="body")
        elif name == "parquet null":
            write_parquet(bad, ["x", None, "y"])
        elif name == "parquet not utf-8":
            write_parquet(bad, [b"x", b"y", b"caf\xe9"], type_=pa.binary())
        else:
            write_parquet(bad, [1, 2])
        specs[name] = (str(directory / name.replace(" ", "_") / "*.parquet"), message)
    return specs


def test_bad_input_is_fatal_by_default_and_skipped_on_request(tmp_path, caplog):
    for name, (spec, message) in _bad_inputs(tmp_path).items():
        with pytest.raises(ValueError, match=message):
            open_source(spec, "train", valid_fraction=0.01)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="longctx.data"):
            source = open_source(spec, "train", valid_fraction=0.01, on_error="skip")
        kept = sorted(source[i] for i in range(len(source)))
        bad_kept = {"parquet null": ["x", "y"], "parquet not utf-8": ["x", "y"]}.get(name, [])
        assert kept == sorted(["good 0", "good 1", "good 2"] + bad_kept), name
        warnings = [r for r in caplog.records if r.name == "longctx.data"]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING, name
        location = re.search(r"\.\*(bad\.\w+(?: (?:line|row) \d)?)", message).group(1)
        assert "left out 1 bad" in warnings[0].getMessage() and location in warnings[0].getMessage(), name


def test_skip_warning_counts_all_and_lists_the_first_few(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    path.write_text("".join("{broken\n" if i % 2 else json.dumps({"text": f"t{i}"}) + "\n" for i in range(40)))
    with caplog.at_level(logging.WARNING, logger="longctx.data"):
        open_source(str(path), "train", on_error="skip", valid_fraction=0.01)
    (record,) = caplog.records
    assert "left out 20 bad" in record.getMessage()
    assert [f"c.jsonl line {n} " in record.getMessage() for n in (2, 4, 6, 8, 10, 12)] == [True] * 5 + [False]


def test_on_error_must_be_fatal_or_skip(tmp_path):
    with pytest.raises(ValueError, match="data.on_error must be one of fatal, skip, got 'ignore'"):
        open_source("stdlib", "train", on_error="ignore")


def test_a_split_left_empty_by_skipped_documents_is_an_error(tmp_path):
    (tmp_path / "c.jsonl").write_text("{broken\n" * 5)
    with pytest.raises(ValueError, match=r"data.source: split 'train' of '.*c.jsonl' is empty \(0 documents"):
        open_source(str(tmp_path / "c.jsonl"), "train", on_error="skip")


def test_spec_prefixes(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    for spec in (f"files:{tmp_path}/a.txt", f"{tmp_path}/a.txt"):
        assert open_source(spec, "train")[0] == "alpha"
    with pytest.raises(FileNotFoundError, match="data.source: 'arrayrecords:/nowhere' matches no file .*arrayrecord:"):
        open_source("arrayrecords:/nowhere", "train")
    with pytest.raises(ValueError, match="data.source must be"):
        open_source("", "train")
