"""scripts/convert_hf.py both ways: an HF model becomes a run that eval measures, and a run an HF directory."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers
from safetensors import safe_open

import gguf_files

from longctx import convert
from longctx.data import load_tokenizer
from longctx.eval import suite
from longctx.config import positions_config
from longctx.models import build_model, hf, init_params
from longctx.train import checkpoint, train

REPO = pathlib.Path(__file__).resolve().parents[1]
LLAMA = REPO / "tests" / "fixtures" / "hf" / "models" / "llama"


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def tensors_of(directory):
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, framework="flax") as f:
            out.update({key: np.asarray(f.get_tensor(key)) for key in f.keys()})
    return out


@pytest.fixture
def hf_dir(tmp_path, corpus):
    """The tiny llama fixture with a word-level tokenizer.json that covers the test corpus (vocab 64)."""
    directory = tmp_path / "hf_llama"
    shutil.copytree(LLAMA, directory)
    text = " ".join(json.loads(line)["text"] for path in pathlib.Path(corpus).parent.glob("*.jsonl")
                    for line in path.read_text().splitlines())
    words = sorted(set(text.replace(".", " ").split()))
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "[UNK]", ".", *words])}
    assert len(vocab) <= 64
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_hf_model_becomes_a_run_that_eval_measures_and_goes_back_unchanged(hf_dir, tmp_path, corpus):
    workdir = tmp_path / "run"
    result = run_script("to_longctx", "--hf_dir", hf_dir, "--workdir", workdir)
    assert result.returncode == 0, result.stderr
    config = checkpoint.load_run_config(workdir)
    assert config.model.vocab_size == 64 and config.model.positions.name == "rope"
    assert config.model.positions.theta == 500.0 and config.data.seq_len == 16

    # Point the run at the test corpus, then measure it with its own scheme and with YaRN.
    stored = json.loads((workdir / "config.json").read_text())
    stored["data"]["source"] = corpus
    (workdir / "config.json").write_text(json.dumps(stored))
    report = suite.evaluate(workdir, [16, 48], ["rope", "yarn"], num_documents=2)
    assert all(np.isfinite(report["ppl"][s][n]["ppl"]) for s in ("rope", "yarn") for n in ("16", "48"))

    with pytest.raises(checkpoint.WorkdirError, match="holds weights only"):
        train(checkpoint.load_run_config(workdir), workdir, resume=True)

    exported = tmp_path / "exported"
    result = run_script("to_hf", "--workdir", workdir, "--hf_dir", exported)
    assert result.returncode == 0, result.stderr
    original, written = tensors_of(LLAMA), tensors_of(exported)
    assert sorted(original) == sorted(written)
    assert all(np.array_equal(original[key], written[key]) for key in original)
    saved = hf.read_config(exported)
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 0)
    assert saved["max_position_embeddings"] == 16 and (exported / "tokenizer.json").exists()


def test_a_trained_run_exports_to_hf_with_equal_logits(make_config, tmp_path):
    config = make_config(**{"train.steps": 2, "model.positions": positions_config("yarn", factor=2.0)})
    workdir = tmp_path / "run"
    train(config, workdir)
    exported = convert.run_to_hf(workdir, tmp_path / "exported")
    model, params = hf.load(exported, attention_impl="xla")
    assert model.position_scheme.original_max_position_embeddings == config.data.seq_len
    run_model = build_model(config.model, 259, config.data.seq_len)
    checkpoints = checkpoint.Checkpoints(workdir)
    run_params = checkpoints.restore_params(2, jax.eval_shape(lambda: init_params(run_model, jax.random.key(0))[0]))
    checkpoints.close()
    ids = np.random.default_rng(0).integers(0, 259, (2, 40))
    np.testing.assert_allclose(model.apply({"params": params}, ids), run_model.apply({"params": run_params}, ids),
                               atol=1e-5, rtol=1e-5)
    assert hf.read_config(exported)["max_position_embeddings"] == 2 * config.data.seq_len


def test_conversion_refuses_before_writing(tmp_path, hf_dir):
    # A run of ALiBi, which HF has no equivalent for: the fixture's run with its position scheme switched (the
    # refusal reads the config; training one would cost compilations).
    convert.hf_to_run(hf_dir, tmp_path / "alibi")
    stored = json.loads((tmp_path / "alibi" / "config.json").read_text())
    stored["model"]["positions"] = positions_config("alibi").to_dict()
    (tmp_path / "alibi" / "config.json").write_text(json.dumps(stored))
    result = run_script("to_hf", "--workdir", tmp_path / "alibi", "--hf_dir", tmp_path / "out")
    assert result.returncode != 0 and "'alibi' has no HF transformers equivalent" in result.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    result = run_script("to_longctx", "--hf_dir", hf_dir, "--workdir", tmp_path / "taken")
    assert result.returncode != 0 and "already holds a run" in result.stderr
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"
    (hf_dir / "tokenizer.json").unlink()
    result = run_script("to_longctx", "--hf_dir", hf_dir, "--workdir", tmp_path / "new")
    assert result.returncode != 0 and "has no tokenizer.json; name the model's tokenizer" in result.stderr


def test_a_gguf_file_becomes_a_run_and_goes_back_as_the_hf_checkpoint(hf_dir, tmp_path):
    """The llama fixture written as a float32 GGUF file (q/k rows permuted, as llama.cpp writes them) becomes a run
    whose HF export holds the fixture's tensors exactly; a run from a GGUF file reads its tokenizer from the file."""
    gguf_file = gguf_files.write("llama", tmp_path / "tiny.gguf", "F32")
    assert convert.run_config(gguf_file).data.tokenizer == str(gguf_file.absolute())
    workdir, exported = tmp_path / "run", tmp_path / "exported"
    # The fixture file carries no tokenizer: the word-level one of the HF fixture directory (vocab 64) serves.
    result = run_script("to_longctx", "--gguf", gguf_file, "--workdir", workdir, "--tokenizer",
                        hf_dir / "tokenizer.json")
    assert result.returncode == 0, result.stderr
    result = run_script("to_hf", "--workdir", workdir, "--hf_dir", exported)
    assert result.returncode == 0, result.stderr
    original, written = tensors_of(LLAMA), tensors_of(exported)
    assert sorted(original) == sorted(written)
    assert all(np.array_equal(original[key], written[key]) for key in original)
    refused = run_script("to_longctx", "--gguf", hf_dir / "tokenizer.json", "--workdir", tmp_path / "other")
    assert refused.returncode != 0 and "a GGUF model file ending in .gguf was expected" in refused.stderr


