"""Walking a jaxpr: every equation, those of the jaxprs inside it (scan, cond, pjit, custom_vjp bodies) included."""

from collections.abc import Iterator


def equations(jaxpr, *, into_kernels: bool = True) -> Iterator:
    """The equations of `jaxpr` and, depth first, of every jaxpr its equations carry as parameters (one or a tuple of
    them, closed or open); a pallas_call's kernel body too unless `into_kernels` is False."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call" and not into_kernels:
            continue
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from equations(inner, into_kernels=into_kernels)
