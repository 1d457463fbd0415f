"""experiments/kv_compression/diagnose.py: the pass-key diagnosis of a model, on an untrained byte model."""

import pathlib
import sys

import numpy as np

from longctx import positions
from longctx.data import load_tokenizer
from longctx.models import Llama, LlamaConfig

from tiny_models import random_params

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "kv_compression"))
import diagnose  # noqa: E402


def test_the_diagnosis_finds_both_copies_and_generation_agrees_with_rerunning():
    tokenizer = load_tokenizer("byte")
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, attention_impl="xla")
    model = Llama(config, position_scheme=positions.get("rope", head_dim=16))
    params = random_params(model, seed=4)
    result = diagnose.diagnose(model, params, tokenizer, 300, num_samples=1, depths=(0.0, 1.0), max_new_tokens=4,
                               batch_sizes=(1, 2))
    assert result["samples"] == 2
    for share in (result["answer_key_tokens"], result["needle_copy_key_tokens"], result["rerun_accuracy"]):
        assert 0.0 <= share <= 1.0  # None would mean the needle's second copy was not found
    assert set(result["generation"]) == {"encoded/batch1", "encoded/batch2", "raw/batch1", "raw/batch2"}
    for row in result["generation"].values():
        assert row["agrees_with_rerun"] == 1.0  # float32, same model: the cached path must give the same tokens


def test_find_returns_the_first_occurrence_at_or_after_start():
    sequence = np.array([1, 2, 3, 1, 2, 3])
    assert diagnose.find(sequence, np.array([1, 2]), 0) == 0
    assert diagnose.find(sequence, np.array([1, 2]), 1) == 3
    assert diagnose.find(sequence, np.array([3, 3]), 0) is None
