"""bench/gpu_check.py reports every implementation, including the ones that fail.

The real check runs on a GPU machine (bench/gpu_check.sh); ``--dry-run`` runs the same code on
the CPU. Here the dry run is shrunk to one tiny shape, with one implementation that raises and
one whose loss is NaN: both must be rows with their error, and the other rows must still run.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def test_failures_are_rows_with_their_error(monkeypatch, tmp_path, capsys):
    bench_loss = gpu_check.bench_loss
    monkeypatch.setattr(gpu_check, "DRY_SHAPES", [(8, 8, 50)])
    monkeypatch.setattr(gpu_check, "MODES", [("sampled", 1.0)])
    monkeypatch.setattr(bench_loss, "implementations",
                        lambda device, mode, alpha: ["eager", "broken", "nan", "chunked"])
    real = bench_loss.make_runner

    def make_runner(kind, hs, ht, w, y, args):
        if kind == "broken":
            def fail():
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
            return fail
        if kind == "nan":
            return lambda: (hs * float("nan")).sum()
        return real(kind, hs, ht, w, y, args)
    monkeypatch.setattr(bench_loss, "make_runner", make_runner)
    out = tmp_path / "check.json"
    status = gpu_check.main(["--dry-run", "--json", str(out)])
    assert status == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["broken"]["error"] == ("RuntimeError: CUDA error: an illegal memory access was "
                                       "encountered")
    assert rows["nan"]["error"].startswith("FloatingPointError: non-finite loss")
    for ok in ("eager", "chunked"):
        assert "error" not in rows[ok] and rows[ok]["median_s"] > 0
    assert rows["chunked"]["loss_rel_err"] < 1e-5
    table = capsys.readouterr().out
    assert "an illegal memory access" in table and "2 of 4 rows failed" in table


def test_out_of_memory_is_named():
    assert gpu_check._describe(torch.OutOfMemoryError("CUDA out of memory. Tried")) \
        == "out of memory"
    assert gpu_check._describe(ValueError("")) == "ValueError: "
