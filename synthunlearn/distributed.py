"""Process-group set-up that works under ``deepspeed``, ``torchrun``, SLURM ``srun`` or plain python.

Without GPUs the CPU accelerator and the gloo backend are chosen automatically. The accelerator
must be decided *before* DeepSpeed is imported, because DeepSpeed caches it on first import.
"""

from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_accelerator() -> str:
    """'cuda' when a GPU is visible, else 'cpu'; an explicit DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_env_from_slurm() -> None:
    """srun with one task per GPU: map SLURM's task ids onto torch.distributed's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(local_rank_arg: int | None = None) -> DistEnv:
    accelerator = choose_accelerator()
    _fill_env_from_slurm()
    if "RANK" not in os.environ:  # a plain single python process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if local_rank_arg is not None and local_rank_arg >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    import deepspeed

    backend = "nccl" if accelerator == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    if accelerator == "cpu":
        atexit.register(_unlink_cpu_allreduce_buffer, rank)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


# DeepSpeed's naming of a rank's CPU all-reduce buffer: <prefix><uid>_<addr>_<port>_<rank>.
CPU_ALLREDUCE_SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer_"


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_
    <addr>_<port>_<rank> (~69 MB) and never unlinks it; with a new port per run they pile up
    until /dev/shm (RAM) is full. Each rank removes its own at exit, when the peers have long
    since mapped it (an unlinked segment stays valid for processes that map it)."""
    path = (f"{CPU_ALLREDUCE_SHM_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(path)
    except OSError:
        pass


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a list of floats over all ranks (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown_distributed(clean: bool) -> None:
    """Destroys the process group while the interpreter is still whole.

    Left to interpreter finalisation, gloo's worker threads can still hold work objects whose
    release needs the GIL, and a rank dies with SIGABRT ("terminate called without an active
    exception") after its job has finished: seen once in CI as a job that wrote its model and
    exited 250. ``clean`` (every rank got here normally) first waits for all ranks, so no rank
    tears its connections down while a peer still talks to it; after an error the peers may never
    arrive, so the group is only destroyed locally (a local operation for gloo)."""
    if not torch.distributed.is_initialized():
        return
    if clean:
        barrier()
    torch.distributed.destroy_process_group()
