"""experiments/real_model: the long-document corpus and the study's training-free stage, on a tiny trained run."""

import json
import pathlib
import subprocess
import sys

import pytest

from longctx.train import train

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments" / "real_model"))
import corpus  # noqa: E402
import study  # noqa: E402

LABELS = ("RoPE (as trained)", "YaRN ×2", "Self-Extend ×2")


TEXT = "The grass is green. The sky is blue. " * 40
SETTING = study.Setting(lengths=(256, 512), factors=(2,), num_documents=1, depths=(0.0, 1.0), num_samples=1,
                        ruler_tasks=("niah_single_1",), batch_size=2, prefill_chunk=128, prompt_format="plain",
                        search_windows=1,
                        search=study.longrope_search.SearchConfig(population=4, generations=1, num_parents=2))


def write_corpus(directory: pathlib.Path) -> pathlib.Path:
    """What corpus.py writes, small: training documents, one held-out document and the haystack."""
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": TEXT + str(i)}) + "\n" for i in range(8)))
    (directory / "valid.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    (directory / "haystack.txt").write_text(TEXT)
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_config):
    workdir = tmp_path_factory.mktemp("run")
    train(make_config(**{"train.steps": 2, "data.seq_len": 256, "train.batch_size": 2}), workdir)
    return workdir


def test_the_corpus_holds_long_packages_apart_and_the_reference_as_prose():
    splits = corpus.build(valid_chars=240_000, train_document_chars=160_000, train_chars=2_000_000)
    valid = [document["name"] for document in splits["valid"]]
    assert valid[0] == corpus.PROSE and "asyncio" in valid and "encodings" not in valid
    assert splits["valid"][0]["text"].startswith('The "assert" statement')  # the text help() shows, not the code
    assert all(document["name"].startswith("test/") for document in splits["train"])
    assert all(len(document["text"]) >= 160_000 for document in splits["train"])
    assert sum(len(document["text"]) for document in splits["train"]) <= 2_000_000
    train_files = {line for d in splits["train"] for line in d["text"].splitlines() if line.startswith("# file: ")}
    valid_files = {line for d in splits["valid"] for line in d["text"].splitlines() if line.startswith("# file: ")}
    assert train_files and valid_files and not train_files & valid_files


def test_every_row_is_evaluated_once_and_its_printed_command_gives_its_numbers(run, tmp_path, monkeypatch):
    """Three variants at 256 and 512 tokens (1× and 2× the run's length): the tables hold them, a second call only
    re-renders, and the command printed beside YaRN ×2 reproduces its perplexity through the command line."""
    documents = write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(study.SETTINGS, "test", SETTING)
    workdir = tmp_path / "study"
    args = ["training_free", "--run", str(run), "--corpus", str(documents), "--workdir", str(workdir),
            "--setting", "test", "--tasks", "ppl,passkey", "--only", ",".join(LABELS)]
    read = []
    eval_documents = study.suite.pipeline.eval_documents
    monkeypatch.setattr(study.suite.pipeline, "eval_documents", lambda *a: read.append(a[1]) or eval_documents(*a))
    study.main(args)
    assert sorted(read) == ["train", "valid"]  # tokenized once for the three variants (the unigram baseline, ppl)
    # KV compression of the rows that retrieve (the untrained model retrieves nothing: every length is taken), but
    # not of Self-Extend, whose keys are re-encoded at every step
    monkeypatch.setattr(study, "COMPRESSIONS", (("snapkv", 0.25),))
    study.main(["compression", "--corpus", str(documents), "--workdir", str(workdir), "--setting", "test",
                "--min_accuracy", "0"])
    results = (workdir / "results.md").read_text()
    compressed = results.split("## KV compression")[1].split("##")[0]
    assert "| YaRN ×2 | SnapKV 1/4 |" in compressed and "| RoPE (as trained) | full |" in compressed
    assert "Self-Extend" not in compressed
    for label in LABELS:
        row = next(line for line in results.splitlines() if line.startswith(f"| {label} |"))
        assert "—" not in row and len(row.split("|")) == 5  # both lengths measured
    assert (workdir / "ppl_vs_length.png").exists() and (workdir / "retrieval_vs_length.png").exists()
    assert list((workdir / "evals" / study.file_slug("YaRN ×2")).glob("passkey_*.png"))  # the eval's heatmap

    def fail(*_, **__):
        raise AssertionError("a variant already evaluated was evaluated again")

    monkeypatch.setattr(study.suite, "evaluate", fail)
    study.main(args)
    assert (workdir / "results.md").read_text() == results
    with pytest.raises(SystemExit, match="holds rows measured with --prompt_format plain"):
        study.main([*args, "--prompt_format", "chat"])
    monkeypatch.setitem(study.SETTINGS, "test", study.dataclasses.replace(SETTING, num_samples=2))
    with pytest.raises(SystemExit, match="was measured with other setting than asked now"):
        study.main(args)  # rows are never mixed across settings
    monkeypatch.setitem(study.SETTINGS, "test", SETTING)

    record = json.loads((workdir / "evals" / f"{study.file_slug('YaRN ×2')}.json").read_text())
    command = record["command"].replace("OUT", str(tmp_path / "rerun")).split()
    assert command[:3] == ["python", "-m", "longctx.eval"]
    rerun = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads((tmp_path / "rerun" / "report.json").read_text())
    assert again["ppl"]["yarn"]["512"]["ppl"] == pytest.approx(record["report"]["ppl"]["YaRN ×2"]["512"]["ppl"],
                                                               rel=1e-5)
    assert again["passkey"]["yarn"]["passkey"] == record["report"]["passkey"]["YaRN ×2"]["passkey"]


