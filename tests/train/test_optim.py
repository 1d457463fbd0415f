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


def test_a_warmup_longer_than_the_run_is_clamped_to_it_with_one_logged_line(caplog):
    config = config_lib.base_config()
    config.train.update(learning_rate=2e-3, warmup_steps=30, steps=12, min_lr_ratio=0.1)
    config_lib.validate(config)  # accepted: a short run of a long run's config
    with caplog.at_level("WARNING", logger="longctx.train"):
        schedule = learning_rate_schedule(config.train)
    assert [r.getMessage() for r in caplog.records] == [
        "train.warmup_steps=30 is longer than the run (train.steps=12): warming up over all 12 steps"]
    for k in range(14):
        np.testing.assert_allclose(float(schedule(k)), expected_learning_rate(k, 2e-3, 12, 12, 0.1), rtol=1e-5,
                                   atol=1e-9, err_msg=f"update {k}")


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
