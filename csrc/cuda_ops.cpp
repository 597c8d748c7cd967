// CUDA implementation of hsd::hindsight_from_logits: checks, the top-k ids (torch.topk), and the
// launch of csrc/cuda/hindsight_rows.cu on the current stream. Only ATen / c10 core headers: the
// stream comes through c10's device-generic interface, so this file also compiles against a
// CPU-only torch (the build compiles it there as a check).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "cuda/hindsight_cuda.h"
#include "hindsight_ops.h"

namespace hsd {
namespace {

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
  check_logits_inputs(student_logits, teacher_logits, target_ids, coef, advantage);
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
    support = std::get<1>(at::topk(topk_from_teacher ? t : s, topk, -1, true, false)).contiguous();
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
