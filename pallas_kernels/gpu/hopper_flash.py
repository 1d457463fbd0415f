"""The Pallas Mosaic GPU backend for Hopper (sm90): block-sparse flash attention forward, dQ and dK/dV kernels.

The structure is FlashAttention-3's (Shah et al., 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony
and Low-precision", arXiv 2407.08608) as jax writes it in Pallas Mosaic GPU
(jax.experimental.pallas.ops.gpu.attention_mgpu): every CUDA block runs one memory warpgroup, which streams blocks
into SLOTS shared-memory buffers with TMA, and one or two compute warpgroups of ROWS = 64 rows each, which multiply
on the tensor cores with wgmma, signal through mbarriers when a buffer may be refilled, and (forward, two warpgroups)
take turns on the tensor cores through a scheduling barrier so one's softmax overlaps the other's matmuls. Softmax
runs in base 2 with the scale folded into one multiply (`block_math`).

Block sparsity: the memory warpgroup fetches only the key blocks the static layout lists for its query block (dK/dV:
the query blocks of its key block, for every query head of its kv head) — full blocks first, then partial ones —
and the compute warpgroups walk the same list, evaluating the mask only on partial blocks. An empty block is never
loaded or computed. With segment ids the lists are filtered before the kernels by the blocks' segment ranges
(`block_math.segments_meet`), and segment ids mask every visited block in-kernel except a full block whose queries
and keys all belong to one and the same document: those are listed first and computed as without segment ids (the
single-document fast path, most of the blocks when documents are long). Grouped-query attention reads kv
head h // G for query head h; the dK/dV kernel loops over the G query heads, so K/V are never repeated.

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D] in bfloat16 or float16; lse, delta [B, Hq, T] float32. Softmax only.

Interpret mode (problem.interpret) runs the same kernels under Pallas' Mosaic GPU interpreter on CPU, which neither
takes a wgmma operand from registers nor a pre-initialised accumulator (`pl.run_state`): there `_mma` passes such
operands through shared memory and adds the product to the accumulator afterwards. Nothing else differs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash import block_math
from pallas_kernels.flash import layout as layout_lib
from pallas_kernels.flash import normalizers
from pallas_kernels.flash.attention import BlockSizes, Problem

HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16")
ROWS = 64  # rows of one compute warpgroup's tile: the M of a wgmma
SLOTS = 2  # blocks the memory warpgroup keeps in flight
SMEM_BYTES = 227 * 1024  # shared memory a block may use on an H100
_WGMMA = plgpu.Layout.WGMMA
_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def default_block_sizes(problem: Problem) -> BlockSizes:
    if problem.head_dim > 128:  # keeps the tiles within shared memory
        return BlockSizes(block_q=128, block_kv=64, block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64)
    # dK/dV over 128 queries a step at head dim 64: 10% faster than 64 at 32K on an H100 (docs/benchmarks.md); at head
    # dim 128 the wider score tiles and the two accumulators would not fit a warpgroup's registers.
    block_q_dkv = 128 if problem.head_dim <= 64 else 64
    return BlockSizes(block_q=128, block_kv=128, block_q_dq=128, block_kv_dq=64, block_q_dkv=block_q_dkv,
                      block_kv_dkv=128)


def _smem_bytes(problem: Problem) -> dict[str, int]:
    """Shared memory of each kernel: its buffers (2-byte tiles, float32 row statistics, int32 segment ids) aligned to
    1 KiB, and 4 KiB for barriers and what Pallas reserves (measured at 2.2 KiB)."""
    s, D = problem.block_sizes, problem.head_dim
    seg = 4 if problem.has_segments else 0

    def total(tiles, vectors):  # tiles: [(count, rows)] of D-wide tiles; vectors: [(count, length, bytes)]
        sizes = [2 * n * rows * D for n, rows in tiles] + [n * length * size for n, length, size in vectors if size]
        return sum(-(-size // 1024) * 1024 for size in sizes) + 4096
    return {
        "forward": total([(1, s.block_q), (2 * SLOTS, s.block_kv)], [(1, s.block_q, 4), (1, s.block_q, seg),
                                                                     (SLOTS, s.block_kv, seg)]),
        "dQ": total([(2, s.block_q_dq), (2 * SLOTS, s.block_kv_dq)], [(2, s.block_q_dq, 4), (1, s.block_q_dq, seg),
                                                                      (SLOTS, s.block_kv_dq, seg)]),
        "dK/dV": total([(2, s.block_kv_dkv), (2 * SLOTS, s.block_q_dkv)],
                       [(2 * SLOTS, s.block_q_dkv, 4), (1, s.block_kv_dkv, seg), (SLOTS, s.block_q_dkv, seg)]),
    }


def unsupported_reason(problem: Problem) -> str | None:
    reason = block_math.check_normalizer(problem.normalizer)
    if reason is not None:
        return reason
    if isinstance(problem.normalizer, normalizers.Softplus):
        return "the Hopper kernels compute softmax only; backend='triton' runs softplus"
    if problem.dtype not in DTYPES:
        return (f"the Hopper kernels take bfloat16 or float16 inputs (wgmma operands), got {problem.dtype}; "
                f"backend='triton' runs float32")
    if problem.head_dim not in HEAD_DIMS:
        return f"the Hopper kernels take head dims {HEAD_DIMS}, got {problem.head_dim}"
    sizes = problem.block_sizes
    for name in ("block_q", "block_q_dq", "block_kv_dkv"):  # split among the compute warpgroups
        if getattr(sizes, name) not in (ROWS, 2 * ROWS):
            return f"{name} must be {ROWS} or {2 * ROWS} (one or two compute warpgroups), got {getattr(sizes, name)}"
    for name in ("block_kv", "block_kv_dq", "block_q_dkv"):  # the N of a wgmma
        if getattr(sizes, name) % 64 or getattr(sizes, name) > 256:
            return f"{name} must be a multiple of 64 up to 256 (a wgmma tile), got {getattr(sizes, name)}"
    for kernel, used in _smem_bytes(problem).items():
        if used > SMEM_BYTES:
            return (f"the {kernel} kernel's tiles need {used} bytes of shared memory at head_dim={problem.head_dim} "
                    f"with {sizes}, more than the {SMEM_BYTES} of an H100: choose smaller blocks")
    return None


# --- Visit lists: the static layout (filtered by segment ranges) as the order in which blocks are fetched.

def _visit_lists(kinds: np.ndarray, meet=None, same=None):
    """kinds int8 [Hx, G, R, C] (EMPTY / PARTIAL / FULL of column block c for row block r and run g); with segment ids
    meet and same, bool [B, R, C] (`_segment_blocks`) → visits int32 [B or 1, Hx, R, W]: codes g·C + c, run by run,
    each run's full blocks of one shared document (every full block without segment ids), then its other full
    blocks, then its partial ones (each ascending); bounds int32 [B or 1, Hx, R, 3G + 1]: run g's visits of those
    three kinds are [bounds[3g], bounds[3g+1]), [bounds[3g+1], bounds[3g+2]) and [bounds[3g+2], bounds[3g+3]).
    Numpy at trace time without segment ids."""
    Hx, G, R, C = kinds.shape
    width = max(1, int(np.max(np.sum(kinds != layout_lib.EMPTY, axis=(1, 3)), initial=0)))
    xp = np if meet is None else jnp
    kinds = xp.asarray(kinds)[None]
    if meet is not None:
        kinds = jnp.where(meet[:, None, None], kinds, layout_lib.EMPTY)
    full, partial = kinds == layout_lib.FULL, kinds == layout_lib.PARTIAL
    unmasked = full if same is None else full & same[:, None, None]
    masked = full & ~unmasked
    rank = xp.where(unmasked, 0, xp.where(masked, 1, xp.where(partial, 2, 3 * G)))  # empty blocks sort last
    runs = np.arange(G)[:, None, None]
    key = (3 * runs + rank) * C + np.arange(C)
    key = xp.moveaxis(key, 2, 3).reshape(*key.shape[:2], R, G * C)
    visits = xp.argsort(key, axis=-1)[..., :width].astype(np.int32)
    counts = [xp.moveaxis(x.sum(-1), 2, 3).astype(np.int32) for x in (unmasked, masked, partial)]  # [., Hx, R, G]
    ends = xp.cumsum(sum(counts), axis=-1)
    starts = ends - sum(counts)
    bounds = xp.stack([starts, starts + counts[0], starts + counts[0] + counts[1]], axis=-1)
    bounds = xp.concatenate([bounds.reshape(*ends.shape[:3], 3 * G), ends[..., -1:]], axis=-1).astype(np.int32)
    return xp.asarray(visits), bounds


def _segment_blocks(q_segment_ids, kv_segment_ids, block_q: int, block_kv: int):
    """(meet, same), bool [B, T // block_q, S // block_kv]: whether the segment ranges of the two blocks can meet, and
    whether every query and key of the two blocks has one and the same nonzero segment id (no pair is masked)."""
    def bounds(ids, block):
        blocks = ids.reshape(ids.shape[0], -1, block)
        return jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)
    (q_min, q_max), (kv_min, kv_max) = bounds(q_segment_ids, block_q), bounds(kv_segment_ids, block_kv)
    meet = block_math.segments_meet(q_min[:, :, None], q_max[:, :, None], kv_min[:, None, :], kv_max[:, None, :])
    q_one = ((q_min == q_max) & (q_min != 0))[:, :, None]
    kv_one = (kv_min == kv_max)[:, None, :]
    return meet, q_one & kv_one & (q_min[:, :, None] == kv_min[:, None, :])


# --- Pieces every kernel shares.

def _mma(acc, a, b, *, interpret: bool, staging=None, then=None):
    """acc + a @ b on the tensor cores (acc float32 [M, N] in registers, or None for zeros); a [M, K] an SMEM ref or
    an array in registers, b [K, N] an SMEM ref. then() runs while the wgmma is in flight. In interpret mode a
    register operand goes through `staging` (SMEM) and the product is added after the fact (module docstring)."""
    if interpret and staging is not None:
        staging[...] = a
        plgpu.commit_smem()
        a = staging
    if acc is None or interpret:
        def scoped(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            if then is not None:
                then()
            return acc_ref[...]
        product = pl.run_scoped(scoped, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))
        return product if acc is None else acc + product

    def stateful(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if then is not None:
            then()
    return pl.run_state(stateful)(plgpu.ACC.init(acc))


def _mma_pair(first, second, *, interpret: bool, staging=None):
    """Two products (acc, a, b) as `_mma` computes them, issued together so they are awaited once (compiled); only the
    first's `a` may be in registers."""
    if interpret:
        return (_mma(*first, interpret=True, staging=staging), _mma(*second, interpret=True))
    accs = [_zeros((a.shape[0], b.shape[1])) if acc is None else acc for acc, a, b in (first, second)]

    def stateful(refs):
        for ref, (_, a, b) in zip(refs, (first, second)):
            plgpu.wgmma(ref, a, b)
    return pl.run_state(stateful)(tuple(plgpu.ACC.init(acc) for acc in accs))


def _zeros(shape, layout=_WGMMA):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)


