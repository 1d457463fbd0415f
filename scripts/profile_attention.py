"""Where the time of one attention case goes, kernel by kernel, on the GPU: runs forward+backward under the jax
profiler and prints, as JSON lines, the device time per call of every kernel (pallas kernels by their names, cuDNN's
by theirs).

    python scripts/profile_attention.py --case causal_16k --impls mosaic_gpu,cudnn [--iters 5]

Cases are those of scripts/attention_cases.py; an impl is a pallas_kernels backend name or "cudnn".
"""

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import attention_cases  # noqa: E402
import device_trace  # noqa: E402
from bench_attention import segments_of  # noqa: E402

from pallas_kernels import flash_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="causal_16k")
    parser.add_argument("--impls", default="mosaic_gpu,cudnn")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    case = {c.name: c for c in attention_cases.CASES}[args.case]
    shape = (1, case.length, case.heads, case.head_dim)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 4))
    segment_ids = segments_of(case)
    for impl in args.impls.split(","):
        if impl == "cudnn":
            def attend(q, k, v):
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **case.cudnn)
        else:
            def attend(q, k, v, backend=impl):
                return flash_attention(q, k, v, mask=case.mask, segment_ids=segment_ids, normalizer=case.normalizer,
                                       backend=backend)
        step = jax.jit(lambda q, k, v, dout, attend=attend: jax.vjp(attend, q, k, v)[1](dout))
        jax.block_until_ready(step(q, k, v, dout))
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(args.iters):
                    jax.block_until_ready(step(q, k, v, dout))
            totals = device_trace.kernel_times(pathlib.Path(trace_dir))
        for name, microseconds in totals.most_common(8):
            print(json.dumps({"case": case.name, "impl": impl, "kernel": name[:120],
                              "ms_per_call": round(microseconds / args.iters / 1e3, 3)}), flush=True)


if __name__ == "__main__":
    main()
