"""Cached decoding against the full-sequence forward, for every position scheme; greedy generation against a naive
loop that re-runs the whole sequence for each token."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx import positions
from longctx.infer import KVCache
from longctx.infer.generate import Generator, empty_cache, greedy, left_padded
from longctx.models import param_structure, scanned, unscanned
from pallas_kernels import masks
from jaxprs import equations
from tiny_models import CONFIG, random_params, scheme_model

# Schemes whose tables follow the sequence length. Cached, an earlier token's hidden states (so the keys and values
# of layers past the first) stay as computed at the length of their time, while the full forward recomputes them at
# the final length; they agree exactly with one layer, whose keys and values depend on the tokens alone.
LENGTH_DEPENDENT = {name for name in positions.names()
                    if getattr(positions.scheme_class(name), "length_dependent", False)} | {"clex"}


ENCODED = [name for name in positions.names() if scheme_model(name).position_scheme.encodes_keys_once()]
# (scheme, cache, page size, attention_impl): encoded caches decode through the decoding kernel's reference on CPU
# ("auto"), the Triton kernel in interpret mode ("pallas_interpret", which also prefills through the flash kernels,
# raw caches included), or jax.nn.dot_product_attention over the cache ("xla"). A fifth entry is the layers' mask.
CACHES = ([(name, "raw", None, "xla") for name in positions.names()]
          + [(name, "encoded", None, "auto") for name in ENCODED]
          + [("rope", "encoded", None, "xla"), ("rope", "raw", 4, "xla"), ("self_extend", "raw", 4, "xla"),
             ("rope", "encoded", 4, "auto"), ("yarn", "encoded", 16, "pallas_interpret"),
             ("rope", "encoded", None, "pallas_interpret"), ("self_extend", "raw", None, "pallas_interpret"),
             ("rope", "encoded", None, "pallas_interpret", "sliding_window(20)"),
             ("rope", "raw", 16, "pallas_interpret", "sliding_window(20)"),
             ("rope", "encoded", None, "auto", "sinks_window(sinks=2, window=20)")])


def test_keys_are_encoded_once_exactly_for_fixed_tables_and_plain_attention():
    assert set(ENCODED) == {"abf", "linear", "llama3", "none", "ntk", "proportional", "rope", "yarn"}


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens, positions=None, segment_ids=None):
    """The full-sequence forward, compiled once per model and shape (equal models share it)."""
    return model.apply({"params": params}, tokens, positions, segment_ids)


def up_to(batch, stop):
    """tokens, positions, segment_ids of `batch` with the columns from `stop` on blanked as padding (token 0, position
    0, segment 0). Under the causal mask the logits of the earlier columns are those of the forward over columns
    :stop, and the length that some schemes follow, max(position) + 1, is the one reached at `stop` too; one shape
    serves every `stop`."""
    kept = np.arange(batch["tokens"].shape[1])[None] < stop
    return tuple(jnp.asarray(np.where(kept, batch[key], 0)) for key in ("tokens", "positions", "segment_ids"))


@pytest.mark.parametrize("name,cache_kind,page_size,impl,mask", [(*case, "causal")[:5] for case in CACHES])
def test_cached_decoding_equals_the_full_forward(name, cache_kind, page_size, impl, mask):
    """Rows of different prompt lengths, left-padded, prefilled in chunks and decoded a token at a time: every call's
    logits equal those of the full forward over the same padded batch up to the call's last column (schemes that
    follow the length, dynamic NTK and CLEX, see the length reached so far, as in generation), for caches of raw and
    of encoded keys, contiguous and paged. Prefill chunks of 3 and 13 columns and the decoding steps run the decoding
    kernel's path; the chunk of 32 columns the prefill path. One compiled forward serves every call (`up_to`)."""
    # The Triton kernels' smallest head dim; layers scanned, as the GPU configs run them (a pallas_call in a scanned
    # layer once failed flax's nn.scan).
    sizes = {"head_dim": 64, "scan_layers": True} if impl == "pallas_interpret" else {}
    model = scheme_model(name, num_layers=1 if name in LENGTH_DEPENDENT else CONFIG.num_layers, attention_impl=impl,
                         mask=masks.parse(mask), **sizes)
    params = random_params(model)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, CONFIG.vocab_size, n).astype(np.int32) for n in (70, 20)]
    prompt_lengths = (46, 2)
    width, total = 48, 48 + 16
    batch = left_padded([s[:n] for s, n in zip(sequences, prompt_lengths)], width, pad_id=0)
    full = {key: np.concatenate([batch[key], np.zeros((2, total - width), np.int32)], 1)
            for key in ("tokens", "positions")}
    full["segment_ids"] = (np.arange(total)[None] >= batch["starts"][:, None]).astype(np.int32)
    for row, (sequence, n) in enumerate(zip(sequences, prompt_lengths)):
        rest = sequence[n:n + total - width]
        full["tokens"][row, width:width + len(rest)] = rest
        full["positions"][row, width:] = n + np.arange(total - width)
    reference = model.clone(config=dataclasses.replace(model.config, attention_impl="xla"))
    cached = jax.jit(lambda params, cache, tokens, pos: model.apply({"params": params}, tokens, pos, cache=cache))
    cache = empty_cache(model, 2, total, starts=batch["starts"], encoded=cache_kind == "encoded", page_size=page_size)
    for start, stop in [(0, 3), (3, 16), (16, 48)] + [(t, t + 1) for t in range(width, total)]:
        columns = [jnp.asarray(full[key][:, start:stop]) for key in ("tokens", "positions")]
        logits, cache = cached(params, cache, *columns)
        expected = forward(reference, params, *up_to(full, stop))[:, start:stop]
        real = full["segment_ids"][:, start:stop] > 0
        np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(expected)[real], atol=2e-5, rtol=2e-5,
                                   err_msg=f"columns {start}:{stop}")
    assert int(cache.length) == total


