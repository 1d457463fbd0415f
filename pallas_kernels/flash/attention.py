"""`flash_attention`: block-sparse flash attention, forward and backward, with one entry point over several backends.

The mask is static: its block layout (`layout.py`) is computed once per shape at trace time, and the forward, dQ and
dK/dV kernels of every backend visit only the blocks it marks non-empty, evaluating the mask in-kernel only on partial
blocks. Segment ids (packed documents, padding) are dynamic: they are masked in-kernel, and a block whose query and
key segment ranges cannot meet is skipped before its keys are loaded.

Backends (`BACKENDS`): "triton" (Pallas Triton, any CUDA GPU), "mosaic_gpu" (Pallas Mosaic GPU for Hopper) and
"tpu" (Pallas Mosaic TPU). Each says what it cannot serve (`unsupported_reason`) and the call raises
NotImplementedError naming the combination before any work; nothing is dropped silently. With `interpret=True` the
kernels run in Pallas interpret mode (on CPU in the tests).

Gradients follow FlashAttention-2 (Dao, 2023, arXiv 2307.08691): the forward saves the log-sum-exp; the backward
recomputes the probabilities block by block with D_i = rowsum(dO ∘ O) − dlse_i (the lse cotangent, so ring attention
can differentiate through `merge`), dQ accumulated per query block and dK/dV per key block.
"""

import dataclasses
import functools
import importlib
from typing import Protocol

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from pallas_kernels import masks as masks_lib
from pallas_kernels.flash import layout as layout_lib
from pallas_kernels.flash import normalizers

DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# checkpoint_name of the forward's output and of its row statistics (lse): a remat policy that saves both keeps
# the backward from re-running the forward kernel (see `_flash`).
OUTPUT_NAME = "flash_attention_out"
STATS_NAME = "flash_attention_stats"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward (block_q × block_kv), dQ and dK/dV kernels; None takes the backend's default."""

    block_q: int | None = None
    block_kv: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None

    def resolved(self, defaults: "BlockSizes", T: int, S: int) -> "BlockSizes":
        """Fields left None take `defaults`; query blocks are capped at T and key blocks at S."""
        sizes = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            value = getattr(defaults, field.name) if value is None else value
            sizes[field.name] = min(value, T if field.name.startswith("block_q") else S)
        return BlockSizes(**sizes)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one call; hashable, so it is the custom_vjp's non-differentiable argument."""

    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    mask: masks_lib.Mask
    q_offset: int
    scale: float
    normalizer: normalizers.Normalizer
    has_segments: bool
    return_lse: bool
    block_sizes: BlockSizes
    interpret: bool

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def layout(self, block_q: int, block_kv: int) -> layout_lib.BlockLayout:
        return layout_lib.block_layout(self.mask, self.q_len, self.kv_len, q_offset=self.q_offset, block_q=block_q,
                                       block_kv=block_kv, num_heads=self.num_q_heads)

    @property
    def forward_layout(self) -> layout_lib.BlockLayout:
        return self.layout(self.block_sizes.block_q, self.block_sizes.block_kv)

    @property
    def dq_layout(self) -> layout_lib.BlockLayout:
        return self.layout(self.block_sizes.block_q_dq, self.block_sizes.block_kv_dq)

    @property
    def dkdv_layout(self) -> layout_lib.BlockLayout:
        return self.layout(self.block_sizes.block_q_dkv, self.block_sizes.block_kv_dkv)


class Backend(Protocol):
    """What a backend module provides. Arrays: q [B, T, Hq, D], k/v [B, S, Hkv, D]; row_scale [B, Hq, T] and
    col_scale [B, Hkv, S] float32 (softplus only, else None); segment ids [B, T] / [B, S] int32 or None; stats a tuple
    of float32 [B, Hq, T] (softmax: (lse,); softplus: (num_keys, row_sum, ...) — the first two fixed,
    the rest the backend's own); delta [B, Hq, T] float32."""

    def default_block_sizes(self, problem: Problem) -> BlockSizes: ...

    def unsupported_reason(self, problem: Problem) -> str | None: ...

    def forward(self, problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids): ...

    def backward(self, problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, stats,
                 delta, dout): ...


BACKEND_MODULES = {
    "triton": "pallas_kernels.gpu.triton_flash",
    "mosaic_gpu": "pallas_kernels.gpu.hopper_flash",
    "tpu": "pallas_kernels.tpu.flash",
}
BACKEND_NAMES = tuple(BACKEND_MODULES)


