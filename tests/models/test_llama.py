"""The decoder: shapes, dtypes, logical axes, and that scan / remat / packing change nothing they should not."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks

from longctx import positions
from longctx.models import Llama, LlamaConfig, init_params, unscanned

from gpus import hopper_present
from jaxprs import equations

CONFIG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, attention_impl="reference")


def make_model(scheme: str = "rope", **overrides) -> Llama:
    config = dataclasses.replace(CONFIG, **overrides)
    return Llama(config, position_scheme=positions.get(scheme, head_dim=config.head_dim))


def tokens(batch=2, length=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=(batch, length)), jnp.int32)


@functools.cache
def plain_params():
    """init_params(make_model(), key 0), compiled once: also the params of the models that differ in their mask,
    compute dtype or (parameterless) position scheme, as params depend on the shapes of the tree alone."""
    return init_params(make_model(), jax.random.key(0))


def test_shapes_dtypes_and_parameter_tree():
    model = make_model()
    params, specs = plain_params()
    logits = model.apply({"params": params}, tokens())
    assert logits.shape == (2, 12, CONFIG.vocab_size) and logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert params["layers_0"]["attn"]["q_proj"]["kernel"].shape == (32, 4, 8)
    assert params["layers_0"]["attn"]["k_proj"]["kernel"].shape == (32, 2, 8)
    assert params["lm_head"]["kernel"].shape == (32, CONFIG.vocab_size)
    assert set(params) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}


def test_every_param_has_logical_axes():
    _, specs = plain_params()
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    assert flat and all(isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0 for _, spec in flat)
    assert specs["layers_0"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "q_heads", "head_dim")
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_tied_embeddings_have_no_output_head():
    model = make_model(tie_embeddings=True)
    params, _ = init_params(model, jax.random.key(0))
    assert "lm_head" not in params
    assert model.apply({"params": params}, tokens()).shape == (2, 12, CONFIG.vocab_size)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = make_model(dtype="bfloat16")
    params, _ = plain_params()
    logits = model.apply({"params": params}, tokens())
    assert logits.dtype == jnp.float32
    reference = make_model().apply({"params": params}, tokens())
    np.testing.assert_allclose(logits, reference, atol=0.1)  # bfloat16 keeps ~3 significant digits


def test_scanned_layers_compute_the_same_function():
    scanned = make_model(scan_layers=True)
    params, specs = init_params(scanned, jax.random.key(0))
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)
    assert specs["layers"]["attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "q_heads", "head_dim")
    unrolled_model, unrolled = unscanned(scanned, params)
    assert not unrolled_model.config.scan_layers and "layers" not in unrolled
    assert jax.tree.structure(unrolled) == jax.tree.structure(plain_params()[0])
    np.testing.assert_allclose(scanned.apply({"params": params}, tokens()),
                               unrolled_model.apply({"params": unrolled}, tokens()), atol=1e-5)
    again_model, again = unscanned(unrolled_model, unrolled)
    assert again_model is unrolled_model and again is unrolled


def loss_and_gradient(model):
    return jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens()) ** 2))(plain_params()[0])


@functools.cache
def plain_loss_and_gradient():
    return loss_and_gradient(make_model())


@pytest.mark.parametrize("remat", ["full", "dots", "offload", "attention", "dots_attention"])
def test_remat_changes_memory_not_results(remat):
    (value, grads), (value_remat, grads_remat) = plain_loss_and_gradient(), loss_and_gradient(make_model(remat=remat))
    np.testing.assert_allclose(value, value_remat, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_remat)


def flash_model(remat="none"):
    """The flash kernels in interpret mode (their smallest head dim) in one layer: a remat policy acts on every layer
    alike, and each layer's interpret-mode kernels are what takes longest to compile."""
    return make_model(attention_impl="pallas_interpret", head_dim=16, remat=remat, num_layers=1)


def flash_gradient(model):
    return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, tokens(1, 16)) ** 2)))


@functools.cache
def flash_params():
    return init_params(flash_model(), jax.random.key(0))[0]


