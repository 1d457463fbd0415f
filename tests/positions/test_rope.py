"""RoPE and NoPE against a naive numpy oracle, and the registry's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import positions
from longctx.positions.rope import apply_rotary
from oracles import naive_rope


def identity_attend(q, k, v, **overrides):
    return q, k, v


@pytest.mark.parametrize("theta,partial", [(10000.0, 1.0), (500000.0, 1.0), (10000.0, 0.5)])
def test_rope_matches_naive_oracle(theta, partial):
    rng = np.random.default_rng(0)
    head_dim = 16
    q = rng.normal(size=(2, 7, 4, head_dim)).astype(np.float32)
    k = rng.normal(size=(2, 7, 2, head_dim)).astype(np.float32)
    pos = np.stack([np.arange(7), np.array([0, 1, 2, 0, 1, 2, 3])]).astype(np.int32)  # second row: two documents
    scheme = positions.get("rope", head_dim=head_dim, theta=theta, partial_rotary_factor=partial)
    q_rot, k_rot, _ = scheme(jnp.asarray(pos)).attend(jnp.asarray(q), jnp.asarray(k), None, identity_attend)
    rotary_dim = int(head_dim * partial)
    # float32 angles p·inv_freq lose ~1e-7 relative; at p <= 6 the error stays well below 1e-5.
    np.testing.assert_allclose(np.asarray(q_rot), naive_rope(q, pos, theta, rotary_dim), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(k_rot), naive_rope(k, pos, theta, rotary_dim), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(q_rot)[..., rotary_dim:], q[..., rotary_dim:])


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    scheme = positions.get("rope", head_dim=32)

    def score(m, n):
        enc_q, enc_k = scheme(jnp.array([[m]])), scheme(jnp.array([[n]]))
        return float(jnp.sum(apply_rotary(q, enc_q.q_cos, enc_q.q_sin) * apply_rotary(k, enc_k.k_cos, enc_k.k_sin)))

    assert score(5, 2) == pytest.approx(score(105, 102), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_rope_inv_freq_formula_and_attention_factor():
    scheme = positions.get("rope", head_dim=8, theta=100.0)
    np.testing.assert_allclose(scheme.inv_freq(), [1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75], rtol=1e-6)
    assert scheme.inv_freq().dtype == np.float32
    assert scheme.attention_factor() == 1.0


def test_rope_keys_may_have_their_own_positions():
    scheme = positions.get("rope", head_dim=8)
    enc = scheme(jnp.array([[3]]), kv_positions=jnp.array([[0, 1, 2, 3]]))
    assert enc.q_cos.shape == (1, 1, 4) and enc.k_cos.shape == (1, 4, 4)
    np.testing.assert_allclose(enc.q_cos[0, 0], enc.k_cos[0, 3])


def test_nope_leaves_queries_and_keys_alone():
    q, k = jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 1, 4))
    q_out, k_out, _ = positions.get("none", head_dim=4)(jnp.zeros((1, 3), jnp.int32)).attend(q, k, None,
                                                                                               identity_attend)
    assert q_out is q and k_out is k


def test_encoding_is_a_pytree_that_crosses_jit():
    enc = positions.get("rope", head_dim=8)(jnp.arange(5)[None])
    out = jax.jit(lambda e: e)(enc)
    np.testing.assert_array_equal(out.q_sin, enc.q_sin)


def test_registry_names_and_defaults():
    assert {"none", "rope"} <= set(positions.names())
    assert positions.default_params("rope") == {"theta": 10000.0, "partial_rotary_factor": 1.0}
    assert positions.default_params("none") == {}


@pytest.mark.parametrize("call,message", [
    (lambda: positions.get("yarnn", head_dim=8), r"unknown position scheme 'yarnn'; registered schemes: .*rope"),
    (lambda: positions.get("rope", head_dim=8, factor=4.0), r"'rope' has no parameter 'factor'; it takes: theta"),
    (lambda: positions.get("rope", head_dim=8, theta=-1.0), r"positions.theta must be a positive number, got -1.0"),
    (lambda: positions.get("rope", head_dim=6, partial_rotary_factor=0.5), r"must be an even number"),
    (lambda: positions.get("rope", head_dim=8, partial_rotary_factor=1.5), r"partial_rotary_factor must be in"),
])
def test_registry_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
