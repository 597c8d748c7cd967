"""bench/bench_step.py --smoke: every row runs, the JSON report is complete and self-consistent.

The smoke run is one round with tiny messages and one timed step, so it checks the script (both
templates, both isolation modes), not the speed targets.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["naive", "hsd-tuple", "hsd-packed-masked", "hsd-packed-loop", "sft"]


def run_smoke(tmp_path, *extra):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_step.py"), "--smoke", "--threads", "1",
                             "--json", str(out), *extra], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "target (wall time" in result.stdout and "target (cpu time)" in result.stdout
    return json.loads(out.read_text())


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


# chatml: one round, every row in one process; qwen3: two rounds (the first reply is scored in
# a student branch, the SFT labels find it in the trunk), one worker process per row
@pytest.mark.parametrize("template,isolate,rounds", [("chatml", "none", 1), ("qwen3", "process", 2)])
def test_smoke_report_has_every_row(tmp_path, template, isolate, rounds):
    report = run_smoke(tmp_path, "--template", template, "--isolate", isolate, "--rounds", str(rounds))
    rows = report["rows"]
    assert list(rows) == ROWS
    data = report["data"]
    assert data["tuples"] == rounds and data["conversation_tokens"] > 0
    assert data["student_branches"] == (rounds - 1 if template == "qwen3" else 0)
    for name, row in rows.items():
        assert row["time_s"] > 0 and len(row["times_s"]) == 1 and row["cpu_s"] > 0, name
        assert row["flops"] > 0 and row["student_tokens"] > 0 and math.isfinite(row["loss"]), name
        assert row["peak_bytes"] > 0, name
        assert set(row) >= {"time_vs_naive", "flops_vs_naive", "step_bytes_vs_naive", "tokens_vs_naive",
                            "teacher_tokens", "teacher_tokens_saved", "phases_s"}, name
        assert "backward" in row["phases_s"] and "other" in row["cpu_phases_s"], name
    naive, tup = rows["naive"], rows["hsd-tuple"]
    assert naive["time_vs_naive"] == 1.0
    # the per-tuple step computes the naive loss, with fewer teacher tokens (the prefix is reused)
    assert rel(tup["loss"], naive["loss"]) < 1e-4
    assert tup["student_tokens"] == naive["student_tokens"]
    assert tup["teacher_tokens"] + tup["teacher_tokens_saved"] == naive["teacher_tokens"]
    assert tup["flops"] < naive["flops"]
    # at most two rounds: the packed layout sees the same history as the per-tuple one (5
    # messages), so every hindsight row computes the naive loss; both strategies agree
    masked, loop = rows["hsd-packed-masked"], rows["hsd-packed-loop"]
    assert rel(masked["loss"], loop["loss"]) < 1e-5
    assert rel(masked["loss"], naive["loss"]) < 1e-4
    assert rows["sft"]["teacher_tokens"] == 0 and rows["sft"]["loss"] > 0
    targets = report["targets"]
    assert targets["clock"] == "wall" and set(targets["by_clock"]) == {"wall", "cpu"}
    assert targets["best_packed_row"] in ("hsd-packed-masked", "hsd-packed-loop")
    assert targets["packed_vs_naive_limit"] == {"chatml": 0.35, "qwen3": 0.45}[template]
    best = rows[targets["best_packed_row"]]
    assert targets["packed_vs_naive"] == pytest.approx(best["time_s"] / naive["time_s"])
    assert targets["met_vs_sft"] == (best["time_s"] <= rows["sft"]["time_s"])
    # one step: the median of per-round ratios is the ratio itself
    assert targets["packed_vs_naive_paired"] == pytest.approx(targets["packed_vs_naive"])
    assert {"naive", "hsd-tuple", "sft"} <= set(rows) and report["model"]["vocab_size"] == 32000