def _spread(x, shape, dim: int):
    """A row (dim 0) or column (dim 1) vector broadcast over a tile."""
    return lax.broadcast_in_dim(x, shape, [dim])


def _allowed(problem: Problem, shape, q_start, kv_start, head, *, partial: bool, q_seg=None, kv_seg=None,
             transposed: bool = False):
    """bool [shape] of what a tile's queries (starting at absolute position q_start) may see of its keys (from
    kv_start), rows being queries (keys if transposed): the mask on partial blocks and segment ids on every block;
    None when everything is allowed."""
    q_dim, kv_dim = (1, 0) if transposed else (0, 1)
    allowed = None
    if partial:
        q_idx = plgpu.broadcasted_iota(jnp.int32, shape, q_dim, layout=_WGMMA) + q_start
        kv_idx = plgpu.broadcasted_iota(jnp.int32, shape, kv_dim, layout=_WGMMA) + kv_start
        allowed = problem.mask(q_idx, kv_idx, head)
    if q_seg is not None:
        q_seg, kv_seg = _spread(q_seg, shape, q_dim), _spread(kv_seg, shape, kv_dim)
        same = (q_seg == kv_seg) & (q_seg != 0)
        allowed = same if allowed is None else allowed & same
    return allowed


def _streamed_segments(s, bar, slot, segments: bool, segment_mask: bool, layout, name: str = "kv_seg"):
    """The segment ids of the streamed block in `slot`, or None when the step needs none. With segment ids the memory
    warpgroup fetches them for every block, so their barrier is waited on (its phase consumed) even when unused."""
    if not segments:
        return None
    plgpu.barrier_wait(bar(f"{name}_ready", slot))
    return plgpu.load(s[name].at[slot], layout=layout) if segment_mask else None


