"""The ``"triton"`` backend against the float64 reference, on tiny shapes.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``
must be set before any kernel module is imported); with one, the same cases run compiled on
CUDA tensors. Shapes stay tiny because interpreter cost grows with programs x tiles.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import hsd  # noqa: E402
from hsd.backends import FULL, SAMPLED, TOPK, DivergenceSpec, reference  # noqa: E402
from hsd.backends import triton_backend  # noqa: E402
from hsd.backends import torch_chunked  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETING else "cuda")

pytestmark = [
    pytest.mark.skipif(not triton_backend.is_available() or not triton_backend.supports(DEVICE),
                       reason="triton backend unavailable (no GPU and TRITON_INTERPRET unset)"),
    # masked lanes compute (-inf) - (-inf) and log(0) under a where(); numpy warns about it
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

N, H, V = 13, 24, 300  # V is not a multiple of the 128-wide interpreter tile
SEED_OFFSET = int(os.environ.get("HSD_TEST_SEED", 0))  # vary it to fuzz the inputs


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Five-row chunks, so the fused path walks several chunks and a ragged last one."""
    fused_linear = triton_backend.kernels().fused_linear
    monkeypatch.setattr(fused_linear, "CHUNK_ELEMENTS", 5 * V)


def assert_close(got, ref, rtol, atol=1e-6, what=""):
    """max|got - ref| <= rtol * max|ref| + atol, with matching non-finite entries."""
    assert got is not None and ref is not None, what
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    got = got.detach().double()
    ref = ref.detach().double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite], ref[~finite]), f"{what}: infinities differ"
    if finite.any():
        err = (got[finite] - ref[finite]).abs().max().item()
        bound = rtol * ref[finite].abs().max().item() + atol
        assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def make_inputs(n=N, hidden=H, vocab=V, dtype=torch.float32, logit_scale=1.5, bias="random",
                separate_teacher=False, coef="random", advantage=False, boost_ids=None):
    """Hidden states, heads and per-token arrays on DEVICE (teacher hidden independent)."""
    key = repr((n, hidden, vocab, dtype, logit_scale, bias, separate_teacher, coef, advantage))
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + SEED_OFFSET)
    h = torch.randn(n, hidden, generator=g)
    ht = 0.6 * h + 0.8 * torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (logit_scale / hidden ** 0.5)
    b = None if bias is None else 0.5 * torch.randn(vocab, generator=g)
    if logit_scale >= 1e3:
        # large logits computed exactly by a float32 GEMM (small integers times multiples of
        # 1/64), so the comparison sees the kernel's rounding, not the GEMM's
        h, ht = h.round().clamp(-2, 2), ht.round().clamp(-2, 2)
        w = (w * 64).round() / 64
        b = None if b is None else (b * 64).round() / 64
    masked = torch.tensor([], dtype=torch.long)
    if bias == "masked":  # a masked vocabulary: -inf bias entries
        masked = torch.randperm(vocab, generator=g)[: vocab // 7]
        b[masked] = float("-inf")
    if boost_ids is not None:  # a clear top-k support, robust to bf16 rounding
        b[boost_ids] += 8.0
    tw, tb = w, b
    if separate_teacher:
        tw = w + 0.3 * torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
        tb = None if b is None else b + 0.2 * torch.randn(vocab, generator=g)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[masked] = False
    pool = allowed.nonzero()[:, 0]
    y = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
    if coef == "random":
        c = torch.rand(n, generator=g) + 0.1
        c[n // 3] = 0.0
    elif coef == "zero":
        c = torch.zeros(n)
    else:
        c = torch.ones(n)
    adv = torch.randn(n, generator=g) if advantage else None

    def dev(x, cast=True):
        if x is None:
            return None
        return x.to(DEVICE, dtype) if cast and x.is_floating_point() else x.to(DEVICE)

    return dict(h=dev(h), ht=dev(ht), w=dev(w), b=dev(b), tw=dev(tw) if separate_teacher else None,
                tb=dev(tb) if separate_teacher else None, y=dev(y), coef=dev(c, False),
                adv=dev(adv, False))


def _heads(x):
    """The contract's teacher head: the student's tensors themselves when shared."""
    if x["tw"] is None:
        return x["w"], x["b"]
    return x["tw"], x["tb"]


def run_fused(backend, x, spec, f64=False, compute_grad=True):
    tw, tb = _heads(x)
    d = (lambda t: None if t is None else t.double()) if f64 else (lambda t: t)
    shared = x["tw"] is None
    w, b = d(x["w"]), d(x["b"])
    return backend.fused(d(x["h"]), d(x["ht"]), w, b, w if shared else d(tw),
                         b if shared else d(tb), x["y"], x["coef"], x["adv"], spec, compute_grad)


def _token_sum_scales(x, spec):
    """Scales of the token sums in grad_weight / grad_bias: sum_i |g_i| |h_i| and sum_i |g_i|.

    Half-precision gradients round each token's grad_logits row before those sums (as any bf16
    LM-head backward does); where the tokens cancel, that rounding is relative to these
    scales, not to the result.
    """
    tw, tb = _heads(x)
    d = (lambda t: None if t is None else t.double())
    s = torch.nn.functional.linear(d(x["h"]), d(x["w"]), d(x["b"]))
    t = torch.nn.functional.linear(d(x["ht"]), d(tw), d(tb))
    g = reference.logits(s, t, x["y"], x["coef"], x["adv"], spec, True)[2].abs()
    return (g.t() @ d(x["h"]).abs()).max().item(), g.sum(0).max().item()


def check_fused(x, spec, rtol, names=("token_loss", "stats", "grad_hidden", "grad_weight",
                                      "grad_bias"), operand_atol=0.0):
    """Fused form against float64. ``operand_atol``: an extra absolute tolerance per unit of
    the GEMM operand a gradient is multiplied into (|W| for grad_hidden, |h| for grad_weight),
    for rows whose true grad_logits is ~0 and float32 leaves ~1e-8 of rounding."""
    got = run_fused(triton_backend, x, spec)
    ref = run_fused(reference, x, spec, f64=True)
    atol = dict.fromkeys(names, 1e-6)
    if x["h"].dtype != torch.float32:  # bf16 roundoff (2^-8) of each token's contribution
        for name, scale in zip(("grad_weight", "grad_bias"), _token_sum_scales(x, spec)):
            atol[name] += 2 ** -8 * scale
    atol["grad_hidden"] += operand_atol * x["w"].abs().max().item()
    atol["grad_weight"] += operand_atol * x["h"].abs().max().item()
    for name, a, r in zip(names, got, ref):
        if r is None:
            assert a is None, name
            continue
        assert_close(a, r, rtol, atol=atol[name], what=name)
        if name == "grad_weight" or name == "grad_bias":
            assert a.dtype == torch.float32, name
        if name == "grad_hidden":
            assert a.dtype == x["h"].dtype
    return got, ref


def check_logits(x, spec, rtol):
    tw, tb = _heads(x)
    s = torch.nn.functional.linear(x["h"], x["w"], x["b"])
    t = torch.nn.functional.linear(x["ht"], tw, tb)
    got = triton_backend.logits(s, t, x["y"], x["coef"], x["adv"], spec, True)
    ref = reference.logits(s.double(), t.double(), x["y"], x["coef"], x["adv"], spec, True)
    for name, a, r in zip(("token_loss", "stats", "grad_logits"), got, ref):
        assert_close(a, r, rtol, what=name)
    assert got[2].dtype == s.dtype


def spec_of(mode="sampled", **kw):
    return DivergenceSpec(mode={"sampled": SAMPLED, "full": FULL, "topk": TOPK}[mode], **kw)


SPECS = {
    "sampled": spec_of("sampled"),
    "sampled-T0.7-clip": spec_of("sampled", temperature=0.7, signal_clip=0.3),
    "full-a0": spec_of("full", alpha=0.0),
    "full-a0.3": spec_of("full", alpha=0.3),
    "full-a0.5-T2": spec_of("full", alpha=0.5, temperature=2.0),
    "full-a1": spec_of("full", alpha=1.0),
    "topk-student-tail-a1": spec_of("topk", alpha=1.0, topk=5),
    "topk-student-tail-a0": spec_of("topk", alpha=0.0, topk=7),
    "topk-student-notail-a0.5": spec_of("topk", alpha=0.5, topk=5, tail=False),
    "topk-teacher-tail-a0.3": spec_of("topk", alpha=0.3, topk=6, topk_from_teacher=True),
    "topk-teacher-notail-a1-T1.5": spec_of("topk", alpha=1.0, topk=4, topk_from_teacher=True,
                                          tail=False, temperature=1.5),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_fp32_matches_reference(name):
    check_fused(make_inputs(), SPECS[name], rtol=1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_fp32_matches_reference(name):
    check_logits(make_inputs(), SPECS[name], rtol=1e-5)


@pytest.mark.parametrize("name", ["sampled", "full-a0", "full-a0.5-T2", "full-a1",
                                  "topk-student-tail-a1", "topk-teacher-notail-a1-T1.5"])
def test_fused_separate_teacher_head(name):
    check_fused(make_inputs(separate_teacher=True), SPECS[name], rtol=1e-5)


@pytest.mark.parametrize("name", ["sampled", "full-a0.3", "full-a1", "topk-student-tail-a0"])
def test_fused_without_bias(name):
    got, _ = check_fused(make_inputs(bias=None), SPECS[name], rtol=1e-5)
    assert got[4] is None


@pytest.mark.parametrize("name", ["sampled", "full-a0", "full-a0.5-T2", "full-a1",
                                  "topk-student-tail-a1", "topk-student-notail-a0.5"])
def test_masked_vocabulary(name):
    """-inf bias entries: zero probability, zero gradient, finite divergences."""
    x = make_inputs(bias="masked")
    got, _ = check_fused(x, SPECS[name], rtol=1e-5)
    masked = torch.isinf(x["b"])
    assert torch.all(got[4][masked] == 0)
    check_logits(x, SPECS[name], rtol=1e-5)


@pytest.mark.parametrize("name", ["sampled", "full-a0", "full-a0.3", "full-a1",
                                  "topk-student-tail-a1", "topk-teacher-notail-a1-T1.5"])
def test_extreme_logits(name):
    """Logits of magnitude ~1e4: near one-hot distributions, no overflow or NaN."""
    x = make_inputs(logit_scale=1e4)
    spec = SPECS[name]
    if spec.mode == TOPK and spec.tail:
        x = _resolvable_tail_rows(x, spec)
    check_fused(x, spec, rtol=1e-5, operand_atol=1e-6)
    check_logits(x, spec, rtol=1e-5)


def _resolvable_tail_rows(x, spec):
    """Tokens whose tail buckets float64 resolves as 1 - sum(p_support): both above 1e-10,
    or both exactly 0 (the tail then drops out of D).

    Otherwise the definition's own rounding decides (one tail of exactly 0 makes D infinite),
    while the kernel sums the off-support mass directly and stays finite and exact.
    """
    tw, tb = _heads(x)
    d = (lambda t: None if t is None else t.double())
    lp_s = torch.log_softmax(torch.nn.functional.linear(d(x["h"]), d(x["w"]), d(x["b"])), -1)
    lp_t = torch.log_softmax(torch.nn.functional.linear(d(x["ht"]), d(tw), d(tb)), -1)
    ids = (lp_t if spec.topk_from_teacher else lp_s).topk(spec.topk, -1).indices
    tails = [1 - lp.gather(1, ids).exp().sum(-1) for lp in (lp_s, lp_t)]
    keep = ((tails[0] > 1e-10) & (tails[1] > 1e-10)) | ((tails[0] <= 0) & (tails[1] <= 0))
    assert keep.any()
    return {k: v[keep] if k in ("h", "ht", "y", "coef", "adv") and v is not None else v
            for k, v in x.items()}


@pytest.mark.parametrize("mode", ["sampled", "full", "topk"])
def test_kl_and_signal_clips(mode):
    x = make_inputs()
    if mode == "sampled":
        spec = spec_of("sampled", signal_clip=0.2)
    else:
        base = spec_of(mode, alpha=0.5, topk=5)
        div = run_fused(reference, x, base, f64=True, compute_grad=False)[1][:, 3].sort().values
        mid = div.numel() // 2  # halfway between two tokens: no float32 / float64 disagreement
        spec = spec_of(mode, alpha=0.5, topk=5, kl_clip=float(div[mid - 1:mid + 1].mean()))
    got, _ = check_fused(x, spec, rtol=1e-5)
    if mode != "sampled":  # clipped tokens get exactly no gradient
        clipped = got[1][:, 3] > spec.kl_clip
        assert clipped.any() and torch.all(got[2][clipped] == 0)
    check_logits(x, spec, rtol=1e-5)


NAN_SPECS = {
    "sampled-clip": spec_of("sampled", signal_clip=0.5),
    "full-a0-klclip": spec_of("full", alpha=0.0, kl_clip=0.3),
    "full-a0.5": spec_of("full", alpha=0.5),
    "full-a0.5-klclip": spec_of("full", alpha=0.5, kl_clip=0.3),
    "full-a1-klclip": spec_of("full", alpha=1.0, kl_clip=0.3),
    "topk-tail-a0": spec_of("topk", alpha=0.0, topk=4),
    "topk-tail-a0.5-klclip": spec_of("topk", alpha=0.5, topk=4, kl_clip=0.01),
    "topk-notail-a1": spec_of("topk", alpha=1.0, topk=4, tail=False),
}


@pytest.mark.parametrize("name", list(NAN_SPECS))
def test_nan_logits_give_nan(name):
    """A NaN logit on either side gives a NaN loss and gradient row, as the reference does;
    clips and max / min must not turn it finite (Triton's minimum / maximum drop NaN)."""
    spec = NAN_SPECS[name]
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    s[1, 7] = float("nan")
    t[2, 250] = float("nan")
    y = torch.randint(0, V, (4,), generator=g)
    coef = torch.ones(4)
    got = triton_backend.logits(s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), coef.to(DEVICE), None,
                                spec, True)
    ref = reference.logits(s.double(), t.double(), y, coef.double(), None, spec, True)
    nan_rows = torch.tensor([False, True, True, False])
    assert torch.equal(ref[0].isnan(), nan_rows)
    assert torch.equal(got[0].cpu().isnan(), nan_rows), got[0]
    assert torch.equal(got[2].cpu().isnan().any(1), ref[2].isnan().any(1)), got[2]
    ok = ~nan_rows
    assert_close(got[0].cpu()[ok], ref[0][ok], 1e-5)
    assert_close(got[2].cpu()[ok], ref[2][ok], 1e-5)


@pytest.mark.parametrize("from_teacher", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_tail_with_ties_at_the_kth_logit(alpha, from_teacher):
    """Entries tied with the k-th ranked logit that torch.topk left out belong to the tail
    (coarse logits, as bf16 gives, tie there often)."""
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(6, V, generator=g) * 4).round() / 4
    t = (torch.randn(6, V, generator=g) * 4).round() / 4
    y = torch.randint(0, 20, (6,), generator=g)
    coef = torch.rand(6, generator=g) + 0.1
    spec = spec_of("topk", alpha=alpha, topk=5, topk_from_teacher=from_teacher)
    ref = reference.logits(s.double(), t.double(), y, coef.double(), None, spec, True)
    got = triton_backend.logits(s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), coef.to(DEVICE),
                                None, spec, True)
    for name, a, r in zip(("token_loss", "stats", "grad_logits"), got, ref):
        assert_close(a.cpu(), r, 1e-5, what=name)
    # a masked vocabulary (-inf on both sides) smaller than the support ties at -inf: the
    # support's masked entries and the tail are empty, as with k = the unmasked count
    s[:, 20:] = t[:, 20:] = float("-inf")
    losses = [triton_backend.logits(s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), coef.to(DEVICE),
                                    None, spec_of("topk", alpha=alpha, topk=k,
                                                  topk_from_teacher=from_teacher), True)
              for k in (20, 25)]
    for a, b in zip(losses[0], losses[1]):
        assert torch.isfinite(a).all()
        assert_close(b.cpu(), a.cpu(), 1e-6)


def test_topk_support_tie_rule(monkeypatch):
    """The support ids are the first k of a stable descending sort (lower ids win ties at the
    k-th rank), in row blocks too; -inf entries tie like any other value."""
    topk = triton_backend.kernels().topk
    monkeypatch.setattr(topk, "KEY_ELEMENTS", 3 * 40)  # three rows per block
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-2, 3, (10, 40), generator=g).float()
    x[3, ::3] = float("-inf")
    x[4] = 0.0  # every entry tied
    for k in (1, 5, 17, 39, 40):
        want = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
        got = topk.topk_support(x, k)
        assert torch.equal(got.sort(1).values, want.sort(1).values), k


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("from_teacher", [False, True])
def test_topk_many_ties_at_the_kth_rank(from_teacher, tail):
    """Logits from a small integer set: the k-th ranked value is shared by many entries, and
    which of them are in the support changes the loss and gradients (contract tie rule)."""
    g = torch.Generator().manual_seed(12)
    s = torch.randint(-3, 2, (5, V), generator=g).float()
    t = torch.randint(-3, 2, (5, V), generator=g).float()
    s[:, ::7] += 0.5  # the other side differs across tied ids
    t[:, 1::5] -= 0.25
    y = torch.randint(0, V, (5,), generator=g)
    coef = torch.rand(5, generator=g) + 0.1
    spec = spec_of("topk", alpha=0.5, topk=9, topk_from_teacher=from_teacher, tail=tail)
    ref = reference.logits(s.double(), t.double(), y, coef.double(), None, spec, True)
    got = triton_backend.logits(s.to(DEVICE), t.to(DEVICE), y.to(DEVICE), coef.to(DEVICE),
                                None, spec, True)
    for name, a, r in zip(("token_loss", "stats", "grad_logits"), got, ref):
        assert_close(a.cpu(), r, 1e-5, what=name)
    # the fused form ranks the chunk's float32 logits the same way: a head whose logits are
    # exactly these integers (one-hot hidden rows, the logits as the weight's columns)
    n = 5
    x = dict(h=torch.eye(n, dtype=torch.float32).to(DEVICE), ht=torch.eye(n).to(DEVICE),
             w=s.t().contiguous().to(DEVICE), b=None, tw=t.t().contiguous().to(DEVICE), tb=None,
             y=y.to(DEVICE), coef=coef.to(DEVICE), adv=None)
    got_f = run_fused(triton_backend, x, spec)
    assert_close(got_f[0].cpu(), ref[0], 1e-5, what="fused token_loss")
    assert_close(got_f[3].cpu(), ref[2].t() @ torch.eye(n, dtype=torch.float64), 1e-5,
                 what="fused grad_weight")