@functools.cache
def plain_flash_loss_and_gradient():
    return flash_gradient(flash_model())(flash_params())


@pytest.mark.parametrize("remat", ["attention", "dots_attention"])
def test_remat_keeping_the_flash_outputs_runs_the_forward_kernel_once(remat):
    """Under the policies that save the flash kernels' out and lse, the gradient equals the plain one and each layer's
    forward kernel runs once; under "full" it runs again in the backward."""
    params = flash_params()
    (value, grads), (value_remat, grads_remat) = (plain_flash_loss_and_gradient(),
                                                  flash_gradient(flash_model(remat))(params))
    np.testing.assert_allclose(value, value_remat, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads_remat)

    def kernel_calls(jaxpr: jax.extend.core.Jaxpr) -> list[str]:
        return [eqn.params["name"] for eqn in equations(jaxpr) if eqn.primitive.name == "pallas_call"]

    def forward_kernels(remat):
        return kernel_calls(jax.make_jaxpr(flash_gradient(flash_model(remat)))(params).jaxpr).count("flash_forward")

    assert forward_kernels(remat) == 1
    assert forward_kernels("full") == 2


@pytest.mark.skipif(not hopper_present(), reason="compiles Mosaic GPU kernels: needs compute capability 9.0")
def test_compiled_scanned_layers_keeping_the_flash_outputs_hold_one_forward_kernel():
    """XLA's GPU compiler keeps one forward kernel per scanned layer when the remat policy saves its outputs: without
    the optimization barrier in `pallas_kernels.flash.attention._flash`, its dynamic-slice fusion cloned the kernel
    into the update that stacks the saved outputs, and the compiled step held a second forward call."""
    model = make_model(attention_impl="pallas", head_dim=64, scan_layers=True, remat="dots_attention")
    params, _ = init_params(model, jax.random.key(0))
    step = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens(1, 256)) ** 2)))
    compiled = step.lower(params).compile().as_text()
    assert compiled.count('custom_call_target="mosaic_gpu') == 3  # forward, dQ, dK/dV


@pytest.mark.parametrize("scheme", ["rope", "none"])
@pytest.mark.parametrize("mask", [masks.Causal(), masks.SlidingWindow(3), masks.SinksAndWindow(1, 2)], ids=repr)
def test_packed_documents_do_not_see_each_other(scheme, mask):
    """Two documents packed in one row give the logits each gets alone (positions restart, attention is masked, and
    the mask is evaluated within each document)."""
    model = make_model(scheme, mask=mask)
    params, _ = plain_params()
    doc_a, doc_b = tokens(1, 5, seed=1), tokens(1, 7, seed=2)
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
    pos = jnp.array([list(range(5)) + list(range(7)) + [0, 0]], jnp.int32)
    logits = model.apply({"params": params}, packed, pos, segment_ids)
    np.testing.assert_allclose(logits[:, :5], model.apply({"params": params}, doc_a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:12], model.apply({"params": params}, doc_b), atol=1e-5)


def test_position_scheme_params_would_live_under_positions():
    class LearnedScale(positions.PositionScheme):
        @nn.compact
        def __call__(self, pos, kv_positions=None, *, train=False):
            self.param("log_scale", nn.initializers.zeros, ())
            return positions.PositionEncoding()

    model = Llama(CONFIG, position_scheme=LearnedScale(head_dim=CONFIG.head_dim))
    params, _ = init_params(model, jax.random.key(0))
    assert params["position_scheme"]["log_scale"].shape == ()


@pytest.mark.parametrize("field,value,message", [
    ("num_kv_heads", 3, r"model.num_heads \(4\) must be a multiple of model.num_kv_heads \(3\)"),
    ("dtype", "float64", r"model.dtype must be one of float32, bfloat16, float16"),
    ("remat", "some", r"model.remat must be one of none, full, dots, offload"),
    ("hidden_size", 0, r"model.hidden_size must be a positive int"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **{field: value})
