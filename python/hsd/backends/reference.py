"""The reference backend: the definition in :mod:`hsd.loss`, with gradients from autograd.

Materialises [N, V] logits (float32, or float64 for float64 inputs); use it to check, not to train.
"""

import torch
import torch.nn.functional as F

name = "reference"


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def _weighted_grads(token_loss, coef, inputs, compute_grad):
    if not compute_grad:
        return [None] * len(inputs)
    total = torch.where(coef != 0, coef.to(token_loss.dtype) * token_loss,
                        torch.zeros_like(token_loss)).sum()
    wanted = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(total, wanted))
    return [next(grads) if t is not None else None for t in inputs]


def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    from ..loss import reference_token_terms

    with torch.enable_grad():
        s = student_logits.detach().requires_grad_(compute_grad)
        token_loss, stats = reference_token_terms(s, teacher_logits, target_ids, spec, advantage)
        (grad,) = _weighted_grads(token_loss, coef, [s], compute_grad)
    if grad is not None:
        grad = torch.where(coef[:, None] != 0, grad, torch.zeros_like(grad))
    return token_loss.detach(), stats, grad


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, compute_grad):
    from ..loss import reference_token_terms

    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        h = student_hidden.detach().requires_grad_(compute_grad)
        w = weight.detach().requires_grad_(compute_grad)
        b = bias.detach().requires_grad_(compute_grad) if bias is not None else None
        s = F.linear(h.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None)
        with torch.no_grad():
            t = F.linear(teacher_hidden.to(dtype), teacher_weight.to(dtype),
                         teacher_bias.to(dtype) if teacher_bias is not None else None)
        token_loss, stats = reference_token_terms(s, t, target_ids, spec, advantage)
        grad_h, grad_w, grad_b = _weighted_grads(token_loss, coef, [h, w, b], compute_grad)
    if grad_h is not None:
        grad_h = torch.where(coef[:, None] != 0, grad_h, torch.zeros_like(grad_h))
        grad_w = grad_w.to(dtype)
        grad_b = grad_b.to(dtype) if grad_b is not None else None
    return token_loss.detach(), stats, grad_h, grad_w, grad_b
