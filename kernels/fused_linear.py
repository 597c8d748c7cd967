"""Fused LM-head form: hidden states + head in, loss / stats / gradients out, logits never whole.

Per chunk of ``rows`` tokens (a memory budget, :data:`CHUNK_ELEMENTS` logits per side):

1. logits GEMM on the tensor cores (cuBLAS, bf16/fp16 in, fp32 accumulate). When the teacher
   shares the student's head the student and teacher hidden rows are stacked into one
   [2 * rows, H] operand, so each weight tile is loaded once for both sides;
2. :func:`hsd_rows_kernel` over the chunk (online softmax statistics of both sides, the
   divergence, and grad_logits written *in place* over the student logits; top-k support
   ids from ``torch.topk`` on the chunk, on-support gradients scattered afterwards);
3. grad_hidden = grad_logits @ W and grad_W += grad_logits^T @ h (cuBLAS; fp32 accumulation of
   grad_W straight from bf16 operands via ``out_dtype`` on CUDA), grad_b += column sums.

Why GEMMs in cuBLAS and not in the Triton kernel: the four GEMMs are 8 T H V FLOPs and
dominate (43 ms of an ideal ~50 ms at T=8192, H=4096, V=128256 on an H100), and cuBLAS runs
them near the 800 TFLOP/s peak. A Triton matmul with the softmax in its epilogue would save
only the statistics pass (one read of the chunk's logits, ~1.4 ms at that shape) and would
have to either recompute logits for the gradient (+50 % GEMM work) or store them anyway.
Gradients are computed in the forward (no logits recompute in backward), the chunk buffer is
reused across chunks, and the gradient overwrites the student logits, so the HBM traffic per
logit is: GEMM write, 1 (KL / sampled) or 2 (JSD) reads for the statistics and divergence,
one read + write for the gradient, and the gradient GEMM reads. Large chunks keep W re-reads
and the fp32 grad_W read-modify-writes (one per chunk) small; no atomics are needed.
"""

import os
from typing import Optional

import torch
from torch import Tensor

from .row_divergence import TOPK, launch_rows

# logits per side per chunk: 2^28 bf16 = 512 MiB per side (2048 rows of a 128k vocabulary)
CHUNK_ELEMENTS = int(os.environ.get("HSD_TRITON_CHUNK_ELEMENTS", 1 << 28))
_OUT_DTYPE_MM = {"ok": True}  # cleared once if this torch/cuBLAS lacks mm(out_dtype=)


