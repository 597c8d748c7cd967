// Per-row hindsight divergence and its gradient with respect to the student logits.
//
// Torch-free on purpose: this header compiles in about a second and is shared by the CPU
// translation unit (hindsight_rows.cpp). It mirrors hsd/backends/torch_chunked.py::token_terms
// row by row; that file is the specification.
#pragma once

#include <cstdint>

namespace hsd {

enum Mode : int64_t { kSampled = 0, kFull = 1, kTopk = 2 };

struct RowSpec {
  int64_t mode = kSampled;
  double alpha = 1.0;
  double temperature = 1.0;
  int64_t topk = 0;
  bool topk_from_teacher = false;
  bool tail = true;
  double signal_clip = 0.0;  // <= 0: no clip
  double kl_clip = 0.0;      // <= 0: no clip
  bool compute_grad = false;
};

// One block of rows. ``student`` holds the student logits on entry and, when the spec asks for
// gradients, d(coef * token_loss)/d(student logits) on exit (same storage, row stride
// ``student_stride``); the teacher logits are only read. Each row reads both sides before it
// writes the student's, so in sampled mode with ``advantage`` given (the teacher then only feeds
// the statistics) the teacher may be the student's own storage.
template <typename T>
struct RowBlock {
  int64_t vocab = 0;
  T* student = nullptr;
  int64_t student_stride = 0;
  const T* teacher = nullptr;
  int64_t teacher_stride = 0;
  const int64_t* target = nullptr;     // [rows] or null
  const T* coef = nullptr;             // [rows]
  const T* advantage = nullptr;        // [rows] or null
  T* loss = nullptr;                   // [rows]
  T* stats = nullptr;                  // [rows, 4]
};

// Rows [begin, end) of ``block``; safe to call concurrently on disjoint row ranges.
void hindsight_rows(const RowSpec& spec, const RowBlock<float>& block, int64_t begin, int64_t end);
void hindsight_rows(const RowSpec& spec, const RowBlock<double>& block, int64_t begin, int64_t end);

// Which compiled variant the float rows run: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2),
// "x86-64" (baseline) or "portable" (not GCC on x86-64). The best the CPU supports, unless
// HSD_CPU_ISA asks for a lower one (read once, at the first call).
const char* hindsight_rows_isa();

}  // namespace hsd
