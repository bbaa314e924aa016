"""Checks of the Triton backend shared by its interpreter tests (CPU tensors, TRITON_INTERPRET=1)
and its GPU tests (CUDA tensors, compiled kernels): random inputs, one forward + backward, and the
comparison with the float64 ground truth of :mod:`tests.ops.float64_reference`.

Importing this module imports the Triton backend: a test module that wants the interpreter sets
TRITON_INTERPRET=1 before importing it.
"""

from __future__ import annotations

import torch

from synthunlearn.ops.triton_backend import linear_logprob_kl_triton
from tests.ops.float64_reference import reference_logprob_kl

IGNORE = -100
# max |actual - expected| / max |expected|, per tensor. bf16: inputs are exact, but dZ is rounded
# to bf16 before the dH/dW matmuls and the gradients are returned in bf16.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def random_inputs(dtype, *, n, d, d_ref, v, seed=0, with_ref=True, logit_scale=1.0,
                  ignored_fraction=0.25, ref_dtype=None, device="cpu"):
    """Random (hidden, weight, labels, ref_hidden, ref_weight, upstream_logp, upstream_kl) with
    logits of std ~ logit_scale and ``ignored_fraction`` of the labels ignored. Drawn on the CPU
    (the same numbers for a seed on any device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t, dt):
        return t.to(dt).to(device).requires_grad_(True)

    hidden = leaf(torch.randn(n, d, generator=g) * logit_scale ** 0.5, dtype)
    weight = leaf(torch.randn(v, d, generator=g) * logit_scale ** 0.5 / d ** 0.5, dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored_fraction] = IGNORE
    ref_hidden = ref_weight = None
    if with_ref:
        rdt = ref_dtype or dtype
        ref_hidden = (torch.randn(n, d_ref, generator=g) * logit_scale ** 0.5).to(rdt).to(device)
        ref_weight = (torch.randn(v, d_ref, generator=g) * logit_scale ** 0.5 / d_ref ** 0.5).to(rdt).to(device)
    upstream_logp = torch.randn(n, generator=g).to(device)
    upstream_kl = torch.randn(n, generator=g).to(device)
    return hidden, weight, labels.to(device), ref_hidden, ref_weight, upstream_logp, upstream_kl


def run_triton(hidden, weight, labels, ref_hidden, ref_weight, upstream_logp, upstream_kl, *,
               kl_direction="forward", config=None, deterministic=None):
    """Forward + backward of sum(g_l * logp + g_k * kl); grads of whichever inputs require them."""
    logp, kl, ref_logp = linear_logprob_kl_triton(hidden, weight, labels, ref_hidden, ref_weight,
                                                  kl_direction=kl_direction, ignore_index=IGNORE,
                                                  config=config, deterministic=deterministic)
    loss = logp.new_zeros(())
    if upstream_logp is not None:
        loss = loss + (logp * upstream_logp).sum()
    if upstream_kl is not None and kl is not None:
        loss = loss + (kl * upstream_kl).sum()
    inputs = [t for t in (hidden, weight) if t.requires_grad]
    grads = torch.autograd.grad(loss, inputs) if loss.requires_grad else [torch.zeros_like(t) for t in inputs]
    grads = iter(grads)
    grad_h = next(grads) if hidden.requires_grad else None
    grad_w = next(grads) if weight.requires_grad else None
    return logp, kl, ref_logp, grad_h, grad_w


def assert_close(actual, expected, tol, what):
    assert actual is not None, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.to(expected.device)
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:g} * {scale:.3e}"


def check_against_float64(inputs, kl_direction="forward", tol=None, **kw):
    """Runs the backend (``kw``: config, deterministic) and compares every output and gradient with
    the float64 reference, computed on the inputs' device."""
    hidden, weight, labels, ref_hidden, ref_weight, g_l, g_k = inputs
    tol = tol or TOL[hidden.dtype]
    logp, kl, ref_logp, grad_h, grad_w = run_triton(*inputs, kl_direction=kl_direction, **kw)
    ref = reference_logprob_kl(hidden, weight, labels, ref_hidden, ref_weight, kl_direction, IGNORE, g_l, g_k,
                               device=hidden.device)
    assert logp.dtype == torch.float32
    assert_close(logp, ref.logp, tol, "logp")
    if ref_hidden is None:
        assert kl is None and ref_logp is None
    else:
        assert kl.dtype == ref_logp.dtype == torch.float32 and not ref_logp.requires_grad
        assert_close(kl, ref.kl, tol, "kl")
        assert_close(ref_logp, ref.ref_logp, tol, "ref_logp")
    if grad_h is not None:
        assert grad_h.dtype == hidden.dtype
        assert_close(grad_h, ref.grad_hidden, tol, "grad_hidden")
    if grad_w is not None:
        assert grad_w.dtype == weight.dtype
        assert_close(grad_w, ref.grad_weight, tol, "grad_weight")
    ignored = labels == IGNORE
    assert (logp[ignored] == 0).all() and (kl is None or (kl[ignored] == 0).all())
    return logp, kl, ref_logp, grad_h, grad_w
