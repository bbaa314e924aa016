"""Per-step metrics: ``metrics.jsonl`` (one JSON object per logged step), a rank-0 progress bar,
and DeepSpeed's monitor (TensorBoard / CSV) when configured.

On resume the file is cut back to the resumed step, so it always describes one consistent run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    # JSON has no NaN/inf: write null so every line parses with any JSON reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    def __init__(self, path: Path, *, enabled: bool, resume_step: int, total_steps: int,
                 progress_bar: bool, monitor=None):
        self.enabled = enabled
        self.path = path
        self.monitor = monitor
        self.bar = None
        if not enabled:
            return
        if path.exists():
            # Records up to the checkpoint stay; later ones are about to be written again. Without
            # a checkpoint (resume_step 0) nothing stays: the run starts over, its step-0 baseline
            # evaluation included, which would otherwise appear twice.
            kept = [line for line in path.read_text().splitlines()
                    if resume_step > 0 and line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", dynamic_ncols=True)

    def advance(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self.file.flush()
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            step = record["step"]
            self.monitor.write_events([(f"synthunlearn/{k}", v, step) for k, v in record.items()
                                       if k != "step" and isinstance(v, (int, float))])
        if "loss" in record:
            self.advance(record)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.bar is not None:
                self.bar.close()
