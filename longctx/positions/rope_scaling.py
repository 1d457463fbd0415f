"""RoPE frequency scalings that stretch a model's context: PI, NTK, dynamic NTK, YaRN, LongRoPE, Llama 3.

Each changes the inverse frequencies of `rope.RoPE` (and, for YaRN and LongRoPE, multiplies cos and sin by an
attention factor), with the semantics of HF transformers' `modeling_rope_utils`, so that an HF config maps onto
these schemes exactly (`positions.from_hf_config`). `original_max_position_embeddings` is the context length the
model was trained for (M below); in a longctx config it may be left None, which means the run's `data.seq_len`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from longctx.positions.registry import register
from longctx.positions.rope import RoPE, check_positive, inverse_powers

TRAIN_LENGTH_FIELD = "original_max_position_embeddings"


def check_train_length(scheme) -> None:
    value = getattr(scheme, TRAIN_LENGTH_FIELD)
    if value is None:
        raise ValueError(f"position scheme {scheme.scheme_name!r} needs positions.{TRAIN_LENGTH_FIELD}, the context "
                         f"length the model was trained for (in a longctx config, None means data.seq_len)")
    check_positive(TRAIN_LENGTH_FIELD, value, integer=True)


@register("linear")
class LinearScaling(RoPE):
    """Position interpolation: positions are divided by `factor`, i.e. inv_freq_i = theta^(-2i/R) / factor.

    Chen et al., "Extending Context Window of Large Language Models via Positional Interpolation" (2023); kaiokendev
    (2023). HF rope_type "linear".
    """

    factor: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return (inverse_powers(self.theta, self.exponents()) / self.factor).astype(np.float32)

    def hf_rope_parameters(self) -> dict:
        return {"rope_type": "linear", "rope_theta": self.theta, "factor": self.factor, **self._hf_partial()}


def ntk_theta(theta: float, alpha, rotary_dim: int):
    """NTK-aware base: theta · alpha^(R / (R − 2)), which keeps the highest frequency and divides the lowest by
    alpha (bloc97, "NTK-Aware Scaled RoPE", 2023). `alpha` may be a numpy or traced jax array."""
    return theta * alpha ** (rotary_dim / (rotary_dim - 2))


@register("ntk")
class NTKScaling(RoPE):
    """Fixed NTK-aware scaling: base' = theta · α^(R/(R−2)) with α = `factor`; inv_freq_i = base'^(-2i/R).

    bloc97, "NTK-Aware Scaled RoPE allows LLaMA models to have extended (8k+) context size without any fine-tuning"
    (2023); Peng et al., "YaRN" (2023), section 3.1. Not an HF rope type (HF has its dynamic form, `dynamic`).
    """

    factor: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)
        if self.rotary_dim < 4:
            raise ValueError(f"NTK scaling needs a rotary width R >= 4 (base exponent R/(R-2)), got {self.rotary_dim}")

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        theta = ntk_theta(self.theta, np.float64(self.factor), self.rotary_dim)
        return inverse_powers(theta, self.exponents()).astype(np.float32)

    def hf_rope_parameters(self) -> dict:
        theta = float(ntk_theta(self.theta, np.float64(self.factor), self.rotary_dim))
        return {"rope_type": "default", "rope_theta": theta, **self._hf_partial()}


@register("dynamic")
class DynamicNTK(RoPE):
    """Dynamic NTK: the NTK base follows the length L of the sequence at hand, as a traced value under jit.

    emozilla, "Dynamically Scaled RoPE further increases performance of long context LLaMA with zero fine-tuning"
    (2023); HF rope_type "dynamic". With M = `original_max_position_embeddings` and L' = max(L, M):

        base(L) = theta · (factor · L' / M − (factor − 1))^(R / (R − 2)),    inv_freq_i = base(L)^(-2i/R),

    so at L ≤ M it is plain RoPE. L is max(position) + 1 over the batch, as in HF. Each call follows its own length:
    HF's module also keeps the base of the longest sequence it has seen until a call falls back to M or below, so in
    generate() its later, shorter calls reuse the grown base; ours never remember.
    """

    factor: float = 4.0
    original_max_position_embeddings: int | None = None

    length_dependent = True

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)
        check_train_length(self)
        if self.rotary_dim < 4:
            raise ValueError(f"NTK scaling needs a rotary width R >= 4 (base exponent R/(R-2)), got {self.rotary_dim}")

    def base(self, seq_len, xp=np):
        """The NTK base for a sequence of `seq_len` tokens (a number, or a traced array when xp is jnp)."""
        longest = xp.maximum(seq_len, self.original_max_position_embeddings)
        alpha = self.factor * longest / self.original_max_position_embeddings - (self.factor - 1)
        return ntk_theta(self.theta, alpha, self.rotary_dim)

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        seq_len = self.original_max_position_embeddings if seq_len is None else seq_len
        return inverse_powers(self.base(np.float64(seq_len)), self.exponents()).astype(np.float32)

    def traced_inv_freq(self, seq_len: jax.Array) -> jax.Array:
        return 1.0 / self.base(seq_len.astype(jnp.float32), jnp) ** jnp.asarray(self.exponents())

    def hf_rope_parameters(self) -> dict:
        # HF's dynamic NTK measures against config.max_position_embeddings, which `models.hf.save` sets to M.
        return {"rope_type": "dynamic", "rope_theta": self.theta, "factor": self.factor, **self._hf_partial()}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 · mscale · ln(scale) + 1 for scale > 1, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(theta: float, exponents: np.ndarray, rotary_dim: int, factor: float, original: int,
                  beta_fast: float, beta_slow: float, truncate: bool) -> np.ndarray:
    """YaRN's "NTK-by-parts" frequencies (float64): interpolate (÷ factor) the dimensions that turn fewer than
    beta_slow times over the original context, keep those that turn more than beta_fast times, ramp linearly between.

    The dimension that turns r times over M tokens is R · ln(M / (2π r)) / (2 ln theta) (floored / ceiled when
    `truncate`), the ramp runs over dimension indices [low, high] clipped to [0, R − 1], as in HF.
    """

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp.astype(np.float64)
    extrapolation = inverse_powers(theta, exponents)
    return extrapolation / factor * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


@register("yarn")
class YaRN(RoPE):
    """YaRN: NTK-by-parts interpolation plus an attention temperature, with HF's semantics.

    Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models" (2023). inv_freq blends
    theta^(-2i/R) / factor (interpolated) and theta^(-2i/R) (extrapolated) with a linear ramp over the dimensions
    between the correction dims of `beta_fast` and `beta_slow` rotations over M = `original_max_position_embeddings`
    (`yarn_inv_freq`). cos and sin are multiplied by the attention factor, so logits by its square:
    `attn_factor` (HF's `attention_factor`) if given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    when both are set (DeepSeek), else 0.1 · ln(factor) + 1.
    """

    factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attn_factor: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)
        check_train_length(self)
        check_positive("beta_fast", self.beta_fast)
        check_positive("beta_slow", self.beta_slow)
        if not isinstance(self.truncate, bool):
            raise ValueError(f"positions.truncate must be True or False, got {self.truncate!r}")
        for name in ("mscale", "mscale_all_dim", "attn_factor"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return yarn_inv_freq(self.theta, self.exponents(), self.rotary_dim, self.factor,
                             self.original_max_position_embeddings, self.beta_fast, self.beta_slow,
                             self.truncate).astype(np.float32)

    def attention_factor(self, seq_len: int | None = None) -> float:
        if self.attn_factor is not None:
            return float(self.attn_factor)
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def hf_rope_parameters(self) -> dict:
        parameters = {"rope_type": "yarn", "rope_theta": self.theta, "factor": self.factor,
                      "original_max_position_embeddings": self.original_max_position_embeddings,
                      "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate}
        optional = {"mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim, "attention_factor": self.attn_factor}
        return {**parameters, **{k: v for k, v in optional.items() if v is not None}, **self._hf_partial()}


@register("longrope")
class LongRoPE(RoPE):
    """LongRoPE: a searched rescale factor per frequency, one list for short and one for long sequences.

    Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens" (2024); HF rope_type "longrope"
    (Phi-3). inv_freq_i = theta^(-2i/R) / λ_i, with λ = `long_factor` when the sequence at hand is longer than
    M = `original_max_position_embeddings` (a traced switch under jit, as HF's forward does) and `short_factor`
    otherwise. cos and sin are multiplied by `attn_factor` if given, else sqrt(1 + ln(factor) / ln M) (1 when
    factor <= 1). Without lists, short_factor is all ones and long_factor the YaRN rescale for `factor` (λ_i =
    theta^(-2i/R) / yarn_inv_freq_i), one of the starting points of LongRoPE's search.
    """

    factor: float = 4.0
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attn_factor: float | None = None

    length_dependent = True

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()
        check_positive("factor", self.factor)
        check_train_length(self)
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != self.rotary_dim // 2:
                raise ValueError(f"positions.{name} must have R/2 = {self.rotary_dim // 2} entries (one per rotary "
                                 f"frequency), got {len(values)}")
            if not all(isinstance(v, (int, float)) and v > 0 for v in values):
                raise ValueError(f"positions.{name} must hold positive numbers, got {values}")
        if self.attn_factor is not None:
            check_positive("attn_factor", self.attn_factor)

    def rescale_factors(self, long: bool) -> np.ndarray:
        """λ [R/2] float32 for long (> M tokens) or short sequences."""
        given = self.long_factor if long else self.short_factor
        if given is not None:
            return np.asarray(given, np.float32)
        if not long:
            return np.ones(self.rotary_dim // 2, np.float32)
        yarn = yarn_inv_freq(self.theta, self.exponents(), self.rotary_dim, self.factor,
                             self.original_max_position_embeddings, 32.0, 1.0, True)
        return (inverse_powers(self.theta, self.exponents()) / yarn).astype(np.float32)

    def _inv_freq(self, long: bool) -> np.ndarray:
        return (1.0 / (self.rescale_factors(long).astype(np.float64)
                       / inverse_powers(self.theta, self.exponents()))).astype(np.float32)

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return self._inv_freq(long=seq_len is not None and seq_len > self.original_max_position_embeddings)

    def traced_inv_freq(self, seq_len: jax.Array) -> jax.Array:
        long = seq_len > self.original_max_position_embeddings
        return jnp.where(long, jnp.asarray(self._inv_freq(True)), jnp.asarray(self._inv_freq(False)))

    def attention_factor(self, seq_len: int | None = None) -> float:
        if self.attn_factor is not None:
            return float(self.attn_factor)
        if self.factor <= 1:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

    def hf_rope_parameters(self) -> dict:
        parameters = {"rope_type": "longrope", "rope_theta": self.theta, "factor": self.factor,
                      "original_max_position_embeddings": self.original_max_position_embeddings,
                      "short_factor": [float(v) for v in self.rescale_factors(long=False)],
                      "long_factor": [float(v) for v in self.rescale_factors(long=True)]}
        if self.attn_factor is not None:
            parameters["attention_factor"] = self.attn_factor
        return {**parameters, **self._hf_partial()}


@register("llama3")
class Llama3Scaling(RoPE):
    """Llama 3.1's frequency-dependent interpolation; HF rope_type "llama3".

    Grattafiori et al., "The Llama 3 Herd of Models" (2024). With wavelength w_i = 2π / inv_freq_i and
    M = `original_max_position_embeddings`: frequencies with w_i < M / high_freq_factor are kept, those with
    w_i > M / low_freq_factor are divided by `factor`, and in between s = (M / w_i − low) / (high − low) blends
    them: inv_freq_i · ((1 − s) / factor + s).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)
        check_positive("low_freq_factor", self.low_freq_factor)
        check_positive("high_freq_factor", self.high_freq_factor)
        check_train_length(self)
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"positions.high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"positions.low_freq_factor ({self.low_freq_factor})")

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        # float32 arrays with thresholds from float64 scalars, in HF's order, so the same frequencies fall in each band.
        f32 = np.float32
        original = self.original_max_position_embeddings
        inv_freq = inverse_powers(self.theta, self.exponents()).astype(f32)
        low_wavelen, high_wavelen = f32(original / self.low_freq_factor), f32(original / self.high_freq_factor)
        factor = f32(self.factor)
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        band = f32(self.high_freq_factor - self.low_freq_factor)
        smooth = (f32(original) / wavelen - f32(self.low_freq_factor)) / band
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32)

    def hf_rope_parameters(self) -> dict:
        return {"rope_type": "llama3", "rope_theta": self.theta, "factor": self.factor,
                "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings, **self._hf_partial()}
