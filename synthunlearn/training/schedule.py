"""Learning-rate schedules as multipliers of the peak rate (for torch's LambdaLR).

    warmup (step < W):   m = (step + 1) / W
    then, with progress s = (step - W) / max(1, total - W) in [0, 1] and floor r = min_lr_ratio:
      constant:  m = 1
      linear:    m = r + (1 - r) * (1 - s)
      cosine:    m = r + (1 - r) * 0.5 * (1 + cos(pi * s))

``step`` counts optimizer steps already taken, so the first update uses m(0).
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
                  min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def reapply(scheduler) -> None:
    """Set the optimizer's rates to what ``scheduler`` (a LambdaLR) gives at its current step.

    Needed after a resume: the optimizer's state holds the rate the *saved* schedule set for the
    next step, and LambdaLR's ``load_state_dict`` restores the step count without recomputing it.
    When the run was resumed with another ``optimisation.max_steps`` the schedule is a different
    function, and the first resumed update would otherwise use the old one's rate.
    """
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
