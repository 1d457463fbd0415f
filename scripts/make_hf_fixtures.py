"""Builds the HF transformers golden files under tests/fixtures/ (run it in an environment with torch + transformers,
not longctx's own: `make test` compares against these files and needs no torch).

    python3.11 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy
    .venv-hf/bin/python scripts/make_hf_fixtures.py            # rewrites tests/fixtures/hf/
    .venv-hf/bin/python scripts/make_hf_fixtures.py --check DIR  # HF loads a longctx-saved model dir: logits equal?

It writes, all from transformers' own code:
- rope.json: for HF configs of every rope type (v4 `rope_scaling` and v5 `rope_parameters` forms, partial rotary),
  HF's inv_freq and attention factor at several sequence lengths (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`, and
  the Llama default for "default").
- models/{llama,qwen2,mistral}/: tiny random-weight LlamaForCausalLM (float32), Qwen2ForCausalLM (q/k/v bias,
  tied embeddings, sharded safetensors with an index) and MistralForCausalLM (sliding window 8, bfloat16 weights).
- llama_rope_variants.json: Llama config fields for one variant per rope type (the llama weights are shared).
- logits.npz: float32 logits of every model (and every llama variant) on `input_ids_short` [2, 12] and
  `input_ids_long` [2, 40], from a fresh model per call (HF's dynamic RoPE caches across calls), eager attention.
"""

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from transformers import modeling_rope_utils

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
VOCAB, MAX_POSITIONS = 64, 16
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6)

# HF config dicts for the rope parity file: name → config.json fields (tiny sizes plus the rope settings).
LONGROPE_SHORT = [1.0 + 0.05 * i for i in range(32)]
LONGROPE_LONG = [1.0 + 0.9 * i for i in range(32)]
ROPE_CONFIGS = {
    "default_v4": {"rope_theta": 10000.0},
    "default_v5_theta5e5": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "linear_v4_type": {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "linear_v5_partial": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
                          "partial_rotary_factor": 0.5},
    "dynamic_v4": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
    "dynamic_v5_partial": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 8.0,
                                               "partial_rotary_factor": 0.75}},
    "yarn_v4": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 4096}},
    "yarn_v5_betas_no_truncate": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 2048,
        "beta_fast": 16, "beta_slow": 2, "truncate": False}},
    "yarn_mscale_deepseek": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "mscale": 1.0, "mscale_all_dim": 0.707}},
    "yarn_attention_factor_partial": {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4096,
        "attention_factor": 1.25, "partial_rotary_factor": 0.5}},
    "yarn_factor_from_lengths": {"max_position_embeddings": 16384, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": None, "original_max_position_embeddings": 4096}},
    "longrope_v5": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 8.0,
                                        "original_max_position_embeddings": 4096, "short_factor": LONGROPE_SHORT,
                                        "long_factor": LONGROPE_LONG}},
    "longrope_phi3_top_level_original": {
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": LONGROPE_SHORT, "long_factor": LONGROPE_LONG}},
    "llama3_v4": {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
    "llama3_v5_32": {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "proportional": {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e6, "factor": 2.0,
                                         "partial_rotary_factor": 0.25}},
}
ROPE_HEAD_DIM = 64
ROPE_SEQ_LENS = [None, 100, 4096, 4097, 8192, 20000, 131073]

# One Llama variant per rope type for the logits (tiny lengths: the long input, 40 tokens, is past max positions 16).
LLAMA_VARIANTS = {
    "default": {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    "linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.5}},
    "dynamic": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 3.0}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                 "original_max_position_embeddings": 8, "beta_fast": 8, "beta_slow": 1}},
    "yarn_mscale": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                                        "original_max_position_embeddings": 8, "mscale": 1.0,
                                        "mscale_all_dim": 0.5}},
    "longrope": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 500.0, "factor": 4.0,
                                     "original_max_position_embeddings": 16,
                                     "short_factor": [1.0, 1.1, 1.2, 1.5, 1.7, 2.0, 2.2, 2.5],
                                     "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                   "original_max_position_embeddings": 8}},
    "proportional": {"rope_parameters": {"rope_type": "proportional", "rope_theta": 500.0, "factor": 1.5,
                                         "partial_rotary_factor": 0.5}},
}


