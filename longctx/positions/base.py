"""The position-scheme interface.

A position scheme turns token positions into whatever the attention layers need: rotary tables (RoPE and its
extensions), a logit scale (YaRN's attention factor, entropy-aware scaling), a different mask (LM-Infinite) or a
different attention altogether (Self-Extend). The model knows none of these: once per forward pass it calls its scheme
with the positions and hands the returned `PositionEncoding` to every layer, which calls `encoding.attend(...)`.

A scheme is a linen module so that it may own parameters (CLEX's ODE); those train and checkpoint with the model under
`params["position_scheme"]`. Schemes without parameters can be called unbound.
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn
from flax import struct
import jax

from pallas_kernels import masks


AttendFn = Callable[..., jax.Array]
"""`attend_fn(q, k, v, *, within=None, **overrides) -> [B, T, Hq, D]`: `longctx.attention.attention` with the layer's
mask, segment ids and implementation bound. `within` (a `masks.Mask`) narrows the layer's mask to its intersection
with `within` (LM-Infinite's Λ, Self-Extend's neighbour window); any other `attention` argument (`normalizer`,
`alibi_slopes`, `return_lse`, ...) may be passed by keyword."""


class PositionEncoding(struct.PyTreeNode):
    """What a scheme hands each attention layer for one forward pass: position information and how to attend with it.

    A pytree of arrays, so it passes through `nn.scan` and `nn.remat` as an ordinary argument.
    The default attends with no position information at all (NoPE).
    """

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] → [B, T, Hq, D]."""
        return attend_fn(q, k, v)

    def encode(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q, k [B, T, H, D] at the query positions, encoded for plain softmax attention (for schemes whose
        `encodes_keys_once`): here untouched."""
        return q, k


class PositionScheme(nn.Module):
    """Base class of every registered scheme. Fields are the scheme's parameters; `head_dim` is set by the model."""

    head_dim: int

    def check_mask(self, mask: masks.Mask) -> None:
        """Raises ValueError if this scheme cannot run under the layers' mask (`model.attention.mask`)."""

    def encodes_keys_once(self) -> bool:
        """Whether a key's encoding depends on its own position alone and attention is the plain softmax of encoded
        queries and keys (`PositionEncoding.encode`), so that a KV cache may hold keys encoded once, as written, and
        a decoding kernel may attend over them. False (the default) for schemes whose tables follow the length or
        that attend in their own way: their caches hold raw keys, re-encoded at every step."""
        return False

    def max_length(self) -> int | None:
        """The longest sequence this scheme is defined for (None: any length)."""
        return None

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        """positions: [B, T] int32 of the queries; kv_positions: [B, S] of the keys (default: the same).

        `train` is True in a training step; a scheme that samples there (CLEX) draws from the "positions" rng.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def require_causal_mask(scheme_name: str, mask: masks.Mask) -> None:
    """For schemes that split the causal keys themselves (LM-Infinite, Self-Extend): any other layer mask would cut
    or widen what they see without a word."""
    if not isinstance(mask, masks.Causal):
        raise ValueError(f"position scheme {scheme_name!r} makes its own causal masks and needs "
                         f"model.attention.mask=causal, got {mask!r}")


def scheme_params(scheme_cls: type[PositionScheme]) -> dict[str, Any]:
    """The parameters a scheme class takes (dataclass fields but the model-supplied `head_dim`), with defaults
    (`dataclasses.MISSING` where there is none)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(scheme_cls)
        if f.name not in ("head_dim", "parent", "name")
    }
