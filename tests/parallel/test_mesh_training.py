"""Training on a mesh of 8 CPU devices: a step with data, fsdp, tensor and sequence parallelism (every context
strategy and layout among the cases, and the chunked loss over a split sequence) gives the losses of the same run
on one device; the mesh and its sharding
rules refuse what cannot be split, naming the field."""

import jax
import ml_collections
import numpy as np
import pytest

from longctx.parallel import mesh as mesh_lib
from longctx.train import train

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


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_step_equals_one_device(tmp_path, make_config, name):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    common = {"train.steps": 2, "train.batch_size": 4, "model.num_heads": 4, "model.num_kv_heads": 4,
              "model.hidden_size": 64}
    single = train(make_config(**common), tmp_path / "one")
    sharded = train(make_config(**common, **MESHES[name]), tmp_path / name)
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
