// Row kernels for the CPU backend: log-sum-exp of both sides, the divergence and its gradient,
// written in place over the student logits. Follows torch_chunked.token_terms term by term.
//
// The float entry point is compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and
// baseline x86-64, and the best one the CPU supports is picked on first use (HSD_CPU_ISA can ask
// for a lower one: tests and benchmarks run every variant on one machine), so one wheel is both
// portable and vectorised. The float exp and log below are written with selects only so the
// compiler can vectorise them (libm's expf / logf are scalar calls without -ffast-math, which we
// cannot use: the loss relies on inf and NaN semantics).
//
// Every pass over the vocabulary is a vectorised loop; the only scalar work per row is the top-k
// selection among a few candidate blocks and the divergence over the k + 1 top-k buckets.
#include "hindsight_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define HSD_X86_VARIANTS 1
#define HSD_TARGET(arch) __attribute__((target(arch), flatten))
#else
#define HSD_X86_VARIANTS 0
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

// log(x) for positive normal x, ~1 ulp (Cephes logf polynomial). Only called on [1, 2] here
// (log1p of a probability ratio), so zero, negative, subnormal and non-finite inputs are not
// handled. The reduction x = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)), is done on the bits
// (as musl's logf does) rather than with a compare and select: composed with exp_vec, GCC 12
// cannot if-convert that select and leaves the whole loop scalar.
inline float log_vec(float x) {
  uint32_t ix;
  std::memcpy(&ix, &x, sizeof(ix));
  ix += 0x3f800000u - 0x3f3504f3u;
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  float m;
  std::memcpy(&m, &ix, sizeof(m));
  m -= 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * k;
}

