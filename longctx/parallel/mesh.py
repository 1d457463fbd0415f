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


def process_row_blocks(mesh: jax.sharding.Mesh) -> dict[int, tuple[int, int]]:
    """For every process, the block [start, stop) of batch rows its devices hold, in units of 1 / (data × fsdp) of
    the rows; raises ValueError when a process's rows are not one contiguous block (a device order that no data
    sharding can follow)."""
    num_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    held: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((num_rows, mesh.shape["sequence"])).items():
        held.setdefault(device.process_index, set()).update(range(num_rows)[index[0]])
    blocks = {}
    for process, rows in sorted(held.items()):
        start, stop = min(rows), max(rows) + 1
        if len(rows) != stop - start:
            raise ValueError(f"process {process} holds batch rows {sorted(rows)} of {num_rows}, not one contiguous "
                             f"block; order the mesh's devices by process")
        blocks[process] = (start, stop)
    return blocks


def data_shards(mesh: jax.sharding.Mesh, num_shards: int = 0) -> tuple[list[int], int]:
    """(the data shards this process reads, how many there are): a global batch is the concatenation of `num_shards`
    equal row blocks, one per data shard, and a process reads the shards of the rows its devices hold.

    `num_shards` 0: one shard per distinct row block of the processes (1 on one host). Raises ValueError naming
    `data.num_shards` when its blocks do not fall on the processes' row boundaries.
    """
    blocks = process_row_blocks(mesh)
    num_rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if num_shards == 0:
        num_shards = len(set(blocks.values()))
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"data.num_shards must be a positive int or 0 (one per row block of the processes), "
                         f"got {num_shards!r}")
    start, stop = blocks[jax.process_index()]
    if (start * num_shards) % num_rows or (stop * num_shards) % num_rows:
        raise ValueError(f"data.num_shards={num_shards} does not split the batch on the processes' row blocks "
                         f"(process {jax.process_index()} holds rows {start}..{stop - 1} of {num_rows} row "
                         f"groups); use a multiple of {len(set(blocks.values()))}, or 0")
    return list(range(start * num_shards // num_rows, stop * num_shards // num_rows)), num_shards


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, *, global_rows: int | None = None,
                row_offset: int = 0) -> dict[str, jax.Array]:
    """Global jax arrays of this process's rows of a batch: rows [row_offset, row_offset + len) of `global_rows`
    (default: the batch is the whole global batch, the same in every process). Each process puts only the shards its
    own devices hold, which must lie within its rows."""
    sharding = batch_sharding(mesh)
    arrays = {}
    for key, value in batch.items():
        shape = (global_rows or value.shape[0], *value.shape[1:])

        def local(index, value=value):
            rows = range(shape[0])[index[0]]
            if rows.start < row_offset or rows.stop > row_offset + value.shape[0]:
                raise ValueError(f"a device of process {jax.process_index()} holds batch rows {rows.start}.."
                                 f"{rows.stop - 1}, outside the rows {row_offset}..{row_offset + value.shape[0] - 1} "
                                 f"this process read")
            return value[(slice(rows.start - row_offset, rows.stop - row_offset), *index[1:])]

        arrays[key] = jax.make_array_from_callback(shape, sharding, local)
    return arrays
