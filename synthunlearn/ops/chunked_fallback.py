"""Chunked pure-PyTorch ``linear_logprob_kl``: the fallback when the C++ CPU kernel cannot be built.

Same algorithm and memory bound as ``cpu_backend`` (see its docstring for the math): tiles of
``chunk_n`` tokens x ``chunk_v`` vocabulary entries, fp32 logits per tile, online log-sum-exp and
KL cross term across vocabulary tiles, per-token fp32 statistics saved, logit tiles recomputed in
backward, fp32 gradient accumulation.  Nothing proportional to N x V is allocated.  Slower than the
C++ kernel (Python loop over tiles, several elementwise passes per tile) but device-agnostic.
"""

from __future__ import annotations

import torch

from synthunlearn.ops.common import check_label_range, first_order_backward

CHUNK_N = 256
CHUNK_V = 2048

_NEG_INF = float("-inf")


def _tiles(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(size, total - start)


class _Stats:
    """Online per-token statistics of one token chunk (see cpu_backend: A/B cross term)."""

    def __init__(self, n, device, has_ref):
        f32 = dict(dtype=torch.float32, device=device)
        self.m_p = torch.full((n,), _NEG_INF, **f32)
        self.s_p = torch.zeros(n, dtype=torch.float64, device=device)
        self.z_y = torch.zeros(n, **f32)
        if has_ref:
            self.m_q = torch.full((n,), _NEG_INF, **f32)
            self.s_q = torch.zeros(n, dtype=torch.float64, device=device)
            self.cross = torch.zeros(n, dtype=torch.float64, device=device)
            self.zq_y = torch.zeros(n, **f32)

    @staticmethod
    def _rescale(m_old, m_new):
        # e^{m_old - m_new}; 0 on the first tile (m_old = -inf) without producing NaN.
        first = torch.isinf(m_old)
        delta = torch.where(first, torch.zeros_like(m_old), m_old - m_new).double()
        return torch.where(first, torch.zeros_like(delta), delta.exp()), delta

    def update(self, z, zq, direction):
        mp_new = torch.maximum(self.m_p, z.amax(1))
        rp, dp = self._rescale(self.m_p, mp_new)
        zp = z - mp_new[:, None]
        ep = zp.exp()
        if zq is None:
            self.s_p = self.s_p * rp + ep.sum(1, dtype=torch.float64)
            self.m_p = mp_new
            return
        mq_new = torch.maximum(self.m_q, zq.amax(1))
        rq, dq = self._rescale(self.m_q, mq_new)
        zqs = zq - mq_new[:, None]
        eq = zqs.exp()
        if direction == "forward":   # A = sum e^{zq-m_q} ((zq-m_q) - (z-m_p))
            tile = (eq * (zqs - zp)).sum(1, dtype=torch.float64)
            self.cross = rq * (self.cross + self.s_q * (dq - dp)) + tile
        else:                        # B = sum e^{z-m_p} ((z-m_p) - (zq-m_q))
            tile = (ep * (zp - zqs)).sum(1, dtype=torch.float64)
            self.cross = rp * (self.cross + self.s_p * (dp - dq)) + tile
        self.s_p = self.s_p * rp + ep.sum(1, dtype=torch.float64)
        self.s_q = self.s_q * rq + eq.sum(1, dtype=torch.float64)
        self.m_p, self.m_q = mp_new, mq_new


def _f32(t):
    return t.to(torch.float32)


def _forward_chunk(h, w, hq, wq, y, direction, chunk_v):
    """Per-token (logp, kl, ref_logp, stats(n, 5)) for one token chunk; y has ignored labels set to 0."""
    n, vocab = h.shape[0], w.shape[0]
    st = _Stats(n, h.device, hq is not None)
    rows = torch.arange(n, device=h.device)
    for v0, nv in _tiles(vocab, chunk_v):
        z = h @ _f32(w[v0:v0 + nv]).T
        zq = hq @ _f32(wq[v0:v0 + nv]).T if hq is not None else None
        in_tile = (y >= v0) & (y < v0 + nv)
        col = (y - v0).clamp(0, nv - 1)
        st.z_y = torch.where(in_tile, z[rows, col], st.z_y)
        if zq is not None:
            st.zq_y = torch.where(in_tile, zq[rows, col], st.zq_y)
        st.update(z, zq, direction)
    log_sp = st.s_p.log()
    logp = ((st.z_y.double() - st.m_p) - log_sp).float()
    stats = torch.zeros(n, 5, dtype=torch.float32, device=h.device)
    stats[:, 0], stats[:, 1] = st.m_p, log_sp.float()
    kl = ref_logp = None
    if hq is not None:
        log_sq = st.s_q.log()
        if direction == "forward":
            kl = st.cross / st.s_q - log_sq + log_sp
        else:
            kl = st.cross / st.s_p - log_sp + log_sq
        ref_logp = ((st.zq_y.double() - st.m_q) - log_sq).float()
        stats[:, 2], stats[:, 3], stats[:, 4] = st.m_q, log_sq.float(), kl.float()
        kl = kl.float()
    return logp, kl, ref_logp, stats


def _logit_grad(z, zq, stats, y, g_l, g_k, direction):
    """dL/dz for one tile in fp32, with the true-class term added before any rounding."""
    lp = (z - stats[:, 0:1]) - stats[:, 1:2]
    p = lp.exp()
    dz = -g_l[:, None] * p
    if zq is not None:
        lq = (zq - stats[:, 2:3]) - stats[:, 3:4]
        if direction == "forward":
            dz += g_k[:, None] * (p - lq.exp())
        else:
            dz += g_k[:, None] * p * ((lp - lq) - stats[:, 4:5])
    return dz


class _ChunkedLinearLogprobKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_hidden, ref_weight, direction, ignore_index,
                chunk_n, chunk_v):
        n = hidden.shape[0]
        valid = labels != ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels)).long()
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp, kl, ref_logp = torch.zeros(n, **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)
        stats = torch.zeros(n, 5, **f32)
        has_ref = ref_hidden is not None
        for i0, nb in _tiles(n, chunk_n):
            sl = slice(i0, i0 + nb)
            hq = _f32(ref_hidden[sl]) if has_ref else None
            lp, k, rl, st = _forward_chunk(_f32(hidden[sl]), weight, hq, ref_weight, y[sl], direction,
                                           chunk_v)
            logp[sl], stats[sl] = lp, st
            if has_ref:
                kl[sl], ref_logp[sl] = k, rl
        zero = torch.zeros_like(logp)
        logp, kl, ref_logp = (torch.where(valid, t, zero) for t in (logp, kl, ref_logp))
        ctx.save_for_backward(hidden, weight, y, valid, ref_hidden, ref_weight, stats)
        ctx.settings = (direction, chunk_n, chunk_v, has_ref)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(ref_logp)
        if not has_ref:
            ctx.mark_non_differentiable(kl)
        return logp, kl, ref_logp

    @staticmethod
    @first_order_backward("chunked fallback")  # gradients computed outside autograd: no double backward
    def backward(ctx, grad_logp, grad_kl, _grad_ref_logp):
        hidden, weight, y, valid, ref_hidden, ref_weight, stats = ctx.saved_tensors
        direction, chunk_n, chunk_v, has_ref = ctx.settings
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not has_ref:
            grad_kl = None
        if not (need_dh or need_dw) or (grad_logp is None and grad_kl is None):
            return (None,) * 9
        zero = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        g_l = torch.where(valid, _f32(grad_logp), zero) if grad_logp is not None else zero
        g_k = torch.where(valid, _f32(grad_kl), zero) if grad_kl is not None else None
        vocab = weight.shape[0]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for i0, nb in _tiles(hidden.shape[0], chunk_n):
            sl = slice(i0, i0 + nb)
            h = _f32(hidden[sl])
            hq = _f32(ref_hidden[sl]) if g_k is not None else None
            rows = torch.arange(nb, device=hidden.device)
            for v0, nv in _tiles(vocab, chunk_v):
                w = _f32(weight[v0:v0 + nv])
                z = h @ w.T
                zq = hq @ _f32(ref_weight[v0:v0 + nv]).T if hq is not None else None
                dz = _logit_grad(z, zq, stats[sl], y[sl], g_l[sl], g_k[sl] if g_k is not None else None,
                                 direction)
                in_tile = (y[sl] >= v0) & (y[sl] < v0 + nv)
                col = (y[sl] - v0).clamp(0, nv - 1)
                dz[rows, col] += torch.where(in_tile, g_l[sl], torch.zeros_like(g_l[sl]))
                if need_dh:
                    dh[sl] += dz @ w
                if need_dw:
                    dw[v0:v0 + nv] += dz.T @ h
        return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None,
                None, None, None, None, None, None, None)


def linear_logprob_kl_chunked(hidden, weight, labels, ref_hidden=None, ref_weight=None, *,
                              kl_direction="forward", ignore_index=-100, chunk_n=None, chunk_v=None):
    """Returns ``(logp, kl, ref_logp)`` (kl/ref_logp None without a reference)."""
    # The tile loop finds the target logit by a range test per vocabulary tile: a label outside
    # [0, V) would match no tile and leave z_y = 0, i.e. logp = -logsumexp(z), without an error.
    # linear_logprob_kl checks this already; the check is repeated for direct calls (O(N), CPU).
    check_label_range(labels, weight.shape[0], ignore_index)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    logp, kl, ref_logp = _ChunkedLinearLogprobKL.apply(
        hidden, weight, labels, ref_hidden, ref_weight, kl_direction, int(ignore_index),
        int(chunk_n or CHUNK_N), int(chunk_v or CHUNK_V))
    if ref_hidden is None:
        return logp, None, None
    return logp, kl, ref_logp
