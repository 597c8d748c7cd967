"""The C++ row kernels (hsd._C) for JSD and top-k rows against the float64 definition.

Covers what the vectorised rows and the threshold top-k selection could get wrong: the
generalised JSD (0 < alpha < 1), top-k supports of every size (the block-maximum bound, partial
blocks, k = V), the stable tie rule at the k-th rank, the off-support mass of peaked rows (float
exp underflows there), -inf masks, float32 underflow against -inf (the +inf limit that kl_clip
caps), bf16 inputs, the fused op and the public autograd path; forward and gradient. The AVX2
and baseline variants (what CPUs without AVX-512 run) are checked too, through HSD_CPU_ISA.
"""

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

import hsd
from hsd import _extension
from hsd.backends import FULL, TOPK, DivergenceSpec, GradNeeds, cpu, reference
from hsd.definition import topk_support

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="hsd._C is not built")

FP32_TOL = 2e-5


def rel_err(actual, expected):
    """Max abs difference relative to the max norm of the expected tensor."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def run_logits(backend, s, t, y, coef, spec, grad=True):
    return backend.logits(s, t, y, coef, None, spec, grad)


def check_logits(s, t, y, coef, spec, tol=FP32_TOL, grad_tol=None, grad_floor=0.0):
    """The kernel on s, t (any float dtype) against the definition on the same values in float64.

    Errors are relative to the largest expected value; ``grad_floor`` raises that scale for
    gradients that cancel to far below their O(coef) terms (saturated rows), which float32
    cannot resolve."""
    expected = run_logits(reference, s.double(), t.double(), y, coef, spec)
    got = run_logits(cpu, s, t, y, coef, spec)
    for name, a, e, tl in zip(("loss", "stats", "grad"), got, expected,
                              (tol, tol, grad_tol or tol)):
        assert a.shape == e.shape, name
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), name
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        infinite = torch.isinf(e)
        assert torch.equal(a[infinite].double(), e[infinite]), name  # the same infinities
        a, e = torch.where(finite, a.double(), 0.0), torch.where(finite, e, 0.0)
        floor = grad_floor if name == "grad" else 0.0
        err = ((a - e).abs().max() / e.abs().max().clamp_min(max(floor, 1e-30))).item()
        assert err <= tl, f"{name}: {err:.2e} > {tl:.0e} for {spec}"
    assert torch.all(got[2][coef == 0] == 0)
    return got


def logits_pair(n, vocab, scale=3.0, dtype=torch.float32):
    s = torch.randn(n, vocab, dtype=torch.float64) * scale
    t = s + torch.randn(n, vocab, dtype=torch.float64) * scale * 0.5
    coef = torch.rand(n)
    coef[1::5] = 0.0
    return s.to(dtype), t.to(dtype), torch.randint(0, vocab, (n,)), coef


# ------------------------------------------------------------------ JSD rows (0 < alpha < 1)
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_full_jsd_rows_match_definition(alpha, temperature):
    # V not a multiple of the kernels' 1024-entry reduction blocks
    s, t, y, coef = logits_pair(9, 2500)
    check_logits(s, t, y, coef, DivergenceSpec(mode=FULL, alpha=alpha, temperature=temperature))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_rows_bf16_and_peaked(alpha):
    s, t, y, coef = logits_pair(8, 1500, dtype=torch.bfloat16)
    check_logits(s, t, y, coef, DivergenceSpec(mode=FULL, alpha=alpha), grad_tol=1e-2)
    # peaked rows: most probabilities underflow float32 on one side or both
    s, t, y, coef = logits_pair(8, 1500, scale=60.0)
    check_logits(s, t, y, coef, DivergenceSpec(mode=FULL, alpha=alpha), tol=1e-4)


def test_jsd_mixture_where_both_sides_underflow():
    """p_s and p_t both below float32's range: the mixture is taken in log space, not log(0)."""
    s = torch.zeros(2, 300)
    t = torch.zeros(2, 300)
    s[:, 0] = 200.0  # every other student entry has log p = -200
    t[:, 1] = 150.0  # every other teacher entry has log p = -150
    coef = torch.ones(2)
    check_logits(s, t, None, coef, DivergenceSpec(mode=FULL, alpha=0.5), tol=1e-5)


# ------------------------------------------------------------------ top-k rows
TOPK_CASES = [(1, 2000), (7, 2000), (64, 4099), (200, 1000), (999, 1000), (1000, 1000)]


