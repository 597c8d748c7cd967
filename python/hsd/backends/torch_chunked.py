"""Portable backend: the kernel contract in plain PyTorch with analytic gradients.

Runs on any device. The fused form walks the tokens in chunks, so extra memory is
O(chunk x V); it is the readable specification the compiled kernels mirror, and the fallback
when they are missing.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import FULL, SAMPLED, TOPK, as_needs, centred_advantage

name = "torch"
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (x ~8 temporaries of 4 bytes)


def is_available() -> bool:
    return True


def supports(device: torch.device) -> bool:
    return True


def _plogratio(logp, logq):
    """p * (log p - log q): 0 where p = 0, +inf where p > 0 = q (even if p underflows)."""
    neg_inf = float("-inf")
    present = logp != neg_inf  # NaN stays NaN
    unbounded = present & (logq == neg_inf) & ~torch.isnan(logp)
    value = torch.where(present, logp.exp() * (logp - logq), torch.zeros_like(logp))
    return torch.where(unbounded, torch.full_like(value, float("inf")), value)


def topk_ids(ranked, k):
    """The definition's top-k support (:func:`hsd.definition.topk_support`: ties at the k-th rank
    go to the lower ids) without a sort over V: all entries above the k-th largest value, then
    the lowest ids among those equal to it."""
    kth = ranked.topk(k, -1).values[:, -1:]
    above = ranked > kth
    tied = ranked == kth
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    return chosen.to(torch.uint8).topk(k, -1).indices  # exactly k entries are chosen


def _divergence_and_slope(lp, lq, alpha):
    """Per-row divergence D and H = p * dD/dp (the slope in log-probability coordinates).

    H omits terms proportional to p, which cancel in every chain rule below (sum p = 1).
    """
    if alpha == 0.0:
        return _plogratio(lq, lp).sum(-1), -lq.exp()
    if alpha == 1.0:
        slope = _plogratio(lp, lq)
        return slope.sum(-1), slope
    lm = torch.logaddexp(lp + math.log1p(-alpha), lq + math.log(alpha))
    slope = (1.0 - alpha) * _plogratio(lp, lm)
    return slope.sum(-1) + alpha * _plogratio(lq, lm).sum(-1), slope


def token_terms(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    """The contract on a block of logits: (token_loss, stats, grad wrt student logits or None)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    lp_s = torch.log_softmax(student_logits.to(dtype) / spec.temperature, -1)
    lp_t = torch.log_softmax(teacher_logits.to(dtype) / spec.temperature, -1)
    n = lp_s.shape[0]
    if target_ids is not None:
        lp_s_y = lp_s.gather(1, target_ids[:, None])[:, 0]
        lp_t_y = lp_t.gather(1, target_ids[:, None])[:, 0]
    else:
        lp_s_y = lp_t_y = torch.zeros(n, dtype=dtype, device=lp_s.device)
    adv = lp_t_y - lp_s_y
    coef = coef.to(dtype)
    grad = None
    if spec.mode == SAMPLED:
        a = advantage.to(dtype) if advantage is not None else adv
        if advantage is None and spec.signal_clip > 0:
            a = a.clamp(-spec.signal_clip, spec.signal_clip)
        token_loss, div = -a * lp_s_y, -adv
        if compute_grad:  # d(-a log p_y)/ds = a (p - onehot_y)
            scale = (coef * a)[:, None]
            grad = lp_s.exp() * scale
            grad.scatter_add_(1, target_ids[:, None], -scale)
    else:
        p = lp_s.exp()
        if spec.mode == FULL:
            div, slope = _divergence_and_slope(lp_s, lp_t, spec.alpha)
            if compute_grad:
                grad = slope - p * slope.sum(-1, keepdim=True)
        else:
            ranked = teacher_logits if spec.topk_from_teacher else student_logits
            ids = topk_ids(ranked.to(dtype) / spec.temperature, spec.topk)
            sup_s, sup_t = lp_s.gather(1, ids), lp_t.gather(1, ids)
            if spec.tail:
                tail_lp_s = lp_s.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
                tail_lp_t = lp_t.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
                tail_s = tail_lp_s.exp()
                div, slope = _divergence_and_slope(torch.cat([sup_s, tail_lp_s], -1),
                                                   torch.cat([sup_t, tail_lp_t], -1), spec.alpha)
                if compute_grad:
                    slope_sup, slope_tail = slope[:, :-1], slope[:, -1:]
                    # off-support entries move the tail bucket: p_l/P_tail of it, (1-P_tail) net
                    per_tail = torch.where(tail_s > 0, slope_tail / tail_s.clamp_min(1e-300),
                                           torch.zeros_like(tail_s))
                    grad = p * (-slope_sup.sum(-1, keepdim=True) + (1.0 - tail_s) * per_tail)
                    on_sup = slope_sup - p.gather(1, ids) * (slope_sup.sum(-1, keepdim=True)
                                                             + slope_tail)
                    grad.scatter_(1, ids, on_sup)
            else:
                sup_s = sup_s - torch.logsumexp(sup_s, -1, keepdim=True)
                sup_t = sup_t - torch.logsumexp(sup_t, -1, keepdim=True)
                div, slope = _divergence_and_slope(sup_s, sup_t, spec.alpha)
                if compute_grad:
                    grad = torch.zeros_like(p).scatter_(
                        1, ids, slope - sup_s.exp() * slope.sum(-1, keepdim=True))
        token_loss = div
        if spec.kl_clip > 0:
            token_loss = div.clamp(max=spec.kl_clip)
            if compute_grad:
                grad = torch.where((div > spec.kl_clip)[:, None], torch.zeros_like(grad), grad)
        if compute_grad:
            grad = grad * coef[:, None]
    if grad is not None:
        grad = torch.where(coef[:, None] != 0, grad / spec.temperature, torch.zeros_like(grad))
    stats = torch.stack([lp_s_y, lp_t_y, adv, div], -1)
    return token_loss, stats, grad


