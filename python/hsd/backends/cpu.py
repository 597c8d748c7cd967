"""The ``"cpu"`` backend: the kernel contract in C++ (``torch.ops.hsd``, built as ``hsd._C``).

The fused form never materialises [N, V] logits: it walks the tokens in chunks of a few hundred
rows, with BLAS for the four LM-head products and vectorised row kernels in between, and
computes the gradients during the forward pass. Float32 compute (float64 for float64 inputs);
bfloat16 / float16 inputs are upcast chunk by chunk (the LM head once per call).
"""

import torch

from .. import _extension
from . import as_needs

name = "cpu"
# fused_centred is one opaque operator (its chunk plan is made inside it): torch.compile keeps it
CENTRED_TRACEABLE = True


def is_available() -> bool:
    """True when the compiled extension loaded and matches the running torch."""
    return _extension.load()


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, needs):
    """The contract's ``fused`` (see :mod:`hsd.backends`)."""
    needs = as_needs(needs)
    grad_bias = needs.bias and bias is not None
    loss, stats, grad_h, grad_w, grad_b = torch.ops.hsd.fused_hindsight(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
        coef, advantage, *spec.op_args(), bool(needs.hidden), bool(needs.weight), grad_bias)
    return (loss, stats, grad_h if needs.hidden else None, grad_w if needs.weight else None,
            grad_b if grad_bias else None)


def fused_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                  target_ids, coef, seq_ids, spec, needs):
    """Sampled mode with per-sequence centring in one pass (see :mod:`hsd.backends`)."""
    needs = as_needs(needs)
    grad_bias = needs.bias and bias is not None
    loss, stats, grad_h, grad_w, grad_b, advantage = torch.ops.hsd.fused_hindsight_centred(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
        coef, seq_ids, float(spec.temperature), float(spec.signal_clip), bool(needs.hidden),
        bool(needs.weight), grad_bias)
    return (loss, stats, grad_h if needs.hidden else None, grad_w if needs.weight else None,
            grad_b if grad_bias else None, advantage)


def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    """The contract's ``logits`` (see :mod:`hsd.backends`)."""
    loss, stats, grad = torch.ops.hsd.hindsight_from_logits(
        student_logits, teacher_logits, target_ids, coef, advantage,
        *spec.op_args(), bool(compute_grad))
    return loss, stats, grad if compute_grad else None
