"""Training: the loss falls, resuming reproduces the uninterrupted run exactly, and the workdir is never clobbered."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.config import positions_config
from longctx.data import load_tokenizer
from longctx.models import build_model, init_params
from longctx.train import checkpoint, train
from longctx.train.loss import next_token_targets
from longctx.train.optim import make_optimizer
from longctx.train.trainer import make_train_iterator, train_step

REPO = pathlib.Path(__file__).resolve().parents[2]
HORIZON = 24  # steps compared between interrupted and uninterrupted runs


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def math_of(records: list[dict]) -> list[tuple]:
    """What must be identical between runs: step, loss, gradient norm, learning rate (not the timing)."""
    return [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"]) for r in records]


@pytest.fixture(scope="module")
def long_schedule(make_config):
    """The test config with a 200-step schedule, of which runs here train the first HORIZON steps."""
    return make_config(**{"train.steps": 200})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, long_schedule):
    """The reference: the first HORIZON steps, run straight through."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(long_schedule, workdir, stop_after=HORIZON)
    return read_metrics(workdir)


def test_loss_falls_and_metrics_are_logged(uninterrupted):
    assert [r["step"] for r in uninterrupted] == list(range(1, HORIZON + 1))
    assert {"step", "loss", "tokens_per_s", "grad_norm", "learning_rate", "loss_tokens"} <= set(uninterrupted[0])
    first, last = uninterrupted[0]["loss"], np.mean([r["loss"] for r in uninterrupted[-4:]])
    assert first > 4.5  # about log(259) at initialisation
    assert last < 0.6 * first


