"""Loading the compiled operator library ``hsd._C`` (the ``torch.ops.hsd`` operators).

The extension is optional: when it is missing (a pure-Python install, e.g. from an isolated
``pip install .``) or was built against another torch release, :func:`load` returns False and
:mod:`hsd.backends` falls back to the portable backends. That is never silent: the first use
issues one :class:`ExtensionWarning` (a ``UserWarning``, shown by default) saying why and how to
build it; ``hsd info`` reports the same. On success :func:`load` also registers the Python halves
of the operators (fake kernels for ``torch.compile`` and the autograd formulas).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Optional

import torch

logger = logging.getLogger("hsd")

_loaded: Optional[bool] = None
_reason = ""
_fix = ""

_BUILD = ("pip install scikit-build-core cmake ninja, then from the hsd source "
          "pip install --no-build-isolation --no-deps --force-reinstall . "
          "(HSD_STRICT_BUILD=1 makes a failing compile an error instead of this fallback)")


class ExtensionWarning(UserWarning):
    """hsd's compiled extension is missing or unusable, so the slower portable backends run.

    Silence it with ``warnings.filterwarnings("ignore", category=hsd.ExtensionWarning)``, or
    choose a backend explicitly (``HSD_BACKEND=torch``)."""


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': local build tags do not change the C++ ABI."""
    return version.split("+")[0]


def build_info():
    """The ``hsd._build_info`` module written by CMake, or None for a pure-Python install."""
    try:
        return importlib.import_module("hsd._build_info")
    except ImportError:
        return None


def _try_load() -> tuple[str, str]:
    """Imports ``hsd._C``; returns ('', '') on success, else (why not, how to fix it)."""
    info = build_info()
    if info is None:
        return ("hsd was installed without its compiled extension (hsd._C), e.g. by an isolated "
                "`pip install .` that cannot see torch",
                f"build it against the installed torch: {_BUILD}")
    if _release(info.TORCH_VERSION) != _release(torch.__version__):
        return (f"hsd._C was built against torch {info.TORCH_VERSION} but torch "
                f"{torch.__version__} is running",
                f"rebuild hsd against this torch: {_BUILD}")
    try:
        importlib.import_module("hsd._C")
    except (ImportError, OSError) as err:
        return f"hsd._C failed to load: {err}", f"rebuild hsd: {_BUILD}"
    _register_python_parts()
    return "", ""


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel for the first frame outside hsd (the user's call), so the
    warning points at their line rather than at hsd's internals."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the caller of this function: warn's stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def load() -> bool:
    """True when ``torch.ops.hsd`` is usable; the first call without it warns once
    (:class:`ExtensionWarning`, naming the fix) and logs the details on the ``hsd`` logger."""
    global _loaded, _reason, _fix
    if _loaded is None:
        _reason, _fix = _try_load()
        _loaded = not _reason
        if _reason:
            logger.debug("hsd._C unavailable: %s (fix: %s)", _reason, _fix)
            warnings.warn(f"{_reason}; hsd runs its slower portable PyTorch backend instead. To fix: "
                          f"{_fix}. `hsd info` shows the build and every backend.",
                          ExtensionWarning, stacklevel=_caller_stacklevel())
    return _loaded


def unavailable_reason() -> str:
    """Why the extension is not loaded ('' when it is)."""
    load()
    return _reason


def unavailable_fix() -> str:
    """How to get the extension when it is not loaded ('' when it is)."""
    load()
    return _fix


def row_kernel_isa() -> Optional[str]:
    """Which compiled variant the C++ row kernels run: "x86-64-v4" (AVX-512), "x86-64-v3"
    (AVX2), "x86-64" (baseline SSE2) or "portable" (a non-x86 or non-GCC build); None without
    the extension. The best the CPU supports, unless ``HSD_CPU_ISA`` (read once per process)
    asks for a lower one: tests and benchmarks run every variant on one machine that way."""
    if not load():
        return None
    import ctypes

    try:  # a plain C symbol of hsd._C (no torch op needed); dlopen returns the loaded library
        fn = ctypes.CDLL(sys.modules["hsd._C"].__file__).hsd_row_kernel_isa
    except (OSError, AttributeError, KeyError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def cuda_kernels_linked() -> bool:
    """True when the loaded extension carries the CUDA kernels (built against a CUDA torch)."""
    info = build_info()
    return bool(load() and info is not None and info.CUDA_KERNELS_LINKED)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd for the C++ operators
# ----------------------------------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                target_ids, coef, advantage, mode, alpha, temperature, topk, topk_from_teacher,
                tail, signal_clip, kl_clip, grad_hidden, grad_weight, grad_bias):
    acc = _acc_dtype(student_hidden)
    n, hidden = student_hidden.shape
    vocab = weight.shape[0]
    loss = student_hidden.new_empty(n, dtype=acc)
    stats = student_hidden.new_empty(n, 4, dtype=acc)
    # a gradient that is not asked for is an empty tensor (as the C++ kernel returns it)
    grad_h = student_hidden.new_empty((n, hidden) if grad_hidden else (0,))
    grad_w = student_hidden.new_empty((vocab, hidden) if grad_weight else (0,), dtype=acc)
    grad_b = student_hidden.new_empty(vocab if grad_bias and bias is not None else 0, dtype=acc)
    return loss, stats, grad_h, grad_w, grad_b


def _fake_centred(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias,
                  target_ids, coef, seq_ids, temperature, signal_clip, grad_hidden, grad_weight,
                  grad_bias):
    loss, stats, grad_h, grad_w, grad_b = _fake_fused(
        student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
        coef, None, 0, 1.0, temperature, 0, False, True, signal_clip, 0.0, grad_hidden,
        grad_weight, grad_bias)
    return loss, stats, grad_h, grad_w, grad_b, loss.new_empty(loss.shape)


def _fake_logits(student_logits, teacher_logits, target_ids, coef, advantage, mode, alpha,
                 temperature, topk, topk_from_teacher, tail, signal_clip, kl_clip, compute_grad):
    acc = _acc_dtype(student_logits)
    n = student_logits.shape[0]
    grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,))
    return (student_logits.new_empty(n, dtype=acc), student_logits.new_empty(n, 4, dtype=acc),
            grad)


