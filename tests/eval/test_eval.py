"""Perplexity evaluation of a trained run: numbers against a direct computation, the report, the command line."""

import dataclasses
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
from longctx.infer.compress import Compression
from longctx.models import init_params
from longctx.train import train

REPO = pathlib.Path(__file__).resolve().parents[2]
COMPILED: list[str] = []  # the name of every program XLA compiles (or reads from the persistent cache) from now on
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, fun_name=None, **__: COMPILED.append(fun_name)
    if event == "/jax/core/compile/backend_compile_duration" else None)


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
    written = json.loads(paths["json"].read_text())
    assert written.pop("files") == sorted(["report.json", "report.md", "ppl_vs_length.png", "loss_vs_position.png"])
    assert written == report
    assert "| rope (trained) |" in paths["markdown"].read_text()
    for plot in ("plot", "position_plot"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = report["position_loss"]["rope"]
    assert sum(curve["tokens"]) == report["num_documents"] * 31 and curve["position"] == sorted(curve["position"])


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


def test_documents_of_given_files_replace_the_held_out_split(trained_run, tmp_path):
    """`documents`: every document of the files is evaluated (none held back as a training split), in file order;
    niah's haystack is made of them too."""
    texts = ["Alpha beta gamma delta. " * 16, "Short.", "Epsilon zeta eta theta. " * 16]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    options = suite.Options(tasks=("ppl", "niah"), documents=str(tmp_path / "long.jsonl"), depths=(0.5,),
                            num_samples=1)
    evaluation = suite.prepare(trained_run, [256], options=options, num_documents=2)
    tokenizer = evaluation.tokenizer
    expected = [tokenizer.frame(tokenizer.encode(text))[:256] for text in texts if len(text) >= 256]
    np.testing.assert_array_equal(evaluation.windows[256], np.stack(expected))
    assert "Alpha beta" in tokenizer.decode(evaluation.samples["niah"][0].prompt)


def test_sliding_window_loss_reads_each_token_through_its_window(trained_run):
    """Every token's loss equals the model's loss on it in the window that first predicts it, computed one window at
    a time; at window = document length it is the plain per-position loss."""
    config = suite.checkpoint.load_run_config(trained_run)
    model = suite.scheme_model(config, suite.resolve_schemes(config.model.positions, None)[0], 259)
    params = init_params(model, jax.random.key(0))[0]
    docs = np.random.default_rng(0).integers(0, 256, (2, 23)).astype(np.int32)
    window, stride = 8, 3
    got = ppl.sliding_nll(model, params, docs, window, stride, batch_size=3)
    ends = [8, 11, 14, 17, 20, 23]
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))  # compiled once: windows share a shape
    for target in range(1, 23):
        end = min(e for e in ends if e - 1 >= target) if target >= window else window
        start = end - window
        logits = forward(jnp.asarray(docs[:, start:end]))
        expected = optax.softmax_cross_entropy_with_integer_labels(logits[:, target - start - 1],
                                                                   jnp.asarray(docs[:, target]))
        np.testing.assert_allclose(got[:, target - 1], expected, rtol=1e-5, atol=1e-6, err_msg=f"token {target}")
    np.testing.assert_allclose(ppl.sliding_nll(model, params, docs, 23, 5, batch_size=2),
                               ppl.model_nll(model, params, docs, batch_size=2), rtol=1e-6)
    with pytest.raises(ValueError, match="needs 1 <= stride <= window <= document length"):
        ppl.sliding_nll(model, params, docs, 24, 3, batch_size=2)


def test_loss_by_position_averages_every_position_once():
    nll = np.arange(2 * 99, dtype=np.float64).reshape(2, 99)
    curve = ppl.loss_by_position(nll, num_bins=8)
    assert sum(curve["tokens"]) == nll.size
    weighted = np.sum(np.multiply(curve["loss"], curve["tokens"])) / nll.size
    assert weighted == pytest.approx(nll.mean())
    assert curve["position"][0] == 1.0 and curve["loss"][0] == pytest.approx((0 + 99) / 2)


