"""Multi-host runs: one process per host (or per GPU), joined by `jax.distributed.initialize`.

With `parallel.distributed` set, every process calls `initialize(config.parallel)` before touching a device; then
`jax.devices()` lists the devices of all processes and the mesh spans them. The coordinator address, process count
and process id come from the config when given, else jax reads them from the cluster's environment (SLURM, Open MPI,
Cloud TPU pod slices); see scripts/launch_multihost.sh. On CPU (tests) set
JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo so that processes can exchange data.
"""

import logging

import jax
import ml_collections
from jax.experimental import multihost_utils

logger = logging.getLogger("longctx.parallel")


def initialize(parallel: ml_collections.ConfigDict) -> None:
    """Joins the processes of a multi-host run when `parallel.distributed`; a no-op otherwise or if already joined."""
    if not parallel.distributed:
        for field, unset in (("coordinator_address", ""), ("num_processes", 0), ("process_id", -1)):
            if parallel[field] != unset:
                raise ValueError(f"parallel.{field}={parallel[field]!r} is only read when parallel.distributed=True")
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if parallel.coordinator_address:
        kwargs["coordinator_address"] = parallel.coordinator_address
    if parallel.num_processes:
        kwargs["num_processes"] = parallel.num_processes
    if parallel.process_id >= 0:
        kwargs["process_id"] = parallel.process_id
    jax.distributed.initialize(**kwargs)
    logger.info("process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """Whether this process writes the run's files (metrics, config, progress); checkpoints are written by all."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
