"""The MFU formula on a model counted by hand, and its N against the params the model actually has."""

import dataclasses

import jax
import numpy as np
import pytest

from longctx.models.llama import param_structure
from longctx.train import flops
from tests.tiny_models import CONFIG, scheme_model

# vocab 10, hidden 4, MLP 6, 2 layers, 2 query heads and 1 kv head of 2.
HAND = dataclasses.replace(CONFIG, vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
                           num_kv_heads=1, head_dim=2)


def test_matmul_params_counted_by_hand():
    # per layer: q 4·(2·2) = 16, k 4·2 = 8, v 8, o (2·2)·4 = 16; MLP 3 · 4·6 = 72 → 120;
    # 2 layers 240; head 10·4 = 40
    assert flops.matmul_params(HAND) == 280


def test_step_flops_counted_by_hand():
    got = flops.step_flops(HAND, seq_len=8, batch_size=3)
    assert got.dense == 3 * 6 * 280 * 8  # 40,320
    assert got.attention == 3 * 12 * 2 * 2 * 2 * 8**2 * 0.5  # 9,216: 2 layers · 2 heads · D 2 · 64 pairs · ½
    assert got.total == 40_320 + 9_216
    full = flops.step_flops(HAND, seq_len=8, batch_size=3, attended=1.0)
    assert full.attention == 2 * got.attention and full.dense == got.dense


@pytest.mark.parametrize("tie_embeddings", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_matmul_params_are_the_models_weight_matrices(tie_embeddings, qkv_bias):
    """N = every param but norm scales, biases and (untied) the input embedding, read off the real param tree."""
    model = scheme_model("rope", tie_embeddings=tie_embeddings, qkv_bias=qkv_bias)
    params, _ = param_structure(model)
    counted = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [getattr(key, "key", "") for key in path]
        if names[-1] in ("scale", "bias") or (names[0] == "embed" and not tie_embeddings):
            continue
        counted += int(np.prod(leaf.shape))
    assert flops.matmul_params(model.config) == counted


def test_mfu_and_peaks():
    assert flops.mfu(989e12 * 0.5 * 2 * 3, seconds=3.0, num_devices=2, peak=989e12) == pytest.approx(0.5)
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops("cpu", given=1e12) == 1e12


def test_attended_share_must_be_a_fraction():
    with pytest.raises(ValueError, match="attended"):
        flops.step_flops(HAND, seq_len=8, batch_size=1, attended=0.0)
