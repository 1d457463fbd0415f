"""Untie the Knots: every token kept, chunks and markers where they belong, the restore answer, the loss weights,
determinism and exact resumption."""

import collections

import grain
import numpy as np
import pytest

from longctx.data.packing import packed_batches
from longctx.data.untie_knots import untie_knots_batches
from resume_checks import assert_resumes_from_state

SEQ_LEN, BATCH, PAD = 128, 2, -1
HEAD, TAIL, ID_OPEN, ID_CLOSE, OPEN, SEP, CLOSE = range(900_001, 900_008)
ALPHABET = np.arange(800_000, 800_006)
MARKERS = {"knot_head": [HEAD], "knot_tail": [TAIL], "id_open": [ID_OPEN], "id_close": [ID_CLOSE],
           "restore_open": [OPEN], "restore_sep": [SEP], "restore_close": [CLOSE], "id_alphabet": ALPHABET}


def documents(num_docs: int = 30, seed: int = 0) -> list[np.ndarray]:
    """Documents of 1..60 tokens; token d·1000 + k is token k of document d."""
    rng = np.random.default_rng(seed)
    return [d * 1000 + np.arange(int(rng.integers(1, 60)), dtype=np.int32) for d in range(num_docs)]


def batches(docs, *, endless=False, restore=True, **kwargs):
    dataset = grain.MapDataset.source(docs)
    dataset = dataset.repeat().to_iter_dataset() if endless else dataset.to_iter_dataset()
    markers = MARKERS if restore else {"knot_head": [HEAD], "knot_tail": [TAIL]}
    args = dict(seq_len=SEQ_LEN, batch_size=BATCH, pad_id=PAD, seed=0, markers=markers, restore=restore, id_len=2)
    args.update(kwargs)
    return untie_knots_batches(dataset, **args)


def parse(row: np.ndarray) -> list[dict]:
    """A knotted row → its chunks (and whole documents) in row order: {"id", "head", "text", "tail", "answer"}."""
    chunks, k, row = [], 0, [int(t) for t in row if t != PAD]
    while k < len(row):
        chunk = {"id": None, "head": False, "text": [], "tail": False, "answer": None}
        if row[k] == ID_OPEN:
            end = row.index(ID_CLOSE, k)
            chunk["id"], k = tuple(row[k + 1:end]), end + 1
        if row[k] == HEAD:
            chunk["head"], k = True, k + 1
        while k < len(row) and row[k] < 800_000 and (not chunk["text"] or row[k] == chunk["text"][-1] + 1):
            chunk["text"].append(row[k])  # Whole documents follow each other unmarked: split where the doc changes.
            k += 1
        if k < len(row) and row[k] == TAIL:
            chunk["tail"], k = True, k + 1
        if k < len(row) and row[k] == OPEN:
            end = row.index(CLOSE, k)
            answer = row[k + 1:end]
            chunk["answer"] = [tuple(answer[i:i + 2]) for i in range(0, len(answer), 3)]
            assert all(token == SEP for token in answer[2::3])
            k = end + 1
        assert chunk["text"], f"a chunk has text, at token {k} of {row}"
        chunks.append(chunk)
    return chunks


def rows_of(dataset) -> list[dict[str, np.ndarray]]:
    return [{key: value[r] for key, value in batch.items()} for batch in dataset for r in range(len(batch["tokens"]))]


def test_every_token_is_kept_in_chunks_marked_by_knots():
    docs = documents()
    rows = rows_of(batches(docs))
    text = []
    for row in rows:
        assert np.all(row["segment_ids"][row["tokens"] != PAD] == 1), "a knotted row is one segment"
        np.testing.assert_array_equal(row["positions"][row["tokens"] != PAD], np.arange(np.sum(row["tokens"] != PAD)))
        per_doc = collections.defaultdict(list)
        for chunk in parse(row["tokens"]):
            text += chunk["text"]
            doc, offsets = np.divmod(chunk["text"], 1000)
            assert len(set(doc)) == 1 and np.all(np.diff(offsets) == 1), "a chunk is a contiguous run of one doc"
            per_doc[doc[0]].append(chunk)
        for doc, chunks in per_doc.items():
            chunks.sort(key=lambda c: c["text"][0])
            assert len(chunks) <= 3
            assert [c["head"] for c in chunks] == [False] + [True] * (len(chunks) - 1), "h_j before chunks 2..k"
            assert [c["tail"] for c in chunks] == [True] * (len(chunks) - 1) + [False], "t_j after chunks 1..k-1"
    assert sorted(text) == sorted(np.concatenate(docs).tolist()), "every token once, none invented"
    assert all(np.sum(row["tokens"] != PAD) == SEQ_LEN for row in rows[:-1]), "rows are full"


def test_chunks_are_shuffled_across_documents_and_keep_their_order_on_request():
    def out_of_order(keep_chunk_order):
        disordered = 0
        for row in rows_of(batches(documents(), keep_chunk_order=keep_chunk_order)):
            seen = {}
            for chunk in parse(row["tokens"]):
                doc, start = divmod(chunk["text"][0], 1000)
                disordered += start < seen.get(doc, -1)
                seen[doc] = start
        return disordered

    assert out_of_order(False) > 0
    assert out_of_order(True) == 0


