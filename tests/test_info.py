"""``hsd info``: versions, build and every backend with why it cannot run."""

import json
import os
import subprocess
import sys

import pytest
import torch

import hsd
from hsd import _extension
from hsd.backends import BACKEND_NAMES
from hsd.cli import main


def run_info(capsys, *args):
    assert main(["info", *args]) == 0
    return capsys.readouterr().out


def test_info_json_matches_this_process(capsys):
    info = json.loads(run_info(capsys, "--json"))
    assert info["hsd"]["version"] == hsd.__version__
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda"] == torch.version.cuda
    assert [b["name"] for b in info["backends"]] == list(BACKEND_NAMES)
    available = {b["name"]: b["available"] for b in info["backends"]}
    assert [n for n in BACKEND_NAMES if available[n]] == hsd.available_backends()
    for b in info["backends"]:  # every unavailable backend says why
        assert bool(b["reason"]) != b["available"], b
    assert info["extension"]["loaded"] == _extension.load()
    assert info["extension"]["row_kernel_isa"] == _extension.row_kernel_isa()
    assert info["default_backend"]["cpu"] == hsd.select_backend(torch.device("cpu")).name
    build = _extension.build_info()
    if build is not None:
        assert info["extension"]["built_against"]["torch"] == build.TORCH_VERSION


def test_info_report_lists_backends_and_build(capsys):
    out = run_info(capsys)
    assert f"hsd {hsd.__version__}" in out and torch.__version__ in out
    for name in BACKEND_NAMES:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert ("loaded (" in out) == _extension.load()


def test_info_environment_variables(capsys, monkeypatch):
    monkeypatch.setenv("HSD_CPU_CHUNK_ROWS", "64")
    info = json.loads(run_info(capsys, "--json"))
    assert info["environment"]["HSD_CPU_CHUNK_ROWS"] == "64"


def test_info_forced_backend_that_cannot_run_is_reported(capsys, monkeypatch):
    monkeypatch.setenv("HSD_BACKEND", "cuda")
    if torch.cuda.is_available() and "cuda" in hsd.available_backends():
        pytest.skip("the cuda backend runs here; the error case needs a machine without it")
    info = json.loads(run_info(capsys, "--json"))
    assert info["default_backend"]["cpu"].startswith("error:")


SCRIPT = """
import sys
sys.modules["hsd._build_info"] = None  # a pure-Python install
from hsd.cli import main
sys.exit(main(["info", "--json"]))
"""


def test_info_without_the_extension_says_why_and_how_to_fix():
    env = {k: v for k, v in os.environ.items() if k not in ("HSD_BACKEND", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    ext = info["extension"]
    assert not ext["loaded"] and ext["built_against"] is None and ext["row_kernel_isa"] is None
    assert "without its compiled extension" in ext["reason"]
    assert "--no-build-isolation" in ext["fix"]
    cpu = next(b for b in info["backends"] if b["name"] == "cpu")
    assert not cpu["available"] and cpu["reason"] == ext["reason"]
    assert info["default_backend"]["cpu"] == "torch"
    assert "ExtensionWarning" not in proc.stderr  # the report states it; no warning on top


def test_hsd_info_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "hsd", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backend" in proc.stdout and "why not" in proc.stdout
