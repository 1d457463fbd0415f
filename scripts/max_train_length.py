"""The longest sequence one training step of a config fits on this machine's devices, on the config's mesh.

    python scripts/max_train_length.py --config configs/llama_1b_32k.py [--lengths 32768,65536,...] \
        [--commit HASH] > max_length.jsonl

For each length (ascending) it compiles the real training step (forward, backward with --remat, AdamW
update; params and optimizer state sharded as the trainer shards them) and reads XLA's memory analysis: arguments +
temporaries + outputs − donated buffers, against the device's memory. The longest length that fits is then run for
real, once, timed, on a synthetic batch of one document per row, so the claim is a step that ran — unless its
estimated time (at --assumed_tflops per device) exceeds what is left of --time_budget_s, when the next shorter one
runs and the "result" line reports both. One
JSON line per length, then a "result" line with the longest length that trained, its step time, tokens/s and
model TFLOP/s per device (6·N·tokens plus causal attention 6·L·T²·H·D, per second per device).
"""

import argparse
import datetime
import json
import runpy
import time

import flax.linen as nn
import jax
import numpy as np

from longctx.models import build_model
from longctx.parallel import mesh as mesh_lib
from longctx.train.optim import make_optimizer
from longctx.train.trainer import device_batch, init_sharded, train_step


def _batch(config, length):
    tokens = np.random.default_rng(0).integers(0, 256, (config.train.batch_size, length), dtype=np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}


def _flops(config, num_params, length):
    m = config.model
    dense = 6 * num_params * length
    attention = 6 * m.num_layers * length * length * m.num_heads * m.head_dim  # causal: half of 12·L·T²·H·D
    return config.train.batch_size * (dense + attention)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/llama_1b_32k.py")
    parser.add_argument("--lengths", default="32768,65536,131072,262144,393216,524288,786432,1048576")
    parser.add_argument("--commit", default="")
    parser.add_argument("--remat", default="full", help="model.remat for the step (default: full, the least memory; "
                        "'config' keeps the config's).")
    parser.add_argument("--time_budget_s", type=float, default=1e9)
    parser.add_argument("--assumed_tflops", type=float, default=250.0)
    args = parser.parse_args()
    config = runpy.run_path(args.config)["get_config"]()
    if args.remat != "config":
        config.model.remat = args.remat
    mesh = mesh_lib.make_mesh(config.parallel)
    device = jax.devices()[0]
    capacity = device.memory_stats()["bytes_limit"] if device.memory_stats() else None
    common = {"device_kind": device.device_kind, "devices": len(jax.devices()), "mesh": dict(mesh.shape),
              "commit": args.commit, "date": datetime.date.today().isoformat(), "jax": jax.__version__}
    model = build_model(config.model, 259, config.data.seq_len, config.parallel)
    optimizer, _ = make_optimizer(config.train)
    params, opt_state = init_sharded(model, config, mesh, optimizer)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    step = jax.jit(lambda p, o, b: train_step(p, o, b, jax.random.key(0), model=model, optimizer=optimizer,
                                              grad_accum_steps=1), donate_argnums=(0, 1))
    fitting, started = [], time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
        for length in (int(x) for x in args.lengths.split(",")):
            config.unlock()
            config.data.seq_len = length
            batch = device_batch(_batch(config, length), config, mesh)
            record = {"kind": "length", "seq_len": length, **common}
            try:
                start = time.perf_counter()
                compiled = step.lower(params, opt_state, batch).compile()
                memory = compiled.memory_analysis()
                peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes)
                record.update(compile_s=round(time.perf_counter() - start, 1), peak_gib=round(peak / 2**30, 2),
                              capacity_gib=capacity and round(capacity / 2**30, 2),
                              fits=capacity is None or peak <= capacity)
            except Exception as e:  # noqa: BLE001 (XLA reports out-of-memory at compile time as several types)
                record.update(fits=False, error=str(e)[:300])
            print(json.dumps(record), flush=True)
            if not record["fits"]:
                break
            fitting.append((length, compiled, batch))
        longest_fitting = fitting[-1][0] if fitting else None
        for length, compiled, batch in reversed(fitting):
            estimate = _flops(config, num_params, length) / len(jax.devices()) / (args.assumed_tflops * 1e12)
            if estimate > args.time_budget_s - (time.perf_counter() - started):
                continue
            try:
                start = time.perf_counter()
                params, opt_state, metrics = compiled(params, opt_state, batch)
                loss = float(metrics["loss"])
                seconds = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"kind": "run_failed", "seq_len": length, "error": str(e)[:300], **common}),
                      flush=True)
                continue
            tokens = config.train.batch_size * length
            print(json.dumps({"kind": "result", "longest_trained_seq_len": length,
                              "longest_fitting_seq_len": longest_fitting, "step_s": round(seconds, 3),
                              "loss": loss, "tokens_per_s": round(tokens / seconds),
                              "model_tflops_per_device": round(_flops(config, num_params, length) / seconds
                                                               / len(jax.devices()) / 1e12, 1),
                              "params": num_params, "remat": config.model.remat, **common}), flush=True)
            break


if __name__ == "__main__":
    main()
