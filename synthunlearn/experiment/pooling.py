"""Pooling experiment runs that ran different seeds of one study.

Seeds of one study are often run as separate invocations (a SLURM array, two machines, a later
run that adds seeds). Each writes its own ``results.json``; this module merges their per-seed
metrics into one summary, as if one invocation had run every seed:

- the runs must be the same experiment: their configs must agree on every key except the ones
  that only say where or how fast it ran or which seeds and arms it covered
  (:data:`RUN_ONLY_KEYS`); the first differing key is named, with both files;
- a (arm, seed) may come from one run only: a seed twice is a second draw of the same model, not
  a new seed, and would weigh it double;
- each run trained its own shared base (same model seed, same data): equal up to floating-point
  summation order on the same code, which is what makes the seeds exchangeable.

The pooled ``results.json`` has the schema of a run's (``arms``, ``predictions``, ``paired``,
``per_seed``, ``unlearning``, ``phase_environments`` with each phase named by its run directory)
plus ``pooled_from``; its ``compute_seconds`` sums the runs'. The paired IF contrasts carry the
prompt-sampling error when every pooled seed's evaluation is still in its run directory (same
configs, so the same prompts).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from synthunlearn import environment
from synthunlearn.errors import ConfigError, DataError, UserError
from synthunlearn.experiment.config import ALL_ARMS, DEFAULTS, deep_merge
from synthunlearn.experiment.pipeline import evaluated_phase_name
from synthunlearn.experiment.results import (check_predictions, evaluation_prompt_hits, paired_contrasts,
                                             summarise, write_outputs)

# Config keys that differ between runs of one study without changing any trained model
# (``reuse_from`` only says where finished phases were taken from: same commands, same inputs).
RUN_ONLY_KEYS = ("output_dir", "reuse_from", "seeds", "ablation_seeds", "arms", "parallel_jobs", "omp_threads")


def _flatten(value, prefix: str = "") -> Dict[str, object]:
    if isinstance(value, dict):
        out: Dict[str, object] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def load_run(run_dir) -> dict:
    """``<run_dir>/results.json``, checked for what pooling needs."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{path}: no results.json (is {run_dir} an experiment's output_dir?)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    for key in ("config", "per_seed"):
        if not isinstance(results.get(key), dict):
            raise DataError(f"{path}: no '{key}' mapping (written by an older synthunlearn?)")
    results["_path"] = str(path)
    return results


def _comparable(config: dict) -> Dict[str, object]:
    """A run's config flattened, over today's defaults: a key added to the pipeline after the run
    was written has the default that keeps the old behaviour, so its absence is not a difference."""
    return {k: v for k, v in _flatten(deep_merge(DEFAULTS, config)).items() if k.split(".")[0] not in RUN_ONLY_KEYS}


def _check_same_experiment(reference: dict, other: dict) -> None:
    ref, new = _comparable(reference["config"]), _comparable(other["config"])
    for key in sorted(set(ref) | set(new)):
        if ref.get(key, "<absent>") != new.get(key, "<absent>"):
            raise ConfigError(
                f"{other['_path']}: config key '{key}' is {new.get(key, '<absent>')!r} but "
                f"{reference['_path']} has {ref.get(key, '<absent>')!r}: only runs of the same experiment "
                f"pool (they may differ in {', '.join(RUN_ONLY_KEYS)})")


