"""LongRoPE's evolution search (longctx.positions.longrope_search) on a tiny model."""

import numpy as np
import optax
import pytest

from longctx import positions
from longctx.models import Llama
from longctx.positions import longrope_search

from tiny_models import CONFIG, TRAIN_LENGTH, random_params

FACTOR = 4.0


def searched_scheme(**fields):
    return longrope_search.SearchedLongRoPE(head_dim=CONFIG.head_dim, theta=500.0, factor=FACTOR,
                                            original_max_position_embeddings=TRAIN_LENGTH, **fields)


@pytest.fixture(scope="module")
def setup():
    model = Llama(CONFIG, position_scheme=searched_scheme())
    params = random_params(model, seed=6)
    windows = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (2, 4 * TRAIN_LENGTH + 3)).astype(np.int32)
    return model, params, windows, longrope_search.perplexity_objective(model, params, windows)


def test_the_objective_is_the_registered_schemes_loss_with_those_factors(setup):
    """Oracle: LongRoPE with the candidate as its static long_factor, through the ordinary forward (float32 loss,
    factors rounded differently in the two tables: within 1e-5)."""
    model, params, windows, objective = setup
    rng = np.random.default_rng(1)
    for _ in range(2):
        factors = longrope_search.constrained(rng.uniform(1, FACTOR * 1.25, CONFIG.head_dim // 2), FACTOR)
        static = positions.get("longrope", head_dim=CONFIG.head_dim, theta=500.0, factor=FACTOR,
                               original_max_position_embeddings=TRAIN_LENGTH, long_factor=factors.tolist())
        logits = Llama(CONFIG, position_scheme=static).apply({"params": params}, windows)
        expected = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], windows[:, 1:]).mean()
        assert objective(factors) == pytest.approx(float(expected), rel=1e-5)


def test_the_search_keeps_the_constraints_beats_its_starts_and_compiles_once(setup):
    model, params, windows, objective = setup
    calls = []

    def counted(factors):
        calls.append(factors)
        return objective(factors)

    config = longrope_search.SearchConfig(population=8, generations=3, num_parents=3, seed=2)
    result = longrope_search.search(counted, model.position_scheme, config)
    factors = result.long_factor
    assert factors.shape == (CONFIG.head_dim // 2,) and np.all(np.diff(factors) >= 0)
    assert factors.min() >= 1 and factors.max() <= 1.25 * FACTOR
    assert result.loss <= min(result.starts.values()) and result.history == sorted(result.history, reverse=True)
    assert set(result.starts) == {"pi", "ntk", "yarn"}
    assert result.loss == pytest.approx(objective(factors))
    assert len(calls) == len({c.tobytes() for c in calls})  # no candidate scored twice
    assert objective.compiled._cache_size() == 1  # every candidate through one compiled forward
    again = longrope_search.search(objective, model.position_scheme, config)
    np.testing.assert_array_equal(again.long_factor, factors)  # deterministic for a seed


def test_ntk_factors_are_the_base_change():
    scheme = searched_scheme()
    base = positions.get("ntk", head_dim=CONFIG.head_dim, theta=500.0, factor=FACTOR)
    rope = positions.get("rope", head_dim=CONFIG.head_dim, theta=500.0)
    np.testing.assert_allclose(rope.inv_freq() / longrope_search.ntk_factors(scheme), base.inv_freq(), rtol=1e-5)


def test_bad_search_settings_are_refused():
    with pytest.raises(ValueError, match="num_parents \\(9\\) must not exceed population \\(8\\)"):
        longrope_search.SearchConfig(population=8, num_parents=9)
    with pytest.raises(ValueError, match="generations must be a positive int"):
        longrope_search.SearchConfig(generations=0)
