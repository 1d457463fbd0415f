"""Position schemes: how a model is told where its tokens are, and how that is stretched past the training length.

`get(name, head_dim=..., **params)` builds a registered scheme; `names()` lists them. See `base.py` for the interface.
"""

from longctx.positions import nope, rope  # noqa: F401  (registers the schemes)
from longctx.positions.base import AttendFn, PositionEncoding, PositionScheme
from longctx.positions.registry import default_params, get, names, register, scheme_class

__all__ = [
    "AttendFn",
    "PositionEncoding",
    "PositionScheme",
    "default_params",
    "get",
    "names",
    "register",
    "scheme_class",
]
