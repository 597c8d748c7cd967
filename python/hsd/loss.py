"""The hindsight self-distillation loss: the math, its reductions, and the dispatch to kernels.

Student distribution p_s = softmax(student logits / T), teacher p_t = softmax(teacher logits / T)
under stop-gradient. Three per-token objectives (``mode``):

* ``"sampled"`` (the paper's default): A_t = log p_t(y_t) - log p_s(y_t); loss_t = -sg(A_t) *
  log p_s(y_t). Needs ``target_ids`` (the logged response tokens).
* ``"full"``: a divergence over the whole vocabulary, TRL's alpha convention: alpha=0 forward
  KL(p_t || p_s), alpha=1 reverse KL(p_s || p_t), 0<alpha<1 the generalised JSD with
  m = (1-alpha) p_s + alpha p_t: D = (1-alpha) KL(p_s || m) + alpha KL(p_t || m).
* ``"topk"``: the same divergence on the top-k support of ``topk_support``'s logits (the other
  side gathered at those ids), plus a tail bucket log(1 - sum p_topk) on both sides
  (``tail=True``; computed as the log of the off-support mass) or both renormalised over the
  support (``tail=False``).

The float64-exact definition is :mod:`hsd.definition` (:func:`divergence`,
:func:`reference_token_terms`, re-exported here); every backend in :mod:`hsd.backends` is tested
against it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .backends import (MODES, NO_GRAD, SAMPLED, DivergenceSpec, GradNeeds, centred_advantage,
                       select_backend)
from .definition import STAT_NAMES, divergence, reference_token_terms, topk_support  # noqa: F401

logger = logging.getLogger("hsd")

REDUCTIONS = ("seq_mean", "token_mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# Validation and per-token coefficients (reductions, masks, ignore_first_k, centring)
# ----------------------------------------------------------------------------------------------
def _spec_from_kwargs(mode, alpha, topk, topk_support, tail, temperature, signal_clip, kl_clip,
                      vocab_size, has_targets) -> DivergenceSpec:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if topk_support not in ("student", "teacher"):
        raise ValueError(f"topk_support must be 'student' or 'teacher', got {topk_support!r}")
    if mode == "sampled" and not has_targets:
        raise ValueError("mode='sampled' needs target_ids (the logged response tokens)")
    if mode == "topk":
        if topk is None or int(topk) < 1:
            raise ValueError(f"mode='topk' needs topk >= 1, got {topk}")
        if int(topk) > vocab_size:
            raise ValueError(f"topk={topk} exceeds the vocabulary size {vocab_size}")
    for name, value in (("signal_clip", signal_clip), ("kl_clip", kl_clip)):
        if value is not None and not float(value) > 0.0:
            raise ValueError(f"{name} must be > 0 or None, got {value}")
    return DivergenceSpec(mode=MODES[mode], alpha=float(alpha), temperature=float(temperature),
                          topk=int(topk or 0), topk_from_teacher=topk_support == "teacher",
                          tail=bool(tail), signal_clip=float(signal_clip or 0.0),
                          kl_clip=float(kl_clip or 0.0))


def _check_tensor(name, t, ndim, device, dtype=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the student input is on {device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the student input has {dtype}")


def _prepare_targets(target_ids, n, vocab_size, device, ignore_index):
    """Validated int64 targets with ignored positions replaced by 0, and the ignore mask."""
    if target_ids is None:
        return None, None
    _check_tensor("target_ids", target_ids, 1, device)
    if target_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if target_ids.shape[0] != n:
        raise ValueError(f"target_ids has {target_ids.shape[0]} entries for {n} tokens")
    target_ids = target_ids.long()
    ignored = target_ids == ignore_index
    # one host sync: an out-of-range id would otherwise be a device-side assert in a kernel
    out_of_range = ~ignored & ((target_ids < 0) | (target_ids >= vocab_size))
    if not torch.compiler.is_compiling() and bool(out_of_range.any()):
        bad = target_ids[out_of_range][0].item()
        raise ValueError(f"target id {bad} is out of range for a vocabulary of {vocab_size}")
    return torch.where(ignored, torch.zeros_like(target_ids), target_ids), ignored


def _segments(seq_ids, n, device):
    """Dense sequence index per token (0..S-1, in the order of the ids) and a bound on S.

    No data-dependent shapes (``torch.unique`` would break a ``torch.compile`` graph): the
    per-sequence buffers get ``n`` slots, of which the first S are used.
    """
    if seq_ids is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1
    _check_tensor("seq_ids", seq_ids, 1, device)
    if seq_ids.shape[0] != n:
        raise ValueError(f"seq_ids has {seq_ids.shape[0]} entries for {n} tokens")
    if seq_ids.is_floating_point():
        raise TypeError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    order = torch.argsort(seq_ids, stable=True)
    ordered = seq_ids[order]
    starts = torch.ones(n, dtype=torch.long, device=device)
    starts[1:] = (ordered[1:] != ordered[:-1]).long()
    dense = torch.empty_like(starts).scatter_(0, order, starts.cumsum(0) - 1)
    return dense, max(n, 1)


def _token_weights(n, device, acc_dtype, weights, ignored, dense, num_seqs, ignore_first_k):
    """Per-token weights (``acc_dtype``) after masks, ignored targets and ignore_first_k."""
    if weights is None:
        w = torch.ones(n, dtype=acc_dtype, device=device)
    else:
        _check_tensor("weights", weights, 1, device)
        if weights.shape[0] != n:
            raise ValueError(f"weights has {weights.shape[0]} entries for {n} tokens")
        w = weights.to(acc_dtype)
    if ignored is not None:
        w = torch.where(ignored, torch.zeros_like(w), w)
    if ignore_first_k:
        # rank of each weighted token within its sequence, in index order
        valid = (w != 0).long()
        order = torch.argsort(dense, stable=True)
        per_seq = torch.zeros(num_seqs, dtype=torch.long, device=device).scatter_add_(0, dense, valid)
        start = per_seq.cumsum(0) - per_seq
        rank_sorted = valid[order].cumsum(0) - 1 - start[dense[order]]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        w = torch.where(rank < ignore_first_k, torch.zeros_like(w), w)
    return w


def _reduction_coef(w, dense, num_seqs, reduction, num_items):
    """Coefficient c_i such that the reduced loss is sum_i c_i * token_loss_i."""
    if reduction == "seq_mean":
        per_seq = torch.zeros(num_seqs, dtype=w.dtype, device=w.device).scatter_add_(0, dense, w)
        live_seqs = (per_seq != 0).sum().clamp_min(1)
        denom = per_seq[dense] * live_seqs
        return torch.where(w != 0, w / torch.where(denom != 0, denom, torch.ones_like(denom)), w)
    if reduction == "token_mean":
        denom = torch.as_tensor(num_items, dtype=w.dtype, device=w.device) if num_items is not None \
            else w.sum()
        return w / torch.where(denom != 0, denom, torch.ones_like(denom))
    return w  # "sum" and "none"


# ----------------------------------------------------------------------------------------------
# Autograd: backends return the gradient of sum_i coef_i * token_loss_i with the forward
# ----------------------------------------------------------------------------------------------
def _grad_needs(*inputs) -> GradNeeds:
    """Which gradients autograd will ask for, of (hidden or logits, weight, bias): an input that
    requires grad, under grad mode (a frozen head or ``torch.no_grad()`` asks for less)."""
    if not torch.is_grad_enabled():
        return NO_GRAD
    flags = tuple(t is not None and t.requires_grad for t in inputs)
    return GradNeeds(*(flags + (False,) * (3 - len(flags))))


_NO_DOUBLE_BACKWARD = (
    "hsd's loss has no second derivative: its backward returns precomputed first-order "
    "gradients, so backward(create_graph=True) / autograd.grad(create_graph=True) through it "
    "would silently drop the second-order term. Differentiate it once (create_graph=False); "
    "for higher derivatives use the definition, hsd.reference_token_terms, on materialised "
    "logits (plain autograd).")


class _HindsightFunction(torch.autograd.Function):
    """Calls ``run(coef, advantage, needs)``; differentiable inputs are ``diff_inputs``.

    ``needs`` (decided by the caller: requires_grad under grad mode) says which gradients the
    backend computes. For a scalar loss the backend returns them with the forward; they are kept
    on ctx (not saved tensors) and scaled in place, so autograd adopts them as ``.grad`` without
    a copy (the [V, H] weight gradient is the largest buffer of the whole loss).
    """

    @staticmethod
    def forward(ctx, run, needs, per_token, coef, advantage, *diff_inputs):
        token_loss, stats, *grads = run(coef, advantage, NO_GRAD if per_token else needs)
        weighted = torch.where(coef != 0, coef * token_loss, torch.zeros_like(token_loss))
        out = weighted if per_token else weighted.sum()
        ctx.run, ctx.needs, ctx.per_token = run, needs, per_token
        ctx.grads = None if per_token else grads
        ctx.dtypes = [t.dtype for t in diff_inputs]
        ctx.save_for_backward(coef, advantage)
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        coef, advantage = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # per-token loss, or a second backward: recompute with coef = g
            weights = coef * (grad_out if ctx.per_token else grad_out.expand_as(coef)).to(coef.dtype)
            _, _, *grads = ctx.run(weights, advantage, ctx.needs)
        else:
            grads = [g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads]
        result = [None] * 5
        for g, needed, dtype in zip(grads, ctx.needs, ctx.dtypes):
            result.append(g.to(dtype) if needed and g is not None else None)
        return tuple(result)


def _apply(run, needs, reduction, coef, advantage, diff_inputs):
    """The weighted loss (scalar, or per token for reduction='none') and the statistics."""
    per_token = reduction == "none"
    if not needs.any:  # a pure forward: no autograd node, no gradient work
        token_loss, stats, *_ = run(coef, advantage, NO_GRAD)
        weighted = torch.where(coef != 0, coef * token_loss, torch.zeros_like(token_loss))
        return (weighted if per_token else weighted.sum()), stats
    return _HindsightFunction.apply(run, needs, per_token, coef, advantage, *diff_inputs)


def _finish(out, stats, coef, return_stats, dtype):
    """The loss in the input dtype (every reduction, 'none' included) and the stats dict."""
    out = out.to(dtype)
    if not return_stats:
        return out
    mask = coef != 0
    # masked tokens are skipped by the kernels: their statistics are 0, never computed
    stats = torch.where(mask[:, None], stats, torch.zeros_like(stats))
    info = {name: stats[:, i] for i, name in enumerate(STAT_NAMES)}
    info["mask"] = mask
    return out, info


def _valid_rows(coef):
    """Indices of the tokens with a non-zero coefficient, or None to run on every row (all are
    valid, or compiling: compaction has a data-dependent shape). One host sync."""
    if torch.compiler.is_compiling():
        return None
    rows = torch.nonzero(coef).squeeze(1)
    # none masked, or all (every backend handles zero-coefficient rows; not every one 0 rows)
    return None if rows.numel() in (0, coef.numel()) else rows


def _scatter_rows(x, rows, n):
    """Rows of a compacted result back at their token positions (zeros elsewhere)."""
    if rows is None or x is None:
        return x
    return x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, rows, x)


def _centred_op(impl):
    """The backend's one-pass centring (``fused_centred``), or None for the generic two-pass
    treatment: the backend has none, or plans its chunks on the host and is being compiled."""
    op = getattr(impl, "fused_centred", None)
    if op is not None and torch.compiler.is_compiling() and not getattr(impl, "CENTRED_TRACEABLE",
                                                                        False):
        return None
    return op


def _check_finite(**tensors):
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
_DOC_OPTIONS = """
    Keyword arguments (shared by :func:`hindsight_loss` and :func:`fused_hindsight_loss`):
        mode: ``"sampled"`` (paper default), ``"full"`` or ``"topk"`` (see :mod:`hsd.loss`).
        alpha: divergence interpolation in [0, 1]: 0 forward KL(teacher||student), 1 reverse
            KL(student||teacher), in between the generalised JSD. Unused in sampled mode.
        topk, topk_support, tail: top-k support size, whose logits pick it ("student" or
            "teacher"), and whether to add the tail bucket (else renormalise on the support).
        temperature: divides both logits.
        weights: [N] per-token weights / mask (0 drops a token).
        seq_ids: [N] sequence index of each token (any integers; default: one sequence).
        ignore_first_k: drop the first k weighted tokens of each sequence (paper: 2).
        signal_clip: clamp A_t to +-c (sampled mode). center: subtract each sequence's mean A_t
            over its valid tokens before clipping (sampled mode). The mean is a stop-gradient
            statistic; with the cpu and torch backends a sequence that fits a chunk of rows
            (cpu: max(256, 2^23 / V) rows, HSD_CPU_CHUNK_ROWS) costs one pass, as without
            centring, and a longer one (or one split into several runs of rows) reads its rows
            twice when the head is trainable.
        kl_clip: cap the per-token divergence (full / topk modes; capped tokens get no gradient).
        reduction: ``"seq_mean"`` (token mean per sequence, then mean over sequences: the paper),
            ``"token_mean"`` (sum / sum of weights, or / ``num_items`` across accumulation steps
            and ranks), ``"sum"`` or ``"none"`` (per-token [N], zero where masked). A batch with
            no valid token gives 0.
        ignore_index: target id marking a token to skip (default -100, as HF labels).
        return_stats: also return a dict of detached per-token ``student_logp``,
            ``teacher_logp``, ``advantage`` (raw A_t), ``divergence`` and ``mask``.
        check_inputs: raise on NaN inputs (one device sync); by default NaN gives a NaN loss.
        backend: force a backend (else ``HSD_BACKEND`` or the fastest available; resolved when
            a ``torch.compile`` graph is traced).
    The teacher side never receives a gradient, even when it shares the student's weight.
    Only the gradients autograd will ask for are computed: none under ``torch.no_grad()`` or
    ``torch.inference_mode()``, no [V, H] weight gradient for a frozen head. The loss has the
    dtype of the student input for every reduction ("none" included; computed in float32, or
    float64 for float64 inputs); the stats are float32 (float64) and 0 for masked tokens. The
    loss has no second derivative: backward(create_graph=True) through it raises.
