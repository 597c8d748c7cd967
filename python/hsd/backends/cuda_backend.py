"""The ``"cuda"`` backend: hsd's CUDA C++ row kernels (``torch.ops.hsd.hindsight_from_logits``).

``logits`` runs the kernel directly (one block per row). ``fused`` walks the tokens in chunks:
cuBLAS products (through torch) give each chunk's float32 logits, the kernel turns them into the
loss, statistics and d(loss)/d(logits), and two more products carry that to the hidden states and
the LM head; extra memory is O(chunk x V). Float64 inputs go to the portable backend.
Available only when the extension was built against a CUDA-enabled torch and a GPU is present.
"""

import torch

from .. import _extension
from . import as_needs, torch_chunked

name = "cuda"
CHUNK_ELEMENTS = 1 << 26  # float32 logits per chunk buffer (three buffers live at once)


def is_available() -> bool:
    """True when the CUDA kernels were compiled into hsd._C and a GPU is visible."""
    return torch.cuda.is_available() and _extension.cuda_kernels_linked()


def supports(device: torch.device) -> bool:
    return device.type == "cuda"



_MM_OUT_DTYPE = None  # whether torch.mm(..., out_dtype=float32) works for half inputs here


def _mm_f32(a, b):
    """a @ b with a float32 result (half-precision inputs accumulate and store in float32)."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return out
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE = False
    return (a @ b).float()


def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    """The contract's ``logits`` (see :mod:`hsd.backends`)."""
    if student_logits.dtype == torch.float64:
        return torch_chunked.logits(student_logits, teacher_logits, target_ids, coef, advantage,
                                    spec, compute_grad)
    loss, stats, grad = torch.ops.hsd.hindsight_from_logits(
        student_logits, teacher_logits.to(student_logits.dtype), target_ids, coef, advantage,
        *spec.op_args(), bool(compute_grad))
    return loss, stats, grad if compute_grad else None


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, needs):
    """The contract's ``fused`` (see :mod:`hsd.backends`)."""
    if student_hidden.dtype == torch.float64:
        return torch_chunked.fused(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                                   teacher_bias, target_ids, coef, advantage, spec, needs)
    needs = as_needs(needs)
    token_loss, stats, grad_h, grad_w, grad_b = _fused(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
        coef, advantage, spec, needs.any)
    return (token_loss, stats, grad_h if needs.hidden else None,
            grad_w if needs.weight else None, grad_b if needs.bias else None)


def _fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
           coef, advantage, spec, compute_grad):
    n, vocab = student_hidden.shape[0], weight.shape[0]
    device = student_hidden.device
    token_loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 4, dtype=torch.float32, device=device)
    grad_h = torch.empty_like(student_hidden) if compute_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if compute_grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) \
        if compute_grad and bias is not None else None
    step = max(1, min(n, CHUNK_ELEMENTS // max(vocab, 1)))
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        h = student_hidden[rows]
        s = _mm_f32(h, weight.t())
        t = _mm_f32(teacher_hidden[rows], teacher_weight.t())
        if bias is not None:
            s += bias.float()
        if teacher_bias is not None:
            t += teacher_bias.float()
        loss_i, stats_i, g = torch.ops.hsd.hindsight_from_logits(
            s, t, None if target_ids is None else target_ids[rows], coef[rows],
            None if advantage is None else advantage[rows], *spec.op_args(), bool(compute_grad))
        token_loss[rows], stats[rows] = loss_i, stats_i
        del s, t
        if compute_grad:
            grad_h[rows] = (g.to(weight.dtype) @ weight) if weight.dtype != torch.float32 \
                else g @ weight
            grad_w += _mm_f32(g.t().to(h.dtype), h) if h.dtype != torch.float32 else g.t() @ h
            if grad_b is not None:
                grad_b += g.sum(0)
    return token_loss, stats, grad_h, grad_w, grad_b
