"""Multi-node without SLURM, as two "nodes" on loopback: one launcher per node with a node rank
(what the DeepSpeed hostfile route runs on each host through pdsh, and torchrun --nnodes 2), each
with one CPU rank. Training must end where one node with 2 ranks ends."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launcher import REPO, read_metrics, run_job

pytestmark = pytest.mark.timeout(600)

ARGS = ["--max-steps", "6", "--save-steps", "3", "logging.progress_bar=false"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("SYNTHUNLEARN_CACHE", str(REPO / ".cache" / "synthunlearn"))
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("SLURM_")]:  # not an srun task, even inside a job
        env.pop(key)
    return env


def _deepspeed_node(node_rank: int, port: int, out: Path) -> list[str]:
    # The command DeepSpeed's multi-node runner (`deepspeed --hostfile ...`) starts on each host:
    # world_info maps host -> local device slots; here two hosts with one slot each.
    world = base64.urlsafe_b64encode(json.dumps({"node0": [0], "node1": [0]}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
            str(REPO / "launch" / "sft.py"), "--output-dir", str(out), *ARGS]


def _torchrun_node(node_rank: int, port: int, out: Path) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(REPO / "launch" / "sft.py"), "--output-dir", str(out), *ARGS]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_node") / "out"
    run_job("sft", ["--output-dir", str(out), *ARGS], nprocs=2)
    return out


@pytest.mark.parametrize("launcher", [_deepspeed_node, _torchrun_node], ids=["deepspeed-per-node", "torchrun"])
def test_two_nodes_on_loopback_match_one_node(one_node, launcher, tmp_path):
    out = tmp_path / "out"  # one shared directory, as on a shared file system
    port = _port()
    procs = [subprocess.Popen(launcher(rank, port, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}:\n{log[-6000:]}"

    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 7))
    got = load_file(str(out / "final" / "model.safetensors"))
    want = load_file(str(one_node / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    # the losses, not only the end point, agree step by step
    for a, b in zip(read_metrics(out), read_metrics(one_node)):
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
