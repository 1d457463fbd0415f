"""Training on a mesh of 8 CPU devices: a step with data, fsdp, tensor and sequence parallelism (every context
strategy and layout among the cases, and the chunked loss over a split sequence) gives the losses of the same run
on one device; the mesh and its sharding
rules refuse what cannot be split, naming the field."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from longctx.parallel import mesh as mesh_lib
from longctx.train import train
from tiny_models import random_params, scheme_model

MESHES = {
    "data2_fsdp2_sequence2_ring_zigzag": {"parallel.data": 2, "parallel.fsdp": 2, "parallel.sequence": 2},
    "fsdp2_tensor2_sequence2_all_gather_striped": {
        "parallel.fsdp": 2, "parallel.tensor": 2, "parallel.sequence": 2, "parallel.context": "all_gather",
        "parallel.layout": "striped"},
    "data2_sequence4_ring_bidirectional_zigzag": {"parallel.data": 2, "parallel.sequence": 4,
                                                  "parallel.context": "ring_bidirectional"},
    "data2_sequence4_ring_zigzag_chunked_loss": {"parallel.data": 2, "parallel.sequence": 4, "train.loss_chunk": 8},
    "sequence4_ulysses_contiguous": {"parallel.data": 1, "parallel.sequence": 4, "parallel.context": "ulysses",
                                     "parallel.layout": "contiguous"},
}


COMMON = {"train.steps": 2, "train.batch_size": 4, "model.num_heads": 4, "model.num_kv_heads": 4,
          "model.hidden_size": 64}


@pytest.fixture(scope="module")
def single(make_config, tmp_path_factory):
    """The metrics records of the run on one device, shared by every mesh."""
    return train(make_config(**COMMON), tmp_path_factory.mktemp("one_device") / "run")


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_step_equals_one_device(tmp_path, make_config, single, name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    sharded = train(make_config(**COMMON, **MESHES[name]), tmp_path / name)
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in single], rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in sharded], [r["grad_norm"] for r in single], rtol=2e-4)


def test_mesh_shape_fills_and_refuses():
    parallel = ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1, "sequence": 2})
    assert mesh_lib.mesh_shape(parallel, 8) == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}
    with pytest.raises(ValueError, match="not a multiple of the other axes' product 4"):
        mesh_lib.mesh_shape(parallel, 6)
    parallel.data = 4
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        mesh_lib.mesh_shape(parallel, 8)
    parallel.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="only one of"):
        mesh_lib.mesh_shape(parallel, 8)


def test_training_refuses_what_the_mesh_cannot_split(tmp_path, make_config):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    with pytest.raises(ValueError, match=r"micro-batch of 4 sequences .* parallel.data × parallel.fsdp = 8"):
        train(make_config(**{"parallel.data": 8}), tmp_path / "a")
    with pytest.raises(ValueError, match="model.num_kv_heads=1 must split over parallel.tensor=2"):
        train(make_config(**{"parallel.tensor": 2}), tmp_path / "b")
    with pytest.raises(ValueError, match="ulysses"):
        train(make_config(**{"parallel.sequence": 2, "parallel.context": "ulysses"}), tmp_path / "c")
    with pytest.raises(ValueError, match="parallel.context must be one of"):
        train(make_config(**{"parallel.context": "tree"}), tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_the_model_under_the_default_axes_of_jax_make_mesh_equals_one_device():
    """A user's own jax.make_mesh (Explicit axes, jax's default) with a sequence axis: plain token arrays in, the
    attention spans the sequence by ring attention (inputs resharded to what it needs), and the logits, sharded over
    the sequence, equal one device's."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    model = scheme_model("rope")
    params = random_params(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32)), jnp.int32)
    expected = model.apply({"params": params}, tokens)
    mesh = jax.make_mesh((2, 1, 1, 4), mesh_lib.AXES)
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)
    assert jax.typeof(logits).sharding.spec[1] == "sequence"
    np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=2e-5)


def test_training_inside_a_users_explicit_mesh_uses_the_mesh_of_its_config(tmp_path, make_config, single):
    """train() called under a user's jax.set_mesh(jax.make_mesh(...)) (Explicit axes) builds the mesh its config
    asks for (Auto axes, the model's sharding rules) and trains as on one device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    with jax.set_mesh(jax.make_mesh((2, 1, 1, 4), mesh_lib.AXES)):
        sharded = train(make_config(**COMMON, **MESHES["data2_fsdp2_sequence2_ring_zigzag"]), tmp_path / "run")
    np.testing.assert_allclose([r["loss"] for r in sharded], [r["loss"] for r in single], rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in sharded], [r["grad_norm"] for r in single], rtol=2e-4)