@pytest.mark.parametrize("kl_clip", [0.0, 0.5])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_teacher_masks_the_student_argmax(alpha, kl_clip):
    """A teacher -inf where the student has its maximum: reverse KL is +inf (kl_clip caps it,
    with no gradient), never NaN."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, V, generator=g), torch.randn(3, V, generator=g)
    s[0, 10], t[0, 10] = 9.0, float("-inf")
    s[1, 200], t[1, 200] = 9.0, float("-inf")  # in a later tile, after a finite shift
    t[2, 20] = float("-inf")
    coef = torch.ones(3)
    spec = spec_of("full", alpha=alpha, kl_clip=kl_clip)
    ref = reference.logits(s.double(), t.double(), None, coef.double(), None, spec, True)
    got = triton_backend.logits(s.to(DEVICE), t.to(DEVICE), None, coef.to(DEVICE), None, spec,
                                True)
    assert_close(got[0].cpu(), ref[0], 1e-5, what="token_loss")
    assert_close(got[1].cpu(), ref[1], 1e-5, what="stats")
    # gradients as the specification's (autograd's clamp leaves 0 * inf = NaN in capped rows)
    spec_grad = torch_chunked.logits(s.double(), t.double(), None, coef.double(), None, spec,
                                     True)[2]
    assert torch.equal(got[2].cpu().isnan().any(1), spec_grad.isnan().any(1))
    finite = torch.isfinite(spec_grad).all(1)
    assert_close(got[2].cpu()[finite], spec_grad[finite], 1e-5, what="grad_logits")


@pytest.mark.parametrize("kl_clip", [0.0, 3.0])
@pytest.mark.parametrize("case", ["full-a1", "full-a0", "topk-notail-a1"])
def test_underflow_against_minus_inf_is_inf(case, kl_clip):
    """p > 0 = q with p below float32's range (log p = -200): the term is +inf as in float64
    (kl_clip caps the token, with no gradient), not 0 * inf = NaN."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, V, generator=g), torch.randn(3, V, generator=g)
    s[0, 7], t[0, 7] = -200.0, float("-inf")  # the student's side underflows (reverse KL)
    t[1, 250], s[1, 250] = -200.0, float("-inf")  # the teacher's, in a later tile (forward KL)
    alpha = 0.0 if case.endswith("a0") else 1.0
    spec = spec_of("topk", alpha=alpha, topk=V, tail=False, kl_clip=kl_clip) \
        if case.startswith("topk") else spec_of("full", alpha=alpha, kl_clip=kl_clip)
    coef = torch.ones(3)
    ref = reference.logits(s.double(), t.double(), None, coef.double(), None, spec, False)
    got = triton_backend.logits(s.to(DEVICE), t.to(DEVICE), None, coef.to(DEVICE), None, spec,
                                True)
    inf_row = 0 if alpha == 1.0 else 1
    assert ref[1][inf_row, 3] == float("inf")
    assert_close(got[0].cpu(), ref[0], 1e-5, what="token_loss")
    assert_close(got[1].cpu(), ref[1], 1e-5, what="stats")
    if kl_clip:
        assert torch.equal(got[2].cpu()[inf_row], torch.zeros(V))
    ok = [r for r in range(3) if r != inf_row]
    spec_grad = reference.logits(s.double()[ok], t.double()[ok], None, coef.double()[ok], None,
                                 spec, True)[2]
    assert_close(got[2].cpu()[ok], spec_grad, 1e-5, what="grad_logits")


