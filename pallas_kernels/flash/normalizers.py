"""How the kernels turn scores into weights: softmax, or length-scaled softplus with the l1 normaliser (LSSA).

Softplus attention is Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large
Language Models" (2025, arXiv 2501.13428). For query i with N_i visible keys, head dim d, and the unit vectors
q̂_i = q_i / max(|q_i|, 1e-6), k̂_j = k_j / max(|k_j|, 1e-6):

    s_ij = log(d) · log(max(N_i, 1)) · q̂_i·k̂_j
    a_ij = softplus(s_ij) / Σ_j' softplus(s_ij')                       (over visible keys)

and with `reweight`, r_ij = relu(N_i · a_ij − O_i)^p normalised over the row, where O_i = `offset` except on rows
that see at most `offset_free_keys` keys (O_i = 0 there); a row where every key is at or below O_i keeps a_ij.
The kernels compute s_ij as f_i · (q_i·k_j) · u_j with f_i = log(d) · log(N_i) / max(|q_i|, 1e-6) and
u_j = 1 / max(|k_j|, 1e-6), so the dot product runs on the inputs as given.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Softmax:
    """exp(scale · q·k) normalised over the visible keys."""

    name = "softmax"


@dataclasses.dataclass(frozen=True)
class Softplus:
    """Length-scaled softplus attention with the l1 normaliser, optionally re-weighted (module docstring)."""

    reweight: bool = False
    power: float = 15.0
    offset: float = 1.0
    offset_free_keys: int = 3

    name = "softplus"

    def __post_init__(self):
        if not isinstance(self.reweight, bool):
            raise ValueError(f"Softplus: reweight must be True or False, got {self.reweight!r}")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or self.power < 1:
            raise ValueError(f"Softplus: power must be a number >= 1, got {self.power!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, float)) or self.offset < 0:
            raise ValueError(f"Softplus: offset must be a number >= 0, got {self.offset!r}")
        if isinstance(self.offset_free_keys, bool) or not isinstance(self.offset_free_keys, int) \
                or self.offset_free_keys < 0:
            raise ValueError(f"Softplus: offset_free_keys must be an int >= 0, got {self.offset_free_keys!r}")


Normalizer = Softmax | Softplus


def get(normalizer: "str | Normalizer") -> Normalizer:
    if isinstance(normalizer, (Softmax, Softplus)):
        return normalizer
    if normalizer == "softmax":
        return Softmax()
    if normalizer == "softplus":
        return Softplus()
    raise ValueError(f"normalizer must be 'softmax', 'softplus' or a pallas_kernels Softmax/Softplus, "
                     f"got {normalizer!r}")
