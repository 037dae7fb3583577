#!/usr/bin/env python
"""Static profile of every Triton kernel, compiled ahead of time for an NVIDIA GPU on this (GPU-less) machine.

Usage (repository root)::

    python bench/kernel_resources.py                 # sm_90 (H100/H200): print the table
    python bench/kernel_resources.py --arch 80       # sm_80 (A100)
    python bench/kernel_resources.py --append-md     # ... and append it to BENCHMARKS.md

For each launch the real launchers make (``kernels.aot.representative_launches``): registers per thread,
local memory (spills), shared memory, warps, and the SASS instruction mix read from the cubin. For the
separable SSIM kernel, whose loops are all unrolled at compile time, the SASS is executed once per thread
of a program, so ``thread-instr / output`` = SASS instructions x threads / valid outputs of a tile is exact
(the direct kernel's tap loops run at run time, so no per-output figure is given for it). These are
counts, not timings: what they bound is said in BENCHMARKS.md; times need the GPU (``bench/gpu_suite.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

FP32 = ("FFMA", "FMUL", "FADD")
MMA = ("HMMA", "HGMMA")


def profile(arch: int) -> list[dict]:
    from kernels import aot

    rows = []
    for name, launch in aot.representative_launches().items():
        compiled = aot.compile_launch(launch, arch)
        r = aot.resources(compiled)
        sass = r["sass"]
        total = sum(sass.values())
        fp32 = sum(sass.get(op, 0) for op in FP32)
        threads = 32 * r["num_warps"]
        _, _, consts, _ = aot.signature(launch)
        per_output = None
        if consts.get("SEPARABLE"):  # separable SSIM: straight-line code
            k = consts["K"]
            outputs = (consts["BR"] - k + 1) * (consts["BC"] - k + 1)
            per_output = {"all": total * threads / outputs,
                          "fp32": fp32 * threads / outputs,
                          "shfl": sass.get("SHFL", 0) * threads / outputs,
                          "ldg": sass.get("LDG", 0) * threads / outputs}
        rows.append(dict(case=name, arch=f"sm_{arch}", warps=r["num_warps"], registers=r["registers"],
                         local=r["local_bytes"], shared=int(compiled.metadata.shared), sass=total,
                         fp32=fp32, dfma=sass.get("DFMA", 0),
                         shfl=sass.get("SHFL", 0), ldg=sass.get("LDG", 0),
                         mma=sum(sass.get(op, 0) for op in MMA), per_output=per_output))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| case | arch | warps | registers | spills (local B) | shared B | SASS instr | FP32 | DFMA | SHFL | "
             "LDG | MMA | thread-instr / output (FP32, SHFL, LDG) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        po = r["per_output"]
        per = (f"{po['all']:.0f} ({po['fp32']:.0f}, {po['shfl']:.0f}, {po['ldg']:.1f})" if po else "-")
        lines.append(f"| {r['case']} | {r['arch']} | {r['warps']} | {r['registers']} | {r['local']} | "
                     f"{r['shared']} | {r['sass']} | {r['fp32']} | {r['dfma']} | {r['shfl']} | {r['ldg']} | "
                     f"{r['mma']} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--append-md", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    import triton

    from bench.harness import BENCHMARKS_MD, append_text, machine_info

    rows = profile(args.arch)
    table = markdown(rows)
    print(table)
    if args.append_md:
        info = machine_info()
        head = (f"\n### Triton kernels compiled for sm_{args.arch} (static: no GPU here)\n\n"
                f"_{info['date']} · compiled on {info['cpu']} · triton {triton.__version__} · commit "
                f"{info['commit']} · `python bench/kernel_resources.py --arch {args.arch}`_\n\n")
        append_text(BENCHMARKS_MD, head + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
