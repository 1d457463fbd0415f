"""Multi-host training, on one machine: two CPU processes of two devices each, joined by jax.distributed (gloo
collectives), train on a mesh over the four devices and log the losses of the same run on one device; a run stopped
and resumed by two fresh processes continues exactly.

Each process runs tests/parallel/multihost_worker.py, which trains through longctx.train.trainer as
`python -m longctx.train --config.parallel.distributed=True ...` does. In jax.devices() order (process 0's
two devices first, ids 0 and 1; then process 1's, ids 2048 and 2049) the meshes split:
- data2_sequence2: batch rows across the processes (each puts only its own rows), each sequence over one process's
  two devices (ring attention inside a process, gradients reduced across processes);
- sequence4: every sequence over all four devices, so the ring passes keys and values between the processes.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from longctx.train import train

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
RESULT_PREFIX = "MULTIHOST_RESULT "  # the line multihost_worker.py prints
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 300
# Two data shards whatever the process layout, so that the one-device run reads the same batches.
# No warm-up: step 1 updates the params, so the loss of step 3 follows an update (step 2's) that read the Adam
# moments a resumed run restored.
COMMON = {"train.steps": 3, "train.warmup_steps": 0, "train.log_every": 1, "train.checkpoint_every": 1,
          "data.num_shards": 2}
# Mesh overrides, the mesh axis whose devices belong to both processes, and the data shards each process reads.
MESHES = {
    "data2_sequence2": ({"parallel.data": 2, "parallel.sequence": 2}, "data", [[0], [1]]),
    "sequence4": ({"parallel.data": 1, "parallel.sequence": 4}, "sequence", [[0, 1], [0, 1]]),
}
AXES = ("data", "fsdp", "tensor", "sequence")


def free_port() -> int:
    try:
        import portpicker
    except ImportError:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]
    return portpicker.pick_unused_port()


def worker_env() -> dict[str, str]:
    """This environment for a worker: its own device count and CPU collectives, and none of a cluster's variables
    (jax would take the process layout of SLURM, MPI or Kubernetes from them). XLA compiles without LLVM's
    optimisations, in about half the time: the workers' results are compared with the one-device run's within
    tolerances, as any two programs are."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "OMPI_", "PRTE_", "PMI_", "PMIX_", "TPU_", "KUBERNETES_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES} --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def _tail(path: pathlib.Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "<no output>"


def launch(config, workdir: pathlib.Path, logs: pathlib.Path, *extra: str) -> list[dict]:
    """Runs the processes of a `config.parallel.distributed` run of `config` (a fresh coordinator port) until all exit;
    returns their results, or fails with the output tails of every process when one fails or they run past
    TIMEOUT_S. The processes are killed whatever happens."""
    config = config.copy_and_resolve_references()
    config.parallel.update(distributed=True, coordinator_address=f"localhost:{free_port()}",
                           num_processes=NUM_PROCESSES)
    logs.mkdir(parents=True, exist_ok=True)
    config_json = logs / "config.json"
    config_json.write_text(config.to_json())
    env, procs, files = worker_env(), [], []
    try:
        for i in range(NUM_PROCESSES):
            out, err = (logs / f"process{i}.stdout").open("w"), (logs / f"process{i}.stderr").open("w")
            files += [out, err]
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(config_json), str(workdir), str(i), *extra],
                cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + TIMEOUT_S
        # Until all exit, one fails (the others would wait for it at a collective) or time runs out.
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for f in files:
            f.close()
    if codes != [0] * NUM_PROCESSES:
        report = "\n".join(
            f"--- process {i}: {'still running after %d s (killed)' % TIMEOUT_S if code is None else f'exit {code}'}"
            f"\n[stdout tail]\n{_tail(logs / f'process{i}.stdout', 1500)}\n[stderr tail]\n"
            f"{_tail(logs / f'process{i}.stderr')}"
            for i, code in enumerate(codes))
        pytest.fail(f"the {NUM_PROCESSES}-process run{''.join(' ' + a for a in extra)} failed:\n{report}")
    results = []
    for i in range(NUM_PROCESSES):
        lines = [line for line in (logs / f"process{i}.stdout").read_text().splitlines()
                 if line.startswith(RESULT_PREFIX)]
        assert len(lines) == 1, f"process {i} printed no result:\n{_tail(logs / f'process{i}.stdout')}"
        results.append(json.loads(lines[0][len(RESULT_PREFIX):]))
    return results


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def check_results(results: list[dict], crossing_axis: str) -> None:
    """Every process reports the joined run, and the mesh spans both processes along `crossing_axis` (only)."""
    for i, result in enumerate(results):
        assert (result["process_index"], result["process_count"]) == (i, NUM_PROCESSES)
        assert len(result["local_devices"]) == LOCAL_DEVICES
        assert result["mesh_axes"] == list(AXES)
    owners = np.asarray(results[0]["mesh_process_indices"])
    assert owners.size == NUM_PROCESSES * LOCAL_DEVICES
    crossing = [axis for k, axis in enumerate(AXES) if np.any(np.diff(owners, axis=k))]
    assert crossing == [crossing_axis], (
        f"the mesh {results[0]['mesh_shape']} spans the processes along {crossing}, not {crossing_axis}; "
        f"devices {results[0]['mesh_device_ids']} of processes {owners.tolist()}")
    assert all(r["mesh_process_indices"] == results[0]["mesh_process_indices"] for r in results)