class _Barriers:
    """A kernel's mbarriers by name, one allocation per arrival count (the interpreter pays per allocation and
    thread). spec: name → (number, arrivals); barrier(s, name, i) is barrier i of `name` in the scratch refs s."""

    def __init__(self, **spec):
        self.where, sizes = {}, {}
        for name, (number, arrivals) in spec.items():
            self.where[name] = (f"barriers{arrivals}", sizes.get(arrivals, 0))
            sizes[arrivals] = sizes.get(arrivals, 0) + number
        self.scratch = {f"barriers{a}": plgpu.Barrier(num_arrivals=a, num_barriers=n) for a, n in sizes.items()}

    def __call__(self, s, name: str, i=0):
        group, offset = self.where[name]
        return s[group].at[offset + i]


def _produce(bar, total, visit, streams):
    """The memory warpgroup: visit i goes to buffer slot i % SLOTS. streams: [(name of the `free` barriers,
    fetch(visit code, slot))]; a slot is refilled once every compute warpgroup has released (arrived on `free`) what
    it held, and the last releases are awaited too, since the interpreter checks that a waiter observes every phase."""
    plgpu.set_max_registers(40, action="decrease")
    for i in range(SLOTS):
        @pl.when(i < total)
        def _prologue():
            code = visit(i)
            for _, fetch in streams:
                fetch(code, i)

    @pl.loop(SLOTS, jnp.maximum(total, SLOTS))
    def _steady(i):
        slot, code = lax.rem(i, SLOTS), visit(i)
        for free, fetch in streams:
            plgpu.barrier_wait(bar(free, slot))
            fetch(code, slot)

    @pl.loop(jnp.maximum(total - SLOTS, 0), total)
    def _drain(i):
        for free, _ in streams:
            plgpu.barrier_wait(bar(free, lax.rem(i, SLOTS)))


