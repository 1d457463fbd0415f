"""Tiny Llama models for the inference tests: one per position scheme, with params perturbed so that every leaf
matters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from longctx import positions
from longctx.models import Llama, LlamaConfig, init_params, param_structure

CONFIG = LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, attention_impl="xla")
TRAIN_LENGTH = 6  # short, so that test sequences run well past it and every extension scheme is active
SCHEME_PARAMS = {"softplus": {"reweight": True}, "self_extend": {"group_size": 2, "neighbor_window": 3},
                 "lm_infinite": {"n_global": 2}}


def scheme_model(name: str, **config) -> Llama:
    params = dict(SCHEME_PARAMS.get(name, {}))
    if "original_max_position_embeddings" in positions.default_params(name):
        params.setdefault("original_max_position_embeddings", TRAIN_LENGTH)
    scheme = positions.get(name, head_dim=config.get("head_dim", CONFIG.head_dim), **params)
    return Llama(dataclasses.replace(CONFIG, **config), position_scheme=scheme)


# Initial params depend on the seed, init_std and the shapes of the param tree alone (not on the position scheme or the
# attention implementation), so models that share these share one computation of them (a compilation of init).
_RANDOM_PARAMS = {}


def random_params(model: Llama, seed: int = 0):
    """Initial params with every leaf perturbed (numpy noise: nothing to compile), so zero-initialised ones (CLEX's
    ODE output) matter too."""
    shapes = jax.tree_util.tree_flatten_with_path(param_structure(model)[0])[0]
    key = (seed, model.config.init_std, tuple((jax.tree_util.keystr(path), leaf.shape) for path, leaf in shapes))
    if key not in _RANDOM_PARAMS:
        rng = np.random.default_rng(seed)
        _RANDOM_PARAMS[key] = jax.tree.map(
            lambda x: jnp.asarray(np.asarray(x) + np.float32(0.05) * rng.standard_normal(x.shape, np.float32)),
            init_params(model, jax.random.key(seed))[0])
    return jax.tree.map(lambda x: x, _RANDOM_PARAMS[key])  # a tree of its own: callers may replace leaves
