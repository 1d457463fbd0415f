"""metrics.jsonl: a resumed run's file reads like an uninterrupted one's."""

import json

from longctx.train.metrics import MetricsLog


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resuming_drops_the_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()

    resumed = MetricsLog(path, resume_step=4)  # the run died after step 7; its newest checkpoint is step 4
    assert _steps(path) == [1, 2, 3, 4]
    resumed.write({"step": 5, "loss": 0.5})
    resumed.close()
    assert _steps(path) == [1, 2, 3, 4, 5]


def test_a_new_run_starts_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    MetricsLog(path, resume_step=0).close()
    assert path.read_text() == ""


def test_a_line_torn_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + '{"step": 2, "lo')
    MetricsLog(path, resume_step=4).close()
    assert _steps(path) == [1]
