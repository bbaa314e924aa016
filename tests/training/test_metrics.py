"""metrics.jsonl across restarts: each step's records appear once."""

import json

from synthunlearn.training.metrics import MetricsWriter


def _write(path, resume_step, records):
    writer = MetricsWriter(path, enabled=True, resume_step=resume_step, total_steps=10, progress_bar=False)
    for record in records:
        writer.log(record)
    writer.close()


def _steps(path):
    return [(r["step"], "eval/forget_nll" in r) for r in map(json.loads, path.read_text().splitlines())]


def test_a_restart_without_a_checkpoint_starts_the_file_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    baseline = {"step": 0, "eval/forget_nll": 7.1}
    _write(path, 0, [baseline, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}])  # died before saving
    _write(path, 0, [baseline, {"step": 1, "loss": 1.0}])                            # the same command again
    assert _steps(path) == [(0, True), (1, False)]


def test_a_resume_keeps_the_records_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, 0, [{"step": 0, "eval/forget_nll": 7.1}] + [{"step": s, "loss": 1.0} for s in (1, 2, 3)]
           + [{"step": 2, "eval/forget_nll": 6.0}])
    _write(path, 2, [{"step": 3, "loss": 0.8}])
    assert _steps(path) == [(0, True), (1, False), (2, False), (2, True), (3, False)]
