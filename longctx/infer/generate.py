"""Generation through the KV cache, batched over prompts of different lengths.

A batch of prompts is left-padded to a common width W (row b's prompt in columns W − n_b .. W − 1, its positions
0..n_b − 1; the cache's `starts` mark the padding), prefilled into a cache of W + max_new_tokens columns — in chunks of
`prefill_chunk` columns when given — and then decoded one token per step for all rows at once, in one compiled loop
(`jax.lax.while_loop`) that stops when every row has produced a stop token or `max_new_tokens` tokens. Each next
token is the argmax of the logits (greedy, the default) or sampled with a temperature and top-p
(`longctx.infer.sampling`), from a key that depends only on the seed and the step.

The cache (`longctx.infer.kv_cache`) holds keys encoded (`cache="encoded"`: decoding reads them once per step
through the split-K kernel) or raw (`cache="raw"`: re-encoded at every step, exact for every position scheme);
"auto" takes encoded keys where the scheme `encodes_keys_once`. `page_size` pages it, with pages only for the
columns each row uses.
"""

from collections.abc import Callable, Sequence
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from longctx.infer.compress import Compression, compress, observed_queries
from longctx.infer.kv_cache import KVCache
from longctx.infer.sampling import Sampling, next_tokens
from longctx.models import Llama, scanned, unscanned

logger = logging.getLogger("longctx.infer")
WIDTH_GRANULE = 64  # prompt widths round up to a multiple of this (or of the prefill chunk): fewer compilations
CACHE_GRANULE = 128  # cache lengths round up to a multiple of this (and of the page size): key blocks divide it
CACHE_KINDS = ("auto", "encoded", "raw")