def test_advantage_override():
    x = make_inputs(advantage=True)
    for spec in (spec_of("sampled"), spec_of("sampled", signal_clip=0.1, temperature=1.3)):
        check_fused(x, spec, rtol=1e-5)
        check_logits(x, spec, rtol=1e-5)


@pytest.mark.parametrize("name", ["sampled", "full-a0.3", "topk-student-tail-a1"])
def test_masks(name):
    """Zero coefficients give exactly-zero gradient rows; an all-zero mask gives zero grads."""
    x = make_inputs()
    got, _ = check_fused(x, SPECS[name], rtol=1e-5)
    assert torch.all(got[2][x["coef"] == 0] == 0)
    x = make_inputs(coef="zero")
    got, _ = check_fused(x, SPECS[name], rtol=1e-5)
    assert torch.count_nonzero(got[2]) == 0 and torch.count_nonzero(got[3]) == 0
    assert torch.count_nonzero(got[4]) == 0
    assert torch.isfinite(got[0]).all()


@pytest.mark.parametrize("name", ["sampled", "full-a0.5-T2", "topk-teacher-tail-a0.3"])
def test_single_token_and_single_chunk(name, monkeypatch):
    check_fused(make_inputs(n=1), SPECS[name], rtol=1e-5)
    check_logits(make_inputs(n=1), SPECS[name], rtol=1e-5)
    monkeypatch.setattr(triton_backend.kernels().fused_linear, "CHUNK_ELEMENTS", 1 << 28)
    check_fused(make_inputs(), SPECS[name], rtol=1e-5)


