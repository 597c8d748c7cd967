"""Ahead-of-time compilation of every Triton kernel variant the dispatch can launch, for GPUs.

Triton's CPU interpreter accepts code its GPU code generator rejects (a plain Python global read
inside ``@triton.jit`` is the known case), so the interpreter tests alone cannot tell whether
the kernels compile. Here ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
runs the real front end, the LLVM back end and ``ptxas`` for sm_80 (A100) and sm_90 (H100 /
H200) on this CPU machine, for the variants :func:`kernel_variant` produces from the loss's
options, with the pointer dtypes the two entry points pass. Registers and spills come from the
cubin (``cuobjdump``); ``python tests/test_triton_aot.py`` prints the table.

Cost: ~0.3 s of CPU per compile on a cold Triton cache (~/.triton/cache; ~100 s for the
default matrix, split over the cores), seconds when warm. The
default matrix is every (mode, alpha kind, tail, gradient, bias) variant in the main GPU dtype
(bf16 logits) for both architectures, every logits / gradient dtype pairing for each
(mode, alpha kind, tail), and the remaining flags (targets, clips, advantages, ranking side)
rotated over the variants; ``HSD_AOT_FULL=1`` compiles the whole product instead.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
FULL_MATRIX = os.environ.get("HSD_AOT_FULL") == "1"
CUDA_BINS = ("/usr/local/cuda/bin", "/usr/local/cuda-13.0/bin")

# (student/teacher logits, gradient, bias) pointer dtypes the entry points pass: the logits
# form takes one dtype for all; the fused form keeps float32 logits and writes the gradient in
# the input dtype (its default), or keeps half logits (HSD_TRITON_LOGITS=half)
DTYPES = [("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16"),
          ("fp32", "bf16", "bf16"), ("fp32", "fp16", "fp16")]
MAIN_DTYPE = ("bf16", "bf16", "bf16")
# (mode, alpha, tail): alpha kinds forward KL / reverse KL / mixture; tail only in top-k
SHAPES = [(0, 1.0, False)] + [(1, a, False) for a in (0.0, 1.0, 0.5)] \
    + [(2, a, tail) for a in (0.0, 1.0, 0.5) for tail in (True, False)]


def _tool(name: str) -> str | None:
    """A CUDA tool from the triton wheel, else from a CUDA toolkit on this machine."""
    wheel = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if wheel.exists():
        return str(wheel)
    for d in CUDA_BINS:
        if (Path(d) / name).exists():
            return str(Path(d) / name)
    return shutil.which(name)


@functools.lru_cache(maxsize=None)
def compiled_module():
    """``kernels/row_divergence.py`` as a private module, so no ``hsd`` import is needed.

    Compiling needs a process where triton was imported with TRITON_INTERPRET unset: triton's
    own ``@jit`` helpers (``tl.max``, ``tl.sum``...) become interpreter objects otherwise. The
    test session interprets (conftest), so the compiles run in :func:`worker`, a subprocess.
    """
    spec = importlib.util.spec_from_file_location("_hsd_aot_row_divergence",
                                                  ROOT / "kernels" / "row_divergence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def signature(mod, variant, dtypes, aligned):
    """ASTSource arguments for one launch: pointer dtypes as the entry points pass them, integer
    arguments as the JIT specialises them (K = 1 becomes a constant; V and the row strides of a
    vocabulary divisible by 16, and the pointers of torch's 256-byte aligned allocations, carry
    divisibility 16 when ``aligned``)."""
    logits, grad, bias = dtypes
    variant = dict(variant)
    num_warps = variant.pop("num_warps")
    f32, ptr = "*fp32", (lambda t: "*" + t)
    has_grad, has_bias = variant["COMPUTE_GRAD"], variant["HAS_BIAS"]
    sig = dict(S=ptr(logits), T=ptr(logits), BS=ptr(bias) if has_bias else f32,
               BT=ptr(bias) if has_bias else f32, G=ptr(grad) if has_grad else ptr(logits),
               LOSS=f32, STATS=f32, TGT="*i64" if variant["HAS_TARGET"] else f32, COEF=f32,
               ADV=f32, IDS="*i64" if variant["MODE"] == mod.TOPK else f32, ONSUP=f32,
               V="i32", K="i32", stride_s="i32", stride_t="i32", stride_g="i32",
               inv_temp="fp32", alpha="fp32", log_ws="fp32", log_wt="fp32",
               signal_clip="fp32", kl_clip="fp32")
    constexprs = dict(variant)
    if variant["MODE"] != mod.TOPK:
        constexprs["K"] = 1
    for name in constexprs:
        sig[name] = "constexpr"
    names = mod.hsd_rows_kernel.arg_names
    attrs = {}
    if aligned:
        for i, name in enumerate(names):
            if sig.get(name, "").startswith("*") or name in ("V", "stride_s", "stride_t",
                                                            "stride_g"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=mod.hsd_rows_kernel, signature=sig, constexprs=constexprs,
                     attrs=attrs), num_warps


def resource_usage(cubin: bytes, ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread: spills) of the compiled kernel:
    from the cubin with ``cuobjdump``, else from ``ptxas -v`` on the PTX."""
    tool = _tool("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        if tool is not None:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                                 text=True, check=True).stdout
            m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
            assert m, out
            return int(m.group(1)), int(m.group(2))
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([_tool("ptxas"), f"-arch=sm_{arch}", "-v", str(path), "-o",
                              str(Path(tmp) / "k.o")], capture_output=True, text=True,
                             check=True).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spills = re.search(r"(\d+) bytes spill stores", out)
        assert regs, out
        return int(regs.group(1)), int(spills.group(1)) if spills else 0


@functools.lru_cache(maxsize=None)
def compile_variant(key):
    """Compile one (variant, dtypes, arch, aligned) key; returns (registers, spill bytes, ptx)."""
    variant, dtypes, arch, aligned = key
    mod = compiled_module()
    src, num_warps = signature(mod, dict(variant), dtypes, aligned)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps})
    regs, spills = resource_usage(kernel.asm["cubin"], kernel.asm["ptx"], arch)
    return regs, spills, kernel.asm["ptx"]


