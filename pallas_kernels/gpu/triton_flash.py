"""The Pallas Triton backend: block-sparse flash attention forward, dQ and dK/dV kernels for any CUDA GPU.

Forward and dQ: one program per (query block, batch, query head), looping over the key blocks its layout row lists —
full blocks first (no mask), then partial ones (mask evaluated in-kernel). dK/dV: one program per (key block, batch,
kv head), looping over the query heads of its group and, for each, the query blocks of its layout column, so K/V are
never repeated for grouped-query attention. With segment ids every visited block is masked by segment and skipped
before any load when its query and key segment ranges cannot meet.

The layout follows jax.experimental.pallas.ops.gpu.attention (FlashAttention-2 in Pallas Triton); the block lists
are ours.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import block_math
from pallas_kernels.flash import normalizers, segments
from pallas_kernels.flash.attention import BlockSizes, Problem

HEAD_DIMS = (16, 32, 64, 128, 256)


def default_block_sizes(problem: Problem) -> BlockSizes:
    """128 x 64 forward tiles and 64 x 64 backward tiles; 32 x 32 everywhere for float32 at head dim 256, whose 64-row
    tiles need more shared memory than an H100 has (measured: 272 KiB asked, 227 KiB available)."""
    if problem.head_dim > 128 and problem.dtype == "float32":
        return BlockSizes(*(32,) * 6)
    big = 64 if problem.head_dim > 128 or problem.dtype == "float32" else 128
    return BlockSizes(block_q=big, block_kv=64, block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64)


def unsupported_reason(problem: Problem) -> str | None:
    if problem.head_dim not in HEAD_DIMS:
        return f"the triton kernels take head dims {HEAD_DIMS}, got {problem.head_dim}"
    for name, value in vars(problem.block_sizes).items():
        if value < 16 or value & (value - 1):
            return f"block sizes must be powers of two >= 16, got {name}={value}"
    return None


def _whole(array):
    """A BlockSpec that hands the kernel the whole array (read by scalar index)."""
    return pl.BlockSpec(array.shape, lambda *_: (0,) * array.ndim)


def _batch_row(array):
    """A BlockSpec that hands the kernel row b of a [B, N] array on a grid (block, b, head)."""
    return pl.BlockSpec((None, array.shape[1]), lambda i, b, h: (b, 0))


def _compiler_params(problem: Problem, block_a: int, block_b: int):
    num_warps = 4 if block_a * block_b <= 64 * 64 else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _dot(problem: Problem, a, b, *, trans_a=False, trans_b=False):
    precision = jax.lax.Precision.HIGHEST if problem.dtype == "float32" else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _named_call(kernel, names):
    def call(*refs):
        kernel(dict(zip(names, refs)))
    return call


def _layout_inputs(layout, prefix: str):
    return {f"{prefix}_{part}": jnp.asarray(getattr(layout, f"{prefix}_{part}"))
            for part in ("full", "full_count", "partial", "partial_count")}


def _visit_lists(refs, layout, prefix: str, batch, mask_head, index, body, carry):
    """Runs body(block, partial, carry) over the full then the partial blocks listed for (mask_head, index) — with
    segment ids only over the slots `segments.list_ranges` leaves. A kind the layout never uses is left out of the
    kernel altogether."""
    for kind, partial in (("full", False), ("partial", True)):
        if not getattr(layout, f"{prefix}_{kind}_count").any():
            continue
        blocks = refs[f"{prefix}_{kind}"]
        if f"{prefix}_{kind}_start" in refs:
            start = refs[f"{prefix}_{kind}_start"][batch, mask_head, index]
            end = refs[f"{prefix}_{kind}_end"][batch, mask_head, index]
        else:
            start, end = 0, refs[f"{prefix}_{kind}_count"][mask_head, index]
        carry = jax.lax.fori_loop(
            start, end, lambda n, c, blocks=blocks, partial=partial: body(blocks[mask_head, index, n], partial, c),
            carry)
    return carry


def _by_segments(problem: Problem, q_bounds, kv_bounds, compute, carry):
    """compute(carry, segmented) for a visited block: skipped when segment ids say its queries and keys cannot meet,
    run without the segment mask when both lie in one and the same segment, else with it."""
    if not problem.has_segments:
        return compute(carry, False)
    meet = block_math.segments_meet(*q_bounds, *kv_bounds)
    one_segment = (q_bounds[0] == q_bounds[1]) & (kv_bounds[0] == kv_bounds[1]) & (q_bounds[0] == kv_bounds[0])
    return jax.lax.cond(
        meet, lambda c: jax.lax.cond(one_segment, lambda c: compute(c, False), lambda c: compute(c, True), c),
        lambda c: c, carry)


def _kv_bounds(refs, problem: Problem, kv_block):
    return (refs["kv_seg_min"][kv_block], refs["kv_seg_max"][kv_block]) if problem.has_segments else None


def _row_block_allowed(refs, problem: Problem, q_start, q_seg, kv_block, block_q: int, block_kv: int, head, *,
                       partial: bool, segmented: bool):
    """What the query block at q_start may see of key block kv_block (None when everything): the mask on partial
    blocks, the segment ids when `segmented`."""
    kv_seg = refs["kv_seg"][pl.ds(kv_block * block_kv, block_kv)] if segmented else None
    return block_math.block_allowed(problem.mask, q_start, kv_block * block_kv, block_q, block_kv, head,
                                    partial=partial, q_segment_ids=q_seg if segmented else None,
                                    kv_segment_ids=kv_seg)


def _softplus_block(qk, row_factor, col_scale, allowed):
    """softplus(f_i · (q_i·k_j) · u_j) of a block, 0 where not allowed."""
    weights = block_math.softplus(row_factor[:, None] * qk * col_scale[None, :])
    return weights if allowed is None else jnp.where(allowed, weights, 0.0)


def _softplus_num_keys(refs, problem: Problem, block_q, block_kv, batch, mask_head, index, head, q_start, q_seg,
                       q_bounds):
    """N_i of each query row in the block: from the layout without segment ids, else counted block by block."""
    if not problem.has_segments:
        return refs["row_allowed"][...].astype(jnp.float32)

    def count(kv_block, partial, total):
        def compute(total, segmented):
            allowed = _row_block_allowed(refs, problem, q_start, q_seg, kv_block, block_q, block_kv, head,
                                         partial=partial, segmented=segmented)
            if allowed is None:
                return total + block_kv
            return total + jnp.sum(allowed.astype(jnp.float32), axis=-1)
        return _by_segments(problem, q_bounds, _kv_bounds(refs, problem, kv_block), compute, total)

    return _visit_lists(refs, problem.forward_layout, "row", batch, mask_head, index, count,
                        jnp.zeros((block_q,), jnp.float32))


def _forward_kernel(refs, *, problem: Problem, block_q: int, block_kv: int):
    index, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mask_head = head if problem.forward_layout.num_mask_heads > 1 else 0
    q = refs["q"][...]
    q_start = problem.q_offset + index * block_q
    q_seg = refs["q_seg"][...] if problem.has_segments else None
    q_bounds = (jnp.min(q_seg), jnp.max(q_seg)) if problem.has_segments else None
    softplus = isinstance(problem.normalizer, normalizers.Softplus)
    reweight = softplus and problem.normalizer.reweight
    if softplus:
        num_keys = _softplus_num_keys(refs, problem, block_q, block_kv, batch, mask_head, index, head, q_start,
                                      q_seg, q_bounds)
        row_factor = block_math.softplus_row_factor(num_keys, refs["row_scale"][...], problem.head_dim)

    def sums(kv_block, partial, carry):
        """Re-weighting's first pass: Σ_j softplus(s_ij) and max_j softplus(s_ij) of each row."""
        def compute(carry, segmented):
            row_sum, largest = carry
            span = pl.ds(kv_block * block_kv, block_kv)
            allowed = _row_block_allowed(refs, problem, q_start, q_seg, kv_block, block_q, block_kv, head,
                                         partial=partial, segmented=segmented)
            qk = _dot(problem, q, refs["k"][span, :], trans_b=True)
            weights = _softplus_block(qk, row_factor, refs["col_scale"][span], allowed)
            return row_sum + jnp.sum(weights, axis=-1), jnp.maximum(largest, jnp.max(weights, axis=-1))
        return _by_segments(problem, q_bounds, _kv_bounds(refs, problem, kv_block), compute, carry)

    def step(kv_block, partial, carry):
        def compute(carry, segmented):
            span = pl.ds(kv_block * block_kv, block_kv)
            k, v = refs["k"][span, :], refs["v"][span, :]
            allowed = _row_block_allowed(refs, problem, q_start, q_seg, kv_block, block_q, block_kv, head,
                                         partial=partial, segmented=segmented)
            qk = _dot(problem, q, k, trans_b=True)
            if softplus:
                acc, row_sum = carry
                weights = _softplus_block(qk, row_factor, refs["col_scale"][span], allowed)
                if reweight:  # the second pass, on the first's row sums and peaks
                    weights = block_math.reweighted(problem.normalizer, weights, num_keys[:, None], row_sum_a[:, None],
                                                    peak[:, None])[0]
                return acc + _dot(problem, weights.astype(v.dtype), v), row_sum + jnp.sum(weights, axis=-1)
            acc, m, l = carry
            scores = qk * (problem.scale * block_math.LOG2_E)
            if allowed is not None:
                scores = jnp.where(allowed, scores, -jnp.inf)
            p, alpha, m, l = block_math.online_softmax(scores, m, l)
            return alpha[:, None] * acc + _dot(problem, p.astype(v.dtype), v), m, l
        return _by_segments(problem, q_bounds, _kv_bounds(refs, problem, kv_block), compute, carry)

    acc = jnp.zeros((block_q, problem.head_dim), jnp.float32)
    if reweight:
        zeros = jnp.zeros((block_q,), jnp.float32)
        layout = problem.forward_layout
        row_sum_a, largest = _visit_lists(refs, layout, "row", batch, mask_head, index, sums, (zeros, zeros))
        peak = block_math.reweight_peak(problem.normalizer, num_keys, row_sum_a, largest)
        acc, row_sum = _visit_lists(refs, layout, "row", batch, mask_head, index, step, (acc, zeros))
        refs["num_keys"][...], refs["row_sum"][...] = num_keys, row_sum_a
        refs["peak"][...], refs["weight_sum"][...] = peak, row_sum
    elif softplus:
        acc, row_sum = _visit_lists(refs, problem.forward_layout, "row", batch, mask_head, index, step,
                                    (acc, jnp.zeros((block_q,), jnp.float32)))
        refs["num_keys"][...] = num_keys
        refs["row_sum"][...] = row_sum
    else:
        acc, m, row_sum = _visit_lists(refs, problem.forward_layout, "row", batch, mask_head, index, step,
                                       (acc, jnp.full((block_q,), -jnp.inf, jnp.float32),
                                        jnp.zeros((block_q,), jnp.float32)))
        refs["lse"][...] = block_math.softmax_lse(m, row_sum)
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]
    refs["out"][...] = out.astype(refs["out"].dtype)


