// CUDA implementation of hsd::hindsight_from_logits: checks, the top-k ids (the contract's tie
// rule), and the launch of csrc/cuda/hindsight_rows.cu on the tensors' device and its current
// stream. No host synchronisation: the target-id range is checked once per loss call by
// hsd.loss (the kernel turns an out-of-range id into a NaN row, never an out-of-bounds read), so
// the per-chunk calls of the fused path stay asynchronous and CUDA-graph capturable. Only ATen /
// c10 core headers: the stream comes through c10's device-generic interface, so this file also
// compiles against a CPU-only torch (the build compiles it there as a check).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/hindsight_cuda.h"
#include "hindsight_ops.h"

namespace hsd {
namespace {

// Top-k support ids [n, k] with the contract's tie rule: the first k entries of a stable
// descending sort, so among entries equal to the k-th largest the lowest ids are in the support.
// Mirrors kernels/topk.py (tested there on CPU): at::topk gives the k-th value and every entry
// above it; the slots left go to the lowest tied ids, through a second top-k on an int32 key
// (V - id on the tied entries, 0 elsewhere), row block by row block to bound its memory.
at::Tensor topk_support(const at::Tensor& ranked, int64_t k) {
  const int64_t n = ranked.size(0), vocab = ranked.size(1);
  auto [values, ids] = at::topk(ranked, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
  if (k >= vocab || n == 0) return ids.contiguous();
  const at::Tensor kth = values.narrow(1, k - 1, 1);
  const at::Tensor n_above = values.gt(kth).sum(1, /*keepdim=*/true);
  const at::Tensor slot = at::arange(k, ids.options()).unsqueeze(0);
  const at::Tensor from_tied = (slot - n_above).clamp_min(0);
  const at::Tensor key_by_id = at::arange(vocab, 0, -1, ranked.options().dtype(at::kInt));
  const at::Tensor zero = at::zeros({}, key_by_id.options());
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 24) / vocab);
  for (int64_t start = 0; start < n; start += step) {
    const int64_t len = std::min(step, n - start);
    const at::Tensor key = at::where(ranked.narrow(0, start, len).eq(kth.narrow(0, start, len)),
                                     key_by_id, zero);
    auto [key_vals, tied_ids] = at::topk(key, k, 1, true, true);
    const at::Tensor pick_at = from_tied.narrow(0, start, len);
    const at::Tensor ok = key_vals.gather(1, pick_at).gt(0) &
                          slot.ge(n_above.narrow(0, start, len));
    at::Tensor rows = ids.narrow(0, start, len);
    rows.copy_(at::where(ok, tied_ids.gather(1, pick_at), rows));
  }
  return ids.contiguous();
}

int input_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cuda::kFloat32;
    case at::kBFloat16:
      return cuda::kBFloat16;
    case at::kHalf:
      return cuda::kFloat16;
    default:
      TORCH_CHECK(false, "hsd: the CUDA kernels take float32, bfloat16 or float16 logits, got ",
                  dtype, " (float64 runs on the 'torch' backend)");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target_ids, const at::Tensor& coef,
    const c10::optional<at::Tensor>& advantage, int64_t mode, double alpha, double temperature,
    int64_t topk, bool topk_from_teacher, bool tail, double signal_clip, double kl_clip,
    bool compute_grad) {
  // shapes here; the range of the target ids is hsd.loss's check (one sync per call)
  check_logits_inputs(student_logits, teacher_logits, c10::nullopt, coef, advantage);
  if (target_ids.has_value()) {
    TORCH_CHECK(target_ids->dim() == 1 && target_ids->size(0) == student_logits.size(0) &&
                    target_ids->scalar_type() == at::kLong,
                "hsd: target_ids must be int64 [N] with N = ", student_logits.size(0));
  }
  TORCH_CHECK(teacher_logits.scalar_type() == student_logits.scalar_type(),
              "hsd: student and teacher logits must share a dtype");
  const int type = input_type(student_logits.scalar_type());
  const int64_t n = student_logits.size(0), vocab = student_logits.size(1);
  const RowSpec spec = make_spec(mode, alpha, temperature, topk, topk_from_teacher, tail,
                                 signal_clip, kl_clip, compute_grad, vocab, target_ids.has_value());
  c10::DeviceGuard guard(student_logits.device());
  // rows may be strided (a slice of a larger buffer); the vocabulary must be contiguous
  const at::Tensor s = student_logits.stride(1) == 1 ? student_logits : student_logits.contiguous();
  const at::Tensor t = teacher_logits.stride(1) == 1 ? teacher_logits : teacher_logits.contiguous();
  const auto f32 = student_logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, f32), stats = at::empty({n, 4}, f32);
  at::Tensor grad = compute_grad ? at::empty({n, vocab}, student_logits.options())
                                 : at::empty({0}, student_logits.options());
  const at::Tensor coef_f = coef.to(at::kFloat).contiguous();
  const at::Tensor adv_f = advantage.has_value() ? advantage->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor target = target_ids.has_value() ? target_ids->contiguous() : at::Tensor();
  at::Tensor support;
  if (spec.mode == kTopk) {
    support = topk_support(topk_from_teacher ? t : s, topk);
  }
  cuda::LogitsArgs args;
  args.rows = n;
  args.vocab = vocab;
  args.input_type = type;
  args.student = s.const_data_ptr();
  args.student_stride = s.stride(0);
  args.teacher = t.const_data_ptr();
  args.teacher_stride = t.stride(0);
  args.target = target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  args.coef = coef_f.const_data_ptr<float>();
  args.advantage = adv_f.defined() ? adv_f.const_data_ptr<float>() : nullptr;
  args.support = support.defined() ? support.const_data_ptr<int64_t>() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.stats = stats.data_ptr<float>();
  args.grad = compute_grad ? grad.data_ptr() : nullptr;
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  void* stream = impl.getStream(student_logits.device()).native_handle();
  const char* err = cuda::launch_hindsight_rows(spec, args, stream);
  TORCH_CHECK(err == nullptr, "hsd: CUDA kernel launch failed: ", err);
  return {loss, stats, grad};
}

}  // namespace
}  // namespace hsd

TORCH_LIBRARY_IMPL(hsd, CUDA, m) { m.impl("hindsight_from_logits", &hsd::logits_cuda); }