def test_a_fine_tune_trains_from_the_runs_params_resumes_and_joins_the_report(run, tmp_path, monkeypatch):
    """YaRN ×4 fine-tuned for 2 steps at 4 × L on the corpus's training documents (a share of them pass-key
    prompts), from the run's params; its row sits in the same tables as the training-free rows."""
    documents = write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(study.SETTINGS, "test", study.dataclasses.replace(SETTING, depths=(0.5,), batch_size=1))
    monkeypatch.setitem(study.FINE_TUNE_SETTINGS, "test", study.FineTuneSetting(
        seq_len=1024, steps=2, batch_size=1, learning_rate=1e-4, warmup_steps=1, passkey_fraction=0.2,
        checkpoint_every=2, model={}))
    workdir = tmp_path / "study"
    args = ["fine_tune", "--run", str(run), "--corpus", str(documents), "--workdir", str(workdir), "--setting",
            "test", "--tasks", "ppl,passkey", "--methods", "yarn4"]
    study.main(args)
    tuned = study.checkpoint.load_run_config(workdir / "runs" / "yarn4")
    assert tuned.model.positions.name == "yarn" and tuned.model.positions.factor == 4.0
    assert tuned.train.init_from == str(run) and tuned.data.seq_len == 1024
    assert study.checkpoint.newest_step(workdir / "runs" / "yarn4") == 2
    results = (workdir / "results.md").read_text()
    assert "| YaRN ×4 + fine-tune | " in results
    monkeypatch.setattr(study, "train", lambda *_, **__: pytest.fail("a finished fine-tune was trained again"))
    study.main(args)
    with pytest.raises(SystemExit, match="--methods names no fine-tune"):
        study.main([*args[:-1], "yarn3"])


def test_longrope_factors_of_the_models_own_become_a_row(run, tmp_path, monkeypatch):
    """The ×2 search on a 512-token window of a training document; its factors keep LongRoPE's constraints, and the
    searched row is evaluated with them (its command carries them)."""
    documents = write_corpus(tmp_path / "corpus")
    monkeypatch.setitem(study.SETTINGS, "test", SETTING)
    workdir = tmp_path / "study"
    common = ["--run", str(run), "--corpus", str(documents), "--workdir", str(workdir), "--setting", "test"]
    study.main(["longrope_search", *common])
    result = json.loads((workdir / "longrope" / "x2.json").read_text())
    factors = result["long_factor"]
    assert result["length"] == 512 and len(factors) == 8 and factors == sorted(factors)
    assert result["loss"] <= min(result["starts"].values())
    study.main(["training_free", *common, "--tasks", "ppl", "--only", "LongRoPE ×2 (searched)"])
    record = json.loads((workdir / "evals" / f"{study.file_slug('LongRoPE ×2 (searched)')}.json").read_text())
    assert record["params"]["long_factor"] == factors and "long_factor=" in record["command"]
    assert record["lengths"] == [256, 512]


def test_self_extends_group_reaches_the_factor():
    for factor in (2, 4, 8):
        group = study.self_extend_group(factor, 8192, 2048)
        assert (8192 - 2048) * group + 2048 >= factor * 8192 > (8192 - 2048) * (group - 1) + 2048
