"""The per-row Triton kernel: softmax statistics, divergence and grad_logits for one token row.

One program owns one token row of student logits ``S`` and teacher logits ``T`` (any float
dtype, upcast to float32 in registers) and walks the vocabulary in ``BLOCK_V`` tiles:

* pass 1: online max / sum-exp for both sides (one exp per element per side, a scalar rescale
  per tile), the target logits, and, for forward / reverse KL, the online sum of
  ``p * (log p - log q)`` so that those divergences need no second pass;
* pass 2 (generalised JSD only): the mixture needs both final log-normalisers, so the
  divergence and the row sum of the slope take one more pass;
* gradient pass (``COMPUTE_GRAD``): writes ``d(coef * token_loss) / d logits`` for the row into
  ``G`` (which may alias ``S``: each element is read before it is overwritten by the same program).

Top-k mode receives the support ids (chosen by ``torch.topk`` outside the kernel), gathers the
k support logits per side into registers, computes the bucket divergence there, writes
``p * c_row`` for every vocabulary entry (the off-support chain rule through the tail bucket,
or 0 without the tail) and the k on-support gradients to ``ONSUP``; the caller scatters those
over the row.

The math mirrors :func:`hsd.backends.torch_chunked.token_terms` line for line.
"""

import triton
import triton.language as tl

SAMPLED, FULL, TOPK = 0, 1, 2
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2
NEG_BIG = -1e30  # finite start for running maxima: exp(-inf - NEG_BIG) is 0, never NaN


@triton.jit
def _load_scaled(row_ptr, bias_ptr, offs, mask, inv_temp, HAS_BIAS: tl.constexpr):
    """(logits + bias) / T in float32 at ``offs``; -inf where masked off."""
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x * inv_temp


@triton.jit
def _plogratio(lp, lq):
    """p * (log p - log q), 0 where p = 0 (guarded with where, never by multiplication)."""
    present = lp > float("-inf")
    return tl.where(present, tl.exp(lp) * (lp - lq), 0.0)


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    out = hi + tl.log(1.0 + tl.exp(lo - hi))
    return tl.where(hi == float("-inf"), float("-inf"), out)


@triton.jit
def _div_and_slope(lp, lq, alpha, log_ws, log_wt, ALPHA_KIND: tl.constexpr):
    """Elementwise divergence terms and slope p * dD/dp (terms proportional to p omitted)."""
    if ALPHA_KIND == 0:
        d = _plogratio(lq, lp)
        slope = -tl.exp(lq)
    elif ALPHA_KIND == 1:
        d = _plogratio(lp, lq)
        slope = d
    else:
        lm = _logaddexp(lp + log_ws, lq + log_wt)
        slope = (1.0 - alpha) * _plogratio(lp, lm)
        d = slope + alpha * _plogratio(lq, lm)
    return d, slope


