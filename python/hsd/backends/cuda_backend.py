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
from .gemm import out_dtype_mm_supported

name = "cuda"
CHUNK_ELEMENTS = 1 << 26  # float32 logits per chunk buffer (three buffers live at once)


def is_available() -> bool:
    """True when the CUDA kernels were compiled into hsd._C and a GPU is visible."""
    return torch.cuda.is_available() and _extension.cuda_kernels_linked()


def supports(device: torch.device) -> bool:
    return device.type == "cuda"


class _Float32:
    """A float32 copy of a tensor, made at most once per call (the fallback's operands)."""

    def __init__(self, x):
        self.x, self.copy = x, None

    def __call__(self):
        if self.copy is None:
            self.copy = self.x.float()
        return self.copy


def _mm_into(out, a, b, accumulate, a32, b32):
    """out (float32) = / += a @ b in place: half operands accumulate and store in float32 on the
    tensor cores (``out_dtype``), so no [V, H] temporary is allocated per chunk; ``a32`` / ``b32``
    give float32 operands where this torch cannot do that."""
    if a.dtype == torch.float32 or not out_dtype_mm_supported(out.device, a.dtype):
        a, b = (a, b) if a.dtype == torch.float32 else (a32(), b32())
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)


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
    """The contract's ``fused`` (see :mod:`hsd.backends`): only the gradients in ``needs`` are
    computed (no [V, H] product for a frozen head, no gradient at all when none is needed)."""
    if student_hidden.dtype == torch.float64:
        return torch_chunked.fused(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                                   teacher_bias, target_ids, coef, advantage, spec, needs)
    needs = as_needs(needs)
    want_h, want_w, want_b = needs.hidden, needs.weight, needs.bias and bias is not None
    compute_grad = want_h or want_w or want_b
    n, vocab = student_hidden.shape[0], weight.shape[0]
    device, dtype = student_hidden.device, student_hidden.dtype
    token_loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 4, dtype=torch.float32, device=device)
    grad_h = torch.empty_like(student_hidden) if want_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if want_b else None
    w32, tw32 = _Float32(weight), _Float32(teacher_weight)
    step = max(1, min(n, CHUNK_ELEMENTS // max(vocab, 1)))
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        h, ht = student_hidden[rows], teacher_hidden[rows]
        c = h.shape[0]
        s = torch.empty(c, vocab, dtype=torch.float32, device=device)
        t = torch.empty(c, vocab, dtype=torch.float32, device=device)
        _mm_into(s, h, weight.t(), False, _Float32(h), lambda: w32().t())
        _mm_into(t, ht, teacher_weight.t(), False, _Float32(ht), lambda: tw32().t())
        if bias is not None:
            s += bias.float()
        if teacher_bias is not None:
            t += teacher_bias.float()
        loss_i, stats_i, g = torch.ops.hsd.hindsight_from_logits(
            s, t, None if target_ids is None else target_ids[rows], coef[rows],
            None if advantage is None else advantage[rows], *spec.op_args(), compute_grad)
        token_loss[rows], stats[rows] = loss_i, stats_i
        del s, t
        if not compute_grad:
            continue
        g_in = g if dtype == torch.float32 else g.to(dtype)  # one conversion for both products
        if grad_h is not None:
            torch.mm(g_in, weight, out=grad_h[rows])
        if grad_w is not None:
            _mm_into(grad_w, g_in.t(), h, True, lambda: g.t(), _Float32(h))
        if grad_b is not None:
            grad_b += g.sum(0)
    return token_loss, stats, grad_h, grad_w, grad_b
