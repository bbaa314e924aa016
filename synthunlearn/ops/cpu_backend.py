"""C++ CPU backend of ``linear_logprob_kl`` (``csrc/linear_logprob_kl.cpp``) and its autograd Function.

Algorithm (per call; N tokens, V vocabulary, D / D_ref hidden widths)::

    forward   for each token block (block_n rows, blocks spread over threads):
                for each vocabulary tile (block_v columns)                  one pass over V
                  Z  = H_blk W_tile^T,  Zq = Hq_blk Wq_tile^T   (BLAS, fp32)
                  online update of m_p, s_p = sum e^{z-m_p}, m_q, s_q and the KL cross term
                  (A = sum e^{zq-m_q}((zq-m_q)-(z-m_p)) for forward KL, B symmetric for reverse)
              logp = z_y - m_p - log s_p;  ref_logp likewise;  KL from (A or B, s_p, s_q)
    saved     per token fp32: m_p, log s_p, m_q, log s_q, KL  (5 N floats) + the inputs themselves
    backward  for each token block, for each vocabulary tile                one pass over V
                recompute Z (and Zq when the KL has an upstream gradient)
                dZ = g_l (onehot - p) + g_k (p - q)                    forward KL
                dZ = g_l (onehot - p) + g_k p (log p - log q - KL)     reverse KL
                dH_blk += dZ W_tile,  dW_tile(slot) += dZ^T H_blk       (BLAS, fp32)
              dW = sum of per-thread fp32 accumulators in slot order (deterministic per thread count)

FLOPs: forward 2NDV + 2ND_refV (reference); backward recompute 2NDV (+ 2ND_refV when the KL has a
gradient), dH 2NDV, dW 2NDV.  Total 12NDV with a reference (D_ref = D), 8NDV without.

Extra memory: O(N) statistics, the fp32 gradients (N x D and, per thread, V x D for dW), and fixed
per-thread tiles (block_n x block_v logits, block_v x D converted weight rows for bf16/fp16).  No
tensor grows with N x V.  Everything is accumulated in fp32; bf16/fp16 inputs are converted tile by
tile, so the true-class term of the gradient is applied before any rounding.

The extension is compiled with ninja through ``torch.utils.cpp_extension.load`` on first use and
cached under ``TORCH_EXTENSIONS_DIR`` (torch's default otherwise); its name carries a hash of the
source, the compiler flags and the torch version, so an edit rebuilds it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

from synthunlearn.ops.common import first_order_backward

# Tile sizes (settings).  block_n tokens x block_v vocabulary entries per tile; the kernel shrinks
# block_n when there are fewer than threads x block_n tokens so that every thread gets work.
BLOCK_N = int(os.environ.get("SYNTHUNLEARN_CPU_BLOCK_N", "256"))
BLOCK_V = int(os.environ.get("SYNTHUNLEARN_CPU_BLOCK_V", "512"))

_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "linear_logprob_kl.cpp"
_DIRECTIONS = {"forward": 0, "reverse": 1}

_lock = threading.Lock()
_ops = None
_build_error: Exception | None = None
_warned = False


class CpuBackendUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why)."""


def _isa_flags() -> list[str]:
    # The inner softmax loops are written to auto-vectorise; give the compiler the vector ISA that
    # torch itself detected at run time (AVX-512 machines also get AVX2: wide enough, no downclock).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma"]
    return []


def _cflags() -> list[str]:
    # -fno-trapping-math lets GCC if-convert the clamps in vexp() and vectorise the softmax loops.
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-DNDEBUG", *_isa_flags()]


def _extension_name() -> str:
    digest = hashlib.sha256()
    digest.update(_SOURCE.read_bytes())
    digest.update(" ".join(_cflags()).encode())
    digest.update(torch.__version__.encode())
    return f"synthunlearn_llkl_cpu_{digest.hexdigest()[:12]}"


