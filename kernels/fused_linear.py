"""Fused LM-head form: hidden states + head in, loss / stats / gradients out, logits never whole.

Per chunk of ``rows`` tokens (a memory budget, :data:`CHUNK_ELEMENTS` logits per side):

1. logits GEMM on the tensor cores (cuBLAS: bf16/fp16 operands, fp32 accumulation, written as
   float32 through ``out_dtype``). When the teacher shares the student's head the student and
   teacher hidden rows are stacked into one [2 * rows, H] operand, so each weight tile is
   loaded once for both sides. The bias is not applied by the GEMM: the Triton kernel adds it
   as it loads each logits tile (no extra pass over the logits);
2. :func:`hsd_rows_kernel`, one program per token row: online softmax statistics of both
   sides, the divergence, and grad_logits written in the input dtype (in place over the
   student logits when those have that dtype). Top-k support ids come from
   :func:`.topk.topk_support` on the chunk (torch's top-k plus the tie rule); the kernel
   takes them and the on-support gradients are scattered afterwards. With a bias, top-k mode
   ranks float32 biased logits that are bit-identical to the kernel's (it compares each
   entry against the k-th ranked logit to sum the tail mass);
3. grad_hidden = grad_logits @ W and grad_W += grad_logits^T @ h on the tensor cores, grad_W
   accumulated in place in float32 straight from bf16 operands (``out_dtype``), grad_b += column
   sums. Only the gradients asked for are computed (``grad_hidden`` / ``grad_weight`` /
   ``grad_bias``): a frozen head skips the [V, H] buffer and its GEMM, and a call that needs no
   gradient runs the statistics-only kernel variant and no backward GEMM at all.

Why GEMMs in cuBLAS and not in the Triton kernel: the four GEMMs are 8 T H V FLOPs and
dominate (43 ms at T=8192, H=4096, V=128256 on an H100 at 800 TFLOP/s), and cuBLAS runs them at
that rate. A Triton matmul with the softmax in its epilogue would save only the statistics
pass over the chunk, and would have to recompute logits for the gradient (+50 % GEMM work) or
store them anyway. Gradients are computed in the forward (no recompute in backward); chunk
buffers are reused; grad_W needs no atomics (one fp32 read-modify-write per chunk, so large
chunks).

Logits are float32 by default: bf16 logits cost ~1e-2 relative accuracy in the loss and
gradients (a logit of 10 is rounded by 0.03). ``HSD_TRITON_LOGITS=half`` (or
:data:`HALF_LOGITS`) keeps them in the input dtype instead: about half the HBM traffic of the
softmax passes (bf16: ~16-22 bytes per logit in all instead of ~26-38) for that accuracy.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from hsd.backends.gemm import out_dtype_mm_supported

from .row_divergence import TOPK, device_guard, launch_rows
from .topk import topk_support


# logits per side per chunk: 2^28 = 2048 rows of a 128k vocabulary (2 GiB of float32 pairs)
CHUNK_ELEMENTS = int(os.environ.get("HSD_TRITON_CHUNK_ELEMENTS", 1 << 28))
HALF_LOGITS = os.environ.get("HSD_TRITON_LOGITS", "float32") == "half"
def chunk_rows(n: int, vocab: int, budget: Optional[int] = None) -> int:
    """Rows per chunk: the budget over V, a multiple of 128 when large (GEMM-friendly)."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    rows = max(1, min(n, budget // max(vocab, 1)))
    return rows - rows % 128 if rows > 128 else rows


def _mm_fp32(a: Tensor, b: Tensor, out: Tensor, accumulate: bool, fallback) -> None:
    """out (float32) = / += a @ b in place, on half-precision tensor cores when a and b are half.

    ``fallback()`` returns float32 (a, b) for where no half GEMM writes float32 (CPU, old torch).
    """
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if out.is_cuda and out_dtype_mm_supported(out.device, a.dtype):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
        return
    a32, b32 = fallback()
    if accumulate:
        out.addmm_(a32, b32)
    else:
        torch.mm(a32, b32, out=out)


