"""Builds tests/fixtures/gguf/logits.npz: transformers' own GGUF loader's logits for the GGUF files
tests/gguf_files.py writes from the tiny HF fixture models (run it in the side environment with torch +
transformers + gguf, not longctx's own: `make test` compares against this file and needs no torch).

    python3.11 -m venv .venv-hf
    .venv-hf/bin/pip install torch==2.13.0 transformers==5.25.0 gguf==0.19.0 accelerate safetensors numpy
    .venv-hf/bin/python scripts/make_gguf_fixtures.py    # rewrites tests/fixtures/gguf/logits.npz

For every file of FILES (model, matrix quantisation, token-embedding quantisation), the float32 logits of
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` on the HF fixtures' `input_ids_short` [2, 12] and
`input_ids_long` [2, 40], eager attention, stored as "{model}_{quant}/{input}". transformers dequantises with gguf and
undoes llama.cpp's q/k permutation with its own code, so the goldens check our reading independently. And
tokens.json: the ids transformers' GGUF tokenizer gives for TOKENIZER_TEXTS, from tokenizer-only files
(`gguf_files.write_tokenizer`, "gpt2" and "smollm" pre-tokenizers).
"""

import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import gguf_files  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "gguf" / "logits.npz"
TOKENS_OUT = OUT.with_name("tokens.json")
# Text with code, unicode, whitespace runs and a special token; for the "smollm" file without digits, as
# transformers' GGUF loader does not split digits as llama.cpp's "smollm" pre-tokenizer does.
TEXT = "def f(x):\n    return x + y  # the thesis\n\n\tünïcode café 東京 🤗   then <|im_end|> there"
TOKENIZER_TEXTS = {"gpt2": TEXT + " 1234 and x-56", "smollm": TEXT}
# (model, matrices, token embedding): float32, Q8_0, and SmolLM2's file's kinds (Q4_1 with a Q8_0 embedding). Not
# the Qwen2 fixture: transformers' GGUF config mapping for qwen2 ignores attention.key_length, and the fixture's head
# dim (16) is not hidden / heads (8); tests check qwen2 files against the HF fixture's own logits.
FILES = [("llama", "F32", None), ("llama", "Q8_0", None), ("llama", "Q4_1", "Q8_0")]


def file_key(model: str, quant: str, embedding_quant: str | None) -> str:
    return f"{model}_{quant}" + (f"_embed_{embedding_quant}" if embedding_quant else "")


def main() -> None:
    inputs = np.load(REPO / "tests" / "fixtures" / "hf" / "logits.npz")
    golden = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model_name, quant, embedding_quant in FILES:
            key = file_key(model_name, quant, embedding_quant)
            gguf_files.write(model_name, pathlib.Path(scratch) / f"{key}.gguf", quant, embedding_quant)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                scratch, gguf_file=f"{key}.gguf", dtype=torch.float32, attn_implementation="eager")
            for which in ("input_ids_short", "input_ids_long"):
                with torch.no_grad():
                    logits = model(torch.as_tensor(inputs[which], dtype=torch.long)).logits
                golden[f"{key}/{which}"] = logits.float().numpy()
            print(f"{key}: logits {golden[f'{key}/input_ids_short'].shape}")
        tokens = {}
        for pre, text in TOKENIZER_TEXTS.items():
            gguf_files.write_tokenizer(pathlib.Path(scratch) / f"tokenizer_{pre}.gguf", pre)
            tokenizer = transformers.AutoTokenizer.from_pretrained(scratch, gguf_file=f"tokenizer_{pre}.gguf")
            tokens[pre] = {"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **golden)
    TOKENS_OUT.write_text(json.dumps(tokens, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} (transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
