"""Context parallelism: attention over a sequence sharded along a mesh axis, by ring, all-gather or Ulysses.

Each device of the sequence axis (N devices) holds C = T / N tokens of every sequence, in the order of a token layout
(`layout.py`: contiguous, zigzag or striped). `attention(q, k, v, ...)` takes the global [B, T, H, D] arrays in that
order, sharded along T, and returns what single-device attention returns on the same tokens:

- "ring" (Liu et al., "Ring Attention with Blockwise Transformers", 2023, arXiv 2310.01889): the K/V shards travel
  round the ring with `ppermute`, N − 1 hops; each step attends the local queries to the visiting shard and merges
  by log-sum-exp. The next hop is issued before the step's compute so the two overlap. The backward is a second ring
  in which dK/dV accumulators travel with their K/V shard and arrive home after N hops; it hands each step the merged
  out and lse, so no step's forward is recomputed. Only the Hkv key/value heads travel (grouped-query attention).
- "ring_bidirectional": half of each K/V shard travels each way round the ring (TokenRing, Wang et al., 2024,
  arXiv 2412.20501), using both directions of every link with half the bytes per hop.
- "all_gather": K/V gathered along the sequence in one collective, local queries attend to every shard (the
  context parallelism of Llama 3 and MaxText); the backward reduce-scatters dK/dV. Often fastest at moderate N.
- "ulysses" (Jacobs et al., "DeepSpeed Ulysses", 2023, arXiv 2309.14509): all-to-all from sequence-sharded to
  head-sharded, attention on whole sequences with any implementation, all-to-all back; needs Hkv divisible by N.

Ring and all-gather merge softmax partials, so they take the softmax normalizer without ALiBi; their steps run the
Pallas kernels (impl "pallas" / "pallas_interpret", or "auto" on a GPU or TPU) or the pure-jnp reference ("reference",
"xla", or "auto" on CPU). Ulysses takes whatever `longctx.attention.attention` takes. A request a strategy cannot serve
raises NotImplementedError naming it, before any work.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pallas_kernels import masks

from longctx.attention import dispatch, normalizers
from longctx.attention.reference import check_arguments, run_starts
from longctx.parallel import layout as layout_lib
from longctx.parallel.blocks import DenseSteps, KernelSteps, Side, plan_calls

logger = logging.getLogger("longctx.parallel")

STRATEGIES = ("ring", "ring_bidirectional", "all_gather", "ulysses")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about one context-parallel call (hashable: the custom_vjp's non-differentiable argument)."""

    strategy: str
    layout: str
    axis: str
    num_devices: int
    shard_len: int
    steps: DenseSteps | KernelSteps

    def pieces(self, rank: int) -> tuple[layout_lib.Piece, ...]:
        return layout_lib.pieces(self.layout, rank, self.num_devices, self.shard_len)


def _shift(tree, axis: str, num_devices: int, direction: int = 1):
    """Sends every array of `tree` from device i to device i + direction (mod N) along `axis`."""
    perm = [(i, (i + direction) % num_devices) for i in range(num_devices)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


def _empty_accumulator(q):
    return jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)


def _rows(tree, start: int, stop: int):
    """Tokens [start, stop) of every [B, C, ...] array of `tree` (None stays None)."""
    return jax.tree.map(lambda x: x[:, start:stop], tree)