def _walk(layout, bounds, run, step, carry, segments: bool):
    """Runs step(i, carry, partial=..., segment_mask=...) over run `run`'s full visits of one shared document (no
    segment mask), its other full visits, then its partial ones; a kind the layout never has is left out of the
    kernel (a block mask's blocks are never partial and cannot be evaluated in-kernel)."""
    start, unmasked_end, full_end, end = (bounds(3 * run + j) for j in range(4))
    if np.any(layout.kinds == layout_lib.FULL):
        carry = lax.fori_loop(start, unmasked_end, functools.partial(step, partial=False, segment_mask=False), carry)
        if segments:
            carry = lax.fori_loop(unmasked_end, full_end, functools.partial(step, partial=False, segment_mask=True),
                                  carry)
    if layout.has_partial:
        carry = lax.fori_loop(full_end, end, functools.partial(step, partial=True, segment_mask=segments), carry)
    return carry


def _lists(problem: Problem, refs, row, per_head: bool, head):
    """(visit(i), bounds(k)) of layout row `row`: scalars read from the lists in GMEM."""
    index = (lax.axis_index("batch") if problem.has_segments else 0, head if per_head else 0, row)
    return (lambda i: refs["visits"][(*index, i)]), (lambda k: refs["bounds"][(*index, k)])


def _fetch(refs, s, bar, name, source, slot):
    plgpu.copy_gmem_to_smem(source(refs[name]), s[name].at[slot], bar(f"{name}_ready", slot))


def _stream_keys(refs, s, bar, visit, total, batch, kv_head, block_kv: int, segments: bool):
    """The memory warpgroup of the forward and dQ kernels: K (with its segment ids) and V of every visited block."""
    def fetch(names, code, slot):
        span = pl.ds(code * block_kv, block_kv)
        for name in names:
            source = (lambda r: r.at[batch, span]) if name == "kv_seg" else (lambda r: r.at[batch, span, kv_head])
            _fetch(refs, s, bar, name, source, slot)
    k_names = ("k", "kv_seg") if segments else ("k",)
    _produce(bar, total, visit, [("k_free", functools.partial(fetch, k_names)),
                                 ("v_free", functools.partial(fetch, ("v",)))])


def _load_own(refs, s, bar, wg, sources: dict):
    """A compute warpgroup's own blocks, copied once: name → its GMEM slice."""
    for name, source in sources.items():
        plgpu.copy_gmem_to_smem(source(refs[name]), s[name].at[wg], bar(f"{name}_ready", wg))
    for name in sources:
        plgpu.barrier_wait(bar(f"{name}_ready", wg))


def _tiles(n, rows, problem: Problem):
    return plgpu.SMEM((n, rows, problem.head_dim), jnp.dtype(problem.dtype), transforms=_TRANSFORMS)


def _vectors(n, length, dtype=jnp.float32):
    return plgpu.SMEM((n, length), dtype)


def _run(problem: Problem, name: str, body, grid, grid_names, n_wg: int, inputs: dict, outputs: dict, scratch: dict,
         barriers: _Barriers, other: int):
    """Launches `body(refs, s, bar)` with n_wg compute warpgroups and a memory warpgroup; `other` is the length of the
    other side's blocks (the staging buffer of interpret mode)."""
    names = list(inputs) + list(outputs)
    scratch = {**scratch, **barriers.scratch}
    if problem.interpret:
        scratch["staging"] = plgpu.SMEM((n_wg, ROWS, other), jnp.dtype(problem.dtype))

    def entry(*refs, **s):
        body(dict(zip(names, refs)), s, functools.partial(barriers, s))
    entry.__name__ = name
    return plgpu.kernel(
        entry, out_type=tuple(outputs.values()), scratch_types=scratch, grid=grid, grid_names=grid_names,
        num_threads=n_wg + 1, thread_name="wg", compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if problem.interpret else None,
    )(*inputs.values())


def _staging(problem: Problem, s, wg):
    return s["staging"].at[wg] if problem.interpret else None


# --- Forward.

