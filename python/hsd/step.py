"""One hindsight step: a model and a collated batch in, the loss and its statistics out.

:func:`hindsight_step` = :func:`hsd.forward.hindsight_hidden_states` (the shared-prefix pass)
+ :func:`hsd.loss.fused_hindsight_loss` with the model's own LM head (logits are never
materialised for all tokens). Use it from any training loop::

    out = hsd.hindsight_step(model, batch, loss_fn=hsd.HindsightLoss("sampled"))
    out.loss.backward()
    optimizer.step()

The data layout already drops the first ``ignore_first_k`` response tokens (its
``response_mask``), so the loss here runs with ``ignore_first_k=0`` unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .forward import EMATeacher, hindsight_hidden_states
from .loss import HindsightLoss

__all__ = ["StepOutput", "hindsight_step", "lm_head_of"]


@dataclass
class StepOutput:
    """The loss (a scalar with grad) and detached per-step statistics.

    ``stats``: ``mean_advantage`` (mean A_t over scored tokens), ``frac_positive_advantage``
    (fraction with A_t > 0), ``mean_divergence``, ``scored_tokens``. ``counts``: what the
    forward pass computed (see :class:`hsd.forward.HiddenStates`).
    """

    loss: torch.Tensor
    stats: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight [V, H], bias or None); refuses heads the fused loss cannot express."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(base).__name__} has no linear output embedding (get_output_embeddings())")
    transform = logit_transform(getattr(base, "config", None))
    if transform is not None:
        raise ValueError(f"{type(base).__name__} transforms its logits ({transform[0]}={transform[1]}); the fused "
                         "hindsight loss computes log-softmax of hidden @ weight.T and would score another "
                         "distribution")
    return head.weight, getattr(head, "bias", None)


def logit_transform(config) -> tuple[str, object] | None:
    """``(attribute, value)`` of the first setting in ``config`` by which the model changes its
    logits after the head (softcapping, scaling), or None. The fused loss scores
    log-softmax(hidden @ W.T), so a model with such a setting cannot be trained with it.
    A composite configuration (a vision-language model, say) is read through its text config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return name, value
    return None


def hindsight_step(
    model: nn.Module,
    batch: dict,
    loss_fn: HindsightLoss | None = None,
    *,
    teacher: str = "live",
    teacher_model: nn.Module | EMATeacher | None = None,
    strategy: str = "auto",
    **loss_overrides,
) -> StepOutput:
    """Hindsight-distillation loss of ``model`` on one collated ``batch``.

    Args:
        model: a Hugging Face causal LM (or a peft model wrapping one).
        batch: from :class:`hsd.data.HindsightCollator` (per-tuple or packed layout).
        loss_fn: a :class:`hsd.HindsightLoss` (default: the paper's sampled estimator).
        teacher, teacher_model, strategy: see :func:`hsd.forward.hindsight_hidden_states`.
        loss_overrides: per-call options for the loss (``reduction``, ``num_items``, ...).
    """
    loss_fn = loss_fn if loss_fn is not None else HindsightLoss("sampled")
    hs = hindsight_hidden_states(model, batch, teacher=teacher, teacher_model=teacher_model, strategy=strategy)
    weight, bias = lm_head_of(model)
    teacher_weight = teacher_bias = None
    if teacher_model is not None:
        teacher_weight, teacher_bias = lm_head_of(teacher_model.module if isinstance(teacher_model, EMATeacher)
                                                  else teacher_model)
        teacher_weight = teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    options = {"ignore_first_k": 0, **loss_overrides}
    loss, info = loss_fn(hs.student, hs.teacher, weight, hs.target_ids.to(weight.device), bias=bias,
                         teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                         seq_ids=hs.seq_ids, return_stats=True, **options)
    mask = info["mask"]
    advantage = info["advantage"][mask].float()
    divergence = info["divergence"][mask].float()
    stats = {
        "mean_advantage": float(advantage.mean()) if advantage.numel() else 0.0,
        "frac_positive_advantage": float((advantage > 0).float().mean()) if advantage.numel() else 0.0,
        "mean_divergence": float(divergence.mean()) if divergence.numel() else 0.0,
        "scored_tokens": int(mask.sum()),
    }
    return StepOutput(loss, stats, hs.counts)
