"""Tile-level Triton helpers shared by the ``linear_logprob_kl`` kernels (see triton_backend.py).

Each helper works on one (BLOCK_N tokens x BLOCK_V vocab) tile of a row-major (N, D) activation
matrix and a row-major (V, D) head. Row offsets are widened to int64 before multiplying by D:
V * D already exceeds 2**31 for a 256k vocabulary at D = 8192.
"""

import triton
import triton.language as tl
from triton import knobs

# The interpreter's tl.dot multiplies bfloat16/float16 tiles as their raw integer bits (numpy has
# no bfloat16), so under TRITON_INTERPRET=1 operands are widened to fp32 first. Values are the same:
# the products of bf16 numbers are exact in fp32 and accumulation is fp32 either way.
UPCAST_DOT = tl.constexpr(bool(knobs.runtime.interpret))


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_rows(ptr, offs_rows, row_mask, d0, D, BLOCK_D: tl.constexpr):
    """The (rows, BLOCK_D) chunk [d0, d0 + BLOCK_D) of a row-major (*, D) matrix; 0 outside."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = ptr + offs_rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def logits_tile(x_ptr, w_ptr, offs_n, offs_v, n_mask, v_mask, D,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """z[n, v] = sum_d x[n, d] w[v, d] for one tile, accumulated in fp32 over D chunks.

    Masked rows/columns load zeros, so they come out as 0 (callers mask them as needed)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = load_rows(x_ptr, offs_n, n_mask, d0, D, BLOCK_D)
        w = load_rows(w_ptr, offs_v, v_mask, d0, D, BLOCK_D)
        acc = mma(x, tl.trans(w), acc, PRECISION)
    return acc


@triton.jit
def online_lse_step(m, s, z):
    """One step of the streaming log-sum-exp: LSE = m + log(s) with s = sum_v exp(z_v - m).

    ``z`` holds -inf at masked columns; every tile has at least one live column, so the new max
    is finite and alpha = exp(m_old - m_new) is 0 on the first tile (m_old = -inf), never NaN.
    Returns the new (m, s), the rescale factor alpha and e = exp(z - m_new) (0 at masked columns)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(e, axis=1)
    return m_new, s, alpha, e


@triton.jit
def target_logit(z, offs_v, labels):
    """z[n, labels[n]] if the label falls in this tile, else 0 (so tiles can simply be summed)."""
    hit = offs_v[None, :] == labels[:, None]
    return tl.sum(tl.where(hit, z, 0.0), axis=1)


@triton.jit
def dlogits_tile(h_ptr, w_ptr, rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, labels,
                 m_p, ls_p, m_q, ls_q, mean_diff, r_q, g_logp, g_kl, D, D_REF,
                 HAS_KL_GRAD: tl.constexpr, FORWARD_KL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, REF_PRECISION: tl.constexpr):
    """dL/dz for one tile, in fp32, recomputing the logits from the inputs.

    LSE_p is passed as its two parts (max m_p, log-sum ls_p) and log p = (z - m_p) - ls_p: at
    |z| ~ 1e3 the rounded sum m_p + ls_p alone would cost ~1e-4 relative error in every p.

    With p = softmax(z), q = softmax(z_ref), g_l / g_k the upstream grads of logp / kl:
        dL/dz_v = g_l (onehot_v - p_v)
                + g_k (p_v - q_v)                              forward KL(q || p)
                + g_k p_v (log p_v - log q_v - KL)             reverse KL(p || q)
          = g_k p_v (d_v - E_p[d]),  d_v = (z_v - m_p) - (zq_v - r_q)
    with r_q = zq at the mode of p (``mean_diff`` = E_p[d], from the forward): log p - log q - KL
    = d - E_p[d], the per-token constants cancel, and d is invariant to a per-token offset of
    either head's logits, so no ~1e3 - 1e3 rounding enters (neither from |z| nor from an offset
    between the heads); d is exactly 0 at the mode in both passes (see triton_backend).
    The onehot term is formed here in fp32, before any cast to the matmul dtype (Liger #1329).
    Rows beyond N and columns beyond V are zeroed so they contribute nothing to dH / dW. At columns
    beyond V the logits are 0, not -inf: log p and log q are set to -inf there (p = q = 0), since
    exp(0 - m) would overflow to inf when the token's maximum m < -88 (a large negative logit
    offset); the reverse KL's d there is finite ((0 - m_p) - (0 - r_q)) and multiplied by p = 0."""
    z = logits_tile(h_ptr, w_ptr, offs_n, offs_v, n_mask, v_mask, D,
                    BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    log_p = (z - m_p[:, None]) - ls_p[:, None]
    p = tl.exp(tl.where(v_mask[None, :], log_p, float("-inf")))
    onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
    dz = g_logp[:, None] * (onehot - p)
    if HAS_KL_GRAD:
        zq = logits_tile(rh_ptr, rw_ptr, offs_n, offs_v, n_mask, v_mask, D_REF,
                         BLOCK_N, BLOCK_V, BLOCK_D, REF_PRECISION)
        if FORWARD_KL:
            q = tl.exp(tl.where(v_mask[None, :], (zq - m_q[:, None]) - ls_q[:, None], float("-inf")))
            dz += g_kl[:, None] * (p - q)
        else:  # log p - log q - KL with the constants cancelled: d - E_p[d], d shifted by m_p and r_q
            d = (z - m_p[:, None]) - (zq - r_q[:, None])
            dz += g_kl[:, None] * p * (d - mean_diff[:, None])
    return tl.where(n_mask[:, None] & v_mask[None, :], dz, 0.0)
