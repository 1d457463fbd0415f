"""impl="pallas": longctx attention on `pallas_kernels.flash_attention`, the block-sparse flash kernels.

longctx masks become pallas_kernels masks one for one (Full, Causal, SlidingWindow, SinksAndWindow → sinks_and_window,
Distant, and their unions and intersections); the kernels skip every block the mask empties, in the forward and both
backward kernels. What the kernels cannot honour is refused by `unsupported_reason` before any work:

- Explicit [T, S] masks (the kernels take static specs or block masks, not dense arrays);
- segment ids with a mask that is not `relative` (the kernels mask row positions; longctx evaluates such masks on
  positions within each document);
- a traced q_offset (the block layout is built at trace time), ALiBi biases;
- and whatever the chosen pallas_kernels backend refuses (its reason is passed on: dtypes, head dims, block sizes,
  softplus re-weighting).

"pallas_interpret" runs the same kernels (Triton backend) in Pallas interpret mode, so CPU tests exercise this path.
"""

import jax

import pallas_kernels
from pallas_kernels import masks as pallas_masks
from pallas_kernels.flash.attention import plan

from longctx.attention import masks, normalizers


def to_pallas_mask(mask: masks.Mask) -> pallas_masks.Mask:
    """The pallas_kernels mask equal to a longctx mask; NotImplementedError for masks the kernels cannot take."""
    if isinstance(mask, masks.Full):
        return pallas_masks.Full()
    if isinstance(mask, masks.Causal):
        return pallas_masks.Causal()
    if isinstance(mask, masks.SlidingWindow):
        return pallas_masks.SlidingWindow(mask.window)
    if isinstance(mask, masks.SinksAndWindow):
        return pallas_masks.sinks_and_window(mask.sinks, mask.window)
    if isinstance(mask, masks.Distant):
        return pallas_masks.Distant(mask.distance)
    if isinstance(mask, masks.Union):
        return to_pallas_mask(mask.left) | to_pallas_mask(mask.right)
    if isinstance(mask, masks.Intersection):
        return to_pallas_mask(mask.left) & to_pallas_mask(mask.right)
    raise NotImplementedError(f"the pallas kernels take static mask specs, not {mask!r}")


def to_pallas_normalizer(normalizer: normalizers.Normalizer):
    if isinstance(normalizer, normalizers.Softplus):
        return pallas_kernels.Softplus(reweight=normalizer.reweight, power=normalizer.power, offset=normalizer.offset,
                                       offset_free_keys=normalizer.offset_free_keys)
    return pallas_kernels.Softmax()


def _backend(platform: str, interpret: bool) -> str:
    """The pallas_kernels backend for a platform: Triton on CUDA GPUs (and in interpret mode), Mosaic TPU on TPUs."""
    return "tpu" if platform == "tpu" and not interpret else "triton"


def unsupported_reason(request, *, interpret: bool = False) -> str | None:
    """Why impl="pallas" (or "pallas_interpret") cannot serve a longctx dispatch Request, or None."""
    if not interpret and request.platform not in ("gpu", "tpu"):
        return f"the pallas kernels need a CUDA GPU or a TPU (backend is {request.platform})"
    if request.q_offset is None:
        return "the pallas kernels need a static q_offset (their block layout is built at trace time)"
    if request.has_alibi:
        return "the pallas kernels add no ALiBi bias"
    if request.has_segment_ids and not request.mask.relative:
        return (f"the pallas kernels apply {request.mask!r} on row positions, but with segment ids longctx evaluates "
                f"a mask that is not relative on positions within each document")
    try:
        mask = to_pallas_mask(request.mask)
        plan(
            request.q_shape, request.k_shape, request.dtype, mask=mask, has_segments=request.has_segment_ids,
            normalizer=to_pallas_normalizer(request.normalizer), q_offset=request.q_offset,
            return_lse=request.return_lse, backend=_backend(request.platform, interpret), interpret=interpret)
    except (NotImplementedError, ValueError) as e:
        return str(e)
    return None


def attention(q, k, v, *, mask, segment_ids, kv_segment_ids, normalizer, scale, q_offset, alibi_slopes, return_lse,
              interpret: bool = False):
    """The dispatch implementation: arguments already checked by longctx (see dispatch.Implementation)."""
    del alibi_slopes  # refused by unsupported_reason
    softplus = isinstance(normalizer, normalizers.Softplus)
    platform = jax.devices()[0].platform
    return pallas_kernels.flash_attention(
        q, k, v, mask=to_pallas_mask(mask), segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        normalizer=to_pallas_normalizer(normalizer), scale=None if softplus else scale, q_offset=q_offset,
        return_lse=return_lse, backend=_backend(platform, interpret), interpret=interpret)