def test_retrieval_tasks_report_scores_heatmaps_and_tables(trained_run, tmp_path):
    options = suite.Options(tasks=("passkey", "niah", "ruler"), depths=(0.0, 1.0), num_samples=2,
                            ruler_tasks=("niah_single_1", "niah_single_3"), batch_size=3, prefill_chunk=128)
    # Prompts of two and three prefill chunks: each scheme compiles one prefill for both lengths (its caches all hold
    # the longest prompt), and one decoding loop per number of new tokens (the tasks differ in it).
    compiled = len(COMPILED)
    report = suite.evaluate(trained_run, [384, 512], ["rope", "self_extend"], options=options)
    new_tokens = {sample.max_new_tokens for samples in suite.prepare(
        trained_run, [384, 512], ["rope"], options=options).samples.values() for sample in samples}
    assert COMPILED[compiled:].count("jit(_prefill)") <= 2, COMPILED[compiled:]
    assert COMPILED[compiled:].count("jit(_decode)") <= 2 * len(new_tokens), COMPILED[compiled:]
    assert set(report["timing"]) == {"rope", "self_extend"} and report["timing"]["rope"]["passkey"]["tokens"] > 0
    for task, metric in (("passkey", "passkey"), ("niah", "niah"), ("niah", "niah/exact"),
                         ("ruler", "ruler/niah_single_1")):
        for scheme in ("rope", "self_extend"):
            scores = report[task][scheme][metric]
            assert sorted(scores) == ["384", "512"] and all(0 <= v <= 1 for v in scores.values())
    assert sorted(report["passkey"]["rope"]["passkey/by_depth"]["512"]) == ["0.0", "1.0"]
    assert report["passkey"]["rope"]["examples"]["passkey@512"]["answers"][0].isdigit()
    paths = write_report(report, tmp_path)
    names = json.loads(paths["json"].read_text())["files"]
    for name in ("passkey_rope.png", "niah_self_extend.png", "retrieval_vs_length.png"):
        assert name in names and (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["markdown"].read_text()
    assert "## Pass-key retrieval" in text and "| rope (trained) | niah_single_3 |" in text

    # A second report replaces the first one's files, the heatmaps of schemes it no longer has included.
    write_report(suite.evaluate(trained_run, [384], ["rope"], options=dataclasses.replace(
        options, tasks=("passkey",))), tmp_path)
    assert not (tmp_path / "niah_self_extend.png").exists() and (tmp_path / "passkey_rope.png").exists()


def test_generation_answers_come_from_the_kv_cache(trained_run):
    """The suite's answers equal those of a naive loop re-running the whole sequence (rope: no length dependence)."""
    options = suite.Options(tasks=("passkey",), depths=(0.5,), num_samples=2, batch_size=2)
    evaluation = suite.prepare(trained_run, [300], options=options)
    report = suite.run(evaluation)
    config = evaluation.config
    model = suite.scheme_model(config, evaluation.schemes[0], 259)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0))[0])
    checkpoints = suite.checkpoint.Checkpoints(trained_run)
    params = checkpoints.restore_params(evaluation.step, abstract)
    checkpoints.close()
    sample = evaluation.samples["passkey"][0]
    # The sequence grows in a buffer of its final width, compiled for once: under the causal mask a column's logits
    # do not depend on the later columns, and rope's tables do not follow the length.
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = np.zeros((1, len(sample.prompt) + sample.max_new_tokens), np.int32)
    tokens[0, :len(sample.prompt)] = sample.prompt
    end = len(sample.prompt)
    while end < tokens.shape[1]:
        tokens[0, end] = int(jnp.argmax(forward(tokens)[0, end - 1]))
        end += 1
        if tokens[0, end - 1] == evaluation.tokenizer.eos_id:
            break
    expected = evaluation.tokenizer.decode(tokens[0, len(sample.prompt):end])
    assert report["passkey"]["rope"]["examples"]["passkey@300"]["prediction"] == expected
    for cache in (dict(cache="raw"), dict(page_size=64, compression=Compression("snapkv", budget=512))):
        again = suite.run(suite.prepare(trained_run, [300], options=dataclasses.replace(options, **cache)))
        assert again["passkey"] == report["passkey"], f"{cache} (a budget holding every prompt keeps every token)"