def _key(mod, mode, alpha, tail, grad, bias, dtypes, arch, aligned=True, rotation=0, **kw):
    """A hashable compile key; ``rotation`` picks the minor flags (targets, clips, advantages,
    ranking side) so that each takes both values across the matrix."""
    r = rotation
    opts = dict(has_target=mode == mod.SAMPLED or bool(r & 1),
                has_advantage=bool(r & 2), signal_clip=0.5 if r & 4 else 0.0,
                kl_clip=2.0 if r & 1 else 0.0, topk_from_teacher=bool(r & 2))
    opts.update(kw)
    variant = mod.kernel_variant(mode, alpha, tail=tail, has_bias=bias, compute_grad=grad,
                                 k=opts.pop("k", 20), **opts)
    return (tuple(sorted(variant.items())), dtypes, arch, aligned)


def matrix_keys() -> list:
    mod = compiled_module()
    keys = []
    if FULL_MATRIX:
        for (mode, alpha, tail), grad, bias, dtypes, arch, r in itertools.product(
                SHAPES, (False, True), (False, True), DTYPES, ARCHS, range(8)):
            keys.append(_key(mod, mode, alpha, tail, grad, bias, dtypes, arch, rotation=r))
    else:
        rotation = itertools.count()
        for (mode, alpha, tail), grad, bias, arch in itertools.product(
                SHAPES, (False, True), (False, True), ARCHS):
            keys.append(_key(mod, mode, alpha, tail, grad, bias, MAIN_DTYPE, arch,
                             rotation=next(rotation)))
        for (mode, alpha, tail), dtypes, arch in itertools.product(SHAPES, DTYPES, ARCHS):
            keys.append(_key(mod, mode, alpha, tail, True, dtypes[0] != "fp32" or dtypes[1]
                             != "fp32", dtypes, arch, rotation=next(rotation)))
    # odd vocabularies (no divisibility), a small vocabulary (narrow tiles, 4 warps) and a
    # large top-k (wide support registers)
    for (mode, alpha, tail), arch in itertools.product(SHAPES, ARCHS):
        keys.append(_key(mod, mode, alpha, tail, True, True, MAIN_DTYPE, arch, aligned=False))
    for arch in ARCHS:
        keys.append(_key(mod, 1, 0.5, False, True, False, MAIN_DTYPE, arch, vocab=1000))
        keys.append(_key(mod, 2, 0.5, True, True, True, MAIN_DTYPE, arch, k=1024))
    return list(dict.fromkeys(keys))


def _id(key):
    variant, dtypes, arch, aligned = key
    v = dict(variant)
    return (f"sm{arch}-m{v['MODE']}a{v['ALPHA_KIND']}{'t' if v['TAIL'] else ''}"
            f"{'-g' if v['COMPUTE_GRAD'] else ''}{'-b' if v['HAS_BIAS'] else ''}"
            f"-{'/'.join(dtypes)}{'' if aligned else '-ragged'}-V{v['BLOCK_V']}K{v['BLOCK_K']}"
            f"-{zlib.crc32(repr(key).encode()) % 10**6:06d}")


RACE_CASES = [(arch, mode, alpha) for arch in ARCHS for mode, alpha in ((0, 1.0), (1, 0.0),
                                                                        (1, 1.0))]


