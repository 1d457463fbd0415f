"""The context-extension bake-off: one base model trained at length L, extended to 4× and 16× L by every scheme,
measured by perplexity at 1, 2, 4, 8, 16 × L and pass-key accuracy by length.

    python experiments/context_extension/bakeoff.py --workdir runs/bakeoff            # the CPU setting (tiny)
    python experiments/context_extension/bakeoff.py --workdir runs/bakeoff_gpu --setting gpu

Steps, each skipped when its result is already in the workdir (so a stopped bake-off resumes, and a finished one
only re-renders its table): train the base model (RoPE, `data.passkey_fraction` of its documents pass-key prompts)
and its softplus-attention twin from scratch; fine-tune the base with YaRN (×4 and ×16), CLEX, ABF and entropy-aware
ABF; evaluate every variant with `longctx.eval` (tasks ppl and passkey); write results.json, results.md and the
plots ppl_vs_length.png and passkey_vs_length.png into the workdir.
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
import ml_collections  # noqa: E402

from longctx import cli  # noqa: E402
from longctx.config import positions_config  # noqa: E402
from longctx.eval import suite  # noqa: E402
from longctx.eval.report import file_slug  # noqa: E402
from longctx.train import checkpoint, train  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
MULTIPLES = (1, 2, 4, 8, 16)
log = logging.getLogger("bakeoff")


@dataclasses.dataclass(frozen=True)
class Setting:
    """A bake-off's sizes: the base model's config file and overrides, fine-tuning and evaluation."""

    config_file: str
    base: dict
    fine_tune: dict  # overrides of the base config for fine-tunes at 4 × L (learning rate, steps, batch)
    clex_fine_tune: dict  # CLEX fine-tunes at L itself, sampling the scale t up to max_factor (as its paper does)
    num_documents: int
    passkey_depths: tuple[float, ...]
    passkey_samples: int
    eval_batch_size: int
    prefill_chunk: int


SETTINGS = {
    "cpu": Setting(
        config_file="configs/tiny.py",
        base={"data.seq_len": 512, "train.steps": 500, "train.batch_size": 8, "train.warmup_steps": 50,
              "train.checkpoint_every": 250, "data.passkey_fraction": 0.2, "eval.batch_size": 1},
        fine_tune={"data.seq_len": 2048, "train.batch_size": 2, "train.steps": 40, "train.warmup_steps": 4,
                   "train.learning_rate": 1e-3, "train.checkpoint_every": 40},
        clex_fine_tune={"train.steps": 40, "train.warmup_steps": 4, "train.learning_rate": 1e-3,
                        "train.checkpoint_every": 40},
        num_documents=2, passkey_depths=(0.0, 0.5, 1.0), passkey_samples=1, eval_batch_size=1, prefill_chunk=512),
    # One H100: a 158M-parameter model (14 layers of width 1024, 16 query / 4 kv heads of 64, MLP 2816, bfloat16)
    # at L = 2048, extended to 32K.
    "gpu": Setting(
        config_file="configs/base.py",
        base={"model.hidden_size": 1024, "model.intermediate_size": 2816, "model.num_layers": 14,
              "model.num_heads": 16, "model.num_kv_heads": 4, "model.head_dim": 64, "model.scan_layers": True,
              "data.seq_len": 2048, "train.steps": 800, "train.batch_size": 16, "train.warmup_steps": 80,
              "train.learning_rate": 1e-3, "train.weight_decay": 0.1, "train.checkpoint_every": 200,
              "data.passkey_fraction": 0.2, "eval.batch_size": 1},
        fine_tune={"data.seq_len": 8192, "train.batch_size": 4, "train.steps": 100, "train.warmup_steps": 10,
                   "train.learning_rate": 2e-4, "train.checkpoint_every": 100},
        clex_fine_tune={"train.steps": 100, "train.warmup_steps": 10, "train.learning_rate": 2e-4,
                        "train.checkpoint_every": 100},
        num_documents=4, passkey_depths=(0.0, 0.5, 1.0), passkey_samples=1, eval_batch_size=1, prefill_chunk=4096),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the table: which run's params, under which scheme (and parameters), evaluated."""

    label: str
    run: str  # "base", "softplus", or a fine-tune's name
    scheme: str
    params: tuple = ()
    family: str = ""  # for the plot's colours: variants of one method share a colour


