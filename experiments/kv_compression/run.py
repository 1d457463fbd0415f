"""KV-cache compression against pass-key retrieval: what a cache of 1/8 (and 1/16) of the prompt keeps.

    python experiments/kv_compression/run.py --workdir runs/kv_gpu --setting gpu     # one GPU: 158M, L = 2048
    python experiments/kv_compression/run.py --workdir runs/kv_smoke --setting smoke # CPU: the pipeline end to end
    python experiments/kv_compression/run.py --workdir runs/kv --base_run runs/bakeoff_gpu/base   # a run you have

A base model is trained at length L with some of its documents pass-key prompts and their answers
(`data.passkey_fraction`), so that it retrieves within L; `--base_run` takes a trained run instead. Then the pass key
is asked for at L, at every depth, by greedy generation through the KV cache (`longctx.eval.suite`, task passkey):
once with the whole cache, and once per (policy, fraction) of `longctx.infer.compress`, each kv head keeping
ceil(fraction · n) of the prompt's n tokens after the prefill:

- "sinks_window": the first 4 tokens and the most recent ones (StreamingLLM, Xiao et al. 2023);
- "snapkv": the last 32 prompt tokens vote for the earlier ones (SnapKV, Li et al. 2024).

Steps are skipped when their result is already in the workdir (a stopped run resumes). It writes results.json,
results.md (accuracy by depth per row, and the cache each row decodes over) and passkey_by_depth.png.
"""

import argparse
import dataclasses
import json
import logging
import pathlib
import runpy
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from longctx import cli  # noqa: E402
from longctx.eval import report as eval_report  # noqa: E402
from longctx.eval import suite  # noqa: E402
from longctx.infer.compress import Compression  # noqa: E402
from longctx.train import checkpoint, train  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
log = logging.getLogger("kv_compression")


@dataclasses.dataclass(frozen=True)
class Setting:
    """The base model's config file and overrides, and the evaluation's size."""

    config_file: str
    base: dict
    depths: tuple[float, ...]
    num_samples: int  # prompts per depth
    batch_size: int
    prefill_chunk: int


SETTINGS = {
    # One GPU: the context-extension bake-off's base (158M parameters: 14 layers of width 1024, 16 query / 4 kv heads
    # of 64, bfloat16) at L = 2048, on the stdlib's code with a fifth of its documents pass-key prompts (about 2.5% of
    # its tokens: a share of documents, and code documents are ~10x longer), 1,200 steps. That base retrieved at L;
    # models trained on (almost) nothing but pass-key documents (50-98% of documents, 24M and 158M, up to 2,000
    # steps) did not: their constant filler is memorised without attention, and nothing forms the induction heads
    # that copying the key needs, which the repeated identifiers of code do.
    "gpu": Setting(
        config_file="configs/base.py",
        base={"model.hidden_size": 1024, "model.intermediate_size": 2816, "model.num_layers": 14,
              "model.num_heads": 16, "model.num_kv_heads": 4, "model.head_dim": 64, "model.scan_layers": True,
              "data.seq_len": 2048, "train.steps": 1200, "train.batch_size": 16, "train.warmup_steps": 80,
              "train.learning_rate": 1e-3, "train.weight_decay": 0.1, "train.checkpoint_every": 400,
              "data.passkey_fraction": 0.2},
        depths=(0.0, 0.25, 0.5, 0.75, 1.0), num_samples=8, batch_size=8, prefill_chunk=2048),
    # CPU: checks the whole pipeline in a minute or two; a model this small trained this briefly retrieves nothing.
    "smoke": Setting(
        config_file="configs/tiny.py",
        base={"data.seq_len": 256, "train.steps": 20, "train.batch_size": 4, "train.warmup_steps": 2,
              "train.checkpoint_every": 20, "data.passkey_fraction": 0.5},
        depths=(0.0, 1.0), num_samples=2, batch_size=2, prefill_chunk=256),
}

# (label, compression) rows; None is the whole cache.
ROWS = [("full cache", None)] + [
    (f"{policy} 1/{denominator}", Compression(policy, fraction=1 / denominator))
    for denominator in (8, 16) for policy in ("sinks_window", "snapkv")]


def base_config(setting: Setting):
    config = runpy.run_path(str(REPO / setting.config_file))["get_config"]()
    config.update_from_flattened_dict(setting.base)
    return config


