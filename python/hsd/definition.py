"""The definition of the hindsight loss per token: pure PyTorch, differentiable, exact in float64.

Every backend in :mod:`hsd.backends` is tested against these functions (the ``reference``
backend runs them with autograd). Student distribution p_s = softmax(student logits / T),
teacher p_t = softmax(teacher logits / T) under stop-gradient; see :mod:`hsd.loss` for the modes.

Edge cases, as every backend must reproduce them:

* 0 * log 0 = 0: an entry with p = 0 (a -inf logit) adds nothing to p * log(p / q).
* p > 0 = q: p * log(p / q) is +inf even where p underflows in float32 (its log-probability is
  finite, so p > 0); a ``kl_clip`` then caps the token (0 * inf would be NaN and escape the cap).
* Top-k ties: the support is the first k entries of a *stable* descending sort of the ranking
  side's temperature-scaled logits, so among logits equal to the k-th largest the lower
  vocabulary ids are in the support (:func:`topk_support`).
* NaN logits give NaN.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .backends import SAMPLED, TOPK, DivergenceSpec

STAT_NAMES = ("student_logp", "teacher_logp", "advantage", "divergence")


def _plogratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q): 0 where p = 0, +inf where p > 0 = q; autograd-safe."""
    neg_inf = float("-inf")
    present = logp != neg_inf  # NaN stays NaN
    unbounded = present & (logq == neg_inf) & ~torch.isnan(logp)
    finite = present & ~unbounded
    safe_logp = torch.where(finite, logp, torch.zeros_like(logp))
    safe_logq = torch.where(finite, logq, torch.zeros_like(logq))
    value = safe_logp.exp() * (safe_logp - safe_logq)
    limit = torch.where(unbounded, torch.full_like(logp, float("inf")), torch.zeros_like(logp))
    return torch.where(finite, value, limit)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
               alpha: float) -> torch.Tensor:
    """Per-row divergence between two log-probability tensors (last dimension), TRL convention:
    alpha=0 KL(teacher || student), alpha=1 KL(student || teacher), in between the generalised
    JSD with the mixture m = (1 - alpha) p_s + alpha p_t."""
    if alpha == 0.0:
        return _plogratio(teacher_logp, student_logp).sum(-1)
    if alpha == 1.0:
        return _plogratio(student_logp, teacher_logp).sum(-1)
    # where both sides are -inf the mixture is unused; keep logaddexp's gradient finite there
    both_absent = (student_logp == float("-inf")) & (teacher_logp == float("-inf"))
    zero = torch.zeros_like(student_logp)
    mix_logp = torch.logaddexp(torch.where(both_absent, zero, student_logp) + math.log1p(-alpha),
                               torch.where(both_absent, zero, teacher_logp) + math.log(alpha))
    return ((1.0 - alpha) * _plogratio(student_logp, mix_logp).sum(-1)
            + alpha * _plogratio(teacher_logp, mix_logp).sum(-1))


def topk_support(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [N, k] of the top-k support: the first k of a stable descending sort (ties at the
    k-th rank go to the lower vocabulary id). ``torch.topk`` leaves ties unspecified."""
    return torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :k]


def _topk_bucket_logp(logp: torch.Tensor, ids: torch.Tensor, tail: bool) -> torch.Tensor:
    """Log-probabilities over the support ``ids`` (+ the tail bucket, or renormalised)."""
    support = logp.gather(-1, ids)
    if not tail:
        return support - torch.logsumexp(support, -1, keepdim=True)
    # the tail is the off-support mass summed directly (1 - sum p_topk cancels catastrophically)
    off_support = logp.scatter(-1, ids, float("-inf"))
    has_tail = (off_support != float("-inf")).any(-1, keepdim=True)  # an empty tail: no gradient
    tail_logp = torch.logsumexp(torch.where(has_tail, off_support, 0.0), -1, keepdim=True)
    return torch.cat([support, torch.where(has_tail, tail_logp, float("-inf"))], -1)


def reference_token_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          target_ids: Optional[torch.Tensor], spec: DivergenceSpec,
                          advantage: Optional[torch.Tensor] = None):
    """Per-token loss and stats by the definition; differentiable in ``student_logits``.

    Computes in float64 when given float64, else float32. Returns ``(token_loss [N], stats [N, 4])``
    with the stats columns named in :data:`STAT_NAMES` (all detached).
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    lp_s = torch.log_softmax(student_logits.to(dtype) / spec.temperature, -1)
    lp_t = torch.log_softmax(teacher_logits.detach().to(dtype) / spec.temperature, -1)
    n = lp_s.shape[0]
    if target_ids is not None:
        lp_s_y = lp_s.gather(-1, target_ids[:, None])[:, 0]
        lp_t_y = lp_t.gather(-1, target_ids[:, None])[:, 0]
    else:
        lp_s_y = lp_t_y = torch.zeros(n, dtype=dtype, device=lp_s.device)
    adv = (lp_t_y - lp_s_y).detach()
    if spec.mode == SAMPLED:
        a = advantage.to(dtype) if advantage is not None else adv
        if advantage is None and spec.signal_clip > 0:
            a = a.clamp(-spec.signal_clip, spec.signal_clip)
        token_loss = -a * lp_s_y
        div = -adv
    else:
        if spec.mode == TOPK:
            # ranked on the scaled logits themselves: subtracting the log-normaliser could round
            # near-ties into ties
            ranked = teacher_logits if spec.topk_from_teacher else student_logits
            ids = topk_support(ranked.detach().to(dtype) / spec.temperature, spec.topk)
            lp_s, lp_t = (_topk_bucket_logp(lp, ids, spec.tail) for lp in (lp_s, lp_t))
        div = divergence(lp_s, lp_t, spec.alpha)
        token_loss = div.clamp(max=spec.kl_clip) if spec.kl_clip > 0 else div
    stats = torch.stack([lp_s_y, lp_t_y, adv, div.detach()], -1)
    return token_loss, stats.detach()