def test_left_padding_does_not_change_a_row():
    model = scheme_model("rope")
    params = random_params(model)
    prompt = np.arange(1, 10, dtype=np.int32)
    alone = forward(model, params, prompt[None])
    batch = left_padded([prompt], 16, pad_id=0)
    segment_ids = (np.arange(16)[None] >= batch["starts"][:, None]).astype(np.int32)
    padded = forward(model, params, batch["tokens"], batch["positions"], segment_ids)
    np.testing.assert_allclose(padded[0, 7:], alone[0], atol=1e-5, rtol=1e-5)


def naive_greedy(model, params, prompt, max_new_tokens, stop_ids=()):
    """Greedy continuation by re-running the whole sequence for each token. The sequence grows in a buffer of a
    multiple of 32 columns (one compilation for the prompts of a test), the columns not generated yet blanked as
    padding (`up_to`)."""
    width = -(-(len(prompt) + max_new_tokens) // 32) * 32
    sequence = {"tokens": np.zeros(width, np.int32), "positions": np.arange(width, dtype=np.int32),
                "segment_ids": np.ones(width, np.int32)}
    sequence["tokens"][:len(prompt)] = prompt
    sequence = {key: value[None] for key, value in sequence.items()}
    for n in range(len(prompt), len(prompt) + max_new_tokens):
        logits = forward(model, params, *up_to(sequence, n))
        sequence["tokens"][0, n] = int(jnp.argmax(logits[0, n - 1]))
        if sequence["tokens"][0, n] in stop_ids:
            return sequence["tokens"][0, len(prompt):n + 1]
    return sequence["tokens"][0, len(prompt):len(prompt) + max_new_tokens]


@pytest.mark.parametrize("name,scan_layers", [("rope", False), ("yarn", True), ("self_extend", False)])
def test_greedy_generation_equals_rerunning_the_whole_sequence(name, scan_layers):
    """Batches of two (widths 8 and 12: two and three prefill chunks of 4) give the continuations of re-running the
    whole sequence, from one compiled prefill and one compiled decoding loop for every chunk and batch. The params
    are committed to a device, as restored ones are (the first chunk's cache once compiled apart from the rest)."""
    model = scheme_model(name, scan_layers=scan_layers)
    params = jax.device_put(random_params(model, seed=3), jax.devices()[0])
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in (5, 11, 3)]
    generator = Generator(model, params, pad_id=0, prefill_chunk=4)
    compiled = (generator._prefill._cache_size(), generator._decode._cache_size())  # jit's cache, shared in-process
    got = generator.generate_batched(prompts, max_new_tokens=6, batch_size=2)
    assert generator._prefill._cache_size() - compiled[0] <= 1 and generator._decode._cache_size() - compiled[1] <= 1
    for prompt, continuation in zip(prompts, got):
        np.testing.assert_array_equal(continuation, naive_greedy(model, params, prompt, 6))


