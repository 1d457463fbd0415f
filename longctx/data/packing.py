"""Token documents → pieces of at most `seq_len` → shuffled, packed, batched grain pipeline.

A batch is `{"tokens", "segment_ids", "positions"}`, each int32 [batch_size, seq_len]. In a row, the pieces packed
into it have segment ids 1, 2, ..., k in order and positions 0, 1, ... restarting at each piece; the rest of the row
is padding: segment id 0, position 0, token `pad_id`. Packing is grain's first-fit
(`grain.experimental.FirstFitPackIterDataset`); the iterator's `get_state()` / `set_state()` (and so
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` in orbax) resume the stream exactly.
"""

from collections.abc import Sequence

import grain
import numpy as np

from longctx.data.tokenizers import Tokenizer

BATCH_KEYS = ("tokens", "segment_ids", "positions")


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each text as int32 `[BOS] + ids + [EOS]`."""
    framed = []
    for ids in tokenizer.encode_batch(texts):
        doc = np.empty(len(ids) + 2, dtype=np.int32)
        doc[0], doc[1:-1], doc[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
        framed.append(doc)
    return framed


def split_into_pieces(token_docs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Every document cut into consecutive pieces of at most `max_len` tokens, so the packer drops none of them.

    Each piece is packed as a document of its own: its positions restart at 0.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    return [doc[start:start + max_len] for doc in token_docs for start in range(0, len(doc), max_len)]


def _as_example(piece: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": np.asarray(piece, dtype=np.int32)}


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's `tokens_segment_ids` / `tokens_positions` → `segment_ids` / `positions`."""
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def packed_batches(pieces: Sequence[np.ndarray], *, seq_len: int, batch_size: int, seed: int, pad_id: int,
                   num_packing_bins: int | None = None, shard_index: int = 0,
                   shard_count: int = 1) -> grain.IterDataset:
    """An endless grain dataset of packed batches of `pieces` (1-D int arrays of at most `seq_len` tokens).

    Pipeline: source → this shard's pieces `[shard_index::shard_count]` → shuffle(seed), reshuffled every epoch →
    repeat forever → first-fit packing into `num_packing_bins` rows of `seq_len` (default `batch_size`), rows
    shuffled → batches of `batch_size`. More bins waste less padding and mix more epochs at epoch boundaries.
    """
    if not pieces:
        raise ValueError("packed_batches needs at least one piece; the data source gave no tokens")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shard_count", shard_count)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index!r}")
    if len(pieces) < shard_count:
        raise ValueError(f"{len(pieces)} pieces cannot feed shard_count={shard_count} shards")
    num_packing_bins = batch_size if num_packing_bins is None else num_packing_bins
    if not isinstance(num_packing_bins, int) or num_packing_bins < 1:
        raise ValueError(f"num_packing_bins must be a positive int or None, got {num_packing_bins!r}")
    longest = max(len(p) for p in pieces)
    if longest > seq_len:
        raise ValueError(f"a piece has {longest} tokens > seq_len={seq_len}; cut documents with "
                         f"split_into_pieces(docs, seq_len) first")

    dataset = (grain.MapDataset.source(list(pieces))[shard_index::shard_count]
               .map(_as_example)
               .shuffle(seed=seed)
               .repeat()
               .to_iter_dataset())
    dataset = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct={"tokens": seq_len}, num_packing_bins=num_packing_bins, seed=seed,
        padding_struct={"tokens": pad_id})
    return dataset.map(_rename_packed).batch(batch_size)


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    """Share of the batch's tokens that are padding (segment id 0)."""
    segment_ids = np.asarray(batch["segment_ids"])
    return float(np.mean(segment_ids == 0))
