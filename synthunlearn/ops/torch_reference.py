"""The plain PyTorch composition of ``linear_logprob_kl``: the test oracle, never the default.

It materialises the ``N x V`` logits (twice with a reference), so its memory is what the fused
backends exist to avoid. Autograd provides exact gradients for any upstream gradient.

    z      = hidden @ weight.T                      (N, V), computed in float32
    logp_i = z_i[y_i] - logsumexp(z_i)
    forward KL  (p_ref || p_theta): sum_v p_ref,v (log p_ref,v - log p_theta,v)
    reverse KL  (p_theta || p_ref): sum_v p_theta,v (log p_theta,v - log p_ref,v)
"""

from __future__ import annotations

import torch


def linear_logprob_kl_torch(hidden, weight, labels, ref_hidden=None, ref_weight=None, *,
                            kl_direction="forward", ignore_index=-100, compute_dtype=torch.float32):
    """Returns ``(logp, kl, ref_logp)``; ``kl``/``ref_logp`` are None without a reference."""
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(1, safe_labels[:, None]).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    kl = ref_logp = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref_logits = ref_hidden.detach().to(compute_dtype) @ ref_weight.detach().to(compute_dtype).T
            ref_log_probs = torch.log_softmax(ref_logits, dim=-1)
            ref_logp = ref_log_probs.gather(1, safe_labels[:, None]).squeeze(1)
            ref_logp = torch.where(valid, ref_logp, torch.zeros_like(ref_logp))
        if kl_direction == "forward":
            kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)
        else:
            kl = (log_probs.exp() * (log_probs - ref_log_probs)).sum(-1)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
    return logp, kl, ref_logp
