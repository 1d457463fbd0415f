"""Static attention masks for the block-sparse kernels: what each query may see, and which blocks are empty or full.

A mask is a frozen, hashable dataclass over the absolute query position i, key position j and query head h.
`mask(q_idx, kv_idx, head)` evaluates it elementwise on broadcastable integer arrays — numpy at trace time, and jnp
values inside a kernel on partial blocks — and returns True where query i may attend to key j.

`mask.classify(q_lo, q_hi, kv_lo, kv_hi, head)` looks at whole blocks (inclusive position ranges as broadcastable
arrays) and returns two bool arrays: `never` (no pair in the block is allowed) and `always` (every pair is allowed).
It may be conservative (both False: "partial"); `layout.BlockLayout` refines partial blocks by evaluating them, so a
block the kernels skip is exactly a block with nothing allowed. Masks compose with `|` and `&`.

Masks here are defined on row positions; document masking of packed batches comes from segment ids at run time and
is applied on top (see `flash_attention`). The split of mask → block layout → kernel follows splash attention's masks
and mask info (jax.experimental.pallas.ops.tpu.splash_attention).
"""

import dataclasses
import numbers
from typing import Any

import numpy as np


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base of every mask. Subclasses implement `__call__` and, where they can, an exact `classify`."""

    def __call__(self, q_idx, kv_idx, head=0):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        """(never, always) for blocks of queries q_lo..q_hi and keys kv_lo..kv_hi (inclusive); default: partial."""
        shape = np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo))
        return np.zeros(shape, bool), np.zeros(shape, bool)

    @property
    def per_head(self) -> bool:
        """True when heads see different patterns (the kernels then index the block layout by query head)."""
        return False

    @property
    def evaluable_in_kernel(self) -> bool:
        """False for masks that only `classify` can read (block masks); their kernel blocks must be empty or full."""
        return True

    def __or__(self, other: "Mask") -> "Mask":
        return Union(self, other)

    def __and__(self, other: "Mask") -> "Mask":
        return Intersection(self, other)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key."""

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx >= 0) | (kv_idx >= 0)  # all True, in the array type and shape of the inputs

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        shape = np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo))
        return np.zeros(shape, bool), np.ones(shape, bool)


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """j <= i."""

    def __call__(self, q_idx, kv_idx, head=0):
        return kv_idx <= q_idx

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        return kv_lo > q_hi, kv_hi <= q_lo


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """The `window` most recent keys, the query's own included: 0 <= i - j < window."""

    window: int

    def __post_init__(self):
        _check_positive_int("SlidingWindow", "window", self.window)

    def __call__(self, q_idx, kv_idx, head=0):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        nearest, farthest = q_lo - kv_hi, q_hi - kv_lo
        return (farthest < 0) | (nearest >= self.window), (nearest >= 0) & (farthest < self.window)


@dataclasses.dataclass(frozen=True)
class Distant(Mask):
    """Keys at least `distance` behind the query: i - j >= distance (the far branch of LM-Infinite and Self-Extend)."""

    distance: int

    def __post_init__(self):
        _check_positive_int("Distant", "distance", self.distance)

    def __call__(self, q_idx, kv_idx, head=0):
        return q_idx - kv_idx >= self.distance

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        return q_hi - kv_lo < self.distance, q_lo - kv_hi >= self.distance


@dataclasses.dataclass(frozen=True)
class Prefix(Mask):
    """The first `length` keys, for every query: j < length (attention sinks, before the causal cut)."""

    length: int

    def __post_init__(self):
        _check_positive_int("Prefix", "length", self.length)

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx >= 0) & (kv_idx < self.length)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        never, always = kv_lo >= self.length, kv_hi < self.length
        return np.broadcast_arrays(never, always, q_lo)[:2]


def sinks_and_window(sinks: int, window: int) -> "Mask":
    """Causal, and one of the first `sinks` keys or within the window: j <= i and (j < sinks or i - j < window).

    The attention-sink pattern of StreamingLLM (Xiao et al., 2023) and LM-Infinite's Λ-shaped mask (Han et al., 2023).
    """
    return (Causal() & Prefix(sinks)) | SlidingWindow(window)


