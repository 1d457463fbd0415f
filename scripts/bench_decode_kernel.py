"""Times pallas_kernels.decode_attention (split-K decoding over a KV cache; contiguous, and paged at several page
sizes) against jax.nn.dot_product_attention decoding the same step (q of length 1, key_value_seq_lengths; cuDNN where
it runs, else XLA) in the same run, and prints JSON lines.

    python scripts/bench_decode_kernel.py [--quick] [--iters 20] [--steps 20] [--commit HASH] > decode.jsonl
    python scripts/bench_decode_kernel.py --interpret --quick   # CPU smoke check: tiny shapes, Pallas interpret mode
    python scripts/bench_decode_kernel.py --shapes 1:32768:64 --num_splits 16,33,66 --block_k 64,128 --page_sizes ''
        # a sweep: one pallas line per (block_k, num_splits), the baseline once per shape

Shapes (SHAPES): a ~1B model's attention (Hq 32, Hkv 8, head dim 64 and 128, bfloat16), batch 1 and 8, 8K, 32K
and 128K cached tokens, every sequence full. One line per (shape, implementation): microseconds per decoding step,
the achieved bandwidth counted on the K and V bytes a step must read (B · L · Hkv · D · 2 · itemsize / time) and its
fraction of --peak_tbps (default: the device's; H100 SXM 3.35 TB/s, H200 4.8), and the largest difference from the
baseline's output. Then one "summary" line per shape: baseline time / each pallas time.

Timing: each implementation is jitted as a chain of --steps decoding steps in a fori_loop (each step's output is the
next step's query, so no step can be hoisted or skipped and per-call dispatch is amortised), compiled and run once,
then timed over --iters calls with block_until_ready; the median call / steps is reported.
"""

import argparse
import datetime
import functools
import json
import sys

import jax
import jax.numpy as jnp

from bench_attention import _median_ms, peak_hbm_tb_s
from pallas_kernels import decode_attention
from pallas_kernels.decode.attention import plan

# (batch, cached tokens, head dim); heads and dtype are fixed below.
SHAPES = [(batch, length, head_dim) for head_dim in (64, 128) for batch in (1, 8)
          for length in (8192, 32768, 131072)]
QUICK_SHAPES = [(1, 32768, 128), (8, 32768, 128), (8, 131072, 64)]
TINY_SHAPES = [(1, 256, 64), (2, 512, 64)]  # --interpret: the kernels in Pallas interpret mode on CPU
NUM_Q_HEADS, NUM_KV_HEADS, DTYPE = 32, 8, jnp.bfloat16
PAGE_SIZES = (64, 128, 256)


def _chained(step, steps: int):
    """jit(q, *cache → q after `steps` decoding steps, each step's output the next query)."""
    def run(q, *cache):
        return jax.lax.fori_loop(0, steps, lambda _, q: step(q, *cache), q)
    return jax.jit(run)


