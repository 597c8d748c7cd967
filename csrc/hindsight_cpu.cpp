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
#include <unordered_map>
#include <utility>
#include <vector>

#include "hindsight_ops.h"

namespace hsd {

namespace {

// Student + teacher logits of one chunk: 2^24 floats (64 MiB), but at least 256 rows a side.
// Besides the [V, H] weight gradient this is the loss's whole extra memory, and it does not grow
// with N. Fewer rows cost time: BLAS runs a thin product well below its peak, and W (and grad_W,
// read and written) passes through memory once per chunk. Measured at N=4096 H=1024 V=151936 on
// 2 cores (GEMMs + rows per step): 75.5 s at 55 rows a side (the 64 MiB budget), 59.3 s at 128,
// 47.9 s at 256 (297 MiB of logits there, half the 593 MiB weight gradient). The two sides
// share one GEMM per chunk, which keeps W's passes per chunk at three.
constexpr int64_t kChunkElements = int64_t(1) << 24;
constexpr int64_t kMinChunkRows = 256;

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

// The LM heads of one fused call, converted once to the accumulation dtype, and the inputs every
// chunk reads. Shared by fused_cpu and fused_centred_cpu.
struct FusedCall {
  at::ScalarType acc;
  at::TensorOptions opts;
  int64_t n, hidden, vocab;
  at::Tensor w, tw;
  c10::optional<at::Tensor> b, tb;
  bool shared_head, same_logits, same_dtype;
  c10::optional<at::Tensor> target;
  at::Tensor coef;
};

FusedCall prepare_call(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& teacher_weight,
                       const c10::optional<at::Tensor>& teacher_bias,
                       const c10::optional<at::Tensor>& target_ids, const at::Tensor& coef,
                       const c10::optional<at::Tensor>& advantage) {
  TORCH_CHECK(student_hidden.dim() == 2 && teacher_hidden.sizes() == student_hidden.sizes(),
              "hsd: student_hidden and teacher_hidden must both be [N, H]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == student_hidden.size(1),
              "hsd: weight must be [V, H] with H = ", student_hidden.size(1));
  TORCH_CHECK(teacher_weight.sizes() == weight.sizes(), "hsd: teacher_weight must match weight");
  FusedCall c;
  c.n = student_hidden.size(0);
  c.hidden = weight.size(1);
  c.vocab = weight.size(0);
  for (const auto* b : {&bias, &teacher_bias}) {
    TORCH_CHECK(!b->has_value() || ((*b)->dim() == 1 && (*b)->size(0) == c.vocab),
                "hsd: biases must be [V] with V = ", c.vocab);
  }
  c.acc = student_hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c.opts = student_hidden.options().dtype(c.acc);
  // validates targets, coef and advantage against a [N, V] shape
  const at::Tensor shape = at::empty({c.n, c.vocab}, at::TensorOptions().device(at::kMeta));
  check_logits_inputs(shape, shape, target_ids, coef, advantage);
  c.w = weight.to(c.acc).contiguous();
  // the teacher usually shares the student's head: reuse the converted copy
  c.shared_head = same_view(teacher_weight, weight) && same_view(teacher_bias, bias);
  c.tw = c.shared_head ? c.w : teacher_weight.to(c.acc).contiguous();
  c.b = to_acc(bias, c.acc);
  c.tb = c.shared_head ? c.b : to_acc(teacher_bias, c.acc);
  // the teacher's logits are the student's (hsd.loss's weight-only pass): one GEMM, a copy
  c.same_logits = c.shared_head && same_view(teacher_hidden, student_hidden);
  c.same_dtype = student_hidden.scalar_type() == c.acc;
  c.target = target_ids.has_value() ? c10::optional<at::Tensor>(target_ids->contiguous())
                                    : c10::nullopt;
  c.coef = coef.to(c.acc).contiguous();
  return c;
}

// The chunk's student logits into ``s`` and the teacher's into ``t`` (the rows right after s in
// the same buffer), from hidden rows already in ``h`` / ``th`` (adjacent in their buffer too).
// ``student_only``: the teacher's logits only feed statistics already known, so t is a copy of s.
void chunk_logits(const FusedCall& c, at::Tensor& both, const at::Tensor& hs_both,
                  bool student_only) {
  const int64_t len = both.size(0) / 2;
  at::Tensor s = both.narrow(0, 0, len), t = both.narrow(0, len, len);
  const at::Tensor h = hs_both.narrow(0, 0, len), th = hs_both.narrow(0, len, len);
  if (student_only || c.same_logits) {
    // a copy: the row kernels overwrite the student's rows with their gradient
    project(s, h, c.w, c.b);
    t.copy_(s);
  } else if (c.shared_head) {
    project(both, hs_both, c.w, c.b);  // one pass over W for both sides
  } else {
    project(s, h, c.w, c.b);
    project(t, th, c.tw, c.tb);
  }
}

// grad_h rows of a chunk from its gradient logits: s @ W, in the input dtype.
void hidden_grad(const FusedCall& c, at::Tensor gh, const at::Tensor& s) {  // gh: a view
  if (c.same_dtype) {
    at::mm_out(gh, s, c.w);
  } else {
    gh.copy_(at::mm(s, c.w));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cpu(
    const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& teacher_weight,
    const c10::optional<at::Tensor>& teacher_bias, const c10::optional<at::Tensor>& target_ids,
    const at::Tensor& coef, const c10::optional<at::Tensor>& advantage, int64_t mode,
    double alpha, double temperature, int64_t topk, bool topk_from_teacher, bool tail,
    double signal_clip, double kl_clip, bool grad_hidden, bool grad_weight, bool grad_bias) {
  const FusedCall c = prepare_call(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                                   teacher_bias, target_ids, coef, advantage);
  const int64_t n = c.n, vocab = c.vocab;
  // only the gradients asked for: a frozen head skips the [V, H] buffer and its GEMM, a pure
  // forward skips the gradient rows and every backward GEMM
  grad_bias = grad_bias && bias.has_value();
  const bool compute_grad = grad_hidden || grad_weight || grad_bias;
  const RowSpec spec = make_spec(mode, alpha, temperature, topk, topk_from_teacher, tail,
                                 signal_clip, kl_clip, compute_grad, vocab, target_ids.has_value());
  const auto adv_acc = to_acc(advantage, c.acc);

  at::Tensor loss = at::empty({n}, c.opts), stats = at::empty({n, 4}, c.opts);
  at::Tensor grad_h = grad_hidden ? at::empty_like(student_hidden, at::MemoryFormat::Contiguous)
                                  : empty_grad(student_hidden);
  at::Tensor grad_w = grad_weight ? at::zeros({vocab, c.hidden}, c.opts) : empty_grad(c.w);
  at::Tensor grad_b = grad_bias ? at::zeros({vocab}, c.opts) : empty_grad(c.w);
  if (n == 0) return {loss, stats, grad_h, grad_w, grad_b};

  const int64_t step = chunk_rows(n, vocab);
  // rows [0, len) hold the student's logits, rows [len, 2 len) the teacher's
  at::Tensor logits_buf = at::empty({2 * step, vocab}, c.opts);
  at::Tensor hidden_buf = at::empty({2 * step, c.hidden}, c.opts);
  const at::Tensor ones = at::ones({step}, c.opts);
  for (int64_t i = 0; i < n; i += step) {
    const int64_t len = std::min(step, n - i);
    at::Tensor both = logits_buf.narrow(0, 0, 2 * len), hs_both = hidden_buf.narrow(0, 0, 2 * len);
    at::Tensor s = both.narrow(0, 0, len), t = both.narrow(0, len, len);
    at::Tensor h = hs_both.narrow(0, 0, len);
    h.copy_(student_hidden.narrow(0, i, len));
    if (!c.same_logits) hs_both.narrow(0, len, len).copy_(teacher_hidden.narrow(0, i, len));
    chunk_logits(c, both, hs_both, false);
    run_rows(spec, s, t, rows_of(c.target, i, len), c.coef.narrow(0, i, len),
             rows_of(adv_acc, i, len), loss.narrow(0, i, len), stats.narrow(0, i, len));
    if (grad_hidden) hidden_grad(c, grad_h.narrow(0, i, len), s);
    if (grad_weight) grad_w.addmm_(s.t(), h);
    if (grad_bias) grad_b.addmv_(s.t(), ones.narrow(0, 0, len));
  }
  return {loss, stats, grad_h, grad_w, grad_b};
}

// ---------------------------------------------------------------------------------------------
// Sampled mode with per-sequence centring, a_t = clip(A_t - mean over its sequence's valid
// tokens). grad(coef * loss) is linear in a_t, so the row kernels run with a_t = 1 and their
// output is scaled by a_t once the means are known: grad_h rows after s @ W, grad_W through the
// hidden rows (s^T (a * h)), so nothing [chunk, V] is rescaled. A chunk of whole sequences knows
// its means after its own forward, so its gradient takes the one pass an uncentred chunk takes.
// Only sequences that do not fit a chunk (longer than one, or split into several runs of rows)
// take two passes over their rows: the first gives the statistics, the second (the student's
// logits only) the gradients once their means are known.
// ---------------------------------------------------------------------------------------------
struct CentringPlan {
  std::vector<std::vector<int64_t>> chunks;  // row indices; whole sequences, at most step rows
  std::vector<int64_t> deferred;             // the rows of every other sequence, in row order
};

CentringPlan plan_centring(const int64_t* seq, int64_t n, int64_t step) {
  struct Run {
    int64_t start, len;
  };
  std::vector<Run> runs;
  std::unordered_map<int64_t, int64_t> runs_of;  // sequence id -> number of runs
  for (int64_t i = 0; i < n;) {
    int64_t j = i + 1;
    while (j < n && seq[j] == seq[i]) ++j;
    runs.push_back({i, j - i});
    ++runs_of[seq[i]];
    i = j;
  }
  CentringPlan plan;
  std::vector<int64_t> chunk;
  for (const Run& r : runs) {
    std::vector<int64_t>& dst =
        (runs_of[seq[r.start]] == 1 && r.len <= step) ? chunk : plan.deferred;
    if (&dst == &chunk && int64_t(chunk.size()) + r.len > step) {
      plan.chunks.push_back(std::move(chunk));
      chunk = {};
    }
    for (int64_t k = r.start; k < r.start + r.len; ++k) dst.push_back(k);
  }
  if (!chunk.empty()) plan.chunks.push_back(std::move(chunk));
  return plan;
}

// a_t = clip(A_t - mean of A over the valid (coef != 0) rows of t's sequence) for the given
// rows, every sequence of which is complete in them; 0 for masked rows (their gradient is 0).
template <typename T>
void centre(const T* stats, const T* coef, const int64_t* seq, int64_t len, double clip, T* out) {
  std::unordered_map<int64_t, std::pair<double, int64_t>> sums;
  for (int64_t r = 0; r < len; ++r) {
    if (coef[r] == T(0)) continue;
    auto& acc = sums[seq[r]];
    acc.first += static_cast<double>(stats[4 * r + 2]);
    acc.second += 1;
  }
  for (int64_t r = 0; r < len; ++r) {
    if (coef[r] == T(0)) {
      out[r] = T(0);
      continue;
    }
    const auto& acc = sums[seq[r]];
    double a = static_cast<double>(stats[4 * r + 2]) - acc.first / double(acc.second);
    if (clip > 0.0) a = std::min(clip, std::max(-clip, a));
    out[r] = static_cast<T>(a);
  }
}

at::Tensor centred_advantage(const at::Tensor& stats, const at::Tensor& coef,
                             const at::Tensor& seq, double clip) {
  at::Tensor out = at::empty({stats.size(0)}, stats.options());
  const at::Tensor st = stats.contiguous(), cf = coef.contiguous(), sq = seq.contiguous();
  if (stats.scalar_type() == at::kDouble) {
    centre(st.const_data_ptr<double>(), cf.const_data_ptr<double>(),
           sq.const_data_ptr<int64_t>(), stats.size(0), clip, out.data_ptr<double>());
  } else {
    centre(st.const_data_ptr<float>(), cf.const_data_ptr<float>(), sq.const_data_ptr<int64_t>(),
           stats.size(0), clip, out.data_ptr<float>());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_centred_cpu(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                  const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& teacher_weight, const c10::optional<at::Tensor>& teacher_bias,
                  const at::Tensor& target_ids, const at::Tensor& coef, const at::Tensor& seq_ids,
                  double temperature, double signal_clip, bool grad_hidden, bool grad_weight,
                  bool grad_bias) {
  const FusedCall c = prepare_call(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                                   teacher_bias, target_ids, coef, c10::nullopt);
  const int64_t n = c.n, vocab = c.vocab;
  TORCH_CHECK(seq_ids.dim() == 1 && seq_ids.size(0) == n && seq_ids.scalar_type() == at::kLong,
              "hsd: seq_ids must be int64 [N] with N = ", n);
  grad_bias = grad_bias && bias.has_value();
  const bool compute_grad = grad_hidden || grad_weight || grad_bias;
  // a_t = 1 in the row kernels (the unit gradient, scaled by a_t afterwards)
  RowSpec spec = make_spec(kSampled, 1.0, temperature, 0, false, true, 0.0, 0.0, compute_grad,
                           vocab, true);
  const at::Tensor seq = seq_ids.contiguous();
  const at::Tensor& target = *c.target;

  at::Tensor loss = at::empty({n}, c.opts), stats = at::empty({n, 4}, c.opts);
  at::Tensor advantage = at::empty({n}, c.opts);
  at::Tensor grad_h = grad_hidden ? at::empty_like(student_hidden, at::MemoryFormat::Contiguous)
                                  : empty_grad(student_hidden);
  at::Tensor grad_w = grad_weight ? at::zeros({vocab, c.hidden}, c.opts) : empty_grad(c.w);
  at::Tensor grad_b = grad_bias ? at::zeros({vocab}, c.opts) : empty_grad(c.w);
  if (n == 0) return {loss, stats, grad_h, grad_w, grad_b, advantage};

  const int64_t step = chunk_rows(n, vocab);
  const CentringPlan plan = plan_centring(seq.const_data_ptr<int64_t>(), n, step);
  at::Tensor logits_buf = at::empty({2 * step, vocab}, c.opts);
  at::Tensor hidden_buf = at::empty({2 * step, c.hidden}, c.opts);
  const at::Tensor ones = at::ones({step}, c.opts);
  const auto index_opts = seq.options();

  // Loads the hidden rows ``idx`` and computes their logits; returns the student's hidden rows.
  auto load = [&](const at::Tensor& idx, bool student_only) {
    const int64_t len = idx.size(0);
    at::Tensor both = logits_buf.narrow(0, 0, 2 * len), hs_both = hidden_buf.narrow(0, 0, 2 * len);
    at::Tensor h = hs_both.narrow(0, 0, len);
    h.copy_(student_hidden.index_select(0, idx));
    if (!student_only && !c.same_logits) {
      hs_both.narrow(0, len, len).copy_(teacher_hidden.index_select(0, idx));
    }
    chunk_logits(c, both, hs_both, student_only);
    return h;
  };

  // 1. chunks of whole sequences: one pass, as without centring
  for (const auto& rows : plan.chunks) {
    const int64_t len = int64_t(rows.size());
    const at::Tensor idx = at::tensor(rows, index_opts);
    const at::Tensor h = load(idx, false);
    at::Tensor s = logits_buf.narrow(0, 0, len), t = logits_buf.narrow(0, len, len);
    const at::Tensor coef_c = c.coef.index_select(0, idx);
    at::Tensor loss_c = at::empty({len}, c.opts), stats_c = at::empty({len, 4}, c.opts);
    run_rows(spec, s, t, target.index_select(0, idx), coef_c, ones.narrow(0, 0, len), loss_c,
             stats_c);
    const at::Tensor a = centred_advantage(stats_c, coef_c, seq.index_select(0, idx), signal_clip);
    loss.index_copy_(0, idx, loss_c.mul_(a));
    stats.index_copy_(0, idx, stats_c);
    advantage.index_copy_(0, idx, a);
    if (grad_hidden) {
      grad_h.index_copy_(0, idx, at::mm(s, c.w).mul_(a.unsqueeze(1)).to(grad_h.scalar_type()));
    }
    if (grad_weight) {
      at::Tensor ha = hidden_buf.narrow(0, len, len);  // the teacher's rows are spent
      at::mul_out(ha, h, a.unsqueeze(1));
      grad_w.addmm_(s.t(), ha);
    }
    if (grad_bias) grad_b.addmv_(s.t(), a);
  }

  // 2. the other sequences' rows, two passes. With a weight (or bias) gradient the first pass
  // gives the statistics only (no gradient rows) and the second, the student's logits alone,
  // every gradient; a frozen head needs no second pass: the first gives grad_h for a_t = 1.
  const int64_t m = int64_t(plan.deferred.size());
  if (m == 0) return {loss, stats, grad_h, grad_w, grad_b, advantage};
  const bool second_pass = grad_weight || grad_bias;
  const bool unit_hidden = grad_hidden && !second_pass;
  const at::Tensor didx = at::tensor(plan.deferred, index_opts);
  const at::Tensor coef_d = c.coef.index_select(0, didx), target_d = target.index_select(0, didx);
  at::Tensor loss_d = at::empty({m}, c.opts), stats_d = at::empty({m, 4}, c.opts);
  at::Tensor unit_gh = unit_hidden ? at::empty({m, c.hidden}, c.opts) : empty_grad(c.w);
  RowSpec first = spec;
  first.compute_grad = unit_hidden;
  for (int64_t i = 0; i < m; i += step) {
    const int64_t len = std::min(step, m - i);
    load(didx.narrow(0, i, len), false);
    at::Tensor s = logits_buf.narrow(0, 0, len), t = logits_buf.narrow(0, len, len);
    run_rows(first, s, t, target_d.narrow(0, i, len), coef_d.narrow(0, i, len),
             ones.narrow(0, 0, len), loss_d.narrow(0, i, len), stats_d.narrow(0, i, len));
    if (unit_hidden) {
      at::Tensor gh = unit_gh.narrow(0, i, len);
      at::mm_out(gh, s, c.w);
    }
  }
  const at::Tensor a_d = centred_advantage(stats_d, coef_d, seq.index_select(0, didx), signal_clip);
  loss.index_copy_(0, didx, loss_d.mul_(a_d));
  stats.index_copy_(0, didx, stats_d);
  advantage.index_copy_(0, didx, a_d);
  if (unit_hidden) {
    grad_h.index_copy_(0, didx, unit_gh.mul_(a_d.unsqueeze(1)).to(grad_h.scalar_type()));
  }
  if (!second_pass) return {loss, stats, grad_h, grad_w, grad_b, advantage};
  // The student's logits only, so a chunk holds twice the rows in the same buffer. The row
  // kernels read the teacher's logits before writing the student's row (its gradient), so in
  // sampled mode with the advantage given the student's own row can stand in for the teacher's.
  RowSpec second = spec;
  second.compute_grad = true;
  const int64_t step2 = 2 * step;
  const at::Tensor ones2 = at::ones({step2}, c.opts);
  at::Tensor scratch_loss = at::empty({step2}, c.opts);
  at::Tensor scratch_stats = at::empty({step2, 4}, c.opts);
  for (int64_t i = 0; i < m; i += step2) {
    const int64_t len = std::min(step2, m - i);
    const at::Tensor idx = didx.narrow(0, i, len);
    at::Tensor h = hidden_buf.narrow(0, 0, len), s = logits_buf.narrow(0, 0, len);
    h.copy_(student_hidden.index_select(0, idx));
    project(s, h, c.w, c.b);
    run_rows(second, s, s, target_d.narrow(0, i, len), coef_d.narrow(0, i, len),
             a_d.narrow(0, i, len), scratch_loss.narrow(0, 0, len),
             scratch_stats.narrow(0, 0, len));
    if (grad_hidden) grad_h.index_copy_(0, idx, at::mm(s, c.w).to(grad_h.scalar_type()));
    if (grad_weight) grad_w.addmm_(s.t(), h);
    if (grad_bias) grad_b.addmv_(s.t(), ones2.narrow(0, 0, len));
  }
  return {loss, stats, grad_h, grad_w, grad_b, advantage};
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
  // sampled mode, per-sequence centred advantage (returned as the last output)
  m.def(
      "fused_hindsight_centred(Tensor student_hidden, Tensor teacher_hidden, Tensor weight, "
      "Tensor? bias, Tensor teacher_weight, Tensor? teacher_bias, Tensor target_ids, "
      "Tensor coef, Tensor seq_ids, float temperature, float signal_clip, bool grad_hidden, "
      "bool grad_weight, bool grad_bias) "
      "-> (Tensor token_loss, Tensor stats, Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias, Tensor advantage)");
  m.def(
      "hindsight_from_logits(Tensor student_logits, Tensor teacher_logits, Tensor? target_ids, "
      "Tensor coef, Tensor? advantage, int mode, float alpha, float temperature, int topk, "
      "bool topk_from_teacher, bool tail, float signal_clip, float kl_clip, bool compute_grad) "
      "-> (Tensor token_loss, Tensor stats, Tensor grad_logits)");
}

TORCH_LIBRARY_IMPL(hsd, CPU, m) {
  m.impl("fused_hindsight", &hsd::fused_cpu);
  m.impl("fused_hindsight_centred", &hsd::fused_centred_cpu);
  m.impl("hindsight_from_logits", &hsd::logits_cpu);
}

// Importing hsd._C only has to run the registrars above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "hsd operator library (torch.ops.hsd)", -1, nullptr};
  return PyModule_Create(&module);
}
