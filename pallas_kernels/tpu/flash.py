"""The Pallas Mosaic TPU backend: block-sparse flash attention forward, dQ and dK/dV kernels.

FlashAttention-2 (Dao, 2023, arXiv 2307.08691) laid out as splash attention lays it out on TPU
(jax.experimental.pallas.ops.tpu.splash_attention): the layout's block lists are scalar-prefetched into SMEM, the
last grid axis walks one list, and the K/V (or Q) index maps read from it the block to fetch, so the pipeline DMAs
listed blocks only. A list holds the full and partial blocks of a row (or column) in block order with a per-slot
flag: full blocks run without the mask, partial ones evaluate it in-kernel, each in its own static branch. Grid steps
past the end of a list keep the last listed block, so the pipeline fetches nothing for them and they compute nothing.

With segment ids, each list is narrowed to the run of blocks whose segment ranges can meet
(`segments.list_ranges`), so blocks outside it are neither fetched nor computed; inside the run a block that still
cannot meet is not computed, one inside a single segment runs without the segment mask, and the others are masked
by segment.

    forward, dQ: grid (B, Hq, query blocks, steps), running sums in VMEM scratch across the steps of one row
    dK/dV:       grid (B, Hkv, key blocks, G, steps), summing the G query heads of a kv head in VMEM scratch

Arrays are moved to [B, H, L, D] outside the kernels so blocks are (rows, D). Per-query values (lse, delta, segment
ids, softplus statistics) travel lane-replicated as [.., L, 128] as splash's do; per-key values as rows
[.., L // block, 1, block], whose blocks span the array's last two dims for any block size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import block_math
from pallas_kernels.flash import normalizers, segments
from pallas_kernels.flash.attention import BlockSizes, Problem

HEAD_DIMS = (64, 128, 256)
LANES = 128
# Scalar-prefetch operands, in this order (the segment ones only with segment ids).
PREFETCH = ("blocks", "partial", "count", "start", "end", "q_min", "q_max", "kv_min", "kv_max")


def default_block_sizes(problem: Problem) -> BlockSizes:
    return BlockSizes(*(128,) * 6)


def unsupported_reason(problem: Problem) -> str | None:
    if problem.head_dim not in HEAD_DIMS:
        return f"the tpu kernels take head dims {HEAD_DIMS}, got {problem.head_dim}"
    for name, value in vars(problem.block_sizes).items():
        if value % 8:
            return f"tpu block sizes must be multiples of 8 (the sublane tile), got {name}={value}"
    if problem.dtype == "float16" and not problem.interpret:
        return ("float16 is not compiled for TPU (no float16 matrix unit; the kernels compile for bfloat16 and "
                "float32): cast to bfloat16, or run with interpret=True")
    return block_math.check_normalizer(problem.normalizer)


def _softplus(problem: Problem) -> bool:
    return isinstance(problem.normalizer, normalizers.Softplus)


def _visits(layout, prefix: str):
    """The layout's full and partial lists of one direction ("row" or "col") merged in block order, as scalar-prefetch
    arrays: blocks and partial int32 [Hm, M, steps] (block index; 1 on partial slots) and count int32 [Hm, M]; and
    the kinds that occur (False: full, True: partial). Unused slots take the last listed block before them (the first
    of the head where none is), so consecutive grid steps keep the same block and the pipeline skips the copy."""
    full, num_full = getattr(layout, f"{prefix}_full"), getattr(layout, f"{prefix}_full_count")
    part, num_part = getattr(layout, f"{prefix}_partial"), getattr(layout, f"{prefix}_partial_count")
    merged = np.concatenate([full, part], axis=-1)
    valid = np.concatenate([np.arange(full.shape[-1]) < num_full[..., None],
                            np.arange(part.shape[-1]) < num_part[..., None]], axis=-1)
    count = valid.sum(-1).astype(np.int32)
    steps = max(1, int(count.max(initial=0)))
    order = np.argsort(np.where(valid, merged, np.iinfo(np.int32).max), axis=-1, kind="stable")[..., :steps]
    blocks = np.take_along_axis(merged, order, axis=-1)
    valid = np.take_along_axis(valid, order, axis=-1)
    partial = (valid & (order >= full.shape[-1])).astype(np.int32)
    kinds = tuple(kind for kind in (False, True) if np.any(valid & (partial == kind)))
    flat = valid.reshape(len(count), -1)
    last = np.maximum.accumulate(np.where(flat, np.arange(flat.shape[1]), -1), axis=1)
    last = np.where(last < 0, np.argmax(flat, axis=1)[:, None], last)
    blocks = np.take_along_axis(blocks.reshape(len(count), -1), last, axis=1).reshape(valid.shape)
    return {"blocks": blocks.astype(np.int32), "partial": partial, "count": count}, kinds


def _slot(problem: Problem, refs, b, mask_head, index, step):
    """The slot of list (mask_head, index) that grid step `step` reads. With segment ids the walk covers the slots
    [start, end) and then stays on the last of them."""
    if not problem.has_segments:
        return step
    start, end = refs["start"][b, mask_head, index], refs["end"][b, mask_head, index]
    return jnp.minimum(jnp.minimum(start + step, jnp.maximum(end - 1, start)), refs["blocks"].shape[-1] - 1)


def _computes(problem: Problem, refs, b, mask_head, index, step):
    """Whether grid step `step` reads a slot in use (in the run segment ids leave)."""
    if not problem.has_segments:
        return step < refs["count"][mask_head, index]
    return refs["start"][b, mask_head, index] + step < refs["end"][b, mask_head, index]


def _lanes(x):
    """[..., L] → [..., L, 128]: a per-query value replicated across the lanes."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _key_rows(x, block: int):
    """[..., S] → [..., S // block, 1, block]: a per-key value as one row per key block."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, 1, block)


def _heads_major(x):
    return jnp.swapaxes(x, 1, 2)


def _dot(problem: Problem, a, b, contract=(1, 0)):
    """a·b in float32, contracting dim contract[0] of a with contract[1] of b: (1, 0) a@b, (1, 1) a@bᵀ, (0, 0)
    aᵀ@b."""
    precision = jax.lax.Precision.HIGHEST if problem.dtype == "float32" else None
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _when_visited(problem: Problem, refs, kinds, b, mask_head, index, step, slot, q_block, kv_block, body):
    """Runs body(partial, segmented) for a grid step that reads a slot in use, each case in its own static branch:
    partial as the slot's flag says; with segment ids only if the blocks' segment ranges meet, and segmented unless
    both lie in one and the same segment."""
    if not kinds:  # the mask leaves nothing to compute
        return
    run = _computes(problem, refs, b, mask_head, index, step)
    cases = [(run, False)]
    if problem.has_segments:
        q_lo, q_hi = refs["q_min"][b, q_block], refs["q_max"][b, q_block]
        kv_lo, kv_hi = refs["kv_min"][b, kv_block], refs["kv_max"][b, kv_block]
        run &= block_math.segments_meet(q_lo, q_hi, kv_lo, kv_hi)
        one_segment = (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
        cases = [(run & one_segment, False), (run & jnp.logical_not(one_segment), True)]
    if len(kinds) > 1:
        is_partial = refs["partial"][mask_head, index, slot] == 1
        cases = [(condition & (is_partial if kind else jnp.logical_not(is_partial)), kind, segmented)
                 for condition, segmented in cases for kind in kinds]
    else:
        cases = [(condition, kinds[0], segmented) for condition, segmented in cases]
    for condition, partial, segmented in cases:
        pl.when(condition)(functools.partial(body, partial, segmented))


def _allowed(problem: Problem, refs, q_block, kv_block, head, partial: bool, segmented: bool, block_q: int,
             block_kv: int):
    """bool [block_q, block_kv] of the mask (partial blocks) and segment ids (segmented), or None when all is
    allowed."""
    ids = {"q_segment_ids": refs["q_seg"][:, :1], "kv_segment_ids": refs["kv_seg"][...]} if segmented else {}
    return block_math.block_allowed(problem.mask, problem.q_offset + q_block * block_q, kv_block * block_kv, block_q,
                                    block_kv, head, partial=partial, iota_2d=True, **ids)


def _count_kernel(refs, *, problem: Problem, kinds, block_q: int, block_kv: int):
    """Softplus with segment ids: num_keys [block_q, 128] of one query block, the keys each query may see."""
    b, mask_head, index, step = (pl.program_id(n) for n in range(4))
    slot = _slot(problem, refs, b, mask_head, index, step)
    kv_block = refs["blocks"][mask_head, index, slot]

    @pl.when(step == 0)
    def _init():
        refs["num_keys"][...] = jnp.zeros_like(refs["num_keys"])

    def body(partial, segmented):
        allowed = _allowed(problem, refs, index, kv_block, mask_head, partial, segmented, block_q, block_kv)
        if allowed is None:
            refs["num_keys"][...] += float(block_kv)
        else:
            refs["num_keys"][...] += jnp.sum(allowed.astype(jnp.float32), axis=-1, keepdims=True)

    _when_visited(problem, refs, kinds, b, mask_head, index, step, slot, index, kv_block, body)


def _forward_kernel(refs, *, problem: Problem, kinds, block_q: int, block_kv: int):
    """One (batch, query head, query block) per row of the grid; scratch m, l [block_q, 128] and acc [block_q, D]
    live across its steps. Softplus: scores factor_i · (q_i·k_j) · col_scale_j from the row factor [block_q, 128]
    (computed outside from N_i) and col_scale [1, block_kv]; l is then the row sum."""
    b, head, index, step = (pl.program_id(n) for n in range(4))
    mask_head = head if problem.forward_layout.num_mask_heads > 1 else 0
    slot = _slot(problem, refs, b, mask_head, index, step)
    kv_block = refs["blocks"][mask_head, index, slot]
    softplus = _softplus(problem)

    @pl.when(step == 0)
    def _init():
        refs["acc"][...] = jnp.zeros_like(refs["acc"])
        refs["l"][...] = jnp.zeros_like(refs["l"])
        refs["m"][...] = jnp.full_like(refs["m"], -jnp.inf)

    def body(partial, segmented):
        v = refs["v"][...]
        allowed = _allowed(problem, refs, index, kv_block, head, partial, segmented, block_q, block_kv)
        qk = _dot(problem, refs["q"][...], refs["k"][...], (1, 1))
        l_prev = refs["l"][:, :1]
        if softplus:
            weights = block_math.softplus(refs["factor"][:, :1] * qk * refs["col_scale"][...])
            if allowed is not None:
                weights = jnp.where(allowed, weights, 0.0)
            refs["l"][...] = jnp.broadcast_to(l_prev + jnp.sum(weights, axis=-1, keepdims=True), refs["l"].shape)
            refs["acc"][...] += _dot(problem, weights.astype(v.dtype), v)
            return
        scores = qk * (problem.scale * block_math.LOG2_E)
        if allowed is not None:
            scores = jnp.where(allowed, scores, -jnp.inf)
        m_prev = refs["m"][:, :1]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that saw nothing stays at m = -inf, l = 0
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(scores - m_safe)
        refs["m"][...] = jnp.broadcast_to(m_next, refs["m"].shape)
        refs["l"][...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True), refs["l"].shape)
        refs["acc"][...] = alpha * refs["acc"][...] + _dot(problem, p.astype(v.dtype), v)

    _when_visited(problem, refs, kinds, b, mask_head, index, step, slot, index, kv_block, body)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        total = refs["l"][...]
        out = refs["acc"][...] / jnp.where(total[:, :1] > 0, total[:, :1], 1.0)
        refs["out"][...] = out.astype(refs["out"].dtype)
        if softplus:
            refs["row_sum"][...] = total
        else:
            refs["lse"][...] = block_math.softmax_lse(refs["m"][...], total)


def _specs(problem: Problem, block_q: int, block_kv: int, grid_rank: int, query, key):
    """BlockSpecs by kind of operand. query(*grid index, prefetch refs by name) → (b, query head, query block) and
    key(...) → (b, kv head, key block) pick the blocks, one of them from the prefetched list."""
    D = problem.head_dim

    def spec(shape, index, zeros):
        def index_map(*args):
            return (*index(*args[:grid_rank], dict(zip(PREFETCH, args[grid_rank:]))), *(0,) * zeros)
        return pl.BlockSpec(shape, index_map)

    return {
        "q": spec((None, None, block_q, D), query, 1),
        "column": spec((None, None, block_q, LANES), query, 1),
        "q_seg": spec((None, block_q, LANES), lambda *args: query(*args)[::2], 1),
        "kv": spec((None, None, block_kv, D), key, 1),
        "kv_seg": spec((None, None, 1, block_kv), lambda *args: key(*args)[::2], 2),
        "col_scale": spec((None, None, None, 1, block_kv), key, 2),
    }


def _row_major_specs(problem: Problem, layout):
    """On grid (b, h, query block i, step s): the key block comes from the row list of i."""
    G, per_head = problem.group, layout.num_mask_heads > 1

    def query(b, h, i, s, refs):
        return b, h, i

    def key(b, h, i, s, refs):
        mask_head = h if per_head else 0
        return b, h // G, refs["blocks"][mask_head, i, _slot(problem, refs, b, mask_head, i, s)]

    return _specs(problem, layout.block_q, layout.block_kv, 4, query, key)


def _column_major_specs(problem: Problem, layout):
    """On grid (b, kv head h, key block j, group member g, step s): query head h·G + g, its query block from the
    column list of j."""
    G, per_head = problem.group, layout.num_mask_heads > 1

    def query(b, h, j, g, s, refs):
        mask_head = h * G + g if per_head else 0
        return b, h * G + g, refs["blocks"][mask_head, j, _slot(problem, refs, b, mask_head, j, s)]

    def key(b, h, j, g, s, refs):
        return b, h, j

    return _specs(problem, layout.block_q, layout.block_kv, 5, query, key)


def _call(kernel, problem: Problem, name, layout, direction: str, grid, specs, segment_ids, inputs, outputs,
          scratch):
    """pallas_call of kernel(refs) on grid + (steps,), walking the layout's `direction` lists ("row" or "col").
    inputs and outputs map names to (array or shape, BlockSpec), scratch names to VMEM shapes; segment_ids is
    (q ids [B, T], kv ids [B, S]) or None. The kernel gets one dict of refs by name."""
    lists, kinds = _visits(layout, direction)
    prefetch = {name: jnp.asarray(array) for name, array in lists.items()}
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        ranges = segments.list_ranges(layout, direction, q_ids, kv_ids)
        for edge in ("start", "end"):  # slots in the merged list: those of the full list plus the partial list
            prefetch[edge] = ranges[f"{direction}_full_{edge}"] + ranges[f"{direction}_partial_{edge}"]
        prefetch["q_min"], prefetch["q_max"] = segments.block_bounds(q_ids, layout.block_q)
        prefetch["kv_min"], prefetch["kv_max"] = segments.block_bounds(kv_ids, layout.block_kv)
        inputs = {**inputs, "q_seg": (_lanes(q_ids), specs["q_seg"]),
                  "kv_seg": (_key_rows(kv_ids, layout.block_kv), specs["kv_seg"])}
    assert tuple(prefetch) == PREFETCH[:len(prefetch)]
    names = [*prefetch, *inputs, *outputs, *scratch]
    body = functools.partial(kernel, problem=problem, kinds=kinds, block_q=layout.block_q, block_kv=layout.block_kv)

    def named(*refs):
        body(dict(zip(names, refs)))

    grid = (*grid, lists["blocks"].shape[-1])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=grid, in_specs=[spec for _, spec in inputs.values()],
        out_specs=[spec for _, spec in outputs.values()], scratch_shapes=list(scratch.values()))
    semantics = ("parallel", "parallel") + ("arbitrary",) * (len(grid) - 2)
    return pl.pallas_call(
        named, grid_spec=grid_spec, out_shape=[shape for shape, _ in outputs.values()],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics), name=name,
        interpret=pltpu.InterpretParams() if problem.interpret else False,
    )(*prefetch.values(), *(array for array, _ in inputs.values()))


def _num_keys(problem: Problem, segment_ids):
    """Softplus N_i, float32 [B, Hq, T]: from the layout without segment ids, else counted by a kernel."""
    B, T, Hq = problem.batch, problem.q_len, problem.num_q_heads
    layout = problem.forward_layout
    if segment_ids is None:
        return jnp.broadcast_to(jnp.asarray(layout.row_allowed, jnp.float32)[None], (B, Hq, T))
    specs = _row_major_specs(problem, layout)
    Hm = layout.num_mask_heads
    outputs = {"num_keys": (jax.ShapeDtypeStruct((B, Hm, T, LANES), jnp.float32), specs["column"])}
    (num_keys,) = _call(_count_kernel, problem, "flash_softplus_count", layout, "row", (B, Hm, T // layout.block_q),
                        specs, segment_ids, {}, outputs, {})
    return jnp.broadcast_to(num_keys[..., 0], (B, Hq, T))


def forward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D] → out [B, T, Hq, D] and stats (float32 [B, Hq, T] each)."""
    B, T, Hq, D = q.shape
    layout = problem.forward_layout
    block_q = layout.block_q
    segment_ids = (q_segment_ids, kv_segment_ids) if problem.has_segments else None
    specs = _row_major_specs(problem, layout)
    inputs = {"q": (_heads_major(q), specs["q"]), "k": (_heads_major(k), specs["kv"]),
              "v": (_heads_major(v), specs["kv"])}
    if _softplus(problem):
        num_keys = _num_keys(problem, segment_ids)
        factor = block_math.softplus_row_factor(num_keys, row_scale, D)
        inputs.update(factor=(_lanes(factor), specs["column"]),
                      col_scale=(_key_rows(col_scale, layout.block_kv), specs["col_scale"]))
    stat = jax.ShapeDtypeStruct((B, Hq, T, LANES), jnp.float32)
    outputs = {"out": (jax.ShapeDtypeStruct((B, Hq, T, D), q.dtype), specs["q"]),
               "row_sum" if _softplus(problem) else "lse": (stat, specs["column"])}
    scratch = {"m": pltpu.VMEM((block_q, LANES), jnp.float32), "l": pltpu.VMEM((block_q, LANES), jnp.float32),
               "acc": pltpu.VMEM((block_q, D), jnp.float32)}
    out, stat = _call(_forward_kernel, problem, "flash_forward", layout, "row", (B, Hq, T // block_q), specs,
                      segment_ids, inputs, outputs, scratch)
    stats = (num_keys, stat[..., 0]) if _softplus(problem) else (stat[..., 0],)
    return _heads_major(out), stats


def _row_statistics(problem: Problem, refs):
    """Per-query values of the block as [block_q, 1] columns."""
    delta = refs["delta"][:, :1]
    if _softplus(problem):
        row_sum = refs["row_sum"][:, :1]
        return {"factor": refs["factor"][:, :1], "row_sum_safe": jnp.where(row_sum > 0, row_sum, 1.0), "delta": delta}
    return {"lse2": block_math.backward_lse2(refs["lse"][:, :1]), "delta": delta}


def _probabilities(problem: Problem, qk, allowed, row, col_scale):
    """From q·kᵀ [bq, bk]: (weights, scores_grad) with scores_grad(dweights) → (dq·kᵀ, ds ∘ s or None)."""
    if _softplus(problem):
        scores = row["factor"] * qk * col_scale
        softplus, sigmoid = block_math.softplus_and_sigmoid(scores)
        weights = softplus / row["row_sum_safe"]
        if allowed is not None:
            weights = jnp.where(allowed, weights, 0.0)

        def scores_grad(dweights):
            ds = (dweights - row["delta"]) / row["row_sum_safe"] * sigmoid
            if allowed is not None:
                ds = jnp.where(allowed, ds, 0.0)
            return ds * row["factor"] * col_scale, ds * scores
        return weights, scores_grad
    scores = qk * (problem.scale * block_math.LOG2_E)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    p = jnp.exp2(scores - row["lse2"])
    return p, lambda dp: (p * (dp - row["delta"]) * problem.scale, None)


def _dq_kernel(refs, *, problem: Problem, kinds, block_q: int, block_kv: int):
    """One (batch, query head, query block) per grid row, dq summed in scratch [block_q, D]; softplus sums Σ_j ds·s
    straight into its output block drow [block_q, 128] (divided by row_scale outside)."""
    b, head, index, step = (pl.program_id(n) for n in range(4))
    mask_head = head if problem.dq_layout.num_mask_heads > 1 else 0
    slot = _slot(problem, refs, b, mask_head, index, step)
    kv_block = refs["blocks"][mask_head, index, slot]
    softplus = _softplus(problem)

    @pl.when(step == 0)
    def _init():
        for name in ("dq_acc", "drow") if softplus else ("dq_acc",):
            refs[name][...] = jnp.zeros_like(refs[name])

    def body(partial, segmented):
        k = refs["k"][...]
        allowed = _allowed(problem, refs, index, kv_block, head, partial, segmented, block_q, block_kv)
        qk = _dot(problem, refs["q"][...], k, (1, 1))
        _, scores_grad = _probabilities(problem, qk, allowed, _row_statistics(problem, refs),
                                        refs["col_scale"][...] if softplus else None)
        dqk, ds_times_s = scores_grad(_dot(problem, refs["dout"][...], refs["v"][...], (1, 1)))
        refs["dq_acc"][...] += _dot(problem, dqk.astype(k.dtype), k)
        if softplus:
            refs["drow"][...] += jnp.sum(ds_times_s, axis=-1, keepdims=True)

    _when_visited(problem, refs, kinds, b, mask_head, index, step, slot, index, kv_block, body)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finish():
        refs["dq"][...] = refs["dq_acc"][...].astype(refs["dq"].dtype)


def _dkdv_kernel(refs, *, problem: Problem, kinds, block_q: int, block_kv: int):
    """One (batch, kv head, key block) per grid row, over the G query heads and the query blocks of the key block's
    column, dk and dv summed in scratch [block_kv, D]; softplus sums Σ_i ds·s straight into its output block dcol
    [1, block_kv] (divided by col_scale outside)."""
    b, kv_head, index, g, step = (pl.program_id(n) for n in range(5))
    head = kv_head * problem.group + g
    mask_head = head if problem.dkdv_layout.num_mask_heads > 1 else 0
    slot = _slot(problem, refs, b, mask_head, index, step)
    q_block = refs["blocks"][mask_head, index, slot]
    softplus = _softplus(problem)

    @pl.when((g == 0) & (step == 0))
    def _init():
        for name in ("dk_acc", "dv_acc", "dcol") if softplus else ("dk_acc", "dv_acc"):
            refs[name][...] = jnp.zeros_like(refs[name])

    def body(partial, segmented):
        q, dout = refs["q"][...], refs["dout"][...]
        allowed = _allowed(problem, refs, q_block, index, head, partial, segmented, block_q, block_kv)
        qk = _dot(problem, q, refs["k"][...], (1, 1))
        weights, scores_grad = _probabilities(problem, qk, allowed, _row_statistics(problem, refs),
                                              refs["col_scale"][...] if softplus else None)
        refs["dv_acc"][...] += _dot(problem, weights.astype(dout.dtype), dout, (0, 0))
        dqk, ds_times_s = scores_grad(_dot(problem, dout, refs["v"][...], (1, 1)))
        refs["dk_acc"][...] += _dot(problem, dqk.astype(q.dtype), q, (0, 0))
        if softplus:
            refs["dcol"][...] += jnp.sum(ds_times_s, axis=0, keepdims=True)

    _when_visited(problem, refs, kinds, b, mask_head, index, step, slot, q_block, index, body)

    @pl.when((g == problem.group - 1) & (step == pl.num_programs(4) - 1))
    def _finish():
        refs["dk"][...] = refs["dk_acc"][...].astype(refs["dk"].dtype)
        refs["dv"][...] = refs["dv_acc"][...].astype(refs["dv"].dtype)


def backward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, stats, delta, dout):
    """→ (dq [B, T, Hq, D] in q.dtype, dk, dv [B, S, Hkv, D] in k.dtype, drow [B, Hq, T] and dcol [B, Hkv, S]
    float32 for softplus, else None)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    softplus = _softplus(problem)
    segment_ids = (q_segment_ids, kv_segment_ids) if problem.has_segments else None
    q, k, v, dout = (_heads_major(x) for x in (q, k, v, dout))
    if softplus:
        columns = {"factor": block_math.softplus_row_factor(stats[0], row_scale, D), "row_sum": stats[1]}
    else:
        columns = {"lse": stats[0]}
    columns["delta"] = delta

    def inputs(specs, block_kv):
        arrays = {"q": (q, specs["q"]), "k": (k, specs["kv"]), "v": (v, specs["kv"]), "dout": (dout, specs["q"]),
                  **{name: (_lanes(x), specs["column"]) for name, x in columns.items()}}
        if softplus:
            arrays["col_scale"] = (_key_rows(col_scale, block_kv), specs["col_scale"])
        return arrays

    # dQ: row-major over the query blocks.
    layout = problem.dq_layout
    specs = _row_major_specs(problem, layout)
    outputs = {"dq": (jax.ShapeDtypeStruct((B, Hq, T, D), q.dtype), specs["q"])}
    if softplus:
        outputs["drow"] = (jax.ShapeDtypeStruct((B, Hq, T, LANES), jnp.float32), specs["column"])
    dq, *drow = _call(_dq_kernel, problem, "flash_backward_dq", layout, "row", (B, Hq, T // layout.block_q), specs,
                      segment_ids, inputs(specs, layout.block_kv), outputs,
                      {"dq_acc": pltpu.VMEM((layout.block_q, D), jnp.float32)})

    # dK, dV: column-major over the key blocks, summing the G query heads of each kv head.
    layout = problem.dkdv_layout
    block_kv = layout.block_kv
    specs = _column_major_specs(problem, layout)
    outputs = {"dk": (jax.ShapeDtypeStruct(k.shape, k.dtype), specs["kv"]),
               "dv": (jax.ShapeDtypeStruct(v.shape, v.dtype), specs["kv"])}
    if softplus:
        outputs["dcol"] = (jax.ShapeDtypeStruct((B, Hkv, S // block_kv, 1, block_kv), jnp.float32),
                           specs["col_scale"])
    scratch = {"dk_acc": pltpu.VMEM((block_kv, D), jnp.float32), "dv_acc": pltpu.VMEM((block_kv, D), jnp.float32)}
    dk, dv, *dcol = _call(_dkdv_kernel, problem, "flash_backward_dkdv", layout, "col",
                          (B, Hkv, S // block_kv, problem.group), specs, segment_ids, inputs(specs, block_kv),
                          outputs, scratch)
    dq, dk, dv = (_heads_major(x) for x in (dq, dk, dv))
    if not softplus:
        return dq, dk, dv, None, None
    return dq, dk, dv, drow[0][..., 0] / row_scale, dcol[0].reshape(B, Hkv, S) / col_scale
