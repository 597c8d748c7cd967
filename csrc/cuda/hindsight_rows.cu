// CUDA row kernels: the hindsight divergence and its gradient from [N, V] logits, one block per
// row, mirroring hsd/backends/torch_chunked.py::token_terms (the specification).
//
// Passes over the vocabulary: (1) online max / sum-exp of both sides; (2) the divergence, and in
// sampled mode the gradient; (3) full and top-k modes only: the gradient, which needs the row's
// slope sum from pass 2. Top-k ids come from cuda_ops.cpp (the contract's tie rule: lower ids
// win ties at the k-th rank); the tail bucket is the off-support mass summed directly over the
// vocabulary (1 - sum p_support cancels to 0 or below for a confident side), and the bucket
// arithmetic is double. Edge cases as hsd.definition: p > 0 = q gives +inf even where p
// underflows in float32; NaN anywhere in a row (logits, or a NaN signal) gives NaN.
// CUDA runtime only: raw pointers and a stream passed in.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "hindsight_cuda.h"

namespace hsd {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. ``buf`` holds kWarps values.
template <typename T>
__device__ T block_sum(T v, T* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // buf may still be read by a previous reduction
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  T total = lane < kWarps ? buf[lane] : T(0);
  return warp_sum(total);
}

// Comparisons, not fmin / fmax: those drop a NaN operand, and a NaN must stay NaN.
__device__ __forceinline__ double clamp_keep_nan(double x, double bound) {
  return x > bound ? bound : (x < -bound ? -bound : x);
}

// Maximum over the block, returned to every thread (fmax: exact and order-independent).
__device__ double block_max(double v, double* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // buf may still be read by a previous reduction
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  double r = lane < kWarps ? buf[lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) r = fmax(r, __shfl_xor_sync(0xffffffffu, r, o));
  return r;
}

// Online (max, sum of exp((x - max) * inv_temp)) pair; max in raw logit units so that
// (x - max) stays exact for large logits.
struct MaxSum {
  float m;
  float z;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b, float inv_temp) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.z * __expf((a.m - m) * inv_temp) + b.z * __expf((b.m - m) * inv_temp)};
}

__device__ MaxSum block_maxsum(MaxSum v, float inv_temp, MaxSum* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.z, o)};
    v = combine(v, other, inv_temp);
  }
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  MaxSum r = lane < kWarps ? buf[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, r.m, o), __shfl_xor_sync(0xffffffffu, r.z, o)};
    r = combine(r, other, inv_temp);
  }
  return r;
}

// p * (log p - log q): 0 where p = 0; +inf where p > 0 = q, even if exp(lp) underflows.
__device__ __forceinline__ double plogratio(double lp, double lq) {
  if (lp == -INFINITY) return 0.0;
  if (lq == -INFINITY && !isnan(lp)) return INFINITY;
  return exp(lp) * (lp - lq);
}

__device__ __forceinline__ double logaddexp(double a, double b) {
  if (a == -INFINITY && b == -INFINITY) return -INFINITY;
  const double m = fmax(a, b);
  return m + log1p(exp(-fabs(a - b)));
}

// One bucket of torch_chunked._divergence_and_slope: returns its share of D, sets the slope.
__device__ __forceinline__ double bucket_term(double lp, double lq, double alpha, double* slope) {
  if (alpha == 0.0) {
    *slope = -exp(lq);
    return plogratio(lq, lp);
  }
  if (alpha == 1.0) {
    *slope = plogratio(lp, lq);
    return *slope;
  }
  const double lm = logaddexp(lp + log1p(-alpha), lq + log(alpha));
  *slope = (1.0 - alpha) * plogratio(lp, lm);
  return *slope + alpha * plogratio(lq, lm);
}