def test_statistics_only_pass():
    x = make_inputs()
    for spec in (SPECS["sampled"], SPECS["full-a0.3"], SPECS["topk-student-tail-a1"]):
        got = run_fused(triton_backend, x, spec, compute_grad=False)
        ref = run_fused(reference, x, spec, f64=True, compute_grad=False)
        assert got[2:] == (None, None, None)
        assert_close(got[0], ref[0], 1e-5)
        assert_close(got[1], ref[1], 1e-5)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True),
                                   (True, True, False)], ids=lambda n: "hwb-" + "".join(
                                       "1" if f else "0" for f in n))
def test_grad_needs_skip_the_work(needs, monkeypatch):
    """GradNeeds: the gradients asked for match the reference, the others are None, and the
    [V, H] weight-gradient GEMM runs only when the weight's gradient is needed."""
    from hsd.backends import GradNeeds
    fused_linear = triton_backend.kernels().fused_linear
    weight_gemms = []
    real_mm = fused_linear._mm_fp32
    monkeypatch.setattr(fused_linear, "_mm_fp32", lambda a, b, out, *rest: (
        weight_gemms.append(out.shape), real_mm(a, b, out, *rest)))
    x = make_inputs()
    spec = SPECS["full-a0.3"]
    got = run_fused(triton_backend, x, spec, compute_grad=GradNeeds(*needs))
    ref = run_fused(reference, x, spec, f64=True)
    for flag, name, a, r in zip(needs, ("grad_hidden", "grad_weight", "grad_bias"), got[2:],
                                ref[2:]):
        if flag:
            assert_close(a, r, 1e-5, what=name)
        else:
            assert a is None, name
    assert_close(got[0], ref[0], 1e-5)
    assert (tuple(x["w"].shape) in weight_gemms) == needs[1]


