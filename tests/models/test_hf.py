"""HF checkpoints in and out, against transformers' own logits (tests/fixtures/hf, see scripts/make_hf_fixtures.py).

Tolerance: float32 logits within 1e-4 of transformers' (measured: below 1e-5 on CPU; logits are of order 4).
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from pallas_kernels import masks

from longctx import positions
from longctx.models import Llama, hf

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"
GOLDEN = np.load(FIXTURES / "logits.npz")
VARIANTS = json.loads((FIXTURES / "llama_rope_variants.json").read_text())
INPUTS = ("input_ids_short", "input_ids_long")
ATOL = 1e-4


def assert_logits_match(model, params, golden_name):
    for which in INPUTS:
        logits = np.asarray(model.apply({"params": params}, GOLDEN[which]))
        np.testing.assert_allclose(logits, GOLDEN[f"{golden_name}/{which}"], atol=ATOL, rtol=0,
                                   err_msg=f"{golden_name} on {which}")


def variant_dir(tmp_path: pathlib.Path, variant: str) -> pathlib.Path:
    """The llama fixture with the rope settings of `variant` (the weights are shared by every variant)."""
    directory = tmp_path / variant
    directory.mkdir()
    config = json.loads((FIXTURES / "models" / "llama" / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **VARIANTS[variant]}))
    shutil.copy(FIXTURES / "models" / "llama" / "model.safetensors", directory)
    return directory


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_logits_equal_transformers(name):
    model, params = hf.load(FIXTURES / "models" / name, attention_impl="xla")
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    assert_logits_match(model, params, name)


def test_what_each_architecture_brings():
    qwen2, params = hf.load(FIXTURES / "models" / "qwen2")
    assert qwen2.config.qkv_bias and qwen2.config.tie_embeddings and "lm_head" not in params
    assert params["layers_0"]["attn"]["q_proj"]["bias"].shape == (4, 16)
    mistral, _ = hf.load(FIXTURES / "models" / "mistral")
    assert mistral.config.mask == masks.SlidingWindow(8)
    llama, _ = hf.load(FIXTURES / "models" / "llama")
    assert llama.config.mask == masks.Causal() and not llama.config.qkv_bias


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_equal_transformers_for_every_rope_type(variant, tmp_path):
    model, params = hf.load(variant_dir(tmp_path, variant), attention_impl="xla")
    assert model.position_scheme.hf_rope_parameters()["rope_type"] == VARIANTS[variant]["rope_parameters"]["rope_type"]
    assert_logits_match(model, params, f"llama_{variant}")


def read_all(directory: pathlib.Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="flax") as f:
            tensors.update({key: np.asarray(f.get_tensor(key)) for key in f.keys()})
    return tensors


@pytest.mark.parametrize("name,variant", [("llama", None), ("qwen2", None), ("mistral", None), ("llama", "yarn"),
                                          ("llama", "dynamic"), ("llama", "longrope"), ("llama", "llama3")])
def test_round_trip_hf_longctx_hf(name, variant, tmp_path):
    source = variant_dir(tmp_path, variant) if variant else FIXTURES / "models" / name
    original_config = hf.read_config(source)
    model, params = hf.load(source)
    saved = hf.save(model, params, tmp_path / "saved", dtype=original_config["dtype"],
                    max_position_embeddings=original_config["max_position_embeddings"])
    # The same tensors, bit for bit, under the same names: transformers loads them as it loaded the original.
    original, written = read_all(source), read_all(saved)
    assert sorted(written) == sorted(original)
    for key in original:
        assert written[key].dtype == original[key].dtype and np.array_equal(written[key], original[key]), key
    config = hf.read_config(saved)
    assert config["architectures"] == original_config["architectures"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                  "sliding_window"):
        assert config.get(field) == original_config.get(field), field
    assert hf.llama_config_from_hf(config) == hf.llama_config_from_hf(original_config)
    for seq_len in (None, 12, 40):
        np.testing.assert_array_equal(positions.from_hf_config(config).inv_freq(seq_len),
                                      positions.from_hf_config(original_config).inv_freq(seq_len))
    again, again_params = hf.load(saved, attention_impl="xla")
    assert_logits_match(again, again_params, f"llama_{variant}" if variant else name)


def test_sharded_save_writes_an_index_that_loads(tmp_path):
    model, params = hf.load(FIXTURES / "models" / "llama")
    saved = hf.save(model, params, tmp_path / "sharded", max_shard_bytes=20_000, max_position_embeddings=16)
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    files = sorted(saved.glob("model-*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == {f.name for f in files}
    again, again_params = hf.load(saved, attention_impl="xla")
    assert_logits_match(again, again_params, "llama")


def test_a_scanned_model_saves_the_tensors_of_its_unrolled_twin(tmp_path):
    model, params = hf.load(FIXTURES / "models" / "llama")
    layers = [params[f"layers_{i}"] for i in range(model.config.num_layers)]
    stacked = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
               "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    scanned = model.clone(config=dataclasses.replace(model.config, scan_layers=True))
    unrolled = read_all(hf.save(model, params, tmp_path / "unrolled", max_position_embeddings=16))
    written = read_all(hf.save(scanned, stacked, tmp_path / "scanned", max_position_embeddings=16))
    assert sorted(written) == sorted(unrolled)
    for key in unrolled:
        assert np.array_equal(written[key], unrolled[key]), key


def test_save_refuses_what_hf_cannot_hold_and_a_used_directory(tmp_path):
    model, params = hf.load(FIXTURES / "models" / "llama")
    nope = Llama(model.config, position_scheme=positions.get("none", head_dim=16))
    with pytest.raises(NotImplementedError, match="'none' has no HF transformers equivalent"):
        hf.save(nope, params, tmp_path / "nope", max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings is needed"):
        hf.save(model, params, tmp_path / "no_length")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        hf.save(model, params, tmp_path / "used", max_position_embeddings=16)
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "nope").exists() and not (tmp_path / "no_length").exists()


@pytest.mark.parametrize("change,error,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, NotImplementedError, r"\['GPT2LMHeadModel'\] are not supported"),
    ({"hidden_act": "gelu"}, NotImplementedError, "hidden_act='gelu' is not supported"),
    ({"attention_bias": True}, NotImplementedError, "attention_bias=True is not supported"),
    ({"num_hidden_layers": 3}, ValueError, r"missing tensors model.layers.2"),
    ({"hidden_size": 48}, ValueError, r"tensors of another shape: lm_head.weight \(64, 32\), not \(64, 48\)"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, ValueError, "unknown rope type 'su'"),
    ({"partial_rotary_factor": 0.5}, NotImplementedError, "partial_rotary_factor=0.5: transformers' llama rotates"),
])
def test_load_names_what_it_cannot_honour(change, error, message, tmp_path):
    config = {**hf.read_config(FIXTURES / "models" / "llama"), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "models" / "llama" / "model.safetensors", tmp_path)
    with pytest.raises(error, match=message):
        hf.load(tmp_path)


def test_qwen2_sliding_windows_follow_hf_layer_types():
    config = {**hf.read_config(FIXTURES / "models" / "qwen2"), "use_sliding_window": True, "sliding_window": 8,
              "max_window_layers": 1, "layer_types": None}
    with pytest.raises(NotImplementedError, match="mixes layer types"):
        hf.mask_from_hf(config)
    assert hf.mask_from_hf({**config, "max_window_layers": 0}) == masks.SlidingWindow(8)
    # Explicit layer_types win over max_window_layers, as in transformers; no window without use_sliding_window.
    assert hf.mask_from_hf({**config, "layer_types": ["sliding_attention"] * 2}) == masks.SlidingWindow(8)
    assert hf.mask_from_hf({**config, "layer_types": ["full_attention"] * 2}) == masks.Causal()
    assert hf.mask_from_hf({**config, "use_sliding_window": False, "max_window_layers": 0}) == masks.Causal()


def test_dynamic_ntk_is_saved_with_its_own_length(tmp_path):
    model, params = hf.load(variant_dir(tmp_path, "dynamic"))
    with pytest.raises(ValueError, match=r"max_position_embeddings=64: HF's dynamic NTK measures against it"):
        hf.save(model, params, tmp_path / "out", max_position_embeddings=64)
    hf.save(model, params, tmp_path / "out")
    assert hf.read_config(tmp_path / "out")["max_position_embeddings"] == 16


def test_loading_needs_no_torch():
    code = ("import sys; from longctx.models import hf; hf.load(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(FIXTURES / "models" / "qwen2")], check=True)
