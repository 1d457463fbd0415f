"""Bitwise-reproducible training on GPU: what exact resume needs there.

On a CUDA GPU, XLA accumulates scatter-adds (the gradient of the token embedding, where a token occurs many times in a
batch) with atomics, so two runs of the same step differ in the last bits and a resumed run drifts from the
uninterrupted one. `--xla_gpu_deterministic_ops=true` makes XLA choose deterministic algorithms instead, at some cost
in speed. XLA reads XLA_FLAGS when jax first uses its backend, so the flag must be set before any computation.
"""

import logging
import os

import jax

FLAG = "--xla_gpu_deterministic_ops"
log = logging.getLogger("longctx.train")


def request_deterministic_gpu_ops() -> None:
    """Adds `--xla_gpu_deterministic_ops=true` to XLA_FLAGS unless the user's XLA_FLAGS already set it either way."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FLAG}=true".strip()


def warn_if_not_reproducible() -> None:
    """Logs a warning on a GPU backend when XLA_FLAGS does not ask for deterministic ops."""
    if jax.default_backend() == "gpu" and f"{FLAG}=true" not in os.environ.get("XLA_FLAGS", ""):
        log.warning("this GPU run is not bitwise reproducible: set XLA_FLAGS=%s=true before jax starts (the "
                    "longctx.train command does) for a resume to log exactly the losses of an uninterrupted run",
                    FLAG)
