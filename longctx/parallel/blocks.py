"""One step of context-parallel attention: the local queries against one shard of keys, forward and backward.

The strategies of `context.py` (ring, all-gather) attend the queries a device holds to the key/value shards of every
device, one shard at a time, merging the partial results by log-sum-exp (`merge_attention`); their backward passes
hand each shard the merged out and lse, so that the shard's gradient is its exact share of the whole
(`softmax_attention_backward`, FlashAttention-2's backward with the rows' statistics given).

Two implementations of a step:
- `DenseSteps` evaluates the mask on the global positions that travel with each shard (positions within the
  document for masks that are not relative, when there are segment ids), in pure jnp: every mask, every layout. It is
  the reference on CPU.
- `KernelSteps` runs the Pallas flash kernels, which take static masks over contiguous positions. Where a device's
  queries and a shard's keys sit in the sequence is static for each (device, step) pair (`layout.pieces`), so every
  pair becomes a few kernel calls on contiguous runs — skipped when the mask empties them, a full mask when it fills
  them, the mask at a static q_offset otherwise — and a `lax.switch` on the device index picks this device's calls
  among the distinct ones at run time.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import masks

from longctx.attention import dispatch, pallas
from longctx.attention.merge import merge_attention
from longctx.attention.reference import softmax_attention, softmax_attention_backward
from longctx.parallel import layout as layout_lib
from longctx.parallel.layout import Piece

PiecesOf = Callable[[int], tuple[Piece, ...]]  # device index → the global positions of a shard, as runs


@dataclasses.dataclass(frozen=True)
class Side:
    """What travels with a shard of queries or keys: segment ids [B, L] and, for the dense steps, mask positions
    [B, L] (either may be None)."""

    segment_ids: jax.Array | None
    positions: jax.Array | None


jax.tree_util.register_dataclass(Side, data_fields=["segment_ids", "positions"], meta_fields=[])


def _allowed(mask: masks.Mask, q: Side, kv: Side) -> jax.Array:
    """bool [B, 1, T, S] (one pattern for every head: context parallelism refuses per-head masks)."""
    allowed = mask(q.positions[:, None, :, None], kv.positions[:, None, None, :])
    if q.segment_ids is None:
        return allowed
    q_seg, kv_seg = q.segment_ids[:, None, :, None], kv.segment_ids[:, None, None, :]
    return allowed & (q_seg == kv_seg) & (q_seg != 0)


@dataclasses.dataclass(frozen=True)
class DenseSteps:
    """Steps in pure jnp on the positions that travel with each shard."""

    mask: masks.Mask
    scale: float
    needs_positions = True

    def forward(self, acc, q, q_side: Side, k, v, kv_side: Side, kv_pieces: PiecesOf):
        del kv_pieces
        part = softmax_attention(q, k, v, _allowed(self.mask, q_side, kv_side), scale=self.scale)
        return merge_attention([acc, part], return_lse=True)

    def backward(self, q, q_side: Side, k, v, kv_side: Side, kv_pieces: PiecesOf, out, lse, cotangents):
        del kv_pieces
        dout, dlse = cotangents
        return softmax_attention_backward(q, k, v, _allowed(self.mask, q_side, kv_side), out, lse, dout,
                                          scale=self.scale, dlse=dlse)


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel call of a step: local query rows q_rows, local key rows kv_rows, a static mask and q_offset."""

    q_rows: tuple[int, int]
    kv_rows: tuple[int, int]
    mask: masks.Mask
    q_offset: int = 0


_EMPTY, _FULL = "empty", "full"


