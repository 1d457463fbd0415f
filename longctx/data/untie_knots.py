"""Untie the Knots (UtK): documents cut into chunks, the chunks of many documents shuffled into one long sequence.

Tian et al., "Untie the Knots: An Efficient Data Augmentation Strategy for Long-Context Pre-Training in Language
Models", arXiv 2409.04774 (ACL 2025); reference code: `gpt_dataset_utk.py` in github.com/rgtjf/Untie-the-Knots.

A row of `seq_len` tokens is filled from the document stream, in order. With probability `knot_prob` it is knotted:

1. Tangling. Each document is cut into `num_chunks` contiguous chunks (fewer if it has fewer tokens), at split
   points drawn uniformly without repetition (`random_split`, the reference's length sampler) or at equal lengths.
   A chunk that continues an earlier chunk of its document starts with the `knot_head` marker; a chunk that a later
   chunk continues ends with `knot_tail` (the reference's knot tokens h_j / t_j; here one marker sequence serves
   every chunk index, so any tokenizer can spell it). The chunks of all the row's documents are shuffled uniformly;
   with `keep_chunk_order` a document's chunks keep their relative order (the reference's preserve_partial_order).
2. Backtracing (`restore`, the reference's sort task). Every chunk of a document cut in >= 2 chunks is preceded by
   `id_open` ID `id_close`, its ID being `id_len` tokens drawn from `id_alphabet` (distinct within the row; the
   reference uses random 6-character strings). Right after the document's chunk that comes last in the row follows
   `restore_open` ID_1 `restore_sep` ID_2 ... ID_k `restore_close`: its chunks' IDs in document order, which the
   model must produce.

The knotted row is ONE segment (segment id 1, positions 0..seq_len-1): its chunks attend across documents, which is
what the model must untie. Unknotted rows pack the documents in order, one segment each, as in "concat" packing.
A document that does not fit in the row's remaining room is cut there (its first part is tangled in this row) and
goes on as the first document of the next row; no token is dropped and rows are never padded (except the last ones
of a finite stream).

Loss (the reference masks knot and ID tokens with `eod_mask_loss`). Batches carry `weights`, float32
[rows, seq_len] aligned like `longctx.train.loss.next_token_targets`: weights[r, t] = 1 iff predicting
tokens[r, t+1] from position t counts. In a knotted row a prediction does not count if its input or its target is a
knot or `id_open` ID `id_close` token, if its target is a `restore_open` token, if its input is a `restore_close`
token, or if its target is the first token of a shuffled chunk (what follows a chunk is not predictable). The
restore answer (the IDs, separators and `restore_close`) counts. Unknotted rows count every prediction within a
segment. The last position and padding never count.
"""

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

KNOT_MARKERS = ("knot_head", "knot_tail")
RESTORE_MARKERS = ("id_open", "id_close", "restore_open", "restore_sep", "restore_close", "id_alphabet")

# Per-token roles in a knotted row, for the loss weights.
_TEXT, _KNOT, _ID_PREFIX, _RESTORE_OPEN, _ANSWER, _RESTORE_CLOSE = range(6)


def _check_markers(markers: dict[str, np.ndarray], restore: bool) -> dict[str, np.ndarray]:
    unknown = set(markers) - set(KNOT_MARKERS) - set(RESTORE_MARKERS)
    if unknown:
        raise ValueError(f"unknown Untie-the-Knots markers {sorted(unknown)}; the markers are {KNOT_MARKERS} and, "
                         f"for restore, {RESTORE_MARKERS}")
    needed = KNOT_MARKERS + (RESTORE_MARKERS if restore else ())
    missing = [name for name in needed if name not in markers]
    if missing:
        raise ValueError(f"Untie the Knots{' with restore' if restore else ''} needs the markers {list(needed)}; "
                         f"missing {missing}")
    checked = {}
    for name, ids in markers.items():
        ids = np.asarray(ids)
        if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"marker {name!r} must be a non-empty 1-D sequence of token ids, got {ids!r}")
        checked[name] = ids.astype(np.int32)
    return checked


