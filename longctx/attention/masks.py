"""Attention mask specs: which keys each query may attend to, as a function of absolute positions.

A mask is a frozen, hashable dataclass (so it can be a static argument of `jax.jit`) defined over the absolute query
index i and key index j. `mask(q_idx, kv_idx)` evaluates it on broadcastable integer arrays (numpy, jnp, traced) and
returns a bool array, True where query i may attend to key j. `mask.materialize(T, S, q_offset)` gives the dense
[T, S] numpy matrix for queries q_offset .. q_offset + T - 1 against keys 0 .. S - 1.

Masks compose with `|` (Union) and `&` (Intersection). Segment ids (packed documents, padding) are not masks: they are
a separate argument of `longctx.attention.attention` and are applied on top of the mask. With segment ids, i and j
are positions within the segment (counted from its first key), so a packed document sees the same mask as it would
alone; masks that are `relative` (depend on i - j only) give the same result on row indices.
The split of mask spec and evaluation follows splash attention's masks (jax.experimental.pallas.ops.tpu).
"""

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_MASKS: dict[str, type["Mask"]] = {}


def register(name: str):
    """Class decorator that makes a mask available as `get(name, **params)`."""

    def decorate(cls: type[Mask]) -> type[Mask]:
        if name in _MASKS:
            raise ValueError(f"mask {name!r} is registered twice ({_MASKS[name]} and {cls})")
        _MASKS[name] = cls
        return cls

    return decorate


def _array_module(*arrays: Any):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _param(allowed: str) -> Any:
    """A required mask parameter; `allowed` says what values it takes, for error messages."""
    return dataclasses.field(metadata={"allowed": allowed})


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base of every mask spec. Subclasses implement `__call__`; `validate` refuses shapes a mask cannot cover."""

    def __call__(self, q_idx, kv_idx):
        """q_idx, kv_idx: broadcastable int arrays of absolute positions → bool array of their broadcast shape."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    @property
    def relative(self) -> bool:
        """True when mask(i, j) depends on i - j only, so a shift of both positions leaves it unchanged."""
        return False

    def validate(self, T: int, S: int, q_offset: int | jax.Array) -> None:
        """Raises ValueError if this mask cannot be evaluated for T queries starting at q_offset against S keys."""

    def materialize(self, T: int, S: int, q_offset: int = 0) -> np.ndarray:
        """The dense mask: np.ndarray[bool] [T, S], row t for query q_offset + t, column s for key s."""
        for name, value in (("T", T), ("S", S), ("q_offset", q_offset)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"materialize: {name} must be a non-negative int, got {value!r}")
        self.validate(T, S, q_offset)
        q_idx = np.arange(T)[:, None] + q_offset
        kv_idx = np.arange(S)[None, :]
        return np.array(np.broadcast_to(self(q_idx, kv_idx), (T, S)), dtype=bool)

    def __or__(self, other: "Mask") -> "Mask":
        return Union(self, other)

    def __and__(self, other: "Mask") -> "Mask":
        return Intersection(self, other)


@register("full")
@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query attends to every key (no mask)."""

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx):
        xp = _array_module(q_idx, kv_idx)
        return xp.ones(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)), dtype=bool)


@register("causal")
@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query i attends to keys j <= i."""

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx):
        return kv_idx <= q_idx


@register("sliding_window")
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """Query i attends to the `window` most recent keys, itself included: j <= i and i - j < window."""

    window: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("SlidingWindow", "window", self.window)

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)


@register("sinks_window")
@dataclasses.dataclass(frozen=True)
class SinksAndWindow(Mask):
    """Causal, and either one of the first `sinks` keys or within the window: j <= i and (j < sinks or i - j < window).

    The attention-sink pattern of StreamingLLM (Xiao et al., 2023) and LM-Infinite's Λ-shaped mask (Han et al., 2023).
    """

    sinks: int = _param("a positive int")
    window: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("SinksAndWindow", "sinks", self.sinks)
        _check_positive_int("SinksAndWindow", "window", self.window)

    def __call__(self, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < self.sinks) | (q_idx - kv_idx < self.window))


