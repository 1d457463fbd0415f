"""scripts/bench_train.py on the CPU: a case runs in its own process and reports its numbers and formula."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def bench(*args):
    """The script's run (it inherits the suite's XLA_FLAGS: on a CPU, compiling without LLVM's optimisations; the
    numbers checked are not timings)."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train.py"), "--tiny", *args],
                          capture_output=True, text=True, timeout=600)


def test_a_case_reports_time_throughput_and_the_formula():
    done = bench("--steps", "1", "--case", "seq_len=64,batch=2,remat=full,loss_chunk=16",
                 "--case", "seq_len=64,batch=2,loss_chunk=48",
                 "--case", "seq_len=64,batch=2,remat=full,loss_chunk=16,segments=0")
    assert done.returncode == 0, done.stderr[-2000:]
    *cases, summary = [json.loads(line) for line in done.stdout.splitlines()]
    ran, refused, without_segments = cases
    assert ran["remat"] == "full" and ran["loss_chunk"] == 16 and ran["tokens_per_s"] > 0 and ran["step_s"] > 0
    assert ran["loss"] > 0 and "6·N·tokens" in ran["formula"] and ran["mfu"] is None  # no data-sheet peak for a CPU
    assert "train.loss_chunk=48 must divide" in refused["error"]
    assert without_segments["segments"] == 0 and without_segments["loss"] == ran["loss"]  # one document per row
    assert summary["failed"] == [refused["case"]] and summary["longest_trained"] == 64


def test_a_bad_case_is_refused_before_anything_runs():
    done = bench("--case", "seq_len=64,remats=full")
    assert done.returncode != 0 and "'remats=full' is not key=value with a key in" in done.stderr
