"""Attention masks: what each query may see, for every path (the reference, XLA, cuDNN dispatch, kernels, ring, config).

A mask is a frozen, hashable dataclass (a static argument of `jax.jit`) over the absolute query position i, key
position j and query head h. `mask(q_idx, kv_idx, head)` evaluates it elementwise on broadcastable integer arrays —
numpy at trace time, jnp values in the reference and inside a kernel on partial blocks — and returns True where query
i may attend to key j.

`mask.classify(q_lo, q_hi, kv_lo, kv_hi, head)` looks at whole blocks (inclusive position ranges as broadcastable
arrays) and returns two bool arrays: `never` (no pair in the block is allowed) and `always` (every pair is allowed).
It may be conservative (both False: "partial"); `layout.BlockLayout` refines partial blocks by evaluating them, so a
block the kernels skip is exactly a block with nothing allowed. Masks compose with `|` and `&`.

Every mask class is registered by name (`names()`, `get(name, **params)`), and `parse(spec)` reads the spec strings a
config names (`model.attention.mask`): a name, a call with its parameters, or `|` / `&` of them, e.g.

    "causal"    "sliding_window(window=4096)"    "strided_heads(block=128, local_blocks=8, stride=16)"
    "causal & prefix(length=4) | sliding_window(window=1024)"    "chunked_local(8192)"
    "block_mask(blocks='blocks.npy', block_q=128, block_kv=128)"

and `mask.spec` writes one back. Masks are defined on row positions; document masking of packed batches comes from
segment ids at run time and is applied on top. A mask that is `relative` (i − j and h decide it) means the same
on positions within a document; for the others, attention with segment ids evaluates them on positions counted from
each document's first token (longctx's reference does; the kernels, which mask row positions, refuse such requests).

The split of mask → block layout → kernel follows splash attention's masks and mask info
(jax.experimental.pallas.ops.tpu.splash_attention).
"""

import ast
import dataclasses
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REGISTRY: dict[str, type["Mask"]] = {}


def register(name: str):
    """Class decorator: the mask becomes `get(name, **params)` and the spec string `name(param=value, ...)`."""

    def decorate(cls: type[Mask]) -> type[Mask]:
        if name in _REGISTRY:
            raise ValueError(f"mask {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return decorate


def _param(allowed: str) -> Any:
    """A mask parameter; `allowed` says what values it takes, for error messages."""
    return dataclasses.field(metadata={"allowed": allowed})


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _array_module(*arrays: Any):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _read_only_bool_array(owner: str, name: str, value: Any, ndims: tuple[int, ...], shape_doc: str) -> np.ndarray:
    """`value` (an array, nested lists or the path of a .npy file) as a read-only bool array of one of `ndims`."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{owner}: {name} must be concrete (numpy or a concrete jax array), got a traced value")
    if isinstance(value, str | os.PathLike):
        if not os.path.isfile(value):
            raise FileNotFoundError(f"{owner}: {name}={str(value)!r} names no .npy file")
        value = np.load(value)
    array = np.array(value)
    if array.dtype != np.bool_ or array.ndim not in ndims:
        raise ValueError(f"{owner}: {name} must be a bool array {shape_doc}, got {array.dtype} {array.shape}")
    array.setflags(write=False)
    return array


@dataclasses.dataclass(frozen=True)
class Mask:
    """Base of every mask. Subclasses implement `__call__` and, where they can, an exact `classify`."""

    registered_name = ""

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
    def relative(self) -> bool:
        """True when mask(i, j, h) depends on i − j (and h) only, so a shift of both positions leaves it unchanged."""
        return False

    @property
    def evaluable_in_kernel(self) -> bool:
        """False for masks read at trace time only (arrays); the kernels then need every block empty or full."""
        return True

    def validate(self, T: int, S: int, q_offset: int | jax.Array) -> None:
        """Raises ValueError if this mask cannot be evaluated for T queries starting at q_offset against S keys."""

    @property
    def spec(self) -> str:
        """The spec string `parse` reads back into an equal mask."""
        if not self.registered_name:
            raise ValueError(f"{type(self).__name__} has no spec: register it with @masks.register(name)")
        params = ", ".join(f"{f.name}={_spec_value(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.registered_name}({params})" if params else self.registered_name

    def __or__(self, other: "Mask") -> "Mask":
        return Union(self, other)

    def __and__(self, other: "Mask") -> "Mask":
        return Intersection(self, other)


def _spec_value(value: Any) -> str:
    return repr(value.tolist() if isinstance(value, np.ndarray) else value)


@register("full")
@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key."""

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx >= 0) | (kv_idx >= 0)  # all True, in the array type and shape of the inputs

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        shape = np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo))
        return np.zeros(shape, bool), np.ones(shape, bool)


