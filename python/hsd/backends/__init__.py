"""Kernel backends for the hindsight loss, behind one dispatch point.

Every backend implements the same two functions (the *kernel contract*); ``hsd.loss`` owns the
reductions, centring and autograd, and calls a backend only through :func:`select_backend`.

``fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
coef, advantage, spec, needs)``
    student_hidden, teacher_hidden: [N, H]; weight: [V, H]; bias: [V] or None; teacher_weight /
    teacher_bias: the teacher's head, always given (it may be the same tensor as ``weight``;
    teacher_bias None = no bias), never differentiated; target_ids: [N] int64 or None; coef: [N]
    float32 per-token gradient weights (0 = the token is skipped and its gradient row is exactly
    0); advantage: [N] float32 or None (sampled mode: use these A_t instead of the computed ones);
    needs: a :class:`GradNeeds` saying which gradients to compute.
    Returns ``(token_loss [N] f32, stats [N, 4] f32, grad_hidden, grad_weight, grad_bias)``; the
    gradients are those of ``sum_i coef_i * token_loss_i`` (grad_weight / grad_bias in float32).
    A gradient whose ``needs`` flag is False is None and its work is skipped: no [V, H] buffer or
    GEMM without ``needs.weight``, no gradient pass at all without ``needs.any``; grad_bias is
    also None when bias is None.
``fused_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
target_ids, coef, seq_ids, spec, needs)`` (optional; sampled mode with ``center=True``)
    As ``fused``, with a_t = clip(A_t - mean of A over the coef != 0 tokens of t's sequence,
    +-spec.signal_clip) in place of the given advantage; seq_ids: [N] int64 sequence ids.
    Returns ``fused``'s five outputs plus the advantage a_t [N] (0 where coef is 0). Backends
    cut their chunks at sequence boundaries, so a chunk of whole sequences knows its means after
    its own forward and needs no second pass; only the rows of sequences that do not fit a chunk
    are read twice. A backend without it gets ``hsd.loss``'s generic two-pass treatment; one
    whose module sets ``CENTRED_TRACEABLE = True`` keeps it under ``torch.compile``.
``logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad)``
    The same from [N, V] logits; returns ``(token_loss, stats, grad_student_logits)``, the
    gradient None when ``compute_grad`` is False.

Per token, with s = student logits / T and t = teacher logits / T, lp = log_softmax:
    stats[:, 0] = lp_s[y], stats[:, 1] = lp_t[y], stats[:, 2] = A = lp_t[y] - lp_s[y]
    (zeros without targets), stats[:, 3] = the per-token divergence (sampled: the one-sample
    estimate -A of the reverse KL; full / topk: D before kl_clip).
    sampled: a = advantage if given, else clamp(A, +-signal_clip); token_loss = -a * lp_s[y].
    full / topk: token_loss = min(D, kl_clip), D from :func:`hsd.definition.divergence`.
Top-k tail bucket: P_tail = the sum of the off-support probabilities (summed directly, not as
1 - sum over the support, which cancels catastrophically when the support holds nearly all mass).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

logger = logging.getLogger("hsd")

SAMPLED, FULL, TOPK = 0, 1, 2
MODES = {"sampled": SAMPLED, "full": FULL, "topk": TOPK}
BACKEND_NAMES = ("reference", "torch", "cpu", "triton", "cuda")


class GradNeeds(NamedTuple):
    """Which gradients a ``fused`` call must compute (the others are None and cost nothing).

    ``hsd.loss`` derives them from autograd: a frozen LM head (``weight.requires_grad=False``,
    the LoRA case) asks for no weight gradient, ``torch.no_grad()`` for none at all.
    """

    hidden: bool = True
    weight: bool = True
    bias: bool = True

    @property
    def any(self) -> bool:
        """Whether any gradient is needed (else the call is a pure forward)."""
        return self.hidden or self.weight or self.bias


NO_GRAD = GradNeeds(False, False, False)


def as_needs(needs) -> GradNeeds:
    """``needs`` as a :class:`GradNeeds`; a plain bool means every gradient or none."""
    if isinstance(needs, GradNeeds):
        return needs
    flag = bool(needs)
    return GradNeeds(flag, flag, flag)


@dataclass(frozen=True)
class DivergenceSpec:
    """What a kernel computes per token (everything except reductions and centring)."""

    mode: int = SAMPLED
    alpha: float = 1.0
    temperature: float = 1.0
    topk: int = 0
    topk_from_teacher: bool = False
    tail: bool = True
    signal_clip: float = 0.0  # <= 0: no clip
    kl_clip: float = 0.0  # <= 0: no clip

    def op_args(self) -> tuple:
        """The scalar arguments of the compiled ops, in their schema's order."""
        return (int(self.mode), float(self.alpha), float(self.temperature), int(self.topk),
                bool(self.topk_from_teacher), bool(self.tail), float(self.signal_clip),
                float(self.kl_clip))


