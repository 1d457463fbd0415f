"""GGUF files in (longctx.models.gguf), against transformers' own GGUF loader (tests/fixtures/gguf, see
scripts/make_gguf_fixtures.py) and the HF fixture models the files are written from (tests/gguf_files.py).

Tolerance: float32 logits within 1e-4 of transformers' (logits are of order 4), as for HF checkpoints; the quantised
files' weights are the values gguf dequantises, so quantisation changes the model, not the agreement.
"""

import json
import os
import pathlib

import gguf
import jax
import numpy as np
import pytest

import gguf_files
from longctx.data import load_tokenizer
from longctx.models import gguf as gguf_model
from longctx.models import hf

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
HF_GOLDEN = np.load(FIXTURES / "hf" / "logits.npz")
GGUF_GOLDEN = np.load(FIXTURES / "gguf" / "logits.npz")
INPUTS = ("input_ids_short", "input_ids_long")
ATOL = 1e-4
# (model, matrices, token embedding) → the golden logits' name: transformers' GGUF loader on the same file, or for
# qwen2 (which that loader cannot size: scripts/make_gguf_fixtures.py) transformers on the HF checkpoint itself.
FILES = {("llama", "F32", None): "llama_F32", ("llama", "Q8_0", None): "llama_Q8_0",
         ("llama", "Q4_1", "Q8_0"): "llama_Q4_1_embed_Q8_0", ("qwen2", "F32", None): "qwen2"}


def file_id(key: tuple) -> str:
    return "_".join(filter(None, key))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple, pathlib.Path]:
    directory = tmp_path_factory.mktemp("gguf")
    return {key: gguf_files.write(key[0], directory / f"{file_id(key)}.gguf", key[1], key[2]) for key in FILES}


@pytest.mark.parametrize("key", list(FILES), ids=file_id)
def test_logits_equal_transformers(files, key):
    model, params = gguf_model.load(files[key], attention_impl="xla")
    golden = HF_GOLDEN if key[0] == "qwen2" else GGUF_GOLDEN
    forward = jax.jit(lambda params, ids: model.apply({"params": params}, ids))
    for which in INPUTS:
        np.testing.assert_allclose(np.asarray(forward(params, HF_GOLDEN[which])), golden[f"{FILES[key]}/{which}"],
                                   atol=ATOL, rtol=0, err_msg=f"{key} on {which}")


def test_a_float32_file_gives_the_hf_checkpoints_params_exactly(files):
    """Names, layouts and llama.cpp's q/k row permutation undone: every param equals hf.load's of the checkpoint
    the file was written from, bit for bit."""
    model, params = gguf_model.load(files[("llama", "F32", None)])
    hf_model, hf_params = hf.load(FIXTURES / "hf" / "models" / "llama")
    assert model.config == hf_model.config and type(model.position_scheme) is type(hf_model.position_scheme)
    jax.tree.map(np.testing.assert_array_equal, params, hf_params)


def test_tensors_are_dequantised_one_at_a_time_when_read(files, monkeypatch):
    """The header alone gives every HF shape, and making the params dequantises each tensor once, when it is made
    into its param (so the file is never held in float32 beside the params)."""
    reader = gguf_model.open_file(files[("llama", "Q4_1", "Q8_0")])
    tensors = gguf_model.Tensors(reader, gguf_model.hf_config(reader))
    read = []
    real = gguf_model.dequantized
    monkeypatch.setattr(gguf_model, "dequantized", lambda tensor: read.append(tensor.name) or real(tensor))
    shapes = tensors.shapes()
    assert not read and len(shapes) == len(reader.tensors)
    model, params = gguf_model.load(files[("llama", "Q4_1", "Q8_0")])
    assert sorted(read) == sorted(tensor.name for tensor in reader.tensors)
    assert {name: tensors[name].shape for name in shapes} == shapes


