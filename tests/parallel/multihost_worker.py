"""One process of a multi-process training run, started by tests/parallel/test_multihost.py (not a test itself).

    python tests/parallel/multihost_worker.py CONFIG_JSON WORKDIR PROCESS_ID [--resume] [--stop_after N]

CONFIG_JSON holds the run's config (`config.to_json()`, with parallel.distributed, coordinator_address and
num_processes set); this process takes parallel.process_id=PROCESS_ID, trains through `longctx.train.trainer`
(`prepare`, which joins the processes, then `fit`) and prints one line `MULTIHOST_RESULT {json}`: its process index,
the mesh as (device id, process index) pairs, the data shards it reads and the metrics records it logged. The
caller sets the environment before this starts: XLA_FLAGS=--xla_force_host_platform_device_count=<local devices>,
JAX_PLATFORMS=cpu, JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo, JAX_DEFAULT_MATMUL_PRECISION=highest.
"""

import argparse
import json
import os
import pathlib

import jax

# CPU processes exchange data through gloo (the caller's environment asks for it too; jax's default may change).
jax.config.update("jax_cpu_collectives_implementation", os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))
jax.config.update("jax_default_matmul_precision", os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "highest"))

import ml_collections  # noqa: E402

from longctx.train import trainer  # noqa: E402

RESULT_PREFIX = "MULTIHOST_RESULT "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config_json", type=pathlib.Path)
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("process_id", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop_after", type=int, default=None)
    args = parser.parse_args()

    config = ml_collections.ConfigDict(json.loads(args.config_json.read_text()))
    config.parallel.process_id = args.process_id
    run = trainer.prepare(config, args.workdir, resume=args.resume, stop_after=args.stop_after)
    mesh = run.mesh
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": [d.id for d in jax.local_devices()],
        "mesh_axes": list(mesh.axis_names),
        "mesh_shape": dict(mesh.shape),
        "mesh_device_ids": mesh.device_ids.tolist(),
        "mesh_process_indices": jax.tree.map(lambda d: d.process_index, mesh.devices.tolist()),
        "data_shards": run.data_iter.shards,
    }
    result["records"] = trainer.fit(run)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
