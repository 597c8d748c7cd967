// Row kernels for the CPU backend: log-sum-exp of both sides, the divergence and its gradient,
// written in place over the student logits. Follows torch_chunked.token_terms term by term.
//
// The float entry point is cloned for AVX-512, AVX2 and baseline x86-64 (picked at load time),
// so one wheel is both portable and vectorised; the float exp below is written with selects only
// so the compiler can vectorise it (libm's expf is a scalar call without -ffast-math, which we
// cannot use: the loss relies on inf and NaN semantics).
#include "hindsight_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define HSD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define HSD_CLONES
#endif

namespace hsd {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// exp(x) for x <= 88 (log-probabilities are <= 0), ~1 ulp (Cephes polynomial); exact 0 below
// the normal range, NaN in, NaN out.
inline float exp_vec(float x) {
  constexpr float hi = 88.0f, lo = -87.33654f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = xc == xc ? xc : 0.0f;
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = y * scale;
  out = x < lo ? 0.0f : out;
  out = x > hi ? std::numeric_limits<float>::infinity() : out;
  return x == x ? out : x;
}

inline double exp_vec(double x) { return std::exp(x); }

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Reductions run in T over blocks of kBlock entries (vectorised: one type per loop) and are
// carried across blocks in double.
constexpr int64_t kBlock = 1024;

// sum_i exp((x_i - shift) * scale); NaN anywhere in x gives NaN.
template <typename T>
inline double row_sumexp(const T* x, int64_t n, T shift, T scale) {
  double acc = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = b; i < e; ++i) part += exp_vec((x[i] - shift) * scale);
    acc += static_cast<double>(part);
  }
  return acc;
}

// p * (log p - log q) with 0 * log 0 = 0 (NaN stays NaN).
inline double plogratio(double lp, double lq) { return lp == -kInf ? 0.0 : std::exp(lp) * (lp - lq); }

inline double logaddexp(double a, double b) {
  if (a == -kInf && b == -kInf) return -kInf;
  const double m = a > b ? a : b;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// torch_chunked._divergence_and_slope on a short vector (the top-k buckets), in double.
double divergence_and_slope(const double* lp, const double* lq, int64_t n, double alpha,
                            double* slope) {
  double d = 0.0;
  if (alpha == 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      d += plogratio(lq[i], lp[i]);
      slope[i] = -std::exp(lq[i]);
    }
  } else if (alpha == 1.0) {
    for (int64_t i = 0; i < n; ++i) {
      slope[i] = plogratio(lp[i], lq[i]);
      d += slope[i];
    }
  } else {
    const double la = std::log1p(-alpha), lb = std::log(alpha);
    for (int64_t i = 0; i < n; ++i) {
      const double lm = logaddexp(lp[i] + la, lq[i] + lb);
      slope[i] = (1.0 - alpha) * plogratio(lp[i], lm);
      d += slope[i] + alpha * plogratio(lq[i], lm);
    }
  }
  return d;
}

template <typename T>
struct RowContext {
  T* s;          // student logits in, gradient out
  const T* t;    // teacher logits
  int64_t vocab;
  T ms, mt;      // row maxima
  T lzs, lzt;    // log of the shifted partition sums: lp = (x - m) * inv_temp - lz
  double dlzs, dlzt;
  T inv_temp;
};

template <typename T>
inline T lp_of(T x, T m, T inv_temp, T lz) { return (x - m) * inv_temp - lz; }

template <typename T>
void fill(T* x, int64_t n, T value) { std::fill(x, x + n, value); }

