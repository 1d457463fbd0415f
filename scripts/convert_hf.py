"""Converts between HF transformers model directories and longctx runs (no torch needed).

    # An HF Llama / Qwen2 / Mistral directory → a longctx run that `python -m longctx.eval --workdir` measures
    python scripts/convert_hf.py to_longctx --hf_dir path/to/hf_model --workdir runs/llama [--tokenizer T]
        [--seq_len N] [--dtype bfloat16]
    # A llama.cpp GGUF file (llama, qwen2; any quantisation gguf reads) → a run whose tokenizer is the file's own
    python scripts/convert_hf.py to_longctx --gguf SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2

    # A longctx run (its newest checkpoint, or --step) → an HF directory transformers loads
    python scripts/convert_hf.py to_hf --workdir runs/x --hf_dir exported/x [--step N] [--dtype bfloat16]
        [--max_position_embeddings N] [--overwrite]

A RoPE-family position scheme becomes the matching HF rope type; schemes HF has no equivalent for (ALiBi, CLEX,
LM-Infinite, ...) are refused before anything is written. Nothing existing is overwritten unless --overwrite.
"""

import argparse
import pathlib
import sys

from longctx import convert
from longctx.train.checkpoint import WorkdirError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_longctx = commands.add_parser("to_longctx", help="HF directory or GGUF file → longctx run")
    source = to_longctx.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf_dir", type=pathlib.Path, help="an HF model directory")
    source.add_argument("--gguf", type=pathlib.Path, help="a llama.cpp GGUF model file")
    to_longctx.add_argument("--workdir", required=True, type=pathlib.Path)
    to_longctx.add_argument("--tokenizer", help="data.tokenizer of the run (default: the HF dir's tokenizer.json, "
                                                "or the GGUF file's own)")
    to_longctx.add_argument("--seq_len", type=int, help="data.seq_len (default: the model's context length)")
    to_longctx.add_argument("--dtype", default="float32", help="compute dtype of the run (params stay float32)")
    to_hf = commands.add_parser("to_hf", help="longctx run → HF directory")
    to_hf.add_argument("--workdir", required=True, type=pathlib.Path)
    to_hf.add_argument("--hf_dir", required=True, type=pathlib.Path)
    to_hf.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    to_hf.add_argument("--dtype", default="float32", help="dtype of the saved tensors: float32, bfloat16, float16")
    to_hf.add_argument("--max_position_embeddings", type=int)
    to_hf.add_argument("--overwrite", action="store_true", help="write into a non-empty --hf_dir")
    args = parser.parse_args()
    try:
        if args.command == "to_longctx":
            source = args.gguf or args.hf_dir
            if args.gguf and not convert.is_gguf(args.gguf):
                raise ValueError(f"--gguf {args.gguf}: a GGUF model file ending in .gguf was expected")
            convert.hf_to_run(source, args.workdir, tokenizer=args.tokenizer, seq_len=args.seq_len, dtype=args.dtype)
            print(f"wrote the run {args.workdir} from {source}")
        else:
            path = convert.run_to_hf(args.workdir, args.hf_dir, step=args.step, dtype=args.dtype,
                                     max_position_embeddings=args.max_position_embeddings, overwrite=args.overwrite)
            print(f"wrote {path} from the run {args.workdir}")
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, WorkdirError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
