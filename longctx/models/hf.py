"""HF transformers checkpoints in and out: LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM.

`load(path)` reads a local HF directory (config.json and model.safetensors, or shards with their
model.safetensors.index.json; float32, bfloat16 or float16) into a longctx `Llama` and its float32 params, with the
position scheme `positions.from_hf_config` finds; `model.apply({"params": params}, input_ids)` then gives the logits
transformers gives (float32 compute). `save(model, params, path)` writes a directory transformers loads. No torch is
needed either way (safetensors reads and writes the tensors).

Weights map one to one: an HF linear weight [out, in] is our kernel [in, out] (attention projections reshaped to
[embed, heads, head_dim] and [heads, head_dim, embed]); HF checkpoints already store q/k in the rotate-half layout
our RoPE uses. What the longctx model cannot honour — another activation, biases other than Qwen2's q/k/v ones,
sliding windows on some layers only — raises NotImplementedError naming the field.
"""

from collections.abc import Mapping
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from pallas_kernels import masks

from longctx.models.llama import Llama, LlamaConfig, init_params, unscanned
from longctx.positions import from_hf_config, hf_rope_fields
from longctx.positions.hf import hf_head_dim, rope_parameters

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
SAVE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_BUFFERS = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints still carry


def read_config(path: str | pathlib.Path) -> dict[str, Any]:
    config_path = pathlib.Path(path) / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{path} is not an HF model directory: {CONFIG_FILE} is missing")
    return json.loads(config_path.read_text())


def model_type(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    known = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
    if known:
        return known[0]
    if config.get("model_type") in ARCHITECTURES.values() and not architectures:
        return config["model_type"]
    raise NotImplementedError(f"HF architectures {architectures or config.get('model_type')} are not supported; "
                              f"longctx loads {', '.join(ARCHITECTURES)}")


def mask_from_hf(config: dict[str, Any]) -> masks.Mask:
    """Causal, or SlidingWindow(w) when every layer slides: Mistral with a sliding_window, Qwen2 with
    use_sliding_window and every layer a "sliding_attention" one (its layer_types, else those max_window_layers
    gives, as HF builds them)."""
    kind = model_type(config)
    if kind == "mistral":
        window = config.get("sliding_window")
        return masks.SlidingWindow(int(window)) if window else masks.Causal()
    if kind != "qwen2" or not config.get("use_sliding_window", False) or not config.get("sliding_window"):
        return masks.Causal()
    layer_types = config.get("layer_types") or [
        "sliding_attention" if i >= config.get("max_window_layers", 28) else "full_attention"
        for i in range(config["num_hidden_layers"])]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return masks.Causal()
    if kinds == {"sliding_attention"}:
        return masks.SlidingWindow(int(config["sliding_window"]))
    raise NotImplementedError(f"the HF config mixes layer types {sorted(kinds)} (layer_types / max_window_layers); "
                              f"longctx models give every layer the same mask")


def llama_config_from_hf(config: dict[str, Any], *, dtype: str = "float32",
                         attention_impl: str = "auto") -> LlamaConfig:
    """The longctx `LlamaConfig` of an HF config dict; raises NotImplementedError for what it cannot honour."""
    kind = model_type(config)
    rope = rope_parameters(config)
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1 and rope["rope_type"] != "proportional":  # proportional RoPE spans the whole head by design
        raise NotImplementedError(f"HF config partial_rotary_factor={partial}: transformers' {kind} rotates the whole "
                                  f"head (or fails) whatever it says, so longctx will not guess")
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": kind != "qwen2" and bool(config.get("attention_bias", False)),
        "mlp_bias": bool(config.get("mlp_bias", False)),
    }
    for field, bad in unsupported.items():
        if bad:
            raise NotImplementedError(f"HF config {field}={config[field]!r} is not supported (longctx's decoder is "
                                      f"SiLU-gated, without biases but Qwen2's q/k/v biases)")
    return LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=hf_head_dim(config), rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2", dtype=dtype,
        attention_impl=attention_impl, mask=mask_from_hf(config))


