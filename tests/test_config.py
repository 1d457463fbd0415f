"""Config validation and the command line's handling of bad input: each error names the field and what is allowed."""

import pathlib
import subprocess
import sys

import pytest

from longctx.config import base_config, positions_config, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_configs_are_valid():
    import runpy

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


def _invalid(**changes):
    config = base_config()
    config.update_from_flattened_dict(changes)
    return config


@pytest.mark.parametrize("changes,message", [
    ({"model.positions.name": "yarnn"}, r"unknown position scheme 'yarnn'; registered schemes: abf, alibi, clex"),
    ({"model.attention.mask": "diagonal"}, r"model.attention.mask must be one of causal, sliding_window"),
    ({"model.attention.window": 64}, r"model.attention.window=64 has no effect with mask 'causal'.*sliding_window"),
    ({"model.attention.mask": "sliding_window"}, r"model.attention.window must be a positive int"),
    ({"model.attention.impl": "magic"}, r"model.attention.impl must be one of"),
    ({"train.grad_accum_steps": 5}, r"train.batch_size \(32\) must be a multiple of train.grad_accum_steps \(5\)"),
    ({"train.warmup_steps": 10**6}, r"train.warmup_steps must be in \[0, train.steps=10000\]"),
    ({"data.valid_fraction": 1.5}, r"data.valid_fraction must be in \(0, 1\)"),
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
