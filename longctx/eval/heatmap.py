"""Length × depth heatmaps of retrieval scores, drawn as in Kamradt's needle-in-a-haystack plots
(github.com/gkamradt/LLMTest_NeedleInAHaystack): context length across, depth down (0% at the top), red (0) through
yellow to green (1), each cell labelled with its score; cells never measured (NaN) gray.
"""

from collections.abc import Sequence
import pathlib

from matplotlib.colors import LinearSegmentedColormap
import matplotlib.pyplot as plt
import numpy as np

KAMRADT_COLORS = ["#F0496E", "#EBB839", "#0CD79F"]  # score 0 → 1
NOT_MEASURED_COLOR = "lightgray"


def length_label(length: int) -> str:
    """4096 → "4K", 1536 → "1536"."""
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def check_axes(lengths: Sequence[int], depths: Sequence[float]) -> None:
    if not lengths or list(lengths) != sorted(set(lengths)):
        raise ValueError(f"lengths must be non-empty, ascending and distinct, got {list(lengths)}")
    if not depths or list(depths) != sorted(set(depths)):
        raise ValueError(f"depths must be non-empty, ascending and distinct, got {list(depths)}")


def grid(samples_scores: list[tuple[int, float, float]], lengths: Sequence[int],
         depths: Sequence[float]) -> np.ndarray:
    """Mean score per cell [len(depths), len(lengths)] of (length, depth, score) triples; NaN where no sample fell.

    A triple's length must be one of `lengths`; its depth goes to the nearest of `depths` (a task's needle lands near,
    not on, the depth it was asked for).
    """
    check_axes(lengths, depths)
    totals = np.zeros((len(depths), len(lengths)))
    counts = np.zeros((len(depths), len(lengths)), dtype=np.int64)
    depth_values = np.asarray(depths, dtype=np.float64)
    for length, depth, value in samples_scores:
        if length not in lengths:
            raise ValueError(f"a sample has length {length}, which is not one of lengths {list(lengths)}")
        row = int(np.argmin(np.abs(depth_values - depth)))
        column = list(lengths).index(length)
        totals[row, column] += value
        counts[row, column] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan)


def plot_heatmap(scores: np.ndarray, lengths: Sequence[int], depths: Sequence[float], path: str | pathlib.Path, *,
                 title: str, train_length: int | None = None) -> None:
    """Writes the heatmap of `scores` [len(depths), len(lengths)] (values in [0, 1], NaN = not measured) to `path`.

    With `train_length`, a dashed vertical line separates the lengths up to it from those beyond.
    """
    check_axes(lengths, depths)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(depths), len(lengths)):
        raise ValueError(f"scores must have shape [len(depths), len(lengths)] = {(len(depths), len(lengths))}, "
                         f"got {scores.shape}")
    measured = scores[~np.isnan(scores)]
    if np.any((measured < 0) | (measured > 1)):
        raise ValueError(f"scores must lie in [0, 1] (or be NaN for cells not measured), got values from "
                         f"{measured.min()} to {measured.max()}")
    colormap = LinearSegmentedColormap.from_list("kamradt", KAMRADT_COLORS).with_extremes(bad=NOT_MEASURED_COLOR)

    fig, ax = plt.subplots(figsize=(max(6.4, 1.0 + 0.8 * len(lengths)), max(3.6, 1.2 + 0.4 * len(depths))), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(scores), cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto")
    for row, column in np.ndindex(scores.shape):
        if not np.isnan(scores[row, column]):
            ax.text(column, row, f"{scores[row, column]:.2f}", ha="center", va="center", fontsize=8, color="black")
    if train_length is not None:
        beyond = [i for i, length in enumerate(lengths) if length > train_length]
        if beyond:
            ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1.5,
                       label=f"training length {train_length}")
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), fontsize="small", frameon=False)
    ax.set_xticks(range(len(lengths)), [length_label(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * depth:.0f}%" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