def test_task_errors_name_the_problem(trained_run, tmp_path):
    with pytest.raises(ValueError, match="--tasks must name some of ppl, passkey, niah, ruler, longbench, got pasky"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("pasky",)))
    with pytest.raises(ValueError, match="--tasks longbench needs --longbench"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("longbench",)))
    with pytest.raises(ValueError, match=r"--depths must be increasing numbers in \[0, 1\]"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("passkey",), depths=(0.5, 1.5)))
    with pytest.raises(ValueError, match="--ruler_tasks: unknown vtt"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("ruler",), ruler_tasks=("vtt",)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("niah",), haystack=str(tmp_path / "x.txt")))
    with pytest.raises(ValueError, match="'clex' is defined up to 64 tokens, and --lengths goes to 128"):
        suite.prepare(trained_run, [64, 128], ["clex"], overrides={"max_factor": 2},
                      options=suite.Options(tasks=("passkey",)))
    with pytest.raises(ValueError, match="none of the evaluated schemes \\(rope\\) takes 'factor'"):
        suite.prepare(trained_run, [64], ["rope"], overrides={"factor": 4.0})
    with pytest.raises(ValueError, match="--prompt_format must be one of plain, chat, got 'chatml'"):
        suite.prepare(trained_run, [64], options=suite.Options(tasks=("passkey",), prompt_format="chatml"))
    with pytest.raises(ValueError, match="--prompt_format chat: longbench prompts are cut in the middle"):
        suite.prepare(trained_run, [512], options=suite.Options(tasks=("longbench",), prompt_format="chat"))
    with pytest.raises(ValueError, match="--prompt_format chat: the tokenizer 'byte' has no chat template"):
        suite.prepare(trained_run, [512], options=suite.Options(tasks=("passkey",), prompt_format="chat"))


def test_command_line_prints_the_table_and_replaces_a_report_only_when_told(trained_run, tmp_path):
    """The perplexity table; then retrieval with a scheme override, a KV policy and pages into the same directory:
    refused without --overwrite, and with it the first report is replaced."""
    result = subprocess.run(
        [sys.executable, "-m", "longctx.eval", f"--workdir={trained_run}", "--lengths=16,32",
         f"--output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| rope (trained) |" in result.stdout and "| unigram baseline |" in result.stdout
    assert (tmp_path / "ppl_vs_length.png").exists()
    before = (tmp_path / "report.json").read_text()

    again = [sys.executable, "-m", "longctx.eval", f"--workdir={trained_run}", "--lengths=256,300", "--tasks=passkey",
             "--positions=yarn", "--config.model.positions.factor=8", "--depths=0,1", "--num_samples=1",
             "--kv_policy=sinks_window", "--kv_fraction=0.125", "--page_size=64", f"--output_dir={tmp_path}"]
    refused = subprocess.run(again, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "already holds report.json, report.md, ppl_vs_length.png" in refused.stderr
    assert (tmp_path / "report.json").read_text() == before
    replaced = subprocess.run(again + ["--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert "## Pass-key retrieval" in replaced.stdout and "| yarn |" in replaced.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lengths"] == [256, 300]
    assert report["schemes"]["yarn"]["factor"] == 8 and (tmp_path / "passkey_yarn.png").exists()
    assert report["options"]["compression"]["policy"] == "sinks_window" and report["options"]["page_size"] == 64


def test_longbench_files_are_evaluated_with_their_metric(trained_run, tmp_path):
    path = tmp_path / "trec.jsonl"
    records = [{"context": "Question: what is x? Type: Entity. " * 20, "input": "Who wrote it?", "answers": ["Human"],
                "all_classes": ["Human", "Entity", "Location"]} for _ in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    options = suite.Options(tasks=("longbench",), longbench=(str(path),), num_samples=2, batch_size=2)
    report = suite.evaluate(trained_run, [128, 256], options=options)
    scores = report["longbench"]["rope"]["longbench/trec"]
    assert sorted(scores) == ["128", "256"] and all(0 <= v <= 1 for v in scores.values())
    assert "| rope (trained) | longbench/trec |" in write_report(report, tmp_path / "out")["markdown"].read_text()
