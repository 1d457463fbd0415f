"""Times pallas_kernels.flash_attention against jax.nn.dot_product_attention (cuDNN, and XLA where it fits in memory)
and tokamax (where installed) on the same inputs, forward and forward+backward, and prints JSON lines.

    python scripts/bench_attention.py [--cases causal_16k,window1024_32k] [--backends triton,mosaic_gpu]
        [--iters 10] [--commit HASH] > bench.jsonl

One line per (case, implementation, pass): median milliseconds over --iters timed calls after a compiled warm-up,
and TFLOP/s counted on the allowed (query, key) pairs: 4·B·H·D per pair forward (so causal counts about half the dense
flops), and 3.5× that forward+backward (the backward is 2.5× the forward). Then one "summary" line per target of
issue 5 with the ratio it asks for, all from this run: pallas/cuDNN speed on dense causal, softplus/softmax speed, and
for sparse masks time / (relative block density × the same backend's dense causal time at that length), where the
relative block density is the blocks the kernel visits over the blocks dense causal visits.
Cases live in scripts/attention_cases.py.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import attention_cases  # noqa: E402

from pallas_kernels import BlockSizes, flash_attention, masks  # noqa: E402
from pallas_kernels.flash.attention import plan  # noqa: E402

INTERPRET = False
BLOCK_SIZES = None


# HBM bandwidth in TB/s by device_kind prefix (vendor data sheets, SXM parts).
HBM_TB_S = {"NVIDIA H100": 3.35, "NVIDIA H200": 4.8}


def peak_hbm_tb_s(device: jax.Device, given: float | None = None) -> float | None:
    """`given` if set, else the data-sheet HBM bandwidth of `device` (None for a device not in HBM_TB_S)."""
    if given is not None:
        return given
    return next((tb for kind, tb in HBM_TB_S.items() if device.device_kind.startswith(kind)), None)


def _median_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def segments_of(case: attention_cases.Case):
    if case.documents is None:
        return None
    ids, doc = [], 0
    while len(ids) < case.length:
        length = case.documents[doc % len(case.documents)]
        doc += 1
        ids += [doc] * length
    return jnp.asarray(np.array(ids[:case.length], np.int32)[None])


def _allowed_pairs(case: attention_cases.Case, segments) -> float:
    """Allowed (query, key) pairs per head, averaged over heads."""
    if segments is not None:
        _, counts = np.unique(np.asarray(segments[0]), return_counts=True)
        return float(np.sum(counts * (counts + 1) / 2))
    problem, _ = plan((1, case.length, case.heads, case.head_dim), (1, case.length, case.heads, case.head_dim),
                      jnp.bfloat16, mask=case.mask, has_segments=False, backend="triton")
    return float(problem.forward_layout.row_allowed.sum(-1).mean())


def _visited_blocks(case: attention_cases.Case, backend: str, segments) -> float:
    """Blocks the forward kernel computes per head (segment-skipped blocks excluded), averaged over heads."""
    problem, _ = plan((1, case.length, case.heads, case.head_dim), (1, case.length, case.heads, case.head_dim),
                      jnp.bfloat16, mask=case.mask, has_segments=segments is not None, backend=backend,
                      block_sizes=BLOCK_SIZES)
    layout = problem.forward_layout
    visited = layout.kinds != 0
    if segments is not None:
        ids = np.asarray(segments[0])
        q_blocks = ids.reshape(-1, layout.block_q)
        kv_blocks = ids.reshape(-1, layout.block_kv)
        meet = ((q_blocks.min(1)[:, None] <= kv_blocks.max(1)[None])
                & (kv_blocks.min(1)[None] <= q_blocks.max(1)[:, None]))
        visited = visited & meet[None]
    return float(visited.sum((1, 2)).mean())


def _implementations(case, backends, segments, xla_max_length):
    """name → attend(q, k, v) or the reason it is not measured."""
    found = {}
    for backend in backends:
        def attend(q, k, v, backend=backend):
            return flash_attention(q, k, v, mask=case.mask, segment_ids=segments, normalizer=case.normalizer,
                                   backend=backend, interpret=INTERPRET, block_sizes=BLOCK_SIZES)
        try:
            plan(case_shape(case), case_shape(case), jnp.bfloat16, mask=case.mask, has_segments=segments is not None,
                 normalizer=case.normalizer, backend=backend, block_sizes=BLOCK_SIZES)
            found[f"pallas_{backend}"] = attend
        except (NotImplementedError, ValueError) as e:
            found[f"pallas_{backend}"] = str(e)
    if case.normalizer != "softmax":
        return found
    if case.cudnn is not None:
        found["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **case.cudnn)
    else:
        found["cudnn"] = "cuDNN cannot express this mask (it computes only causal and sliding-window masks)"
    if case.length <= xla_max_length:
        allowed = jnp.asarray(masks.materialize(case.mask, case.length, case.length, num_heads=case.heads))[None]
        if segments is not None:
            allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
        found["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="xla")
    else:
        found["xla"] = f"XLA materialises [B, H, T, T] scores: skipped above --xla_max_length={xla_max_length}"
    try:
        import tokamax  # noqa: PLC0415
        if case.cudnn is not None:
            found["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True)
    except ImportError:
        found["tokamax"] = "tokamax is not installed"
    return found


def case_shape(case):
    return (1, case.length, case.heads, case.head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(c.name for c in attention_cases.CASES))
    parser.add_argument("--backends", default="triton", help="pallas_kernels backends to time, comma-separated")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--xla_max_length", type=int, default=8192)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--block_sizes", help="six ints: block_q,block_kv,block_q_dq,block_kv_dq,block_q_dkv,"
                        "block_kv_dkv (default: each backend's)")
    parser.add_argument("--length", type=int, help="override every case's length (a quick check of the script)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (checking the script on CPU)")
    args = parser.parse_args()
    cases = {c.name: c for c in attention_cases.CASES}
    if args.length:
        cases = {name: dataclasses.replace(c, length=args.length, documents=c.documents and tuple(
            max(128, d * args.length // c.length // 128 * 128) for d in c.documents)) for name, c in cases.items()}
    global INTERPRET, BLOCK_SIZES
    INTERPRET = args.interpret
    BLOCK_SIZES = BlockSizes(*map(int, args.block_sizes.split(","))) if args.block_sizes else None
    backends = args.backends.split(",")
    header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "commit": args.commit,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    print(json.dumps({"header": header}), flush=True)
    results = {}
    for name in args.cases.split(","):
        case = cases[name]
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, dout = (jax.random.normal(key, case_shape(case), jnp.bfloat16) for key in keys)
        segments = segments_of(case)
        flops = 4 * case.heads * case.head_dim * _allowed_pairs(case, segments)
        for impl, attend in _implementations(case, backends, segments, args.xla_max_length).items():
            if isinstance(attend, str):
                print(json.dumps({"case": name, "impl": impl, "skipped": attend}), flush=True)
                continue
            forward = jax.jit(attend)
            both = jax.jit(lambda q, k, v, dout, attend=attend: jax.vjp(attend, q, k, v)[1](dout))
            for pass_name, fn, fn_args, pass_flops in (("fwd", forward, (q, k, v), flops),
                                                       ("fwd+bwd", both, (q, k, v, dout), 3.5 * flops)):
                try:
                    ms = _median_ms(fn, fn_args, args.iters)
                except Exception as e:  # a failed measurement is reported, and the others still run
                    print(json.dumps({"case": name, "impl": impl, "pass": pass_name,
                                      "error": f"{type(e).__name__}: {str(e)[:500]}"}), flush=True)
                    continue
                results[name, impl, pass_name] = ms
                record = {"case": name, "impl": impl, "pass": pass_name, "ms": round(ms, 3),
                          "tflops": round(pass_flops / ms / 1e9, 1)}
                if impl.startswith("pallas_"):
                    record["visited_blocks"] = _visited_blocks(case, impl.removeprefix("pallas_"), segments)
                print(json.dumps(record), flush=True)
    for summary in _summaries(results, cases, backends):
        print(json.dumps({"summary": summary}), flush=True)


def _summaries(results, cases, backends):
    """The ratios issue 5 targets, from this run's results."""
    out = []
    for backend in backends:
        impl = f"pallas_{backend}"
        for length, case in ((16384, "causal_16k"), (32768, "causal_32k")):
            for pass_name, target in (("fwd", 1.0), ("fwd+bwd", 0.95)):
                if (case, impl, pass_name) in results and (case, "cudnn", pass_name) in results:
                    speed = results[case, "cudnn", pass_name] / results[case, impl, pass_name]
                    out.append({"target": f"{case} {pass_name} {impl} speed / cuDNN", "ratio": round(speed, 3),
                                "want": f">= {target}"})
        for case in ("window1024_32k", "s2_strided_32k", "documents_32k"):
            if (case, impl, "fwd+bwd") in results and ("causal_32k", impl, "fwd+bwd") in results:
                segments = segments_of(cases[case])
                density = (_visited_blocks(cases[case], backend, segments)
                           / _visited_blocks(cases["causal_32k"], backend, None))
                ratio = results[case, impl, "fwd+bwd"] / (density * results["causal_32k", impl, "fwd+bwd"])
                out.append({"target": f"{case} fwd+bwd {impl} time / (density x dense causal time)",
                            "density": round(density, 4), "ratio": round(ratio, 3), "want": "<= 1.25"})
        if ("softplus_causal_16k", impl, "fwd") in results and ("causal_16k", impl, "fwd") in results:
            for pass_name in ("fwd", "fwd+bwd"):
                if ("softplus_causal_16k", impl, pass_name) in results:
                    speed = results["causal_16k", impl, pass_name] / results["softplus_causal_16k", impl, pass_name]
                    out.append({"target": f"softplus_causal_16k {pass_name} {impl} speed / softmax",
                                "ratio": round(speed, 3), "want": ">= 0.8"})
    return out


if __name__ == "__main__":
    main()
