"""Split-K (flash-decoding) attention of new tokens over a long KV cache, contiguous or paged: `decode_attention`."""

from pallas_kernels.decode.attention import DecodeProblem, decode_attention

__all__ = ["DecodeProblem", "decode_attention"]
