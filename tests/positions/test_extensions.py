"""entropy_abf, ALiBi, LM-Infinite, Self-Extend and softplus attention against naive per-pair numpy oracles and the
public numbers of their papers; every scheme reduces to plain RoPE at scale 1 where its paper says so.

Tolerances: float32 attention against float64 numpy, atol = rtol = 2e-5 (RoPE angles of positions up to 10⁴ in
float32 lose ~1e-3 rad at the lowest frequencies only where p·inv_freq is large: see the position-10000 test).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx import positions
from longctx.attention import attention
from longctx.models import Llama, LlamaConfig, init_params, param_structure
from longctx.positions.alibi import alibi_slopes
from oracles import naive_allowed, naive_attention, rotate

D = 16


def attend_fn(mask=masks.Causal(), segment_ids=None, impl="reference", q_offset=0):
    """What the model's layers hand an encoding: attention with the layer's mask, narrowed by `within`."""

    def attend(q, k, v, *, within=None, **overrides):
        return attention(q, k, v, mask=mask if within is None else mask & within, segment_ids=segment_ids,
                         impl=impl, q_offset=q_offset, **overrides)

    return attend


def naive_pairwise(q, k, v, distance, visible):
    """Softmax attention where query t sees key s at `distance(t, s)` (the query rotated by it, the key not) if
    `visible(t, s)`: q [T, H, D], k, v [S, H, D] (one head group), float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for t in range(q.shape[0]):
        keys = [s for s in range(k.shape[0]) if visible(t, s)]
        if not keys:
            continue
        for h in range(q.shape[1]):
            logits = np.array([rotate(q[t, h], distance(t, s), 10000.0, D) @ k[s, h] for s in keys]) / np.sqrt(D)
            w = np.exp(logits - logits.max())
            out[t, h] = w @ v[keys, h] / w.sum()
    return out


def random_qkv(T, S=None, H=2, seed=0):
    rng = np.random.default_rng(seed)
    S = T if S is None else S
    return (rng.normal(size=(1, T, H, D)).astype(np.float32), rng.normal(size=(1, S, H, D)).astype(np.float32),
            rng.normal(size=(1, S, H, D)).astype(np.float32))


# --- entropy_abf ---------------------------------------------------------------------------------------------------

def test_entropy_abf_query_scale_public_value():
    scheme = positions.get("entropy_abf", head_dim=128, original_max_position_embeddings=4096)
    scale = scheme.query_scale(jnp.array([[0, 100, 4095, 8191]]))
    np.testing.assert_allclose(scale, [[1.0, 1.0, 1.0, 1.0833333]], rtol=1e-6)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_entropy_abf_multiplies_every_logit_by_the_query_scale(partial):
    """Logits are ABF's times λ(p), pass-through dims of a partial rotary head included."""
    pos = jnp.arange(20)[None]
    q, k, _ = random_qkv(20)
    ours = positions.get("entropy_abf", head_dim=D, original_max_position_embeddings=8, partial_rotary_factor=partial)
    abf = positions.get("abf", head_dim=D, partial_rotary_factor=partial)

    def logits(q, k, v, **overrides):
        return jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))

    scale = np.maximum(1, np.log(np.arange(20) + 1) / np.log(8))[None, None, :, None]
    np.testing.assert_allclose(ours(pos).attend(q, k, None, logits), abf(pos).attend(q, k, None, logits) * scale,
                               rtol=1e-5, atol=1e-5)


# --- ALiBi -------------------------------------------------------------------------------------------------------

def test_alibi_slopes_are_the_papers():
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_allclose(alibi_slopes(12), np.concatenate([2.0 ** -np.arange(1, 9),
                                                                 2.0 ** -np.array([0.5, 1.5, 2.5, 3.5])]))


def test_alibi_attends_with_a_linear_distance_penalty():
    q, k, v = random_qkv(7, H=4)
    out = positions.get("alibi", head_dim=D)(jnp.arange(7)[None]).attend(q, k, v, attend_fn())
    distance = np.abs(np.arange(7)[:, None] - np.arange(7)[None])
    expected, _ = naive_attention(q, k, v, naive_allowed(lambda i, j: j <= i, 7, 7, 0, None, None, B=1),
                                  scale=D ** -0.5, bias=-alibi_slopes(4)[:, None, None] * distance)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


