"""Training the DeepSSIM encoder: Siamese regression of cosine similarity on SSIM computed on the fly.

How a step is made
------------------
1. ``batch_size`` pairs are drawn from the training images (:class:`PairSampler`): random pairs, pairs of
   neighbouring slices of one volume (offset 1-3, same source), and two copies of one slice, mixed
   ``pair_mix`` = (0.5, 0.25, 0.25) by default, so the targets cover the whole SSIM range.
2. Each image of a pair is augmented independently with MONAI, as the reference does: RandFlip on axis 0,
   RandFlip on axis 1, RandRotate ±0.17 rad, RandAdjustContrast γ ∈ [0.5, 1.5], each with p = 0.33 (an
   exactly constant image, a blank slice, stays exactly as it was: see :class:`Augmenter`).
3. The target is the SSIM of the pair AS AUGMENTED (``preset="deepssim"``: z-scored images, 7x7 uniform
   window, data range of the first image), computed in the batch by the project's SSIM engine — no CSV
   of pre-computed labels is needed (the reference trains each augmented pair against the SSIM of the
   un-augmented pair).
4. Loss = MSE(cosine(f(a), f(b)), target); AdamW (lr 1e-3, weight decay 1e-3), gradient norm clipped at 1.0.

Optional zoom-out (``zoom_out=(0.5, 0.65, 0.8)``, off by default): before step 2, each image of a pair is
shrunk by a factor drawn from ``(1.0, *zoom_out)`` into its square canvas, placed at a random position, the
rest filled with the image's minimum (background). Neighbour and copy pairs share the factor and position,
so they stay aligned; random pairs draw both independently. It teaches the encoder slices whose anatomy
covers little of the frame (top and bottom of the head, small fields of view), which SSIM scores highly
through their shared background; in the acceptance run it lowered the held-out MAE (BENCHMARKS.md).

Images go through the model's size policy (``model.config``: centre-fit, resize or letterbox-pad) once,
before augmentation; the network sees the augmented image z-scored per image, exactly as :func:`embed`.

Reproducibility: everything random in step ``s`` (pair choice, augmentation, dropout, stochastic depth)
is drawn from generators seeded by ``(seed, s)``; torch's global generator is forked for the duration of
:func:`train` and restored after. So a run is reproducible, and ``resume=`` continues the same loss curve
as an uninterrupted run (the checkpoint stores model, optimizer, step, config and the seed, which together
determine every later random draw; the log keeps one row per step), bit for bit on the same device with the
same number of threads: torch's CPU kernels sum in another order with another thread count (1 against 2
threads: losses apart from the second step, weights ~1e-6 apart after 30). A resume with other run settings
(lr, batch size ..., or other training images) is allowed and warned about, and so is another ``seed``, which
it does not use (the checkpoint's continues); on other validation pairs ``best.pt`` starts again; other model
settings are an error.
Validation pairs are fixed once from ``(seed, "val")``.

Outputs under ``out`` (when given): ``last.pt`` (every ``val_every`` steps, once per epoch by default, whether
or not the run validates, and at the end; a resume with no step left copies its checkpoint there when ``out`` is
another folder), ``best.pt`` (lowest
validation loss; only with a validation set: the automatic split needs ``val_fraction`` of the images to be at
least 2, else a warning says there is none), ``log.csv`` (one row per step: loss, MAE, lr, time spent on SSIM targets vs
forward/backward, and validation figures when computed), optionally TensorBoard events. A new (not
resumed) run starts ``log.csv`` afresh and removes the ``best.pt`` and ``last.pt`` an earlier run left in ``out``.
A resumed run sets aside (renames to ``best.stepN.pt``, warned) a ``best.pt`` in ``out`` that is not its
checkpoint's best (one a killed run wrote past the checkpoint, or another run's), so that ``best.pt`` is this
run's, and warns when ``out``'s ``last.pt`` is further on than the checkpoint (its later steps run again).

The reference CSV format (columns ``real_key, synth_key, ssim, split``) is accepted with ``pairs_csv=``: its
``train`` rows define the training pairs and its ``val``/``validation`` rows the validation pairs; keys are
matched to image keys (Slice keys, file names or stems, list positions). Targets are still the SSIM of the
augmented pair; the CSV ``ssim`` column is only compared against the SSIM of the un-augmented pairs (at the
model input) in the log, for its first 2048 train and val rows.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._atomic import atomic_write_bytes, remove_temporaries
from .model import (
    CHECKPOINT_FORMAT,
    DeepSSIMNet,
    ModelConfig,
    _check_device,
    _model_device,
    build_model,
    collect_images,
    embed_batch,
    fit_losses_said,
    fit_size,
    float_dtype,
    read_checkpoint,
    save_checkpoint,
    zscore_batch,
)

logger = logging.getLogger(__name__)

PAIR_KINDS = ("random", "neighbour", "copy")
AUG_PROB = 0.33
ROTATE_RANGE = 0.17
GAMMA_RANGE = (0.5, 1.5)
HIST_EDGES = np.linspace(-0.2, 1.0, 13)


# ----------------------------------------------------------------------------------------------------------
# SSIM targets
# ----------------------------------------------------------------------------------------------------------
_ENGINE: tuple[Callable[..., Any], str] | None = None


def _ssim_engine() -> tuple[Callable[..., Any], str]:
    """The project's SSIM engine (``deepssim_fast.ssim.ssim``); the float64 reference if it is missing."""
    global _ENGINE
    if _ENGINE is None:
        from .reference import ssim_reference

        _ENGINE = (ssim_reference, "reference")
        try:
            from .ssim import ssim as fast_ssim

            # one-time self-check on a tiny batch against the reference before trusting it for labels
            g = torch.Generator().manual_seed(0)
            x, y = torch.rand(2, 16, 16, generator=g), torch.rand(2, 16, 16, generator=g)
            got = np.asarray(fast_ssim(x, y, spatial_dims=2, preset="deepssim"), dtype=np.float64)
            want = ssim_reference(x, y, spatial_dims=2, preset="deepssim")
            if got.shape != want.shape or not np.allclose(got, want, atol=1e-4):
                raise ValueError(f"self-check mismatch: {got} vs {want}")
            _ENGINE = (fast_ssim, "deepssim_fast.ssim")
        except Exception as exc:  # noqa: BLE001 - any failure means "use the reference"
            logger.warning("deepssim_fast.ssim is not usable (%s: %s); SSIM targets use "
                           "reference.ssim_reference", type(exc).__name__, exc)
    return _ENGINE