// Full-vocabulary divergence. With ``grad`` the student row ends up holding the slope H and
// ``scratch`` p_s (alpha > 0), or p_s and p_t (alpha = 0); returns D and sets ``slope_sum``.
template <typename T, bool kGrad>
double full_pass(const RowContext<T>& c, double alpha, T* scratch, double* slope_sum) {
  T* __restrict s = c.s;
  const T* __restrict t = c.t;
  T* __restrict sc = scratch;
  const int64_t n = c.vocab;
  const T ninf = -std::numeric_limits<T>::infinity();
  double d = 0.0, sum = 0.0;
  if (alpha == 1.0) {
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      T part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t i = b; i < e; ++i) {
        const T lps = lp_of(s[i], c.ms, c.inv_temp, c.lzs);
        const T lpt = lp_of(t[i], c.mt, c.inv_temp, c.lzt);
        const T p = exp_vec(lps);
        const T sl = lps == ninf ? T(0) : p * (lps - lpt);
        if (kGrad) {
          sc[i] = p;
          s[i] = sl;
        }
        part += sl;
      }
      d += static_cast<double>(part);
    }
    sum = d;
  } else if (alpha == 0.0) {
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t e = std::min(n, b + kBlock);
      T part_d = 0, part_pt = 0;
#pragma omp simd reduction(+ : part_d, part_pt)
      for (int64_t i = b; i < e; ++i) {
        const T lps = lp_of(s[i], c.ms, c.inv_temp, c.lzs);
        const T lpt = lp_of(t[i], c.mt, c.inv_temp, c.lzt);
        const T pt = exp_vec(lpt);
        part_d += lpt == ninf ? T(0) : pt * (lpt - lps);
        part_pt += pt;
        if (kGrad) {
          s[i] = exp_vec(lps);
          sc[i] = pt;
        }
      }
      d += static_cast<double>(part_d);
      sum += static_cast<double>(part_pt);
    }
    sum = -sum;  // the slope is -p_t
  } else {
    const T wa = T(1.0 - alpha), wb = T(alpha);
    const double la = std::log1p(-alpha), lb = std::log(alpha);
    for (int64_t i = 0; i < n; ++i) {
      const T lps = lp_of(s[i], c.ms, c.inv_temp, c.lzs);
      const T lpt = lp_of(t[i], c.mt, c.inv_temp, c.lzt);
      const T ps = exp_vec(lps), pt = exp_vec(lpt);
      const T m = wa * ps + wb * pt;
      // the mixture in probability space, or in log space where it underflows
      const T lm = m >= std::numeric_limits<T>::min()
                       ? std::log(m)
                       : static_cast<T>(logaddexp(double(lps) + la, double(lpt) + lb));
      const T ts = (lps == ninf || ps == T(0)) ? T(0) : ps * (lps - lm);
      const T tt = (lpt == ninf || pt == T(0)) ? T(0) : pt * (lpt - lm);
      const T sl = wa * ts;
      d += static_cast<double>(sl) + alpha * static_cast<double>(tt);
      sum += static_cast<double>(sl);
      if (kGrad) {
        s[i] = sl;
        sc[i] = ps;
      }
    }
  }
  *slope_sum = sum;
  return d;
}

// Turns full_pass's buffers into the gradient scaled by ``factor`` (coef / temperature).
template <typename T>
void full_grad(const RowContext<T>& c, double alpha, const T* scratch, double slope_sum,
               double factor) {
  T* __restrict s = c.s;
  const T* __restrict sc = scratch;
  const T f = static_cast<T>(factor), ssum = static_cast<T>(slope_sum);
  if (alpha == 0.0) {  // grad = -p_t - p_s * sum(-p_t)
#pragma omp simd
    for (int64_t i = 0; i < c.vocab; ++i) s[i] = (-sc[i] - s[i] * ssum) * f;
  } else {  // grad = H - p_s * sum(H)
#pragma omp simd
    for (int64_t i = 0; i < c.vocab; ++i) s[i] = (s[i] - sc[i] * ssum) * f;
  }
}

// s[i] = p_s[i] * value for the whole row (the off-support part of the top-k gradient).
template <typename T>
void scaled_probs(const RowContext<T>& c, double value) {
  T* __restrict s = c.s;
  const T v = static_cast<T>(value);
#pragma omp simd
  for (int64_t i = 0; i < c.vocab; ++i) s[i] = exp_vec(lp_of(s[i], c.ms, c.inv_temp, c.lzs)) * v;
}

template <typename T>
struct TopkScratch {
  std::vector<int32_t> order;
  std::vector<double> lp, lq, slope;
};

