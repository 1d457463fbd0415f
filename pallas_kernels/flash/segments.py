"""Block skipping from segment ids (packed documents), computed in jnp before the kernels run.

A query block whose segment ids lie in [q_min, q_max] can only see key blocks whose ids in [kv_min, kv_max] overlap
that range (`block_math.segments_meet`). For packed batches (each document one run of equal ids) the key blocks a
query block can meet are one contiguous run, so each layout list is narrowed to the slots [start, end) whose blocks
lie between the first and the last block that can meet: the kernels loop over those slots only, instead of testing
every block the static mask allows. Blocks inside the run that still cannot meet (ids that are not sorted runs) are
skipped by the in-kernel test.
"""

import jax.numpy as jnp

from pallas_kernels.flash import block_math


def block_bounds(segment_ids, block: int):
    """int32 [B, L] → per-block (min, max), each int32 [B, L // block]."""
    blocks = segment_ids.reshape(segment_ids.shape[0], -1, block)
    return jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)


def _meeting_run(own_min, own_max, other_min, other_max):
    """For each block of one side [B, n], the first and last block of the other side [B, m] it can meet (first > last
    when none)."""
    meet = block_math.segments_meet(own_min[:, :, None], own_max[:, :, None], other_min[:, None, :],
                                    other_max[:, None, :])
    m = meet.shape[-1]
    first = jnp.where(meet.any(-1), jnp.argmax(meet, axis=-1), m)
    last = jnp.where(meet.any(-1), m - 1 - jnp.argmax(meet[..., ::-1], axis=-1), -1)
    return first, last


def list_ranges(layout, prefix: str, q_segment_ids, kv_segment_ids) -> dict:
    """Slot ranges of the layout's `prefix` ("row" or "col") lists that segment ids leave: for each kind ("full",
    "partial"), `{prefix}_{kind}_start` and `_end`, int32 [B, Hm, num blocks on the list's own side]."""
    q_min, q_max = block_bounds(q_segment_ids, layout.block_q)
    kv_min, kv_max = block_bounds(kv_segment_ids, layout.block_kv)
    if prefix == "row":
        first, last = _meeting_run(q_min, q_max, kv_min, kv_max)
    else:
        first, last = _meeting_run(kv_min, kv_max, q_min, q_max)
    ranges = {}
    for kind in ("full", "partial"):
        lists = jnp.asarray(getattr(layout, f"{prefix}_{kind}"))[None]  # [1, Hm, n, W]
        counts = jnp.asarray(getattr(layout, f"{prefix}_{kind}_count"))[None, ..., None]
        valid = jnp.arange(lists.shape[-1]) < counts
        ranges[f"{prefix}_{kind}_start"] = jnp.sum(valid & (lists < first[:, None, :, None]), -1, dtype=jnp.int32)
        ranges[f"{prefix}_{kind}_end"] = jnp.sum(valid & (lists <= last[:, None, :, None]), -1, dtype=jnp.int32)
    return ranges
