// Operator schemas, the CPU implementations and the Python module stub of hsd._C.
//
// fused_hindsight walks the tokens in chunks: two GEMMs give the chunk's student and teacher
// logits (float32, or float64 for float64 inputs), the row kernels turn the student buffer into
// d(sum coef * loss)/d(logits) in place, and two more GEMMs push it back to the hidden states and
// the LM head. Extra memory is O(chunk x V); nothing is recomputed in a backward pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "hindsight_ops.h"

namespace hsd {

namespace {

// Student + teacher logits of one chunk: 2^24 floats = 64 MiB (55 rows a side at V = 151936).
// Besides the [V, H] weight gradient this is the loss's whole extra memory, so it is kept
// small; the two sides share one GEMM per chunk, which keeps W's passes per chunk at three.
constexpr int64_t kChunkElements = int64_t(1) << 24;
constexpr int64_t kMinChunkRows = 32;

// Rows per chunk; HSD_CPU_CHUNK_ROWS overrides it (tests use it to cross chunk boundaries).
int64_t chunk_rows(int64_t n, int64_t vocab) {
  int64_t rows = std::max(kMinChunkRows, kChunkElements / (2 * std::max<int64_t>(vocab, 1)));
  if (const char* env = std::getenv("HSD_CPU_CHUNK_ROWS")) {
    const int64_t forced = std::atoll(env);
    if (forced > 0) rows = forced;
  }
  return std::max<int64_t>(1, std::min(n, rows));
}

template <typename T>
RowBlock<T> make_block(const at::Tensor& student, const at::Tensor& teacher,
                       const c10::optional<at::Tensor>& target, const at::Tensor& coef,
                       const c10::optional<at::Tensor>& advantage, const at::Tensor& loss,
                       const at::Tensor& stats) {
  RowBlock<T> b;
  b.vocab = student.size(1);
  b.student = student.data_ptr<T>();
  b.student_stride = student.stride(0);
  b.teacher = teacher.const_data_ptr<T>();
  b.teacher_stride = teacher.stride(0);
  b.target = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  b.coef = coef.const_data_ptr<T>();
  b.advantage = advantage.has_value() ? advantage->const_data_ptr<T>() : nullptr;
  b.loss = loss.data_ptr<T>();
  b.stats = stats.data_ptr<T>();
  return b;
}

// Runs the row kernels over all rows of the block, in parallel.
void run_rows(const RowSpec& spec, const at::Tensor& student, const at::Tensor& teacher,
              const c10::optional<at::Tensor>& target, const at::Tensor& coef,
              const c10::optional<at::Tensor>& advantage, const at::Tensor& loss,
              const at::Tensor& stats) {
  const int64_t rows = student.size(0);
  if (student.scalar_type() == at::kDouble) {
    const auto block = make_block<double>(student, teacher, target, coef, advantage, loss, stats);
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) { hindsight_rows(spec, block, b, e); });
  } else {
    const auto block = make_block<float>(student, teacher, target, coef, advantage, loss, stats);
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) { hindsight_rows(spec, block, b, e); });
  }
}

c10::optional<at::Tensor> rows_of(const c10::optional<at::Tensor>& t, int64_t start, int64_t len) {
  if (!t.has_value()) return c10::nullopt;
  return t->narrow(0, start, len);
}

