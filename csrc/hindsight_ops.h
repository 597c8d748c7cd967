// Shared declarations of the hsd operator implementations (CPU in hindsight_cpu.cpp, CUDA in
// cuda_ops.cpp); both follow the kernel contract in hsd/backends/__init__.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "hindsight_rows.h"

namespace hsd {

// Validated spec from the operator arguments.
RowSpec make_spec(int64_t mode, double alpha, double temperature, int64_t topk,
                  bool topk_from_teacher, bool tail, double signal_clip, double kl_clip,
                  bool compute_grad, int64_t vocab, bool has_target);

// Shape / dtype / device checks shared by both devices; returns the accumulation dtype.
at::ScalarType check_logits_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                   const c10::optional<at::Tensor>& target, const at::Tensor& coef,
                                   const c10::optional<at::Tensor>& advantage);

}  // namespace hsd
