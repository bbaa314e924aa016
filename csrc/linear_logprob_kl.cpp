// CPU kernel of linear_logprob_kl: per-token target log-prob and full-vocabulary KL between a
// policy head (hidden @ weight.T) and a frozen reference head, without ever holding N x V logits.
//
// Notation per token i:  z = policy logits, zq = reference logits, y = label,
//   p = softmax(z), q = softmax(zq), m_p / m_q running maxima, s_p = sum exp(z - m_p),
//   s_q = sum exp(zq - m_q).  log p_v = (z_v - m_p) - log s_p  (the max is kept apart from log s so
//   that |z| ~ 1e3 loses no precision in the subtraction).
//   forward KL  KL(q || p) = A / s_q - log s_q + log s_p,  A = sum_v e^{zq_v - m_q} ((zq_v - m_q) - (z_v - m_p))
//   reverse KL  KL(p || q) = B / s_p - log s_p + log s_q,  B = sum_v e^{z_v - m_p} ((z_v - m_p) - (zq_v - m_q))
// A, B and s are accumulated online over vocabulary tiles; when a maximum moves from m to m',
// s' = e^{m - m'} s and A' = e^{mq - mq'} [A + s_q ((mq - mq') - (mp - mp'))] (B symmetric).
//
// Backward, with upstream gradients g_l (on logp) and g_k (on KL), recomputes each logit tile:
//   dL/dz_v = g_l (1[v = y] - p_v) + g_k (p_v - q_v)                       forward KL
//   dL/dz_v = g_l (1[v = y] - p_v) + g_k p_v (log p_v - log q_v - KL)      reverse KL
//   dH = dZ W, dW = dZ^T H, everything in fp32 (the "+g_l" true-class term is added in fp32).
//
// Work split: token blocks are distributed statically over `slots` (one per thread); each slot owns
// a private fp32 dW accumulator, reduced in slot order at the end, so results are bitwise
// reproducible for a given thread count.  Tile matmuls go to BLAS through at::mm_out / addmm_ on
// preallocated fp32 tile buffers; the elementwise softmax work uses the vectorisable loops below.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kForward = 0;  // KL(p_ref || p_theta)
constexpr int64_t kReverse = 1;  // KL(p_theta || p_ref)
// Per-token statistics saved between forward and backward (fp32, N x kStats).
enum Stat : int64_t { kMaxP = 0, kLogSumP, kMaxQ, kLogSumQ, kKL, kStats };

// exp(x) for the inner loops: a branch-free Cephes-style polynomial that GCC vectorises (a libm call
// would not be).  x = n ln2 + r with |r| <= ln2/2; e^r by a degree-7 polynomial (~1 ulp); 2^n built
// in the exponent bits.  Inputs below -87.3 give ~1e-38 instead of a denormal; NaN propagates.
static inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer without a libm call
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;  // Cody-Waite split of ln2 keeps r exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static inline float row_max(const float* z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < n; ++v) m = z[v] > m ? z[v] : m;
  return m;
}

// sum_v exp(z_v - m)
static inline float sum_exp(const float* z, int64_t n, float m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < n; ++v) s += vexp(z[v] - m);
  return s;
}

// (sum_v e^{a_v - ma}, sum_v e^{a_v - ma} ((a_v - ma) - (b_v - mb))): the normaliser of softmax(a)
// and the unnormalised cross term of KL(softmax(a) || softmax(b)).
static inline void sum_exp_cross(const float* a, const float* b, int64_t n, float ma, float mb,
                                 float* s_out, float* c_out) {
  float s = 0.f, c = 0.f;
#pragma omp simd reduction(+ : s, c)
  for (int64_t v = 0; v < n; ++v) {
    float da = a[v] - ma;
    float e = vexp(da);
    s += e;
    c += e * (da - (b[v] - mb));
  }
  *s_out = s;
  *c_out = c;
}