c10::optional<at::Tensor> to_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value()) return c10::nullopt;
  return t->to(acc).contiguous();
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target_ids, const at::Tensor& coef,
    const c10::optional<at::Tensor>& advantage, int64_t mode, double alpha, double temperature,
    int64_t topk, bool topk_from_teacher, bool tail, double signal_clip, double kl_clip,
    bool compute_grad) {
  const at::ScalarType acc =
      check_logits_inputs(student_logits, teacher_logits, target_ids, coef, advantage);
  const int64_t n = student_logits.size(0), vocab = student_logits.size(1);
  const RowSpec spec = make_spec(mode, alpha, temperature, topk, topk_from_teacher, tail,
                                 signal_clip, kl_clip, compute_grad, vocab, target_ids.has_value());
  const auto opts = student_logits.options().dtype(acc);
  at::Tensor loss = at::empty({n}, opts), stats = at::empty({n, 4}, opts);
  at::Tensor grad = compute_grad ? at::empty({n, vocab}, student_logits.options())
                                 : empty_grad(student_logits);
  const auto target = target_ids.has_value() ? c10::optional<at::Tensor>(target_ids->contiguous())
                                             : c10::nullopt;
  const at::Tensor coef_acc = coef.to(acc).contiguous();
  const auto adv_acc = to_acc(advantage, acc);
  if (n == 0) return {loss, stats, grad};
  if (student_logits.scalar_type() == acc) {
    // work in place in the gradient output (or read-only on the input when no gradient)
    at::Tensor work = compute_grad ? grad.copy_(student_logits) : student_logits.contiguous();
    run_rows(spec, work, teacher_logits.contiguous(), target, coef_acc, adv_acc, loss, stats);
    return {loss, stats, grad};
  }
  // half-precision logits: upcast a chunk of rows at a time
  const int64_t step = chunk_rows(n, vocab);
  for (int64_t i = 0; i < n; i += step) {
    const int64_t len = std::min(step, n - i);
    at::Tensor s = student_logits.narrow(0, i, len).to(acc).contiguous();
    at::Tensor t = teacher_logits.narrow(0, i, len).to(acc).contiguous();
    run_rows(spec, s, t, rows_of(target, i, len), coef_acc.narrow(0, i, len),
             rows_of(adv_acc, i, len), loss.narrow(0, i, len), stats.narrow(0, i, len));
    if (compute_grad) grad.narrow(0, i, len).copy_(s);
  }
  return {loss, stats, grad};
}

// Whether two (optional) tensors are the same view of the same memory: a detached alias of
// the student's head is still the student's head.
bool same_view(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b) {
  if (!a.has_value() || !b.has_value()) return a.has_value() == b.has_value();
  return a->data_ptr() == b->data_ptr() && a->sizes() == b->sizes() &&
         a->strides() == b->strides() && a->scalar_type() == b->scalar_type();
}

