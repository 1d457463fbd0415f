"""The base config: a ~76M-parameter Llama-style model (byte vocabulary) trained at 4K on one GPU.

    python -m longctx.train --config configs/base.py --workdir runs/base
    python -m longctx.train --config configs/base.py:positions=none --workdir runs/base_nope

Every field is documented in longctx/config.py.
"""

from longctx.config import base_config


def get_config(arg=None):
    return base_config(arg)
