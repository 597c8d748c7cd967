"""Without a usable compiled extension, hsd still works, and says so: one ExtensionWarning (shown
by default, pointing at the user's call and naming the fix) at first use, then the torch backend."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, sys, types, warnings
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
{setup}
import torch, hsd
assert not [w for w in warnings.filters if w[2] is hsd.ExtensionWarning]  # default filters
h = torch.randn(4, 8, requires_grad=True)
loss = hsd.fused_hindsight_loss(h, torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]))  # USER LINE
loss.backward()
assert torch.isfinite(loss) and h.grad is not None
assert hsd.available_backends() == ["reference", "torch"], hsd.available_backends()
assert hsd.select_backend(torch.device("cpu")).name == "torch"
hsd.fused_hindsight_loss(h, torch.randn(4, 8), torch.randn(16, 8), torch.tensor([1, 2, 3, 4]))
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


def run_script(setup: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HSD_BACKEND", "TRITON_INTERPRET", "PYTHONWARNINGS")}
    return subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup)], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fallback_warns_once_at_first_use_naming_the_fix(case):
    setup, expected = CASES[case]
    proc = run_script(setup)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
    warned = [line for line in proc.stderr.splitlines() if "ExtensionWarning:" in line]
    assert len(warned) == 1, proc.stderr
    assert expected in warned[0]
    assert "pip install --no-build-isolation" in warned[0] and "hsd info" in warned[0]
    # it points at the user's loss call, not at hsd's internals
    lines = SCRIPT.format(setup=setup).splitlines()
    user_line = next(i for i, line in enumerate(lines, 1) if "USER LINE" in line)
    assert warned[0].startswith(f"<string>:{user_line}:"), warned[0]
    # shown once, and not twice (no duplicate through the logger)
    assert not [line for line in proc.stderr.splitlines() if line.startswith("hsd WARNING")]


def test_explicit_portable_backend_does_not_warn():
    """Asking for the torch backend by name is a choice, not a silent fallback."""
    setup = CASES["not built"][0] + '\nimport os\nos.environ["HSD_BACKEND"] = "torch"'
    script = SCRIPT.format(setup=setup).replace(
        'assert hsd.available_backends() == ["reference", "torch"], hsd.available_backends()\n', "")
    env = {k: v for k, v in os.environ.items() if k not in ("HSD_BACKEND", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "ExtensionWarning" not in proc.stderr
