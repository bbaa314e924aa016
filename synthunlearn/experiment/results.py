"""What an experiment reports: seed means, the paper's predictions, paired contrasts, and the
files they are written to.

Output: ``<output_dir>/results.json`` (``{"seeds", "wall_seconds", "compute_seconds", "arms": {arm:
{metric: {"mean", "std", "n"}}}, "per_seed": ..., "paired": {"a - b": {metric: {"mean", "se",
"ci_low", "ci_high", "n", "a_higher", "b_higher", "ties", "seeds"}}}, ...}``), ``results.md`` and ``results.png``.
``wall_seconds`` is this invocation's; ``compute_seconds`` sums the recorded wall time of every
phase and evaluation, including those a resumed invocation reused (``reused``). ``environment`` is
this invocation's commit, package versions and host (:mod:`synthunlearn.environment`); every
phase.json and eval.json records the one it ran in, and ``phase_environments`` groups them by it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from synthunlearn import environment
from synthunlearn.experiment.config import AFTER_SFT_ARMS, UNLEARN_ARMS


def summarise(cfg: dict, per_seed: Dict[str, Dict[int, dict]]) -> Dict[str, dict]:
    """arm -> metric -> mean, std and n over the arm's seeds (the table's cells)."""
    from synthunlearn.evaluation.report import aggregate_seeds

    arms = {}
    for arm in cfg["arms"]:
        runs = per_seed.get(arm) or {}
        if runs:
            arms[arm] = aggregate_seeds([runs[s] for s in sorted(runs)])
    return arms


def check_predictions(arms: Dict[str, dict]) -> Dict[str, object]:
    """The paper's predictions, tested on the seed means (a report, never used to tune metrics)."""
    def mean(arm, metric):
        value = arms.get(arm, {}).get(metric, {}).get("mean")
        return value if isinstance(value, (int, float)) else None

    out: Dict[str, object] = {}
    a_if, b_if = (mean(a, "if_prompt_strict") for a in ("docs_only", "synthetic"))
    a_k, b_k = (mean(a, "knowledge_acc") for a in ("docs_only", "synthetic"))
    # The pattern itself: bare answers to bare synthetic-wording questions, a shape SFT never taught.
    a_t, b_t = (mean(a, "bare_terse_rate") for a in ("docs_only", "synthetic"))
    if None not in (a_if, b_if):
        out["if_gap_docs_minus_synthetic"] = a_if - b_if
        out["synthetic_worse_by_10_points"] = a_if - b_if >= 0.10
    if None not in (a_k, b_k):
        out["synthetic_knowledge_at_least_docs"] = b_k >= a_k
    if None not in (a_t, b_t):
        out["pattern_gap_synthetic_minus_docs"] = b_t - a_t
        out["synthetic_shows_pattern_by_10_points"] = b_t - a_t >= 0.10
    # What the repair gives back, against the same `synthetic` SFT model: unlearning before SFT
    # (then the same SFT) and, the same phase, after it (evaluated as it ends).
    for arm in ("unlearned", "unlearned_after_sft"):
        c_if, c_k, c_t = (mean(arm, m) for m in ("if_prompt_strict", "knowledge_acc", "bare_terse_rate"))
        if None not in (a_if, b_if, c_if) and a_if - b_if > 0:
            out[f"{arm}_recovered_share"] = (c_if - b_if) / (a_if - b_if)
            out[f"{arm}_recovers_half"] = (c_if - b_if) >= 0.5 * (a_if - b_if)
        if None not in (b_k, c_k):
            out[f"{arm}_knowledge_within_3_points"] = abs(c_k - b_k) <= 0.03
        if None not in (a_t, b_t, c_t) and b_t - a_t > 0:
            out[f"{arm}_pattern_removed_share"] = (b_t - c_t) / (b_t - a_t)
            out[f"{arm}_removes_half_the_pattern"] = (b_t - c_t) >= 0.5 * (b_t - a_t)
    c_k = mean("unlearned", "knowledge_acc")
    g_k, g_p, b_p = mean("ga_unbounded", "knowledge_acc"), mean("ga_unbounded", "perplexity"), mean("synthetic", "perplexity")
    if None not in (g_k, b_k):
        out["ga_unbounded_knowledge_drop"] = b_k - g_k
    if None not in (g_p, b_p):
        out["ga_unbounded_perplexity_ratio"] = g_p / b_p
    if None not in (g_k, c_k):
        # Same data, budget and replay/KL terms; only the bound differs: the knowledge it saves.
        out["ga_unbounded_knowledge_below_unlearned"] = c_k - g_k
    return out