def backend_module(name: str) -> Backend:
    """The backend module called `name` (imported on first use, so importing pallas_kernels stays light)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    return importlib.import_module(BACKEND_MODULES[name])


def _auto_backend(interpret: bool) -> str:
    device = jax.devices()[0]
    if device.platform == "tpu":
        return "tpu"
    if device.platform == "gpu":
        return "triton"
    if interpret:
        return "triton"
    raise NotImplementedError(f"flash_attention runs on GPU or TPU; on {device.platform} pass interpret=True "
                              f"(Pallas interpret mode) and a backend")


def _check(q, k, v, segment_ids, kv_segment_ids, mask, q_offset):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D]), got shape {np.shape(x)}")
    (B, T, Hq, D), (Bk, S, Hkv, Dk) = q.shape, k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"k and v must be [B, S, Hkv, D] matching q {q.shape}, got k {k.shape}, v {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the kv heads Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k and v must share one dtype of bfloat16, float16, float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not isinstance(mask, masks_lib.Mask):
        raise ValueError(f"mask must be a pallas_kernels.masks.Mask, got {mask!r}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, (int, np.integer)) or q_offset < 0:
        raise ValueError(f"q_offset must be a static int >= 0 (the block layout is built at trace time), got "
                         f"{q_offset!r}")
    if (segment_ids is None) != (kv_segment_ids is None) and S != T:
        raise ValueError("segment_ids and kv_segment_ids must be given together when S != T")
    segment_ids = kv_segment_ids if segment_ids is None else segment_ids
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    for name, ids, length in (("segment_ids", segment_ids, T), ("kv_segment_ids", kv_segment_ids, S)):
        if ids is not None and (tuple(ids.shape) != (B, length) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise ValueError(f"{name} must be an int array [B, {length}], got {ids.dtype} {tuple(ids.shape)}")
    return segment_ids, kv_segment_ids


def plan(q_shape, k_shape, dtype, *, mask: masks_lib.Mask, has_segments: bool,
         normalizer: str | normalizers.Normalizer = "softmax", scale: float | None = None, q_offset: int = 0,
         return_lse: bool = False, backend: str = "auto", block_sizes: BlockSizes | None = None,
         interpret: bool = False) -> tuple[Problem, Backend]:
    """The static Problem of a call with these shapes and options and the backend that runs it, layouts built; raises
    ValueError for bad arguments and NotImplementedError (naming the combination) for what the backend cannot do.
    Needs no arrays, so a dispatcher can ask before committing to this implementation."""
    normalizer = normalizers.get(normalizer)
    if isinstance(normalizer, normalizers.Softplus) and (scale is not None or return_lse):
        raise ValueError("normalizer='softplus' sets its own scores and has no log-sum-exp: it takes neither scale "
                         "nor return_lse")
    if backend == "auto":
        backend = _auto_backend(interpret)
    implementation = backend_module(backend)
    (B, T, Hq, D), (S, Hkv) = q_shape, k_shape[1:3]
    problem = Problem(
        batch=B, q_len=T, kv_len=S, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, dtype=jnp.dtype(dtype).name,
        mask=mask, q_offset=int(q_offset), scale=float(D ** -0.5 if scale is None else scale), normalizer=normalizer,
        has_segments=has_segments, return_lse=return_lse, block_sizes=BlockSizes(), interpret=interpret)
    requested = block_sizes or BlockSizes()
    problem = dataclasses.replace(problem, block_sizes=requested.resolved(
        implementation.default_block_sizes(problem), T, S))
    reason = implementation.unsupported_reason(problem)
    if reason is not None:
        raise NotImplementedError(f"flash_attention backend={backend!r} cannot run this call: {reason}")
    for name in ("forward_layout", "dq_layout", "dkdv_layout"):
        getattr(problem, name)  # builds (and caches) the layouts now, so a bad block size fails before any work
    return problem, implementation


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks_lib.Mask = masks_lib.Causal(),
                    segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                    normalizer: str | normalizers.Normalizer = "softmax", scale: float | None = None,
                    q_offset: int = 0, return_lse: bool = False, backend: str = "auto",
                    block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Block-sparse flash attention. Semantics: `pallas_kernels.reference.reference_attention`.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv), K/V
    never repeated). mask: a static `pallas_kernels.masks.Mask` over absolute positions; query row t is position
    q_offset + t. segment_ids [B, T] / kv_segment_ids [B, S] int: attention stays within equal ids, id 0 attends to
    and is attended by nothing. normalizer: "softmax" (scale defaults to 1/sqrt(D)) or "softplus" / a
    `normalizers.Softplus`. Returns out [B, T, Hq, D] in q.dtype, 0 on rows that see nothing, and with return_lse
    (softmax only) lse [B, T, Hq] float32, -inf on such rows. Differentiable in q, k, v (and through lse).
    """
    segment_ids, kv_segment_ids = _check(q, k, v, segment_ids, kv_segment_ids, mask, q_offset)
    problem, implementation = plan(
        q.shape, k.shape, q.dtype, mask=mask, has_segments=segment_ids is not None, normalizer=normalizer,
        scale=scale, q_offset=q_offset, return_lse=return_lse, backend=backend, block_sizes=block_sizes,
        interpret=interpret)
    is_softplus = isinstance(problem.normalizer, normalizers.Softplus)
    row_scale = col_scale = None
    if is_softplus:
        row_scale = 1.0 / jnp.maximum(jnp.linalg.norm(q.astype(jnp.float32), axis=-1), 1e-6).transpose(0, 2, 1)
        col_scale = 1.0 / jnp.maximum(jnp.linalg.norm(k.astype(jnp.float32), axis=-1), 1e-6).transpose(0, 2, 1)
    if segment_ids is not None:
        segment_ids, kv_segment_ids = segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
    out, lse = _flash(problem, implementation, q, k, v, row_scale, col_scale, segment_ids, kv_segment_ids)
    if return_lse:
        return out, lse.transpose(0, 2, 1)
    return out


