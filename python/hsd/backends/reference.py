"""The reference backend: the definition in :mod:`hsd.definition`, with gradients from autograd.

Materialises [N, V] logits (float32, or float64 for float64 inputs); use it to check, not to train.
Logits stay float32 under autocast, and a call that needs no gradient runs without autograd (so it
works under ``torch.inference_mode``).
"""

import torch
import torch.nn.functional as F

from ..definition import reference_token_terms
from . import as_needs

name = "reference"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def _weighted_grads(token_loss, coef, inputs):
    """Gradients of sum_i coef_i * token_loss_i with respect to ``inputs`` (None stays None)."""
    total = torch.where(coef != 0, coef.to(token_loss.dtype) * token_loss,
                        torch.zeros_like(token_loss)).sum()
    wanted = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(total, wanted))
    return [next(grads) if t is not None else None for t in inputs]


def _masked_rows(grad, coef):
    return torch.where(coef[:, None] != 0, grad, torch.zeros_like(grad))


def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    with torch.autocast(student_logits.device.type, enabled=False):
        if not compute_grad:
            token_loss, stats = reference_token_terms(student_logits.detach(), teacher_logits,
                                                      target_ids, spec, advantage)
            return token_loss.detach(), stats, None
        with torch.enable_grad():
            s = student_logits.detach().requires_grad_()
            token_loss, stats = reference_token_terms(s, teacher_logits, target_ids, spec,
                                                      advantage)
            (grad,) = _weighted_grads(token_loss, coef, [s])
    return token_loss.detach(), stats, _masked_rows(grad, coef)


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, needs):
    needs = as_needs(needs)
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    up = (lambda x: None if x is None else x.detach().to(dtype))
    with torch.autocast(student_hidden.device.type, enabled=False):
        t = F.linear(up(teacher_hidden), up(teacher_weight), up(teacher_bias))
        if not needs.any:
            s = F.linear(up(student_hidden), up(weight), up(bias))
            token_loss, stats = reference_token_terms(s, t, target_ids, spec, advantage)
            return token_loss.detach(), stats, None, None, None
        with torch.enable_grad():
            # only the inputs whose gradient is asked for join the graph
            h = up(student_hidden).requires_grad_(needs.hidden)
            w = up(weight).requires_grad_(needs.weight)
            b = up(bias).requires_grad_(needs.bias) if bias is not None else None
            s = F.linear(h, w, b)
            token_loss, stats = reference_token_terms(s, t, target_ids, spec, advantage)
            wanted = [h if needs.hidden else None, w if needs.weight else None,
                      b if b is not None and needs.bias else None]
            grad_h, grad_w, grad_b = _weighted_grads(token_loss, coef, wanted)
    if grad_h is not None:
        grad_h = _masked_rows(grad_h, coef).to(student_hidden.dtype)
    return token_loss.detach(), stats, grad_h, grad_w, grad_b
