"""Masks and block layouts against dense evaluation: every block the layout calls empty or full is exactly that, the
index lists hold exactly the non-empty blocks, and segment-id narrowing keeps every block whose documents meet."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_layout, masks
from pallas_kernels.flash import layout as layout_lib
from pallas_kernels.flash import segments

MASKS = [
    masks.Full(), masks.Causal(), masks.SlidingWindow(37), masks.SinksAndWindow(5, 40), masks.Distant(50),
    masks.ChunkedLocal(48), masks.StridedHeads(block=32, local_blocks=2, stride=3),
    masks.SlidingWindow(20) | masks.Distant(100), masks.Causal() & masks.ChunkedLocal(64),
    masks.BlockMask(np.tril(np.ones((4, 8), bool), 1), 64, 32),
]


def _dense_kinds(mask, T, S, q_offset, block_q, block_kv, heads):
    dense = masks.materialize(mask, T, S, q_offset=q_offset, num_heads=heads)
    blocks = dense.reshape(heads, T // block_q, block_q, S // block_kv, block_kv)
    return np.where(~blocks.any((2, 4)), layout_lib.EMPTY,
                    np.where(blocks.all((2, 4)), layout_lib.FULL, layout_lib.PARTIAL)), dense


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("T, S, q_offset, block_q, block_kv", [(256, 256, 0, 32, 32), (128, 256, 128, 64, 32),
                                                               (256, 256, 0, 64, 16)])
def test_layout_is_exact(mask, T, S, q_offset, block_q, block_kv):
    if isinstance(mask, masks.BlockMask) and (q_offset or S != 256):
        pytest.skip("the block mask is drawn for 256 x 256 from position 0")
    heads = 3
    layout = block_layout(mask, T, S, q_offset=q_offset, block_q=block_q, block_kv=block_kv, num_heads=heads)
    expected, dense = _dense_kinds(mask, T, S, q_offset, block_q, block_kv, heads)
    kinds = np.broadcast_to(layout.kinds, expected.shape)
    np.testing.assert_array_equal(kinds, expected)
    np.testing.assert_array_equal(np.broadcast_to(layout.row_allowed, (heads, T)), dense.sum(-1))
    for prefix, by_kind in (("row", kinds), ("col", kinds.transpose(0, 2, 1))):
        for kind, code in (("full", layout_lib.FULL), ("partial", layout_lib.PARTIAL)):
            lists = getattr(layout, f"{prefix}_{kind}")
            counts = getattr(layout, f"{prefix}_{kind}_count")
            for h in range(layout.num_mask_heads):
                for i in range(by_kind.shape[1]):
                    listed = lists[h, i, :counts[h, i]]
                    np.testing.assert_array_equal(listed, np.flatnonzero(by_kind[h, i] == code))
                    if counts[h, i]:  # padding repeats the last entry, so a prefetching pipeline fetches nothing new
                        assert np.all(lists[h, i, counts[h, i]:] == listed[-1])


def test_heads_share_a_layout_unless_the_mask_differs_per_head():
    shared = block_layout(masks.Causal(), 128, 128, q_offset=0, block_q=32, block_kv=32, num_heads=8)
    per_head = block_layout(masks.StridedHeads(32, 1, 4), 128, 128, q_offset=0, block_q=32, block_kv=32, num_heads=8)
    assert shared.num_mask_heads == 1 and per_head.num_mask_heads == 8
    assert shared.density == pytest.approx(10 / 16)


def test_strided_heads_cover_every_block_between_them():
    mask = masks.StridedHeads(block=16, local_blocks=1, stride=4)
    dense = masks.materialize(mask, 256, 256, num_heads=4)
    np.testing.assert_array_equal(dense.any(0), np.tril(np.ones((256, 256), bool)))
    assert not np.array_equal(dense[0], dense[1])


def test_block_mask_needs_kernel_blocks_that_divide_its_blocks():
    mask = masks.BlockMask(np.ones((4, 4), bool), 64, 64)
    with pytest.raises(ValueError, match="kernel block sizes that divide them, got block_q=128"):
        block_layout(mask, 256, 256, q_offset=0, block_q=128, block_kv=64, num_heads=1)


@pytest.mark.parametrize("bad", [lambda: masks.SlidingWindow(0), lambda: masks.StridedHeads(16, 1, 0),
                                 lambda: masks.BlockMask(np.ones(4, bool), 8, 8), lambda: masks.Causal() | "causal"])
def test_bad_masks_are_refused(bad):
    with pytest.raises(ValueError):
        bad()


def test_segment_ranges_keep_every_block_whose_documents_meet():
    layout = block_layout(masks.Causal(), 256, 256, q_offset=0, block_q=32, block_kv=32, num_heads=1)
    ids = jnp.asarray([[1] * 40 + [2] * 100 + [3] * 116, [0] * 64 + [5] * 150 + [0] * 42], jnp.int32)
    q_min, q_max = segments.block_bounds(ids, 32)
    for prefix in ("row", "col"):
        ranges = segments.list_ranges(layout, prefix, ids, ids)
        for kind in ("full", "partial"):
            lists, counts = getattr(layout, f"{prefix}_{kind}"), getattr(layout, f"{prefix}_{kind}_count")
            start, end = ranges[f"{prefix}_{kind}_start"], ranges[f"{prefix}_{kind}_end"]
            for b in range(2):
                for i in range(lists.shape[1]):
                    kept = set(lists[0, i, int(start[b, 0, i]):int(end[b, 0, i])].tolist())
                    for other in lists[0, i, :counts[0, i]]:
                        a, c = (i, other) if prefix == "row" else (other, i)
                        meet = (q_min[b, a] <= q_max[b, c]) & (q_min[b, c] <= q_max[b, a]) & (q_max[b, a] > 0) \
                            & (q_max[b, c] > 0)
                        if meet:
                            assert other in kept, (prefix, kind, b, i, other)
                    assert all(lo in lists[0, i, :counts[0, i]] for lo in kept)