def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    with torch.autocast(student_logits.device.type, enabled=False):
        token_loss, stats, grad = token_terms(student_logits, teacher_logits, target_ids, coef,
                                              advantage, spec, compute_grad)
    return token_loss, stats, grad.to(student_logits.dtype) if grad is not None else None


def same_head(weight, bias, teacher_weight, teacher_bias) -> bool:
    """Whether the teacher's head is the student's (same storage): load / convert it once."""
    def same(a, b):
        if a is None or b is None or a is b:
            return a is b
        if torch.compiler.is_compiling():  # data pointers cannot be traced: treat as distinct
            return False
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    return same(weight, teacher_weight) and same(bias, teacher_bias)


def chunk_rows(n: int, vocab: int, budget: Optional[int] = None) -> int:
    """Rows per chunk: ``budget`` logits (default CHUNK_ELEMENTS, read at the call)."""
    budget = CHUNK_ELEMENTS if budget is None else budget
    return max(1, min(n, budget // max(vocab, 1)))


def _outputs_and_heads(student_hidden, weight, bias, teacher_weight, teacher_bias, needs):
    """The accumulation dtype, the per-token outputs, the gradient buffers asked for (a frozen
    head: no [V, H] buffer, no grad_W GEMM) and both heads in that dtype (half heads are upcast
    once, an O(V x H) copy this portable path accepts; a shared head once)."""
    n, vocab = student_hidden.shape[0], weight.shape[0]
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    token_loss = torch.empty(n, dtype=acc, device=student_hidden.device)
    stats = torch.empty(n, 4, dtype=acc, device=student_hidden.device)
    grad_h = torch.zeros_like(student_hidden) if needs.hidden else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs.weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) \
        if needs.bias and bias is not None else None
    up = (lambda x: None if x is None else x.to(acc))
    w_s, b_s = up(weight), up(bias)
    shared = same_head(weight, bias, teacher_weight, teacher_bias)
    w_t, b_t = (w_s, b_s) if shared else (up(teacher_weight), up(teacher_bias))
    return acc, token_loss, stats, grad_h, grad_w, grad_b, (w_s, b_s, w_t, b_t), shared


def _add_grads(g, h, rows, w_s, grad_h, grad_w, grad_b, a=None):
    """A chunk's gradients from its logit gradients ``g`` and hidden rows ``h`` (rows ``rows``
    of grad_h): grad_h = g @ W, grad_W += g^T h, grad_b += sum of g. ``a``: per-row factors of
    a unit-advantage ``g`` (centring), applied to the [chunk, H] sides, never to g itself."""
    if grad_h is not None:
        gh = g @ w_s
        grad_h[rows] = (gh if a is None else gh * a[:, None]).to(grad_h.dtype)
    if grad_w is not None:
        grad_w.addmm_(g.t(), h if a is None else h * a[:, None])
    if grad_b is not None:
        grad_b += g.sum(0) if a is None else g.t() @ a


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, needs):
    needs = as_needs(needs)
    # logits and gradient GEMMs in float32 (or float64) even under autocast: bf16 logits would
    # cost ~1e-2 of the loss
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                      target_ids, coef, advantage, spec, needs)