def test_quantised_weights_are_the_dequantised_values(files):
    """Every matrix of the Q4_1 file (token embedding Q8_0) is stored in its format and reads back as the
    checkpoint's values within the format's rounding (1-D tensors exactly)."""
    reader = gguf_model.open_file(files[("llama", "Q4_1", "Q8_0")])
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    originals = gguf_files.gguf_tensors("llama")
    for name, original in originals.items():
        tensor = tensors[name]
        values = gguf_model.dequantized(tensor)
        assert values.shape == original.shape and values.dtype == np.float32, name
        expected_type = (gguf.GGMLQuantizationType.F32 if original.ndim == 1 else gguf.GGMLQuantizationType.Q8_0
                         if name == "token_embd.weight" else gguf.GGMLQuantizationType.Q4_1)
        assert tensor.tensor_type == expected_type, name
        # A Q4_1 block of 32 stores 4-bit steps of (max - min) / 15 from its min, Q8_0 8-bit steps of max|x| / 127;
        # scale and min are float16 (relative error 2^-11). A value moves by half a step, plus up to 15 (127) steps'
        # and the min's float16 error.
        blocks = original.reshape(-1, 32) if original.ndim == 2 else original.reshape(1, -1)
        levels = {gguf.GGMLQuantizationType.Q4_1: 15, gguf.GGMLQuantizationType.Q8_0: 127,
                  gguf.GGMLQuantizationType.F32: 0}[expected_type]
        step = (blocks.max(1) - blocks.min(1) if levels == 15 else np.abs(blocks).max(1)) / max(levels, 1)
        bound = (0.5 * step + levels * step * 2.0 ** -11 + np.abs(blocks).max(1) * 2.0 ** -11) * (levels > 0)
        error = np.abs(values.reshape(blocks.shape) - blocks)
        assert np.all(error <= bound[:, None] + 1e-7), (name, float(error.max()))
        assert np.any(error > 0) or expected_type == gguf.GGMLQuantizationType.F32, name


def test_refusals_name_the_field(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        gguf_model.load(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_model.load(tmp_path / "text.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotImplementedError, match="general.architecture='gpt2' is not supported"):
        gguf_model.load(tmp_path / "gpt2.gguf")


SMOLLM2 = os.environ.get("LONGCTX_SMOLLM2_GGUF")


@pytest.mark.skipif(not SMOLLM2, reason="set LONGCTX_SMOLLM2_GGUF to the SmolLM2-135M-Instruct GGUF file")
def test_smollm2_loads_with_its_config():
    model, params = gguf_model.load(SMOLLM2, attention_impl="xla")
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size, config.tie_embeddings) == (30, 576, 9, 3, 64, 49152, True)
    assert model.position_scheme.theta == 100000.0
    logits = model.apply({"params": params}, np.arange(1, 17, dtype=np.int32)[None])
    assert logits.shape == (1, 16, 49152) and np.all(np.isfinite(np.asarray(logits)))


TOKENS = json.loads((FIXTURES / "gguf" / "tokens.json").read_text())


@pytest.mark.parametrize("pre", sorted(TOKENS))
def test_the_files_tokenizer_gives_transformers_ids(tmp_path, pre):
    """Code, unicode, whitespace runs and a control token, through the tokenizer of a GGUF file with llama.cpp's
    "gpt2" or "smollm" pre-tokenizer: the ids of transformers' GGUF tokenizer, and back to the text (less the
    control token, which decoding drops)."""
    tokenizer = gguf_model.load_tokenizer(gguf_files.write_tokenizer(tmp_path / "tokenizer.gguf", pre))
    text, ids = TOKENS[pre]["text"], TOKENS[pre]["ids"]
    assert tokenizer.encode(text).tolist() == ids
    assert tokenizer.decode(np.asarray(ids)) == text.replace("<|im_end|>", "")
    specials = gguf_files.SPECIAL_TOKENS
    first = tokenizer.vocab_size - len(specials)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (first, first + 1, first + 2)
    # Saved as HF does and read back from tokenizer.json: the same ids, and the file's BOS / EOS / PAD from
    # tokenizer_config.json (by name alone, <|endoftext|> would be taken for BOS and EOS).
    tokenizer.save(tmp_path)
    saved = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert saved.encode(text).tolist() == ids
    assert (saved.pad_id, saved.bos_id, saved.eos_id) == (first, first + 1, first + 2)
    (tmp_path / "tokenizer_config.json").unlink()
    by_name = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (by_name.bos_id, by_name.eos_id) == (first, first)


def test_smollm_splits_digits_one_by_one(tmp_path):
    """As llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json): every digit its own token, where
    GPT-2's regex keeps " 1" together (a merge of the test vocabulary)."""
    split = {pre: gguf_model.load_tokenizer(gguf_files.write_tokenizer(tmp_path / f"{pre}.gguf", pre))
             for pre in ("gpt2", "smollm")}
    symbols = gguf_files.byte_symbols()
    ids = {pre: tokenizer.encode(" 1234").tolist() for pre, tokenizer in split.items()}
    assert ids["smollm"] == [symbols.index(c) for c in "Ġ1234"]
    assert len(ids["gpt2"]) < 5  # merges of the test vocabulary: " 1", "23"


def test_tokenizer_refusals_name_the_field(tmp_path, files):
    with pytest.raises(ValueError, match="tokenizer.ggml.model is missing"):
        gguf_model.load_tokenizer(files[("llama", "F32", None)])
    with pytest.raises(NotImplementedError, match="tokenizer.ggml.pre='qwen2' is not supported"):
        gguf_model.load_tokenizer(gguf_files.write_tokenizer(tmp_path / "qwen2.gguf", "qwen2"))
