"""CLEX: continuous length extrapolation — RoPE frequencies that follow a learned ODE in the scale factor t.

Chen et al., "CLEX: Continuous Length Extrapolation for Large Language Models" (ICLR 2024), after the authors' code
(DAMO-NLP-SG/CLEX, `clex_layer.py`). The log inverse frequencies z(t) ∈ R^{R/2} solve, from z(1) = log inv_freq,

    dz/dt = act((z + log ntk(t)) · W_up) · W_down + d/dt log ntk(t),
    ntk_i(t) = (theta · α^(R/(R−2)))^(−2i/R),  α = 2t − 1,  so  d/dt log ntk_i(t) = −4i / ((R − 2) α),

with W_up [R/2, param_factor·R] (uniform ±1/sqrt(param_factor·R)) and W_down [param_factor·R, R/2] zero-initialised:
at initialisation z(t) = log ntk(t) exactly, NTK-aware scaling with α = 2t − 1. The ODE is solved with fixed-step
RK4 (the 3/8 rule, torchdiffeq's "rk4") of step `time_dt` from t = 1 to `max_factor`, keeping z at every integer t.

In training (`train=True`) one t is drawn per step, uniformly from {1, ..., max_factor}, and positions are spread
over t times the length: position p becomes (p·t + u) / s with u uniform in {0, ..., t − 1} (0 at p = 0) and
s = max(1, T // L) for sequences of T tokens — a stratified version of CLEX's sorted random draw of T positions from
[0, T·t), which keeps each packed document's positions increasing. At inference t = ceil(L' / L) capped at
max_factor, with L' = max(position) + 1 and L = original_max_position_embeddings (the training length). The two
projections are the model's parameters `position_scheme/ode_up_proj` and `ode_down_proj`: they train and checkpoint
with it. One difference from the authors' code: the time embedding uses the model's theta (theirs fixes 10⁴).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from longctx.positions.base import PositionEncoding
from longctx.positions.registry import register
from longctx.positions.rope import RoPE, RotaryEncoding, check_positive, rotary_tables
from longctx.positions.rope_scaling import check_train_length, ntk_theta

ACTIVATIONS = {"tanh": jnp.tanh, "silu": jax.nn.silu}


def rk4_step(f, t: jax.Array, z: jax.Array, dt: float) -> jax.Array:
    """One step of RK4 by the 3/8 rule (Kutta 1901): z(t + dt) from z(t) for dz/dt = f(t, z)."""
    k1 = f(t, z)
    k2 = f(t + dt / 3, z + dt * k1 / 3)
    k3 = f(t + 2 * dt / 3, z + dt * (k2 - k1 / 3))
    k4 = f(t + dt, z + dt * (k1 - k2 + k3))
    return z + dt * (k1 + 3 * (k2 + k3) + k4) / 8


def integer_time_solution(f, z1: jax.Array, max_t: int, steps_per_unit: int) -> jax.Array:
    """z at t = 1, 2, ..., max_t: [max_t, *z1.shape], by RK4 steps of 1 / steps_per_unit from z(1) = z1."""
    dt = 1.0 / steps_per_unit

    def unit(z, start):
        def step(z, i):
            return rk4_step(f, start + i * dt, z, dt), None

        z, _ = jax.lax.scan(step, z, jnp.arange(steps_per_unit, dtype=jnp.float32))
        return z, z

    _, later = jax.lax.scan(unit, z1, jnp.arange(1, max_t, dtype=jnp.float32))
    return jnp.concatenate([z1[None], later])


@register("clex")
class CLEX(RoPE):
    """RoPE whose frequencies at scale t come from CLEX's learned ODE (see the module docstring)."""

    max_factor: int = 16
    param_factor: int = 1
    act: str = "tanh"
    time_dt: float = 0.01
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_positive("max_factor", self.max_factor, integer=True)
        check_positive("param_factor", self.param_factor, integer=True)
        check_positive("time_dt", self.time_dt)
        check_train_length(self)
        if self.act not in ACTIVATIONS:
            raise ValueError(f"positions.act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if not math.isclose(1 / self.time_dt, round(1 / self.time_dt), rel_tol=1e-9):
            raise ValueError(f"positions.time_dt must divide 1 (the solution is kept at integer t), got {self.time_dt}")
        if self.rotary_dim < 4:
            raise ValueError(f"CLEX needs a rotary width R >= 4 (NTK exponent R/(R-2)), got {self.rotary_dim}")

    def setup(self):
        half, hidden = self.rotary_dim // 2, self.param_factor * self.rotary_dim
        self.ode_up_proj = self.param(
            "ode_up_proj", nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform"), ("rotary_freq", "clex_hidden")),
            (half, hidden))
        self.ode_down_proj = self.param(
            "ode_down_proj", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("clex_hidden", "rotary_freq")),
            (hidden, half))

    def log_ntk_inv_freq(self, t: jax.Array) -> jax.Array:
        """log ntk(t) [R/2]: NTK-aware frequencies with α = 2t − 1 (t >= 1)."""
        alpha = 2 * t - 1
        return -jnp.asarray(self.exponents()) * jnp.log(ntk_theta(self.theta, alpha, self.rotary_dim))

    def ode(self, t: jax.Array, z: jax.Array) -> jax.Array:
        """dz/dt at time t."""
        index = jnp.arange(0, self.rotary_dim, 2, dtype=jnp.float32)
        ntk_rate = -2 * index / ((self.rotary_dim - 2) * (2 * t - 1))
        hidden = ACTIVATIONS[self.act]((z + self.log_ntk_inv_freq(t)) @ self.ode_up_proj)
        return hidden @ self.ode_down_proj + ntk_rate

    def frequency_table(self) -> jax.Array:
        """inv_freq at t = 1..max_factor: [max_factor, R/2] float32 (row 0 is plain RoPE)."""
        z1 = jnp.log(jnp.asarray(super().inv_freq()))
        solution = integer_time_solution(self.ode, z1, self.max_factor, round(1 / self.time_dt))
        return jnp.exp(solution).at[0].set(jnp.asarray(super().inv_freq()))

    def inference_factor(self, seq_len: jax.Array) -> jax.Array:
        """t = ceil(L' / L) in [1, max_factor] for a sequence of seq_len tokens (int32)."""
        t = (seq_len + self.original_max_position_embeddings - 1) // self.original_max_position_embeddings
        return jnp.clip(t, 1, self.max_factor).astype(jnp.int32)

    def max_length(self) -> int:
        """max_factor · L: the ODE is solved up to t = max_factor, and a longer sequence would read positions with
        frequencies the scheme was never trained or solved for."""
        return self.max_factor * self.original_max_position_embeddings

    def inv_freq(self, seq_len: int | None = None):
        raise NotImplementedError("CLEX's frequencies depend on its trained ODE parameters: call the scheme inside "
                                  "the model (frequency_table gives them per integer scale factor)")

    def hf_rope_parameters(self) -> dict:
        raise NotImplementedError("clex learns its frequencies with an ODE; HF has no rope type for it")

    def training_positions(self, positions: jax.Array, t: jax.Array, rng: jax.Array) -> jax.Array:
        """Positions spread over t times the length: (p·t + u) / s, float32 [B, T]."""
        jitter = jax.random.randint(rng, positions.shape, 0, t)
        jitter = jnp.where(positions == 0, 0, jitter)
        stretch = max(1, positions.shape[1] // self.original_max_position_embeddings)
        return (positions * t + jitter).astype(jnp.float32) / stretch

    def __call__(self, positions: jax.Array, kv_positions: jax.Array | None = None, *,
                 train: bool = False) -> PositionEncoding:
        table = self.frequency_table()
        if train:
            if kv_positions is not None:
                raise NotImplementedError("CLEX samples positions in training; kv_positions must be None there")
            t_rng, position_rng = jax.random.split(self.make_rng("positions"))
            t = jax.random.randint(t_rng, (), 1, self.max_factor + 1)
            positions = self.training_positions(positions, t, position_rng)
        else:
            last = jnp.max(positions) if kv_positions is None else jnp.maximum(jnp.max(positions),
                                                                                 jnp.max(kv_positions))
            t = self.inference_factor(last.astype(jnp.int32) + 1)
        inv_freq = table[t - 1]
        q_cos, q_sin = rotary_tables(positions, inv_freq)
        k_cos, k_sin = (q_cos, q_sin) if kv_positions is None else rotary_tables(kv_positions, inv_freq)
        return RotaryEncoding(q_cos=q_cos, q_sin=q_sin, k_cos=k_cos, k_sin=k_sin)