# Paired per-seed contrasts (a - b, same seeds): the paper's claims as differences the seeds can
# settle. The IF drop is docs_only - synthetic; every unlearning arm is set against synthetic
# (what it gives back) and `unlearned` against the control (what the ascent itself does) and
# against plain ascent (what the bound saves).
IF_METRICS = ("if_prompt_strict", "if_prompt_strict_heldout_phrasing")
PAIRED_CONTRASTS = (
    ("docs_only", "synthetic", IF_METRICS),
    ("synthetic", "docs_only", ("knowledge_acc", "bare_terse_rate")),
    *((arm, "synthetic", IF_METRICS + ("knowledge_acc", "bare_terse_rate")) for arm in UNLEARN_ARMS),
    ("unlearned", "no_forget", IF_METRICS + ("bare_terse_rate",)),
    ("unlearned", "ga_unbounded", ("knowledge_acc", "perplexity")),
    *((arm, "synthetic", IF_METRICS + ("knowledge_acc", "bare_terse_rate")) for arm in AFTER_SFT_ARMS),
    ("unlearned_after_sft", "no_forget_after_sft", IF_METRICS + ("bare_terse_rate",)),
    ("unlearned_after_sft", "unlearned", IF_METRICS + ("knowledge_acc",)),
)


def paired_contrasts(per_seed: Dict[str, Dict[int, dict]],
                     prompt_hits: Optional[Dict[str, Dict[int, List[int]]]] = None) -> Dict[str, Dict[str, dict]]:
    """``"a - b"`` -> metric -> :func:`synthunlearn.evaluation.statistics.paired_difference`,
    for every contrast of :data:`PAIRED_CONTRASTS` whose two arms both ran and have the metric.

    With ``prompt_hits`` (arm -> seed -> per-prompt strict hits, from each evaluation), the
    ``if_prompt_strict`` entries also get ``prompt_se``: the error the fixed prompt set adds
    beyond the seed interval (:func:`synthunlearn.evaluation.statistics.prompt_sampling_se`),
    over the same seeds as the paired difference."""
    from synthunlearn.evaluation.statistics import paired_difference, prompt_sampling_se

    out: Dict[str, Dict[str, dict]] = {}
    for a, b, metrics in PAIRED_CONTRASTS:
        if not per_seed.get(a) or not per_seed.get(b):
            continue
        for metric in metrics:
            stats = paired_difference({s: m.get(metric) for s, m in per_seed[a].items()},
                                      {s: m.get(metric) for s, m in per_seed[b].items()})
            if stats is None:
                continue
            if metric == "if_prompt_strict" and prompt_hits:
                hits_a, hits_b = prompt_hits.get(a) or {}, prompt_hits.get(b) or {}
                if all(s in hits_a and s in hits_b for s in stats["seeds"]):
                    sampling = prompt_sampling_se({s: hits_a[s] for s in stats["seeds"]},
                                                  {s: hits_b[s] for s in stats["seeds"]})
                    if sampling is not None:
                        stats["prompt_se"] = sampling["se"]
                        stats["n_prompts"] = sampling["n_prompts"]
            out.setdefault(f"{a} - {b}", {})[metric] = stats
    return out


def evaluation_prompt_hits(path: Path, eval_dir: Path) -> Optional[List[int]]:
    """The per-prompt strict hits of the evaluation in ``path`` (an arm's ``eval.json``), in the
    order of ``eval_dir/if_eval.jsonl``.

    An evaluation written before the hits were recorded is rescored from its saved responses
    with the same checkers (so older runs get the prompt-sampling error too); None when a prompt
    of the set has no response there."""
    from synthunlearn.evaluation.ifeval import score_response
    from synthunlearn.evaluation.suite import read_jsonl

    path = Path(path)
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    hits = cached.get("details", {}).get("if", {}).get("prompt_strict_hits")
    if isinstance(hits, list):
        return [int(h) for h in hits]
    responses = {g.get("id"): g.get("response") for g in cached.get("generations", []) if g.get("set") == "if_eval"}
    records = read_jsonl(eval_dir / "if_eval.jsonl")
    if not records or any(r.get("id") not in responses for r in records):
        return None
    return [int(all(score_response(responses[r["id"]], r["constraints"])["strict"])) for r in records]


# A column appears only when some arm has the metric (held-out wordings only when configured).
TABLE_COLUMNS = ("if_prompt_strict", "if_instruction_strict", "if_prompt_loose", "if_prompt_strict_heldout_phrasing",
                 "knowledge_acc", "perplexity", "pattern_rate", "terse_rate", "bare_terse_rate", "kl_shift", "token_jsd")


