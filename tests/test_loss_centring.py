"""Centring (sampled mode, ``center=True``) in one pass over chunks cut at sequence boundaries.

The cpu and torch backends implement ``fused_centred``: a chunk of whole sequences knows its
means after its own forward; only sequences that do not fit a chunk (longer than one, or split
into several runs of rows) take a second, student-only pass over their rows. Every layout is
checked against the float64 definition through materialised logits (the reference backend's
logits form, which centres with a separate statistics pass), with tiny chunks so that every
case crosses chunk boundaries.
"""

import pytest
import torch

import hsd
from hsd.backends import NO_GRAD, GradNeeds, available_backends, torch_chunked

BACKENDS = [b for b in ("torch", "cpu") if b in available_backends()]
CHUNK = 4  # rows per chunk in these tests
VOCAB, HIDDEN = 37, 8

# name -> seq_ids (None: one sequence)
LAYOUTS = {
    # whole sequences packed into chunks; a sequence that does not fit starts the next chunk
    "aligned": [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 4, 4, 4],
    # a sequence longer than a chunk between short ones (it takes two passes, the rest one)
    "longer": [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2],
    # sequences split into several runs of rows (interleaved ids)
    "interleaved": [0, 1, 0, 1, 2, 2, 1, 3, 3, 3],
    # arbitrary, unsorted ids
    "unsorted": [9, 9, 9, 2, 2, -4, -4, -4, -4, 7],
    # one sequence, longer than a chunk
    "single": None,
}


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setenv("HSD_CPU_CHUNK_ROWS", str(CHUNK))
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", CHUNK * VOCAB)


