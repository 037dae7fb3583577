"""The end-to-end demo (``make demo`` / ``deepssim-fast demo``): a memorisation audit on real brain MRI.

What it builds, all from scans shipped inside the dependency wheels (:mod:`deepssim_fast.data`):

* **training set** — axial and coronal slices of the MNI152 T1 template (every 4th slice along each axis,
  slices with at least 5 % foreground), centre-fitted to 176 × 208, one ``.npy`` per slice in
  ``OUT/data/train``.
* **synthetic set** (``OUT/data/synth``, neutral file names; the truth is in ``OUT/data/ground_truth.csv``):

  - *planted copies*: training slices after a left-right or up-down flip, a small rotation (1.5–3°), an
    integer shift (2–4 px), a contrast change (gamma 0.7–1.4 or a linear rescale), mild noise
    (σ = 0.5 % of the range), or a flip + shift + contrast combination;
  - *near-copies*: slices of the template that are NOT in the training set, two slices away from a training
    slice along the same axis;
  - *novel*: slices of other scans (the dipy and nibabel volumes), never seen in training, rescaled
    (bilinear, aspect kept) to fill the frame — padded small scans would be mostly background, which SSIM
    rightly finds similar to the near-empty top slices of the template.

* **ground truth, measured**: each planted item's label is the label of its exact, verified SSIM
  (``preset="deepssim"``, the same flips / shifts / rotations the audit searches) against its source
  (copies) or against the nearby training slices (near-copies; the maximum). A planted copy is a "planted
  duplicate" only if that measured SSIM is above the duplicate threshold; a near-copy is kept only if its
  measured SSIM falls in the "similar" band, and a novel slice only if its measured SSIM against the whole
  training set (exact SSIM of all pairs, then verified on its 3 best) is "different"; the truth never
  depends on the audit being tested.
* **encoder**: the ``small`` DeepSSIM encoder trained for ``train_seconds`` on the template's slices
  (cached as ``OUT/encoder/best.pt``; a second run reuses it once that training has finished, which
  ``OUT/encoder/complete.json`` records: an encoder from a stopped run is trained again).
* **audit**: metric ``deepssim`` with k = 10 candidates, verification over flips, ±4 px shifts and ±3°.

Recall of planted duplicates = planted duplicates labelled ``duplicate`` with their true source as match,
over all planted duplicates; precision = those, over every synthetic item labelled ``duplicate``.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_write_bytes
from .data import SlicePolicy, center_fit, load_volume, volume_slices

logger = logging.getLogger(__name__)

SIZE = (176, 208)
THRESHOLDS = (0.6, 0.85)
VERIFY = {"verify_flips": True, "verify_shifts": 4, "verify_rotations": 3.0}
DONE_MARKER = "complete.json"  # beside the cached encoder: its training finished (see _train_encoder)
NOVEL_SOURCES = ("s0_10slices", "aniso_vox", "piesno", "example4d", "anatomical", "t1_coronal_slice")


@dataclass
class Planted:
    """One synthetic item and its truth."""

    name: str
    kind: str  # copy | near | novel
    source: str | None  # training file name it derives from (copies, near-copies), None for novel
    transform: str
    image: np.ndarray
    measured_ssim: float | None = None
    truth: str = "different"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    if path.exists() and path.read_bytes() == buf.getvalue():
        return  # unchanged: keep the mtime so the audit's caches stay valid
    atomic_write_bytes(path, buf.getvalue())


def _shift(img: np.ndarray, d: tuple[int, int]) -> np.ndarray:
    from .audit import _shift as shift

    return shift(img, d)


def _rotate(img: np.ndarray, deg: float) -> np.ndarray:
    from .audit import _rotate as rotate

    return rotate(img, deg)


def _fill(img: np.ndarray) -> np.ndarray:
    """Rescale a slice (bilinear, antialiased, aspect kept) so it fills ``SIZE``, then centre-fit it."""
    import torch
    import torch.nn.functional as F

    h, w = img.shape
    scale = min(SIZE[0] / h, SIZE[1] / w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    r = F.interpolate(t, size=shape, mode="bilinear", antialias=scale < 1, align_corners=False)[0, 0].numpy()
    return center_fit(r, SIZE)


def _template_slices() -> dict[tuple[int, int], np.ndarray]:
    """(axis, index) -> fitted slice of the MNI152 template, for axial (2) and coronal (1) slices."""
    vol = load_volume("mni152").array
    out = {}
    for axis in (2, 1):
        for s in volume_slices(vol, SlicePolicy(axis=axis, min_foreground=0.05), source="mni152"):
            out[(axis, s.index)] = center_fit(s.array, SIZE)
    return out


def _copy_transform(kind: str, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    lo, hi = float(img.min()), float(img.max())
    if kind == "flip":
        ax = int(rng.integers(0, 2))
        # (named as the audit names them, by array axis: axis 0 reversed is vflip on screen, row 0 at the top;
        # "flip left-right" for it read as if the audit had found another transform)
        return np.ascontiguousarray(np.flip(img, axis=ax)), ("vflip (axis 0)" if ax == 0 else "hflip (axis 1)")
    if kind == "rotation":
        deg = float(rng.choice([-1, 1]) * rng.uniform(1.5, 3.0))
        return _rotate(img, deg), f"rotation {deg:+.2f} deg"
    if kind == "shift":
        d = (int(rng.choice([-1, 1]) * rng.integers(2, 5)), int(rng.choice([-1, 1]) * rng.integers(2, 5)))
        return _shift(img, d), f"shift {d}"
    if kind == "contrast":
        if rng.random() < 0.5:
            g = float(rng.uniform(0.7, 1.4))
            return (((img - lo) / (hi - lo)) ** g * (hi - lo) + lo).astype(np.float32), f"gamma {g:.2f}"
        a, b = float(rng.uniform(0.6, 1.6)), float(rng.uniform(-20, 20))
        return (img * a + b).astype(np.float32), f"linear {a:.2f}x{b:+.1f}"
    if kind == "noise":
        sigma = 0.005 * (hi - lo)
        return (img + rng.normal(0, sigma, img.shape)).astype(np.float32), f"gaussian noise sigma {sigma:.2f}"
    if kind == "combo":
        d = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        g = float(rng.uniform(0.8, 1.25))
        x = np.ascontiguousarray(np.flip(img, axis=0))
        x = ((x - lo) / (hi - lo)) ** g * (hi - lo) + lo
        return _shift(x.astype(np.float32), d), f"vflip (axis 0) + shift {d} + gamma {g:.2f}"
    raise ValueError(kind)


# The names of the files the demo writes under OUT/data (anything else there is not the demo's).
_TRAIN_NAME = re.compile(r"mni152_(axial|coronal)_\d{3}\.npy")
_SYNTH_NAME = re.compile(r"synth_\d{4}\.npy")


def _refuse_foreign_files(folder: Path, names: re.Pattern, what: str) -> None:
    """ValueError when ``folder`` (OUT/data/train or OUT/data/synth) holds files the demo does not write: a
    project folder given as --out had its own .npy files under data/synth deleted as stale and those under
    data/train audited as demo data, without a word."""
    if not folder.is_dir():
        return
    foreign = sorted(f.name for f in folder.iterdir()  # (an interrupted write's temporary file is the demo's)
                     if not names.fullmatch(f.name) and not (f.name.startswith(".") and f.name.endswith(".tmp")))
    if foreign:
        raise ValueError(f"{folder} holds {len(foreign)} file(s) the demo did not write (e.g. {foreign[0]}); the "
                         f"demo writes its {what} set there and removes its own stale files: give --out a new "
                         "folder, or an earlier demo's")


def build_demo_data(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    n_copies: int = 36,
    n_near: int = 24,
    n_novel: int = 40,
    backend: str | None = None,
) -> dict[str, Any]:
    """Write the training and synthetic sets and the measured ground truth under ``root``.

    Returns ``{"train_dir", "synth_dir", "truth_csv", "planted": [Planted, ...], "train": {name: array}}``.
    """
    from .audit import label_of, verify_pairs

    rng = np.random.default_rng(seed)
    root = Path(root)
    tdir, sdir = root / "train", root / "synth"
    _refuse_foreign_files(tdir, _TRAIN_NAME, "training")
    _refuse_foreign_files(sdir, _SYNTH_NAME, "synthetic")
    slices = _template_slices()  # (first: without the data extra it fails, and no empty folders are left)
    tdir.mkdir(parents=True, exist_ok=True)
    sdir.mkdir(parents=True, exist_ok=True)
    axname = {2: "axial", 1: "coronal"}
    train: dict[str, np.ndarray] = {}
    train_key: dict[tuple[int, int], str] = {}
    for (axis, idx), arr in sorted(slices.items()):
        if idx % 4 == 0:
            name = f"mni152_{axname[axis]}_{idx:03d}.npy"
            train[name] = arr
            train_key[(axis, idx)] = name
    for name, arr in train.items():
        _save_npy(tdir / name, arr)

    planted: list[Planted] = []
    kinds = ("flip", "rotation", "shift", "contrast", "noise", "combo")
    names = sorted(train)
    src = rng.choice(len(names), size=min(n_copies, len(names)), replace=False)
    for q, j in enumerate(src):
        kind = kinds[q % len(kinds)]
        img, desc = _copy_transform(kind, train[names[j]], rng)
        planted.append(Planted("", "copy", names[j], desc, img))
    near_keys = [(a, i) for (a, i) in sorted(slices) if i % 4 == 2 and (a, i - 2) in train_key]
    pick = rng.permutation(len(near_keys))
    near_pool = [near_keys[p] for p in pick]
    novel = []
    for ds in NOVEL_SOURCES:
        frame = 0 if ds == "example4d" else None
        vol = load_volume(ds, frame=frame).array
        for s in volume_slices(vol, SlicePolicy(axis=2, min_foreground=0.05), source=ds):
            novel.append((f"{ds}:{s.index}", _fill(s.array)))
    sel = rng.choice(len(novel), size=min(n_novel, len(novel)), replace=False)
    # Measure the novel slices against the whole training set (exact SSIM), then verify their 3 best.
    from .audit import _ssim_matrix

    tr_stack = np.stack([train[nm] for nm in names])
    nov_stack = np.stack([novel[j][1] for j in sorted(sel)])
    m = _ssim_matrix(tr_stack, nov_stack, spatial_dims=2, backend=backend).T  # (n_novel, n_train)
    top = np.argsort(-m, axis=1, kind="stable")[:, :3]
    vv, _ = verify_pairs(
        tr_stack[top.ravel()],
        np.repeat(nov_stack, 3, axis=0),
        spatial_dims=2,
        flips=VERIFY["verify_flips"],
        shifts=VERIFY["verify_shifts"],
        rotations=VERIFY["verify_rotations"],
        backend=backend,
    )
    vmax = np.maximum(vv.reshape(-1, 3).max(axis=1), m.max(axis=1))
    n_novel_kept = 0
    for q, j in enumerate(sorted(sel)):
        if vmax[q] > THRESHOLDS[0]:
            logger.info(
                "demo: novel slice %s measures SSIM %.3f against the training set; left out",
                novel[j][0],
                vmax[q],
            )
            continue
        planted.append(
            Planted(
                "", "novel", None, f"slice of {novel[j][0]} (not in training)", novel[j][1], float(vmax[q])
            )
        )
        n_novel_kept += 1

    # Measure the truth: copies against their source, near-copies against training slices within ±6.
    copies = [p for p in planted if p.kind == "copy"]
    v, tr = verify_pairs(
        np.stack([train[p.source] for p in copies]),
        np.stack([p.image for p in copies]),
        spatial_dims=2,
        flips=VERIFY["verify_flips"],
        shifts=VERIFY["verify_shifts"],
        rotations=VERIFY["verify_rotations"],
        backend=backend,
    )
    for p, s in zip(copies, v, strict=True):
        p.measured_ssim = float(s)
    kept_near = 0
    for axis, idx in near_pool:
        if kept_near >= n_near:
            break
        cands = [train_key[(axis, i)] for i in range(idx - 6, idx + 7) if (axis, i) in train_key]
        img = slices[(axis, idx)]
        vv, _ = verify_pairs(
            np.stack([train[c] for c in cands]),
            np.stack([img] * len(cands)),
            spatial_dims=2,
            flips=VERIFY["verify_flips"],
            shifts=VERIFY["verify_shifts"],
            rotations=VERIFY["verify_rotations"],
            backend=backend,
        )
        best = int(np.argmax(vv))
        if not THRESHOLDS[0] < float(vv[best]) <= THRESHOLDS[1]:
            continue  # not a "similar" near-copy by measurement: leave it out
        planted.append(
            Planted(
                "",
                "near",
                cands[best],
                f"{axname[axis]} slice {idx} (2 from a training slice)",
                img,
                float(vv[best]),
            )
        )
        kept_near += 1
    for p in planted:
        p.truth = ("different", "similar", "duplicate")[int(label_of(p.measured_ssim, THRESHOLDS))]
    order = rng.permutation(len(planted))
    planted = [planted[i] for i in order]
    for q, p in enumerate(planted):
        p.name = f"synth_{q:04d}.npy"
        _save_npy(sdir / p.name, p.image)
    truth_csv = root / "ground_truth.csv"
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["synth", "kind", "source", "transform", "measured_ssim", "truth"])
    for p in planted:
        w.writerow(
            [
                p.name,
                p.kind,
                p.source or "",
                p.transform,
                "" if p.measured_ssim is None else f"{p.measured_ssim:.6f}",
                p.truth,
            ]
        )
    if not truth_csv.exists() or truth_csv.read_text() != buf.getvalue():
        atomic_write_bytes(truth_csv, buf.getvalue().encode())
    stale = {f.name for f in sdir.glob("*.npy") if _SYNTH_NAME.fullmatch(f.name)} - {p.name for p in planted}
    for name in sorted(stale):  # left over from a run with other settings (only the demo's own names)
        (sdir / name).unlink()
    logger.info(
        "demo data: %d training slices, %d synthetic (%d copies, %d near, %d novel)",
        len(train),
        len(planted),
        len(copies),
        kept_near,
        n_novel_kept,
    )
    return {"train_dir": tdir, "synth_dir": sdir, "truth_csv": truth_csv, "planted": planted, "train": train}


def _train_encoder(out: Path, *, seconds: float, seed: int, progress: bool, retrain: bool) -> Path:
    """Train (or reuse) the small encoder on the template's slices; return the checkpoint path."""
    from .model import save_checkpoint
    from .training import train

    from .model import ModelFileError, load_model

    ckpt = out / "best.pt"
    done = out / DONE_MARKER  # written once training has run its course: best.pt alone may be from a run
    if ckpt.exists() and not retrain:  # that was stopped (Ctrl-C, a kill) after its first validation
        try:
            load_model(ckpt)
        except ModelFileError as exc:  # e.g. written by an older version with another `small` layout
            logger.warning("the cached encoder %s does not load (%s); training a new one", ckpt,
                           str(exc).splitlines()[0])  # (the error's first line, whole: never cut mid-sentence)
        else:
            if done.is_file():
                try:
                    made = json.loads(done.read_text())
                except (OSError, ValueError):
                    made = {}
                made = made if isinstance(made, dict) else {}
                wanted = {"train_seconds": seconds, "seed": seed}
                differ = {k: made.get(k) for k, v in wanted.items() if made.get(k) != v}
                if not differ:
                    logger.info("reusing the cached encoder %s", ckpt)
                    return ckpt
                # (--train-seconds 0, then a plain demo, reused a one-step encoder and missed its targets)
                logger.warning("the cached encoder %s was trained with %s, not %s; training a new one", ckpt,
                               ", ".join(f"{k}={v!r}" for k, v in differ.items()),
                               ", ".join(f"{k}={wanted[k]!r}" for k in differ))
                done.unlink(missing_ok=True)
                return _train_encoder(out, seconds=seconds, seed=seed, progress=progress, retrain=True)
            logger.warning("the cached encoder %s is from a training run that did not finish (no %s); "
                           "training a new one", ckpt, done.name)
    done.unlink(missing_ok=True)
    vol = load_volume("mni152").array
    images = []
    for axis in (0, 1, 2):
        images += volume_slices(vol, SlicePolicy(axis=axis, min_foreground=0.05), source=f"mni152_ax{axis}")
    images = [type(s)(center_fit(s.array, SIZE), s.source, s.axis, s.index) for s in images]
    model = train(
        images,
        backbone="small",
        epochs=1000,
        batch_size=32,
        lr=1e-3,
        seed=seed,
        out=str(out),
        time_limit=seconds,
        input_size=128,
        size_policy="resize",
        progress=progress,
        val_split="images",  # (one template volume: no other scan to hold out)
    )
    if not ckpt.exists():  # the trainer writes best.pt when it validates; make sure it is there
        save_checkpoint(ckpt, model)
    atomic_write_bytes(done, (json.dumps({"checkpoint": ckpt.name, "train_seconds": seconds, "seed": seed,
                                          "steps": len(getattr(model, "history", []))}) + "\n").encode())
    return ckpt