def _paged(k, v, page_size: int, seed: int = 0):
    """The contiguous cache as pages in a random physical order, and its block table [B, S / page_size]."""
    B, S = k.shape[:2]
    num_pages = B * S // page_size
    order = jax.random.permutation(jax.random.key(seed), num_pages)  # logical page i lives at physical order[i]
    place = jnp.argsort(order)
    k_pages = k.reshape(num_pages, page_size, *k.shape[2:])[place]
    v_pages = v.reshape(num_pages, page_size, *v.shape[2:])[place]
    return k_pages, v_pages, order.reshape(B, S // page_size).astype(jnp.int32)


def _baseline(q, k, v, lengths):
    """(name, step) of jax.nn.dot_product_attention decoding: cuDNN if it compiles this call, else XLA; and why
    cuDNN was not used."""
    def step(q, k, v, lengths, implementation):
        return jax.nn.dot_product_attention(q[:, None], k, v, key_value_seq_lengths=lengths,
                                            implementation=implementation)[:, 0]
    try:
        jax.jit(lambda *a: step(*a, "cudnn")).lower(q, k, v, lengths).compile()
        return "cudnn", lambda *a: step(*a, "cudnn"), None
    except Exception as e:  # not on a GPU, or a shape cuDNN refuses: measured with XLA instead, and said so
        return "xla", lambda *a: step(*a, "xla"), f"cudnn: {type(e).__name__}: {str(e)[:300]}"


def _pallas(q, k, v, lengths, *, options):
    return decode_attention(q, k, v, lengths, backend="triton", **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_SHAPES} and page size 128")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode on tiny shapes (CPU check)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="decoding steps chained in one timed call")
    parser.add_argument("--shapes", help="batch:cached:head_dim triples, comma-separated (default: SHAPES)")
    parser.add_argument("--block_k", default="", help="key block sizes, comma-separated (default: the backend's)")
    parser.add_argument("--num_splits", default="",
                        help="split-K chunks per sequence, comma-separated (default: the backend's)")
    parser.add_argument("--page_sizes", help="page sizes of the paged runs (with the first --block_k and "
                                             f"--num_splits), comma-separated; '' for none (default {PAGE_SIZES}; "
                                             "--quick 128)")
    parser.add_argument("--peak_tbps", type=float, help="HBM bandwidth to compare with (TB/s; default: the device's)")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    shapes = TINY_SHAPES[:1] if args.interpret and args.quick else TINY_SHAPES if args.interpret else \
        QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in shape.split(":")) for shape in args.shapes.split(",")]
    page_sizes = (64,) if args.interpret else (128,) if args.quick else PAGE_SIZES
    if args.page_sizes is not None:
        page_sizes = [int(n) for n in args.page_sizes.split(",") if n]
    block_ks = [int(n) for n in args.block_k.split(",") if n] or [None]
    splits = [int(n) for n in args.num_splits.split(",") if n] or [None]
    sweep = len(block_ks) * len(splits) > 1
    iters, steps = (1, 2) if args.interpret else (args.iters, args.steps)
    peak = peak_hbm_tb_s(jax.devices()[0], args.peak_tbps)
    header = {"peak_tb_s": peak, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": args.commit,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "heads": NUM_Q_HEADS,
              "kv_heads": NUM_KV_HEADS, "dtype": jnp.dtype(DTYPE).name, "steps_per_call": steps}
    print(json.dumps({"header": header}), flush=True)
    for B, S, D in shapes:
        shape = {"batch": B, "cached": S, "head_dim": D}
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (B, NUM_Q_HEADS, D), DTYPE)
        k, v = (jax.random.normal(key, (B, S, NUM_KV_HEADS, D), DTYPE) for key in keys[1:])
        lengths = jnp.full((B,), S, jnp.int32)
        kv_bytes = 2 * B * S * NUM_KV_HEADS * D * jnp.dtype(DTYPE).itemsize
        name, step, why = _baseline(q, k, v, lengths)
        runs = {name: (step, (k, v, lengths), {"note": why} if why else {})}
        for block_k in block_ks:
            for num_splits in splits:
                options = {"block_k": block_k, "num_splits": num_splits, "interpret": args.interpret}
                problem, _ = plan(q.shape, k.shape, DTYPE, backend="triton", **options)
                label = f"pallas_triton_bk{problem.block_k}_s{problem.num_splits}" if sweep else "pallas_triton"
                runs[label] = (functools.partial(_pallas, options=options), (k, v, lengths),
                               {"block_k": problem.block_k, "num_splits": problem.num_splits})
        options = {"block_k": block_ks[0], "num_splits": splits[0], "interpret": args.interpret}
        for page_size in page_sizes:
            k_pages, v_pages, tables = _paged(k, v, page_size)
            problem, _ = plan(q.shape, k_pages.shape, DTYPE, block_tables_shape=tables.shape, backend="triton",
                              **options)
            runs[f"pallas_triton_paged{page_size}"] = (
                lambda q, k, v, lengths, tables: decode_attention(q, k, v, lengths, block_tables=tables,
                                                                  backend="triton", **options),
                (k_pages, v_pages, lengths, tables), {"block_k": problem.block_k, "num_splits": problem.num_splits})
        expected = jax.jit(runs[name][0])(q, *runs[name][1]).astype(jnp.float32)
        times = {}
        for impl, (step, cache, extra) in runs.items():
            record = {**shape, "impl": impl, **extra}
            try:
                difference = jnp.max(jnp.abs(jax.jit(step)(q, *cache).astype(jnp.float32) - expected))
                us = 1e3 * _median_ms(_chained(step, steps), (q, *cache), iters) / steps
            except Exception as e:  # a failed measurement is reported, and the others still run
                print(json.dumps({**record, "error": f"{type(e).__name__}: {str(e)[:500]}"}), flush=True)
                continue
            times[impl] = us
            tbps = kv_bytes / us / 1e6
            print(json.dumps({**record, "us": round(us, 2), "kv_gb": round(kv_bytes / 1e9, 4),
                              "tb_per_s": round(tbps, 3), "of_peak": peak and round(tbps / peak, 3),
                              f"max_abs_diff_vs_{name}": float(difference)}), flush=True)
        ratios = {impl: round(times[name] / us, 3) for impl, us in times.items() if impl != name and name in times}
        print(json.dumps({"summary": {**shape, f"{name}_time_over_pallas_time": ratios}}), flush=True)


if __name__ == "__main__":
    main()
