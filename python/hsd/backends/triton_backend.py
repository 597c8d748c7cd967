"""The ``"triton"`` backend: the kernel contract on Triton kernels (``hsd.kernels``).

CUDA tensors run compiled kernels; CPU tensors run under Triton's interpreter when
``TRITON_INTERPRET=1`` was set before the first kernel import (tests and debugging only).
The kernels are imported by :func:`is_available` (the dispatcher's first look at this
backend), never by ``import hsd``.
Float64 inputs (a checking dtype) go to the portable torch backend. See ``kernels/`` for the
design: cuBLAS GEMMs for logits and gradients, one Triton program per token row for the
softmax statistics, divergence and grad_logits, everything inside two ``torch.library``
custom ops so the backend runs under ``torch.compile``. Tensors on another GPU than the
current one run on their own device and its current stream.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from . import as_needs, torch_chunked

name = "triton"
logger = logging.getLogger("hsd")
_state: dict = {}  # cached: whether triton imports, and the loaded kernels package


def _triton_importable() -> bool:
    if "triton" not in _state:
        try:
            import triton  # noqa: F401
            _state["triton"] = True
        except ImportError:
            _state["triton"] = False
    return _state["triton"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """Triton imports, there is something to run on (a CUDA GPU, or the interpreter), and the
    kernels import; loading them here registers the ops before any ``torch.compile`` trace."""
    if not (_triton_importable() and (torch.cuda.is_available() or _interpreting())):
        return False
    try:
        kernels()
    except ImportError as err:
        logger.debug("hsd triton kernels unavailable: %s", err)
        return False
    return True


def supports(device: torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def kernels():
    """The ``hsd.kernels`` package: installed in the wheel, or ``kernels/`` of a source checkout."""
    mod = _state.get("kernels")
    if mod is not None:
        return mod
    try:
        mod = importlib.import_module("hsd.kernels")
    except ModuleNotFoundError as err:
        if err.name != "hsd.kernels":
            raise
        root = Path(__file__).resolve().parents[3] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "hsd.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        if spec is None or not (root / "__init__.py").exists():
            raise ImportError(f"hsd.kernels is not installed and {root} does not exist") from err
        mod = importlib.util.module_from_spec(spec)
        sys.modules["hsd.kernels"] = mod  # before exec: the package's relative imports need it
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules["hsd.kernels"]
            raise
    _state["kernels"] = mod
    return mod



def logits(student_logits, teacher_logits, target_ids, coef, advantage, spec, compute_grad):
    """Contract ``logits``: (token_loss [N] f32, stats [N, 4] f32, grad_student_logits or None)."""
    if student_logits.dtype == torch.float64:
        return torch_chunked.logits(student_logits, teacher_logits, target_ids, coef, advantage,
                                    spec, compute_grad)
    _load_ops()
    # the op never sees autograd: gradients are returned explicitly (contract)
    loss, stats, grad = torch.ops.hsd.triton_logits(
        student_logits.detach(), teacher_logits.detach().to(student_logits.dtype), target_ids,
        coef.detach(), advantage.detach() if advantage is not None else None,
        *spec.op_args(), bool(compute_grad))
    return loss, stats, grad if compute_grad else None


def fused(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, target_ids,
          coef, advantage, spec, needs):
    """Contract ``fused``: (token_loss, stats, grad_hidden, grad_weight fp32, grad_bias fp32)."""
    if student_hidden.dtype == torch.float64:
        return torch_chunked.fused(student_hidden, teacher_hidden, weight, bias, teacher_weight,
                                   teacher_bias, target_ids, coef, advantage, spec, needs)
    _load_ops()
    detach = (lambda x: None if x is None else x.detach())
    needs = as_needs(needs)
    want_b = needs.bias and bias is not None
    # the op computes only what is asked: no [V, H] work for a frozen head, no gradient pass
    # when nothing needs one
    loss, stats, gh, gw, gb = torch.ops.hsd.triton_fused_linear(
        *map(detach, (student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias)),
        target_ids, coef.detach(), detach(advantage), *spec.op_args(), bool(needs.hidden),
        bool(needs.weight), want_b)
    return (loss, stats, gh if needs.hidden else None, gw if needs.weight else None,
            gb if want_b else None)


def _load_ops() -> None:
    """Import the kernels once (registers the ``hsd::triton_*`` ops); a no-op after
    :func:`is_available`, so it is trace-free under ``torch.compile``."""
    if "kernels" not in _state:
        kernels()
