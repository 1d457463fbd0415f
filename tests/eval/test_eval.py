"""Perplexity evaluation of a trained run: numbers against a direct computation, the report, the command line."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longctx import positions
from longctx.eval import ppl, suite, write_report
from longctx.train import train

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, make_config):
    workdir = tmp_path_factory.mktemp("run")
    train(make_config(**{"train.steps": 8}), workdir)
    return workdir


def test_eval_windows_use_the_same_documents_at_every_length():
    docs = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate([5, 40, 12, 33, 50])]
    windows = ppl.eval_windows(docs, [8, 32], num_documents=2)
    np.testing.assert_array_equal(windows[32][:, :8], windows[8])
    np.testing.assert_array_equal(windows[8][:, 0], [1000, 3000])
    with pytest.raises(ValueError, match="no held-out document has 64 tokens or more"):
        ppl.eval_windows(docs, [64], num_documents=2)


def test_unigram_baseline_is_the_smoothed_frequency():
    log_probs = ppl.unigram_log_probs([np.array([0, 0, 1])], vocab_size=3)
    np.testing.assert_allclose(np.exp(log_probs), [3 / 6, 2 / 6, 1 / 6])
    nll = ppl.unigram_nll(log_probs, np.array([[2, 0, 1]]))
    assert ppl.perplexity(nll)["ppl"] == pytest.approx(math.exp(-(math.log(3 / 6) + math.log(2 / 6)) / 2))


def test_model_nll_matches_a_direct_computation():
    """Batching (with a padded last batch) does not change the per-position losses."""
    vocab = 7
    table = jax.random.normal(jax.random.key(0), (vocab, vocab))

    class Bigram:
        def apply(self, variables, tokens):
            return variables["params"][tokens]

    windows = np.random.default_rng(0).integers(0, vocab, size=(5, 9)).astype(np.int32)
    nll = ppl.model_nll(Bigram(), table, windows, batch_size=2)
    direct = optax.softmax_cross_entropy_with_integer_labels(table[windows[:, :-1]], jnp.asarray(windows[:, 1:]))
    np.testing.assert_allclose(nll, direct, rtol=1e-6)


def test_evaluate_every_scheme_and_write_the_report(trained_run, tmp_path):
    report = suite.evaluate(trained_run, [16, 32], ["all"])
    assert list(report["ppl"])[0] == "rope" and sorted(report["ppl"]) == positions.names()  # the trained one first
    assert report["step"] == 8 and report["train_seq_len"] == 32 and report["num_documents"] >= 1
    for scheme in report["ppl"].values():
        assert all(np.isfinite(scheme[n]["ppl"]) and scheme[n]["ppl"] > 1 for n in ("16", "32"))
    assert report["ppl"]["rope"]["16"]["tokens"] == report["num_documents"] * 15
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text()) == report
    assert "| rope (trained) |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_errors_name_the_problem(trained_run, tmp_path):
    with pytest.raises(ValueError, match="unknown position scheme 'yarnn'"):
        suite.prepare(trained_run, [16], ["yarnn"])
    with pytest.raises(ValueError, match="--step 3 has no checkpoint"):
        suite.prepare(trained_run, [16], step=3)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        suite.prepare(tmp_path, [16])
    with pytest.raises(ValueError, match="--lengths must be increasing without repeats, got 32,16"):
        suite.prepare(trained_run, [32, 16])
    with pytest.raises(ValueError, match="--lengths must be increasing without repeats, got 16,16"):
        suite.prepare(trained_run, [16, 16])
    with pytest.raises(ValueError, match=r"--lengths must be integers >= 2, got \[1, 16\]"):
        suite.prepare(trained_run, [1, 16])
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"--num_documents must be a positive int, got {bad}"):
            suite.prepare(trained_run, [16], num_documents=bad)
    with pytest.raises(ValueError, match="--positions names a scheme twice: rope,rope"):
        suite.prepare(trained_run, [16], ["rope", "rope"])


def test_fewer_documents_than_asked_is_said(trained_run, caplog):
    with caplog.at_level("WARNING", logger="longctx.eval"):
        evaluation = suite.prepare(trained_run, [16], num_documents=1000)
    found = len(evaluation.windows[16])
    assert 1 <= found < 1000
    assert f"only {found} held-out documents have 16 tokens or more" in caplog.text


def test_command_line_prints_the_table(trained_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "longctx.eval", f"--workdir={trained_run}", "--lengths=16,32",
         f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| rope (trained) |" in result.stdout and "| unigram baseline |" in result.stdout
    assert (tmp_path / "ppl_vs_length.png").exists()
    before = (tmp_path / "report.json").read_text()

    again = [sys.executable, "-m", "longctx.eval", f"--workdir={trained_run}", "--lengths=16",
             f"--output_dir={tmp_path}"]
    refused = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "already holds report.json, report.md, ppl_vs_length.png" in refused.stderr
    assert (tmp_path / "report.json").read_text() == before
    replaced = subprocess.run(again + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((tmp_path / "report.json").read_text())["lengths"] == [16]