def test_no_gradient_needed_runs_the_statistics_only_kernel(monkeypatch):
    from hsd.backends import GradNeeds
    fused_linear = triton_backend.kernels().fused_linear
    grads = []
    real = fused_linear.launch_rows
    monkeypatch.setattr(fused_linear, "launch_rows",
                        lambda *a, **kw: (grads.append((a[2], a[16])), real(*a, **kw)))
    got = run_fused(triton_backend, make_inputs(), SPECS["topk-student-tail-a1"],
                    compute_grad=GradNeeds(False, False, False))
    assert got[2:] == (None, None, None)
    assert grads and all(g is None and not flag for g, flag in grads)


def test_out_dtype_probe_lets_out_of_memory_through(monkeypatch):
    """The half -> float32 GEMM probe: an unsupported signature selects the float32-head
    fallback once (logged); an out-of-memory error propagates (it is not a missing feature)."""
    from helpers import check_out_dtype_mm_probe

    fused_linear = triton_backend.kernels().fused_linear
    from hsd.backends import gemm

    assert fused_linear.out_dtype_mm_supported is gemm.out_dtype_mm_supported  # one probe
    check_out_dtype_mm_probe(monkeypatch, gemm, gemm.out_dtype_mm_supported)


def test_device_guard_targets_the_tensors_gpu():
    """Triton launches on the current device: the kernels make the tensors' GPU current (a
    torch.cuda.device for cuda:1 while cuda:0 is current), and do nothing for CPU tensors."""
    rd = triton_backend.kernels().row_divergence
    guard = rd.device_guard(torch.empty(0))
    assert not isinstance(guard, torch.cuda.device)
    with guard:  # a no-op
        pass

    class FakeCuda:  # a tensor-like on cuda:1 (no GPU needed to build the guard)
        device = torch.device("cuda", 1)
    guard = rd.device_guard(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


BF16_SPECS = ["sampled", "full-a0", "full-a0.5-T2", "full-a1", "topk-student-tail-a1",
              "topk-teacher-notail-a1-T1.5"]


@pytest.mark.parametrize("name", BF16_SPECS)
def test_bf16_matches_reference(name):
    """bf16 hidden states and heads (tensor-core GEMMs, fp32 softmax math) within 1e-2."""
    spec = SPECS[name]
    boost = torch.arange(0, V, V // spec.topk)[: spec.topk] if spec.mode == TOPK else None
    x = make_inputs(dtype=torch.bfloat16, boost_ids=boost)
    check_fused(x, spec, rtol=1e-2)
    check_logits(x, spec, rtol=1e-2)


def test_float64_goes_to_the_portable_path():
    x = make_inputs(dtype=torch.float64)
    got = run_fused(triton_backend, x, SPECS["full-a0.3"])
    ref = run_fused(reference, x, SPECS["full-a0.3"], f64=True)
    for a, r in zip(got, ref):
        assert a.dtype == torch.float64
        assert_close(a, r, 1e-10)


# ----------------------------------------------------------------------------------------------
# Through the public API
# ----------------------------------------------------------------------------------------------
def _api_grads(backend, x, leaf_dtype, **options):
    h = x["h"].detach().clone().requires_grad_(True)
    w = x["w"].detach().clone().requires_grad_(True)
    b = x["b"].detach().clone().requires_grad_(True)
    seq_ids = torch.arange(h.shape[0], device=DEVICE) // 5
    loss = hsd.fused_hindsight_loss(h, x["ht"], w, x["y"], bias=b, seq_ids=seq_ids,
                                    backend=backend, **options)
    (loss if loss.dim() == 0 else (loss * torch.linspace(0.5, 1.5, loss.numel(),
                                                         device=DEVICE)).sum()).backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("options", [
    dict(mode="sampled", ignore_first_k=2),
    dict(mode="sampled", center=True, signal_clip=0.5, reduction="token_mean"),
    dict(mode="full", alpha=0.5, temperature=1.3, reduction="none"),
    dict(mode="topk", topk=6, alpha=1.0, kl_clip=0.4),
], ids=["sampled-skip2", "sampled-centred", "jsd-per-token", "topk-clip"])
def test_public_api_matches_reference(options):
    x = make_inputs()
    got = _api_grads("triton", x, torch.float32, **options)
    ref = _api_grads("reference", x, torch.float32, **options)
    for name, a, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, ref):
        assert_close(a, r, 2e-5, what=name)


def test_public_logits_api_matches_reference():
    x = make_inputs()
    s = torch.nn.functional.linear(x["h"], x["w"], x["b"])
    t = torch.nn.functional.linear(x["ht"], x["w"], x["b"])
    out = {}
    for backend in ("triton", "reference"):
        logits = s.detach().clone().requires_grad_(True)
        loss = hsd.hindsight_loss(logits, t, x["y"], mode="full", alpha=0.3, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), logits.grad)
    for a, r in zip(out["triton"], out["reference"]):
        assert_close(a, r, 2e-5)


