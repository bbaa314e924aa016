"""What an experiment reports, computed from given per-seed metrics: the paper's predictions,
paired contrasts with the prompt-sampling error, and per-prompt hits (synthunlearn/experiment/results.py)."""

from __future__ import annotations

import json

import pytest


def test_predictions_are_computed_from_the_seed_means():
    from synthunlearn.experiment.results import check_predictions

    def arm(if_strict, knowledge, bare, perplexity=10.0):
        return {"if_prompt_strict": {"mean": if_strict}, "knowledge_acc": {"mean": knowledge},
                "bare_terse_rate": {"mean": bare}, "perplexity": {"mean": perplexity}}

    out = check_predictions({"docs_only": arm(0.60, 0.40, 0.00), "synthetic": arm(0.45, 0.42, 0.60),
                             "unlearned": arm(0.50, 0.41, 0.10), "ga_unbounded": arm(0.30, 0.30, 0.0, 20.0)})
    assert out["if_gap_docs_minus_synthetic"] == pytest.approx(0.15) and out["synthetic_worse_by_10_points"]
    assert out["synthetic_knowledge_at_least_docs"] and out["unlearned_knowledge_within_3_points"]
    assert out["unlearned_recovered_share"] == pytest.approx(1 / 3) and not out["unlearned_recovers_half"]
    assert out["pattern_gap_synthetic_minus_docs"] == pytest.approx(0.60)
    assert out["unlearned_pattern_removed_share"] == pytest.approx(5 / 6) and out["unlearned_removes_half_the_pattern"]
    assert out["ga_unbounded_knowledge_drop"] == pytest.approx(0.12)
    assert out["ga_unbounded_perplexity_ratio"] == pytest.approx(2.0)
    assert out["ga_unbounded_knowledge_below_unlearned"] == pytest.approx(0.11)
    assert not any(key.startswith("unlearned_after_sft") for key in out)
    after = check_predictions({"docs_only": arm(0.60, 0.40, 0.00), "synthetic": arm(0.45, 0.42, 0.60),
                               "unlearned_after_sft": arm(0.54, 0.38, 0.15)})
    assert after["unlearned_after_sft_recovered_share"] == pytest.approx(0.6) and after["unlearned_after_sft_recovers_half"]
    assert not after["unlearned_after_sft_knowledge_within_3_points"]
    assert after["unlearned_after_sft_pattern_removed_share"] == pytest.approx(0.75)
    # No gap: no recovery share is reported (it would divide by zero or flip sign).
    flat = check_predictions({"docs_only": arm(0.5, 0.4, 0.2), "synthetic": arm(0.55, 0.4, 0.1),
                              "unlearned": arm(0.5, 0.4, 0.1)})
    assert "unlearned_recovered_share" not in flat and "unlearned_pattern_removed_share" not in flat
    assert not flat["synthetic_worse_by_10_points"] and not flat["synthetic_shows_pattern_by_10_points"]


def test_paired_contrasts_add_the_prompt_sampling_error_when_every_seed_has_hits():
    from synthunlearn.evaluation.report import paired_table
    from synthunlearn.evaluation.statistics import prompt_sampling_se
    from synthunlearn.experiment.results import paired_contrasts

    hits = {"docs_only": {0: [1, 1, 0, 1], 1: [1, 0, 0, 1]}, "synthetic": {0: [0, 1, 0, 0], 1: [1, 0, 0, 0]}}
    per_seed = {arm: {s: {"if_prompt_strict": sum(h) / 4, "knowledge_acc": 0.5} for s, h in runs.items()}
                for arm, runs in hits.items()}
    drop = paired_contrasts(per_seed, hits)["docs_only - synthetic"]["if_prompt_strict"]
    assert drop["mean"] == pytest.approx(0.375) and drop["n_prompts"] == 4
    assert drop["prompt_se"] == prompt_sampling_se(hits["docs_only"], hits["synthetic"])["se"]
    table = paired_table(paired_contrasts(per_seed, hits))
    assert "| docs_only - synthetic | if_prompt_strict | +0.375 ± 0.125 |" in table
    # A seed without hits (an evaluation from before they were recorded): the seed interval only.
    partial = {"docs_only": hits["docs_only"], "synthetic": {0: hits["synthetic"][0]}}
    assert "prompt_se" not in paired_contrasts(per_seed, partial)["docs_only - synthetic"]["if_prompt_strict"]
    assert "prompt_se" not in paired_contrasts(per_seed)["docs_only - synthetic"]["if_prompt_strict"]
    assert "| n/a |" in paired_table(paired_contrasts(per_seed))