def _forward_body(refs, s, bar, *, problem: Problem, n_wg: int, block_kv: int):
    batch, head, q_block, wg = (lax.axis_index(n) for n in ("batch", "heads", "q_seq", "wg"))
    kv_head = lax.div(head, jnp.int32(problem.group))
    layout = problem.forward_layout
    visit, bounds = _lists(problem, refs, q_block, layout.num_mask_heads > 1, head)
    segments, dtype, D = problem.has_segments, jnp.dtype(problem.dtype), problem.head_dim

    def schedule():  # the two compute warpgroups take turns on the tensor cores (FA3's ping-pong)
        plgpu.barrier_arrive(bar("schedule"))
        plgpu.barrier_wait(bar("schedule"))

    pl.when(wg == n_wg)(lambda: _stream_keys(refs, s, bar, visit, bounds(3), batch, kv_head, block_kv, segments))

    @pl.when(wg < n_wg)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_base = q_block * (n_wg * ROWS) + wg * ROWS
        rows = pl.ds(q_base, ROWS)
        q_smem = s["q"].at[wg]
        _load_own(refs, s, bar, wg, {"q": lambda r: r.at[batch, rows, head],
                                     **({"q_seg": lambda r: r.at[batch, rows]} if segments else {})})
        q_seg = plgpu.load(s["q_seg"].at[wg], layout=_WGMMA.reduce(1)) if segments else None
        scale2 = problem.scale * block_math.LOG2_E  # scores in base 2: one FMA with the running max in exp2
        factor = scale2 if scale2 > 0 else 1.0  # the maximum commutes with a positive scale only
        total = bounds(3)

        @pl.when(total > 0)
        def _():
            plgpu.barrier_wait(bar("k_ready", 0))

        def wait_next_k(i):  # while P·V runs on the tensor cores
            @pl.when(i + 1 < total)
            def _():
                plgpu.barrier_wait(bar("k_ready", lax.rem(i + 1, SLOTS)))

        def step(i, carry, *, partial, segment_mask):
            acc, m, l = carry
            slot = lax.rem(i, SLOTS)
            scores = _mma(None, q_smem, s["k"].at[slot].transpose((1, 0)), interpret=problem.interpret,
                          then=schedule if n_wg == 2 else None)
            kv_seg = _streamed_segments(s, bar, slot, segments, segment_mask, _WGMMA.reduce(0))
            plgpu.barrier_arrive(bar("k_free", slot))
            if factor != scale2:
                scores = scores * scale2
            allowed = _allowed(problem, scores.shape, problem.q_offset + q_base, visit(i) * block_kv if partial else 0,
                               head, partial=partial, q_seg=q_seg if segment_mask else None, kv_seg=kv_seg)
            if allowed is None:  # a full block: every row's maximum is finite
                m_next = m_safe = jnp.maximum(m, scores.max(axis=1) * factor)
            else:  # a row may have seen nothing yet: its maximum stays -inf and its sums 0
                scores = jnp.where(allowed, scores, -jnp.inf)
                m_next = jnp.maximum(m, scores.max(axis=1) * factor)
                m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            alpha = jnp.exp2(m - m_safe)
            p = jnp.exp2(scores * factor - _spread(m_safe, scores.shape, 0))
            acc = acc * _spread(alpha, acc.shape, 0)
            l = l * alpha
            p16 = p.astype(dtype)

            def softmax_done():
                if n_wg == 2:
                    plgpu.barrier_arrive(bar("schedule"))
                plgpu.barrier_wait(bar("v_ready", slot))
                if n_wg == 2:
                    plgpu.barrier_wait(bar("schedule"))  # the tensor cores are ours
            if D <= 128:  # attention_mgpu's order, which it measured to matter
                l = l + p.sum(axis=1)
                acc, l, m_next, p16 = lax.optimization_barrier((acc, l, m_next, p16))
                softmax_done()
            else:
                softmax_done()
                l = l + p.sum(axis=1)
            acc = _mma(acc, p16, s["v"].at[slot], interpret=problem.interpret, staging=_staging(problem, s, wg),
                       then=functools.partial(wait_next_k, i))
            plgpu.barrier_arrive(bar("v_free", slot))
            return acc, m_next, l

        reduced = _WGMMA.reduce(1)
        carry = (_zeros((ROWS, D)), plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), reduced),
                 _zeros((ROWS,), reduced))
        if n_wg == 2:
            pl.when(wg == 1)(schedule)
        acc, m, l = _walk(layout, bounds, 0, step, carry, segments)
        if n_wg == 2:
            pl.when(wg == 0)(schedule)
        out = acc / _spread(jnp.where(l > 0, l, 1.0), acc.shape, 0)
        q_smem[...] = out.astype(dtype)
        s["lse"].at[wg][...] = block_math.softmax_lse(m, l)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, refs["out"].at[batch, rows, head])
        plgpu.copy_smem_to_gmem(s["lse"].at[wg], refs["lse"].at[batch, head, rows])
        plgpu.wait_smem_to_gmem(0)


