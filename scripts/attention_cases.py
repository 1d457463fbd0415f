"""The shapes and masks scripts/bench_attention.py measures (issue 5's targets): bf16, batch 1, 32 heads, head dim 128.

Each case names its mask as pallas_kernels sees it and, where cuDNN can compute the same thing, how cuDNN is called
(`cudnn`: None when it cannot). Segment ids, when a case has them, come from `documents` (lengths of the packed
documents, repeated to fill the sequence).
"""

import dataclasses

from pallas_kernels import masks


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    length: int
    mask: masks.Mask
    cudnn: dict | None  # keyword arguments of jax.nn.dot_product_attention(implementation="cudnn"), or None
    documents: tuple[int, ...] | None = None
    normalizer: str = "softmax"
    heads: int = 32
    head_dim: int = 128


CASES = [
    Case("causal_16k", 16384, masks.Causal(), {"is_causal": True}),
    Case("causal_32k", 32768, masks.Causal(), {"is_causal": True}),
    Case("window1024_32k", 32768, masks.SlidingWindow(1024), {"is_causal": True, "local_window_size": (1023, 0)}),
    Case("s2_strided_32k", 32768, masks.StridedHeads(block=128, local_blocks=8, stride=16), None),
    Case("documents_32k", 32768, masks.Causal(), None, documents=(1024, 3072, 2048, 4096, 1536, 2560)),
    Case("softplus_causal_16k", 16384, masks.Causal(), None, normalizer="softplus"),
]