// Top-k divergence (tail bucket or renormalised); writes the gradient when ``grad_factor`` is
// given (non-null), after the kl_clip decision which needs D first.
template <typename T>
double topk_row(const RowSpec& spec, const RowContext<T>& c, TopkScratch<T>& ws, bool want_grad,
                double coef_factor, double* loss_out) {
  const int64_t n = c.vocab, k = spec.topk;
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  if (!(std::isfinite(c.dlzs) && std::isfinite(c.dlzt))) {  // NaN / +inf / all -inf row
    if (want_grad) fill(c.s, n, static_cast<T>(qnan));
    *loss_out = qnan;
    return qnan;
  }
  ws.order.resize(n);
  std::iota(ws.order.begin(), ws.order.end(), 0);
  const T* ranked = spec.topk_from_teacher ? c.t : c.s;
  if (k < n) {
    std::nth_element(ws.order.begin(), ws.order.begin() + (k - 1), ws.order.end(),
                     [ranked](int32_t a, int32_t b) { return ranked[a] > ranked[b]; });
  }
  const int64_t nb = k + 1;
  ws.lp.resize(nb);
  ws.lq.resize(nb);
  ws.slope.resize(nb);
  double* lp = ws.lp.data();
  double* lq = ws.lq.data();
  double* slope = ws.slope.data();
  const double inv_temp = static_cast<double>(c.inv_temp);
  for (int64_t j = 0; j < k; ++j) {
    const int32_t id = ws.order[j];
    lp[j] = (double(c.s[id]) - double(c.ms)) * inv_temp - c.dlzs;
    lq[j] = (double(c.t[id]) - double(c.mt)) * inv_temp - c.dlzt;
  }
  double d, slope_sup = 0.0, slope_tail = 0.0, tail_s = 0.0;
  if (spec.tail) {
    // the off-support mass summed directly: 1 - sum over the support cancels catastrophically
    double tail_t = 0.0;
    for (int64_t j = k; j < n; ++j) {
      const int32_t id = ws.order[j];
      tail_s += std::exp((double(c.s[id]) - double(c.ms)) * inv_temp - c.dlzs);
      tail_t += std::exp((double(c.t[id]) - double(c.mt)) * inv_temp - c.dlzt);
    }
    lp[k] = std::log(tail_s);
    lq[k] = std::log(tail_t);
    d = divergence_and_slope(lp, lq, nb, spec.alpha, slope);
    for (int64_t j = 0; j < k; ++j) slope_sup += slope[j];
    slope_tail = slope[k];
  } else {
    double ms = -kInf, mt = -kInf;
    for (int64_t j = 0; j < k; ++j) {
      ms = std::max(ms, lp[j]);
      mt = std::max(mt, lq[j]);
    }
    double zs = 0.0, zt = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      zs += std::exp(lp[j] - ms);
      zt += std::exp(lq[j] - mt);
    }
    const double lse_s = ms + std::log(zs), lse_t = mt + std::log(zt);
    for (int64_t j = 0; j < k; ++j) {
      lp[j] -= lse_s;
      lq[j] -= lse_t;
    }
    d = divergence_and_slope(lp, lq, k, spec.alpha, slope);
    for (int64_t j = 0; j < k; ++j) slope_sup += slope[j];
  }
  const bool clipped = spec.kl_clip > 0.0 && d > spec.kl_clip;
  *loss_out = clipped ? spec.kl_clip : d;
  if (!want_grad) return d;
  if (clipped) {
    fill(c.s, n, T(0));
    return d;
  }
  const double f = coef_factor;
  if (spec.tail) {
    // off-support entries move the tail bucket: p_l / P_tail of it, (1 - P_tail) net
    const double per_tail = tail_s > 0.0 ? slope_tail / tail_s : 0.0;
    const double off = -slope_sup + (1.0 - tail_s) * per_tail;
    scaled_probs(c, off * f);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ws.order[j];
      c.s[id] = static_cast<T>((slope[j] - std::exp(lp[j]) * (slope_sup + slope_tail)) * f);
    }
  } else {
    fill(c.s, n, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ws.order[j];
      c.s[id] = static_cast<T>((slope[j] - std::exp(lp[j]) * slope_sup) * f);
    }
  }
  return d;
}

