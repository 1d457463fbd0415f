"""A ~1B-parameter Llama-3.2-1B-shaped model (16 layers, width 2048, 32 query / 8 kv heads of 64) trained at 32K
on a mesh: sequence-parallel ring attention (zigzag layout) over every device.

    python -m longctx.train --config configs/llama_1b_32k.py --workdir runs/llama_1b_32k
    python scripts/max_train_length.py --config configs/llama_1b_32k.py   # the longest sequence one step fits

The step's switches are the fastest measured on one H100 at 32K (docs/benchmarks.md, issue 10): matmul outputs and
the flash kernels' outputs kept for the backward (remat "dots_attention": 1.20 s a step against 1.36 s for "dots", which
was itself 4% faster than full recomputation; 22 GiB more than full at 32K with a 128K vocabulary) and the cross-entropy
taken 4,096 tokens at a time (whole logits would save 2% and cost 16 GiB). For the longest sequences,
`--config.model.remat=full` or `attention` (scripts/max_train_length.py uses full).

On one device the sequence axis is 1 and attention is local; `--config.parallel.sequence=-1
--config.parallel.data=1` splits every sequence over all devices (the default below), `--config.parallel.fsdp=...`
shards params and optimizer state. Byte vocabulary (the default tokenizer); see longctx/config.py for every field.
"""

from longctx.config import base_config


def get_config(arg=None):
    config = base_config(arg)
    config.model.update(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
                        head_dim=64, dtype="bfloat16", scan_layers=True,
                        remat="dots_attention")
    config.model.positions.theta = 500_000.0
    config.data.seq_len = 32768
    config.train.update(batch_size=1, steps=2000, warmup_steps=100, learning_rate=3e-4, log_every=10,
                        checkpoint_every=500, loss_chunk=4096)
    config.parallel.update(data=1, sequence=-1, context="ring", layout="zigzag")
    return config
