"""Issue 27's targets on a real pretrained model: a llama.cpp GGUF file (SmolLM2-135M-Instruct) read by longctx.

    python scripts/bench_real_model.py --gguf FILE --workdir RUN [--parts logits,prefill,eval] [--commit HASH]

Three parts, each printing JSON lines (the last line is a summary of all three):

- logits: longctx's float32 logits of the file (`longctx.models.gguf.load`, matmuls at "highest" precision) against
  transformers' own GGUF loader (torch, float32, CPU, eager attention) on --text_tokens tokens of text (this
  repository's README and docs, tokenized by the file's own tokenizer): max and mean absolute difference, and the
  logit scale.
- prefill: one --prefill_length-token prompt through `Generator.prefill` (left-padded, chunked, KV cache of encoded
  keys, attention_impl "auto": the flash kernels on a GPU) at each --chunks size, against the forward of the
  model's training step at the same length in the same run (hidden states through the layers, then the chunked
  cross-entropy the trainer uses, no gradient). Compute in bfloat16, params float32; after a compiled warm-up call,
  the median of --repeats calls. tokens/s = prompt tokens / seconds; the ratio is prefill over forward.
- eval: `python -m longctx.eval` on RUN (made from the file by `scripts/convert_hf.py to_longctx --gguf`, bfloat16,
  when RUN does not exist yet) over the pass-key grid --lengths × --positions × 6 prompts (depths 0, 0.2, .., 1,
  one prompt each, one batch of 6), timed from the command's start to its end (start-up, checkpoint restore,
  tokenizer, prompt building and every compilation included), with the report's scores and per-scheme timing.
"""

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longctx.infer.generate import Generator  # noqa: E402
from longctx.models import gguf, output_weights  # noqa: E402
from longctx.train.loss import chunked_weighted_loss  # noqa: E402

PARTS = ("logits", "prefill", "eval")


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def text_tokens(path: pathlib.Path, count: int) -> np.ndarray:
    """The first `count` tokens of this repository's README and docs, by the file's tokenizer."""
    text = "\n\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    ids = np.asarray(gguf.load_tokenizer(path).encode(text), np.int32)
    if len(ids) < count:
        raise ValueError(f"the docs hold {len(ids)} tokens, fewer than --text_tokens={count}")
    return ids[:count]


def logits_part(path: pathlib.Path, count: int) -> dict:
    import torch
    import transformers

    tokens = text_tokens(path, count)
    model, params = gguf.load(path, dtype="float32")
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens[None]))[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = reference(torch.from_numpy(tokens[None]).long()).logits[0].numpy()
    diff = np.abs(ours - theirs)
    return emit({"part": "logits", "tokens": count, "max_abs_diff": float(diff.max()),
                 "mean_abs_diff": float(diff.mean()), "logit_scale": float(np.abs(theirs).max()),
                 "argmax_agreement": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))})


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, compilation included; median seconds of `repeats` more)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def prefill_part(path: pathlib.Path, length: int, chunks: list[int], repeats: int, loss_chunk: int) -> dict:
    model, params = gguf.load(path, dtype="bfloat16")
    params = jax.device_put(params, jax.devices()[0])
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, length).astype(np.int32)

    @jax.jit
    def forward(params, tokens):
        hidden = model.apply({"params": params}, tokens, hidden_only=True)
        return chunked_weighted_loss(hidden, output_weights(params, model.config), tokens,
                                     jnp.ones(tokens.shape, jnp.float32), loss_chunk)

    first, seconds = timed(lambda: forward(params, jnp.asarray(prompt[None])), repeats)
    baseline = emit({"part": "prefill", "what": "training forward", "length": length, "first_call_s": round(first, 3),
                     "seconds": round(seconds, 4), "tokens_per_s": round(length / seconds)})
    rows = []
    for chunk in chunks:
        generator = Generator(model, params, pad_id=0, prefill_chunk=chunk, cache="encoded")
        first, seconds = timed(lambda: generator.prefill([prompt], room=1)[0], repeats)
        rows.append(emit({"part": "prefill", "what": "Generator.prefill", "length": length, "chunk": chunk,
                          "first_call_s": round(first, 3), "seconds": round(seconds, 4),
                          "tokens_per_s": round(length / seconds),
                          "of_forward": round(baseline["seconds"] / seconds, 3)}))
    return {"forward": baseline, "prefill": rows}


def eval_part(path: pathlib.Path, workdir: pathlib.Path, lengths: str, positions: str, chunk: int,
              overrides: list[str]) -> dict:
    if not workdir.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "scripts/convert_hf.py"), "to_longctx", "--gguf", str(path),
                        "--workdir", str(workdir), "--dtype", "bfloat16"], check=True, cwd=REPO)
        emit({"part": "eval", "what": "convert", "seconds": round(time.perf_counter() - start, 1)})
    output = pathlib.Path(tempfile.mkdtemp(prefix="eval_report_"))
    command = [sys.executable, "-m", "longctx.eval", f"--workdir={workdir}", "--tasks=passkey",
               f"--lengths={lengths}", f"--positions={positions}", "--depths=0,0.2,0.4,0.6,0.8,1",
               "--num_samples=1", "--batch_size=6", f"--prefill_chunk={chunk}", f"--output_dir={output}",
               *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
        return emit({"part": "eval", "error": f"exit status {done.returncode}", "seconds": round(seconds, 1)})
    report = json.loads((output / "report.json").read_text())
    return emit({"part": "eval", "command": " ".join(["python"] + command[1:]).replace(str(output), "OUT"),
                 "prefill_chunk": chunk, "wall_s": round(seconds, 1),
                 "passkey": {scheme: result["passkey"] for scheme, result in report["passkey"].items()},
                 "timing": report["timing"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=pathlib.Path, required=True)
    parser.add_argument("--workdir", type=pathlib.Path, required=True, help="the run (made from --gguf if missing)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--text_tokens", type=int, default=2048)
    parser.add_argument("--prefill_length", type=int, default=32768)
    parser.add_argument("--chunks", default="1024,4096,32768")
    parser.add_argument("--loss_chunk", type=int, default=4096, help="train.loss_chunk of the forward baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--positions", default="rope,yarn,self_extend")
    parser.add_argument("--eval_chunks", default="1024", help="--prefill_chunk of each eval run")
    parser.add_argument("--overrides", default="--config.model.positions.factor=4,"
                        "--config.model.positions.original_max_position_embeddings=8192")
    parser.add_argument("--commit", default="")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: some of {','.join(PARTS)}")
    summary = {"date": datetime.date.today().isoformat(), "commit": args.commit, "jax": jax.__version__}
    for part in parts:  # in the order given; the eval runs in a process of its own, so this one should not yet hold
        # the GPU's memory (jax takes most of it at its first use) when the eval comes first
        if part == "logits":
            summary["logits"] = logits_part(args.gguf, args.text_tokens)
        elif part == "prefill":
            summary["prefill"] = prefill_part(args.gguf, args.prefill_length,
                                              [int(c) for c in args.chunks.split(",")], args.repeats, args.loss_chunk)
        else:
            summary["eval"] = [eval_part(args.gguf, args.workdir, args.lengths, args.positions, int(chunk),
                                         args.overrides.split(",") if args.overrides else [])
                               for chunk in args.eval_chunks.split(",")]
    summary["device"] = jax.devices()[0].device_kind
    emit({"summary": summary})


if __name__ == "__main__":
    main()