def read_tensors(path: pathlib.Path) -> dict[str, jnp.ndarray]:
    """Every tensor of the checkpoint in `path` (one file or shards listed by the index), as float32."""
    if (path / INDEX_FILE).exists():
        files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors are read)")
    tensors = {}
    for name in files:
        with safe_open(path / name, framework="flax") as f:
            for key in f.keys():
                tensors[key] = jnp.asarray(f.get_tensor(key), jnp.float32)
    return tensors


def _hf_names(config: LlamaConfig) -> dict[tuple[str, ...], tuple[str, str]]:
    """longctx param path → (HF tensor name, how it maps: linear | linear_out | heads | plain)."""
    names = {("embed", "embedding"): ("model.embed_tokens.weight", "plain"),
             ("final_norm", "scale"): ("model.norm.weight", "plain")}
    if not config.tie_embeddings:
        names[("lm_head", "kernel")] = ("lm_head.weight", "linear")
    for i in range(config.num_layers):
        ours, theirs = f"layers_{i}", f"model.layers.{i}"
        names[(ours, "attn_norm", "scale")] = (f"{theirs}.input_layernorm.weight", "plain")
        names[(ours, "mlp_norm", "scale")] = (f"{theirs}.post_attention_layernorm.weight", "plain")
        for proj in ("q_proj", "k_proj", "v_proj"):
            names[(ours, "attn", proj, "kernel")] = (f"{theirs}.self_attn.{proj}.weight", "linear")
            if config.qkv_bias:
                names[(ours, "attn", proj, "bias")] = (f"{theirs}.self_attn.{proj}.bias", "heads")
        names[(ours, "attn", "o_proj", "kernel")] = (f"{theirs}.self_attn.o_proj.weight", "linear_out")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[(ours, "mlp", proj, "kernel")] = (f"{theirs}.mlp.{proj}.weight", "linear")
    return names