class _Float32Heads:
    """float32 copies of the heads for the fallback GEMMs, made at most once per call."""

    def __init__(self, *heads: Tensor):
        self.heads, self.cache = heads, {}

    def __call__(self, i: int) -> Tensor:
        if i not in self.cache:
            self.cache[i] = self.heads[i].float()
        return self.cache[i]


def _same_head(weight: Tensor, bias: Optional[Tensor], teacher_weight: Tensor,
               teacher_bias: Optional[Tensor]) -> bool:
    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
    return same(weight, teacher_weight) and same(bias, teacher_bias)


def _logits_into(out: Tensor, x: Tensor, weight: Tensor, weight32) -> None:
    """out = x @ weight^T (no bias: the kernel adds it), in out's dtype."""
    if out.dtype == x.dtype:
        torch.mm(x, weight.t(), out=out)
    else:
        _mm_fp32(x, weight.t(), out, False, lambda: (x.float(), weight32().t()))


def fused_terms(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                bias: Optional[Tensor], teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                target_ids: Optional[Tensor], coef: Tensor, advantage: Optional[Tensor],
                mode: int, alpha: float, temperature: float, topk: int, topk_from_teacher: bool,
                tail: bool, signal_clip: float, kl_clip: float, grad_hidden: bool,
                grad_weight: bool, grad_bias: bool, budget: Optional[int] = None):
    """The contract's ``fused``: (token_loss, stats, grad_hidden, grad_weight, grad_bias), each
    gradient None unless asked for (grad_bias also None without a bias)."""
    with device_guard(student_hidden):
        return _fused_terms(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                            teacher_bias, target_ids, coef, advantage, mode, alpha, temperature,
                            topk, topk_from_teacher, tail, signal_clip, kl_clip, grad_hidden,
                            grad_weight, grad_bias and bias is not None, budget)


def _fused_terms(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                 target_ids, coef, advantage, mode, alpha, temperature, topk, topk_from_teacher,
                 tail, signal_clip, kl_clip, want_h, want_w, want_b, budget):
    n, hidden = student_hidden.shape
    vocab = weight.shape[0]
    device, dtype = student_hidden.device, student_hidden.dtype
    compute_grad = want_h or want_w or want_b  # grad_logits are needed for any of them
    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 4, dtype=torch.float32, device=device)
    grad_h = torch.empty(n, hidden, dtype=dtype, device=device) if want_h else None
    grad_w = torch.empty(vocab, hidden, dtype=torch.float32, device=device) \
        if want_w else None  # the first chunk overwrites it
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if want_b else None
    if n == 0:
        if grad_w is not None:
            grad_w.zero_()
        return loss, stats, grad_h, grad_w, grad_b
    rows = chunk_rows(n, vocab, budget)
    shared = _same_head(weight, bias, teacher_weight, teacher_bias)
    if (bias is None) != (teacher_bias is None):  # the kernel adds both biases or neither
        zeros = torch.zeros(vocab, dtype=dtype, device=device)
        bias, teacher_bias = (zeros if bias is None else bias,
                              zeros if teacher_bias is None else teacher_bias)
    logits_dtype = dtype if HALF_LOGITS or dtype == torch.float32 else torch.float32
    logits_buf = torch.empty(2 * rows, vocab, dtype=logits_dtype, device=device)
    grad_buf = torch.empty(rows, vocab, dtype=dtype, device=device) \
        if compute_grad and logits_dtype != dtype else None
    stacked = torch.empty(2 * rows, hidden, dtype=dtype, device=device) if shared else None
    heads32 = _Float32Heads(weight, teacher_weight)
    coef = coef.float().contiguous()
    advantage = advantage.float().contiguous() if advantage is not None else None
    target_ids = target_ids.contiguous() if target_ids is not None else None
    on_support = torch.empty(rows, topk, dtype=torch.float32, device=device) \
        if mode == TOPK and compute_grad else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        h = student_hidden[start:stop]
        pair = logits_buf[:2 * c]
        if shared:  # one GEMM for both sides: each weight tile is read once for the pair
            stacked[:c].copy_(h)
            stacked[c:2 * c].copy_(teacher_hidden[start:stop])
            _logits_into(pair, stacked[:2 * c], weight, lambda: heads32(0))
        else:
            _logits_into(pair[:c], h, weight, lambda: heads32(0))
            _logits_into(pair[c:], teacher_hidden[start:stop], teacher_weight,
                         lambda: heads32(1))
        s, t = pair[:c], pair[c:]
        kernel_bias = (bias, teacher_bias) if bias is not None else (None, None)
        ids = None
        if mode == TOPK:
            # topk ranks the biased logits and the kernel compares against the k-th of them:
            # both must see the same float32 values
            ranked, ranked_bias = (t, teacher_bias) if topk_from_teacher else (s, bias)
            if bias is not None and s.dtype == torch.float32:  # add the biases in place once
                s.add_(bias)
                t.add_(teacher_bias)
                kernel_bias = (None, None)
            elif bias is not None:  # half logits: rank a float32 biased copy (the kernel's sum)
                ranked = ranked.float() + ranked_bias.float()
            ids = topk_support(ranked, topk)
        g = (s if grad_buf is None else grad_buf[:c]) if compute_grad else None
        sup = on_support[:c] if on_support is not None else None
        launch_rows(s, t, g, loss[start:stop], stats[start:stop],
                    target_ids[start:stop] if target_ids is not None else None,
                    coef[start:stop], advantage[start:stop] if advantage is not None else None,
                    ids, sup, mode, alpha, temperature, tail, signal_clip, kl_clip, compute_grad,
                    topk_from_teacher=topk_from_teacher, student_bias=kernel_bias[0],
                    teacher_bias=kernel_bias[1])
        if not compute_grad:
            continue
        if sup is not None:
            g.scatter_(1, ids, sup.to(g.dtype))
        if grad_h is None:
            pass
        elif g.dtype == torch.float32 or g.is_cuda:
            torch.mm(g, weight, out=grad_h[start:stop])
        else:  # CPU half: float32 math, one rounding at the end
            grad_h[start:stop] = (g.float() @ heads32(0)).to(dtype)
        if grad_w is not None:  # in place: no [V, H] temporary per chunk
            _mm_fp32(g.t(), h, grad_w, start > 0, lambda: (g.t().float(), h.float()))
        if grad_b is not None:
            grad_b += g.sum(0, dtype=torch.float32)
    return loss, stats, grad_h, grad_w, grad_b