def pair_call(mask: masks.Mask, q: Piece, kv: Piece) -> Call | str:
    """The kernel call for query run `q` against key run `kv`, or "empty" / "full" when the mask empties or fills
    the pair. NotImplementedError when the pair's mask is not a static mask at a static non-negative q_offset."""
    rows = (q.local_start, q.local_start + q.length), (kv.local_start, kv.local_start + kv.length)
    if isinstance(mask, masks.Full):
        return _FULL
    if q.stride == kv.stride == 1:
        q_hi, kv_hi = q.global_start + q.length - 1, kv.global_start + kv.length - 1
        never, always = mask.classify(q.global_start, q_hi, kv.global_start, kv_hi)
        if bool(np.all(never)):
            return _EMPTY
        if bool(np.all(always)):
            return _FULL
        if not mask.relative:
            if kv.global_start == 0:
                return Call(*rows, mask, q.global_start)
        elif q.global_start >= kv.global_start:
            return Call(*rows, mask, q.global_start - kv.global_start)
        elif not np.any(mask(np.zeros(kv.length, int), np.arange(1, kv.length + 1))):
            # No key after its query: the queries before the first key see nothing; the rest start at offset 0.
            skip = kv.global_start - q.global_start
            return Call((rows[0][0] + skip, rows[0][1]), rows[1], mask, 0)
    elif q.stride == kv.stride and isinstance(mask, masks.Causal):
        # Strided runs a + N·t and b + N·s: key s is visible iff N·(s − t) <= a − b, i.e. s <= t + floor((a − b) / N).
        shift = (q.global_start - kv.global_start) // q.stride
        return Call(*rows, masks.Causal(), shift) if shift >= 0 else Call(*rows, masks.Distant(-shift))
    raise NotImplementedError(
        f"the Pallas kernels cannot serve {mask!r} between the query run {q} and the key run {kv}: a static mask at "
        f"a static q_offset >= 0 needs a relative mask (or keys from position 0) on contiguous runs, and striped "
        f"runs serve the causal and full masks only; use the contiguous layout or impl='reference'")


def plan_calls(mask: masks.Mask, q_pieces: tuple[Piece, ...], kv_pieces: tuple[Piece, ...]) -> tuple[Call, ...]:
    """The kernel calls that attend every query run to every key run, merged where the mask allows: one call over
    everything when every pair is full, or when queries and keys are the same monotone runs under a causal mask
    (the diagonal step); a call per key run whose pairs are all full, per query run likewise; else one per pair."""
    q_len = sum(p.length for p in q_pieces)
    kv_len = sum(p.length for p in kv_pieces)
    if q_pieces == kv_pieces and isinstance(mask, (masks.Causal, masks.Full)) and all(
            p.global_start + p.stride * p.length <= n.global_start for p, n in zip(q_pieces, q_pieces[1:])) and \
            len({p.stride for p in q_pieces}) == 1:
        return (Call((0, q_len), (0, kv_len), mask),)
    grid = [[pair_call(mask, q, kv) for kv in kv_pieces] for q in q_pieces]
    if all(cell == _FULL for row in grid for cell in row):
        return (Call((0, q_len), (0, kv_len), masks.Full()),)
    calls, done = [], set()
    for j, kv in enumerate(kv_pieces):
        if all(row[j] == _FULL for row in grid):
            calls.append(Call((0, q_len), (kv.local_start, kv.local_start + kv.length), masks.Full()))
            done.update((i, j) for i in range(len(q_pieces)))
    for i, q in enumerate(q_pieces):
        if not any((i, j) in done for j in range(len(kv_pieces))) and all(cell == _FULL for cell in grid[i]):
            calls.append(Call((q.local_start, q.local_start + q.length), (0, kv_len), masks.Full()))
            done.update((i, j) for j in range(len(kv_pieces)))
    for i, q in enumerate(q_pieces):
        for j, kv in enumerate(kv_pieces):
            cell = grid[i][j]
            if (i, j) in done or cell == _EMPTY:
                continue
            calls.append(Call((q.local_start, q.local_start + q.length), (kv.local_start, kv.local_start + kv.length),
                              masks.Full()) if cell == _FULL else cell)
    return tuple(calls)


def _rows(x, rows):
    return None if x is None else x[:, rows[0]:rows[1]]


def _put_rows(x, rows, values):
    """x with rows [rows[0], rows[1]) of axis 1 replaced by values (a dynamic_update_slice: on CPU, XLA's scatter
    from `.at[].set` crashed inside shard_map next to interpreted Pallas calls)."""
    if rows == (0, x.shape[1]):
        return values
    return jax.lax.dynamic_update_slice_in_dim(x, values, rows[0], axis=1)


