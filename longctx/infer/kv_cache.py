"""The contiguous KV cache: every layer's keys and values for B sequences of up to S columns, and what each column
holds.

Keys are cached before any position scheme touches them (no rotation), with each column's position and segment id,
so that at every step the scheme re-encodes the cached keys for the length reached: dynamic NTK and CLEX change their
frequencies as the sequence grows, LM-Infinite and Self-Extend re-map distances, and cached decoding computes what
the full-sequence forward computes. Column c of every row is written by the same call (one write offset for the
batch); prompts of different lengths are therefore left-padded (`longctx.infer.generate`), with segment id 0 on the
padding, so that distances between real tokens are distances between columns.
"""

import jax
import jax.numpy as jnp
from flax import struct


class CacheView(struct.PyTreeNode):
    """What each layer needs besides its own keys and values: where the new tokens are written (`offset`, int32
    scalar) and the segment id of every column [B, S] (0: empty or padding), the new tokens' included."""

    offset: jax.Array
    segment_ids: jax.Array


class KVCache(struct.PyTreeNode):
    """keys, values: [num_layers, B, S, Hkv, D] in the compute dtype; positions, segment_ids: [B, S] int32 (0 in
    columns not yet written); length: int32 scalar, the columns written so far (the next write offset)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        """A cache with room for `max_length` columns, none written."""
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_length", max_length),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache.empty: {name} must be a positive int, got {value!r}")
        shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
        columns = (batch_size, max_length)  # separate buffers: a jitted step may donate each
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   positions=jnp.zeros(columns, jnp.int32), segment_ids=jnp.zeros(columns, jnp.int32),
                   length=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def with_tokens(self, positions: jax.Array, segment_ids: jax.Array) -> "KVCache":
        """The cache with T more columns' positions and segment ids [B, T] written at `length`, and `length` + T
        (keys and values are written by the layers)."""
        if positions.shape != segment_ids.shape or positions.shape[0] != self.positions.shape[0]:
            raise ValueError(f"positions and segment_ids must both be [B={self.positions.shape[0]}, T], got "
                             f"{positions.shape} and {segment_ids.shape}")
        if positions.shape[1] > self.max_length:
            raise ValueError(f"{positions.shape[1]} tokens do not fit a cache of {self.max_length} columns")
        write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new.astype(jnp.int32), self.length, axis=1)
        return self.replace(positions=write(self.positions, positions),
                            segment_ids=write(self.segment_ids, segment_ids),
                            length=self.length + positions.shape[1])
