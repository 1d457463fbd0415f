"""The default config: a ~0.85M-parameter model on bytes of the Python stdlib at length 256; trains on a CPU in
minutes.

    python -m longctx.train --config configs/tiny.py --workdir runs/tiny
    python -m longctx.eval --workdir runs/tiny --lengths 256,512,1024,2048
"""

from longctx.config import base_config


def get_config(arg=None):
    config = base_config(arg)
    config.model.hidden_size = 128
    config.model.intermediate_size = 384
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.head_dim = 32
    config.model.dtype = "float32"
    config.data.seq_len = 256
    config.train.steps = 300
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 30
    config.train.weight_decay = 0.01
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    return config
