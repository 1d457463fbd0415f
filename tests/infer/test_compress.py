"""KV compression: each policy keeps exactly its budget per layer, row and kv head, and the tokens a numpy oracle
written here picks (SnapKV's votes in float64 loops); generation under a budget that holds every prompt equals
generation without compression; bad requests are refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from longctx.infer import KVCache
from longctx.infer.compress import Compression, compress
from longctx.infer.generate import Generator
from tiny_models import random_params, scheme_model

L, HKV, HQ, D = 2, 2, 4, 8
WIDTH, CAPACITY = 40, 64
PROMPTS = (40, 25, 6)  # a full row, a left-padded one, one shorter than some budgets


def prefilled_cache(page_size, seed=0):
    """An encoded cache after a prefill of PROMPTS (length WIDTH), random keys, and values whose first entries name
    (column, layer, head), plus random observation queries [L, B, 8, HQ, D]."""
    rng = np.random.default_rng(seed)
    B = len(PROMPTS)
    starts = np.asarray([WIDTH - n for n in PROMPTS], np.int32)
    keys = rng.normal(size=(L, B, WIDTH, HKV, D)) * 2.0
    values = rng.normal(size=(L, B, WIDTH, HKV, D))
    values[..., 0] = np.arange(WIDTH)[None, None, :, None]
    values[..., 1] = np.arange(L)[:, None, None, None]
    values[..., 2] = np.arange(HKV)[None, None, None, :]
    cache = KVCache.empty(num_layers=L, batch_size=B, max_length=CAPACITY, num_kv_heads=HKV, head_dim=D,
                          starts=starts, encoded=True, page_size=page_size)
    view = cache.view(WIDTH)
    k, v = cache.keys, cache.values
    for layer in range(L):
        k = view.write(k, layer, jnp.asarray(keys[layer], jnp.float32))
        v = view.write(v, layer, jnp.asarray(values[layer], jnp.float32))
    cache = cache.with_tokens(jnp.zeros((B, WIDTH), jnp.int32)).replace(keys=k, values=v)
    queries = rng.normal(size=(L, B, 8, HQ, D))
    return cache, keys, starts, queries


def sinks_window_oracle(start, budget, sinks):
    lead = min(sinks, budget)
    return set(range(start, start + lead)) | set(range(WIDTH - (budget - lead), WIDTH))


def snapkv_oracle(queries, keys, start, budget, window, pool_size):
    """The kept columns of one (layer, row, kv head): queries [w, G, D], keys [WIDTH, D], in float64 loops."""
    w = queries.shape[0]
    votes = np.zeros(WIDTH)
    for i in range(w):
        column = WIDTH - w + i
        seen = list(range(start, column + 1))
        if not seen:
            continue
        for q in queries[i]:
            logits = keys[seen] @ q / np.sqrt(D)
            weights = np.exp(logits - logits.max())
            votes[seen] += weights / weights.sum()
    kept_window = min(window, budget)
    candidates = list(range(start, WIDTH - kept_window))
    pooled = {j: max(votes[c] for c in range(j - pool_size // 2, j + pool_size // 2 + 1) if c in candidates)
              for j in candidates}
    ranked = sorted(candidates, key=lambda j: (-pooled[j], j))
    return set(ranked[:budget - kept_window]) | set(range(max(start, WIDTH - kept_window), WIDTH))


@pytest.mark.parametrize("policy,budget,fraction,page_size", [
    ("sinks_window", 10, None, None), ("sinks_window", None, 0.125, 16), ("snapkv", 12, None, None),
    ("snapkv", None, 0.3, 16)])
def test_each_policy_keeps_exactly_its_budget(policy, budget, fraction, page_size):
    compression = Compression(policy, budget=budget, fraction=fraction, sinks=3, observation_window=8, pool_size=3)
    cache, keys, starts, queries = prefilled_cache(page_size)
    compressed = compress(cache, compression, np.asarray(PROMPTS), capacity=32, queries=jnp.asarray(queries,
                                                                                                    jnp.float32))
    budgets = compression.budgets(np.asarray(PROMPTS))
    top = int(budgets.max())
    assert int(compressed.length) == top and compressed.max_length == 32
    np.testing.assert_array_equal(np.asarray(compressed.starts), top - budgets)
    view = compressed.view(0)
    for layer in range(L):
        kept_values = np.asarray(view.contiguous(compressed.values, layer))
        kept_keys = np.asarray(view.contiguous(compressed.keys, layer))
        for b, (start, k) in enumerate(zip(starts, budgets)):
            for h in range(HKV):
                slots = kept_values[b, top - k:top, h]
                columns = slots[:, 0].astype(int)
                assert len(columns) == k and np.all(np.diff(columns) > 0), "kept tokens in order, each once"
                assert np.all(slots[:, 1] == layer) and np.all(slots[:, 2] == h)
                np.testing.assert_allclose(kept_keys[b, top - k:top, h], keys[layer, b, columns, h], rtol=1e-6)
                if policy == "sinks_window":
                    expected = sinks_window_oracle(start, k, 3)
                else:
                    grouped = queries[layer, b][:, h * 2:(h + 1) * 2]
                    expected = snapkv_oracle(grouped, keys[layer, b, :, h], start, k, 8, 3)
                assert set(columns.tolist()) == expected, f"layer {layer} row {b} head {h}"


@pytest.mark.parametrize("policy,page_size", [("sinks_window", None), ("snapkv", 4)])
def test_a_budget_that_holds_every_prompt_changes_nothing(policy, page_size):
    model = scheme_model("rope", attention_impl="auto")
    params = random_params(model, seed=3)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 41, n).astype(np.int32) for n in (5, 11, 3)]
    plain = Generator(model, params, pad_id=0, page_size=page_size)
    kept = Generator(model, params, pad_id=0, page_size=page_size,
                     compression=Compression(policy, budget=11, sinks=2, observation_window=4))
    for a, b in zip(plain.generate(prompts, max_new_tokens=5), kept.generate(prompts, max_new_tokens=5)):
        np.testing.assert_array_equal(a, b)


def test_a_small_budget_decodes_over_fewer_columns():
    """A budget of 4 of a 30-token prompt: generation runs (over a cache of 128 columns rather than the prompt's
    width plus the new tokens) and differs from generation over the whole prompt only in what it attends to."""
    model = scheme_model("rope", attention_impl="auto")
    params = random_params(model, seed=3)
    prompt = np.random.default_rng(2).integers(1, 41, 30).astype(np.int32)
    out = Generator(model, params, pad_id=0, compression=Compression("snapkv", budget=4, observation_window=2,
                                                                      pool_size=1)).generate([prompt],
                                                                                             max_new_tokens=4)
    assert out[0].shape == (4,)


BAD = {
    "policy": (dict(policy="h2o", budget=4), "policy must be one of"),
    "both": (dict(policy="snapkv", budget=4, fraction=0.5), "exactly one"),
    "neither": (dict(policy="snapkv"), "exactly one"),
    "fraction": (dict(policy="snapkv", fraction=1.5), "fraction must be in"),
    "pool": (dict(policy="snapkv", budget=4, pool_size=4), "pool_size must be odd"),
    "window": (dict(policy="snapkv", budget=4, observation_window=0), "observation_window must be"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_compressions_are_refused(name):
    fields, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        Compression(**fields)


def test_compression_needs_encoded_keys_and_a_chunk_holding_the_window():
    params = random_params(scheme_model("rope"))
    with pytest.raises(ValueError, match="compression keeps encoded keys"):
        Generator(scheme_model("rope"), params, pad_id=0, cache="raw", compression=Compression("snapkv", budget=4))
    with pytest.raises(ValueError, match="compression keeps encoded keys"):
        Generator(scheme_model("dynamic"), params, pad_id=0, compression=Compression("snapkv", budget=4))
    with pytest.raises(ValueError, match="prefill_chunk=16 must hold"):
        Generator(scheme_model("rope"), params, pad_id=0, prefill_chunk=16, compression=Compression("snapkv",
                                                                                                    budget=4))
    cache = prefilled_cache(None)[0].replace(encoded=False)
    with pytest.raises(ValueError, match="needs a cache of encoded keys"):
        compress(cache, Compression("sinks_window", budget=4), np.asarray(PROMPTS), capacity=32)
    with pytest.raises(ValueError, match="prefill with observe"):
        compress(prefilled_cache(None)[0], Compression("snapkv", budget=4), np.asarray(PROMPTS), capacity=32)
