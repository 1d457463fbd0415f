"""Block layouts: which key blocks each query block visits (and the reverse), computed once per static mask in numpy.

For a mask, lengths T and S, q_offset and block sizes (block_q, block_kv), every (query block, key block) pair is
empty (nothing allowed: never loaded, never computed), full (everything allowed: computed without a mask) or partial
(the kernel evaluates the mask on it). `mask.classify` decides most blocks from their position ranges; the blocks it
leaves undecided are evaluated here, so "empty" and "full" are exact.

The kernels read the layout as index lists, full blocks and partial blocks apart so each loop has a static body:

    row_full[h, a, :row_full_count[h, a]]        key blocks that are full for query block a (ascending)
    row_partial[h, a, :row_partial_count[h, a]]  key blocks that are partial for query block a
    col_full / col_partial [h, b, :count]        the query blocks of key block b (for the dK/dV kernel)

h is the query head for masks that differ per head and 0 otherwise. Unused list slots repeat the last used entry (0 in
an empty list), so a pipeline that prefetches by index never fetches a new block for them (as splash attention's
mask info does). `row_allowed[h, t]` counts the keys query t may see (the softplus normaliser's N without segments).
"""

import dataclasses
import functools

import numpy as np

from pallas_kernels import masks

EMPTY, PARTIAL, FULL = 0, 1, 2
_EVALUATION_CHUNK = 1 << 24  # mask elements evaluated at once while refining partial blocks


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
    block_q: int
    block_kv: int
    kinds: np.ndarray  # int8 [Hm, num_q_blocks, num_kv_blocks]: EMPTY, PARTIAL or FULL
    row_allowed: np.ndarray  # int32 [Hm, T]
    row_full: np.ndarray
    row_full_count: np.ndarray
    row_partial: np.ndarray
    row_partial_count: np.ndarray
    col_full: np.ndarray
    col_full_count: np.ndarray
    col_partial: np.ndarray
    col_partial_count: np.ndarray

    @property
    def num_mask_heads(self) -> int:
        return self.kinds.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kinds.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.kinds.shape[2]

    @property
    def density(self) -> float:
        """The fraction of (query block, key block) pairs the kernels visit, averaged over heads."""
        return float(np.mean(self.kinds != EMPTY))

    @property
    def has_partial(self) -> bool:
        return bool(np.any(self.kinds == PARTIAL))


def _index_lists(kinds: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    """Along the last axis of kinds [H, M, N]: the indices equal to `kind`, ascending, padded by repeating the last
    one → (int32 [H, M, max(1, most)], int32 [H, M])."""
    hits = kinds == kind
    counts = hits.sum(-1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    order = np.argsort(~hits, axis=-1, kind="stable")[..., :width].astype(np.int32)
    slot = np.arange(width)
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    lists = np.where(slot < counts[..., None], order, np.where(counts[..., None] > 0, last, 0))
    return lists.astype(np.int32), counts


def _refine(mask: masks.Mask, kinds: np.ndarray, q_lo: np.ndarray, kv_lo: np.ndarray, block_q: int,
            block_kv: int) -> np.ndarray:
    """Evaluates the mask on blocks still PARTIAL and returns the allowed-key count of every query row [Hm, T]."""
    Hm, nq, nk = kinds.shape
    row_allowed = np.zeros((Hm, nq, block_q), np.int64)
    row_allowed += (np.sum(kinds == FULL, axis=-1) * block_kv)[..., None]
    heads, a, b = np.nonzero(kinds == PARTIAL)
    chunk = max(1, _EVALUATION_CHUNK // (block_q * block_kv))
    for start in range(0, len(heads), chunk):
        h, qa, kb = heads[start:start + chunk], a[start:start + chunk], b[start:start + chunk]
        q_idx = q_lo[qa][:, None, None] + np.arange(block_q)[None, :, None]
        kv_idx = kv_lo[kb][:, None, None] + np.arange(block_kv)[None, None, :]
        allowed = np.broadcast_to(mask(q_idx, kv_idx, h[:, None, None]), (len(h), block_q, block_kv))
        count = allowed.sum(-1)
        kinds[h, qa, kb] = np.where(~allowed.any((1, 2)), EMPTY, np.where(allowed.all((1, 2)), FULL, PARTIAL))
        np.add.at(row_allowed, (h, qa), count)
    return row_allowed.reshape(Hm, nq * block_q).astype(np.int32)


@functools.lru_cache(maxsize=64)
def block_layout(mask: masks.Mask, T: int, S: int, *, q_offset: int, block_q: int, block_kv: int,
                 num_heads: int) -> BlockLayout:
    """The layout of `mask` for T queries at q_offset .. q_offset + T - 1 against S keys, in blocks of
    block_q × block_kv (which must divide T and S); one pattern, or one per query head for `mask.per_head`."""
    if T % block_q or S % block_kv:
        raise ValueError(f"block sizes must divide the lengths: T={T}, block_q={block_q}, S={S}, block_kv={block_kv}")
    if isinstance(mask, masks.BlockMask):
        mask.check_kernel_blocks(block_q, block_kv)
    nq, nk = T // block_q, S // block_kv
    Hm = num_heads if mask.per_head else 1
    q_lo = np.arange(nq) * block_q + q_offset
    kv_lo = np.arange(nk) * block_kv
    heads = np.arange(Hm)[:, None, None]
    never, always = mask.classify(q_lo[None, :, None], q_lo[None, :, None] + block_q - 1, kv_lo[None, None, :],
                                  kv_lo[None, None, :] + block_kv - 1, heads)
    never, always = np.broadcast_to(never, (Hm, nq, nk)), np.broadcast_to(always, (Hm, nq, nk))
    kinds = np.where(never, EMPTY, np.where(always, FULL, PARTIAL)).astype(np.int8)
    row_allowed = _refine(mask, kinds, q_lo, kv_lo, block_q, block_kv)
    if not mask.evaluable_in_kernel and np.any(kinds == PARTIAL):
        raise ValueError(f"{mask!r} leaves partial {block_q}x{block_kv} blocks but cannot be evaluated in a kernel")
    row_full, row_full_count = _index_lists(kinds, FULL)
    row_partial, row_partial_count = _index_lists(kinds, PARTIAL)
    by_column = kinds.transpose(0, 2, 1)
    col_full, col_full_count = _index_lists(by_column, FULL)
    col_partial, col_partial_count = _index_lists(by_column, PARTIAL)
    for array in (kinds, row_allowed, row_full, row_full_count, row_partial, row_partial_count, col_full,
                  col_full_count, col_partial, col_partial_count):
        array.setflags(write=False)
    return BlockLayout(block_q, block_kv, kinds, row_allowed, row_full, row_full_count, row_partial, row_partial_count,
                       col_full, col_full_count, col_partial, col_partial_count)
