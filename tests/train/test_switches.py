"""The training-speed switches change memory and time, not the math: each gives the plain path's loss and update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.config import validate
from longctx.data import load_tokenizer
from longctx.models import build_model, init_params, output_weights, unscanned
from longctx.train.loss import chunked_weighted_loss, next_token_targets, weighted_loss
from longctx.train.optim import make_optimizer
from longctx.train.trainer import make_train_iterator, train_step

STEPS = 3


@pytest.fixture(scope="module")
def batch(make_config):
    config = make_config()
    tokenizer = load_tokenizer(config.data.tokenizer)
    host = next(make_train_iterator(config, tokenizer))
    host["targets"], host["weights"] = next_token_targets(host["tokens"], host["segment_ids"])
    return {k: jnp.asarray(v) for k, v in host.items()}


def run_steps(config, batch, *, loss_chunk=0, donate=True):
    """(losses, params) after STEPS updates on `batch` from the same initial params."""
    model = build_model(config.model, load_tokenizer(config.data.tokenizer).vocab_size, config.data.seq_len)
    optimizer, _ = make_optimizer(config.train)
    # Every run starts from the same values: a scanned model's initial params, unrolled for an unrolled model.
    scanned = model.clone(config=dataclasses.replace(model.config, scan_layers=True, remat="none"))
    params = init_params(scanned, jax.random.key(0))[0]
    if not config.model.scan_layers:
        params = unscanned(scanned, params)[1]
    step = jax.jit(lambda p, o, b: train_step(p, o, b, jax.random.key(1), model=model, optimizer=optimizer,
                                              grad_accum_steps=1, loss_chunk=loss_chunk),
                   donate_argnums=(0, 1) if donate else ())
    opt_state, losses = optimizer.init(params), []
    for _ in range(STEPS):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), unscanned(model, params)[1]


@pytest.fixture(scope="module")
def plain(make_config, batch):
    return run_steps(make_config(), batch)


@pytest.mark.parametrize("switch", [
    {"model.remat": "full"}, {"model.remat": "dots"}, {"model.remat": "offload"}, {"model.scan_layers": True},
    {"model.scan_layers": True, "model.remat": "full"}, {"train.loss_chunk": 16}, {"train.loss_chunk": 4},
    {"train.donate": False}], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_switch_gives_the_plain_loss_and_update(make_config, batch, plain, switch):
    config = make_config(**switch)
    validate(config)
    losses, params = run_steps(config, batch, loss_chunk=config.train.loss_chunk, donate=config.train.donate)
    np.testing.assert_allclose(losses, plain[0], rtol=2e-6)
    # Adam moves every weight by about the learning rate (1e-2) a step, so float noise in tiny gradients shows up to
    # ~1e-5; a wrong gradient moves a weight by ~1e-2.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), params, plain[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_cross_entropy_equals_the_whole_logits(dtype):
    """Loss and gradients (hidden states and head) of the chunked loss against logits computed at once. (The head is
    a [width, vocab] matrix here, tied or not: the next test checks that the model's tied and untied heads give its
    logits.)"""
    rng = np.random.default_rng(0)
    batch, length, width, vocab = 2, 12, 8, 37
    hidden = jnp.asarray(rng.normal(size=(batch, length, width)), dtype)
    output = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (batch, length)), jnp.float32)

    def whole(hidden, output):
        logits = jnp.einsum("bte,ev->btv", hidden, output.astype(dtype)).astype(jnp.float32)
        return weighted_loss(logits, targets, weights)

    def chunked(hidden, output, chunk):
        return chunked_weighted_loss(hidden, output, targets, weights, chunk)

    (want, count), want_grads = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(hidden, output)
    for chunk in (1, 3, 4, 12):
        (got, got_count), got_grads = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, output, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert got_count == count
        for g, w in zip(got_grads, want_grads):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            if dtype == jnp.float32:
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
            else:  # bfloat16 rounds each chunk's matmul result (8 bits of mantissa) where the whole path rounds once
                np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())


def test_the_models_hidden_states_and_head_give_its_logits(make_config):
    for tie in (False, True):
        config = make_config(**{"model.tie_embeddings": tie})
        model = build_model(config.model, 259, config.data.seq_len)
        params, _ = init_params(model, jax.random.key(0))
        tokens = jnp.arange(16, dtype=jnp.int32)[None] % 259
        hidden = model.apply({"params": params}, tokens, hidden_only=True)
        logits = jnp.einsum("bte,ev->btv", hidden, output_weights(params, model.config).astype(hidden.dtype))
        np.testing.assert_allclose(logits.astype(jnp.float32), model.apply({"params": params}, tokens),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    ({"train.loss_chunk": 12}, r"train.loss_chunk=12 must divide every training row length, got rows of 32"),
    ({"train.loss_chunk": -1}, r"train.loss_chunk must be an int >= 0"),
])
def test_bad_switches_are_refused(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(make_config(**overrides))


def test_a_chunk_that_does_not_divide_the_length_is_refused():
    with pytest.raises(ValueError, match="train.loss_chunk=5 must divide the sequence length 12"):
        chunked_weighted_loss(jnp.zeros((1, 12, 4)), jnp.zeros((4, 7)), jnp.zeros((1, 12), jnp.int32),
                              jnp.ones((1, 12)), 5)
