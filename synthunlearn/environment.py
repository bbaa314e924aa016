"""What a measurement ran on: the commit, the package versions, the interpreter and the machine.

Two runs of one command that give different figures can be traced to the code, the packages or
the host only if each run wrote these down; docs/experiment.md ("Re-measured at a844355") has a
case that could not be traced because nothing was. The experiment pipeline stores this record in
every phase.json, eval.json and results.json; launch/evaluate.py and the kernel benchmark in
their JSON.
"""

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

# The packages whose version can move a figure: the numerics (torch, triton, numpy), the training
# engine (deepspeed, accelerate), models and tokenizers (transformers, tokenizers, safetensors).
PACKAGES = ("torch", "triton", "deepspeed", "accelerate", "transformers", "tokenizers", "safetensors",
            "datasets", "numpy")

_CHECKOUT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", "-C", str(_CHECKOUT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit() -> Optional[str]:
    """HEAD of the checkout this package was imported from, with ``-dirty`` when a tracked file
    differs from it (the figures then come from code no commit holds); None when the package was
    not imported from a checkout's root (an installed copy, even one under a checkout's .venv)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _CHECKOUT:
        return None
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if changed else "")


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def package_versions(names=PACKAGES) -> Dict[str, Optional[str]]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=1)
def _machine_and_packages() -> dict:
    """What cannot change while a process runs: computed once."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        # The instruction set torch's CPU kernels dispatch on (AVX512, AVX2, ...): a virtual
        # machine's model name often omits it, and it changes the floating-point results.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        # The first visible GPU's name, or None; CUDA is not initialised when torch sees none.
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(),
    }


def describe() -> dict:
    """The record. The commit is read anew on each call (a few milliseconds of git): a sweep that
    runs for hours while its checkout is edited stamps each phase with the state it started from."""
    return {"commit": git_commit(), **_machine_and_packages()}


def summary(env: dict) -> str:
    """One line for a report header: commit, key versions, machine."""
    packages = env.get("packages") or {}
    versions = ", ".join(f"{name} {packages[name]}" for name in ("torch", "deepspeed", "transformers", "numpy")
                         if packages.get(name))
    machine = env.get("gpu") or " ".join(str(v) for v in (env.get("cpu"), env.get("cpu_capability")) if v) \
        or "unknown machine"
    commit = (env.get("commit") or "no commit")[:12] + ("-dirty" if str(env.get("commit")).endswith("-dirty") else "")
    return f"commit {commit}; {versions}; {machine}, {env.get('cpus')} CPUs"


def group_by_environment(named: Iterable[Tuple[str, Optional[dict]]]) -> List[dict]:
    """``[{"environment": env, "phases": [name, ...]}, ...]``: the distinct records among
    ``(name, record)`` pairs, in first-seen order, each with the names it produced (a record of
    None, from a phase stamped before records were kept, is a group of its own)."""
    groups: List[dict] = []
    for name, env in named:
        group = next((g for g in groups if g["environment"] == env), None)
        if group is None:
            group = {"environment": env, "phases": []}
            groups.append(group)
        group["phases"].append(name)
    return groups
