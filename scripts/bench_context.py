"""Times context-parallel attention (`longctx.parallel.context.attention`) over every device of one host against
single-device attention on the same total sequence, forward and forward+backward, and prints JSON lines.

    python scripts/bench_context.py --tokens_per_device 32768,65536 --commit $(git rev-parse --short HEAD) \
        > context.jsonl

With N = len(jax.devices()) devices on one "sequence" mesh axis, each --tokens_per_device P gives a causal sequence
of T = N·P tokens (batch 1, bf16, 32 query heads, 8 kv heads, head dim 128 by default). For each P:

- "single": `longctx.attention.attention(impl=--impl)` on the whole T on one device (skipped with --skip_single, or
  reported with "error" when it does not fit);
- "context": every --strategies × --layouts, q/k/v permuted into the layout's token order and sharded along T.

One line per (case, pass): median milliseconds over --iters timed calls after a compiled warm-up, and TFLOP/s counted
on the allowed (query, key) pairs: T(T+1)/2 per head under the causal mask, 4·B·Hq·D flops per pair forward and 3.5×
that forward+backward (the gradient of sum(out) w.r.t. q, k, v). Context lines give TFLOP/s per device (the total
flops / N / time) and "ratio_to_single": that over the single-device TFLOP/s of the same pass at the same T. Then
one "summary" line per P: the fastest forward+backward case, every case's ratio, and "ring_target_met": whether the
best ring or ring_bidirectional zigzag ratio reaches the target of 0.90 (per-device attention TFLOP/s at least 0.90 ×
the single-device kernel on the same total sequence). Ratios compare numbers from the same run only, on one machine.

A case that fails (out of memory, a strategy that refuses the shapes) prints a line with "error" and the run goes on.
To check the script on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu and
--tokens_per_device 64 --heads 4 --kv_heads 2 --head_dim 16 --impl pallas_interpret --dtype float32 --iters 1.
"""

import argparse
import datetime
import gc
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import _median_ms  # noqa: E402

from pallas_kernels import masks  # noqa: E402

from longctx.attention import attention  # noqa: E402
from longctx.parallel import context, layout as layout_lib  # noqa: E402

AXIS = "sequence"
RING_FAMILY = ("ring", "ring_bidirectional")
RING_TARGET = 0.90
BACKWARD_FACTOR = 3.5  # forward+backward flops over forward flops
PASSES = ("fwd", "fwd_bwd")


def _list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _causal_flops(total_tokens: int, heads: int, head_dim: int) -> float:
    """Forward flops of causal attention, batch 1: 4·Hq·D per allowed (query, key) pair, T(T+1)/2 pairs per head."""
    return 4.0 * heads * head_dim * total_tokens * (total_tokens + 1) / 2


