"""Same seed and world size -> the same loss curve, bit for bit, on CPU ranks."""

from __future__ import annotations

from tests.launcher import read_metrics, run_job

ARGS = ["--max-steps", "4", "--save-steps", "0", "--deepspeed-config", "configs/deepspeed/zero2.json",
        "--seed", "3", "logging.progress_bar=false", "logging.eval_steps=0", "data.sft.eval_path=null",
        "checkpointing.export_final=false"]


def _curve(out):
    steps = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    return [(m["loss"], m["sft_nll"], m["grad_norm"]) for m in steps]


def test_two_runs_same_seed_identical_loss_curve(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_job("sft", ["--output-dir", str(a), *ARGS], nprocs=2)
    run_job("sft", ["--output-dir", str(b), *ARGS], nprocs=2)
    curve_a, curve_b = _curve(a), _curve(b)
    assert curve_a == curve_b  # exact float equality, not approximate
    assert len({loss for loss, _, _ in curve_a}) > 1, "the loss must move for the test to mean anything"
