"""Token layouts for context parallelism: which tokens of a sequence each device of the sequence axis holds.

A sequence of T tokens is split over the N devices of the sequence axis, C = T / N tokens each. The layout is applied
once where batches are built (`to_layout`: every per-token array is permuted along the sequence axis) and undone in
outputs that need natural order (`from_layout`); in between the model computes position by position, so only
attention needs to know which global position each local token has (`pieces`).

- "contiguous": device r holds tokens [r·C, (r+1)·C). Under a causal mask the last device does N times the work of
  the first.
- "zigzag": the sequence cut into 2N chunks of C/2; device r holds chunks r and 2N−1−r, so every device does the
  same causal work (the load balance of ring-flash-attn's zigzag_ring_flash_attn and Llama 3's context parallelism).
- "striped": device r holds tokens r, r+N, r+2N, ... (Brandon et al., "Striped Attention", 2023, arXiv 2311.09431):
  every block of a causal mask is nearly half full, so work is balanced at every ring step.
"""

import dataclasses

import jax
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Local tokens [local_start, local_start + length) are global positions global_start + stride · i, i < length."""

    local_start: int
    length: int
    global_start: int
    stride: int

    @property
    def local_slice(self) -> slice:
        return slice(self.local_start, self.local_start + self.length)

    def global_positions(self) -> np.ndarray:
        return self.global_start + self.stride * np.arange(self.length)


def check(layout: str, seq_len: int, num_shards: int) -> None:
    """Raises ValueError unless `layout` can split `seq_len` tokens over `num_shards` devices."""
    if layout not in LAYOUTS:
        raise ValueError(f"sequence layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    chunks = 2 * num_shards if layout == "zigzag" else num_shards
    if seq_len % chunks:
        raise ValueError(f"the {layout!r} layout over {num_shards} sequence shards needs a sequence length divisible "
                         f"by {chunks}, got {seq_len}")


def pieces(layout: str, rank: int, num_shards: int, shard_len: int) -> tuple[Piece, ...]:
    """The global positions of the `shard_len` tokens device `rank` holds, as runs in local order."""
    if layout == "contiguous":
        return (Piece(0, shard_len, rank * shard_len, 1),)
    if layout == "zigzag":
        half = shard_len // 2
        return (Piece(0, half, rank * half, 1), Piece(half, half, (2 * num_shards - 1 - rank) * half, 1))
    if layout == "striped":
        return (Piece(0, shard_len, rank, num_shards),)
    raise ValueError(f"sequence layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def split(runs: tuple[Piece, ...], start: int, stop: int) -> tuple[Piece, ...]:
    """The runs of local tokens [start, stop), renumbered from local position 0."""
    out = []
    for piece in runs:
        lo, hi = max(start, piece.local_start), min(stop, piece.local_start + piece.length)
        if lo < hi:
            skip = lo - piece.local_start
            out.append(Piece(lo - start, hi - lo, piece.global_start + piece.stride * skip, piece.stride))
    return tuple(out)


def permutation(layout: str, seq_len: int, num_shards: int) -> np.ndarray:
    """perm [seq_len]: position p of the layout holds natural token perm[p]; shard r is [r·C, (r+1)·C)."""
    check(layout, seq_len, num_shards)
    shard_len = seq_len // num_shards
    return np.concatenate([piece.global_positions() for rank in range(num_shards)
                           for piece in pieces(layout, rank, num_shards, shard_len)])


def to_layout(x, layout: str, num_shards: int, axis: int = 1):
    """x (numpy or jax) in natural token order along `axis` → in the layout's order."""
    if layout == "contiguous":
        return x
    return _take(x, permutation(layout, x.shape[axis], num_shards), axis)


def from_layout(x, layout: str, num_shards: int, axis: int = 1):
    """Inverse of `to_layout`."""
    if layout == "contiguous":
        return x
    return _take(x, np.argsort(permutation(layout, x.shape[axis], num_shards)), axis)


def _take(x, indices: np.ndarray, axis: int):
    """x.take(indices, axis), keeping the sharding of a jax array sharded along Explicit mesh axes (whose gathers
    must name their output sharding)."""
    if isinstance(x, jax.Array | jax.core.Tracer):
        spec = jax.typeof(x).sharding.spec
        if any(entry is not None for entry in spec):
            return x.at[(slice(None),) * (axis % x.ndim) + (indices,)].get(out_sharding=jax.typeof(x).sharding)
    return x.take(indices, axis=axis)
