"""Model FLOPs of a training step, and model FLOPs utilisation (MFU).

The count of PaLM (Chowdhery et al., 2022, appendix B), as MaxText and torchtitan report it. A weight of a matmul
costs 2 FLOPs per token forward and 4 backward; attention's two matmuls (Q·Kᵀ and P·V) cost 4·D FLOPs per head per
(query, key) pair forward and twice that backward. Per training sequence of T tokens:

    FLOPs = 6 · N · T  +  12 · L · H · D · pairs,     pairs = T² · a

N: the weights of the matmuls (q, k, v, o projections, the SwiGLU MLP, the output head), not the embedding lookup,
biases or norm scales; L layers, H query heads of dimension D; a: the share of (query, key) pairs attended, ½ for
causal attention (PaLM counts it at ½ too; the diagonal's T/2 extra pairs are left out). Recomputation by remat
is not counted: this is model FLOPs, not hardware FLOPs, so remat lowers MFU.

    MFU = FLOPs per step / (step seconds · devices · peak FLOP/s of one device)
"""

import dataclasses

FORMULA = "6·N·tokens + 12·L·H·D·T²·a per sequence (a = ½ causal); N = matmul weights"

# Dense bf16 peak FLOP/s by device_kind prefix (vendor data sheets; SXM parts, without sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def matmul_params(model_config) -> int:
    """N: the weights every token multiplies (a `LlamaConfig`): per layer the q, k, v, o projections and the three
    SwiGLU matrices, and the output head vocab × hidden (the embedding matrix again when tied)."""
    c = model_config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attention + mlp) + c.vocab_size * c.hidden_size


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one training step, split into the weights' matmuls and attention's."""

    dense: float
    attention: float

    @property
    def total(self) -> float:
        return self.dense + self.attention


def step_flops(model_config, seq_len: int, batch_size: int, attended: float = 0.5) -> StepFlops:
    """FLOPs of a step over `batch_size` sequences of `seq_len` tokens, `attended` the share of (query, key) pairs
    the mask keeps (½ for causal)."""
    if not 0 < attended <= 1:
        raise ValueError(f"attended must be in (0, 1], got {attended}")
    c = model_config
    dense = 6 * matmul_params(c) * seq_len
    attention = 12 * c.num_layers * c.num_heads * c.head_dim * seq_len**2 * attended
    return StepFlops(float(batch_size * dense), float(batch_size * attention))


def peak_flops(device_kind: str, given: float | None = None) -> float | None:
    """`given` (FLOP/s) if set, else the data-sheet dense bf16 peak of `device_kind` (its longest matching prefix in
    PEAK_BF16_FLOPS; None when none matches)."""
    if given is not None:
        return given
    matches = [kind for kind in PEAK_BF16_FLOPS if device_kind.startswith(kind)]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops: float, seconds: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation of `flops` done in `seconds` on `num_devices` devices of `peak` FLOP/s each."""
    return flops / (seconds * num_devices * peak)
