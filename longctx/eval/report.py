"""Turns an evaluation into what a paper needs: one JSON with every number, a markdown table and PNG plots."""

import json
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longctx.train.checkpoint import REPORT_FILES  # noqa: E402

REPORT_JSON, REPORT_MD, PPL_PLOT = REPORT_FILES


def scheme_label(report: dict[str, Any], scheme: str) -> str:
    return f"{scheme} (trained)" if scheme == report["trained_positions"]["name"] else scheme


def ppl_table(report: dict[str, Any]) -> str:
    """Markdown table: a row per position scheme (and the unigram baseline), a column per length."""
    lengths = report["lengths"]
    header = "| scheme | " + " | ".join(f"ppl@{length}" for length in lengths) + " |"
    rows = [header, "|---|" + "---:|" * len(lengths)]
    for scheme, by_length in report["ppl"].items():
        cells = " | ".join(f"{by_length[str(n)]['ppl']:.3f}" for n in lengths)
        rows.append(f"| {scheme_label(report, scheme)} | {cells} |")
    rows.append("| unigram baseline | " + " | ".join(f"{report['unigram'][str(n)]['ppl']:.3f}" for n in lengths)
                + " |")
    return "\n".join(rows)


def plot_ppl(report: dict[str, Any], path: pathlib.Path) -> None:
    """Perplexity vs evaluation length, one line per scheme, the unigram baseline dashed, the training length marked;
    the y axis turns logarithmic when the values span more than a factor of 20."""
    lengths = report["lengths"]
    schemes = list(report["ppl"])
    fig, ax = plt.subplots(figsize=(6.4 + (1.8 if len(schemes) > 6 else 0), 4.2), dpi=120)
    colors = plt.get_cmap("tab10" if len(schemes) <= 10 else "tab20").colors  # one color per scheme
    for i, scheme in enumerate(schemes):
        ax.plot(lengths, [report["ppl"][scheme][str(n)]["ppl"] for n in lengths], marker="osv^D"[i % 5],
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
    if len(schemes) > 6:  # a legend this long would hide the lines: it goes beside the plot
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_output_dir(output_dir: pathlib.Path, *, overwrite: bool) -> None:
    """Raises FileExistsError when `output_dir` already holds a report and `overwrite` is not set."""
    existing = [name for name in REPORT_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds {', '.join(existing)} from an earlier evaluation; pass "
                              f"--overwrite to replace them, or --output_dir to write elsewhere")


def write_report(report: dict[str, Any], output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes report.json, report.md and the plot into `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / REPORT_JSON, "markdown": output_dir / REPORT_MD, "plot": output_dir / PPL_PLOT}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(ppl_table(report) + "\n")
    plot_ppl(report, paths["plot"])
    return paths
