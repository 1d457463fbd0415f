"""Where training metrics go: `metrics.jsonl` in the workdir, optionally TensorBoard, and the terminal."""

import json
import pathlib
import sys
from typing import Any

import tqdm


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step: step, loss (mean over the tokens that carry a loss),
    grad_norm, learning_rate (the one that step used), loss_tokens (how many tokens carried a loss) and tokens_per_s
    (every position of the batch, padding included, per second of wall time since the previous logged step).

    Opening it at `resume_step` drops the lines of later steps (logged by a run that died before its next checkpoint),
    so that a resumed run's file reads exactly like an uninterrupted one's.
    """

    def __init__(self, path: pathlib.Path, resume_step: int = 0, tensorboard_dir: pathlib.Path | None = None):
        self.path = path
        kept = []
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            if lines and not lines[-1].endswith("}"):
                lines.pop()  # torn by a run killed mid-write
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.tensorboard = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=True needs the tensorboardX package "
                                  "(pip install tensorboardX, or the dev extra)") from e
            self.tensorboard = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def progress_bar(total: int, initial: int, disable: bool = False) -> tqdm.tqdm:
    """A bar over training steps on a terminal; on a pipe it stays silent and `show` prints lines instead."""
    return tqdm.tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                     disable=disable or not sys.stderr.isatty())


def show(bar: tqdm.tqdm, record: dict[str, Any]) -> None:
    """Puts a logged step's loss and throughput on the bar, or prints them as a line when there is no bar."""
    if bar.disable:
        print(f"step {record['step']}: loss {record['loss']:.4f}, {record['tokens_per_s']:,.0f} tokens/s",
              flush=True)
    else:
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