template <typename T>
inline void rows_impl(const RowSpec& spec, const RowBlock<T>& b, int64_t begin, int64_t end) {
  const int64_t n = b.vocab;
  const double inv_temp_d = 1.0 / spec.temperature;
  const T inv_temp = static_cast<T>(inv_temp_d);
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  std::vector<T> scratch;
  TopkScratch<T> topk_ws;
  for (int64_t r = begin; r < end; ++r) {
    RowContext<T> c;
    c.s = b.student + r * b.student_stride;
    c.t = b.teacher + r * b.teacher_stride;
    c.vocab = n;
    c.inv_temp = inv_temp;
    c.ms = row_max(c.s, n);
    c.mt = row_max(c.t, n);
    c.dlzs = std::log(row_sumexp(c.s, n, c.ms, inv_temp));
    c.dlzt = std::log(row_sumexp(c.t, n, c.mt, inv_temp));
    c.lzs = static_cast<T>(c.dlzs);
    c.lzt = static_cast<T>(c.dlzt);
    const double coef = static_cast<double>(b.coef[r]);
    // coef == 0 rows get exactly zero gradient (even for NaN inputs)
    const bool want_grad = spec.compute_grad && coef != 0.0;
    const double factor = coef * inv_temp_d;

    double lps_y = 0.0, lpt_y = 0.0;
    if (b.target != nullptr) {
      const int64_t y = b.target[r];
      lps_y = (double(c.s[y]) - double(c.ms)) * inv_temp_d - c.dlzs;
      lpt_y = (double(c.t[y]) - double(c.mt)) * inv_temp_d - c.dlzt;
    }
    const double adv = lpt_y - lps_y;
    double loss, div;
    if (spec.mode == kSampled) {
      double a = adv;
      if (b.advantage != nullptr) {
        a = static_cast<double>(b.advantage[r]);
      } else if (spec.signal_clip > 0.0) {
        a = a > spec.signal_clip ? spec.signal_clip : (a < -spec.signal_clip ? -spec.signal_clip : a);
      }
      loss = -a * lps_y;
      div = -adv;
      if (want_grad) {  // d(-a log p_y)/ds = a (p - onehot_y)
        const double scale = coef * a * inv_temp_d;
        scaled_probs(c, scale);
        c.s[b.target[r]] -= static_cast<T>(scale);
      }
    } else if (spec.mode == kFull) {
      double slope_sum = 0.0;
      if (want_grad) {
        scratch.resize(n);
        div = full_pass<T, true>(c, spec.alpha, scratch.data(), &slope_sum);
      } else {
        div = full_pass<T, false>(c, spec.alpha, nullptr, &slope_sum);
      }
      const bool clipped = spec.kl_clip > 0.0 && div > spec.kl_clip;
      loss = clipped ? spec.kl_clip : div;
      if (want_grad) {
        if (clipped) {
          fill(c.s, n, T(0));
        } else {
          full_grad(c, spec.alpha, scratch.data(), slope_sum, factor);
        }
      }
    } else {
      div = topk_row(spec, c, topk_ws, want_grad, factor, &loss);
    }
    if (spec.compute_grad && !want_grad) fill(c.s, n, T(0));
    if (std::isnan(c.dlzs) || std::isnan(c.dlzt)) {  // NaN inputs never give a finite loss
      loss = qnan;
      div = qnan;
    }
    b.loss[r] = static_cast<T>(loss);
    T* st = b.stats + 4 * r;
    st[0] = static_cast<T>(lps_y);
    st[1] = static_cast<T>(lpt_y);
    st[2] = static_cast<T>(adv);
    st[3] = static_cast<T>(div);
  }
}

}  // namespace

HSD_CLONES
void hindsight_rows(const RowSpec& spec, const RowBlock<float>& block, int64_t begin, int64_t end) {
  rows_impl<float>(spec, block, begin, end);
}

void hindsight_rows(const RowSpec& spec, const RowBlock<double>& block, int64_t begin, int64_t end) {
  rows_impl<double>(spec, block, begin, end);
}

}  // namespace hsd
