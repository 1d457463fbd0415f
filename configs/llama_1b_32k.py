"""A ~1B-parameter Llama-3.2-1B-shaped model (16 layers, width 2048, 32 query / 8 kv heads of 64) trained at 32K
with full rematerialisation, on a mesh: sequence-parallel ring attention (zigzag layout) over every device.

    python -m longctx.train --config configs/llama_1b_32k.py --workdir runs/llama_1b_32k
    python scripts/max_train_length.py --config configs/llama_1b_32k.py   # the longest sequence one step fits

On one device the sequence axis is 1 and attention is local; `--config.parallel.sequence=-1
--config.parallel.data=1` splits every sequence over all devices (the default below), `--config.parallel.fsdp=...`
shards params and optimizer state. Byte vocabulary (the default tokenizer); see longctx/config.py for every field.
"""

from longctx.config import base_config


def get_config(arg=None):
    config = base_config(arg)
    config.model.update(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                        head_dim=64, dtype="bfloat16", scan_layers=True, remat="full")
    config.model.positions.theta = 500_000.0
    config.data.seq_len = 32768
    config.train.update(batch_size=1, steps=2000, warmup_steps=100, learning_rate=3e-4, log_every=10,
                        checkpoint_every=500)
    config.parallel.update(data=1, sequence=-1, context="ring", layout="zigzag")
    return config
