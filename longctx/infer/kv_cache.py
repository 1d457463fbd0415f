"""The KV cache: every layer's keys and values for B sequences of up to S columns, contiguous or paged.

Row b holds one sequence in columns starts[b] .. length − 1; the columns before its start are padding. Every call
writes the same columns of every row (one write offset for the batch), so prompts of different lengths are
left-padded (`longctx.infer.generate`) and distances between tokens are distances between columns.

Two encodings of the keys:
- raw (`encoded=False`): keys are cached before the position scheme touches them, with each column's position, so
  that at every step the scheme re-encodes the cached keys for the length reached: dynamic NTK and CLEX change their
  frequencies as the sequence grows, LM-Infinite and Self-Extend re-map distances, and cached decoding computes what
  the full-sequence forward computes. Attention runs through `longctx.attention.attention`.
- encoded (`encoded=True`): keys are cached rotated, as written, for schemes whose `encodes_keys_once` (RoPE with
  fixed tables, NoPE). A decoding step then reads each cached key once and nothing else, through the split-K kernel
  `pallas_kernels.decode_attention`: what decoding at the speed of memory needs, and what KV compression
  (`longctx.infer.compress`) keeps.

Two layouts of the columns:
- contiguous: keys, values [num_layers, B, S, Hkv, D];
- paged (vLLM's PagedAttention, Kwon et al. 2023): keys, values [num_layers, num_pages, page_size, Hkv, D] and
  block_tables int32 [B, S / page_size], logical page p of row b (columns p·page_size ..) living in physical page
  block_tables[b, p]. `allocate_pages` gives pages only to columns a row uses: every page of padding alone maps to
  page 0, which is never read unmasked.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels.decode.reference import gather_pages

PADDING_PAGE = 0


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")


class CacheView(struct.PyTreeNode):
    """What each layer needs besides its own keys and values: where the new tokens are written (`offset`, int32
    scalar), each row's first column (`starts` [B]), the columns written once they are (`length`), the block tables
    of a paged cache (None if contiguous), and (static) the cache's columns S, whether keys are cached encoded, and
    how many of the last new tokens' encoded queries the layers sow (`Llama(..., observe=)`)."""

    offset: jax.Array
    starts: jax.Array
    length: jax.Array
    block_tables: jax.Array | None
    columns: int = struct.field(pytree_node=False)
    encoded: bool = struct.field(pytree_node=False)
    observe: int = struct.field(pytree_node=False, default=0)  # queries of the last `observe` new tokens to sow

    def segment_ids(self) -> jax.Array:
        """[B, S] int32: 1 on the columns of each row's sequence written so far (the new tokens' included), else 0."""
        column = jnp.arange(self.columns, dtype=jnp.int32)[None]
        return ((column >= self.starts[:, None]) & (column < self.length)).astype(jnp.int32)

    def new_segment_ids(self, num_new: int) -> jax.Array:
        """[B, T] int32 of the T new tokens: 0 on padding (before a row's start), else 1."""
        column = self.offset + jnp.arange(num_new, dtype=jnp.int32)[None]
        return (column >= self.starts[:, None]).astype(jnp.int32)

    def write(self, cache: jax.Array, layer: jax.Array | int, new: jax.Array) -> jax.Array:
        """Every layer's keys or values with layer `layer`'s new tokens [B, T, Hkv, D] written at columns
        offset .. offset+T−1 (in place under jit: the other layers' columns are not copied)."""
        new = new.astype(cache.dtype)
        zero = jnp.zeros((), jnp.int32)
        if self.block_tables is None:
            return jax.lax.dynamic_update_slice(cache, new[None], (layer, zero, self.offset, zero, zero))
        page_size = cache.shape[2]
        column = self.offset + jnp.arange(new.shape[1], dtype=jnp.int32)
        pages = jnp.take(self.block_tables, column // page_size, axis=1)  # [B, T]
        return cache.at[layer, pages, column % page_size].set(new)

    def contiguous(self, cache: jax.Array, layer: jax.Array | int) -> jax.Array:
        """Layer `layer`'s keys or values as [B, S, Hkv, D] (a paged cache gathered page by page)."""
        return cache[layer] if self.block_tables is None else gather_pages(cache[layer], self.block_tables)


class KVCache(struct.PyTreeNode):
    """keys, values: [num_layers, B, S, Hkv, D] (contiguous) or [num_layers, num_pages, page_size, Hkv, D] with
    block_tables int32 [B, S / page_size] (paged), in the compute dtype; positions: int32 [B, S], each column's
    position (0 where unwritten); starts: int32 [B], each row's first column; length: int32 scalar, the columns
    written so far (the next write offset); encoded (static): keys cached encoded by the position scheme."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    starts: jax.Array
    length: jax.Array
    block_tables: jax.Array | None = None
    encoded: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32, starts=None, encoded: bool = False, page_size: int | None = None) -> "KVCache":
        """A cache with room for `max_length` columns, none written; rows start at `starts` (int [B], default 0).
        With `page_size` it is paged, with pages for the columns each row uses (`allocate_pages`)."""
        _check_positive(num_layers=num_layers, batch_size=batch_size, max_length=max_length,
                        num_kv_heads=num_kv_heads, head_dim=head_dim)
        starts = np.zeros(batch_size, np.int32) if starts is None else np.asarray(starts, np.int32)
        if starts.shape != (batch_size,) or starts.min() < 0 or starts.max() >= max_length:
            raise ValueError(f"KVCache: starts must be {batch_size} ints in [0, max_length={max_length}), got "
                             f"{starts.tolist()}")
        block_tables = None
        rows = (batch_size, max_length)
        if page_size is not None:
            _check_positive(page_size=page_size)
            if max_length % page_size:
                raise ValueError(f"KVCache: page_size={page_size} must divide max_length={max_length}")
            block_tables, num_pages = allocate_pages(starts, max_length, page_size)
            rows = (num_pages, page_size)
        shape = (num_layers, *rows, num_kv_heads, head_dim)
        columns = (batch_size, max_length)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),  # separate buffers: donatable
                   positions=jnp.zeros(columns, jnp.int32), starts=jnp.asarray(starts), length=jnp.zeros((), jnp.int32),
                   block_tables=None if block_tables is None else jnp.asarray(block_tables), encoded=encoded)

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]

    def view(self, num_new: int, observe: int = 0) -> CacheView:
        """The layers' view for a call writing `num_new` tokens at `length` (and sowing the queries of the last
        `observe`)."""
        return CacheView(offset=self.length, starts=self.starts, length=self.length + num_new,
                         block_tables=self.block_tables, columns=self.max_length, encoded=self.encoded,
                         observe=observe)

    def with_tokens(self, positions: jax.Array) -> "KVCache":
        """The cache with T more columns' positions [B, T] written at `length`, and `length` + T (keys and values
        are written by the layers)."""
        if positions.ndim != 2 or positions.shape[0] != self.positions.shape[0]:
            raise ValueError(f"positions must be [B={self.positions.shape[0]}, T], got {positions.shape}")
        if positions.shape[1] > self.max_length:
            raise ValueError(f"{positions.shape[1]} tokens do not fit a cache of {self.max_length} columns")
        written = jax.lax.dynamic_update_slice_in_dim(self.positions, positions.astype(jnp.int32), self.length, axis=1)
        return self.replace(positions=written, length=self.length + positions.shape[1])


def allocate_pages(starts: np.ndarray, max_length: int, page_size: int) -> tuple[np.ndarray, int]:
    """(block_tables int32 [B, max_length / page_size], num_pages): a fresh page for every logical page holding a
    column at or past the row's start, in row order from page 1; page 0 (`PADDING_PAGE`) for pages of padding alone."""
    pages_per_row = max_length // page_size
    used = (np.arange(pages_per_row)[None] + 1) * page_size > np.asarray(starts)[:, None]  # [B, pages]
    tables = np.full(used.shape, PADDING_PAGE, np.int32)
    tables[used] = 1 + np.arange(int(used.sum()), dtype=np.int32)
    return tables, 1 + int(used.sum())
