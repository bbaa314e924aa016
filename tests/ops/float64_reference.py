"""Float64 ground truth for ``linear_logprob_kl``: values and exact gradients for any upstream.

Shared by every backend's tests (Triton, C++). It materialises the (N, V) logits, which is fine at
test sizes; the point is precision, not memory. Gradients come from autograd on float64 copies of
the inputs, so they are the exact derivative of

    L = sum_i upstream_logp[i] * logp[i] + upstream_kl[i] * kl[i]

with respect to ``hidden`` and ``weight`` (reference tensors never receive gradients).

Usage::

    from tests.ops.float64_reference import reference_logprob_kl
    ref = reference_logprob_kl(h, w, y, rh, rw, "forward", -100, g_logp, g_kl)
    ref.logp, ref.kl, ref.ref_logp, ref.grad_hidden, ref.grad_weight   # float64, on CPU
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from synthunlearn.ops.torch_reference import linear_logprob_kl_torch


class Float64Reference(NamedTuple):
    logp: torch.Tensor                    # (N,)
    kl: Optional[torch.Tensor]            # (N,) or None without a reference
    ref_logp: Optional[torch.Tensor]      # (N,) or None without a reference
    grad_hidden: torch.Tensor             # (N, D)
    grad_weight: torch.Tensor             # (V, D)


def _f64(t, device):
    return None if t is None else t.detach().to(device=device, dtype=torch.float64)


def reference_logprob_kl(hidden, weight, labels, ref_hidden=None, ref_weight=None,
                         kl_direction="forward", ignore_index=-100,
                         upstream_logp=None, upstream_kl=None, device="cpu") -> Float64Reference:
    """Float64 values and gradients. ``upstream_*`` default to zeros; ``upstream_kl`` is ignored
    when there is no reference. Inputs may be any dtype/device; they are upcast on ``device`` (the
    CPU by default; a GPU's float64 units for full-size GPU checks). bf16 inputs are taken exactly
    as stored, so the result is the exact answer for those rounded values."""
    h = _f64(hidden, device).requires_grad_(True)
    w = _f64(weight, device).requires_grad_(True)
    y = labels.detach().to(device)
    logp, kl, ref_logp = linear_logprob_kl_torch(h, w, y, _f64(ref_hidden, device), _f64(ref_weight, device),
                                                 kl_direction=kl_direction, ignore_index=ignore_index,
                                                 compute_dtype=torch.float64)
    loss = h.new_zeros(())
    if upstream_logp is not None:
        loss = loss + (logp * _f64(upstream_logp, device)).sum()
    if upstream_kl is not None and kl is not None:
        loss = loss + (kl * _f64(upstream_kl, device)).sum()
    if loss.requires_grad:
        grad_h, grad_w = torch.autograd.grad(loss, (h, w), allow_unused=True)
    else:  # no upstream at all: the derivative of a constant
        grad_h = grad_w = None
    grad_h = torch.zeros_like(h) if grad_h is None else grad_h
    grad_w = torch.zeros_like(w) if grad_w is None else grad_w
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return Float64Reference(logp.detach(), detach(kl), detach(ref_logp), grad_h.detach(), grad_w.detach())
