"""What accelerator the tests run on, for tests that only a particular GPU can run."""

import jax


def hopper_present() -> bool:
    """Whether the default device is a CUDA GPU of compute capability 9.0 or more (Mosaic GPU's kernels compile)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0)) >= 9.0
