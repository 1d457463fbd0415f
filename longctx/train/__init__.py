"""Training: the loop (`trainer.train`), its optimizer, loss, checkpoints and metrics."""

from longctx.train.trainer import train, train_step

__all__ = ["train", "train_step"]
