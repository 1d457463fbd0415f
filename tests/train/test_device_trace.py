"""scripts/device_trace.py: GPU kernel time from a perfetto trace, and its grouping by kind."""

import gzip
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import device_trace  # noqa: E402


def write_trace(directory: pathlib.Path, events: list[dict]) -> None:
    path = directory / "plugins" / "profile" / "run" / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_kernel_times_total_device_rows_only(tmp_path):
    write_trace(tmp_path, [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "flash_forward", "dur": 10.0},
        {"ph": "X", "pid": 1, "name": "flash_forward", "dur": 5.0},
        {"ph": "X", "pid": 1, "name": "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "dur": 7.0},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 2.0},
        {"ph": "X", "pid": 2, "name": "flash_forward", "dur": 100.0},  # host row: the launch, not the kernel
        {"ph": "i", "pid": 1, "name": "marker"},
    ])
    totals, calls = device_trace.kernel_calls(tmp_path)
    assert device_trace.kernel_times(tmp_path) == totals
    assert calls == {"flash_forward": 2, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": 1, "loop_add_fusion": 1}
    assert totals == {"flash_forward": 15.0, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": 7.0, "loop_add_fusion": 2.0}
    assert device_trace.by_kind(totals) == {"attention forward": 15.0, "matmul": 7.0, device_trace.OTHER: 2.0}


@pytest.mark.parametrize("kernel, kind", [
    ("flash_backward_dkdv", "attention backward dK/dV"), ("flash_backward_dq", "attention backward dQ"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "attention (cuDNN)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("gemm_fusion_dot_12", "matmul"),
    ("Memset (Device)", "copy / memset"), ("input_reduce_fusion_3", device_trace.OTHER)])
def test_kernels_are_grouped_by_what_they_do(kernel, kind):
    assert device_trace.kind_of(kernel) == kind
