"""Document sources: the stdlib corpus, .txt/.jsonl globs, the stable train/valid split, and the errors."""

import json
import os
import shutil

import pytest

from longctx.data import load_documents


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
    with pytest.raises(ValueError, match=r"data.source: '.*data.csv' is not one of .txt, .jsonl"):
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
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match=r"data.valid_fraction must be in \(0, 1\)"):
            load_documents("stdlib", "train", valid_fraction=fraction)
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
