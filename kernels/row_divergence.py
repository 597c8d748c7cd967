"""The per-row Triton kernel: softmax statistics, divergence and grad_logits for one token row.

One program owns one token row of student logits ``S`` and teacher logits ``T`` (any float
dtype, upcast to float32 in registers; an optional bias is added as each tile is loaded) and
walks the vocabulary in ``BLOCK_V`` tiles:

* pass 1: online max / sum-exp for both sides (one exp per element per side, a scalar rescale
  per tile), and for forward / reverse KL the online sum of ``p * (log p - log q)``, so those
  divergences need no second pass; top-k with a tail also sums the off-support mass here;
* pass 2 (generalised JSD only): the mixture needs both final log-normalisers, so the
  divergence and the row sum of the slope take one more pass;
* gradient pass (``COMPUTE_GRAD``): writes ``d(coef * token_loss) / d logits`` for the row into
  ``G`` (which may alias ``S``: each element of the gradient pass is loaded and stored by the
  same thread, and the one entry read across threads, the target logit, is read before pass 1,
  so before any barrier after which other warps could already be storing).

Top-k mode receives the support ids (chosen outside the kernel by :func:`.topk.topk_support`,
torch's top-k with the contract's tie rule: selection is a sort, which this kernel does not
need to redo), gathers the k support logits per side into
registers, computes the bucket divergence there, writes ``p * c_row`` for every vocabulary
entry (the off-support chain rule through the tail bucket, or 0 without the tail) and the k
on-support gradients to ``ONSUP``; the caller scatters those over the row.

The math is :func:`hsd.backends.torch_chunked.token_terms`, rearranged where float32 would
otherwise cancel |logits|-sized terms (logits of 1e4 are tested):

* log p = (x - m) / T - log z, with the running maximum m in raw logit units;
* reverse KL (full and top-k): grad = p (delta - E_p[delta]) with delta = log p - log q taken
  relative to its value at the dominant entry, instead of slope - p * sum(slope);
* the tail mass is summed over the off-support entries (those below the k-th ranked logit),
  not taken as 1 - sum(p_support); without a tail the support renormalises from raw logit
  differences.
"""

import contextlib
import math

import torch
import triton
import triton.language as tl

SAMPLED, FULL, TOPK = 0, 1, 2
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2
# finite start for running maxima: exp(-inf - NEG_BIG) is 0, never NaN. A constexpr: Triton's
# code generator rejects plain Python globals inside @triton.jit (the interpreter accepts them)
NEG_BIG = tl.constexpr(-1e30)


