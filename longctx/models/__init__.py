"""Models: the Llama-style decoder and its construction from a config."""

import logging

import jax
import ml_collections
from pallas_kernels import masks

from longctx import positions
from longctx.models.llama import (Llama, LlamaConfig, check_forward, init_params, output_weights, param_structure,
                                  scanned, unscanned)


def mask_from_config(attention: ml_collections.ConfigDict) -> masks.Mask:
    """The mask that `model.attention.mask` (a `pallas_kernels.masks` spec string) names; errors name the field."""
    try:
        return masks.parse(attention.mask)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"model.attention.mask: {error}") from None


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int, train_len: int,
                parallel: ml_collections.ConfigDict | None = None) -> Llama:
    """The decoder that `model_config` (the `model` section of a longctx config) describes, for a tokenizer of
    `vocab_size` tokens (model.vocab_size, when set, must cover them).

    `train_len` (the run's data.seq_len) stands in for a scheme's `original_max_position_embeddings` left None.
    `parallel` (the config's `parallel` section) sets how attention spans a sequence-sharded mesh.
    """
    if model_config.vocab_size:
        if model_config.vocab_size < vocab_size:
            raise ValueError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the tokenizer's "
                             f"vocabulary ({vocab_size}); set it to 0 to use the tokenizer's size")
        vocab_size = model_config.vocab_size
    scheme_params = {k: v for k, v in model_config.positions.items() if k != "name"}
    if scheme_params.get(positions.TRAIN_LENGTH_FIELD, 0) is None:
        scheme_params[positions.TRAIN_LENGTH_FIELD] = train_len
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size,
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        rms_norm_eps=model_config.rms_norm_eps,
        tie_embeddings=model_config.tie_embeddings,
        qkv_bias=model_config.qkv_bias,
        dtype=model_config.dtype,
        init_std=model_config.init_std,
        scan_layers=model_config.scan_layers,
        remat=model_config.remat,
        attention_impl=model_config.attention.impl,
        mask=mask_from_config(model_config.attention),
        **({} if parallel is None else {"context_parallel": parallel.context, "sequence_layout": parallel.layout}),
    )
    name = model_config.positions.name
    foreign = sorted(set(scheme_params) - set(positions.default_params(name)))
    if foreign:
        raise ValueError(
            f"model.positions.name={name!r} does not take model.positions.{', model.positions.'.join(foreign)} "
            f"(the parameters of another scheme); switch schemes with --config=<file>:positions={name}, which gives "
            f"model.positions the scheme's own parameters")
    scheme = positions.get(name, head_dim=model_config.head_dim, **scheme_params)
    return Llama(llama_config, position_scheme=scheme)


def adapt_params(model: Llama, params: dict, label: str = "") -> dict:
    """Trained `params` as `model` takes them, when `model` has another position scheme than the run that trained
    them: parameters of the old scheme that this one lacks are dropped, and those this scheme owns but the run never
    trained (CLEX's ODE on a RoPE run) start from their initial values — how the scheme's paper applies it without
    training, and where a fine-tune starts from."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0])
    fresh = sorted(set(abstract) - set(params))
    if fresh:
        logging.getLogger("longctx.models").info("position scheme %s: %s not in the checkpoint; using their initial "
                                                 "values", label or model.position_scheme.scheme_name,
                                                 ", ".join(fresh))
        initial = init_params(model, jax.random.key(0))[0]
        params = {**params, **{key: initial[key] for key in fresh}}
    return {key: params[key] for key in abstract}


__all__ = ["Llama", "adapt_params", "LlamaConfig", "build_model", "check_forward", "init_params", "mask_from_config",
           "output_weights", "param_structure", "scanned", "unscanned"]
