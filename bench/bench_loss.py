"""Microbenchmark of the hindsight loss, forward + backward, side by side.

Implementations (each on the same inputs, interleaved round-robin so machine noise hits all):
  eager    materialise [N, V] logits for both sides, log_softmax, divergence, autograd
  chunked  plain-PyTorch chunks (hsd backend "torch")
  hsd-*    hsd.fused_hindsight_loss with each available compiled backend (cpu, triton, cuda)
  liger    Liger-Kernel's LigerFusedLinearJSD, when importable and on a GPU

Reports the median time of the repeats and the extra peak memory over the inputs (CPU: VmHWM
after resetting it through /proc/self/clear_refs; CUDA: max_memory_allocated), as ratios to
eager. Prints a table and writes JSON.

    python bench/bench_loss.py                         # N=4096 H=1024 V=151936 fp32 full alpha=1
    python bench/bench_loss.py --n 256 --v 32000 --mode sampled --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hsd

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Extra peak memory (bytes) of a block over what was allocated when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.start


# ---------------------------------------------------------------- implementations
def eager_loss(hs, ht, w, y, mode, alpha, topk):
    """What a trainer without hsd does: full logits on both sides, then the divergence."""
    s = (hs @ w.T).float()
    with torch.no_grad():
        lp_t = torch.log_softmax((ht @ w.T).float(), -1)
    lp_s = torch.log_softmax(s, -1)
    if mode == "sampled":
        lp_s_y = lp_s.gather(1, y[:, None])[:, 0]
        adv = lp_t.gather(1, y[:, None])[:, 0] - lp_s_y.detach()
        return (-adv * lp_s_y).mean()
    if mode == "full" and alpha == 1.0:
        return F.kl_div(lp_t, lp_s, reduction="none", log_target=True).sum(-1).mean()
    if mode == "full" and alpha == 0.0:
        return F.kl_div(lp_s, lp_t, reduction="none", log_target=True).sum(-1).mean()
    if mode == "full":
        lm = torch.logaddexp(lp_s + torch.log1p(torch.tensor(-alpha)), lp_t + torch.log(torch.tensor(alpha)))
        return ((1 - alpha) * F.kl_div(lm, lp_s, reduction="none", log_target=True).sum(-1)
                + alpha * F.kl_div(lm, lp_t, reduction="none", log_target=True).sum(-1)).mean()
    return hsd.hindsight_loss(s, lp_t, y, mode=mode, alpha=alpha, topk=topk, backend="torch",
                              reduction="token_mean")


def make_runner(kind, hs, ht, w, y, args):
    device = hs.device
    if kind == "eager":
        return lambda: eager_loss(hs, ht, w, y, args.mode, args.alpha, args.topk)
    if kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=args.alpha)
        return lambda: jsd(hs, w, ht, w, None)
    backend = "torch" if kind == "chunked" else kind.removeprefix("hsd-")
    return lambda: hsd.fused_hindsight_loss(hs, ht, w, y, mode=args.mode, alpha=args.alpha,
                                            topk=args.topk, reduction="token_mean",
                                            backend=backend)


def run_once(fn, hs, w, device):
    hs.grad = w.grad = None
    with PeakMemory(device) as mem:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        value = float(loss.detach())
        del loss
    hs.grad = w.grad = None
    return elapsed, mem.peak, value


def implementations(device, mode, alpha):
    kinds = ["eager", "chunked"]
    kinds += [f"hsd-{b}" for b in ("cpu", "triton", "cuda") if _safe_supports(device, b)]
    if device.type == "cuda" and mode == "full" and 0 < alpha <= 1:
        try:
            import liger_kernel  # noqa: F401

            kinds.append("liger")
        except ImportError:
            pass
    return kinds


def _safe_supports(device, name):
    try:
        hsd.select_backend(device, name)
        return True
    except RuntimeError:
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens")
    p.add_argument("--h", type=int, default=1024, help="hidden size")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--mode", choices=["sampled", "full", "topk"], default="full")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impl", nargs="*", help="subset of implementations to run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="bench/results/bench_loss.json")
    args = p.parse_args(argv)
    if args.mode == "topk" and args.topk is None:
        args.topk = 64
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    hs = (torch.randn(args.n, args.h, device=device) / args.h ** 0.25).to(dtype).requires_grad_()
    ht = (hs.detach() + 0.1 * torch.randn_like(hs)).to(dtype)
    w = (torch.randn(args.v, args.h, device=device) / args.h ** 0.25).to(dtype).requires_grad_()
    y = torch.randint(0, args.v, (args.n,), device=device)

    kinds = args.impl or implementations(device, args.mode, args.alpha)
    runners = {k: make_runner(k, hs, ht, w, y, args) for k in kinds}
    print(f"hsd bench: N={args.n} H={args.h} V={args.v} {args.dtype} mode={args.mode} "
          f"alpha={args.alpha} device={device} threads={torch.get_num_threads()} "
          f"({platform.processor() or platform.machine()})", flush=True)
    for fn in runners.values():  # warm-up (compilation, allocator)
        if device.type == "cuda":
            run_once(fn, hs, w, device)
    results = {k: {"times": [], "peaks": [], "loss": None} for k in kinds}
    for rep in range(args.repeats):
        for k, fn in runners.items():
            t, m, value = run_once(fn, hs, w, device)
            results[k]["times"].append(t)
            results[k]["peaks"].append(m)
            results[k]["loss"] = value
            print(f"  rep {rep} {k:12s} {t:8.3f} s  extra peak {m / 2**20:9.1f} MiB  "
                  f"loss {value:.6g}", flush=True)
    base = results.get("eager")
    rows = []
    for k, r in results.items():
        med_t, peak = statistics.median(r["times"]), max(r["peaks"])
        row = {"impl": k, "median_s": med_t, "peak_extra_mib": peak / 2**20, "loss": r["loss"],
               "times": r["times"]}
        if base:
            row["time_vs_eager"] = med_t / statistics.median(base["times"])
            row["mem_vs_eager"] = peak / max(max(base["peaks"]), 1)
        rows.append(row)
    print(f"\n{'impl':12s} {'median s':>9s} {'x eager':>8s} {'extra MiB':>10s} {'mem/eager':>9s}")
    for row in rows:
        print(f"{row['impl']:12s} {row['median_s']:9.3f} {row.get('time_vs_eager', float('nan')):8.3f} "
              f"{row['peak_extra_mib']:10.1f} {row.get('mem_vs_eager', float('nan')):9.4f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "python": sys.version.split()[0],
                               "torch": torch.__version__, "machine": platform.machine(),
                               "cpu_count": os.cpu_count(), "results": rows}, indent=2))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