def _row_major_specs(problem: Problem, block_q: int, layout):
    """BlockSpecs of the per-(query block, batch, head) inputs on grid (num_q_blocks, B, Hq)."""
    S, D, G = problem.kv_len, problem.head_dim, problem.group
    per_head = layout.num_mask_heads > 1
    specs = {
        "q": pl.BlockSpec((None, block_q, None, D), lambda i, b, h: (b, i, h, 0)),
        "k": pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        "v": pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        "row_scale": pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
        "col_scale": pl.BlockSpec((None, None, S), lambda i, b, h: (b, h // G, 0)),
        "q_seg": pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
        "kv_seg": pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
        "row_allowed": pl.BlockSpec((None, block_q), (lambda i, b, h: (h, i)) if per_head else
                                    (lambda i, b, h: (0, i))),
        "stat": pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i)),
    }
    return specs


def _pallas(kernel, problem, name, grid, inputs, specs, outputs, out_specs, block_a, block_b):
    names = list(inputs) + list(outputs)
    return pl.pallas_call(
        _named_call(kernel, names), grid=grid, in_specs=[specs[n] for n in inputs],
        out_specs=[out_specs[n] for n in outputs], out_shape=list(outputs.values()),
        compiler_params=_compiler_params(problem, block_a, block_b), interpret=problem.interpret, name=name,
    )(*inputs.values())