# --- LM-Infinite ---------------------------------------------------------------------------------------------------

def lm_infinite_distance(i, j, L, n_global):
    """The effective distance of key j for query i, or None when the Λ mask hides it."""
    if j > i:
        return None
    if i - j < L:
        return i - j
    return L if j < n_global else None


def test_lm_infinite_public_values_at_position_10000():
    """Query 10000 (L 4096, n_global 10): key 5905 at distance 4095, key 5904 masked, key 3 at 4096 — checked on the
    real 10001-key attention row against the per-pair oracle, and key 5904 alone carrying a value reads as 0."""
    assert lm_infinite_distance(10000, 5905, 4096, 10) == 4095
    assert lm_infinite_distance(10000, 5904, 4096, 10) is None
    assert lm_infinite_distance(10000, 3, 4096, 10) == 4096
    scheme = positions.get("lm_infinite", head_dim=D, original_max_position_embeddings=4096)
    S = 10001
    q, k, v = random_qkv(1, S, H=1)
    encoding = scheme(jnp.array([[10000]]), kv_positions=jnp.arange(S)[None])
    out = encoding.attend(q, k, v, attend_fn(q_offset=10000))
    visible = [s for s in range(S) if lm_infinite_distance(10000, s, 4096, 10) is not None]
    assert visible[:11] == list(range(10)) + [5905]
    expected = naive_pairwise(q[0], k[0][visible], v[0][visible],
                              lambda t, s: lm_infinite_distance(10000, visible[s], 4096, 10), lambda t, s: True)
    np.testing.assert_allclose(out[0], expected, atol=2e-4, rtol=2e-4)
    only_5904 = np.zeros_like(v)
    only_5904[0, 5904] = 1.0
    np.testing.assert_array_equal(encoding.attend(q, k, only_5904, attend_fn(q_offset=10000)), 0.0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_lm_infinite_matches_per_pair_oracle_with_packed_documents(impl):
    L, n_global, T = 4, 2, 14
    segments = np.array([[1] * 9 + [2] * 5], np.int32)
    pos = np.array([list(range(9)) + list(range(5))], np.int32)
    q, k, v = random_qkv(T)
    scheme = positions.get("lm_infinite", head_dim=D, n_global=n_global, original_max_position_embeddings=L)
    out = scheme(jnp.asarray(pos)).attend(q, k, v, attend_fn(segment_ids=segments, impl=impl))

    def distance(t, s):
        return lm_infinite_distance(pos[0, t], pos[0, s], L, n_global)

    expected = naive_pairwise(q[0], k[0], v[0], distance,
                              lambda t, s: segments[0, t] == segments[0, s] and distance(t, s) is not None)
    np.testing.assert_allclose(out[0], expected, atol=2e-5, rtol=2e-5)


# --- Self-Extend ---------------------------------------------------------------------------------------------------

def self_extend_distance(i, j, G, W):
    return i - j if i - j < W else (i // G + W - W // G) - j // G


def test_self_extend_public_value():
    scheme = positions.get("self_extend", head_dim=D, group_size=8, neighbor_window=1024)
    q_pos, k_pos = scheme.grouped_positions(jnp.array(5000), jnp.array(10))
    assert int(q_pos - k_pos) == 1520 == self_extend_distance(5000, 10, 8, 1024)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_self_extend_matches_per_pair_oracle_with_packed_documents(impl):
    G, W, T = 3, 4, 16
    segments = np.array([[1] * 11 + [2] * 5], np.int32)
    pos = np.array([list(range(11)) + list(range(5))], np.int32)
    q, k, v = random_qkv(T)
    scheme = positions.get("self_extend", head_dim=D, group_size=G, neighbor_window=W)
    out = scheme(jnp.asarray(pos)).attend(q, k, v, attend_fn(segment_ids=segments, impl=impl))
    expected = naive_pairwise(q[0], k[0], v[0], lambda t, s: self_extend_distance(pos[0, t], pos[0, s], G, W),
                              lambda t, s: segments[0, t] == segments[0, s] and s <= t)
    np.testing.assert_allclose(out[0], expected, atol=2e-5, rtol=2e-5)


def test_self_extend_window_defaults_to_a_quarter_of_the_training_length():
    assert positions.get("self_extend", head_dim=D, original_max_position_embeddings=4096).neighbor_window == 1024
    with pytest.raises(ValueError, match="needs positions.original_max_position_embeddings"):
        positions.get("self_extend", head_dim=D)


# --- every scheme, in the model ------------------------------------------------------------------------------------

CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=D, attention_impl="reference")
TRAIN_LENGTH = 16


def model_with(name, **params):
    if positions.TRAIN_LENGTH_FIELD in positions.default_params(name):
        params.setdefault(positions.TRAIN_LENGTH_FIELD, TRAIN_LENGTH)
    return Llama(CONFIG, position_scheme=positions.get(name, head_dim=D, **params))


@functools.cache
def shared_params():
    return init_params(model_with("rope"), jax.random.key(0))[0]


@functools.cache
def params_for(model):
    """init_params(model, key 0), compiled only for a scheme with params of its own (CLEX's ODE, freshly
    initialised): the model's weights depend on their shapes alone, so they are shared_params() for every scheme."""
    if "position_scheme" in param_structure(model)[0]:
        return init_params(model, jax.random.key(0))[0]
    return shared_params()


def tokens(length, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 50, size=(2, length)), jnp.int32)