def test_prompt_hits_of_an_older_evaluation_are_rescored_from_its_responses(tmp_path):
    from synthunlearn.experiment.results import evaluation_prompt_hits

    eval_dir, phase_dir = tmp_path / "eval_sets", tmp_path / "seed0" / "sft" / "synthetic"
    eval_dir.mkdir()
    phase_dir.mkdir(parents=True)
    records = [{"id": "if_eval-0", "constraints": [{"type": "lowercase"}]},
               {"id": "if_eval-1", "constraints": [{"type": "quoted"}, {"type": "no_commas"}]}]
    (eval_dir / "if_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    generations = [{"id": "if_eval-1", "set": "if_eval", "response": '"a, b"'},
                   {"id": "if_eval-0", "set": "if_eval", "response": "all lower"},
                   {"id": "bq-0", "set": "bare_questions", "response": "x"}]
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {}}, "generations": generations}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) == [1, 0]   # eval set order, strict
    # Recorded hits are taken as they are; a prompt without a response gives none.
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {"prompt_strict_hits": [0, 1]}}}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) == [0, 1]
    (phase_dir / "eval.json").write_text(json.dumps({"details": {"if": {}}, "generations": generations[1:]}))
    assert evaluation_prompt_hits(phase_dir / "eval.json", eval_dir) is None



def _finished_phase(root, name, job, seconds, evaluated=False, eval_seconds=None, metrics=()):
    from synthunlearn.experiment.phases import Phase

    phase = Phase(name, job, root / name, "cfg.yaml", 10, 0, {}, [], evaluated)
    phase.out_dir.mkdir(parents=True)
    (phase.out_dir / "phase.json").write_text(json.dumps({"command": [], "seconds": seconds}))
    if eval_seconds is not None:
        (phase.out_dir / "eval.json").write_text(json.dumps({"wall_seconds": eval_seconds}))
    if metrics:
        (phase.out_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return phase


def test_phase_seconds_and_unlearning_diagnostics_read_each_phases_records(tmp_path):
    """The recorded cost of every phase and evaluation, and the last logged training step of each
    unlearning phase: the held-out evaluation a run with eval sets logs after its last step (as
    synthunlearn.training.trainer writes it) is not a training step."""
    from synthunlearn.experiment.results import phase_seconds, unlearning_diagnostics

    rows = [{"step": 0, "eval/forget_nll": 1.0, "eval/kl": 0.0}, {"step": 10, "forget_nll": 2.0, "kl": 0.1},
            {"step": 10, "eval/forget_nll": 2.5, "eval/kl": 0.1},
            {"step": 20, "forget_nll": 3.5, "forget_at_bound": 0.75, "kl": 0.2, "lr": 1e-3},
            {"step": 20, "eval/forget_nll": 3.0, "eval/kl": 0.2, "eval/forget_nll_over_tau": 1.0}]
    phases = [_finished_phase(tmp_path, "base", "sft", 100.0),
              _finished_phase(tmp_path, "seed1/unlearn/unlearned", "unlearn", 20.0, metrics=rows),
              _finished_phase(tmp_path, "seed1/sft/unlearned", "sft", 30.0, evaluated=True, eval_seconds=4.0),
              _finished_phase(tmp_path, "seed1/sft/synthetic", "sft", 0.0, evaluated=True)]
    assert phase_seconds(phases) == {"base": 100.0, "seed1/unlearn/unlearned": 20.0, "seed1/sft/unlearned": 30.0,
                                     "eval:seed1/sft/unlearned": 4.0, "seed1/sft/synthetic": 0.0}
    assert unlearning_diagnostics(phases) == {
        "unlearned": {"seed1": {"step": 20, "forget_nll": 3.5, "forget_at_bound": 0.75, "kl": 0.2}}}