@register("distant")
@dataclasses.dataclass(frozen=True)
class Distant(Mask):
    """Keys at least `distance` behind the query: j <= i - distance. The complement of SlidingWindow(distance) within
    the causal mask, as used by LM-Infinite's capped far branch and Self-Extend's grouped branch."""

    distance: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("Distant", "distance", self.distance)

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx):
        return q_idx - kv_idx >= self.distance


@register("explicit")
@dataclasses.dataclass(frozen=True, eq=False)
class Explicit(Mask):
    """An arbitrary boolean [T, S] mask; row i is query position i (so it only fits q_offset = 0), column j is key
    position j. With segment ids positions count from each segment's start, so every packed document reads the
    array's top-left block from its own first token; positions outside the array are not allowed.

    Equality and hash go by shape and content, so equal arrays give equal (jit-cacheable) specs.
    """

    array: np.ndarray = _param("a 2-D boolean array [T, S]")

    def __post_init__(self):
        if isinstance(self.array, jax.core.Tracer):
            raise ValueError("Explicit: array must be concrete (numpy or a concrete jax array), got a traced value")
        array = np.array(self.array)
        if array.dtype != np.bool_ or array.ndim != 2:
            raise ValueError(f"Explicit: array must be a 2-D boolean array [T, S], got {array.dtype} {array.shape}")
        array.setflags(write=False)
        object.__setattr__(self, "array", array)

    def __call__(self, q_idx, kv_idx):
        xp = _array_module(q_idx, kv_idx)
        T, S = self.array.shape
        inside = (q_idx >= 0) & (q_idx < T) & (kv_idx >= 0) & (kv_idx < S)
        return inside & xp.asarray(self.array)[xp.clip(q_idx, 0, T - 1), xp.clip(kv_idx, 0, S - 1)]

    def validate(self, T: int, S: int, q_offset: int | jax.Array) -> None:
        if self.array.shape != (T, S):
            raise ValueError(f"Explicit mask has shape {self.array.shape} but the attention is [T, S] = {(T, S)}")
        if not isinstance(q_offset, numbers.Integral) or q_offset != 0:
            raise ValueError(f"Explicit mask needs a static q_offset of 0 (its rows are queries 0..T-1), "
                             f"got {q_offset!r}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Explicit) and self.array.shape == other.array.shape
                and self.array.tobytes() == other.array.tobytes())

    def __hash__(self) -> int:
        return hash((self.array.shape, self.array.tobytes()))

    def __repr__(self) -> str:
        return f"Explicit(<{self.array.shape[0]}x{self.array.shape[1]} bool, {int(self.array.sum())} allowed>)"


@dataclasses.dataclass(frozen=True)
class _Combination(Mask):
    left: Mask
    right: Mask

    def __post_init__(self):
        for side in (self.left, self.right):
            if not isinstance(side, Mask):
                raise ValueError(f"{type(self).__name__}: both operands must be masks, got {side!r}")

    def validate(self, T: int, S: int, q_offset: int | jax.Array) -> None:
        self.left.validate(T, S, q_offset)
        self.right.validate(T, S, q_offset)

    @property
    def relative(self) -> bool:
        return self.left.relative and self.right.relative


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
    """Query i attends to key j where either mask allows it."""

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) | self.right(q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
    """Query i attends to key j where both masks allow it."""

    def __call__(self, q_idx, kv_idx):
        return self.left(q_idx, kv_idx) & self.right(q_idx, kv_idx)


def names() -> list[str]:
    """Names of every registered mask, sorted."""
    return sorted(_MASKS)


def get(name: str, **params: Any) -> Mask:
    """The registered mask `name` built with `params`, e.g. get("sliding_window", window=128)."""
    if name not in _MASKS:
        raise ValueError(f"unknown mask {name!r}; registered masks: {', '.join(names())}")
    cls = _MASKS[name]
    fields = {f.name: f.metadata["allowed"] for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"mask {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(fields) or 'no parameters'}")
    missing = [f"{p} ({allowed})" for p, allowed in fields.items() if p not in params]
    if missing:
        raise ValueError(f"mask {name!r} needs parameter(s): {', '.join(missing)}")
    return cls(**params)
