"""Turns an evaluation into what a paper needs: one JSON with every number, a markdown table per task and PNG plots.

Files (in the output directory): report.json, report.md, ppl_vs_length.png and loss_vs_position.png (task ppl),
retrieval_vs_length.png (passkey, niah, ruler: score by length, a line per scheme and task), and per scheme
passkey_<scheme>.png and niah_<scheme>.png, the length × depth heatmaps. report.json lists them under "files", so a
later report replaces exactly these.
"""

import json
import pathlib
import re
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from longctx.eval import heatmap
from longctx.train.checkpoint import REPORT_FILES, report_files

REPORT_JSON, REPORT_MD, PPL_PLOT = REPORT_FILES
POSITION_PLOT = "loss_vs_position.png"
RETRIEVAL_PLOT = "retrieval_vs_length.png"
MARKERS = "osv^D<>pXh"


def scheme_label(report: dict[str, Any], scheme: str) -> str:
    trained = report["trained_positions"]
    same = report.get("schemes", {}).get(scheme, {"name": scheme}) == trained or (
        "schemes" not in report and scheme == trained["name"])
    return f"{scheme} (trained)" if same else scheme


def file_slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "scheme"


def _table(report: dict[str, Any], rows: dict[str, dict[str, Any]], columns: list[str], header: list[str],
           cell) -> list[str]:
    lines = ["| scheme | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for scheme, values in rows.items():
        lines.append(f"| {scheme_label(report, scheme)} | " + " | ".join(cell(values, c) for c in columns) + " |")
    return lines


def ppl_table(report: dict[str, Any], key: str = "ppl") -> str:
    """Markdown table: a row per position scheme (and the unigram baseline), a column per length."""
    lengths = [str(n) for n in report["lengths"]]
    lines = _table(report, report[key], lengths, [f"ppl@{n}" for n in lengths],
                   lambda values, n: f"{values[n]['ppl']:.3f}")
    lines.append("| unigram baseline | " + " | ".join(f"{report['unigram'][n]['ppl']:.3f}" for n in lengths) + " |")
    return "\n".join(lines)


def score_table(report: dict[str, Any], task: str, metric: str) -> str:
    """A row per scheme, a column per length: the mean `metric` (e.g. "passkey", "niah/exact") of `task`."""
    lengths = [str(n) for n in report["lengths"]]
    return "\n".join(_table(report, report[task], lengths, [f"@{n}" for n in lengths],
                            lambda values, n: _percent(values.get(metric, {}).get(n))))


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def ruler_table(report: dict[str, Any]) -> str:
    """A row per (scheme, RULER task) and per scheme's average over tasks, a column per length."""
    lengths = [str(n) for n in report["lengths"]]
    lines = ["| scheme | task | " + " | ".join(f"@{n}" for n in lengths) + " |", "|---|---|" + "---:|" * len(lengths)]
    for scheme, values in report["ruler"].items():
        tasks = sorted(key for key in values if key.startswith("ruler/") and "/by_depth" not in key)
        for task in tasks:
            lines.append(f"| {scheme_label(report, scheme)} | {task[len('ruler/'):]} | "
                         + " | ".join(_percent(values[task].get(n)) for n in lengths) + " |")
        average = [np.mean([values[t][n] for t in tasks if n in values[t]]) for n in lengths]
        lines.append(f"| {scheme_label(report, scheme)} | **average** | "
                     + " | ".join(_percent(a) for a in average) + " |")
    return "\n".join(lines)


def longbench_table(report: dict[str, Any]) -> str:
    """A row per (scheme, dataset), a column per length."""
    lengths = [str(n) for n in report["lengths"]]
    lines = ["| scheme | dataset | " + " | ".join(f"@{n}" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for scheme, values in report["longbench"].items():
        for dataset in sorted(key for key in values if key != "examples"):
            lines.append(f"| {scheme_label(report, scheme)} | {dataset} | "
                         + " | ".join(_percent(values[dataset].get(n)) for n in lengths) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """Every table of the report, a section per task. Scores are percentages."""
    sections = [f"# Evaluation of {report['workdir']} at step {report['step']} (trained at length "
                f"{report['train_seq_len']})"]
    if "ppl" in report:
        sections += [f"## Perplexity ({report['num_documents']} held-out documents, each cut at every length)",
                     ppl_table(report)]
        if "ppl_sliding" in report:
            sections += [f"## Sliding-window perplexity (stride {report['options']['stride']}, over the first "
                         f"{report['lengths'][-1]} tokens of the same documents)", ppl_table(report, "ppl_sliding")]
    if "passkey" in report:
        sections += ["## Pass-key retrieval (exact match, % by length)", score_table(report, "passkey", "passkey")]
    if "niah" in report:
        sections += ["## Needle in a haystack (partial match, % by length)", score_table(report, "niah", "niah"),
                     "Exact match:", score_table(report, "niah", "niah/exact")]
    if "ruler" in report:
        sections += ["## RULER-style tasks (string match, %)", ruler_table(report)]
    if "longbench" in report:
        sections += ["## LongBench / L-Eval (each dataset's metric, %)", longbench_table(report)]
    return "\n\n".join(sections) + "\n"


def _line_colors(n: int):
    return plt.get_cmap("tab10" if n <= 10 else "tab20").colors


def finish_plot(fig, ax, path: pathlib.Path, entries: int) -> None:
    """Legend (beside the plot when it has more than 6 entries, which would hide the lines), grid, save, close."""
    if entries > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ppl(report: dict[str, Any], path: pathlib.Path) -> None:
    """Perplexity vs evaluation length, one line per scheme, the unigram baseline dashed, the training length marked;
    the y axis turns logarithmic when the values span more than a factor of 20."""
    lengths = report["lengths"]
    schemes = list(report["ppl"])
    fig, ax = plt.subplots(figsize=(6.4 + (1.8 if len(schemes) > 6 else 0), 4.2), dpi=120)
    colors = _line_colors(len(schemes))
    for i, scheme in enumerate(schemes):
        ax.plot(lengths, [report["ppl"][scheme][str(n)]["ppl"] for n in lengths], marker=MARKERS[i % len(MARKERS)],
                color=colors[i % len(colors)], label=scheme_label(report, scheme))
    ax.plot(lengths, [report["unigram"][str(n)]["ppl"] for n in lengths], linestyle="--", color="gray",
            label="unigram baseline")
    ax.axvline(report["train_seq_len"], color="black", linestyle=":", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    values = [v["ppl"] for by_length in (*report["ppl"].values(), report["unigram"]) for v in by_length.values()]
    if max(values) > 20 * min(values):  # a scheme that blows up past the training length would flatten the rest
        ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity vs length — {pathlib.Path(report['workdir']).name}, step {report['step']}")
    finish_plot(fig, ax, path, len(schemes))


def plot_position_loss(report: dict[str, Any], path: pathlib.Path) -> None:
    """Loss vs token position at the longest length (log-spaced bins), one line per scheme, training length marked."""
    schemes = list(report["position_loss"])
    fig, ax = plt.subplots(figsize=(6.4 + (1.8 if len(schemes) > 6 else 0), 4.2), dpi=120)
    colors = _line_colors(len(schemes))
    for i, scheme in enumerate(schemes):
        curve = report["position_loss"][scheme]
        ax.plot(curve["position"], curve["loss"], color=colors[i % len(colors)], label=scheme_label(report, scheme))
    ax.axvline(report["train_seq_len"], color="black", linestyle=":", linewidth=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(f"Loss by position at length {report['lengths'][-1]}")
    finish_plot(fig, ax, path, len(schemes))


def plot_retrieval(report: dict[str, Any], path: pathlib.Path) -> None:
    """Score vs length: a panel per retrieval task (passkey, niah, RULER's average), a line per scheme."""
    tasks = [task for task in ("passkey", "niah", "ruler") if task in report]
    lengths = report["lengths"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 1.8, 3.8), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        schemes = list(report[task])
        colors = _line_colors(len(schemes))
        for i, scheme in enumerate(schemes):
            values = report[task][scheme]
            if task == "ruler":
                names = [k for k in values if k.startswith("ruler/") and "/by_depth" not in k]
                scores = [np.mean([values[t][str(n)] for t in names]) for n in lengths]
            else:
                scores = [values[task][str(n)] for n in lengths]
            ax.plot(lengths, scores, marker=MARKERS[i % len(MARKERS)], color=colors[i % len(colors)],
                    label=scheme_label(report, scheme))
        ax.axvline(report["train_seq_len"], color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("context length (tokens)")
        ax.set_title({"passkey": "pass key", "niah": "needle in a haystack", "ruler": "RULER average"}[task])
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def depth_grid(report: dict[str, Any], task: str, scheme: str) -> tuple[list[float], np.ndarray]:
    """(depths, scores [depths, lengths]) of `task` for `scheme`, NaN where a cell was not measured."""
    by_depth = report[task][scheme].get(f"{task}/by_depth", {})
    depths = sorted({float(d) for cells in by_depth.values() for d in cells})
    scores = np.full((len(depths), len(report["lengths"])), np.nan)
    for column, length in enumerate(report["lengths"]):
        for depth, value in by_depth.get(str(length), {}).items():
            scores[depths.index(float(depth)), column] = value
    return depths, scores


def check_output_dir(output_dir: pathlib.Path, *, overwrite: bool) -> None:
    """Raises FileExistsError when `output_dir` already holds a report and `overwrite` is not set."""
    existing = [path.name for path in report_files(output_dir) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds {', '.join(existing)} from an earlier evaluation; pass "
                              f"--overwrite to replace them, or --output_dir to write elsewhere")


def write_report(report: dict[str, Any], output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes report.json, report.md and the plots into `output_dir` (removing an earlier report's files first);
    returns their paths by role."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in report_files(output_dir):
        path.unlink(missing_ok=True)
    paths = {"json": output_dir / REPORT_JSON, "markdown": output_dir / REPORT_MD}
    if "ppl" in report:
        paths["plot"] = output_dir / PPL_PLOT
        plot_ppl(report, paths["plot"])
        paths["position_plot"] = output_dir / POSITION_PLOT
        plot_position_loss(report, paths["position_plot"])
    if any(task in report for task in ("passkey", "niah", "ruler")):
        paths["retrieval_plot"] = output_dir / RETRIEVAL_PLOT
        plot_retrieval(report, paths["retrieval_plot"])
    for task in ("passkey", "niah"):
        for scheme in report.get(task, {}):
            depths, scores = depth_grid(report, task, scheme)
            path = output_dir / f"{task}_{file_slug(scheme)}.png"
            heatmap.plot_heatmap(scores, report["lengths"], depths, path, train_length=report["train_seq_len"],
                                 title=f"{'pass key' if task == 'passkey' else 'needle in a haystack'} — "
                                       f"{scheme_label(report, scheme)}")
            paths[f"{task}_heatmap/{scheme}"] = path
    report = {**report, "files": sorted(path.name for path in paths.values())}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    return paths