def variants(L: int) -> list[Variant]:
    """Every row: the base as is, the training-free schemes at ×4 and ×16, the fine-tunes, the softplus pair."""
    rows = [Variant("none (RoPE, softmax: also the softplus twin's baseline)", "base", "rope", family="none")]
    for s in (4, 16):
        rows += [
            Variant(f"PI ×{s}", "base", "linear", (("factor", float(s)),), "PI"),
            Variant(f"NTK ×{s}", "base", "ntk", (("factor", float(s)),), "NTK"),
            Variant(f"YaRN ×{s}", "base", "yarn", (("factor", float(s)),), "YaRN"),
            Variant(f"Self-Extend G={s}", "base", "self_extend", (("group_size", s), ("neighbor_window", L // 4)),
                    "Self-Extend"),
        ]
    rows += [
        Variant("dynamic NTK", "base", "dynamic", (("factor", 2.0),), "dynamic NTK"),
        Variant("LM-Infinite", "base", "lm_infinite", (("n_global", 10),), "LM-Infinite"),
        Variant("YaRN ×4 + fine-tune", "yarn4", "yarn", (("factor", 4.0),), "YaRN ft"),
        Variant("YaRN ×16 + fine-tune", "yarn16", "yarn", (("factor", 16.0),), "YaRN ft"),
        Variant("CLEX (fine-tuned)", "clex", "clex", (("max_factor", 16),), "CLEX"),
        Variant("ABF (fine-tuned)", "abf", "abf", (("base_scale", 50.0),), "ABF"),
        Variant("entropy-ABF (fine-tuned)", "eabf", "entropy_abf", (("base_scale", 50.0),), "E-ABF"),
        Variant("softplus (from scratch)", "softplus", "softplus", family="softplus"),
    ]
    return rows


def config_of(setting: Setting, overrides: dict) -> ml_collections.ConfigDict:
    """The setting's base config with `overrides` ({"section.field": value}) on top."""
    config = runpy.run_path(str(REPO / setting.config_file))["get_config"]()
    config.update_from_flattened_dict({**setting.base, **overrides})
    return config


def runs(setting: Setting, workdir: pathlib.Path) -> dict[str, ml_collections.ConfigDict]:
    """The configs of every training run, by name (fine-tunes start from the base run's params)."""
    base = str(workdir / "base")
    L = setting.base["data.seq_len"]

    def tune(scheme: str, **params) -> ml_collections.ConfigDict:
        overrides = setting.clex_fine_tune if scheme == "clex" else setting.fine_tune
        return config_of(setting, {**overrides, "train.init_from": base,
                                   "model.positions": positions_config(scheme, **params)})

    return {
        "base": config_of(setting, {}),
        "softplus": config_of(setting, {"model.positions": positions_config("softplus")}),
        "yarn4": tune("yarn", factor=4.0, original_max_position_embeddings=L),
        "yarn16": tune("yarn", factor=16.0, original_max_position_embeddings=L),
        "clex": tune("clex", max_factor=16, original_max_position_embeddings=L),
        "abf": tune("abf", base_scale=50.0),
        "eabf": tune("entropy_abf", base_scale=50.0, original_max_position_embeddings=L),
    }


def evaluate(setting: Setting, workdir: pathlib.Path, variant: Variant, lengths: list[int]) -> dict:
    """The variant's report, computed once and kept in <workdir>/evals/."""
    path = workdir / "evals" / (file_slug(variant.label) + ".json")
    if path.exists():
        return json.loads(path.read_text())
    run_dir = workdir / variant.run
    trained = checkpoint.load_run_config(run_dir).model.positions
    scheme = suite.Scheme(variant.label, suite.scheme_config(trained, variant.scheme, dict(variant.params)))
    options = suite.Options(tasks=("ppl", "passkey"), depths=setting.passkey_depths,
                            num_samples=setting.passkey_samples, batch_size=setting.eval_batch_size,
                            prefill_chunk=setting.prefill_chunk)
    start = time.perf_counter()
    report = suite.evaluate(run_dir, lengths, [scheme], options=options, num_documents=setting.num_documents)
    report["seconds"] = time.perf_counter() - start
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(rows: list[tuple[Variant, dict]], lengths: list[int], L: int) -> str:
    header = ("| method | " + " | ".join(f"ppl {n // L}×L" for n in lengths) + " | "
              + " | ".join(f"passkey {n // L}×L" for n in lengths) + " |")
    lines = [header, "|---|" + "---:|" * (2 * len(lengths))]
    for variant, report in rows:
        ppl = report["ppl"][variant.label]
        passkey = report["passkey"][variant.label]["passkey"]
        lines.append(f"| {variant.label} | " + " | ".join(f"{ppl[str(n)]['ppl']:.2f}" for n in lengths) + " | "
                     + " | ".join(f"{100 * passkey[str(n)]:.0f}%" for n in lengths) + " |")
    return "\n".join(lines)


def plot(rows: list[tuple[Variant, dict]], lengths: list[int], L: int, workdir: pathlib.Path) -> None:
    families = list(dict.fromkeys(variant.family for variant, _ in rows))
    colors = plt.get_cmap("tab20").colors
    for name, metric in (("ppl_vs_length.png", "ppl"), ("passkey_vs_length.png", "passkey")):
        fig, ax = plt.subplots(figsize=(9.5, 5.0), dpi=120)
        for variant, report in rows:
            if metric == "ppl":
                values = [report["ppl"][variant.label][str(n)]["ppl"] for n in lengths]
            else:
                values = [report["passkey"][variant.label]["passkey"][str(n)] for n in lengths]
            style = "--" if "×16" in variant.label or "G=16" in variant.label else "-"
            ax.plot(lengths, values, style, marker="o", markersize=3,
                    color=colors[families.index(variant.family) % len(colors)], label=variant.label)
        ax.axvline(L, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // L}×L" for n in lengths])
        if metric == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (held-out stdlib bytes)")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("pass-key accuracy")
        ax.set_xlabel(f"evaluation length (L = {L})")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(workdir / name)
        plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the runs, evaluations and results go.")
    parser.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    args = parser.parse_args(argv)
    cli.setup_logging()
    setting, workdir = SETTINGS[args.setting], pathlib.Path(args.workdir)
    L = setting.base["data.seq_len"]
    lengths = [m * L for m in MULTIPLES]
    started = time.perf_counter()
    timings = {}
    for name, config in runs(setting, workdir).items():
        if checkpoint.newest_step(workdir / name) == config.train.steps:
            log.info("%s: finished earlier, reused", name)
            continue
        start = time.perf_counter()
        train(config, workdir / name, resume=True)
        timings[f"train {name}"] = time.perf_counter() - start
    rows = []
    for variant in variants(L):
        rows.append((variant, evaluate(setting, workdir, variant, lengths)))
        log.info("%s evaluated", variant.label)
    results = {"setting": args.setting, "L": L, "lengths": lengths, "timings_s": timings,
               "wall_s": time.perf_counter() - started,
               "rows": [{"label": v.label, "run": v.run, "scheme": v.scheme, "params": dict(v.params),
                         "ppl": {n: r["ppl"][v.label][str(n)]["ppl"] for n in lengths},
                         "passkey": {n: r["passkey"][v.label]["passkey"][str(n)] for n in lengths}}
                        for v, r in rows]}
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(rows, lengths, L)
    (workdir / "results.md").write_text(text + "\n")
    plot(rows, lengths, L, workdir)
    print(text)
    print(f"\nwall time {results['wall_s'] / 60:.1f} min; wrote {workdir / 'results.md'}, results.json, "
          f"ppl_vs_length.png, passkey_vs_length.png")


if __name__ == "__main__":
    sys.exit(main())
