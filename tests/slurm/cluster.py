"""A single-node SLURM cluster for the tests (started by start_cluster.sh), and job helpers."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.launcher import REPO

START_SCRIPT = Path(__file__).resolve().parent / "start_cluster.sh"
UNAVAILABLE = 3  # start_cluster.sh's "SLURM cannot be made available here"


class Cluster:
    def __init__(self, conf: str):
        self.conf = conf

    def env(self, **extra) -> dict:
        """Environment for client commands and, through sbatch's default --export=ALL, for the jobs."""
        env = dict(os.environ)
        env["SLURM_CONF"] = self.conf
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin:/sbin"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env.setdefault("SYNTHUNLEARN_CACHE", str(REPO / ".cache" / "synthunlearn"))
        env["DS_ACCELERATOR"] = "cpu"
        env["SYNTHUNLEARN_PYTHON"] = sys.executable  # the interpreter running the tests has the packages
        # Values from the shell running pytest (e.g. inside another job) must not leak into the job.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            env.pop(key)
        if self.master_addr_override:
            env["SYNTHUNLEARN_MASTER_ADDR"] = self.master_addr_override
        env.update(extra)
        return env

    @property
    def master_addr_override(self) -> str | None:
        """The node is named after this machine's short host name; where that name does not resolve
        (some CI containers), the ranks meet on loopback instead, through the scripts' override."""
        try:
            socket.getaddrinfo(socket.gethostname().split(".")[0], None)
            return None
        except OSError:
            return "127.0.0.1"

    def run(self, *cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_fields(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_finished(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                          "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}:
                return fields
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} not finished after {timeout:.0f}s: {fields}")
            time.sleep(1)


def start() -> tuple[Cluster | None, str, bool]:
    """(cluster, reason it is unavailable, whether this call started the daemons)."""
    if sys.platform != "linux" or not shutil.which("bash"):
        return None, "SLURM tests need Linux and bash", False
    state = os.environ.get("SYNTHUNLEARN_SLURM_DIR", "/var/tmp/synthunlearn-slurm")
    was_running = _daemons_running(state)
    try:
        proc = subprocess.run(["bash", str(START_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "tests/slurm/start_cluster.sh timed out after 900 s", False
    if proc.returncode == UNAVAILABLE:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "SLURM unavailable", False
    if proc.returncode != 0:
        raise RuntimeError(f"tests/slurm/start_cluster.sh exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    return Cluster(conf), "", not was_running


def stop() -> None:
    subprocess.run(["bash", str(START_SCRIPT), "--stop"], capture_output=True, timeout=60)


def _daemons_running(state: str) -> bool:
    for name in ("slurmctld", "slurmd"):
        try:
            os.kill(int(Path(state, f"{name}.pid").read_text().strip()), 0)
        except (OSError, ValueError):
            return False
    return True
