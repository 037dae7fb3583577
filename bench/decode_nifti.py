"""Decoding NIfTI files as the audit's decode workers do (``io._file_slices`` / ``io._file_volumes``).

``python bench/decode_nifti.py [--root DIR ...] [--repeats 5] [--data DIR] [--series-shape 96 96 50 48]``

Files: the MNI152 T1 template (``.nii.gz``, shipped in nilearn) cut into slices, and a 4D ``.nii.gz`` series
(default 96×96×50×48 int16, seeded; written under ``--data`` once and reused) read as volumes and as slices. For each
``--root`` (a folder holding a ``deepssim_fast`` package with its built ``_native``; default: the installed
package) every case runs in a fresh process, the roots alternating ``--repeats`` times. Before any time is
reported it checks that every root read the same values (a digest of every array). Prints a markdown table:
per case and root, median (min–max) wall time, and the ratio of the first root's median to each other's.

To compare with an earlier commit: ``git worktree add /tmp/old <commit>``, copy or build its extension there,
and pass ``--root /tmp/old --root .``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from deepssim_fast import data, io
case, path = sys.argv[2], Path(sys.argv[3])
if case == "volumes":
    run = lambda: [a for _, a in io._file_volumes(path)]
else:
    run = lambda: [s.array for s in io._file_slices(path, data.SlicePolicy(axis=2))]
run()  # (warm: imports, first-touch of the file in the page cache)
t = time.perf_counter()
arrays = run()
dt = time.perf_counter() - t
h = hashlib.sha256()
for a in arrays:
    h.update(a.tobytes())
print(json.dumps({"s": dt, "n": len(arrays), "digest": h.hexdigest()}))
"""


def make_series(path: Path, shape: tuple[int, ...]) -> None:
    import nibabel as nib
    import numpy as np

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = (np.random.default_rng(0).random(shape) * 1000).astype(np.int16)
    tmp = path.with_name("." + path.name)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp))
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", help="folder holding the deepssim_fast package to time "
                    "(repeatable; default: the installed package)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per root and case, alternating roots")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "deepssim_fast_decode_nifti",
                    help="where the generated series is kept (reused)")
    ap.add_argument("--series-shape", type=int, nargs=4, default=[96, 96, 50, 48], metavar=("X", "Y", "Z", "T"),
                    help="shape of the generated 4D int16 series (default 96 96 50 48)")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    if min(a.series_shape) < 1 or min(a.series_shape[:3]) < 7:
        ap.error("--series-shape: four positive sizes, the first three at least 7 (the SSIM window)")
    import deepssim_fast
    from deepssim_fast import data

    roots = a.root or [str(Path(deepssim_fast.__file__).resolve().parent.parent)]
    shape = tuple(a.series_shape)
    dims = "x".join(map(str, shape))
    series = a.data / f"series_{dims}_int16.nii.gz"
    make_series(series, shape)
    cases = [("MNI152 template .nii.gz, slices (axis 2)", "slices", data.dataset_path("mni152")),
             (f"4D .nii.gz {dims} int16, {shape[3]} volumes", "volumes", series),
             (f"same file, {shape[2] * shape[3]} slices", "slices", series)]
    lines = ["| file | " + " | ".join(f"`{r}`" for r in roots) + " | ratio (first / each) |",
             "|---|" + "---|" * len(roots) + "---|"]
    for label, case, path in cases:
        times: dict[str, list[float]] = {r: [] for r in roots}
        digests: dict[str, str] = {}
        for _ in range(a.repeats):
            for r in roots:
                out = subprocess.run([sys.executable, "-c", CHILD, r, case, str(path)], capture_output=True,
                                     text=True, check=False)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                res = json.loads(out.stdout.strip().splitlines()[-1])
                times[r].append(res["s"])
                digests.setdefault(r, res["digest"])
                if res["digest"] != digests[roots[0]]:
                    print(f"{label}: {r} read other values than {roots[0]}", file=sys.stderr)
                    return 1
        med = {r: statistics.median(v) for r, v in times.items()}
        cells = [f"{med[r]:.3f} s ({min(times[r]):.3f}–{max(times[r]):.3f})" for r in roots]
        ratios = ", ".join(f"{med[roots[0]] / med[r]:.2f}×" for r in roots[1:]) or "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratios} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