// Full-vocabulary terms of one entry (float): D share and slope H (alpha = 0: slope = -p_t).
__device__ __forceinline__ void full_term(float lps, float lpt, float alpha, float* d,
                                          float* slope, float* ps_out) {
  const float ps = __expf(lps);
  *ps_out = ps;
  // p > 0 = q: +inf, also where p underflows in float32 (0 * inf would be NaN)
  if (alpha == 1.0f) {
    *slope = lps == -INFINITY ? 0.0f : lpt == -INFINITY ? INFINITY : ps * (lps - lpt);
    *d = *slope;
  } else if (alpha == 0.0f) {
    const float pt = __expf(lpt);
    *slope = -pt;
    *d = lpt == -INFINITY ? 0.0f : lps == -INFINITY ? INFINITY : pt * (lpt - lps);
  } else {
    const float pt = __expf(lpt);
    const float m = (1.0f - alpha) * ps + alpha * pt;
    float lm;
    if (m >= FLT_MIN) {
      lm = __logf(m);
    } else {  // both sides underflow: the mixture in log space
      const float a = lps + log1pf(-alpha), b = lpt + logf(alpha);
      lm = (a == -INFINITY && b == -INFINITY) ? -INFINITY
                                              : fmaxf(a, b) + log1pf(__expf(-fabsf(a - b)));
    }
    const float ts = (lps == -INFINITY || ps == 0.0f) ? 0.0f : ps * (lps - lm);
    const float tt = (lpt == -INFINITY || pt == 0.0f) ? 0.0f : pt * (lpt - lm);
    *slope = (1.0f - alpha) * ts;
    *d = *slope + alpha * tt;
  }
}

