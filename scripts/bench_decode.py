"""Times greedy decoding of a ~1B model (Llama-3.2-1B's shape, random bfloat16 weights) over a KV cache of 8K, 32K
and 128K tokens, decoding through the Pallas split-K kernel (attention_impl "pallas": `pallas_kernels.decode_attention`
over the encoded cache) beside decoding through `jax.nn.dot_product_attention` (attention_impl "xla": the whole cache
with a mask) in the same run, and one 128K-token prefill (time and peak memory), and prints JSON lines.

    python scripts/bench_decode.py [--batch 1,8] [--steps 64] [--repeats 5] [--commit HASH] > decode_model.jsonl
    python scripts/bench_decode.py --tiny --impls xla,auto --prefill_length 512   # CPU smoke check ("auto" on CPU:
                                                                                  # the kernel's jnp reference)

Decoding: for each (batch B, cached tokens N, impl) the cache (capacity N + --steps rounded up to 128 columns) holds
random keys and values at positions 0..N-1; one jitted call runs --steps greedy steps in a fori_loop (each step's
argmax is the next token, at the next position) with the cache donated, so new keys and values are written in place.
Each call restarts from N cached tokens. After a compiled warm-up call, the median of --repeats calls / steps is the
latency per token, and tokens/s = B / latency. A step reads every weight once and the cached keys and values:

    bytes per step = param bytes (all params in bfloat16, the tied embedding once) + 2 · L · B · N · Hkv · D · 2
    achieved bandwidth = bytes per step / latency per token;  fraction of peak = that / --peak_tb_s

One line per (batch, cached tokens, impl); combinations whose cache exceeds --max_kv_gib get a "skipped" line. The
first step's logits of every impl are compared with the baseline's (same cache, same token). The last line is the
summary: baseline latency / each impl's latency per (batch, cached tokens), and the prefill's result.

Prefill: one prompt of --prefill_length random tokens into an empty encoded cache (capacity + 128 columns), through
attention_impl "auto" (on a GPU the flash kernels), logits of the last token only; median of 3 calls after a warm-up.
It runs first, right after the params are made, because the device's `peak_bytes_in_use` is a peak since the process
started: measured then, it is the prefill's peak (params and cache included). An out-of-memory error is reported as an
"error" line, not raised.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp

from bench_attention import _median_ms, peak_hbm_tb_s
from longctx import positions
from longctx.infer.kv_cache import KVCache
from longctx.models import Llama, LlamaConfig, init_params

CONFIG = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, tie_embeddings=True, dtype="bfloat16", scan_layers=False)  # 3.2-1B
# Layers unrolled, as `Generator` decodes (`longctx.models.unscanned`); --scan_layers measures the scanned model.
TINY_CONFIG = dataclasses.replace(CONFIG, vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                                  num_heads=4, num_kv_heads=2)
ROPE_THETA = 500000.0
LENGTHS, TINY_LENGTHS = "8192,32768,131072", "256,512"
PREFILL_LENGTH, TINY_PREFILL_LENGTH = 131072, 512
CACHE_GRANULE = 128  # cache capacities round up to a multiple of this (the kernels' key blocks divide it)
BASELINE = "xla"
GB, GIB = 1e9, 2**30


def _bfloat16_params(model: Llama, seed: int = 0):
    """init_params' params cast to bfloat16, in one jit (no float32 copy is left on the device)."""
    def init(key):
        return jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(model, key)[0])
    return jax.jit(init)(jax.random.key(seed))


def _empty_cache(config: LlamaConfig, batch: int, capacity: int) -> KVCache:
    return KVCache.empty(num_layers=config.num_layers, batch_size=batch, max_length=capacity,
                         num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16, encoded=True)


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _filled(cache: KVCache, cached_tokens: int, key: jax.Array) -> KVCache:
    """The cache with random normal keys and values in every column (generated a layer at a time), positions 0..S-1
    and `cached_tokens` columns written."""
    def fill_layer(layer, kv):
        keys = jax.random.split(jax.random.fold_in(key, layer))
        return tuple(jax.lax.dynamic_update_index_in_dim(x, jax.random.normal(k, x.shape[1:], x.dtype), layer, 0)
                     for x, k in zip(kv, keys))
    keys, values = jax.lax.fori_loop(0, cache.keys.shape[0], fill_layer, (cache.keys, cache.values))
    columns = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), cache.positions.shape)
    return cache.replace(keys=keys, values=values, positions=columns, length=jnp.int32(cached_tokens))