SCALE_ONE = {
    "linear": {"factor": 1.0}, "ntk": {"factor": 1.0}, "dynamic": {}, "yarn": {"factor": 1.0},
    "llama3": {"factor": 1.0}, "longrope": {"factor": 1.0}, "abf": {"base_scale": 1.0},
    "entropy_abf": {"base_scale": 1.0}, "lm_infinite": {}, "self_extend": {"group_size": 1, "neighbor_window": 4},
    "proportional": {}, "clex": {},
}


@pytest.mark.parametrize("name", sorted(SCALE_ONE))
def test_scale_one_reduces_to_rope_within_the_training_length(name):
    """(Self-Extend with G = 1 puts grouped positions on the true ones, so its far branch runs and still agrees.)"""
    ids = tokens(TRAIN_LENGTH)
    expected = model_with("rope").apply({"params": shared_params()}, ids)
    model = model_with(name, **SCALE_ONE[name])
    got = model.apply({"params": params_for(model)}, ids)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", positions.names())
def test_every_scheme_trains_on_packed_documents_each_read_as_if_alone(name):
    """Forward and gradient with packed documents under jit: finite, the gradient reaches every weight, and the second
    document's logits are those it gets alone."""
    model = model_with(name)
    ids = tokens(24)
    segment_ids = jnp.asarray([[1] * 14 + [2] * 10] * 2, jnp.int32)
    pos = jnp.asarray([list(range(14)) + list(range(10))] * 2, jnp.int32)

    def loss(params):
        logits = model.apply({"params": params}, ids, pos, segment_ids, train=True,
                             rngs={"positions": jax.random.key(1)})
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    @jax.jit  # one compilation for the three
    def train_and_evaluate(params):
        packed = model.apply({"params": params}, ids, pos, segment_ids)
        return jax.value_and_grad(loss)(params), packed, model.apply({"params": params}, ids[:, 14:])

    (value, grads), packed, alone = train_and_evaluate(params_for(model))
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # CLEX's ODE gets no gradient at t = 1 or through its zero-initialised down-projection: see test_clex.py.
    model_grads = {key: value for key, value in grads.items() if key != "position_scheme"}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(model_grads))
    np.testing.assert_allclose(packed[:, 14:], alone, atol=1e-5, rtol=1e-5)


def test_schemes_that_make_their_own_masks_refuse_another_layer_mask():
    for name in ("lm_infinite", "self_extend"):
        with pytest.raises(ValueError, match=f"'{name}' makes its own causal masks and needs model.attention.mask"):
            Llama(dataclasses.replace(CONFIG, mask=masks.SlidingWindow(8)),
                  position_scheme=positions.get(name, head_dim=D, original_max_position_embeddings=16))