@triton.jit
def _load_logits(row_ptr, bias_ptr, offs, mask, HAS_BIAS: tl.constexpr):
    """logits + bias in float32 at ``offs`` (not yet divided by T); -inf where masked off."""
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _plogratio(lp, lq):
    """p * (log p - log q), 0 where p = 0 (guarded with where, never by multiplication); a NaN
    log p stays NaN. q = 0 where p > 0 gives +inf even when exp(log p) underflows in float32
    (0 * inf would be NaN; the float64 definition has p > 0 there)."""
    present = lp != float("-inf")
    q_zero = (lq == float("-inf")) & (lp == lp)
    return tl.where(present, tl.where(q_zero, float("inf"), tl.exp(lp) * (lp - lq)), 0.0)


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out
    lo = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
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
    MODE: tl.constexpr, ALPHA_KIND: tl.constexpr, TAIL: tl.constexpr,
    RANK_TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TARGET: tl.constexpr, HAS_ADV: tl.constexpr, CLIP_SIGNAL: tl.constexpr,
    CLIP_KL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF = float("-inf")
    # Maxima are kept in raw logit units and differences are scaled by 1/T afterwards:
    # log p = (x - m) / T - log z, where x - m is exact near the maximum. Even with |logits|
    # ~ 1e4, log p of the dominant entries keeps float32 precision (x / T - lse would not).

    # pass 1: online softmax statistics of both sides (+ the KL sum for alpha in {0, 1})
    m_s = tl.full([], NEG_BIG, tl.float32)
    m_t = tl.full([], NEG_BIG, tl.float32)
    z_s = tl.full([], 0.0, tl.float32)
    z_t = tl.full([], 0.0, tl.float32)
    kl_acc = tl.full([], 0.0, tl.float32)
    shift = tl.full([], 0.0, tl.float32)  # reverse KL: (s - t) / T at the running student argmax
    # top-k with a tail: the tail mass summed directly over the off-support entries (those
    # ranked below the k-th support logit); 1 - sum(p_support) would cancel catastrophically
    zt_s = tl.full([], 0.0, tl.float32)
    zt_t = tl.full([], 0.0, tl.float32)
    # entries tied with the k-th ranked logit: torch.topk put only some of them in the support
    # (bf16 logits tie often); the others belong to the tail
    zq_s = tl.full([], 0.0, tl.float32)
    zq_t = tl.full([], 0.0, tl.float32)
    n_tied = tl.full([], 0, tl.int32)
    if HAS_TARGET:
        # read the target logits before any reduction: G may alias S, and once this program's
        # last barrier is passed its other warps store gradient tiles (entry y included)
        y = tl.load(TGT + row)
        # hsd.loss checks the ids once per call; an out-of-range id reads nothing here
        y_in = (y >= 0) & (y < V)
        x_s_y = _load_logits(s_row, BS, y, y_in, HAS_BIAS)
        x_t_y = _load_logits(t_row, BT, y, y_in, HAS_BIAS)
    if MODE == 2:
        k_lanes = tl.arange(0, BLOCK_K)
        k_in = k_lanes < K
        ids = tl.load(IDS + row * K + k_lanes, mask=k_in, other=0)
        raw_s = _load_logits(s_row, BS, ids, k_in, HAS_BIAS)
        raw_t = _load_logits(t_row, BT, ids, k_in, HAS_BIAS)
        if RANK_TEACHER:
            kth = tl.min(tl.where(k_in, raw_t, float("inf")), 0)
        else:
            kth = tl.min(tl.where(k_in, raw_s, float("inf")), 0)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        inside = offs < V
        s = _load_logits(s_row, BS, offs, inside, HAS_BIAS)
        t = _load_logits(t_row, BT, offs, inside, HAS_BIAS)
        tile_max_s = tl.max(s, 0)
        new_s = tl.maximum(m_s, tile_max_s)
        new_t = tl.maximum(m_t, tl.max(t, 0))
        r_s = tl.exp((m_s - new_s) * inv_temp)
        r_t = tl.exp((m_t - new_t) * inv_temp)
        e_s = tl.exp((s - new_s) * inv_temp)
        e_t = tl.exp((t - new_t) * inv_temp)
        if MODE == 1:
            if ALPHA_KIND == 1:
                # sum exp(s - m_s) ((s - t) / T - shift): relative to the gap at the argmax,
                # so a near one-hot row sums small terms, not |logits|-sized ones that cancel
                gap = (s - t) * inv_temp
                tile_shift = tl.max(tl.where(s == tile_max_s, gap, NEG_INF), 0)
                # any finite shift is exact; an infinite gap (the teacher's -inf at the student's
                # argmax) must not become one, or inf - inf turns the infinite KL into NaN
                new_shift = tl.where((tile_max_s > m_s) & (tl.abs(tile_shift) < float("inf")),
                                     tile_shift, shift)
                # t = -inf under s > -inf: the term is +inf even where e_s underflows to 0
                terms = tl.where(s != NEG_INF,
                                 tl.where(t == NEG_INF, float("inf"), e_s * (gap - new_shift)),
                                 0.0)
                kl_acc = (kl_acc + z_s * (shift - new_shift)) * r_s + tl.sum(terms, 0)
                shift = new_shift
            elif ALPHA_KIND == 0:
                gap = tl.where(t > NEG_INF,
                               tl.where(s == NEG_INF, float("inf"), e_t * ((t - s) * inv_temp)),
                               0.0)
                kl_acc = kl_acc * r_t + tl.sum(gap, 0)
        if MODE == 2:
            if TAIL:
                if RANK_TEACHER:
                    off = t < kth
                    tied = (t == kth) & inside
                else:
                    off = s < kth
                    tied = (s == kth) & inside
                zt_s = zt_s * r_s + tl.sum(tl.where(off, e_s, 0.0), 0)
                zt_t = zt_t * r_t + tl.sum(tl.where(off, e_t, 0.0), 0)
                zq_s = zq_s * r_s + tl.sum(tl.where(tied, e_s, 0.0), 0)
                zq_t = zq_t * r_t + tl.sum(tl.where(tied, e_t, 0.0), 0)
                n_tied += tl.sum(tied.to(tl.int32), 0)
        z_s = z_s * r_s + tl.sum(e_s, 0)
        z_t = z_t * r_t + tl.sum(e_t, 0)
        m_s = new_s
        m_t = new_t
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)

    if HAS_TARGET:
        lp_s_y = (x_s_y - m_s) * inv_temp - lz_s
        lp_t_y = (x_t_y - m_t) * inv_temp - lz_t
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
        elif CLIP_SIGNAL:  # comparisons, not minimum/maximum: those drop a NaN operand
            a = tl.where(adv > signal_clip, signal_clip,
                         tl.where(adv < -signal_clip, -signal_clip, adv))
        loss = -a * lp_s_y
        div = -adv
    elif MODE == 1:
        if ALPHA_KIND == 1:
            mean_gap = kl_acc / z_s  # E_p[(s - t) / T] - shift
            div = (shift + mean_gap) - (m_s - m_t) * inv_temp - (lz_s - lz_t)
        elif ALPHA_KIND == 0:
            div = kl_acc / z_t - (m_t - m_s) * inv_temp - (lz_t - lz_s)
        else:  # pass 2: the mixture needs both final log-normalisers
            d_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            sl_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + lanes
                inside = offs < V
                lp = (_load_logits(s_row, BS, offs, inside, HAS_BIAS) - m_s) * inv_temp - lz_s
                lq = (_load_logits(t_row, BT, offs, inside, HAS_BIAS) - m_t) * inv_temp - lz_t
                d, sl = _div_and_slope(lp, lq, alpha, log_ws, log_wt, ALPHA_KIND)
                d_vec += tl.where(inside, d, 0.0)
                sl_vec += tl.where(inside, sl, 0.0)
            div = tl.sum(d_vec, 0)
            slope_sum = tl.sum(sl_vec, 0)
        loss = div
    else:
        sup_s = tl.where(k_in, (raw_s - m_s) * inv_temp - lz_s, NEG_INF)
        sup_t = tl.where(k_in, (raw_t - m_t) * inv_temp - lz_t, NEG_INF)
        if TAIL:
            # tied entries outside the support: on the ranking side each weighs exp(kth - m)
            # exactly; on the other side, all tied entries less the support's tied ones (only
            # when there are such entries, so the untied case takes no subtraction)
            rank_sup = raw_t if RANK_TEACHER else raw_s
            sup_tied = k_in & (rank_sup == kth)
            n_out = n_tied - tl.sum(sup_tied.to(tl.int32), 0)
            q_s = tl.sum(tl.where(sup_tied, tl.exp((raw_s - m_s) * inv_temp), 0.0), 0)
            q_t = tl.sum(tl.where(sup_tied, tl.exp((raw_t - m_t) * inv_temp), 0.0), 0)
            if RANK_TEACHER:
                out_t = n_out.to(tl.float32) * tl.exp((kth - m_t) * inv_temp)
                out_s = tl.maximum(zq_s - q_s, 0.0)
            else:
                out_s = n_out.to(tl.float32) * tl.exp((kth - m_s) * inv_temp)
                out_t = tl.maximum(zq_t - q_t, 0.0)
            tail_s = (zt_s + tl.where(n_out > 0, out_s, 0.0)) / z_s
            tail_t = (zt_t + tl.where(n_out > 0, out_t, 0.0)) / z_t
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
            if ALPHA_KIND == 1:
                # the same as p (delta - E_p[delta]), delta = lp - lq per bucket, centred on
                # the dominant bucket: no cancellation of |logits|-sized terms
                p_sup = tl.exp(sup_s)
                delta = tl.where(k_in & (sup_s != NEG_INF), sup_s - sup_t, 0.0)
                centre = tl.max(tl.where(p_sup == tl.max(p_sup, 0), delta, NEG_INF), 0)
                delta_tail = tl.log(tail_s) - tl.log(tail_t)
                spread = tl.sum(p_sup * (delta - centre), 0) \
                    + tl.where(tail_s > 0, tail_s * (delta_tail - centre), 0.0)
                on_sup = tl.where(k_in, p_sup * ((delta - centre) - spread), 0.0)
                tail_coef = tl.where(tail_s > 0, (delta_tail - centre) - spread, -sup_slope)
        else:
            # renormalised from raw logit differences: exact where the support sits far below
            # the row maximum (a teacher-ranked support), unlike differences of log p / T
            sup_s = tl.where(k_in, raw_s, NEG_INF)
            sup_t = tl.where(k_in, raw_t, NEG_INF)
            top_s = tl.max(sup_s, 0)
            top_t = tl.max(sup_t, 0)
            ren_s = (sup_s - top_s) * inv_temp
            ren_t = (sup_t - top_t) * inv_temp
            ren_s = ren_s - tl.log(tl.sum(tl.exp(ren_s), 0))
            ren_t = ren_t - tl.log(tl.sum(tl.exp(ren_t), 0))
            # a NaN anywhere in a row (a NaN normaliser) makes its log p NaN, support or not
            ren_s = tl.where(lz_s != lz_s, lz_s, ren_s)
            ren_t = tl.where(lz_t != lz_t, lz_t, ren_t)
            d_sup, sl_sup = _div_and_slope(ren_s, ren_t, alpha, log_ws, log_wt, ALPHA_KIND)
            d_sup = tl.where(k_in, d_sup, 0.0)
            sl_sup = tl.where(k_in, sl_sup, 0.0)
            div = tl.sum(d_sup, 0)
            on_sup = sl_sup - tl.exp(ren_s) * tl.sum(sl_sup, 0)
            if ALPHA_KIND == 1:  # centred on the dominant entry, as above
                p_ren = tl.exp(ren_s)
                delta = tl.where(k_in & (ren_s != NEG_INF), ren_s - ren_t, 0.0)
                centre = tl.max(tl.where(p_ren == tl.max(p_ren, 0), delta, NEG_INF), 0)
                spread = tl.sum(p_ren * (delta - centre), 0)
                on_sup = tl.where(k_in, p_ren * ((delta - centre) - spread), 0.0)
        loss = div

    keep = tl.full([], 1, tl.int1)
    if MODE != 0:
        if CLIP_KL:  # a NaN divergence stays NaN, with its (NaN) gradient
            clipped = div > kl_clip
            loss = tl.where(clipped, kl_clip, div)
            keep = ~clipped
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
                s = _load_logits(s_row, BS, offs, inside, HAS_BIAS)
                lp = (s - m_s) * inv_temp - lz_s
                p = tl.exp(lp)
                if MODE == 0:  # d(-a log p_y)/ds = a (p - onehot_y)
                    g = a * p - tl.where(offs == y, a, 0.0)
                elif MODE == 2:
                    g = p * tail_coef
                elif ALPHA_KIND == 0:  # slope -q, its row sum -1
                    t = _load_logits(t_row, BT, offs, inside, HAS_BIAS)
                    g = p - tl.exp((t - m_t) * inv_temp - lz_t)
                elif ALPHA_KIND == 1:
                    # p (lp - lq) - p D = p ((s - t) / T - E_p[(s - t) / T]): the normalisers
                    # cancel exactly, so near one-hot rows give 0, not rounding noise
                    t = _load_logits(t_row, BT, offs, inside, HAS_BIAS)
                    g = tl.where(s != NEG_INF, p * (((s - t) * inv_temp - shift) - mean_gap), 0.0)
                else:
                    t = _load_logits(t_row, BT, offs, inside, HAS_BIAS)
                    d, sl = _div_and_slope(lp, (t - m_t) * inv_temp - lz_t, alpha, log_ws,
                                           log_wt, ALPHA_KIND)
                    g = sl - p * slope_sum
            g = tl.where(active, g * scale, 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=inside)


