"""The CUDA backend against the float64 reference (needs a GPU and a CUDA build of hsd._C), and
CPU twins of the kernel arithmetic that run everywhere."""

import math

import pytest
import torch

from hsd.backends import FULL, SAMPLED, TOPK, DivergenceSpec, cuda_backend, reference

from test_cpu_backend import (BF16_TOL, SPECS, assert_matches, cast, make_fused, make_logits,
                              run_fused)

requires_gpu = pytest.mark.skipif(not cuda_backend.is_available(),
                                  reason="needs a GPU and hsd._C built against a CUDA torch")
CUDA_TOL = 1e-4  # float32 with fast exp / log intrinsics


def to_cuda(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@requires_gpu
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_logits_matches_reference(spec):
    s, t, y, coef = make_logits(12, 1000)
    expected = reference.logits(s, t, y, coef, None, spec, True)
    actual = cuda_backend.logits(s.float().cuda(), t.float().cuda(), y.cuda(), coef.cuda(), None,
                                 spec, True)
    assert_matches([a.cpu() for a in actual], expected, CUDA_TOL, ("token_loss", "stats", "grad"))


@requires_gpu
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_fused_matches_reference(spec):
    inputs = make_fused(19, 24, 257)
    expected = run_fused(reference, inputs, spec)
    actual = run_fused(cuda_backend, to_cuda(cast(inputs, torch.float32)), spec)
    assert_matches([a.cpu() if a is not None else None for a in actual], expected, CUDA_TOL,
                   ("token_loss", "stats", "grad_hidden", "grad_weight", "grad_bias"))


@requires_gpu
@pytest.mark.parametrize("spec", [DivergenceSpec(mode=SAMPLED, signal_clip=0.5),
                                  DivergenceSpec(mode=FULL, alpha=0.5, temperature=0.7),
                                  DivergenceSpec(mode=TOPK, topk=7, kl_clip=0.5)], ids=repr)
def test_bf16_matches_reference(spec):
    inputs = cast(make_fused(13, 32, 1000), torch.bfloat16)
    expected = run_fused(reference, cast(inputs, torch.float64), spec)
    actual = run_fused(cuda_backend, to_cuda(inputs), spec)
    assert_matches([a.cpu() if a is not None else None for a in actual], expected, BF16_TOL,
                   ("token_loss", "stats", "grad_hidden", "grad_weight", "grad_bias"))


@requires_gpu
def test_nan_rows_and_skipped_rows():
    s, t, y, coef = (x.cuda() for x in make_logits(6, 300))
    s = s.float()
    s[2, 5] = float("nan")
    coef[2] = 1.0
    loss, _, grad = cuda_backend.logits(s, t.float(), y, coef, None, DivergenceSpec(mode=FULL), True)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.all(grad[coef == 0] == 0)


@requires_gpu
def test_fused_path_does_not_synchronise():
    """The op checks shapes only (hsd.loss checks the target range once per call), so the
    per-chunk calls never make the host wait."""
    inputs = to_cuda(cast(make_fused(19, 24, 257), torch.bfloat16))
    for spec in (SPECS[0], DivergenceSpec(mode=TOPK, topk=7)):
        run_fused(cuda_backend, inputs, spec)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_fused(cuda_backend, inputs, spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@requires_gpu
def test_nan_signal_stays_nan_through_the_clip():
    """A target masked on both sides gives A = -inf - (-inf) = NaN; the signal clip keeps it
    (fmin / fmax would have turned it into the clip value), as the definition does."""
    s, t, y, coef = make_logits(4, 300)
    s, t = s.float(), t.float()
    s[1, y[1]] = t[1, y[1]] = float("-inf")
    spec = DivergenceSpec(mode=SAMPLED, signal_clip=0.5)
    expected = reference.logits(s.double(), t.double(), y, coef, None, spec, True)
    actual = cuda_backend.logits(s.cuda(), t.cuda(), y.cuda(), coef.cuda(), None, spec, True)
    assert torch.isnan(expected[0][1]) and torch.isnan(actual[0][1].cpu())
    keep = torch.tensor([0, 2, 3])
    assert_matches([actual[0].cpu()[keep]], [expected[0][keep]], CUDA_TOL, ("token_loss",))


def _support_far_in_the_teacher_tail():
    """Teacher log-probabilities ~ -1000 on the student's top-k ids: exp underflows there."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 300, generator=g, dtype=torch.float64)
    t = torch.randn(4, 300, generator=g, dtype=torch.float64)
    s[:, :6] += 8.0  # the student's support
    t[:, :6] -= 1000.0
    y = torch.randint(0, 300, (4,), generator=g)
    coef = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
    return s.float().double(), t.float().double(), y, coef  # float32 inputs, exactly


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_renormalised_topk_support_far_in_the_tail_cpu(alpha):
    """The case below on the CPU backend (runs everywhere): finite, and as the reference."""
    from hsd.backends import cpu
    if not cpu.is_available():
        pytest.skip("hsd._C is not built")
    s, t, y, coef = _support_far_in_the_teacher_tail()
    spec = DivergenceSpec(mode=TOPK, alpha=alpha, topk=6, tail=False)
    expected = reference.logits(s, t, y, coef, None, spec, True)
    assert torch.isfinite(expected[0]).all()
    actual = cpu.logits(s.float(), t.float(), y, coef.float(), None, spec, True)
    assert_matches(actual, expected, 1e-5, ("token_loss", "stats", "grad"))


@requires_gpu
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_renormalised_topk_support_far_in_the_tail(alpha):
    """Without a tail the support renormalises by its log-sum-exp, shifted by its maximum."""
    s, t, y, coef = _support_far_in_the_teacher_tail()
    spec = DivergenceSpec(mode=TOPK, alpha=alpha, topk=6, tail=False)
    expected = reference.logits(s, t, y, coef, None, spec, True)
    actual = cuda_backend.logits(s.float().cuda(), t.float().cuda(), y.cuda(),
                                 coef.float().cuda(), None, spec, True)
    assert torch.isfinite(actual[0]).all()
    assert_matches([a.cpu() for a in actual], expected, CUDA_TOL, ("token_loss", "stats", "grad"))


# ----------------------------------------------------------------------------------------------
# CPU twin of the CUDA kernel's top-k arithmetic (hindsight_rows.cu), which cannot run here:
# the same steps in the same precisions (float32 where the kernel is float, float64 where it is
# double), against the float64 definition. Keep in step with the .cu file.
# ----------------------------------------------------------------------------------------------
def _plogratio64(lp, lq):
    inf = float("inf")
    unbounded = (lq == -inf) & ~lp.isnan()
    value = torch.where(unbounded, inf, lp.exp() * (lp - lq))
    return torch.where(lp == -inf, 0.0, value)


def _bucket_term(lp, lq, alpha):
    """bucket_term: (share of D, slope) per bucket, float64."""
    if alpha == 0.0:
        return _plogratio64(lq, lp), -lq.exp()
    if alpha == 1.0:
        slope = _plogratio64(lp, lq)
        return slope, slope
    lm = torch.logaddexp(lp + math.log1p(-alpha), lq + math.log(alpha))
    slope = (1.0 - alpha) * _plogratio64(lp, lm)
    return slope + alpha * _plogratio64(lq, lm), slope


def cuda_topk_row_twin(s, t, ids, coef, spec, tail_as_complement=False):
    """One row of the kernel's top-k branch: (loss, divergence, grad_logits float32).

    ``tail_as_complement`` reproduces the previous kernel (tail = max(1 - sum p_support, 0)).
    """
    s, t = s.float(), t.float()
    inv_t32 = torch.tensor(1.0 / spec.temperature, dtype=torch.float32)
    inv_t = 1.0 / spec.temperature
    m_s, m_t = s.max(), t.max()  # pass 1: float32 max and sum of exp
    z_s, z_t = ((s - m_s) * inv_t32).exp().sum(), ((t - m_t) * inv_t32).exp().sum()
    lz_s, lz_t = z_s.log(), z_t.log()
    s64, t64 = s.double(), t.double()
    lp = (s64[ids] - m_s.double()) * inv_t - lz_s.double()
    lq = (t64[ids] - m_t.double()) * inv_t - lz_t.double()
    shift_s = shift_t = tail_s = tail_t = 0.0
    if spec.tail and tail_as_complement:
        tail_s = max(1.0 - lp.exp().sum().item(), 0.0)
        tail_t = max(1.0 - lq.exp().sum().item(), 0.0)
    elif spec.tail:
        rank = t if spec.topk_from_teacher else s
        kth = rank[ids].min()
        es = ((s64 - m_s.double()) * inv_t).exp()
        et = ((t64 - m_t.double()) * inv_t).exp()
        below, tied = rank < kth, rank == kth
        off_s, off_t = es[below].sum().item(), et[below].sum().item()
        sup_tied = tied[ids]
        n_out = tied.sum().item() - sup_tied.sum().item()
        if n_out > 0:
            rank_m = (m_t if spec.topk_from_teacher else m_s).double()
            exact = n_out * math.exp((kth.double() - rank_m).item() * inv_t)
            rest_s = max(es[tied].sum().item() - es[ids][sup_tied].sum().item(), 0.0)
            rest_t = max(et[tied].sum().item() - et[ids][sup_tied].sum().item(), 0.0)
            off_s += rest_s if spec.topk_from_teacher else exact
            off_t += exact if spec.topk_from_teacher else rest_t
        tail_s, tail_t = off_s / z_s.double().item(), off_t / z_t.double().item()
    else:
        top_s, top_t = lp.max(), lq.max()
        shift_s = (top_s + (lp - top_s).exp().sum().log()).item()
        shift_t = (top_t + (lq - top_t).exp().sum().log()).item()
    d_sup, slope_sup = _bucket_term(lp - shift_s, lq - shift_t, spec.alpha)
    div, slope_sum = d_sup.sum().item(), slope_sup.sum().item()
    slope_tail = 0.0
    if spec.tail:
        d_tail, sl_tail = _bucket_term(torch.tensor(tail_s).log(), torch.tensor(tail_t).log(),
                                       spec.alpha)
        div, slope_tail = div + d_tail.item(), sl_tail.item()
    clipped = spec.kl_clip > 0 and div > spec.kl_clip
    loss = spec.kl_clip if clipped else div
    grad = torch.zeros_like(s)
    factor = coef * inv_t
    if coef != 0 and not clipped:
        per_tail = slope_tail / tail_s if tail_s > 0 else 0.0
        off = (-slope_sum + (1.0 - tail_s) * per_tail) * factor if spec.tail else 0.0
        grad = ((s - m_s) * inv_t32 - lz_s).exp() * torch.tensor(off, dtype=torch.float32)
        total = slope_sum + slope_tail if spec.tail else slope_sum
        grad[ids] = ((slope_sup - (lp - shift_s).exp() * total) * factor).float()
    return loss, div, grad


def _assert_twin_grad(grad, ref, coef, div):
    """Within CUDA_TOL of the largest entry, plus float32's resolution of the log-probabilities
    (~1.2e-7) times the divergence's scale: confident rows have near-zero gradients made of
    |log p - log q|-sized terms that the kernel's float32 normalisers round."""
    bound = CUDA_TOL * ref.abs().max().item() + 1.2e-7 * abs(coef) * max(1.0, abs(div))
    err = (grad.double() - ref).abs().max().item()
    assert err <= bound, f"grad error {err:.3e} > {bound:.3e}"


def _peaked_rows(confident, v=1000, rows=4, seed=0):
    """Logits where ``confident`` ('teacher' / 'student' / 'both' / 'moderate') puts nearly all
    mass on a few entries (hindsight teachers are often this sure)."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(rows, v, generator=g) * 2, torch.randn(rows, v, generator=g) * 2
    scale = {"moderate": 4.0}.get(confident, 12.0)
    if confident in ("teacher", "both", "moderate"):
        t = t * scale
    if confident in ("student", "both", "moderate"):
        s = s * scale
    return s, t


@pytest.mark.parametrize("case", [
    # (alpha, ranked by the teacher, who is confident): the three situations
    (1.0, True, "teacher"), (0.0, False, "student"), (0.5, True, "moderate"),
    (1.0, False, "both"), (0.0, True, "both"),
], ids=lambda c: f"a{c[0]}-{'teacher' if c[1] else 'student'}-ranked-{c[2]}")
@pytest.mark.parametrize("kl_clip", [0.0, 50.0])
def test_cuda_topk_tail_twin_on_peaked_logits(case, kl_clip):
    """The kernel's tail summed directly is finite and within CUDA_TOL of the definition on
    confident sides (V=1000, k=20), where 1 - sum p_support is 0 in floating point and gave
    +inf."""
    from hsd.definition import topk_support
    alpha, from_teacher, confident = case
    s, t = _peaked_rows(confident)
    spec = DivergenceSpec(mode=TOPK, alpha=alpha, topk=20, topk_from_teacher=from_teacher,
                          kl_clip=kl_clip)
    coef = torch.full((s.shape[0],), 0.7, dtype=torch.float64)
    ref_loss, ref_stats, ref_grad = reference.logits(s.double(), t.double(), None, coef, None,
                                                     spec, True)
    ids = topk_support((t if from_teacher else s).double(), 20)
    complement_inf = 0
    for r in range(s.shape[0]):
        loss, div, grad = cuda_topk_row_twin(s[r], t[r], ids[r], 0.7, spec)
        assert math.isfinite(div)
        assert abs(div - ref_stats[r, 3].item()) <= CUDA_TOL * max(1.0, abs(ref_stats[r, 3].item()))
        assert abs(loss - ref_loss[r].item()) <= CUDA_TOL * max(1.0, abs(ref_loss[r].item()))
        _assert_twin_grad(grad, ref_grad[r], 0.7, div)
        old = cuda_topk_row_twin(s[r], t[r], ids[r], 0.7, spec, tail_as_complement=True)[1]
        complement_inf += not math.isfinite(old)
    # the previous arithmetic: +inf where the other side's tail is 0 in floating point
    if case in [(1.0, True, "teacher"), (0.0, False, "student")]:
        assert complement_inf > 0


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("from_teacher", [False, True])
def test_cuda_topk_twin_with_ties_at_the_kth_rank(from_teacher, tail):
    """Small-integer logits: many entries equal the k-th ranked one; with the contract's
    support ids (cuda_ops.cpp's selection, kernels/topk.py's twin) the kernel's tie
    bookkeeping gives the definition's loss and gradients."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "kernels" / "topk.py"
    spec_mod = importlib.util.spec_from_file_location("_hsd_topk_twin", path)
    topk_mod = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(topk_mod)
    g = torch.Generator().manual_seed(9)
    s = torch.randint(-3, 2, (4, 200), generator=g).float()
    t = torch.randint(-3, 2, (4, 200), generator=g).float() + 0.5 * (torch.arange(200) % 3 == 0)
    spec = DivergenceSpec(mode=TOPK, alpha=0.5, topk=9, topk_from_teacher=from_teacher, tail=tail)
    coef = torch.full((4,), 1.3, dtype=torch.float64)
    ref_loss, _, ref_grad = reference.logits(s.double(), t.double(), None, coef, None, spec, True)
    ids = topk_mod.topk_support(t if from_teacher else s, 9)
    for r in range(4):
        loss, div, grad = cuda_topk_row_twin(s[r], t[r], ids[r], 1.3, spec)
        assert abs(loss - ref_loss[r].item()) <= CUDA_TOL * max(1.0, abs(ref_loss[r].item()))
        _assert_twin_grad(grad, ref_grad[r], 1.3, div)


def test_cuda_twin_underflow_against_minus_inf():
    """p > 0 = q with p below float32's range: +inf (the kernel's plogratio and full_term)."""
    s = torch.zeros(50)
    t = torch.zeros(50)
    s[3], t[3] = -200.0, float("-inf")
    spec = DivergenceSpec(mode=TOPK, alpha=1.0, topk=50, tail=False)
    loss, div, _ = cuda_topk_row_twin(s, t, torch.arange(50), 1.0, spec)
    assert div == float("inf")
    ref = reference.logits(s[None].double(), t[None].double(), None, torch.ones(1), None, spec,
                           False)
    assert ref[1][0, 3].item() == float("inf")


# ----------------------------------------------------------------------------------------------
# The backend's Python side (chunking, gradient needs, in-place products) on CPU tensors: the
# kernel op has a CPU implementation in hsd._C, so everything but the .cu kernel runs here.
# ----------------------------------------------------------------------------------------------
requires_op = pytest.mark.skipif(not hasattr(torch.ops.hsd, "hindsight_from_logits"),
                                 reason="hsd._C is not built")


@requires_op
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True),
                                   (False, False, False)], ids=lambda n: "hwb-" + "".join(
                                       "1" if f else "0" for f in n))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_chunks_and_grad_needs_on_cpu(needs, dtype, monkeypatch):
    from hsd.backends import GradNeeds
    import hsd._C  # noqa: F401 - registers the op
    monkeypatch.setattr(cuda_backend, "CHUNK_ELEMENTS", 5 * 257)  # ragged chunks of 5 rows
    products = []
    real = cuda_backend._mm_into
    monkeypatch.setattr(cuda_backend, "_mm_into", lambda out, *a: (products.append(out.shape),
                                                                    real(out, *a)))
    inputs = make_fused(13, 24, 257)
    spec = DivergenceSpec(mode=TOPK, topk=7, alpha=0.5, kl_clip=2.0)
    expected = run_fused(reference, inputs, spec)
    actual = run_fused(cuda_backend, cast(inputs, dtype), spec, GradNeeds(*needs))
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    names = ("token_loss", "stats", "grad_hidden", "grad_weight", "grad_bias")
    expected = list(expected[:2]) + [e if f else None for e, f in zip(expected[2:], needs)]
    assert_matches(actual, expected, tol, names)
    if needs[1]:
        assert actual[3].dtype == torch.float32
    # the [V, H] product runs (in place, once per chunk) only for a weight gradient
    assert products.count(torch.Size([257, 24])) == (3 if needs[1] else 0)


