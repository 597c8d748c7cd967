"""GEMM capabilities shared by the GPU backends (importable without Triton or a GPU)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("hsd")

_OUT_DTYPE_MM: dict = {}  # (device type, dtype) -> whether mm / addmm take out_dtype=float32


def out_dtype_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` operands into a float32 result (``torch.mm`` /
    ``torch.addmm`` with ``out_dtype=torch.float32``: half tensor cores, float32 output, no
    float32 copy of the LM head), probed once per (device type, dtype) on 1 x 1 operands.

    Only an unsupported signature counts as "no" (logged once as a warning: the callers then
    multiply float32 copies of the head, slower). The probe cannot run out of memory, and the
    real GEMMs are never wrapped in a fallback, so an out-of-memory error propagates instead of
    silently switching the run to the float32 copies.
    """
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_MM:
        a = torch.ones(1, 1, device=device, dtype=dtype)
        out = torch.zeros(1, 1, device=device, dtype=torch.float32)
        try:
            torch.mm(a, a, out_dtype=torch.float32, out=out)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            _OUT_DTYPE_MM[key] = True
            logger.debug("hsd: %s GEMMs on %s write float32 through out_dtype", dtype, device.type)
        except (TypeError, RuntimeError) as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            _OUT_DTYPE_MM[key] = False
            logger.warning("hsd: torch.mm(out_dtype=float32) is unavailable for %s on %s (%s); the "
                           "fused loss multiplies float32 copies of the LM head instead (slower)",
                           dtype, device.type, str(err).splitlines()[0])
    return _OUT_DTYPE_MM[key]
