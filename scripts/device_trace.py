"""Device time per GPU kernel from a jax profiler trace, and the same grouped into what the kernels do.

`kernel_times` reads the perfetto trace that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes and totals
the duration of every event on the GPU's device rows by kernel name; `by_kind` sums those totals into attention
(the Pallas flash kernels, by kernel, and cuDNN's), matmuls (cuBLAS / cuBLASLt / CUTLASS / XLA's Triton GEMM
fusions), copies and memsets, and the rest (XLA's elementwise and reduction fusions).
"""

import collections
import gzip
import json
import pathlib

# Substrings of kernel names, checked in order; the first that matches names the kind.
KINDS = (
    ("attention forward", ("flash_forward",)),
    ("attention backward dQ", ("flash_backward_dq",)),
    ("attention backward dK/dV", ("flash_backward_dkdv",)),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash_fprop", "flash_bprop")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
    ("copy / memset", ("memcpy", "memset", "copy")),
)
OTHER = "other XLA kernels (elementwise, reductions, optimizer)"


def kernel_times(trace_dir: pathlib.Path) -> collections.Counter:
    """Total microseconds per event name on the GPU device rows of the trace under `trace_dir`."""
    return kernel_calls(trace_dir)[0]


def kernel_calls(trace_dir: pathlib.Path) -> tuple[collections.Counter, collections.Counter]:
    """(total microseconds, number of calls) per event name on the GPU device rows of the trace under `trace_dir`."""
    (path,) = pathlib.Path(trace_dir).rglob("*.trace.json.gz")
    events = json.loads(gzip.open(path).read())["traceEvents"]
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    totals, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("pid") in device_pids:
            totals[event["name"]] += event.get("dur", 0.0)
            calls[event["name"]] += 1
    return totals, calls


def kind_of(kernel: str) -> str:
    lowered = kernel.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return OTHER


def by_kind(totals: collections.Counter) -> dict[str, float]:
    """Microseconds per kind of kernel, largest first."""
    kinds = collections.Counter()
    for kernel, microseconds in totals.items():
        kinds[kind_of(kernel)] += microseconds
    return dict(kinds.most_common())
