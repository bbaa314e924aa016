"""The modules DeepSpeed wraps: the policy with its fused head, and the reference's hidden states.

Why the fused op is called *inside* ``PolicyWithLogProbs.forward``: under ZeRO-3 a parameter is
only materialised while the module forward that ``engine(...)`` invoked is running (DeepSpeed
gathers parameters accessed there, and again for backward). Reading ``lm_head.weight`` outside
it would see an empty partition. The reference model belongs to another engine, so its head is
gathered explicitly by the caller (``deepspeed.zero.GatheredParameters``) and passed in.

The language-model head is never applied as a layer: ``linear_logprob_kl`` streams
``hidden @ W^T`` tile by tile, so no ``N x V`` logits tensor exists for either model.
"""

from __future__ import annotations

import torch
from torch import nn

from synthunlearn.objectives.objective import TokenOutputs
from synthunlearn.ops import linear_logprob_kl

# Config attributes of models whose logits are not ``hidden @ W^T``, with the values that leave
# them unchanged; any other value would make every log-prob the fused op computes wrong (a scale
# is a temperature: it changes the NLL, the capped bound, NPO and the KL alike). Gemma-2/3 soft-cap
# their logits, Cohere multiplies them by logit_scale, Granite divides them by logits_scaling,
# Falcon-H1 multiplies by lm_head_multiplier, muP-style models (Phi-3-small) divide by
# mup_width_multiplier.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "output_multiplier_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "mup_width_multiplier": (None, 1, 1.0),
}


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body of a Hugging Face causal LM (everything before the head)."""
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None:
        raise ValueError(f"{type(model).__name__} has no base model attribute "
                         f"{getattr(model, 'base_model_prefix', None)!r}")
    return body


def check_plain_head(model: nn.Module, where: str) -> None:
    from synthunlearn.errors import ConfigError
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ConfigError(f"{where}: the model's output layer must be a bias-free linear head")
    for attr, identity in _LOGIT_TRANSFORMS.items():
        if getattr(model.config, attr, None) not in identity:
            raise ConfigError(f"{where}: models with {attr}={getattr(model.config, attr)!r} transform "
                              "their logits; the fused log-prob op supports plain linear heads only")


def last_hidden(body: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return body(**kwargs)[0]


class ReferenceHidden(nn.Module):
    """Frozen reference: returns final hidden states (B, T, D_ref); its head is used by the op."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None):
        return last_hidden(decoder_of(self.model), input_ids, attention_mask, position_ids)


class PolicyWithLogProbs(nn.Module):
    """Policy forward to per-token target log-probs (and KL to the reference where asked).

    Rows flagged in ``ref_rows`` were also run through the reference (``ref_hidden`` holds their
    hidden states, in the same order); their tokens get ``kl`` and ``ref_logp``. The op is called
    twice every time, once per group, even when a group is empty, so every rank runs the same
    code path.
    """

    def __init__(self, model: nn.Module, *, kl_direction: str = "forward", backend: str = "auto"):
        super().__init__()
        self.model = model
        self.kl_direction = kl_direction
        self.backend = backend

    def forward(self, input_ids, attention_mask, labels, row_set, ref_rows=None, ref_hidden=None,
                ref_weight=None, position_ids=None) -> TokenOutputs:
        hidden = last_hidden(decoder_of(self.model), input_ids, attention_mask, position_ids)
        weight = self.model.get_output_embeddings().weight
        # Position t predicts token t+1.
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        valid = targets != -100
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
        if ref_rows is None:
            ref_rows = torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
        with_ref = valid & ref_rows[:, None]
        without_ref = valid & ~ref_rows[:, None]

        out_plain = linear_logprob_kl(hidden[without_ref], weight, targets[without_ref],
                                      backend=self.backend)
        if ref_hidden is not None:
            # ref_hidden holds only the reference rows, in batch order: row-major selection of
            # their valid positions lines up with hidden[with_ref].
            ref_h = ref_hidden[:, :-1][valid[ref_rows]]
            out_ref = linear_logprob_kl(hidden[with_ref], weight, targets[with_ref], ref_h, ref_weight,
                                        kl_direction=self.kl_direction, backend=self.backend)
            kl_ref, ref_logp_ref = out_ref.kl, out_ref.ref_logp
        else:
            out_ref = linear_logprob_kl(hidden[with_ref], weight, targets[with_ref], backend=self.backend)
            kl_ref = ref_logp_ref = torch.zeros_like(out_ref.logp)

        # Reassemble in row-major token order so callers can group tokens by row.
        n = int(valid.sum())
        order_plain = torch.nonzero(without_ref.flatten(), as_tuple=True)[0]
        order_ref = torch.nonzero(with_ref.flatten(), as_tuple=True)[0]
        flat_index = torch.cumsum(valid.flatten().long(), 0) - 1  # position among valid tokens
        logp = out_plain.logp.new_zeros(n)
        logp = logp.index_put((flat_index[order_plain],), out_plain.logp)
        logp = logp.index_put((flat_index[order_ref],), out_ref.logp)
        kl = torch.zeros(n, dtype=torch.float32, device=logp.device)
        ref_logp = torch.zeros(n, dtype=torch.float32, device=logp.device)
        kl = kl.index_put((flat_index[order_ref],), kl_ref)
        ref_logp = ref_logp.index_put((flat_index[order_ref],), ref_logp_ref.detach())
        return TokenOutputs(logp=logp, kl=kl, ref_logp=ref_logp, row=rows[valid], row_set=row_set)
