"""The compiled extension was built, matches the running torch, and is what CPU tensors get."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import hsd
from hsd import _extension
from hsd.backends import select_backend

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/cuda-13.0/bin/nvcc") if os.path.exists(p)),
    None)


def test_extension_loaded():
    assert _extension.load(), _extension.unavailable_reason()
    info = _extension.build_info()
    assert info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert hasattr(torch.ops.hsd, "fused_hindsight") and hasattr(torch.ops.hsd, "hindsight_from_logits")


def test_cpu_tensors_dispatch_to_the_compiled_backend():
    assert select_backend(torch.device("cpu")).name == "cpu"
    assert "cpu" in hsd.available_backends()


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_sources_compiled_when_nvcc_present():
    """With nvcc on the build machine the .cu files are always compiled (never silently skipped)."""
    info = _extension.build_info()
    assert info is not None and info.CUDA_KERNELS_COMPILED
    # with a CPU-only torch they are compiled as a check but not linked into hsd._C
    assert info.CUDA_KERNELS_LINKED == bool(torch.version.cuda)


def test_triton_kernels_are_packaged_as_hsd_kernels():
    if not (ROOT / "kernels" / "__init__.py").exists():
        pytest.skip("no kernels/ package in this checkout")
    assert importlib.util.find_spec("hsd.kernels") is not None


def test_pyproject_keeps_torch_out_of_the_build_requirements():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.startswith("torch") for r in config["build-system"]["requires"])
    assert config["tool"]["scikit-build"]["wheel"]["packages"]["hsd/kernels"] == "kernels"
    assert any(o.get("if", {}).get("failed") for o in config["tool"]["scikit-build"]["overrides"])