def test_stop_after_then_resume_matches_uninterrupted(tmp_path, long_schedule, uninterrupted):
    train(long_schedule, tmp_path, stop_after=6)
    assert checkpoint.Checkpoints(tmp_path).latest_step() == 6
    train(long_schedule, tmp_path, resume=True, stop_after=HORIZON)
    assert math_of(read_metrics(tmp_path)) == math_of(uninterrupted)


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _finished_checkpoints(workdir: pathlib.Path) -> list[int]:
    """Steps whose checkpoint orbax has finalised (it renames a temporary directory to the bare step number)."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def test_killed_run_resumes_to_the_same_losses(tmp_path, long_schedule, uninterrupted, config_file):
    """SIGKILL a command-line run between checkpoints (after it logged steps its newest checkpoint does not hold),
    resume it: the extra lines are dropped and every loss is the same."""
    path = config_file(long_schedule, tmp_path)
    workdir = tmp_path / "run"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "longctx.train", f"--config={path}",
                                    f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while True:  # Freeze the process whenever it logs; kill it once the log is ahead of a finished checkpoint.
        assert process.poll() is None, stderr.read_text()
        assert time.monotonic() < deadline, "no checkpoint followed by a logged step after 300 s"
        if _logged_steps(workdir):
            process.send_signal(signal.SIGSTOP)
            os.waitpid(process.pid, os.WUNTRACED)  # returns once every thread has stopped
            steps, finished = _logged_steps(workdir), _finished_checkpoints(workdir)
            if finished and max(steps) > finished[-1]:
                break
            process.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    killed_at = max(_logged_steps(workdir))
    restored = checkpoint.Checkpoints(workdir).latest_step()
    assert restored is not None and restored < killed_at < HORIZON, (restored, killed_at)

    train(long_schedule, workdir, resume=True, stop_after=HORIZON)
    assert math_of(read_metrics(workdir)) == math_of(uninterrupted)


def test_gradient_accumulation_gives_the_same_update(make_config):
    config = make_config(**{"train.warmup_steps": 0})  # a first update at the peak rate: the params move
    tokenizer = load_tokenizer(config.data.tokenizer)
    batch = next(make_train_iterator(config, tokenizer))
    batch["targets"], batch["weights"] = next_token_targets(batch["tokens"], batch["segment_ids"])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
    optimizer, _ = make_optimizer(config.train)
    params, _ = init_params(model, jax.random.key(0))
    results = [jax.jit(lambda p, o, b, n=n: train_step(p, o, b, jax.random.key(1), model=model, optimizer=optimizer,
                                                       grad_accum_steps=n))(params, optimizer.init(params), batch)
               for n in (1, 2, 4)]
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(params))]
    assert min(moved) > 1e-4, moved  # every weight moved (Adam steps ~ the learning rate), far beyond the atol below
    for params_n, _, metrics_n in results[1:]:
        np.testing.assert_allclose(metrics_n["loss"], results[0][2]["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics_n["grad_norm"], results[0][2]["grad_norm"], rtol=1e-5)  # a mean, not a sum
        # Adam's first step moves a weight by lr · g / (|g| + eps): the summation order's rounding shows where g is
        # tiny (up to ~2e-6 seen); a micro-batch left out moves weights by ~1e-2 the other way.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params_n, results[0][0])


def test_workdir_is_refused_resumed_or_replaced_never_clobbered(tmp_path, make_config):
    config = make_config(**{"train.steps": 2})
    train(config, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = (tmp_path / "metrics.jsonl").read_text()

    with pytest.raises(checkpoint.WorkdirError, match="already holds a run; pass --resume"):
        train(config, tmp_path)
    wider = make_config(**{"train.steps": 2, "model.hidden_size": 64})
    with pytest.raises(checkpoint.WorkdirError, match=r"model.hidden_size: 32 in the run, 64 now"):
        train(wider, tmp_path, resume=True)
    with pytest.raises(checkpoint.WorkdirError, match="contradict"):
        train(config, tmp_path, resume=True, overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_text() == before

    train(make_config(**{"train.steps": 2, "train.log_every": 5}), tmp_path, resume=True)  # logging may change
    assert (tmp_path / "metrics.jsonl").read_text() == before  # already at its last step: nothing re-run

    (tmp_path / "report.json").write_text("{}")  # the old run's evaluation goes with it
    train(wider, tmp_path, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 64
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "report.json").exists()


def test_bad_input_fails_before_the_workdir_is_touched(tmp_path, make_config):
    workdir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="data.source"):
        train(make_config(**{"data.source": str(tmp_path / "missing/*.jsonl")}), workdir)
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        train(make_config(**{"data.tokenizer": str(tmp_path / "missing.json")}), workdir)
    with pytest.raises(ValueError, match=r"model.attention.impl='cudnn': attention impl='cudnn' cannot run"):
        train(make_config(**{"model.attention.impl": "cudnn"}), workdir)
    with pytest.raises(ValueError, match=r"--stop_after must be a step in \[1, train.steps=12\], got 13"):
        train(make_config(), workdir, stop_after=13)
    assert not workdir.exists()


def test_tensorboard_events_are_written(tmp_path, make_config):
    train(make_config(**{"train.steps": 2, "train.tensorboard": True}), tmp_path)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


def test_clex_parameters_train_and_checkpoint_with_the_model(tmp_path, make_config):
    config = make_config(**{"train.steps": 4, "model.positions": positions_config("clex", max_factor=4)})
    train(config, tmp_path)
    model = build_model(config.model, load_tokenizer(config.data.tokenizer).vocab_size, config.data.seq_len)
    initial, _ = init_params(model, jax.random.key(config.seed))
    checkpoints = checkpoint.Checkpoints(tmp_path)
    trained = checkpoints.restore_params(4, jax.eval_shape(lambda: initial))
    checkpoints.close()
    assert set(trained["position_scheme"]) == {"ode_up_proj", "ode_down_proj"}
    np.testing.assert_array_equal(initial["position_scheme"]["ode_down_proj"], 0.0)
    assert float(jnp.abs(trained["position_scheme"]["ode_down_proj"]).max()) > 0  # the ODE learned


def test_fine_tune_starts_from_another_runs_params(tmp_path, make_config):
    """init_from: a CLEX fine-tune of a RoPE run starts from the run's params (its first update is a small step away
    from them) with the ODE at its initial values, and its own optimizer state."""
    source_dir, tune_dir = tmp_path / "base", tmp_path / "tune"
    source_config = make_config(**{"train.steps": 2})  # the config of the workdir and tensorboard tests: compiled once
    train(source_config, source_dir)
    tune = make_config(**{"train.steps": 1, "train.learning_rate": 1e-6, "train.warmup_steps": 0,
                          "train.init_from": str(source_dir), "model.positions": positions_config("clex", max_factor=2),
                          "data.seq_len": 64})
    train(tune, tune_dir)
    vocab = load_tokenizer(tune.data.tokenizer).vocab_size

    def restored(workdir, config, step):
        model = build_model(config.model, vocab, config.data.seq_len)
        checkpoints = checkpoint.Checkpoints(workdir)
        params = checkpoints.restore_params(step, jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0]))
        checkpoints.close()
        return params

    source, tuned = restored(source_dir, source_config, 2), restored(tune_dir, tune, 1)
    for name in source:
        for a, b in zip(jax.tree.leaves(source[name]), jax.tree.leaves(tuned[name])):
            np.testing.assert_allclose(a, b, atol=1e-5)  # one AdamW step of lr 1e-6 moves each weight by ~1e-6
    assert set(tuned["position_scheme"]) == {"ode_up_proj", "ode_down_proj"}
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train(make_config(**{"train.init_from": str(tmp_path / "nowhere")}), tmp_path / "other")


def test_passkey_documents_are_mixed_into_training_data(make_config):
    config = make_config(**{"data.passkey_fraction": 0.5, "data.seq_len": 512, "train.batch_size": 8})
    tokenizer = load_tokenizer(config.data.tokenizer)
    batch = next(make_train_iterator(config, tokenizer))
    text = tokenizer.decode(batch["tokens"].ravel())
    assert text.count("What is the pass key? The pass key is") >= 2
    with pytest.raises(ValueError, match=r"data.passkey_fraction must be in \[0, 1\), got 1.0"):
        train(make_config(**{"data.passkey_fraction": 1.0}), "unused")


def test_command_line_resumes_mid_curriculum_with_the_same_batches(tmp_path, make_config, config_file):
    """Dataset Decomposition with a cyclic short-to-long curriculum: stopped at step 5 and resumed from the command
    line, the run draws the same bucket lengths and reaches the same losses as the uninterrupted run."""
    config = make_config(**{"data.seq_len": 256, "data.packing": "decomposition", "data.decomposition.min_len": 32,
                            "data.decomposition.curriculum": "cyclic", "data.decomposition.cycles": 2,
                            "train.checkpoint_every": 100})
    reference = read_metrics(train(config, tmp_path / "straight") and tmp_path / "straight")
    lengths = [r["batch_length"] for r in reference]
    assert len(set(lengths)) > 1 and all(r["loss_tokens"] > 0 for r in reference)  # buckets of 32 to 256

    path, workdir = config_file(config, tmp_path), tmp_path / "resumed"
    for flags in (["--stop_after=5"], ["--resume"]):
        subprocess.run([sys.executable, "-m", "longctx.train", f"--config={path}", f"--workdir={workdir}", *flags],
                       cwd=REPO, check=True, capture_output=True)
    resumed = read_metrics(workdir)
    assert [r["batch_length"] for r in resumed] == lengths
    assert math_of(resumed) == math_of(reference)
