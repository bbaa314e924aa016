"""A run killed after a checkpoint and started again with the same command ends with the weights of
an uninterrupted run; SIGTERM makes the trainer checkpoint and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.launcher import REPO, deepspeed_cmd, job_env, read_metrics, run_job

ARGS = ["--max-steps", "24", "--save-steps", "4", "--deepspeed-config", "configs/deepspeed/zero2.json",
        "optimisation.gradient_accumulation_steps=2", "logging.progress_bar=false", "logging.eval_steps=0",
        "data.forget.eval_path=null", "data.replay.eval_path=null"]


@pytest.fixture
def started():
    """Starts runs in their own process group and kills whatever is left when the test ends."""
    procs = []

    def start(out, extra=()):
        proc = _start(out, extra)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(out, extra=()):
    return subprocess.Popen(deepspeed_cmd("unlearn", 2, ["--output-dir", str(out), *ARGS, *extra]), cwd=REPO,
                            env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def _weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    reference = tmp_path_factory.mktemp("uninterrupted")
    run_job("unlearn", ["--output-dir", str(reference), *ARGS])
    return _weights(reference)


def test_kill_resume_matches_uninterrupted(tmp_path, started, uninterrupted):
    interrupted = tmp_path / "interrupted"
    proc = started(interrupted)
    _wait_for(interrupted / "checkpoints" / "global_step8" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a node failure
    proc.wait()
    assert not (interrupted / "final").exists()
    resumed = run_job("unlearn", ["--output-dir", str(interrupted), *ARGS])
    assert "resumed from" in resumed.stderr + resumed.stdout

    got, want = _weights(interrupted), uninterrupted
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    # the metrics file describes one run: each step once
    steps = [m["step"] for m in read_metrics(interrupted) if "loss" in m]
    assert steps == list(range(1, 25))


def test_crash_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    proc = run_job("unlearn", ["--output-dir", str(out), *ARGS], check=False,
                   extra_env={"SYNTHUNLEARN_TEST_CRASH_IN_SAVE": "12"})
    assert proc.returncode != 0
    # the half-written save is there but not complete; the previous one is
    assert (out / "checkpoints" / ".incomplete-global_step12").is_dir()
    assert not (out / "checkpoints" / "global_step12").exists()
    assert (out / "checkpoints" / "latest").read_text() == "global_step8"
    resumed = run_job("unlearn", ["--output-dir", str(out), *ARGS])
    assert "global_step8 at step 8" in resumed.stderr + resumed.stdout
    assert not (out / "checkpoints" / ".incomplete-global_step12").exists()
    got = _weights(out)
    for name in uninterrupted:
        torch.testing.assert_close(got[name], uninterrupted[name], rtol=1e-6, atol=1e-7, msg=name)


def test_sigterm_checkpoints_and_exits_zero(tmp_path, started):
    out = tmp_path / "signalled"
    proc = started(out, ["--save-steps", "0", "--max-steps", "100000"])
    _wait_for(out / "metrics.jsonl", proc)
    time.sleep(2.0)
    # what SLURM does before a time limit: signal every task
    for child in _rank_pids(proc.pid):
        os.kill(child, signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-4000:]
    saved = sorted((out / "checkpoints").glob("global_step*/COMPLETE"))
    assert len(saved) == 1, output[-4000:]
    assert not (out / "final").exists()
    # rerunning with a smaller step budget resumes from there and finishes immediately
    step = int(saved[0].read_text())
    rerun = run_job("unlearn", ["--output-dir", str(out), *ARGS, "--save-steps", "0", "--max-steps", str(step)])
    assert f"global_step{step}" in rerun.stderr + rerun.stdout
    assert (out / "final" / "model.safetensors").is_file()


def _rank_pids(launcher_pid: int) -> list[int]:
    """The training processes (children of the deepspeed launcher tree) running launch/unlearn.py."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,pgid,args"], capture_output=True, text=True).stdout
    pids = []
    for line in out.splitlines()[1:]:
        pid, pgid, args = line.split(None, 2)
        if int(pgid) == launcher_pid and "launch/unlearn.py" in args and "--local_rank" in args:
            pids.append(int(pid))
    assert pids, out
    return pids


def test_nonfinite_steps_are_skipped_or_stop_with_a_checkpoint(tmp_path):
    import json

    env_extra = {"SYNTHUNLEARN_TEST_NONFINITE_STEPS": "3"}
    out = tmp_path / "skip"
    run_job("unlearn", ["--output-dir", str(out), "--max-steps", "5", "logging.progress_bar=false",
                        "logging.eval_steps=0", "checkpointing.save_steps=0"], python=True, extra_env=env_extra)
    steps = {m["step"]: m for m in read_metrics(out) if "loss" in m}
    assert steps[2]["skipped_steps"] == 0 and steps[3]["skipped_steps"] == 1 and steps[5]["skipped_steps"] == 1
    weights = _weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())

    out = tmp_path / "stop"
    proc = run_job("unlearn", ["--output-dir", str(out), "--max-steps", "5", "logging.progress_bar=false",
                               "logging.eval_steps=0", "checkpointing.save_steps=0",
                               "optimisation.on_nonfinite=stop"], python=True, extra_env=env_extra, check=False)
    assert proc.returncode == 2 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "global_step3" / "COMPLETE").is_file()
    assert not (out / "final").exists()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_resuming_with_more_steps_follows_the_new_schedule_from_the_first_step(tmp_path):
    """max_steps may change on resume (extending a finished run): every resumed step, the first
    included, uses the rate of the schedule for the new total (the optimizer's saved rate is the old
    schedule's, and LambdaLR's load_state_dict does not recompute it)."""
    from synthunlearn.training.schedule import lr_multiplier
    out = tmp_path / "extended"
    args = ["--output-dir", str(out), "--deepspeed-config", "configs/deepspeed/zero1.json", "--save-steps", "4",
            "logging.progress_bar=false", "logging.eval_steps=0", "data.sft.eval_path=null",
            "optimisation.warmup_steps=2", "optimisation.schedule=cosine", "optimisation.lr=1e-3",
            "optimisation.min_lr_ratio=0.0"]
    run_job("sft", [*args, "--max-steps", "8"], python=True)
    proc = run_job("sft", [*args, "--max-steps", "12"], python=True)
    assert "resumed from" in proc.stderr + proc.stdout
    logged = {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}
    assert sorted(logged) == list(range(1, 13))
    for step in range(1, 13):
        total = 8 if step <= 8 else 12
        expected = 1e-3 * lr_multiplier(step - 1, total_steps=total, warmup_steps=2, schedule="cosine", min_lr_ratio=0.0)
        assert logged[step] == pytest.approx(expected, rel=1e-6), step