def _interpreting(device) -> bool:
    return device.type == "cpu"


def kernel_variant(mode, alpha, tail=False, topk_from_teacher=False, has_bias=False,
                   has_target=True, has_advantage=False, signal_clip=0.0, kl_clip=0.0,
                   compute_grad=True, vocab=1 << 17, k=1, interpret=False, block_v=None) -> dict:
    """The compile-time parameters :func:`launch_rows` gives :func:`hsd_rows_kernel`.

    Flags a mode does not read are normalised (sampled mode has no alpha, tail or KL clip;
    only top-k ranks), so the dispatch compiles no duplicate variants; the ahead-of-time
    compile test enumerates the variants through this function. Returns the constexprs plus
    ``num_warps``.
    """
    if block_v is None:
        # GPU: 4096-wide tiles give 8 bf16 (16 bytes) per thread at 16 warps; interpreter: small
        block_v = 128 if interpret else 4096
    block_v = min(block_v, triton.next_power_of_2(vocab))
    sampled, topk = mode == SAMPLED, mode == TOPK
    if sampled:
        alpha_kind = REVERSE_KL
    else:
        alpha_kind = FORWARD_KL if alpha == 0.0 else REVERSE_KL if alpha == 1.0 else MIXTURE
    return dict(
        MODE=mode, ALPHA_KIND=alpha_kind, TAIL=bool(tail) and topk,
        RANK_TEACHER=bool(topk_from_teacher) and topk, HAS_BIAS=bool(has_bias),
        HAS_TARGET=bool(has_target), HAS_ADV=bool(has_advantage) and sampled,
        CLIP_SIGNAL=sampled and not has_advantage and signal_clip > 0,
        CLIP_KL=not sampled and kl_clip > 0, COMPUTE_GRAD=bool(compute_grad),
        BLOCK_V=block_v, BLOCK_K=triton.next_power_of_2(k) if topk else 1,
        num_warps=4 if interpret else max(4, min(16, block_v // 256)),
    )


def launch_rows(student, teacher, grad, loss, stats, target_ids, coef, advantage, ids, on_support,
                mode, alpha, temperature, tail, signal_clip, kl_clip, compute_grad,
                topk_from_teacher=False, student_bias=None, teacher_bias=None, block_v=None):
    """Run :func:`hsd_rows_kernel` over the rows of ``student`` / ``teacher`` ([n, V], unit stride
    along V) on their device (the current stream of that device).

    ``grad`` ([n, V], may be ``student`` itself) receives grad_logits when ``compute_grad``;
    top-k mode also needs ``ids`` [n, k] and writes ``on_support`` [n, k] (float32). The optional
    [V] biases are added to the logits as they are loaded (both or neither).
    """
    n, vocab = student.shape
    if n == 0:
        return
    k = ids.shape[1] if ids is not None else 1
    has_bias = student_bias is not None
    variant = kernel_variant(mode, alpha, tail, topk_from_teacher, has_bias,
                             target_ids is not None, advantage is not None, signal_clip, kl_clip,
                             compute_grad, vocab, k, _interpreting(student.device), block_v)
    alpha_kind = variant["ALPHA_KIND"]
    log_ws = math.log1p(-alpha) if alpha_kind == MIXTURE else 0.0
    log_wt = math.log(alpha) if alpha_kind == MIXTURE else 0.0
    dummy = loss  # stands in for absent pointers; never dereferenced (constexpr-guarded)
    g = grad if grad is not None else student
    with device_guard(student):
        hsd_rows_kernel[(n,)](
            student, teacher, student_bias if has_bias else dummy,
            teacher_bias if has_bias else dummy, g, loss, stats,
            target_ids if target_ids is not None else dummy, coef,
            advantage if advantage is not None else dummy,
            ids if ids is not None else dummy, on_support if on_support is not None else dummy,
            vocab, k, student.stride(0), teacher.stride(0), g.stride(0),
            1.0 / temperature, float(alpha), log_ws, log_wt, float(signal_clip), float(kl_clip),
            **variant,
        )


def device_guard(tensor):
    """Make ``tensor``'s GPU the current device (Triton launches on the current device and its
    current stream; model-parallel callers hold tensors on another GPU). A no-op off CUDA."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