// log(exp(a) + exp(b)); -inf when both are -inf.
inline double logaddexp(double a, double b) {
  if (a == -kInf && b == -kInf) return -kInf;
  const double m = a > b ? a : b;
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// The same in a vectorisable form. Callers discard the result where both are -inf (NaN there).
inline float logaddexp_vec(float a, float b) {
  const float hi = a > b ? a : b, lo = a > b ? b : a;
  return hi + log_vec(1.0f + exp_vec(lo - hi));
}

inline double logaddexp_vec(double a, double b) { return logaddexp(a, b); }

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

// p * (log p - log q) with 0 * log 0 = 0 and the limit +inf where q = 0 < p, even when p
// underflows (0 * inf would be NaN); NaN stays NaN.
inline double plogratio(double lp, double lq) {
  if (lp == -kInf) return 0.0;
  if (lq == -kInf && lp == lp) return kInf;
  return std::exp(lp) * (lp - lq);
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

template <typename T>
struct Sums2 {
  T a, b;
};

// Adds to *a and *b the row sums of the two terms term(i, lp_s[i], lp_t[i]) returns (a Sums2),
// vectorised in T over blocks of kBlock entries and carried across blocks in double. ``term``
// may write entry i of the student row (read before the call) and of scratch rows.
template <typename T, typename Term>
inline void row_sums2(const RowContext<T>& c, double* a, double* b, const Term& term) {
  // not __restrict: ``term`` writes the student row through its own pointer
  const T* s = c.s;
  const T* t = c.t;
  const int64_t n = c.vocab;
  for (int64_t lo = 0; lo < n; lo += kBlock) {
    const int64_t hi = std::min(n, lo + kBlock);
    T part_a = 0, part_b = 0;
#pragma omp simd reduction(+ : part_a, part_b)
    for (int64_t i = lo; i < hi; ++i) {
      const Sums2<T> v = term(i, lp_of(s[i], c.ms, c.inv_temp, c.lzs),
                              lp_of(t[i], c.mt, c.inv_temp, c.lzt));
      part_a += v.a;
      part_b += v.b;
    }
    *a += static_cast<double>(part_a);
    *b += static_cast<double>(part_b);
  }
}

// Full-vocabulary divergence. With ``grad`` the student row ends up holding the slope H and
// ``scratch`` p_s (alpha > 0), or p_s and p_t (alpha = 0); returns D and sets ``slope_sum``.
// Where one side's probability underflows to 0 while the other side is -inf, the term is the
// limit +inf (not 0 * inf = NaN), which kl_clip then caps.
template <typename T, bool kGrad>
double full_pass(const RowContext<T>& c, double alpha, T* scratch, double* slope_sum) {
  T* __restrict s = c.s;
  const T* __restrict t = c.t;
  T* __restrict sc = scratch;
  const int64_t n = c.vocab;
  const T ninf = -std::numeric_limits<T>::infinity(), pinf = std::numeric_limits<T>::infinity();
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
        const T sl = lps == ninf ? T(0) : (lpt == ninf ? pinf : p * (lps - lpt));
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
    row_sums2(c, &d, &sum, [&](int64_t i, T lps, T lpt) {
      const T pt = exp_vec(lpt);
      if (kGrad) {
        s[i] = exp_vec(lps);
        sc[i] = pt;
      }
      return Sums2<T>{lpt == ninf ? T(0) : (lps == ninf ? pinf : pt * (lpt - lps)), pt};
    });
    sum = -sum;  // the slope is -p_t
  } else {
    // The mixture in log space, log((1-a) p_s + a p_t) = logaddexp(lp_s + log(1-a),
    // lp_t + log a): exact where both probabilities underflow, finite wherever one side is.
    const T wa = static_cast<T>(1.0 - alpha);
    const T la = static_cast<T>(std::log1p(-alpha)), lb = static_cast<T>(std::log(alpha));
    double sum_ts = 0.0, sum_tt = 0.0;
    row_sums2(c, &sum_ts, &sum_tt, [&](int64_t i, T lps, T lpt) {
      const T ps = exp_vec(lps), pt = exp_vec(lpt);
      const T lm = logaddexp_vec(lps + la, lpt + lb);
      const T ts = lps == ninf ? T(0) : ps * (lps - lm);
      const T tt = lpt == ninf ? T(0) : pt * (lpt - lm);
      if (kGrad) {
        s[i] = wa * ts;
        sc[i] = ps;
      }
      return Sums2<T>{ts, tt};
    });
    sum = (1.0 - alpha) * sum_ts;
    d = sum + alpha * sum_tt;
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

// s[i] = exp((s[i] - ms) / T - lz) * value for the whole row: p_s * value with lz = the row's
// log-partition (the sampled gradient), p_s / P_tail * value with lz + log P_tail (top-k).
template <typename T>
void scaled_probs(const RowContext<T>& c, T lz, double value) {
  T* __restrict s = c.s;
  const T v = static_cast<T>(value);
#pragma omp simd
  for (int64_t i = 0; i < c.vocab; ++i) s[i] = exp_vec(lp_of(s[i], c.ms, c.inv_temp, lz)) * v;
}

// ---- top-k ------------------------------------------------------------------------------
//
// The support (contract B) is the first k entries of a stable descending sort of the ranking
// side's logits: among values equal to the k-th largest, the lower vocabulary id is in. Ranking
// the raw logits is ranking the temperature-scaled log-probabilities (a monotone map).
//
// Selection without touching all V entries in scalar code: the maxima of blocks of up to 64
// entries (one vectorised pass, which also gives the row maximum) bound the k-th largest value
// from below by their own k-th largest, since k blocks hold an entry at least that large. Only
// the few blocks whose maximum reaches that bound are scanned for candidates, and the
// candidates (about k for ordinary rows) are ordered by (value desc, id asc).

template <typename T>
struct Candidate {
  T value;
  int32_t id;
};

template <typename T>
inline bool ranks_before(const Candidate<T>& a, const Candidate<T>& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

template <typename T>
struct TopkScratch {
  std::vector<T> block_max, bound;
  std::vector<Candidate<T>> cand;
  std::vector<int32_t> tied_out;  // ranked equal to the k-th but left out (lower ids won)
  std::vector<double> lp, lq, slope;
};

// Selects the support of ``x`` into ws.cand[0, k) (ws.cand[k - 1] is the k-th ranked entry; the
// others are in no particular order) and returns the row maximum; ``ok`` is false when NaN
// entries leave fewer than k comparable values. Afterwards ws.cand[k, end) holds every other
// candidate, so the entries tied with the k-th that were left out are there too (the tail sums
// need them).
template <typename T>
T select_topk(const T* x, int64_t n, int64_t k, TopkScratch<T>& ws, bool* ok) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t bs = std::clamp<int64_t>(n / (4 * k), 1, 64);
  const int64_t nblocks = (n + bs - 1) / bs;
  ws.block_max.resize(nblocks);
  T row_m = ninf;
  if (bs == 1) {  // k >= n / 8: every entry is its own block (NaN never ranks: -inf)
    T* __restrict bm = ws.block_max.data();
#pragma omp simd reduction(max : row_m)
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i] == x[i] ? x[i] : ninf;
      bm[i] = v;
      row_m = v > row_m ? v : row_m;
    }
  } else {
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t lo = b * bs;
      const T m = row_max(x + lo, std::min(bs, n - lo));  // NaN-free: NaN never beats m
      ws.block_max[b] = m;
      row_m = m > row_m ? m : row_m;
    }
  }
  // the k-th largest block maximum: at least k entries reach it
  ws.bound.assign(ws.block_max.begin(), ws.block_max.end());
  std::nth_element(ws.bound.begin(), ws.bound.begin() + (k - 1), ws.bound.end(), std::greater<T>());
  const T bound = ws.bound[k - 1];
  ws.cand.clear();
  for (int64_t b = 0; b < nblocks; ++b) {
    if (!(ws.block_max[b] >= bound)) continue;
    const int64_t lo = b * bs, hi = std::min(n, lo + bs);
    for (int64_t i = lo; i < hi; ++i) {
      if (x[i] >= bound) ws.cand.push_back({x[i], static_cast<int32_t>(i)});
    }
  }
  *ok = static_cast<int64_t>(ws.cand.size()) >= k;  // an all-NaN block's maximum is -inf
  if (!*ok) return row_m;
  // (value desc, id asc) is a strict total order: the first k are the stable-sort support
  std::nth_element(ws.cand.begin(), ws.cand.begin() + (k - 1), ws.cand.end(), ranks_before<T>);
  return row_m;
}