def forward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids):
    del row_scale, col_scale  # softplus only
    B, T, Hq, D = q.shape
    block_q, block_kv = problem.block_sizes.block_q, problem.block_sizes.block_kv
    n_wg = block_q // ROWS
    segments = problem.has_segments
    meet, same = _segment_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv) if segments else (None, None)
    visits, bounds = _visit_lists(problem.forward_layout.kinds[:, None], meet, same)
    inputs = {"q": q, "k": k, "v": v, "visits": visits, "bounds": bounds}
    scratch = {"q": _tiles(n_wg, ROWS, problem), "k": _tiles(SLOTS, block_kv, problem),
               "v": _tiles(SLOTS, block_kv, problem), "lse": _vectors(n_wg, ROWS)}
    barriers = {"q_ready": (n_wg, 1), "k_ready": (SLOTS, 1), "v_ready": (SLOTS, 1), "k_free": (SLOTS, n_wg),
                "v_free": (SLOTS, n_wg)}
    if n_wg == 2:
        barriers["schedule"] = (1, 2)
    if segments:
        inputs.update(q_seg=q_segment_ids, kv_seg=kv_segment_ids)
        scratch.update(q_seg=_vectors(n_wg, ROWS, jnp.int32), kv_seg=_vectors(SLOTS, block_kv, jnp.int32))
        barriers.update(q_seg_ready=(n_wg, 1), kv_seg_ready=(SLOTS, 1))
    outputs = {"out": jax.ShapeDtypeStruct(q.shape, q.dtype), "lse": jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)}
    body = functools.partial(_forward_body, problem=problem, n_wg=n_wg, block_kv=block_kv)
    out, lse = _run(problem, "flash_forward", body, (Hq, T // block_q, B), ("heads", "q_seq", "batch"), n_wg, inputs,
                    outputs, scratch, _Barriers(**barriers), block_kv)
    return out, (lse,)


# --- Backward: dQ over query blocks, dK/dV over key blocks (FlashAttention-2's split, as attention_mgpu's backward).

def _dq_body(refs, s, bar, *, problem: Problem, n_wg: int, block_kv: int):
    batch, head, q_block, wg = (lax.axis_index(n) for n in ("batch", "heads", "q_seq", "wg"))
    kv_head = lax.div(head, jnp.int32(problem.group))
    layout = problem.dq_layout
    visit, bounds = _lists(problem, refs, q_block, layout.num_mask_heads > 1, head)
    segments, dtype, D = problem.has_segments, jnp.dtype(problem.dtype), problem.head_dim

    pl.when(wg == n_wg)(lambda: _stream_keys(refs, s, bar, visit, bounds(3), batch, kv_head, block_kv, segments))

    @pl.when(wg < n_wg)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_base = q_block * (n_wg * ROWS) + wg * ROWS
        rows = pl.ds(q_base, ROWS)
        tile, vector = (lambda r: r.at[batch, rows, head]), (lambda r: r.at[batch, head, rows])
        _load_own(refs, s, bar, wg, {"q": tile, "dout": tile, "lse2": vector, "delta": vector,
                                     **({"q_seg": lambda r: r.at[batch, rows]} if segments else {})})
        reduced = _WGMMA.reduce(1)
        lse2, delta = (plgpu.load(s[name].at[wg], layout=reduced) for name in ("lse2", "delta"))
        q_seg = plgpu.load(s["q_seg"].at[wg], layout=reduced) if segments else None
        scale2 = problem.scale * block_math.LOG2_E

        def step(i, dq, *, partial, segment_mask):
            slot = lax.rem(i, SLOTS)
            plgpu.barrier_wait(bar("k_ready", slot))
            scores = _mma(None, s["q"].at[wg], s["k"].at[slot].transpose((1, 0)), interpret=problem.interpret)
            kv_seg = _streamed_segments(s, bar, slot, segments, segment_mask, _WGMMA.reduce(0))
            allowed = _allowed(problem, scores.shape, problem.q_offset + q_base, visit(i) * block_kv if partial else 0,
                               head, partial=partial, q_seg=q_seg if segment_mask else None, kv_seg=kv_seg)
            p = jnp.exp2(scores * scale2 - _spread(lse2, scores.shape, 0))  # lse2 is +inf on rows that see nothing
            if allowed is not None:
                p = jnp.where(allowed, p, 0.0)
            plgpu.barrier_wait(bar("v_ready", slot))
            dp = _mma(None, s["dout"].at[wg], s["v"].at[slot].transpose((1, 0)), interpret=problem.interpret)
            plgpu.barrier_arrive(bar("v_free", slot))
            ds = p * (dp - _spread(delta, dp.shape, 0))
            dq = _mma(dq, ds.astype(dtype), s["k"].at[slot], interpret=problem.interpret,
                      staging=_staging(problem, s, wg))
            plgpu.barrier_arrive(bar("k_free", slot))
            return dq

        dq = _walk(layout, bounds, 0, step, _zeros((ROWS, D)), segments)
        s["q"].at[wg][...] = (dq * problem.scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s["q"].at[wg], refs["dq"].at[batch, rows, head])
        plgpu.wait_smem_to_gmem(0)


def _dkdv_body(refs, s, bar, *, problem: Problem, n_wg: int, block_q: int):
    batch, kv_head, kv_block, wg = (lax.axis_index(n) for n in ("batch", "heads", "kv_seq", "wg"))
    G, num_q_blocks = problem.group, problem.q_len // block_q
    layout = problem.dkdv_layout
    visit, bounds = _lists(problem, refs, kv_block, layout.num_mask_heads > 1, kv_head)
    segments, dtype, D = problem.has_segments, jnp.dtype(problem.dtype), problem.head_dim

    @pl.when(wg == n_wg)
    def _memory():
        def fetch(names, code, slot):  # code = g · num_q_blocks + query block
            head = kv_head * G + lax.div(code, jnp.int32(num_q_blocks))
            span = pl.ds(lax.rem(code, jnp.int32(num_q_blocks)) * block_q, block_q)
            sources = {"q_seg": lambda r: r.at[batch, span], "lse2": lambda r: r.at[batch, head, span],
                       "delta": lambda r: r.at[batch, head, span]}
            for name in names:
                _fetch(refs, s, bar, name, sources.get(name, lambda r: r.at[batch, span, head]), slot)
        q_names = ("q", "lse2", "q_seg") if segments else ("q", "lse2")
        _produce(bar, bounds(3 * G), visit, [("q_free", functools.partial(fetch, q_names)),
                                             ("dout_free", functools.partial(fetch, ("dout", "delta")))])

    @pl.when(wg < n_wg)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        kv_base = kv_block * (n_wg * ROWS) + wg * ROWS
        keys = pl.ds(kv_base, ROWS)
        tile = lambda r: r.at[batch, keys, kv_head]  # noqa: E731
        _load_own(refs, s, bar, wg, {"k": tile, "v": tile,
                                     **({"kv_seg": lambda r: r.at[batch, keys]} if segments else {})})
        kv_seg = plgpu.load(s["kv_seg"].at[wg], layout=_WGMMA.reduce(1)) if segments else None
        scale2 = problem.scale * block_math.LOG2_E
        columns = _WGMMA.reduce(0)

        def head_step(g, carry):
            head = kv_head * G + g

            def step(i, carry, *, partial, segment_mask):  # the transposed tiles: keys × queries
                dk, dv = carry
                slot = lax.rem(i, SLOTS)
                plgpu.barrier_wait(bar("q_ready", slot))
                plgpu.barrier_wait(bar("lse2_ready", slot))
                scores = _mma(None, s["k"].at[wg], s["q"].at[slot].transpose((1, 0)), interpret=problem.interpret)
                lse2 = plgpu.load(s["lse2"].at[slot], layout=columns)
                q_seg = _streamed_segments(s, bar, slot, segments, segment_mask, columns, name="q_seg")
                q_start = problem.q_offset + (visit(i) - g * num_q_blocks) * block_q if partial else 0
                allowed = _allowed(problem, scores.shape, q_start, kv_base, head, partial=partial, q_seg=q_seg,
                                   kv_seg=kv_seg if segment_mask else None, transposed=True)
                p = jnp.exp2(scores * scale2 - _spread(lse2, scores.shape, 1))
                if allowed is not None:
                    p = jnp.where(allowed, p, 0.0)
                plgpu.barrier_wait(bar("dout_ready", slot))
                plgpu.barrier_wait(bar("delta_ready", slot))
                dv, dp = _mma_pair((dv, p.astype(dtype), s["dout"].at[slot]),
                                   (None, s["v"].at[wg], s["dout"].at[slot].transpose((1, 0))),
                                   interpret=problem.interpret, staging=_staging(problem, s, wg))
                delta = plgpu.load(s["delta"].at[slot], layout=columns)
                plgpu.barrier_arrive(bar("dout_free", slot))
                ds = p * (dp - _spread(delta, dp.shape, 1))
                dk = _mma(dk, ds.astype(dtype), s["q"].at[slot], interpret=problem.interpret,
                          staging=_staging(problem, s, wg))
                plgpu.barrier_arrive(bar("q_free", slot))
                return dk, dv
            return _walk(layout, bounds, g, step, carry, segments)

        dk, dv = lax.fori_loop(0, G, head_step, (_zeros((ROWS, D)), _zeros((ROWS, D))))
        s["k"].at[wg][...] = (dk * problem.scale).astype(dtype)
        s["v"].at[wg][...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s["k"].at[wg], refs["dk"].at[batch, keys, kv_head])
        plgpu.copy_smem_to_gmem(s["v"].at[wg], refs["dv"].at[batch, keys, kv_head])
        plgpu.wait_smem_to_gmem(0)


def backward(problem: Problem, q, k, v, row_scale, col_scale, q_segment_ids, kv_segment_ids, stats, delta, dout):
    del row_scale, col_scale  # softplus only
    B, T, Hq, D = q.shape
    S, Hkv, G = k.shape[1], k.shape[2], problem.group
    sizes, segments = problem.block_sizes, problem.has_segments
    common = {"q": q, "k": k, "v": v, "dout": dout, "lse2": block_math.backward_lse2(stats[0]), "delta": delta}
    if segments:
        common.update(q_seg=q_segment_ids, kv_seg=kv_segment_ids)

    # dQ: one block per (query head, query block, batch); the memory warpgroup streams the row's K/V blocks.
    block_q, block_kv = sizes.block_q_dq, sizes.block_kv_dq
    n_wg = block_q // ROWS
    meet, same = _segment_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv) if segments else (None, None)
    visits, bounds = _visit_lists(problem.dq_layout.kinds[:, None], meet, same)
    scratch = {"q": _tiles(n_wg, ROWS, problem), "dout": _tiles(n_wg, ROWS, problem), "lse2": _vectors(n_wg, ROWS),
               "delta": _vectors(n_wg, ROWS), "k": _tiles(SLOTS, block_kv, problem),
               "v": _tiles(SLOTS, block_kv, problem)}
    own, streamed = ("q", "dout", "lse2", "delta"), ("k", "v")
    if segments:
        scratch.update(q_seg=_vectors(n_wg, ROWS, jnp.int32), kv_seg=_vectors(SLOTS, block_kv, jnp.int32))
        own, streamed = own + ("q_seg",), streamed + ("kv_seg",)
    barriers = _Barriers(**{f"{n}_ready": (n_wg, 1) for n in own}, **{f"{n}_ready": (SLOTS, 1) for n in streamed},
                         k_free=(SLOTS, n_wg), v_free=(SLOTS, n_wg))
    body = functools.partial(_dq_body, problem=problem, n_wg=n_wg, block_kv=block_kv)
    (dq,) = _run(problem, "flash_backward_dq", body, (Hq, T // block_q, B), ("heads", "q_seq", "batch"), n_wg,
                 {**common, "visits": visits, "bounds": bounds}, {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype)},
                 scratch, barriers, block_kv)

    # dK/dV: one block per (kv head, key block, batch), looping over the G query heads of the kv head.
    block_q, block_kv = sizes.block_q_dkv, sizes.block_kv_dkv
    n_wg = block_kv // ROWS
    layout = problem.dkdv_layout
    kinds = np.swapaxes(layout.kinds, 1, 2)  # [Hm, key blocks, query blocks]
    kinds = kinds.reshape(Hkv, G, *kinds.shape[1:]) if layout.num_mask_heads > 1 else \
        np.broadcast_to(kinds[:, None], (1, G, *kinds.shape[1:]))
    meet, same = _segment_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv) if segments else (None, None)
    visits, bounds = _visit_lists(kinds, *((None, None) if meet is None else
                                           (jnp.swapaxes(meet, 1, 2), jnp.swapaxes(same, 1, 2))))
    scratch = {"k": _tiles(n_wg, ROWS, problem), "v": _tiles(n_wg, ROWS, problem),
               "q": _tiles(SLOTS, block_q, problem), "dout": _tiles(SLOTS, block_q, problem),
               "lse2": _vectors(SLOTS, block_q), "delta": _vectors(SLOTS, block_q)}
    own, streamed = ("k", "v"), ("q", "dout", "lse2", "delta")
    if segments:
        scratch.update(kv_seg=_vectors(n_wg, ROWS, jnp.int32), q_seg=_vectors(SLOTS, block_q, jnp.int32))
        own, streamed = own + ("kv_seg",), streamed + ("q_seg",)
    barriers = _Barriers(**{f"{n}_ready": (n_wg, 1) for n in own}, **{f"{n}_ready": (SLOTS, 1) for n in streamed},
                         q_free=(SLOTS, n_wg), dout_free=(SLOTS, n_wg))
    body = functools.partial(_dkdv_body, problem=problem, n_wg=n_wg, block_q=block_q)
    dk, dv = _run(problem, "flash_backward_dkdv", body, (Hkv, S // block_kv, B), ("heads", "kv_seq", "batch"), n_wg,
                  {**common, "visits": visits, "bounds": bounds},
                  {"dk": jax.ShapeDtypeStruct(k.shape, k.dtype), "dv": jax.ShapeDtypeStruct(v.shape, v.dtype)},
                  scratch, barriers, block_q)
    return dq, dk, dv, None, None