@triton.jit
def hsd_rows_kernel(
    S, T, BS, BT, G, LOSS, STATS, TGT, COEF, ADV, IDS, ONSUP,
    V, K, stride_s, stride_t, stride_g,
    inv_temp, alpha, log_ws, log_wt, signal_clip, kl_clip,
    MODE: tl.constexpr, ALPHA_KIND: tl.constexpr, TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TARGET: tl.constexpr, HAS_ADV: tl.constexpr, CLIP_SIGNAL: tl.constexpr,
    CLIP_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF = float("-inf")

    # pass 1: online softmax statistics of both sides (+ the KL sum for alpha in {0, 1})
    m_s = tl.full([], NEG_BIG, tl.float32)
    m_t = tl.full([], NEG_BIG, tl.float32)
    z_s = tl.full([], 0.0, tl.float32)
    z_t = tl.full([], 0.0, tl.float32)
    kl_acc = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        inside = offs < V
        s = _load_scaled(s_row, BS, offs, inside, inv_temp, HAS_BIAS)
        t = _load_scaled(t_row, BT, offs, inside, inv_temp, HAS_BIAS)
        new_s = tl.maximum(m_s, tl.max(s, 0))
        new_t = tl.maximum(m_t, tl.max(t, 0))
        r_s = tl.exp(m_s - new_s)
        r_t = tl.exp(m_t - new_t)
        e_s = tl.exp(s - new_s)
        e_t = tl.exp(t - new_t)
        z_s = z_s * r_s + tl.sum(e_s, 0)
        z_t = z_t * r_t + tl.sum(e_t, 0)
        if MODE == 1:
            if ALPHA_KIND == 1:  # sum exp(s - m_s) * (s - t), rescaled with the student max
                kl_acc = kl_acc * r_s + tl.sum(tl.where(s > NEG_INF, e_s * (s - t), 0.0), 0)
            elif ALPHA_KIND == 0:
                kl_acc = kl_acc * r_t + tl.sum(tl.where(t > NEG_INF, e_t * (t - s), 0.0), 0)
        m_s = new_s
        m_t = new_t
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)

    if HAS_TARGET:
        y = tl.load(TGT + row)
        lp_s_y = _load_scaled(s_row, BS, y, y >= 0, inv_temp, HAS_BIAS) - lse_s
        lp_t_y = _load_scaled(t_row, BT, y, y >= 0, inv_temp, HAS_BIAS) - lse_t
    else:
        y = -1
        lp_s_y = tl.full([], 0.0, tl.float32)
        lp_t_y = tl.full([], 0.0, tl.float32)
    adv = lp_t_y - lp_s_y

    slope_sum = tl.full([], 0.0, tl.float32)
    tail_coef = tl.full([], 0.0, tl.float32)
    a = adv
    if MODE == 0:
        if HAS_ADV:
            a = tl.load(ADV + row).to(tl.float32)
        elif CLIP_SIGNAL:
            a = tl.minimum(tl.maximum(adv, -signal_clip), signal_clip)
        loss = -a * lp_s_y
        div = -adv
    elif MODE == 1:
        if ALPHA_KIND == 1:
            mean_gap = kl_acc / z_s
            div = mean_gap - lse_s + lse_t
        elif ALPHA_KIND == 0:
            div = kl_acc / z_t - lse_t + lse_s
        else:  # pass 2: the mixture needs both final log-normalisers
            d_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            sl_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + lanes
                inside = offs < V
                s = _load_scaled(s_row, BS, offs, inside, inv_temp, HAS_BIAS)
                t = _load_scaled(t_row, BT, offs, inside, inv_temp, HAS_BIAS)
                d, sl = _div_and_slope(s - lse_s, t - lse_t, alpha, log_ws, log_wt, ALPHA_KIND)
                d_vec += tl.where(inside, d, 0.0)
                sl_vec += tl.where(inside, sl, 0.0)
            div = tl.sum(d_vec, 0)
            slope_sum = tl.sum(sl_vec, 0)
        loss = div
    else:
        k_lanes = tl.arange(0, BLOCK_K)
        k_in = k_lanes < K
        ids = tl.load(IDS + row * K + k_lanes, mask=k_in, other=0)
        sup_s = _load_scaled(s_row, BS, ids, k_in, inv_temp, HAS_BIAS) - lse_s
        sup_t = _load_scaled(t_row, BT, ids, k_in, inv_temp, HAS_BIAS) - lse_t
        sup_s = tl.where(k_in, sup_s, NEG_INF)
        sup_t = tl.where(k_in, sup_t, NEG_INF)
        if TAIL:
            tail_s = tl.maximum(1.0 - tl.sum(tl.exp(sup_s), 0), 0.0)
            tail_t = tl.maximum(1.0 - tl.sum(tl.exp(sup_t), 0), 0.0)
            d_sup, sl_sup = _div_and_slope(sup_s, sup_t, alpha, log_ws, log_wt, ALPHA_KIND)
            d_tail, sl_tail = _div_and_slope(tl.log(tail_s), tl.log(tail_t), alpha, log_ws,
                                             log_wt, ALPHA_KIND)
            d_sup = tl.where(k_in, d_sup, 0.0)
            sl_sup = tl.where(k_in, sl_sup, 0.0)
            div = tl.sum(d_sup, 0) + d_tail
            sup_slope = tl.sum(sl_sup, 0)
            # off-support entries move the tail bucket: p_l / P_tail of it, (1 - P_tail) net
            per_tail = tl.where(tail_s > 0, sl_tail / tl.maximum(tail_s, 1e-38), 0.0)
            tail_coef = -sup_slope + (1.0 - tail_s) * per_tail
            on_sup = sl_sup - tl.exp(sup_s) * (sup_slope + sl_tail)
        else:
            top_s = tl.max(sup_s, 0)
            top_t = tl.max(sup_t, 0)
            ren_s = sup_s - (top_s + tl.log(tl.sum(tl.exp(sup_s - top_s), 0)))
            ren_t = sup_t - (top_t + tl.log(tl.sum(tl.exp(sup_t - top_t), 0)))
            d_sup, sl_sup = _div_and_slope(ren_s, ren_t, alpha, log_ws, log_wt, ALPHA_KIND)
            d_sup = tl.where(k_in, d_sup, 0.0)
            sl_sup = tl.where(k_in, sl_sup, 0.0)
            div = tl.sum(d_sup, 0)
            on_sup = sl_sup - tl.exp(ren_s) * tl.sum(sl_sup, 0)
        loss = div

    keep = tl.full([], 1, tl.int1)
    if MODE != 0:
        if CLIP_KL:
            loss = tl.minimum(div, kl_clip)
            keep = div <= kl_clip
    tl.store(LOSS + row, loss)
    tl.store(STATS + row * 4 + 0, lp_s_y)
    tl.store(STATS + row * 4 + 1, lp_t_y)
    tl.store(STATS + row * 4 + 2, adv)
    tl.store(STATS + row * 4 + 3, div)

    if COMPUTE_GRAD:
        coef = tl.load(COEF + row).to(tl.float32)
        active = (coef != 0) & keep
        scale = coef * inv_temp
        g_row = G + row * stride_g
        if MODE == 2:
            on_sup = tl.where(active, on_sup * scale, 0.0)
            tl.store(ONSUP + row * K + k_lanes, on_sup, mask=k_in)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            inside = offs < V
            if MODE == 2 and not TAIL:
                g = tl.zeros([BLOCK_V], dtype=tl.float32)
            else:
                s = _load_scaled(s_row, BS, offs, inside, inv_temp, HAS_BIAS)
                lp = s - lse_s
                p = tl.exp(lp)
                if MODE == 0:  # d(-a log p_y)/ds = a (p - onehot_y)
                    g = a * p - tl.where(offs == y, a, 0.0)
                elif MODE == 2:
                    g = p * tail_coef
                elif ALPHA_KIND == 0:  # slope -q, its row sum -1
                    t = _load_scaled(t_row, BT, offs, inside, inv_temp, HAS_BIAS)
                    g = p - tl.exp(t - lse_t)
                elif ALPHA_KIND == 1:
                    # p (lp - lq) - p D = p ((s - t) - E_p[s - t]): the normalisers cancel
                    # exactly, so near one-hot rows give 0, not the rounding of |logits|
                    t = _load_scaled(t_row, BT, offs, inside, inv_temp, HAS_BIAS)
                    g = tl.where(s > NEG_INF, p * ((s - t) - mean_gap), 0.0)
                else:
                    t = _load_scaled(t_row, BT, offs, inside, inv_temp, HAS_BIAS)
                    d, sl = _div_and_slope(lp, t - lse_t, alpha, log_ws, log_wt, ALPHA_KIND)
                    g = sl - p * slope_sum
            g = tl.where(active, g * scale, 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=inside)


