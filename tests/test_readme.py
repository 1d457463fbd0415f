"""The README's tables name exactly what the code registers: every position scheme, mask, kernel backend and
context-parallel strategy, none missing and none stale."""

import inspect
import pathlib
import re

from longctx import positions
from longctx.parallel import context
from pallas_kernels import masks
from pallas_kernels.flash import attention

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def first_column(after: str) -> list[str]:
    """The backticked names in the first column of the first table after the line starting with `after`."""
    lines = README[README.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    names = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names.append(re.match(r"\|\s*`([^`]+)`", line).group(1))
    return names


def test_the_position_table_lists_every_registered_scheme():
    assert sorted(first_column("## Position schemes")) == sorted(positions.names())


def test_the_mask_table_lists_every_mask():
    public = [name for name, cls in vars(masks).items()
              if inspect.isclass(cls) and issubclass(cls, masks.Mask) and cls is not masks.Mask
              and not name.startswith("_")]
    assert sorted(first_column("Masks (`pallas_kernels.masks`")) == sorted(public)


def test_the_kernel_table_lists_every_backend_and_strategy():
    listed = first_column("Kernels (`pallas_kernels`) and context parallelism")
    assert sorted(listed) == sorted([*attention.BACKEND_NAMES, "decode_attention", *context.STRATEGIES])
