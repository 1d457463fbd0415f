"""Config validation and the command line's handling of bad input: each error names the field and what is allowed."""

import json
import pathlib
import runpy
import subprocess
import sys

import pytest
from pallas_kernels import masks

from longctx import positions
from longctx.config import base_config, positions_config, validate
from longctx.models import build_model
from longctx.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.py")):
        validate(runpy.run_path(str(path))["get_config"]())


def test_config_argument_picks_the_position_scheme():
    assert base_config("positions=none").model.positions.to_dict() == {"name": "none"}
    assert base_config().model.positions.theta == 10000.0
    with pytest.raises(ValueError, match="not key=value with key in positions"):
        base_config("scheme=none")
    with pytest.raises(ValueError, match="unknown position scheme 'nope'"):
        base_config("positions=nope")
    with pytest.raises(ValueError, match="'none' has no parameter theta"):
        positions_config("none", theta=1.0)


@pytest.mark.parametrize("name", positions.names())
def test_every_scheme_is_usable_from_a_config(name):
    """`--config=configs/tiny.py:positions=<name>` gives a valid config whose model carries that scheme, its training
    length filled in from data.seq_len where the scheme measures against one."""
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"](f"positions={name}")
    validate(config)
    scheme = build_model(config.model, vocab_size=259, train_len=config.data.seq_len).position_scheme
    assert scheme.scheme_name == name
    if positions.TRAIN_LENGTH_FIELD in positions.default_params(name):
        assert getattr(scheme, positions.TRAIN_LENGTH_FIELD) == config.data.seq_len == 256


@pytest.mark.parametrize("spec", ["causal", "sliding_window(window=512)", "sinks_window(sinks=4, window=512)",
                                  "chunked_local(chunk=1024)", "strided_heads(block=64, local_blocks=2, stride=4)",
                                  "block_mask(blocks=[[True, False], [True, True]], block_q=2048, block_kv=2048)",
                                  "causal & prefix(length=4) | distant(distance=8)"])
def test_every_mask_is_usable_from_a_config(spec):
    """model.attention.mask names any registered mask with its parameters, the model's layers get exactly it, and the
    spec the run's config.json keeps reads back to the same mask."""
    config = base_config()
    config.model.attention.mask = spec
    validate(config)
    mask = build_model(config.model, vocab_size=259, train_len=config.data.seq_len).config.mask
    assert mask == masks.parse(spec) == masks.parse(mask.spec)


def test_a_run_saved_with_the_old_mask_fields_reads_as_a_spec(tmp_path):
    config = base_config().to_dict()
    config["model"]["attention"].update(mask="sinks_window", window=64, sinks=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = checkpoint.load_run_config(tmp_path)
    assert loaded.model.attention.to_dict() == {"impl": "auto", "mask": "sinks_window(sinks=4, window=64)"}


def test_model_vocab_size_must_cover_the_tokenizer():
    config = base_config()
    config.model.vocab_size = 100
    with pytest.raises(ValueError, match=r"model.vocab_size \(100\) is smaller than the tokenizer's vocabulary"):
        build_model(config.model, vocab_size=259, train_len=16)
    config.model.vocab_size = 320
    assert build_model(config.model, vocab_size=259, train_len=16).config.vocab_size == 320


def _invalid(**changes):
    config = base_config()
    config.update_from_flattened_dict(changes)
    return config


@pytest.mark.parametrize("changes,message", [
    ({"model.positions.name": "yarnn"}, r"unknown position scheme 'yarnn'; registered schemes: abf, alibi, clex"),
    ({"model.attention.mask": "diagonal"},
     r"model.attention.mask: unknown mask 'diagonal'; registered masks: block_mask, causal, chunked_local"),
    ({"model.attention.mask": "sliding_window"},
     r"model.attention.mask: mask 'sliding_window' needs parameter\(s\): window \(a positive int\)"),
    ({"model.attention.mask": "sliding_window(window=0)"},
     r"model.attention.mask: SlidingWindow: window must be a positive int, got 0"),
    ({"model.attention.mask": "causal +"}, r"model.attention.mask: mask spec 'causal \+' is not a registered mask"),
    ({"model.attention.impl": "magic"}, r"model.attention.impl must be one of"),
    ({"train.grad_accum_steps": 5}, r"train.batch_size \(32\) must be a multiple of train.grad_accum_steps \(5\)"),
    ({"train.warmup_steps": -1}, r"train.warmup_steps must be an int >= 0"),
    ({"data.valid_fraction": 1.5}, r"data.valid_fraction must be in \[0, 1\]"),
    ({"train.steps": 0}, r"train.steps must be a positive int"),
])
def test_validation_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(_invalid(**changes))


def run_train(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "longctx.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_unknown_config_field_on_the_command_line(tmp_path):
    result = run_train("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.model.hiden_size=64",
                       "--config.trian.steps=3")
    assert result.returncode != 0
    assert "--config.model.hiden_size: model has no field 'hiden_size' (did you mean 'hidden_size'?)" in result.stderr
    assert "its fields are: attention, dtype, head_dim, hidden_size" in result.stderr
    assert "--config.trian.steps: the config has no field 'trian' (did you mean 'train'?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_bad_value_on_the_command_line_is_a_message_not_a_traceback(tmp_path):
    result = run_train("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                       "--config.model.positions.name=yarnn")
    assert result.returncode != 0
    assert "error: unknown position scheme 'yarnn'; registered schemes: abf, alibi, clex, dynamic" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