@register("causal")
@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """j <= i."""

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx, head=0):
        return kv_idx <= q_idx

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        return kv_lo > q_hi, kv_hi <= q_lo


@register("sliding_window")
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """The `window` most recent keys, the query's own included: 0 <= i - j < window."""

    window: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("SlidingWindow", "window", self.window)

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx, head=0):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < self.window)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        nearest, farthest = q_lo - kv_hi, q_hi - kv_lo
        return (farthest < 0) | (nearest >= self.window), (nearest >= 0) & (farthest < self.window)


@register("distant")
@dataclasses.dataclass(frozen=True)
class Distant(Mask):
    """Keys at least `distance` behind the query: i - j >= distance (the far branch of LM-Infinite and Self-Extend)."""

    distance: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("Distant", "distance", self.distance)

    @property
    def relative(self) -> bool:
        return True

    def __call__(self, q_idx, kv_idx, head=0):
        return q_idx - kv_idx >= self.distance

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        return q_hi - kv_lo < self.distance, q_lo - kv_hi >= self.distance


@register("prefix")
@dataclasses.dataclass(frozen=True)
class Prefix(Mask):
    """The first `length` keys, for every query: j < length (attention sinks, before the causal cut)."""

    length: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("Prefix", "length", self.length)

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx >= 0) & (kv_idx < self.length)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        never, always = kv_lo >= self.length, kv_hi < self.length
        return np.broadcast_arrays(never, always, q_lo)[:2]


@register("sinks_window")
@dataclasses.dataclass(frozen=True)
class SinksAndWindow(Mask):
    """Causal, and one of the first `sinks` keys or within the window: j <= i and (j < sinks or i - j < window),
    which is `Causal() & Prefix(sinks) | SlidingWindow(window)`.

    The attention-sink pattern of StreamingLLM (Xiao et al., 2023) and LM-Infinite's Λ-shaped mask (Han et al., 2023).
    """

    sinks: int = _param("a positive int")
    window: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("SinksAndWindow", "sinks", self.sinks)
        _check_positive_int("SinksAndWindow", "window", self.window)

    def __call__(self, q_idx, kv_idx, head=0):
        return (kv_idx <= q_idx) & ((kv_idx < self.sinks) | (q_idx - kv_idx < self.window))

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        composed = (Causal() & Prefix(self.sinks)) | SlidingWindow(self.window)
        return composed.classify(q_lo, q_hi, kv_lo, kv_hi, head)