def cache_encodes_keys(model: Llama, kind: str) -> bool:
    """Whether the cache for `model` holds encoded keys, for cache kind "auto", "encoded" or "raw"."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache must be one of {', '.join(CACHE_KINDS)}, got {kind!r}")
    scheme = model.position_scheme
    if kind == "encoded" and not scheme.encodes_keys_once():
        raise ValueError(f"cache='encoded' needs a position scheme whose keys are encoded once; "
                         f"{type(scheme).__name__} re-encodes them at every step: use cache='raw' or 'auto'")
    encoded = kind == "encoded" or (kind == "auto" and scheme.encodes_keys_once())
    if kind == "auto":
        logger.info("cache='auto': %s keys for %s", "encoded" if encoded else "raw", type(scheme).__name__)
    return encoded


def empty_cache(model: Llama, batch_size: int, max_length: int, *, starts=None, encoded: bool = False,
                page_size: int | None = None) -> KVCache:
    cfg = model.config
    return KVCache.empty(num_layers=cfg.num_layers, batch_size=batch_size, max_length=max_length,
                         num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=cfg.compute_dtype,
                         starts=starts, encoded=encoded, page_size=page_size)


def cache_length(columns: int, page_size: int | None = None) -> int:
    """`columns` rounded up to the granule of cache lengths (and the page size)."""
    granule = math.lcm(CACHE_GRANULE, page_size or 1)
    return math.ceil(columns / granule) * granule


def cache_capacity(max_length: int, prefill_chunk: int | None, page_size: int | None = None) -> int:
    """The columns of every cache of a Generator with `max_length`: a prompt of n tokens is prefilled at its width,
    n rounded up to the chunk (`prefill_chunk`, else WIDTH_GRANULE), so n + new tokens <= max_length needs up to
    max_length + chunk - 1 columns; every batch then has one cache shape, whatever its widths and new tokens."""
    return cache_length(max_length + (prefill_chunk or WIDTH_GRANULE) - 1, page_size)


def check_generation(model: Llama, abstract_params, *, batch_size: int, max_length: int,
                     prefill_chunk: int | None = None, cache: str = "auto", page_size: int | None = None) -> None:
    """Traces (no compute) what `Generator` runs: one prefill chunk into a cache for `max_length` and one decoding
    step after it, so that a request no attention implementation can honour raises ValueError (naming
    `model.attention.impl`) before any work. `abstract_params`: `longctx.models.param_structure(model)[0]`."""
    encoded = cache_encodes_keys(model, cache)
    columns = cache_capacity(max_length, prefill_chunk, page_size)
    chunk = min(prefill_chunk or max_length, columns - 1)

    def prefill_and_step(params):
        kv = empty_cache(model, batch_size, columns, encoded=encoded, page_size=page_size)
        tokens = jnp.zeros((batch_size, chunk), jnp.int32)
        _, kv = model.apply({"params": params}, tokens, tokens, cache=kv, last_logits_only=True)
        return model.apply({"params": params}, tokens[:, :1], tokens[:, :1] + chunk, cache=kv)

    try:
        jax.eval_shape(prefill_and_step, abstract_params)
    except NotImplementedError as e:
        raise ValueError(f"model.attention.impl={model.config.attention_impl!r}: {e}") from None


def cache_placement(params) -> jax.sharding.Sharding | None:
    """Where a cache goes for `params`: replicated on their mesh when they carry one (restored params do), else on
    their one device; None for params spread over devices without a mesh."""
    leaves = jax.tree.leaves(params)
    if leaves and isinstance(leaves[0].sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(leaves[0].sharding.mesh, jax.sharding.PartitionSpec())
    devices = {device for leaf in leaves for device in leaf.devices()}
    return jax.sharding.SingleDeviceSharding(devices.pop()) if len(devices) == 1 else None


def left_padded(prompts: Sequence[np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens, positions [len(prompts), width] int32 and starts [len(prompts)]: each prompt right-aligned from
    column `starts[b]`, positions 0..n-1 on its tokens (0 on the padding before them)."""
    batch = {key: np.zeros((len(prompts), width), np.int32) for key in ("tokens", "positions")}
    batch["tokens"][:] = pad_id
    batch["starts"] = np.asarray([width - len(prompt) for prompt in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        batch["tokens"][row, width - n:] = prompt
        batch["positions"][row, width - n:] = np.arange(n)
    return batch


def _prefill(model, params, cache, tokens, positions, observe=0):
    """(last logits [B, vocab], cache, the encoded queries of the last `observe` tokens [L, B, observe, Hq, D] or
    None)."""
    (logits, cache), sown = model.apply({"params": params}, tokens, positions, cache=cache, last_logits_only=True,
                                        observe=observe, mutable="intermediates")
    queries = observed_queries(sown["intermediates"], model.config.num_layers) if observe else None
    return logits[:, -1], cache, queries


def _decode(model, params, cache, logits, next_positions, rng, stop_ids, max_new_tokens, sampling):
    """Decoding steps from the prefill's last logits: [B, max_new_tokens] int32 generated ids (-1 after a row has
    stopped). Step t samples with `fold_in(rng, t)`."""
    batch = logits.shape[0]
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(state):
        step, _, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, positions, out, done = state
        token = next_tokens(logits, jax.random.fold_in(rng, step), sampling)
        token = jnp.where(done, -1, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        logits, cache = model.apply({"params": params}, jnp.maximum(token, 0)[:, None], positions[:, None],
                                    cache=cache)
        return step + 1, cache, logits[:, -1], positions + 1, out, done

    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    state = (jnp.int32(0), cache, logits, next_positions, out, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, state)[4]


# One jit for every Generator: their compilations are one cache (`_cache_size()` counts them).
compiled_prefill = jax.jit(_prefill, static_argnums=(0, 5), donate_argnums=2)
compiled_decode = jax.jit(_decode, static_argnums=(0, 6, 7, 8))


class Generator:
    """Generation for one model and its params, compiled once per (batch size, prompt width, new tokens); with
    `prefill_chunk` and `max_length`, once per (batch size, new tokens): every cache then has room for `max_length`
    columns (`cache_capacity`), so prompts of every width share one compiled prefill (of a chunk) and one decoding
    loop. (A prefill over a longer cache costs no more: it visits only the written columns' blocks, and decoding reads
    each row's written columns.)

    `sampling` (default greedy) picks each token; `seed` seeds the sampling of every `generate` call alike.
    `cache` ("auto", "encoded", "raw") and `page_size` choose the KV cache (module docstring); `compression`
    (`longctx.infer.compress`, encoded keys only) keeps a budget of each prompt's tokens after the prefill.
    `unroll_layers` (default): the layers run unrolled (`longctx.models.unscanned`; a scanned model's params are
    copied), so a decoding step reads each layer's weights in place, as decoding at the speed of memory needs; False
    runs them under `nn.scan` (`longctx.models.scanned`; an unrolled model's params are copied), which compiles in
    about a third of the time and decodes each step slower (each layer's weights are sliced out of the stack): the
    better trade where compilation outweighs decoding, as in evaluation.
    """

    def __init__(self, model: Llama, params, *, pad_id: int, prefill_chunk: int | None = None,
                 max_length: int | None = None, sampling: Sampling = Sampling(), seed: int = 0, cache: str = "auto",
                 page_size: int | None = None, compression: Compression | None = None, unroll_layers: bool = True):
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"page_size must be a positive int or None, got {page_size!r}")
        self.model, self.params = (unscanned if unroll_layers else scanned)(model, params)
        self.pad_id = pad_id
        self.encoded, self.page_size = cache_encodes_keys(model, cache), page_size
        if compression is not None and not self.encoded:
            raise ValueError(f"compression keeps encoded keys: it needs cache='encoded' (or 'auto') and a position "
                             f"scheme that encodes keys once, not {type(model.position_scheme).__name__} with "
                             f"cache={cache!r}")
        if compression is not None and prefill_chunk is not None and prefill_chunk < compression.observes:
            raise ValueError(f"prefill_chunk={prefill_chunk} must hold snapkv's observation_window="
                             f"{compression.observes} (the last chunk's queries vote)")
        self.compression = compression
        self.prefill_chunk, self.max_length = prefill_chunk, max_length
        self.sampling, self.rng = sampling, jax.random.key(seed)
        self._prefill, self._decode = compiled_prefill, compiled_decode
        self._placement = cache_placement(self.params)

    def generate(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
                 stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
        """Each prompt's continuation (int32, at most `max_new_tokens` ids, cut after the first stop id) for
        one batch of prompts (1-D int arrays, each at least one token)."""
        if not prompts:
            return []
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        logits, cache = self.prefill(prompts, room=max_new_tokens)
        next_positions = jnp.asarray([len(p) for p in prompts], jnp.int32)
        stops = tuple(int(s) for s in stop_ids) or (-2,)
        out = np.asarray(self._decode(self.model, self.params, cache, logits, next_positions, self.rng, stops,
                                      max_new_tokens, self.sampling))
        results = []
        for row in out:
            row = row[row >= 0]
            stop_at = np.flatnonzero(np.isin(row, stops))
            results.append(row[: stop_at[0] + 1] if len(stop_at) else row)
        return results

    def prefill(self, prompts: Sequence[np.ndarray], *, room: int) -> tuple[jax.Array, KVCache]:
        """The last logits [B, vocab] of a batch of prompts, left-padded and prefilled in chunks, and the cache
        holding them with room for `room` more columns (compressed after the prefill under `compression`)."""
        if min(len(p) for p in prompts) < 1:
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if self.max_length is not None and longest + room > self.max_length:
            raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={room} exceeds the "
                             f"maximum length {self.max_length}")
        chunk = self.prefill_chunk or math.ceil(longest / WIDTH_GRANULE) * WIDTH_GRANULE
        width = math.ceil(longest / chunk) * chunk
        batch = left_padded(prompts, width, self.pad_id)
        capacity = width + room if self.max_length is None else cache_capacity(self.max_length, self.prefill_chunk,
                                                                               self.page_size)
        cache = self.empty_cache(batch["starts"], capacity)
        observe = 0 if self.compression is None else min(self.compression.observes, width)
        for start in range(0, width, chunk):
            columns = slice(start, start + chunk)
            logits, cache, queries = self._prefill(
                self.model, self.params, cache, jnp.asarray(batch["tokens"][:, columns]),
                jnp.asarray(batch["positions"][:, columns]), observe if start + chunk == width else 0)
        if self.compression is not None:
            budgets = self.compression.budgets(width - batch["starts"])
            cache = compress(cache, self.compression, width - batch["starts"], queries=queries,
                             capacity=self.cache_length(int(budgets.max()) + room))
        return logits, cache

    def empty_cache(self, starts: np.ndarray, max_length: int) -> KVCache:
        """The cache of a batch whose rows start at `starts`, with room for at least `max_length` columns, placed as
        the prefill returns it (`cache_placement`), so the first chunk's call and the later ones share one compiled
        program (jit keys on the arguments' placement)."""
        cache = empty_cache(self.model, len(starts), self.cache_length(max_length), starts=starts,
                            encoded=self.encoded, page_size=self.page_size)
        return cache if self._placement is None else jax.device_put(cache, self._placement)

    def cache_length(self, columns: int) -> int:
        return cache_length(columns, self.page_size)

    def generate_batched(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int, batch_size: int,
                         stop_ids: Sequence[int] = (), on_batch: Callable[[int, int], None] | None = None
                         ) -> list[np.ndarray]:
        """`generate` over any number of prompts in batches of `batch_size` (prompts of similar length batched
        together, the last batch filled up with repeats of its last prompt, so every batch has one compiled shape);
        returned in the order of `prompts`. `on_batch(prompts, tokens)` hears of each batch done: its prompts (the
        repeats left out) and their prompt and generated tokens (a progress bar's count and rate)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[np.ndarray | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = [prompts[i] for i in rows]
            batch += [batch[-1]] * (batch_size - len(batch))
            continuations = self.generate(batch, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
            for row, continuation in zip(rows, continuations):
                results[row] = continuation
            if on_batch is not None:
                on_batch(len(rows), sum(len(prompts[row]) + len(results[row]) for row in rows))
        return results


def greedy(model: Llama, params, prompts: Sequence[np.ndarray], *, max_new_tokens: int, pad_id: int,
           stop_ids: Sequence[int] = (), batch_size: int = 8, prefill_chunk: int | None = None, cache: str = "auto",
           page_size: int | None = None) -> list[np.ndarray]:
    """Greedy continuations of `prompts` (`Generator.generate_batched` for one model and its params)."""
    generator = Generator(model, params, pad_id=pad_id, prefill_chunk=prefill_chunk, cache=cache, page_size=page_size)
    return generator.generate_batched(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                      stop_ids=stop_ids)
