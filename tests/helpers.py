"""Builders shared by several test files (importable as ``helpers``: pytest puts tests/ on sys.path)."""

import torch


def tiny_qwen2(tok, dtype=torch.float32, seed=0, max_position_embeddings=512):
    """A seeded random 2-layer Qwen2 (hidden 32, 4 query / 2 key-value heads) over ``tok``'s
    vocabulary, in eval mode: small enough that a test runs many forwards on CPU in seconds."""
    import transformers  # callers importorskip it first

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings)
    return transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()


def save_tiny_qwen2(path, tok):
    """Write ``tiny_qwen2(tok)`` and ``tok`` to ``path``: a local model directory for the CLI tests."""
    tiny_qwen2(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def check_out_dtype_mm_probe(monkeypatch, module, probe):
    """The half -> float32 GEMM probe ``probe`` caching in ``module._OUT_DTYPE_MM``: an
    out-of-memory error propagates, uncached (it is not a missing feature); CPU torch has no
    ``mm(out_dtype=)``, so the probe answers False once and caches it (the float32 fallback)."""
    import pytest

    monkeypatch.setattr(module, "_OUT_DTYPE_MM", {})

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(torch, "mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        probe(torch.device("cpu"), torch.bfloat16)
    assert module._OUT_DTYPE_MM == {}
    monkeypatch.undo()
    monkeypatch.setattr(module, "_OUT_DTYPE_MM", {})
    assert probe(torch.device("cpu"), torch.bfloat16) is False
    assert module._OUT_DTYPE_MM == {("cpu", torch.bfloat16): False}