def _decoder(model: Llama, steps: int):
    """jit((params, cache, length, tokens [B, 1]) → (cache, tokens after `steps` greedy steps, first step's logits
    [B, vocab])), the cache donated: decoding restarts from `length` cached columns (row b's column = position)."""
    def step(params, cache, tokens):
        logits, cache = model.apply({"params": params}, tokens, jnp.broadcast_to(cache.length, tokens.shape),
                                    cache=cache)
        return cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], logits[:, -1]

    def decode(params, cache, length, tokens):
        cache, tokens, first_logits = step(params, cache.replace(length=length), tokens)
        cache, tokens = jax.lax.fori_loop(1, steps, lambda _, carry: step(params, *carry)[:2], (cache, tokens))
        return cache, tokens, first_logits

    return jax.jit(decode, donate_argnums=1)


def _prefiller(model: Llama):
    """jit((params, cache, tokens [B, T], positions) → (cache, last logits)), the cache donated and written from
    column 0 whatever its length."""
    def prefill(params, cache, tokens, positions):
        logits, cache = model.apply({"params": params}, tokens, positions,
                                    cache=cache.replace(length=jnp.zeros((), jnp.int32)), last_logits_only=True)
        return cache, logits

    return jax.jit(prefill, donate_argnums=1)


def _time_donating(fn, cache: KVCache, repeats: int):
    """(median ms, cache, outputs) of fn(cache) → (cache, *outputs), called once to warm up and then `repeats`
    times, each call taking the cache the previous one returned (its buffers are donated)."""
    state = {"cache": cache}

    def call():
        state["cache"], *outputs = fn(state["cache"])
        state["outputs"] = outputs
        return outputs

    ms = _median_ms(call, (), repeats)
    return ms, state["cache"], state["outputs"]