@register("chunked_local")
@dataclasses.dataclass(frozen=True)
class ChunkedLocal(Mask):
    """Causal within fixed chunks: i // chunk == j // chunk and j <= i (Llama 4's chunked local attention)."""

    chunk: int = _param("a positive int")

    def __post_init__(self):
        _check_positive_int("ChunkedLocal", "chunk", self.chunk)

    def __call__(self, q_idx, kv_idx, head=0):
        return (q_idx // self.chunk == kv_idx // self.chunk) & (kv_idx <= q_idx)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        c = self.chunk
        never = (kv_lo > q_hi) | (kv_hi // c < q_lo // c) | (kv_lo // c > q_hi // c)
        one_chunk = (q_lo // c == q_hi // c) & (kv_lo // c == kv_hi // c) & (q_lo // c == kv_lo // c)
        return never, one_chunk & (kv_hi <= q_lo)


@register("strided_heads")
@dataclasses.dataclass(frozen=True)
class StridedHeads(Mask):
    """S2-Attention's heterogeneous context sharding (Lin et al., 2024, arXiv 2407.17678): causal, and within blocks
    of `block` tokens each head sees the `local_blocks` most recent blocks plus every `stride`-th block further back,
    each head its own shard of them:

        allowed(i, j, h) = j <= i and (i // block - j // block < local_blocks or (j // block + h) % stride == 0)

    so heads h and h + stride read the same columns and `stride` consecutive heads together cover every block.
    Kernel blocks that divide `block` make every block's classification exact.
    """

    block: int = _param("a positive int")
    local_blocks: int = _param("a positive int")
    stride: int = _param("a positive int")

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


@register("block_mask")
@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask(Mask):
    """An arbitrary mask given per block: `blocks` bool [num_q_blocks, num_kv_blocks] (one pattern for every head)
    or [Hq, num_q_blocks, num_kv_blocks] — an array, nested lists or the path of a .npy file — where entry [a, b]
    allows queries a·block_q .. (a+1)·block_q − 1 to see keys b·block_kv .. (b+1)·block_kv − 1. Kernel block sizes
    must divide block_q and block_kv (each kernel block is then all allowed or all masked). Equality and hash go by
    content, so equal arrays give the same jit cache entry."""

    blocks: np.ndarray = _param("a bool array [num_q_blocks, num_kv_blocks] or [Hq, ...], nested lists or a .npy path")
    block_q: int = _param("a positive int")
    block_kv: int = _param("a positive int")

    def __post_init__(self):
        blocks = _read_only_bool_array("BlockMask", "blocks", self.blocks, (2, 3),
                                       "[num_q_blocks, num_kv_blocks] or [Hq, num_q_blocks, num_kv_blocks]")
        _check_positive_int("BlockMask", "block_q", self.block_q)
        _check_positive_int("BlockMask", "block_kv", self.block_kv)
        object.__setattr__(self, "blocks", blocks)

    @property
    def per_head(self) -> bool:
        return self.blocks.ndim == 3

    @property
    def evaluable_in_kernel(self) -> bool:
        return False

    def _lookup(self, q_block, kv_block, head):
        xp = _array_module(q_block, kv_block, head)
        table = self.blocks if self.blocks.ndim == 3 else self.blocks[None]
        inside = (q_block < table.shape[1]) & (kv_block < table.shape[2])
        head = xp.asarray(head) % table.shape[0]
        return inside & xp.asarray(table)[head, xp.minimum(q_block, table.shape[1] - 1),
                                          xp.minimum(kv_block, table.shape[2] - 1)]

    def __call__(self, q_idx, kv_idx, head=0):
        return self._lookup(q_idx // self.block_q, kv_idx // self.block_kv, head)

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


@register("explicit")
@dataclasses.dataclass(frozen=True, eq=False)
class Explicit(Mask):
    """An arbitrary dense mask, `array` bool [T, S] (an array, nested lists or the path of a .npy file): row i is query
    position i (so it only fits q_offset = 0), column j is key position j. With segment ids positions count from each
    segment's start, so every packed document reads the array's top-left block from its own first token; positions
    outside the array are not allowed.

    The reference and XLA paths take any such mask; the kernels only one whose blocks are each all allowed or all
    masked (they read it at trace time, as a block layout). Equality and hash go by shape and content.
    """

    array: np.ndarray = _param("a bool array [T, S], nested lists or a .npy path")

    def __post_init__(self):
        object.__setattr__(self, "array", _read_only_bool_array("Explicit", "array", self.array, (2,), "[T, S]"))

    @property
    def evaluable_in_kernel(self) -> bool:
        return False

    def __call__(self, q_idx, kv_idx, head=0):
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
                raise ValueError(f"{type(self).__name__}: both operands must be pallas_kernels masks, got {side!r}")

    @property
    def per_head(self) -> bool:
        return self.left.per_head or self.right.per_head

    @property
    def relative(self) -> bool:
        return self.left.relative and self.right.relative

    @property
    def evaluable_in_kernel(self) -> bool:
        return self.left.evaluable_in_kernel and self.right.evaluable_in_kernel

    def validate(self, T: int, S: int, q_offset: int | jax.Array) -> None:
        self.left.validate(T, S, q_offset)
        self.right.validate(T, S, q_offset)


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
    """Allowed where either mask allows."""

    def __call__(self, q_idx, kv_idx, head=0):
        return self.left(q_idx, kv_idx, head) | self.right(q_idx, kv_idx, head)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        left_never, left_always = self.left.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        right_never, right_always = self.right.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        return left_never & right_never, left_always | right_always

    @property
    def spec(self) -> str:
        return f"({self.left.spec} | {self.right.spec})"


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
    """Allowed where both masks allow."""

    def __call__(self, q_idx, kv_idx, head=0):
        return self.left(q_idx, kv_idx, head) & self.right(q_idx, kv_idx, head)

    def classify(self, q_lo, q_hi, kv_lo, kv_hi, head=0):
        left_never, left_always = self.left.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        right_never, right_always = self.right.classify(q_lo, q_hi, kv_lo, kv_hi, head)
        return left_never | right_never, left_always & right_always

    @property
    def spec(self) -> str:
        return f"({self.left.spec} & {self.right.spec})"


def materialize(mask: Mask, T: int, S: int, *, q_offset: int = 0, num_heads: int = 1) -> np.ndarray:
    """The dense mask, bool [num_heads, T, S]: row t is query q_offset + t, column s is key s."""
    for name, value in (("T", T), ("S", S), ("q_offset", q_offset), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (name == "num_heads"):
            raise ValueError(f"materialize: {name} must be a {'positive' if name == 'num_heads' else 'non-negative'} "
                             f"int, got {value!r}")
    mask.validate(T, S, q_offset)
    q_idx = np.arange(T)[None, :, None] + q_offset
    kv_idx = np.arange(S)[None, None, :]
    heads = np.arange(num_heads)[:, None, None]
    return np.array(np.broadcast_to(mask(q_idx, kv_idx, heads), (num_heads, T, S)), dtype=bool)


def names() -> list[str]:
    """The name of every registered mask, sorted."""
    return sorted(_REGISTRY)


def get(name: str, *args: Any, **params: Any) -> Mask:
    """The registered mask `name` built from its parameters, e.g. get("sliding_window", window=128)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mask {name!r}; registered masks: {', '.join(names())}")
    cls = _REGISTRY[name]
    fields = {f.name: f.metadata["allowed"] for f in dataclasses.fields(cls)}
    if len(args) > len(fields):
        raise ValueError(f"mask {name!r} takes {len(fields)} parameter(s) ({', '.join(fields) or 'none'}), "
                         f"got {len(args)} positional")
    given = dict(zip(fields, args))
    twice = sorted(set(given) & set(params))
    if twice:
        raise ValueError(f"mask {name!r}: parameter {', '.join(map(repr, twice))} given twice")
    given.update(params)
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"mask {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(fields) or 'no parameters'}")
    missing = [f"{p} ({allowed})" for p, allowed in fields.items() if p not in given]
    if missing:
        raise ValueError(f"mask {name!r} needs parameter(s): {', '.join(missing)}")
    return cls(**given)


SPEC_GRAMMAR = ("a registered mask's name, a call with its parameters (name(param=value, ...)), or masks joined by "
                "| (either) and & (both)")


def parse(spec: str) -> Mask:
    """The mask a spec string names (grammar in the module docstring; `mask.spec` writes one). Raises ValueError
    naming the spec and what is allowed."""
    if not isinstance(spec, str):
        raise ValueError(f"a mask spec must be a string ({SPEC_GRAMMAR}), got {spec!r}")
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"mask spec {spec!r} is not {SPEC_GRAMMAR}; registered masks: {', '.join(names())}") from None
    return _build(tree.body, spec)


def _build(node: ast.AST, spec: str) -> Mask:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr | ast.BitAnd):
        left, right = _build(node.left, spec), _build(node.right, spec)
        return left | right if isinstance(node.op, ast.BitOr) else left & right
    if isinstance(node, ast.Name):
        return get(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and all(k.arg for k in node.keywords):
        try:
            args = [ast.literal_eval(a) for a in node.args]
            params = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError:
            raise ValueError(f"mask spec {spec!r}: the parameters of {node.func.id!r} must be literals (numbers, "
                             f"strings, lists), got {ast.unparse(node)!r}") from None
        return get(node.func.id, *args, **params)
    raise ValueError(f"mask spec {spec!r}: {ast.unparse(node)!r} is not {SPEC_GRAMMAR}; registered masks: "
                     f"{', '.join(names())}")
