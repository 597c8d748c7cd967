// Host interface of the CUDA row kernels: raw pointers and a cudaStream_t passed as void*, so the
// caller (cuda_ops.cpp) needs neither CUDA nor ATen-CUDA headers.
#pragma once

#include <cstdint>

#include "../hindsight_rows.h"

namespace hsd {
namespace cuda {

enum InputType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct LogitsArgs {
  int64_t rows = 0;
  int64_t vocab = 0;
  int input_type = kFloat32;           // dtype of student, teacher and grad
  const void* student = nullptr;       // [rows, vocab], row stride student_stride
  int64_t student_stride = 0;
  const void* teacher = nullptr;       // [rows, vocab], row stride teacher_stride
  int64_t teacher_stride = 0;
  const int64_t* target = nullptr;     // [rows] or null
  const float* coef = nullptr;         // [rows]
  const float* advantage = nullptr;    // [rows] or null
  const int64_t* support = nullptr;    // [rows, spec.topk] top-k ids (topk mode)
  float* loss = nullptr;               // [rows]
  float* stats = nullptr;              // [rows, 4]
  void* grad = nullptr;                // [rows, vocab] contiguous, or null without gradient
};

// Enqueues the kernel on ``stream`` (a cudaStream_t); returns null or the CUDA error string.
const char* launch_hindsight_rows(const RowSpec& spec, const LogitsArgs& args, void* stream);

}  // namespace cuda
}  // namespace hsd