// Running per-token statistics of the forward pass (double for the sums: V terms accumulate).
struct RowState {
  float m_p, m_q;
  double s_p, s_q, cross;  // cross = A (forward KL) or B (reverse KL)
  float z_y, zq_y;
};

struct Problem {
  at::Tensor hidden, weight, ref_hidden, ref_weight;  // contiguous
  const int64_t* labels;
  int64_t n, d, d_ref, vocab, ignore_index, direction;
  bool has_ref;
};

// fp32 source for a tile: a view when the tensor is already fp32, else a converted copy into buf.
static at::Tensor as_f32_rows(const at::Tensor& t, int64_t start, int64_t len, at::Tensor& buf) {
  at::Tensor rows = t.narrow(0, start, len);
  if (t.scalar_type() == at::kFloat) return rows;
  at::Tensor out = buf.narrow(0, 0, len * t.size(1)).view({len, t.size(1)});
  out.copy_(rows);
  return out;
}

static at::Tensor tile_view(at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

// Thread-private tile buffers (fixed size: block_n x block_v and block_v x D, never N- or V-sized).
struct Tiles {
  at::Tensor z, zq, h, hq, w, wq;
  Tiles(const Problem& P, int64_t bn, int64_t bv) {
    auto f32 = at::TensorOptions().dtype(at::kFloat);
    z = at::empty({bn * bv}, f32);
    if (P.has_ref) zq = at::empty({bn * bv}, f32);
    if (P.hidden.scalar_type() != at::kFloat) h = at::empty({bn * P.d}, f32);
    if (P.weight.scalar_type() != at::kFloat) w = at::empty({bv * P.d}, f32);
    if (P.has_ref && P.ref_hidden.scalar_type() != at::kFloat) hq = at::empty({bn * P.d_ref}, f32);
    if (P.has_ref && P.ref_weight.scalar_type() != at::kFloat) wq = at::empty({bv * P.d_ref}, f32);
  }
};

// Token blocks [first, last) of a static split of n_blocks over n_slots.
static inline void slot_range(int64_t slot, int64_t n_slots, int64_t n_blocks, int64_t* first,
                              int64_t* last) {
  *first = slot * n_blocks / n_slots;
  *last = (slot + 1) * n_blocks / n_slots;
}

static void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                         const c10::optional<at::Tensor>& ref_hidden,
                         const c10::optional<at::Tensor>& ref_weight, int64_t direction) {
  auto ok_dtype = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
           t.scalar_type() == at::kHalf;
  };
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
              "linear_logprob_kl cpu backend: tensors must be on the CPU");
  TORCH_CHECK(ok_dtype(hidden) && ok_dtype(weight), "hidden/weight must be float32, bfloat16 or float16");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden (N, D) and weight (V, D) expected");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == hidden.size(0),
              "labels must be int64 of shape (N,)");
  TORCH_CHECK(ref_hidden.has_value() == ref_weight.has_value(), "ref_hidden and ref_weight go together");
  TORCH_CHECK(direction == kForward || direction == kReverse, "direction must be 0 (forward) or 1 (reverse)");
  if (ref_hidden.has_value()) {
    TORCH_CHECK(ok_dtype(*ref_hidden) && ok_dtype(*ref_weight), "ref tensors must be floating point");
    TORCH_CHECK(ref_hidden->device().is_cpu() && ref_weight->device().is_cpu(), "ref tensors must be on CPU");
    TORCH_CHECK(ref_hidden->dim() == 2 && ref_weight->dim() == 2 && ref_hidden->size(0) == hidden.size(0) &&
                    ref_weight->size(0) == weight.size(0) && ref_hidden->size(1) == ref_weight->size(1),
                "ref_hidden (N, D_ref) and ref_weight (V, D_ref) must match N and V");
  }
}

