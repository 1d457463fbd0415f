"""Every HF rope type against golden values from transformers (tests/fixtures/hf/rope.json, written by
scripts/make_hf_fixtures.py) and against the public numbers of the papers and model cards."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import positions

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
ROPE_CASES = json.loads((FIXTURES / "rope.json").read_text())["cases"]


@pytest.mark.parametrize("case", ROPE_CASES, ids=[case["name"] for case in ROPE_CASES])
def test_inv_freq_and_attention_factor_equal_transformers(case):
    scheme = positions.from_hf_config(case["config"])
    for value in case["values"]:
        hf_inv_freq = np.asarray(value["inv_freq"], np.float32)
        ours = scheme.inv_freq(value["seq_len"])
        assert ours.dtype == np.float32 and ours.shape == hf_inv_freq.shape
        np.testing.assert_allclose(ours, hf_inv_freq, rtol=1e-6, atol=0, err_msg=f"seq_len={value['seq_len']}")
        assert scheme.attention_factor(value["seq_len"]) == pytest.approx(value["attention_factor"], rel=1e-6)


@pytest.mark.parametrize("name", ["dynamic_v4", "dynamic_v5_partial", "longrope_v5"])
def test_traced_length_gives_the_same_tables_under_jit(name):
    """dynamic and longrope read the length at run time: one compiled function serves every length."""
    case = next(case for case in ROPE_CASES if case["name"] == name)
    scheme = positions.from_hf_config(case["config"])
    traced = jax.jit(scheme.traced_inv_freq)
    for value in case["values"]:
        seq_len = value["seq_len"] or scheme.original_max_position_embeddings
        # float32 powers of a float32 base: a few ulps of the exponent's magnitude (|2i/R · ln base| <= 14).
        np.testing.assert_allclose(traced(jnp.int32(seq_len)), value["inv_freq"], rtol=3e-6)
    assert traced._cache_size() == 1


def test_the_model_reads_the_length_from_the_positions():
    scheme = positions.get("dynamic", head_dim=64, factor=4.0, original_max_position_embeddings=16)
    encoding = jax.jit(scheme)(jnp.arange(40)[None])
    angles = np.arctan2(np.asarray(encoding.q_sin[0, 1]), np.asarray(encoding.q_cos[0, 1]))  # position 1
    np.testing.assert_allclose(angles, scheme.inv_freq(40), rtol=1e-5)
    assert not np.allclose(scheme.inv_freq(40), scheme.inv_freq(16))


def test_public_values():
    rope = positions.get("rope", head_dim=128)
    assert rope.inv_freq()[32] == pytest.approx(1e-2, rel=1e-6)
    assert rope.inv_freq()[63] == pytest.approx(1.1547819847e-4, rel=1e-6)
    yarn = positions.get("yarn", head_dim=128, factor=4.0, original_max_position_embeddings=4096)
    assert yarn.inv_freq()[32] == pytest.approx(6.5384615385e-3, rel=1e-6)
    assert yarn.inv_freq()[63] == pytest.approx(2.8869549617e-5, rel=1e-6)
    assert yarn.attention_factor() == pytest.approx(1.138629436111989, rel=1e-12)
    dynamic = positions.get("dynamic", head_dim=128, factor=4.0, original_max_position_embeddings=4096)
    assert dynamic.base(8192) == pytest.approx(51293.787268, rel=1e-10)
    np.testing.assert_allclose(dynamic.inv_freq(8192), 51293.787268 ** -(np.arange(0, 128, 2) / 128), rtol=1e-6)
    ntk = positions.get("ntk", head_dim=128, factor=4.0)
    np.testing.assert_allclose(ntk.inv_freq(), 40889.942432 ** -(np.arange(0, 128, 2) / 128), rtol=1e-6)
    llama3 = positions.get("llama3", head_dim=128, theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
    assert llama3.inv_freq()[32] == pytest.approx(5.2484616099e-4, rel=1e-6)


def test_saved_fields_read_back_to_the_same_scheme():
    for case in ROPE_CASES:
        scheme = positions.from_hf_config(case["config"])
        fields = positions.hf_rope_fields(scheme)
        for form in ({"rope_parameters": fields["rope_parameters"]},  # v5 readers
                     {"rope_theta": fields["rope_theta"], "rope_scaling": fields["rope_scaling"],
                      **({"partial_rotary_factor": fields["partial_rotary_factor"]}
                         if "partial_rotary_factor" in fields else {})}):  # v4 readers
            config = {k: v for k, v in case["config"].items()
                      if k not in ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")}
            again = positions.from_hf_config({**config, **form})
            for seq_len in (None, 100, 20000):
                np.testing.assert_array_equal(again.inv_freq(seq_len), scheme.inv_freq(seq_len))
                assert again.attention_factor(seq_len) == scheme.attention_factor(seq_len)


def test_unknown_or_unsupported_hf_rope_settings_raise_naming_them():
    base = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
    with pytest.raises(ValueError, match="unknown rope type 'su'.*longctx reads default, dynamic"):
        positions.from_hf_config({**base, "rope_scaling": {"type": "su", "factor": 2.0}})
    nested = "each layer type its own rope parameters \\(full_attention, sliding_attention\\)"
    with pytest.raises(NotImplementedError, match=nested):
        positions.from_hf_config({**base, "layer_types": ["sliding_attention", "full_attention"],
                                  "rope_parameters": {"sliding_attention": {"rope_type": "default"},
                                                      "full_attention": {"rope_type": "linear", "factor": 2.0}}})
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    zero_mscale = positions.from_hf_config({**base, "rope_parameters": {**yarn, "mscale": 0, "mscale_all_dim": 0}})
    plain = positions.from_hf_config({**base, "rope_parameters": yarn})
    assert zero_mscale.attention_factor() == plain.attention_factor() == pytest.approx(1.138629436111989)
    with pytest.raises(ValueError, match="needs rope_parameters\\['factor'\\]"):
        positions.from_hf_config({**base, "rope_parameters": {"rope_type": "linear"}})
