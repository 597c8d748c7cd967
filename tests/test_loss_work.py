"""Issue-7 behaviour of the loss core: only the work asked for, and exact at the edges.

Work is checked by spying on the backend (which gradients it was asked for, which rows it saw),
never by timing. Every figure is compared with the float64 definition (:mod:`hsd.definition`).
"""

import pytest
import torch

import hsd
from hsd import definition
from hsd.backends import FULL, TOPK, DivergenceSpec, available_backends, reference, torch_chunked

BACKENDS = [b for b in ("reference", "torch", "cpu") if b in available_backends()]


def backend_module(name):
    return hsd.select_backend(torch.device("cpu"), name)


def rel_err(actual, expected):
    """Max abs difference relative to the largest expected magnitude."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Top-k ties (contract B): the first k of a stable descending sort
# ---------------------------------------------------------------------------------------------
def test_definition_support_breaks_ties_by_lower_id():
    ranked = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, float("-inf")]])
    assert definition.topk_support(ranked, 3).tolist() == [[1, 3, 2]]
    assert definition.topk_support(ranked, 4).tolist() == [[1, 3, 2, 4]]
    assert set(definition.topk_support(ranked, 7)[0].tolist()) == set(range(7))


def test_torch_backend_support_equals_the_definition_on_ties():
    torch.manual_seed(0)
    for _ in range(50):
        ranked = torch.randint(-3, 4, (6, 41)).float()
        ranked[0, :7] = float("-inf")
        k = int(torch.randint(1, 41, ()))
        got = torch_chunked.topk_ids(ranked, k).sort(-1).values
        assert torch.equal(got, definition.topk_support(ranked, k).sort(-1).values)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_teacher", [False, True], ids=["student", "teacher"])
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renorm"])
def test_every_backend_picks_the_definitions_support_on_ties(backend, from_teacher, tail):
    """Logits from a small integer set: most rows tie at the k-th rank. A different support
    changes a row's loss by percents, far above the float32 tolerance."""
    torch.manual_seed(1)
    n, vocab, k = 24, 97, 9
    s = torch.randint(-2, 3, (n, vocab)).float()
    t = torch.randint(-2, 3, (n, vocab)).float()
    y, coef = torch.randint(0, vocab, (n,)), torch.rand(n) + 0.5
    spec = DivergenceSpec(mode=TOPK, topk=k, alpha=0.5, topk_from_teacher=from_teacher,
                          tail=tail)
    expected = reference.logits(s.double(), t.double(), y, coef.double(), None, spec, True)
    got = backend_module(backend).logits(s, t, y, coef, None, spec, True)
    assert rel_err(got[0], expected[0]) <= 1e-5
    assert rel_err(got[2], expected[2]) <= 1e-5
    # the other tie rule (highest id first) gives another loss on most rows: the test can fail
    flipped = reference.logits(s.flip(-1).double(), t.flip(-1).double(), vocab - 1 - y,
                               coef.double(), None, spec, True)
    assert ((flipped[0] - expected[0]).abs() > 1e-3).sum() >= n // 2


# ---------------------------------------------------------------------------------------------
# p > 0 = q in float32: the +inf limit, capped by kl_clip (never 0 * inf = NaN)
# ---------------------------------------------------------------------------------------------
def underflow_case(dtype):
    """The student puts e^-200 on ids 3.. (0 in float32, > 0 in float64), which the teacher
    masks (-inf): the divergence (and the top-3 tail bucket's) is +inf in every row."""
    s = torch.full((3, 50), -200.0, dtype=dtype)
    t = torch.full((3, 50), float("-inf"), dtype=dtype)
    s[:, :3] = torch.tensor([0.5, 0.0, -0.5], dtype=dtype)
    t[:, :3] = torch.tensor([[0.0, 0.3, 0.1], [1.0, 0.0, 0.0], [0.2, 0.2, 0.4]], dtype=dtype)
    return s, t


def test_definition_gives_the_infinite_limit_in_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        s, t = underflow_case(dtype)
        lp_s, lp_t = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        assert torch.isinf(definition.divergence(lp_s, lp_t, 1.0)).all()
        assert torch.isinf(definition._plogratio(lp_s, lp_t)[:, 3:]).all()
        # 0 * log 0 stays 0 and NaN stays NaN
        assert definition._plogratio(lp_t, lp_s)[:, 3:].eq(0).all()
        nan = torch.tensor([float("nan")], dtype=dtype)
        assert torch.isnan(definition._plogratio(nan, torch.tensor([float("-inf")], dtype=dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["full", "topk"])
def test_kl_clip_caps_an_underflowed_probability_against_a_masked_one(backend, dtype, mode):
    s, t = underflow_case(dtype)
    s.requires_grad_()
    loss = hsd.hindsight_loss(s, t, mode=mode, alpha=1.0, topk=3, kl_clip=2.14,
                              reduction="none", backend=backend)
    assert torch.equal(loss.detach(), torch.full((3,), 2.14, dtype=dtype))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))  # capped tokens get no gradient
