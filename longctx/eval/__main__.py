"""python -m longctx.eval --workdir RUN --lengths 256,512,1024 [--tasks ppl,passkey,niah,ruler,longbench]
    [--positions rope,yarn | all] [--config.model.positions.factor=8 ...]
    [--cache auto|encoded|raw] [--page_size 64] [--kv_policy snapkv|sinks_window --kv_fraction 0.125]

Evaluates a trained run at each length under each position scheme on each task, prints the tables, and writes
report.json, report.md and the plots into --output_dir (default: the workdir), replacing an earlier report there only
with --overwrite. `--config.model.positions.<param>=<value>` sets a parameter of every evaluated scheme that takes
it (the scheme at evaluation time may differ from training's). The generation tasks run through the KV cache
`--cache` and `--page_size` choose, and under the KV compression policy `--kv_policy` with its budget.
"""

import ast
import dataclasses
import pathlib
import sys

from absl import app, flags

from longctx import cli
from longctx.eval import ruler, suite
from longctx.eval.report import check_output_dir, markdown, write_report
from longctx.infer.compress import POLICIES, compression_of
from longctx.infer.generate import CACHE_KINDS

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate (a longctx.train workdir).", required=True)
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths to evaluate at, e.g. 256,512,1024.", required=True)
_TASKS = flags.DEFINE_list("tasks", ["ppl"], f"Tasks to run: some of {', '.join(suite.TASKS)}.")
_POSITIONS = flags.DEFINE_list("positions", None, "Position schemes to evaluate with (default: the trained one); "
                               "'all' for every registered scheme.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
_NUM_DOCUMENTS = flags.DEFINE_integer("num_documents", None, "Held-out documents per length for ppl "
                                      "(default: the run's eval.num_documents).")
_STRIDE = flags.DEFINE_integer("stride", None, "Also measure sliding-window perplexity with this stride.")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths (0 = start, 1 = end) of "
                            "passkey and niah.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", suite.Options.num_samples, "Prompts per (task, length, depth); "
                                    "for longbench, records per file.")
_DOCUMENTS = flags.DEFINE_string("documents", None, "Files or globs (.txt, .jsonl, .parquet) whose every document "
                                 "ppl reads and niah hides needles in, instead of the run's held-out split.")
_HAYSTACK = flags.DEFINE_string("haystack", None, "A text file to hide needles in (niah, RULER essay tasks); "
                                "default: the held-out documents.")
_RULER_TASKS = flags.DEFINE_list("ruler_tasks", list(ruler.TASKS), "RULER tasks to run.")
_LONGBENCH = flags.DEFINE_list("longbench", [], "LongBench- or L-Eval-style .jsonl files (task longbench).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Prompts generated at once (default: eval.batch_size).")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", suite.Options.prefill_chunk, "Prompt tokens per prefill "
                                      "call through the KV cache.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled prompts.")
_PROMPT_FORMAT = flags.DEFINE_enum("prompt_format", "plain", list(suite.PROMPT_FORMATS), "Generation prompts as "
                                   "plain text after BOS, or as a user's turn of the tokenizer's chat template.")
_CACHE = flags.DEFINE_enum("cache", "auto", list(CACHE_KINDS), "KV cache keys: encoded once (the decoding kernel) "
                           "or raw (re-encoded every step, any scheme); auto: encoded where the scheme allows.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", None, "Page the KV cache with pages of this many tokens.")
_KV_POLICY = flags.DEFINE_enum("kv_policy", "none", ["none", *POLICIES], "KV compression after the prefill "
                               "(longctx.infer.compress).")
_KV_BUDGET = flags.DEFINE_integer("kv_budget", None, "Tokens each kv head keeps (--kv_policy).")
_KV_FRACTION = flags.DEFINE_float("kv_fraction", None, "Fraction of each prompt each kv head keeps (--kv_policy).")
_UNROLL_LAYERS = flags.DEFINE_bool("unroll_layers", False, "Generate with the layers unrolled: faster decoding "
                                   "steps (long answers of large models), about three times the compilation.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the report goes (default: --workdir).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a report already in --output_dir.")

OVERRIDE_PREFIX = "--config.model.positions."
_OVERRIDES: dict = {}


def take_scheme_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """argv without its `--config.model.positions.<param>=<value>` flags, and those as {param: value} (values read
    as Python literals where they parse, else strings)."""
    rest, overrides = [], {}
    for arg in argv:
        if not arg.startswith(OVERRIDE_PREFIX):
            rest.append(arg)
            continue
        key, sep, value = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not sep or not key:
            sys.exit(f"error: {arg}: write {OVERRIDE_PREFIX}<param>=<value>")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return rest, overrides


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    try:
        lengths = [int(n) for n in _LENGTHS.value]
        depths = tuple(float(d) for d in _DEPTHS.value)
    except ValueError:
        sys.exit(f"error: --lengths must be integers and --depths numbers, got {','.join(_LENGTHS.value)} and "
                 f"{','.join(_DEPTHS.value)}")
    options = suite.Options(tasks=tuple(_TASKS.value), depths=depths, num_samples=_NUM_SAMPLES.value,
                            stride=_STRIDE.value, documents=_DOCUMENTS.value, haystack=_HAYSTACK.value,
                            ruler_tasks=tuple(_RULER_TASKS.value),
                            longbench=tuple(_LONGBENCH.value), batch_size=_BATCH_SIZE.value,
                            prefill_chunk=_PREFILL_CHUNK.value, seed=_SEED.value,
                            prompt_format=_PROMPT_FORMAT.value, cache=_CACHE.value,
                            page_size=_PAGE_SIZE.value, unroll_layers=_UNROLL_LAYERS.value)
    output_dir = pathlib.Path(_OUTPUT_DIR.value or _WORKDIR.value)
    try:
        options = dataclasses.replace(options, compression=compression_of(_KV_POLICY.value, _KV_BUDGET.value,
                                                                           _KV_FRACTION.value))
        check_output_dir(output_dir, overwrite=_OVERWRITE.value)
        evaluation = suite.prepare(_WORKDIR.value, lengths, _POSITIONS.value, options=options, step=_STEP.value,
                                   num_documents=_NUM_DOCUMENTS.value, overrides=_OVERRIDES)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    report = suite.run(evaluation)
    paths = write_report(report, output_dir)
    print("\n" + markdown(report))
    print("\n".join(f"wrote {path}" for path in paths.values()))


def run():
    argv, overrides = take_scheme_overrides(sys.argv)
    _OVERRIDES.update(overrides)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