def test_restore_answers_each_documents_chunk_ids_in_document_order():
    answered = 0
    for row in rows_of(batches(documents())):
        chunks = parse(row["tokens"])
        ids = [chunk["id"] for chunk in chunks if chunk["id"] is not None]
        assert len(set(ids)) == len(ids), "IDs are distinct within a row"
        by_doc = collections.defaultdict(list)
        for position, chunk in enumerate(chunks):
            by_doc[chunk["text"][0] // 1000].append((position, chunk))
        for doc, found in by_doc.items():
            if len(found) == 1:
                assert found[0][1]["id"] is None and found[0][1]["answer"] is None, "a whole document is unmarked"
                continue
            last = max(position for position, _ in found)
            for position, chunk in found:
                assert (chunk["answer"] is not None) == (position == last), "the answer follows the last chunk"
            in_doc_order = [chunk["id"] for _, chunk in sorted(found, key=lambda pc: pc[1]["text"][0])]
            assert chunks[last]["answer"] == in_doc_order
            answered += 1
    assert answered > 5


def test_weights_count_text_and_the_answer_not_markers_ids_or_chunk_starts():
    batch = next(iter(batches(documents())))
    assert batch["weights"].dtype == np.float32 and batch["weights"].shape == (BATCH, SEQ_LEN)
    for tokens, weights in zip(batch["tokens"], batch["weights"]):
        counted = weights[:-1] == 1
        inputs, targets = tokens[:-1], tokens[1:]
        assert weights[-1] == 0
        for marker in (HEAD, TAIL, ID_OPEN, ID_CLOSE):
            assert not np.any(counted & ((inputs == marker) | (targets == marker)))
        assert not np.any(counted & (targets == OPEN)) and not np.any(counted & (inputs == CLOSE))
        assert np.all(counted[(inputs == OPEN) | (targets == SEP) | (targets == CLOSE)]), "the answer counts"
        in_prefix = np.zeros(len(tokens), bool)  # Inside id_open ... id_close.
        for start, end in zip(np.flatnonzero(tokens == ID_OPEN), np.flatnonzero(tokens == ID_CLOSE)):
            in_prefix[start:end + 1] = True
        assert not np.any(counted & (in_prefix[:-1] | in_prefix[1:])), "chunk IDs are given, not predicted"
        same_doc = (inputs // 1000 == targets // 1000) & (inputs < 800_000) & (targets < 800_000) & (targets >= 0)
        assert np.all(counted[same_doc & (targets == inputs + 1)]), "text within a chunk counts"
        assert not np.any(counted & (inputs < 800_000) & (targets < 800_000) & ~same_doc), "a chunk's successor not"


def test_without_restore_only_knots_mark_the_chunks():
    rows = rows_of(batches(documents(), restore=False))
    tokens = np.concatenate([row["tokens"] for row in rows])
    assert np.any(tokens == HEAD) and np.any(tokens == TAIL)
    assert not np.any((tokens >= 800_000) & (tokens != HEAD) & (tokens != TAIL))
    assert sorted(tokens[(tokens >= 0) & (tokens < 800_000)].tolist()) == sorted(np.concatenate(documents()).tolist())


def test_unknotted_rows_are_concat_packing():
    docs = documents()
    utk = list(batches(docs, knot_prob=0.0, restore=False))
    concat = list(packed_batches(grain.MapDataset.source(docs).to_iter_dataset(), mode="concat", seq_len=SEQ_LEN,
                                 batch_size=BATCH, pad_id=PAD))
    assert len(utk) == len(concat)
    for got, want in zip(utk, concat):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    half = rows_of(batches(docs, knot_prob=0.5, restore=False))
    knotted = [np.any(row["tokens"] == HEAD) for row in half]
    assert 0 < np.mean(knotted) < 1


def test_same_seed_same_rows_other_seed_other_rows():
    def first(seed):
        iterator = iter(batches(documents(), endless=True, seed=seed))
        return np.stack([next(iterator)["tokens"] for _ in range(4)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_restored_iterator_yields_the_same_batches(skip):
    def make():
        return iter(batches(documents(num_docs=12), endless=True, knot_prob=0.7))

    assert_resumes_from_state(make, skip=skip)


def test_a_document_longer_than_rows_goes_on_across_rows():
    docs = [np.arange(1000, 1000 + 3 * SEQ_LEN, dtype=np.int32)]
    rows = rows_of(batches(docs))
    assert len(rows) >= 3
    text = [t for row in rows for chunk in parse(row["tokens"]) for t in chunk["text"]]
    assert sorted(text) == docs[0].tolist()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="with restore needs the markers .* missing \\['id_open'"):
        batches(documents(), markers={"knot_head": [HEAD], "knot_tail": [TAIL]})
    with pytest.raises(ValueError, match="unknown Untie-the-Knots markers \\['knot'\\]"):
        batches(documents(), markers={**MARKERS, "knot": [1]})
    with pytest.raises(ValueError, match="marker 'knot_head' must be a non-empty 1-D sequence of token ids"):
        batches(documents(), markers={**MARKERS, "knot_head": []})
    with pytest.raises(ValueError, match="knot_prob must be in \\[0, 1\\]"):
        batches(documents(), knot_prob=1.5)
    with pytest.raises(ValueError, match="num_chunks must be a positive int"):
        batches(documents(), num_chunks=0)
    with pytest.raises(ValueError, match="fewer distinct chunk IDs"):
        batches(documents(), id_len=1)