# Positions of the non-tensor arguments (mode ... kl_clip) in each schema.
_FUSED_SCALARS = slice(9, 17)
_LOGITS_SCALARS = slice(5, 13)


def _setup_fused(ctx, inputs, output):
    ctx.scalars = inputs[_FUSED_SCALARS]
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(*inputs[:3], inputs[3], inputs[4], inputs[5], inputs[6], inputs[8])


def _backward_fused(ctx, grad_loss, _grad_stats, _gh, _gw, _gb):
    """d(sum_i g_i * token_loss_i): rerun the operator with coef = g, computing only the
    gradients autograd needs (the teacher side and the advantage are constants; the returned
    gradient tensors are not differentiable)."""
    h, th, w, b, tw, tb, target, advantage = ctx.saved_tensors
    need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
    if grad_loss is None or not (need_h or need_w or need_b):
        return (None,) * 20
    _, _, gh, gw, gb = torch.ops.hsd.fused_hindsight(
        h, th, w, b, tw, tb, target, grad_loss, advantage, *ctx.scalars, need_h, need_w,
        need_b and ctx.has_bias)
    gh = gh if need_h else None
    gw = gw.to(w.dtype) if need_w else None
    gb = gb.to(b.dtype) if need_b and ctx.has_bias else None
    return (gh, None, gw, gb) + (None,) * 16


def _setup_logits(ctx, inputs, output):
    ctx.scalars = inputs[_LOGITS_SCALARS]
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[4])


def _backward_logits(ctx, grad_loss, _grad_stats, _grad_logits):
    """d(sum_i g_i * token_loss_i) / d student_logits, by rerunning with coef = g."""
    s, t, target, advantage = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 14
    _, _, grad = torch.ops.hsd.hindsight_from_logits(s, t, target, grad_loss, advantage,
                                                     *ctx.scalars, True)
    return (grad,) + (None,) * 13


def _register_python_parts() -> None:
    torch.library.register_fake("hsd::fused_hindsight", _fake_fused)
    torch.library.register_fake("hsd::hindsight_from_logits", _fake_logits)
    # no autograd for the centred op: hsd.loss calls it with its own gradient bookkeeping
    torch.library.register_fake("hsd::fused_hindsight_centred", _fake_centred)
    torch.library.register_autograd("hsd::fused_hindsight", _backward_fused,
                                    setup_context=_setup_fused)
    torch.library.register_autograd("hsd::hindsight_from_logits", _backward_logits,
                                    setup_context=_setup_logits)