@dataclasses.dataclass(frozen=True)
class ChunkedLocal(Mask):
    """Causal within fixed chunks: i // chunk == j // chunk and j <= i (Llama 4's chunked local attention)."""

    chunk: int

    def __post_init__(self):
        _check_positive_int("ChunkedLocal", "chunk", self.chunk)

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx // self.chunk == kv_idx // self.chunk) & (kv_idx <= q_idx)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        c = self.chunk
        never = (kv_lo > q_hi) | (kv_hi // c < q_lo // c) | (kv_lo // c > q_hi // c)
        one_chunk = (q_lo // c == q_hi // c) & (kv_lo // c == kv_hi // c) & (q_lo // c == kv_lo // c)
        return never, one_chunk & (kv_hi <= q_lo)


@dataclasses.dataclass(frozen=True)
class StridedHeads(Mask):
    """S2-Attention's heterogeneous context sharding (Lin et al., 2024, arXiv 2407.17678): causal, and within blocks
    of `block` tokens each head sees the `local_blocks` most recent blocks plus every `stride`-th block further back,
    each head its own shard of them:

        allowed(i, j, h) = j <= i and (i // block - j // block < local_blocks or (j // block + h) % stride == 0)

    so heads h and h + stride read the same columns and `stride` consecutive heads together cover every block.
    Kernel blocks that divide `block` make every block's classification exact.
    """

    block: int
    local_blocks: int
    stride: int

    def __post_init__(self):
        _check_positive_int("StridedHeads", "block", self.block)
        _check_positive_int("StridedHeads", "local_blocks", self.local_blocks)
        _check_positive_int("StridedHeads", "stride", self.stride)

    @property
    def per_head(self) -> bool:
        return self.stride > 1

    def __call__(self, q_idx, kv_idx, head=0):
        q_block, kv_block = q_idx // self.block, kv_idx // self.block
        local = q_block - kv_block < self.local_blocks
        strided = (kv_block + head) % self.stride == 0
        return (kv_idx <= q_idx) & (local | strided)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        b = self.block
        causal_never, causal_always = Causal().classify(q_lo, q_hi, kv_lo, kv_hi)
        local_never = q_lo // b - kv_hi // b >= self.local_blocks
        local_always = q_hi // b - kv_lo // b < self.local_blocks
        one_column = kv_lo // b == kv_hi // b
        on_stride = (kv_lo // b + head) % self.stride == 0
        strided_never, strided_always = one_column & ~on_stride, one_column & on_stride
        never = causal_never | (local_never & strided_never)
        return never, causal_always & (local_always | strided_always)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask(Mask):
    """An arbitrary mask given per block: `blocks` bool [num_q_blocks, num_kv_blocks] (one pattern for every head)
    or [Hq, num_q_blocks, num_kv_blocks], where entry [a, b] allows queries a·block_q .. (a+1)·block_q − 1 to see keys
    b·block_kv .. (b+1)·block_kv − 1. Kernel block sizes must divide block_q and block_kv (each kernel block is then
    all allowed or all masked). Equality and hash go by content, so equal arrays give the same jit cache entry."""

    blocks: np.ndarray
    block_q: int
    block_kv: int

    def __post_init__(self):
        blocks = np.array(self.blocks)
        if blocks.dtype != np.bool_ or blocks.ndim not in (2, 3):
            raise ValueError(f"BlockMask: blocks must be a bool array [num_q_blocks, num_kv_blocks] or "
                             f"[Hq, num_q_blocks, num_kv_blocks], got {blocks.dtype} {blocks.shape}")
        _check_positive_int("BlockMask", "block_q", self.block_q)
        _check_positive_int("BlockMask", "block_kv", self.block_kv)
        blocks.setflags(write=False)
        object.__setattr__(self, "blocks", blocks)

    @property
    def per_head(self) -> bool:
        return self.blocks.ndim == 3

    @property
    def evaluable_in_kernel(self) -> bool:
        return False

    def _lookup(self, q_block, kv_block, head):
        table = self.blocks if self.blocks.ndim == 3 else self.blocks[None]
        inside = (q_block < table.shape[1]) & (kv_block < table.shape[2])
        head = np.asarray(head) % table.shape[0]
        return inside & table[head, np.minimum(q_block, table.shape[1] - 1), np.minimum(kv_block, table.shape[2] - 1)]

    def __call__(self, q_idx, kv_idx, head=0):
        if not all(isinstance(x, np.ndarray | numbers.Integral) for x in (q_idx, kv_idx)):
            raise TypeError("BlockMask is read at trace time only (by classify); it cannot be evaluated in a kernel")
        return self._lookup(np.asarray(q_idx) // self.block_q, np.asarray(kv_idx) // self.block_kv, head)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        q_lo, q_hi, kv_lo, kv_hi = np.broadcast_arrays(q_lo, q_hi, kv_lo, kv_hi)
        one_block = ((q_lo // self.block_q == q_hi // self.block_q)
                     & (kv_lo // self.block_kv == kv_hi // self.block_kv))
        allowed = self._lookup(q_lo // self.block_q, kv_lo // self.block_kv, head)
        return one_block & ~allowed, one_block & allowed

    def check_kernel_blocks(self, block_q: int, block_kv: int) -> None:
        if self.block_q % block_q or self.block_kv % block_kv:
            raise ValueError(f"BlockMask with blocks of {self.block_q}x{self.block_kv} needs kernel block sizes that "
                             f"divide them, got block_q={block_q}, block_kv={block_kv}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BlockMask) and (self.block_q, self.block_kv) == (other.block_q, other.block_kv)
                and self.blocks.shape == other.blocks.shape and self.blocks.tobytes() == other.blocks.tobytes())

    def __hash__(self) -> int:
        return hash((self.blocks.shape, self.blocks.tobytes(), self.block_q, self.block_kv))

    def __repr__(self) -> str:
        return (f"BlockMask(<{'x'.join(map(str, self.blocks.shape))} blocks of {self.block_q}x{self.block_kv}, "
                f"{int(self.blocks.sum())} allowed>)")


@dataclasses.dataclass(frozen=True)
class _Combination(Mask):
    left: Mask
    right: Mask

    def __post_init__(self):
        for side in (self.left, self.right):
            if not isinstance(side, Mask):
                raise ValueError(f"{type(self).__name__}: both operands must be pallas_kernels masks, got {side!r}")

    @property
    def per_head(self) -> bool:
        return self.left.per_head or self.right.per_head

    @property
    def evaluable_in_kernel(self) -> bool:
        return self.left.evaluable_in_kernel and self.right.evaluable_in_kernel


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
    """Allowed where either mask allows."""

    def __call__(self, q_idx, kv_idx, head=0):
        return self.left(q_idx, kv_idx, head) | self.right(q_idx, kv_idx, head)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        left_never, left_always = self.left.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        right_never, right_always = self.right.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        return left_never & right_never, left_always | right_always


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
    """Allowed where both masks allow."""

    def __call__(self, q_idx, kv_idx, head=0):
        return self.left(q_idx, kv_idx, head) & self.right(q_idx, kv_idx, head)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        left_never, left_always = self.left.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        right_never, right_always = self.right.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        return left_never | right_never, left_always & right_always


def materialize(mask: Mask, T: int, S: int, *, q_offset: int = 0, num_heads: int = 1) -> np.ndarray:
    """The dense mask, bool [num_heads, T, S]: row t is query q_offset + t, column s is key s."""
    q_idx = np.arange(T)[None, :, None] + q_offset
    kv_idx = np.arange(S)[None, None, :]
    heads = np.arange(num_heads)[:, None, None]
    return np.array(np.broadcast_to(mask(q_idx, kv_idx, heads), (num_heads, T, S)), dtype=bool)
