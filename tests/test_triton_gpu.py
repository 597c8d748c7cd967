"""The compiled Triton backend on a CUDA GPU, at realistic tile counts, against float64.

Same checks as ``test_triton_backend.py`` on larger shapes (N=512, H=256, V=32007: several
4096-wide vocabulary tiles, a ragged last one, several token chunks), plus torch.compile.
Skipped without a GPU, and when ``TRITON_INTERPRET=1`` (kernels would be interpreted).
"""

import os
import zlib

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: the kernels would run in the interpreter"),
]

triton = pytest.importorskip("triton")

import hsd  # noqa: E402
from hsd.backends import FULL, SAMPLED, TOPK, DivergenceSpec, reference  # noqa: E402
from hsd.backends import triton_backend  # noqa: E402

N, H, V = 512, 256, 32007
DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32_matmul(monkeypatch):
    """float32 GEMMs in full precision (TF32 would cost ~1e-3), and three token chunks."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    if triton_backend.is_available():
        monkeypatch.setattr(triton_backend.kernels().fused_linear, "CHUNK_ELEMENTS", 200 * V)
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def assert_close(got, ref, rtol, atol=1e-6, what=""):
    """max|got - ref| <= rtol * max|ref| + atol, with matching non-finite entries."""
    assert got is not None and ref is not None, what
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    got, ref = got.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    if finite.any():
        err = (got[finite] - ref[finite]).abs().max().item()
        bound = rtol * ref[finite].abs().max().item() + atol
        assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def make_inputs(dtype=torch.float32, logit_scale=1.5, bias="random", separate_teacher=False,
                coef="random", advantage=False, boost=0):
    key = repr((dtype, logit_scale, bias, separate_teacher, coef, advantage, boost))
    g = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(key.encode()))

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE)

    h = randn(N, H)
    ht = 0.6 * h + 0.8 * randn(N, H)
    w = randn(V, H) * (logit_scale / H ** 0.5)
    b = None if bias is None else 0.5 * randn(V)
    if logit_scale >= 1e3:  # exact float32 GEMM: small integers times multiples of 1/64
        h, ht = h.round().clamp(-2, 2), ht.round().clamp(-2, 2)
        w = (w * 64).round() / 64
        b = None if b is None else (b * 64).round() / 64
    masked = torch.zeros(V, dtype=torch.bool, device=DEVICE)
    if bias == "masked":
        masked[torch.randperm(V, generator=g, device=DEVICE)[: V // 7]] = True
        b = b.masked_fill(masked, float("-inf"))
    if boost:
        b = b.clone()
        b[torch.arange(0, V, V // boost, device=DEVICE)[:boost]] += 8.0
    tw, tb = w, b
    if separate_teacher:
        tw = w + 0.3 * randn(V, H) / H ** 0.5
        tb = None if b is None else b + 0.2 * randn(V)
    pool = (~masked).nonzero()[:, 0]
    y = pool[torch.randint(0, pool.numel(), (N,), generator=g, device=DEVICE)]
    c = torch.rand(N, generator=g, device=DEVICE) + 0.1
    if coef == "random":
        c[::7] = 0.0
    elif coef == "zero":
        c.zero_()
    adv = randn(N) if advantage else None
    cast = (lambda t: None if t is None else t.to(dtype))
    return dict(h=cast(h), ht=cast(ht), w=cast(w), b=cast(b),
                tw=cast(tw) if separate_teacher else None,
                tb=cast(tb) if separate_teacher else None, y=y, coef=c, adv=adv)


def run_fused(backend, x, spec, f64=False, compute_grad=True):
    d = (lambda t: None if t is None else t.double()) if f64 else (lambda t: t)
    w, b = d(x["w"]), d(x["b"])
    tw, tb = (w, b) if x["tw"] is None else (d(x["tw"]), d(x["tb"]))
    return backend.fused(d(x["h"]), d(x["ht"]), w, b, tw, tb, x["y"], x["coef"], x["adv"], spec,
                         compute_grad)


def check(x, spec, rtol, operand_atol=0.0):
    """Fused and logits forms against the float64 reference (``operand_atol``: see
    ``test_triton_backend.check_fused``)."""
    got = run_fused(triton_backend, x, spec)
    ref = run_fused(reference, x, spec, f64=True)
    d = (lambda t: None if t is None else t.double())
    tw, tb = (x["w"], x["b"]) if x["tw"] is None else (x["tw"], x["tb"])
    s64 = torch.nn.functional.linear(d(x["h"]), d(x["w"]), d(x["b"]))
    t64 = torch.nn.functional.linear(d(x["ht"]), d(tw), d(tb))
    g64 = reference.logits(s64, t64, x["y"], x["coef"], x["adv"], spec, True)[2].abs()
    names = ("token_loss", "stats", "grad_hidden", "grad_weight", "grad_bias")
    atol = dict.fromkeys(names, 1e-6)
    if x["h"].dtype != torch.float32:
        # half precision rounds each token's grad row before the token sums (as any bf16
        # backward): 2^-8 of the sum of absolute contributions
        atol["grad_weight"] += 2 ** -8 * (g64.t() @ d(x["h"]).abs()).max().item()
        atol["grad_bias"] += 2 ** -8 * g64.sum(0).max().item()
    atol["grad_hidden"] += operand_atol * x["w"].abs().max().item()
    atol["grad_weight"] += operand_atol * x["h"].abs().max().item()
    for name, a, r in zip(names, got, ref):
        if r is None:
            assert a is None, name
            continue
        assert_close(a, r, rtol, atol=atol[name], what=name)
    # the logits form, on logits in the input dtype
    s = torch.nn.functional.linear(x["h"], x["w"], x["b"])
    t = torch.nn.functional.linear(x["ht"], tw, tb)
    got = triton_backend.logits(s, t, x["y"], x["coef"], x["adv"], spec, True)
    ref = reference.logits(s.double(), t.double(), x["y"], x["coef"], x["adv"], spec, True)
    for name, a, r in zip(("token_loss", "stats", "grad_logits"), got, ref):
        assert_close(a, r, rtol, what="logits " + name)


def spec_of(mode="sampled", **kw):
    return DivergenceSpec(mode={"sampled": SAMPLED, "full": FULL, "topk": TOPK}[mode], **kw)


SPECS = {
    "sampled": spec_of("sampled"),
    "sampled-T0.7-clip": spec_of("sampled", temperature=0.7, signal_clip=0.3),
    "full-a0": spec_of("full", alpha=0.0),
    "full-a0.3": spec_of("full", alpha=0.3),
    "full-a0.5-T2": spec_of("full", alpha=0.5, temperature=2.0),
    "full-a1": spec_of("full", alpha=1.0),
    "topk-student-tail-a1": spec_of("topk", alpha=1.0, topk=20),
    "topk-student-notail-a0.5": spec_of("topk", alpha=0.5, topk=16, tail=False),
    "topk-teacher-tail-a0": spec_of("topk", alpha=0.0, topk=20, topk_from_teacher=True),
    "topk-teacher-notail-a1-T1.5": spec_of("topk", alpha=1.0, topk=8, topk_from_teacher=True,
                                          tail=False, temperature=1.5),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_fp32(name):
    check(make_inputs(), SPECS[name], 1e-5)


@pytest.mark.parametrize("name", list(SPECS))
def test_bf16(name):
    spec = SPECS[name]
    check(make_inputs(torch.bfloat16, boost=spec.topk), spec, 1e-2)


@pytest.mark.parametrize("name", ["sampled", "full-a0.5-T2", "full-a1", "topk-student-tail-a1"])
def test_separate_teacher_masked_vocabulary_and_no_bias(name):
    check(make_inputs(separate_teacher=True), SPECS[name], 1e-5)
    check(make_inputs(bias="masked"), SPECS[name], 1e-5)
    check(make_inputs(bias=None), SPECS[name], 1e-5)


@pytest.mark.parametrize("name", ["sampled", "full-a0", "full-a0.3", "full-a1",
                                  "topk-student-tail-a1"])
def test_extreme_logits(name):
    check(make_inputs(logit_scale=1e4), SPECS[name], 1e-5, operand_atol=1e-6)


def test_clips_advantage_and_masks():
    x = make_inputs(advantage=True)
    check(x, spec_of("sampled", signal_clip=0.2), 1e-5)
    check(x, spec_of("sampled"), 1e-5)  # with the advantage override
    for mode in ("full", "topk"):
        base = spec_of(mode, alpha=0.5, topk=20)
        div = run_fused(reference, x, base, f64=True, compute_grad=False)[1][:, 3].sort().values
        mid = div.numel() // 2
        check(x, spec_of(mode, alpha=0.5, topk=20, kl_clip=float(div[mid - 1:mid + 1].mean())),
              1e-5)
    got = run_fused(triton_backend, make_inputs(coef="zero"), SPECS["full-a0.3"])
    assert all(torch.count_nonzero(g) == 0 for g in got[2:])


def test_half_logits_mode(monkeypatch):
    monkeypatch.setattr(triton_backend.kernels().fused_linear, "HALF_LOGITS", True)
    for name in ("sampled", "full-a0.5-T2", "topk-student-tail-a1"):
        spec = SPECS[name]
        x = make_inputs(torch.bfloat16, logit_scale=1.0, boost=spec.topk)
        got = run_fused(triton_backend, x, spec)
        ref = run_fused(reference, x, spec, f64=True)
        for a, r in zip(got[:3], ref[:3]):  # loss, stats, grad_hidden: bf16-rounded logits
            assert_close(a, r, 5e-2)


@pytest.mark.parametrize("options", [dict(mode="sampled", ignore_first_k=2),
                                     dict(mode="full", alpha=0.5, reduction="token_mean"),
                                     dict(mode="topk", topk=20, alpha=1.0)],
                         ids=["sampled", "jsd", "topk"])
def test_public_api(options):
    x = make_inputs(torch.bfloat16, boost=20)
    out = {}
    for backend in ("triton", "reference"):
        h = x["h"].detach().clone().requires_grad_(True)
        w = x["w"].detach().clone().requires_grad_(True)
        loss = hsd.fused_hindsight_loss(h, x["ht"], w, x["y"], bias=x["b"],
                                        seq_ids=torch.arange(N, device=DEVICE) // 64,
                                        backend=backend, **options)
        loss.backward()
        out[backend] = (loss.detach().float(), h.grad.float(), w.grad.float())
    for a, r in zip(out["triton"], out["reference"]):
        assert_close(a, r, 2e-2, atol=1e-5)


def test_torch_compile_fullgraph():
    x = make_inputs(torch.bfloat16)
    spec = SPECS["full-a0.5-T2"]
    assert triton_backend.is_available()  # loads the ops before tracing

    def step(h, ht, w, b, y, coef):
        loss, stats, gh, gw, gb = triton_backend.fused(h, ht, w, b, w, b, y, coef, None, spec,
                                                       True)
        return (coef * loss).sum(), stats, gh, gw, gb

    torch._dynamo.reset()
    args = (x["h"], x["ht"], x["w"], x["b"], x["y"], x["coef"])
    got = torch.compile(step, fullgraph=True)(*args)
    for a, r in zip(got, step(*args)):
        assert_close(a, r, 1e-6)


def test_grad_needs():
    """A frozen head (no weight gradient) and a statistics-only call, against full gradients."""
    from hsd.backends import GradNeeds
    x = make_inputs(torch.bfloat16)
    spec = SPECS["full-a0.3"]
    full = run_fused(triton_backend, x, spec)
    frozen = run_fused(triton_backend, x, spec, compute_grad=GradNeeds(True, False, False))
    assert frozen[3] is None and frozen[4] is None
    for a, b in zip(frozen[:3], full[:3]):
        assert_close(a, b, 1e-6)
    stats_only = run_fused(triton_backend, x, spec, compute_grad=GradNeeds(False, False, False))
    assert stats_only[2:] == (None, None, None)
    assert_close(stats_only[0], full[0], 1e-6)


@pytest.mark.parametrize("from_teacher", [False, True])
def test_topk_ties_in_bf16_logits(from_teacher):
    """bf16 logits from a small integer set tie at the k-th rank in most rows: the support is
    the contract's (lower ids win), as in the float64 definition."""
    g = torch.Generator(device=DEVICE).manual_seed(7)
    s = torch.randint(-4, 3, (64, V), generator=g, device=DEVICE).to(torch.bfloat16)
    t = (s.float() + torch.randint(-1, 2, (64, V), generator=g, device=DEVICE)).to(torch.bfloat16)
    y = torch.randint(0, V, (64,), generator=g, device=DEVICE)
    coef = torch.rand(64, generator=g, device=DEVICE) + 0.1
    for tail in (True, False):
        spec = spec_of("topk", alpha=0.5, topk=20, topk_from_teacher=from_teacher, tail=tail)
        got = triton_backend.logits(s, t, y, coef, None, spec, True)
        ref = reference.logits(s.double(), t.double(), y, coef, None, spec, True)
        for name, a, r in zip(("token_loss", "stats", "grad_logits"), got, ref):
            assert_close(a, r, 1e-2, what=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (cuda:1 while "
                    "cuda:0 is current); test_triton_backend checks the guard on CPU")
def test_tensors_on_another_gpu():
    """Model-parallel placement: inputs on cuda:1 while cuda:0 is current."""
    x = make_inputs()
    spec = SPECS["topk-student-tail-a1"]
    want = run_fused(triton_backend, x, spec)
    x1 = {k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    with torch.cuda.device(0):
        got = run_fused(triton_backend, x1, spec)
    torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda:1")
        assert_close(a.to("cuda:0"), b, 1e-6)


def test_fused_path_does_not_synchronise():
    """No host sync inside the fused path (CUDA-graph capture, overlap): the target range is
    hsd.loss's one check per call, and top-k selection needs no data-dependent shapes."""
    x = make_inputs(torch.bfloat16, boost=20)
    for name in ("sampled", "full-a0.5-T2", "topk-student-tail-a1"):
        run_fused(triton_backend, x, SPECS[name])  # warm-up: compiles and probes
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_fused(triton_backend, x, SPECS[name])
        finally:
            torch.cuda.set_sync_debug_mode("default")