def _common_inputs(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, kv_block: int):
    inputs = {"q": q, "k": k, "v": v}
    if row_scale is not None:
        inputs.update(row_scale=row_scale, col_scale=col_scale)
    if problem.has_segments:
        kv_min, kv_max = segments.block_bounds(kv_segment_ids, kv_block)
        inputs.update(q_seg=q_segment_ids, kv_seg=kv_segment_ids, kv_seg_min=kv_min, kv_seg_max=kv_max)
    return inputs


def _stat_names(problem: Problem, backward: bool = False) -> tuple[str, ...]:
    """The per-row statistics the forward saves: lse; softplus N_i and L_i = Σ_j softplus(s_ij); with re-weighting
    also the peak excess P_i and the sum of the re-weighted weights, and for the dK/dV kernel (`backward`) the dQ
    kernel's Σ_j de_ij softplus_ij."""
    if not isinstance(problem.normalizer, normalizers.Softplus):
        return ("lse",)
    if problem.normalizer.reweight:
        return ("num_keys", "row_sum", "peak", "weight_sum") + (("excess_sum",) if backward else ())
    return ("num_keys", "row_sum")


def forward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids):
    B, T, Hq, D = q.shape
    block_q, block_kv = problem.block_sizes.block_q, problem.block_sizes.block_kv
    layout = problem.forward_layout
    inputs = _common_inputs(problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, block_kv)
    softplus = isinstance(problem.normalizer, normalizers.Softplus)
    if softplus and not problem.has_segments:
        inputs["row_allowed"] = jnp.asarray(layout.row_allowed)
    inputs.update(_layout_inputs(layout, "row"))
    if problem.has_segments:
        inputs.update(segments.list_ranges(layout, "row", q_segment_ids, kv_segment_ids))
    specs = _row_major_specs(problem, block_q, layout)
    specs.update({n: _batch_row(inputs[n]) for n in ("kv_seg_min", "kv_seg_max") if n in inputs})
    for name, array in inputs.items():
        specs.setdefault(name, _whole(array))
    stat = jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)
    stat_names = _stat_names(problem)
    outputs = {"out": jax.ShapeDtypeStruct(q.shape, q.dtype), **{n: stat for n in stat_names}}
    out_specs = {"out": specs["q"], **{n: specs["stat"] for n in stat_names}}
    kernel = functools.partial(_forward_kernel, problem=problem, block_q=block_q, block_kv=block_kv)
    out, *stats = _pallas(kernel, problem, "flash_forward", (T // block_q, B, Hq), inputs, specs, outputs, out_specs,
                          block_q, block_kv)
    return out, tuple(stats)


def _probabilities(problem: Problem, qk, allowed, row, col_scale):
    """Per block, from q·kᵀ [bq, bk]: (weights w, dweights → the gradient of q·kᵀ, dweights → the row sums
    Σ_j de_ij softplus_ij of re-weighting). `row` holds the per-row statistics, each [bq, 1]."""
    if isinstance(problem.normalizer, normalizers.Softplus):
        scores = row["factor"] * qk * col_scale[None, :]
        softplus, sigmoid = block_math.softplus_and_sigmoid(scores)
        if allowed is not None:
            softplus = jnp.where(allowed, softplus, 0.0)
        if problem.normalizer.reweight:
            weights, excess = block_math.reweighted(problem.normalizer, softplus, row["num_keys"], row["row_sum"],
                                                    row["peak"])
            weights = weights * row["inverse_weight_sum"]

            def excess_grad(dweights):  # d loss / d excess_ij where the row is sharpened (peak > 0)
                dsharpened = (dweights - row["delta"]) * row["inverse_weight_sum"]
                return jnp.where(excess > 0, dsharpened * problem.normalizer.power * weights
                                 / (row["inverse_weight_sum"] * jnp.where(excess > 0, excess, 1.0)), 0.0)

            def softplus_grad(dweights):
                n_over_l = row["num_keys"] * row["inverse_row_sum"]
                sharpened = excess_grad(dweights) * n_over_l - n_over_l * row["inverse_row_sum"] * row["excess_sum"]
                return jnp.where(row["peak"] > 0, sharpened, (dweights - row["delta"]) * row["inverse_weight_sum"])

            def excess_sum(dweights):
                return jnp.sum(excess_grad(dweights) * softplus, axis=-1)
        else:
            weights = softplus * row["inverse_row_sum"]
            excess_sum = None

            def softplus_grad(dweights):
                return (dweights - row["delta"]) * row["inverse_row_sum"]

        def scores_grad(dweights):
            ds = softplus_grad(dweights) * sigmoid
            if allowed is not None:
                ds = jnp.where(allowed, ds, 0.0)
            return ds * row["factor"] * col_scale[None, :]
        return weights, scores_grad, excess_sum
    scores = qk * (problem.scale * block_math.LOG2_E)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    p = jnp.exp2(scores - row["lse2"])

    def scores_grad(dp):
        return p * (dp - row["delta"]) * problem.scale
    return p, scores_grad, None


def _row_statistics(problem: Problem, stats: dict, delta, row_scale):
    """The per-row values the backward kernels use, as [rows, 1] columns."""
    if not isinstance(problem.normalizer, normalizers.Softplus):
        return {"lse2": block_math.backward_lse2(stats["lse"])[:, None], "delta": delta[:, None]}
    row = {"factor": block_math.softplus_row_factor(stats["num_keys"], row_scale, problem.head_dim),
           "num_keys": stats["num_keys"], "row_sum": stats["row_sum"], "delta": delta,
           "inverse_row_sum": 1.0 / jnp.where(stats["row_sum"] > 0, stats["row_sum"], 1.0)}
    if problem.normalizer.reweight:
        row.update(peak=stats["peak"], inverse_weight_sum=1.0 / jnp.where(stats["weight_sum"] > 0,
                                                                            stats["weight_sum"], 1.0))
        if "excess_sum" in stats:
            row["excess_sum"] = stats["excess_sum"]
    return {name: value[:, None] for name, value in row.items()}


def _dq_kernel(refs, *, problem: Problem, block_q: int, block_kv: int):
    index, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layout = problem.dq_layout
    mask_head = head if layout.num_mask_heads > 1 else 0
    softplus = isinstance(problem.normalizer, normalizers.Softplus)
    q, dout = refs["q"][...], refs["dout"][...]
    q_start = problem.q_offset + index * block_q
    q_seg = refs["q_seg"][...] if problem.has_segments else None
    q_bounds = (jnp.min(q_seg), jnp.max(q_seg)) if problem.has_segments else None
    stats = {name: refs[name][...] for name in _stat_names(problem)}
    row_scale = refs["row_scale"][...] if softplus else None
    reweight = softplus and problem.normalizer.reweight

    def step(kv_block, partial, carry, first_pass=False):
        """Accumulates dQ; with re-weighting, a first pass sums Σ_j de_ij softplus_ij per row instead."""
        def compute(carry, segmented):
            span = pl.ds(kv_block * block_kv, block_kv)
            k, v = refs["k"][span, :], refs["v"][span, :]
            allowed = _row_block_allowed(refs, problem, q_start, q_seg, kv_block, block_q, block_kv, head,
                                         partial=partial, segmented=segmented)
            qk = _dot(problem, q, k, trans_b=True)
            _, scores_grad, excess_sum = _probabilities(problem, qk, allowed, row,
                                                        refs["col_scale"][span] if softplus else None)
            dweights = _dot(problem, dout, v, trans_b=True)
            if first_pass:
                return carry + excess_sum(dweights)
            return carry + _dot(problem, scores_grad(dweights).astype(k.dtype), k)
        return _by_segments(problem, q_bounds, _kv_bounds(refs, problem, kv_block), compute, carry)

    if reweight:
        row = _row_statistics(problem, stats, refs["delta"][...], row_scale)
        stats["excess_sum"] = _visit_lists(refs, layout, "row", batch, mask_head, index,
                                           functools.partial(step, first_pass=True), jnp.zeros((block_q,), jnp.float32))
        refs["excess_sum"][...] = stats["excess_sum"]
    row = _row_statistics(problem, stats, refs["delta"][...], row_scale)
    dq = _visit_lists(refs, layout, "row", batch, mask_head, index, step,
                      jnp.zeros((block_q, problem.head_dim), jnp.float32))
    refs["dq"][...] = dq.astype(refs["dq"].dtype)
    if softplus:
        # likewise d/dr_i of s_ij = c_i r_i (q_i·k_j) u_j summed over j is (q_i · dq_i) / r_i.
        refs["drow"][...] = jnp.sum(q.astype(jnp.float32) * dq, axis=-1) / refs["row_scale"][...]


def _dkdv_kernel(refs, *, problem: Problem, block_q: int, block_kv: int):
    index, batch, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layout = problem.dkdv_layout
    softplus = isinstance(problem.normalizer, normalizers.Softplus)
    k, v = refs["k"][...], refs["v"][...]
    kv_start = index * block_kv
    col_scale = refs["col_scale"][...] if softplus else None
    kv_seg = refs["kv_seg"][...] if problem.has_segments else None
    kv_bounds = (jnp.min(kv_seg), jnp.max(kv_seg)) if problem.has_segments else None

    def head_step(g, carry):
        head = kv_head * problem.group + g
        mask_head = head if layout.num_mask_heads > 1 else 0

        def step(q_block, partial, carry):
            def compute(carry, segmented):
                dk, dv = carry
                q_span = pl.ds(q_block * block_q, block_q)
                q, dout = refs["q"][q_span, g, :], refs["dout"][q_span, g, :]
                q_seg = refs["q_seg"][q_span] if segmented else None
                allowed = block_math.block_allowed(problem.mask, problem.q_offset + q_block * block_q, kv_start,
                                                   block_q, block_kv, head, partial=partial, q_segment_ids=q_seg,
                                                   kv_segment_ids=kv_seg if segmented else None)
                stats = {name: refs[name][g, q_span] for name in _stat_names(problem, backward=True)}
                row = _row_statistics(problem, stats, refs["delta"][g, q_span],
                                      refs["row_scale"][g, q_span] if softplus else None)
                qk = _dot(problem, q, k, trans_b=True)
                weights, scores_grad, _ = _probabilities(problem, qk, allowed, row, col_scale)
                dv = dv + _dot(problem, weights.astype(dout.dtype), dout, trans_a=True)
                dqk = scores_grad(_dot(problem, dout, v, trans_b=True))
                dk = dk + _dot(problem, dqk.astype(q.dtype), q, trans_a=True)
                return dk, dv

            q_bounds = (refs["q_seg_min"][q_block], refs["q_seg_max"][q_block]) if problem.has_segments else None
            return _by_segments(problem, q_bounds, kv_bounds, compute, carry)

        return _visit_lists(refs, layout, "col", batch, mask_head, index, step, carry)

    zeros = jnp.zeros((block_kv, problem.head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, problem.group, head_step, (zeros, zeros))
    refs["dk"][...] = dk.astype(refs["dk"].dtype)
    refs["dv"][...] = dv.astype(refs["dv"].dtype)
    if softplus:
        # d/du_j of s_ij = f_i (q_i·k_j) u_j summed over i is (k_j · dk_j) / u_j: one reduction per program.
        refs["dcol"][...] = jnp.sum(k.astype(jnp.float32) * dk, axis=-1) / col_scale


def backward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, stats, delta, dout):
    B, T, Hq, D = q.shape
    S, Hkv, G = k.shape[1], k.shape[2], problem.group
    softplus = isinstance(problem.normalizer, normalizers.Softplus)
    stat_names = _stat_names(problem)
    sizes = problem.block_sizes

    # dQ: row-major over query blocks.
    block_q, block_kv = sizes.block_q_dq, sizes.block_kv_dq
    inputs = _common_inputs(problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, block_kv)
    inputs.update(dout=dout, delta=delta, **dict(zip(stat_names, stats)))
    inputs.update(_layout_inputs(problem.dq_layout, "row"))
    if problem.has_segments:
        inputs.update(segments.list_ranges(problem.dq_layout, "row", q_segment_ids, kv_segment_ids))
    specs = _row_major_specs(problem, block_q, problem.dq_layout)
    specs.update(dout=specs["q"], delta=specs["stat"], **{n: specs["stat"] for n in stat_names})
    specs.update({n: _batch_row(inputs[n]) for n in ("kv_seg_min", "kv_seg_max") if n in inputs})
    for name, array in inputs.items():
        specs.setdefault(name, _whole(array))
    row_stat = jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)
    outputs = {"dq": jax.ShapeDtypeStruct(q.shape, jnp.float32)}
    if softplus:
        outputs["drow"] = row_stat
    if "excess_sum" in _stat_names(problem, backward=True):
        outputs["excess_sum"] = row_stat
    out_specs = {"dq": specs["q"], "drow": specs["stat"], "excess_sum": specs["stat"]}
    kernel = functools.partial(_dq_kernel, problem=problem, block_q=block_q, block_kv=block_kv)
    dq_outputs = dict(zip(outputs, _pallas(kernel, problem, "flash_backward_dq", (T // block_q, B, Hq), inputs, specs,
                                           outputs, out_specs, block_q, block_kv)))
    dq = dq_outputs["dq"]

    # dK, dV: column-major over key blocks, one program per kv head looping over its group of query heads.
    block_q, block_kv = sizes.block_q_dkv, sizes.block_kv_dkv
    inputs = {"q": q, "k": k, "v": v, "dout": dout, "delta": delta, **dict(zip(stat_names, stats))}
    if "excess_sum" in dq_outputs:
        inputs["excess_sum"] = dq_outputs["excess_sum"]
    specs = {
        "q": pl.BlockSpec((None, T, G, D), lambda j, b, h: (b, 0, h, 0)),
        "k": pl.BlockSpec((None, block_kv, None, D), lambda j, b, h: (b, j, h, 0)),
        "v": pl.BlockSpec((None, block_kv, None, D), lambda j, b, h: (b, j, h, 0)),
        "stat": pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0)),
    }
    specs["dout"] = specs["q"]
    if softplus:
        inputs.update(row_scale=row_scale, col_scale=col_scale)
        specs["row_scale"] = specs["stat"]
        specs["col_scale"] = pl.BlockSpec((None, None, block_kv), lambda j, b, h: (b, h, j))
    for name in ("delta", *_stat_names(problem, backward=True)):
        specs[name] = specs["stat"]
    if problem.has_segments:
        q_min, q_max = segments.block_bounds(q_segment_ids, block_q)
        inputs.update(q_seg=q_segment_ids, kv_seg=kv_segment_ids, q_seg_min=q_min, q_seg_max=q_max)
        specs["q_seg"] = pl.BlockSpec((None, T), lambda j, b, h: (b, 0))
        specs["kv_seg"] = pl.BlockSpec((None, block_kv), lambda j, b, h: (b, j))
        specs.update(q_seg_min=_batch_row(q_min), q_seg_max=_batch_row(q_max))
    inputs.update(_layout_inputs(problem.dkdv_layout, "col"))
    if problem.has_segments:
        inputs.update(segments.list_ranges(problem.dkdv_layout, "col", q_segment_ids, kv_segment_ids))
    for name, array in inputs.items():
        specs.setdefault(name, _whole(array))
    outputs = {"dk": jax.ShapeDtypeStruct(k.shape, k.dtype), "dv": jax.ShapeDtypeStruct(v.shape, v.dtype)}
    out_specs = {"dk": specs["k"], "dv": specs["v"], "dcol": pl.BlockSpec((None, None, block_kv),
                                                                          lambda j, b, h: (b, h, j))}
    if softplus:
        outputs["dcol"] = jax.ShapeDtypeStruct((B, Hkv, S), jnp.float32)
    kernel = functools.partial(_dkdv_kernel, problem=problem, block_q=block_q, block_kv=block_kv)
    dk, dv, *dcol = _pallas(kernel, problem, "flash_backward_dkdv", (S // block_kv, B, Hkv), inputs, specs, outputs,
                            out_specs, block_q, block_kv)
    return dq.astype(q.dtype), dk, dv, dq_outputs.get("drow"), dcol[0] if softplus else None

