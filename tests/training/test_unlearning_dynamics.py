"""Capped ascent stops at its bound; plain ascent does not.

A tiny model first learns the bundled synthetic Q-A (forget NLL ~1.5 nats/token), then is unlearned
with the real launcher. ``capped_ga`` must raise the forget NLL to tau and then stop pushing (the
fraction of sequences at the bound goes to 1, the forget loss sits exactly at -tau), with the
replay NLL no worse than where it started plus REPLAY_MARGIN; ``ga`` must run on far past tau.
Adam's momentum carries the NLL somewhat past the bound after the gradient vanishes (the
overshoot is logged as ``forget_overshoot``); what must not happen is continued growth.
"""

from __future__ import annotations

import pytest

from tests.launcher import read_metrics, run_job

TAU = 2.5
REPLAY_MARGIN = 0.25  # nats/token the held-out replay NLL may rise while capped ascent runs
STEPS = 30
COMMON = ["logging.progress_bar=false", "checkpointing.save_steps=0"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    run_job("sft", ["--output-dir", str(out), "--max-steps", "60", "data.sft.path=builtin:tiny/forget.jsonl",
                    "data.sft.eval_path=null", "data.sft.global_batch_size=16", "optimisation.lr=3e-3",
                    *COMMON], python=True)
    return out / "final"


def unlearn(learned, out, forget):
    run_job("unlearn", ["--output-dir", str(out), "--max-steps", str(STEPS), f"model.path={learned}",
                        f"objective.forget={forget}", f"objective.tau={TAU}", "optimisation.lr=1e-3",
                        f"logging.eval_steps={STEPS}", *COMMON], python=True)
    metrics = read_metrics(out)
    steps = {m["step"]: m for m in metrics if "loss" in m}
    evals = [m for m in metrics if "eval/forget_nll" in m]
    return steps, evals[0], evals[-1]


def test_capped_ascent_stops_at_tau_and_plain_ascent_does_not(learned, tmp_path):
    capped, c_start, c_end = unlearn(learned, tmp_path / "capped", "capped_ga")
    assert c_start["eval/forget_nll"] < TAU - 0.5, "the model must have learned the forget set first"
    last = [capped[s] for s in range(STEPS - 4, STEPS + 1)]
    assert min(m["forget_at_bound"] for m in last) >= 0.9
    for m in last:
        if m["forget_at_bound"] == 1.0:
            assert m["forget_loss"] == pytest.approx(-TAU)  # constant: zero gradient
    assert c_end["eval/forget_nll"] >= TAU
    # stopped pushing: little change over the last third of the run
    late_growth = capped[STEPS]["forget_nll"] - capped[2 * STEPS // 3]["forget_nll"]
    assert late_growth < 1.0, f"capped forget NLL kept growing by {late_growth:.2f}"
    assert c_end["eval/replay_nll"] <= c_start["eval/replay_nll"] + REPLAY_MARGIN

    plain, g_start, g_end = unlearn(learned, tmp_path / "ga", "ga")
    assert g_end["eval/forget_nll"] > 2 * c_end["eval/forget_nll"]
    assert plain[STEPS]["forget_nll"] - plain[2 * STEPS // 3]["forget_nll"] > late_growth + 1.0
