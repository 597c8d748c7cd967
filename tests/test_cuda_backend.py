"""The CUDA backend against the float64 reference (needs a GPU and a CUDA build of hsd._C)."""

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