def chunk_rows(n: int, vocab: int, budget: Optional[int] = None) -> int:
    """Rows per chunk: the budget over V, a multiple of 128 when large (GEMM-friendly)."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    rows = max(1, min(n, budget // max(vocab, 1)))
    return rows - rows % 128 if rows > 128 else rows


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc (fp32) = / += a @ b without a float32 GEMM when a and b are half precision."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_MM["ok"]:
        try:
            if first:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM["ok"] = False
    if acc.is_cuda:  # tensor-core GEMM, chunk result rounded once before the fp32 sum
        part = torch.mm(a, b).float()
    else:
        part = torch.mm(a.float(), b.float())
    if first:
        acc.copy_(part)
    else:
        acc.add_(part)


def _same_head(weight: Tensor, bias: Optional[Tensor], teacher_weight: Tensor,
               teacher_bias: Optional[Tensor]) -> bool:
    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
    return same(weight, teacher_weight) and same(bias, teacher_bias)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def fused_terms(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                bias: Optional[Tensor], teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                target_ids: Optional[Tensor], coef: Tensor, advantage: Optional[Tensor],
                mode: int, alpha: float, temperature: float, topk: int, topk_from_teacher: bool,
                tail: bool, signal_clip: float, kl_clip: float, compute_grad: bool,
                budget: Optional[int] = None):
    """The contract's ``fused``: (token_loss, stats, grad_hidden, grad_weight, grad_bias)."""
    n, hidden = student_hidden.shape
    vocab = weight.shape[0]
    device, dtype = student_hidden.device, student_hidden.dtype
    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 4, dtype=torch.float32, device=device)
    grad_h = torch.empty(n, hidden, dtype=dtype, device=device) if compute_grad else None
    grad_w = torch.empty(vocab, hidden, dtype=torch.float32, device=device) if compute_grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) \
        if compute_grad and bias is not None else None
    if n == 0:
        if grad_w is not None:
            grad_w.zero_()
        return loss, stats, grad_h, grad_w, grad_b
    rows = chunk_rows(n, vocab, budget)
    shared = _same_head(weight, bias, teacher_weight, teacher_bias)
    logits_buf = torch.empty(2 * rows, vocab, dtype=dtype, device=device)
    stacked = torch.empty(2 * rows, hidden, dtype=dtype, device=device) if shared else None
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
            _linear_into(pair, stacked[:2 * c], weight, bias)
        else:
            _linear_into(pair[:c], h, weight, bias)
            _linear_into(pair[c:], teacher_hidden[start:stop], teacher_weight, teacher_bias)
        s, t = pair[:c], pair[c:]
        ids = (t if topk_from_teacher else s).topk(topk, 1, sorted=False).indices \
            if mode == TOPK else None
        sup = on_support[:c] if on_support is not None else None
        launch_rows(s, t, s if compute_grad else None, loss[start:stop], stats[start:stop],
                    target_ids[start:stop] if target_ids is not None else None,
                    coef[start:stop], advantage[start:stop] if advantage is not None else None,
                    ids, sup, mode, alpha, temperature, tail, signal_clip, kl_clip, compute_grad)
        if not compute_grad:
            continue
        g = s  # grad_logits now lives where the student logits were
        if sup is not None:
            g.scatter_(1, ids, sup.to(g.dtype))
        torch.mm(g, weight, out=grad_h[start:stop])
        _accumulate_fp32(grad_w, g.t(), h, first=start == 0)
        if grad_b is not None:
            grad_b += g.sum(0, dtype=torch.float32)
    return loss, stats, grad_h, grad_w, grad_b


@torch.library.custom_op("hsd::triton_fused_linear", mutates_args=())
def triton_fused_linear(student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor,
                        bias: Optional[Tensor], teacher_weight: Tensor,
                        teacher_bias: Optional[Tensor], target_ids: Optional[Tensor],
                        coef: Tensor, advantage: Optional[Tensor], mode: int, alpha: float,
                        temperature: float, topk: int, topk_from_teacher: bool, tail: bool,
                        signal_clip: float, kl_clip: float,
                        compute_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused op as seen by torch.compile; absent gradients are empty tensors."""
    loss, stats, gh, gw, gb = fused_terms(student_hidden, teacher_hidden, weight, bias,
                                          teacher_weight, teacher_bias, target_ids, coef,
                                          advantage, mode, alpha, temperature, topk,
                                          topk_from_teacher, tail, signal_clip, kl_clip,
                                          compute_grad)
    empty = loss.new_empty(0)
    return (loss, stats, gh if gh is not None else student_hidden.new_empty(0),
            gw if gw is not None else empty, gb if gb is not None else empty)


@triton_fused_linear.register_fake
def _(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
      coef, advantage, mode, alpha, temperature, topk, topk_from_teacher, tail, signal_clip,
      kl_clip, compute_grad):
    n = student_hidden.shape[0]
    f32 = torch.float32
    loss = student_hidden.new_empty(n, dtype=f32)
    stats = student_hidden.new_empty(n, 4, dtype=f32)
    if not compute_grad:
        empty = student_hidden.new_empty(0, dtype=f32)
        return loss, stats, student_hidden.new_empty(0), empty, empty
    gb = student_hidden.new_empty(bias.shape[0], dtype=f32) if bias is not None \
        else student_hidden.new_empty(0, dtype=f32)
    return (loss, stats, student_hidden.new_empty(student_hidden.shape),
            weight.new_empty(weight.shape, dtype=f32), gb)
