"""AdamW with linear warm-up, cosine decay and global-norm clipping, from optax.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019). The learning rate at update k (0-based) is
`peak · k / warmup` during warm-up, then cosine-decays to `peak · min_lr_ratio` at `train.steps`. A warm-up longer
than the run is clamped to the run (`warmup = min(train.warmup_steps, train.steps)`), with one logged line, so a short
run of a config written for a long one just works.
"""

import logging

import jax
import ml_collections
import optax

log = logging.getLogger("longctx.train")


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up over `warmup_steps` updates, then cosine decay over the rest (at least one update)."""
    peak = train.learning_rate
    warmup_steps = min(train.warmup_steps, train.steps)
    if warmup_steps < train.warmup_steps:
        log.warning("train.warmup_steps=%d is longer than the run (train.steps=%d): warming up over all %d steps",
                    train.warmup_steps, train.steps, train.steps)
    decay = optax.cosine_decay_schedule(peak, max(train.steps - warmup_steps, 1), alpha=train.min_lr_ratio)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decays(params) -> dict:
    """Which params weight decay applies to: matrices, not vectors. A scanned model stacks each layer's params on a
    leading axis (under "layers"), so there a layer's norm scale is [num_layers, hidden] and still a vector."""

    def is_matrix(path, param) -> bool:
        stacked = getattr(path[0], "key", None) == "layers"
        return param.ndim - stacked > 1

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `train` (the config's train section) and its schedule. Weight decay skips vectors (norm
    scales, biases), scanned layers' included (`decays`)."""
    schedule = learning_rate_schedule(train)
    optimizer = optax.chain(
        optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
                    mask=decays),
    )
    return optimizer, schedule