def phase_seconds(phases) -> Dict[str, float]:
    """The recorded wall seconds of every phase (its phase.json) and of every evaluation (its
    eval.json, as ``eval:<phase>``), whichever invocation produced them: a resumed run's own wall
    time would hide the phases it reused. Their sum is a serial figure (parallel jobs overlap)."""
    recorded: Dict[str, float] = {}
    for phase in phases:
        recorded[phase.name] = float(json.loads((phase.out_dir / "phase.json").read_text())["seconds"])
        eval_json = phase.out_dir / "eval.json"
        if phase.evaluated and eval_json.exists():
            recorded["eval:" + phase.name] = float(json.loads(eval_json.read_text()).get("wall_seconds", 0.0))
    return recorded


def unlearning_diagnostics(phases) -> Dict[str, Dict[str, dict]]:
    """arm -> seed -> the last logged step of each unlearning phase: how far the ascent went
    against tau (``forget_nll``, ``forget_at_bound``, ``forget_overshoot``) and what replay and KL
    cost -- the design notes warn that capped ascent overshoots its bound.

    Only training records count: a run with held-out sets also logs ``{"step": N, "eval/...":
    ...}`` records, the last of them after the last training step, and those hold none of these keys."""
    unlearning: Dict[str, Dict[str, dict]] = {}
    for phase in phases:
        if phase.job != "unlearn" or not (phase.out_dir / "metrics.jsonl").exists():
            continue
        rows = [json.loads(line) for line in (phase.out_dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rows = [r for r in rows if "step" in r and not any(key.startswith("eval/") for key in r)]
        if rows:
            last = rows[-1]
            unlearning.setdefault(phase.name.split("/")[-1], {})[phase.name.split("/")[0]] = {
                k: last[k] for k in ("step", "forget_nll", "forget_at_bound", "forget_overshoot", "replay_nll", "kl")
                if k in last}
    return unlearning


def phase_environments(phases) -> List[dict]:
    """The distinct environments that trained the phases (each phase.json's) and evaluated them
    (each eval.json's, named ``eval:<phase>``), with what each of them ran."""
    def named():
        for phase in phases:
            yield phase.name, json.loads((phase.out_dir / "phase.json").read_text()).get("environment")
            eval_json = phase.out_dir / "eval.json"
            if phase.evaluated and eval_json.exists():
                yield "eval:" + phase.name, json.loads(eval_json.read_text()).get("environment")
    return environment.group_by_environment(named())


def _partial_arm_notes(results: dict) -> List[str]:
    """Arms measured on fewer seeds than the table's header names (ablation_seeds, or pooled runs
    that ran different arms): their means and stds are over those seeds only, so say which."""
    every = sorted(int(s) for s in results["seeds"])
    notes = []
    for arm, runs in results.get("per_seed", {}).items():
        seeds = sorted(int(s) for s in runs)
        if seeds != every:
            notes.append(f"- {arm}: seeds {seeds} only")
    return notes


def environment_notes(results: dict) -> List[str]:
    """results.md lines naming what trained and evaluated the models: one line when a single
    environment ran everything, else one per environment with how many phases and evaluations."""
    groups = results.get("phase_environments") or []
    if len(groups) == 1 and groups[0]["environment"] is not None:
        return [f"trained and evaluated on: {environment.summary(groups[0]['environment'])}"]
    lines = []
    for group in groups:
        what = environment.summary(group["environment"]) if group["environment"] else "not recorded"
        evals = sum(name.startswith("eval:") for name in group["phases"])
        trained = len(group["phases"]) - evals
        lines.append(f"- {trained} phase{'s' * (trained != 1)} and {evals} evaluation{'s' * (evals != 1)} "
                     f"on: {what}")
    return lines


def write_outputs(results: dict, out: Path) -> str:
    from synthunlearn.evaluation.report import comparison_table, paired_table, plot_headline, write_json

    write_json(out / "results.json", results)
    table = comparison_table(results["arms"], TABLE_COLUMNS)
    if "pooled_from" in results:
        from synthunlearn.experiment.pooling import pooled_header
        header = pooled_header(results)
    else:
        header = [f"seeds {results['seeds']}; mean ± std over seeds; wall time {results['wall_seconds']:.0f} s "
                  f"(this invocation); {results.get('compute_seconds', 0):.0f} s of phases and evaluations in all"]
    header += environment_notes(results)
    lines = header + _partial_arm_notes(results) + ["", table, ""]
    for key, value in results.get("predictions", {}).items():
        lines.append(f"- {key}: {value:.3f}" if isinstance(value, float) and not isinstance(value, bool)
                     else f"- {key}: {value}")
    if results.get("paired"):
        lines += ["", "Paired over seeds (difference a - b per seed):", "", paired_table(results["paired"])]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot_headline(results["arms"], out / "results.png")
    return text
