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


def _flag_values() -> list[str]:
    """The values XLA_FLAGS gives the flag, in order (a bare flag means true)."""
    return [arg.partition("=")[2].lower() or "true" for arg in os.environ.get("XLA_FLAGS", "").split()
            if arg.partition("=")[0] == FLAG]


def request_deterministic_gpu_ops() -> None:
    """Adds `--xla_gpu_deterministic_ops=true` to XLA_FLAGS unless the user's XLA_FLAGS already set it either way."""
    if not _flag_values():
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}=true".strip()


def deterministic_ops_requested() -> bool:
    """Whether XLA_FLAGS turns the flag on (XLA takes its last mention)."""
    values = _flag_values()
    return bool(values) and values[-1] in ("true", "1")


def warn_if_not_reproducible() -> None:
    """Logs a warning on a GPU backend when XLA_FLAGS does not ask for deterministic ops."""
    if jax.default_backend() == "gpu" and not deterministic_ops_requested():
        log.warning("this GPU run is not bitwise reproducible: set XLA_FLAGS=%s=true before jax starts (the "
                    "longctx.train command does) for a resume to log exactly the losses of an uninterrupted run",
                    FLAG)
