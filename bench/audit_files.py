"""An audit over many small files: where per-file overhead (decoding, the item cache, its reads) shows.

``python bench/audit_files.py --files 50000 [--root DIR ...] [--repeats 2] [--data DIR]``

Writes ``--files`` training and as many synthetic ``.npy`` images of 32×32 (seeded; every 50th synthetic
image a copy of a training one) under ``--data`` (kept and reused), then, for each ``--root`` (a folder
holding a ``deepssim_fast`` package with its built ``_native``; default: the installed package), runs in a
fresh process a cold ``audit(metric="correlation", k=5)`` into an empty OUT and a rerun of it (the resume
path: every stage found done), alternating the roots ``--repeats`` times. Before any time is reported it
checks that every run of every root wrote the same matches.csv. Prints a markdown table: per root, cold and
resume wall time and the cold run's decode stage, median (min–max).

To compare with an earlier commit: ``git worktree add /tmp/old <commit>``, build its extension there
(``python setup.py build_ext --inplace``), and pass ``--root /tmp/old --root .``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import importlib, json, shutil, sys, time
sys.path.insert(0, sys.argv[1])
A = importlib.import_module("deepssim_fast.audit")  # (the package exports the function audit)
data, out = sys.argv[2], sys.argv[3]
shutil.rmtree(out, ignore_errors=True)
kw = dict(metric="correlation", k=5, out=out, progress=False)
t = time.perf_counter()
r = A.audit(data + "/train", data + "/synth", **kw)
cold = time.perf_counter() - t
t = time.perf_counter()
A.audit(data + "/train", data + "/synth", **kw)
resume = time.perf_counter() - t
print(json.dumps({"package": A.__file__, "cold": cold, "resume": resume, "stages": r.summary["timings_s"],
                  "counts": r.summary["counts"]}))
"""


def make_data(root: Path, n: int) -> None:
    import numpy as np

    stamp = root / f"done_{n}"
    if stamp.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    (root / "synth").mkdir()
    rng = np.random.default_rng(0)
    base = rng.random((n, 32, 32)).astype(np.float32)
    for i in range(n):
        np.save(root / "train" / f"t{i:06d}.npy", base[i])
        s = base[(i * 7) % n] if i % 50 == 0 else rng.random((32, 32)).astype(np.float32)
        np.save(root / "synth" / f"s{i:06d}.npy", s)
    stamp.touch()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=50000, help="training files (and as many synthetic ones)")
    ap.add_argument("--root", action="append", help="folder holding the deepssim_fast package to time "
                    "(repeatable; default: the installed package)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per root, alternating roots")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "deepssim_fast_audit_files",
                    help="where the generated files are kept (reused)")
    a = ap.parse_args(argv)
    if a.files < 10 or a.repeats < 1:
        ap.error("--files must be >= 10 and --repeats >= 1")
    import deepssim_fast

    roots = a.root or [str(Path(deepssim_fast.__file__).resolve().parent.parent)]
    make_data(a.data, a.files)
    runs: dict[str, list[dict]] = {r: [] for r in roots}
    matches: dict[str, bytes] = {}
    for rep in range(a.repeats):
        for r in roots:
            out = a.data / f"out_{roots.index(r)}"
            env = dict(os.environ, PYTHONPATH="")
            p = subprocess.run([sys.executable, "-c", CHILD, str(Path(r).resolve()), str(a.data), str(out)],
                               capture_output=True, text=True, env=env, check=False)
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"run {rep + 1}, {r}: cold {res['cold']:.1f} s, resume {res['resume']:.1f} s, "
                  f"stages {res['stages']}", file=sys.stderr)
            runs[r].append(res)
            m = (out / "matches.csv").read_bytes().replace(str(out).encode(), b"OUT")
            matches.setdefault(r, m)
            if m != matches[r] or m != matches[roots[0]]:
                print(f"matches.csv differs between runs or roots ({r}): no timings reported", file=sys.stderr)
                return 1

    def cell(v: list[float]) -> str:
        return f"{statistics.median(v):.1f} s ({min(v):.1f}–{max(v):.1f})"

    print(f"\n{a.files} + {a.files} files of 32×32, metric correlation, k=5; {a.repeats} runs per root, "
          "alternating; matches.csv identical across runs and roots\n")
    print("| package | cold audit | of which decode | resume (rerun) |")
    print("|---|---|---|---|")
    for r in roots:
        rs = runs[r]
        print(f"| {r} | {cell([x['cold'] for x in rs])} | {cell([x['stages']['decode'] for x in rs])} | "
              f"{cell([x['resume'] for x in rs])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
