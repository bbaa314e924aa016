"""launch/slurm/unlearn.sbatch on a real single-node SLURM cluster (installed and started by
tests/slurm/start_cluster.sh): 2 CPU ranks through srun, the exported model, and a preemption
signal -> checkpoint -> requeue -> resume that ends with the uninterrupted run's weights.
sft.sbatch differs from it only in its JOB line (test_slurm_unit.py checks that)."""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from synthunlearn.slurm import expand_hostlist, master_port
from tests.launcher import REPO, read_metrics

pytestmark = pytest.mark.timeout(600)

STEPS = 100  # long enough (about 10 s of steps) that a signal sent after step 3 lands mid-run
JOB_ARGS = ["--max-steps", str(STEPS), "logging.progress_bar=false"]
# 2 single-CPU tasks on the CPU-only node; --gpus-per-node=0 overrides the script's GPU default.
SBATCH_OPTS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]


def _sbatch(slurm, script, out_dir, log_dir, *, wait, cwd, extra=()):
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *SBATCH_OPTS,
           f"--output={log_dir}/slurm-%j.out", *extra, str(script), "--output-dir", str(out_dir), *JOB_ARGS]
    proc = slurm.run(*cmd, check=False, timeout=500, cwd=cwd)
    job_id = proc.stdout.strip().split(";")[0]
    return proc, job_id


def _log(log_dir, job_id):
    return (log_dir / f"slurm-{job_id}.out").read_text(errors="replace")


def _weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory):
    """`sbatch --wait` of the real unlearn script, submitted from outside the repository (the script
    must find it from the submitted path)."""
    base = tmp_path_factory.mktemp("sbatch_unlearn")
    start = time.monotonic()
    proc, job_id = _sbatch(slurm, REPO / "launch/slurm/unlearn.sbatch", base / "out", base, wait=True, cwd=base)
    elapsed = time.monotonic() - start
    log = _log(base, job_id) if job_id and (base / f"slurm-{job_id}.out").exists() else ""
    assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}\n{proc.stderr}\n{log[-6000:]}"
    return base, job_id, log, elapsed


def test_sbatch_unlearn_two_ranks_exports_a_loadable_model(slurm, uninterrupted):
    from transformers import AutoModelForCausalLM

    base, job_id, log, elapsed = uninterrupted
    out = base / "out"
    assert elapsed < 240, f"{elapsed:.0f}s"
    # srun's task ids became the ranks: 2 ranks, rendezvous on the job's first node and its port
    assert '"world_size": 2' in (out / "run_config.json").read_text()
    node = slurm.job_fields(job_id)["NodeList"]
    addr = slurm.master_addr_override or node
    assert f"2 tasks on 1 node(s) {node}, rendezvous {addr}:{master_port(job_id)}" in log
    assert "finished: model in" in log and "requeue" not in log
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, STEPS + 1))
    assert not (out / "STOPPED").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_signal_requeues_and_resumes_to_the_same_weights(slurm, uninterrupted, tmp_path):
    # Submitted in the documented form, from the repository with a relative script path (the
    # reference run was submitted from outside it): the requeued run must find it again.
    reference = uninterrupted[0] / "out"
    out = tmp_path / "out"
    proc, job_id = _sbatch(slurm, "launch/slurm/unlearn.sbatch", out, tmp_path, wait=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr

    # wait for a few optimizer steps, then send what `#SBATCH --signal=B:USR1@N` sends before a limit
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and sum('"loss"' in line for line in
                                                         (out / "metrics.jsonl").read_text().splitlines()) >= 3):
        fields = slurm.job_fields(job_id)
        assert fields["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (fields, _log(tmp_path, job_id))
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.1)
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)

    fields = slurm.wait_finished(job_id, timeout=400)
    log = _log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-6000:])
    assert fields["Restarts"] == "1", (fields, log[-6000:])
    assert "received SIGUSR1" in log and f"requeued job {job_id}" in log, log[-6000:]
    resumed = re.findall(r"resumed from \S*global_step(\d+) at step (\d+)", log)
    assert len(resumed) == 1, log[-6000:]
    stopped_at = int(resumed[0][1])
    assert 0 < stopped_at < STEPS, f"resumed at step {stopped_at}: the signal must land mid-run"
    assert log.count("run 1:") == 1 and log.count("run 2:") == 1  # --open-mode=append kept both runs
    assert "finished: model in" in log and not (out / "STOPPED").exists()

    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, STEPS + 1))  # each step once: the resumed run continued, not restarted
    got, want = _weights(out), _weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_hostnames_match_scontrol(slurm):
    compared = 0
    for nodelist in ["gpu[01-04,07]", "n[1-3]-ib,login", "a[08-11],b7", "r[1-2]n[01-03]", "single",
                     "x[0-2,5],y[10-12]-ib,z", "c[098-101]"]:
        want = slurm.run("scontrol", "show", "hostnames", nodelist).stdout.split()
        # through the CLI the scripts use: scontrol's answer, or the parser where scontrol has none
        # (SLURM 22.05 prints "Invalid hostlist" for a suffix after the brackets, as in n[1-3]-ib)
        got = slurm.run(sys.executable, "-m", "synthunlearn.slurm", "hostnames", nodelist, cwd=REPO).stdout.split()
        assert got == expand_hostlist(nodelist), nodelist
        if want:
            assert expand_hostlist(nodelist) == want, nodelist
            compared += 1
    assert compared >= 4


def test_rendezvous_inside_an_allocation(slurm):
    if slurm.master_addr_override:
        pytest.skip("this machine's host name does not resolve, so the jobs rendezvous on loopback")
    proc = slurm.run("srun", "-n1", "--gpus-per-node=0", sys.executable, "-m", "synthunlearn.slurm", "env",
                     timeout=120, cwd=REPO)
    lines = dict(line.removeprefix("export ").split("=", 1) for line in proc.stdout.splitlines())
    node = slurm.run("sinfo", "-h", "-o", "%n").stdout.split()[0]
    assert lines["MASTER_ADDR"] == node
    assert 15000 <= int(lines["MASTER_PORT"]) < 30000
    socket.getaddrinfo(lines["MASTER_ADDR"], int(lines["MASTER_PORT"]))  # the address resolves