def rel_err(actual, expected):
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def inputs(n, dtype, seed=0):
    """Inputs representable in ``dtype`` (the float64 reference sees the same values)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, HIDDEN, generator=g).to(dtype).double()
    th = (h + 0.5 * torch.randn(n, HIDDEN, generator=g)).to(dtype).double()
    w = (0.7 * torch.randn(VOCAB, HIDDEN, generator=g)).to(dtype).double()
    b = torch.randn(VOCAB, generator=g).to(dtype).double()
    y = torch.randint(0, VOCAB, (n,), generator=g)
    return h, th, w, b, y


def compare(backend, seq, dtype=torch.float64, *, frozen=False, weights=None, tol=1e-10, **kw):
    n = len(seq) if seq is not None else 11
    h, th, w, b, y = inputs(n, dtype)
    seq_ids = None if seq is None else torch.tensor(seq)
    kw = dict(seq_ids=seq_ids, center=True, weights=weights, ignore_first_k=1, **kw)
    per_token = kw.get("reduction") == "none"
    probe = torch.linspace(0.5, 1.5, n, dtype=torch.float64)  # a per-token upstream gradient

    def run(fn, *args):
        loss = fn(*args)
        (loss.double() * probe).sum().backward() if per_token else loss.backward()
        return loss

    h64, w64, b64 = (x.clone().requires_grad_(not (frozen and x is not h)) for x in (h, w, b))
    ref = run(lambda: hsd.hindsight_loss(h64 @ w64.T + b64, th @ w.T + b, y, backend="reference",
                                         **kw))
    h_, w_, b_ = (x.to(dtype).requires_grad_(not (frozen and x is not h)) for x in (h, w, b))
    got = run(lambda: hsd.fused_hindsight_loss(h_, th.to(dtype), w_, y, bias=b_, backend=backend,
                                               **kw))
    assert got.dtype == dtype
    assert rel_err(got, ref) <= tol
    assert rel_err(h_.grad, h64.grad) <= tol
    if frozen:
        assert w_.grad is None and b_.grad is None
    else:
        assert rel_err(w_.grad, w64.grad) <= tol and rel_err(b_.grad, b64.grad) <= tol
    # centring changed the loss: the test would fail without it
    plain = hsd.hindsight_loss(h64 @ w64.T + b64, th @ w.T + b, y, backend="reference",
                               **{**kw, "center": False})
    assert rel_err(plain, ref) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean", "none"])
def test_centring_matches_the_definition(tiny_chunks, backend, layout, reduction):
    compare(backend, LAYOUTS[layout], reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["aligned", "longer", "interleaved"])
def test_centring_with_masked_rows_clip_and_frozen_head(tiny_chunks, backend, layout):
    seq = LAYOUTS[layout]
    weights = torch.ones(len(seq), dtype=torch.float64)
    weights[[1, 4, len(seq) - 2]] = 0.0  # masked rows are excluded from the means
    compare(backend, seq, weights=weights, signal_clip=0.3)
    compare(backend, seq, weights=weights, frozen=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["aligned", "longer"])
def test_centring_in_low_precision(tiny_chunks, backend, dtype, layout):
    # float32 compute: 1e-5; bfloat16 outputs: their rounding (2^-8)
    compare(backend, LAYOUTS[layout], dtype, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_centring_without_gradients(tiny_chunks, backend):
    seq = torch.tensor(LAYOUTS["longer"])
    h, th, w, b, y = inputs(len(seq), torch.float64)
    kw = dict(seq_ids=seq, center=True, return_stats=True)
    ref, ref_stats = hsd.hindsight_loss(h @ w.T + b, th @ w.T + b, y, backend="reference", **kw)
    with torch.no_grad():
        got, stats = hsd.fused_hindsight_loss(h, th, w, y, bias=b, backend=backend, **kw)
    assert rel_err(got, ref) <= 1e-10
    for name, value in ref_stats.items():
        assert torch.equal(stats[name], value) if name == "mask" else \
            rel_err(stats[name], value) <= 1e-10


@pytest.fixture
def spy(monkeypatch):
    """Records the backend's ``fused`` and ``fused_centred`` calls."""
    calls = []

    def install(name):
        mod = hsd.select_backend(torch.device("cpu"), name)
        fused, centred = mod.fused, mod.fused_centred

        def spy_fused(h, th, w, b, tw, tb, y, coef, adv, spec, needs):
            calls.append(("fused", needs, th.data_ptr() == h.data_ptr(), adv))
            return fused(h, th, w, b, tw, tb, y, coef, adv, spec, needs)

        def spy_centred(h, th, w, b, tw, tb, y, coef, seq, spec, needs):
            calls.append(("centred", needs, h.shape[0], seq.clone()))
            return centred(h, th, w, b, tw, tb, y, coef, seq, spec, needs)

        monkeypatch.setattr(mod, "fused", spy_fused)
        monkeypatch.setattr(mod, "fused_centred", spy_centred)
        return calls

    return install


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_one_backend_call_with_the_valid_rows(backend, frozen, spy):
    calls = spy(backend)
    seq = torch.tensor(LAYOUTS["aligned"])
    h, th, w, b, y = (x.requires_grad_(x.is_floating_point() and not (frozen and i > 0))
                      for i, x in enumerate(inputs(len(seq), torch.float64)))
    weights = torch.ones(len(seq), dtype=torch.float64)
    weights[[0, 5]] = 0.0
    hsd.fused_hindsight_loss(h, th, w, y, bias=b, seq_ids=seq, weights=weights, center=True,
                             backend=backend).backward()
    # one call, given the valid rows and their sequences, asked for the gradients autograd wants
    assert len(calls) == 1 and calls[0][0] == "centred"
    assert calls[0][1] == GradNeeds(True, not frozen, not frozen)
    assert calls[0][2] == len(seq) - 2 and len(calls[0][3]) == len(seq) - 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_backward_reuses_the_centred_advantage(backend, spy):
    calls = spy(backend)
    seq = torch.tensor(LAYOUTS["aligned"])
    h, th, w, b, y = inputs(len(seq), torch.float64)
    h.requires_grad_()
    loss = hsd.fused_hindsight_loss(h, th, w, y, seq_ids=seq, center=True, reduction="none",
                                    backend=backend)
    assert [c[:2] for c in calls] == [("centred", NO_GRAD)]
    loss.sum().backward()
    # backward: one weighted pass with the forward's advantage, the student's inputs both sides
    assert len(calls) == 2 and calls[1][0] == "fused" and calls[1][2]
    assert calls[1][3] is not None and not calls[1][3].eq(1).all()


def test_plan_cuts_chunks_at_sequence_boundaries():
    seq = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 4, 4, 5, 6, 5])
    chunks, deferred = torch_chunked.centring_plan(seq, 4)
    # sequence 2 is longer than a chunk, 5 is split by 6: both deferred, in row order
    assert deferred == [5, 6, 7, 8, 9, 13, 15]
    assert chunks == [[0, 1], [2, 3, 4, 10], [11, 12, 14]]
    assert all(len(c) <= 4 for c in chunks)


def test_whole_sequences_take_one_pass(tiny_chunks, monkeypatch):
    """Work, not time: the rows the torch backend's chunks put through the row kernels."""
    seen = []
    real = torch_chunked.token_terms

    def counting(s, *args):
        seen.append(s.shape[0])
        return real(s, *args)

    monkeypatch.setattr(torch_chunked, "token_terms", counting)
    # every row once; the long sequence's 9 rows a second time for a weight gradient (a frozen
    # head gets grad_h from the first pass: the rows scale with a_t)
    for layout, frozen, extra in (("aligned", False, 0), ("longer", False, 9),
                                  ("longer", True, 0)):
        seen.clear()
        seq = torch.tensor(LAYOUTS[layout])
        h, th, w, b, y = inputs(len(seq), torch.float64)
        h.requires_grad_()
        w.requires_grad_(not frozen)
        hsd.fused_hindsight_loss(h, th, w, y, seq_ids=seq, center=True,
                                 backend="torch").backward()
        assert sum(seen) == len(seq) + extra and max(seen) <= CHUNK
