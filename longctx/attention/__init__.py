"""Attention: mask specs (`masks`), the pure-jnp oracle (`reference_attention`) and the dispatching `attention`.

`attention(q, k, v, mask=masks.Causal(), segment_ids=..., impl="auto")` with q [B, T, Hq, D] and k, v [B, S, Hkv, D]
→ [B, T, Hq, D]. `impl_names()` lists the implementations; see `dispatch.py` for what each honours. `normalizers`
holds softmax and softplus attention; `merge_attention` combines attention over disjoint key sets by log-sum-exp.
"""

from pallas_kernels import masks  # the one mask vocabulary, as longctx.attention.masks too

from longctx.attention import normalizers
from longctx.attention.dispatch import attention, cudnn_unsupported_reason, impl_names
from longctx.attention.merge import merge_attention
from longctx.attention.reference import reference_attention

__all__ = ["attention", "cudnn_unsupported_reason", "impl_names", "masks", "merge_attention", "normalizers",
           "reference_attention"]