def _passes(attend):
    """{"fwd": jitted attend, "fwd_bwd": jitted gradient of sum(attend(q, k, v)) w.r.t. q, k, v}."""
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32))
    return {"fwd": jax.jit(attend), "fwd_bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2)))}


def _inputs(total_tokens: int, args, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = ((1, total_tokens, args.heads, args.head_dim), (1, total_tokens, args.kv_heads, args.head_dim),
              (1, total_tokens, args.kv_heads, args.head_dim))
    with jax.default_device(jax.devices()[0]):
        return tuple(jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes))


def _release(*arrays) -> None:
    for x in arrays:
        if isinstance(x, jax.Array) and not x.is_deleted():
            x.delete()
    jax.clear_caches()
    gc.collect()


def _rounded(x: float | None) -> float | None:
    """Four significant digits (TFLOP/s and ratios read the same on a GPU and in a CPU check of the script)."""
    return None if x is None else float(f"{x:.4g}")


def _emitter(head: dict, tail: dict):
    """emit(fields): prints one JSON line of head, fields and tail."""
    def emit(fields: dict) -> None:
        print(json.dumps({**head, **fields, **tail}), flush=True)
    return emit


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _measure(emit, fns, arrays, iters: int, flops: float, num_devices: int, baseline: dict | None) -> dict:
    """Times each pass of `fns` on `arrays`, emits its line and returns {pass: TFLOP/s per device} of those that ran."""
    speeds = {}
    for pass_name in PASSES:
        try:
            # One call more than _median_ms's warm-up: modules that the first trace imports lazily (jax's Pallas
            # interpret mode registers a config option) change jax's tracing context, so the first jitted function
            # of a run is traced and compiled again on its second call.
            jax.block_until_ready(fns[pass_name](*arrays))
            ms = _median_ms(fns[pass_name], arrays, iters)
        except Exception as e:  # out of memory or a refused request: reported, and the other cases still run
            emit({"pass": pass_name, "error": _error(e)})
            continue
        pass_flops = flops * (BACKWARD_FACTOR if pass_name == "fwd_bwd" else 1.0)
        speeds[pass_name] = pass_flops / num_devices / ms / 1e9
        single = (baseline or {}).get(pass_name)
        emit({"pass": pass_name, "ms": round(ms, 3), "tflops_per_device": _rounded(speeds[pass_name]),
              "ratio_to_single": _rounded(speeds[pass_name] / single) if single else None})
    return speeds


def _summary(tokens_per_device: int, total_tokens: int, speeds: dict, baseline: dict | None) -> dict:
    """The forward+backward comparison at one tokens_per_device: best case, every ratio, the ring target."""
    single = (baseline or {}).get("fwd_bwd")
    timed = {case: s["fwd_bwd"] for case, s in speeds.items() if "fwd_bwd" in s}
    ratios = {}
    for (strategy, layout), speed in timed.items():
        ratios.setdefault(strategy, {})[layout] = _rounded(speed / single) if single else None
    best = max(timed, key=timed.get, default=None)
    ring = [timed[s, "zigzag"] for s in RING_FAMILY if (s, "zigzag") in timed]
    ring_ratio = max(ring) / single if ring and single else None
    return {
        "kind": "summary", "pass": "fwd_bwd", "tokens_per_device": tokens_per_device, "total_tokens": total_tokens,
        "single_tflops": _rounded(single),
        "best": None if best is None else {"strategy": best[0], "layout": best[1],
                                           "tflops_per_device": _rounded(timed[best]),
                                           "ratio_to_single": _rounded(timed[best] / single) if single else None},
        "ratios": ratios, "ring_zigzag_best_ratio": _rounded(ring_ratio),
        "ring_target": RING_TARGET, "ring_target_met": None if ring_ratio is None else ring_ratio >= RING_TARGET}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens_per_device", default="32768,65536", help="tokens per device, comma-separated")
    parser.add_argument("--strategies", default=",".join(context.STRATEGIES))
    parser.add_argument("--layouts", default="zigzag", help=f"comma-separated, of {', '.join(layout_lib.LAYOUTS)}")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--impl", default="pallas", help="attention impl (pallas_interpret to check on CPU)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--skip_single", action="store_true", help="no single-device baseline (and no ratios)")
    args = parser.parse_args()
    strategies, layouts = _list(args.strategies), _list(args.layouts)
    for strategy in strategies:
        if strategy not in context.STRATEGIES:
            parser.error(f"--strategies: {strategy!r} is not one of {', '.join(context.STRATEGIES)}")
    for layout in layouts:
        if layout not in layout_lib.LAYOUTS:
            parser.error(f"--layouts: {layout!r} is not one of {', '.join(layout_lib.LAYOUTS)}")
    dtype = jnp.dtype(args.dtype)
    mask = masks.Causal()
    devices = jax.devices()
    N = len(devices)
    mesh = jax.make_mesh((N,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, AXIS, None, None))
    common = {"devices": N, "impl": args.impl, "dtype": dtype.name, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "device_kind": devices[0].device_kind, "jax": jax.__version__,
              "commit": args.commit, "date": datetime.date.today().isoformat()}

    for tokens_per_device in map(int, _list(args.tokens_per_device)):
        total = N * tokens_per_device
        flops = _causal_flops(total, args.heads, args.head_dim)
        shape = {"tokens_per_device": tokens_per_device, "total_tokens": total}

        baseline = None
        if not args.skip_single:
            emit = _emitter({"kind": "single", "strategy": None, "layout": None, **shape}, common)
            try:
                q, k, v = _inputs(total, args, dtype)
            except Exception as e:
                emit({"pass": None, "error": _error(e)})
            else:
                fns = _passes(lambda q, k, v: attention(q, k, v, mask=mask, impl=args.impl))
                baseline = _measure(emit, fns, (q, k, v), args.iters, flops, 1, None)
                del fns
                _release(q, k, v)

        speeds = {}
        for strategy in strategies:
            for layout in layouts:
                emit = _emitter({"kind": "context", "strategy": strategy, "layout": layout, **shape}, common)
                arrays = ()
                try:
                    arrays = tuple(jax.device_put(layout_lib.to_layout(x, layout, N), sharding)
                                   for x in _inputs(total, args, dtype))
                    fns = _passes(lambda q, k, v, strategy=strategy, layout=layout: context.attention(
                        q, k, v, strategy=strategy, layout=layout, mask=mask, impl=args.impl, axis=AXIS, mesh=mesh))
                except Exception as e:
                    emit({"pass": None, "error": _error(e)})
                else:
                    speeds[strategy, layout] = _measure(emit, fns, arrays, args.iters, flops, N, baseline)
                    del fns
                _release(*arrays)
        print(json.dumps({**_summary(tokens_per_device, total, speeds, baseline), **common}), flush=True)


if __name__ == "__main__":
    main()