// Off-support sums of exp((x - shift) * inv_temp) for both sides over the entries ranked
// strictly below ``cut`` (vectorised, by value), plus the listed ``extra`` ids (the entries
// tied with the k-th ranked value that the support left out).
template <typename T>
void off_support_sums(const T* r, T cut, const T* s, const T* t, int64_t n, T shift_s, T shift_t,
                      T inv_temp, const std::vector<int32_t>& extra, double* sum_s,
                      double* sum_t) {
  double acc_s = 0.0, acc_t = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T part_s = 0, part_t = 0;
#pragma omp simd reduction(+ : part_s, part_t)
    for (int64_t i = b; i < e; ++i) {
      const bool off = !(r[i] >= cut);  // NaN ranks off the support and reaches the sums
      const T es = exp_vec((s[i] - shift_s) * inv_temp);
      const T et = exp_vec((t[i] - shift_t) * inv_temp);
      part_s += off ? es : T(0);
      part_t += off ? et : T(0);
    }
    acc_s += static_cast<double>(part_s);
    acc_t += static_cast<double>(part_t);
  }
  for (const int32_t id : extra) {
    acc_s += std::exp((double(s[id]) - double(shift_s)) * double(inv_temp));
    acc_t += std::exp((double(t[id]) - double(shift_t)) * double(inv_temp));
  }
  *sum_s = acc_s;
  *sum_t = acc_t;
}

// log sum exp((x - shift) * inv_temp) over the same off-support entries, summed relative to
// their own maximum: exact where the sums above lost everything to exp's underflow. -inf for an
// empty bucket.
template <typename T>
double off_support_logsumexp(const T* r, T cut, const T* x, int64_t n, T shift, T inv_temp,
                             const std::vector<int32_t>& extra) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = (!(r[i] >= cut) && x[i] > m) ? x[i] : m;
  for (const int32_t id : extra) m = x[id] > m ? x[id] : m;
  if (m == -std::numeric_limits<T>::infinity()) return -kInf;
  double acc = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = b; i < e; ++i) {
      const T ex = exp_vec((x[i] - m) * inv_temp);
      part += !(r[i] >= cut) ? ex : T(0);
    }
    acc += static_cast<double>(part);
  }
  for (const int32_t id : extra) acc += std::exp((double(x[id]) - double(m)) * double(inv_temp));
  return (double(m) - double(shift)) * double(inv_temp) + std::log(acc);
}

// Below this (relative to the row maximum's exp(0) = 1) a float tail sum has lost the entries
// that exp flushed to zero (e^-87); it is then recomputed shifted by the tail's own maximum.
constexpr double kTailRescue = 1e-20;

