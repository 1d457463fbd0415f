"""llama.cpp GGUF files in: Llama-family models (llama, and mistral / qwen2 as llama.cpp writes them).

`load(path)` has `hf.load`'s contract: a longctx `Llama` and its float32 params, with the position scheme the file's
`{arch}.rope.*` metadata gives, so that `model.apply({"params": params}, ids)` gives the logits the file's weights
define. The file is read through `gguf`, llama.cpp's own reader: memory-mapped, one tensor dequantised at a time
(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants: whatever `gguf.quants.dequantize` takes) when it is
made into its param (`Tensors`), so loading holds the params and one tensor in float32, never the whole file.

The metadata becomes the HF config transformers would write for the model and the tensors take their HF names, so
the checks and the weight mapping are `longctx.models.hf`'s. One difference from an HF checkpoint: llama.cpp's
converter permutes the rows of a llama-architecture model's q and k projections, per head, from HF's rotate-half
order into interleaved pairs (GGML's "normal" RoPE); reading undoes it, as transformers' GGUF loader does:

    gguf rows of head h:  [x_0, x_{D/2}, x_1, x_{D/2+1}, ...]   →   HF rows:  [x_0, x_1, ..., x_{D/2}, ...]

qwen2 files keep HF's order (GGML's "neox" RoPE). What longctx cannot honour raises, naming the metadata field or the
tensor: another architecture, llama3-style `rope_freqs` factors, a rope scaling type other than linear or yarn.
"""

from collections.abc import Mapping
import pathlib
from typing import Any

import gguf as gguf_lib
import numpy as np

from longctx.data.tokenizers import HFTokenizer, gguf_tokenizer
from longctx.models import hf
from longctx.models.llama import Llama
from longctx.positions import from_hf_config

# GGUF general.architecture → the HF architecture whose config and tensors it maps onto.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_SCALING_TYPES = {"linear": "linear", "yarn": "yarn"}  # {arch}.rope.scaling.type → HF rope_type

_LAYER_TENSORS = {  # GGUF name within blk.{i} → HF name within model.layers.{i}
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MODEL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


def open_file(path: str | pathlib.Path) -> gguf_lib.GGUFReader:
    """The reader of the GGUF file `path` (memory-mapped; FileNotFoundError or ValueError naming the path)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file (a GGUF model file was expected)")
    try:
        return gguf_lib.GGUFReader(path)
    except (ValueError, AssertionError) as error:
        raise ValueError(f"{path} is not a GGUF file gguf can read: {error}") from None


def metadata(reader: gguf_lib.GGUFReader) -> dict[str, Any]:
    """The file's key-value fields but the tokenizer's (`longctx.data.gguf_tokenizer` reads those), as Python
    values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}


def architecture(fields: dict[str, Any]) -> str:
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NotImplementedError(f"GGUF general.architecture={arch!r} is not supported; longctx loads "
                                  f"{', '.join(ARCHITECTURES)} (mistral models are written as llama)")
    return arch


def hf_config(reader: gguf_lib.GGUFReader) -> dict[str, Any]:
    """The HF config dict (as transformers writes it) of the model in the GGUF file."""
    fields = metadata(reader)
    arch = architecture(fields)

    def field(name: str, default: Any = None) -> Any:
        key = f"{arch}.{name}"
        if key not in fields and default is None:
            raise ValueError(f"the GGUF file has no {key} (needed for the model's config)")
        return fields.get(key, default)

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise NotImplementedError("the GGUF file holds rope_freqs.weight (llama3-style per-frequency RoPE factors); "
                                  "longctx reads llama3 scaling from an HF config, not from these factors")
    if "token_embd.weight" not in tensors:
        raise ValueError("the GGUF file has no token_embd.weight tensor")
    num_heads = int(field("attention.head_count"))
    hidden = int(field("embedding_length"))
    head_dim = int(field("attention.key_length", hidden // num_heads))
    if int(field("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError(f"GGUF {arch}.attention.value_length={field('attention.value_length')} differs from "
                                  f"{arch}.attention.key_length={head_dim}; longctx's heads have one head dim")
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_act": "silu",
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # GGML order: [embed, vocab]
        "hidden_size": hidden, "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")), "num_attention_heads": num_heads,
        "num_key_value_heads": int(field("attention.head_count_kv", num_heads)), "head_dim": head_dim,
        "rms_norm_eps": _float(field("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rotary = int(field("rope.dimension_count", head_dim))
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
    window = fields.get(f"{arch}.attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)
        if arch == "qwen2":
            config["use_sliding_window"] = True
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        if scaling not in ROPE_SCALING_TYPES:
            raise NotImplementedError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported; longctx reads "
                                      f"{', '.join(ROPE_SCALING_TYPES)} (or none)")
        config["rope_scaling"] = {"rope_type": ROPE_SCALING_TYPES[scaling],
                                  "factor": _float(field("rope.scaling.factor"))}
        original = fields.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    return config


def _float(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


def hf_name(name: str) -> str:
    """The HF tensor name of GGUF tensor `name` (itself when it has none: `hf.check_tensors` then names it)."""
    if name in _MODEL_TENSORS:
        return _MODEL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return name


def dequantized(tensor) -> np.ndarray:
    """The float32 values of a GGUF tensor, in numpy order (GGML lists dimensions innermost first)."""
    values = gguf_lib.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of a q or k projection [heads · D, ...] from llama.cpp's interleaved RoPE order back to HF's (module
    docstring)."""
    pairs = weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


class Tensors(Mapping):
    """The file's tensors under their HF names, each dequantised to float32 in HF's layout when it is read (and
    not kept), so that making params from them (`hf.params_from_hf`) holds one tensor in float32 beside the params;
    `shapes` gives every HF shape from the file's header alone."""

    def __init__(self, reader: gguf_lib.GGUFReader, config: dict[str, Any]):
        self._tensors = {hf_name(tensor.name): tensor for tensor in reader.tensors}
        self._config = config

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        values = dequantized(tensor)
        if self._config["model_type"] == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self._config["num_attention_heads" if "attn_q" in tensor.name else "num_key_value_heads"]
            values = unpermute_rows(values, heads)
        return values

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(int(n) for n in reversed(tensor.shape)) for name, tensor in self._tensors.items()}


def load(path: str | pathlib.Path, *, dtype: str = "float32", attention_impl: str = "auto") -> tuple[Llama, dict]:
    """(model, params) of the GGUF file `path`; params are float32, compute runs in `dtype` (`hf.load`'s contract)."""
    reader = open_file(path)
    config = hf_config(reader)
    llama_config = hf.llama_config_from_hf(config, dtype=dtype, attention_impl=attention_impl)
    model = Llama(llama_config, position_scheme=from_hf_config(config))
    tensors = Tensors(reader, config)
    hf.check_tensors(tensors.shapes(), model)
    return model, hf.params_from_hf(tensors, llama_config)


def load_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """The tokenizer the GGUF file `path` carries (`longctx.data.gguf_tokenizer`), with its BOS / EOS / PAD; the
    same as `data.tokenizer` = the file's path gives."""
    return gguf_tokenizer(str(path))