def late_logit_loads(ptx: str) -> tuple[int, list[str]]:
    """The gradient buffer may alias the student logits (float32 inputs, half logits): the one
    entry read across threads, the target logit, must be loaded before a barrier that precedes
    every gradient store. Returns (scalar 32-bit loads before the last barrier ahead of the first
    tile store, scalar loads between that barrier and that store); only the coefficient (COEF is
    never aliased) may be among the latter."""
    lines = ptx.splitlines()
    tile_stores = [i for i, line in enumerate(lines) if re.search(r"st\.global(\.\w+)*\.v\d", line)]
    assert tile_stores, "no vectorised gradient store in the PTX"
    head = lines[:tile_stores[0]]
    bars = [i for i, line in enumerate(head) if "bar.sync" in line]
    assert bars, "no barrier before the gradient stores"
    scalar = [i for i, line in enumerate(head)
              if re.search(r"ld\.global(\.\w+)*\.b32\s", line) and ".v" not in line]
    return (sum(i < bars[-1] for i in scalar),
            [head[i].strip() for i in scalar if i > bars[-1]])


def worker(shard: int = 0, shards: int = 1) -> list[dict]:
    """Compile every ``shards``-th key of the matrix and of the race cases, from ``shard`` on
    (run with TRITON_INTERPRET unset)."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiles need TRITON_INTERPRET unset"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and "TRITON_PTXAS_PATH" not in os.environ:
        os.environ["TRITON_PTXAS_PATH"] = _tool("ptxas")  # e.g. the CUDA toolkit's
    mod = compiled_module()
    out = []
    for key in matrix_keys()[shard::shards]:
        row = dict(id=_id(key), arch=key[2], mode=dict(key[0])["MODE"])
        try:
            row["regs"], row["spills"], _ = compile_variant(key)
        except Exception as err:  # noqa: BLE001 - report every failing variant, not the first
            row["error"] = f"{type(err).__name__}: {str(err)[-1500:]}"
        out.append(row)
    for arch, mode, alpha in RACE_CASES[shard::shards]:
        key = _key(mod, mode, alpha, False, True, False, ("fp32", "fp32", "fp32"), arch,
                   has_target=True, kl_clip=0.0)
        early, late = late_logit_loads(compile_variant(key)[2])
        out.append(dict(race=[arch, mode, alpha], early=early, late=late))
    return out


@pytest.fixture(scope="module")
def results():
    """Compile subprocesses, one per core (at most 4), once per test session; the compiles also
    land in Triton's disk cache, so a second session takes seconds."""
    if _tool("ptxas") is None:
        pytest.skip("no ptxas: neither in the triton wheel nor in a CUDA toolkit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences 3.9's notice
    shards = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), str(shards)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(shards)]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, stderr[-4000:]
        out += json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["sampled", "full", "topk"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
def test_every_variant_compiles_without_spills(results, arch, mode):
    rows = [r for r in results if r.get("arch") == arch and r.get("mode") == mode]
    assert rows, "no variants enumerated"
    failures = [f"{r['id']}: {r['error']}" for r in rows if "error" in r]
    assert not failures, "\n".join(failures)
    spilled = [f"{r['id']}: {r['regs']} registers, {r['spills']} bytes spilled"
               for r in rows if r["spills"]]
    assert not spilled, "\n".join(spilled)


@pytest.mark.parametrize("case", RACE_CASES, ids=lambda c: f"sm{c[0]}-mode{c[1]}-a{c[2]}")
def test_target_logit_read_before_the_gradient_stores(results, case):
    """Float32 logits, where the gradient is written over them: no logit is read between the
    last barrier and the gradient stores (only the never-aliased coefficient)."""
    row = next(r for r in results if r.get("race") == list(case))
    assert row["early"] >= 2, "the target logits are not loaded before the last barrier"
    assert len(row["late"]) <= 1, f"scalar loads after the last barrier: {row['late']}"


def main():
    """``--worker``: JSON results on stdout (the test's subprocess); otherwise print the
    registers / spills table."""
    os.environ.pop("TRITON_INTERPRET", None)
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        shard, shards = (int(sys.argv[i + 1]), int(sys.argv[i + 2])) if len(sys.argv) > i + 2 \
            else (0, 1)
        print(json.dumps(worker(shard, shards)))
        return
    rows = [r for r in worker() if "id" in r]
    print(f"{'variant':62s} {'regs':>5s} {'spill B':>8s}")
    for r in rows:
        name = r["id"].rsplit("-", 1)[0]
        print(f"{name:62s} {r.get('regs', -1):5d} {r.get('spills', -1):8d} "
              f"{r.get('error', '')[:60]}")
    print(f"{len(rows)} variants, {sum('error' in r for r in rows)} failed")


if __name__ == "__main__":
    main()
