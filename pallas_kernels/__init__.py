"""pallas_kernels: block-sparse flash attention in Pallas for Hopper GPUs (Mosaic GPU), other CUDA GPUs (Triton) and
TPUs (Mosaic TPU). Standalone: imports jax and numpy, never longctx.

    from pallas_kernels import flash_attention, masks
    out = flash_attention(q, k, v, mask=masks.SlidingWindow(1024), segment_ids=ids)
    out = decode_attention(q_new, k_cache, v_cache, lengths)  # split-K decoding over a KV cache (pallas_kernels.decode)
"""

from pallas_kernels import masks
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash.attention import BlockSizes, flash_attention, flash_attention_backward
from pallas_kernels.flash.layout import BlockLayout, block_layout
from pallas_kernels.flash.normalizers import Softmax, Softplus
from pallas_kernels.reference import reference_attention

__all__ = ["BlockLayout", "BlockSizes", "Softmax", "Softplus", "block_layout", "decode_attention", "flash_attention",
           "flash_attention_backward", "masks", "reference_attention"]
