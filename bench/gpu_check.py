"""The GPU check: fused-loss speed and memory against the GEMM floor and Liger, in one call.

Run through ``bench/gpu_check.sh`` on a GPU machine (it builds and tests first). For each shape
and mode it times forward + backward of every implementation (median of --repeats after a
warm-up) and reports:
  x floor   time / (8 T H V FLOPs at this device's measured bf16 GEMM rate): the two logits GEMMs
            and the two gradient GEMMs every fused loss must do
  x liger   time / Liger's LigerFusedLinearJSD time (when a Liger wheel is installed)
  peak      extra peak memory over the inputs
  loss err  relative difference of the loss from eager's (Liger's JSD has its own normalisation)

An implementation that fails (an exception, out of memory, a non-finite loss) gets its error in
its row of the table and the JSON, and the other rows still run; the exit status is 1 then.

``--dry-run`` runs the same code on tiny shapes on the CPU (Triton through its interpreter), so
the script itself is checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:
    # before torch (which may import triton): triton's own @jit helpers are built for the
    # interpreter only when the variable is set at its import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_loss  # noqa: E402,I001

GPU_SHAPES = [(8192, 4096, 128256), (8192, 896, 151936)]
DRY_SHAPES = [(32, 32, 1000), (24, 16, 1537)]
MODES = [("full", 0.5), ("sampled", 1.0)]


def gemm_rate(device, dtype, size=8192, repeats=10) -> float:
    """Measured matmul throughput (FLOP/s) for a square GEMM of this size and dtype."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_shape(t, h, v, mode, alpha, dtype, device, repeats, rate):
    args = argparse.Namespace(mode=mode, alpha=alpha, topk=None)
    torch.manual_seed(0)
    hs = (torch.randn(t, h, device=device) / h**0.25).to(dtype).requires_grad_()
    ht = (hs.detach() + 0.1 * torch.randn_like(hs)).to(dtype)
    w = (torch.randn(v, h, device=device) / h**0.25).to(dtype).requires_grad_()
    y = torch.randint(0, v, (t,), device=device)
    kinds = bench_loss.implementations(device, mode, alpha)
    rows = []
    for kind in kinds:
        try:
            fn = bench_loss.make_runner(kind, hs, ht, w, y, args)
            bench_loss.run_once(fn, hs, w, device)  # warm-up: compilation, autotuning
            runs = [bench_loss.run_once(fn, hs, w, device) for _ in range(repeats)]
            if not all(map(_finite, (r[2] for r in runs))):
                raise FloatingPointError(f"non-finite loss {runs[-1][2]}")
        except Exception as err:  # noqa: BLE001 - one implementation's failure is one row
            rows.append({"impl": kind, "error": _describe(err)})
            print(f"   {kind} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            hs.grad = w.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        med = statistics.median(r[0] for r in runs)
        rows.append({"impl": kind, "median_s": med, "peak_mib": max(r[1] for r in runs) / 2**20,
                     "loss": runs[-1][2], "x_floor": med / (8 * t * h * v / rate)})
    liger = next((r for r in rows if r["impl"] == "liger" and "median_s" in r), None)
    eager = next((r for r in rows if r["impl"] == "eager" and "median_s" in r), None)
    for r in rows:
        if liger and "median_s" in r:
            r["x_liger"] = r["median_s"] / liger["median_s"]
        if eager and "loss" in r:  # every implementation must agree on the value it times
            r["loss_rel_err"] = abs(r["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-12)
    return rows


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _describe(err: BaseException) -> str:
    """One line for the table: the error type and the first line of its message."""
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shapes, dtype, repeats = torch.device("cpu"), DRY_SHAPES, torch.float32, 1
        rate = gemm_rate(device, dtype, size=512, repeats=3)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device (use --dry-run on a CPU machine)")
        device, shapes, dtype, repeats = torch.device("cuda"), GPU_SHAPES, torch.bfloat16, args.repeats
        rate = gemm_rate(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}: torch {torch.__version__}, GEMM rate {rate / 1e12:.1f} TFLOP/s",
          flush=True)
    table = []
    for t, h, v in shapes:
        for mode, alpha in MODES:
            try:
                rows = check_shape(t, h, v, mode, alpha, dtype, device, repeats, rate)
            except Exception as err:  # noqa: BLE001 - e.g. the inputs themselves do not fit
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                rows = [{"impl": "(inputs)", "error": _describe(err)}]
            for row in rows:
                row.update(shape=f"T={t} H={h} V={v}", mode=f"{mode}" + (f" a={alpha}" if mode != "sampled" else ""))
                table.append(row)
                print("  ", row, flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "gemm_tflops": rate / 1e12, "rows": table}, indent=2))
    print(f"\n{'shape':24s} {'mode':12s} {'impl':12s} {'ms':>9s} {'x floor':>8s} {'x liger':>8s} "
          f"{'peak MiB':>9s} {'loss err':>9s}")
    for r in table:
        if "error" in r:
            print(f"{r['shape']:24s} {r['mode']:12s} {r['impl']:12s} {r['error']}")
            continue
        print(f"{r['shape']:24s} {r['mode']:12s} {r['impl']:12s} {r['median_s'] * 1e3:9.2f} "
              f"{r['x_floor']:8.2f} {r.get('x_liger', float('nan')):8.2f} {r['peak_mib']:9.0f} "
              f"{r.get('loss_rel_err', float('nan')):9.1e}")
    failed = [r for r in table if "error" in r]
    if failed:
        print(f"\n{len(failed)} of {len(table)} rows failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