def run_demo(
    out: str | os.PathLike = "demo_out",
    *,
    train_seconds: float = 150.0,
    seed: int = 0,
    progress: bool = True,
    retrain: bool = False,
    backend: str | None = None,
) -> dict[str, Any]:
    """Build the demo data, train (or reuse) the encoder, audit, and score the audit against the truth.

    Returns a dict with ``report`` (path), ``recall``, ``precision``, ``planted``, ``found``,
    ``false_positives``, per-kind counts and ``seconds``; the same is written to ``OUT/demo_result.json``.
    """
    from .audit import audit

    # (checked before the ~20 s of data building: a bad value failed after it, named by train's parameters)
    if isinstance(train_seconds, bool) or not isinstance(train_seconds, (int, float)) or not (
            math.isfinite(train_seconds) and train_seconds >= 0):
        raise ValueError(f"train_seconds (--train-seconds) must be a non-negative number of seconds (0: one "
                         f"step), got {train_seconds!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed (--seed) must be a non-negative integer, got {seed!r}")
    t0 = time.perf_counter()
    out = Path(out)
    if (out / "summary.json").is_file() and not (out / "data" / "ground_truth.csv").is_file():
        # (an audit's OUT from another command: the demo's audit replaced its matches, summary and report)
        raise ValueError(f"{out} holds the outputs of another audit (summary.json, and no demo data): the demo "
                         "would replace them; give --out a new folder, or an earlier demo's")
    # the audit's own refusal of a folder that is no audit's but holds files of its output names or a work
    # folder, said before the data and the encoder (~3 min) rather than at the audit
    import importlib

    _audit = importlib.import_module(".audit", __package__)  # (the module: the package's ``audit`` is the function)
    _audit._refuse_foreign_files(out, owned=_audit._is_audit_out(out), shard_folders=[])
    if progress:  # (the data take ~20 s on 2 cores with no bar of their own: say what is happening)
        print(f"demo: building the data under {out / 'data'}: slices of the MNI152 template, planted copies, "
              "near-copies and novel slices, their truth measured by exact SSIM ...", file=sys.stderr, flush=True)
    data = build_demo_data(out / "data", seed=seed, backend=backend)
    t_data = time.perf_counter() - t0
    if progress:
        print(f"demo: data ready in {t_data:.0f} s ({len(data['train'])} training slices, "
              f"{len(data['planted'])} synthetic); next, the encoder", file=sys.stderr, flush=True)
    ckpt = _train_encoder(
        out / "encoder", seconds=train_seconds, seed=seed, progress=progress, retrain=retrain
    )
    t_train = time.perf_counter() - t0 - t_data
    res = audit(
        data["train_dir"],
        data["synth_dir"],
        model=ckpt,
        metric="deepssim",
        k=10,
        thresholds=THRESHOLDS,
        out=out,
        size=SIZE,
        chunk_size=64,
        progress=progress,
        backend=backend,
        **VERIFY,
    )
    t_audit = time.perf_counter() - t0 - t_data - t_train

    # Read the audit's answer per synthetic item: its label and best match (the row marked decides_label, which
    # summary.json counts: the highest verified SSIM, at any rank); and the search's own first candidate (the
    # encoder alone, before verification by exact SSIM)
    best: dict[str, tuple[float, str, str]] = {}
    first: dict[str, str] = {}
    with open(res.files["matches.csv"], newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["synth_path"]).name
            if row["decides_label"] == "1":
                best[name] = (float(row["ssim"]), Path(row["train_path"]).name, row["label"])
            if row["rank"] == "1":
                first[name] = Path(row["train_path"]).name
    planted = data["planted"]
    dup = [p for p in planted if p.truth == "duplicate"]
    found = [p for p in dup if best[p.name][2] == "duplicate" and best[p.name][1] == p.source]
    flagged = [p for p in planted if best[p.name][2] == "duplicate"]
    correct_flags = [p for p in flagged if p.truth == "duplicate" and best[p.name][1] == p.source]
    near = [p for p in planted if p.kind == "near"]
    novel = [p for p in planted if p.kind == "novel"]
    result = {
        "report": str(res.files["report.html"]),
        "planted": len(dup),
        "found": len(found),
        "recall": len(found) / len(dup) if dup else 1.0,
        "precision": len(correct_flags) / len(flagged) if flagged else 1.0,
        "false_positives": len(flagged) - len(correct_flags),
        "missed": [
            {"synth": p.name, "source": p.source, "transform": p.transform, "audit": list(best[p.name])}
            for p in dup
            if p not in found
        ],
        "copies_measured_not_duplicate": sum(
            1 for p in planted if p.kind == "copy" and p.truth != "duplicate"
        ),
        "near": len(near),
        "near_similar": sum(1 for p in near if best[p.name][2] == "similar"),
        "novel": len(novel),
        "novel_different": sum(1 for p in novel if best[p.name][2] == "different"),
        # the encoder's own share: a planted duplicate's source as the search's first candidate, and the search
        # scores' pair labels (an encoder trained a few steps scores every pair a duplicate: verification with
        # k = 10 among 77 training slices still finds every copy, so recall alone did not show it)
        "search_source_first": sum(1 for p in dup if first.get(p.name) == p.source),
        "search_pair_counts": dict(res.summary["pair_counts_search"]),
        "n_train": res.summary["n_train"],
        "n_synth": res.summary["n_synth"],
        "seconds": time.perf_counter() - t0,
        "seconds_by_stage": {"data": t_data, "encoder": t_train, "audit": t_audit},
        "encoder": str(ckpt),
        "ground_truth": str(data["truth_csv"]),
    }
    atomic_write_bytes(out / "demo_result.json", (json.dumps(result, indent=2) + "\n").encode())
    logger.info("demo: recall %.3f precision %.3f", result["recall"], result["precision"])
    return result
