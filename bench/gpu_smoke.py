#!/usr/bin/env python
"""The public API on a CUDA device, end to end, in about a minute: what bench/gpu_suite.py does not reach.

Usage (repository root)::

    python bench/gpu_smoke.py --out smoke_out                 # NVIDIA GPU machine
    python bench/gpu_smoke.py --device cpu --out /tmp/smoke   # the same calls on the CPU (a dry run)

gpu_suite.py checks the Triton kernels through ``ssim``/``ssim_matrix``/``all_pairs`` on torch CUDA tensors.
This script calls what a user calls on a GPU machine and compares it with the same call on the CPU:

* ``all_pairs`` on cupy arrays, on numpy with ``device="cuda"``, with ``dense=True`` and ``out=PATH``;
* ``ssim`` and ``ssim_matrix`` on cupy arrays (cupy results, a cupy ``out=``);
* ``train`` for a few steps on the device, ``embed`` there against the CPU, ``load_model`` onto the device;
* ``audit`` of planted copies among real slices with the encoder on the device, against the same audit on
  the CPU: the same pairs, labels and transforms, scores to rounding. (With ``--device cpu`` the first audit
  runs the torch engine and the second the default one, so the comparison still compares two engines.)

Real MRI comes from nilearn's MNI152 template (carried to the GPU machine by ``bench/gpu_wheels.sh``; the
GPU image has no dipy, so the demo's own data cannot be built there). The cupy checks run only where cupy and
a GPU are. Each check prints PASS/FAIL with what it compared; a failure does not stop the others, and a check
that needs an earlier one's result is reported as skipped (not passed) when that one failed. Under ``--out``:
``smoke.json`` (every check; written also when the run stops early) and the two audits' ``matches_*.csv``.
Everything else (encoder checkpoints, audit reports) lives in a temporary folder removed at the end.
Exit status: 0 when every check passed, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.gpu_suite import bootstrap_project, check_out_arg  # noqa: E402

bootstrap_project()


class Smoke:
    def __init__(self) -> None:
        self.results: list[dict] = []
        self.state: dict = {}

    def check(self, name: str, fn: Callable[[], tuple[bool, str]], needs: Sequence[str] = ()) -> None:
        missing = [n for n in needs if n not in self.state]
        if missing:
            self.results.append(dict(name=name, ok=False, skipped=True,
                                     detail=f"skipped: needs {', '.join(missing)} (failed above)", seconds=0.0))
            print(f"[SKIP] {name}: needs {', '.join(missing)}", flush=True)
            return
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - a failing call is a result
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:400]
            traceback.print_exc()
        dt = time.perf_counter() - t0
        self.results.append(dict(name=name, ok=bool(ok), detail=detail, seconds=round(dt, 2)))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail} ({dt:.1f} s)", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--out", type=Path, default=Path("smoke_out"),
                   help="folder for smoke.json and the audits' matches CSVs (default smoke_out)")
    p.add_argument("--device", default="cuda", help="torch device to check against the CPU (default cuda)")
    args = p.parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device!r}: {exc}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device found; on a CPU run it with --device cpu")
    if dev.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device!r}: expected cuda (or cuda:N) or cpu")
    check_out_arg(p, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in ("smoke.json", *(f.name for f in args.out.glob("matches_*.csv"))):  # (no stale files beside)
        (args.out / old).unlink(missing_ok=True)
    dev = args.device
    on_cpu = torch.device(dev).type == "cpu"
    sm = Smoke()
    try:
        with tempfile.TemporaryDirectory(prefix="deepssim_smoke_") as tmp:
            run(sm, Path(tmp), args.out, dev, on_cpu)
    except BaseException as exc:  # (KeyboardInterrupt too: what ran is still written)
        sm.results.append(dict(name="run", ok=False, detail=f"stopped: {type(exc).__name__}: {exc}"[:400],
                               seconds=0.0))
        traceback.print_exc()
    finally:
        (args.out / "smoke.json").write_text(json.dumps(sm.results, indent=1))
    n_ok = sum(r["ok"] for r in sm.results)
    n_skip = sum(bool(r.get("skipped")) for r in sm.results)
    print(f"\ngpu_smoke on {dev}: {n_ok}/{len(sm.results)} passed" + (f" ({n_skip} skipped)" if n_skip else ""))
    return 0 if n_ok == len(sm.results) else 1


def run(sm: Smoke, work: Path, out_dir: Path, dev: str, on_cpu: bool) -> None:
    rng = np.random.default_rng(20261130)
    try:
        import cupy as cp

        have_cupy = not on_cpu
    except ImportError:
        have_cupy = False
    print(f"torch {torch.__version__}, device {dev}, cupy {'yes' if have_cupy else 'no'}", flush=True)

    from deepssim_fast import all_pairs, audit, embed, load_model, ssim, ssim_matrix, train
    from deepssim_fast.data import real_slices

    st = sm.state
    # ------------------------------------------------------------------------------------------ all_pairs
    tr = rng.standard_normal((3000, 128)).astype(np.float32)
    sy = rng.standard_normal((700, 128)).astype(np.float32)
    sy[5] = tr[17]  # a planted copy

    def host():
        st["host"] = r = all_pairs(tr, sy, k=10, progress=False)
        return r.indices[5, 0] == 17, f"backend {r.backend}, the planted copy first: {r.indices[5, 0] == 17}"

    sm.check("all_pairs on the host (the reference of the next two)", host)

    def same_topk(r, label):
        h = st["host"]
        rows = (r.indices == h.indices).all(axis=1).mean()
        err = float(np.abs(r.scores - h.scores).max())
        hist_l1 = int(np.abs(r.histogram[0] - h.histogram[0]).sum())
        ok = rows >= 0.99 and err <= 1e-5 and r.indices[5, 0] == 17 and r.class_counts["duplicate"] >= 1 \
            and int(r.histogram[0].sum()) == 3000 * 700 and hist_l1 <= 20
        return ok, (f"{label}: backend {r.backend}, rows with the host's top-k {rows:.4f}, max |score diff| "
                    f"{err:.1e}, histogram L1 {hist_l1}, host backend {h.backend}")

    if have_cupy:
        sm.check("all_pairs(cupy, cupy)", lambda: same_topk(
            all_pairs(cp.asarray(tr), cp.asarray(sy), k=10, progress=False), "cupy inputs"), needs=["host"])
    sm.check(f"all_pairs(numpy, device={dev!r})", lambda: same_topk(
        all_pairs(tr, sy, k=10, device=dev, progress=False), "numpy inputs"), needs=["host"])

    def dense_and_out():
        t, s = torch.from_numpy(tr[:500]).to(dev), torch.from_numpy(sy[:300]).to(dev)
        r = all_pairs(t, s, k=5, dense=True, progress=False)
        path = work / "scores.npy"
        r2 = all_pairs(t, s, k=5, out=path, progress=False)
        ref = torch.nn.functional.normalize(s.double(), dim=1) @ torch.nn.functional.normalize(t.double(), dim=1).T
        ref = ref.cpu().numpy()
        e1 = float(np.abs(r.matrix - ref).max())
        e2 = float(np.abs(np.asarray(r2.matrix) - ref).max())
        ok = r.matrix.shape == (300, 500) and e1 <= 1e-5 and e2 <= 1e-5 and path.exists()
        del r2
        return ok, f"dense max err {e1:.1e}, out= .npy memmap max err {e2:.1e}"

    sm.check("all_pairs dense=True and out=PATH on device tensors", dense_and_out)

    # ------------------------------------------------------------------------------------------ SSIM
    def slices():
        st["sl"] = np.stack([s.array for s in real_slices((96, 112), datasets=["mni152"])][:40]).astype(
            np.float32)
        st["images"] = [s.array for s in real_slices((64, 64), datasets=["mni152"])][::3]
        st["ssim_ref"] = np.asarray(ssim(st["sl"][:20], st["sl"][1:21], data_range=1.0, spatial_dims=2))
        return True, f"{len(st['sl'])} slices of 96x112, {len(st['images'])} of 64x64 (MNI152 template)"

    sm.check("real slices and the host's SSIM (the reference below)", slices)

    if have_cupy:
        def ssim_cupy():
            x, y = st["sl"][:20], st["sl"][1:21]
            got = ssim(cp.asarray(x), cp.asarray(y), data_range=1.0, spatial_dims=2)
            err = float(np.abs(cp.asnumpy(got) - st["ssim_ref"]).max())
            return isinstance(got, cp.ndarray) and err <= 1e-5, f"{type(got).__module__} result, max err {err:.1e}"

        sm.check("ssim(cupy, cupy) -> cupy", ssim_cupy, needs=["sl"])

        def matrix_cupy():
            sl = st["sl"]
            out = cp.full((6, 7), cp.nan, dtype=cp.float32)
            ssim_matrix(cp.asarray(sl[:6]), cp.asarray(sl[6:13]), data_range=1.0, spatial_dims=2, out=out,
                        progress=False)
            want = np.asarray(ssim_matrix(sl[:6], sl[6:13], data_range=1.0, spatial_dims=2, progress=False))
            err = float(np.abs(cp.asnumpy(out) - want).max())
            return bool(cp.isfinite(out).all()) and err <= 1e-5, f"cupy out= filled, max err {err:.1e}"

        sm.check("ssim_matrix(cupy, cupy, out=cupy)", matrix_cupy, needs=["sl"])

    def ssim_torch():
        x, y = st["sl"][:20], st["sl"][1:21]
        g = ssim(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), data_range=1.0, spatial_dims=2)
        err = float(np.abs(g.cpu().numpy() - st["ssim_ref"]).max())
        return err <= 1e-5 and g.device.type == torch.device(dev).type, f"result on {g.device}, max err {err:.1e}"

    sm.check(f"ssim(torch on {dev})", ssim_torch, needs=["sl"])

    # ------------------------------------------------------------------------------------------ encoder
    def train_on_device():
        t0 = time.perf_counter()
        model = train(st["images"], backbone="small", max_steps=30, batch_size=16, device=dev, input_size=64,
                      out=str(work / "enc"), progress=False, val_every=10)
        files = sorted(f.name for f in (work / "enc").iterdir())
        hist = getattr(model, "history", [])
        losses = [h.get("loss") for h in hist if isinstance(h, dict) and h.get("loss") is not None]
        finite = all(np.isfinite(v) for v in losses)
        ok = ("best.pt" in files or "last.pt" in files) and finite
        if ok:
            st["model"] = model
        return ok, (f"30 steps in {time.perf_counter() - t0:.1f} s, weights on {next(model.parameters()).device}, "
                    f"files {files}, {len(losses)} losses finite={finite}")

    sm.check(f"train(small, device={dev!r})", train_on_device, needs=["images"])

    def embed_here_and_cpu():
        model, images = st["model"], st["images"]
        e_dev = embed(images[:64], model, device=dev, progress=False)
        e_cpu = embed(images[:64], model, device="cpu", progress=False)
        cos = (e_dev * e_cpu).sum(1) / (np.linalg.norm(e_dev, axis=1) * np.linalg.norm(e_cpu, axis=1))
        return float(cos.min()) >= 0.999, f"{e_dev.shape}, min cosine(device, cpu) {float(cos.min()):.6f}"

    sm.check(f"embed on {dev} vs cpu", embed_here_and_cpu, needs=["model"])

    def load_onto_device():
        ck = work / "enc" / ("best.pt" if (work / "enc" / "best.pt").exists() else "last.pt")
        m = load_model(ck, device=dev)
        e = embed(st["images"][:8], m, device=dev, progress=False)
        ok = next(m.parameters()).device.type == torch.device(dev).type and bool(np.isfinite(e).all())
        if ok:
            st["ckpt"] = ck
        return ok, f"{ck.name} -> {next(m.parameters()).device}, embeddings {e.shape}"

    sm.check(f"load_model(..., device={dev!r})", load_onto_device, needs=["model"])

    # ------------------------------------------------------------------------------------------ audit
    def audit_here_and_cpu():
        # 40 training slices, 8 synthetic copies of them (half mirrored), 8 slices not among them
        sl128 = [s.array.astype(np.float32) for s in real_slices((128, 128), datasets=["mni152"])]
        tdir, sdir = work / "adata" / "train", work / "adata" / "synth"
        tdir.mkdir(parents=True)
        sdir.mkdir(parents=True)
        train_idx = list(range(0, len(sl128), 4))[:40]
        for i in train_idx:
            np.save(tdir / f"t{i:03d}.npy", sl128[i])
        copies = train_idx[5:37:4]
        for j, i in enumerate(copies):
            np.save(sdir / f"copy_of_t{i:03d}.npy", sl128[i][:, ::-1].copy() if j % 2 else sl128[i])
        for i in train_idx[3:35:4]:
            np.save(sdir / f"other_{i + 2:03d}.npy", sl128[i + 2])
        rows: dict[str, dict] = {}
        # on a GPU: the encoder there against the CPU; on the CPU: the torch engine against the default one
        runs = (("device", dict(device=dev, backend="torch" if on_cpu else None)),
                ("cpu", dict(device="cpu", backend=None)))
        for tag, kw in runs:
            res = audit(tdir, sdir, model=str(st["ckpt"]), k=5, out=work / f"audit_{tag}", progress=False,
                        verify_flips=True, **kw)
            shutil.copy(res.files["matches.csv"], out_dir / f"matches_{tag}.csv")  # (comes back from a GPU)
            with open(res.files["matches.csv"], newline="") as f:
                rows[tag] = {(Path(r["synth_path"]).name, r["rank"]): r for r in csv.DictReader(f)}
            report = Path(res.files["report.html"])
        here, cpu = rows["device"], rows["cpu"]
        found = {name for (name, _), r in here.items() if r["label"] == "duplicate"
                 and name == f"copy_of_{Path(r['train_path']).stem}.npy"}
        # the same pairs, labels and transforms; the scores to rounding (the encoder ran on another device,
        # and exact SSIM on another engine)
        keys_same = set(here) == set(cpu)
        fields = [k for k in here if k in cpu and any(here[k][c] != cpu[k][c] for c in
                                                      ("train_path", "label", "transform"))]
        d_cos = max((abs(float(here[k]["cosine"]) - float(cpu[k]["cosine"])) for k in here if k in cpu),
                    default=0.0)
        d_ssim = max((abs(float(here[k]["ssim"]) - float(cpu[k]["ssim"])) for k in here if k in cpu
                      if here[k]["ssim"] and cpu[k]["ssim"]), default=0.0)
        ok = report.exists() and len(found) == len(copies) and keys_same and not fields and d_cos <= 1e-4 \
            and d_ssim <= 1e-5
        first = "the torch engine" if on_cpu else f"device {dev}"
        return ok, (f"{len(found)}/{len(copies)} planted copies labelled duplicate with their source; "
                    f"{len(here)} match rows; {first} against the CPU default: same (synth, rank) keys "
                    f"{keys_same}, {len(fields)} rows with another train item, label or transform, max |cosine "
                    f"diff| {d_cos:.1e}, max |ssim diff| {d_ssim:.1e}; report {report.stat().st_size} bytes")

    sm.check(f"audit(..., device={dev!r}) vs device='cpu'", audit_here_and_cpu, needs=["ckpt"])


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