def test_every_width_up_to_max_length_shares_one_compiled_prefill_and_decoding_loop():
    """Prompts of 60 and 121 tokens in chunks of 8 (widths 64 and 128) with 6 new tokens under max_length=127: the
    wider prompt's width plus its new tokens passes max_length, and still its cache has the other's shape."""
    model = scheme_model("rope")
    params = jax.device_put(random_params(model, seed=5), jax.devices()[0])
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in (60, 121)]
    bounded = Generator(model, params, pad_id=0, prefill_chunk=8, max_length=127)
    compiled = (bounded._prefill._cache_size(), bounded._decode._cache_size())
    got = bounded.generate_batched(prompts, max_new_tokens=6, batch_size=1)
    assert bounded._prefill._cache_size() - compiled[0] <= 1 and bounded._decode._cache_size() - compiled[1] <= 1
    unbounded = Generator(model, params, pad_id=0, prefill_chunk=8).generate_batched(prompts, max_new_tokens=6,
                                                                                     batch_size=1)
    for continuation, expected in zip(got, unbounded):
        np.testing.assert_array_equal(continuation, expected)


def test_generation_with_scanned_layers_equals_unrolled():
    """`unroll_layers=False` stacks an unrolled model's layers (`scanned`, the inverse of `unscanned`) and generates
    what the unrolled layers generate, from the same prompts."""
    model = scheme_model("self_extend")
    params = random_params(model, seed=3)
    stacked_model, stacked = scanned(model, params)
    assert stacked_model.config.scan_layers and stacked["layers"]["attn"]["q_proj"]["kernel"].shape[0] == 2
    jax.tree.map(np.testing.assert_array_equal, unscanned(stacked_model, stacked)[1], params)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in (5, 11)]
    runs = [Generator(model, params, pad_id=0, prefill_chunk=4, unroll_layers=unroll).generate_batched(
        prompts, max_new_tokens=5, batch_size=2) for unroll in (True, False)]
    for unrolled, scanned_run in zip(*runs):
        np.testing.assert_array_equal(scanned_run, unrolled)


def test_generation_stops_at_a_stop_token():
    model = scheme_model("rope")
    params = random_params(model, seed=3)
    prompt = np.arange(1, 8, dtype=np.int32)
    free = naive_greedy(model, params, prompt, 6)
    stop = int(free[2])
    got = greedy(model, params, [prompt], max_new_tokens=6, pad_id=0, stop_ids=[stop])[0]
    first = int(np.flatnonzero(free == stop)[0])
    np.testing.assert_array_equal(got, free[: first + 1])


