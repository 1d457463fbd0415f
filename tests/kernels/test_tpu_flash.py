"""The Pallas Mosaic TPU backend: interpret mode on CPU, and compiled on a TPU when one is present."""

import jax
import jax.numpy as jnp
import pytest

from flash_test_base import FlashAttentionTests


class TestTpuInterpret(FlashAttentionTests):
    backend = "tpu"
    interpret = True


@pytest.mark.skipif(jax.devices()[0].platform != "tpu", reason="needs a TPU")
class TestTpuCompiled(FlashAttentionTests):
    backend = "tpu"
    interpret = False
    low_precision_dtypes = (jnp.bfloat16,)  # unsupported_reason refuses float16 compiled: TPUs have no float16 unit