def trained_base(setting: Setting, workdir: pathlib.Path) -> tuple[pathlib.Path, float | None]:
    """The base run's directory, trained here unless its last checkpoint is already there; and the seconds it took."""
    run_dir = workdir / "base"
    config = base_config(setting)
    if checkpoint.newest_step(run_dir) == config.train.steps:
        log.info("base: finished earlier, reused")
        return run_dir, None
    start = time.perf_counter()
    train(config, run_dir, resume=True)
    return run_dir, time.perf_counter() - start


def evaluate(setting: Setting, workdir: pathlib.Path, run_dir: pathlib.Path, label: str,
             compression: Compression | None, length: int) -> dict:
    """The pass-key report of one row, computed once and kept in <workdir>/evals/."""
    path = workdir / "evals" / (eval_report.file_slug(label) + ".json")
    if path.exists():
        return json.loads(path.read_text())
    options = suite.Options(tasks=("passkey",), depths=setting.depths, num_samples=setting.num_samples,
                            batch_size=setting.batch_size, prefill_chunk=setting.prefill_chunk, cache="encoded",
                            compression=compression)
    start = time.perf_counter()
    result = suite.evaluate(run_dir, [length], options=options)
    result["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def kept_tokens(compression: Compression | None, length: int) -> int:
    """Tokens each kv head decodes over after the prefill of an L-token prompt."""
    return length if compression is None else int(compression.budgets(np.asarray([length]))[0])


def scores(result: dict, length: int) -> tuple[float, dict[str, float]]:
    """(accuracy at `length`, accuracy by depth) of a passkey report under its one scheme."""
    (by_scheme,) = result["passkey"].values()
    return by_scheme["passkey"][str(length)], by_scheme["passkey/by_depth"][str(length)]


def table(rows: list[tuple[str, Compression | None, dict]], length: int, depths: tuple[float, ...],
          num_samples: int) -> str:
    lines = [f"| cache (L = {length}) | tokens kept per kv head | accuracy | "
             + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---|---:|---:|" + "---:|" * len(depths)]
    for label, compression, result in rows:
        accuracy, by_depth = scores(result, length)
        lines.append(f"| {label} | {kept_tokens(compression, length)} | {100 * accuracy:.0f}% | "
                     + " | ".join(f"{100 * by_depth[str(float(d))]:.0f}%" for d in depths) + " |")
    lines.append(f"\n{num_samples} prompts per depth, {num_samples * len(depths)} per row; exact match of the key.")
    return "\n".join(lines)


def plot(rows: list[tuple[str, Compression | None, dict]], length: int, depths: tuple[float, ...],
         path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for label, compression, result in rows:
        _, by_depth = scores(result, length)
        style = "-" if compression is None else "--" if compression.policy == "sinks_window" else ":"
        ax.plot(depths, [by_depth[str(float(d))] for d in depths], style, marker="o", label=label)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("depth of the pass key in the prompt (0 = start, 1 = end)")
    ax.set_ylabel(f"pass-key accuracy at L = {length}")
    eval_report.finish_plot(fig, ax, path, len(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the base run, evaluations and results go.")
    parser.add_argument("--setting", default="gpu", choices=sorted(SETTINGS))
    parser.add_argument("--base_run", help="Evaluate this trained run instead of training the setting's base.")
    args = parser.parse_args(argv)
    cli.setup_logging()
    setting, workdir = SETTINGS[args.setting], pathlib.Path(args.workdir)
    started = time.perf_counter()
    if args.base_run:
        run_dir, train_s = pathlib.Path(args.base_run), None
    else:
        run_dir, train_s = trained_base(setting, workdir)
    length = checkpoint.load_run_config(run_dir).data.seq_len
    rows = []
    for label, compression in ROWS:
        rows.append((label, compression, evaluate(setting, workdir, run_dir, label, compression, length)))
        log.info("%s: %.0f%%", label, 100 * scores(rows[-1][2], length)[0])
    results = {"setting": args.setting, "base_run": str(run_dir), "L": length, "train_s": train_s,
               "wall_s": time.perf_counter() - started,
               "rows": [{"label": label, "compression": None if c is None else dataclasses.asdict(c),
                         "tokens_kept": kept_tokens(c, length), "accuracy": scores(r, length)[0],
                         "by_depth": scores(r, length)[1], "eval_s": r["seconds"]} for label, c, r in rows]}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(rows, length, setting.depths, setting.num_samples)
    (workdir / "results.md").write_text(text + "\n")
    plot(rows, length, setting.depths, workdir / "passkey_by_depth.png")
    print(text)
    print(f"\nwall time {results['wall_s'] / 60:.1f} min; wrote {workdir / 'results.md'}, results.json, "
          "passkey_by_depth.png")


if __name__ == "__main__":
    sys.exit(main())