def _interpreting(device) -> bool:
    return device.type == "cpu"


def launch_rows(student, teacher, grad, loss, stats, target_ids, coef, advantage, ids, on_support,
                mode, alpha, temperature, tail, signal_clip, kl_clip, compute_grad,
                student_bias=None, teacher_bias=None, block_v=None):
    """Run :func:`hsd_rows_kernel` over the rows of ``student`` / ``teacher`` ([n, V], unit last stride).

    ``grad`` ([n, V], may be ``student`` itself) receives grad_logits when ``compute_grad``;
    top-k mode also needs ``ids`` [n, k] and writes ``on_support`` [n, k] (float32). The optional
    [V] biases are added to the logits as they are loaded (both or neither).
    """
    import math

    n, vocab = student.shape
    if n == 0:
        return
    interpret = _interpreting(student.device)
    if block_v is None:
        # GPU: 4096-wide tiles give 8 bf16 (16 bytes) per thread at 16 warps; interpreter: small
        block_v = 128 if interpret else 4096
    block_v = min(block_v, triton.next_power_of_2(vocab))
    num_warps = 4 if interpret else max(4, min(16, block_v // 256))
    k = ids.shape[1] if ids is not None else 1
    alpha_kind = FORWARD_KL if alpha == 0.0 else REVERSE_KL if alpha == 1.0 else MIXTURE
    log_ws = math.log1p(-alpha) if alpha_kind == MIXTURE else 0.0
    log_wt = math.log(alpha) if alpha_kind == MIXTURE else 0.0
    dummy = loss  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    g = grad if grad is not None else student
    has_bias = student_bias is not None
    hsd_rows_kernel[(n,)](
        student, teacher, student_bias if has_bias else dummy,
        teacher_bias if has_bias else dummy, g, loss, stats,
        target_ids if target_ids is not None else dummy, coef,
        advantage if advantage is not None else dummy,
        ids if ids is not None else dummy, on_support if on_support is not None else dummy,
        vocab, k, student.stride(0), teacher.stride(0), g.stride(0),
        1.0 / temperature, float(alpha), log_ws, log_wt, float(signal_clip), float(kl_clip),
        MODE=mode, ALPHA_KIND=alpha_kind, TAIL=bool(tail), HAS_BIAS=has_bias, HAS_TARGET=target_ids is not None,
        HAS_ADV=advantage is not None, CLIP_SIGNAL=signal_clip > 0, CLIP_KL=kl_clip > 0,
        COMPUTE_GRAD=bool(compute_grad), BLOCK_V=block_v,
        BLOCK_K=triton.next_power_of_2(k), num_warps=num_warps,
    )
