"""Triton backend of ``linear_logprob_kl``: tile-wise, never materialising (N x V) logits.

Notation: H (N, D) hidden, W (V, D) head, z = H W^T, p = softmax(z), LSE_p = logsumexp(z);
reference Hr (N, Dr), Wr (V, Dr), zq = Hr Wr^T, q = softmax(zq), LSE_q. y = labels.

Forward: ONE pass over V
------------------------
Grid (token blocks, vocab splits). A program owns BLOCK_N tokens and walks the vocab tiles
split, split + S, split + 2S, ... For each (BLOCK_N x BLOCK_V) tile it computes z (and zq) by a
matmul over D in BLOCK_D chunks with fp32 accumulation and folds the tile into per-token running
statistics (streaming log-sum-exp, as in Cut Cross-Entropy):

    m_p, s_p   running max and sum_v exp(z_v - m_p)            -> LSE_p = m_p + log s_p
    m_q, s_q   the same for zq                                  -> LSE_q
    t_p, t_q   z_y and zq_y, picked out of the tile that holds y
    a          the KL cross term, in logits shifted by per-token reference points:
               forward KL: A = sum_v exp(zq_v - m_q) ((zq_v - m_q) - (z_v - m_p))
               reverse KL: B = sum_v exp(z_v  - m_p) ((z_v - m_p) - (zq_v - r_q))
    r_q        reverse KL only: zq at the running argmax of z (the mode of p), see below

When a tile moves the references from (m_p, m_q, r_q) to (m_p', m_q', r_q'), the terms already summed
are moved to the new shifts and rescaled like s (s_*, A, B, m_*, r_q are the values before the tile):

    A' = e^{m_q - m_q'} (A + s_q ((m_q - m_q') - (m_p - m_p'))) + sum_tile e^{zq - m_q'} ((zq - m_q') - (z - m_p'))
    B' = e^{m_p - m_p'} (B + s_p ((m_p - m_p') - (r_q - r_q'))) + sum_tile e^{z - m_p'} ((z - m_p') - (zq - r_q'))

(on the first tile m = -inf and s = A = B = 0: the moves of the maxima are taken as 0, so the old part
is 0, not NaN; r_q starts at 0, finite).

Each split writes its partial statistics (8 x S x N floats); a few O(S N) torch ops merge them
with the same recurrence (each split's references moved to the global ones) into

    logp     = (t_p - m_p) - log s_p
    ref_logp = (t_q - m_q) - log s_q
    forward KL(q || p) = sum q (log q - log p),  log q = (zq - m_q) - log s_q,  log p = (z - m_p) - log s_p
                       = A / s_q + log(s_p / s_q)
    reverse KL(p || q) = sum p (log p - log q),  log q = (zq - r_q) - (m_q - r_q) - log s_q
                       = B / s_p + (m_q - r_q) - log(s_p / s_q)

log s_p - log s_q is taken as the log of the ratio: for nearly equal heads (KL ~ 1e-7) the difference
of two rounded logs (~6 each, ulp 5e-7) would be all rounding error.

Why shifted: the KL is invariant to a per-token constant added to either head's logits, and so is
every term above: (zq - m_q), (zq - r_q), (z - m_p) and m_q - r_q are O(spread of the logits), not
O(|z|). An unshifted sum q (zq - z) + LSE_p - LSE_q subtracts quantities of size |zq - z| and
LSE ~ |z|, each rounded to fp32 (ulp 6e-5 at 1e3), to get a KL that may be 1e-3: at a per-token
reference offset of 1e3 its error was ~2e-4, against ~3e-7 now, as in the C++ kernel.

Why r_q, not m_q, for the reverse KL: its backward recomputes d_v = (z_v - m_p) - (zq_v - r_q) and
subtracts the forward's E_p[d] = B / s_p. When p is peaked (|z| ~ 1e3), d_v - E_p[d] at the mode is
a near-cancellation that only works if the forward's term for the mode equals the backward's d
bitwise. With r_q = zq at the mode, that term is exactly 0 in both passes ((z - m_p) and (zq - r_q)
are both x - x); with m_q it would be (zq - m_q) rounded once against the tile-time m_q and again
against the final one, ~ulp(|zq - m_q|) apart: at |z| ~ 5e3 the dH error was then 1.6e-4 of its
largest entry (as in the C++ kernel; 1.7e-5 with the former unshifted sum), 6e-8 with r_q. The
forward KL's backward is p - q and uses no such mean, so A keeps the C++ kernel's m_p.

Why one pass, not two: the textbook forward KL needs LSE_p and LSE_q before it can weigh
log q - log p, i.e. a second pass over V (another 4NDV FLOPs). Expanding log q - log p shows the LSEs
enter only as a per-token constant once sum q = 1 is used, so the remaining cross term can be
streamed with running-max rescaling like s_q: exact, one pass, the same for reverse.
S (vocab splits) exists only for GPU occupancy when N is small; it does not depend on N, so the
partial buffer is O(N).

Saved for backward: the inputs themselves (no copies unless a dtype cast was needed) and one
(6, N) fp32 tensor per call: LSE_p and LSE_q each as (max, log-sum) -- log p = (z - m) - log s keeps
full precision at |z| ~ 1e3, where the rounded m + log s would not -- and, for the reverse KL,
E_p[d] = B / s_p and r_q. Nothing of size V.

Backward: recompute the tiles
-----------------------------
With g_l, g_k the upstream gradients of logp and kl (either may be absent):

    d logp / dz_v = onehot_v - p_v
    forward KL:  d/dz_v sum q (log q - log p) = -q_v + p_v sum q = p_v - q_v
    reverse KL:  KL = sum p z - LSE_p - sum p log q,  d p_u / dz_v = p_u (delta_uv - p_v)
                 => d/dz_v = p_v (log p_v - log q_v - KL) = p_v (d_v - E_p[d]),
                    d_v = (z_v - m_p) - (zq_v - r_q),  E_p[d] = B / s_p
                 (log p - log q - KL = d - E_p[d]: the constants -(m_q - r_q) - log s_p + log s_q
                 cancel, and d is shift-invariant, so neither an LSE ~1e3 nor a per-token offset
                 between the heads enters the subtraction)
    dZ = g_l (onehot - p) + g_k (the KL term);   dH = dZ W,   dW = dZ^T H

dZ is formed tile by tile in fp32 (the onehot "-1" before any rounding, Liger #1329), cast to the
matmul dtype, multiplied over D chunks, and accumulated into fp32 gradient buffers (Liger #512).
Token blocks whose upstream gradients are all exactly zero (ignored/prompt tokens) are skipped;
a NaN upstream gradient counts as non-zero and propagates.
Kernels, chosen by which inputs need a gradient:
  * both dH and dW, default: grid (token blocks x vocab blocks), each tile computes dZ once and
    atomically adds its dZ W / dZ^T H contributions. fp32 atomics: order-dependent rounding.
  * deterministic (``deterministic=True``, env SYNTHUNLEARN_DETERMINISTIC=1, or
    torch.use_deterministic_algorithms(True)): a dH kernel gridded over token blocks looping over
    vocab tiles, and a dW kernel gridded over vocab blocks looping over token blocks. Each program
    owns its output rows and adds in a fixed order (no atomics); dZ is recomputed by both kernels.
  * only dH (frozen head, LoRA) or only dW: the single matching deterministic kernel, no extra cost.

FLOPs (multiply-add = 2)
------------------------
forward 2NDV (policy) + 2NDrV (reference);  backward recompute 2NDV + 2NDrV (the reference only
when kl has a gradient), dH 2NDV, dW 2NDV. Total 12NDV with a reference (D = Dr), 8NDV without.
The deterministic mode, when both dH and dW are needed, recomputes once more (+2NDV, +2NDrV):
16NDV / 10NDV.

Extra memory: O(S N) statistics + fp32 gradient buffers (N x D, V x D) + on-chip tiles.

On CPU tensors the kernels run only under the Triton interpreter: TRITON_INTERPRET=1 must be set
before this module is imported (triton.jit reads it when the kernels are decorated).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from synthunlearn.errors import UserError
from synthunlearn.ops.common import check_label_range, first_order_backward
from synthunlearn.ops.triton_kernels import dlogits_tile, load_rows, logits_tile, mma, online_lse_step, target_logit

DETERMINISTIC_ENV = "SYNTHUNLEARN_DETERMINISTIC"
_NUM_STATS = 8  # m_p, s_p, t_p, m_q, s_q, t_q, a, r_q  (see the module docstring)


class TritonBackendError(UserError, RuntimeError):
    """The Triton backend cannot run on these tensors in this process."""


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch settings. BLOCK_* must be powers of two >= 16 (tl.dot).

    ``vocab_splits``: forward programs per token block (None: enough to fill the GPU).
    ``fp32_precision``: tl.dot precision for fp32 inputs; "ieee" is exact, "tf32" ~1e-3 relative."""
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 2
    vocab_splits: Optional[int] = None
    fp32_precision: str = "ieee"

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.fp32_precision not in ("ieee", "tf32", "tf32x3"):
            raise ValueError(f"TileConfig.fp32_precision must be ieee/tf32/tf32x3, got {self.fp32_precision!r}")


