"""HF transformers configs ↔ position schemes.

`from_hf_config(config)` reads the rotary settings of a `config.json` dict — the v4 form (`rope_theta` +
`rope_scaling` with `type` or `rope_type`) or the v5 form (`rope_parameters`) — with `head_dim` (default
hidden_size // num_attention_heads), `partial_rotary_factor` and `max_position_embeddings`, and returns the scheme
whose `inv_freq(seq_len)` and `attention_factor(seq_len)` are HF's for that config (transformers 5.x
`modeling_rope_utils`, including its defaults: YaRN's and LongRoPE's factor from max / original positions when
absent, Phi-3's top-level `original_max_position_embeddings` taking precedence). `hf_rope_fields(scheme)` is the
inverse, for writing a config HF reads.
"""

import logging
from typing import Any

from longctx.positions.registry import get
from longctx.positions.rope import RoPE

log = logging.getLogger("longctx.positions")

# HF rope_type → (longctx scheme, the keys of rope_parameters it reads besides rope_type / rope_theta / partial).
HF_ROPE_TYPES = {
    "default": ("rope", ()),
    "linear": ("linear", ("factor",)),
    "dynamic": ("dynamic", ("factor",)),
    "yarn": ("yarn", ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate", "mscale",
                      "mscale_all_dim", "attention_factor")),
    "longrope": ("longrope", ("factor", "original_max_position_embeddings", "short_factor", "long_factor",
                              "attention_factor")),
    "llama3": ("llama3", ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")),
    "proportional": ("proportional", ("factor",)),
}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_DEFAULT_THETA = 10000.0


def hf_head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The flat rope parameters of an HF config dict, v4 or v5 form, with rope_type and rope_theta filled in."""
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    layer_types = set(config.get("layer_types") or ())
    nested = sorted(key for key in parameters if key in layer_types)
    if nested:
        raise NotImplementedError(
            f"the HF config gives each layer type its own rope parameters ({', '.join(nested)}); longctx models use "
            f"one position scheme for every layer")
    parameters = dict(parameters)
    parameters.setdefault("rope_type", parameters.pop("type", "default"))
    parameters.setdefault("rope_theta", config.get("rope_theta", _DEFAULT_THETA))
    if "partial_rotary_factor" in config:
        parameters.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return parameters


def from_hf_config(config: dict[str, Any]) -> RoPE:
    """The position scheme of an HF `config.json` dict; raises ValueError naming an unknown rope type."""
    for field in ("max_position_embeddings",):
        if field not in config:
            raise ValueError(f"the HF config has no {field!r}")
    parameters = rope_parameters(config)
    rope_type = parameters["rope_type"]
    if rope_type not in HF_ROPE_TYPES:
        raise ValueError(f"unknown rope type {rope_type!r} in the HF config; longctx reads "
                         f"{', '.join(sorted(HF_ROPE_TYPES))}")
    scheme_name, keys = HF_ROPE_TYPES[rope_type]
    ignored = sorted(set(parameters) - _COMMON_KEYS - set(keys))
    if ignored:  # HF warns about these and ignores them too.
        log.warning("rope parameters %s are not used by rope type %r (HF ignores them as well)", ignored, rope_type)

    max_positions = config["max_position_embeddings"]
    params: dict[str, Any] = {"theta": float(parameters["rope_theta"]),
                              "partial_rotary_factor": float(parameters.get("partial_rotary_factor", 1.0))}
    if rope_type in ("yarn", "longrope", "llama3"):
        # Phi-3 keeps the pretraining length at the top level, and HF gives it precedence.
        original = config.get("original_max_position_embeddings") or parameters.get(
            "original_max_position_embeddings") or max_positions
        params["original_max_position_embeddings"] = int(original)
    if rope_type == "dynamic":
        params["original_max_position_embeddings"] = int(max_positions)  # HF's dynamic NTK measures against it
    if "factor" in keys:
        factor = parameters.get("factor")
        if factor is None and rope_type in ("yarn", "longrope"):
            factor = max_positions / params["original_max_position_embeddings"]
        elif factor is None and rope_type == "proportional":
            factor = 1.0
        elif factor is None:
            raise ValueError(f"the HF config's rope type {rope_type!r} needs rope_parameters['factor']")
        params["factor"] = float(factor)
    if rope_type == "yarn":
        params.update(beta_fast=float(parameters.get("beta_fast") or 32),
                      beta_slow=float(parameters.get("beta_slow") or 1),
                      truncate=bool(parameters.get("truncate", True)),
                      # HF tests mscale and mscale_all_dim for truth, so 0 means unset.
                      mscale=parameters.get("mscale") or None, mscale_all_dim=parameters.get("mscale_all_dim") or None,
                      attn_factor=parameters.get("attention_factor"))
    if rope_type == "longrope":
        params.update(short_factor=parameters["short_factor"], long_factor=parameters["long_factor"],
                      attn_factor=parameters.get("attention_factor"))
    if rope_type == "llama3":
        params.update(low_freq_factor=float(parameters["low_freq_factor"]),
                      high_freq_factor=float(parameters["high_freq_factor"]))
    return get(scheme_name, head_dim=hf_head_dim(config), **params)


def hf_rope_fields(scheme) -> dict[str, Any]:
    """The config.json fields that make HF build `scheme`: `rope_parameters` (v5) and, for v4 readers, `rope_theta`
    and `rope_scaling`; raises NotImplementedError for a scheme HF has no rope type for."""
    if not isinstance(scheme, RoPE):
        raise NotImplementedError(f"position scheme {scheme.scheme_name!r} has no HF transformers equivalent; only "
                                  f"RoPE-family schemes can be saved as an HF config")
    parameters = scheme.hf_rope_parameters()
    scaling = {k: v for k, v in parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
    fields = {"rope_parameters": parameters, "rope_theta": parameters["rope_theta"],
              "rope_scaling": None if parameters["rope_type"] == "default" else scaling}
    if "partial_rotary_factor" in parameters:
        fields["partial_rotary_factor"] = parameters["partial_rotary_factor"]
    return fields
