import math

import numpy as np
import pytest

from longctx import config as config_lib
from longctx.train.optim import learning_rate_schedule, make_optimizer


def expected_learning_rate(k, peak, warmup, steps, min_ratio):
    """The schedule written out by hand: linear warm-up, then cosine to peak * min_ratio at `steps`."""
    if k < warmup:
        return peak * k / warmup
    progress = min((k - warmup) / max(steps - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("warmup,steps", [(0, 10), (3, 10), (10, 10), (2, 2)])
def test_schedule_matches_its_formula(warmup, steps):
    train = config_lib.base_config().train
    with train.unlocked():
        train.update(learning_rate=2e-3, warmup_steps=warmup, steps=steps, min_lr_ratio=0.1)
    schedule = learning_rate_schedule(train)
    for k in range(steps + 2):
        np.testing.assert_allclose(float(schedule(k)), expected_learning_rate(k, 2e-3, warmup, steps, 0.1),
                                   rtol=1e-5, atol=1e-9, err_msg=f"update {k}")


def test_weight_decay_skips_vectors():
    import jax.numpy as jnp
    train = config_lib.base_config().train
    with train.unlocked():
        train.update(learning_rate=1.0, warmup_steps=0, steps=10, weight_decay=0.5, grad_clip=0.0)
    optimizer, _ = make_optimizer(train)
    params = {"matrix": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zero_grads = {"matrix": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["matrix"], -0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], np.zeros(2))