static Problem make_problem(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& ref_hidden,
                            const c10::optional<at::Tensor>& ref_weight, int64_t direction,
                            int64_t ignore_index) {
  check_inputs(hidden, weight, labels, ref_hidden, ref_weight, direction);
  Problem P;
  P.hidden = hidden.contiguous();
  P.weight = weight.contiguous();
  P.labels = labels.data_ptr<int64_t>();
  P.n = hidden.size(0);
  P.d = hidden.size(1);
  P.vocab = weight.size(0);
  P.ignore_index = ignore_index;
  P.direction = direction;
  P.has_ref = ref_hidden.has_value();
  P.d_ref = 0;
  if (P.has_ref) {
    P.ref_hidden = ref_hidden->contiguous();
    P.ref_weight = ref_weight->contiguous();
    P.d_ref = P.ref_hidden.size(1);
  }
  for (int64_t i = 0; i < P.n; ++i) {
    int64_t y = P.labels[i];
    TORCH_CHECK(y == ignore_index || (y >= 0 && y < P.vocab), "label ", y, " at token ", i,
                " is outside [0, ", P.vocab, ") and is not ignore_index");
  }
  return P;
}

// Fewer tokens than threads x block_n: shrink the block so every thread gets work.
static int64_t effective_block_n(int64_t n, int64_t block_n, int64_t n_slots) {
  int64_t per_slot = (n + n_slots - 1) / std::max<int64_t>(n_slots, 1);
  int64_t bn = std::min(block_n, ((per_slot + 7) / 8) * 8);
  return std::max<int64_t>(bn, 1);
}

// Online update of row r's statistics with one logit tile (columns [v0, v0 + bv)).
static void update_row(RowState& st, const float* z, const float* zq, int64_t bv, int64_t v0,
                       int64_t y, bool first, bool has_ref, int64_t direction) {
  float mp_new = std::max(first ? -std::numeric_limits<float>::infinity() : st.m_p, row_max(z, bv));
  if (y >= v0 && y < v0 + bv) {
    st.z_y = z[y - v0];
    if (has_ref) st.zq_y = zq[y - v0];
  }
  if (!has_ref) {
    float s = sum_exp(z, bv, mp_new);
    st.s_p = first ? s : st.s_p * std::exp(static_cast<double>(st.m_p) - mp_new) + s;
    st.m_p = mp_new;
    return;
  }
  float mq_new = std::max(first ? -std::numeric_limits<float>::infinity() : st.m_q, row_max(zq, bv));
  float sp, sq, cross;
  if (direction == kForward) {
    sum_exp_cross(zq, z, bv, mq_new, mp_new, &sq, &cross);
    sp = sum_exp(z, bv, mp_new);
  } else {
    sum_exp_cross(z, zq, bv, mp_new, mq_new, &sp, &cross);
    sq = sum_exp(zq, bv, mq_new);
  }
  if (first) {
    st.s_p = sp;
    st.s_q = sq;
    st.cross = cross;
  } else {
    double dp = static_cast<double>(st.m_p) - mp_new;  // <= 0
    double dq = static_cast<double>(st.m_q) - mq_new;  // <= 0
    double rp = std::exp(dp), rq = std::exp(dq);
    // Shift the cross term to the new maxima, then rescale (see the header formulas).
    if (direction == kForward) {
      st.cross = rq * (st.cross + st.s_q * (dq - dp)) + cross;
    } else {
      st.cross = rp * (st.cross + st.s_p * (dp - dq)) + cross;
    }
    st.s_p = st.s_p * rp + sp;
    st.s_q = st.s_q * rq + sq;
  }
  st.m_p = mp_new;
  st.m_q = mq_new;
}

}  // namespace

