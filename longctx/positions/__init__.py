"""Position schemes: how a model is told where its tokens are, and how that is stretched past the training length.

`get(name, head_dim=..., **params)` builds a registered scheme; `names()` lists them; `from_hf_config(config)` reads
an HF transformers config. See `base.py` for the interface.
"""

# Importing a scheme module registers its schemes.
from longctx.positions import (  # noqa: F401
    alibi, clex, entropy, lm_infinite, nope, rope, rope_scaling, self_extend, softplus)
from longctx.positions.base import AttendFn, PositionEncoding, PositionScheme
from longctx.positions.hf import from_hf_config, hf_rope_fields
from longctx.positions.registry import default_params, get, names, register, scheme_class
from longctx.positions.rope_scaling import TRAIN_LENGTH_FIELD

__all__ = [
    "AttendFn",
    "PositionEncoding",
    "PositionScheme",
    "TRAIN_LENGTH_FIELD",
    "default_params",
    "from_hf_config",
    "get",
    "hf_rope_fields",
    "names",
    "register",
    "scheme_class",
]
