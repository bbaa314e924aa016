"""Pooling runs that ran different seeds of one study (launch/pool_results.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from synthunlearn.errors import ConfigError, DataError
from synthunlearn.evaluation.report import aggregate_seeds, write_json
from synthunlearn.evaluation.statistics import paired_difference
from synthunlearn.experiment.config import load_experiment_config
from synthunlearn.experiment.pooling import pool_run_dirs
from tests.launcher import REPO

CONFIG = REPO / "configs" / "experiment" / "demo.yaml"


def _metrics(if_strict, knowledge, bare):
    return {"if_prompt_strict": if_strict, "knowledge_acc": knowledge, "bare_terse_rate": bare}


def _env(commit):
    return {"commit": commit, "python": "3.11.7", "platform": "Linux", "cpu": "Test CPU", "cpus": 2, "gpu": None,
            "packages": {"torch": "2.13.0+cpu", "deepspeed": "0.19.8", "transformers": "5.23.0", "numpy": "2.4.6"}}


def _write_run(path, seeds, per_seed, *overrides, compute=100.0, environments=()):
    cfg = load_experiment_config(CONFIG, [f"output_dir={path}", f"seeds={list(seeds)}", *overrides])
    results = {"seeds": list(seeds), "wall_seconds": compute, "compute_seconds": compute, "config": cfg,
               "per_seed": {arm: {str(s): m for s, m in runs.items()} for arm, runs in per_seed.items()},
               "unlearning": {"unlearned": {f"seed{s}": {"forget_nll": 5.0 + s} for s in seeds}},
               "phase_environments": [{"environment": env, "phases": phases} for env, phases in environments]}
    write_json(path / "results.json", results)
    return path


@pytest.fixture
def two_runs(tmp_path):
    first = {"docs_only": {0: _metrics(0.50, 0.40, 0.0), 1: _metrics(0.42, 0.44, 0.0)},
             "synthetic": {0: _metrics(0.40, 0.45, 0.6), 1: _metrics(0.40, 0.47, 0.3)},
             "unlearned": {0: _metrics(0.47, 0.44, 0.1), 1: _metrics(0.41, 0.46, 0.0)}}
    # The second run also ran the control, and on a different number of parallel jobs.
    second = {"docs_only": {5: _metrics(0.38, 0.41, 0.0)}, "synthetic": {5: _metrics(0.35, 0.43, 0.5)},
              "unlearned": {5: _metrics(0.37, 0.42, 0.2)}, "no_forget": {5: _metrics(0.34, 0.43, 0.5)}}
    # Run b's SFT was trained at a later commit than everything else.
    a = _write_run(tmp_path / "a", [0, 1], first,
                   environments=[(_env("a" * 40), ["base", "seed0/sft/synthetic", "eval:seed0/sft/synthetic"])])
    b = _write_run(tmp_path / "b", [5], second, "parallel_jobs=1", "omp_threads=2",
                   "arms=[docs_only,synthetic,unlearned,no_forget]", compute=40.0,
                   environments=[(_env("a" * 40), ["base"]), (_env("b" * 40 + "-dirty"), ["seed5/sft/synthetic"])])
    return a, b, first, second


def test_pooled_results_equal_one_run_over_every_seed(two_runs, tmp_path):
    a, b, first, second = two_runs
    results, text = pool_run_dirs([a, b], tmp_path / "pooled")
    assert results["seeds"] == [0, 1, 5]
    assert list(results["arms"]) == ["docs_only", "synthetic", "unlearned", "no_forget"]
    for arm in ("docs_only", "synthetic", "unlearned"):
        merged = [first[arm][0], first[arm][1], second[arm][5]]
        assert results["arms"][arm] == aggregate_seeds(merged)
    assert results["arms"]["no_forget"]["if_prompt_strict"]["n"] == 1
    assert "- no_forget: seeds [5] only" in text and "- docs_only: seeds" not in text
    drop = results["paired"]["docs_only - synthetic"]["if_prompt_strict"]
    assert drop == paired_difference({0: 0.50, 1: 0.42, 5: 0.38}, {0: 0.40, 1: 0.40, 5: 0.35})
    assert results["paired"]["unlearned - no_forget"]["if_prompt_strict"]["seeds"] == [5]
    assert results["predictions"]["if_gap_docs_minus_synthetic"] == pytest.approx((1.30 - 1.15) / 3)
    assert results["compute_seconds"] == pytest.approx(140.0)
    assert set(results["unlearning"]["unlearned"]) == {"seed0", "seed1", "seed5"}
    on_disk = json.loads((tmp_path / "pooled" / "results.json").read_text())
    assert on_disk["pooled_from"] == [str(a / "results.json"), str(b / "results.json")]
    assert on_disk["per_seed"]["synthetic"]["5"]["bare_terse_rate"] == 0.5
    md = (tmp_path / "pooled" / "results.md").read_text()
    assert md == text and "pooled from 2 runs" in md and "| docs_only - synthetic | if_prompt_strict |" in md
    assert (tmp_path / "pooled" / "results.png").stat().st_size > 0
    # Which environment trained which run's phases.
    assert results["phase_environments"] == [
        {"environment": _env("a" * 40),
         "phases": [f"{a}/base", f"{a}/seed0/sft/synthetic", f"eval:{a}/seed0/sft/synthetic", f"{b}/base"]},
        {"environment": _env("b" * 40 + "-dirty"), "phases": [f"{b}/seed5/sft/synthetic"]}]
    assert ("- 3 phases and 1 evaluation on: commit aaaaaaaaaaaa; torch 2.13.0+cpu, deepspeed 0.19.8, "
            "transformers 5.23.0, numpy 2.4.6; Test CPU, 2 CPUs") in md
    assert "- 1 phase and 0 evaluations on: commit bbbbbbbbbbbb-dirty;" in md


def test_runs_of_different_experiments_do_not_pool(two_runs, tmp_path):
    a, _, first, _ = two_runs
    other = _write_run(tmp_path / "c", [7], {"docs_only": {7: _metrics(0.3, 0.3, 0.0)}}, "phases.sft.max_steps=31")
    with pytest.raises(ConfigError, match=r"c/results.json: config key 'phases.sft.max_steps' is 31 but .*a/results"
                                          r".json has 30"):
        pool_run_dirs([a, other], tmp_path / "pooled")
    assert not (tmp_path / "pooled").exists()          # nothing written on a refusal


def test_runs_branched_with_reuse_from_or_written_before_a_new_key_pool(two_runs, tmp_path):
    """``reuse_from`` trains nothing differently, and a run written before a config key existed
    ran with the default that key now has: neither is a different experiment."""
    a, b, _, _ = two_runs
    c = _write_run(tmp_path / "c", [7], {"docs_only": {7: _metrics(0.3, 0.3, 0.0)}}, f"reuse_from={a}")
    old = json.loads((b / "results.json").read_text())
    del old["config"]["phases"]["unlearn_after_sft"]
    write_json(b / "results.json", old)
    results, _ = pool_run_dirs([a, b, c], tmp_path / "pooled")
    assert results["seeds"] == [0, 1, 5, 7]
    # A key set away from its default still differs from a run that lacks it.
    d = _write_run(tmp_path / "d", [8], {"docs_only": {8: _metrics(0.3, 0.3, 0.0)}},
                   "phases.unlearn_after_sft.max_steps=9")
    with pytest.raises(ConfigError, match="config key 'phases.unlearn_after_sft.max_steps' is 9 but .* has None"):
        pool_run_dirs([b, d], tmp_path / "pooled2")


def test_a_seed_from_two_runs_is_refused(two_runs, tmp_path):
    a, _, first, _ = two_runs
    again = _write_run(tmp_path / "again", [1], {"synthetic": {1: _metrics(0.4, 0.47, 0.3)}})
    with pytest.raises(ConfigError, match="arm 'synthetic' seed 1 is in both .*a/results.json and .*again/results.json"):
        pool_run_dirs([a, again], tmp_path / "pooled")


def test_unreadable_runs_are_named(tmp_path):
    with pytest.raises(DataError, match="nowhere/results.json: no results.json"):
        pool_run_dirs([tmp_path / "nowhere"], tmp_path / "pooled")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"config": {},\n "per_seed": }')
    with pytest.raises(DataError, match="broken/results.json: line 2: not valid JSON"):
        pool_run_dirs([broken], tmp_path / "pooled")
    (broken / "results.json").write_text('{"seeds": [0]}')
    with pytest.raises(DataError, match="no 'config' mapping"):
        pool_run_dirs([broken], tmp_path / "pooled")


def test_pool_results_cli(two_runs, tmp_path):
    a, b, _, _ = two_runs
    script = str(REPO / "launch" / "pool_results.py")
    proc = subprocess.run([sys.executable, script, str(a), str(b), "--output-dir", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| unlearned - synthetic | if_prompt_strict |" in proc.stdout
    proc = subprocess.run([sys.executable, script, str(a), str(a), "--output-dir", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: arm 'docs_only' seed 0 is in both" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A pooled table may replace an earlier pooled table, never a run's own results.
    proc = subprocess.run([sys.executable, script, str(a), str(b), "--output-dir", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    own = {run: (run / "results.json").read_bytes() for run in (a, b)}
    proc = subprocess.run([sys.executable, script, str(a), str(b), "--output-dir", str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is one of the runs being pooled" in proc.stderr, proc.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_bytes(own[a])
    proc = subprocess.run([sys.executable, script, str(a), str(b), "--output-dir", str(other)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "is not a pooled table" in proc.stderr, proc.stderr
    assert {run: (run / "results.json").read_bytes() for run in (a, b)} == own
    assert (other / "results.json").read_bytes() == own[a]


def test_pooled_contrasts_of_the_after_sft_arms_carry_the_prompt_sampling_error(tmp_path):
    """An after-SFT arm ends in an unlearning phase and is evaluated there
    (seed<N>/unlearn/<arm>/eval.json, not sft/<arm>): pooling finds its per-prompt hits, so its
    contrasts have the prompt-sampling error one run over every seed gives them."""
    from synthunlearn.experiment.results import paired_contrasts

    hits = {"synthetic": [1, 0, 0, 1, 0, 0], "unlearned_after_sft": [1, 1, 0, 1, 1, 0]}
    evaluated_in = {"synthetic": "sft", "unlearned_after_sft": "unlearn"}
    per_seed, prompt_hits = {}, {}
    runs = []
    for name, seeds in (("a", [0, 1]), ("b", [2])):
        run = tmp_path / name
        for arm, arm_hits in hits.items():
            for seed in seeds:
                seed_hits = arm_hits[seed:] + arm_hits[:seed]
                write_json(run / f"seed{seed}" / evaluated_in[arm] / arm / "eval.json",
                           {"details": {"if": {"prompt_strict_hits": seed_hits}}})
                per_seed.setdefault(arm, {})[seed] = {"if_prompt_strict": sum(seed_hits) / len(seed_hits)}
                prompt_hits.setdefault(arm, {})[seed] = seed_hits
        runs.append(_write_run(run, seeds, {arm: {s: per_seed[arm][s] for s in seeds} for arm in hits},
                               "arms=[synthetic,unlearned_after_sft]"))
    results, _ = pool_run_dirs(runs, tmp_path / "pooled")
    pooled = results["paired"]["unlearned_after_sft - synthetic"]["if_prompt_strict"]
    assert pooled["n_prompts"] == 6
    assert pooled == paired_contrasts(per_seed, prompt_hits)["unlearned_after_sft - synthetic"]["if_prompt_strict"]
