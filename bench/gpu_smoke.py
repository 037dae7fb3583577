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
* ``audit`` of a small planted-copy set (the demo's data) with the encoder on the device, against the CPU.

Each check prints PASS/FAIL with what it compared; a failure does not stop the others. Exit status 1 if any
check failed. Real MRI comes from the nilearn / nibabel wheels (carried to the GPU machine by
``bench/gpu_wheels.sh``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.gpu_suite import bootstrap_project  # noqa: E402

bootstrap_project()

RESULTS: list[dict] = []


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as exc:  # noqa: BLE001 - a failing call is a result
        ok, detail = False, f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    dt = time.perf_counter() - t0
    RESULTS.append(dict(name=name, ok=bool(ok), detail=detail, seconds=round(dt, 2)))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail} ({dt:.1f} s)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("smoke_out"))
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    work = Path(tempfile.mkdtemp(prefix="deepssim_smoke_"))
    rng = np.random.default_rng(20261130)
    try:
        import cupy as cp  # noqa: F401
        have_cupy = dev != "cpu"
    except ImportError:
        have_cupy = False
    print(f"torch {torch.__version__}, device {dev}, cupy {'yes' if have_cupy else 'no'}, work {work}", flush=True)

    from deepssim_fast import all_pairs, audit, embed, load_model, ssim, ssim_matrix, train
    from deepssim_fast.data import real_slices

    # ------------------------------------------------------------------------------------------ all_pairs
    tr = rng.standard_normal((3000, 128)).astype(np.float32)
    sy = rng.standard_normal((700, 128)).astype(np.float32)
    sy[5] = tr[17]  # a planted copy
    host = all_pairs(tr, sy, k=10, progress=False)

    def same_topk(r, label):
        rows = (r.indices == host.indices).all(axis=1).mean()
        err = float(np.abs(r.scores - host.scores).max())
        hist_l1 = int(np.abs(r.histogram[0] - host.histogram[0]).sum())
        ok = rows >= 0.99 and err <= 1e-5 and r.indices[5, 0] == 17 and r.class_counts["duplicate"] >= 1 \
            and int(r.histogram[0].sum()) == 3000 * 700 and hist_l1 <= 20
        return ok, (f"{label}: backend {r.backend}, rows with the host's top-k {rows:.4f}, max |score diff| "
                    f"{err:.1e}, histogram L1 {hist_l1}, host backend {host.backend}")

    if have_cupy:
        import cupy as cp

        check("all_pairs(cupy, cupy)", lambda: same_topk(all_pairs(cp.asarray(tr), cp.asarray(sy), k=10,
                                                                   progress=False), "cupy inputs"))
    check(f"all_pairs(numpy, device={dev!r})",
          lambda: same_topk(all_pairs(tr, sy, k=10, device=dev, progress=False), "numpy inputs"))

    def dense_and_out():
        t, s = torch.from_numpy(tr[:500]).to(dev), torch.from_numpy(sy[:300]).to(dev)
        r = all_pairs(t, s, k=5, dense=True, progress=False)
        path = work / "scores.f32"
        r2 = all_pairs(t, s, k=5, out=path, progress=False)
        ref = torch.nn.functional.normalize(s.double(), dim=1) @ torch.nn.functional.normalize(t.double(), dim=1).T
        ref = ref.cpu().numpy()
        e1 = float(np.abs(r.matrix - ref).max())
        mm = np.asarray(r2.matrix)
        e2 = float(np.abs(mm - ref).max())
        ok = r.matrix.shape == (300, 500) and e1 <= 1e-5 and e2 <= 1e-5 and path.exists()
        return ok, f"dense max err {e1:.1e}, out= memmap {type(r2.matrix).__name__} max err {e2:.1e}"

    check("all_pairs dense=True and out=PATH on device tensors", dense_and_out)

    # ------------------------------------------------------------------------------------------ SSIM
    sl = np.stack([s.array for s in real_slices((96, 112), datasets=["mni152"])][:40]).astype(np.float32)
    x, y = sl[:20], sl[1:21]
    ref = np.asarray(ssim(x, y, data_range=1.0, spatial_dims=2))

    if have_cupy:
        def ssim_cupy():
            got = ssim(cp.asarray(x), cp.asarray(y), data_range=1.0, spatial_dims=2)
            err = float(np.abs(cp.asnumpy(got) - ref).max())
            return isinstance(got, cp.ndarray) and err <= 1e-5, f"{type(got).__module__} result, max err {err:.1e}"

        check("ssim(cupy, cupy) -> cupy", ssim_cupy)

        def matrix_cupy():
            out = cp.full((6, 7), cp.nan, dtype=cp.float32)
            ssim_matrix(cp.asarray(sl[:6]), cp.asarray(sl[6:13]), data_range=1.0, spatial_dims=2, out=out,
                        progress=False)
            want = np.asarray(ssim_matrix(sl[:6], sl[6:13], data_range=1.0, spatial_dims=2, progress=False))
            err = float(np.abs(cp.asnumpy(out) - want).max())
            return bool(cp.isfinite(out).all()) and err <= 1e-5, f"cupy out= filled, max err {err:.1e}"

        check("ssim_matrix(cupy, cupy, out=cupy)", matrix_cupy)
    check(f"ssim(torch on {dev})", lambda: (lambda g: (
        float(np.abs(g.cpu().numpy() - ref).max()) <= 1e-5 and g.device.type == torch.device(dev).type,
        f"result on {g.device}, max err {float(np.abs(g.cpu().numpy() - ref).max()):.1e}"))(
        ssim(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), data_range=1.0, spatial_dims=2)))

    # ------------------------------------------------------------------------------------------ encoder
    images = [s.array for s in real_slices((64, 64), datasets=["mni152"])][::3]
    state: dict = {}

    def train_on_device():
        t0 = time.perf_counter()
        model = train(images, backbone="small", max_steps=30, batch_size=16, device=dev, input_size=64,
                      out=str(work / "enc"), progress=False, val_every=10)
        state["model"] = model
        files = sorted(f.name for f in (work / "enc").iterdir())
        p0 = next(model.parameters())
        hist = getattr(model, "history", [])
        losses = [h.get("loss") for h in hist if isinstance(h, dict) and h.get("loss") is not None]
        finite = all(np.isfinite(v) for v in losses)
        return ("best.pt" in files or "last.pt" in files) and finite, (
            f"30 steps in {time.perf_counter() - t0:.1f} s, weights on {p0.device}, files {files}, "
            f"{len(losses)} losses finite={finite}")

    check(f"train(small, device={dev!r})", train_on_device)

    def embed_here_and_cpu():
        model = state["model"]
        e_dev = embed(images[:64], model, device=dev, progress=False)
        e_cpu = embed(images[:64], model, device="cpu", progress=False)
        cos = (e_dev * e_cpu).sum(1) / (np.linalg.norm(e_dev, axis=1) * np.linalg.norm(e_cpu, axis=1))
        return float(cos.min()) >= 0.999, f"{e_dev.shape}, min cosine(device, cpu) {float(cos.min()):.6f}"

    check(f"embed on {dev} vs cpu", embed_here_and_cpu)

    def load_onto_device():
        ck = work / "enc" / ("best.pt" if (work / "enc" / "best.pt").exists() else "last.pt")
        m = load_model(ck, device=dev)
        e = embed(images[:8], m, device=dev, progress=False)
        state["ckpt"] = ck
        return next(m.parameters()).device.type == torch.device(dev).type and np.isfinite(e).all(), \
            f"{ck.name} -> {next(m.parameters()).device}, embeddings {e.shape}"

    check(f"load_model(..., device={dev!r})", load_onto_device)

    # ------------------------------------------------------------------------------------------ audit
    def audit_here_and_cpu():
        # planted copies among real slices (the MNI template alone: the GPU image has no dipy for the demo's
        # data): 40 training slices, 8 synthetic copies of them (half mirrored), 8 slices not among them
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
        import csv
        import shutil

        rows: dict[str, dict] = {}
        for where in (dev, "cpu"):
            res = audit(tdir, sdir, model=str(state["ckpt"]), k=5, out=work / f"audit_{where}", device=where,
                        progress=False, verify_flips=True)
            shutil.copy(res.files["matches.csv"], args.out / f"matches_{where}.csv")  # (comes back from a GPU)
            with open(res.files["matches.csv"], newline="") as f:
                rows[where] = {(Path(r["synth_path"]).name, r["rank"]): r for r in csv.DictReader(f)}
            report = Path(res.files["report.html"])
        here, cpu = rows[dev], rows["cpu"]
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
        return ok, (f"{len(found)}/{len(copies)} planted copies labelled duplicate with their source; "
                    f"{len(here)} match rows; against the CPU audit: same (synth, rank) keys {keys_same}, "
                    f"{len(fields)} rows with another train item, label or transform, max |cosine diff| "
                    f"{d_cos:.1e}, max |ssim diff| {d_ssim:.1e}; report {report.stat().st_size} bytes")

    check(f"audit(..., device={dev!r}) vs device='cpu'", audit_here_and_cpu)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smoke.json").write_text(json.dumps(RESULTS, indent=1))
    n_ok = sum(r["ok"] for r in RESULTS)
    print(f"\ngpu_smoke on {dev}: {n_ok}/{len(RESULTS)} passed")
    return 0 if n_ok == len(RESULTS) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
