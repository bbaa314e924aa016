"""ZeRO-3 (2 CPU ranks, gloo) through the real ``deepspeed`` launcher: the cpu backend's gradients of
a tiny LM with a reference head of another width equal the torch oracle's (see zero3_worker.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero3_worker.py")


def _launcher():
    exe = Path(sys.executable).with_name("deepspeed")
    return str(exe) if exe.exists() else shutil.which("deepspeed")


@pytest.mark.timeout(240)
def test_zero3_cpu_backend_matches_torch(tmp_path):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "result.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # Cached builds (the cpu kernel, DeepSpeed's shm comm op): tens of seconds the first time only.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(WORKER), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]

    reports = json.loads(out.read_text())
    assert [r["rank"] for r in reports] == [0, 1] and all(r["world_size"] == 2 for r in reports)
    for report in reports:
        assert report["backend"] == "cpu"
        assert set(report["grads"]) == {"lm.embed.weight", "lm.proj.weight", "lm.proj.bias",
                                         "lm.lm_head.weight"}
        assert report["grads"]["lm.lm_head.weight"]["shape"] == [97, 24]  # gathered, not a shard
        for name, g in report["grads"].items():
            assert g["nonzero"], name
            assert g["max_abs_diff"] <= 1e-5 * max(1.0, g["max_abs"]), (name, g)
        for key, diff in report["values"].items():
            assert diff <= 1e-5, (key, diff)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