// Logits of a chunk into ``out``: out = x @ w^T (+ b).
void project(at::Tensor& out, const at::Tensor& x, const at::Tensor& w,
             const c10::optional<at::Tensor>& b) {
  if (b.has_value()) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& target_ids,
    const at::Tensor& coef, const c10::optional<at::Tensor>& advantage, int64_t mode,
    double alpha, double temperature, int64_t topk, bool topk_from_teacher, bool tail,
    double signal_clip, double kl_clip, bool grad_hidden, bool grad_weight, bool grad_bias) {
  TORCH_CHECK(student_hidden.dim() == 2 && teacher_hidden.sizes() == student_hidden.sizes(),
              "hsd: student_hidden and teacher_hidden must both be [N, H]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == student_hidden.size(1),
              "hsd: weight must be [V, H] with H = ", student_hidden.size(1));
  TORCH_CHECK(teacher_weight.sizes() == weight.sizes(), "hsd: teacher_weight must match weight");
  const int64_t n = student_hidden.size(0), vocab = weight.size(0);
  for (const auto* b : {&bias, &teacher_bias}) {
    TORCH_CHECK(!b->has_value() || ((*b)->dim() == 1 && (*b)->size(0) == vocab),
                "hsd: biases must be [V] with V = ", vocab);
  }
  const at::ScalarType acc =
      student_hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // validates targets, coef and advantage against a [N, V] shape
  const at::Tensor shape = at::empty({n, vocab}, at::TensorOptions().device(at::kMeta));
  check_logits_inputs(shape, shape, target_ids, coef, advantage);
  // only the gradients asked for: a frozen head skips the [V, H] buffer and its GEMM, a pure
  // forward skips the gradient rows and every backward GEMM
  grad_bias = grad_bias && bias.has_value();
  const bool compute_grad = grad_hidden || grad_weight || grad_bias;
  const RowSpec spec = make_spec(mode, alpha, temperature, topk, topk_from_teacher, tail,
                                 signal_clip, kl_clip, compute_grad, vocab, target_ids.has_value());

  const at::Tensor w = weight.to(acc).contiguous();
  // the teacher usually shares the student's head: reuse the converted copy
  const bool shared_head = same_view(teacher_weight, weight) && same_view(teacher_bias, bias);
  const at::Tensor tw = shared_head ? w : teacher_weight.to(acc).contiguous();
  const auto b = to_acc(bias, acc);
  const auto tb = shared_head ? b : to_acc(teacher_bias, acc);
  // the teacher's logits are the student's (hsd.loss's second, centred pass): one GEMM, a copy
  const bool same_logits = shared_head && same_view(teacher_hidden, student_hidden);
  const auto target = target_ids.has_value() ? c10::optional<at::Tensor>(target_ids->contiguous())
                                             : c10::nullopt;
  const at::Tensor coef_acc = coef.to(acc).contiguous();
  const auto adv_acc = to_acc(advantage, acc);

  const auto opts = student_hidden.options().dtype(acc);
  at::Tensor loss = at::empty({n}, opts), stats = at::empty({n, 4}, opts);
  at::Tensor grad_h = grad_hidden ? at::empty_like(student_hidden, at::MemoryFormat::Contiguous)
                                  : empty_grad(student_hidden);
  at::Tensor grad_w = grad_weight ? at::zeros({vocab, weight.size(1)}, opts) : empty_grad(w);
  at::Tensor grad_b = grad_bias ? at::zeros({vocab}, opts) : empty_grad(w);
  if (n == 0) return {loss, stats, grad_h, grad_w, grad_b};

  const int64_t step = chunk_rows(n, vocab);
  // rows [0, len) hold the student's logits, rows [len, 2 len) the teacher's
  at::Tensor logits_buf = at::empty({2 * step, vocab}, opts);
  at::Tensor hidden_buf = at::empty({2 * step, weight.size(1)}, opts);
  const at::Tensor ones = at::ones({step}, opts);
  const bool same_dtype = student_hidden.scalar_type() == acc;
  for (int64_t i = 0; i < n; i += step) {
    const int64_t len = std::min(step, n - i);
    at::Tensor both = logits_buf.narrow(0, 0, 2 * len);
    at::Tensor s = both.narrow(0, 0, len), t = both.narrow(0, len, len);
    at::Tensor h = hidden_buf.narrow(0, 0, len), th = hidden_buf.narrow(0, len, len);
    h.copy_(student_hidden.narrow(0, i, len));
    if (same_logits) {
      // a copy: the row kernels overwrite the student's rows with their gradient
      project(s, h, w, b);
      t.copy_(s);
    } else if (shared_head) {
      th.copy_(teacher_hidden.narrow(0, i, len));
      project(both, hidden_buf.narrow(0, 0, 2 * len), w, b);  // one pass over W for both sides
    } else {
      th.copy_(teacher_hidden.narrow(0, i, len));
      project(s, h, w, b);
      project(t, th, tw, tb);
    }
    run_rows(spec, s, t, rows_of(target, i, len), coef_acc.narrow(0, i, len),
             rows_of(adv_acc, i, len), loss.narrow(0, i, len), stats.narrow(0, i, len));
    if (grad_hidden) {
      at::Tensor gh = grad_h.narrow(0, i, len);
      if (same_dtype) {
        at::mm_out(gh, s, w);
      } else {
        gh.copy_(at::mm(s, w));
      }
    }
    if (grad_weight) grad_w.addmm_(s.t(), h);
    if (grad_bias) grad_b.addmv_(s.t(), ones.narrow(0, 0, len));
  }
  return {loss, stats, grad_h, grad_w, grad_b};
}

}  // namespace