def _fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
           coef, advantage, spec, needs):
    n, vocab = student_hidden.shape[0], weight.shape[0]
    acc, token_loss, stats, grad_h, grad_w, grad_b, heads, shared = _outputs_and_heads(
        student_hidden, weight, bias, teacher_weight, teacher_bias, needs)
    compute_grad = grad_h is not None or grad_w is not None or grad_b is not None
    w_s, b_s, w_t, b_t = heads
    # the teacher's logits are the student's (hsd.loss's second, centred pass): one GEMM
    same_logits = shared and same_head(student_hidden, None, teacher_hidden, None)
    step = chunk_rows(n, vocab)
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        h = student_hidden[rows].to(acc)
        s = F.linear(h, w_s, b_s)
        t = s if same_logits else F.linear(teacher_hidden[rows].to(acc), w_t, b_t)
        loss_i, stats_i, g = token_terms(s, t, None if target_ids is None else target_ids[rows],
                                         coef[rows], None if advantage is None else advantage[rows],
                                         spec, compute_grad)
        token_loss[rows], stats[rows] = loss_i, stats_i
        if g is not None:
            _add_grads(g, h, rows, w_s, grad_h, grad_w, grad_b)
    return token_loss, stats, grad_h, grad_w, grad_b


# ----------------------------------------------------------------------------------------------
# Sampled mode with per-sequence centring in one pass (the optional fused_centred contract)
# ----------------------------------------------------------------------------------------------
def centring_plan(seq_ids, step: int):
    """Sequence-aligned chunks for centring (one host sync).

    Returns ``(chunks, deferred)``: lists of row indices. Each chunk holds whole sequences (a
    sequence being one contiguous run of rows) and at most ``step`` rows, so their means are
    known after the chunk's own forward. ``deferred`` holds the rows of every other sequence
    (longer than a chunk, or split into several runs), which take two passes.
    """
    seq = seq_ids.tolist()
    n = len(seq)
    runs, runs_of = [], {}
    i = 0
    while i < n:
        j = i + 1
        while j < n and seq[j] == seq[i]:
            j += 1
        runs.append((i, j - i))
        runs_of[seq[i]] = runs_of.get(seq[i], 0) + 1
        i = j
    chunks, chunk, deferred = [], [], []
    for start, length in runs:
        if runs_of[seq[start]] == 1 and length <= step:
            if len(chunk) + length > step:
                chunks.append(chunk)
                chunk = []
            chunk.extend(range(start, start + length))
        else:
            deferred.extend(range(start, start + length))
    if chunk:
        chunks.append(chunk)
    return chunks, deferred


def centre(stats, coef, seq_ids, signal_clip):
    """a_t = clip(A_t - mean of A over the valid rows of t's sequence), every sequence complete
    in the given rows; 0 for masked rows (their gradient is 0 whatever a_t is)."""
    ids, dense = torch.unique(seq_ids, return_inverse=True)
    a = centred_advantage(stats, coef, dense, ids.numel(), signal_clip)
    return torch.where(coef != 0, a, torch.zeros_like(a))


