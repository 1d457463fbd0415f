"""XLA_FLAGS handling for bitwise-reproducible GPU training: added when absent, the user's choice kept."""

import os

import pytest

from longctx.train import determinism


@pytest.mark.parametrize("before, after, requested", [
    (None, "--xla_gpu_deterministic_ops=true", True),
    ("--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=8 "
     "--xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=false", "--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops", "--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false",
     "--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),
])
def test_request_keeps_the_users_setting(monkeypatch, before, after, requested):
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    determinism.request_deterministic_gpu_ops()
    assert os.environ["XLA_FLAGS"] == after
    assert determinism.deterministic_ops_requested() is requested