// Returns (logp, kl, ref_logp, stats); kl/ref_logp are zeros of shape (N,) without a reference.
std::vector<at::Tensor> llkl_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& labels, const c10::optional<at::Tensor>& ref_hidden,
                                     const c10::optional<at::Tensor>& ref_weight, int64_t direction,
                                     int64_t ignore_index, int64_t block_n, int64_t block_v) {
  const Problem P = make_problem(hidden, weight, labels, ref_hidden, ref_weight, direction, ignore_index);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logp = at::zeros({P.n}, f32), kl = at::zeros({P.n}, f32), ref_logp = at::zeros({P.n}, f32);
  at::Tensor stats = at::zeros({P.n, kStats}, f32);
  if (P.n == 0 || P.vocab == 0) return {logp, kl, ref_logp, stats};
  TORCH_CHECK(block_n > 0 && block_v > 0, "tile sizes must be positive");

  const int64_t n_slots = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bn = effective_block_n(P.n, block_n, n_slots);
  const int64_t bv = std::min(block_v, P.vocab);
  const int64_t n_blocks = (P.n + bn - 1) / bn;
  float* logp_p = logp.data_ptr<float>();
  float* kl_p = kl.data_ptr<float>();
  float* ref_logp_p = ref_logp.data_ptr<float>();
  float* stats_p = stats.data_ptr<float>();

  at::parallel_for(0, n_slots, 1, [&](int64_t slot_begin, int64_t slot_end) {
    Tiles T(P, bn, bv);
    std::vector<RowState> rows(bn);
    for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
      int64_t b_first, b_last;
      slot_range(slot, n_slots, n_blocks, &b_first, &b_last);
      for (int64_t b = b_first; b < b_last; ++b) {
        const int64_t i0 = b * bn, nb = std::min(bn, P.n - i0);
        at::Tensor h = as_f32_rows(P.hidden, i0, nb, T.h);
        at::Tensor hq;
        if (P.has_ref) hq = as_f32_rows(P.ref_hidden, i0, nb, T.hq);
        for (int64_t v0 = 0; v0 < P.vocab; v0 += bv) {
          const int64_t nv = std::min(bv, P.vocab - v0);
          at::Tensor z = tile_view(T.z, nb, nv);
          at::mm_out(z, h, as_f32_rows(P.weight, v0, nv, T.w).t());
          const float* zp = z.data_ptr<float>();
          const float* zqp = nullptr;
          if (P.has_ref) {
            at::Tensor zq = tile_view(T.zq, nb, nv);
            at::mm_out(zq, hq, as_f32_rows(P.ref_weight, v0, nv, T.wq).t());
            zqp = zq.data_ptr<float>();
          }
          for (int64_t r = 0; r < nb; ++r) {
            update_row(rows[r], zp + r * nv, P.has_ref ? zqp + r * nv : nullptr, nv, v0,
                       P.labels[i0 + r], v0 == 0, P.has_ref, P.direction);
          }
        }
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t i = i0 + r;
          const RowState& st = rows[r];
          float* s = stats_p + i * kStats;
          const double log_sp = std::log(st.s_p);
          s[kMaxP] = st.m_p;
          s[kLogSumP] = static_cast<float>(log_sp);
          if (P.has_ref) {
            const double log_sq = std::log(st.s_q);
            s[kMaxQ] = st.m_q;
            s[kLogSumQ] = static_cast<float>(log_sq);
            const double klv = P.direction == kForward ? st.cross / st.s_q - log_sq + log_sp
                                                       : st.cross / st.s_p - log_sp + log_sq;
            s[kKL] = static_cast<float>(klv);
          }
          if (P.labels[i] == P.ignore_index) continue;  // outputs stay 0
          logp_p[i] = static_cast<float>((static_cast<double>(st.z_y) - st.m_p) - log_sp);
          if (P.has_ref) {
            kl_p[i] = s[kKL];
            ref_logp_p[i] =
                static_cast<float>((static_cast<double>(st.zq_y) - st.m_q) - static_cast<double>(s[kLogSumQ]));
          }
        }
      }
    }
  });
  return {logp, kl, ref_logp, stats};
}