// Top-k divergence (tail bucket or renormalised). Also computes the row's log-partition
// (c.dlzs / c.dlzt: support plus off-support sums, so no separate log-sum-exp pass) and writes
// the gradient when ``want_grad``, after the kl_clip decision which needs D first. Returns D;
// NaN rows (NaN, +inf or all -inf logits) return NaN with c.dlzs = NaN.
template <typename T>
double topk_row(const RowSpec& spec, RowContext<T>& c, TopkScratch<T>& ws, bool want_grad,
                double coef_factor, double* loss_out) {
  const int64_t n = c.vocab, k = spec.topk;
  const double qnan = std::numeric_limits<double>::quiet_NaN();
  const bool from_teacher = spec.topk_from_teacher;
  const T* ranked = from_teacher ? c.t : c.s;
  bool ok = true;
  const T rmax = select_topk(ranked, n, k, ws, &ok);
  const T omax = row_max(from_teacher ? c.s : c.t, n);
  c.ms = from_teacher ? omax : rmax;
  c.mt = from_teacher ? rmax : omax;
  const auto nan_row = [&]() {
    c.dlzs = c.dlzt = qnan;
    c.lzs = c.lzt = static_cast<T>(qnan);
    if (want_grad) fill(c.s, n, static_cast<T>(qnan));
    *loss_out = qnan;
    return qnan;
  };
  if (!ok) return nan_row();

  // support log-probabilities (unnormalised) and the off-support sums, both shifted by the maxima
  const int64_t nb = k + 1;
  ws.lp.resize(nb);
  ws.lq.resize(nb);
  ws.slope.resize(nb);
  double* lp = ws.lp.data();
  double* lq = ws.lq.data();
  double* slope = ws.slope.data();
  const double inv_temp = static_cast<double>(c.inv_temp);
  double sup_s = 0.0, sup_t = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t id = ws.cand[j].id;
    lp[j] = (double(c.s[id]) - double(c.ms)) * inv_temp;
    lq[j] = (double(c.t[id]) - double(c.mt)) * inv_temp;
    sup_s += std::exp(lp[j]);
    sup_t += std::exp(lq[j]);
  }
  const bool has_tail = k < n;
  const T cut = ws.cand[k - 1].value;
  std::vector<int32_t>& tied_out = ws.tied_out;
  tied_out.clear();
  for (size_t j = k; j < ws.cand.size(); ++j) {
    if (ws.cand[j].value == cut) tied_out.push_back(ws.cand[j].id);
  }
  double off_s = 0.0, off_t = 0.0;
  if (has_tail) {
    off_support_sums(ranked, cut, c.s, c.t, n, c.ms, c.mt, c.inv_temp, tied_out, &off_s, &off_t);
  }
  c.dlzs = std::log(sup_s + off_s);
  c.dlzt = std::log(sup_t + off_t);
  c.lzs = static_cast<T>(c.dlzs);
  c.lzt = static_cast<T>(c.dlzt);
  if (!(std::isfinite(c.dlzs) && std::isfinite(c.dlzt))) return nan_row();
  for (int64_t j = 0; j < k; ++j) {
    lp[j] -= c.dlzs;
    lq[j] -= c.dlzt;
  }

  double d, slope_sup = 0.0, slope_tail = 0.0, tail_s = 0.0;
  if (spec.tail) {
    // log of the off-support mass, summed directly (1 - sum over the support cancels)
    double tail_lp[2] = {-kInf, -kInf};
    const double off[2] = {off_s, off_t};
    const T* side[2] = {c.s, c.t};
    const T shift[2] = {c.ms, c.mt};
    const double dlz[2] = {c.dlzs, c.dlzt};
    for (int i = 0; i < 2 && has_tail; ++i) {
      const double lse = off[i] >= kTailRescue
                             ? std::log(off[i])
                             : off_support_logsumexp(ranked, cut, side[i], n, shift[i],
                                                     c.inv_temp, tied_out);
      tail_lp[i] = lse - dlz[i];
    }
    lp[k] = tail_lp[0];
    lq[k] = tail_lp[1];
    tail_s = std::exp(lp[k]);
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
    // Off-support entries move the tail bucket: p_l / P_tail of it, (1 - P_tail) net, so
    // grad_l = p_l (-sum slope_sup) + p_l / P_tail (1 - P_tail) slope_tail. Written with the
    // share p_l / P_tail <= 1, which stays in float range where p_l itself underflows (a peaked
    // row whose tail still carries the other side's mass).
    if (lp[k] > -kInf) {
      const double share = -slope_sup * tail_s + (1.0 - tail_s) * slope_tail;
      scaled_probs(c, static_cast<T>(c.dlzs + lp[k]), share * f);
    } else {  // an empty tail (or k = V): p_l = 0 off the support
      fill(c.s, n, T(0));
    }
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ws.cand[j].id;
      c.s[id] = static_cast<T>((slope[j] - std::exp(lp[j]) * (slope_sup + slope_tail)) * f);
    }
  } else {
    fill(c.s, n, T(0));
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ws.cand[j].id;
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
    const double coef = static_cast<double>(b.coef[r]);
    // coef == 0 rows get exactly zero gradient (even for NaN inputs)
    const bool want_grad = spec.compute_grad && coef != 0.0;
    const double factor = coef * inv_temp_d;
    // the target's logits, read before the row is overwritten by its gradient
    const int64_t y = b.target != nullptr ? b.target[r] : -1;
    const double s_y = y >= 0 ? double(c.s[y]) : 0.0, t_y = y >= 0 ? double(c.t[y]) : 0.0;

    double loss = 0.0, div = 0.0;
    if (spec.mode == kTopk) {
      div = topk_row(spec, c, topk_ws, want_grad, factor, &loss);
    } else {
      c.ms = row_max(c.s, n);
      c.mt = row_max(c.t, n);
      c.dlzs = std::log(row_sumexp(c.s, n, c.ms, inv_temp));
      c.dlzt = std::log(row_sumexp(c.t, n, c.mt, inv_temp));
      c.lzs = static_cast<T>(c.dlzs);
      c.lzt = static_cast<T>(c.dlzt);
    }
    double lps_y = 0.0, lpt_y = 0.0;
    if (y >= 0) {
      lps_y = (s_y - double(c.ms)) * inv_temp_d - c.dlzs;
      lpt_y = (t_y - double(c.mt)) * inv_temp_d - c.dlzt;
    }
    const double adv = lpt_y - lps_y;
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
        scaled_probs(c, c.lzs, scale);
        c.s[y] -= static_cast<T>(scale);
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

// ---- ISA variants of the float rows -----------------------------------------------------
// ``flatten`` inlines every helper into each variant, so each is compiled for its target.
using FloatRows = void (*)(const RowSpec&, const RowBlock<float>&, int64_t, int64_t);

#if HSD_X86_VARIANTS
HSD_TARGET("arch=x86-64-v4")
void rows_v4(const RowSpec& spec, const RowBlock<float>& b, int64_t lo, int64_t hi) {
  rows_impl<float>(spec, b, lo, hi);
}
HSD_TARGET("arch=x86-64-v3")
void rows_v3(const RowSpec& spec, const RowBlock<float>& b, int64_t lo, int64_t hi) {
  rows_impl<float>(spec, b, lo, hi);
}
__attribute__((flatten))
#endif
void rows_baseline(const RowSpec& spec, const RowBlock<float>& b, int64_t lo, int64_t hi) {
  rows_impl<float>(spec, b, lo, hi);
}

struct FloatVariant {
  const char* isa;
  FloatRows fn;
};

// The best variant this CPU runs, or the one HSD_CPU_ISA names (x86-64-v4, x86-64-v3, x86-64)
// when the CPU supports it; an unsupported or unknown request keeps the best (never SIGILL).
FloatVariant pick_variant() {
#if HSD_X86_VARIANTS
  __builtin_cpu_init();
  const FloatVariant v4{"x86-64-v4", rows_v4}, v3{"x86-64-v3", rows_v3};
  const FloatVariant base{"x86-64", rows_baseline};
  const bool has_v4 = __builtin_cpu_supports("x86-64-v4"), has_v3 = __builtin_cpu_supports("x86-64-v3");
  const FloatVariant best = has_v4 ? v4 : (has_v3 ? v3 : base);
  const char* want = std::getenv("HSD_CPU_ISA");
  if (want == nullptr) return best;
  if (std::strcmp(want, "x86-64") == 0) return base;
  if (std::strcmp(want, "x86-64-v3") == 0 && has_v3) return v3;
  return best;
#else
  return {"portable", rows_baseline};
#endif
}

const FloatVariant& float_variant() {
  static const FloatVariant chosen = pick_variant();  // thread-safe, once per process
  return chosen;
}

}  // namespace

void hindsight_rows(const RowSpec& spec, const RowBlock<float>& block, int64_t begin, int64_t end) {
  float_variant().fn(spec, block, begin, end);
}

void hindsight_rows(const RowSpec& spec, const RowBlock<double>& block, int64_t begin, int64_t end) {
  rows_impl<double>(spec, block, begin, end);
}

const char* hindsight_rows_isa() { return float_variant().isa; }

}  // namespace hsd

// The same, with C linkage, for ctypes (hsd._extension.row_kernel_isa) without a torch op.
#if defined(__GNUC__)
#define HSD_EXPORT __attribute__((visibility("default")))
#else
#define HSD_EXPORT
#endif
extern "C" HSD_EXPORT const char* hsd_row_kernel_isa() {
  return hsd::hindsight_rows_isa();
}
