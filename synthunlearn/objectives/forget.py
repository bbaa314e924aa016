"""Forgetting terms: what the policy minimises on the forget set (the synthetic Q-A data).

Every function takes per-token vectors over the forget set's labelled tokens (from
``synthunlearn.ops.linear_logprob_kl``) and returns the *sum* of the term over its units (tokens
or sequences), plus per-unit diagnostics. The caller divides by the global unit count (all ranks,
all micro-batches of the optimizer step), so results do not depend on the GPU count.

Notation: for forget sequence ``i`` with answer tokens ``t = 1..|y_i|``,
``l_it = log p_theta(y_it | y_i,<t, x_i)``, ``NLL_i = -(1/|y_i|) sum_t l_it`` (mean token NLL),
``S_i = sum_t l_it`` (sequence log-likelihood), and ``S_i^ref`` the frozen reference's.

    ga            token:    sum_it  l_it                      (minimising it is ascent on NLL)
                  sequence: sum_i  -NLL_i
    capped_ga     token:    sum_it  max(l_it, -tau_it)        = -min(NLL_it, tau_it)
                  sequence: sum_i   max(-NLL_i, -tau_i)
                  (Chen et al.'s lower-bounded forgetting loss: once a unit's NLL reaches tau
                  the term is constant there, so its gradient is exactly zero and ascent stops.)
    unlikelihood  token:    sum_it -log(1 - exp(l_it))         (gradient p: self-limiting)
    npo           sequence: sum_i  -(2/beta) log sigmoid(-beta (S_i - S_i^ref))
    simnpo        sequence: sum_i  -(2/beta) log sigmoid(-(beta/|y_i|) S_i - gamma)

tau is absolute (nats per token) or relative: ``tau_i = tau * NLL_i^ref`` (per sequence) or
``tau_it = tau * (-l_it^ref)`` (per token), i.e. a multiple of the initial NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORGET_LOSSES = ("none", "ga", "capped_ga", "unlikelihood", "npo", "simnpo")


@dataclass
class ForgetTokens:
    """The forget set's labelled tokens of one micro-batch, grouped into sequences."""

    logp: torch.Tensor        # (N,) policy log-prob of each target token (differentiable)
    ref_logp: torch.Tensor    # (N,) reference log-prob, or None when not computed
    seq: torch.Tensor         # (N,) sequence index in [0, num_seqs) of each token
    num_seqs: int             # sequences with at least one labelled token


def segment_sum(values: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums of per-token values; differentiable."""
    out = values.new_zeros(num_seqs)
    return out.index_add(0, seq, values)


def sequence_lengths(tokens: ForgetTokens) -> torch.Tensor:
    ones = torch.ones_like(tokens.logp, dtype=torch.float32)
    return segment_sum(ones, tokens.seq, tokens.num_seqs)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=-1e-7)  # p == 1 exactly would give log(0); the clamp bounds the loss at ~16
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def forget_term(kind: str, tokens: ForgetTokens, *, granularity: str, tau: float, tau_mode: str,
                beta: float, gamma: float) -> tuple[torch.Tensor, dict]:
    """Sum of the forgetting term over its units, and diagnostic sums.

    Returns ``(loss_sum, stats)`` where stats holds sums over the same units: ``at_bound`` (units
    whose NLL reached tau, capped_ga only) and ``overshoot`` (sum of max(NLL - tau, 0)).
    """
    if kind == "ga":
        if granularity == "token":
            return tokens.logp.sum(), {}
        return (segment_sum(tokens.logp, tokens.seq, tokens.num_seqs) / sequence_lengths(tokens).clamp(min=1)).sum(), {}
    if kind == "capped_ga":
        return _capped_ga(tokens, granularity, tau, tau_mode)
    if kind == "unlikelihood":
        return -log1mexp(tokens.logp).sum(), {}
    if kind == "npo":
        s = segment_sum(tokens.logp, tokens.seq, tokens.num_seqs)
        s_ref = segment_sum(tokens.ref_logp, tokens.seq, tokens.num_seqs)
        return (-(2.0 / beta) * F.logsigmoid(-beta * (s - s_ref))).sum(), {}
    if kind == "simnpo":
        s = segment_sum(tokens.logp, tokens.seq, tokens.num_seqs)
        length = sequence_lengths(tokens).clamp(min=1)
        return (-(2.0 / beta) * F.logsigmoid(-(beta / length) * s - gamma)).sum(), {}
    raise ValueError(f"unknown forget loss {kind!r}; valid: {FORGET_LOSSES}")


def _capped_ga(tokens: ForgetTokens, granularity: str, tau: float, tau_mode: str):
    if granularity == "token":
        nll = -tokens.logp
        bound = tau * (-tokens.ref_logp) if tau_mode == "relative" else torch.full_like(nll, tau)
    else:
        length = sequence_lengths(tokens).clamp(min=1)
        nll = -segment_sum(tokens.logp, tokens.seq, tokens.num_seqs) / length
        if tau_mode == "relative":
            bound = tau * (-segment_sum(tokens.ref_logp, tokens.seq, tokens.num_seqs) / length)
        else:
            bound = torch.full_like(nll, tau)
    bound = bound.detach()
    # max(-NLL, -tau): torch.minimum routes the gradient only to units still below the bound.
    loss = -torch.minimum(nll, bound)
    with torch.no_grad():
        stats = {"at_bound": (nll >= bound).float().sum(), "overshoot": (nll - bound).clamp(min=0).sum()}
    return loss.sum(), stats
