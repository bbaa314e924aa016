"""Checks shared by every backend of ``linear_logprob_kl``: the label range and first-order-only
backward passes.  Kept apart from :mod:`synthunlearn.ops.linear_logprob_kl` so that the backends
can use them when called directly without importing the dispatcher.
"""

from __future__ import annotations

import functools

import torch


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raises ValueError unless every label lies in [0, vocab) or equals ``ignore_index``.

    An out-of-range label has no target logit: the backends would otherwise read a wrong one
    (the chunked fallback returned logp = -logsumexp(z), the target term silently 0), raise a
    backend-specific error, or trip an asynchronous device assert.

    Cost: one fused elementwise pass and one reduction over the N labels.  On CUDA the result is
    checked by an asynchronous device assert (as torch's own gather does), not by reading it on
    the host: a host sync per call would stall the training step's queue on the hot path.  The
    error then surfaces at the next synchronisation, as a device-side assert naming this check.
    On the CPU the offending label is looked up once the check fails, for the ValueError.
    """
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"linear_logprob_kl: labels must lie in [0, {vocab}) or equal "
                                        f"ignore_index ({ignore_index})")
        return
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0, 0])
    raise ValueError(
        f"linear_logprob_kl: label {int(labels[index])} at token {index} is outside [0, {vocab}) and "
        f"is not ignore_index ({ignore_index}); {int(bad.sum())} out-of-range label(s) in all. "
        f"labels must be row indices of the head (weight has {vocab} rows) or ignore_index.")


def first_order_backward(backend: str):
    """Decorator for the ``backward`` of a backend whose gradients are computed outside autograd.

    Such a backward is correct to first order only: its result carries no graph, so a second
    derivative through it (gradient penalty, Hessian-vector product) would silently miss every
    term that flows through the op.  ``torch.autograd.function.once_differentiable`` guards this
    only when an upstream gradient itself requires grad; with ``create_graph=True`` and a constant
    upstream gradient (``torch.autograd.grad(logp.sum(), h, create_graph=True)``) it returns plain
    tensors and the second-order terms are lost without a word.

    The autograd engine runs every backward with grad mode equal to ``create_graph``, so grad
    mode being on here means the caller asked for a differentiable gradient: refuse it.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"linear_logprob_kl: the {backend} backend computes its gradients outside "
                    f"autograd and cannot be differentiated twice (create_graph=True, e.g. a "
                    f"gradient penalty or a Hessian-vector product); use backend='torch' for "
                    f"higher-order derivatives.")
            return backward(ctx, *grads)

        return wrapper

    return decorate