def flash_attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
                             dout: jax.Array, dlse: jax.Array | None = None, *,
                             mask: masks_lib.Mask = masks_lib.Causal(),
                             segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
                             scale: float | None = None, q_offset: int = 0, backend: str = "auto",
                             block_sizes: BlockSizes | None = None, interpret: bool = False):
    """The FlashAttention-2 backward of softmax attention on these keys, with the rows' statistics given.

    out [B, T, Hq, D] and lse [B, T, Hq] float32 are those of the whole attention the caller computed, which may
    span more keys than k and v (ring attention: the merged output and lse over every key shard). Then
    dS = exp(S − lse) ∘ (dO·Vᵀ − rowsum(dO ∘ out) + dlse) is this shard's exact share of the full gradient (dlse
    [B, T, Hq]: the cotangent of lse, None for 0), and the returned (dq, dk, dv) — in q's dtype — are summed over
    shards by the caller. Rows with lse = −inf get zero gradients.
    """
    segment_ids, kv_segment_ids = _check(q, k, v, segment_ids, kv_segment_ids, mask, q_offset)
    B, T, Hq, _ = q.shape
    for name, x, shape in (("out", out, q.shape), ("dout", dout, q.shape), ("lse", lse, (B, T, Hq))):
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    problem, implementation = plan(
        q.shape, k.shape, q.dtype, mask=mask, has_segments=segment_ids is not None, scale=scale,
        q_offset=q_offset, return_lse=True, backend=backend, block_sizes=block_sizes, interpret=interpret)
    if segment_ids is not None:
        segment_ids, kv_segment_ids = segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32).transpose(0, 2, 1)
    stats = (lse.astype(jnp.float32).transpose(0, 2, 1),)
    dq, dk, dv, _, _ = implementation.backward(problem, q, k, v, None, None, segment_ids, kv_segment_ids, stats,
                                               delta, dout.astype(q.dtype))
    return dq, dk, dv


def _flash(problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids):
    """The forward kernel, then `_with_gradient` to differentiate it.

    The kernel runs outside the custom_vjp, and its outputs carry the names `OUTPUT_NAME` and `STATS_NAME`: under
    `jax.checkpoint` a policy that saves them (e.g. `save_only_these_names`) keeps out and the log-sum-exp for the
    backward, which then never re-runs the forward kernel. (Inside a custom_vjp the kernel would be re-run to rebuild
    the residuals whatever the policy saved.)

    The optimization barrier keeps the kernel's outputs away from XLA GPU's dynamic-slice fusion: under a scan whose
    remat policy saves them, that pass fuses the kernel with the dynamic-update-slice that stacks its outputs per layer
    and keeps the original call for the layer's own use, so the forward kernel ran twice per layer.
    """
    out, stats = jax.lax.optimization_barrier(
        _forward(problem, implementation, *jax.lax.stop_gradient((q, k, v, row_scale, col_scale)), q_segment_ids,
                 kv_segment_ids))
    out = checkpoint_name(out, OUTPUT_NAME)
    stats = tuple(checkpoint_name(s, STATS_NAME) for s in stats)
    return _with_gradient(problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids,
                          out, stats)


# Under jit, so that the rematerialised copy of a forward whose outputs a remat policy saved is dead code that jax
# removes: jax never removes an unused pallas_call itself, but it does remove a jit call whose outputs go unused.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids):
    return implementation.forward(problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_gradient(problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, out,
                   stats):
    """(out, lse) as given; its backward is the attention's, from the forward's out and statistics."""
    del problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids
    return out, stats[0]


def _with_gradient_forward(problem, implementation, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids,
                           out, stats):
    return (out, stats[0]), (q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, out, stats)


def _with_gradient_backward(problem, implementation, residuals, cotangents):
    q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, out, stats = residuals
    dout, dlse = cotangents
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    if isinstance(problem.normalizer, normalizers.Softmax):
        delta = delta - dlse
    dq, dk, dv, drow, dcol = implementation.backward(problem, q, k, v, row_scale, col_scale, q_segment_ids,
                                                     kv_segment_ids, stats, delta, dout)
    # out and stats come from the stop_gradient-ed forward: their cotangents go nowhere.
    return dq, dk, dv, drow, dcol, None, None, None, None


_with_gradient.defvjp(_with_gradient_forward, _with_gradient_backward)

