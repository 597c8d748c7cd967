"""Without a usable compiled extension, `import hsd` still works, warns once and falls back."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys, types
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
{setup}
import torch, hsd
assert hsd.available_backends() == ["reference", "torch"], hsd.available_backends()
assert hsd.select_backend(torch.device("cpu")).name == "torch"
h = torch.randn(4, 8, requires_grad=True)
loss = hsd.fused_hindsight_loss(h, torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]))
loss.backward()
assert torch.isfinite(loss) and h.grad is not None
hsd.available_backends()
print("ok")
"""

CASES = {
    "built against another torch": (
        'info = types.ModuleType("hsd._build_info")\n'
        'info.TORCH_VERSION, info.TORCH_CUDA = "1.0.0", ""\n'
        "info.CUDA_KERNELS_COMPILED = info.CUDA_KERNELS_LINKED = False\n"
        'sys.modules["hsd._build_info"] = info', "built against torch 1.0.0"),
    "not built": ('sys.modules["hsd._build_info"] = None', "without its compiled extension"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_falls_back_with_one_warning(case):
    setup, expected = CASES[case]
    env = {k: v for k, v in os.environ.items() if k not in ("HSD_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("hsd WARNING")]
    assert len(warnings) == 1, proc.stderr
    assert expected in warnings[0]