def test_out_dtype_probe_lets_out_of_memory_through(monkeypatch):
    """Only an unsupported signature selects the float32 fallback; an OOM is an OOM."""
    from helpers import check_out_dtype_mm_probe

    from hsd.backends import gemm

    assert cuda_backend.out_dtype_mm_supported is gemm.out_dtype_mm_supported  # one probe
    check_out_dtype_mm_probe(monkeypatch, gemm, gemm.out_dtype_mm_supported)


def _full_term_twin(lps, lpt, alpha):
    """full_term of hindsight_rows.cu for alpha in {0, 1} (float32): the entry's share of D."""
    inf = torch.tensor(float("inf"))
    if alpha == 1.0:
        value = torch.where(lpt == -inf, inf, lps.exp() * (lps - lpt))
        return torch.where(lps == -inf, 0.0, value)
    value = torch.where(lps == -inf, inf, lpt.exp() * (lpt - lps))
    return torch.where(lpt == -inf, 0.0, value)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_cuda_full_term_twin_underflow_against_minus_inf(alpha):
    """Full mode: the side whose probability underflows in float32 (log p = -200) against the
    other side's -inf gives +inf, as the float64 definition (0 * inf = NaN before)."""
    s, t = torch.zeros(1, 40), torch.zeros(1, 40)
    if alpha == 1.0:
        s[0, 5], t[0, 5] = -200.0, float("-inf")
    else:
        t[0, 5], s[0, 5] = -200.0, float("-inf")
    lps, lpt = torch.log_softmax(s, -1)[0], torch.log_softmax(t, -1)[0]
    assert (lps if alpha == 1.0 else lpt)[5].exp() == 0  # underflows in float32
    div = _full_term_twin(lps, lpt, alpha).sum()
    ref = reference.logits(s.double(), t.double(), None, torch.ones(1), None,
                           DivergenceSpec(mode=FULL, alpha=alpha), False)
    assert div == float("inf") and ref[1][0, 3] == float("inf")