@pytest.mark.parametrize("k,vocab", TOPK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_rows_match_definition(k, vocab, alpha):
    s, t, y, coef = logits_pair(6, vocab)
    for from_teacher in (False, True):
        for tail in (True, False):
            check_logits(s, t, y, coef, DivergenceSpec(mode=TOPK, alpha=alpha, topk=k, tail=tail,
                                                       topk_from_teacher=from_teacher,
                                                       temperature=0.8))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_bf16_and_extreme_logits(alpha):
    s, t, y, coef = logits_pair(8, 3000, dtype=torch.bfloat16)
    check_logits(s, t, y, coef, DivergenceSpec(mode=TOPK, alpha=alpha, topk=16), grad_tol=1e-2)
    s, t, y, coef = logits_pair(8, 3000, scale=30.0)  # peaked, gradients still informative
    check_logits(s, t, y, coef, DivergenceSpec(mode=TOPK, alpha=alpha, topk=16), tol=1e-4)
    # saturated rows: the loss is exact, the gradients cancel to ~1e-18
    s, t, y, coef = logits_pair(8, 3000, scale=1e3)
    check_logits(s, t, y, coef, DivergenceSpec(mode=TOPK, alpha=alpha, topk=16), tol=1e-5,
                 grad_floor=1e-6)


def tie_logits(n, vocab, kind):
    """Logits with many ties at every rank: a small integer set, or bf16-rounded values."""
    if kind == "integers":
        return torch.randint(-3, 3, (n, vocab)).float()
    return (torch.randn(n, vocab) * 2).bfloat16().float()


@pytest.mark.parametrize("kind", ["integers", "bf16"])
@pytest.mark.parametrize("from_teacher", [False, True])
@pytest.mark.parametrize("k", [37, 700])  # blocks of 13 entries; every entry its own block
def test_topk_ties_pick_the_stable_sort_support(kind, from_teacher, k):
    """Contract B: among logits equal to the k-th largest, the lower vocabulary ids are in."""
    n, vocab = 8, 2000
    ranked = tie_logits(n, vocab, kind)
    other = torch.randn(n, vocab) * 2
    s, t = (other, ranked) if from_teacher else (ranked, other)
    coef = torch.rand(n) + 0.1
    support = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, topk_support(ranked, k), True)
    kth = ranked.sort(-1, descending=True).values[:, k - 1 : k]
    tied_out = ((ranked == kth) & ~support).any(-1)  # rows where the tie rule decides
    assert tied_out.float().mean() >= (1.0 if kind == "integers" else 0.25), tied_out
    for alpha in (0.0, 0.5, 1.0):
        spec = DivergenceSpec(mode=TOPK, alpha=alpha, topk=k, tail=False,
                              topk_from_teacher=from_teacher)
        _, _, grad = check_logits(s, t, None, coef, spec)
        assert torch.all(grad[~support] == 0)  # renormalised: the gradient lives on the support
        assert (grad[support] != 0).float().mean() > 0.9
        check_logits(s, t, None, coef, dataclasses.replace(spec, tail=True))


def test_topk_ties_fused_op():
    """The fused op ranks its own float32 logits: integer hidden states and head make them exact,
    so ties are ties on both sides of the comparison."""
    n, hidden, vocab = 12, 6, 2000
    h = torch.randint(-1, 2, (n, hidden)).double()
    th = torch.randint(-1, 2, (n, hidden)).double()
    w = torch.randint(-1, 2, (vocab, hidden)).double()
    coef = torch.rand(n, dtype=torch.float32) + 0.1
    for spec in (DivergenceSpec(mode=TOPK, alpha=1.0, topk=50),
                 DivergenceSpec(mode=TOPK, alpha=0.5, topk=50, tail=False),
                 DivergenceSpec(mode=TOPK, alpha=0.0, topk=50, topk_from_teacher=True)):
        expected = reference.fused(h, th, w, None, w, None, None, coef, None, spec, True)
        got = cpu.fused(h.float(), th.float(), w.float(), None, w.float(), None, None, coef, None,
                        spec, GradNeeds(True, True, False))
        for a, e in zip(got[:4], expected[:4]):
            assert rel_err(a, e) <= FP32_TOL


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_tail_of_a_peaked_row(alpha):
    """The off-support mass of a peaked row is below float32 exp's range relative to the row
    maximum (e^-95): it is summed relative to its own maximum, not lost as log 0 = -inf (which
    would make forward KL +inf)."""
    n, vocab, k = 4, 2000, 10
    s = torch.full((n, vocab), -95.0, dtype=torch.float64) + torch.rand(n, vocab)
    s[:, :k] = torch.rand(n, k) * 2
    t = torch.randn(n, vocab, dtype=torch.float64)  # the teacher's mass is mostly in s's tail
    coef = torch.ones(n)
    got = check_logits(s.float(), t.float(), None, coef, DivergenceSpec(mode=TOPK, alpha=alpha,
                                                                        topk=k), tol=1e-5)
    assert torch.isfinite(got[0]).all()


def test_topk_with_masked_vocabulary():
    """-inf entries: a k larger than the finite entries puts -inf ids in the support (lower ids
    first), and an all -inf off-support bucket is empty on that side."""
    s, t, y, coef = logits_pair(6, 1500)
    s[:, 1::2] = -math.inf
    t[:, 1::3] = -math.inf
    y = torch.zeros(6, dtype=torch.long)
    for k in (20, 800, 1499):
        for alpha in (0.0, 0.5, 1.0):
            check_logits(s, t, y, coef, DivergenceSpec(mode=TOPK, alpha=alpha, topk=k, tail=True,
                                                       kl_clip=50.0))


