"""Keeps benchmarks/bench_linear_logprob_kl.py from rotting: a --quick run on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    # torch_compile is left out: its compilation alone takes longer than this test may.
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_linear_logprob_kl.py"), "--quick",
           "--impls", "cpu,chunked,torch,liger_ce", "--shapes", "32x16x300", "--repeats", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"cpu", "chunked", "torch"}  # liger_ce is cuda-only: not attempted on cpu
    for name in ("cpu", "chunked", "torch"):
        row = rows[name]
        assert row["time_ms"] > 0 and row["peak_extra_mib"] > 0 and row["tflops"] > 0, row
    import torch

    machine = result["machine"]
    assert machine["packages"]["torch"] == torch.__version__ and machine["threads"] >= 1, machine
    assert "commit" in machine and "time ms" in proc.stdout
