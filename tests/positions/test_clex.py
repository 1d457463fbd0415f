"""CLEX: the ODE at initialisation is NTK scaling, the RK4 solver against closed forms, sampling in training, the
inference scale factor, and gradients into its parameters through the model.

Tolerances: RK4 (3/8 rule) with step 0.01 on smooth right-hand sides is exact to ~1e-9; float32 rounding over
hundreds of steps leaves ~1e-6 relative.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import positions
from longctx.models import Llama, LlamaConfig, init_params
from longctx.positions.clex import integer_time_solution, rk4_step

D = 32


def clex(**params):
    return positions.get("clex", head_dim=D, original_max_position_embeddings=16, **params)


def test_rk4_matches_closed_forms():
    z1 = jnp.array([1.0, -2.0, 0.5])
    decay = integer_time_solution(lambda t, z: -0.7 * z, z1, max_t=5, steps_per_unit=100)
    np.testing.assert_allclose(decay, z1 * np.exp(-0.7 * np.arange(5))[:, None], rtol=3e-6)
    oscillating = integer_time_solution(lambda t, z: jnp.cos(t) * z, z1, max_t=4, steps_per_unit=50)
    expected = z1 * np.exp(np.sin(np.arange(1, 5)) - np.sin(1.0))[:, None]
    np.testing.assert_allclose(oscillating, expected, rtol=3e-6)
    # One step errs by O(dt^5): halving dt divides the error by about 32.
    errors = [abs(float(rk4_step(lambda t, z: -z, 0.0, jnp.float32(1.0), dt)) - np.exp(-dt)) for dt in (0.4, 0.2)]
    assert errors[0] / errors[1] > 20


def test_at_initialisation_clex_is_ntk_scaling_with_alpha_2t_minus_1():
    scheme = clex(max_factor=6)
    variables = nn.meta.unbox(scheme.init(jax.random.key(0), jnp.arange(8)[None]))
    np.testing.assert_array_equal(variables["params"]["ode_down_proj"], 0.0)
    table = scheme.apply(variables, method=scheme.frequency_table)
    assert table.shape == (6, D // 2)
    np.testing.assert_array_equal(table[0], positions.get("rope", head_dim=D).inv_freq())
    for t in range(2, 7):
        ntk = positions.get("ntk", head_dim=D, factor=2.0 * t - 1).inv_freq()
        np.testing.assert_allclose(table[t - 1], ntk, rtol=1e-5, err_msg=f"t={t}")  # |log inv_freq| <= 9, float32


def test_inference_scale_factor_is_the_length_ratio_rounded_up_and_capped():
    scheme = clex(max_factor=4)
    factors = [int(scheme.inference_factor(jnp.int32(n))) for n in (1, 16, 17, 32, 33, 64, 65, 10_000)]
    assert factors == [1, 1, 2, 2, 3, 4, 4, 4]


def test_inference_uses_the_frequencies_of_that_factor():
    scheme = clex(max_factor=4)
    variables = nn.meta.unbox(scheme.init(jax.random.key(0), jnp.arange(8)[None]))
    variables = jax.tree.map(lambda x: x + 0.1, variables)  # a trained-looking ODE
    table = scheme.apply(variables, method=scheme.frequency_table)
    encoding = scheme.apply(variables, jnp.arange(40)[None])  # 40 tokens over 16: t = 3
    angles = np.arctan2(encoding.q_sin[0, 1], encoding.q_cos[0, 1])
    np.testing.assert_allclose(angles, table[2], rtol=1e-5)
    assert not np.allclose(table[2], table[1])


def test_training_draws_t_per_step_and_spreads_increasing_positions():
    scheme = clex(max_factor=4)
    variables = nn.meta.unbox(scheme.init(jax.random.key(0), jnp.arange(8)[None]))
    pos = jnp.asarray([list(range(10)) + list(range(6))], jnp.int32)  # two packed documents
    seen = set()
    training_positions = jax.jit(lambda t, rng: scheme.apply(variables, pos, t, rng, method=scheme.training_positions))
    for seed in range(40):
        rng = jax.random.key(seed)
        t = int(jax.random.randint(jax.random.split(rng)[0], (), 1, 5))
        seen.add(t)
        spread = training_positions(t, jax.random.split(rng)[1])
        for doc in (spread[0, :10], spread[0, 10:]):
            assert doc[0] == 0 and np.all(np.diff(doc) > 0) and float(doc[-1]) < len(doc) * t
        if t == 1:
            np.testing.assert_array_equal(spread, pos)
    assert seen == {1, 2, 3, 4}
    sample = jax.jit(lambda rng: scheme.apply(variables, pos, train=True, rngs={"positions": rng}).q_sin)
    sampled = [sample(jax.random.key(seed)) for seed in range(4)]
    assert any(not np.allclose(sampled[0], other) for other in sampled[1:])
    np.testing.assert_array_equal(sampled[0][:, 0], 0.0)  # every document still starts at position 0


def test_gradients_flow_into_the_ode_through_the_model():
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=D, attention_impl="reference")
    model = Llama(config, position_scheme=clex(max_factor=4))
    params, specs = init_params(model, jax.random.key(0))
    assert set(params["position_scheme"]) == {"ode_up_proj", "ode_down_proj"}
    assert specs["position_scheme"]["ode_down_proj"] == jax.sharding.PartitionSpec("clex_hidden", "rotary_freq")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 32)), jnp.int32)

    def loss(params, seed):
        logits = model.apply({"params": params}, ids, train=True, rngs={"positions": jax.random.key(seed)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    seed = next(s for s in range(50) if int(jax.random.randint(jax.random.split(jax.random.key(s))[0], (), 1, 5)) > 1)
    gradient = jax.jit(jax.grad(loss))  # compiled once for both calls
    grads = gradient(params, seed)["position_scheme"]
    assert float(jnp.abs(grads["ode_down_proj"]).sum()) > 0  # up_proj's gradient passes through down_proj = 0
    params["position_scheme"]["ode_down_proj"] = params["position_scheme"]["ode_down_proj"] - 0.1 * grads[
        "ode_down_proj"]
    assert float(jnp.abs(gradient(params, seed)["position_scheme"]["ode_up_proj"]).sum()) > 0


@pytest.mark.parametrize("field,value,message", [
    ("act", "relu", "positions.act must be one of tanh, silu"),
    ("time_dt", 0.03, "time_dt must divide 1"),
    ("max_factor", 0, "max_factor must be a positive int"),
])
def test_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        clex(**{field: value})
    with pytest.raises(NotImplementedError, match="depend on its trained ODE parameters"):
        clex().inv_freq()
