"""Command line shared by ``launch/sft.py`` and ``launch/unlearn.py`` (a contract other tools use).

    launch/<job>.py [--config FILE] [--output-dir DIR] [--deepspeed-config FILE] [--max-steps N]
                    [--save-steps N] [--seed N] [--overwrite] [--local_rank N] [key.sub=value ...]

Runs under ``deepspeed``, ``torchrun``, ``srun`` or as a plain single python process. A user
error (bad config, data, paths) prints one ``error:`` line and exits 2 without a traceback;
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from synthunlearn.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = {"sft": "configs/tiny/sft.yaml", "unlearn": "configs/tiny/unlearn.yaml"}
DEFAULT_DEEPSPEED = "configs/deepspeed/zero2.json"


def _default_path(relative: str) -> str:
    """Defaults work from any working directory: fall back to the repository's own copy."""
    return relative if Path(relative).exists() else str(REPO_ROOT / relative)


def build_parser(job: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"launch/{job}.py",
        description=f"synthunlearn {job}: DeepSpeed ZeRO training. Trailing key.sub=value arguments "
                    "override the YAML config (e.g. objective.tau=2.5 data.forget.path=qa.jsonl).")
    p.add_argument("--config", default=None,
                   help=f"YAML run config (default: {DEFAULT_CONFIGS[job]}, the embedded tiny default)")
    p.add_argument("--output-dir", default=f"runs/{job}",
                   help=f"where metrics.jsonl, checkpoints/ and final/ go (default: runs/{job})")
    p.add_argument("--deepspeed-config", default=None,
                   help=f"DeepSpeed ZeRO JSON (default: {DEFAULT_DEEPSPEED})")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides optimisation.max_steps)")
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (overrides checkpointing.save_steps)")
    p.add_argument("--seed", type=int, default=None, help="overrides optimisation.seed")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output directory that holds another run or checkpoints")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def parse_args(job: str, argv=None) -> argparse.Namespace:
    # Intermixed: options may follow the key=value overrides (as users and sbatch lines write them).
    args = build_parser(job).parse_intermixed_args(argv)
    args.config = args.config or _default_path(DEFAULT_CONFIGS[job])
    args.deepspeed_config = args.deepspeed_config or _default_path(DEFAULT_DEEPSPEED)
    flags = {"optimisation.max_steps": args.max_steps, "checkpointing.save_steps": args.save_steps,
             "optimisation.seed": args.seed}
    args.overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return args


def main(job: str, argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    clean = False
    try:
        args = parse_args(job, argv)
        from synthunlearn.training.trainer import train
        train(job, args)
        clean = True
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # no process group without it; keeps --help fast
            from synthunlearn.distributed import shutdown_distributed
            shutdown_distributed(clean)
    return 0
