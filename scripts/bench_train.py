"""Times the training step of a ~1B Llama-style model at long context and reports its model FLOPs utilisation.

    python scripts/bench_train.py [--case seq_len=32768,batch=1,remat=dots,loss_chunk=4096 ...] [--steps 5] \
        [--profile DIR] [--commit HASH] > train.jsonl
    python scripts/bench_train.py --tiny --steps 2      # CPU check of the script: a 2-layer model, short sequences

The model is Llama-3.2-1B's shape (configs/llama_1b_32k.py: 16 layers, width 2048, 32 query / 8 kv heads of 64,
MLP 8192) with its 128,256-token vocabulary (--vocab; the byte vocabulary of the config makes the output head
vanish, which flatters no one), untied head, bfloat16 compute, float32 params and AdamW state. Each case is one
setting of the switches that decide speed and memory:

    seq_len, batch (rows per step), remat (model.remat: none | full | dots | offload | attention | dots_attention),
    impl (model.attention.impl), scan (1: layers under nn.scan), loss_chunk (train.loss_chunk; 0: whole logits),
    donate (1: params and optimizer state donated), segments (1: the attention is given segment ids, as in packed
    training; 0: none, which lets cuDNN serve impl=auto and spares the kernels the segment mask)

and runs in a process of its own, so that each has a clean peak-memory counter and an out-of-memory error ends only
its case. A case builds the real training step (`longctx.train.trainer.train_step`, on the config's mesh over every
device), compiles it, runs one step, then --steps timed steps (each waited for), on a synthetic batch of random
tokens, one document per row. Its JSON line gives the median step time, tokens/s, model TFLOP/s per device and MFU
with the formula it used (`longctx.train.flops`: 6·N·tokens plus causal attention counted at half, no remat
recompute), the compiled step's memory (XLA's analysis) and the device's peak bytes in use, the compile time and
the loss. --profile DIR writes a jax profiler trace of three further steps per case under DIR/<case>, and adds to
the line the device time per step by kind of kernel and the 15 longest kernels (scripts/device_trace.py).

XLA flags: the script leaves XLA_FLAGS as it finds them; on one GPU there is no collective to overlap, and the
flags used for a run are recorded in its line.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import runpy
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import device_trace  # noqa: E402

LLAMA_VOCAB = 128_256  # Llama 3's tokenizer
PROFILED_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    seq_len: int
    batch: int = 1
    remat: str = "none"
    impl: str = "auto"
    scan: int = 1
    loss_chunk: int = 0
    donate: int = 1
    segments: int = 1

    @classmethod
    def parse(cls, text: str) -> "Case":
        """'seq_len=32768,remat=dots,...' → Case (numbers as ints)."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise SystemExit(f"--case: {item!r} is not key=value with a key in {', '.join(fields)}")
            values[key] = int(value) if fields[key] in (int, "int") else value
        if "seq_len" not in values:
            raise SystemExit(f"--case {text!r} needs seq_len")
        return cls(**values)

    @property
    def name(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


# One H100: 8K and 32K toward the MFU targets, 128K toward the length target; each lever beside its neighbour.
DEFAULT_CASES = [
    "seq_len=8192,batch=4,remat=none,loss_chunk=2048",
    "seq_len=32768,batch=1,remat=none,loss_chunk=4096",
    "seq_len=32768,batch=1,remat=dots,loss_chunk=4096",
    "seq_len=32768,batch=1,remat=full,loss_chunk=4096",
    "seq_len=32768,batch=1,remat=dots,loss_chunk=0",
    "seq_len=131072,batch=1,remat=full,loss_chunk=4096",
]
TINY_CASES = ["seq_len=64,batch=2,remat=none,loss_chunk=0", "seq_len=64,batch=2,remat=full,loss_chunk=16,scan=0",
              "seq_len=128,batch=1,remat=dots,loss_chunk=32"]


def config_for(case: Case, tiny: bool):
    config = runpy.run_path(str(REPO / "configs/llama_1b_32k.py"))["get_config"]()
    if tiny:
        config.model.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16)
    config.model.update(remat=case.remat, scan_layers=bool(case.scan))
    config.model.attention.impl = case.impl
    config.data.seq_len = case.seq_len
    config.train.update(batch_size=case.batch, loss_chunk=case.loss_chunk, donate=bool(case.donate))
    return config


