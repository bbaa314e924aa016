"""Results as JSON, markdown tables and one PNG plot of the headline comparison.

Metric names used across the project (flat ``metrics`` dict of one evaluation):

- ``if_prompt_strict`` / ``if_prompt_loose`` / ``if_instruction_strict`` / ``if_instruction_loose``
  -- instruction following (:mod:`.ifeval`); ``if_prompt_strict_heldout_phrasing`` -- strict
  prompt-level on the prompts whose constraints use wordings reserved for evaluation (present
  only when the IF set has some);
- ``pattern_rate`` -- share of generated responses showing the Q-A template (:mod:`.pattern` (a));
- ``terse_rate`` -- share of instruction-prompt responses that are a bare short answer ((a'));
- ``bare_terse_rate`` -- the same share on bare synthetic-wording questions (no constraint);
- ``kl_shift`` -- mean per-token KL(baseline || model) on neutral prompts, nats ((b));
- ``token_jsd`` -- JSD in bits of generated vs SFT-reference token frequencies ((c));
- ``knowledge_acc`` / ``knowledge_acc_norm`` -- multiple choice (:mod:`.knowledge`);
- ``perplexity`` -- held-out documents.

An *arm summary* maps arm -> metric -> ``{"mean", "std", "n"}`` (see :func:`aggregate_seeds`), the
shape of ``results.json``'s ``"arms"``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

HEADLINE_METRICS = ("if_prompt_strict", "knowledge_acc", "bare_terse_rate", "pattern_rate", "kl_shift")
TABLE_METRICS = ("if_prompt_strict", "if_prompt_loose", "if_instruction_strict", "if_instruction_loose",
                 "if_prompt_strict_heldout_phrasing", "knowledge_acc", "knowledge_acc_norm", "perplexity",
                 "pattern_rate", "terse_rate", "bare_terse_rate", "kl_shift", "token_jsd")
METRIC_LABELS = {
    "if_prompt_strict": "IF prompt strict (higher better)",
    "if_prompt_loose": "IF prompt loose",
    "if_instruction_strict": "IF instruction strict",
    "if_instruction_loose": "IF instruction loose",
    "if_prompt_strict_heldout_phrasing": "IF prompt strict, held-out wordings",
    "knowledge_acc": "Knowledge MC acc (higher better)",
    "knowledge_acc_norm": "Knowledge MC acc_norm",
    "perplexity": "Held-out perplexity",
    "pattern_rate": "Q-A template rate (lower better)",
    "terse_rate": "Bare short answer rate (lower better)",
    "bare_terse_rate": "Bare answers to bare questions (lower better)",
    "kl_shift": "KL shift to baseline, nats (lower better)",
    "token_jsd": "Token-frequency JSD, bits",
}

Number = Union[int, float]


def _clean(value):
    """JSON-safe copy: NaN / inf become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path, obj) -> None:
    """Writes ``obj`` as indented JSON (NaN as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def aggregate_seeds(per_seed: Sequence[Mapping[str, Number]]) -> Dict[str, Dict[str, Number]]:
    """metric -> {"mean", "std", "n"} over seeds; ``std`` is the sample standard deviation
    (ddof 1; 0.0 for a single seed). Missing or NaN values are skipped per metric."""
    names: List[str] = []
    for metrics in per_seed:
        names += [k for k, v in metrics.items() if isinstance(v, (int, float)) and k not in names]
    out = {}
    for name in names:
        values = [float(m[name]) for m in per_seed
                  if isinstance(m.get(name), (int, float)) and math.isfinite(float(m[name]))]
        if not values:
            out[name] = {"mean": math.nan, "std": math.nan, "n": 0}
            continue
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[name] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
    return out


def _fmt(value) -> str:
    if isinstance(value, Mapping):
        mean, std = value.get("mean"), value.get("std")
        if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
            return "n/a"
        return f"{mean:.3f} ± {std:.3f}" if value.get("n", 1) > 1 else f"{mean:.3f}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def markdown_table(metrics: Mapping[str, object], names: Optional[Iterable[str]] = None) -> str:
    """Two-column table ``| metric | value |`` for one evaluation."""
    names = [n for n in (names or TABLE_METRICS) if n in metrics]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(metrics[name])} |" for name in names]
    return "\n".join(lines)


def comparison_table(arms: Mapping[str, Mapping[str, object]], names: Optional[Iterable[str]] = None) -> str:
    """One row per arm, one column per metric; cells ``mean ± std`` (or plain numbers)."""
    present = [n for n in (names or TABLE_METRICS) if any(n in m for m in arms.values())]
    lines = ["| arm | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for arm, metrics in arms.items():
        lines.append(f"| {arm} | " + " | ".join(_fmt(metrics.get(n)) for n in present) + " |")
    return "\n".join(lines)


def paired_table(paired: Mapping[str, Mapping[str, Mapping[str, Number]]]) -> str:
    """Markdown: one row per contrast and metric of ``{"a - b": {metric: stats}}`` (stats as
    :func:`synthunlearn.evaluation.statistics.paired_difference` returns them): mean difference ±
    standard error over seeds, the 95 % paired t-interval, the seeds on each side, and, where the
    stats carry it, the prompt-sampling standard error (``prompt_se``: the part of the error the
    fixed prompt set adds, which no number of seeds removes)."""
    def num(x, sign="+"):
        return "n/a" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:{sign}.3f}"

    lines = ["| contrast (a - b) | metric | mean ± se (seeds) | 95 % interval | seeds a > b / a < b / equal "
             "| prompt-sampling se |",
             "|---|---|---|---|---|---|"]
    for contrast, metrics in paired.items():
        for metric, st in metrics.items():
            prompts = (f"{num(st['prompt_se'], '')} ({st.get('n_prompts', '?')} prompts)"
                       if "prompt_se" in st else "n/a")
            lines.append(f"| {contrast} | {metric} | {num(st['mean'])} ± {num(st['se'], '')} | "
                         f"[{num(st['ci_low'])}, {num(st['ci_high'])}] | "
                         f"{st['a_higher']} / {st['b_higher']} / {st['ties']} | {prompts} |")
    return "\n".join(lines)


def plot_headline(arms: Mapping[str, Mapping[str, object]], path, names: Sequence[str] = HEADLINE_METRICS,
                  title: str = "Pattern overfitting and its mitigation") -> Path:
    """One PNG: a panel per metric, one bar per arm (mean, with std error bars when given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if any(n in m for m in arms.values())]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.2 * max(len(names), 1), 3.4), squeeze=False)
    arm_names = list(arms)
    colors = plt.get_cmap("tab10").colors
    for axis, name in zip(axes[0], names):
        means, errors = [], []
        for arm in arm_names:
            value = arms[arm].get(name)
            if isinstance(value, Mapping):
                mean, std = value.get("mean"), value.get("std") or 0.0
            else:
                mean, std = value, 0.0
            means.append(mean if isinstance(mean, (int, float)) and math.isfinite(mean) else 0.0)
            errors.append(std if isinstance(std, (int, float)) and math.isfinite(std) else 0.0)
        axis.bar(range(len(arm_names)), means, yerr=errors, capsize=3,
                 color=[colors[i % len(colors)] for i in range(len(arm_names))])
        axis.set_xticks(range(len(arm_names)))
        axis.set_xticklabels(arm_names, rotation=30, ha="right", fontsize=8)
        axis.set_title(METRIC_LABELS.get(name, name), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