def check_tensors(shapes: Mapping[str, tuple[int, ...]], model: Llama) -> None:
    """Raises ValueError naming missing, unexpected or misshapen checkpoint tensors for `model` (`shapes`: each
    checkpoint tensor's name → shape)."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0])
    expected = jax.eval_shape(lambda params: hf_tensors(params, model.config), abstract)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(name for name in set(shapes) - set(expected) if not name.endswith(_BUFFERS)
                        and not (model.config.tie_embeddings and name == "lm_head.weight"))
    misshapen = [f"{name} {tuple(shapes[name])}, not {expected[name].shape}"
                 for name in sorted(set(expected) & set(shapes)) if tuple(shapes[name]) != expected[name].shape]
    problems = [f"{what} {', '.join(names[:5])}{'...' if len(names) > 5 else ''}"
                for what, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                    ("tensors of another shape:", misshapen)) if names]
    if problems:
        raise ValueError(f"the checkpoint does not match its config: {'; '.join(problems)}")


def params_from_hf(tensors: Mapping[str, jnp.ndarray | np.ndarray], config: LlamaConfig) -> dict:
    """The longctx params tree of HF `tensors` (checked by `check_tensors`), float32; each tensor is read once, so a
    mapping that makes its tensors when read (`gguf.Tensors`) holds one at a time beside the params."""
    params: dict = {}
    for path, (hf_name, how) in _hf_names(config).items():
        tensor = jnp.asarray(tensors[hf_name], jnp.float32)
        if how == "linear":  # [out, in] → [in, out], attention outputs split into heads
            value = tensor.T
            heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads, "v_proj": config.num_kv_heads}
            if path[-2] in heads:
                value = value.reshape(config.hidden_size, heads[path[-2]], config.head_dim)
        elif how == "linear_out":  # o_proj [E, Hq·D] → [Hq, D, E]
            value = tensor.T.reshape(config.num_heads, config.head_dim, config.hidden_size)
        elif how == "heads":  # q/k/v bias [H·D] → [H, D]
            value = tensor.reshape(-1, config.head_dim)
        else:
            value = tensor
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return params


def load(path: str | pathlib.Path, *, dtype: str = "float32", attention_impl: str = "auto") -> tuple[Llama, dict]:
    """(model, params) of the HF directory `path`; params are float32, compute runs in `dtype`."""
    path = pathlib.Path(path)
    config = read_config(path)
    llama_config = llama_config_from_hf(config, dtype=dtype, attention_impl=attention_impl)
    model = Llama(llama_config, position_scheme=from_hf_config(config))
    tensors = read_tensors(path)
    check_tensors({name: tensor.shape for name, tensor in tensors.items()}, model)
    return model, params_from_hf(tensors, llama_config)


def hf_config_of(model: Llama, *, max_position_embeddings: int | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `model` for transformers; raises NotImplementedError where HF has no equivalent."""
    cfg, scheme = model.config, model.position_scheme
    rope = hf_rope_fields(scheme)
    if max_position_embeddings is None:
        original = getattr(scheme, "original_max_position_embeddings", None)
        if original is None:
            raise ValueError("max_position_embeddings is needed: the position scheme does not say which context "
                             "length the model was trained for")
        max_position_embeddings = original if scheme.scheme_name == "dynamic" else int(
            original * getattr(scheme, "factor", 1))
    if scheme.scheme_name == "dynamic" and max_position_embeddings != scheme.original_max_position_embeddings:
        raise ValueError(f"max_position_embeddings={max_position_embeddings}: HF's dynamic NTK measures against it, "
                         f"so it must be the scheme's original_max_position_embeddings "
                         f"({scheme.original_max_position_embeddings})")
    if isinstance(cfg.mask, masks.Causal):
        window = None
    elif isinstance(cfg.mask, masks.SlidingWindow):
        window = cfg.mask.window
    else:
        raise NotImplementedError(f"HF Llama/Qwen2/Mistral models have no mask {cfg.mask!r}")
    if cfg.qkv_bias:
        architecture, kind = "Qwen2ForCausalLM", "qwen2"
        extra = {"use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": 0,
                 "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.num_layers}
    elif window is not None:
        architecture, kind, extra = "MistralForCausalLM", "mistral", {"sliding_window": window}
    else:
        architecture, kind, extra = "LlamaForCausalLM", "llama", {"attention_bias": False, "mlp_bias": False}
    return {
        "architectures": [architecture], "model_type": kind, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype, **extra, **rope,
    }


def hf_tensors(params: dict, config: LlamaConfig) -> dict[str, jnp.ndarray]:
    """The HF tensors of longctx `params` (the inverse of `params_from_hf`)."""
    tensors = {}
    for path, (hf_name, how) in _hf_names(config).items():
        value = params
        for key in path:
            value = value[key]
        if how == "linear":
            value = value.reshape(value.shape[0], -1).T
        elif how == "linear_out":
            value = value.reshape(-1, config.hidden_size).T
        elif how == "heads":
            value = value.reshape(-1)
        tensors[hf_name] = value
    return tensors


def save(model: Llama, params: dict, path: str | pathlib.Path, *, max_position_embeddings: int | None = None,
         dtype: str = "float32", extra_config: dict[str, Any] | None = None, overwrite: bool = False,
         max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Writes `model` and `params` as an HF directory (config.json, safetensors in `dtype`, sharded past
    `max_shard_bytes` with an index) that transformers loads. `max_position_embeddings` defaults to the scheme's
    length where it has one; `extra_config` adds fields (token ids, ...); a scanned model's stacked layers are
    written layer by layer. An existing non-empty directory is
    refused unless `overwrite`. Everything is checked before anything is written."""
    path = pathlib.Path(path)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    model, params = unscanned(model, params)  # HF stores each layer's weights apart
    config = {**hf_config_of(model, max_position_embeddings=max_position_embeddings, dtype=dtype),
              **(extra_config or {})}
    tensors = {name: jnp.asarray(value, SAVE_DTYPES[dtype]) for name, value in hf_tensors(params, model.config).items()}
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to write into it")
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, jnp.ndarray]] = [{}]
    sizes = [0]
    for name, tensor in tensors.items():
        if shards[-1] and sizes[-1] + tensor.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], path / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


__all__ = ["hf_config_of", "load", "params_from_hf", "read_config", "save"]