RowSpec make_spec(int64_t mode, double alpha, double temperature, int64_t topk,
                  bool topk_from_teacher, bool tail, double signal_clip, double kl_clip,
                  bool compute_grad, int64_t vocab, bool has_target) {
  TORCH_CHECK(mode == kSampled || mode == kFull || mode == kTopk,
              "hsd: mode must be 0 (sampled), 1 (full) or 2 (topk), got ", mode);
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0, "hsd: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(temperature > 0.0, "hsd: temperature must be > 0, got ", temperature);
  TORCH_CHECK(mode != kSampled || has_target, "hsd: sampled mode needs target_ids");
  TORCH_CHECK(mode != kTopk || (topk >= 1 && topk <= vocab),
              "hsd: topk must be in [1, ", vocab, "], got ", topk);
  RowSpec spec;
  spec.mode = mode;
  spec.alpha = alpha;
  spec.temperature = temperature;
  spec.topk = topk;
  spec.topk_from_teacher = topk_from_teacher;
  spec.tail = tail;
  spec.signal_clip = signal_clip;
  spec.kl_clip = kl_clip;
  spec.compute_grad = compute_grad;
  return spec;
}

at::ScalarType check_logits_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                   const c10::optional<at::Tensor>& target, const at::Tensor& coef,
                                   const c10::optional<at::Tensor>& advantage) {
  TORCH_CHECK(student.dim() == 2, "hsd: student logits must be [N, V], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "hsd: teacher logits ", teacher.sizes(),
              " must match student logits ", student.sizes());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "hsd: logits must be floating point");
  const int64_t n = student.size(0), vocab = student.size(1);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == n, "hsd: coef must be [N] with N = ", n);
  TORCH_CHECK(!advantage.has_value() || (advantage->dim() == 1 && advantage->size(0) == n),
              "hsd: advantage must be [N] with N = ", n);
  if (target.has_value()) {
    TORCH_CHECK(target->dim() == 1 && target->size(0) == n && target->scalar_type() == at::kLong,
                "hsd: target_ids must be int64 [N] with N = ", n);
    if (n > 0 && !target->is_meta()) {
      const auto [lo, hi] = at::aminmax(*target);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < vocab,
                  "hsd: target_ids out of range for a vocabulary of ", vocab);
    }
  }
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace hsd

TORCH_LIBRARY(hsd, m) {
  m.def(
      "fused_hindsight(Tensor student_hidden, Tensor teacher_hidden, Tensor weight, "
      "Tensor? bias, Tensor teacher_weight, Tensor? teacher_bias, Tensor? target_ids, "
      "Tensor coef, Tensor? advantage, int mode, float alpha, float temperature, int topk, "
      "bool topk_from_teacher, bool tail, float signal_clip, float kl_clip, bool grad_hidden, "
      "bool grad_weight, bool grad_bias) "
      "-> (Tensor token_loss, Tensor stats, Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "hindsight_from_logits(Tensor student_logits, Tensor teacher_logits, Tensor? target_ids, "
      "Tensor coef, Tensor? advantage, int mode, float alpha, float temperature, int topk, "
      "bool topk_from_teacher, bool tail, float signal_clip, float kl_clip, bool compute_grad) "
      "-> (Tensor token_loss, Tensor stats, Tensor grad_logits)");
}

TORCH_LIBRARY_IMPL(hsd, CPU, m) {
  m.impl("fused_hindsight", &hsd::fused_cpu);
  m.impl("hindsight_from_logits", &hsd::logits_cpu);
}

// Importing hsd._C only has to run the registrars above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "hsd operator library (torch.ops.hsd)", -1, nullptr};
  return PyModule_Create(&module);
}
