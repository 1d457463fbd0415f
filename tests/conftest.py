"""Shared fixtures: a small deterministic text corpus and a config that trains on it in seconds."""

import atexit
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

# Before jax is imported, and inherited by the command-line runs tests start: float32 matmuls at full precision, so
# oracle comparisons hold their tolerances on GPUs too (their float32 default is TF32-class) and in-process and
# subprocess runs compute alike.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Eight CPU devices for the sharding tests (tests/parallel); everything else runs on the first.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
# Where jax has no accelerator plugin (jax_plugins), two things make the suite's compiles, most of its time on a CPU,
# cheaper; on a GPU neither applies (tests there read compiled programs' text, and time kernels compiled as users do).
CPU_ONLY_JAX = importlib.util.find_spec("jax_plugins") is None
if CPU_ONLY_JAX:
    # Programs compile without LLVM's optimisations, in about half the time (they run a few steps on tiny inputs).
    # Values agree with the optimised programs' to rounding, far inside every tolerance, and bit-exact comparisons
    # compare programs compiled alike. (One exception seen: the jitted gradient of re-weighted softplus attention
    # has NaN in rows with no key above the offset at this level, though not when optimised nor op by op; see
    # test_softplus_gradients_are_finite_and_flow.)
    if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    # One persistent compilation cache for the session: made in the first process (pytest-xdist's controller, which
    # loads this file before it starts its workers) and inherited, with the variables below, by the workers and by
    # the command-line runs, notebook kernels and multi-process workers that tests start. Every train() call jits its
    # step and initialisation afresh and eager shard_map compiles each operation at every call, so the suite compiles
    # the same programs many times; with the cache every repeat loads the executable compiled the first time (the
    # same code, so the same results bit for bit).
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="longctx-tests-jax-cache-")
        atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # eager ops compile in milliseconds

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from longctx.train.determinism import request_deterministic_gpu_ops  # noqa: E402

request_deterministic_gpu_ops()  # before any test computes: exact-resume tests compare losses bit for bit
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])  # if a plugin beat us
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))

REPO = pathlib.Path(__file__).resolve().parents[1]

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in old green trees "
         "and rivers run to the sea under a pale moon").split()


def write_corpus(directory: pathlib.Path, num_docs: int = 40, seed: int = 0) -> str:
    """A .jsonl corpus of `num_docs` documents of repeated word patterns (learnable fast); returns its glob."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "corpus.jsonl").open("w") as f:
        for i in range(num_docs):
            start = int(rng.integers(len(WORDS)))
            n = int(rng.integers(40, 160))
            text = " ".join(WORDS[(start + j) % len(WORDS)] for j in range(n)) + "."
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return str(directory / "*.jsonl")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(source: str, **overrides) -> ml_collections.ConfigDict:
    """The test model: 2 layers of width 32 at length 32, batch 4; `overrides` maps dotted field names to values."""
    from longctx.config import base_config

    config = base_config()
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        dtype="float32")
    config.model.attention.impl = "xla"
    config.data.update(source=source, seq_len=32, valid_fraction=0.2)
    config.train.update(steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, log_every=1,
                        checkpoint_every=4)
    config.eval.update(num_documents=4, batch_size=2)
    config.parallel.data = 1  # one device, as the tests ran before meshes; tests/parallel asks for more
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="session")
def make_config(corpus):
    """make_config(**{"train.steps": 5}) → the tiny config on the session's corpus, with overrides."""
    return lambda **overrides: tiny_config(corpus, **overrides)


def _write_config_file(config: ml_collections.ConfigDict, directory: pathlib.Path) -> pathlib.Path:
    """A config file for the command line whose get_config() returns `config`."""
    (directory / "config_values.json").write_text(config.to_json())
    path = directory / "test_config.py"
    path.write_text(
        "import json, pathlib\nimport ml_collections\n\n"
        "def get_config():\n"
        "    values = json.loads((pathlib.Path(__file__).parent / 'config_values.json').read_text())\n"
        "    return ml_collections.ConfigDict(values)\n"
    )
    return path


@pytest.fixture(scope="session")
def config_file():
    """config_file(config, directory) → path of a config file for `--config` that yields `config`."""
    return _write_config_file