def test_dispatch():
    assert "triton" in hsd.available_backends()
    assert hsd.select_backend(DEVICE, "triton") is triton_backend


# ----------------------------------------------------------------------------------------------
# torch.compile: both ops are custom ops with fake implementations
# ----------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    x = make_inputs(n=4)
    s = torch.nn.functional.linear(x["h"], x["w"], x["b"])
    t = torch.nn.functional.linear(x["ht"], x["w"], x["b"])
    scalars = (TOPK, 0.5, 1.0, 3, False, True, 0.0, 0.0)
    torch.library.opcheck(torch.ops.hsd.triton_logits.default,
                          (s, t, x["y"][:4], x["coef"][:4], None) + scalars + (True,))
    for needs in [(True, True, True), (False, True, False), (True, False, False)]:
        torch.library.opcheck(torch.ops.hsd.triton_fused_linear.default,
                              (x["h"], x["ht"], x["w"], x["b"], x["w"], x["b"], x["y"],
                               x["coef"], None) + scalars + needs)


def test_fused_runs_under_torch_compile_fullgraph():
    x = make_inputs()
    spec = SPECS["full-a0.5-T2"]

    def step(h, ht, w, b, y, coef):
        loss, stats, gh, gw, gb = triton_backend.fused(h, ht, w, b, w, b, y, coef, None, spec,
                                                       True)
        return (coef * loss).sum(), stats, gh, gw, gb

    torch._dynamo.reset()
    args = (x["h"], x["ht"], x["w"], x["b"], x["y"], x["coef"])
    got = torch.compile(step, fullgraph=True)(*args)
    for a, r in zip(got, step(*args)):
        assert_close(a, r, 1e-6)


@pytest.mark.parametrize("name", ["sampled", "full-a0.5-T2", "topk-student-tail-a1"])
def test_half_logits_mode(name, monkeypatch):
    """HSD_TRITON_LOGITS=half: bf16 logits buffer, gradients in place (bf16-rounded logits)."""
    monkeypatch.setattr(triton_backend.kernels().fused_linear, "HALF_LOGITS", True)
    spec = SPECS[name]
    boost = torch.arange(0, V, V // spec.topk)[: spec.topk] if spec.mode == TOPK else None
    check_fused(make_inputs(dtype=torch.bfloat16, logit_scale=1.0, boost_ids=boost), spec,
                rtol=4e-2)
