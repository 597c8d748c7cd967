"""The README's quick-start snippet runs as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    if not README.exists():
        pytest.skip("no README.md next to the tests")
    section = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README quick start", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert scope["student_hidden"].grad is not None and scope["lm_head"].grad is not None


def test_training_step_runs():
    section = README.read_text().split("## Training step", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README training step", "exec"), scope)
    assert torch.isfinite(scope["out"].loss)
    assert scope["out"].counts["teacher_tokens_saved"] > 0