def fused_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                  target_ids, coef, seq_ids, spec, needs):
    """Sampled mode with centring: ``fused``'s outputs plus the centred advantage [N]."""
    needs = as_needs(needs)
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _fused_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                              teacher_bias, target_ids, coef, seq_ids, spec, needs)


def _fused_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                   target_ids, coef, seq_ids, spec, needs):
    # grad(coef * loss) is linear in a_t: the rows run with a_t = 1 and are scaled once the
    # means are known (grad_h after g @ W, grad_W through the hidden rows: g^T (a * h))
    n, vocab = student_hidden.shape[0], weight.shape[0]
    device = student_hidden.device
    acc, token_loss, stats, grad_h, grad_w, grad_b, heads, _ = _outputs_and_heads(
        student_hidden, weight, bias, teacher_weight, teacher_bias, needs)
    advantage = torch.empty(n, dtype=acc, device=device)
    compute_grad = grad_h is not None or grad_w is not None or grad_b is not None
    w_s, b_s, w_t, b_t = heads
    step = chunk_rows(n, vocab)
    chunks, deferred = centring_plan(seq_ids, step)

    def forward(idx, student_only=False):
        h = student_hidden[idx].to(acc)
        s = F.linear(h, w_s, b_s)
        t = s if student_only else F.linear(teacher_hidden[idx].to(acc), w_t, b_t)
        return h, s, t

    # chunks of whole sequences: one pass, as without centring
    for rows in chunks:
        idx = torch.tensor(rows, device=device)
        h, s, t = forward(idx)
        c = coef[idx]
        loss_i, stats_i, g = token_terms(s, t, target_ids[idx], c, torch.ones_like(c), spec,
                                         compute_grad)
        a = centre(stats_i, c, seq_ids[idx], spec.signal_clip)
        token_loss[idx], stats[idx], advantage[idx] = loss_i * a, stats_i, a
        if g is not None:
            _add_grads(g, h, idx, w_s, grad_h, grad_w, grad_b, a)
    if not deferred:
        return token_loss, stats, grad_h, grad_w, grad_b, advantage
    # sequences that do not fit a chunk, two passes: with a weight (or bias) gradient the first
    # gives the statistics only and the second, the student's logits alone, every gradient; a
    # frozen head needs no second pass (the first gives grad_h for a_t = 1)
    second_pass = grad_w is not None or grad_b is not None
    unit_hidden = grad_h is not None and not second_pass
    didx = torch.tensor(deferred, device=device)
    m = didx.numel()
    loss_d = torch.empty(m, dtype=acc, device=device)
    stats_d = torch.empty(m, 4, dtype=acc, device=device)
    unit_gh = torch.empty(m, student_hidden.shape[1], dtype=acc, device=device) \
        if unit_hidden else None
    coef_d = coef[didx]
    for i in range(0, m, step):
        part = slice(i, min(i + step, m))
        _, s, t = forward(didx[part])
        loss_d[part], stats_d[part], g = token_terms(
            s, t, target_ids[didx[part]], coef_d[part], torch.ones_like(coef_d[part]), spec,
            unit_hidden)
        if unit_hidden:
            unit_gh[part] = g @ w_s
    a_d = centre(stats_d, coef_d, seq_ids[didx], spec.signal_clip)
    token_loss[didx], stats[didx], advantage[didx] = loss_d * a_d, stats_d, a_d
    if unit_hidden:
        grad_h[didx] = (unit_gh * a_d[:, None]).to(grad_h.dtype)
    if not second_pass:
        return token_loss, stats, grad_h, grad_w, grad_b, advantage
    for i in range(0, m, step):
        part = slice(i, min(i + step, m))
        h, s, _ = forward(didx[part], student_only=True)
        # the advantage is known now: the rows give the gradient itself
        _, _, g = token_terms(s, s, target_ids[didx[part]], coef_d[part], a_d[part], spec, True)
        _add_grads(g, h, didx[part], w_s, grad_h, grad_w, grad_b)
    return token_loss, stats, grad_h, grad_w, grad_b, advantage
