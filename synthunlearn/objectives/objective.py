"""The training objective: weighted loss terms, each normalised by its own *global* count.

SFT (job "sft"):
    L = (1 / T_sft) * sum_{t in sft response tokens} -log p_theta(y_t)

Unlearning (job "unlearn"):
    L = w_f * F / U_f  +  w_r * (1 / T_r) * sum_{t in replay} -log p_theta(y_t)
                       +  w_k * (1 / T_k) * sum_{t in KL-set response tokens} KL_t
    F: the forgetting term's sum over its units (synthunlearn.objectives.forget), U_f the number of
       those units (forget tokens or forget sequences),
    KL_t = KL(p_ref || p_theta) ("forward") or KL(p_theta || p_ref) ("reverse") over the full
       vocabulary at token t, from the frozen reference model.

Each count (T_sft, U_f, T_r, T_k) is summed over all ranks and all micro-batches of the optimizer
step *before* the step's first backward pass, so the gradient is that of the global mean whatever
the number of ranks or the split of tokens between them. DeepSpeed divides the loss by the
gradient-accumulation steps in ``engine.backward`` and averages gradients over ranks; the loss
handed to it is therefore multiplied by ``world_size * gradient_accumulation_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from synthunlearn.config import ObjectiveConfig
from synthunlearn.objectives.forget import ForgetTokens, forget_term

# Data sets a micro-batch row can come from.
SFT, FORGET, REPLAY, KL = "sft", "forget", "replay", "kl"
SET_IDS = {SFT: 0, FORGET: 1, REPLAY: 2, KL: 3}


class TokenOutputs(NamedTuple):
    """Per-token results of one micro-batch's forward pass, over its labelled tokens only.

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 attaches its backward hooks (which re-gather
    the parameters the fused op needs again in backward) only to tensors inside tuples, lists
    and dicts returned by a module's forward.
    """

    logp: torch.Tensor                 # (N,) policy target log-prob, differentiable
    kl: torch.Tensor                   # (N,) KL to the reference (0 where not computed)
    ref_logp: torch.Tensor             # (N,) reference target log-prob (0 where not computed)
    row: torch.Tensor                  # (N,) batch row of each token
    row_set: torch.Tensor              # (B,) set id of each row (SET_IDS)

    def token_set(self) -> torch.Tensor:
        return self.row_set[self.row]


@dataclass
class Objective:
    job: str                                   # "sft" or "unlearn"
    cfg: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    # -- which data and reference computations the objective needs -------------------------
    @property
    def forget_active(self) -> bool:
        return self.job == "unlearn" and self.cfg.forget != "none" and self.cfg.forget_weight > 0

    @property
    def replay_active(self) -> bool:
        return self.job == "unlearn" and self.cfg.replay_weight > 0

    @property
    def kl_active(self) -> bool:
        return self.job == "unlearn" and self.cfg.kl_weight > 0

    def active_sets(self) -> list[str]:
        if self.job == "sft":
            return [SFT]
        return [s for s, on in ((FORGET, self.forget_active), (REPLAY, self.replay_active),
                                (KL, self.kl_active)) if on]

    def forget_needs_reference(self) -> bool:
        return self.forget_active and (self.cfg.forget == "npo" or
                                       (self.cfg.forget == "capped_ga" and self.cfg.tau_mode == "relative"))

    def reference_sets(self) -> list[str]:
        """Sets whose rows go through the frozen reference model."""
        sets = [KL] if self.kl_active else []
        if self.forget_needs_reference():
            sets.append(FORGET)
        return sets

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_sets())

    def forget_unit(self) -> str:
        per_token = self.cfg.forget in ("unlikelihood",) or (
            self.cfg.forget in ("ga", "capped_ga") and self.cfg.granularity == "token")
        return "forget_tokens" if per_token else "forget_seqs"

    # -- counts --------------------------------------------------------------------------------
    def unit_counts(self, labels: torch.Tensor, row_set: torch.Tensor) -> dict[str, float]:
        """Local counts of every normalisation unit in one micro-batch (from labels alone).

        ``labels`` are the *shifted* targets (B, T-1) with -100 where not trained.
        """
        valid = labels != -100
        tokens_per_row = valid.sum(1)
        counts = {}
        for name, sid in SET_IDS.items():
            rows = row_set == sid
            counts[f"{name}_tokens"] = float(tokens_per_row[rows].sum())
            counts[f"{name}_seqs"] = float((tokens_per_row[rows] > 0).sum())
        return counts

    # -- the loss ------------------------------------------------------------------------------
    def loss(self, out: TokenOutputs, global_counts: dict[str, float], scale: float):
        """Loss to hand to ``engine.backward`` and the micro-batch's diagnostic *sums*.

        ``scale`` = world_size * gradient_accumulation_steps (see module docstring). Diagnostic
        sums are divided by the matching global counts after an all-reduce, for logging.
        """
        token_set = out.token_set()
        sums: dict[str, torch.Tensor] = {}
        total = out.logp.new_zeros(())

        def add(name: str, weight: float, value_sum: torch.Tensor, unit: str):
            nonlocal total
            sums[name] = value_sum.detach()
            count = global_counts.get(unit, 0.0)
            # A term whose global count is zero contributes 0 * value_sum: still in the graph so
            # every rank runs the same backward (ZeRO-3 deadlocks if ranks differ).
            total = total + (weight * scale / count if count > 0 else 0.0) * value_sum

        if self.job == "sft":
            sel = token_set == SET_IDS[SFT]
            add("sft_nll", 1.0, -out.logp[sel].sum(), "sft_tokens")
            return total, sums

        if self.forget_active:
            sel = token_set == SET_IDS[FORGET]
            tokens = self._forget_tokens(out, sel)
            value, stats = forget_term(self.cfg.forget, tokens, granularity=self.cfg.granularity,
                                       tau=self.cfg.tau, tau_mode=self.cfg.tau_mode,
                                       beta=self.cfg.beta, gamma=self.cfg.gamma)
            add("forget_loss", self.cfg.forget_weight, value, self.forget_unit())
            sums["forget_nll"] = -out.logp[sel].detach().sum()
            for k, v in stats.items():
                sums[f"forget_{k}"] = v
        if self.replay_active:
            sel = token_set == SET_IDS[REPLAY]
            add("replay_nll", self.cfg.replay_weight, -out.logp[sel].sum(), "replay_tokens")
        if self.kl_active:
            sel = token_set == SET_IDS[KL]
            add("kl", self.cfg.kl_weight, out.kl[sel].sum(), "kl_tokens")
        return total, sums

    def _forget_tokens(self, out: TokenOutputs, sel: torch.Tensor) -> ForgetTokens:
        rows = out.row[sel]
        uniq, seq = torch.unique(rows, return_inverse=True)
        ref = out.ref_logp[sel] if self.forget_needs_reference() else None
        return ForgetTokens(logp=out.logp[sel], ref_logp=ref, seq=seq, num_seqs=int(uniq.numel()))

    # -- logging -------------------------------------------------------------------------------
    def stat_units(self) -> dict[str, str]:
        """Which global count each diagnostic sum is divided by when logged."""
        units = {"sft_nll": "sft_tokens", "replay_nll": "replay_tokens", "kl": "kl_tokens",
                 "forget_nll": "forget_tokens"}
        if self.forget_active:
            unit = self.forget_unit()
            units.update({"forget_loss": unit, "forget_at_bound": unit, "forget_overshoot": unit})
        return units
