"""Running the real launchers from tests: ``deepspeed --num_gpus N launch/<job>.py ...`` on CPU ranks.

DeepSpeed's native op builds and the tiny model are cached across tests (and across CI steps)
in TORCH_EXTENSIONS_DIR / SYNTHUNLEARN_CACHE, defaulting to the repository's .cache/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("SYNTHUNLEARN_CACHE", str(REPO / ".cache" / "synthunlearn"))
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def deepspeed_cmd(job: str, nprocs: int, args: list[str], port: int | None = None) -> list[str]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [launcher, "--num_gpus", str(nprocs), "--master_port", str(port or _port()),
            str(REPO / "launch" / f"{job}.py"), *args]


def _port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(job: str, args: list[str], *, nprocs: int = 2, timeout: int = 300, check: bool = True,
            python: bool = False, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a launcher; ``python=True`` runs a single plain python process instead of deepspeed."""
    port = _port()
    cmd = ([sys.executable, str(REPO / "launch" / f"{job}.py"), *args] if python
           else deepspeed_cmd(job, nprocs, args, port))
    proc = subprocess.run(cmd, cwd=REPO, env={**job_env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)
    proc.master_port = port
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
