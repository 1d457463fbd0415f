"""Tiny Llama models for the inference tests: one per position scheme, with params perturbed so that every leaf
matters."""

import dataclasses

import jax

from longctx import positions
from longctx.models import Llama, LlamaConfig, init_params

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


def random_params(model: Llama, seed: int = 0):
    """Initial params with every leaf perturbed, so zero-initialised ones (CLEX's ODE output) matter too."""
    params = init_params(model, jax.random.key(seed))[0]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
