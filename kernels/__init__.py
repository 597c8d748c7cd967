"""Triton kernels for the hindsight loss (shipped as ``hsd.kernels``).

Reached only through the ``"triton"`` backend (:mod:`hsd.backends.triton_backend`); set
``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.

* :mod:`.row_divergence`: the per-row Triton kernel (softmax statistics, divergence,
  grad_logits) shared by both forms;
* :mod:`.logits`: the logits-input form, op ``hsd::triton_logits``;
* :mod:`.fused_linear`: the fused LM-head form, op ``hsd::triton_fused_linear``.

Both ops are ``torch.library.custom_op`` with fake implementations, so they run inside
``torch.compile(fullgraph=True)``.
"""

from .fused_linear import fused_terms, triton_fused_linear
from .logits import logits_terms, triton_logits

__all__ = ["fused_terms", "logits_terms", "triton_fused_linear", "triton_logits"]
