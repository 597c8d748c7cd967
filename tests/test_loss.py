"""The public loss API against a naive float64 definition written with explicit loops."""

import math

import pytest
import torch

import hsd
from hsd.backends import available_backends

# the compiled / portable backends checked here through the public API (Triton has its own file)
BACKENDS = [b for b in ("reference", "torch", "cpu") if b in available_backends()]
ALPHAS = (0.0, 0.3, 0.5, 1.0)


# ---------------------------------------------------------------- a naive, independent definition
def naive_token_divergence(ps, pt, alpha):
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if alpha == 0.0:
        return kl(pt, ps)
    if alpha == 1.0:
        return kl(ps, pt)
    m = [(1 - alpha) * x + alpha * y for x, y in zip(ps, pt)]
    return (1 - alpha) * kl(ps, m) + alpha * kl(pt, m)


def naive_loss(s_logits, t_logits, targets, *, mode="sampled", alpha=1.0, topk=None,
               topk_support="student", tail=True, temperature=1.0, weights=None, seq_ids=None,
               ignore_first_k=0, signal_clip=None, center=False, kl_clip=None,
               reduction="seq_mean", num_items=None):
    """Loss by loops over sequences and tokens (float64), differentiable in s_logits."""
    n = s_logits.shape[0]
    lp_s = torch.log_softmax(s_logits.double() / temperature, -1)
    lp_t = torch.log_softmax(t_logits.double().detach() / temperature, -1)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    sid = [0] * n if seq_ids is None else [int(x) for x in seq_ids]
    seqs = {}
    for i in range(n):
        if w[i] != 0:
            seqs.setdefault(sid[i], []).append(i)
    seqs = {k: v[ignore_first_k:] for k, v in seqs.items()}
    seqs = {k: v for k, v in seqs.items() if v}
    per_token = {}
    for idx in seqs.values():
        adv = {i: (lp_t[i, targets[i]] - lp_s[i, targets[i]]).item() for i in idx} \
            if targets is not None else {}
        mean_adv = sum(adv.values()) / len(idx) if adv else 0.0
        for i in idx:
            if mode == "sampled":
                a = adv[i] - (mean_adv if center else 0.0)
                if signal_clip:
                    a = max(-signal_clip, min(signal_clip, a))
                per_token[i] = -a * lp_s[i, targets[i]]
                continue
            ps, pt = lp_s[i].exp(), lp_t[i].exp()
            if mode == "topk":
                ids = (lp_t[i] if topk_support == "teacher" else lp_s[i]).topk(topk).indices
                ps, pt = ps[ids], pt[ids]
                if tail:
                    ps = torch.cat([ps, (1 - ps.sum()).clamp_min(0)[None]])
                    pt = torch.cat([pt, (1 - pt.sum()).clamp_min(0)[None]])
                else:
                    ps, pt = ps / ps.sum(), pt / pt.sum()
            d = _torch_divergence(ps, pt, alpha)
            per_token[i] = d.clamp(max=kl_clip) if kl_clip else d
    if reduction == "none":
        out = torch.zeros(n, dtype=torch.float64)
        for i, v in per_token.items():
            out = out + torch.nn.functional.one_hot(torch.tensor(i), n).double() * w[i] * v
        return out
    zero = s_logits.sum() * 0.0
    if reduction == "seq_mean":
        if not seqs:
            return zero
        means = [sum(w[i] * per_token[i] for i in idx) / sum(w[i] for i in idx)
                 for idx in seqs.values()]
        return sum(means) / len(means)
    total = sum((w[i] * v for i, v in per_token.items()), zero)
    if reduction == "sum":
        return total
    denom = num_items if num_items is not None else sum(w[i] for i in per_token)
    return total / denom if denom else zero


