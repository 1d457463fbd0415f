"""The device mesh (axes data, fsdp, tensor, sequence), the logical-axis rules that shard the model on it, and the
placement of params and batches.

- data: plain data parallelism (params replicated, batch rows split);
- fsdp: batch rows split and params sharded along their `embed` dimension (ZeRO-3 / FSDP, gathered per layer by XLA);
- tensor: heads and the MLP's hidden width split (Megatron-style tensor parallelism);
- sequence: every sequence's tokens split (context parallelism); attention then spans the axis by the strategy of
  `context.py`.

The model names every param and main activation dimension logically (`batch`, `length`, `embed`, `q_heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, `norm`, `layers`); `LOGICAL_RULES` maps the names onto mesh axes, first rule
first (activations' `embed` stays unsharded because `batch` already takes fsdp), as MaxText's logical_axis_rules do.
One device is the mesh of shape (1, 1, 1, 1): the same code runs everywhere.
"""

import logging
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

logger = logging.getLogger("longctx.parallel")

AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(parallel: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The size of every mesh axis from `parallel.<axis>` (one of them may be -1: the devices left over). Without a
    -1 the mesh takes the first product-many devices."""
    sizes = {axis: parallel[axis] for axis in AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"parallel.{axis} must be a positive int or -1 (the devices left over), got {size!r}")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one of parallel.{', parallel.'.join(AXES)} may be -1, got {', '.join(fill)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"parallel.{fill[0]}=-1 fills the devices left over, but {num_devices} devices are not "
                             f"a multiple of the other axes' product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed > num_devices:
        raise ValueError(f"the mesh {sizes} needs {fixed} devices; {num_devices} are available")
    return sizes


def make_mesh(parallel: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    """The mesh `parallel` describes over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(parallel, len(devices))
    count = math.prod(sizes.values())
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices[:count])


def check_model(mesh: jax.sharding.Mesh, *, batch_size: int, seq_len: int, num_heads: int,
                num_kv_heads: int) -> None:
    """Raises ValueError naming the field when a batch or the heads cannot be split over the mesh."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % rows:
        raise ValueError(f"the micro-batch of {batch_size} sequences (train.batch_size / train.grad_accum_steps) "
                         f"must split over parallel.data × parallel.fsdp = {rows} devices")
    if seq_len % mesh.shape["sequence"]:
        raise ValueError(f"data.seq_len={seq_len} must split over parallel.sequence={mesh.shape['sequence']} devices")
    for field, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if heads % mesh.shape["tensor"]:
            raise ValueError(f"model.{field}={heads} must split over parallel.tensor={mesh.shape['tensor']} devices")


def _fitting_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh, name: str) -> P:
    """`spec` with the mesh axes dropped from dimensions they do not divide (logged: the dimension is replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
        if axes is not None and dim % size:
            logger.info("param %s: dimension %d does not split over mesh axes %s (%d devices); replicated", name,
                        dim, axes, size)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def param_shardings(abstract_params, logical_specs, mesh: jax.sharding.Mesh):
    """NamedShardings of the params from their logical PartitionSpecs (`init_params`' second result)."""
    mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
    paths = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    shardings = [NamedSharding(mesh, _fitting_spec(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))
                 for (path, leaf), spec in zip(paths, specs)]
    return jax.tree.unflatten(jax.tree.structure(abstract_params), shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Batch arrays [B, T]: rows over data × fsdp, tokens over sequence."""
    return NamedSharding(mesh, P(BATCH_AXES, "sequence"))


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Global jax arrays of a host batch (the same numpy batch in every process): each process puts only the shards
    its own devices hold."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
            for key, value in batch.items()}
