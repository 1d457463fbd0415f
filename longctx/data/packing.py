"""A stream of token documents → packed batches, three ways (`PACKING_MODES`).

A batch is `{"tokens", "segment_ids", "positions"}`, each int32 [batch_size, seq_len]. In a row, the pieces packed
into it have segment ids 1, 2, ..., k in order and positions 0, 1, ... restarting at each piece; the rest of the row
is padding: segment id 0, position 0, token `pad_id`. Tokens of different segments never attend to each other.

- "concat" (concatenate-and-chunk): the stream is cut into rows of exactly `seq_len` tokens, no padding
  (grain's `ConcatThenSplitIterDataset`). A document cut at a row's end goes on in the next row as a new segment
  whose positions restart at 0, so no document is longer than `seq_len` as the model sees it.
- "first_fit" / "best_fit": online bin packing of whole documents into `num_packing_bins` rows (grain's
  `FirstFitPackIterDataset` / `BestFitPackIterDataset`). Each document goes into the first row with room for it
  (first fit) or into the fullest row with room for it (best fit); when one fits in no row, the round's rows are
  emitted, shuffled, and a new round starts with it. A document of at most `seq_len` tokens is never split; a longer
  one is first cut into pieces of `seq_len` tokens (the last one shorter), each packed as a document of its own.
  The rows' unused tails are padding: more bins, less padding (`padding_fraction`, `packing_stats`).

The iterator's `get_state()` / `set_state()` (and so `grain.checkpoint.CheckpointSave` / `CheckpointRestore` in
orbax) resume the stream exactly, provided the `docs` dataset's iterator does.
"""

from collections.abc import Sequence

import grain
import numpy as np

from longctx.data.tokenizers import Tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions")
PACKING_MODES = ("concat", "first_fit", "best_fit")


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each text as int32 `[BOS] + ids + [EOS]` (`Tokenizer.frame`)."""
    return [tokenizer.frame(ids) for ids in tokenizer.encode_batch(texts)]


def split_into_pieces(token_docs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Every document cut into consecutive pieces of at most `max_len` tokens, so a bin packer drops none of them.

    Each piece is packed as a document of its own: its positions restart at 0.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    return [doc[start:start + max_len] for doc in token_docs for start in range(0, len(doc), max_len)]


class _PiecesOfAtMost(grain.experimental.FlatMapTransform):
    """A document → `{"tokens": piece}` for its pieces of at most `max_len` tokens (`split_into_pieces`)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.max_fan_out = 1  # Only a hint: grain's FlatMapIterDataset takes any number of pieces.

    def flat_map(self, doc: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [{"tokens": piece} for piece in split_into_pieces([np.asarray(doc, dtype=np.int32)], self.max_len)]


def _as_example(doc: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(doc, dtype=np.int32)}


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's `tokens_segment_ids` / `tokens_positions` → `segment_ids` / `positions`."""
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


class _PadWith:
    """Sets the padding tokens of a row to `pad_id` (grain's concat-then-split pads the stream's last row with 0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if row["segment_ids"][-1] == 0:
            row["tokens"] = np.where(row["segment_ids"] == 0, self.pad_id, row["tokens"]).astype(np.int32)
        return row


def packed_batches(docs: grain.IterDataset, *, mode: str, seq_len: int, batch_size: int, pad_id: int,
                   seed: int = 0, num_packing_bins: int | None = None) -> grain.IterDataset:
    """The batches of `docs` (a grain IterDataset of 1-D int documents, usually endless) packed by `mode`.

    `mode` is one of `PACKING_MODES` (see the module docstring). `seed` shuffles the rows of each bin-packing round;
    `num_packing_bins` (bin packing only; default `batch_size`) is how many rows a round fills at once.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"data.packing must be one of {PACKING_MODES} here, got {mode!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"pad_id must be an int token id, got {pad_id!r}")
    if not isinstance(docs, grain.IterDataset):
        raise ValueError(f"docs must be a grain.IterDataset of documents, got {type(docs).__name__}")
    if mode == "concat":
        if num_packing_bins is not None:
            raise ValueError(f"num_packing_bins applies to the first_fit / best_fit packing modes only; "
                             f"got {num_packing_bins!r} with data.packing='concat'")
        rows = grain.experimental.ConcatThenSplitIterDataset(docs.map(_as_example), length_struct={"tokens": seq_len})
        return rows.map(_rename_packed).map(_PadWith(pad_id)).batch(batch_size)
    num_packing_bins = batch_size if num_packing_bins is None else num_packing_bins
    if not isinstance(num_packing_bins, int) or num_packing_bins < 1:
        raise ValueError(f"num_packing_bins must be a positive int or None, got {num_packing_bins!r}")
    packer = (grain.experimental.FirstFitPackIterDataset if mode == "first_fit"
              else grain.experimental.BestFitPackIterDataset)
    pieces = grain.experimental.FlatMapIterDataset(docs, _PiecesOfAtMost(seq_len))
    rows = packer(pieces, length_struct={"tokens": seq_len}, num_packing_bins=num_packing_bins, seed=seed,
                  padding_struct={"tokens": pad_id})
    return rows.map(_rename_packed).batch(batch_size)


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Share of the batch's tokens that are padding (segment id 0)."""
    segment_ids = np.asarray(batch["segment_ids"])
    return float(np.mean(segment_ids == 0))


def packing_stats(batch: dict[str, np.ndarray], bos_id: int | None = None) -> dict[str, float]:
    """What a batch wastes, for comparing packing modes.

    - `padding_fraction`: share of padding tokens (compute spent on nothing; 0 for "concat").
    - `segments_per_row`, `mean_segment_length`: how finely rows are cut into attention islands.
    - `cut_fraction` (only with `bos_id`, documents framed `[BOS] + ids + [EOS]`): share of segments that do not
      start with BOS, i.e. pieces of documents cut at a row boundary ("concat") or at `seq_len` (bin packing),
      whose context was lost.
    """
    segment_ids = np.asarray(batch["segment_ids"])
    starts = (segment_ids != 0) & (np.diff(segment_ids, axis=1, prepend=0) != 0)
    num_segments = int(np.count_nonzero(starts))
    stats = {"padding_fraction": padding_fraction(batch),
             "segments_per_row": num_segments / segment_ids.shape[0],
             "mean_segment_length": float(np.count_nonzero(segment_ids)) / max(num_segments, 1)}
    if bos_id is not None:
        first_tokens = np.asarray(batch["tokens"])[starts]
        stats["cut_fraction"] = float(np.mean(first_tokens != bos_id)) if num_segments else 0.0
    return stats