def pool_runs(runs: Sequence[dict]) -> dict:
    """Merged results of :func:`load_run` outputs (at least one)."""
    if not runs:
        raise ConfigError("pooling needs at least one run directory")
    for run in runs[1:]:
        _check_same_experiment(runs[0], run)
    per_seed: Dict[str, Dict[int, dict]] = {}
    prompt_hits: Dict[str, Dict[int, List[int]]] = {}
    source: Dict[tuple, str] = {}
    unlearning: Dict[str, Dict[str, dict]] = {}
    for run in runs:
        for arm, seeds in run["per_seed"].items():
            for seed, metrics in seeds.items():
                key = (arm, int(seed))
                if key in source:
                    raise ConfigError(f"arm '{arm}' seed {seed} is in both {source[key]} and {run['_path']}: "
                                      "a seed may come from one run only")
                source[key] = run["_path"]
                per_seed.setdefault(arm, {})[int(seed)] = metrics
                run_dir = Path(run["_path"]).parent
                # Where that run evaluated the arm (the after-SFT arms end in an unlearning phase).
                hits = evaluation_prompt_hits(run_dir / evaluated_phase_name(int(seed), arm) / "eval.json",
                                              run_dir / "eval_sets")
                if hits is not None:
                    prompt_hits.setdefault(arm, {})[int(seed)] = hits
        for arm, seeds in (run.get("unlearning") or {}).items():
            unlearning.setdefault(arm, {}).update(seeds)
    arm_names = [a for a in ALL_ARMS if a in per_seed] + [a for a in per_seed if a not in ALL_ARMS]
    seeds = sorted({seed for arm_seeds in per_seed.values() for seed in arm_seeds})
    cfg = copy.deepcopy(runs[0]["config"])
    cfg.update(seeds=seeds, arms=arm_names)
    arms = summarise(cfg, per_seed)
    return {
        "seeds": seeds,
        "pooled_from": [run["_path"] for run in runs],
        "compute_seconds": sum(float(run.get("compute_seconds") or 0.0) for run in runs),
        "arms": arms,
        "predictions": check_predictions(arms),
        "paired": paired_contrasts(per_seed, prompt_hits),
        "per_seed": {arm: {str(s): m for s, m in sorted(runs_.items())} for arm, runs_ in per_seed.items()},
        "unlearning": unlearning,
        "phase_environments": environment.group_by_environment(
            (_in_run(name, Path(run["_path"]).parent), group["environment"])
            for run in runs for group in run.get("phase_environments") or [] for name in group["phases"]),
        "config": cfg,
    }


def _in_run(name: str, run_dir: Path) -> str:
    """A run's phase or evaluation name (``seed0/sft/x``, ``eval:seed0/sft/x``) with its directory."""
    kind, _, phase = name.rpartition(":")
    return f"{kind + ':' if kind else ''}{run_dir}/{phase}"


def pool_run_dirs(run_dirs: Sequence, output_dir) -> Tuple[dict, str]:
    """Loads every run, pools them and writes ``results.json``/``.md``/``.png`` in ``output_dir``;
    returns the results and the text of ``results.md``."""
    results = pool_runs([load_run(d) for d in run_dirs])
    out = Path(output_dir)
    _check_output_dir(out, run_dirs)
    results["config"]["output_dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    return results, write_outputs(results, out)


def _check_output_dir(out: Path, run_dirs: Sequence) -> None:
    """The pooled table may replace an earlier pooled table, never a run's own results: those are
    what a later pooling (or a reader of that run) needs, and rewriting them cannot be undone."""
    if any(out.resolve() == Path(d).resolve() for d in run_dirs):
        raise UserError(f"--output-dir {out}: is one of the runs being pooled; writing the pooled "
                        "table there would replace that run's results.json: choose another directory")
    existing = out / "results.json"
    if existing.is_file():
        try:
            data = json.loads(existing.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        pooled = isinstance(data, dict) and "pooled_from" in data
        if not pooled:
            raise UserError(f"--output-dir {out}: {existing} is not a pooled table (an experiment's "
                            "own results?); it would be replaced: choose another directory")


def pooled_header(results: dict) -> List[str]:
    """The results.md header of pooled results (a run's own says its wall time instead)."""
    return [f"seeds {results['seeds']} pooled from {len(results['pooled_from'])} runs "
            f"({', '.join(results['pooled_from'])}); mean ± std over seeds; "
            f"{results.get('compute_seconds', 0):.0f} s of phases and evaluations in all"]