def hf_config(fields: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{**TINY, "head_dim": ROPE_HEAD_DIM, "num_attention_heads": 2,
                                       "hidden_size": 128, **fields})


def rope_values(fields: dict, seq_len) -> dict:
    config = hf_config(json.loads(json.dumps(fields)))  # HF edits the dicts it is given
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
            .compute_default_rope_parameters(config)
    else:
        inv_freq, factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)
    return {"seq_len": seq_len, "inv_freq": [float(x) for x in inv_freq.float().numpy()],
            "attention_factor": float(factor)}


def write_rope_parity() -> None:
    cases = []
    for name, fields in ROPE_CONFIGS.items():
        config = {**TINY, "head_dim": ROPE_HEAD_DIM, "num_attention_heads": 2, "hidden_size": 128, **fields}
        cases.append({"name": name, "config": config,
                      "values": [rope_values(fields, seq_len) for seq_len in ROPE_SEQ_LENS]})
    (OUT / "rope.json").write_text(json.dumps({"transformers": transformers.__version__, "cases": cases}) + "\n")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight N(0, 0.2), norm scales 1 + N(0, 0.1), biases N(0, 0.1): logits of order 1 that depend on
    every tensor (HF's own init leaves norms at 1 and biases at 0, which would hide a mapping error)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def logits(model_dir: pathlib.Path, input_ids: np.ndarray, config_fields: dict | None = None) -> np.ndarray:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    for key, value in (config_fields or {}).items():
        setattr(config, key, json.loads(json.dumps(value)))
    if config_fields:
        config.standardize_rope_params()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                              attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(input_ids)).logits.float().numpy()


def write_models() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = {"input_ids_short": rng.integers(0, VOCAB, size=(2, 12)),
              "input_ids_long": rng.integers(0, VOCAB, size=(2, 40))}
    builds = {
        "llama": (transformers.LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
                  transformers.LlamaForCausalLM, torch.float32, None),
        "qwen2": (transformers.Qwen2Config(**TINY, tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                  transformers.Qwen2ForCausalLM, torch.float32, "24KB"),
        "mistral": (transformers.MistralConfig(**TINY, sliding_window=8,
                                               rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                    transformers.MistralForCausalLM, torch.bfloat16, None),
    }
    arrays = dict(inputs)
    for seed, (name, (config, model_class, dtype, shard)) in enumerate(builds.items()):
        model = model_class(config)
        randomize(model, seed)
        directory = OUT / "models" / name
        shutil.rmtree(directory, ignore_errors=True)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.to(dtype).save_pretrained(directory, **kwargs)
        for which, ids in inputs.items():
            arrays[f"{name}/{which}"] = logits(directory, ids)
    for variant, fields in LLAMA_VARIANTS.items():
        for which, ids in inputs.items():
            arrays[f"llama_{variant}/{which}"] = logits(OUT / "models" / "llama", ids, fields)
    (OUT / "llama_rope_variants.json").write_text(json.dumps(LLAMA_VARIANTS, indent=1) + "\n")
    return arrays


def check_saved(model_dir: pathlib.Path, name: str) -> None:
    """Loads a directory that longctx wrote with transformers and compares its logits with the golden ones of `name`
    (a key prefix of logits.npz, e.g. llama or llama_yarn)."""
    golden = np.load(OUT / "logits.npz")
    for which in ("input_ids_short", "input_ids_long"):
        got = logits(model_dir, golden[which])
        error = float(np.max(np.abs(got - golden[f"{name}/{which}"])))
        print(json.dumps({"model_dir": str(model_dir), "golden": name, "input": which, "max_abs_error": error}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", nargs=2, metavar=("MODEL_DIR", "GOLDEN_NAME"),
                        help="compare transformers' logits of MODEL_DIR with the golden logits of GOLDEN_NAME")
    args = parser.parse_args()
    if args.check:
        check_saved(pathlib.Path(args.check[0]), args.check[1])
        return
    torch.use_deterministic_algorithms(True)
    OUT.mkdir(parents=True, exist_ok=True)
    write_rope_parity()
    np.savez_compressed(OUT / "logits.npz", **{k: np.asarray(v) for k, v in write_models().items()})
    print(f"wrote {OUT} with transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
