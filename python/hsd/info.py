"""``hsd info``: what this installation of hsd can run and why, for users and bug reports
(in the spirit of ``python -m torch.utils.collect_env``).

    hsd info            # a readable report
    hsd info --json     # the same facts as JSON

It reports hsd, Python, the CPU (and the row-kernel variant it runs), torch and CUDA versions,
the GPUs, Triton, what the compiled extension was built against and whether it loaded (with the
fix when it did not), every backend with why it is unavailable, which backend each device type
gets by default, and the environment variables hsd reads.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
from typing import Any, Optional

# Environment variables that change what hsd runs (HSD_* are collected by prefix).
_ENV_VARS = ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cpu() -> dict[str, Any]:
    """CPU model and the best row-kernel variant it supports (the C++ row kernels are compiled
    for x86-64-v4 / AVX-512, x86-64-v3 / AVX2 and baseline x86-64; the extension reports the one
    it runs, which HSD_CPU_ISA can lower)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: leave the features unknown
        pass
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if platform.machine() not in ("x86_64", "AMD64"):
        isa = "portable (not x86-64)"
    elif not flags:
        isa = "unknown (CPU flags not readable)"
    elif v3 | v4 <= flags:
        isa = "x86-64-v4 (AVX-512)"
    elif v3 <= flags:
        isa = "x86-64-v3 (AVX2)"
    else:
        isa = "baseline x86-64 (SSE2)"
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "best_isa": isa}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus(torch) -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                     "memory_gib": round(p.total_memory / 2**30, 1)})
    return gpus


def _backend_reason(name: str, torch, ext) -> str:
    """Why backend ``name`` cannot run here ('' when it can)."""
    if name in ("reference", "torch"):
        return ""
    if name == "cpu":
        return ext.unavailable_reason()
    if name == "triton":
        if _version("triton") is None and importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton, or hsd[triton])"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA GPU visible (TRITON_INTERPRET=1 runs the kernels on CPU, for tests)"
        try:
            from .backends import triton_backend

            triton_backend.kernels()
        except Exception as err:  # noqa: BLE001 - any import failure is the answer here
            return f"the Triton kernels failed to import: {type(err).__name__}: {err}"
        return ""
    if name == "cuda":
        if not torch.version.cuda:
            return "torch is a CPU-only build (no CUDA)"
        reason = ext.unavailable_reason()
        if reason:
            return reason
        info = ext.build_info()
        if not info.CUDA_KERNELS_COMPILED:
            return "hsd._C was built without its CUDA kernels (nvcc was not found at build time)"
        if not info.CUDA_KERNELS_LINKED:
            return "hsd._C's CUDA kernels were compiled but not linked (built against a CPU torch)"
        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
        return ""
    return "unknown backend"


def collect() -> dict[str, Any]:
    """Every fact the report shows, as a JSON-serialisable dict."""
    import torch

    import hsd
    from . import _extension as ext
    from .backends import BACKEND_NAMES, _load, select_backend

    # the report states the extension's status itself: no ExtensionWarning on top
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ext.ExtensionWarning)
        loaded = ext.load()
        build = ext.build_info()
        backends = []
        for name in BACKEND_NAMES:
            module = _load(name)
            reason = "" if module is not None else (_backend_reason(name, torch, ext)
                                                     or "is_available() is False")
            devices = [d for d in ("cpu", "cuda")
                       if module is not None and module.supports(torch.device(d))]
            backends.append({"name": name, "available": module is not None, "devices": devices,
                             "reason": reason})
        defaults = {}
        for device in ("cpu", "cuda"):
            if device == "cuda" and not torch.cuda.is_available():
                defaults[device] = None
                continue
            try:
                defaults[device] = select_backend(torch.device(device)).name
            except (RuntimeError, ValueError) as err:  # a forced HSD_BACKEND that cannot run
                defaults[device] = f"error: {err}"
    extension = {"loaded": loaded, "reason": ext._reason, "fix": ext._fix,
                 "path": getattr(sys.modules.get("hsd._C"), "__file__", None),
                 "row_kernel_isa": ext.row_kernel_isa()}
    if build is not None:
        extension["built_against"] = {
            "torch": build.TORCH_VERSION, "cuda": build.TORCH_CUDA or None,
            "cuda_kernels_compiled": bool(build.CUDA_KERNELS_COMPILED),
            "cuda_kernels_linked": bool(build.CUDA_KERNELS_LINKED)}
    else:
        extension["built_against"] = None
    return {
        "hsd": {"version": hsd.__version__, "location": os.path.dirname(hsd.__file__)},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "cpu": _cpu(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "hip": getattr(torch.version, "hip", None), "threads": torch.get_num_threads(),
                  "cuda_available": torch.cuda.is_available()},
        "gpus": _gpus(torch),
        "triton": _version("triton"),
        "extension": extension,
        "backends": backends,
        "default_backend": defaults,
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("HSD_") or k in _ENV_VARS},
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`collect`'s facts."""
    ext, t = info["extension"], info["torch"]
    lines = [f"hsd {info['hsd']['version']}  ({info['hsd']['location']})"]
    row = "  {:<22}{}".format
    if ext["loaded"]:
        lines.append(row("compiled extension", f"loaded ({ext['path']})"))
        lines.append(row("row kernels", f"{ext['row_kernel_isa']} variant"))
    else:
        lines.append(row("compiled extension", f"NOT LOADED: {ext['reason']}"))
        lines.append(row("to fix", ext["fix"]))
    built = ext["built_against"]
    if built is not None:
        lines.append(row("built against", f"torch {built['torch']}, CUDA {built['cuda'] or 'none'}"
                         f"; CUDA kernels compiled: {_yes(built['cuda_kernels_compiled'])}, "
                         f"linked: {_yes(built['cuda_kernels_linked'])}"))
    else:
        lines.append(row("built against", "nothing: a pure-Python install"))
    cpu = info["cpu"]
    lines += [
        row("python", f"{info['python']['version']} ({info['python']['executable']})"),
        row("platform", info["python"]["platform"]),
        row("cpu", f"{cpu['model']}, {cpu['cores']} logical cores; "
                   f"supports {cpu['best_isa']}"),
        row("torch", f"{t['version']} (CUDA {t['cuda'] or 'none'}"
                     + (f", HIP {t['hip']}" if t["hip"] else "")
                     + f"), {t['threads']} CPU threads"),
        row("gpus", "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']}, "
                              f"{g['memory_gib']} GiB)" for g in info["gpus"]) or "none visible"),
        row("triton", info["triton"] or "not installed"),
        "",
        "  {:<11}{:<11}{:<11}{}".format("backend", "available", "devices", "why not"),
    ]
    for b in info["backends"]:
        lines.append("  {:<11}{:<11}{:<11}{}".format(
            b["name"], _yes(b["available"]), ",".join(b["devices"]) or "-", b["reason"]).rstrip())
    defaults = info["default_backend"]
    lines += ["", row("default backend", f"cpu tensors: {defaults['cpu']}; cuda tensors: "
                                        f"{defaults['cuda'] or '- (no GPU)'}")]
    env = info["environment"]
    lines.append(row("environment", " ".join(f"{k}={v}" for k, v in env.items()) or "(none set)"))
    return "\n".join(lines)


def _info_command(args) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def add_info_commands(subparsers) -> None:
    """``hsd info``."""
    p = subparsers.add_parser(
        "info", help="versions, build and backends: what hsd can run here and why not",
        description="Report hsd's build (whether the compiled extension loaded, and the fix when "
                    "it did not), torch / CUDA / Triton versions, GPUs and every backend.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(handler=_info_command)
