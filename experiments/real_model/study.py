"""The context-extension study on a real model: a pretrained RoPE model (SmolLM2-135M-Instruct, native 8K) taken to
2-8x its context by every training-free scheme and by short fine-tunes, measured by perplexity on long documents,
pass key, needle in a haystack and a RULER subset.

    # once: the model as a run (scripts/convert_hf.py), and the long documents (corpus.py)
    python scripts/convert_hf.py to_longctx --gguf SmolLM2-135M-Instruct.Q4_1.gguf --workdir runs/smollm2 \\
        --dtype bfloat16
    python experiments/real_model/corpus.py --out data/long_stdlib
    # LongRoPE's factors of the model's own (evolution search on the corpus's training documents), then every
    # variant, each evaluated once and kept: a stopped study resumes, a finished one only re-renders its tables
    python experiments/real_model/study.py longrope_search --run runs/smollm2 --corpus data/long_stdlib \
        --workdir runs/study --setting h100
    python experiments/real_model/study.py training_free --run runs/smollm2 --corpus data/long_stdlib \\
        --workdir runs/study --setting h100 [--only "YaRN ×4,Self-Extend ×4"]
    python experiments/real_model/study.py fine_tune --run runs/smollm2 --corpus data/long_stdlib \
        --workdir runs/study --setting h100 --methods yarn4     # or pi4,yarn8,abf,clex, or all
    python experiments/real_model/study.py compression --corpus data/long_stdlib --workdir runs/study --setting h100
    python experiments/real_model/study.py report --workdir runs/study

Every variant is the run's params under another `model.positions` (`Variant`), evaluated by `longctx.eval.suite` at
the setting's lengths up to the longest its scheme is defined for; `evals/<variant>.json` keeps its report and the
`python -m longctx.eval` command that gives the same numbers, and `evals/<variant>/` its heatmaps. A fine-tune
(`FineTuneSetting`, the YaRN paper's recipe scaled down: a few hundred steps at 4x the native length on the corpus's
long training documents, a share of them pass-key prompts with their answers) trains in `runs/<method>/` from the
run's params, resuming from its newest checkpoint when stopped, and is then evaluated as a variant. `longrope_search`
finds LongRoPE rescale factors for each factor by the paper's evolution search (`longctx.positions.longrope_search`)
on windows of the corpus's training documents, into `longrope/x<factor>.json`; the training-free stage then adds a
"LongRoPE ×s (searched)" row beside the one that starts from YaRN's factors. `compression`
asks the pass key again under each KV-cache policy and budget (`COMPRESSIONS`) of every evaluated variant, at the
lengths where its full cache reaches `--min_accuracy`, into `compression/`. `report` writes
results.md (one table per task, each row with its command), results.json and the plots ppl_vs_length.png and
retrieval_vs_length.png into the workdir.
"""

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import shlex
import sys
import time

import jax
import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longctx import cli, positions  # noqa: E402
from longctx.data import pipeline  # noqa: E402
from longctx.generate import load_run  # noqa: E402
from longctx.eval import suite  # noqa: E402
from longctx.eval.report import file_slug, write_report  # noqa: E402
from longctx.infer.compress import Compression  # noqa: E402
from longctx.positions import longrope_search  # noqa: E402
from longctx.train import checkpoint, train  # noqa: E402

