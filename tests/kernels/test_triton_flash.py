"""The Pallas Triton backend: interpret mode on CPU, and compiled on a CUDA GPU when one is present."""

import jax
import pytest

from flash_test_base import FlashAttentionTests


class TestTritonInterpret(FlashAttentionTests):
    backend = "triton"
    interpret = True
    supports_reweight = True


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU")
class TestTritonGPU(FlashAttentionTests):
    backend = "triton"
    interpret = False
    supports_reweight = True