def ssim_targets(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (``preset="deepssim"``) of each pair of a batch: x, y (B, H, W) float32 -> (B,) float32 tensor.

    Computed where the inputs live (the engine dispatches CUDA tensors to its GPU path); result on x's device.
    """
    fn, _ = _ssim_engine()
    out = fn(x.detach().contiguous(), y.detach().contiguous(), spatial_dims=2, preset="deepssim")
    t = out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
    return t.to(device=x.device, dtype=torch.float32).reshape(x.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Augmentation and pair sampling
# ----------------------------------------------------------------------------------------------------------
class Augmenter:
    """MONAI augmentations of the reference, applied image by image, seeded per call."""

    def __init__(self, enabled: bool = True) -> None:
        import monai.transforms as mt

        self.enabled = enabled
        self.compose = mt.Compose([
            mt.RandFlip(prob=AUG_PROB, spatial_axis=0),
            mt.RandFlip(prob=AUG_PROB, spatial_axis=1),
            mt.RandRotate(range_x=ROTATE_RANGE, prob=AUG_PROB, keep_size=True),
            mt.RandAdjustContrast(prob=AUG_PROB, gamma=GAMMA_RANGE),
        ])

    def __call__(self, images: np.ndarray, seed: int) -> np.ndarray:
        """Augment each image of ``images`` (B, H, W) independently; same ``seed`` -> same result.

        An exactly constant image (a blank slice) comes back exactly as it was: every transform maps a constant
        to itself (flips; the rotation pads with the border; the contrast keeps the minimum), but the rotation's
        bilinear resampling in float32 leaves rounding noise of ~1e-7 of a non-zero value, which the per-image
        z-score of the SSIM target and of the network input would blow up to a unit-variance pattern (a blank
        pair's target far below 1, and a pattern the model never sees at inference; as :func:`fit_size`)."""
        if not self.enabled:
            return images.copy()
        self.compose.set_random_state(seed=int(seed) % (2 ** 32))
        out = np.empty_like(images)
        for k in range(images.shape[0]):
            r = self.compose(images[k:k + 1])
            out[k] = np.asarray(r.as_tensor() if hasattr(r, "as_tensor") else r)[0]
        if images.size:
            flat = images.reshape(images.shape[0], -1)
            const = flat.max(axis=1) == flat.min(axis=1)
            out[const] = images[const]
        return out


@dataclass
class PairBatch:
    """One batch of pairs: indices into the pool, their kinds, and the augmented images (B, S, S) float32."""

    i: np.ndarray
    j: np.ndarray
    kinds: list[str]
    a: torch.Tensor
    b: torch.Tensor


def _check_zoom(zoom_out: Sequence[float] | None) -> tuple[float, ...]:
    if isinstance(zoom_out, (str, bytes, int, float, np.number)):  # ('float' object is not iterable; "0.5" a
        raise ValueError(f"zoom_out must be a sequence of factors, e.g. (0.5, 0.8), got {zoom_out!r}")  # char each)
    try:
        z = tuple(float(f) for f in (zoom_out or ()))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"zoom_out must be a sequence of factors in [0.1, 1), got {zoom_out!r}") from exc
    for f in z:
        if not (0.1 <= f < 1.0):
            raise ValueError(f"zoom_out factors must lie in [0.1, 1), got {f!r} in {tuple(zoom_out or ())}")
    return z


def _shrink_into(img: np.ndarray, f: float, oy: float, ox: float) -> np.ndarray:
    """``img`` (S, S) shrunk by ``f`` (antialiased bilinear) into an S x S canvas of its minimum, at relative
    position (oy, ox) in [0, 1]."""
    s = img.shape[0]
    side = max(2, int(round(s * f)))
    small = fit_size(img, side, "resize")
    out = np.full_like(img, img.min())
    y0, x0 = int(round(oy * (s - side))), int(round(ox * (s - side)))
    out[y0:y0 + side, x0:x0 + side] = small
    return out


def zoom_out_pairs(a: np.ndarray, b: np.ndarray, kinds: Sequence[str], factors: Sequence[float],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Zoom-out augmentation of pairs (N, S, S): see the module docstring. Pairs of kind ``random`` draw a
    factor and position per image; the other kinds share one, so they stay aligned."""
    choices = (1.0, *factors)
    a, b = a.copy(), b.copy()
    for k, kind in enumerate(kinds):
        fa = choices[int(rng.integers(0, len(choices)))]
        pa = rng.random(2)
        if kind == "random":
            fb, pb = choices[int(rng.integers(0, len(choices)))], rng.random(2)
        else:
            fb, pb = fa, pa
        if fa < 1.0:
            a[k] = _shrink_into(a[k], fa, *pa)
        if fb < 1.0:
            b[k] = _shrink_into(b[k], fb, *pb)
    return a, b


class PairSampler:
    """Draws pairs from a pool of equally sized images (N, S, S) with group/position metadata.

    ``groups[k]``/``positions[k]``: which volume image k comes from and its slice index (neighbour pairs are
    two images of one group whose positions differ by 1-3). ``pairs``: optional fixed list of (i, j) pairs
    (from a CSV) to sample from instead.
    """

    def __init__(self, pool: np.ndarray, groups: Sequence[str], positions: Sequence[int], *,
                 mix: Sequence[float] = (0.5, 0.25, 0.25),
                 pairs: Sequence[tuple[int, int]] | None = None, zoom_out: Sequence[float] = ()) -> None:
        # (NaN passed these compares and failed at the first draw, in numpy's "Probabilities contain NaN")
        if len(mix) != 3 or not all(math.isfinite(float(m)) for m in mix) or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"pair_mix must be three finite non-negative weights (random, neighbour, copy), "
                             f"got {tuple(mix)}")
        self.pool = pool
        self.mix = np.asarray(mix, dtype=np.float64) / float(sum(mix))
        self.zoom_out = _check_zoom(zoom_out)
        self.pairs = None if pairs is None else np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        n = pool.shape[0]
        self.neighbours: list[np.ndarray] = []
        by_group: dict[str, list[int]] = {}
        for k, g in enumerate(groups):
            by_group.setdefault(g, []).append(k)
        pos = np.asarray(positions)
        for k in range(n):
            members = np.asarray(by_group[groups[k]])
            d = np.abs(pos[members] - pos[k])
            self.neighbours.append(members[(d >= 1) & (d <= 3)])

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self.pairs is not None:
            sel = rng.integers(0, len(self.pairs), size=n)
            return self.pairs[sel, 0].copy(), self.pairs[sel, 1].copy(), ["csv"] * n
        size = self.pool.shape[0]
        kinds_idx = rng.choice(3, size=n, p=self.mix)
        i = rng.integers(0, size, size=n)
        j = np.empty(n, dtype=np.int64)
        kinds = []
        for k in range(n):
            kind = int(kinds_idx[k])
            if kind == 1 and len(self.neighbours[i[k]]) == 0:
                kind = 0
            if kind == 0 and size > 1:
                jj = int(rng.integers(0, size - 1))
                j[k] = jj + (jj >= i[k])
            elif kind == 1:
                nb = self.neighbours[i[k]]
                j[k] = nb[int(rng.integers(0, len(nb)))]
            else:
                kind = 2
                j[k] = i[k]
            kinds.append(PAIR_KINDS[kind])
        return i.astype(np.int64), j, kinds

    def batch(self, n: int, seed_seq: np.random.SeedSequence, augment: Augmenter) -> PairBatch:
        """Sample ``n`` pairs and augment both sides independently, all from ``seed_seq``."""
        s_pairs, s_a, s_b = seed_seq.spawn(3)
        i, j, kinds = self.sample(n, np.random.default_rng(s_pairs))
        return self._realise(i, j, kinds, seed_seq, s_a, s_b, augment)

    def take(self, rows: np.ndarray, seed_seq: np.random.SeedSequence, augment: Augmenter) -> PairBatch:
        """The fixed pairs ``self.pairs[rows]`` (no sampling), augmented as :meth:`batch` does."""
        if self.pairs is None:
            raise ValueError("take() needs a sampler built with pairs=")
        rows = np.asarray(rows, dtype=np.int64)
        _, s_a, s_b = seed_seq.spawn(3)
        return self._realise(self.pairs[rows, 0].copy(), self.pairs[rows, 1].copy(), ["csv"] * len(rows),
                             seed_seq, s_a, s_b, augment)

    def _realise(self, i: np.ndarray, j: np.ndarray, kinds: list[str], seed_seq: np.random.SeedSequence,
                 s_a: np.random.SeedSequence, s_b: np.random.SeedSequence, augment: Augmenter) -> PairBatch:
        xa, xb = self.pool[i], self.pool[j]
        if self.zoom_out:
            # a fourth child: the first three (and so runs without zoom-out) are unchanged
            xa, xb = zoom_out_pairs(xa, xb, kinds, self.zoom_out, np.random.default_rng(seed_seq.spawn(1)[0]))
        a = augment(xa, int(s_a.generate_state(1)[0]))
        b = augment(xb, int(s_b.generate_state(1)[0]))
        return PairBatch(i, j, kinds, torch.from_numpy(a), torch.from_numpy(b))


# ----------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ImagePool:
    """Images fitted to the model input: ``images`` (N, S, S) float32, plus keys, groups and positions."""

    images: np.ndarray
    keys: list[str]
    groups: list[str]
    positions: list[int]

    def subset(self, idx: Sequence[int]) -> ImagePool:
        idx = list(idx)
        return ImagePool(self.images[idx], [self.keys[k] for k in idx], [self.groups[k] for k in idx],
                         [self.positions[k] for k in idx])


def make_pool(images: Any, config: ModelConfig, *, policy: Any = None, what: str = "images", strict: bool = True,
              skipped: list | None = None) -> ImagePool:
    """Collect ``images`` (see :func:`deepssim_fast.model.collect_images`, also for ``strict`` and ``skipped``)
    and fit them to the model input."""
    arrays, metas = collect_images(images, policy=policy, what=what, strict=strict, skipped=skipped)
    keys, groups, positions = [], [], []
    for k, m in enumerate(metas):
        if m is None:
            keys.append(str(k))
            groups.append(what)
            positions.append(k)
        else:
            keys.append(m.key)
            groups.append(f"{m.source}#{m.axis}")
            positions.append(int(m.index))
    with fit_losses_said(what) as losses:  # (within train: one warning for its training and validation images)
        losses.add((a.shape for a in arrays), config)
    fitted = np.stack([fit_size(a, config.input_size, config.size_policy) for a in arrays]) if arrays else \
        np.zeros((0, config.input_size, config.input_size), np.float32)
    return ImagePool(fitted, keys, groups, positions)


def _key_index(pool: ImagePool, positions: bool = True) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(name -> image index, ambiguous name -> the indices of the images it names). Names: each image's key,
    its list position, and for a key ``source#axis:index`` the source path, file name, stem and the
    reference's ``<parent folder>___<stem>``. A name that
    several images share (other than a full key) names none of them and is listed as ambiguous."""
    idx: dict[str, int] = {}
    ambiguous: dict[str, set[int]] = {}
    for k, key in enumerate(pool.keys):
        aliases = {key, str(k)} if positions else {key}
        src = key.rsplit("#", 1)[0]
        if "#" in key:
            stem = Path(src).name[:-7] if Path(src).name.endswith(".nii.gz") else Path(src).stem
            # the reference's keys: "<parent folder>___<stem>" (its images are <base>/<uid>/<name>.png)
            aliases |= {src, Path(src).name, Path(src).stem, stem, f"{Path(src).parent.name}___{stem}"}
        for a in aliases:
            if a in idx and idx[a] != k:
                ambiguous.setdefault(a, {idx[a]}).add(k)
            idx.setdefault(a, k)
    for a in ambiguous:
        idx.pop(a, None)
    for k, key in enumerate(pool.keys):
        idx[key] = k
    return idx, {a: sorted(ks) for a, ks in ambiguous.items() if a not in idx}


def read_pairs_csv(path: str | os.PathLike, pool: ImagePool, *,
                   skipped: Sequence[tuple[str, str]] = ()) -> dict[str, list[tuple[int, int, float]]]:
    """Read a reference pairs CSV (real_key, synth_key, ssim, split) -> {split: [(i, j, ssim)]}.

    Keys must name images of ``pool`` (Slice key, file name, stem, the reference's ``<parent folder>___<stem>``
    or list position); an unknown key is an error naming the row. ``skipped``: the files left out of the pool
    (unreadable); with any, a list position is refused, since it would name the image after the gap (key
    ``2`` named ``a3.png`` when ``a2.png`` was unreadable). Split ``train``/``training`` rows train,
    ``val``/``valid``/``validation`` rows validate; rows of other splits are left out with a warning.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pairs CSV {p}: no such file")
    idx, ambiguous = _key_index(pool, positions=not skipped)
    out: dict[str, list[tuple[int, int, float]]] = {}
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # (-sig: a CSV saved by Excel starts with a BOM)
    except UnicodeDecodeError as exc:  # (was a bare UnicodeDecodeError naming neither the file nor the line)
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"pairs CSV {p} line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save it as "
                         "UTF-8 (Excel: 'CSV UTF-8')") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        need = {"real_key", "synth_key", "ssim", "split"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"pairs CSV {p}: expected columns {sorted(need)}, got {reader.fieldnames}")
        twice = sorted({c for c in reader.fieldnames if c in need and reader.fieldnames.count(c) > 1})
        if twice:  # (DictReader keeps the last of two columns of one name)
            raise ValueError(f"pairs CSV {p}: the header names column(s) {', '.join(twice)} more than once: "
                             f"{reader.fieldnames}")
        for row in reader:
            row_no = reader.line_num  # (the file's line: blank lines, which the reader skips, count too)
            if row.get(None):  # (a row longer than the header: DictReader puts the extra fields under None)
                raise ValueError(f"pairs CSV {p} line {row_no}: {len(reader.fieldnames) + len(row[None])} fields, "
                                 f"the header has {len(reader.fieldnames)} ({reader.fieldnames})")
            absent = [c for c in ("real_key", "synth_key", "ssim", "split") if row[c] is None]
            if absent:  # (a row shorter than the header: DictReader fills the missing fields with None)
                raise ValueError(f"pairs CSV {p} line {row_no}: no value for {', '.join(absent)} "
                                 f"(the row has fewer fields than the header {reader.fieldnames})")
            a, b = row["real_key"].strip(), row["synth_key"].strip()
            for key in (a, b):
                if key in ambiguous:
                    ks = ambiguous[key]
                    named = " and ".join(f"image {k} ({pool.keys[k]})" for k in ks[:3])
                    named += f" (and {len(ks) - 3} more)" if len(ks) > 3 else ""
                    raise ValueError(f"pairs CSV {p} line {row_no}: key {key!r} is ambiguous: it names {named} "
                                     f"(by list position, file name or stem); give the image's full key")
                if key not in idx and skipped and key.isdigit():
                    raise ValueError(f"pairs CSV {p} line {row_no}: key {key!r} is a list position, but "
                                     f"{len(skipped)} file(s) were left out (e.g. {skipped[0][0]}), so positions "
                                     "no longer name the images they did; give file names or keys")
                if key not in idx:
                    raise ValueError(f"pairs CSV {p} line {row_no}: key {key!r} matches no image "
                                     f"(known keys look like {pool.keys[:3]})")
            try:
                s = float(row["ssim"])
            except ValueError:
                raise ValueError(f"pairs CSV {p} line {row_no}: ssim {row['ssim']!r} is not a number"
                                 ) from None
            split = row["split"].strip().lower()
            split = "val" if split in ("val", "valid", "validation") else "train" if split == "training" else split
            out.setdefault(split, []).append((idx[a], idx[b], s))
    if not out.get("train"):
        raise ValueError(f"pairs CSV {p}: no rows with split == 'train'")
    other = {k: len(v) for k, v in out.items() if k not in ("train", "val")}
    if other:  # (rows of other splits, the reference's test pairs, say: a warning, as an empty split may be a typo)
        logger.warning("pairs CSV %s: %s left out (training uses split 'train' and validates on 'val')", p,
                    ", ".join(f"{n} row(s) of split {k!r}" for k, n in sorted(other.items())))
    return out


CSV_SSIM_CHECK_ROWS = 2048  # rows of a pairs CSV whose ssim column is compared at the start of training


def _log_csv_ssim_agreement(path: str | os.PathLike, csv_pairs: dict[str, list[tuple[int, int, float]]],
                            pool: ImagePool, chunk: int = 256) -> None:
    """Log how the CSV's ``ssim`` column agrees with the SSIM (``preset="deepssim"``) of the un-augmented
    pairs of ``pool`` (the images at the model input), over the train and val rows (the first
    ``CSV_SSIM_CHECK_ROWS``): a large difference says the keys name other images than the CSV's SSIM was
    computed on (or at another size). The training targets do not use the column."""
    rows = (csv_pairs.get("train", []) + csv_pairs.get("val", []))
    total = len(rows)
    rows = rows[:CSV_SSIM_CHECK_ROWS]
    if not rows:
        return
    got = []
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        a = torch.from_numpy(pool.images[[i for i, _, _ in part]])
        b = torch.from_numpy(pool.images[[j for _, j, _ in part]])
        got.append(ssim_targets(a, b).numpy().astype(np.float64))
    diff = np.abs(np.concatenate(got) - np.asarray([t for _, _, t in rows], np.float64))
    if not np.isfinite(diff).any():  # (a column of 'nan')
        logger.info("pairs CSV %s: its ssim column has no finite value to compare", path)
        return
    worst = int(np.nanargmax(np.where(np.isfinite(diff), diff, np.nan)))
    i, j, _ = rows[worst]
    logger.info("pairs CSV %s: its ssim column vs the SSIM of the un-augmented pairs at the model input, over "
                "%d rows%s: MAE %.4f, max %.4f (%s, %s)", path, len(rows),
                f" (the first of {total})" if total > len(rows) else "", float(np.mean(diff[np.isfinite(diff)])),
                float(diff[worst]), pool.keys[i], pool.keys[j])


# ----------------------------------------------------------------------------------------------------------
# Validation and evaluation
# ----------------------------------------------------------------------------------------------------------
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class FixedPairs:
    """A fixed, already augmented evaluation set: images a, b (P, S, S), targets (P,), kinds."""

    a: torch.Tensor
    b: torch.Tensor
    targets: torch.Tensor
    kinds: list[str]


def fixed_pairs(pool: ImagePool, n_pairs: int, seed: int, *, mix: Sequence[float] = (0.5, 0.25, 0.25),
                pairs: Sequence[tuple[int, int]] | None = None, augment: bool = True,
                chunk: int = 256, zoom_out: Sequence[float] = ()) -> FixedPairs:
    """Draw ``n_pairs`` pairs from ``pool`` (random/neighbour/copy, augmented) with their SSIM targets.

    With ``pairs`` (e.g. a CSV's validation rows) the set is those pairs in order, each once (repeated in
    turn when ``n_pairs`` is larger), not a sample of them."""
    sampler = PairSampler(pool.images, pool.groups, pool.positions, mix=mix, pairs=pairs, zoom_out=zoom_out)
    aug = Augmenter(enabled=augment)
    ss = np.random.SeedSequence([int(seed), 0x7A11])
    parts = []
    for c, child in enumerate(ss.spawn(max(1, math.ceil(n_pairs / chunk)))):
        n = min(chunk, n_pairs - c * chunk)
        if n <= 0:
            break
        if pairs is not None:
            parts.append(sampler.take(np.arange(c * chunk, c * chunk + n) % len(sampler.pairs), child, aug))
        else:
            parts.append(sampler.batch(n, child, aug))
    a = torch.cat([p.a for p in parts])
    b = torch.cat([p.b for p in parts])
    kinds = [k for p in parts for k in p.kinds]
    return FixedPairs(a, b, ssim_targets(a, b), kinds)


def predict_pairs(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, *, batch_size: int = 64,
                  device: torch.device | None = None) -> torch.Tensor:
    """Cosine similarity (P,) float32 of the model's embeddings of pairs a[k], b[k] ((P, S, S) raw images).

    ``device``: where the model runs (default: where its parameters are); a model elsewhere is an error, not
    moved (that would change the caller's model)."""
    at = _model_device(model)  # (a module without parameters: next(model.parameters()) was a bare StopIteration)
    dev = torch.device(device) if device is not None else at
    if dev.type != at.type or (dev.index is not None and at.index is not None and dev.index != at.index):
        raise ValueError(f"device={str(dev)!r} but the model's parameters are on {str(at)!r}; move the model "
                         f"first (model.to({str(dev)!r})) or leave device unset")
    size = getattr(getattr(model, "config", None), "input_size", None)
    if size is not None and a.shape[1:] != (size, size):  # (64 x 64 pairs on a 32-input model gave numbers)
        raise ValueError(f"pairs of {tuple(a.shape[1:])} images, but the model takes {size} x {size}: draw the "
                         "pairs with the model's input size (make_pool with its config)")
    dtype = float_dtype(model)  # (a float64 model failed in torch's "Input type and weight type ...")
    was = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, a.shape[0], batch_size):
                xa = zscore_batch(a[s:s + batch_size]).unsqueeze(1).to(dev, dtype)
                xb = zscore_batch(b[s:s + batch_size]).unsqueeze(1).to(dev, dtype)
                # (a batch of one as two copies, as embed runs it: the scores moved in the last bits with the
                # batch size, and the validation MSE with them)
                # (checked as embed checks them: a foreign model's tuple, 4-D output or NaN gave a TypeError, a
                # broadcast error or a NaN MSE)
                # (and named by the model's file, where it was loaded from one)
                ea = embed_batch(model, xa, s)
                eb = embed_batch(model, xb, s)
                out.append(F.cosine_similarity(ea, eb, dim=1).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model: torch.nn.Module | str | os.PathLike, images: Any = None, *, pairs: FixedPairs | None = None,
             n_pairs: int = 512, seed: int = 0, mix: Sequence[float] = (0.5, 0.25, 0.25), policy: Any = None,
             batch_size: int = 64, device: str | torch.device | None = None) -> dict[str, Any]:
    """MAE, MSE and Pearson r of the model's cosine against SSIM on augmented pairs of ``images``.

    ``model``: a model or a file for :func:`~deepssim_fast.model.load_model`. Either ``images`` (pairs are
    drawn as in training: random, neighbour and copies, augmented, seeded by ``seed``) or a ready
    :class:`FixedPairs` (of the model's input size), not both. Scores do not depend on ``batch_size``.
    Returns ``{"mae", "mse", "r", "n", "by_kind", "target_hist"}``.
    """
    for name, v in (("n_pairs", n_pairs), ("batch_size", batch_size)):
        if not (_count(v) and v >= 1):
            raise ValueError(f"evaluate: {name} must be a positive integer, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"evaluate: seed must be an integer, got {seed!r}")  # as train's seed
    if seed < 0:
        raise ValueError(f"evaluate: seed must be a non-negative integer, got {seed!r}")
    if images is not None and pairs is not None:  # (images were ignored without a word)
        raise ValueError("evaluate: give images or pairs, not both")
    if isinstance(model, (str, os.PathLike)):  # (as embed takes it: 'str' object has no attribute 'config')
        from .model import load_model

        model = load_model(model)
    if pairs is None:
        if images is None:
            raise ValueError("evaluate: give images or pairs")
        pool = make_pool(images, model.config, policy=policy, what="eval images")
        if pool.images.shape[0] < 2:
            raise ValueError(f"evaluate: need at least 2 images, got {pool.images.shape[0]}")
        pairs = fixed_pairs(pool, n_pairs, seed, mix=mix)
    dev = torch.device(device) if device is not None else None
    cos = predict_pairs(model, pairs.a, pairs.b, batch_size=batch_size, device=dev).numpy().astype(np.float64)
    t = pairs.targets.numpy().astype(np.float64)
    err = cos - t
    by_kind = {}
    kinds = np.asarray(pairs.kinds)
    for k in sorted(set(pairs.kinds)):
        m = kinds == k
        by_kind[k] = {"n": int(m.sum()), "mae": float(np.abs(err[m]).mean()),
                      "target_mean": float(t[m].mean())}
    return {"mae": float(np.abs(err).mean()), "mse": float((err ** 2).mean()), "r": _pearson(cos, t),
            "n": int(t.size), "by_kind": by_kind,
            "target_hist": np.histogram(np.clip(t, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0].tolist()}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
_LOG_FIELDS = ["step", "epoch", "loss", "mae", "lr", "t_data", "t_target", "t_model", "val_loss", "val_mae",
               "val_r"]


def _changed_train_args(old: dict, new: dict) -> list[str]:
    """'name old -> new' for each training setting a resumed run changes (settings the checkpoint predates
    are not compared; nor is total_steps under a constant learning rate: running on to more steps is what
    resuming is for. Under the cosine schedule the rate at every step depends on total_steps, so a change
    there is reported)."""
    skip = () if new.get("lr_schedule") == "cosine" else ("total_steps",)
    return [f"{k} {old[k]!r} -> {v!r}" for k, v in new.items()
            if k in old and k not in skip and (_other_images(old[k], v) if k in _DIGEST_KEYS else old[k] != v)]


class _Logger:
    """log.csv (one row per step) and, optionally, TensorBoard. ``resume_step``: a resumed run keeps the
    rows up to the checkpoint's step and drops the later ones (the steps it runs again) and any partial line
    a killed run left, so the log reads as one uninterrupted run. ``earlier``: the log.csv of the run being
    resumed when it lies in another folder than ``out``; its rows are the ones kept (so a run resumed into
    another folder has the whole curve there, as it has best.pt)."""

    def __init__(self, out: Path | None, tensorboard: bool, resume_step: int | None,
                 earlier: Path | None = None) -> None:
        self.path = out / "log.csv" if out else None
        self.tb = None
        if self.path is not None:
            keep: list[list[str]] = []
            source = earlier if earlier is not None and earlier.is_file() else self.path
            if resume_step is not None and source.exists():
                with open(source, newline="") as f:
                    for r in list(csv.reader(f))[1:]:
                        try:
                            ok = len(r) == len(_LOG_FIELDS) and int(r[0]) <= resume_step
                        except ValueError:
                            ok = False
                        if ok:
                            keep.append(r)
            text = io.StringIO()
            w = csv.writer(text)
            w.writerow(_LOG_FIELDS)
            w.writerows(keep)
            atomic_write_bytes(self.path, text.getvalue().encode())
        if tensorboard:
            if out is None:
                raise ValueError("tensorboard=True needs out= (the events go to out/tensorboard)")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("tensorboard=True needs the tensorboard package: pip install tensorboard"
                                   ) from exc
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def row(self, r: dict) -> None:
        if self.path is not None:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(["" if r.get(k) is None else r[k] for k in _LOG_FIELDS])
        if self.tb is not None:
            for k in ("loss", "mae", "lr", "val_loss", "val_mae", "val_r"):
                if r.get(k) is not None:
                    self.tb.add_scalar(k, r[k], r["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _lr_at(step: int, base: float, total: int, schedule: str, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * 0.5 * (1.0 + math.cos(math.pi * frac))


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    _check_device(dev)  # (model.to(dev) ended in torch's AssertionError "Torch not compiled with CUDA enabled")
    return dev


def _count(v: Any) -> bool:
    """An integer (Python or numpy), not a bool: ``max_steps=True`` ran one step."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _images_digest(pool: ImagePool) -> str:
    """'N images (pixels DIGEST)' of a pool, for a resume to compare: blake2b of the fitted images' shape, dtype
    and pixels, in order (one pass, ~1 GB/s: 10^4 images of 128 x 128 in well under a second; the same pixels
    under another folder give the same digest). Runs before this one recorded 'N images (DIGEST)', a digest of
    per-image sums, blind to a re-oriented image (every file flipped passed for the same images)."""
    imgs = np.ascontiguousarray(pool.images)
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((tuple(imgs.shape), str(imgs.dtype))).encode())
    h.update(imgs.data if imgs.size else b"")
    return f"{imgs.shape[0]} images (pixels {h.hexdigest()})"


_DIGEST = re.compile(r"(\d+) images \((pixels )?[0-9a-f]+\)")
_DIGEST_KEYS = ("train_images", "val_images")


def _other_images(old: Any, new: Any) -> bool:
    """Whether two recorded image digests (:func:`_images_digest`) name other images. A digest of the older
    kind (per-image sums) against one of this kind is unknown, not a change (a checkpoint from before stays
    resumable without a warning): only their image counts compare."""
    if old == new:
        return False
    mo, mn = (_DIGEST.fullmatch(v) if isinstance(v, str) else None for v in (old, new))
    if mo is not None and mn is not None and bool(mo.group(2)) != bool(mn.group(2)):
        return mo.group(1) != mn.group(1)
    return True


def _checkpoint_marks(path: str | os.PathLike) -> tuple[Any, Any] | None:
    """(step, best_val) that a checkpoint of a train run records, read without loading its tensors (mmap); None
    when it is not a readable deepssim_fast checkpoint."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means "not one to read the marks of"
        return None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        return None
    return ck.get("step"), ck.get("best_val")


def _kept_last(out_dir: Path, resume: str | os.PathLike, step: int) -> str | None:
    """Why a resume from checkpoint ``resume`` (at ``step``) with nothing left to train leaves ``out_dir`` as it
    is, or None when it may write there. Such a resume writes no checkpoint of its own; it copies the resumed
    checkpoint to ``out_dir/last.pt`` (so that out is complete) only where that is missing or is at or before
    the resumed step. A ``last.pt`` further on (a later resume's, or the run's own when the resume is from
    best.pt) is left, and nothing else there is touched either (best.pt, log.csv): copying over it put the older
    checkpoint in its place and cut log.csv back to the resumed step, losing the later steps' state."""
    last = out_dir / "last.pt"
    if not last.is_file() or last.resolve() == Path(resume).resolve():
        return None
    marks = _checkpoint_marks(last)
    if marks is None or not _count(marks[0]):
        return f"{last} is there, and is not a checkpoint of a train run whose step can be read"
    if marks[0] > step:
        return (f"{last} is at step {marks[0]}, further on than the resumed checkpoint (resume {last} with "
                f"max_steps beyond {marks[0]} to continue it)")
    return None


def _check_resumed_outputs(out_dir: Path, resume: str | os.PathLike, step: int, best_val: Any,
                           nothing_left: bool = False) -> None:
    """What a resume from checkpoint ``resume`` (at ``step``, best validation loss ``best_val``) finds in
    ``out_dir``. A ``best.pt`` that is not the checkpoint's best is set aside (renamed, with a warning): one from
    a later step (a run killed between writing best.pt and last.pt) or of another best loss; kept, it passed
    for this run's best when no validation of the resume beat the checkpoint's, and the CLI named it beside
    the checkpoint's loss. A ``last.pt`` further on than the checkpoint (a resume from best.pt) is said: its
    later steps are trained again and it is overwritten. (A resume with ``nothing_left`` to train does not get
    here with such a last.pt: it leaves out as it is, see :func:`_kept_last`.)"""
    here = Path(resume).resolve()
    last = out_dir / "last.pt"
    if last.is_file() and last.resolve() != here:
        marks = _checkpoint_marks(last)
        if marks is not None and _count(marks[0]) and marks[0] > step:
            logger.warning("resuming %s at step %d, but %s is at step %d: steps %d-%d are trained again from the "
                           "resumed weights and %s is overwritten at this run's first checkpoint (resume %s to "
                           "continue from step %d)", resume, step, last, marks[0], step + 1, marks[0], last.name,
                           last, marks[0])
    best = out_dir / "best.pt"
    if not best.is_file() or best.resolve() == here:
        return
    marks = _checkpoint_marks(best)
    if marks is None:
        why, aside = "it is not a readable checkpoint", out_dir / "best.unreadable.pt"
    elif _count(marks[0]) and marks[0] > step:
        why = (f"it is of step {marks[0]}, past the resumed step {step} (a run stopped between writing best.pt "
               "and last.pt): " + ("this run trains none of them, as nothing is left to train" if nothing_left
                                   else "those steps are trained again"))
        aside = out_dir / f"best.step{marks[0]}.pt"
    elif marks[1] != best_val:
        why = (f"its validation loss {marks[1]!r} is not the resumed checkpoint's best ({best_val!r}): another "
               "run's")
        aside = out_dir / (f"best.step{marks[0]}.pt" if _count(marks[0]) else "best.other.pt")
    else:
        return
    os.replace(best, aside)
    logger.warning("%s is not this run's best.pt (%s): moved to %s, so that best.pt is this run's", best, why,
                   aside)


def _check_finite(model: torch.nn.Module, step: int) -> None:
    """FloatingPointError unless every weight and buffer of ``model`` is finite. The loss is checked each step,
    but it uses the batch's statistics: at a huge learning rate the running statistics eval mode uses
    (BatchNorm's running_var) overflowed unseen, and train returned, and saved, a model that embeds to NaN."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"training diverged by step {step}: {name} holds non-finite values (the loss "
                                     "stayed finite); lower the learning rate (lr)")


def _split_train_val(n: int, fraction: float, seed: int, keys: Sequence[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) image indices: about ``fraction`` of the ``n`` images held out, seeded.

    With ``keys`` (a pool's, ``source#axis:index`` for slices of files), whole files are held out: the slices of
    one volume are near-copies of their neighbours, so a validation slice beside a training slice measured the
    training data (a probe found every validation slice of two volumes next to a training one), and best.pt was
    chosen on that. Where the files cannot be split so (one volume; training keeps at least 2 images) the
    slices are, with a warning; a file is held out only while the held-out part stays within twice ``fraction``.
    Images that are their own file (2D files, a mapping's entries) split as single images; arrays without a
    file (a stack (N, H, W), a list) are passed keyed by their pool group, as the pair sampler takes them: the
    slices of one volume in order, so they split as one volume does, with the warning."""
    # (a 4D series' frames are sources "<path>@t<t>": one file, held out or trained on whole)
    sources = ([re.sub(r"@t\d+$", "", k.rsplit("#", 1)[0]) if "#" in k else k for k in keys]
               if keys is not None else None)
    n_val = min(int(round(n * fraction)), n - 2)  # (training keeps at least 2 images)
    if n_val <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B11]))  # (the single images' split)
    if sources is not None and len(set(sources)) < n:  # (some file gave several slices)
        by_file = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B12]))
        names = sorted(set(sources))
        members: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            members.setdefault(s, []).append(i)
        val: list[int] = []
        limit = max(2 * n_val, 2)  # (a held-out file may take the split past fraction, not far past it)
        for j in by_file.permutation(len(names)):
            if len(val) >= n_val:
                break
            size = len(members[names[j]])
            if len(val) + size <= limit and n - len(val) - size >= 2:
                val += members[names[j]]
        if val:
            v = np.sort(np.asarray(val, dtype=np.int64))
            if all(len(members[sources[i]]) == 1 for i in v) and any(len(m) > 1 for m in members.values()):
                # (2D files beside volumes: only the 2D files fit the fraction, and no volume is validated)
                logger.warning("validation holds out single-image files only: no volume's slices fit into "
                               "%d validation images (twice the fraction), so best.pt is chosen without them; "
                               "give val_images= (--val) with slices of other volumes", limit)
            return np.setdiff1d(np.arange(n), v), v
        why = ("the images are arrays without files, which pair sampling takes for the slices of one volume "
               "(neighbour pairs by position; val_split='images' holds single images out knowingly)"
               if all("#" not in k for k in keys) else
               "the images come from too few files to hold whole files out" if len(names) < 3 else
               f"every file gives more slices than {limit} (twice the validation fraction)")
        logger.warning("validation: %s; %d slices are held out beside their neighbours in the same volume, so the "
                       "validation loss (and best.pt's choice) will look better than on unseen scans: give "
                       "val_images= (--val) from other scans, or a larger val_fraction", why, n_val)
    perm = rng.permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _shared_files(images: Any, val_images: Any) -> list[str]:
    """The files given both as ``images`` and as ``val_images`` (by resolved path; [] unless both are paths or
    sequences of paths)."""
    def paths(x: Any) -> dict[str, str] | None:
        items = [x] if isinstance(x, (str, os.PathLike)) else x
        if not isinstance(items, (list, tuple)) or not items:
            return None
        if not all(isinstance(i, (str, os.PathLike)) for i in items):
            return None
        return {os.path.realpath(i): os.fspath(i) for i in items}

    a, b = paths(images), paths(val_images)
    if a is None or b is None:
        return []
    return [b[k] for k in b if k in a]