def centred_advantage(stats, coef, dense, num_seqs: int, signal_clip: float):
    """Per-sequence mean-centred (then clipped) A_t from a pass's statistics [N, 4]: the mean of
    A over each sequence's valid (coef != 0) rows, ``dense`` [N] the sequence index in
    [0, num_seqs) of each row. A constant: the mean is a stop-gradient statistic. Shared by
    hsd.loss's generic two-pass centring and the torch backend's ``fused_centred``."""
    adv = stats[:, 2]
    valid = (coef != 0).to(adv.dtype)
    zeros = torch.zeros(num_seqs, dtype=adv.dtype, device=adv.device)
    total = zeros.scatter_add(0, dense, torch.where(coef != 0, adv, torch.zeros_like(adv)))
    count = zeros.scatter_add(0, dense, valid).clamp_min(1)
    centred = adv - (total / count)[dense]
    return centred.clamp(-signal_clip, signal_clip) if signal_clip > 0 else centred


def _load(name: str):
    """Import a backend module by name; None when it cannot run in this environment."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown hsd backend {name!r}; expected one of {BACKEND_NAMES}")
    module = {"torch": "torch_chunked", "triton": "triton_backend", "cuda": "cuda_backend"}.get(name, name)
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as err:  # an optional dependency (triton) is missing
        logger.debug("hsd backend %s unavailable: %s", name, err)
        return None
    return mod if mod.is_available() else None


def available_backends() -> list[str]:
    """Names of the backends usable in this process."""
    return [n for n in BACKEND_NAMES if _load(n) is not None]


_MODULES: dict = {}  # backend name -> module, filled by _resolve


@torch.compiler.assume_constant_result
def _resolve(device_type: str, requested: Optional[str]) -> str:
    """The name of the backend for ``device_type`` (imports and checks it; raises when a forced
    one is unusable). Under ``torch.compile`` it runs once, eagerly, while tracing, and its
    result is a constant of the graph: ``importlib`` cannot be traced."""
    device = torch.device(device_type)
    requested = requested or os.environ.get("HSD_BACKEND") or None
    if requested:
        if requested not in BACKEND_NAMES:
            raise ValueError(f"HSD_BACKEND={requested!r} is not one of {BACKEND_NAMES}")
        mod = _load(requested)
        if mod is None:
            raise RuntimeError(f"hsd backend {requested!r} is not available here "
                               f"(available: {available_backends()})")
        if not mod.supports(device):
            raise RuntimeError(f"hsd backend {requested!r} cannot run on {device} tensors")
        _MODULES[requested] = mod
        return requested
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for name in order + ("reference",):
        mod = _load(name)
        if mod is not None and mod.supports(device):
            _MODULES[name] = mod
            return name
    raise RuntimeError(f"no hsd backend supports {device} tensors")  # unreachable: reference


def select_backend(device: torch.device, requested: Optional[str] = None):
    """The one dispatch point: returns the backend module for tensors on ``device``.

    ``requested`` (or the ``HSD_BACKEND`` environment variable) forces a backend and raises a
    clear error when it is unavailable. Otherwise the fastest available one for the device.
    Under ``torch.compile`` the choice is made when the graph is traced (changing
    ``HSD_BACKEND`` afterwards takes a recompile).
    """
    return _MODULES[_resolve(torch.device(device).type, requested)]
