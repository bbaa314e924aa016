"""Forgetting terms and the composite objective against their formulas, computed independently."""

import math

import pytest
import torch

from synthunlearn.config import ObjectiveConfig
from synthunlearn.objectives.forget import ForgetTokens, forget_term, log1mexp
from synthunlearn.objectives.objective import SET_IDS, Objective, TokenOutputs


def tokens(logps, seqs, ref=None):
    logp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    seq = torch.tensor(seqs)
    ref_t = torch.tensor(ref, dtype=torch.float64) if ref is not None else None
    return ForgetTokens(logp=logp, ref_logp=ref_t, seq=seq, num_seqs=int(seq.max()) + 1)


KW = dict(granularity="sequence", tau=2.0, tau_mode="absolute", beta=0.5, gamma=0.1)


def test_capped_ga_sequence_stops_at_the_bound():
    # seq 0: mean NLL 1.0 (below tau=2) ; seq 1: mean NLL 3.0 (past tau)
    t = tokens([-0.5, -1.5, -3.0, -3.0], [0, 0, 1, 1])
    loss, stats = forget_term("capped_ga", t, **KW)
    assert loss.item() == pytest.approx(-1.0 + -2.0)
    loss.backward()
    # d/dlogp of -NLL_0 = 1/|y_0| for seq 0's tokens; exactly zero past the bound.
    assert t.logp.grad.tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert stats["at_bound"].item() == 1
    assert stats["overshoot"].item() == pytest.approx(1.0)


def test_capped_ga_token_relative_bound():
    # relative tau: bound_t = 2 * reference NLL_t
    t = tokens([-1.0, -5.0], [0, 0], ref=[-1.0, -2.0])
    loss, stats = forget_term("capped_ga", t, **{**KW, "granularity": "token", "tau_mode": "relative"})
    assert loss.item() == pytest.approx(-1.0 + -4.0)
    loss.backward()
    assert t.logp.grad.tolist() == pytest.approx([1.0, 0.0])
    assert stats["at_bound"].item() == 1


def test_ga_is_unbounded_ascent():
    t = tokens([-10.0, -20.0, -1.0], [0, 0, 1])
    loss, _ = forget_term("ga", t, **{**KW, "granularity": "token"})
    assert loss.item() == pytest.approx(-31.0)
    loss.backward()
    assert t.logp.grad.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_unlikelihood_matches_formula_and_is_stable():
    lp = [-0.01, -1.0, -30.0]
    t = tokens(lp, [0, 0, 0])
    loss, _ = forget_term("unlikelihood", t, **KW)
    assert loss.item() == pytest.approx(sum(-math.log(1 - math.exp(x)) for x in lp), rel=1e-9)
    assert torch.isfinite(log1mexp(torch.tensor([0.0, -1e-12]))).all()


def test_npo_and_simnpo_formulas():
    t = tokens([-1.0, -2.0, -0.5], [0, 0, 1], ref=[-1.5, -1.0, -0.25])
    beta, gamma = KW["beta"], KW["gamma"]
    s = [-3.0, -0.5]
    s_ref = [-2.5, -0.25]
    npo = sum(-(2 / beta) * math.log(1 / (1 + math.exp(beta * (a - b)))) for a, b in zip(s, s_ref))
    loss, _ = forget_term("npo", t, **KW)
    assert loss.item() == pytest.approx(npo)
    lengths = [2, 1]
    simnpo = sum(-(2 / beta) * math.log(1 / (1 + math.exp((beta / n) * a + gamma))) for a, n in zip(s, lengths))
    loss, _ = forget_term("simnpo", t, **KW)
    assert loss.item() == pytest.approx(simnpo)


def _outputs(logp, kl, rows, row_sets):
    return TokenOutputs(logp=logp, kl=kl, ref_logp=torch.zeros_like(logp), row=torch.tensor(rows),
                        row_set=torch.tensor(row_sets))


def test_global_normalisation_splits_exactly():
    """Two 'ranks' with uneven token counts give the gradient of the global mean."""
    cfg = ObjectiveConfig(forget="ga", granularity="token", replay_weight=0.7, kl_weight=0.3)
    obj = Objective("unlearn", cfg)
    f, r, k = SET_IDS["forget"], SET_IDS["replay"], SET_IDS["kl"]
    logp = torch.randn(9, dtype=torch.float64, requires_grad=True)
    kl = torch.rand(9, dtype=torch.float64, requires_grad=True)
    rows = [0, 0, 0, 1, 2, 2, 3, 4, 4]
    row_sets = [f, r, k, f, r]
    # Full batch, one process.
    full = _outputs(logp, kl, rows, row_sets)
    labels = torch.full((5, 4), -100)
    for row in rows:
        labels[row, (labels[row] != -100).sum()] = 1
    counts = obj.unit_counts(labels, torch.tensor(row_sets))
    loss_full, _ = obj.loss(full, counts, scale=1.0)
    g_full = torch.autograd.grad(loss_full, (logp, kl))
    # Split: rank A gets tokens 0..3 (rows 0,1), rank B the rest; each scaled by world=2 and
    # averaged, as DeepSpeed does.
    a = _outputs(logp[:4], kl[:4], [0, 0, 0, 1], row_sets)
    b = _outputs(logp[4:], kl[4:], [2, 2, 3, 4, 4], row_sets)
    la, _ = obj.loss(a, counts, scale=2.0)
    lb, _ = obj.loss(b, counts, scale=2.0)
    g_split = torch.autograd.grad((la + lb) / 2, (logp, kl))
    for x, y in zip(g_full, g_split):
        torch.testing.assert_close(x, y)
    # The value is the documented weighted sum of means.
    # forget rows 0,3 (tokens 0,1,2,6), replay rows 1,4 (tokens 3,7,8), KL row 2 (tokens 4,5)
    expect = (logp[[0, 1, 2, 6]].sum() / 4 + 0.7 * -logp[[3, 7, 8]].sum() / 3
              + 0.3 * kl[[4, 5]].sum() / 2)
    assert loss_full.item() == pytest.approx(expect.item())


def test_reference_is_needed_only_when_a_term_uses_it():
    assert not Objective("unlearn", ObjectiveConfig(forget="capped_ga", kl_weight=0)).needs_reference
    assert Objective("unlearn", ObjectiveConfig(forget="npo", kl_weight=0)).needs_reference
    assert Objective("unlearn", ObjectiveConfig(forget="capped_ga", tau_mode="relative", kl_weight=0)).needs_reference
    assert Objective("unlearn", ObjectiveConfig(kl_weight=1.0)).reference_sets() == ["kl"]
    assert not Objective("sft", ObjectiveConfig()).needs_reference
