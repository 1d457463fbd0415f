"""Device time of each flash kernel (forward, dQ, dK/dV) for several tile sizes at one attention shape, on the GPU.

    python scripts/sweep_tiles.py --length 32768 --heads 32 --kv_heads 8 --head_dim 64 \
        --tiles fwd=128x128,dq=128x64,dkv=64x128 --tiles fwd=128x64,dq=128x128,dkv=128x128

Each kernel depends only on its own pair of sizes (queries × keys), so one --tiles entry times three independent
choices; a kernel left out of an entry takes the backend's default. Causal mask, bfloat16, batch 1, and segment ids of
one document (as a packed training batch of whole rows gives them; --no_segments drops them). Every entry's outputs and
gradients are compared with the first entry's (`max_diff`): a tile size must not change the result beyond rounding.
JSON lines out: milliseconds per call of each kernel, from a jax profiler trace of --iters calls.
"""

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import device_trace  # noqa: E402

from pallas_kernels import BlockSizes, flash_attention, masks  # noqa: E402

KERNELS = {"fwd": ("block_q", "block_kv"), "dq": ("block_q_dq", "block_kv_dq"), "dkv": ("block_q_dkv", "block_kv_dkv")}


def parse_tiles(text: str) -> BlockSizes:
    """'fwd=128x128,dkv=128x128' → BlockSizes (kernels left out: None, the backend's default)."""
    sizes = {}
    for item in text.split(","):
        kernel, _, pair = item.partition("=")
        if kernel not in KERNELS or pair.count("x") != 1:
            raise SystemExit(f"--tiles: {item!r} is not <kernel>=<queries>x<keys>, kernel one of {', '.join(KERNELS)}")
        sizes.update(zip(KERNELS[kernel], map(int, pair.split("x"))))
    return BlockSizes(**sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--backend", default="mosaic_gpu")
    parser.add_argument("--no_segments", action="store_true")
    parser.add_argument("--tiles", action="append", required=True, help="fwd=QxK,dq=QxK,dkv=QxK; repeat for several.")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    q, dout = (jax.random.normal(key, (1, args.length, args.heads, args.head_dim), jnp.bfloat16) for key in keys[:2])
    k, v = (jax.random.normal(key, (1, args.length, args.kv_heads, args.head_dim), jnp.bfloat16) for key in keys[2:])
    segment_ids = None if args.no_segments else jnp.ones((1, args.length), jnp.int32)
    first = None
    for text in args.tiles:
        sizes = parse_tiles(text)

        def attend(q, k, v, sizes=sizes):
            return flash_attention(q, k, v, mask=masks.Causal(), segment_ids=segment_ids, backend=args.backend,
                                   block_sizes=sizes)
        step = jax.jit(lambda q, k, v, dout, attend=attend: (attend(q, k, v), *jax.vjp(attend, q, k, v)[1](dout)))
        line = {"tiles": text, "length": args.length, "heads": args.heads, "kv_heads": args.kv_heads,
                "head_dim": args.head_dim, "segments": segment_ids is not None, "device": jax.devices()[0].device_kind}
        try:
            results = jax.block_until_ready(step(q, k, v, dout))
        except (ValueError, NotImplementedError) as error:  # a size the backend refuses: say so, go on
            print(json.dumps({**line, "error": str(error)}), flush=True)
            continue
        first = first or results
        line["max_diff"] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                               for a, b in zip(results, first))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for _ in range(args.iters):
                    jax.block_until_ready(step(q, k, v, dout))
            times = device_trace.kernel_times(pathlib.Path(trace_dir))
        line["ms_per_call"] = {name[:60]: round(us / args.iters / 1e3, 2) for name, us in times.most_common()
                               if "flash" in name}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
