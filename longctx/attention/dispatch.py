"""`attention(q, k, v, ...)`: one entry point, several implementations, no silent fallbacks.

Implementations live in `IMPLEMENTATIONS` (name → function + the check that says what it cannot do); `auto_order`
says which ones `impl="auto"` tries, best first. Adding a kernel is one entry in each.

- "reference": the pure-jnp oracle of `reference.py`; every mask, segment ids, q_offset, lse, ALiBi, both normalizers.
- "xla": `jax.nn.dot_product_attention(implementation="xla")` with our mask and segment ids as its boolean `mask`
  and ALiBi as its `bias`; the softplus normalizer runs the reference's jnp computation (XLA fuses it).
  jax fills masked logits with a large finite negative, so a row that attends to nothing comes back as the mean of
  v; we set it to 0. jax's residual is not our lse (it is cast to the input dtype, carries no gradient and is finite
  for empty rows), so return_lse computes the lse with the reference's logsumexp (one more q·kᵀ).
  float32 inputs run at jax's default matmul precision (on GPU TF32-class, about 1e-3 off the float32 oracle).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention). It honours softmax
  without ALiBi, and Full, Causal and SlidingWindow(w) masks only, through `is_causal` and
  `local_window_size=(w - 1, 0)` (jax hands cuDNN a window of w: keys i - w < j <= i). cuDNN aligns causal masks
  top-left, which is our q_offset = 0 for any T, S (all checked against the reference on an H100 with jax 0.11.2;
  tests/attention runs that check on a CUDA GPU).
  `cudnn_unsupported_reason` lists what it refuses; the call raises NotImplementedError for those before any work.
- "pallas": `pallas_kernels.flash_attention`, the block-sparse flash kernels (Mosaic GPU on Hopper, Triton on other
  CUDA GPUs, Mosaic TPU); see `pallas.py` for what it refuses. "pallas_interpret" runs them in Pallas interpret mode
  (slow; for tests on CPU).
- "auto": on dense masks (Full, Causal) cudnn, then pallas, then xla; on every other mask pallas first (cuDNN
  computes a sliding window densely; the pallas kernels skip its empty blocks), then cudnn, then xla. It takes the
  first that can serve the request and logs its choice once per choice and reason.
"""

from collections.abc import Callable
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import masks

from longctx.attention import normalizers, pallas
from longctx.attention.reference import alibi_bias, attention_mask, check_arguments, logsumexp, reference_attention

logger = logging.getLogger("longctx.attention")


@dataclasses.dataclass(frozen=True)
class Request:
    """What an implementation must honour, known before any work: shapes q [B, T, Hq, D] and k [B, S, Hkv, D],
    platform ("cpu", "gpu" for a CUDA GPU, "rocm", "tpu"), CUDA compute capability if known, and q_offset
    (None when traced)."""

    q_shape: tuple[int, int, int, int]
    k_shape: tuple[int, int, int, int]
    dtype: jnp.dtype
    mask: masks.Mask
    platform: str
    compute_capability: tuple[int, int] | None = None
    has_segment_ids: bool = False
    q_offset: int | None = 0
    return_lse: bool = False
    normalizer: normalizers.Normalizer = normalizers.Softmax()
    has_alibi: bool = False


def _device_of(x: jax.Array) -> jax.Device:
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return next(iter(x.devices()))
    return jax.devices()[0]


def platform_of(x: jax.Array) -> tuple[str, tuple[int, int] | None]:
    """The platform that holds x (the default device for a traced or numpy x) and its CUDA compute capability."""
    device = _device_of(x)
    platform = device.platform
    if platform == "gpu" and "rocm" in device.client.platform_version.lower():
        platform = "rocm"
    capability = getattr(device, "compute_capability", None)
    return platform, (tuple(int(p) for p in capability.split(".")) if capability else None)


def make_request(q: jax.Array, k: jax.Array, *, mask: masks.Mask, has_segment_ids: bool,
                 q_offset: int | jax.Array = 0, return_lse: bool = False,
                 normalizer: normalizers.Normalizer = normalizers.Softmax(), has_alibi: bool = False) -> Request:
    """The Request of attention on q and k (platform and compute capability from where q lives; a traced q_offset
    becomes None)."""
    platform, capability = platform_of(q)
    return Request(q_shape=tuple(q.shape), k_shape=tuple(k.shape), dtype=q.dtype, mask=mask, platform=platform,
                   compute_capability=capability, has_segment_ids=has_segment_ids,
                   q_offset=q_offset if isinstance(q_offset, int) else None, return_lse=return_lse,
                   normalizer=normalizer, has_alibi=has_alibi)