@torch.library.custom_op("hsd::triton_fused_linear", mutates_args=())
def triton_fused_linear(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                        bias: Optional[Tensor], teacher_weight: Tensor,
                        teacher_bias: Optional[Tensor], target_ids: Optional[Tensor],
                        coef: Tensor, advantage: Optional[Tensor], mode: int, alpha: float,
                        temperature: float, topk: int, topk_from_teacher: bool, tail: bool,
                        signal_clip: float, kl_clip: float, grad_hidden: bool,
                        grad_weight: bool,
                        grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused op as seen by torch.compile; gradients not asked for are empty tensors."""
    loss, stats, gh, gw, gb = fused_terms(student_hidden, teacher_hidden, weight, bias,
                                          teacher_weight, teacher_bias, target_ids, coef,
                                          advantage, mode, alpha, temperature, topk,
                                          topk_from_teacher, tail, signal_clip, kl_clip,
                                          grad_hidden, grad_weight, grad_bias)
    # absent gradients: distinct empty tensors (a custom op's outputs may not alias)
    return (loss, stats, gh if gh is not None else student_hidden.new_empty(0),
            gw if gw is not None else loss.new_empty(0),
            gb if gb is not None else loss.new_empty(0))


@triton_fused_linear.register_fake
def _(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
      coef, advantage, mode, alpha, temperature, topk, topk_from_teacher, tail, signal_clip,
      kl_clip, grad_hidden, grad_weight, grad_bias):
    n = student_hidden.shape[0]
    f32 = torch.float32
    loss = student_hidden.new_empty(n, dtype=f32)
    stats = student_hidden.new_empty(n, 4, dtype=f32)
    gh = student_hidden.new_empty(student_hidden.shape) if grad_hidden \
        else student_hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=f32) if grad_weight \
        else student_hidden.new_empty(0, dtype=f32)
    gb = student_hidden.new_empty(bias.shape[0], dtype=f32) if grad_bias and bias is not None \
        else student_hidden.new_empty(0, dtype=f32)
    return loss, stats, gh, gw, gb