"""


def hindsight_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   target_ids: Optional[torch.Tensor] = None, *, mode: str = "sampled",
                   alpha: float = 1.0, topk: Optional[int] = None, topk_support: str = "student",
                   tail: bool = True, temperature: float = 1.0,
                   weights: Optional[torch.Tensor] = None, seq_ids: Optional[torch.Tensor] = None,
                   ignore_first_k: int = 0, signal_clip: Optional[float] = None,
                   center: bool = False, kl_clip: Optional[float] = None,
                   reduction: str = "seq_mean", num_items=None, return_stats: bool = False,
                   ignore_index: int = -100, check_inputs: bool = False,
                   backend: Optional[str] = None):
    """Hindsight loss from student and teacher logits [N, V] (teacher under stop-gradient)."""
    _check_tensor("student_logits", student_logits, 2, student_logits.device)
    device, dtype = student_logits.device, student_logits.dtype
    _check_tensor("teacher_logits", teacher_logits, 2, device, dtype)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    n, vocab = student_logits.shape
    if check_inputs:
        _check_finite(student_logits=student_logits, teacher_logits=teacher_logits)
    spec, targets, coef, dense, num_seqs = _common(
        n, vocab, device, dtype, target_ids, mode, alpha, topk, topk_support, tail, temperature,
        weights, seq_ids, ignore_first_k, signal_clip, kl_clip, reduction, num_items, ignore_index)
    impl = select_backend(device, backend)
    teacher_logits = teacher_logits.detach()
    needs = _grad_needs(student_logits)

    # no row compaction here: gathering the valid rows would copy [N', V] logits, about what the
    # row kernels cost; they skip the gradient of a masked row already
    def run(c, advantage, needs):
        return impl.logits(student_logits, teacher_logits, targets, c, advantage, spec,
                           needs.hidden)

    advantage = None
    if center and spec.mode == SAMPLED:
        with torch.no_grad():
            _, stats, _ = run(coef, None, NO_GRAD)
        advantage = centred_advantage(stats, coef, dense, num_seqs, spec.signal_clip)
    out, stats = _apply(run, needs, reduction, coef, advantage, (student_logits,))
    return _finish(out, stats, coef, return_stats, dtype)


def _common(n, vocab, device, dtype, target_ids, mode, alpha, topk, topk_support, tail, temperature,
            weights, seq_ids, ignore_first_k, signal_clip, kl_clip, reduction, num_items,
            ignore_index):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None and reduction != "token_mean":
        raise ValueError("num_items is only meaningful with reduction='token_mean'")
    if int(ignore_first_k) < 0:
        raise ValueError(f"ignore_first_k must be >= 0, got {ignore_first_k}")
    if isinstance(weights, torch.Tensor) and weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("weights requires grad, but the loss is not differentiated with respect "
                         "to the token weights (they would get no gradient); pass "
                         "weights.detach()")
    spec = _spec_from_kwargs(mode, alpha, topk, topk_support, tail, temperature, signal_clip,
                             kl_clip, vocab, target_ids is not None)
    targets, ignored = _prepare_targets(target_ids, n, vocab, device, ignore_index)
    dense, num_seqs = _segments(seq_ids, n, device)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = _token_weights(n, device, acc_dtype, weights, ignored, dense, num_seqs, int(ignore_first_k))
    coef = _reduction_coef(w, dense, num_seqs, reduction, num_items)
    return spec, targets, coef, dense, num_seqs


def fused_hindsight_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                         weight: torch.Tensor, target_ids: Optional[torch.Tensor] = None, *,
                         bias: Optional[torch.Tensor] = None,
                         teacher_weight: Optional[torch.Tensor] = None,
                         teacher_bias: Optional[torch.Tensor] = None, mode: str = "sampled",
                         alpha: float = 1.0, topk: Optional[int] = None,
                         topk_support: str = "student", tail: bool = True,
                         temperature: float = 1.0, weights: Optional[torch.Tensor] = None,
                         seq_ids: Optional[torch.Tensor] = None, ignore_first_k: int = 0,
                         signal_clip: Optional[float] = None, center: bool = False,
                         kl_clip: Optional[float] = None, reduction: str = "seq_mean",
                         num_items=None, return_stats: bool = False, ignore_index: int = -100,
                         check_inputs: bool = False, backend: Optional[str] = None):
    """Hindsight loss from hidden states [N, H] and the LM head ``weight`` [V, H] (+ ``bias``).

    Logits are computed in chunks and never materialised for all N tokens at once (except by the
    ``reference`` backend). ``teacher_weight`` / ``teacher_bias`` give the teacher its own head
    (e.g. an EMA copy); by default it shares the student's. Gradients reach ``student_hidden``,
    ``weight`` and ``bias`` through the student side only.
    """
    _check_tensor("student_hidden", student_hidden, 2, student_hidden.device)
    device, dtype = student_hidden.device, student_hidden.dtype
    _check_tensor("teacher_hidden", teacher_hidden, 2, device, dtype)
    _check_tensor("weight", weight, 2, device, dtype)
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} differ in shape")
    n, hidden = student_hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden}")
    if teacher_weight is not None:
        _check_tensor("teacher_weight", teacher_weight, 2, device, dtype)
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight {tuple(teacher_weight.shape)} differs from weight "
                             f"{tuple(weight.shape)} (vocabulary or hidden size mismatch)")
    for name, b in (("bias", bias), ("teacher_bias", teacher_bias)):
        if b is not None:
            _check_tensor(name, b, 1, device, dtype)
            if b.shape[0] != vocab:
                raise ValueError(f"{name} has {b.shape[0]} entries for a vocabulary of {vocab}")
    if check_inputs:
        _check_finite(student_hidden=student_hidden, teacher_hidden=teacher_hidden, weight=weight,
                      bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    spec, targets, coef, dense, num_seqs = _common(
        n, vocab, device, dtype, target_ids, mode, alpha, topk, topk_support, tail, temperature,
        weights, seq_ids, ignore_first_k, signal_clip, kl_clip, reduction, num_items, ignore_index)
    impl = select_backend(device, backend)
    needs = _grad_needs(student_hidden, weight, bias)
    # the teacher shares the student's head unless given its own (weight, and bias with it)
    t_weight = (weight if teacher_weight is None else teacher_weight).detach()
    t_bias = teacher_bias if teacher_bias is not None else (bias if teacher_weight is None else None)
    t_bias = t_bias.detach() if t_bias is not None else None
    # masked tokens cost nothing: the backend sees the valid rows only (not while compiling)
    rows = _valid_rows(coef)
    pick = (lambda x: x if rows is None or x is None else x[rows])
    h, th, y = pick(student_hidden.detach()), pick(teacher_hidden.detach()), pick(targets)

    def run(c, advantage, needs, student_only=False):
        if student_only:
            # the advantage is given, so the teacher's logits only feed statistics already
            # known: both sides get the student's inputs, which backends run as one GEMM
            teacher = (h, weight.detach(), None if bias is None else bias.detach())
        else:
            teacher = (th, t_weight, t_bias)
        loss, stats, grad_h, grad_w, grad_b = impl.fused(
            h, teacher[0], weight, bias, teacher[1], teacher[2], y, pick(c), pick(advantage),
            spec, needs)
        return (_scatter_rows(loss, rows, n), _scatter_rows(stats, rows, n),
                _scatter_rows(grad_h, rows, n), grad_w, grad_b)

    run_main, advantage = run, None
    centred_op = _centred_op(impl) if center and spec.mode == SAMPLED else None
    if centred_op is not None:
        # The backend centres in its chunk loop: chunks cut at sequence boundaries know their
        # means after their own forward (one pass, as without centring); only sequences longer
        # than a chunk take a second pass, over their rows alone.
        known = {}

        def run_main(c, advantage, needs):
            if "advantage" in known:  # a per-token backward: the advantage is known now
                return run(c, known["advantage"], needs, student_only=True)
            loss, stats, grad_h, grad_w, grad_b, adv = centred_op(
                h, th, weight, bias, t_weight, t_bias, y, pick(c), pick(dense), spec, needs)
            known["advantage"] = _scatter_rows(adv, rows, n)
            return (_scatter_rows(loss, rows, n), _scatter_rows(stats, rows, n),
                    _scatter_rows(grad_h, rows, n), grad_w, grad_b)
    elif center and spec.mode == SAMPLED:
        # The per-sequence mean of A_t is a stop-gradient statistic, known only once every row
        # has been through the forward. grad_hidden's rows are linear in the advantage: a first
        # pass with a_t = 1 gives them and the statistics, scaled per row once the centred a_t is
        # known. grad_weight sums over rows, so it takes a second pass (the student's logits
        # again, no teacher GEMM); a frozen head (the LoRA case) takes none.
        with torch.no_grad():
            unit_loss, centred_stats, unit_grad_h, _, _ = run(
                coef, torch.ones_like(coef), GradNeeds(needs.hidden, False, False))
        advantage = centred_advantage(centred_stats, coef, dense, num_seqs, spec.signal_clip)

        def run_main(c, advantage, needs):
            grad_h = grad_w = grad_b = None
            if needs.hidden:
                # c = coef in the forward; coef * incoming gradient in a per-token backward
                scale = torch.where(coef != 0, c / torch.where(coef != 0, coef, 1.0), 0.0)
                grad_h = (unit_grad_h.to(scale.dtype) * (scale * advantage)[:, None]).to(
                    unit_grad_h.dtype)
            if needs.weight or needs.bias:
                _, _, _, grad_w, grad_b = run(c, advantage, GradNeeds(False, needs.weight,
                                                                      needs.bias),
                                              student_only=True)
            return advantage * unit_loss, centred_stats, grad_h, grad_w, grad_b

    diff_inputs = (student_hidden, weight) if bias is None else (student_hidden, weight, bias)
    out, stats = _apply(run_main, needs, reduction, coef, advantage, diff_inputs)
    return _finish(out, stats, coef, return_stats, dtype)


hindsight_loss.__doc__ += _DOC_OPTIONS
fused_hindsight_loss.__doc__ += _DOC_OPTIONS


class HindsightLoss(nn.Module):
    """The fused hindsight loss as a module holding its options; call it with the LM head.

    Example::

        loss_fn = hsd.HindsightLoss(mode="sampled", ignore_first_k=2)
        loss = loss_fn(student_hidden, teacher_hidden, model.lm_head.weight, target_ids,
                       seq_ids=seq_ids)
    """

    def __init__(self, mode: str = "sampled", **options):
        super().__init__()
        self.mode = mode
        self.options = options
        # fail at construction, not at the first step, on bad options
        _spec_from_kwargs(mode, options.get("alpha", 1.0), options.get("topk"),
                          options.get("topk_support", "student"), options.get("tail", True),
                          options.get("temperature", 1.0), options.get("signal_clip"),
                          options.get("kl_clip"), vocab_size=1 << 62, has_targets=True)
        if options.get("reduction", "seq_mean") not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}")

    def forward(self, student_hidden, teacher_hidden, weight, target_ids=None, *, bias=None,
                teacher_weight=None, teacher_bias=None, **overrides):
        options = {"mode": self.mode, **self.options, **overrides}
        return fused_hindsight_loss(student_hidden, teacher_hidden, weight, target_ids, bias=bias,
                                    teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                                    **options)

    def extra_repr(self) -> str:
        return ", ".join([f"mode={self.mode!r}"] + [f"{k}={v!r}" for k, v in self.options.items()])
