"""Logits-input kernel: the contract's ``logits(...)`` for callers that already hold [N, V] logits.

One Triton program per token row (:func:`hsd_rows_kernel`), two passes over the vocabulary
tiles (three for the generalised JSD), writing grad_logits in the student logits' dtype.
Top-k support ids come from :func:`.topk.topk_support` on the ranking side's logits (the
order of ``logits / T`` and of ``log_softmax(logits / T)`` agree; ties at the k-th rank go to
the lower vocabulary id), and the k on-support gradients are scattered over the row after the
kernel.
"""

from typing import Optional

import torch
from torch import Tensor

from .row_divergence import TOPK, launch_rows
from .topk import topk_support


def _rows_ready(x: Tensor) -> Tensor:
    """The kernel walks rows with unit stride along the vocabulary."""
    return x if x.stride(-1) == 1 else x.contiguous()


def logits_terms(student_logits: Tensor, teacher_logits: Tensor, target_ids: Optional[Tensor],
                 coef: Tensor, advantage: Optional[Tensor], mode: int, alpha: float,
                 temperature: float, topk: int, topk_from_teacher: bool, tail: bool,
                 signal_clip: float, kl_clip: float, compute_grad: bool):
    """(token_loss [N] f32, stats [N, 4] f32, grad_logits [N, V] or None) for one block of rows."""
    s, t = _rows_ready(student_logits), _rows_ready(teacher_logits)
    n, vocab = s.shape
    device = s.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    stats = torch.empty(n, 4, dtype=torch.float32, device=device)
    grad = torch.empty_like(s) if compute_grad else None
    ids = on_support = None
    if mode == TOPK:
        ids = topk_support(t if topk_from_teacher else s, topk)
        if compute_grad:
            on_support = torch.empty(n, topk, dtype=torch.float32, device=device)
    launch_rows(s, t, grad, loss, stats,
                target_ids.contiguous() if target_ids is not None else None,
                coef.float().contiguous(),
                advantage.float().contiguous() if advantage is not None else None,
                ids, on_support, mode, alpha, temperature, tail, signal_clip, kl_clip,
                compute_grad, topk_from_teacher=topk_from_teacher)
    if on_support is not None:
        grad.scatter_(1, ids, on_support.to(grad.dtype))
    return loss, stats, grad


@torch.library.custom_op("hsd::triton_logits", mutates_args=())
def triton_logits(student_logits: Tensor, teacher_logits: Tensor, target_ids: Optional[Tensor],
                  coef: Tensor, advantage: Optional[Tensor], mode: int, alpha: float,
                  temperature: float, topk: int, topk_from_teacher: bool, tail: bool,
                  signal_clip: float, kl_clip: float,
                  compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The logits op as seen by torch.compile; an absent gradient is an empty tensor."""
    loss, stats, grad = logits_terms(student_logits, teacher_logits, target_ids, coef, advantage,
                                     mode, alpha, temperature, topk, topk_from_teacher, tail,
                                     signal_clip, kl_clip, compute_grad)
    if grad is None:
        grad = student_logits.new_empty(0)
    return loss, stats, grad


@triton_logits.register_fake
def _(student_logits, teacher_logits, target_ids, coef, advantage, mode, alpha, temperature,
      topk, topk_from_teacher, tail, signal_clip, kl_clip, compute_grad):
    n = student_logits.shape[0]
    loss = student_logits.new_empty(n, dtype=torch.float32)
    stats = student_logits.new_empty(n, 4, dtype=torch.float32)
    grad = student_logits.new_empty(student_logits.shape) if compute_grad \
        else student_logits.new_empty(0)
    return loss, stats, grad