def run_case(case: Case, args) -> dict:
    """Compiles and times `case` in this process; returns its result line."""
    import flax.linen as nn
    import jax
    import numpy as np

    from longctx.config import validate
    from longctx.models import build_model
    from longctx.parallel import mesh as mesh_lib
    from longctx.train import flops
    from longctx.train.optim import make_optimizer
    from longctx.train.trainer import device_batch, init_sharded, train_step

    config = config_for(case, args.tiny)
    validate(config)
    vocab = args.vocab if not args.tiny else 512
    mesh = mesh_lib.make_mesh(config.parallel)
    model = build_model(config.model, vocab, config.data.seq_len, config.parallel)
    optimizer, _ = make_optimizer(config.train)
    device = jax.devices()[0]
    line = {"case": case.name, **dataclasses.asdict(case), "vocab": vocab, "device": device.device_kind,
            "devices": len(jax.devices()), "mesh": dict(mesh.shape), "dtype": config.model.dtype}
    params, opt_state = init_sharded(model, config, mesh, optimizer)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (case.batch, case.seq_len), dtype=np.int32)
    # One document per row. The model is given segment ids (as packed training gives them) unless segments=0.
    host = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(case.seq_len, dtype=np.int32), tokens.shape).copy()}
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, grad_accum_steps=1,
                                     loss_chunk=case.loss_chunk),
                   donate_argnums=(0, 1) if case.donate else ())
    key = jax.random.key(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
        batch = device_batch(host, config, mesh)
        if not case.segments:
            del batch["segment_ids"]
        start = time.perf_counter()
        compiled = step.lower(params, opt_state, batch, key).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        if memory is not None:
            line["compiled_gib"] = round((memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                          + memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**30, 2)
        params, opt_state, metrics = compiled(params, opt_state, batch, key)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, batch, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        if args.profile:
            trace_dir = pathlib.Path(args.profile) / case.name.replace(",", "_").replace("=", "")
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                for _ in range(PROFILED_STEPS):
                    params, opt_state, metrics = compiled(params, opt_state, batch, key)
                jax.block_until_ready(metrics)
            line["trace"] = str(trace_dir)
            kernels, calls = device_trace.kernel_calls(trace_dir)
            line["device_ms_per_step"] = round(sum(kernels.values()) / PROFILED_STEPS / 1e3, 1)
            line["ms_per_step_by_kind"] = {kind: round(us / PROFILED_STEPS / 1e3, 1)
                                           for kind, us in device_trace.by_kind(kernels).items()}
            longest = kernels.most_common(15)
            line["top_kernels_ms_per_step"] = {name[:100]: round(us / PROFILED_STEPS / 1e3, 2) for name, us in longest}
            line["top_kernels_calls_per_step"] = {name[:100]: calls[name] / PROFILED_STEPS for name, _ in longest}
    step_s = statistics.median(times)
    counted = flops.step_flops(model.config, case.seq_len, case.batch)
    peak = flops.peak_flops(device.device_kind, args.peak_tflops and args.peak_tflops * 1e12)
    stats = device.memory_stats() or {}
    line.update({
        "params": num_params, "matmul_params": flops.matmul_params(model.config), "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times], "tokens_per_s": round(case.batch * case.seq_len / step_s),
        "model_tflops_per_device": round(counted.total / step_s / len(jax.devices()) / 1e12, 1),
        "attention_share_of_flops": round(counted.attention / counted.total, 3),
        "mfu": None if peak is None else round(flops.mfu(counted.total, step_s, len(jax.devices()), peak), 4),
        "peak_tflops": None if peak is None else peak / 1e12, "formula": flops.FORMULA,
        "peak_gib": stats.get("peak_bytes_in_use") and round(stats["peak_bytes_in_use"] / 2**30, 2),
        "capacity_gib": stats.get("bytes_limit") and round(stats["bytes_limit"] / 2**30, 2),
        "compile_s": round(compile_s, 1), "loss": float(metrics["loss"]),
    })
    return line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="A case (key=value,...); repeat for several. Default: "
                        "the cases of DEFAULT_CASES.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per case (after one warm-up step).")
    parser.add_argument("--vocab", type=int, default=LLAMA_VOCAB)
    parser.add_argument("--profile", help="Write a profiler trace of 3 more steps per case under this directory.")
    parser.add_argument("--peak_tflops", type=float, help="Peak bf16 TFLOP/s of one device (default: data sheet).")
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model and short cases: checks the script.")
    parser.add_argument("--timeout_s", type=float, default=900, help="Per case; a case past it is reported failed.")
    parser.add_argument("--commit", default="")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this one case in this process
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")

    if args.one:
        print("RESULT " + json.dumps(run_case(Case.parse(args.one), args)), flush=True)
        return
    cases = [Case.parse(text) for text in (args.case or (TINY_CASES if args.tiny else DEFAULT_CASES))]
    common = {"commit": args.commit, "date": datetime.date.today().isoformat(),
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    results = []
    for case in cases:
        command = [sys.executable, __file__, "--one", case.name, "--steps", str(args.steps), "--vocab",
                   str(args.vocab)] + (["--tiny"] if args.tiny else []) + (
            ["--profile", args.profile] if args.profile else []) + (
            ["--peak_tflops", str(args.peak_tflops)] if args.peak_tflops else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                line = json.loads(found[-1][len("RESULT "):])
                # XLA's own rematerialisation (it recomputes ops when it thinks the step exceeds device memory)
                # changes what a remat policy kept; its warnings are the only trace of it.
                line["xla_rematerialization"] = [text.strip()[-300:] for text in done.stderr.splitlines()
                                                 if "rematerialization" in text.lower()][:3]
            else:
                error = (done.stderr.strip().splitlines() or ["no output"])[-1]
                line = {"case": case.name, "error": error[:500], "out_of_memory": "RESOURCE_EXHAUSTED" in done.stderr
                        or "out of memory" in done.stderr.lower()}
        except subprocess.TimeoutExpired:
            line = {"case": case.name, "error": f"timed out after {args.timeout_s} s"}
        line.update(common)
        results.append(line)
        print(json.dumps(line, ensure_ascii=False), flush=True)
    ran = [r for r in results if "mfu" in r]
    by_length = {}
    for r in ran:
        if r["mfu"] is not None and r["mfu"] > by_length.get(r["seq_len"], {}).get("mfu", -1):
            by_length[r["seq_len"]] = r
    print(json.dumps({"summary": True, "best_by_seq_len": {str(n): {"case": r["case"], "mfu": r["mfu"],
                                                                    "tokens_per_s": r["tokens_per_s"]}
                                                           for n, r in sorted(by_length.items())},
                      "longest_trained": max((r["seq_len"] for r in ran), default=None),
                      "failed": [r["case"] for r in results if "error" in r], **common}), flush=True)


if __name__ == "__main__":
    main()