def cudnn_unsupported_reason(request: Request) -> str | None:
    """Why cuDNN flash attention (through jax.nn.dot_product_attention) cannot run `request`, or None if it can.

    Constraints from jax/_src/cudnn/fused_attention_stablehlo.py (check_layout, check_is_flash_attention) and from
    what jax.nn.dot_product_attention passes through to cuDNN.
    """
    (_, T, _, D), S = request.q_shape, request.k_shape[1]
    if request.platform != "gpu":
        return f"cudnn needs a CUDA GPU (backend is {request.platform})"
    if not isinstance(request.normalizer, normalizers.Softmax):
        return f"cudnn computes softmax attention only, not normalizer={request.normalizer.name!r}"
    if request.has_alibi:
        return "cudnn cannot add ALiBi biases through jax.nn.dot_product_attention's cuDNN path"
    if request.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cudnn needs bfloat16 or float16 inputs, got {jnp.dtype(request.dtype).name}"
    max_head_dim = 256 if request.compute_capability and request.compute_capability >= (9, 0) else 128
    if D % 8 or D > max_head_dim:
        return (f"cudnn flash attention needs a head dim that is a multiple of 8 and at most {max_head_dim} "
                f"(256 on compute capability 9.0+, else 128), got D={D}")
    if request.has_segment_ids:
        return ("cudnn cannot honour segment_ids: jax.nn.dot_product_attention's cuDNN path has no packed-document "
                "support (only per-row sequence lengths)")
    if not isinstance(request.mask, (masks.Full, masks.Causal, masks.SlidingWindow)):
        return f"cudnn honours only the masks Full, Causal and SlidingWindow, got {request.mask!r}"
    if not isinstance(request.mask, masks.Full) and request.q_offset != 0:
        return (f"cudnn aligns its causal and window masks top-left (query row t is position t), so q_offset must "
                f"be a static 0, got {'a traced value' if request.q_offset is None else request.q_offset}")
    if isinstance(request.mask, masks.SlidingWindow) and T > S:
        return f"cudnn's sliding window needs T <= S, got T={T}, S={S}"
    if request.return_lse:
        return ("cudnn cannot return the lse: jax returns cuDNN's softmax statistics cast to the input dtype and "
                "passes no gradient through them")
    return None


def _xla(q, k, v, *, mask, segment_ids, kv_segment_ids, normalizer, scale, q_offset, alibi_slopes, return_lse):
    if isinstance(normalizer, normalizers.Softplus):
        return reference_attention(q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                   normalizer=normalizer, q_offset=q_offset)
    T, S = q.shape[1], k.shape[1]
    allowed = attention_mask(mask, T, S, q_offset=q_offset, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                             num_heads=q.shape[2])  # [B or 1, Hq or 1, T, S]
    bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, T, S, q_offset)[None]
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed, scale=scale, implementation="xla")
    sees_something = jnp.any(allowed, axis=-1).transpose(0, 2, 1)[..., None]  # [B or 1, T, Hq or 1, 1]
    out = jnp.where(sees_something, out, jnp.zeros((), out.dtype))
    if not return_lse:
        return out
    return out, logsumexp(q, k, allowed=allowed, scale=scale, alibi_slopes=alibi_slopes, q_offset=q_offset)


def _cudnn(q, k, v, *, mask, segment_ids, kv_segment_ids, normalizer, scale, q_offset, alibi_slopes, return_lse):
    window = mask.window if isinstance(mask, masks.SlidingWindow) else None
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=not isinstance(mask, masks.Full),
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """fn(q, k, v, *, mask, segment_ids, kv_segment_ids, normalizer, scale, q_offset, alibi_slopes, return_lse) on
    checked arguments (normalizer an object; scale resolved for softmax, None for softplus), and request=the Request
    when `takes_request`; unsupported_reason(request) says why it cannot honour a request, or None."""

    fn: Callable[..., jax.Array | tuple[jax.Array, jax.Array]]
    unsupported_reason: Callable[[Request], str | None] = lambda request: None
    takes_request: bool = False


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(reference_attention),
    "xla": Implementation(_xla),
    "cudnn": Implementation(_cudnn, cudnn_unsupported_reason),
    "pallas": Implementation(pallas.attention, pallas.unsupported_reason, takes_request=True),
    "pallas_interpret": Implementation(functools.partial(pallas.attention, interpret=True),
                                       functools.partial(pallas.unsupported_reason, interpret=True),
                                       takes_request=True),
}
DENSE_AUTO_ORDER = ("cudnn", "pallas", "xla")
SPARSE_AUTO_ORDER = ("pallas", "cudnn", "xla")
_LOGGED_CHOICES: set[tuple[str, str]] = set()