def test_bad_requests_are_refused():
    model = scheme_model("rope")
    params = random_params(model)
    generator = Generator(model, params, pad_id=0, max_length=10)
    with pytest.raises(ValueError, match="a prompt of 8 tokens plus max_new_tokens=4 exceeds the maximum length 10"):
        generator.generate([np.arange(8, dtype=np.int32)], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generator.generate([np.arange(3, dtype=np.int32)], max_new_tokens=0)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int"):
        Generator(model, params, pad_id=0, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        KVCache.empty(num_layers=1, batch_size=1, max_length=0, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="a KV cache is for inference"):
        model.apply({"params": params}, jnp.zeros((1, 2), jnp.int32), cache=empty_cache(model, 1, 4), train=True)


def test_a_decoding_kernel_that_cannot_serve_the_step_says_why():
    """An explicit kernel raises (the Triton kernel has no head dim 16); "auto" decodes through the jnp reference."""
    for impl, raises in (("pallas_interpret", True), ("auto", False)):
        model = scheme_model("rope", attention_impl=impl)
        params = random_params(model)
        cache = empty_cache(model, 1, 32, encoded=True)
        step = lambda: model.apply({"params": params}, jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                   cache=cache)
        if raises:
            with pytest.raises(NotImplementedError, match="head dims"):
                step()
        else:
            assert step()[0].shape == (1, 1, CONFIG.vocab_size)


def score_shaped(jaxpr, T: int, S: int) -> list[str]:
    """The equations of `jaxpr` (and of the jaxprs inside it, kernels' bodies aside) that build an array with an axis
    of T queries and one of S keys."""
    found = []
    for eqn in equations(jaxpr, into_kernels=False):
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if T in shape and S in shape[shape.index(T) + 1:] + shape[:shape.index(T)]:
                found.append(f"{eqn.primitive.name} -> {shape}")
    return found


@pytest.mark.parametrize("name,cache_kind", [("rope", "encoded"), ("self_extend", "raw")])
def test_a_prefill_chunk_at_a_run_time_offset_builds_no_score_matrix(name, cache_kind):
    """A chunk of T = 128 new tokens at a traced offset over S = 320 cached columns: through the flash kernels
    (pallas_interpret) no array has a T axis and an S axis; through jax.nn.dot_product_attention ("xla", the positive
    control) the [B, Hq, T, S] scores are found."""
    T, S = 128, 320
    for impl in ("pallas_interpret", "xla"):
        model = scheme_model(name, attention_impl=impl, head_dim=64)
        params = param_structure(model)[0]
        cache = jax.eval_shape(lambda: empty_cache(model, 2, S, starts=np.array([0, 5]),
                                                   encoded=cache_kind == "encoded"))
        tokens = jax.ShapeDtypeStruct((2, T), jnp.int32)
        prefill = lambda params, cache, tokens: model.apply({"params": params}, tokens, tokens, cache=cache,
                                                            last_logits_only=True)
        found = score_shaped(jax.make_jaxpr(prefill)(params, cache, tokens).jaxpr, T, S)
        assert bool(found) == (impl == "xla"), (impl, found)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,cache,scan_layers", [("rope", "encoded", False), ("rope", "encoded", True),
                                                     ("self_extend", "raw", False)])
def test_generation_through_the_gpu_kernels_equals_rerunning_the_whole_sequence(name, cache, scan_layers):
    """The flash kernels prefill and the Triton decoding kernel decodes (impl "pallas"; a raw cache decodes through the
    flash kernels), over prompts of a few key blocks, left-padded, prefilled in chunks, the layers scanned or not;
    the naive loop runs jax.nn.dot_product_attention over the sequence."""
    model = scheme_model(name, attention_impl="pallas", head_dim=64, scan_layers=scan_layers)
    params = random_params(model, seed=3)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, CONFIG.vocab_size, n).astype(np.int32) for n in (300, 37, 190)]
    generator = Generator(model, params, pad_id=0, prefill_chunk=128, cache=cache, unroll_layers=not scan_layers)
    got = generator.generate_batched(prompts, max_new_tokens=8, batch_size=3)
    reference = model.clone(config=dataclasses.replace(model.config, attention_impl="xla"))
    for prompt, continuation in zip(prompts, got):
        np.testing.assert_array_equal(continuation, naive_greedy(reference, params, prompt, 8))