# Small tiles keep the interpreter (numpy per program) fast on test shapes.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1)
GPU_CONFIG = TileConfig()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(h_ptr, w_ptr, rh_ptr, rw_ptr, labels_ptr, stats_ptr,
                    N, D, D_REF, V, n_vtiles,
                    HAS_REF: tl.constexpr, FORWARD_KL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=n_mask, other=-1)

    m_p = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_p = tl.zeros((BLOCK_N,), tl.float32)
    t_p = tl.zeros((BLOCK_N,), tl.float32)
    m_q = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_q = tl.zeros((BLOCK_N,), tl.float32)
    t_q = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)  # A (forward KL) or B (reverse KL), see the docstring
    r_q = tl.zeros((BLOCK_N,), tl.float32)  # reverse KL: zq at the running argmax of z

    for vt in range(split, n_vtiles, n_splits):
        offs_v = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        z = logits_tile(h_ptr, w_ptr, offs_n, offs_v, n_mask, v_mask, D,
                        BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        t_p += target_logit(z, offs_v, labels)
        m_p_old = m_p
        s_p_old = s_p
        m_p, s_p, alpha_p, e_p = online_lse_step(m_p, s_p, tl.where(v_mask[None, :], z, float("-inf")))
        if HAS_REF:
            zq = logits_tile(rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, D_REF,
                             BLOCK_N, BLOCK_V, BLOCK_D, REF_PRECISION)
            t_q += target_logit(zq, offs_v, labels)
            m_q_old = m_q
            s_q_old = s_q
            m_q, s_q, alpha_q, e_q = online_lse_step(m_q, s_q, tl.where(v_mask[None, :], zq, float("-inf")))
            # Move of m_p (<= 0); 0 on the first tile, where m_old = -inf and s_old = acc = 0.
            dp = tl.where(m_p_old == float("-inf"), 0.0, m_p_old - m_p)
            # Logits shifted by per-token reference points: O(spread of the logits), whatever their
            # offset. e_* is 0 at masked columns, where z and zq are 0 (finite): no 0 * inf.
            zs = z - m_p[:, None]
            if FORWARD_KL:  # A' = e^{dq} (A + s_q (dq - dp)) + sum e^{zq - m_q'} ((zq - m_q') - (z - m_p'))
                dq = tl.where(m_q_old == float("-inf"), 0.0, m_q_old - m_q)
                acc = alpha_q * (acc + s_q_old * (dq - dp)) + tl.sum(e_q * ((zq - m_q[:, None]) - zs), axis=1)
            else:  # B' = e^{dp} (B + s_p (dp - dr)) + sum e^{z - m_p'} ((z - m_p') - (zq - r_q'))
                # r_q follows the argmax of z: it moves only when this tile raised m_p, and then to
                # zq where z == m_p' in this tile (the largest such zq if z ties; the set is not
                # empty then). r_q starts at 0, so dr is finite on the first tile (where
                # s_p_old = acc = alpha_p = 0).
                at_mode = v_mask[None, :] & (z == m_p[:, None])
                zq_at_mode = tl.max(tl.where(at_mode, zq, float("-inf")), axis=1)
                r_q_new = tl.where(m_p > m_p_old, zq_at_mode, r_q)
                dr = r_q - r_q_new
                acc = alpha_p * (acc + s_p_old * (dp - dr)) + tl.sum(e_p * (zs - (zq - r_q_new[:, None])), axis=1)
                r_q = r_q_new

    out = stats_ptr + split * N + offs_n
    stride = n_splits * N  # stats is (_NUM_STATS, S, N)
    tl.store(out + 0 * stride, m_p, mask=n_mask)
    tl.store(out + 1 * stride, s_p, mask=n_mask)
    tl.store(out + 2 * stride, t_p, mask=n_mask)
    tl.store(out + 3 * stride, m_q, mask=n_mask)
    tl.store(out + 4 * stride, s_q, mask=n_mask)
    tl.store(out + 5 * stride, t_q, mask=n_mask)
    tl.store(out + 6 * stride, acc, mask=n_mask)
    tl.store(out + 7 * stride, r_q, mask=n_mask)


@triton.jit
def _load_token_stats(offs_n, n_mask, labels_ptr, tok_ptr, g_logp_ptr, g_kl_ptr, N,
                      HAS_KL_GRAD: tl.constexpr):
    """Per-token inputs of dlogits_tile. ``tok`` is (6, N): m_p, ls_p, m_q, ls_q, E_p[d], r_q with
    d = (z - m_p) - (zq - r_q) (see _merge_splits); upstream grads are already 0 at ignored tokens."""
    labels = tl.load(labels_ptr + offs_n, mask=n_mask, other=-1)
    m_p = tl.load(tok_ptr + offs_n, mask=n_mask, other=0.0)
    ls_p = tl.load(tok_ptr + N + offs_n, mask=n_mask, other=0.0)
    g_logp = tl.load(g_logp_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_KL_GRAD:
        m_q = tl.load(tok_ptr + 2 * N + offs_n, mask=n_mask, other=0.0)
        ls_q = tl.load(tok_ptr + 3 * N + offs_n, mask=n_mask, other=0.0)
        mean_diff = tl.load(tok_ptr + 4 * N + offs_n, mask=n_mask, other=0.0)
        r_q = tl.load(tok_ptr + 5 * N + offs_n, mask=n_mask, other=0.0)
        g_kl = tl.load(g_kl_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        m_q = tl.zeros_like(m_p)
        ls_q = tl.zeros_like(m_p)
        mean_diff = tl.zeros_like(m_p)
        r_q = tl.zeros_like(m_p)
        g_kl = tl.zeros_like(m_p)
    # Skip the block only when every upstream gradient in it is exactly 0 (ignored tokens, padding
    # rows). Counted with != 0, which is true for NaN (IEEE unordered compare), so a NaN upstream
    # gradient reaches dH / dW as NaN, as in the other backends. A max of |g| would not do: NaN
    # compares false with anything (and tl.max, like fmax, may drop NaN), so an all-NaN block
    # looked dead and came back as zero gradients.
    nonzero = (g_logp != 0.0) | (g_kl != 0.0)
    live = tl.sum(nonzero.to(tl.int32), axis=0) > 0
    return labels, m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, live


@triton.jit
def _backward_atomic_kernel(h_ptr, w_ptr, rh_ptr, rw_ptr, labels_ptr, tok_ptr,
                            g_logp_ptr, g_kl_ptr, dh_ptr, dw_ptr, N, D, D_REF, V,
                            HAS_KL_GRAD: tl.constexpr, FORWARD_KL: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    """Grid (token blocks, vocab blocks): dZ once per tile, dH and dW by fp32 atomic adds."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    labels, m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, live = _load_token_stats(
        offs_n, n_mask, labels_ptr, tok_ptr, g_logp_ptr, g_kl_ptr, N, HAS_KL_GRAD)
    if live:
        dz = dlogits_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, labels,
                          m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, D, D_REF, HAS_KL_GRAD, FORWARD_KL,
                          BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, REF_PRECISION)
        dz = dz.to(h_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            w = load_rows(w_ptr, offs_v, v_mask, d0, D, BLOCK_D)
            h = load_rows(h_ptr, offs_n, n_mask, d0, D, BLOCK_D)
            dh = mma(dz, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), PRECISION)
            dw = mma(tl.trans(dz), h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), PRECISION)
            tl.atomic_add(dh_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], dh,
                          mask=n_mask[:, None] & d_mask[None, :])
            tl.atomic_add(dw_ptr + offs_v.to(tl.int64)[:, None] * D + offs_d[None, :], dw,
                          mask=v_mask[:, None] & d_mask[None, :])


@triton.jit
def _accumulate_rows(out_ptr, offs_rows, row_mask, d0, D, update, BLOCK_D: tl.constexpr):
    """out[rows, d0:d0+BLOCK_D] += update, by the one program that owns these rows.

    The barrier orders this store before the next iteration's load of the same addresses, which
    may be issued by another thread of the block (load and dot layouts differ)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = out_ptr + offs_rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    mask = row_mask[:, None] & (offs_d < D)[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)
    tl.debug_barrier()


@triton.jit
def _backward_dh_kernel(h_ptr, w_ptr, rh_ptr, rw_ptr, labels_ptr, tok_ptr,
                        g_logp_ptr, g_kl_ptr, dh_ptr, N, D, D_REF, V, n_vtiles,
                        HAS_KL_GRAD: tl.constexpr, FORWARD_KL: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    """Grid (token blocks,): dH rows accumulated over vocab tiles in order. Deterministic."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    labels, m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, live = _load_token_stats(
        offs_n, n_mask, labels_ptr, tok_ptr, g_logp_ptr, g_kl_ptr, N, HAS_KL_GRAD)
    if live:
        for vt in range(0, n_vtiles):
            offs_v = vt * BLOCK_V + tl.arange(0, BLOCK_V)
            v_mask = offs_v < V
            dz = dlogits_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, labels,
                              m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, D, D_REF, HAS_KL_GRAD, FORWARD_KL,
                              BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, REF_PRECISION)
            dz = dz.to(h_ptr.dtype.element_ty)
            for d0 in range(0, D, BLOCK_D):
                w = load_rows(w_ptr, offs_v, v_mask, d0, D, BLOCK_D)
                _accumulate_rows(dh_ptr, offs_n, n_mask, d0, D,
                                 mma(dz, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), PRECISION), BLOCK_D)


@triton.jit
def _backward_dw_kernel(h_ptr, w_ptr, rh_ptr, rw_ptr, labels_ptr, tok_ptr,
                        g_logp_ptr, g_kl_ptr, dw_ptr, N, D, D_REF, V, n_ntiles,
                        HAS_KL_GRAD: tl.constexpr, FORWARD_KL: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    """Grid (vocab blocks,): dW rows accumulated over token tiles in order. Deterministic."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V
    for nt in range(0, n_ntiles):
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        labels, m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, live = _load_token_stats(
            offs_n, n_mask, labels_ptr, tok_ptr, g_logp_ptr, g_kl_ptr, N, HAS_KL_GRAD)
        if live:
            dz = dlogits_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, labels,
                              m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, D, D_REF, HAS_KL_GRAD, FORWARD_KL,
                              BLOCK_N, BLOCK_V, BLOCK_D, PRECISION, REF_PRECISION)
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
            for d0 in range(0, D, BLOCK_D):
                h = load_rows(h_ptr, offs_n, n_mask, d0, D, BLOCK_D)
                _accumulate_rows(dw_ptr, offs_v, v_mask, d0, D,
                                 mma(dzt, h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32), PRECISION), BLOCK_D)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _interpreted() -> bool:
    """True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1
    was set before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_forward_kernel, InterpretedFunction)


def _check_device(*tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise TritonBackendError(f"linear_logprob_kl (triton): all tensors must be on one device, got {devices}")
    device = devices.pop()
    if device.type == "cpu" and not _interpreted():
        raise TritonBackendError(
            "linear_logprob_kl (triton) got CPU tensors, but Triton runs on CPU only under its interpreter: "
            "set TRITON_INTERPRET=1 before synthunlearn.ops.triton_backend is first imported (safest: before "
            "anything imports triton), move the tensors to CUDA, or use backend='cpu' / 'torch'.")


def _default_config(device: torch.device) -> TileConfig:
    return INTERPRETER_CONFIG if device.type == "cpu" or _interpreted() else GPU_CONFIG


def _deterministic(flag: Optional[bool]) -> bool:
    if flag is not None:
        return flag
    return os.environ.get(DETERMINISTIC_ENV, "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _dot_precision(dtype: torch.dtype, cfg: TileConfig) -> str:
    return cfg.fp32_precision if dtype == torch.float32 else "ieee"


def _matmul_operands(x: torch.Tensor, w: torch.Tensor):
    """Contiguous operands of one common dtype (the wider one) for tl.dot."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TritonBackendError(f"linear_logprob_kl (triton) supports float32/bfloat16/float16, got {dtype}")
    return x.to(dtype).contiguous(), w.to(dtype).contiguous()


def _vocab_splits(cfg: TileConfig, device: torch.device, n_ntiles: int, n_vtiles: int) -> int:
    """Forward programs per token block: enough to give every SM ~2 programs when N is small."""
    if cfg.vocab_splits is not None:
        return max(1, min(cfg.vocab_splits, n_vtiles))
    if device.type != "cuda":
        return 1
    return max(1, min(n_vtiles, triton.cdiv(2 * _sm_count(device.index), n_ntiles)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _merge_splits(stats: torch.Tensor, has_ref: bool, forward_kl: bool):
    """Combine the per-split statistics (8, S, N) into the per-token (6, N) tensor saved for
    backward, [m_p, ls_p, m_q, ls_q, E_p[d], r_q] (LSE = m + ls, kept apart for precision; the last
    two for the reverse KL only, d = (z - m_p) - (zq - r_q)), and logp, ref_logp, kl (not yet masked)."""
    m_p, s_p, t_p, m_q, s_q, t_q, acc, r_q = stats.unbind(0)

    def rescaled(m, s):
        top = m.max(dim=0).values
        scale = torch.exp(m - top)  # every split saw >= 1 vocab tile, so m and top are finite
        return top, scale, (s * scale).sum(0)

    top_p, scale_p, sum_p = rescaled(m_p, s_p)
    tok = torch.zeros((6,) + top_p.shape, device=stats.device, dtype=torch.float32)
    tok[0], tok[1] = top_p, torch.log(sum_p)
    # log p_y = (z_y - m) - log s: subtract the max first, as log_softmax does.
    logp = (t_p.sum(0) - top_p) - tok[1]
    ref_logp = None
    if has_ref:
        top_q, scale_q, sum_q = rescaled(m_q, s_q)
        tok[2], tok[3] = top_q, torch.log(sum_q)
        ref_logp = (t_q.sum(0) - top_q) - tok[3]
        # Each split's A (or B) is shifted by that split's reference points: move it to the global
        # ones with the recurrence of the kernel (finite: every split saw a vocabulary tile).
        d_p = m_p - top_p
        # log s_p - log s_q as one log of the ratio: when the heads are close (KL ~ 1e-7) the
        # difference of the two rounded logs (~6 each, ulp 5e-7) would be all rounding error.
        log_ratio = torch.log(sum_p / sum_q)
        if forward_kl:  # KL(q || p) = A / s_q - log s_q + log s_p
            cross = (scale_q * (acc + s_q * ((m_q - top_q) - d_p))).sum(0)
            kl = cross / sum_q + log_ratio
        else:  # KL(p || q) = B / s_p + (m_q - r_q) - log s_p + log s_q
            # The global mode of p is the mode of the split with the largest m_p: its r_q is the
            # global reference (so the mode's own term stays exactly 0, see the module docstring).
            r_top = r_q.gather(0, m_p.argmax(dim=0, keepdim=True)).squeeze(0)
            tok[4] = (scale_p * (acc + s_p * (d_p - (r_q - r_top)))).sum(0) / sum_p  # E_p[d]
            tok[5] = r_top
            kl = tok[4] + (top_q - r_top) - log_ratio
    else:
        kl = torch.zeros_like(logp)
    return tok, logp, ref_logp, kl


class _LinearLogProbKL(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_hidden, ref_weight, forward_kl, ignore_index, cfg,
                deterministic):
        device = hidden.device
        N, D = hidden.shape
        V = weight.shape[0]
        has_ref = ref_hidden is not None
        h, w = _matmul_operands(hidden, weight)
        # (the reference arrives detached: linear_logprob_kl_triton)
        rh, rw = _matmul_operands(ref_hidden, ref_weight) if has_ref else (h, w)
        labels = labels.to(torch.int64).contiguous()
        valid = labels != ignore_index
        # Checked by linear_logprob_kl already; again here for direct calls (no host sync on CUDA).
        check_label_range(labels, V, ignore_index)

        if N == 0:
            tok = torch.zeros((6, 0), device=device, dtype=torch.float32)
            logp, ref_logp, kl = (torch.zeros(0, device=device) for _ in range(3))
        else:
            n_ntiles = triton.cdiv(N, cfg.block_n)
            n_vtiles = triton.cdiv(V, cfg.block_v)
            splits = _vocab_splits(cfg, device, n_ntiles, n_vtiles)
            stats = torch.empty((_NUM_STATS, splits, N), device=device, dtype=torch.float32)
            _forward_kernel[(n_ntiles, splits)](
                h, w, rh, rw, labels, stats, N, D, rh.shape[1], V, n_vtiles,
                HAS_REF=has_ref, FORWARD_KL=forward_kl,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                PRECISION=_dot_precision(h.dtype, cfg), REF_PRECISION=_dot_precision(rh.dtype, cfg),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            tok, logp, ref_logp, kl = _merge_splits(stats, has_ref, forward_kl)

        zero = torch.zeros((), device=device, dtype=torch.float32)
        logp = torch.where(valid, logp, zero)
        # autograd.Function outputs must be tensors: without a reference these are zeros, and the
        # wrapper turns them into None.
        kl = torch.where(valid, kl, zero)
        ref_logp = torch.where(valid, ref_logp, zero) if has_ref else torch.zeros_like(logp)

        ctx.save_for_backward(h, w, rh, rw, labels, tok)
        ctx.meta = (forward_kl, has_ref, ignore_index, cfg, deterministic, hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ref_logp)
        ctx.set_materialize_grads(False)
        return logp, kl, ref_logp

    @staticmethod
    @first_order_backward("triton")  # the gradients are computed by kernels: no double backward
    def backward(ctx, grad_logp, grad_kl, _grad_ref_logp):
        h, w, rh, rw, labels, tok = ctx.saved_tensors
        forward_kl, has_ref, ignore_index, cfg, deterministic, h_dtype, w_dtype = ctx.meta
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        has_kl_grad = has_ref and grad_kl is not None
        if (grad_logp is None and not has_kl_grad) or not (need_dh or need_dw):
            return (None,) * 9

        N, D = h.shape
        V = w.shape[0]
        valid = labels != ignore_index
        zero = torch.zeros((), device=h.device, dtype=torch.float32)
        # Ignored tokens get zero upstream gradient, so their dZ rows vanish (and their blocks are skipped).
        g_logp = torch.where(valid, grad_logp.float(), zero).contiguous() if grad_logp is not None \
            else torch.zeros(N, device=h.device, dtype=torch.float32)
        g_kl = torch.where(valid, grad_kl.float(), zero).contiguous() if has_kl_grad else g_logp
        dh = torch.zeros((N, D), device=h.device, dtype=torch.float32) if need_dh else None
        dw = torch.zeros((V, D), device=h.device, dtype=torch.float32) if need_dw else None

        if N > 0:
            n_ntiles = triton.cdiv(N, cfg.block_n)
            n_vtiles = triton.cdiv(V, cfg.block_v)
            common = (h, w, rh, rw, labels, tok, g_logp, g_kl)
            meta = dict(HAS_KL_GRAD=has_kl_grad, FORWARD_KL=forward_kl,
                        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                        PRECISION=_dot_precision(h.dtype, cfg), REF_PRECISION=_dot_precision(rh.dtype, cfg),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_dh and need_dw and not deterministic:
                _backward_atomic_kernel[(n_ntiles, n_vtiles)](*common, dh, dw, N, D, rh.shape[1], V, **meta)
            else:
                if need_dh:
                    _backward_dh_kernel[(n_ntiles,)](*common, dh, N, D, rh.shape[1], V, n_vtiles, **meta)
                if need_dw:
                    _backward_dw_kernel[(n_vtiles,)](*common, dw, N, D, rh.shape[1], V, n_ntiles, **meta)

        grad_hidden = dh.to(h_dtype) if need_dh else None
        grad_weight = dw.to(w_dtype) if need_dw else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_logprob_kl_triton(hidden, weight, labels, ref_hidden=None, ref_weight=None, *,
                             kl_direction="forward", ignore_index=-100,
                             config: Optional[TileConfig] = None, deterministic: Optional[bool] = None):
    """Returns ``(logp, kl, ref_logp)`` (float32, shape (N,)); kl/ref_logp are None without a reference.

    ``config``: tile sizes (default: small tiles under the interpreter, GPU_CONFIG on CUDA).
    ``deterministic``: bitwise-reproducible gradients without atomics (default: env
    SYNTHUNLEARN_DETERMINISTIC=1 or torch.are_deterministic_algorithms_enabled())."""
    if kl_direction not in ("forward", "reverse"):
        raise ValueError(f"kl_direction must be 'forward' or 'reverse', got {kl_direction!r}")
    _check_device(hidden, weight, labels, ref_hidden, ref_weight)
    cfg = config or _default_config(hidden.device)
    # The reference is frozen (no gradient reaches it, as in every backend): detached, the outputs
    # require grad only when the policy's hidden states or head do.
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    logp, kl, ref_logp = _LinearLogProbKL.apply(
        hidden, weight, labels, ref_hidden, ref_weight, kl_direction == "forward", int(ignore_index), cfg,
        _deterministic(deterministic))
    if ref_hidden is None:
        return logp, None, None
    return logp, kl, ref_logp
