"""impl="pallas": longctx attention on `pallas_kernels.flash_attention`, the block-sparse flash kernels.

The kernels take longctx's masks as they are (`pallas_kernels.masks` is the one vocabulary) and skip every block the
mask empties, in the forward and both backward kernels. What they cannot honour is refused by `unsupported_reason`
before any work:

- masks read at trace time only (`Explicit`, `BlockMask`) whose blocks are not each all allowed or all masked;
- segment ids with a mask that is not `relative` (the kernels mask row positions; longctx evaluates such masks on
  positions within each document);
- a traced q_offset (the block layout is built at trace time), ALiBi biases;
- and whatever the chosen pallas_kernels backend refuses (its reason is passed on: dtypes, head dims, block sizes,
  softplus re-weighting).

On Hopper the Mosaic GPU kernels run what they can (softmax, bfloat16 / float16) and Triton the rest; see
`candidate_backends`. "pallas_interpret" runs the Triton kernels in Pallas interpret mode, so CPU tests exercise this
path.
"""

import pallas_kernels
from pallas_kernels.flash.attention import plan

from longctx.attention import normalizers


def candidate_backends(platform: str, capability: tuple[int, int] | None, interpret: bool) -> tuple[str, ...]:
    """The pallas_kernels backends impl="pallas" tries, best first: Mosaic GPU then Triton on Hopper and later
    (Mosaic GPU is softmax on bfloat16/float16 only), Triton on other CUDA GPUs and in interpret mode, Mosaic TPU on
    TPUs."""
    if interpret:
        return ("triton",)
    if platform == "tpu":
        return ("tpu",)
    return ("mosaic_gpu", "triton") if capability and capability >= (9, 0) else ("triton",)


def choose_backend(request, *, interpret: bool = False) -> tuple[str | None, str | None]:
    """(the backend that serves a longctx dispatch Request, None), or (None, why none can)."""
    if not interpret and request.platform not in ("gpu", "tpu"):
        return None, f"the pallas kernels need a CUDA GPU or a TPU (backend is {request.platform})"
    if request.q_offset is None:
        return None, "the pallas kernels need a static q_offset (their block layout is built at trace time)"
    if request.has_alibi:
        return None, "the pallas kernels add no ALiBi bias"
    if request.has_segment_ids and not request.mask.relative:
        return None, (f"the pallas kernels apply {request.mask!r} on row positions, but with segment ids longctx "
                      f"evaluates a mask that is not relative on positions within each document")
    reasons = []
    for backend in candidate_backends(request.platform, request.compute_capability, interpret):
        try:
            plan(request.q_shape, request.k_shape, request.dtype, mask=request.mask,
                 has_segments=request.has_segment_ids, normalizer=request.normalizer, q_offset=request.q_offset,
                 return_lse=request.return_lse, backend=backend, interpret=interpret)
            return backend, None
        except (NotImplementedError, ValueError) as e:
            reasons.append(str(e))
    return None, "; ".join(reasons)


def unsupported_reason(request, *, interpret: bool = False) -> str | None:
    """Why impl="pallas" (or "pallas_interpret") cannot serve a longctx dispatch Request, or None."""
    return choose_backend(request, interpret=interpret)[1]


def attention(q, k, v, *, mask, segment_ids, kv_segment_ids, normalizer, scale, q_offset, alibi_slopes, return_lse,
              request, interpret: bool = False):
    """The dispatch implementation: arguments already checked by longctx (see dispatch.Implementation)."""
    del alibi_slopes  # refused by unsupported_reason
    backend, reason = choose_backend(request, interpret=interpret)
    if backend is None:
        raise NotImplementedError(reason)
    softplus = isinstance(normalizer, normalizers.Softplus)
    return pallas_kernels.flash_attention(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, normalizer=normalizer,
        scale=None if softplus else scale, q_offset=q_offset, return_lse=return_lse, backend=backend,
        interpret=interpret)