def _torch_divergence(ps, pt, alpha):
    """The same divergence as naive_token_divergence, on tensors (differentiable in ps)."""
    def kl(a, b):
        keep = a > 0
        return (a[keep] * (a[keep].log() - b[keep].log())).sum()

    if alpha == 0.0:
        return kl(pt, ps)
    if alpha == 1.0:
        return kl(ps, pt)
    m = (1 - alpha) * ps + alpha * pt
    return (1 - alpha) * kl(ps, m) + alpha * kl(pt, m)


def make_logits(n=9, v=23, scale=3.0, dtype=torch.float64):
    s = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    t = (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (n,))
    return s, t, y


def close(a, b, rtol, atol=1e-12):
    """max |a - b| <= rtol * max |b| + atol (b: the float64 reference)."""
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(b).all()
    err = (a - b).abs().max().item()
    assert err <= rtol * b.abs().max().item() + atol, f"max err {err:.3e}"


F64_RTOL = 1e-10  # float64 inputs are computed in float64 by every backend: a drop to float32 fails


def check_against_naive(backend, rtol=F64_RTOL, **kw):
    s, t, y = make_logits()
    ref = naive_loss(s, t, y, **kw)
    (g_ref,) = torch.autograd.grad(ref.sum(), s)
    out = hsd.hindsight_loss(s, t, y, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.sum(), s)
    close(out, ref, rtol)
    close(g, g_ref, rtol)


# ---------------------------------------------------------------- the math and the reductions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(mode="sampled"),
    dict(mode="sampled", center=True, signal_clip=0.5),
    *[dict(mode="full", alpha=a) for a in ALPHAS],
    dict(mode="full", alpha=0.5, kl_clip=0.4),
    *[dict(mode="topk", alpha=a, topk=4) for a in ALPHAS],
    dict(mode="topk", alpha=0.3, topk=5, topk_support="teacher"),
    dict(mode="topk", alpha=1.0, topk=5, tail=False),
    dict(mode="topk", alpha=0.0, topk=3, topk_support="teacher", tail=False, temperature=0.7),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_modes_match_naive_definition(backend, kw):
    check_against_naive(backend, temperature=kw.pop("temperature", 1.3), **kw)


SEQ_IDS = torch.tensor([5, 5, 5, 5, 2, 2, 9, 9, 9])  # uneven lengths, non-contiguous labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_reductions_masks_and_ignore_first_k(backend, reduction, mode):
    weights = torch.tensor([0.0, 1, 1, 1, 1, 0.5, 0, 1, 1], dtype=torch.float64)
    check_against_naive(backend, mode=mode, alpha=0.3, reduction=reduction, weights=weights,
                        seq_ids=SEQ_IDS, ignore_first_k=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centring_is_per_sequence(backend):
    check_against_naive(backend, mode="sampled", center=True, seq_ids=SEQ_IDS, ignore_first_k=1)


def test_gradcheck_reference_float64():
    # sampled mode is a stop-gradient surrogate (its gradient is not that of its value); the
    # naive-definition tests above cover it
    for kw in [dict(mode="full", alpha=0.3), dict(mode="topk", topk=3, tail=False, alpha=0.5),
               dict(mode="full", alpha=0.0), dict(mode="topk", topk=3, alpha=1.0)]:
        s, t, y = make_logits(n=4, v=7)
        fn = lambda x: hsd.hindsight_loss(x, t, y, backend="reference", seq_ids=SEQ_IDS[:4], **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,))
        fn_t = lambda x: hsd.hindsight_loss(x, t, y, backend="torch", seq_ids=SEQ_IDS[:4], **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn_t, (s,))


def test_sampled_loss_is_minus_advantage_times_logp():
    s, t, y = make_logits(n=5, v=8)
    loss, stats = hsd.hindsight_loss(s, t, y, reduction="none", return_stats=True)
    lp_s = torch.log_softmax(s.detach(), -1)[torch.arange(5), y]
    lp_t = torch.log_softmax(t, -1)[torch.arange(5), y]
    close(stats["advantage"], lp_t - lp_s, 1e-12)
    close(stats["student_logp"], lp_s, 1e-12)
    close(stats["teacher_logp"], lp_t, 1e-12)
    close(loss, -(lp_t - lp_s) * lp_s, 1e-12)
    assert stats["mask"].all()


