"""AdamW with linear warm-up, cosine decay and global-norm clipping, from optax.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019). The learning rate at update k (0-based) is
`peak · k / warmup` during warm-up, then cosine-decays to `peak · min_lr_ratio` at `train.steps`.
"""

import jax
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=train.steps,
        end_value=train.learning_rate * train.min_lr_ratio,
    )


def make_optimizer(train: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of `train` (the config's train section) and its schedule. Weight decay skips vectors (norms)."""
    schedule = learning_rate_schedule(train)
    decay_matrices_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    optimizer = optax.chain(
        optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay,
                    mask=decay_matrices_only),
    )
    return optimizer, schedule