namespace {

// Overwrites the logit tile z (rows x nv) with dL/dz in fp32 (see the header formulas).
static void logit_grad_tile(float* z, const float* zq, int64_t nb, int64_t nv, int64_t v0, int64_t i0,
                            const Problem& P, const float* stats, const float* g_l, const float* g_k) {
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t i = i0 + r;
    float* zr = z + r * nv;
    const float gl = g_l ? g_l[i] : 0.f;
    const float gk = (g_k && P.has_ref) ? g_k[i] : 0.f;
    if (P.labels[i] == P.ignore_index || (gl == 0.f && gk == 0.f)) {
      std::fill(zr, zr + nv, 0.f);
      continue;
    }
    const float* s = stats + i * kStats;
    const float mp = s[kMaxP], lsp = s[kLogSumP];
    if (gk == 0.f) {
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) zr[v] = -gl * vexp((zr[v] - mp) - lsp);
    } else {
      const float* zqr = zq + r * nv;
      const float mq = s[kMaxQ], lsq = s[kLogSumQ];
      if (P.direction == kForward) {
        const float a = gk - gl;
#pragma omp simd
        for (int64_t v = 0; v < nv; ++v) {
          zr[v] = a * vexp((zr[v] - mp) - lsp) - gk * vexp((zqr[v] - mq) - lsq);
        }
      } else {
        const float klv = s[kKL];
#pragma omp simd
        for (int64_t v = 0; v < nv; ++v) {
          const float lp = (zr[v] - mp) - lsp;
          const float lq = (zqr[v] - mq) - lsq;
          zr[v] = vexp(lp) * (gk * ((lp - lq) - klv) - gl);
        }
      }
    }
    const int64_t y = P.labels[i];
    if (y >= v0 && y < v0 + nv) zr[y - v0] += gl;  // true-class term, in fp32
  }
}

static bool block_has_grad(const Problem& P, int64_t i0, int64_t nb, const float* g_l, const float* g_k,
                           bool* need_ref) {
  bool any = false;
  *need_ref = false;
  for (int64_t i = i0; i < i0 + nb; ++i) {
    if (P.labels[i] == P.ignore_index) continue;
    const bool gk = g_k && P.has_ref && g_k[i] != 0.f;
    any = any || gk || (g_l && g_l[i] != 0.f);
    *need_ref = *need_ref || gk;
  }
  return any;
}

}  // namespace