log = logging.getLogger("real_model")
GENERATION_TASKS = ("passkey", "niah", "ruler")
# KV compression after the prefill (longctx.infer.compress): StreamingLLM's sinks + recent window and SnapKV, each
# head keeping a fraction of the prompt.
COMPRESSIONS = tuple((policy, fraction) for policy in ("sinks_window", "snapkv") for fraction in (1 / 4, 1 / 8, 1 / 16))
POLICY_NAMES = {"sinks_window": "sinks + window", "snapkv": "SnapKV"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """How much is measured: lengths, documents and prompts, and how generation runs."""

    lengths: tuple[int, ...]
    factors: tuple[int, ...]  # extension factors of the training-free variants
    num_documents: int  # perplexity: long documents per length
    depths: tuple[float, ...]  # pass key and niah: needle depths ...
    num_samples: int  # ... and prompts per depth (RULER: per task)
    ruler_tasks: tuple[str, ...]
    batch_size: int
    prefill_chunk: int
    # Retrieval prompts as a user's turn of the model's chat template: as plain text, SmolLM2-Instruct repeats "the
    # pass key" whenever the needle ends the context, and in the template it answers there (results.md).
    prompt_format: str = "chat"
    search_windows: int = 2  # LongRoPE search: training-document windows the perplexity is measured on ...
    search: longrope_search.SearchConfig = longrope_search.SearchConfig(population=24, generations=10,
                                                                        num_parents=6)  # ... and the evolution


SETTINGS = {
    # One H100: 2K-64K, 20 prompts per (variant, length) for each retrieval task (4 per depth; RULER 4 per task).
    "h100": Setting(lengths=(2048, 4096, 8192, 16384, 32768, 65536), factors=(2, 4, 8), num_documents=8,
                    depths=(0.0, 0.25, 0.5, 0.75, 1.0), num_samples=4,
                    ruler_tasks=("niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "cwe"), batch_size=4,
                    prefill_chunk=4096),
    # A CPU: the pipeline end to end at short lengths, a check of the machinery and not a measurement.
    "cpu": Setting(lengths=(512, 1024), factors=(2,), num_documents=1, depths=(0.0, 1.0), num_samples=1,
                   ruler_tasks=("niah_single_2",), batch_size=2, prefill_chunk=256, search_windows=1,
                   search=longrope_search.SearchConfig(population=4, generations=1, num_parents=2)),
}


@dataclasses.dataclass(frozen=True)
class FineTuneSetting:
    """A fine-tune's length and steps: YaRN's recipe (Peng et al., 2023, §4: AdamW, lr 2e-5 after 20 warm-up steps,
    no weight decay, 400 steps at 64K) scaled down to one sequence per step at `seq_len`."""

    seq_len: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    passkey_fraction: float  # share of the training documents that are pass-key prompts with their answers
    checkpoint_every: int
    model: dict  # model overrides for training (dtype, remat, scan)


FINE_TUNE_SETTINGS = {
    "h100": FineTuneSetting(seq_len=32768, steps=400, batch_size=1, learning_rate=2e-5, warmup_steps=20,
                            passkey_fraction=0.1, checkpoint_every=100,
                            model={"dtype": "bfloat16", "scan_layers": True, "remat": "dots_attention"}),
    "cpu": FineTuneSetting(seq_len=1024, steps=2, batch_size=1, learning_rate=2e-5, warmup_steps=1,
                           passkey_fraction=0.1, checkpoint_every=2, model={}),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a position scheme and its parameters over the run's params."""

    label: str
    scheme: str
    params: tuple = ()
    family: str = ""  # the plots colour a family's variants alike

    @property
    def slug(self) -> str:
        return file_slug(self.label)


def self_extend_group(factor: int, L: int, window: int) -> int:
    """Self-Extend's smallest group size G whose grouped positions cover factor × L tokens within the trained L:
    (L − W) · G + W ≥ factor · L (Jin et al., 2024, §3: positions beyond the window W are floor-divided by G)."""
    return math.ceil((factor * L - window) / (L - window))


def training_free_variants(L: int, factors: tuple[int, ...], searched: dict[int, tuple[float, ...]] | None = None
                           ) -> list[Variant]:
    """The model's own RoPE, then at each factor every scheme that stretches a pretrained RoPE model without
    training (LongRoPE also with the factors `searched` found for it), and the two that need no factor (LM-Infinite's
    Λ-shaped mask, entropy-aware ABF without training)."""
    searched = searched or {}
    rows = [Variant("RoPE (as trained)", "rope", family="RoPE")]
    window = L // 4
    for s in factors:
        stretch = (("factor", float(s)), ("original_max_position_embeddings", L))
        rows += [
            Variant(f"PI ×{s}", "linear", (("factor", float(s)),), "PI"),
            Variant(f"NTK ×{s}", "ntk", (("factor", float(s)),), "NTK"),
            Variant(f"dynamic NTK ×{s}", "dynamic", stretch, "dynamic NTK"),
            Variant(f"YaRN ×{s}", "yarn", stretch, "YaRN"),
            Variant(f"Llama 3 ×{s}", "llama3", stretch, "Llama 3"),
            Variant(f"LongRoPE ×{s} (YaRN start)", "longrope", stretch, "LongRoPE"),
            *([Variant(f"LongRoPE ×{s} (searched)", "longrope", (*stretch, ("long_factor", searched[s])),
                       "LongRoPE")] if s in searched else []),
            Variant(f"Self-Extend ×{s}", "self_extend",
                    (("group_size", self_extend_group(s, L, window)), ("neighbor_window", window),
                     ("original_max_position_embeddings", L)), "Self-Extend"),
        ]
    rows += [
        Variant("LM-Infinite", "lm_infinite", (("n_global", 10), ("original_max_position_embeddings", L)),
                "LM-Infinite"),
        Variant("entropy-ABF (no training)", "entropy_abf", (("original_max_position_embeddings", L),), "E-ABF"),
    ]
    return rows


def searched_factors(workdir: pathlib.Path) -> dict[int, tuple[float, ...]]:
    """{factor: long_factor} of the LongRoPE searches in the workdir."""
    found = {}
    for path in sorted((workdir / "longrope").glob("x*.json")):
        result = json.loads(path.read_text())
        found[int(result["factor"])] = tuple(result["long_factor"])
    return found


def fine_tunes(L: int) -> dict[str, Variant]:
    """The fine-tuned variants by method name: PI, YaRN s = 4 and 8, ABF and CLEX, each trained at 4 × L."""
    stretch = (("original_max_position_embeddings", L),)
    return {
        "pi4": Variant("PI ×4 + fine-tune", "linear", (("factor", 4.0),), "PI"),
        "yarn4": Variant("YaRN ×4 + fine-tune", "yarn", (("factor", 4.0), *stretch), "YaRN"),
        "yarn8": Variant("YaRN ×8 + fine-tune", "yarn", (("factor", 8.0), *stretch), "YaRN"),
        # ABF (Xiong et al., 2023) raises θ and trains: ×10 here, past NTK's ×4^(64/62) ≈ 4.2 for a 4× stretch.
        "abf": Variant("ABF (θ ×10) + fine-tune", "abf", (("base_scale", 10.0),), "ABF"),
        # CLEX (Chen et al., 2024) trains at the stretched length with the scale t sampled up to max_factor.
        "clex": Variant("CLEX + fine-tune", "clex", (("max_factor", 8), *stretch), "CLEX"),
    }


def fine_tune_config(run: pathlib.Path, corpus: pathlib.Path, variant: Variant, setting: FineTuneSetting):
    """The run's config, trained from its params under `variant`'s scheme on the corpus's training documents."""
    config = checkpoint.load_run_config(run)
    config.model.positions = suite.scheme_config(config.model.positions, variant.scheme, dict(variant.params))
    config.model.update(setting.model)
    config.data.mixture = ml_collections.ConfigDict()
    config.data.update(source=str(corpus / "train.jsonl"), valid_fraction=0.0, seq_len=setting.seq_len,
                       passkey_fraction=setting.passkey_fraction)
    config.train.update(steps=setting.steps, batch_size=setting.batch_size, learning_rate=setting.learning_rate,
                        warmup_steps=setting.warmup_steps, min_lr_ratio=1.0, weight_decay=0.0,
                        checkpoint_every=setting.checkpoint_every, init_from=str(run))
    return config


def scheme_limit(run_config, variant: Variant) -> int | None:
    """The longest sequence `variant`'s scheme is defined for (None: any)."""
    scheme_config = suite.scheme_config(run_config.model.positions, variant.scheme, dict(variant.params))
    params = {key: value for key, value in scheme_config.items() if key != "name"}
    return positions.get(variant.scheme, head_dim=run_config.model.head_dim, **params).max_length()


def options_of(setting: Setting, corpus: pathlib.Path, tasks: tuple[str, ...]) -> suite.Options:
    return suite.Options(tasks=tasks, depths=setting.depths, num_samples=setting.num_samples,
                         documents=str(corpus / "valid.jsonl"), haystack=str(corpus / "haystack.txt"),
                         ruler_tasks=setting.ruler_tasks, batch_size=setting.batch_size,
                         prefill_chunk=setting.prefill_chunk, prompt_format=setting.prompt_format)


def command_of(run: pathlib.Path, variant: Variant, lengths: list[int], options: suite.Options,
               num_documents: int) -> str:
    """The `python -m longctx.eval` command that evaluates `variant` as the study does (under its compression)."""
    args = ["python", "-m", "longctx.eval", "--workdir", str(run), "--lengths", ",".join(map(str, lengths)),
            "--tasks", ",".join(options.tasks), "--positions", variant.scheme,
            *[f"--config.model.positions.{key}={value}" for key, value in variant.params],
            "--num_documents", str(num_documents), "--documents", options.documents, "--haystack", options.haystack,
            "--depths", ",".join(f"{d:g}" for d in options.depths), "--num_samples", str(options.num_samples),
            "--ruler_tasks", ",".join(options.ruler_tasks), "--batch_size", str(options.batch_size),
            "--prefill_chunk", str(options.prefill_chunk), "--prompt_format", options.prompt_format,
            "--output_dir", "OUT"]
    if options.compression is not None:
        args += ["--kv_policy", options.compression.policy, "--kv_fraction", f"{options.compression.fraction:g}"]
    return shlex.join(args)


def kept(path: pathlib.Path, inputs: dict) -> dict | None:
    """The record at `path` if there is one, made from `inputs`; exits naming what differs if it was made from
    others (another setting, task list, corpus, run or checkpoint): a study never mixes the two."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    inputs = json.loads(json.dumps(inputs))
    differ = sorted(key for key in inputs.keys() | record.get("inputs", {}).keys()
                    if inputs.get(key) != record.get("inputs", {}).get(key))
    if differ:
        sys.exit(f"error: {path} was measured with other {', '.join(differ)} than asked now; remove it (and what "
                 f"depends on it) or use another --workdir")
    return record


def measured_by(setting: Setting) -> dict:
    """The fields of `setting` that an evaluation's numbers depend on (not the factors listed, nor the search)."""
    return {key: value for key, value in dataclasses.asdict(setting).items()
            if key not in ("factors", "search", "search_windows")}


def evaluate(run: pathlib.Path, workdir: pathlib.Path, variant: Variant, setting: Setting,
             corpus: pathlib.Path, tasks: tuple[str, ...]) -> dict:
    """The variant's record ({"report", "lengths", "command", "seconds", "inputs"}), computed once and kept in
    evals/ (`kept`)."""
    path = workdir / "evals" / f"{variant.slug}.json"
    inputs = {"setting": measured_by(setting), "tasks": list(tasks), "corpus": str(corpus), "run": str(run),
              "step": checkpoint.newest_step(run), "scheme": variant.scheme, "params": dict(variant.params)}
    record = kept(path, inputs)
    if record is not None:
        return record
    run_config = checkpoint.load_run_config(run)
    limit = scheme_limit(run_config, variant)
    lengths = [n for n in setting.lengths if limit is None or n <= limit]
    options = options_of(setting, corpus, tasks)
    scheme = suite.Scheme(variant.label, suite.scheme_config(run_config.model.positions, variant.scheme,
                                                             dict(variant.params)))
    start = time.perf_counter()
    report = suite.evaluate(run, lengths, [scheme], options=options, num_documents=setting.num_documents)
    record = {"label": variant.label, "scheme": variant.scheme, "params": dict(variant.params),
              "family": variant.family, "run": str(run), "lengths": lengths,
              "seconds": round(time.perf_counter() - start, 1),
              "command": command_of(run, variant, lengths, options, setting.num_documents), "inputs": inputs,
              "report": report}
    write_report(report, workdir / "evals" / variant.slug)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def scores(record: dict, task: str) -> dict[int, float]:
    """{length: score} of one task of a record: perplexity, or the mean retrieval score (RULER: over its tasks)."""
    label, report = record["label"], record["report"]
    if task == "ppl":
        return {int(n): values["ppl"] for n, values in report["ppl"][label].items()}
    results = report[task][label]
    names = [name for name in results if name.startswith(task) and "/" not in name] if task != "ruler" else [
        name for name in results if name.startswith("ruler/")]
    by_length: dict[int, list[float]] = {}
    for name in names:
        for n, value in results[name].items():
            by_length.setdefault(int(n), []).append(value)
    return {n: sum(values) / len(values) for n, values in sorted(by_length.items())}


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(records: list[dict], task: str, lengths: list[int]) -> str:
    def cell(values: dict[int, float], n: int) -> str:
        if n not in values:
            return "—"
        return f"{values[n]:.2f}" if task == "ppl" else f"{100 * values[n]:.0f}"

    lines = ["| variant | " + " | ".join(map(length_label, lengths)) + " |",
             "|---|" + "---:|" * len(lengths)]
    for record in records:
        values = scores(record, task)
        lines.append(f"| {record['label']} | " + " | ".join(cell(values, n) for n in lengths) + " |")
    return "\n".join(lines)


def plot(records: list[dict], lengths: list[int], L: int, path: pathlib.Path, tasks: tuple[str, ...]) -> None:
    families = list(dict.fromkeys(record["family"] for record in records))
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for record in records:
            values = scores(record, task)
            xs = [n for n in lengths if n in values]
            factor = record["label"].split("×")[-1].split()[0] if "×" in record["label"] else ""
            style = {"2": ":", "4": "-", "8": "--"}.get(factor, "-")
            ax.plot(xs, [values[n] for n in xs], style, marker="o", markersize=3, label=record["label"],
                    color=colors[families.index(record["family"]) % len(colors)])
        ax.axvline(L, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.set_title(task)
        if task == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (held-out long documents)")
        else:
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("score")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compression_table(workdir: pathlib.Path, records: list[dict]) -> str | None:
    """Pass key (%) with the full cache and under each policy and budget, for every variant measured so; and each
    budget's share of the full cache's accuracy (mean over the lengths measured)."""
    by_label: dict[str, list[dict]] = {}
    for path in sorted((workdir / "compression").glob("*.json")):
        row = json.loads(path.read_text())
        by_label.setdefault(row["label"], []).append(row)
    if not by_label:
        return None
    lengths = sorted({n for rows in by_label.values() for row in rows for n in row["lengths"]})
    lines = ["| variant | cache | " + " | ".join(map(length_label, lengths)) + " | of full |",
             "|---|---|" + "---:|" * (len(lengths) + 1)]
    for record in records:
        if record["label"] not in by_label:
            continue
        full = scores(record, "passkey")
        lines.append(f"| {record['label']} | full | " + " | ".join(
            f"{100 * full[n]:.0f}" if n in full else "—" for n in lengths) + " | 1.00 |")
        rows = sorted(by_label[record["label"]], key=lambda r: (r["policy"], -r["fraction"]))
        for row in rows:
            values = {int(n): v for n, v in row["report"]["passkey"][record["label"]]["passkey"].items()}
            share = sum(values[n] for n in row["lengths"]) / max(1e-9, sum(full[n] for n in row["lengths"]))
            lines.append(f"| {record['label']} | {POLICY_NAMES[row['policy']]} 1/{round(1 / row['fraction'])} | "
                         + " | ".join(f"{100 * values[n]:.0f}" if n in values else "—" for n in lengths)
                         + f" | {share:.2f} |")
    return "\n".join(lines)


def report(workdir: pathlib.Path) -> str:
    """results.md, results.json and the plots from every record in evals/; returns the markdown."""
    records = [json.loads(path.read_text()) for path in sorted((workdir / "evals").glob("*.json"))]
    if not records:
        raise FileNotFoundError(f"{workdir / 'evals'} holds no evaluated variant yet; run a stage first")
    study = json.loads((workdir / "study.json").read_text())
    order = {label: i for i, label in enumerate(study["variants"])}
    records.sort(key=lambda record: order.get(record["label"], len(order)))
    lengths = sorted({n for record in records for n in record["lengths"]})
    tasks = tuple(task for task in ("ppl", *GENERATION_TASKS) if all(task in r["report"] for r in records))
    sections = [f"# {study['title']}\n", study["description"] + "\n"]
    names = {"ppl": "Perplexity (held-out long documents)", "passkey": "Pass key (% exact)",
             "niah": "Needle in a haystack (%)", "ruler": "RULER subset (% string match, mean over its tasks)"}
    for task in tasks:
        sections.append(f"## {names[task]}\n\n{table(records, task, lengths)}\n")
    compressed = compression_table(workdir, records)
    if compressed:
        sections.append(f"## KV compression: pass key (%) where the full cache reaches it\n\n{compressed}\n")
    sections.append("## Commands\n\n" + "\n".join(f"- {r['label']} ({r['seconds']:.0f} s): `{r['command']}`"
                                                  for r in records) + "\n")
    text = "\n".join(sections)
    (workdir / "results.md").write_text(text)
    (workdir / "results.json").write_text(json.dumps(
        {"study": study, "rows": [{"label": r["label"], "command": r["command"], "seconds": r["seconds"],
                                   **{task: scores(r, task) for task in tasks}} for r in records]}, indent=2) + "\n")
    retrieval = tuple(task for task in tasks if task != "ppl")
    if "ppl" in tasks:
        plot(records, lengths, study["L"], workdir / "ppl_vs_length.png", ("ppl",))
    if retrieval:
        plot(records, lengths, study["L"], workdir / "retrieval_vs_length.png", retrieval)
    return text


def check_corpus(corpus: pathlib.Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (corpus / name).is_file():
            sys.exit(f"error: --corpus {corpus} has no {name}; build it with experiments/real_model/corpus.py")


def eval_setting(args) -> Setting:
    """The stage's evaluation setting, with `--prompt_format` in place of the setting's where given."""
    setting = SETTINGS[args.setting]
    return dataclasses.replace(setting, prompt_format=args.prompt_format) if args.prompt_format else setting


def check_prompt_format(workdir: pathlib.Path, prompt_format: str) -> None:
    """Every row of a study is asked alike: a workdir measured in one prompt format refuses another."""
    path = workdir / "study.json"
    known = json.loads(path.read_text()).get("prompt_format") if path.exists() else None
    if known is not None and known != prompt_format:
        sys.exit(f"error: {workdir} holds rows measured with --prompt_format {known}; measure {prompt_format} "
                 f"prompts in another --workdir")


def write_study(workdir: pathlib.Path, run: pathlib.Path, L: int, setting: str, prompt_format: str,
                corpus: pathlib.Path, variants: list[Variant]) -> None:
    """study.json: what the report is of (its rows in order); rows of every stage run so far are kept."""
    check_prompt_format(workdir, prompt_format)
    path = workdir / "study.json"
    known = json.loads(path.read_text())["variants"] if path.exists() else []
    workdir.mkdir(parents=True, exist_ok=True)
    study = {"title": f"Context extension of {run.name} (trained at {L} tokens)",
             "description": f"Setting `{setting}`, {prompt_format} prompts: the run's params under each "
                            f"training-free scheme, and fine-tunes from them; documents and haystack from `{corpus}`.",
             "L": L, "setting": setting, "prompt_format": prompt_format, "run": str(run),
             "variants": list(dict.fromkeys(known + [v.label for v in variants]))}
    path.write_text(json.dumps(study, indent=2) + "\n")


def fine_tune(args) -> None:
    setting, workdir, run = FINE_TUNE_SETTINGS[args.setting], args.workdir, args.run
    L = checkpoint.load_run_config(run).data.seq_len
    methods = fine_tunes(L)
    names = list(methods) if args.methods == "all" else [name.strip() for name in args.methods.split(",")]
    unknown = [name for name in names if name not in methods]
    if unknown:
        sys.exit(f"error: --methods names no fine-tune {unknown}; they are: {', '.join(methods)} (or all)")
    check_corpus(args.corpus, ("train.jsonl", "valid.jsonl", "haystack.txt"))
    evaluation = eval_setting(args)
    write_study(workdir, run, L, args.setting, evaluation.prompt_format, args.corpus,
                [methods[name] for name in names])
    for name in names:
        variant, tuned = methods[name], workdir / "runs" / name
        config = fine_tune_config(run, args.corpus, variant, setting)
        if checkpoint.newest_step(tuned) == setting.steps:
            log.info("%s: trained earlier, reused", name)
        else:
            start = time.perf_counter()
            train(config, tuned, resume=True)
            log.info("%s: %d steps at %d tokens in %.0f s", name, setting.steps, setting.seq_len,
                     time.perf_counter() - start)
        record = evaluate(tuned, workdir, variant, evaluation, args.corpus, tuple(args.tasks.split(",")))
        log.info("%s: evaluated at %s in %.0f s", variant.label, record["lengths"], record["seconds"])
    print(report(workdir))


def compression(args) -> None:
    setting, workdir = eval_setting(args), args.workdir
    check_prompt_format(workdir, setting.prompt_format)
    check_corpus(args.corpus, ("valid.jsonl", "haystack.txt"))
    records = [json.loads(path.read_text()) for path in sorted((workdir / "evals").glob("*.json"))]
    if not records:
        sys.exit(f"error: {workdir / 'evals'} holds no evaluated variant; run training_free or fine_tune first")
    for record in records:
        lengths = [n for n, value in scores(record, "passkey").items() if value >= args.min_accuracy]
        variant = Variant(record["label"], record["scheme"], tuple(record["params"].items()), record["family"])
        run = pathlib.Path(record["run"])
        run_config = checkpoint.load_run_config(run)
        scheme_config = suite.scheme_config(run_config.model.positions, variant.scheme, dict(variant.params))
        scheme = positions.get(variant.scheme, head_dim=run_config.model.head_dim,
                               **{key: value for key, value in scheme_config.items() if key != "name"})
        if not lengths or not scheme.encodes_keys_once():
            log.info("%s: %s", variant.label, "no length reaches the accuracy" if not lengths else
                     "its keys are re-encoded every step, which compression (encoded keys) cannot keep")
            continue
        for policy, fraction in COMPRESSIONS:
            path = workdir / "compression" / f"{variant.slug}__{policy}_{round(1 / fraction)}.json"
            inputs = {**record.get("inputs", {}), "setting": measured_by(setting), "corpus": str(args.corpus),
                      "lengths": lengths}
            if kept(path, inputs) is not None:
                continue
            options = dataclasses.replace(options_of(setting, args.corpus, ("passkey",)),
                                          compression=Compression(policy, fraction=fraction))
            start = time.perf_counter()
            result = suite.evaluate(run, lengths, [suite.Scheme(variant.label, scheme_config)], options=options)
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps({
                "label": variant.label, "policy": policy, "fraction": fraction, "lengths": lengths,
                "seconds": round(time.perf_counter() - start, 1), "report": result, "inputs": inputs,
                "command": command_of(run, variant, lengths, options, setting.num_documents)}, indent=2) + "\n")
            log.info("%s under %s 1/%d: evaluated at %s", variant.label, policy, round(1 / fraction), lengths)
    print(report(workdir))


def search_longrope(args) -> None:
    setting, workdir = SETTINGS[args.setting], args.workdir
    check_corpus(args.corpus, ("train.jsonl",))
    tokenizer, model, params, _ = load_run(args.run)
    run_config = checkpoint.load_run_config(args.run)
    L = run_config.data.seq_len
    data = run_config.data.copy_and_resolve_references()
    data.update(source=str(args.corpus / "train.jsonl"), valid_fraction=1.0)
    data.mixture = ml_collections.ConfigDict()
    documents = pipeline.eval_documents(data, "valid", tokenizer)
    for factor in setting.factors:
        path = workdir / "longrope" / f"x{factor}.json"
        inputs = {"run": str(args.run), "step": checkpoint.newest_step(args.run), "corpus": str(args.corpus),
                  "windows": setting.search_windows, "search": dataclasses.asdict(setting.search)}
        if kept(path, inputs) is not None:
            continue
        length = factor * L
        windows = [document[:length] for document in documents if len(document) >= length][:setting.search_windows]
        if not windows:
            sys.exit(f"error: no training document of {args.corpus} has {length} tokens for the ×{factor} search")
        scheme_config = suite.scheme_config(run_config.model.positions, "longrope",
                                            {"factor": float(factor), "original_max_position_embeddings": L})
        scheme = longrope_search.SearchedLongRoPE(head_dim=run_config.model.head_dim, **{
            key: value for key, value in scheme_config.items() if key not in ("name", "long_factor")})
        searching = model.clone(position_scheme=scheme)
        start = time.perf_counter()
        result = longrope_search.search(longrope_search.perplexity_objective(searching, params, np.stack(windows)),
                                        scheme, setting.search)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "factor": factor, "length": length, "windows": len(windows), "inputs": inputs,
            "long_factor": [round(float(v), 5) for v in result.long_factor], "loss": result.loss,
            "starts": result.starts, "history": result.history, "search": dataclasses.asdict(setting.search),
            "seconds": round(time.perf_counter() - start, 1), "device": jax.devices()[0].device_kind}, indent=2)
            + "\n")
        log.info("LongRoPE ×%d: loss %.4f (PI %.4f, NTK %.4f, YaRN %.4f) in %.0f s", factor, result.loss,
                 result.starts["pi"], result.starts["ntk"], result.starts["yarn"], time.perf_counter() - start)


def training_free(args) -> None:
    setting, workdir, run = eval_setting(args), args.workdir, args.run
    run_config = checkpoint.load_run_config(run)
    L = run_config.data.seq_len
    variants = training_free_variants(L, setting.factors, searched_factors(workdir))
    if args.only:
        wanted = [label.strip() for label in args.only.split(",")]
        unknown = [label for label in wanted if label not in {v.label for v in variants}]
        if unknown:
            sys.exit(f"error: --only names no variant {unknown}; the variants are: "
                     f"{', '.join(v.label for v in variants)}")
        variants = [v for v in variants if v.label in wanted]
    check_corpus(args.corpus, ("valid.jsonl", "haystack.txt"))
    write_study(workdir, run, L, args.setting, setting.prompt_format, args.corpus,
                training_free_variants(L, setting.factors, searched_factors(workdir)))
    tasks = tuple(args.tasks.split(","))
    for variant in variants:
        record = evaluate(run, workdir, variant, setting, args.corpus, tasks)
        log.info("%s: evaluated at %s in %.0f s", variant.label, record["lengths"], record["seconds"])
    print(report(workdir))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    free = stages.add_parser("training_free", help="every training-free scheme at every factor")
    tuned = stages.add_parser("fine_tune", help="fine-tunes at 4x the native length, then their evaluation")
    searching = stages.add_parser("longrope_search", help="LongRoPE factors of the model's own, for each factor")
    for stage in (free, tuned, searching):
        stage.add_argument("--run", required=True, type=pathlib.Path, help="the pretrained model as a longctx run")
        stage.add_argument("--corpus", required=True, type=pathlib.Path, help="what corpus.py wrote")
        stage.add_argument("--workdir", required=True, type=pathlib.Path)
        stage.add_argument("--setting", default="h100", choices=sorted(SETTINGS))
    for stage in (free, tuned):
        stage.add_argument("--tasks", default="ppl,passkey,niah,ruler")
    free.add_argument("--only", help="comma-separated labels of the variants to evaluate now (default: all)")
    compressed = stages.add_parser("compression", help="the pass key under KV compression where the full cache "
                                                       "retrieves")
    compressed.add_argument("--corpus", required=True, type=pathlib.Path, help="what corpus.py wrote")
    compressed.add_argument("--workdir", required=True, type=pathlib.Path)
    compressed.add_argument("--setting", default="h100", choices=sorted(SETTINGS))
    compressed.add_argument("--min_accuracy", type=float, default=0.8, help="the full cache's pass-key accuracy "
                                                                            "at which a length is compressed")
    for stage in (free, tuned, compressed):
        stage.add_argument("--prompt_format", choices=suite.PROMPT_FORMATS, help="retrieval prompts as plain text "
                           "or in the model's chat template (default: the setting's)")
    tuned.add_argument("--methods", default="all", help=f"comma-separated fine-tunes: {', '.join(fine_tunes(1))}")
    rendered = stages.add_parser("report", help="results.md, results.json and plots from what is evaluated")
    rendered.add_argument("--workdir", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    cli.setup_logging()
    if args.stage == "training_free":
        training_free(args)
    elif args.stage == "fine_tune":
        fine_tune(args)
    elif args.stage == "compression":
        compression(args)
    elif args.stage == "longrope_search":
        search_longrope(args)
    else:
        print(report(args.workdir))


if __name__ == "__main__":
    main()