def assert_same_run(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in reference], rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in records], [r["grad_norm"] for r in reference], rtol=2e-4)


def assert_trained_like_one_device(launches: list[list[dict]], workdir: pathlib.Path, name: str,
                                   one_device: list[dict]) -> None:
    """The processes of every launch joined on mesh `name` and read their data shards; together the launches logged
    the one-device run, in every process's records and in metrics.jsonl; the config and every process's data-iterator
    state are saved."""
    _, crossing_axis, shards = MESHES[name]
    for results in launches:
        check_results(results, crossing_axis)
        # Each process reads only the data shards of the batch rows its devices hold: with rows split across the
        # processes, disjoint halves of the documents; with every row on both, both shards.
        assert [result["data_shards"] for result in results] == shards
    for i in range(NUM_PROCESSES):
        assert_same_run([record for results in launches for record in results[i]["records"]], one_device)
    assert_same_run(read_metrics(workdir), one_device)  # written once, by process 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["parallel"]["distributed"] and saved["parallel"]["process_id"] == 0
    data_iter = workdir / "checkpoints" / str(COMMON["train.steps"]) / "data_iter"
    assert sorted(p.name for p in data_iter.glob("process_*.json")) == [
        f"process_{i}-of-{NUM_PROCESSES}.json" for i in range(NUM_PROCESSES)]


@pytest.fixture(scope="module")
def one_device(make_config, tmp_path_factory) -> list[dict]:
    """The metrics records of the run on one device (in this process)."""
    return train(make_config(**COMMON), tmp_path_factory.mktemp("one_device") / "run")


def test_two_processes_train_like_one_device(tmp_path, make_config, one_device):
    """Every sequence over the devices of both processes: the ring passes keys and values between them."""
    workdir = tmp_path / "run"
    results = launch(make_config(**COMMON, **MESHES["sequence4"][0]), workdir, tmp_path / "logs")
    assert_trained_like_one_device([results], workdir, "sequence4", one_device)


def test_two_processes_stop_then_resume_and_train_like_one_device(tmp_path, make_config, one_device):
    """Batch rows split across the processes: a run stopped after step 1 resumes in new processes (another
    coordinator port); params, optimizer state and every process's data-iterator state come back, and the two launches
    log the losses of the uninterrupted run on one device (step 3's loss checks the restored optimizer state). (One
    run serves both: each launch starts two processes.)"""
    config, workdir = make_config(**COMMON, **MESHES["data2_sequence2"][0]), tmp_path / "run"
    first = launch(config, workdir, tmp_path / "logs_first", "--stop_after", "1")
    for result in first:
        assert [r["step"] for r in result["records"]] == [1]
    resumed = launch(config, workdir, tmp_path / "logs_resumed", "--resume")
    for result in resumed:
        assert [r["step"] for r in result["records"]] == [2, 3]
    assert_trained_like_one_device([first, resumed], workdir, "data2_sequence2", one_device)