@dataclasses.dataclass(frozen=True)
class KernelSteps:
    """Steps on the Pallas flash kernels (impl "pallas" or "pallas_interpret"), with static calls per device."""

    mask: masks.Mask
    scale: float
    impl: str
    axis: str
    layout: str
    num_devices: int
    shard_len: int
    needs_positions = False

    def q_pieces(self, rank: int) -> tuple[Piece, ...]:
        return layout_lib.pieces(self.layout, rank, self.num_devices, self.shard_len)

    def _switch(self, kv_pieces: PiecesOf, branch: Callable, *operands):
        """Runs branch(calls, *operands) with this device's calls, choosing among the distinct plans by device."""
        plans = [plan_calls(self.mask, self.q_pieces(r), kv_pieces(r)) for r in range(self.num_devices)]
        distinct = list(dict.fromkeys(plans))
        if len(distinct) == 1:
            return branch(distinct[0], *operands)
        index = jnp.asarray([distinct.index(p) for p in plans], jnp.int32)[jax.lax.axis_index(self.axis)]
        return jax.lax.switch(index, [lambda *ops, calls=calls: branch(calls, *ops) for calls in distinct], *operands)

    def forward(self, acc, q, q_side: Side, k, v, kv_side: Side, kv_pieces: PiecesOf):
        def branch(calls, acc, q, q_seg, k, v, kv_seg):
            out, lse = acc
            for call in calls:
                qr, kr = call.q_rows, call.kv_rows
                part = dispatch.attention(
                    _rows(q, qr), _rows(k, kr), _rows(v, kr), mask=call.mask, segment_ids=_rows(q_seg, qr),
                    kv_segment_ids=_rows(kv_seg, kr), scale=self.scale, q_offset=call.q_offset, impl=self.impl,
                    return_lse=True)
                rows_out, rows_lse = merge_attention([(_rows(out, qr), _rows(lse, qr)), part], return_lse=True)
                out, lse = _put_rows(out, qr, rows_out), _put_rows(lse, qr, rows_lse)
            return out, lse

        return self._switch(kv_pieces, branch, acc, q, q_side.segment_ids, k, v, kv_side.segment_ids)

    def backward(self, q, q_side: Side, k, v, kv_side: Side, kv_pieces: PiecesOf, out, lse, cotangents):
        def branch(calls, q, q_seg, k, v, kv_seg, out, lse, dout, dlse):
            dq = jnp.zeros(q.shape, jnp.float32)
            dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
            for call in calls:
                qr, kr = call.q_rows, call.kv_rows
                grads = self._kernel_backward(call, _rows(q, qr), _rows(k, kr), _rows(v, kr), _rows(q_seg, qr),
                                              _rows(kv_seg, kr), _rows(out, qr), _rows(lse, qr), _rows(dout, qr),
                                              _rows(dlse, qr))
                dq = _put_rows(dq, qr, _rows(dq, qr) + grads[0].astype(jnp.float32))
                dk = _put_rows(dk, kr, _rows(dk, kr) + grads[1].astype(jnp.float32))
                dv = _put_rows(dv, kr, _rows(dv, kr) + grads[2].astype(jnp.float32))
            return dq, dk, dv

        return self._switch(kv_pieces, branch, q, q_side.segment_ids, k, v, kv_side.segment_ids, out, lse,
                            *cotangents)

    def _kernel_backward(self, call: Call, q, k, v, q_seg, kv_seg, out, lse, dout, dlse):
        interpret = self.impl == "pallas_interpret"
        request = dispatch.make_request(q, k, mask=call.mask, has_segment_ids=q_seg is not None,
                                        q_offset=call.q_offset, return_lse=True)
        backend, reason = pallas.choose_backend(request, interpret=interpret)
        if backend is None:
            raise NotImplementedError(f"attention impl={self.impl!r} cannot run a ring step: {reason}")
        return pallas_kernels.flash_attention_backward(
            q, k, v, out.astype(q.dtype), lse, dout.astype(q.dtype), dlse, mask=call.mask,
            segment_ids=q_seg, kv_segment_ids=kv_seg, scale=self.scale, q_offset=call.q_offset, backend=backend,
            interpret=interpret)