def test_a_gguf_files_tokenizer_goes_into_the_run_and_on_to_the_hf_directory(tmp_path):
    """A run from a GGUF file that carries a tokenizer holds it as tokenizer.json + tokenizer_config.json: the file's
    ids and its own BOS / EOS / PAD, read without the GGUF file; the HF export names the same special tokens."""
    gguf_file = gguf_files.write("llama", tmp_path / "tiny.gguf", "F32", tokenizer=True)
    workdir, exported = tmp_path / "run", tmp_path / "exported"
    config = convert.hf_to_run(gguf_file, workdir)
    assert config.data.tokenizer == str((workdir / "tokenizer.json").absolute())
    assert checkpoint.load_run_config(workdir).data.tokenizer == config.data.tokenizer
    files, run = load_tokenizer(str(gguf_file)), load_tokenizer(config.data.tokenizer)
    text = "#<0123:; '' + (* ) / 45 !$%&"  # bytes below 61: the tokens the file has
    assert run.encode(text).tolist() == files.encode(text).tolist() and len(files.encode(text)) == len(text)
    specials = dict(zip(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), range(61, 64)))
    assert (run.bos_id, run.eos_id, run.pad_id) == (files.bos_id, files.eos_id, files.pad_id) == (
        specials["<|im_start|>"], specials["<|im_end|>"], specials["<|endoftext|>"])
    convert.run_to_hf(workdir, exported)
    assert json.loads((exported / "tokenizer_config.json").read_text()) == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": gguf_files.CHAT_TEMPLATE}
    assert json.loads((exported / "config.json").read_text())["bos_token_id"] == specials["<|im_start|>"]