def _ring_parts(setup: Setup) -> tuple[tuple[int, int, int], ...]:
    """The parts of a K/V shard that travel round the ring: (first token, last token + 1, direction). "ring" sends
    the whole shard to device i + 1; "ring_bidirectional" its first half to i + 1 and its second half to i − 1."""
    C = setup.shard_len
    if setup.strategy == "ring":
        return ((0, C, 1),)
    return ((0, C // 2, 1), (C // 2, C, -1))


def _visiting_pieces(setup: Setup, part: tuple[int, int, int], step: int):
    """device index → the global positions of the part visiting it at `step` (sent by device i − direction·step)."""
    start, stop, direction = part
    N = setup.num_devices
    return lambda rank: layout_lib.split(setup.pieces((rank - direction * step) % N), start, stop)


def _ring_forward_pass(setup: Setup, q, k, v, q_side: Side, kv_side: Side):
    acc = _empty_accumulator(q)
    N, axis, parts = setup.num_devices, setup.axis, _ring_parts(setup)
    shards = [_rows((k, v, kv_side), start, stop) for start, stop, _ in parts]
    for step in range(N):
        following = [_shift(shard, axis, N, part[2]) for part, shard in zip(parts, shards)] if step < N - 1 else None
        for part, shard in zip(parts, shards):  # the next hop is issued above, before this step's compute
            acc = setup.steps.forward(acc, q, q_side, *shard, _visiting_pieces(setup, part, step))
        shards = following
    return acc


def _ring_backward_pass(setup: Setup, q, k, v, q_side: Side, kv_side: Side, out, lse, cotangents):
    N, axis, parts = setup.num_devices, setup.axis, _ring_parts(setup)
    shards = [_rows((k, v, kv_side), start, stop) for start, stop, _ in parts]
    grads = [jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shard[:2]) for shard in shards]
    dq = jnp.zeros(q.shape, jnp.float32)
    for step in range(N):
        following = [_shift(shard, axis, N, part[2]) for part, shard in zip(parts, shards)] if step < N - 1 else None
        for i, (part, shard) in enumerate(zip(parts, shards)):
            dq_s, dk_s, dv_s = setup.steps.backward(q, q_side, *shard, _visiting_pieces(setup, part, step), out, lse,
                                                    cotangents)
            dq = dq + dq_s
            # dK/dV travel with their shard: after N hops they are home.
            grads[i] = _shift((grads[i][0] + dk_s, grads[i][1] + dv_s), axis, N, part[2])
        shards = following
    return dq, jnp.concatenate([g[0] for g in grads], 1), jnp.concatenate([g[1] for g in grads], 1)


def _gathered(setup: Setup, k, v, kv_side: Side):
    """Every device's K/V shard and side arrays, stacked on a leading axis of N."""
    return jax.tree.map(lambda x: jax.lax.all_gather(x, setup.axis), (k, v, kv_side))


def _all_gather_forward_pass(setup: Setup, q, k, v, q_side: Side, kv_side: Side):
    acc = _empty_accumulator(q)
    ks, vs, sides = _gathered(setup, k, v, kv_side)
    for source in range(setup.num_devices):
        side = jax.tree.map(lambda x, s=source: x[s], sides)
        acc = setup.steps.forward(acc, q, q_side, ks[source], vs[source], side,
                                  lambda r, s=source: setup.pieces(s))
    return acc


def _all_gather_backward_pass(setup: Setup, q, k, v, q_side: Side, kv_side: Side, out, lse, cotangents):
    ks, vs, sides = _gathered(setup, k, v, kv_side)
    dq, dks, dvs = jnp.zeros(q.shape, jnp.float32), [], []
    for source in range(setup.num_devices):
        side = jax.tree.map(lambda x, s=source: x[s], sides)
        dq_s, dk_s, dv_s = setup.steps.backward(q, q_side, ks[source], vs[source], side,
                                                lambda r, s=source: setup.pieces(s), out, lse, cotangents)
        dq, dks, dvs = dq + dq_s, dks + [dk_s], dvs + [dv_s]
    dk = jax.lax.psum_scatter(jnp.stack(dks), setup.axis, scatter_dimension=0)
    dv = jax.lax.psum_scatter(jnp.stack(dvs), setup.axis, scatter_dimension=0)
    return dq, dk, dv


_PASSES = {"ring": (_ring_forward_pass, _ring_backward_pass),
           "ring_bidirectional": (_ring_forward_pass, _ring_backward_pass),
           "all_gather": (_all_gather_forward_pass, _all_gather_backward_pass)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged_attention(setup: Setup, q, k, v, q_side: Side, kv_side: Side):
    out, lse = _PASSES[setup.strategy][0](setup, q, k, v, q_side, kv_side)
    return out.astype(q.dtype), lse


def _merged_attention_fwd(setup, q, k, v, q_side, kv_side):
    out, lse = _merged_attention(setup, q, k, v, q_side, kv_side)
    return (out, lse), (q, k, v, q_side, kv_side, out, lse)


def _merged_attention_bwd(setup, residuals, cotangents):
    q, k, v, q_side, kv_side, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _PASSES[setup.strategy][1](setup, q, k, v, q_side, kv_side, out, lse, (dout, dlse))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), _no_cotangent(q_side), _no_cotangent(kv_side)


def _no_cotangent(side: Side) -> Side:
    return Side(None, None)


_merged_attention.defvjp(_merged_attention_fwd, _merged_attention_bwd)


def mask_positions(mask: masks.Mask, layout: str, num_devices: int, batch: int, seq_len: int,
                   segment_ids: jax.Array | None) -> jax.Array:
    """int32 [B, T] in the layout's order: each token's position as the mask sees it — its natural index, or with
    segment ids and a mask that is not relative its index within its document (as `attention_mask` evaluates it)."""
    natural = jnp.arange(seq_len, dtype=jnp.int32)[None]
    if segment_ids is not None and not mask.relative:
        in_order = layout_lib.from_layout(segment_ids, layout, num_devices)
        return layout_lib.to_layout(natural - run_starts(in_order), layout, num_devices)
    return jnp.broadcast_to(layout_lib.to_layout(natural, layout, num_devices), (batch, seq_len))


def choose_steps(impl: str, mask: masks.Mask, scale: float, setup_args: dict, platform: str,
                 has_segment_ids: bool) -> DenseSteps | KernelSteps:
    """The step implementation for ring / all-gather: the Pallas kernels for impl "pallas" / "pallas_interpret",
    pure jnp for "reference" / "xla"; "auto" takes the kernels on a GPU or TPU when they can serve the mask."""
    if impl == "cudnn":
        raise NotImplementedError("context parallelism by ring or all-gather merges partial results by their lse, "
                                  "which impl='cudnn' does not return; use impl='pallas', or strategy='ulysses'")
    kernel = KernelSteps(mask, scale, "pallas_interpret" if impl == "pallas_interpret" else "pallas", **setup_args)
    if impl in ("reference", "xla"):
        return DenseSteps(mask, scale)
    reason = _kernel_reason(kernel, has_segment_ids)
    if impl in ("pallas", "pallas_interpret"):
        if reason:
            raise NotImplementedError(f"context-parallel attention with impl={impl!r}: {reason}")
        return kernel
    if platform in ("gpu", "tpu") and not reason:
        return kernel
    choice = DenseSteps(mask, scale)
    logger.info("context-parallel attention impl=auto runs its steps in jnp: %s",
                reason or f"the Pallas kernels need a GPU or TPU (backend is {platform})")
    return choice


def _kernel_reason(kernel: KernelSteps, has_segment_ids: bool) -> str | None:
    if has_segment_ids and not kernel.mask.relative:
        return (f"the Pallas kernels apply {kernel.mask!r} on row positions, but with segment ids it is evaluated on "
                f"positions within each document")
    half = kernel.shard_len // 2
    try:
        for rank in range(kernel.num_devices):
            for source in range(kernel.num_devices):
                shard = kernel.q_pieces(source)
                for keys in (shard, layout_lib.split(shard, 0, half), layout_lib.split(shard, half, 2 * half)):
                    plan_calls(kernel.mask, kernel.q_pieces(rank), keys)
    except NotImplementedError as e:
        return str(e)
    return None


def _check_strategy(strategy: str, mask: masks.Mask, normalizer, alibi_slopes, num_kv_heads_local: int,
                    num_devices: int, shard_len: int) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"context-parallel strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if mask.per_head:
        raise NotImplementedError(f"context-parallel attention takes masks shared by every head; {mask!r} differs per "
                                  f"head (its steps and Ulysses' head shards do not know their global head index): "
                                  f"run it without a sequence axis")
    if strategy == "ulysses":
        if num_kv_heads_local % num_devices:
            raise NotImplementedError(
                f"strategy='ulysses' splits the kv heads over the sequence axis: it needs the kv heads per device "
                f"({num_kv_heads_local}) divisible by the sequence axis size ({num_devices}); use strategy='ring'")
        return
    if not isinstance(normalizer, normalizers.Softmax):
        raise NotImplementedError(f"strategy={strategy!r} merges softmax partials by log-sum-exp; normalizer="
                                  f"{normalizer.name!r} has none: use strategy='ulysses'")
    if alibi_slopes is not None:
        raise NotImplementedError(f"strategy={strategy!r} does not add ALiBi biases: use strategy='ulysses'")
    if strategy == "ring_bidirectional" and shard_len % 2:
        raise ValueError(f"strategy='ring_bidirectional' sends half of each shard each way: it needs an even shard "
                         f"length, got {shard_len}")


def _placed(x: jax.Array | None, spec: P, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> jax.Array | None:
    """x resharded along the Explicit axes of `spec` (a no-op where it already is), so that shard_map's in_specs
    match it. shard_map reshards Auto axes itself but refuses an Explicit-axis input sharded otherwise, and jax 0.11's
    `jax.make_mesh` makes Explicit axes by default."""
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if x is None or not explicit:
        return x

    def kept(entry):
        names = tuple(name for name in ((entry,) if isinstance(entry, str) else entry or ()) if name in explicit)
        return names if len(names) > 1 else (names[0] if names else None)

    spec = P(*map(kept, spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, strategy: str, layout: str = "contiguous",
              mask: masks.Mask = masks.Causal(), segment_ids: jax.Array | None = None,
              normalizer: str | normalizers.Normalizer = "softmax", impl: str = "auto", scale: float | None = None,
              alibi_slopes: jax.Array | None = None, return_lse: bool = False, axis: str = "sequence",
              mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None):
    """Self-attention of a sequence sharded along mesh axis `axis`, by `strategy` (one of STRATEGIES).

    q [B, T, Hq, D], k and v [B, T, Hkv, D] and segment_ids [B, T] are global arrays whose tokens are in `layout`'s
    order (`layout.to_layout`); batch is sharded over the mesh's data/fsdp axes, heads over its tensor axis where
    the mesh has them. `mesh` defaults to the one set by `jax.set_mesh`; its axes may be Auto or Explicit (as
    `jax.make_mesh` makes them by default): inputs not yet sharded so are resharded. The arguments and the result are
    those of `longctx.attention.attention` (q_offset 0, S = T), in the layout's order.
    """
    if impl not in dispatch.impl_names():
        raise ValueError(f"impl must be one of {', '.join(dispatch.impl_names())}, got {impl!r}")
    segment_ids, _, _, normalizer = check_arguments(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=None, normalizer=normalizer, q_offset=0,
        scale=scale, alibi_slopes=alibi_slopes, return_lse=return_lse)
    (B, T, _, D), S = q.shape, k.shape[1]
    if S != T:
        raise ValueError(f"context-parallel attention is self-attention: k must have T={T} tokens, got {S}")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"context-parallel attention needs a mesh with a {axis!r} axis (jax.set_mesh or mesh=), "
                         f"got axes {tuple(mesh.axis_names) if not mesh.empty else ()}")
    N = mesh.shape[axis]
    layout_lib.check(layout, T, N)
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
    head_shards = mesh.shape[head_axis] if head_axis else 1
    _check_strategy(strategy, mask, normalizer, alibi_slopes, k.shape[2] // head_shards, N, T // N)
    x_spec, lse_spec, ids_spec = P(batch_axes, axis, head_axis, None), P(batch_axes, axis, head_axis), \
        P(batch_axes, axis)
    out_specs = (x_spec, lse_spec) if return_lse else x_spec

    if strategy == "ulysses":
        local = functools.partial(_ulysses, layout=layout, axis=axis, num_devices=N, mask=mask, normalizer=normalizer,
                                  impl=impl, scale=scale, return_lse=return_lse)
        slopes_spec = P(head_axis)
        return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, ids_spec, slopes_spec),
                             out_specs=out_specs, check_vma=False)(
            *(_placed(x, spec, mesh) for x, spec in ((q, x_spec), (k, x_spec), (v, x_spec), (segment_ids, ids_spec),
                                                     (alibi_slopes, slopes_spec))))

    scale = D ** -0.5 if scale is None else scale
    platform, _ = dispatch.platform_of(q)
    steps = choose_steps(impl, mask, scale, dict(axis=axis, layout=layout, num_devices=N, shard_len=T // N),
                         platform, segment_ids is not None)
    positions = mask_positions(mask, layout, N, B, T, segment_ids) if steps.needs_positions else None
    setup = Setup(strategy, layout, axis, N, T // N, steps)

    def local(q, k, v, side):
        out, lse = _merged_attention(setup, q, k, v, side, side)
        return (out, lse) if return_lse else out

    side = Side(_placed(segment_ids, ids_spec, mesh), _placed(positions, ids_spec, mesh))
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, ids_spec), out_specs=out_specs,
                         check_vma=False)(*(_placed(x, x_spec, mesh) for x in (q, k, v)), side)


def _ulysses(q, k, v, segment_ids, alibi_slopes, *, layout, axis, num_devices, mask, normalizer, impl, scale,
             return_lse):
    """Inside shard_map: all-to-all to whole sequences of H / N heads, attention, all-to-all back."""
    def to_heads(x):  # [B, C, H, D] → [B, T, H / N, D], tokens back in natural order
        x = jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
        return layout_lib.from_layout(x, layout, num_devices)

    def to_sequence(x):  # inverse of to_heads, for [B, T, H / N, ...]
        x = layout_lib.to_layout(x, layout, num_devices)
        return jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)

    if segment_ids is not None:
        segment_ids = layout_lib.from_layout(jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True), layout,
                                             num_devices)
    if alibi_slopes is not None:
        heads = alibi_slopes.shape[0] // num_devices
        alibi_slopes = jax.lax.dynamic_slice_in_dim(alibi_slopes, jax.lax.axis_index(axis) * heads, heads)
    result = dispatch.attention(to_heads(q), to_heads(k), to_heads(v), mask=mask, segment_ids=segment_ids,
                                normalizer=normalizer, impl=impl, scale=scale, alibi_slopes=alibi_slopes,
                                return_lse=return_lse)
    if return_lse:
        out, lse = result
        return to_sequence(out), to_sequence(lse[..., None])[..., 0]
    return to_sequence(result)
