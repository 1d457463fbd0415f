"""GGUF files of the tiny HF fixture models, written as llama.cpp's converter writes them (numpy and gguf only, so
scripts/make_gguf_fixtures.py writes the same bytes in a side environment with transformers).

What llama.cpp's `convert_hf_to_gguf.py` does and this repeats: GGUF tensor names from its own map
(`gguf.get_tensor_name_map`: blk.{i}.attn_q.weight, ...), the `{arch}.*` metadata from the HF config, a llama
model's q and k rows permuted per head into interleaved RoPE pairs, matrices quantised (`gguf.quants.quantize`) and
1-D tensors (norms, biases) kept in float32. longctx.models.gguf reads the names back with a table of its own, which
these files check against llama.cpp's.
"""

import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import load_file

HF_MODELS = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf" / "models"
QUANT_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
               "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}


def hf_tensors(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, float32 tensors by HF name) of the HF fixture model `name` ("llama", "qwen2")."""
    directory = HF_MODELS / name
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update({key: value.astype(np.float32) for key, value in load_file(file).items()})
    return json.loads((directory / "config.json").read_text()), tensors


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half rows of each head into interleaved pairs."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(name: str) -> dict[str, np.ndarray]:
    """The fixture model's float32 tensors under their GGUF names, q/k permuted for llama (before quantising)."""
    config, tensors = hf_tensors(name)
    arch = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}[config["model_type"]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])  # llama.cpp's converter's own names
    out = {}
    for hf_name, value in tensors.items():
        if config["model_type"] == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            value = permute_rows(value, heads)
        out[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = value
    return out


def write(name: str, path: pathlib.Path, quant: str = "F32", embedding_quant: str | None = None,
          tokenizer: bool = False) -> pathlib.Path:
    """Writes the HF fixture model `name` as a GGUF file at `path`: matrices in `quant` (the token embedding in
    `embedding_quant`, default `quant`), 1-D tensors in F32. `tokenizer`: with a byte-level BPE tokenizer of the
    model's vocabulary size (its first byte symbols, no merges, then SPECIAL_TOKENS), as real files carry one."""
    config, _ = hf_tensors(name)
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch} fixture")
    if tokenizer:
        add_tokenizer(writer, byte_symbols()[:config["vocab_size"] - len(SPECIAL_TOKENS)], [], "smollm")
    else:
        writer.add_vocab_size(config["vocab_size"])  # real files carry the tokenizer's tokens instead
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(float(config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    for tensor_name, value in gguf_tensors(name).items():
        kind = (embedding_quant or quant) if tensor_name == "token_embd.weight" else quant
        if value.ndim == 1 or kind == "F32":
            writer.add_tensor(tensor_name, value.astype(np.float32))
        elif kind == "F16":
            writer.add_tensor(tensor_name, value.astype(np.float16))
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(value, QUANT_TYPES[kind]),
                              raw_dtype=QUANT_TYPES[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# A byte-level BPE tokenizer small enough to write out: GPT-2's 256 byte symbols, merges learnt greedily from
# TOKENIZER_CORPUS (so they are the same wherever this runs), then control tokens.
TOKENIZER_CORPUS = ("the theme of the thesis: then there, the other three threw their things. def f(x):\n"
                    "    return x + 1  # then 123 and 4567\n\tün café naïve 東京 the end")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-Instruct's chat template (its GGUF file's tokenizer.chat_template): ChatML with a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NUM_MERGES = 60


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value (bytes_to_unicode), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def learnt_merges() -> list[tuple[str, str]]:
    """NUM_MERGES greedy BPE merges over the corpus's space-prefixed words (most frequent pair first, ties by the
    pair's text)."""
    symbols = byte_symbols()
    words = [[symbols[b] for b in (" " + word if i else word).encode()]
             for i, word in enumerate(TOKENIZER_CORPUS.split(" "))]
    merges = []
    for _ in range(NUM_MERGES):
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i:i + 2] = [word[i] + word[i + 1]]
                i += 1
    return merges


def write_tokenizer(path: pathlib.Path, pre: str = "smollm") -> pathlib.Path:
    """A GGUF file holding only a tokenizer (llama architecture, no tensors), with `tokenizer.ggml.pre` = `pre`."""
    merges = learnt_merges()
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, list(dict.fromkeys(byte_symbols() + [a + b for a, b in merges])), merges, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer: gguf.GGUFWriter, symbols: list[str], merges: list[tuple[str, str]], pre: str) -> None:
    """`tokenizer.ggml.*` fields: the tokens `symbols` + SPECIAL_TOKENS (control tokens: BOS <|im_start|>, EOS
    <|im_end|>, PAD <|endoftext|>, as SmolLM2's), `merges`, and the pre-tokenizer type `pre`; and SmolLM2's chat
    template."""
    tokens = symbols + SPECIAL_TOKENS
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_token_types([1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS))
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