def test_topk_nan_rows_give_nan():
    s, t, y, coef = logits_pair(4, 1000)
    coef = torch.ones(4)
    s[1] = math.nan  # the ranked side is all NaN: fewer than k comparable entries
    s[2, 500] = math.nan
    t[3, 7] = math.nan
    loss, stats, grad = run_logits(cpu, s, t, y, coef, DivergenceSpec(mode=TOPK, topk=30))
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0]).all()


# ------------------------------------------------------------------ float32 underflow vs -inf
@pytest.mark.parametrize("mode,alpha", [(FULL, 1.0), (FULL, 0.0), (TOPK, 1.0), (TOPK, 0.0)])
def test_underflow_against_minus_inf_is_plus_inf_then_clipped(mode, alpha):
    """p = e^-800 underflows (float32 and float64) to 0 where the other side's logit is -inf:
    the term is the limit +inf, as in the definition, not 0 * inf = NaN, so kl_clip caps the
    token and zeroes its gradient."""
    n, vocab = 3, 300
    present = torch.zeros(n, vocab)
    present[:, 0] = 800.0  # every other entry: log p = -800
    masked = present.clone()
    masked[:, 1] = -math.inf  # this side has probability 0 at id 1
    # alpha = 1 sums p_s log(p_s / p_t): the teacher is the masked side; alpha = 0 the reverse
    s, t = (present, masked) if alpha == 1.0 else (masked, present)
    coef = torch.ones(n)
    for kl_clip in (0.0, 7.5):
        # top-k: id 1 is in the support of the present side's ranking ({0, 1, 2}, ties by id)
        spec = DivergenceSpec(mode=mode, alpha=alpha, topk=3 if mode == TOPK else 0,
                              topk_from_teacher=alpha == 0.0, kl_clip=kl_clip)
        expected = run_logits(reference, s.double(), t.double(), None, coef, spec)
        loss, stats, grad = run_logits(cpu, s, t, None, coef, spec)
        assert torch.all(expected[1][:, 3] == math.inf)
        assert torch.all(stats[:, 3] == math.inf), stats[:, 3]
        if kl_clip:
            assert torch.all(loss == kl_clip) and torch.all(grad == 0)
        else:
            assert torch.all(loss == math.inf)


# ------------------------------------------------------------------ public API, autograd
@pytest.mark.parametrize("kw", [dict(mode="full", alpha=0.5),
                                dict(mode="topk", topk=9, alpha=0.5),
                                dict(mode="topk", topk=9, tail=False, topk_support="teacher")],
                         ids=repr)
def test_public_api_cpu_matches_reference(kw):
    """hsd.hindsight_loss(backend="cpu") with a mask and per-sequence means, forward and
    backward, against the definition in float64; float64 inputs run the double kernels."""
    s, t, y, _ = logits_pair(12, 1200)
    s[:, -100:] = t[:, -50:] = -math.inf  # a masked vocabulary tail
    y[0] = -100  # ignored token
    seq_ids = torch.tensor([0] * 5 + [1] * 7)
    results = {}
    for backend, dtype in (("reference", torch.float64), ("cpu", torch.float32),
                           ("cpu", torch.float64)):
        x = s.to(dtype).clone().requires_grad_()
        loss = hsd.hindsight_loss(x, t.to(dtype), y, seq_ids=seq_ids, kl_clip=30.0,
                                  backend=backend, **kw)
        loss.backward()
        results[backend, dtype] = (loss.detach().double(), x.grad.double())
    expected = results["reference", torch.float64]
    for key, tol in ((("cpu", torch.float32), FP32_TOL), (("cpu", torch.float64), 1e-10)):
        for got, want in zip(results[key], expected):
            assert rel_err(got, want) <= tol, (key, rel_err(got, want))


# ------------------------------------------------------------------ every ISA variant
def test_row_kernel_isa_is_the_requested_one():
    isa = _extension.row_kernel_isa()
    assert isa in ("x86-64-v4", "x86-64-v3", "x86-64", "portable")
    requested = os.environ.get("HSD_CPU_ISA")
    if requested:
        assert isa == requested


# a cross-section of this file: JSD, top-k at every selection path, ties, peaked rows, +inf
LOWER_ISA_SUBSET = ("isa_is_the_requested or jsd_rows_match or rows_bf16 or (ties_pick and 37) or "
                    "peaked or underflow or (topk_rows_match and (64 or 200))")


@pytest.mark.parametrize("isa", ["x86-64-v3", "x86-64"])
def test_lower_isa_variants_match_definition(isa):
    """The kernels are compiled for x86-64-v4, -v3 and baseline x86-64 and the CPU picks the
    best: run the checks above on the lower variants too, in a process that asks for them."""
    best = _extension.row_kernel_isa()
    if best == "portable":
        pytest.skip("a single portable build (not GCC on x86-64): there are no ISA variants")
    if isa == "x86-64-v3" and best == "x86-64":
        pytest.skip("this CPU has no AVX2: the x86-64-v3 variant cannot run here")
    env = {**os.environ, "HSD_CPU_ISA": isa}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", LOWER_ISA_SUBSET], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "deselected" in proc.stdout
