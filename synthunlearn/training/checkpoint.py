"""Checkpoints that a crash can never leave half-usable, and resume from the newest complete one.

Layout under ``<output_dir>/checkpoints``::

    global_step<N>/                DeepSpeed's files for tag global_step<N> (model, optimizer,
                                   scheduler), plus trainer_state_rank<r>.pt (samplers, RNG) and
                                   COMPLETE (written last, holds the step)
    latest                         the newest complete tag (DeepSpeed's convention)
    .incomplete-global_step<N>/    a save in progress; removed on the next start

A save goes to ``.incomplete-<tag>/<tag>`` and is renamed into place only after every rank has
written its part and rank 0 has written COMPLETE; ``latest`` is replaced atomically after that.
Resume only considers directories with COMPLETE, so a kill at any moment loses at most the steps
since the previous checkpoint. Trainer state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from synthunlearn.distributed import barrier
from synthunlearn.errors import UserError

TAG_RE = re.compile(r"^global_step(\d+)$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for child in ckpt_dir.iterdir():
            m = TAG_RE.match(child.name)
            if m and (child / COMPLETE).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_complete(ckpt_dir: Path) -> Optional[tuple[int, Path]]:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_incomplete(ckpt_dir: Path, is_main: bool) -> None:
    """Leftovers of an interrupted save (rank 0 only; callers barrier afterwards)."""
    if is_main and ckpt_dir.is_dir():
        for child in ckpt_dir.iterdir():
            if child.name.startswith(".incomplete-") or (TAG_RE.match(child.name) and not (child / COMPLETE).exists()):
                shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(engine, ckpt_dir: Path, step: int, trainer_state: dict, *, rank: int,
                    is_main: bool, keep_last: int) -> Path:
    tag = tag_for(step)
    staging_root = ckpt_dir / f".incomplete-{tag}"
    if is_main:
        shutil.rmtree(staging_root, ignore_errors=True)
        staging_root.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(staging_root), tag=tag, save_latest=False)
    staging = staging_root / tag
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(trainer_state, staging / f"trainer_state_rank{rank}.pt")
    if os.environ.get("SYNTHUNLEARN_TEST_CRASH_IN_SAVE") == str(step):
        os._exit(137)  # test-only: die like kill -9 with the save half done (files, no COMPLETE)
    barrier()  # every rank's files are on disk
    final = ckpt_dir / tag
    if is_main:
        _atomic_write_text(staging / COMPLETE, f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        _atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last > 0:
            for _, old in complete_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, ckpt_dir: Path, step: int, *, rank: int, world_size: int) -> dict:
    tag = tag_for(step)
    state_file = ckpt_dir / tag / f"trainer_state_rank{rank}.pt"
    saved_ranks = len(list((ckpt_dir / tag).glob("trainer_state_rank*.pt")))
    if saved_ranks != world_size or not state_file.is_file():
        raise UserError(f"{ckpt_dir / tag}: saved by {saved_ranks} ranks, resuming on {world_size}; "
                        "resume with the same number of ranks (or convert it with DeepSpeed's "
                        "ds_to_universal and start a new run from it)")
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    return torch.load(state_file, weights_only=True)