template <typename In>
__global__ void __launch_bounds__(kThreads) hindsight_rows_kernel(RowSpec spec, LogitsArgs a) {
  __shared__ double dbuf[kWarps];
  __shared__ float fbuf[kWarps];
  __shared__ MaxSum mbuf[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t n = a.vocab;
  const In* s = static_cast<const In*>(a.student) + row * a.student_stride;
  const In* t = static_cast<const In*>(a.teacher) + row * a.teacher_stride;
  In* g = a.grad != nullptr ? static_cast<In*>(a.grad) + row * n : nullptr;
  const float inv_temp = static_cast<float>(1.0 / spec.temperature);
  const double inv_temp_d = 1.0 / spec.temperature;

  // pass 1: max and sum of exp for both sides; NaN anywhere poisons the row
  MaxSum ms{-INFINITY, 0.0f}, mt{-INFINITY, 0.0f};
  float nan_seen = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = to_float(s[i]), y = to_float(t[i]);
    nan_seen += (isnan(x) || isnan(y)) ? 1.0f : 0.0f;
    ms = combine(ms, MaxSum{x, x == -INFINITY ? 0.0f : 1.0f}, inv_temp);
    mt = combine(mt, MaxSum{y, y == -INFINITY ? 0.0f : 1.0f}, inv_temp);
  }
  ms = block_maxsum(ms, inv_temp, mbuf);
  mt = block_maxsum(mt, inv_temp, mbuf);
  nan_seen = block_sum(nan_seen, fbuf);
  const float lzs = logf(ms.z), lzt = logf(mt.z);
  // hsd.loss checks the target ids once per call (no host sync per chunk here): an id out of
  // range reads nothing and makes its row NaN
  const int64_t y = a.target != nullptr ? a.target[row] : -1;
  const bool bad_target = a.target != nullptr && (y < 0 || y >= n);
  // NaN, +inf or all -inf rows: the loss is NaN, as in the CPU kernels
  const bool bad = nan_seen > 0.0f || !isfinite(ms.m) || !isfinite(mt.m) || bad_target;

  const double coef = static_cast<double>(a.coef[row]);
  const bool want_grad = g != nullptr && coef != 0.0 && !bad;
  const double factor = coef * inv_temp_d;
  double lps_y = 0.0, lpt_y = 0.0;
  if (a.target != nullptr && !bad_target) {
    lps_y = (double(to_float(s[y])) - ms.m) * inv_temp_d - double(lzs);
    lpt_y = (double(to_float(t[y])) - mt.m) * inv_temp_d - double(lzt);
  }
  const double adv = lpt_y - lps_y;
  double loss = 0.0, div = 0.0;
  bool zero_grad = !want_grad;

  if (spec.mode == kSampled) {
    double coeff_a = adv;
    if (a.advantage != nullptr) {
      coeff_a = a.advantage[row];
    } else if (spec.signal_clip > 0.0) {
      coeff_a = clamp_keep_nan(coeff_a, spec.signal_clip);
    }
    loss = -coeff_a * lps_y;
    div = -adv;
    if (want_grad) {  // d(-a log p_y)/ds = a (p - onehot_y)
      const float scale = static_cast<float>(coef * coeff_a * inv_temp_d);
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const float p = __expf((to_float(s[i]) - ms.m) * inv_temp - lzs);
        g[i] = from_float<In>(i == y ? p * scale - scale : p * scale);
      }
    }
  } else if (spec.mode == kFull) {
    const float alpha = static_cast<float>(spec.alpha);
    double d_part = 0.0, slope_part = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const float lps = (to_float(s[i]) - ms.m) * inv_temp - lzs;
      const float lpt = (to_float(t[i]) - mt.m) * inv_temp - lzt;
      float d, slope, ps;
      full_term(lps, lpt, alpha, &d, &slope, &ps);
      d_part += d;
      slope_part += slope;
    }
    div = block_sum(d_part, dbuf);
    const double slope_sum = block_sum(slope_part, dbuf);
    const bool clipped = spec.kl_clip > 0.0 && div > spec.kl_clip;
    loss = clipped ? spec.kl_clip : div;
    zero_grad = zero_grad || clipped;
    if (want_grad && !clipped) {  // grad = H - p_s * sum(H)
      const float f = static_cast<float>(factor), ssum = static_cast<float>(slope_sum);
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const float lps = (to_float(s[i]) - ms.m) * inv_temp - lzs;
        const float lpt = (to_float(t[i]) - mt.m) * inv_temp - lzt;
        float d, slope, ps;
        full_term(lps, lpt, alpha, &d, &slope, &ps);
        g[i] = from_float<In>((slope - ps * ssum) * f);
      }
    }
  } else if (!bad) {  // top-k support (ids from torch.topk)
    const int64_t k = spec.topk;
    const int64_t* ids = a.support + row * k;
    auto lp_at = [&](int64_t j) {
      return (double(to_float(s[ids[j]])) - ms.m) * inv_temp_d - double(lzs);
    };
    auto lq_at = [&](int64_t j) {
      return (double(to_float(t[ids[j]])) - mt.m) * inv_temp_d - double(lzt);
    };
    // support normalisers: the tail mass (tail) or the support's log-sum-exp (renormalised)
    double shift_s = 0.0, shift_t = 0.0, tail_s = 0.0, tail_t = 0.0;
    if (spec.tail) {
      // The tail: the off-support mass summed directly over the vocabulary, each side
      // relative to its own maximum (1 - sum p_support would cancel). The support is every
      // entry ranked above the k-th support logit ``kth`` plus some of those equal to it (the
      // lowest ids): entries below kth are summed; of those equal to it, the ones outside the
      // support weigh exp(kth - m) each on the ranking side, and all tied entries less the
      // support's tied ones on the other side (a subtraction only where ties cross the rank).
      const In* rank = spec.topk_from_teacher ? t : s;
      double kth_part = INFINITY;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        kth_part = fmin(kth_part, double(to_float(rank[ids[j]])));
      }
      const float kth = static_cast<float>(-block_max(-kth_part, dbuf));
      double off_s = 0.0, off_t = 0.0, tie_s = 0.0, tie_t = 0.0, tied = 0.0;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        const float x = to_float(s[i]), z = to_float(t[i]), r = to_float(rank[i]);
        if (r < kth || r == kth) {
          const double es = exp((double(x) - ms.m) * inv_temp_d);
          const double et = exp((double(z) - mt.m) * inv_temp_d);
          if (r < kth) {
            off_s += es;
            off_t += et;
          } else {
            tie_s += es;
            tie_t += et;
            tied += 1.0;
          }
        }
      }
      off_s = block_sum(off_s, dbuf);
      off_t = block_sum(off_t, dbuf);
      tie_s = block_sum(tie_s, dbuf);
      tie_t = block_sum(tie_t, dbuf);
      tied = block_sum(tied, dbuf);
      double sup_tied = 0.0, sup_tie_s = 0.0, sup_tie_t = 0.0;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        if (to_float(rank[ids[j]]) == kth) {
          sup_tied += 1.0;
          sup_tie_s += exp((double(to_float(s[ids[j]])) - ms.m) * inv_temp_d);
          sup_tie_t += exp((double(to_float(t[ids[j]])) - mt.m) * inv_temp_d);
        }
      }
      sup_tied = block_sum(sup_tied, dbuf);
      sup_tie_s = block_sum(sup_tie_s, dbuf);
      sup_tie_t = block_sum(sup_tie_t, dbuf);
      const double n_out = tied - sup_tied;
      if (n_out > 0.0) {
        const double rank_m = spec.topk_from_teacher ? mt.m : ms.m;
        const double exact = n_out * exp((double(kth) - rank_m) * inv_temp_d);
        off_s += spec.topk_from_teacher ? fmax(tie_s - sup_tie_s, 0.0) : exact;
        off_t += spec.topk_from_teacher ? exact : fmax(tie_t - sup_tie_t, 0.0);
      }
      tail_s = off_s / double(ms.z);
      tail_t = off_t / double(mt.z);
    } else {
      // the support's log-sum-exp, shifted by its maximum: the other side's log-probabilities
      // on the support may all lie below exp's range (a support far in that side's tail)
      double top_s = -INFINITY, top_t = -INFINITY;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        top_s = fmax(top_s, lp_at(j));
        top_t = fmax(top_t, lq_at(j));
      }
      top_s = block_max(top_s, dbuf);
      top_t = block_max(top_t, dbuf);
      double es = 0.0, et = 0.0;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        es += exp(lp_at(j) - top_s);
        et += exp(lq_at(j) - top_t);
      }
      shift_s = top_s + log(block_sum(es, dbuf));
      shift_t = top_t + log(block_sum(et, dbuf));
    }
    double d_part = 0.0, slope_part = 0.0;
    for (int64_t j = threadIdx.x; j < k; j += kThreads) {
      double slope;
      d_part += bucket_term(lp_at(j) - shift_s, lq_at(j) - shift_t, spec.alpha, &slope);
      slope_part += slope;
    }
    div = block_sum(d_part, dbuf);
    const double slope_sup = block_sum(slope_part, dbuf);
    double slope_tail = 0.0;
    if (spec.tail) div += bucket_term(log(tail_s), log(tail_t), spec.alpha, &slope_tail);
    const bool clipped = spec.kl_clip > 0.0 && div > spec.kl_clip;
    loss = clipped ? spec.kl_clip : div;
    zero_grad = zero_grad || clipped;
    if (want_grad && !clipped) {
      // off-support entries move the tail bucket: p_l / P_tail of it, (1 - P_tail) net
      const double per_tail = tail_s > 0.0 ? slope_tail / tail_s : 0.0;
      const float off = spec.tail ? static_cast<float>((-slope_sup + (1.0 - tail_s) * per_tail) * factor)
                                  : 0.0f;
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        g[i] = from_float<In>(__expf((to_float(s[i]) - ms.m) * inv_temp - lzs) * off);
      }
      __syncthreads();  // the support entries below overwrite some of these
      const double total = spec.tail ? slope_sup + slope_tail : slope_sup;
      for (int64_t j = threadIdx.x; j < k; j += kThreads) {
        double slope;
        const double lp = lp_at(j) - shift_s;
        bucket_term(lp, lq_at(j) - shift_t, spec.alpha, &slope);
        g[ids[j]] = from_float<In>(static_cast<float>((slope - exp(lp) * total) * factor));
      }
    }
  }
  if (g != nullptr && zero_grad) {
    // coef == 0 rows get exactly zero; NaN rows with coef != 0 get NaN
    const float fill = (bad && coef != 0.0) ? NAN : 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) g[i] = from_float<In>(fill);
  }
  if (threadIdx.x == 0) {
    if (bad) {
      loss = NAN;
      div = NAN;
    }
    a.loss[row] = static_cast<float>(loss);
    float* st = a.stats + 4 * row;
    st[0] = static_cast<float>(lps_y);
    st[1] = static_cast<float>(lpt_y);
    st[2] = static_cast<float>(adv);
    st[3] = static_cast<float>(div);
  }
}

template <typename In>
const char* launch(const RowSpec& spec, const LogitsArgs& args, cudaStream_t stream) {
  hindsight_rows_kernel<In><<<static_cast<unsigned>(args.rows), kThreads, 0, stream>>>(spec, args);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_hindsight_rows(const RowSpec& spec, const LogitsArgs& args, void* stream) {
  if (args.rows == 0) return nullptr;
  if (args.rows > 0x7fffffffLL) return "hsd: too many rows for one launch";
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.input_type) {
    case kFloat32:
      return launch<float>(spec, args, s);
    case kBFloat16:
      return launch<__nv_bfloat16>(spec, args, s);
    case kFloat16:
      return launch<__half>(spec, args, s);
    default:
      return "hsd: unsupported input dtype for the CUDA kernels";
  }
}

}  // namespace cuda
}  // namespace hsd
