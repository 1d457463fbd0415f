"""Why a model does not retrieve the pass key: can it copy at all, and does generation agree with the model?

    python experiments/kv_compression/diagnose.py --run RUN [--length L] [--num_samples 2]

For `num_samples` pass-key prompts (longctx.eval.passkey) per depth at length L (default: the run's training length)
it prints one JSON object:

- `answer_key_tokens`: the share of the answer's key tokens the model predicts (argmax), teacher-forced: each
  prediction sees the right tokens before it. Chance is about 0.1 for a byte model's digits.
- `needle_copy_key_tokens`: the same at the needle's second copy of the key ("The pass key is {key}. Remember it.
  {key} is the pass key."), a few tokens after the first. A model that cannot copy there has no induction heads for
  the answer to use either: the fault is in training, not in retrieval over distance.
- `rerun_accuracy`: pass-key accuracy of greedy decoding by re-running the whole forward for every new token (no
  cache); `rerun_examples`: its first continuations.
- `generation`: for each cache ("encoded", "raw") and batch size, the accuracy through `longctx.infer.Generator`
  (prefill, KV cache, left-padded batches) and `agrees_with_rerun`, the share of continuations equal to re-running's:
  below 1.0 (beyond a rare bfloat16 near-tie) the cached path computes something other than the model.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from longctx import cli
from longctx.data import Tokenizer, load_tokenizer
from longctx.eval import passkey
from longctx.infer.generate import Generator
from longctx.models import Llama, build_model
from longctx.models.llama import param_structure
from longctx.train import checkpoint

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def find(sequence: np.ndarray, part: np.ndarray, start: int) -> int | None:
    """The first index >= start at which `part` occurs in `sequence`, or None."""
    for i in range(start, len(sequence) - len(part) + 1):
        if np.array_equal(sequence[i:i + len(part)], part):
            return i
    return None


def diagnose(model: Llama, params, tokenizer: Tokenizer, length: int, *, num_samples: int = 2,
             depths=DEPTHS, max_new_tokens: int = 8, batch_sizes=(1, 8), caches=("encoded", "raw")) -> dict:
    samples = passkey.build(tokenizer, [length], depths, num_samples=num_samples)
    forward = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))
    answer_hits, needle_hits, reruns = [], [], []
    for sample in samples:
        key = sample.info["key"]
        answer = np.asarray(tokenizer.encode(f" {key}"), np.int32)
        tokens = np.concatenate([sample.prompt, answer]).astype(np.int32)
        predicted = np.asarray(forward(params, jnp.asarray(tokens[None])))[0].argmax(-1)
        n = len(sample.prompt)
        answer_hits += list(predicted[n - 1:n - 1 + len(answer)] == answer)
        key_tokens = np.asarray(tokenizer.encode(key), np.int32)
        first = find(sample.prompt, key_tokens, sample.info["needle_position"])
        second = None if first is None else find(sample.prompt, key_tokens, first + len(key_tokens))
        if second is not None:
            needle_hits += list(predicted[second - 1:second - 1 + len(key_tokens)] == key_tokens)
        # One buffer of n + max_new_tokens (one compiled shape): causal attention leaves the logits at t blind to
        # the padding after it.
        sequence = np.concatenate([sample.prompt, np.full(max_new_tokens, tokenizer.pad_id)]).astype(np.int32)
        for t in range(n, n + max_new_tokens):
            sequence[t] = int(np.asarray(forward(params, jnp.asarray(sequence[None])))[0, t - 1].argmax())
        reruns.append(tokenizer.decode(sequence[n:]))
    result = {"samples": len(samples), "length": length,
              "answer_key_tokens": float(np.mean(answer_hits)),
              "needle_copy_key_tokens": float(np.mean(needle_hits)) if needle_hits else None,
              "rerun_accuracy": float(np.mean([passkey.score(text, s) for text, s in zip(reruns, samples)])),
              "rerun_examples": reruns[:4], "keys": [s.info["key"] for s in samples[:4]], "generation": {}}
    for cache in caches:
        generator = Generator(model, params, pad_id=tokenizer.pad_id, cache=cache)
        for batch_size in batch_sizes:
            outputs = generator.generate_batched([s.prompt for s in samples], max_new_tokens=max_new_tokens,
                                                 batch_size=batch_size)
            texts = [tokenizer.decode(o) for o in outputs]
            result["generation"][f"{cache}/batch{batch_size}"] = {
                "accuracy": float(np.mean([passkey.score(text, s) for text, s in zip(texts, samples)])),
                "agrees_with_rerun": float(np.mean([a == b for a, b in zip(texts, reruns)]))}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="A trained run's workdir (its newest checkpoint is used).")
    parser.add_argument("--length", type=int, help="Prompt length (default: the run's data.seq_len).")
    parser.add_argument("--num_samples", type=int, default=2, help="Prompts per depth.")
    args = parser.parse_args(argv)
    cli.setup_logging()
    run = pathlib.Path(args.run)
    config = checkpoint.load_run_config(run)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
    checkpoints = checkpoint.Checkpoints(run)
    step = checkpoints.latest_step()
    params = checkpoints.restore_params(step, param_structure(model)[0])
    checkpoints.close()
    result = diagnose(model, params, tokenizer, args.length or config.data.seq_len, num_samples=args.num_samples)
    print(json.dumps({"run": str(run), "step": step, **result}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