# The defaults of train's options that a resume takes from its run when they are not given (None).
TRAIN_DEFAULTS: dict[str, Any] = {"epochs": 40, "batch_size": 32, "lr": 1e-3, "lr_schedule": "constant",
                                  "warmup_steps": 0, "val_fraction": 0.1, "val_pairs": 256, "val_every": None,
                                  "zoom_out": ()}


def train(images: Any, *, backbone: str | None = None, pretrained: str | os.PathLike | None = None,
          max_steps: int | None = None, epochs: int | None = None, batch_size: int | None = None,
          lr: float | None = None, weight_decay: float = 1e-3, emb_dim: int | None = None, val_images: Any = None,
          out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None, seed: int | None = None,
          device: str | torch.device | None = None, input_size: int | None = None,
          size_policy: str | None = None,
          freeze_stages: bool | None = None, pairs_csv: str | os.PathLike | None = None, policy: Any = None,
          val_fraction: float | None = None, val_pairs: int | None = None, val_every: int | None = None,
          pair_mix: Sequence[float] = (0.5, 0.25, 0.25), augment: bool = True, lr_schedule: str | None = None,
          warmup_steps: int | None = None, grad_clip: float = 1.0, time_limit: float | None = None,
          cpu_time_limit: float | None = None, progress: bool = True, tensorboard: bool = False,
          zoom_out: Sequence[float] | None = None, strict: bool = False, val_split: str | None = None
          ) -> DeepSSIMNet:
    """Train a DeepSSIM encoder; returns the model with the best validation weights (eval mode).

    images:       2D images — a sequence of arrays / Slices, a stack (N, H, W), a mapping key -> array, or
                  paths (PNG, .npy, NIfTI cut by ``policy``, a :class:`~deepssim_fast.data.SlicePolicy`).
                  At least 2 images. Arrays without files (a stack, a list) are the slices of one volume in
                  order, to the neighbour pairs and to the validation split.
    backbone:     ``convnext_base`` (paper; the default), ``convnext_tiny``, ``resnet18`` or ``small``;
                  with ``resume=`` the checkpoint's (a different one given here is an error).
    pretrained:   LOCAL torchvision ImageNet state_dict file for the backbone (never downloaded).
    max_steps:    number of optimizer steps; overrides ``epochs``, the passes over the images (default 40;
                  an epoch is ceil(n_train / batch_size) steps, each image being the first of a pair once per
                  epoch on average).
    val_images:   validation images; default: ``val_fraction`` of ``images``, chosen by ``seed``.
    val_split:    how that fraction is held out: ``"files"`` (default) whole files at a time (a volume's slices
                  are near-copies of their neighbours; where the files are too few, single slices, with a
                  warning), or ``"images"``, single images (slices) knowingly (one volume, as the demo's); with
                  ``resume=`` the run's (``"images"`` for runs from before this option).
    out:          directory for ``best.pt``, ``last.pt``, ``log.csv`` (and TensorBoard events).
    resume:       a checkpoint from a previous run (``out/last.pt``): model, optimizer and step are restored,
                  and the options left at None (``max_steps`` and ``epochs``: the run's number of steps;
                  ``batch_size``, ``lr``, ``lr_schedule``, ``warmup_steps``, ``val_fraction``, ``val_pairs``,
                  ``val_every``, ``zoom_out``) are the run's own, so that training continues on the same loss
                  curve; one given with another value is used, and named in a warning.
    seed:         seed of the initial weights, pairs, augmentations and split (default 42); with ``resume=``
                  the checkpoint's (another one given is not used, and said so in a warning).
    input_size, size_policy, freeze_stages: see :func:`deepssim_fast.model.build_model` (defaults: the
                  backbone's input size, ``"fit"``, False); with ``resume=`` the checkpoint's (a different
                  value given here is an error, as for ``backbone``).
    pairs_csv:    reference pairs CSV (real_key, synth_key, ssim, split) defining the pairs to train on
                  (``train`` rows) and validate on (``val`` rows; a CSV without them validates on pairs of
                  ``val_images`` when given, else not at all; both is an error). ``val_fraction`` does not
                  apply.
    val_fraction: share of ``images`` held out for validation (0.1).
    val_pairs:    number of fixed validation pairs (256); ``val_every``: validate every that many steps
                  (default once per epoch, and at the end).
    pair_mix:     weights of (random, neighbour-slice, augmented-copy) pairs.
    zoom_out:     zoom-out factors (e.g. ``(0.5, 0.65, 0.8)``) for the pairs of training and validation; see
                  the module docstring. Off by default.
    lr_schedule:  ``"constant"`` (default, as the reference) or ``"cosine"`` decay to 0 over the run, after
                  ``warmup_steps`` of linear warm-up.
    lr, weight_decay: AdamW's (1e-3 each); ``grad_clip``: gradient norm clip (1.0; 0: off).
    emb_dim:      embedding width (256; with ``resume=`` the checkpoint's). ``augment``: augment the pairs
                  (flips, small rotations, contrast; the module docstring). ``device``: where training runs
                  (default: the GPU when torch sees one, else the CPU; the other functions default to the CPU).
    tensorboard:  also write TensorBoard events to ``out/tensorboard`` (needs the tensorboard package).
    time_limit:   stop at the first step boundary after this many seconds (not reproducible; for budgets).
    cpu_time_limit: the same in CPU seconds of this process (all threads): e.g. 600 = "5 minutes on 2 cores",
                  a budget that does not shrink when the machine is shared.

    strict:       paths: an unreadable file (or one with NaN/Inf values) aborts with its name; by default it is
                  logged as a warning and left out, as the audit leaves it out (``model.skipped`` lists them,
                  with the volumes no slice of which passes ``policy``).

    The returned model carries ``model.history`` (list of per-step dicts, the rows of ``log.csv`` this call
    wrote: after a resume, log.csv also holds the earlier run's),
    ``model.best_val`` (lowest validation loss, or None), ``model.steps_run`` (steps this call trained: 0 for a
    resume with none left) and ``model.skipped`` (``(path, reason)`` of the
    files left out).
    """
    # options not given: a resumed run's own (a resume through the API ran at the defaults: batch size 32 and
    # lr 1e-3 after 2 and 0.01, and 40 epochs after a run of 2 steps), else TRAIN_DEFAULTS
    ck = read_checkpoint(resume) if resume is not None else None
    prev = (ck.get("train_args") or {}) if ck is not None else {}
    if max_steps is None and epochs is None and prev.get("total_steps"):
        max_steps = int(prev["total_steps"])
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "lr_schedule": lr_schedule,
             "warmup_steps": warmup_steps, "val_fraction": val_fraction, "val_pairs": val_pairs,
             "val_every": val_every, "zoom_out": zoom_out}
    value = {name: v if v is not None else prev.get(name, TRAIN_DEFAULTS[name]) if name != "epochs"
             else TRAIN_DEFAULTS["epochs"] for name, v in given.items()}
    given_split = val_split is not None
    if val_split is None:  # (a run from before the option split single images: its resume keeps doing so)
        val_split = prev.get("val_split") or ("images" if ck is not None and "val_split" not in prev else "files")
    if val_split not in ("files", "images"):
        raise ValueError(f"val_split must be 'files' or 'images', got {val_split!r}")
    if given_split and (val_images is not None or pairs_csv is not None):
        raise ValueError("val_split (--val-split) chooses how val_fraction is held out; it does not apply with "
                         "val_images= (--val) or pairs_csv= (--pairs-csv)")
    epochs, batch_size, lr, lr_schedule = value["epochs"], value["batch_size"], value["lr"], value["lr_schedule"]
    warmup_steps, val_fraction, val_pairs = value["warmup_steps"], value["val_fraction"], value["val_pairs"]
    val_every, zoom_out = value["val_every"], value["zoom_out"]
    if not (_count(batch_size) and batch_size >= 2):
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if max_steps is not None and not (_count(max_steps) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if not (_count(epochs) and epochs >= 1):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (_count(val_pairs) and val_pairs >= 1):
        raise ValueError(f"val_pairs must be a positive integer, got {val_pairs!r}")
    if val_every is not None and not (_count(val_every) and val_every >= 1):
        raise ValueError(f"val_every must be a positive integer or None (once per epoch), got {val_every!r}")
    if not (_count(warmup_steps) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if seed is not None and not 0 <= seed < 2**63:  # (found after every image was read: numpy's error)
        raise ValueError(f"seed must be a non-negative integer below 2**63, got {seed}")
    for name, v in (("lr", lr), ("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        # (numpy scalars are numbers: lr=np.float32(1e-3) was refused; a bool is not: lr=True ran at 1.0)
        if not (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    lr, weight_decay, grad_clip = float(lr), float(weight_decay), float(grad_clip)
    for name, v in (("time_limit", time_limit), ("cpu_time_limit", cpu_time_limit)):
        # (NaN compared False with every elapsed time: no limit at all; -1 stopped after one step)
        if v is not None and not (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                                  and v >= 0):
            raise ValueError(f"{name} must be a non-negative number of seconds or None, got {v!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    zoom_out = _check_zoom(zoom_out)  # (before the images are read: --zoom-out 1.5 failed only after that)
    if pairs_csv is not None and not Path(pairs_csv).is_file():  # (found after every image was read)
        raise FileNotFoundError(f"pairs CSV {pairs_csv}: no such file")
    if tensorboard:  # (checked when the log opened: after the earlier run's best.pt and last.pt were removed)
        if out is None:
            raise ValueError("tensorboard=True needs out= (the events go to out/tensorboard)")
        try:  # (importlib: an `import torch.utils...` here would make torch a local name of train)
            importlib.import_module("torch.utils.tensorboard")
        except ImportError as exc:
            raise RuntimeError("tensorboard=True needs the tensorboard package: pip install tensorboard") from exc
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out={str(out_dir)!r} is an existing file; out is the directory for "
                                 f"best.pt, last.pt and log.csv")
    dev = _resolve_device(device)
    if ck is not None:
        absent = [k for k in ("optimizer", "step") if k not in ck]
        if absent:
            raise ValueError(f"resume={str(resume)!r} has no training state ({', '.join(absent)}): it is a model "
                             f"checkpoint (as save_checkpoint writes), not the last.pt of a train run; resume "
                             f"takes out/last.pt")
        config = ModelConfig.from_dict(ck["config"])
        if backbone is not None and config.backbone != backbone:
            raise ValueError(f"resume={str(resume)!r} is a {config.backbone!r} checkpoint but backbone="
                             f"{backbone!r} was given; omit backbone (or give {config.backbone!r}) to "
                             f"resume it")
        for name, given in (("emb_dim", emb_dim), ("input_size", input_size), ("size_policy", size_policy),
                            ("freeze_stages", freeze_stages)):
            have = getattr(config, name)
            if given is not None and given != have:
                raise ValueError(f"resume={str(resume)!r} has {name}={have!r} but {name}={given!r} was given; "
                                 f"omit {name} to resume the checkpoint's model")
        with torch.random.fork_rng(devices=[]):  # (the initial weights, replaced below, draw from torch's RNG)
            model = DeepSSIMNet(config)
        model.load_state_dict(ck["model"], strict=True)
        if config.freeze_stages:
            model.freeze_stages()
        ck_seed = ck.get("seed")
        if seed is not None and ck_seed is not None and int(seed) != int(ck_seed):
            # (it was ignored without a word: the checkpoint's seed draws the rest of its run)
            logger.warning("seed %d given, but %s continues the run of seed %d (its pairs, augmentations and "
                           "split): seed %d is not used", int(seed), resume, int(ck_seed), int(seed))
        seed = int(ck_seed if ck_seed is not None else (42 if seed is None else seed))
    else:
        seed = 42 if seed is None else int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))  # the initial weights are part of the seeded run
            model = build_model(backbone or "convnext_base", pretrained=pretrained,
                                emb_dim=256 if emb_dim is None else emb_dim, input_size=input_size,
                                size_policy=size_policy or "fit", freeze_stages=bool(freeze_stages))
        config = model.config
    model.to(dev)

    shared = _shared_files(images, val_images)
    if shared:  # (best.pt was chosen on images the encoder trained on, without a word)
        logger.warning("%d of the val_images files are training images too (e.g. %s): their validation loss "
                       "measures images the encoder trains on, and best.pt is chosen by it; give validation "
                       "images that are not in images", len(shared), shared[0])
    skipped: list = []
    # (one warning of what the size policy loses, for the training and validation images together)
    with fit_losses_said("images"):
        pool = make_pool(images, config, policy=policy, strict=strict, skipped=skipped)
        if pool.images.shape[0] < 2:
            why = (f" ({len(skipped)} file(s) left out, e.g. {skipped[0][1]})"
                   if skipped else "")
            raise ValueError(f"train needs at least 2 images, got {pool.images.shape[0]}{why}")
        csv_pairs = read_pairs_csv(pairs_csv, pool, skipped=skipped) if pairs_csv is not None else None
        if csv_pairs is not None:
            _log_csv_ssim_agreement(pairs_csv, csv_pairs, pool)
        def _val_image_pool() -> ImagePool:
            vp = make_pool(val_images, config, policy=policy, what="val_images", strict=strict, skipped=skipped)
            if vp.images.shape[0] < 2:
                raise ValueError(f"val_images needs at least 2 images, got {vp.images.shape[0]}")
            return vp

        val_pool: ImagePool | None
        if csv_pairs is not None:
            train_pool, sampler_pairs = pool, [(i, j) for i, j, _ in csv_pairs["train"]]
            val_list = [(i, j) for i, j, _ in csv_pairs.get("val", [])] or None
            if val_list is not None and val_images is not None:
                raise ValueError(f"pairs_csv={str(pairs_csv)!r} has {len(val_list)} validation rows and val_images= "
                                 f"was given too; give one of them")
            if val_list is not None:
                val_pool = pool
            elif val_images is not None:  # a CSV without validation rows: validate on val_images' pairs
                val_pool = _val_image_pool()
            else:
                val_pool = None
                logger.warning("pairs CSV %s has no validation rows (split val/validation) and no val_images= was "
                               "given: no validation, so no best.pt; the last weights are returned", pairs_csv)
        else:
            sampler_pairs, val_list = None, None
            if val_images is not None:
                train_pool = pool
                val_pool = _val_image_pool()
            else:
                # (images without a file, arrays, by their group: the pair sampler draws neighbour pairs from a stack as
                # from a volume, and the split held out single slices beside their neighbours without a word)
                split_keys = [k if "#" in k else g for k, g in zip(pool.keys, pool.groups, strict=True)]
                tr, va = _split_train_val(pool.images.shape[0], val_fraction, seed,
                                          split_keys if val_split == "files" else None)
                # a split too small to validate (< 2 images) is no split: every image trains, none is left unused
                train_pool = pool.subset(tr) if va.size >= 2 else pool
                val_pool = pool.subset(va) if va.size >= 2 else None
                if val_pool is None and val_fraction == 0:
                    logger.info("val_fraction 0: no validation, so no best.pt; the last weights are returned")
                elif val_pool is None:
                    logger.warning("only %d validation image(s) (val_fraction %g of %d): no validation, so no "
                                   "best.pt; every image trains and the last weights are returned (give "
                                   "val_images= (--val) or more images)", va.size, val_fraction, pool.images.shape[0])
    flat = train_pool.images.reshape(train_pool.images.shape[0], -1)
    if flat.size and bool((flat.max(axis=1) == flat.min(axis=1)).all()):  # (it trained to a loss of ~0, unsaid)
        logger.warning("every training image is constant (blank): their SSIM targets are all 1 and there is "
                       "nothing to learn; check the images (a foreground threshold, a wrong file pattern)")
    if val_pool is not None:
        used = sorted({i for pair in val_list for i in pair}) if val_list else range(val_pool.images.shape[0])
        vflat = val_pool.images[list(used)].reshape(len(used), -1)
        if vflat.size and bool((vflat.max(axis=1) == vflat.min(axis=1)).all()):  # (best.pt chosen on nothing)
            logger.warning("every validation image is constant (blank): their SSIM targets are all 1, so the "
                           "validation loss measures nothing and best.pt is chosen on it; check the validation "
                           "images (val_images= / --val, the validation rows of a pairs CSV)")
    sampler = PairSampler(train_pool.images, train_pool.groups, train_pool.positions, mix=pair_mix,
                          pairs=sampler_pairs, zoom_out=zoom_out)
    aug = Augmenter(enabled=augment)
    val_set = None
    if val_pool is not None:
        n_val = len(val_list) if val_list else val_pairs
        val_set = fixed_pairs(val_pool, n_val, seed, mix=pair_mix, pairs=val_list or None, augment=augment,
                             zoom_out=zoom_out)
        vt = np.clip(val_set.targets.numpy(), HIST_EDGES[0], HIST_EDGES[-1])
        logger.info("validation: %d pairs, target histogram %s on edges %s", n_val,
                    np.histogram(vt, HIST_EDGES)[0].tolist(), np.round(HIST_EDGES, 2).tolist())

    n_train = len(sampler_pairs) if sampler_pairs is not None else train_pool.images.shape[0]
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    total = int(max_steps) if max_steps is not None else steps_per_epoch * int(epochs)
    every = int(val_every) if val_every else steps_per_epoch
    validation = "pairs_csv" if val_list is not None else "val_images" if val_images is not None else "split"
    images_digest = _images_digest(train_pool)  # (a resume on other images breaks the loss curve: warned)
    # (and one on other validation images validates on other pairs: best.pt starts again, see below)
    val_digest = None if val_pool is None else _images_digest(val_pool)
    # (and so does one on other CSV pairs, which are the training data then)
    csv_digest = None if pairs_csv is None else hashlib.sha256(Path(pairs_csv).read_bytes()).hexdigest()[:12]

    def _train_args() -> dict:
        # (what a resume compares, and `deepssim-fast train --resume` takes for the options it is not given; the
        # validation settings too: a resume with another val_fraction trained on other images, unwarned)
        return {"batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
                "lr_schedule": lr_schedule, "warmup_steps": int(warmup_steps), "total_steps": int(total),
                "pair_mix": [float(m) for m in pair_mix], "zoom_out": [float(f) for f in zoom_out],
                "validation": validation, "val_fraction": float(val_fraction), "val_pairs": int(val_pairs),
                "val_every": int(val_every) if val_every else None, "augment": bool(augment),
                # (only where the split is used: beside val_images or a pairs CSV it decides nothing to compare)
                **({"val_split": val_split} if validation == "split" else {}),
                "grad_clip": float(grad_clip), "train_images": images_digest, "pairs_csv": csv_digest,
                "val_images": val_digest}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step, best_val = 0, None
    if ck is not None:
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:  # (load_state_dict brings back the checkpoint's; this run's are given)
            g["weight_decay"] = float(weight_decay)
        step = int(ck["step"])
        best_val = ck.get("best_val")
        if val_set is None and best_val is not None:
            # its best.pt was chosen on a validation this run does not have: the last weights are returned, as
            # the warning above says (the earlier best.pt had been returned)
            logger.warning("resuming %s without validation, where its run validated: the last weights are "
                           "returned, not its best.pt", resume)
            best_val = None
        # (at the default level: the confirmation a user needs after an interruption, said with -v alone before)
        logger.warning("resumed from %s at step %d", resume, step)
        old_args, new_args = ck.get("train_args") or {}, _train_args()
        changed = _changed_train_args(old_args, new_args)
        if changed:
            logger.warning("resuming %s with other settings than its run (%s): the result will differ from "
                           "an uninterrupted run", resume, "; ".join(changed))
        # best.pt was chosen on its run's validation pairs; on other pairs its loss is no measure to beat (a
        # resume with another --val kept the old best.pt and reported the old set's loss as the best)
        val_keys = ("validation", "val_fraction", "val_split", "val_pairs", "zoom_out", "pairs_csv", "val_images")
        other_val = [k for k in val_keys if k in old_args and k in new_args
                     and (_other_images(old_args[k], new_args[k]) if k in _DIGEST_KEYS else old_args[k] != new_args[k])]
        if val_set is not None and best_val is not None and other_val:
            logger.warning("resuming %s on other validation pairs than its run's (%s): its best validation loss "
                           "%.6g is not comparable, so best.pt is replaced at this run's first validation", resume,
                           ", ".join(other_val), float(best_val))
            best_val = None
        if step >= total:
            logger.warning("resuming %s at step %d with %d steps in all: there is nothing left to train (give "
                           "--max-steps/max_steps beyond %d to train on)", resume, step, total, step)
    step_start = step
    kept = None  # (out, why) when a resume with nothing left to train leaves out as it is
    if ck is not None and out_dir is not None and step >= total:
        why = _kept_last(out_dir, resume, step)
        if why is not None:
            kept, out_dir = (out_dir, why), None  # (so no checkpoint, log.csv or best.pt is written there)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # temporary files of checkpoint writes a SIGKILL interrupted (up to a checkpoint's size each, ~350 MB
        # for convnext_base); only those 10 minutes old, as another run may be writing into the same folder
        gone = remove_temporaries(out_dir, ["best.pt", "last.pt", "log.csv"], older_than=600.0)
        if gone:
            logger.info("removed %d temporary file(s) an interrupted run left in %s", len(gone), out_dir)
        for stale in (out_dir / "best.pt", out_dir / "last.pt"):
            if ck is None and stale.is_file():
                # a new run's log.csv starts afresh below; an earlier run's checkpoints must not pass for this
                # run's: best.pt stays when this run does not validate (or stops before its first validation),
                # last.pt when it is stopped before its first checkpoint, and a resume from that last.pt would
                # continue the earlier run under this run's log rows
                logger.warning("removing %s of an earlier run in out=%s (this run starts afresh)", stale, out_dir)
                stale.unlink()
        if ck is not None:
            _check_resumed_outputs(out_dir, resume, int(ck["step"]), ck.get("best_val"),
                                   nothing_left=step >= total)
    earlier_log = None
    if resume is not None and out_dir is not None:
        here = Path(resume).parent / "log.csv"
        if here.resolve() != (out_dir / "log.csv").resolve():
            earlier_log = here
    log = _Logger(out_dir, tensorboard and out_dir is not None, resume_step=step if ck is not None else None,
                  earlier=earlier_log)
    history: list[dict] = []
    hist_counts = np.zeros(len(HIST_EDGES) - 1, dtype=np.int64)
    best_state = None
    # (with a pairs CSV the pools are one, and the line said "10 images (10 val)": the pairs are what counts)
    what = (f"{len(sampler_pairs)} CSV pairs of {train_pool.images.shape[0]} images "
            f"({0 if val_set is None else len(val_set.targets)} validation pairs)" if sampler_pairs is not None else
            f"{train_pool.images.shape[0]} images ({0 if val_pool is None else val_pool.images.shape[0]} val)")
    logger.info("training %s on %s for %d steps (%d per epoch), batch %d, device %s, SSIM targets by %s",
                config.backbone, what, total, steps_per_epoch, batch_size, dev, _ssim_engine()[1])

    def checkpoint(name: str) -> None:
        if out_dir is None:
            return
        _check_finite(model, step)
        save_checkpoint(out_dir / name, model, optimizer=opt.state_dict(), step=step, seed=int(seed),
                        best_val=best_val, epoch=step // steps_per_epoch, train_args=_train_args())

    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def make_batch(at: int) -> PairBatch:
        # every random draw of step `at` comes from (seed, at): pairs and augmentations here, torch below
        return sampler.batch(batch_size, np.random.SeedSequence([int(seed), int(at)]).spawn(2)[0], aug)

    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepssim-pairs")
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    pending = None
    try:
        with torch.random.fork_rng(devices=fork_devices):
            model.train()
            # (a time-limited run stops long before its step count: the demo's bar showed 0 % of 13000 steps and
            # an ETA of hours, then stopped; the limit is said in the bar)
            limit = "" if time_limit is None else f" (stops at {time_limit:g} s)"
            bar = tqdm(total=total, initial=step, desc=f"train {config.backbone}{limit}", unit="step",
                       disable=None if progress else True)
            pending = prefetch.submit(make_batch, step) if step < total else None
            while step < total:
                s_torch = np.random.SeedSequence([int(seed), int(step)]).spawn(2)[1]
                torch.manual_seed(int(s_torch.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
                t0 = time.perf_counter()
                pb = pending.result()
                pending = prefetch.submit(make_batch, step + 1) if step + 1 < total else None
                t1 = time.perf_counter()
                pa, pb_ = pb.a.to(dev, non_blocking=True), pb.b.to(dev, non_blocking=True)
                target = ssim_targets(pa, pb_)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t2 = time.perf_counter()
                cur_lr = _lr_at(step, lr, total, lr_schedule, warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                x = zscore_batch(torch.cat([pa, pb_])).unsqueeze(1)
                emb = model(x)
                cos = F.cosine_similarity(emb[:batch_size], emb[batch_size:], dim=1)
                loss = F.mse_loss(cos, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t3 = time.perf_counter()
                step += 1
                tnp = target.detach().cpu().numpy()
                hist_counts += np.histogram(np.clip(tnp, HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0]
                row = {"step": step, "epoch": (step - 1) // steps_per_epoch, "loss": float(loss.detach()),
                       "mae": float((cos.detach() - target).abs().mean()), "lr": cur_lr, "t_data": t1 - t0,
                       "t_target": t2 - t1, "t_model": t3 - t2, "val_loss": None, "val_mae": None,
                       "val_r": None}
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training diverged at step {step}: loss {row['loss']}; lower the "
                                             "learning rate (lr)")
                timed_out = ((time_limit is not None and time.perf_counter() - t_start >= time_limit)
                             or (cpu_time_limit is not None
                                 and time.process_time() - cpu_start >= cpu_time_limit))
                if val_set is not None and (step % every == 0 or step == total or timed_out):
                    _check_finite(model, step)  # (a diverged model failed validation with a ValueError, unnamed)
                    try:
                        ev = evaluate(model, pairs=val_set, batch_size=max(batch_size, 64))
                    except ValueError as exc:  # (a NaN embedding said "images 0..63": of the validation pairs)
                        if "NaN/Inf" in str(exc) or "all-zero" in str(exc):  # (finite weights, overflowing outputs)
                            raise FloatingPointError(f"training diverged by step {step}: at validation (its fixed "
                                                     f"pairs) {exc}; lower the learning rate (lr)") from exc
                        raise ValueError(f"validation at step {step} (its fixed pairs): {exc}") from exc
                    row.update(val_loss=ev["mse"], val_mae=ev["mae"], val_r=ev["r"])
                    if best_val is None or ev["mse"] < best_val:
                        best_val = ev["mse"]
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        checkpoint("best.pt")
                    logger.info("step %d: val mse %.5f mae %.4f r %.4f; training targets so far: "
                                "histogram %s", step, ev["mse"], ev["mae"], ev["r"], hist_counts.tolist())
                if step % steps_per_epoch == 0:
                    logger.debug("epoch %d done at step %d", step // steps_per_epoch, step)
                history.append(row)
                log.row(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", mae=f"{row['mae']:.3f}")
                bar.update(1)
                # every `every` steps (once per epoch by default) whether or not the run validates: a run
                # without validation wrote last.pt only at its end, so a killed one could not be resumed
                if step % every == 0 or row["val_loss"] is not None or step == total or timed_out:
                    checkpoint("last.pt")
                if timed_out:
                    logger.info("time limit reached at step %d (%.0f s wall, %.0f CPU-s)", step,
                                time.perf_counter() - t_start, time.process_time() - cpu_start)
                    break
            bar.close()
    finally:
        if pending is not None:
            pending.cancel()
        prefetch.shutdown(wait=True)
        log.close()
    logger.info("target histogram (all training pairs): %s on edges %s", hist_counts.tolist(),
                np.round(HIST_EDGES, 2).tolist())
    if best_state is None and best_val is not None:
        # a resumed run whose best validation came before the resume: that run's best.pt (in out, or beside
        # the resumed checkpoint when out is another folder: then copied into out, so out is complete)
        places = [out_dir] if out_dir is not None else []
        if resume is not None and all(Path(resume).parent.resolve() != p.resolve() for p in places):
            places.append(Path(resume).parent)  # (once: a resume in out named the folder twice, "in K or K")
        for folder in places:
            f = folder / "best.pt"
            if f.is_file():
                bck = read_checkpoint(f)
                if bck.get("best_val") == best_val:
                    best_state = bck["model"]
                    if out_dir is not None and folder != out_dir:
                        atomic_write_bytes(out_dir / "best.pt", f.read_bytes())
                    break
        if best_state is None:
            logger.warning("the best validation loss %.5f came before the resume, but no best.pt with it was "
                           "found (in %s): returning the last weights", best_val,
                           " or ".join(str(p) for p in places) or "no folder")
    if (resume is not None and out_dir is not None and step == step_start
            and (Path(resume).parent.resolve() != out_dir.resolve() or not (out_dir / "last.pt").is_file())):
        # a resume with nothing left to train writes no checkpoint: its last.pt is the resumed one, copied into
        # out (another folder), so out is complete and a later resume from out/last.pt continues; in the
        # checkpoint's own folder its last.pt is kept (further on when the resume was from best.pt). A last.pt
        # in out further on than the resumed checkpoint (or unreadable) is never replaced: out_dir is None then
        # (`kept`, _kept_last), as the older checkpoint overwrote the later steps' state
        atomic_write_bytes(out_dir / "last.pt", Path(resume).read_bytes())
    if kept is not None:
        logger.warning("resuming %s at step %d with %d steps in all: nothing was trained and nothing was written "
                       "in %s (its last.pt, best.pt and log.csv are left as they were), as %s", resume, step_start,
                       total, kept[0], kept[1])
    if best_state is not None:
        model.load_state_dict(best_state)
    _check_finite(model, step)
    model.eval()
    model.history = history
    model.skipped = skipped
    model.best_val = best_val
    model.steps_run = step - step_start
    return model