class _Knotter:
    """Builds one row from documents; holds the row parameters and the marker tokens."""

    def __init__(self, *, seq_len: int, pad_id: int, seed: int, markers: dict[str, np.ndarray], restore: bool,
                 num_chunks: int, random_split: bool, keep_chunk_order: bool, knot_prob: float, id_len: int):
        self.seq_len, self.pad_id, self.seed, self.markers, self.restore = seq_len, pad_id, seed, markers, restore
        self.num_chunks, self.random_split, self.keep_chunk_order = num_chunks, random_split, keep_chunk_order
        self.knot_prob, self.id_len = knot_prob, id_len
        size = {name: len(ids) for name, ids in markers.items()}
        self._per_boundary = size["knot_head"] + size["knot_tail"]
        if restore:
            self._per_chunk = size["id_open"] + size["id_close"] + 2 * id_len + size["restore_sep"]
            self._per_doc = size["restore_open"] + size["restore_close"] - size["restore_sep"]
            self._alphabet = np.unique(markers["id_alphabet"])

    def overhead(self, k: int) -> int:
        """Marker and ID tokens added to a document cut in k chunks."""
        if k < 2:
            return 0
        return (k - 1) * self._per_boundary + (k * self._per_chunk + self._per_doc if self.restore else 0)

    def fit(self, length: int, room: int) -> tuple[int, int]:
        """(tokens of the document to take, chunks) for a document of `length` tokens in `room` tokens."""
        k = min(self.num_chunks, length)
        if length + self.overhead(k) <= room:
            return length, k
        k = min(k, room)
        while k > 1 and room - self.overhead(k) < k:
            k -= 1
        return min(length, room - self.overhead(k)), k

    def _split(self, doc: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        if k == 1:
            return [doc]
        if self.random_split:
            cuts = 1 + np.sort(rng.choice(len(doc) - 1, size=k - 1, replace=False))
        else:
            cuts = len(doc) // k * np.arange(1, k)
        return np.split(doc, cuts)

    def _ids(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` distinct IDs of `id_len` alphabet tokens, [count, id_len]."""
        ids = rng.choice(self._alphabet, size=(count, self.id_len))
        while len(np.unique(ids, axis=0)) < count:
            _, first = np.unique(ids, axis=0, return_index=True)
            repeated = np.setdiff1d(np.arange(count), first)
            ids[repeated] = rng.choice(self._alphabet, size=(len(repeated), self.id_len))
        return ids

    def knotted_row(self, docs: Sequence[tuple[np.ndarray, int]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One segment of the tangled chunks of `docs` ((tokens, chunk count) pairs) with markers and weights."""
        chunks = []  # (document, chunk index, chunk count, tokens)
        for d, (doc, k) in enumerate(docs):
            chunks += [(d, j, k, piece) for j, piece in enumerate(self._split(doc, k, rng))]
        slots = rng.permutation(len(chunks))
        if self.keep_chunk_order:
            first = 0
            for doc, k in docs:
                slots[first:first + k] = np.sort(slots[first:first + k])
                first += k
        ids = {}
        if self.restore:
            marked = [c for c, (_, _, k, _) in enumerate(chunks) if k > 1]
            ids = dict(zip(marked, self._ids(len(marked), rng)))
        last_slot = {}
        for c, (d, _, _, _) in enumerate(chunks):
            last_slot[d] = max(last_slot.get(d, -1), slots[c])
        m = self.markers
        parts, roles, item_starts, filled = [], [], [], 0

        def put(tokens: np.ndarray, role: int) -> None:
            nonlocal filled
            parts.append(tokens)
            roles.append(np.full(len(tokens), role, dtype=np.int8))
            filled += len(tokens)

        for c in np.argsort(slots):
            d, j, k, piece = chunks[c]
            item_starts.append(filled)
            if self.restore and k > 1:
                put(np.concatenate([m["id_open"], ids[c], m["id_close"]]), _ID_PREFIX)
            if j > 0:
                put(m["knot_head"], _KNOT)
            put(piece, _TEXT)
            if j < k - 1:
                put(m["knot_tail"], _KNOT)
            if self.restore and k > 1 and slots[c] == last_slot[d]:
                put(m["restore_open"], _RESTORE_OPEN)
                first = c - j
                for i in range(k):
                    if i:
                        put(m["restore_sep"], _ANSWER)
                    put(ids[first + i], _ANSWER)
                put(m["restore_close"], _RESTORE_CLOSE)
        tokens, role = np.concatenate(parts), np.concatenate(roles)
        target_counts = (role == _TEXT) | (role == _ANSWER) | (role == _RESTORE_CLOSE)
        target_counts[item_starts] = False
        input_counts = (role == _TEXT) | (role == _ANSWER) | (role == _RESTORE_OPEN)
        weights = np.zeros(len(tokens), np.float32)
        weights[:-1] = input_counts[:-1] & target_counts[1:]
        return self._pad({"tokens": tokens, "segment_ids": np.ones(len(tokens), np.int32),
                          "positions": np.arange(len(tokens), dtype=np.int32), "weights": weights})

    def plain_row(self, docs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The documents in order, one segment each."""
        tokens = np.concatenate(docs)
        sizes = [len(doc) for doc in docs]
        segment_ids = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int32), sizes)
        positions = np.concatenate([np.arange(size, dtype=np.int32) for size in sizes])
        weights = np.zeros(len(tokens), np.float32)
        weights[:-1] = segment_ids[1:] == segment_ids[:-1]
        return self._pad({"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "weights": weights})

    def _pad(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        short = self.seq_len - len(row["tokens"])
        assert short >= 0, (short, self.seq_len)
        fill = {"tokens": self.pad_id, "segment_ids": 0, "positions": 0, "weights": 0}
        return {key: np.concatenate([value, np.full(short, fill[key], value.dtype)]) if short else value
                for key, value in row.items()}


class _KnotRowsIterator(grain.DatasetIterator):
    """Rows of `_Knotter`. State: the row count and, for a document cut at a row's end, the parent's state before
    that document and where its rest starts, so the rest is re-read on restore (no tokens in the state)."""

    def __init__(self, parent: grain.DatasetIterator, knotter: _Knotter):
        super().__init__(parent)
        self._knotter = knotter
        self._row = 0
        self._carry: np.ndarray | None = None  # The whole document whose rest starts at self._carry_offset.
        self._carry_offset = 0
        self._carry_parent_state = None
        self._exhausted = False

    def _next_document(self) -> tuple[np.ndarray, int] | None:
        """(document, offset of its untaken rest) from the carry or the parent; None when the stream has ended."""
        if self._carry is not None:
            return self._carry, self._carry_offset
        if self._exhausted:
            return None
        self._carry_parent_state = self._parent.get_state()
        try:
            doc = np.asarray(next(self._parent), dtype=np.int32)
        except StopIteration:
            self._exhausted = True
            return None
        if doc.ndim != 1:
            raise ValueError(f"Untie the Knots takes 1-D token documents, got an array of shape {doc.shape}")
        self._carry, self._carry_offset = doc, 0
        return doc, 0

    def __next__(self) -> dict[str, np.ndarray]:
        knotter = self._knotter
        rng = np.random.default_rng([knotter.seed, self._row])
        knotted = rng.random() < knotter.knot_prob
        room, taken = knotter.seq_len, []
        while room > 0:
            found = self._next_document()
            if found is None:
                break
            doc, offset = found
            rest = len(doc) - offset
            size, k = knotter.fit(rest, room) if knotted else (min(rest, room), 1)
            if size > 0:
                taken.append((doc[offset:offset + size], k))
            room -= size + knotter.overhead(k)
            if offset + size < len(doc):
                self._carry_offset = offset + size
            else:
                self._carry = None
        if not taken:
            raise StopIteration
        self._row += 1
        return knotter.knotted_row(taken, rng) if knotted else knotter.plain_row([doc for doc, _ in taken])

    def get_state(self) -> dict[str, Any]:
        if self._carry is None:
            return {"row": self._row, "parent": self._parent.get_state(), "carry_offset": -1}
        return {"row": self._row, "parent": self._carry_parent_state, "carry_offset": self._carry_offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._row, self._exhausted, self._carry = state["row"], False, None
        self._parent.set_state(state["parent"])
        if state["carry_offset"] >= 0:
            self._carry_parent_state = state["parent"]
            self._carry = np.asarray(next(self._parent), dtype=np.int32)
            self._carry_offset = state["carry_offset"]


class _KnotRows(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, knotter: _Knotter):
        super().__init__(parent)
        self._knotter = knotter

    def __iter__(self) -> _KnotRowsIterator:
        return _KnotRowsIterator(self._parent.__iter__(), self._knotter)

    def __str__(self) -> str:
        return "UntieTheKnotsRows"


def untie_knots_batches(docs: grain.IterDataset, *, seq_len: int, batch_size: int, pad_id: int, seed: int,
                        markers: dict[str, np.ndarray], restore: bool, num_chunks: int = 3, random_split: bool = True,
                        keep_chunk_order: bool = False, knot_prob: float = 1.0,
                        id_len: int = 6) -> grain.IterDataset:
    """Batches `{"tokens", "segment_ids", "positions", "weights"}` of [batch_size, seq_len] Untie-the-Knots rows of
    `docs` (a grain IterDataset of 1-D int documents, usually endless); see the module docstring.

    markers: name → token ids: `knot_head`, `knot_tail`, and with `restore` also `id_open`, `id_close`,
      `restore_open`, `restore_sep`, `restore_close` and `id_alphabet` (the tokens IDs are drawn from).
    num_chunks: chunks per document (the reference cuts in 3); random_split / keep_chunk_order: how it cuts and
    shuffles them; knot_prob: share of rows knotted (the paper uses 0.3 and 0.8); id_len: tokens per chunk ID.
    Rows are a pure function of `seed`, the stream and the row index; the iterator's state resumes exactly.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("num_chunks", num_chunks),
                        ("id_len", id_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"pad_id must be an int token id, got {pad_id!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not 0.0 <= knot_prob <= 1.0:
        raise ValueError(f"knot_prob must be in [0, 1], got {knot_prob!r}")
    if not isinstance(docs, grain.IterDataset):
        raise ValueError(f"docs must be a grain.IterDataset of documents, got {type(docs).__name__}")
    markers = _check_markers(markers, restore)
    if restore:
        most_ids = seq_len // (1 + len(markers["id_open"]) + len(markers["id_close"]) + 2 * id_len)
        if len(np.unique(markers["id_alphabet"])) ** id_len < most_ids:
            raise ValueError(f"id_alphabet ({len(np.unique(markers['id_alphabet']))} distinct tokens) and "
                             f"id_len={id_len} give fewer distinct chunk IDs than a row of seq_len={seq_len} may need "
                             f"({most_ids})")
    knotter = _Knotter(seq_len=seq_len, pad_id=pad_id, seed=seed, markers=markers, restore=restore,
                       num_chunks=num_chunks, random_split=random_split, keep_chunk_order=keep_chunk_order,
                       knot_prob=knot_prob, id_len=id_len)
    return _KnotRows(docs, knotter).batch(batch_size)