// Returns (grad_hidden, grad_weight); a gradient that is not needed comes back as an empty tensor.
std::vector<at::Tensor> llkl_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                      const at::Tensor& labels, const c10::optional<at::Tensor>& ref_hidden,
                                      const c10::optional<at::Tensor>& ref_weight, const at::Tensor& stats,
                                      const c10::optional<at::Tensor>& grad_logp,
                                      const c10::optional<at::Tensor>& grad_kl, int64_t direction,
                                      int64_t ignore_index, bool need_dh, bool need_dw, int64_t block_n,
                                      int64_t block_v) {
  const Problem P = make_problem(hidden, weight, labels, ref_hidden, ref_weight, direction, ignore_index);
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor g_l_t, g_k_t;
  if (grad_logp.has_value()) g_l_t = grad_logp->to(at::kFloat).contiguous();
  if (grad_kl.has_value() && P.has_ref) g_k_t = grad_kl->to(at::kFloat).contiguous();
  const float* g_l = g_l_t.defined() ? g_l_t.data_ptr<float>() : nullptr;
  const float* g_k = g_k_t.defined() ? g_k_t.data_ptr<float>() : nullptr;
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.size(0) == P.n,
              "stats must be the forward's fp32 (N, 5) tensor");
  const float* stats_p = stats.data_ptr<float>();

  at::Tensor dh_f32 = need_dh ? at::zeros({P.n, P.d}, f32) : at::Tensor();
  const int64_t n_slots = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bn = effective_block_n(std::max<int64_t>(P.n, 1), block_n, n_slots);
  const int64_t bv = std::max<int64_t>(1, std::min(block_v, P.vocab));
  const int64_t n_blocks = (P.n + bn - 1) / bn;
  const int64_t used_slots = std::max<int64_t>(1, std::min(n_slots, n_blocks));
  // dW accumulators: slot 0 writes straight into the fp32 result, slots 1.. into private buffers.
  std::vector<at::Tensor> dw_acc;
  if (need_dw) {
    for (int64_t s = 0; s < used_slots; ++s) dw_acc.push_back(at::zeros({P.vocab, P.d}, f32));
  }

  if (P.n > 0 && P.vocab > 0) {
    at::parallel_for(0, used_slots, 1, [&](int64_t slot_begin, int64_t slot_end) {
      Tiles T(P, bn, bv);
      for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
        int64_t b_first, b_last;
        slot_range(slot, used_slots, n_blocks, &b_first, &b_last);
        for (int64_t b = b_first; b < b_last; ++b) {
          const int64_t i0 = b * bn, nb = std::min(bn, P.n - i0);
          bool need_ref;
          if (!block_has_grad(P, i0, nb, g_l, g_k, &need_ref)) continue;  // zero gradient: skip the block
          at::Tensor h = as_f32_rows(P.hidden, i0, nb, T.h);
          at::Tensor hq;
          if (need_ref) hq = as_f32_rows(P.ref_hidden, i0, nb, T.hq);
          // Rows of the zero-initialised fp32 result: each block owns its rows, no reduction needed.
          at::Tensor dh = need_dh ? dh_f32.narrow(0, i0, nb) : at::Tensor();
          for (int64_t v0 = 0; v0 < P.vocab; v0 += bv) {
            const int64_t nv = std::min(bv, P.vocab - v0);
            at::Tensor w = as_f32_rows(P.weight, v0, nv, T.w);
            at::Tensor z = tile_view(T.z, nb, nv);
            at::mm_out(z, h, w.t());
            const float* zqp = nullptr;
            if (need_ref) {
              at::Tensor zq = tile_view(T.zq, nb, nv);
              at::mm_out(zq, hq, as_f32_rows(P.ref_weight, v0, nv, T.wq).t());
              zqp = zq.data_ptr<float>();
            }
            logit_grad_tile(z.data_ptr<float>(), zqp, nb, nv, v0, i0, P, stats_p, g_l,
                            need_ref ? g_k : nullptr);
            if (need_dh) dh.addmm_(z, w);                                    // dH += dZ W
            if (need_dw) dw_acc[slot].narrow(0, v0, nv).addmm_(z.t(), h);    // dW += dZ^T H
          }
        }
      }
    });
  }

  at::Tensor grad_hidden = need_dh ? dh_f32.to(P.hidden.scalar_type()) : at::empty({0}, f32);
  at::Tensor grad_weight = at::empty({0}, f32);
  if (need_dw) {
    for (int64_t s = 1; s < used_slots; ++s) {
      dw_acc[0].add_(dw_acc[s]);  // fixed order: deterministic for a given thread count
      dw_acc[s] = at::Tensor();
    }
    grad_weight = dw_acc[0].to(P.weight.scalar_type());
  }
  return {grad_hidden, grad_weight};
}

TORCH_LIBRARY(synthunlearn_llkl, m) {
  m.def("forward(Tensor hidden, Tensor weight, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
        "int direction, int ignore_index, int block_n, int block_v) -> Tensor[]");
  m.def("backward(Tensor hidden, Tensor weight, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
        "Tensor stats, Tensor? grad_logp, Tensor? grad_kl, int direction, int ignore_index, bool need_dh, "
        "bool need_dw, int block_n, int block_v) -> Tensor[]");
  m.impl("forward", c10::DispatchKey::CPU, TORCH_FN(llkl_forward));
  m.impl("backward", c10::DispatchKey::CPU, TORCH_FN(llkl_backward));
}