def _compiled(jitted, *args):
    """(compiled, seconds to compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _error(e: Exception) -> str:
    kind = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) else type(e).__name__
    return f"{kind}: {str(e)[:500]}"


def _memory_stats() -> dict:
    return jax.devices()[0].memory_stats() or {}


def _gb(n: int | None) -> float | None:
    return None if n is None else round(n / GB, 3)


def _prefill(model: Llama, params, length: int, repeats: int, context: dict) -> dict:
    """The prefill's record: seconds, tokens/s and memory, or its error."""
    cfg = model.config
    record = {**context, "prefill": length, "impl": model.config.attention_impl, "batch": 1}
    try:
        cache = _empty_cache(cfg, 1, math.ceil(length / CACHE_GRANULE) * CACHE_GRANULE + CACHE_GRANULE)
        tokens = jax.random.randint(jax.random.key(1), (1, length), 0, cfg.vocab_size, jnp.int32)
        prompt_positions = jnp.arange(length, dtype=jnp.int32)[None]
        record["cache_gb"] = round((cache.keys.nbytes + cache.values.nbytes) / GB, 3)
        record["in_use_before_gb"] = _gb(_memory_stats().get("bytes_in_use"))
        compiled, compile_s = _compiled(_prefiller(model), params, cache, tokens, prompt_positions)
        record["compile_s"] = round(compile_s, 1)
        analysis = compiled.memory_analysis()
        if analysis is not None:
            record["compiled_temp_gb"] = round(analysis.temp_size_in_bytes / GB, 3)
        ms, cache, _ = _time_donating(lambda cache: compiled(params, cache, tokens, prompt_positions), cache, repeats)
    except Exception as e:  # out of memory above all: reported, and the decoding runs still follow
        return {**record, "error": _error(e)}
    return {**record, "seconds": round(ms / 1e3, 3), "tokens_per_s": round(length / ms * 1e3, 1),
            "peak_gb": _gb(_memory_stats().get("peak_bytes_in_use"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", help=f"cached tokens, comma-separated (default {LENGTHS}; --tiny {TINY_LENGTHS})")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=64, help="decoding steps in one timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
    parser.add_argument("--impls", default="pallas,xla",
                        help=f"attention_impl values to decode with, comma-separated ({BASELINE!r}: the baseline)")
    parser.add_argument("--prefill_length", type=int,
                        help=f"prompt tokens of the prefill, 0 to skip (default {PREFILL_LENGTH}; --tiny "
                             f"{TINY_PREFILL_LENGTH})")
    parser.add_argument("--max_kv_gib", type=float, default=40.0, help="skip (batch, length) with a larger cache")
    parser.add_argument("--peak_tb_s", type=float,
                        help="HBM bandwidth to compare with (default: the device's, H100 3.35, H200 4.8)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short lengths (CPU smoke check)")
    parser.add_argument("--scan_layers", action="store_true", help="decode with the layers scanned (stacked weights)")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    config = dataclasses.replace(TINY_CONFIG if args.tiny else CONFIG, scan_layers=args.scan_layers)
    lengths = [int(n) for n in (args.lengths or (TINY_LENGTHS if args.tiny else LENGTHS)).split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    impls = args.impls.split(",")
    prefill_length = args.prefill_length if args.prefill_length is not None else \
        TINY_PREFILL_LENGTH if args.tiny else PREFILL_LENGTH

    scheme = positions.get("rope", head_dim=config.head_dim, theta=ROPE_THETA)
    model = Llama(config, position_scheme=scheme)
    params = _bfloat16_params(model)
    param_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    context = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    peak_tb_s = peak_hbm_tb_s(jax.devices()[0], args.peak_tb_s)
    header = {**context, "commit": args.commit, "date": datetime.date.today().isoformat(),
              "command": " ".join(sys.argv), "model": dataclasses.asdict(config) | {"mask": repr(config.mask)},
              "params": sum(p.size for p in jax.tree.leaves(params)), "param_gb": round(param_bytes / GB, 3),
              "steps_per_call": args.steps, "repeats": args.repeats, "peak_tb_s": peak_tb_s}
    print(json.dumps({"header": header}), flush=True)

    prefill = None
    if prefill_length:
        prefill = _prefill(model.clone(config=dataclasses.replace(config, attention_impl="auto")), params,
                           prefill_length, 3, context)
        print(json.dumps(prefill), flush=True)

    decoders = {impl: _decoder(model.clone(config=dataclasses.replace(config, attention_impl=impl)), args.steps)
                for impl in impls}
    summary = []
    for batch in batches:
        for cached_tokens in lengths:
            shape = {"batch": batch, "cached_tokens": cached_tokens}
            capacity = math.ceil((cached_tokens + args.steps) / CACHE_GRANULE) * CACHE_GRANULE
            kv_cache_bytes = 2 * config.num_layers * batch * capacity * config.num_kv_heads * config.head_dim * 2
            if kv_cache_bytes > args.max_kv_gib * GIB:
                print(json.dumps({**context, **shape, "skipped": f"a KV cache of {kv_cache_bytes / GIB:.2f} GiB "
                                  f"exceeds --max_kv_gib={args.max_kv_gib}"}), flush=True)
                continue
            step_bytes = param_bytes + 2 * config.num_layers * batch * cached_tokens * config.num_kv_heads * \
                config.head_dim * 2
            length = jnp.int32(cached_tokens)
            tokens = jnp.zeros((batch, 1), jnp.int32)
            cache = None
            latency, first_logits = {}, {}
            for impl in impls:
                record = {**context, "impl": impl, **shape}
                try:
                    if cache is None or cache.keys.is_deleted():  # the first impl, or a failed one lost the cache
                        cache = _filled(_empty_cache(config, batch, capacity), cached_tokens, jax.random.key(2))
                    compiled, compile_s = _compiled(decoders[impl], params, cache, length, tokens)
                    ms, cache, (_, logits) = _time_donating(lambda cache: compiled(params, cache, length, tokens),
                                                            cache, args.repeats)
                except Exception as e:  # a failed measurement is reported, and the others still run
                    print(json.dumps({**record, "error": _error(e)}), flush=True)
                    continue
                ms_per_token = ms / args.steps
                latency[impl], first_logits[impl] = ms_per_token, logits
                tb_per_s = step_bytes / ms_per_token / 1e9
                print(json.dumps({**record, "ms_per_token": round(ms_per_token, 4),
                                  "tokens_per_s": round(batch / ms_per_token * 1e3, 1),
                                  "gb_per_step": round(step_bytes / GB, 4), "tb_per_s": round(tb_per_s, 4),
                                  "fraction_of_peak": peak_tb_s and round(tb_per_s / peak_tb_s, 3),
                                  "compile_s": round(compile_s, 1)}), flush=True)
            del cache
            entry = dict(shape)
            if BASELINE in latency:
                entry[f"{BASELINE}_ms_per_token"] = round(latency[BASELINE], 4)
                entry[f"speedup_over_{BASELINE}"] = {impl: round(latency[BASELINE] / ms, 3)
                                                     for impl, ms in latency.items() if impl != BASELINE}
                entry[f"first_logits_max_abs_diff_vs_{BASELINE}"] = {
                    impl: float(jnp.max(jnp.abs(logits - first_logits[BASELINE])))
                    for impl, logits in first_logits.items() if impl != BASELINE}
            summary.append(entry)
    if prefill is not None:
        prefill = {key: prefill.get(key) for key in ("prefill", "seconds", "tokens_per_s", "peak_gb", "error")
                   if key in prefill}
    print(json.dumps({"summary": {"decode": summary, "prefill": prefill}}), flush=True)


if __name__ == "__main__":
    main()
