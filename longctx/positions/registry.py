"""Registry of position schemes by name: `get(name, **params)` and `names()`."""

import dataclasses
from typing import Any

from longctx.positions.base import PositionScheme, scheme_params

_SCHEMES: dict[str, type[PositionScheme]] = {}


def register(name: str):
    """Class decorator that registers a `PositionScheme` under `name`."""

    def decorate(cls: type[PositionScheme]) -> type[PositionScheme]:
        if name in _SCHEMES:
            raise ValueError(f"position scheme {name!r} is registered twice ({_SCHEMES[name]} and {cls})")
        _SCHEMES[name] = cls
        cls.scheme_name = name
        return cls

    return decorate


def names() -> list[str]:
    """Names of every registered scheme, sorted."""
    return sorted(_SCHEMES)


def scheme_class(name: str) -> type[PositionScheme]:
    if name not in _SCHEMES:
        raise ValueError(f"unknown position scheme {name!r}; registered schemes: {', '.join(names())}")
    return _SCHEMES[name]


def default_params(name: str) -> dict[str, Any]:
    """The parameters of scheme `name` with their defaults; a required parameter maps to None."""
    return {
        key: (None if default is dataclasses.MISSING else default)
        for key, default in scheme_params(scheme_class(name)).items()
    }


def get(name: str, *, head_dim: int, **params: Any) -> PositionScheme:
    """The scheme `name` for heads of size `head_dim`, with `params` (each must be one of the scheme's parameters)."""
    cls = scheme_class(name)
    allowed = scheme_params(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"position scheme {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(allowed) or 'no parameters'}"
        )
    missing = [k for k, default in allowed.items() if default is dataclasses.MISSING and k not in params]
    if missing:
        raise ValueError(f"position scheme {name!r} needs parameter(s) {', '.join(missing)}")
    return cls(head_dim=head_dim, **params)
