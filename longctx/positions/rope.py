"""Rotary position embedding (RoPE), the rotary machinery its extensions share, and the schemes that only change the
base: ABF and HF's proportional RoPE.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). For a head of rotary width R
(`R = head_dim · partial_rotary_factor`, even), frequency i ∈ [0, R/2) is

    inv_freq_i = theta^(-2i / R),    angle(p, i) = p · inv_freq_i,

and each pair (x_i, x_{i+R/2}) of a query or key at position p is rotated by angle(p, i) — the "rotate-half" layout of
GPT-NeoX and HF transformers, so HF checkpoints load unchanged. Dimensions past R pass through (partial rotary, as in
GPT-NeoX / Phi). Then q_m·k_n depends on m − n only. Extensions (PI, NTK, YaRN, ... in `rope_scaling.py`) subclass
`RoPE` and change `inv_freq` and `attention_factor`; the factor multiplies cos and sin, so logits scale by its square
(HF semantics). Frequencies are computed as HF computes them (float32 exponents 2i/R, the rest in float64, rounded to
float32), so `inv_freq` equals HF's within a few float32 ulps.
"""

import jax
import jax.numpy as jnp
import numpy as np

from longctx.positions.base import AttendFn, PositionEncoding, PositionScheme
from longctx.positions.registry import register


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first R dims of each head of x (rotate-half layout); computes in float32, returns x.dtype.

    x: [B, T, H, D]; cos, sin: [B, T, R/2] with R <= D.
    """
    half = cos.shape[-1]
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half : 2 * half], x32[..., 2 * half :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array, attention_factor: float | jax.Array = 1.0):
    """cos and sin of `positions ⊗ inv_freq`, times `attention_factor`: positions [B, T] → two [B, T, R/2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


class RotaryEncoding(PositionEncoding):
    """Rotary tables for queries and keys: each [B, T, R/2] (keys [B, S, R/2]) float32."""

    q_cos: jax.Array
    q_sin: jax.Array
    k_cos: jax.Array
    k_sin: jax.Array

    def rotate(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return apply_rotary(q, self.q_cos, self.q_sin), apply_rotary(k, self.k_cos, self.k_sin)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, attend_fn: AttendFn) -> jax.Array:
        return attend_fn(*self.rotate(q, k), v)

    def encode(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Both rotated by the query tables: k holds the keys of the query tokens."""
        return apply_rotary(q, self.q_cos, self.q_sin), apply_rotary(k, self.q_cos, self.q_sin)


def check_positive(name: str, value, *, at_least: float | None = None, integer: bool = False) -> None:
    """Raises ValueError naming `positions.<name>` unless value is a positive number (an int if `integer`), and at
    least `at_least` if given."""
    kind = "int" if integer else "number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value > 0 or (at_least is not None and value < at_least):
        bound = f" >= {at_least}" if at_least is not None else ""
        raise ValueError(f"positions.{name} must be a positive {kind}{bound}, got {value!r}")


def inverse_powers(theta, exponents: np.ndarray) -> np.ndarray:
    """theta^(-exponents) in float64 from HF's float32 exponents (theta may be an array broadcasting against them)."""
    return 1.0 / np.asarray(theta, np.float64) ** exponents.astype(np.float64)


@register("rope")
class RoPE(PositionScheme):
    """Default RoPE with base `theta` on the first `partial_rotary_factor` of each head."""

    theta: float = 10000.0
    partial_rotary_factor: float = 1.0

    # True where the tables follow the length of the sequence at hand (dynamic NTK, LongRoPE): then `__call__` reads
    # the length from the positions as a traced value, max(positions) + 1 as HF does, and calls `traced_inv_freq`.
    length_dependent = False

    def __post_init__(self):
        super().__post_init__()
        check_positive("theta", self.theta)
        if not isinstance(self.partial_rotary_factor, (int, float)) or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"positions.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotary width head_dim · partial_rotary_factor = {self.head_dim} · {self.partial_rotary_factor} "
                f"= {self.rotary_dim} must be an even number >= 2"
            )

    @property
    def rotary_dim(self) -> int:
        """R: how many leading dims of each head rotate (HF: `int(head_dim * partial_rotary_factor)`)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def exponents(self) -> np.ndarray:
        """[R/2] float32: 2i/R, computed as HF does."""
        return np.arange(0, self.rotary_dim, 2, dtype=np.float32) / np.float32(self.rotary_dim)

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        """[R/2] float32 inverse frequencies for a sequence of `seq_len` tokens (None: the scheme's own length)."""
        return inverse_powers(self.theta, self.exponents()).astype(np.float32)

    def traced_inv_freq(self, seq_len: jax.Array) -> jax.Array:
        """`inv_freq` for a traced int32 `seq_len`; schemes whose tables follow the length override it."""
        return jnp.asarray(self.inv_freq())

    def encodes_keys_once(self) -> bool:
        """Fixed tables and plain rotary attention: not for tables that follow the length, nor for subclasses that
        build their own encoding (CLEX, LM-Infinite, Self-Extend, softplus, entropy-aware ABF)."""
        return not self.length_dependent and type(self).__call__ is RoPE.__call__

    def attention_factor(self, seq_len: int | None = None) -> float:
        """Multiplier of cos and sin, so of the logits squared (1 for plain RoPE)."""
        return 1.0

    def hf_rope_parameters(self) -> dict:
        """This scheme as HF's `rope_parameters` (v5 form); raises NotImplementedError where HF has no equivalent."""
        return {"rope_type": "default", "rope_theta": self.theta, **self._hf_partial()}

    def _hf_partial(self) -> dict:
        return {} if self.partial_rotary_factor == 1 else {"partial_rotary_factor": self.partial_rotary_factor}

    def rotary_encoding(self, positions: jax.Array, kv_positions: jax.Array | None = None) -> RotaryEncoding:
        """The rotary tables of queries at `positions` [B, T] and keys at `kv_positions` [B, S] (default: the same)."""
        if self.length_dependent:
            last = jnp.max(positions)
            if kv_positions is not None:
                last = jnp.maximum(last, jnp.max(kv_positions))
            inv_freq = self.traced_inv_freq(last.astype(jnp.int32) + 1)
        else:
            inv_freq = self.inv_freq()
        factor = self.attention_factor()
        q_cos, q_sin = rotary_tables(positions, inv_freq, factor)
        if kv_positions is None:
            k_cos, k_sin = q_cos, q_sin
        else:
            k_cos, k_sin = rotary_tables(kv_positions, inv_freq, factor)
        return RotaryEncoding(q_cos=q_cos, q_sin=q_sin, k_cos=k_cos, k_sin=k_sin)

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        return self.rotary_encoding(positions, kv_positions)


@register("abf")
class ABF(RoPE):
    """Adjusted base frequency: RoPE whose base `theta` is raised `base_scale`-fold for training at long length.

    Xiong et al., "Effective Long-Context Scaling of Foundation Models" (2023; Llama 2 Long: base 10⁴ → 5·10⁵, the
    default scale 50) and Rozière et al., "Code Llama" (2023; 10⁴ → 10⁶, scale 100):
    inv_freq_i = (theta · base_scale)^(-2i/R). In HF terms it is default RoPE with rope_theta = theta · base_scale.
    """

    base_scale: float = 50.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("base_scale", self.base_scale)

    @property
    def abf_theta(self) -> float:
        return self.theta * self.base_scale

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        return inverse_powers(self.abf_theta, self.exponents()).astype(np.float32)

    def hf_rope_parameters(self) -> dict:
        return {"rope_type": "default", "rope_theta": self.abf_theta, **self._hf_partial()}


@register("proportional")
class ProportionalRoPE(RoPE):
    """HF's "proportional" RoPE (Gemma 4): rotate-half over the whole head, with the first P = partial·head_dim/2
    frequencies theta^(-2i/head_dim) / factor and the other head_dim/2 − P frequencies 0 (those pairs pass through).

    Unlike partial rotary, the exponent's denominator is the head dim and the rotated pairs are (x_i, x_{i+D/2}).
    """

    factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_positive("factor", self.factor)

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    def inv_freq(self, seq_len: int | None = None) -> np.ndarray:
        rope_angles = int(self.partial_rotary_factor * self.head_dim // 2)
        exponents = np.arange(0, 2 * rope_angles, 2, dtype=np.float32) / np.float32(self.head_dim)
        rotated = inverse_powers(self.theta, exponents)
        zeros = np.zeros(self.head_dim // 2 - rope_angles)
        return (np.concatenate([rotated, zeros]) / self.factor).astype(np.float32)

    def hf_rope_parameters(self) -> dict:
        return {"rope_type": "proportional", "rope_theta": self.theta, "factor": self.factor,
                "partial_rotary_factor": self.partial_rotary_factor}