def load_extension():
    """Builds (first call, cached on disk) and loads the extension; returns ``torch.ops.synthunlearn_llkl``.

    Raises :class:`CpuBackendUnavailable` with the build error when it cannot be built.
    """
    global _ops, _build_error
    with _lock:
        if _ops is not None:
            return _ops
        if _build_error is not None:
            raise CpuBackendUnavailable(str(_build_error)) from _build_error
        try:
            from torch.utils.cpp_extension import load

            if not _SOURCE.is_file():
                raise FileNotFoundError(f"C++ source {_SOURCE} is missing (not an editable install?)")
            load(name=_extension_name(), sources=[str(_SOURCE)], extra_cflags=_cflags(),
                 extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
            _ops = torch.ops.synthunlearn_llkl
        except Exception as exc:  # compiler missing, ninja missing, compile error, ...
            _build_error = exc
            raise CpuBackendUnavailable(
                f"could not build the C++ CPU kernel of linear_logprob_kl from {_SOURCE}: "
                f"{type(exc).__name__}: {exc}") from exc
        return _ops


def is_available() -> bool:
    try:
        load_extension()
        return True
    except CpuBackendUnavailable:
        return False


class _LinearLogprobKLCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_hidden, ref_weight, direction, ignore_index,
                block_n, block_v):
        ops = load_extension()
        labels = labels.long().contiguous()
        # Detached views: the kernel's own tile matmuls must not be recorded by autograd.
        logp, kl, ref_logp, stats = ops.forward(hidden.detach(), weight.detach(), labels, ref_hidden,
                                                ref_weight, direction, ignore_index, block_n, block_v)
        # The inputs are saved as given (not as contiguous copies): under ZeRO-3 the saved weight
        # is the partitioned parameter, which DeepSpeed gathers again before this backward runs.
        ctx.save_for_backward(hidden, weight, labels, ref_hidden, ref_weight, stats)
        ctx.settings = (direction, ignore_index, block_n, block_v)
        ctx.has_ref = ref_hidden is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ref_logp)
        if not ctx.has_ref:
            ctx.mark_non_differentiable(kl)
        return logp, kl, ref_logp

    @staticmethod
    @first_order_backward("cpu")  # the gradients are computed outside autograd: no double backward
    def backward(ctx, grad_logp, grad_kl, _grad_ref_logp):
        hidden, weight, labels, ref_hidden, ref_weight, stats = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.has_ref:
            grad_kl = None
        if not (need_dh or need_dw) or (grad_logp is None and grad_kl is None):
            return (None,) * 9
        direction, ignore_index, block_n, block_v = ctx.settings
        grad_hidden, grad_weight = load_extension().backward(
            hidden.detach(), weight.detach(), labels, ref_hidden, ref_weight, stats, grad_logp, grad_kl,
            direction, ignore_index, need_dh, need_dw, block_n, block_v)
        return (grad_hidden if need_dh else None, grad_weight if need_dw else None,
                None, None, None, None, None, None, None)


def _warn_fallback(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"linear_logprob_kl: the C++ CPU backend is unavailable, using the slower "
                      f"chunked PyTorch fallback (same memory bound). Reason: {reason}",
                      RuntimeWarning, stacklevel=3)


def linear_logprob_kl_cpu(hidden, weight, labels, ref_hidden=None, ref_weight=None, *,
                          kl_direction="forward", ignore_index=-100, strict=True,
                          block_n=None, block_v=None):
    """Returns ``(logp, kl, ref_logp)`` (kl/ref_logp None without a reference).

    ``strict``: raise :class:`CpuBackendUnavailable` when the extension cannot be built (explicit
    ``backend="cpu"``); otherwise warn once and use :mod:`synthunlearn.ops.chunked_fallback`.
    """
    if hidden.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, got hidden on {hidden.device}")
    try:
        load_extension()
    except CpuBackendUnavailable as exc:
        if strict:
            raise
        _warn_fallback(str(exc))
        from synthunlearn.ops.chunked_fallback import linear_logprob_kl_chunked
        return linear_logprob_kl_chunked(hidden, weight, labels, ref_hidden, ref_weight,
                                         kl_direction=kl_direction, ignore_index=ignore_index)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    logp, kl, ref_logp = _LinearLogprobKLCpu.apply(
        hidden, weight, labels, ref_hidden, ref_weight, _DIRECTIONS[kl_direction], int(ignore_index),
        int(block_n or BLOCK_N), int(block_v or BLOCK_V))
    if ref_hidden is None:
        return logp, None, None
    return logp, kl, ref_logp
