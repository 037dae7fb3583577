"""DeepSSIM encoder benchmarks: the acceptance run, the training-step split, embedding throughput.

Cases
-----
* ``step split``: one training step of ``small`` (batch 32 pairs of 128x128 real slices) split into
  SSIM-target computation (the project's engine, and the float64 reference for comparison) and
  forward/backward/step.
  Target: SSIM targets <= 5 % of the step on CPU.
* ``embed <backbone>``: embedding throughput (images/s), inference, per backbone, CPU (and GPU if present).
  The last timed call's output is checked: finite, (images, emb_dim), unit rows, and equal at a few rows to
  an embed of those images alone.
* ``acceptance``: train ``small`` for at most 5 minutes on the LOWER part of the MNI152 template (voxels
  z < 90 of the 197x233x189 volume, slices along all three axes, resized to 64x64), then evaluate on 512
  pairs (random, neighbouring slices, augmented copies) of axial slices z >= 100 — voxels never seen in
  training. MAE(cosine, SSIM) and Pearson r go into the row's ``extra``; the same model is also scored on
  two scans of other modalities (dipy ``s0_10slices`` b0 and nibabel ``example4d`` frame 0, axial).

``--pad-zoom`` adds the same acceptance with the letterbox size policy and zoom-out pairs.

``python -m bench.bench_train [--quick] [--no-append] [--resnet18] [--pad-zoom]``; quick mode (< 1 minute) times
the step split and ``small``/``resnet18`` embedding only, and replaces the acceptance run by a 12-step smoke
run.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.harness import Row, append_markdown, markdown_table, run_case
from deepssim_fast import data
from deepssim_fast.model import build_model, embed, zscore_batch
from deepssim_fast.reference import ssim_reference
from deepssim_fast.training import (
    Augmenter,
    PairSampler,
    _ssim_engine,
    evaluate,
    make_pool,
    ssim_targets,
    train,
)

CAP = "train"
logger = logging.getLogger(__name__)


def _mni_split() -> tuple[list[data.Slice], list[data.Slice]]:
    vol = data.load_volume("mni152").array
    lower = vol[:, :, :90]
    train_sl: list[data.Slice] = []
    for ax in (0, 1, 2):
        train_sl += data.volume_slices(lower, data.SlicePolicy(axis=ax), source="mni152_z<90")
    held = data.load_slices("mni152", data.SlicePolicy(axis=2, start=100))
    return train_sl, held


def _other_modalities() -> list[data.Slice]:
    return (data.load_slices("s0_10slices", data.SlicePolicy(axis=2))
            + data.load_slices("example4d", data.SlicePolicy(axis=2), frame=0))


def step_split(quick: bool) -> list[Row]:
    train_sl, _ = _mni_split()
    model = build_model("small", input_size=128)
    pool = make_pool(train_sl, model.config)
    sampler = PairSampler(pool.images, pool.groups, pool.positions)
    pb = sampler.batch(32, np.random.SeedSequence([0, 0]), Augmenter())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    target = ssim_targets(pb.a, pb.b)
    # (checked before timing, as the other benches check theirs: targets of zeros were timed at 2460x and the
    # 5 % goal reported met)
    want = np.asarray(ssim_reference(pb.a, pb.b, spatial_dims=2, preset="deepssim"), dtype=np.float64)
    err = float(np.max(np.abs(np.asarray(target, dtype=np.float64) - want)))
    if not err <= 1e-5:
        raise AssertionError(f"ssim targets vs the float64 reference: max |diff| {err:.3g} > 1e-05")
    model.train()

    def fwd_bwd() -> None:
        emb = model(zscore_batch(torch.cat([pb.a, pb.b])).unsqueeze(1))
        loss = F.mse_loss(F.cosine_similarity(emb[:32], emb[32:], dim=1), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    engine = _ssim_engine()[1]
    providers = {
        f"ssim targets ({engine})": lambda: ssim_targets(pb.a, pb.b),
        "forward+backward+step small": fwd_bwd,
    }
    if not quick:
        providers["ssim targets (reference f64)"] = lambda: ssim_reference(pb.a, pb.b, spatial_dims=2,
                                                                           preset="deepssim")
        providers["augment 64 images (MONAI, prefetched)"] = lambda: Augmenter()(pool.images[:64], 1)
    rows = run_case(CAP, "step split, small, 32 pairs 128x128", providers, work=32, unit="pairs",
                    baseline="forward+backward+step small", repeat=2 if quick else 7)
    by = {r.provider: r.median for r in rows if r.times}
    fb = by.get("forward+backward+step small")
    tgt = by.get(f"ssim targets ({engine})")
    if fb and tgt:
        share = tgt / (tgt + fb)
        for r in rows:
            if r.provider.startswith(f"ssim targets ({engine})"):
                r.note = f"{100 * share:.1f}% of target+fwd/bwd (goal <= 5%)"
                r.extra["target_share"] = share
    return rows


EMBED_TOL = 1e-4  # an embedding row (unit norm) against the same image embedded in another batch


def check_embeddings(name: str, out: object, model, images: list, device: str, *, tol: float = EMBED_TOL) -> None:
    """AssertionError unless ``out`` (a timed embed call's output) is what embed documents: finite float32
    (len(images), emb_dim) with unit rows, and equal, at a few rows spread over the batch, to an embed of those
    images alone (a batch-size fault shows there)."""
    e = np.asarray(out)
    want_shape = (len(images), int(model.config.emb_dim))
    if e.shape != want_shape or e.dtype != np.float32:
        raise AssertionError(f"{name}: embeddings {e.dtype} {e.shape}, expected float32 {want_shape}")
    if not np.all(np.isfinite(e)):
        raise AssertionError(f"{name}: {int(np.sum(~np.isfinite(e)))} non-finite values in the embeddings")
    norms = np.linalg.norm(e.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) <= tol):
        i = int(np.argmax(np.abs(norms - 1.0)))
        raise AssertionError(f"{name}: row {i} has norm {norms[i]:.6f}, expected unit rows")
    idx = sorted({0, len(images) // 2, len(images) - 1})
    alone = np.asarray(embed([images[i] for i in idx], model, batch_size=len(idx), device=device, progress=False))
    err = np.abs(e[idx].astype(np.float64) - alone)
    if not np.all(err <= tol):
        r, c = np.unravel_index(int(np.argmax(np.where(np.isnan(err), np.inf, err))), err.shape)
        raise AssertionError(f"{name}: image {idx[r]}'s embedding differs from the same image embedded alone "
                             f"(|diff| {err[r, c]:.3g} > {tol:g} at [{idx[r]}, {c}])")


def embed_throughput(quick: bool, cases: list[tuple[str, int, int]] | None = None) -> list[Row]:
    """Images/s of embed per backbone (``cases``: (backbone, input size, images); default by ``quick``), each
    row's last timed output checked (check_embeddings) after its timing."""
    imgs = [s.array for s in data.real_slices(datasets=["mni152"], policy=data.SlicePolicy(axis=2, step=4))]
    if cases is None:
        cases = [("small", 128, 32 if quick else 64), ("resnet18", 128, 16 if quick else 32)]
        if not quick:
            cases += [("convnext_tiny", 128, 16), ("convnext_base", 224, 8)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[Row] = []
    for backbone, size, n in cases:
        torch.manual_seed(0)
        m = build_model(backbone, input_size=size).eval()
        batch = imgs[:n]
        for dev in devices:
            m.to(dev)
            kept: list = []  # the last timed call's output (it was timed unchecked)

            def run(model=m, b=batch, d=dev, kept=kept) -> None:
                kept[:] = [embed(b, model, batch_size=len(b), device=d, progress=False)]
                if d == "cuda":
                    torch.cuda.synchronize()

            reps = 2 if quick or backbone.startswith("convnext") else 5
            name = f"{backbone} {dev}"
            case_rows = run_case(CAP, f"embed {backbone} {size}x{size} ({dev})", {name: run},
                                 work=len(batch), unit="images", repeat=reps)
            if kept:
                check_embeddings(f"embed {name}", kept[0], m, batch, dev)
                for r in case_rows:
                    r.note = (r.note + " output checked (finite, unit rows, equal to an embed of a few images "
                              "alone)").strip()
            rows += case_rows
        m.cpu()
    return rows


def acceptance(quick: bool, backbone: str = "small", budget_cpu_s: float = 570.0, letterbox_zoom: bool = False
               ) -> list[Row]:
    """Train within ``budget_cpu_s`` CPU-seconds of this process (570 = 4.75 min on 2 cores, so the run stays
    within "5 minutes on 2 CPU cores" however loaded the shared machine is), then score held-out pairs."""
    train_sl, held = _mni_split()
    other = _other_modalities()
    kw: dict = dict(backbone=backbone, input_size=64, size_policy="resize", batch_size=32,
                    lr_schedule="cosine", warmup_steps=10, val_every=50, progress=False)
    if letterbox_zoom:  # the two training options that target slices with little anatomy in the frame
        kw.update(size_policy="pad", zoom_out=(0.5, 0.65, 0.8))
    if quick:
        kw.update(max_steps=12, val_every=12, val_pairs=64)
    else:
        # max_steps sets the cosine schedule; time_limit is the hard 5-minute budget
        kw.update(max_steps=1800 if backbone == "small" else 550, cpu_time_limit=budget_cpu_s)
    t0, c0 = time.perf_counter(), time.process_time()
    m = train(train_sl, **kw)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_eval = 128 if quick else 512
    ev = evaluate(m, held, n_pairs=n_eval, seed=1)
    ev_other = evaluate(m, other, n_pairs=n_eval, seed=1)
    h = m.history
    share = float(np.median([r["t_target"] / (r["t_target"] + r["t_model"]) for r in h]))
    variant = " pad+zoom-out" if letterbox_zoom else ""
    r = Row(CAP, f"acceptance {backbone}{variant}{' (quick smoke)' if quick else ''}", backbone, len(h), "steps",
            times=[elapsed])
    t_held = np.asarray(ev["target_hist"])
    r.note = (f"held-out MNI z>=100: MAE {ev['mae']:.3f}, r {ev['r']:.3f}; other modalities: MAE "
              f"{ev_other['mae']:.3f}, r {ev_other['r']:.3f}; targets {100 * share:.1f}% of step")
    r.note += f"; {len(h)} steps, {cpu:.0f} CPU-s ({elapsed:.0f} s wall on a shared machine)"
    r.extra = {"heldout": ev, "other_modalities": ev_other, "steps": len(h), "train_s": elapsed, "cpu_s": cpu,
               "target_share_median": share, "input_size": kw["input_size"], "size_policy": kw["size_policy"],
               "zoom_out": list(kw.get("zoom_out", ())), "heldout_target_hist": t_held.tolist()}
    logger.info("acceptance %s: %s", backbone, r.note)
    return [r]


def run(quick: bool = False, append: bool = True, resnet18: bool = False, letterbox_zoom: bool = False
        ) -> list[Row]:
    rows = step_split(quick) + embed_throughput(quick) + acceptance(quick)
    if letterbox_zoom and not quick:
        rows += acceptance(quick, letterbox_zoom=True)
    if resnet18 and not quick:
        rows += acceptance(quick, backbone="resnet18")
    print(markdown_table(rows))
    if append:
        append_markdown("DeepSSIM encoder: training step split, embedding throughput, acceptance", rows,
                        comment="Acceptance: `small` trained <= 5 min on MNI152 voxels z<90 (all three "
                                "axes; slices resized to 64x64), evaluated on 512 augmented pairs of MNI152 "
                                "axial slices z>=100 (never seen).")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--resnet18", action="store_true", help="also run the 5-minute acceptance for resnet18")
    ap.add_argument("--pad-zoom", action="store_true",
                    help="also run the acceptance with size_policy='pad' and zoom_out=(0.5, 0.65, 0.8)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(quick=a.quick, append=not a.no_append, resnet18=a.resnet18, letterbox_zoom=a.pad_zoom)
