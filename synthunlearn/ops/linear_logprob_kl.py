"""Per-token target log-probability and full-vocabulary KL to a frozen reference head.

Public interface (the trainer and outside checks call exactly this)::

    out = linear_logprob_kl(hidden, weight, labels, ref_hidden=None, ref_weight=None,
                            *, kl_direction="forward", ignore_index=-100, backend="auto")
    out.logp      (N,) float32  log_softmax(hidden @ weight.T)[i, labels[i]]; 0 at ignored tokens
    out.kl        (N,) float32 or None; "forward" KL(p_ref || p_theta), "reverse" KL(p_theta || p_ref)
    out.ref_logp  (N,) float32 or None; the reference's target log-prob, no gradient

Every label must lie in [0, V) or equal ``ignore_index`` (otherwise a ValueError on the CPU, a
device-side assert on CUDA, whatever the backend). The fused backends ("triton", "cpu", the
chunked fallback) are differentiable once: ``create_graph=True`` through them raises; "torch"
supports higher-order derivatives.

Backends: "torch" (materialising oracle), "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
"cpu" (C++ extension), "auto" (triton on CUDA, cpu on CPU).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from synthunlearn.ops.common import check_label_range
from synthunlearn.ops.torch_reference import linear_logprob_kl_torch

KL_DIRECTIONS = ("forward", "reverse")
BACKENDS = ("auto", "torch", "triton", "cpu")


class LogProbKL(NamedTuple):
    logp: torch.Tensor
    kl: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor]


def _check_inputs(hidden, weight, labels, ref_hidden, ref_weight, kl_direction, ignore_index, backend):
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must have shape ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if ref_hidden is not None:
        if ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0] \
                or ref_hidden.shape[1] != ref_weight.shape[1]:
            raise ValueError(f"ref_hidden (N, D_ref) and ref_weight (V, D_ref) must match N={hidden.shape[0]}"
                             f" and V={weight.shape[0]}, got {tuple(ref_hidden.shape)} and "
                             f"{tuple(ref_weight.shape)}")
    # Here, not in each backend, so that every backend (and the chunked fallback that "auto"
    # reaches when the C++ build fails) rejects a label without a logit the same way.  On CUDA an
    # asynchronous device assert: no host sync on the training step's path (check_label_range).
    check_label_range(labels, weight.shape[0], ignore_index)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "cpu"


def linear_logprob_kl(hidden, weight, labels, ref_hidden=None, ref_weight=None, *,
                      kl_direction="forward", ignore_index=-100, backend="auto") -> LogProbKL:
    _check_inputs(hidden, weight, labels, ref_hidden, ref_weight, kl_direction, ignore_index, backend)
    requested, backend = backend, _resolve_backend(backend, hidden.device)
    if backend == "torch":
        return LogProbKL(*linear_logprob_kl_torch(hidden, weight, labels, ref_hidden, ref_weight,
                                                  kl_direction=kl_direction, ignore_index=ignore_index))
    if backend == "triton":
        from synthunlearn.ops.triton_backend import linear_logprob_kl_triton
        return LogProbKL(*linear_logprob_kl_triton(hidden, weight, labels, ref_hidden, ref_weight,
                                                   kl_direction=kl_direction, ignore_index=ignore_index))
    from synthunlearn.ops.cpu_backend import linear_logprob_kl_cpu
    # Explicit "cpu": a failed C++ build is an error; "auto": warn once, use the chunked fallback.
    return LogProbKL(*linear_logprob_kl_cpu(hidden, weight, labels, ref_hidden, ref_weight,
                                            kl_direction=kl_direction, ignore_index=ignore_index,
                                            strict=requested == "cpu"))
