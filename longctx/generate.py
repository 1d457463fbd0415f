"""python -m longctx.generate --workdir RUN --prompt-file F [--max_new_tokens 256] [--temperature 0.7 --top_p 0.9]
    [--cache auto|encoded|raw] [--page_size 64] [--kv_policy snapkv|sinks_window --kv_budget 4096]

Continues the text of a file with a trained run (its newest checkpoint, or --step) through the KV cache and prints
the continuation. Greedy by default; `--temperature` > 0 samples, from the nucleus of `--top_p`, seeded by `--seed`.
`--cache` and `--page_size` choose the KV cache, `--kv_policy` a compression of it after the prefill.
The Python API is `longctx.infer.generate.Generator`; `load_run` gives it a run's model and params.
"""

import pathlib
import sys

from absl import app, flags

from longctx import cli
from longctx.data import Tokenizer, load_tokenizer
from longctx.infer.compress import POLICIES, compression_of
from longctx.infer.generate import CACHE_KINDS, Generator
from longctx.infer.sampling import Sampling
from longctx.models import Llama, build_model, param_structure
from longctx.train import checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to generate with (a longctx.train workdir).", required=True)
_PROMPT_FILE = flags.DEFINE_string("prompt-file", None, "A UTF-8 text file: the prompt.", required=True)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the most probable tokens of this much probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 1024, "Prompt tokens per prefill call (0: the whole prompt "
                                      "in one call).")
_CACHE = flags.DEFINE_enum("cache", "auto", list(CACHE_KINDS), "KV cache keys: encoded once (the decoding kernel) "
                           "or raw (re-encoded every step, any scheme); auto: encoded where the scheme allows.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", None, "Page the KV cache with pages of this many tokens.")
_KV_POLICY = flags.DEFINE_enum("kv_policy", "none", ["none", *POLICIES], "KV compression after the prefill "
                               "(longctx.infer.compress).")
_KV_BUDGET = flags.DEFINE_integer("kv_budget", None, "Tokens each kv head keeps (--kv_policy).")
_KV_FRACTION = flags.DEFINE_float("kv_fraction", None, "Fraction of the prompt each kv head keeps (--kv_policy).")


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> tuple[Tokenizer, Llama, dict, int]:
    """(tokenizer, model, params, step) of the run in `workdir` at checkpoint `step` (default: the newest)."""
    workdir = pathlib.Path(workdir)
    config = checkpoint.load_run_config(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
    checkpoints = checkpoint.Checkpoints(workdir)
    step = checkpoints.step_to_restore(step, f"--workdir {workdir}")
    params = checkpoints.restore_params(step, param_structure(model)[0])
    checkpoints.close()
    return tokenizer, model, params, step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    try:
        sampling = Sampling(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
        prompt_path = pathlib.Path(_PROMPT_FILE.value)
        if not prompt_path.is_file():
            raise FileNotFoundError(f"--prompt-file: no such file {prompt_path}")
        tokenizer, model, params, _ = load_run(_WORKDIR.value, _STEP.value)
        prompt = tokenizer.frame(tokenizer.encode(prompt_path.read_text(encoding="utf-8")))[:-1]  # BOS, no EOS
        compression = compression_of(_KV_POLICY.value, _KV_BUDGET.value, _KV_FRACTION.value)
        generator = Generator(model, params, pad_id=tokenizer.pad_id, prefill_chunk=_PREFILL_CHUNK.value or None,
                              max_length=model.position_scheme.max_length(), sampling=sampling, seed=_SEED.value,
                              cache=_CACHE.value, page_size=_PAGE_SIZE.value, compression=compression)
        (continuation,) = generator.generate([prompt], max_new_tokens=_MAX_NEW_TOKENS.value,
                                             stop_ids=[tokenizer.eos_id])
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        sys.exit(f"error: {e}")
    print(tokenizer.decode(continuation))


def run():
    app.run(main)


if __name__ == "__main__":
    run()