def impl_names() -> list[str]:
    """Every value `attention(impl=...)` accepts."""
    return ["auto", *sorted(IMPLEMENTATIONS)]


def auto_order(request: Request) -> tuple[str, ...]:
    """The implementations impl="auto" tries for `request`, best first."""
    return DENSE_AUTO_ORDER if isinstance(request.mask, (masks.Full, masks.Causal)) else SPARSE_AUTO_ORDER


def choose_impl(request: Request) -> str:
    """The implementation impl="auto" runs for `request`: the first in `auto_order` that supports it; logs the choice
    (with why the better ones were passed over) once per distinct choice and reasons."""
    reasons = []
    for name in auto_order(request):
        reason = IMPLEMENTATIONS[name].unsupported_reason(request)
        if reason is None:
            message = "; ".join(reasons)
            if (name, message) not in _LOGGED_CHOICES:
                _LOGGED_CHOICES.add((name, message))
                logger.info("attention impl=auto chose %s%s", name, f": {message}" if message else "")
            return name
        reasons.append(reason)
    raise NotImplementedError(f"attention impl='auto' found no implementation for this request: {'; '.join(reasons)}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: masks.Mask = masks.Causal(),
              segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              normalizer: str | normalizers.Normalizer = "softmax", impl: str = "auto", scale: float | None = None,
              q_offset: int | jax.Array = 0, alibi_slopes: jax.Array | None = None,
              return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head attention with grouped-query heads, a mask spec and packed-document segment ids.

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
    mask: a `pallas_kernels.masks.Mask` (`masks.parse(spec)` reads a config's spec string) over absolute positions
    and query heads; query row t sits at position q_offset + t (q_offset: int or traced
    int32 scalar; S - T for a query block at the end of the keys, as when decoding with a KV cache).
    segment_ids: [B, T] int; kv_segment_ids: [B, S] int, defaulting to segment_ids when S == T. Tokens attend only
    within their segment, and segment 0 (padding) attends to nothing and is attended by nothing; the mask then sees
    positions within the segment, so a packed document gets the mask it would get alone.
    scale: defaults to 1/sqrt(D) (softmax only). normalizer: "softmax", "softplus" or a `normalizers` object.
    alibi_slopes: [Hq] float, adds −slope_h · |i − s| to the logits (softmax only). impl: one of `impl_names()`.
    Returns out [B, T, Hq, D] in q.dtype (exactly 0 on a row that attends to nothing), or (out, lse) with lse
    [B, T, Hq] float32 (-inf on such a row) when return_lse. Semantics: `reference.py`.
    """
    if impl not in impl_names():
        raise ValueError(f"impl must be one of {', '.join(impl_names())}, got {impl!r}")
    segment_ids, kv_segment_ids, q_offset, normalizer = check_arguments(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, normalizer=normalizer,
        q_offset=q_offset, scale=scale, alibi_slopes=alibi_slopes, return_lse=return_lse)
    request = make_request(q, k, mask=mask, has_segment_ids=segment_ids is not None, q_offset=q_offset,
                           return_lse=return_lse, normalizer=normalizer, has_alibi=alibi_slopes is not None)
    name = choose_impl(request) if impl == "auto" else impl
    reason = IMPLEMENTATIONS[name].unsupported_reason(request)
    if reason is not None:
        raise NotImplementedError(f"attention impl={name!r} cannot run this request: {reason}. "
                                  f"impl='xla' runs it, or impl='auto' picks an implementation that can")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if scale is None and isinstance(normalizer, normalizers.Softmax):
        scale = q.shape[-1] ** -0.5
    implementation = IMPLEMENTATIONS[name]
    return implementation.fn(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, normalizer=normalizer,
        scale=scale, q_offset=q_offset, alibi_slopes=alibi_slopes, return_lse=return_lse,
        **({"request": request} if implementation.takes_request else {}))