# ---------------------------------------------------------------- fused form == logits form
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(mode="sampled", ignore_first_k=2), dict(mode="full", alpha=1.0),
                                dict(mode="full", alpha=0.5), dict(mode="topk", topk=6, alpha=0.0)],
                         ids=lambda kw: kw["mode"] + str(kw.get("alpha", "")))
def test_fused_equals_logits_form(backend, dtype, kw):
    n, h, v = 13, 16, 263  # v not a multiple of any tile
    # inputs representable in the test dtype, so the float64 reference sees the same values
    hs, w, b = (torch.randn(*shape).to(dtype).double() for shape in ((n, h), (v, h), (v,)))
    ht = (hs + 0.3 * torch.randn(n, h)).to(dtype).double()
    y = torch.randint(0, v, (n,))
    seq = torch.tensor([0] * 6 + [1] * 7)
    # float64 definition on logits
    hs64, w64, b64 = (x.clone().requires_grad_() for x in (hs, w, b))
    ref = hsd.hindsight_loss(hs64 @ w64.T + b64, ht @ w.T + b, y, seq_ids=seq, backend="reference",
                             **kw)
    ref.backward()
    # fused, in the test dtype
    hs_, w_, b_ = (x.to(dtype).requires_grad_() for x in (hs, w, b))
    out = hsd.fused_hindsight_loss(hs_, ht.to(dtype), w_, y, bias=b_, seq_ids=seq,
                                   backend=backend, **kw)
    out.backward()
    assert out.dtype == dtype
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    close(out, ref, rtol)
    for got, want in ((hs_.grad, hs64.grad), (w_.grad, w64.grad), (b_.grad, b64.grad)):
        assert got.dtype == dtype
        close(got, want, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_teacher_head_and_no_teacher_gradient(backend):
    n, h, v = 6, 8, 31
    hs, ht = torch.randn(n, h, requires_grad=True), torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    wt = torch.randn(v, h, requires_grad=True)
    bt = torch.randn(v, requires_grad=True)
    y = torch.randint(0, v, (n,))
    out = hsd.fused_hindsight_loss(hs, ht, w, y, teacher_weight=wt, teacher_bias=bt, mode="full",
                                   alpha=0.3, backend=backend)
    out.backward()
    assert ht.grad is None and wt.grad is None and bt.grad is None
    s = (hs.detach() @ w.detach().T).requires_grad_()
    ref = hsd.hindsight_loss(s, ht.detach() @ wt.detach().T + bt.detach(), y, mode="full",
                             alpha=0.3, backend="reference")
    ref.backward()
    close(out, ref, 1e-5)
    close(hs.grad, s.grad @ w.detach(), 1e-5)
    close(w.grad, s.grad.T @ hs.detach(), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_head_gets_student_side_gradient_only(backend):
    n, h, v = 5, 8, 19
    hs, ht = torch.randn(n, h, requires_grad=True), torch.randn(n, h)
    w = torch.randn(v, h, requires_grad=True)
    y = torch.randint(0, v, (n,))
    hsd.fused_hindsight_loss(hs, ht, w, y, backend=backend, mode="full", alpha=0.0).backward()
    w2 = w.detach().clone().requires_grad_()
    s = hs.detach() @ w2.T
    hsd.hindsight_loss(s, ht @ w.detach().T, y, mode="full", alpha=0.0, backend="reference").backward()
    close(w.grad, w2.grad, 1e-5)


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_gives_zero_and_masked_sequence_is_excluded(backend):
    s, t, y = make_logits(n=6, v=9, dtype=torch.float32)
    out = hsd.hindsight_loss(s, t, y, weights=torch.zeros(6), backend=backend)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(s.grad) == 0
    seq = torch.tensor([0, 0, 0, 1, 1, 1])
    w = torch.tensor([1.0, 1, 1, 0, 0, 0])
    both = hsd.hindsight_loss(s, t, y, weights=w, seq_ids=seq, backend=backend)
    first = hsd.hindsight_loss(s[:3], t[:3], y[:3], backend=backend)
    close(both, first, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    s, t, y = make_logits(n=1, v=5)
    for kw in (dict(mode="sampled"), dict(mode="full", alpha=0.5), dict(mode="topk", topk=2)):
        ref = naive_loss(s, t, y, **kw)
        close(hsd.hindsight_loss(s, t, y, backend=backend, **kw), ref, 1e-5)


EXTREME_MODES = [dict(mode="sampled"), dict(mode="full", alpha=1.0), dict(mode="full", alpha=0.3),
                 dict(mode="topk", topk=4, alpha=0.0)]


def _extreme_case(spread):
    """fp32 logits of magnitude 1e4 with masked (-inf) vocabulary entries on both sides.

    spread=False: large offsets (+1e4 student, -1e4 teacher) over O(1) differences, where fp32
    log-probabilities stay exact to ~1e-7. spread=True: entries spread over +-1e4, four of them
    within O(1) of the maximum, and the teacher O(1) away from the student: divergences of
    order 1 (not the ~1e-10 of one-hot rows, which a kernel returning 0 would match).
    """
    n, v = 7, 17
    mask = torch.zeros(v)
    mask[[3, 11]] = float("-inf")
    noise = 3.0 * torch.randn(n, v)
    if spread:
        s = 1e4 * torch.randn(n, v)
        top = torch.tensor([0, 5, 9, 16])
        s[:, top] = s.max(-1, keepdim=True).values + 2.0 * torch.randn(n, len(top))
        t = s + noise
    else:
        s = 1e4 + 2.0 * torch.randn(n, v)
        t = -1e4 + s - 1e4 + noise
    y = torch.randint(0, v, (n,))
    y = torch.where((y == 3) | (y == 11), torch.zeros_like(y), y)
    return (s + mask).requires_grad_(), t + mask, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spread", [False, True], ids=["offset", "spread"])
@pytest.mark.parametrize("kw", EXTREME_MODES, ids=lambda kw: kw["mode"] + str(kw.get("alpha", "")))
def test_extreme_and_masked_vocabulary_logits(backend, spread, kw):
    s, t, y = _extreme_case(spread)
    out = hsd.hindsight_loss(s, t, y, backend=backend, **kw)
    (g,) = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    ref = hsd.hindsight_loss(s64, t.double(), y, backend="reference", **kw)
    (g_ref,) = torch.autograd.grad(ref, s64)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    # spread: an fp32 log-probability near -2e4 carries ~1e-3 absolute rounding, and A_t is a
    # difference of two of them, so the sampled loss is only ~1e-3-accurate in any fp32 kernel
    rtol = 1e-3 if spread and kw["mode"] == "sampled" else 1e-5
    assert ref.abs() > 1e-2  # values a zero kernel cannot match
    close(out, ref, rtol, atol=0.0)
    close(g, g_ref, rtol, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_gives_nan_loss_or_clear_error(backend):
    s, t, y = make_logits(n=4, v=6, dtype=torch.float32)
    bad = s.detach().clone()
    bad[2, 1] = float("nan")
    assert torch.isnan(hsd.hindsight_loss(bad, t, y, backend=backend))
    assert torch.isnan(hsd.hindsight_loss(bad, t, y, mode="full", backend=backend))
    # a NaN on a masked token does not poison the loss
    assert torch.isfinite(hsd.hindsight_loss(bad, t, y, weights=torch.tensor([1.0, 1, 0, 1]),
                                             backend=backend))
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        hsd.hindsight_loss(bad, t, y, check_inputs=True, backend=backend)
    hs = torch.randn(4, 3)
    hs[0, 0] = float("nan")
    assert torch.isnan(hsd.fused_hindsight_loss(hs, torch.randn(4, 3), torch.randn(6, 3), y,
                                                backend=backend))


def test_token_mean_with_num_items_splits_over_accumulation_steps():
    s, t, y = make_logits(n=10, v=12)
    w = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    whole = hsd.hindsight_loss(s, t, y, weights=w, reduction="token_mean")
    (g_whole,) = torch.autograd.grad(whole, s)
    total = int(w.sum())
    parts = sum(hsd.hindsight_loss(s[i:i + 5], t[i:i + 5], y[i:i + 5], weights=w[i:i + 5],
                                   reduction="token_mean", num_items=total) for i in (0, 5))
    (g_parts,) = torch.autograd.grad(parts, s)
    close(parts, whole, 1e-12)
    close(g_parts, g_whole, 1e-12)


def test_ignore_index_targets_are_skipped():
    s, t, y = make_logits(n=6, v=9)
    y2 = y.clone()
    y2[[0, 4]] = -100
    a = hsd.hindsight_loss(s, t, y2, reduction="token_mean")
    b = hsd.hindsight_loss(s, t, y, weights=torch.tensor([0.0, 1, 1, 1, 0, 1]),
                           reduction="token_mean")
    close(a, b, 1e-12)


def test_module_wraps_functional_and_validates_early():
    n, h, v = 4, 6, 10
    hs, ht, w = torch.randn(n, h), torch.randn(n, h), torch.randn(v, h)
    y = torch.randint(0, v, (n,))
    mod = hsd.HindsightLoss(mode="full", alpha=0.5, reduction="token_mean")
    assert "alpha=0.5" in repr(mod)
    close(mod(hs, ht, w, y),
          hsd.fused_hindsight_loss(hs, ht, w, y, mode="full", alpha=0.5, reduction="token_mean"),
          1e-7)
    with pytest.raises(ValueError, match="alpha"):
        hsd.HindsightLoss(mode="full", alpha=2.0)
    with pytest.raises(ValueError, match="mode"):
        hsd.HindsightLoss(mode="kl")


# ---------------------------------------------------------------- bad input: clear errors
def test_bad_input_errors():
    s, t, y = make_logits(n=4, v=6, dtype=torch.float32)
    cases = [
        (dict(teacher_logits=t[:3]), ValueError, "differ in shape"),
        (dict(teacher_logits=t.double()), TypeError, "dtype"),
        (dict(teacher_logits=t.to("meta")), ValueError, "meta"),
        (dict(target_ids=torch.tensor([0, 1, 6, 2])), ValueError, "target id 6 is out of range"),
        (dict(target_ids=torch.tensor([0, 1, 2])), ValueError, "3 entries for 4 tokens"),
        (dict(target_ids=y.float()), TypeError, "integer"),
        (dict(target_ids=None), ValueError, "needs target_ids"),
        (dict(mode="topk", topk=7), ValueError, "exceeds the vocabulary size 6"),
        (dict(mode="topk"), ValueError, "topk >= 1"),
        (dict(mode="full", alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
        (dict(mode="full", alpha=-0.1), ValueError, "alpha"),
        (dict(mode="nope"), ValueError, "mode must be one of"),
        (dict(reduction="mean"), ValueError, "reduction must be one of"),
        (dict(num_items=4), ValueError, "num_items"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(weights=torch.ones(3)), ValueError, "weights has 3 entries"),
        (dict(seq_ids=torch.zeros(4)), TypeError, "seq_ids must be an integer"),
        (dict(backend="nope"), ValueError, "is not one of"),
    ]
    for overrides, exc, pattern in cases:
        kw = dict(teacher_logits=t, target_ids=y)
        kw.update(overrides)
        with pytest.raises(exc, match=pattern):
            hsd.hindsight_loss(s, **kw)
    with pytest.raises(ValueError, match="2-D"):
        hsd.hindsight_loss(s[0], t[0], y[:1])


def test_fused_bad_input_errors():
    hs, ht, w = torch.randn(4, 6), torch.randn(4, 6), torch.randn(10, 6)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="does not match hidden size"):
        hsd.fused_hindsight_loss(hs, ht, torch.randn(10, 5), y)
    with pytest.raises(ValueError, match="vocabulary or hidden size mismatch"):
        hsd.fused_hindsight_loss(hs, ht, w, y, teacher_weight=torch.randn(11, 6))
    with pytest.raises(ValueError, match="bias has 9 entries"):
        hsd.fused_hindsight_loss(hs, ht, w, y, bias=torch.randn(9))
    with pytest.raises(TypeError, match="dtype"):
        hsd.fused_hindsight_loss(hs, ht, w.double(), y)
    with pytest.raises(ValueError, match="target id 10 is out of range"):
        hsd.fused_hindsight_loss(hs, ht, w, torch.tensor([0, 10, 1, 1]))
    with pytest.raises(ValueError, match="teacher_hidden contains NaN"):
        bad = ht.clone()
        bad[1, 1] = float("nan")
        hsd.fused_hindsight_loss(hs, bad, w, y, check_inputs=True)


def test_forced_backend_via_environment(monkeypatch):
    monkeypatch.setenv("HSD_BACKEND", "torch")
    assert hsd.select_backend(torch.device("cpu")).name == "torch"
    monkeypatch.setenv("HSD_BACKEND", "cuda")
    if "cuda" not in available_backends():
        with pytest.raises(RuntimeError, match="not available"):
            hsd.select_backend(torch.device("cpu"))
    monkeypatch.delenv("HSD_BACKEND")
    assert hsd.select_backend(torch.device("cpu")).name in ("cpu", "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_recomputes_gradients(backend):
    hs, ht, w = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4), torch.randn(11, 4)
    w.requires_grad_()
    y = torch.randint(0, 11, (5,))
    loss = hsd.fused_hindsight_loss(hs, ht, w, y, mode="full", alpha=0.5, backend=backend)
    (2 * loss).backward(retain_graph=True)
    first = hs.grad.clone(), w.grad.clone()
    hs.grad = w.grad = None
    (2 * loss).backward()
    close(hs.grad, first[0], 1e-6)
    close(w.grad, first[1], 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_tail_is_the_off_support_mass(backend, alpha):
    # the support covers every unmasked entry: the tail is exactly empty on both sides, and
    # 1 - sum(p_topk) would leave a rounding residue (an infinite forward KL)
    v, k = 40, 6
    mask = torch.full((v,), float("-inf"))
    mask[torch.randperm(v)[:k]] = 0.0
    s = (torch.randn(5, v) + mask).requires_grad_()
    t = torch.randn(5, v) + mask
    kw = dict(mode="topk", topk=k, alpha=alpha)
    out = hsd.hindsight_loss(s, t, backend=backend, **kw)
    (g,) = torch.autograd.grad(out, s)
    full = hsd.hindsight_loss(s, t, mode="full", alpha=alpha, backend="reference")
    (g_full,) = torch.autograd.grad(full, s)
    close(out, full, 1e-5)  # an empty tail: top-k is the full divergence
    close(g, g_full, 1e-5)
    # a tiny but non-zero tail is resolved, not rounded away (float64: D itself is ~1e-8)
    s2 = torch.tensor([[20.0] * 3 + [0.0] * 3], dtype=torch.float64)
    t2 = torch.tensor([[20.0] * 3 + [2.0] * 3], dtype=torch.float64)
    tail = hsd.hindsight_loss(s2, t2, mode="topk", topk=3, alpha=0.0, backend=backend)
    p_tail = 3 * math.exp(-20) / (3 + 3 * math.exp(-20))
    q_tail = 3 * math.exp(-18) / (3 + 3 * math.exp(-18))
    q_sup = 1 - q_tail
    expected = q_tail * math.log(q_tail / p_tail) + q_sup * math.log(q_sup / (1 - p_tail))
    assert abs(tail.item() - expected) <= 1e-5 * expected
