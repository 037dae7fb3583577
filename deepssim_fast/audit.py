"""The memorisation audit: which generated (synthetic) samples are copies of training samples.

Pipeline (each stage resumable; see :func:`audit`)::

    discover -> decode + slice (DataLoader workers) -> per-file cache -> embed (batched, cached)
             -> search: exact top-k over every (synth, train) pair -> verify: exact SSIM of each candidate
             -> matches.csv, summary.json, histogram.png, gallery.png, report.html

Conventions
-----------
* Items are 2D slices (``mode="slices"``, cut by a :class:`~deepssim_fast.data.SlicePolicy`) or whole
  volumes (``mode="volumes"``, 3D SSIM; metrics ``ssim`` and ``correlation`` only). Every item is
  brought to one shape ``size`` by :func:`~deepssim_fast.data.center_fit` (centre crop or pad with the
  item's minimum, no resampling); ``size=None`` takes the shape of the first training item.
* An item's id is ``"<path>#<axis>:<index>"`` (slices; a 4D file's frame ``t`` has path ``<path>@t<t>``)
  or ``"<path>"`` (volumes; each frame ``t`` of a 4D file is a volume of its own, ``"<path>@t<t>"``).
  Paths are absolute, symlinks not resolved (:func:`~deepssim_fast.io.discover`); a path may itself hold
  a ``#``, so an id is split at its *last* ``#``. With ``metric="embeddings"`` a row of ``<name>.npy`` is
  ``"<name>.npy#row:<i>"``, or the id ``deepssim-fast embed`` wrote for it in ``<name>.ids.txt`` beside it
  (``<name>.ids.json``, a JSON list, where a file name holds a line break).
* Search scores (column ``cosine`` of matches.csv): ``deepssim`` and ``embeddings`` — cosine similarity of
  embeddings; ``correlation`` — Pearson correlation of the pixels (the cosine of the centred images, the
  baseline of Akbar et al.); ``ssim`` — exact SSIM, ``preset="deepssim"``. Top-k: descending, ties to
  the lower training index. Cosine scores are clamped to [-1, 1] (float32 rounding puts an identical
  image's at up to about 1 + 3e-6).
* Verification (``verify="ssim"``): exact SSIM with ``preset="deepssim"`` between the training candidate
  (first argument, whose range sets the constants) and the synthetic sample, maximised over the
  transforms asked for: flips (``verify_flips``; slices: horizontal, vertical and both — a 180° turn —,
  ``hflip``/``vflip``/``hvflip``; volumes: along each axis and each set of axes, ``flip0``..``flip2``,
  ``flip01``, ``flip02``, ``flip12``, ``flip012`` — axis 0 is left-right in RAS data, and ``flip01`` is a RAS
  volume stored as LPS), small rotations of the unflipped item and of its best flip
  (``verify_rotations`` degrees, 2D) and, for each variant, the integer shift within ``±verify_shifts``
  pixels that maximises the normalised cross-correlation over the overlap; the unchanged pair, the two
  variants of highest correlation and the search variant that gave the pair its search score are scored
  (:func:`verify_pairs`; evaluate scores the audit's pairs the same way); a shifted transform is scored with
  the uncovered band filled with the image minimum and on the overlap of the two fields of view, the better
  of the two. With ``verify_flips`` the search also queries the flipped synthetic items, so a flipped copy
  is among the candidates (a searched flip mirrors the item about the centre of its file, before the
  centre crop or pad, so that a mirrored copy of a file cropped or padded by an odd number of voxels lines
  up with its source; verification flips the fitted item and tries the ±1 shift instead); with
  ``verify_shifts = s > 0`` it also queries the items translated by s pixels along each axis and diagonal
  (8 variants in 2D, 6 axis shifts in 3D): SSIM, and so an encoder that
  reproduces it, drops fast under translation, and a copy shifted by a few pixels can otherwise rank below
  neighbouring slices. This holds for every metric with pixels: ``deepssim`` and ``correlation``, and
  ``ssim`` (with ``verify="ssim"``), whose exact search then runs once more per variant (4x the search time
  with flips in 2D, 12x with flips and shifts; 8x and 14x for volumes).
* Column ``transform`` of matches.csv: with ``verify="ssim"`` the transform of the best verified SSIM
  (``none``, ``hflip``, ``vflip+shift(1,-2)``, ...); with ``verify="none"`` and a search over transformed
  items, the one whose search score the pair kept (``none``: the item itself; ``hflip``/``vflip``/``hvflip``
  or ``flip0``..``flip012``; ``shift(dy,dx)``), on equal scores the item itself, then the variants in the
  order searched (flips, then shifts); empty when the search queried no transformed items.
* matches.csv is UTF-8 text, but a path that is not (a file named in another encoding, which Python holds
  with lone surrogates) keeps its own bytes there (``os.fsencode``), so that it still names the file (read
  it back with ``errors="surrogateescape"``); report.html and gallery.png show such bytes as U+FFFD.
* Labels use the verified SSIM (or the search score when ``verify="none"``):
  ``duplicate`` if s > high, ``similar`` if low < s <= high, ``different`` if s <= low, with
  ``thresholds=(low, high)``. A synthetic sample's label is that of its best verified candidate (the
  first of the highest score; with ``verify="none"``, the first row), which need not be the first by search
  score (``rank`` 1): a shifted copy's source can rank below a blurred look-alike and verify at SSIM 1.
  matches.csv marks that row ``decides_label`` = 1 (0 on the item's other rows), once per synthetic item:
  its rows marked 1 count as summary.json's ``counts``, and report.html's suspects and gallery.png show
  those pairs. "fraction memorised" is the fraction of synthetic samples labelled ``duplicate``.
* ``metric="correlation"``: a constant (blank) item has no Pearson correlation. It is skipped and listed
  among the skipped inputs (path and reason), as unreadable files are; ``strict=True`` aborts instead.
* summary.json's ``pair_counts_search`` and histogram.png's bars count the search score of every pair of the
  synthetic items *as given*; with flips or shifts searched, each transformed search's own pair counts are in
  ``pair_counts_search_variants`` (its histogram a line in histogram.png), and ``pair_counts_search_covers``
  says so in words. A pair's best score over the searches (matches.csv's, and with ``verify="none"`` the
  label's) is in none of them: histograms of separate searches cannot be merged into one of per-pair maxima.
* summary.json's ``warnings`` (a list, empty when none; shown near the top of report.html): the warnings
  logged that change how the results read (files of formats not read, files in both sets or twice in one,
  items mostly cropped or padded, a k above the training set, ...), each once; not those about the run
  itself (a resume, caches, the lock) nor the skipped inputs, which ``skipped`` lists. Each run collects its
  own, so a resumed run reports what an uninterrupted one does (see :func:`_collecting_warnings`).

Resuming: decoded pixels and embeddings are cached per file (``cache_dir``, default ``OUT/cache``) under a
key of path, size, mtime, ctime, inode, the reader's version (:data:`_READER_VERSION`), slice policy, item shape
and model hash (the ctime and inode catch a file replaced with its old mtime kept, as ``cp -p``, ``rsync -a`` or
``tar`` do); under ``OUT/work`` the
verification is saved per chunk of synthetic items, the exact-SSIM search (``metric="ssim"``) per chunk, and
the embedding searches (``deepssim``, ``correlation``) once each is complete (per shard on Dask). A rerun after
an interruption skips finished work (it says so in a warning) and writes byte-identical matches.csv,
histogram.png, gallery.png and report.html, and a summary.json that differs only in ``timings_s``; a rerun that
changes only the thresholds or bins searches again (the class counts and histogram depend on them) but keeps
the pixel stores and the verified SSIM; any other change of the run's configuration (options, inputs, model,
engine: the one the SSIM and search calls resolve to and, for ``deepssim``, the encoder's device) starts over,
with a warning naming what changed. summary.json is written last: a run is finished when it is there. Every
output is written atomically (temporary file, fsync, then rename). Cache entries (and the search variants'
embeddings in OUT/work) skip the fsync, as they can be recomputed: their readers check each one's length and
checksum (:func:`_read_entry`, :func:`_load_checked`), and one a crash left short or that fails its checksum is
decoded or embedded again, named in a warning. A stage file of OUT/work that cannot be read (the search, a search
or verified chunk) is computed again, named in a warning, as an unreadable state.json is.
The pixel stores (OUT/work/<set>_pixels.npy) keep a CRC-32 per item beside them (<set>_pixels.crc.npy: of its row,
seeded with its set and id), checked as each row is first read (:class:`_PixelStore`): a damaged row, or one that
is not that item's (a store swapped with the other set's, checksums and all), stops the run, naming the store and
the item, and the store is removed, so that the next run builds it again from the cache.
An OUT or cache inside an input folder is allowed: the audit's own image-named outputs (OUT/histogram.png,
OUT/gallery.png, OUT/work, the OUT/shards* folders that hold nothing but the Dask search's checkpoints, the cache's
items/ and embeddings/) are left out of the inputs, with a warning; the rest of OUT is not (it may hold the inputs,
as the demo's does). So are those of other audits' output folders found inside the input folders (a folder holding
an audit's lock file, work/state.json, or summary.json beside matches.csv), each folder named in a warning.
An OUT is an audit's when it holds one of those before the run: only there does the audit replace or remove files
of its output names, OUT/work's, and shard folders (of checkpoints only). In another folder it refuses, before any
work, to run where such files are there (:func:`_refuse_foreign_files`); a folder named shards* holding other files
is never the audit's. :func:`evaluate` holds OUT's lock too, while it reads the audit and writes evaluation.json.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import contextvars
import hashlib
import io as _io
import itertools
import json
import logging
import os
import platform
import re
import shutil
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_path, atomic_write, file_in_the_way, remove_temporaries, reserve
from ._atomic import atomic_write_bytes as _atomic_bytes
from ._ssim_common import check_bool
from .data import DataError, SlicePolicy, _is_nifti_name, center_fit, nib_load
from .io import (
    MIN_SLICE_SIDE,
    Spec,
    _file_slices,
    _file_volumes,
    _under,
    discover,
    fit_float32,
    no_slice_reason,
    npy_error,
    one_line,
    read_image,
)

logger = logging.getLogger(__name__)

METRICS = ("deepssim", "ssim", "correlation", "embeddings")
VERIFY = ("ssim", "none")
LABELS = ("different", "similar", "duplicate")
MATCHES_HEADER = (
    "synth_id",
    "synth_path",
    "synth_index",
    "train_id",
    "train_path",
    "train_index",
    "rank",
    "cosine",
    "ssim",
    "label",
    "transform",
    "synth_frame",
    "train_frame",
    "decides_label",
)
#: A temporary file in the (possibly shared) cache older than this is what a killed run left: removed.
_CACHE_TMP_AGE_S = 3600.0
# 3: volumes are flipped along every axis; 4D files give one volume per frame. 4: a flip is verified with a
# shift of up to 1 voxel along the flipped axis (the half-voxel offset of an odd centre crop/pad). 5: the ssim
# search with verify_flips / verify_shifts also searches the transformed synthetic items (as deepssim's does)
# 6: a shifted transform is also verified on the overlap of the two fields of view, and the shift is the one
# of highest normalised cross-correlation over the overlap (linear, no longer circular; see verify_pairs)
# 7: the search's flips (verify_flips) mirror each synthetic item about the centre of its file, before the
# centre crop/pad (see _fit_offset): a mirrored copy of a file cropped or padded by an odd number of voxels
# lines up with its source (a flip of the fitted item lay one voxel off it)
# 8: flips include the mirrors of several axes (2D: hvflip, a 180° rotation; 3D: flip01 (RAS against LPS),
# flip02, flip12, flip012), and rotations are verified for the unflipped image as well as the best flip
# 9: the search variant verification scores as well (verify_pairs' extra) is, when shifted, also scored on the
# overlap, as the shifts verification finds itself are (it had the filled score alone)
# (not bumped for matches.csv's last column, decides_label: it is written from the same stages, which a bump
# would discard; a rerun into an earlier audit's OUT resumes it and writes matches.csv with the column)
_FORMAT_VERSION = 9


# ----------------------------------------------------------------------------------------------------
# Engine adapters: the only places that touch the SSIM / search / model APIs.
# ----------------------------------------------------------------------------------------------------
def _ssim_pairs(x: np.ndarray, y: np.ndarray, *, spatial_dims: int, backend: str | None = None) -> np.ndarray:
    """DeepSSIM-preset SSIM per pair; x, y shaped (B, *spatial) float32 → (B,) float64."""
    try:
        from .ssim import ssim
    except ImportError:  # engine not installed in this tree: the reference has the same signature
        from .reference import ssim_reference

        return np.asarray(
            ssim_reference(x, y, spatial_dims=spatial_dims, preset="deepssim"), dtype=np.float64
        )
    return np.asarray(
        ssim(x, y, spatial_dims=spatial_dims, preset="deepssim", backend=backend), dtype=np.float64
    )


def _ssim_matrix(
    a: np.ndarray, b: np.ndarray, *, spatial_dims: int, backend: str | None = None
) -> np.ndarray:
    """(len(a), len(b)) DeepSSIM-preset SSIM, ``a`` the first argument of every pair."""
    try:
        from .ssim import ssim_matrix
    except ImportError:
        out = np.empty((len(a), len(b)), dtype=np.float32)
        for i in range(len(a)):
            x = np.broadcast_to(a[i], b.shape)
            out[i] = _ssim_pairs(np.ascontiguousarray(x), b, spatial_dims=spatial_dims)
        return out
    if spatial_dims == 3:
        # ssim_matrix infers 2D/3D from the item rank; keep it explicit for volumes.
        return np.asarray(
            ssim_matrix(a, b, spatial_dims=3, preset="deepssim", progress=False, backend=backend),
            dtype=np.float32,
        )
    return np.asarray(ssim_matrix(a, b, preset="deepssim", progress=False, backend=backend), dtype=np.float32)


@dataclass
class SearchResult:
    """Top-k of every synthetic item: scores (n_synth, k) float32 descending, indices (n_synth, k) int64,
    the histogram of all n_synth × n_train scores (counts int64 (bins,), edges float64 (bins + 1,)) and the
    pair counts per label under the thresholds. ``transforms`` (n_synth, k) str: for a search that also
    queried transformed synthetic items (:func:`_search_variants`), the transform of the synthetic item that
    gave each pair its score (``"none"``: the item itself); ``None`` when only the items themselves were
    searched, or when read from a search saved before transforms were recorded.

    ``counts`` and ``class_counts`` are those of the search of the synthetic items as given: a pair's best
    score over the transformed items cannot be had from per-search histograms. ``variant_counts``: each
    transformed search's own, in the order searched (transform name -> (histogram counts, pair counts));
    ``None`` when no transformed items were searched, or when read from a search saved before they were kept."""

    scores: np.ndarray
    indices: np.ndarray
    counts: np.ndarray
    edges: np.ndarray
    class_counts: dict[str, int]
    transforms: np.ndarray | None = None
    variant_counts: dict[str, tuple[np.ndarray, dict[str, int]]] | None = None

    def save(self, path: Path) -> None:
        cc = np.array([self.class_counts[n] for n in LABELS], dtype=np.int64)
        extra = {} if self.transforms is None else {"transforms": np.asarray(self.transforms, dtype=str)}
        if self.variant_counts:
            names = list(self.variant_counts)
            extra.update(
                variant_names=np.asarray(names, dtype=str),
                variant_counts=np.stack([np.asarray(self.variant_counts[n][0], dtype=np.int64) for n in names]),
                variant_class_counts=np.array([[self.variant_counts[n][1][c] for c in LABELS] for n in names],
                                              dtype=np.int64),
            )
        _atomic_npz(
            path,
            scores=self.scores,
            indices=self.indices,
            counts=self.counts,
            edges=self.edges,
            class_counts=cc,
            **extra,
        )

    @classmethod
    def load(cls, path: Path) -> SearchResult:
        with np.load(path) as z:
            cc = z["class_counts"]
            variants = None
            if "variant_names" in z.files:
                variants = {
                    str(n): (h, {c: int(v) for c, v in zip(LABELS, vc, strict=True)})
                    for n, h, vc in zip(z["variant_names"], z["variant_counts"], z["variant_class_counts"],
                                        strict=True)
                }
            return cls(
                z["scores"],
                z["indices"],
                z["counts"],
                z["edges"],
                {n: int(c) for n, c in zip(LABELS, cc, strict=True)},
                z["transforms"].astype(object) if "transforms" in z.files else None,
                variants,
            )


def _saved_search(f: Path, n_synth: int, k: int) -> SearchResult | None:
    """The search saved in ``f`` (OUT/work/search.npz), or None when there is none, or it is unreadable or not
    of ``n_synth`` × ``k`` candidates: then a warning names it and the search runs again (its chunks, shards
    and variant embeddings, where kept, are reused), as for an unreadable state.json."""
    if not f.exists():
        return None
    try:
        res = SearchResult.load(f)
        if res.scores.shape != (n_synth, k) or res.indices.shape != (n_synth, k):
            raise ValueError(f"{res.scores.shape} scores and {res.indices.shape} indices, expected {(n_synth, k)}")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("%s: unreadable (%s): searching again", f, one_line(f"{type(exc).__name__}: {exc}"),
                       extra=_RUN_ONLY)
        return None
    return res


def _clamp_unit(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores clamped to [-1, 1]: a cosine of unit float32 rows (a Pearson correlation, for
    ``correlation``) can come out a few 1e-6 above 1 (1.000002 for an identical image). Rows where that
    made scores equal are re-ordered: descending, ties to the lower training index."""
    clamped = np.clip(scores, -1.0, 1.0).astype(scores.dtype, copy=False)
    if np.array_equal(clamped, scores):
        return scores, indices
    order = np.lexsort((indices, -clamped), axis=1)
    return np.take_along_axis(clamped, order, 1), np.take_along_axis(indices, order, 1)


def _cosine_search(
    train: np.ndarray,
    synth: np.ndarray,
    *,
    k: int,
    thresholds: tuple[float, float],
    bins: int,
    backend: str | None,
    progress: bool,
    workers: int | None,
    scheduler: Any,
    shard_dir: Path,
) -> SearchResult:
    """Exact cosine top-k + histogram + class counts over all pairs (the all-pairs engine)."""
    if workers is not None or scheduler is not None:
        from .distributed import all_pairs_distributed

        shard_dir.mkdir(parents=True, exist_ok=True)
        r = all_pairs_distributed(
            train,
            synth,
            k=k,
            thresholds=thresholds,
            bins=bins,
            backend=backend,
            progress=progress,
            workers=workers,
            scheduler=scheduler,
            checkpoint_dir=str(shard_dir),
        )
    else:
        try:
            from .all_pairs import all_pairs
        except ImportError:
            from .reference import class_counts_reference, histogram_reference, topk_reference

            s, i = _clamp_unit(*topk_reference(train, synth, k))
            c, e = histogram_reference(train, synth, bins)
            return SearchResult(s, i, c, e, class_counts_reference(train, synth, thresholds))
        r = all_pairs(train, synth, k=k, thresholds=thresholds, bins=bins, backend=backend, progress=progress)
    counts, edges = r.histogram
    scores, indices = _clamp_unit(np.asarray(r.scores, dtype=np.float32), np.asarray(r.indices, dtype=np.int64))
    return SearchResult(
        scores,
        indices,
        np.asarray(counts, dtype=np.int64),
        np.asarray(edges, dtype=np.float64),
        {n: int(r.class_counts[n]) for n in LABELS},
    )


def _load_model(model: Any) -> tuple[Any, str | None, str]:
    """(module, path or None, hash). ``model``: a path (project checkpoint or TorchScript) or a module."""
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not p.exists():
            raise FileNotFoundError(f"model file {p} does not exist")
        from .model import load_model

        return load_model(str(p)), str(p.resolve()), _file_sha256(p)
    return model, None, _module_hash(model)


def _module_hash(module: Any) -> str:
    """sha256 over the module's class, its settings (``config``: input size and size policy, which change
    what :func:`~deepssim_fast.model.embed` feeds it) and its parameter names, shapes and bytes (stable across
    processes)."""
    for attr in ("model_hash", "hash"):
        v = getattr(module, attr, None)
        if isinstance(v, str):
            return v
    import torch

    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    cfg = getattr(module, "config", None)
    if callable(getattr(cfg, "to_dict", None)):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _embed(images: Sequence[np.ndarray], model: Any, *, batch_size: int, device: Any) -> np.ndarray:
    """:func:`~deepssim_fast.model.embed` of ``images``, without its warning of the images the model's size
    policy crops or pads past half: each call (a batch of files, a block of flipped or shifted items) said it
    with its own count ("5 of 5 images"), and a run whose embeddings were cached did not say it at all. The
    audit says it once, of all its items (:func:`_warn_encoder_fit`)."""
    from .model import embed, fit_losses_said

    with fit_losses_said("items", say=False):
        return np.asarray(
            embed(list(images), model, batch_size=batch_size, device=device, progress=False), dtype=np.float32
        )


def _warn_encoder_fit(model: Any, size: Sequence[int], n: int) -> None:
    """Warn (into summary.json's warnings) when the encoder's size policy crops the audit's ``n`` items, all of
    ``size``, to less than half their pixels, or pads them to more than half padding, at its input size. Decided
    from the size and the model's settings, not from what is embedded, so that a resumed run (its embeddings
    cached) says it as a fresh one does; the flipped and shifted items searched have the same size, so it
    covers them too."""
    from .model import fit_loss_warnings

    for text in fit_loss_warnings(size, n, model.config, "items"):
        logger.warning("%s", text)


# ----------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------
def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_bytes(path, buf.getvalue())


def _atomic_json(path: Path, obj: Any) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---- the item cache: one entry per input file -------------------------------------------------------------
# <cache>/items/<file key>_<item size>.items holds a file's items: b"DSFITEMS", the length of a JSON header
# (uint64, little-endian), the header {"ids", "indices", "shape", "crc32"}, then the pixels (float32,
# little-endian, C order). Entries can always be decoded again, so they are written without fsync; their
# readers check the length (an entry a crash left empty or short) and, with the pixels, the CRC-32. A damaged
# entry found before the run uses it is decoded again. (Entries were .npz: a zip directory and three npy
# headers to parse per read, and an fsync per write; at 10^5 small files that was most of decoding.)
_ENTRY_MAGIC = b"DSFITEMS"
_ENTRY_SUFFIX = ".items"


class _DamagedEntry(ValueError):
    """An item cache entry, or a checksummed array (:func:`_load_checked`), that is not whole (short,
    unreadable, or its data fail their checksum)."""


class _NoChecksum(_DamagedEntry):
    """A whole .npy without the checksum :func:`_save_checked` appends: written before checksums were kept (or
    by someone else). Not to be trusted, nor an error: computed again, once."""


# ---- checksummed arrays: the cached embeddings and the search variants' embeddings ----------------------------
# <cache>/embeddings/*.npy and OUT/work/<set>_vectors_<variant>.npy are written without fsync (they can always be
# embedded again): the array as np.save writes it (C order), then _CRC_TRAILER and the CRC-32 of the array's
# bytes (uint32, little-endian). np.load reads such a file as the plain array (it stops where the data end);
# _load_checked checks the length and the checksum. A file flipped in place still loaded, and its other values
# gave other matches without a word (zeros: "train row 4 is all zeros", naming neither the file nor the image).
_CRC_TRAILER = b"DSFCRC32"


def _save_checked(path: Path, a: np.ndarray, *, durable: bool) -> None:
    """Write ``a`` to ``path`` atomically as a .npy followed by its checksum (see :data:`_CRC_TRAILER`)."""
    a = np.ascontiguousarray(a)
    buf = _io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    buf.write(_CRC_TRAILER + struct.pack("<I", zlib.crc32(a)))
    _atomic_bytes(path, buf.getvalue(), durable=durable)


def _load_checked(path: Path) -> np.ndarray:
    """The array :func:`_save_checked` wrote to ``path``. FileNotFoundError when there is no such file;
    :class:`_NoChecksum` for a whole .npy without the checksum; :class:`_DamagedEntry` (naming ``path``) for a
    file that is unreadable, not as long as its header and checksum say, or whose data fail their checksum."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
            if dtype.hasobject:
                raise ValueError(f"dtype {dtype}")
            start, size = f.tell(), os.fstat(f.fileno()).st_size
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if size == start + nbytes:
                raise _NoChecksum(f"{path}: no checksum (written by an earlier version)")
            if size != start + nbytes + len(_CRC_TRAILER) + 4:
                raise _DamagedEntry(f"{path}: {size} bytes, its header says {start + nbytes + len(_CRC_TRAILER) + 4}")
            raw = f.read(nbytes)
            tail = f.read(len(_CRC_TRAILER) + 4)
    except FileNotFoundError:
        raise
    except _DamagedEntry:
        raise
    except (OSError, ValueError, EOFError, struct.error) as exc:
        raise _DamagedEntry(f"{path}: unreadable ({type(exc).__name__}: {one_line(exc)})") from exc
    if len(raw) != nbytes or tail[: len(_CRC_TRAILER)] != _CRC_TRAILER \
            or struct.unpack("<I", tail[len(_CRC_TRAILER):])[0] != zlib.crc32(raw):
        raise _DamagedEntry(f"{path}: fails its checksum")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _entry_path(cache: Path, key: str, size: tuple[int, ...]) -> Path:
    return cache / "items" / f"{key}_{'x'.join(map(str, size))}{_ENTRY_SUFFIX}"


def _write_entry(path: Path, ids: Sequence[str], indices: Sequence[int], pixels: np.ndarray,
                 fit: Sequence[Sequence[int]] | None = None,
                 shapes: Sequence[Sequence[int]] | None = None, axcodes: str | None = None) -> dict:
    """Write an item cache entry: ``pixels`` (n, *size), and per item its ids, indices, ``fit``
    (:func:`_fit_offset` of the item before it was fitted to the size) and ``shapes`` (its shape before the
    fit, for the warning about items mostly cropped or padded); an entry without ``fit`` or ``shapes`` is
    decoded again by :func:`_decode_all`. The header also lists the positions of the items that are constant
    (``constant``: for the warning about blank items, which a resume gives without reading the pixels) and
    the file's orientation (``axcodes``, :func:`_nifti_axcodes`: for the warning about files stored in other
    orientations); an entry without either is decoded again too. Returns the header (less its length)."""
    px = np.ascontiguousarray(pixels, dtype="<f4")
    head = {"ids": list(ids), "indices": [int(i) for i in indices], "shape": list(px.shape),
            "crc32": zlib.crc32(px), "constant": [int(q) for q in np.flatnonzero(_constant_items(px))]}
    if axcodes is not None:
        head["axcodes"] = axcodes
    if fit is not None:
        head["fit"] = [[int(v) for v in r] for r in fit]
    if shapes is not None:
        head["shapes"] = [[int(v) for v in r] for r in shapes]
    raw = json.dumps(head, separators=(",", ":")).encode()

    def write(f: Any) -> None:
        f.write(_ENTRY_MAGIC + struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(px.data)

    atomic_write(path, write, durable=False)
    return head


def _read_entry(path: Path, *, pixels: bool) -> tuple[dict, np.ndarray | None]:
    """An item cache entry's header and, with ``pixels``, its pixels ((n, *size) float32), in one open.
    :class:`_DamagedEntry` unless the file is as long as its header says and (with ``pixels``) the pixels
    match their CRC-32."""
    try:
        with open(path, "rb") as f:
            lead = f.read(16)
            if len(lead) != 16 or lead[:8] != _ENTRY_MAGIC:
                raise _DamagedEntry(f"{path}: not an item cache entry (length {len(lead)}, no header)")
            (n,) = struct.unpack("<Q", lead[8:])
            head = json.loads(f.read(min(n, 1 << 31)))
            shape = tuple(int(v) for v in head["shape"])
            if len(head["ids"]) != len(head["indices"]) or len(head["ids"]) != shape[0]:
                raise _DamagedEntry(f"{path}: header lists {len(head['ids'])} ids for shape {shape}")
            if "fit" in head and np.shape(head["fit"]) != (shape[0], len(shape) - 1):
                raise _DamagedEntry(f"{path}: header's fit offsets {np.shape(head['fit'])} for shape {shape}")
            if "constant" in head and not all(isinstance(q, int) and 0 <= q < shape[0] for q in head["constant"]):
                raise _DamagedEntry(f"{path}: header's constant items {head['constant']} for shape {shape}")
            size, need = os.fstat(f.fileno()).st_size, 16 + n + 4 * int(np.prod(shape))
            if size != need:
                raise _DamagedEntry(f"{path}: item cache entry of {size} bytes, its header needs {need}")
            if not pixels:
                return head, None
            px = np.empty(shape, dtype="<f4")
            got = f.readinto(px.data.cast("B"))
    except _DamagedEntry:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as exc:
        raise _DamagedEntry(f"{path}: unreadable item cache entry ({type(exc).__name__}: {exc})") from exc
    if got != px.nbytes or zlib.crc32(px) != head["crc32"]:
        raise _DamagedEntry(f"{path}: item cache entry fails its checksum")
    return head, px


def _entry_header(path: Path) -> dict:
    return _read_entry(path, pixels=False)[0]


def _entry_pixels(path: Path) -> np.ndarray:
    return _read_entry(path, pixels=True)[1]


def _legacy_cache() -> tuple[tuple[str, str, str, str], ...]:
    """Cache files of earlier versions, which this version never reads: (folder, glob, full-name pattern,
    what they are)."""
    return (
        ("items", "*.npz", r"[0-9a-f]{32}_\d+(x\d+)+\.npz", "item cache entries"),  # ~26 GB at 10^5 of 256^2
        # embeddings of an earlier preprocessing (no _p<version>, or another one)
        ("embeddings", "*.npy",
         r"[0-9a-f]{32}_\d+(x\d+)+_[0-9a-f]{24}(_p(?!" + str(_preprocess_version()) + r"\.npy)\d+)?\.npy",
         "cached embeddings"),
    )


def _preprocess_version() -> int:
    """:data:`deepssim_fast.model.PREPROCESS_VERSION` (imported when asked: the model module imports torch)."""
    from .model import PREPROCESS_VERSION

    return PREPROCESS_VERSION


def _remove_legacy_entries(cache: Path) -> list[Path]:
    """Delete the cache files of earlier versions under ``cache`` (:func:`_legacy_cache`) untouched for over
    an hour (a cache shared with an older audit still running keeps that one's)."""
    gone = []
    cutoff = time.time() - _CACHE_TMP_AGE_S
    for sub, pattern, name, what in _legacy_cache():
        folder, n = cache / sub, 0
        if not folder.is_dir():
            continue
        for f in folder.glob(pattern):
            try:
                if not re.fullmatch(name, f.name) or f.stat().st_mtime > cutoff:
                    continue
            except OSError:
                continue
            f.unlink(missing_ok=True)
            gone.append(f)
            n += 1
        if n:
            logger.info("removed %d %s of an earlier version from %s", n, what, folder)
    return gone


def _entry_or_fail(read: Callable[[Path], Any], path: Path) -> Any:
    """``read(path)``; a damaged entry met after decoding (a file changed under a running audit, or a disk
    error) is removed and named, so that running the audit again decodes its file anew."""
    try:
        return read(path)
    except _DamagedEntry as exc:
        path.unlink(missing_ok=True)
        raise RuntimeError(f"{exc}; the entry was removed: run the audit again to decode that file anew") from exc


def label_of(score: float | np.ndarray, thresholds: tuple[float, float]) -> np.ndarray:
    """Label index per score: 0 different (s <= low), 1 similar (low < s <= high), 2 duplicate (s > high)."""
    low, high = thresholds
    s = np.asarray(score, dtype=np.float64)
    return np.where(s > high, 2, np.where(s > low, 1, 0)).astype(np.int64)


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, float]:
    t = tuple(float(v) for v in thresholds)
    if len(t) != 2 or not all(np.isfinite(t)) or not -1.0 <= t[0] < t[1] <= 1.0:
        raise ValueError(
            f"thresholds must be two numbers with -1 <= low < high <= 1, got {tuple(thresholds)}"
        )
    return t  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# Items: decoding, the per-file cache, the pixel store
# ----------------------------------------------------------------------------------------------------
@dataclass
class ItemSet:
    """The items of one side (train or synth): ids, paths, indices and the pixel store (n, *size) float32."""

    name: str
    ids: list[str]
    paths: list[str]
    indices: list[int]
    pixels: _PixelStore | None  # memory-mapped (n, *size) float32, rows checked as read; None for "embeddings"
    vectors: np.ndarray | None = None  # (n, d) float32 search vectors
    n_files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # where the pixels come from until they are stored (_build_items -> _write_pixels): the per-file cache
    # entries with the mask of items kept, and the item size
    sources: list[tuple[Path, np.ndarray]] = field(default_factory=list)
    size: tuple[int, ...] = ()
    # (n, ndim) int8: each item's :func:`_fit_offset` (None: not known, as for audits before format 7)
    fit: np.ndarray | None = None
    # (n,) bool: the items that are constant (blank) after the fit to the item size (None: not known)
    constant: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


#: The version of the rules by which deepssim_fast.io (and data) decode a file into items: part of every file's
#: cache key (:func:`_file_key`), so that the item cache entries, their embeddings and a saved run of an earlier
#: reader are not reused (after an upgrade, files the new reader refuses, such as an RGB (H, W, 3) .npy, were
#: still audited from their old entries). Bump it whenever a change of io's reading, slicing or fitting rules
#: can change the items a file gives, or whether it gives any. (Entries of an earlier reader are not read again;
#: they stay in the cache until it is cleared.)
_READER_VERSION = 4  # 2: float64 / 32-64-bit integer / intercept-scaled files read in float64 (io.fit_float32);
#                      3: 64-bit integer files past 2^53 lose their minimum in integer arithmetic first;
#                      4: NIfTI intercepts are seen (nibabel keeps them on the data, not the header), and 64-bit
#                         integer NIfTI files read as .npy files do (8e9060b, f8fc25c); grey stored as colour
#                         reads as the grey (c4c4456)


def _file_key(p: Path, *parts: str) -> str:
    """Cache key of one input file: its path, size, mtime, ctime and inode, the reader's version
    (:data:`_READER_VERSION`), and ``parts``.

    The mtime alone misses a file whose content was replaced with its old mtime kept (``cp -p``, ``rsync -a``,
    ``tar x``, ``os.utime``): the ctime, which no user call can set back, and the inode (a file moved over
    it) change then."""
    try:
        st = p.stat()
        ident = [str(st.st_size), str(st.st_mtime_ns), str(st.st_ctime_ns), str(st.st_ino)]
    except OSError:  # a broken symlink (or a file gone since discovery): decoding reports it as unreadable
        ident = ["missing", ""]
    raw = "|".join([str(p), *ident, f"reader{_READER_VERSION}", *parts])
    return hashlib.sha256(os.fsencode(raw)).hexdigest()[:32]


def _decode_file(p: Path, mode: str, policy: SlicePolicy) -> tuple[list[str], list[int], list[np.ndarray]]:
    """Items of one file: (ids, indices, arrays). Raises DataError for unreadable files.

    mode='volumes': one item per 3D volume; a 4D file gives one per frame (id ``<path>@t<t>``, index t)."""
    if mode == "volumes":
        vols = _file_volumes(p)
        for src, a in vols:
            if a.ndim != 3:
                raise DataError(f"{p}: mode='volumes' needs 3D images, got shape {a.shape}")
            if min(a.shape) < _SSIM_WINDOW:
                # a batch of volumes saved as one (N, D, H, W) array was read as D-long series of (N, D, H) "frames"
                # and its exact copies scored -0.03, without a word (slices mode refuses such a file)
                axis = int(np.argmin(a.shape))
                batch = ("; a batch of volumes saved as one array, (N, D, H, W), is read as a series of frames "
                         "along its last axis: save one volume per file") if src != str(p) else ""
                raise DataError(f"{p}: a volume of shape {tuple(a.shape)} is thinner than the {_SSIM_WINDOW}-voxel "
                                f"SSIM window along axis {axis}{batch} (2D images are audited in slices mode)")
        return [src for src, _ in vols], list(range(len(vols))), [a for _, a in vols]
    slices = _file_slices(p, policy)
    small = next((s for s in slices if min(s.array.shape) < _SSIM_WINDOW), None)
    if small is not None:  # (a 2D image: a volume's slices were checked as it was cut)
        # it was padded to the item size and audited (or, read first, set an item size that stopped the audit)
        raise DataError(f"{p}: an image of {small.array.shape[0]} x {small.array.shape[1]} pixels, smaller than the "
                        f"{_SSIM_WINDOW}-pixel SSIM window (each side must be at least {_SSIM_WINDOW})")
    return [s.key for s in slices], [s.index for s in slices], [s.array for s in slices]


def _warn_shared_files(train_paths: Sequence[Path], synth_paths: Sequence[Path]) -> None:
    """Warn when files (the same file, by path or through links) are in both sets: each is compared with
    itself and reported as a duplicate of itself, which counts in the fraction memorised; and when one set
    holds the same file under two paths."""
    real = {}  # each set's paths, resolved (once: 10^5 files)
    for name, paths in (("training", train_paths), ("synthetic", synth_paths)):
        # one file reached through two paths (a folder and a link to it; a file and a link to it) is two items
        # of its set: a synthetic one counts twice in the fraction memorised, without a word before
        real[name] = [os.path.realpath(q) for q in paths]
        first: dict[str, Path] = {}
        twice = []
        for q, r in zip(paths, real[name], strict=True):
            if r in first:
                twice.append((first[r], q))
            else:
                first[r] = q
        if twice:
            eg = "; ".join(f"{a} = {b}" for a, b in twice[:3])
            eg += f"; and {len(twice) - 3} more" if len(twice) > 3 else ""
            logger.warning("%d %s file(s) are found twice, under two paths (%s): each path is audited as an item "
                           "of its own; give each file once", len(twice), name, eg)
    train_real = set(real["training"])
    shared = [q for q, r in zip(synth_paths, real["synthetic"], strict=True) if r in train_real]
    if shared:
        names = ", ".join(str(q) for q in shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        logger.warning(
            "%d synthetic file(s) are also training files (%s): each will match itself as a duplicate; "
            "check --train and --synth", len(shared), names,
        )


_AXIS_PAIR = {c: i for i, pair in enumerate(("LR", "PA", "IS")) for c in pair}


def _warn_orientations(sets: Sequence[tuple[str, Sequence[Path], Sequence[Path | None], dict[Path, dict]]],
                       verify_flips: bool) -> None:
    """Warn (into summary.json's warnings) when the NIfTI inputs are stored in more than one orientation
    (their affines' axis codes, kept in the cache entries' headers, so that a resume says it too): voxels are
    compared as stored, so a copy saved in another orientation (an LPS copy of an RAS scan, as DICOM
    converters write) is a mirrored, or transposed, image of its source, and scored as one: an LPS copy of an
    RAS volume of the MNI template was not even matched with its source, and was labelled "different" (SSIM
    0.18 against another scan) without a word. ``sets``: ``(name, paths, entries, heads)`` per set, as
    :func:`_decode_all` returns them."""
    found: dict[str, dict[str, list]] = {}  # set -> axis codes -> [files, first file]
    for name, paths, entries, heads in sets:
        for p, f in zip(paths, entries, strict=True):
            code = heads[f].get("axcodes", "") if f is not None and f in heads else ""
            if code:
                found.setdefault(name, {}).setdefault(code, [0, p])[0] += 1
    codes = {c for per in found.values() for c in per}
    if len(codes) < 2:
        return
    said = "; ".join(f"{name}: " + ", ".join(f"{c} {n} (e.g. {eg})" for c, (n, eg) in per.items())
                     for name, per in found.items())
    # codes whose axes come in the same order (each array axis along the same body axis) differ by mirrors only
    orders = {tuple(_AXIS_PAIR.get(c, -1) for c in code) for code in codes}
    if len(orders) == 1 and -1 not in next(iter(orders)):
        fix = ("they differ by mirrors, which --verify-flips searches" + (" (on)" if verify_flips else
               ": give --verify-flips, or reorient the files to one orientation first (e.g. "
               "nibabel.as_closest_canonical)"))
    else:
        fix = ("their array axes run along other body axes (or an affine gives none), which --verify-flips does "
               "not search: reorient the files to one orientation first (e.g. nibabel.as_closest_canonical)")
    logger.warning("the NIfTI inputs are stored in %d orientations (%s): voxels are compared as stored (the "
                   "affine is not used), so a copy saved in another orientation is a mirrored or transposed image "
                   "of its source and scores as one; %s", len(codes), one_line(said), fix)


def _fit_offset(shape: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """Per axis, where the centre of an item of ``shape`` lies after ``center_fit`` to ``size``, relative to
    the centre of the fitted item: 0 when the crop or pad is even, else half a voxel, recorded as +1 for an
    odd crop (the item's centre lies half a voxel towards higher indices) and -1 for an odd pad (towards
    lower indices).

    A flip mirrors the fitted item about its own centre. A file mirrored before fitting (a mirrored copy of
    a training file of the same shape) lies one voxel off that, along each flipped axis with an odd offset:
    :func:`_flip_item` moves the flip by this offset, so it mirrors about the file's centre."""
    return tuple(0 if (n - m) % 2 == 0 else (1 if n > m else -1) for n, m in zip(shape, size, strict=True))


class _DecodeDataset:
    """Map-style dataset over files for a torch DataLoader: item = (position, ids, indices, arrays, error)."""

    def __init__(self, paths: Sequence[Path], mode: str, policy: SlicePolicy) -> None:
        self.paths, self.mode, self.policy = list(paths), mode, policy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, list[str], list[int], list[np.ndarray], str, str | None]:
        try:
            ids, idx, arrs = _decode_file(self.paths[i], self.mode, self.policy)
            return i, ids, idx, arrs, _nifti_axcodes(self.paths[i]), None
        except DataError as exc:
            return i, [], [], [], "", str(exc)
        except Exception as exc:  # noqa: BLE001 - anything else a decoder throws is still "unreadable"
            return i, [], [], [], "", f"{self.paths[i]}: {type(exc).__name__}: {exc}"


def _nifti_axcodes(p: Path) -> str:
    """The orientation of a NIfTI file's voxel axes, from its affine (nibabel's ``aff2axcodes``: ``"RAS"``
    when array axis 0 runs to the subject's Right, 1 to Anterior, 2 to Superior; ``?`` for an axis the
    affine leaves undefined); ``""`` for other files. Only :func:`_warn_orientations` reads it: voxels are
    compared as stored."""
    if not _is_nifti_name(p):
        return ""
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(nib_load(p).affine)
    except Exception:  # noqa: BLE001 - a header nibabel cannot orient: no orientation to compare
        return "?"
    return "".join(c if c else "?" for c in codes)


def _identity(x: Any) -> Any:
    return x


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader worker_init_fn: decode workers ignore SIGINT. Ctrl-C reaches the whole process group; a
    worker that took it left its loop with decoded items still queued and then blocked flushing them, so the
    main process, raising KeyboardInterrupt, waited torch's 5 s join timeout for each before killing it.
    Ignoring it, they stop when the main process shuts them down (or dies: their watchdog), within an item."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (likewise: a process-group SIGTERM printed torch's "worker killed")


def _decode_all(
    name: str,
    paths: Sequence[Path],
    *,
    mode: str,
    policy: SlicePolicy,
    size: tuple[int, ...] | None,
    cache: Path,
    strict: bool,
    workers: int,
    progress: bool,
) -> tuple[list[Path | None], tuple[int, ...] | None, list[tuple[str, str]], dict[Path, dict]]:
    """Decode every file (or take it from the cache); return per-file cache paths (None: skipped), the item
    size, the skipped files, and each entry's ids and indices (its header: read or written here, so that
    :func:`_build_items` need not read it again)."""
    import torch.utils.data as tud
    from tqdm import tqdm

    token = policy.token() if mode == "slices" else "volumes:frames"
    entries: list[Path | None] = [None] * len(paths)
    heads: dict[Path, dict] = {}
    skipped: list[tuple[str, str]] = []
    misfit: list[tuple[str, tuple[int, ...]]] = []
    todo: list[int] = []
    keys: list[str] = []
    pending_size = size
    for i, p in enumerate(paths):
        keys.append(_file_key(p, token))
        if pending_size is not None:
            f = _entry_path(cache, keys[i], pending_size)
            if f.exists():
                try:
                    head = _entry_header(f)
                    if "fit" in head and "shapes" in head and "constant" in head and "axcodes" in head:
                        heads[f] = head
                        entries[i] = f
                        misfit += _misfits(p, head["shapes"], pending_size)
                        continue
                    # (written before format 7, without the items' fit offsets, or before their shapes,
                    # constant items or the file's orientation were kept: decoded again, once)
                    logger.debug("decoding %s again: its cache entry %s has no fit offsets, shapes, constant "
                                 "items or orientation", p, f)
                except _DamagedEntry as exc:
                    logger.warning("decoding %s again: %s", p, exc, extra=_RUN_ONLY)
                    f.unlink(missing_ok=True)
        todo.append(i)
    if todo:
        ds = _DecodeDataset([paths[i] for i in todo], mode, policy)
        loader = tud.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                                worker_init_fn=_ignore_sigint if workers else None)
        bar = tqdm(loader, total=len(todo), desc=f"decode {name}", disable=None if progress else True)
        for j, ids, idx, arrs, axcodes, err in bar:
            i = todo[j]
            p = paths[i]
            if err is not None:
                if strict:
                    raise DataError(err)
                skipped.append((str(p), err))
                _say_skipped(skipped, "skipping %s file %s", name, one_line(err))
                continue
            if not arrs:
                reason = no_slice_reason(p, policy)
                skipped.append((str(p), reason))
                _say_skipped(skipped, "skipping %s file %s", name, reason)
                continue
            if pending_size is None:
                pending_size = tuple(arrs[0].shape)
                logger.info("item size taken from the first %s item: %s", name, pending_size)
            if len(pending_size) != arrs[0].ndim:
                raise ValueError(
                    f"{p}: item of shape {arrs[0].shape} does not match the item size {pending_size}"
                )
            shapes = [tuple(int(n) for n in a.shape) for a in arrs]
            misfit += _misfits(p, shapes, pending_size)
            stack = np.stack([center_fit(a, pending_size) for a in arrs]).astype(np.float32)
            fits = [_fit_offset(a.shape, pending_size) for a in arrs]
            f = _entry_path(cache, keys[i], pending_size)
            heads[f] = _write_entry(f, ids, idx, stack, fits, shapes, axcodes)
            entries[i] = f
    if misfit:
        # (a 40 x 48 x 40 volume fitted to a 128 x 128 x 10 first training item was 94 % padding, and two
        # unrelated brain regions scored 0.85, a duplicate: the fit is documented, but not its extent)
        logger.warning("%d %s item(s), e.g. %s of shape %s, lose more than half their %s or are more than "
                       "half padding at the item size %s (centre crop or pad, no resampling): scores of such items "
                       "mostly compare the padding; give --size, or audit collections of one shape", len(misfit),
                       name, misfit[0][0], misfit[0][1], "pixels" if mode == "slices" else "voxels",
                       tuple(pending_size))
    return entries, pending_size, skipped, heads


def _misfits(p: Path, shapes: Sequence[Sequence[int]], size: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` of the items of file ``p`` that the centre fit to ``size`` crops to less than half
    their voxels, or pads to more than half padding. Checked from the cache entry's shapes as well as on
    decoding: a rerun, or a file also in the other set (decoded once), lost the warning before."""
    out = []
    for shp in shapes:
        common = float(np.prod([min(x, y) for x, y in zip(shp, size, strict=True)]))
        if common < 0.5 * float(np.prod(shp)) or common < 0.5 * float(np.prod(size)):
            out.append((str(p), tuple(int(n) for n in shp)))
    return out


def _first_item_shape(
    paths: Sequence[Path], *, mode: str, policy: SlicePolicy
) -> tuple[tuple[int, ...], str] | tuple[None, None]:
    """Shape and id of the first readable item of the first readable file (the default item size), or
    ``(None, None)``."""
    for p in paths:
        try:
            ids, _, arrs = _decode_file(p, mode, policy)
        except DataError:
            continue  # reported (or raised, when strict) by the decoding pass
        if arrs:
            logger.info("item size taken from the first training item (%s): %s", p, arrs[0].shape)
            return tuple(int(n) for n in arrs[0].shape), ids[0]
    return None, None


#: Voxels of each side's images that verification stacks for one SSIM call (2^25: 128 MB of float32, about
#: four MNI-sized volumes): volumes are verified a few pairs at a time, a chunk of 2D slices in one call.
_VERIFY_VOXELS = 1 << 25
#: Voxels of the float64 rows the correlation metric centres and normalises at once (2^24: 128 MB, one or
#: two MNI-sized volumes; a chunk of 256 2D slices of up to 256 × 256 pixels, as before).
_ROW_VOXELS = 1 << 24
_SSIM_WINDOW = MIN_SLICE_SIDE  # the window of preset "deepssim" (scikit-image's default 7-wide uniform window)


def _check_item_size(fit: tuple[int, ...], origin: str, *, mode: str) -> None:
    """ValueError unless every side of the item size ``fit`` is at least the SSIM window, naming where the
    size came from (``origin``) and what to change: exact SSIM (the ssim metric, verification) is not defined
    on a smaller item, and a 2D image saved with a leading channel axis, (1, H, W), is cut along axis 2 into
    1-pixel-high slices."""
    if min(fit) >= _SSIM_WINDOW:
        return
    if origin == "the size asked for":  # (the hint told a user who had given --size 5 5 to give --size)
        raise ValueError(f"size {fit} (--size) is smaller than the {_SSIM_WINDOW}-pixel SSIM window on some side, "
                         f"and this audit computes exact SSIM (metric 'ssim' or verify='ssim'); give every side "
                         f"at least {_SSIM_WINDOW}")
    hint = (
        "give --size (size=), or cut the volumes along another --axis (axis=): a 2D image stored in a NIfTI "
        "file as (1, H, W) is cut along the default axis 2 into W slices of shape (1, H); --axis 0 gives the "
        "one (H, W) slice (a .npy of that shape is the image itself)"
        if mode == "slices"
        else "give --size (size=)"
    )
    raise ValueError(
        f"item size {fit} ({origin}) is smaller than the {_SSIM_WINDOW}-pixel SSIM window on some side, and "
        f"this audit computes exact SSIM (metric 'ssim' or verify='ssim'); {hint}"
    )


def _item_path(item_id: str, mode: str) -> str:
    """The path part of an item id: slices ``<path>#<axis>:<index>`` (split at the last ``#``: a path may
    hold one), volumes ``<path>`` itself. A frame of a 4D file keeps its ``@t<t>``."""
    return item_id.rsplit("#", 1)[0] if mode == "slices" else item_id


def _file_and_frame(path: str) -> tuple[str, str]:
    """An item's path as matches.csv writes it: the file, and the frame of a 4D file's frame (``<path>@t<t>``,
    where no file of that name exists) or "" — its ``*_path`` columns held ``file.nii.gz@t1``, which is no file
    (a script that opened or moved the flagged files failed on every frame of a 4D file)."""
    f = re.fullmatch(r"(.*)@t(\d+)", path, flags=re.S)
    if f is not None and not os.path.exists(path):
        return f.group(1), f.group(2)
    return path, ""


def _constant_items(pixels: np.ndarray) -> np.ndarray:
    """(n,) bool: items whose pixels are all equal (exactly: no centring round-off involved)."""
    flat = pixels.reshape(len(pixels), -1)
    return flat.max(axis=1) == flat.min(axis=1)


def _build_items(
    name: str,
    paths: Sequence[Path],
    entries: Sequence[Path | None],
    size: tuple[int, ...],
    work: Path,
    skipped: list[tuple[str, str]],
    *,
    heads: dict[Path, dict] | None = None,
    mode: str = "slices",
    drop_constant: bool = False,
    strict: bool = False,
) -> ItemSet:
    """The items of one side from the cached per-file items, without their pixels: ``pixels`` is None until
    :func:`_write_pixels` concatenates them into the store OUT/work/<name>_pixels.npy, which the audit does
    only after :func:`_stage_state` (a store rewritten before it would sit beside the previous run's
    summary.json and state if the run were killed in between, and evaluate would read the new pixels under
    the old ids).

    ``drop_constant`` (metric correlation): constant items are left out and added to ``skipped`` as
    ``(file path, reason)``, or, with ``strict``, raise :class:`DataError`; otherwise they are kept and marked
    in ``constant`` (from the entries' headers: :func:`_warn_constant_items`). ``heads``: the entries' headers
    as :func:`_decode_all` returns them (an entry missing there is read).
    """
    skipped = list(skipped)
    metas = []
    n = 0
    for p, e in zip(paths, entries, strict=True):
        if e is None:
            continue
        if drop_constant or heads is None or e not in heads:
            head, px = _entry_or_fail(functools.partial(_read_entry, pixels=drop_constant), e)
        else:
            head = heads[e]
        ids, idx = [str(s) for s in head["ids"]], [int(v) for v in head["indices"]]
        if drop_constant:
            blank = _constant_items(px)
        elif "constant" in head:
            blank = np.zeros(len(ids), dtype=bool)
            blank[np.asarray(head["constant"], dtype=np.int64)] = True
        else:  # (an entry written before its header listed them: from its pixels)
            blank = _constant_items(_entry_or_fail(_entry_pixels, e))
        keep = ~blank if drop_constant else np.ones(len(ids), dtype=bool)
        for q in np.flatnonzero(~keep):
            value = float(px[q].flat[0])
            reason = (
                f"{ids[q]}: constant image (every pixel {value:g}); its Pearson correlation is "
                "undefined, so metric 'correlation' cannot score it"
            )
            if strict:
                raise DataError(reason)
            skipped.append((str(p), reason))
            _say_skipped(skipped, "skipping %s item %s", name, one_line(reason))
        if not keep.any():
            continue
        # (an entry from before format 7 has no fit offsets: _decode_all decodes its file again first)
        fit = np.asarray(head.get("fit", np.zeros((len(ids), len(size)))), dtype=np.int8).reshape(len(ids), -1)
        metas.append((p, e, [i for i, k in zip(ids, keep, strict=True) if k],
                      [i for i, k in zip(idx, keep, strict=True) if k], keep, fit[keep], blank[keep]))
        n += int(keep.sum())
    if n == 0:
        reasons = "; ".join(r for _, r in skipped[:5])
        raise ValueError(
            f"the {name} set has no usable items ({len(paths)} files"
            + (f"; skipped: {reasons}" if reasons else "")
            + ")"
        )
    ids_all, paths_all, idx_all = [], [], []
    for _p, _e, ids, idx, _keep, _fit, _blank in metas:
        ids_all += ids
        idx_all += idx
        paths_all += [_item_path(i, mode) for i in ids]
    items = ItemSet(name, ids_all, paths_all, idx_all, None, n_files=len(paths), skipped=skipped)
    items.sources = [(e, keep) for _p, e, _ids, _idx, keep, _fit, _blank in metas]
    items.size = tuple(size)
    items.fit = np.concatenate([m[5] for m in metas])
    items.constant = np.concatenate([m[6] for m in metas])
    return items


def _warn_constant_items(tset: ItemSet, sset: ItemSet) -> None:
    """Warn (into summary.json's warnings) when synthetic items are constant (blank), with a metric that scores
    them (ssim, deepssim; correlation skips them, naming each): any two constant images have SSIM 1, so a blank
    synthetic item beside a blank training item is a duplicate and counts in the fraction memorised, and a
    generator that emits blank outputs was reported as memorising without a word. Says how many of each set
    and names one of each; from the cache entries' headers, so that a resumed run says it as a fresh one."""
    if sset.constant is None or not sset.constant.any():
        return
    ns, nt = int(sset.constant.sum()), int(tset.constant.sum()) if tset.constant is not None else 0
    said = (f"{ns} of the {len(sset)} synthetic items {'is' if ns == 1 else 'are'} constant (blank; e.g. "
            f"{sset.ids[np.argmax(sset.constant)]})")
    if nt:
        said += f", and {nt} of the {len(tset)} training items too (e.g. {tset.ids[np.argmax(tset.constant)]})"
        so = "so each blank synthetic item is a duplicate of a blank training item and counts in the fraction memorised"
    else:
        said += "; no training item is"
        so = "so a blank synthetic item beside a blank training item would be a duplicate and count as memorised"
    logger.warning("%s: they are scored as any other item, and any two constant images have SSIM 1 (the deepssim "
                   "preset z-scores each image, and a constant one becomes all zeros, whatever its value), %s; leave "
                   "blank images out of the inputs, or audit with --metric correlation, which skips them",
                   one_line(said), so)


# ---- the pixel stores: OUT/work/<set>_pixels.npy ------------------------------------------------------------
# One float32 row per item, memory-mapped, beside OUT/work/<set>_pixels.crc.npy: the CRC-32 of each row's bytes,
# seeded with the CRC-32 of its set and item id (_row_seeds) (one per row, of dtype _ROW_CRC; itself written by
# _save_checked). A resume reuses a store of the right shape, and checking a whole store then (tens of GB) was too
# costly, so each reader checks the rows it reads, once per row and run (_PixelStore). Without them a store
# flipped or partly overwritten in place was reused, and the verified SSIM and the report were computed from
# damaged pixels without a word.
def _store_crc_path(store: Path) -> Path:
    """The checksum file of the pixel store ``store``: OUT/work/<set>_pixels.crc.npy."""
    return store.with_name(store.name.removesuffix(".npy") + ".crc.npy")


#: The dtype of a pixel store's checksums, which names what they cover. The checksums of an earlier version,
#: plain uint32 of each row's bytes alone, are not trusted (:class:`_EarlierChecksums`): the store is built again.
_ROW_CRC = np.dtype([("crc32_of_set_item_and_row", "<u4")])


class _EarlierChecksums(ValueError):
    """A pixel store whose checksums are of an earlier version's format (of each row's bytes alone: they do not
    say which item a row is), which is built again rather than trusted."""


def _row_seeds(store: Path, ids: Sequence[str]) -> np.ndarray:
    """Per item of the pixel store ``store`` (of the set its name gives: ``train`` for train_pixels.npy), the
    CRC-32 of the set and the item's id, which seeds its row's checksum: a row is checked as that item's of that
    set. The checksums covered the row's bytes alone, so the stores of two sets of as many items swapped together
    with their checksum files (or rows swapped within a store with theirs) passed, and the gallery showed each
    other's images; such a row fails its check now, as a damaged one does. Computed once per item, as the store
    is opened or written."""
    name = store.name.removesuffix("_pixels.npy")
    return np.fromiter((zlib.crc32(f"{name}\0{i}".encode("utf-8", "surrogatepass")) for i in ids),
                       dtype=np.uint32, count=len(ids))


class _PixelStore:
    """A pixel store (memory-mapped (n, *size) float32) whose rows are checked against their CRC-32 (seeded with
    their set and item: :func:`_row_seeds`) the first time they are read: indexed along its first axis (an
    index, a slice, an array or list of indices) it gives what the memory map gives; ``np.asarray`` of it checks
    every row not yet checked.

    A row that fails its checksum raises a RuntimeError that names the store, the item and how to recover, after
    removing the store and its checksums: the next run of the audit builds it again from the per-file cache (as
    a damaged cache entry is removed and decoded again; left in place, a resume would reuse it)."""

    def __init__(self, path: Path, pixels: np.ndarray, crcs: np.ndarray, ids: Sequence[str]) -> None:
        self.path, self._px, self._crc, self._ids = path, pixels, crcs, ids
        self._seed = _row_seeds(path, ids)
        self._ok = np.zeros(len(pixels), dtype=bool)  # the rows checked so far
        self.shape, self.dtype, self.ndim = pixels.shape, pixels.dtype, pixels.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        # (no reader indexes past the first axis, and the check covers whole rows: a tuple, None or Ellipsis would
        # index otherwise, and a bare bool would give the whole store as one "row", checked against row 0)
        if isinstance(key, (tuple, bool, np.bool_)) or key is None or key is Ellipsis:
            raise TypeError(f"a pixel store is indexed by items along its first axis, not by {key!r}")
        out = self._px[key]  # (first: an index out of range is the memory map's IndexError)
        if isinstance(key, slice):
            rows = np.arange(*key.indices(len(self)))
        else:
            k = np.asarray(key)
            rows = np.flatnonzero(k) if k.dtype == bool else k.astype(np.int64) % len(self)
        if np.ndim(rows) == 0:  # one item: ``out`` is its row
            self._check(int(rows), out)
        else:  # (an index array of any shape: its rows in order)
            flat, got = rows.ravel(), out.reshape((-1,) + self.shape[1:])
            for j in np.flatnonzero(~self._ok[flat]):
                self._check(int(flat[j]), got[j])
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if not self._ok.all():
            for r in np.flatnonzero(~self._ok):
                self._check(int(r), self._px[r])
        return np.array(self._px, dtype=dtype, copy=copy)  # (an ndarray on the memory map unless asked for a copy)

    def intact(self, r: int) -> bool:
        """Whether row ``r`` matches its checksum (then it counts as checked), removing nothing if not."""
        self._ok[r] = self._ok[r] or self._matches(r, self._px[r])
        return bool(self._ok[r])

    def _matches(self, r: int, row: np.ndarray) -> bool:
        return zlib.crc32(np.ascontiguousarray(row), int(self._seed[r])) == int(self._crc[r])

    def _check(self, r: int, row: np.ndarray) -> None:
        if self._ok[r]:
            return
        if not self._matches(r, row):
            crc = _store_crc_path(self.path)
            for f in (crc, self.path):  # (the checksums first: a store without them is never reused)
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
            raise RuntimeError(
                f"{self.path} is damaged: item {r} ({self._ids[r]}) fails its checksum ({crc}): its row was changed, "
                f"or is not that item's; the store and its checksums were removed: run the audit again, which "
                f"builds the store again from the cache"
            )
        self._ok[r] = True


def _open_store(store: Path, ids: Sequence[str], size: tuple[int, ...] | None = None) -> _PixelStore:
    """The pixel store ``store`` with its checksums, memory-mapped, for the items ``ids`` (of ``size``: None, any).
    FileNotFoundError when either file is missing; ValueError (:class:`_NoChecksum` for a checksum file saved
    without its own checksum, :class:`_DamagedEntry` for a damaged one) when it is unreadable, does not hold one
    float32 row per item (of ``size``) or has not one checksum per row; :class:`_EarlierChecksums` for row
    checksums of an earlier version's format (of the rows' bytes alone, not seeded with their items)."""
    crc = _store_crc_path(store)
    crcs = _load_checked(crc)
    px = np.load(store, mmap_mode="r")
    if px.dtype != np.float32 or px.ndim < 2 or len(px) != len(ids) or (size is not None and px.shape[1:] != size):
        raise ValueError(f"{store}: {px.dtype} {px.shape}, not one float32 row per item ({len(ids)})")
    if crcs.dtype == np.uint32:
        raise _EarlierChecksums(f"{crc}: checksums of an earlier version's format (of each row's bytes alone, not "
                                "of which item it is)")
    if crcs.dtype != _ROW_CRC or crcs.shape != (len(ids),):
        raise ValueError(f"{crc}: {crcs.dtype} {crcs.shape}, not one checksum per item ({len(ids)})")
    return _PixelStore(store, px, crcs[_ROW_CRC.names[0]], ids)


def _pixels_stored(items: ItemSet, work: Path) -> bool:
    """Whether OUT/work/<name>_pixels.npy holds ``items`` already (a resumed run's store: the stores are written
    atomically after the state is staged, and removed when the configuration changes) with one checksum per
    item beside it; if so, open it. A store without its checksums (an earlier version's, or a run killed
    before it wrote them) or with other ones is built again, and so is one whose checksums are of an earlier
    version's format (of the rows' bytes alone, which a store swapped with the other set's passed) or whose first
    row fails its check (a store swapped with the other set's: its first row is another item's), named in a
    warning about the run."""
    store = work / f"{items.name}_pixels.npy"
    try:
        items.pixels = _open_store(store, items.ids, items.size)
    except _NoChecksum:
        return False
    except (_DamagedEntry, _EarlierChecksums) as exc:  # (built again: this run's outputs are not changed by it)
        logger.warning("%s: building the pixel store again", exc, extra=_RUN_ONLY)
        return False
    except (OSError, ValueError):
        return False
    if len(items) and not items.pixels.intact(0):
        # (one row, checked as the store is opened: a store swapped with the other set's, or with its rows in another
        # order, checksums and all, has a first row that is not its first item's; found only where a row is read, it
        # stopped the run, and a swap of the two sets' stores stopped it twice, once per store)
        logger.warning("%s: item 0 (%s) fails its checksum (%s): the store was changed, or holds other items: "
                       "building the pixel store again", store, items.ids[0], _store_crc_path(store), extra=_RUN_ONLY)
        items.pixels = None
        return False
    return True


def _write_pixels(items: ItemSet, work: Path) -> None:
    """Concatenate the cached per-file items of ``items`` (:func:`_build_items`) into one memory-mapped store
    OUT/work/<name>_pixels.npy (atomically), with the CRC-32 of each row (seeded with its set and item:
    :func:`_row_seeds`) beside it, and set ``items.pixels`` to it. The old checksums are removed first and the new
    ones written after the store, so that a run killed in between leaves a store without checksums, which the
    next run builds again, never one with stale ones."""
    store = work / f"{items.name}_pixels.npy"
    crc = _store_crc_path(store)
    crc.unlink(missing_ok=True)
    crcs = np.empty(len(items), dtype=np.uint32)
    seeds = _row_seeds(store, items.ids)
    with atomic_path(store) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(items),) + items.size)
        reserve(tmp)  # (a full disk: an OSError now, not a SIGBUS while copying)
        pos = 0
        for e, keep in items.sources:
            px = _entry_or_fail(_entry_pixels, e)
            px = np.ascontiguousarray(px if keep.all() else px[keep], dtype=mm.dtype)
            mm[pos : pos + len(px)] = px
            # (the very bytes of the store's rows, each seeded with its set and item)
            crcs[pos : pos + len(px)] = [zlib.crc32(row, int(sd))
                                         for row, sd in zip(px, seeds[pos : pos + len(px)], strict=True)]
            pos += len(px)
        mm.flush()
        del mm
    _save_checked(crc, crcs.view(_ROW_CRC), durable=True)
    items.pixels = _open_store(store, items.ids, items.size)


def _cached_embedding(f: Path, n: int) -> np.ndarray | None:
    """The cached embeddings ``f`` of a file's ``n`` items, or None when there are none, or they are not
    whole (written without fsync: a crash may leave a short file), fail their checksum (:func:`_load_checked`;
    a warning names the file), have no checksum (written by an earlier version: embedded again, once) or are
    not one finite row per item."""
    try:
        emb = _load_checked(f)
    except FileNotFoundError:
        return None
    except _NoChecksum:
        logger.debug("embedding again: cached embeddings %s have no checksum (an earlier version's)", f)
        return None
    except _DamagedEntry as exc:
        logger.warning("embedding again: cached embeddings %s", exc, extra=_RUN_ONLY)
        return None
    if emb.ndim != 2 or len(emb) != n or not np.issubdtype(emb.dtype, np.floating) or not np.isfinite(emb).all():
        logger.warning("embedding again: cached embeddings %s hold %s %s for %d items", f, emb.shape, emb.dtype, n,
                       extra=_RUN_ONLY)
        return None
    return emb


def _embed_items(
    items: ItemSet,
    paths: Sequence[Path],
    entries: Sequence[Path | None],
    model: Any,
    model_hash: str,
    *,
    cache: Path,
    batch_size: int,
    device: Any,
    progress: bool,
) -> np.ndarray:
    """Embeddings of every item, file by file from the cache; missing ones computed in batches."""
    from tqdm import tqdm

    per_file: list[tuple[Path, Path]] = [(p, e) for p, e in zip(paths, entries, strict=True) if e is not None]
    out: list[np.ndarray | None] = [None] * len(per_file)
    tag = f"{model_hash[:24]}_p{_preprocess_version()}"  # (the model and its preprocessing's version)
    emb_files = [cache / "embeddings" / f"{e.stem}_{tag}.npy" for _, e in per_file]
    counts = {e: len(keep) for e, keep in items.sources}  # (each entry's items, from its header: _build_items)
    for i, f in enumerate(emb_files):
        out[i] = _cached_embedding(f, counts[per_file[i][1]])
    missing = [i for i, o in enumerate(out) if o is None]
    bar = tqdm(total=len(missing), desc=f"embed {items.name}", disable=None if progress else True)
    pending: list[tuple[int, np.ndarray]] = []  # (file, its items' pixels): each cached file is read once
    pending_n = 0

    def flush() -> None:
        nonlocal pending, pending_n
        if not pending:
            return
        arrays = [a for _, px in pending for a in px]
        emb = _embed(arrays, model, batch_size=batch_size, device=device)
        if emb.ndim != 2 or len(emb) != len(arrays) or not np.isfinite(emb).all():
            raise RuntimeError(
                f"the model returned embeddings of shape {emb.shape} (finite: "
                f"{bool(np.isfinite(emb).all())}) for {len(arrays)} images"
            )
        pos = 0
        for i, px in pending:
            out[i] = emb[pos : pos + len(px)]
            _save_checked(emb_files[i], out[i], durable=False)  # (checked when read: _cached_embedding)
            pos += len(px)
        bar.update(len(pending))
        pending, pending_n = [], 0

    for i in missing:
        px = _entry_or_fail(_entry_pixels, per_file[i][1])
        pending.append((i, px))
        pending_n += len(px)
        if pending_n >= batch_size:
            flush()
    flush()
    bar.close()
    return np.concatenate([o for o in out if o is not None]).astype(np.float32)


def _embedding_ids(p: Path, n: int) -> list[str] | None:
    """The item ids ``deepssim-fast embed`` wrote beside the embeddings ``p`` (``<name>.ids.txt`` for
    ``<name>.npy``, one id per row, file names in their own bytes; ``<name>.ids.json``, a JSON list, where a
    file name holds a line break), or None when there is no such file. A file that does not hold one distinct,
    non-empty id for each of the ``n`` rows is named in a warning and not used (the rows keep their
    ``<path>#row:<i>`` ids)."""
    f = p.with_suffix(".ids.json")
    if not f.exists():
        f = p.with_suffix(".ids.txt")
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("%s: unreadable (%s): the rows of %s are named by number", f, one_line(exc), p)
        return None
    problem = None
    if f.suffix == ".json":
        try:
            lines = json.loads(raw)
        except ValueError as exc:
            lines, problem = [], f"not a JSON list of ids ({one_line(exc)})"
        if not (isinstance(lines, list) and all(isinstance(x, str) for x in lines)):
            lines, problem = [], "not a JSON list of ids (strings)"
    else:
        lines = os.fsdecode(raw).split("\n")
        if lines and lines[-1] == "":
            lines.pop()
    if problem is None and len(lines) != n:
        problem = f"{len(lines)} ids for {n} rows"
    elif problem is None and (len(set(lines)) != n or not all(lines)):
        problem = "ids repeated or empty"
    if problem is not None:
        logger.warning("%s: %s: the rows of %s are named by number instead", f, problem, p)
        return None
    return lines


def _slice_id_parts(item_id: str) -> tuple[str, int, int] | None:
    """(source, axis, index) of a slice id ``<source>#<axis>:<index>``, or None for any other id."""
    m = re.fullmatch(r"(.*)#([012]):(\d+)", item_id, flags=re.S)
    return None if m is None else (m.group(1), int(m.group(2)), int(m.group(3)))


def _image_of_id(item_id: str) -> np.ndarray | None:
    """The 2D slice a slice id ``<path>#<axis>:<index>`` names (a frame of a 4D file: ``<path>@t<t>#...``),
    read from its file, for the gallery of an embeddings audit, whose items :func:`_embedding_ids` names;
    None where the id names no slice of a readable file (rows named by number, a file moved since)."""
    parts = _slice_id_parts(item_id)
    if parts is None:
        return None
    src, axis, index = parts
    path, frame = src, None
    f = re.fullmatch(r"(.*)@t(\d+)", src, flags=re.S)
    if f is not None and not os.path.exists(src):
        path, frame = f.group(1), int(f.group(2))
    try:  # (in float64, fitted to float32 as the audit read it: 1e7 + a small spread showed as a few levels)
        img = fit_float32(read_image(path, frame=frame, dtype=np.float64))
    except (DataError, OSError, ValueError) as exc:
        logger.info("gallery: no image for %s (%s)", item_id, one_line(exc))
        return None
    if img.ndim == 2:
        return np.asarray(img, dtype=np.float32) if index == 0 else None
    if img.ndim == 3 and index < img.shape[axis]:
        return np.ascontiguousarray(img[(slice(None),) * axis + (index,)], dtype=np.float32)
    return None


def _load_embeddings(name: str, paths: Sequence[Path], *, strict: bool, width: int | None = None) -> ItemSet:
    """metric='embeddings': each .npy file holds (n, d) rows; item id ``<path>#row:<i>``, or where
    ``deepssim-fast embed`` wrote the item ids beside the file (:func:`_embedding_ids`), the id of the item each
    row embeds (``<image path>#<axis>:<index>``, as a pixel audit names it: path and index come from it).

    Every row must have one width d: ``width`` (the training set's, for the synthetic set) or that of the
    first readable file. A file of another width, with no rows, of complex values, or with NaN/Inf or
    all-zero rows is skipped and reported by path, like an unreadable one (``strict``: :class:`DataError`)."""
    ids, ps, idx, vecs, skipped = [], [], [], [], []
    like_images: list[Path] = []
    ref = "the training embeddings have" if width is not None else ""
    for p in paths:
        try:
            if not p.name.lower().endswith(".npy"):
                raise DataError(f"{p}: metric='embeddings' needs .npy files of shape (n, d)")
            try:
                a = np.load(p, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise npy_error(p, exc) from exc
            if np.issubdtype(a.dtype, np.complexfloating):
                raise DataError(f"{p}: complex embeddings ({a.dtype} {a.shape}); expected real (n, d) rows")
            if a.ndim == 1:
                a = a[None]
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{p}: expected a numeric (n, d) embedding array, got {a.dtype} {a.shape}")
            if a.size == 0:
                raise DataError(f"{p}: no embeddings (shape {a.shape}); expected (n, d) rows with n, d >= 1")
            if not np.isfinite(a).all():
                raise DataError(f"{p}: contains NaN or Inf values")
            if (np.linalg.norm(a, axis=1) == 0).any():
                raise DataError(
                    f"{p}: row {int(np.argmin(np.linalg.norm(a, axis=1)))} is all zeros (cosine undefined)"
                )
            if width is None:
                width, ref = int(a.shape[1]), f"the first {name} file {p} has"
            elif a.shape[1] != width:
                raise DataError(f"{p}: embeddings of width {a.shape[1]}, but {ref} width {width}")
        except DataError as exc:
            if strict:
                raise
            skipped.append((str(p), str(exc)))
            _say_skipped(skipped, "skipping %s file %s", name, one_line(exc))
            continue
        named = _embedding_ids(p, len(a))
        if named is None and float(a.min()) >= 0:
            norms = np.linalg.norm(a.astype(np.float64), axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                like_images.append(p)
        for r in range(len(a)):
            if named is None:
                ids.append(f"{p}#row:{r}")
                ps.append(str(p))
                idx.append(r)
                continue
            parts = _slice_id_parts(named[r])
            ids.append(named[r])
            ps.append(_item_path(named[r], "slices"))
            idx.append(parts[2] if parts is not None else r)
        vecs.append(a.astype(np.float32))
    if like_images:
        # an image .npy given by mistake is read as H rows of W-wide "embeddings" and audited as such (every
        # slice of MRI came out a duplicate): nothing in the file tells the two apart, but an image's pixels are
        # non-negative and its rows not unit-norm, where embed's rows are unit-norm (and named in .ids.txt)
        logger.warning(
            "%d %s file(s), e.g. %s, hold rows that are not unit-norm and no negative value, as an image's pixels "
            "do, and no ids file lies beside them: metric 'embeddings' reads each row of a .npy as one embedding; "
            "if these are images, audit them with metric 'deepssim', 'ssim' or 'correlation'",
            len(like_images), name, like_images[0])
    if not vecs:
        reasons = "; ".join(r for _, r in skipped[:5])
        raise ValueError(
            f"the {name} set has no usable embeddings ({len(paths)} files"
            + (f"; skipped: {reasons}" if reasons else "")
            + ")"
        )
    return ItemSet(name, ids, ps, idx, None, np.concatenate(vecs), n_files=len(paths), skipped=skipped)


#: Skipped inputs named one by one in the log, per set; summary.json and the report list them all
SKIPS_LOGGED = 10


def _say_skipped(skipped: list, fmt: str, name: str, reason: str) -> None:
    """The warning for the input just appended to ``skipped`` (one set's list), for its first
    :data:`SKIPS_LOGGED` entries, then one line saying the rest are not named here (an audit with 7000 constant
    or damaged files printed 7000 lines, again on every rerun)."""
    n = len(skipped)
    if n <= SKIPS_LOGGED:
        logger.warning(fmt, name, reason, extra=_RUN_ONLY)
    elif n == SKIPS_LOGGED + 1:
        logger.warning("skipping more %s inputs; those past the first %d are not named here (summary.json's "
                       "skipped and the report list every one)", name, SKIPS_LOGGED, extra=_RUN_ONLY)


def _centred_rows(
    pixels: np.ndarray, items: ItemSet, chunk: int = 256, *, fallback: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels flattened, centred and L2-normalised (their cosine is the Pearson correlation).

    ``pixels`` (n, *size) → (n, prod(size)) float32, into ``out`` when given (:func:`_row_store`: a file-backed
    array, so that 10^5 items of 256×256 are not 27 GB of memory). The rows are computed in float64, ``chunk``
    items at a time but at most about ``_ROW_VOXELS`` voxels (whole volumes: one or two at a time; 256 MNI-sized
    ones were a 17 GB float64 copy, and its temporaries as much again each); a row does not depend on the chunk.

    A constant item has no such row: it takes the row of ``fallback`` at the same position when given (a
    transformed item whose shift left only background: the untransformed item's row), else it is an error
    (the audit leaves constant items out before this point)."""
    n = len(pixels)
    voxels = int(np.prod(pixels.shape[1:]))
    chunk = max(1, min(chunk, _ROW_VOXELS // max(1, voxels)))
    if out is None:
        out = np.empty((n, voxels), dtype=np.float32)
    for a in range(0, n, chunk):
        x = np.array(pixels[a : a + chunk], dtype=np.float64).reshape(min(chunk, n - a), -1)
        const = _constant_items(x)
        if const.any() and fallback is None:
            bad = a + int(np.flatnonzero(const)[0])
            raise ValueError(f"{items.name} item {items.ids[bad]} is constant: its correlation is undefined")
        x -= x.mean(axis=1, keepdims=True)
        nrm = np.linalg.norm(x, axis=1, keepdims=True)
        nrm[const] = 1.0
        x /= nrm
        out[a : a + len(x)] = x
        if const.any():
            out[a + np.flatnonzero(const)] = fallback[a + np.flatnonzero(const)]
    return out


# ----------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------
def _flip_variants(flips: bool, spatial_dims: int, all_mirrors: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """(name, axes) of the flips searched: none first; with ``flips``, 2D items are flipped horizontally
    (``hflip``, axis 1), vertically (``vflip``, axis 0) and both (``hvflip``: a 180° rotation), volumes along
    each axis (``flip0``: axis 0, left-right in RAS data; ``flip1``; ``flip2``) and each set of axes
    (``flip01``: RAS against LPS, ``flip02``, ``flip12``, ``flip012``). ``all_mirrors=False``: the single-axis
    flips alone, as audits before format 8 searched (an LPS copy of a RAS training volume, or a slice turned
    by 180°, was then missed)."""
    out: list[tuple[str, tuple[int, ...]]] = [("", ())]
    if flips:
        if spatial_dims == 2:
            out += [("hflip", (1,)), ("vflip", (0,))] + ([("hvflip", (0, 1))] if all_mirrors else [])
        else:
            out += [(f"flip{ax}", (ax,)) for ax in range(spatial_dims)]
            if all_mirrors:
                out += [("flip" + "".join(map(str, axes)), axes)
                        for axes in ((0, 1), (0, 2), (1, 2), (0, 1, 2))]
    return out


def _rotation_angles(max_deg: float) -> list[float]:
    """0 first, then ±max/2, ±max (degrees); [0] when rotations are off."""
    if max_deg <= 0:
        return [0.0]
    return [0.0, -max_deg / 2, max_deg / 2, -max_deg, max_deg]


@functools.lru_cache(maxsize=64)
def _rotation_table(h: int, w: int, deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear gather table for rotating an (h, w) image by ``deg`` about its centre: (i0, j0, fi, fj)."""
    th = np.deg2rad(deg)
    c, s_ = np.cos(th), np.sin(th)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    # inverse mapping: output pixel (y, x) samples the input at R(-deg) (y, x)
    sy = c * (yy - cy) - s_ * (xx - cx) + cy
    sx = s_ * (yy - cy) + c * (xx - cx) + cx
    i0, j0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    return i0, j0, (sy - i0).astype(np.float32), (sx - j0).astype(np.float32)


def _rotate(img: np.ndarray, deg: float) -> np.ndarray:
    """Rotate a 2D image by ``deg`` degrees about its centre (bilinear; outside filled with the minimum)."""
    if deg == 0:
        return img
    h, w = img.shape
    i0, j0, fi, fj = _rotation_table(h, w, float(deg))
    lo = np.float32(img.min())
    pad = np.full((h + 2, w + 2), lo, dtype=np.float32)
    pad[1:-1, 1:-1] = img
    # indices into the padded image; anything outside reads the border of minimum values
    a0 = np.clip(i0 + 1, 0, h + 1)
    a1 = np.clip(i0 + 2, 0, h + 1)
    b0 = np.clip(j0 + 1, 0, w + 1)
    b1 = np.clip(j0 + 2, 0, w + 1)
    top = pad[a0, b0] * (1 - fj) + pad[a0, b1] * fj
    bot = pad[a1, b0] * (1 - fj) + pad[a1, b1] * fj
    return (top * (1 - fi) + bot * fi).astype(np.float32)


def _fft_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n: a length pocketfft transforms fast (a prime, 151 for a 150-pixel
    axis padded by one, took several times as long)."""
    best = 1 << max(0, int(n - 1).bit_length())
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                m = p3
                while m < n:
                    m *= 2
                best = min(best, m)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def _square_table(a: np.ndarray, reach: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Sums of a**2 over the boxes the shifts within ±reach leave as overlaps: every box runs from one of
    0..reach to one of n - reach..n on each axis. Returns, per axis, those bounds (sorted), the summed-area
    table of a**2 over the cells between them (float64, a zero first plane on every axis), and reach, so that
    the box [bounds[i], bounds[j]) x ... is an inclusion-exclusion of table corners (see :func:`_box_sums`). One
    pass over the array: the cells are summed first (at most 2 reach + 1 a side). (:func:`_square_tables` of a
    batch of one.)"""
    bounds, table, reach = _square_tables(a[None], reach)
    return bounds, table[0], reach


def _box_sums(sq: tuple[list[np.ndarray], np.ndarray, int], lo: Sequence[np.ndarray], hi: Sequence[np.ndarray]
              ) -> np.ndarray:
    """Sums over the boxes [lo[0][i], hi[0][i]) x [lo[1][j], hi[1][j]) x ... of the array's squares, for every
    combination of the per-axis bounds, which must be among those :func:`_square_table` kept (the caller
    checks the shifts against its reach). (:func:`_box_sums_batch` of a batch of one.)"""
    bounds, table, reach = sq
    return _box_sums_batch((bounds, table[None], reach), lo, hi)[0]


def _best_shift(
    ref_fft: np.ndarray, ref_sq: tuple[list[np.ndarray], np.ndarray, int], shape: tuple[int, ...],
    padded: tuple[int, ...],
    img: np.ndarray, max_shift: int | tuple[int, ...], *, linear: bool = True,
) -> tuple[tuple[int, ...], float]:
    """Integer shift (per axis) within ±max_shift (one bound for every axis, or one per axis) maximising the
    normalised cross-correlation of the centred images over their overlap, and that correlation (ties prefer
    no shift, then the first in scan order). The correlation is linear, not circular: a shifted image is
    compared with the reference only where both are, normalised by their norms there, so an exact copy
    shifted by d pixels scores 1 at d. (The circular form compared the column a shift pushes out with the
    opposite edge, and on tight crops, 24 x 30 pixels of brain, preferred no shift to the exact one.)

    ``ref_fft``: rfftn of the centred reference zero-padded to ``padded`` (at least shape + max_shift on every
    axis); ``ref_sq``: :func:`_square_table` of the centred reference, for a reach of at least max_shift.
    ``linear=False``: the circular form of audits before format 6 (``padded`` = ``shape``, every shift
    normalised by the whole images' norms). (:func:`_best_shifts` of a batch of one: the same bits as the
    pair-by-pair code it replaced, checked against the previous release.)
    """
    reach = (max_shift,) * len(shape) if isinstance(max_shift, (int, np.integer)) else tuple(max_shift)
    bounds, table, table_reach = ref_sq
    ds, scores = _best_shifts(ref_fft[None], (bounds, table[None], table_reach), shape, padded, np.asarray(img)[None],
                              reach, linear=linear)
    return ds[0], scores[0]


def _square_tables(a: np.ndarray, reach: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """:func:`_square_table` of each array of the batch ``a`` (B, *shape) at once: the bounds (one set: the
    arrays share a shape) and the tables (B, ...), each summed along the same axes in the same order as the
    array alone would be."""
    bounds = []
    g = np.square(a, dtype=np.float64)
    for ax, n in enumerate(a.shape[1:]):
        b = np.array(sorted({min(i, n) for i in range(reach + 1)} | {max(n - i, 0) for i in range(reach + 1)}))
        bounds.append(b)
        g = np.add.reduceat(g, b[:-1], axis=ax + 1)
    table = np.zeros((a.shape[0],) + tuple(x + 1 for x in g.shape[1:]))
    for ax in range(1, a.ndim):
        g = np.cumsum(g, axis=ax)
    table[(slice(None),) + (slice(1, None),) * (a.ndim - 1)] = g
    return bounds, table, int(reach)


def _best_shifts(
    ref_fft: np.ndarray, ref_sq: tuple[list[np.ndarray], np.ndarray, int], shape: tuple[int, ...],
    padded: tuple[int, ...], imgs: np.ndarray, max_shift: tuple[int, ...], *, linear: bool = True,
) -> tuple[list[tuple[int, ...]], list[float]]:
    """:func:`_best_shift` of a batch: ``imgs`` (B, *shape) against the references whose rfftn (B, ...) and
    :func:`_square_tables` are given; the shifts and correlations, each equal to :func:`_best_shift`'s for
    that pair bit for bit (tested): one FFT call per batch instead of one per pair (verification with flips
    spent ~3 ms a pair of 48 x 48 in numpy's per-call overhead)."""
    nd = len(shape)
    # (each image's own mean, as _best_shift takes it: a mean over a batch axis sums in another order)
    b = imgs.astype(np.float64) - np.array([im.mean() for im in imgs]).reshape((-1,) + (1,) * nd)
    axes = tuple(range(1, nd + 1))
    c = np.fft.rfftn(b, s=padded, axes=axes)
    # the products a pair at a time: numpy's complex multiply rounds the elements of its vector loop (fused
    # multiply-adds) and of its scalar tail differently, so over the whole batch a pair's products depended
    # on where its elements fell; on arrays of one pair they are _best_shift's, whatever the batch
    prod = np.empty_like(c)
    for i in range(len(c)):
        prod[i] = ref_fft[i] * np.conj(c[i])
    xc = np.fft.irfftn(prod, s=padded, axes=axes)
    reach = tuple(max(0, int(m)) for m in max_shift)
    offs = [np.arange(-m, m + 1) for m in reach]
    if linear and (any(m > p - n for m, p, n in zip(reach, padded, shape, strict=True)) or max(reach) > ref_sq[2]):
        raise ValueError(f"_best_shifts: shifts {reach} exceed the padding of the reference ({padded} for {shape}) "
                         f"or the reach of its table ({ref_sq[2]})")
    win = xc[(slice(None),) + np.ix_(*[o % p for o, p in zip(offs, padded, strict=True)])]
    if linear:
        ref_part = _box_sums_batch(ref_sq, [np.maximum(0, o) for o in offs],
                                   [np.minimum(n, n + o) for o, n in zip(offs, shape, strict=True)])
        img_part = _box_sums_batch(_square_tables(b, ref_sq[2]), [np.maximum(0, -o) for o in offs],
                                   [np.minimum(n, n - o) for o, n in zip(offs, shape, strict=True)])
    else:
        ref_part = np.broadcast_to(ref_sq[1][(slice(None),) + (-1,) * nd].reshape((-1,) + (1,) * nd), win.shape)
        img_part = np.broadcast_to(np.array([float(np.square(x).sum()) for x in b]).reshape((-1,) + (1,) * nd),
                                   win.shape)
    norm = np.sqrt(np.maximum(ref_part, 0.0) * np.maximum(img_part, 0.0))
    ncc = np.divide(win, norm, out=np.zeros_like(win), where=norm > 0)
    flat_ncc = ncc.reshape(len(ncc), -1)
    centre = ncc[(slice(None),) + reach]
    first = np.argmax(flat_ncc, axis=1)  # first maximum in scan order
    ds: list[tuple[int, ...]] = []
    scores: list[float] = []
    for i in range(len(ncc)):
        c, best = float(centre[i]), float(flat_ncc[i, first[i]])
        if not best > c + 1e-9 * abs(c):
            ds.append((0,) * nd)
            scores.append(c)
        else:
            ds.append(tuple(int(o[q]) for o, q in zip(offs, np.unravel_index(int(first[i]), ncc.shape[1:]),
                                                       strict=True)))
            scores.append(best)
    return ds, scores


def _box_sums_batch(sq: tuple[list[np.ndarray], np.ndarray, int], lo: Sequence[np.ndarray],
                    hi: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`_box_sums` over each table of the batch (:func:`_square_tables`): (B, *boxes)."""
    bounds, table, _ = sq
    nd = len(bounds)

    def along(ax: int, x: np.ndarray) -> np.ndarray:
        return np.searchsorted(bounds[ax], x).reshape((1,) * ax + (-1,) + (1,) * (nd - ax - 1))

    lo_i = [along(ax, x) for ax, x in enumerate(lo)]
    hi_i = [along(ax, x) for ax, x in enumerate(hi)]
    out = np.zeros((table.shape[0],) + tuple(len(x) for x in lo))
    for corner in itertools.product((0, 1), repeat=nd):
        sign = -1.0 if (nd - sum(corner)) % 2 else 1.0
        out += sign * table[(slice(None),) + tuple(h if c else lw for c, lw, h in zip(corner, lo_i, hi_i,
                                                                                       strict=True))]
    return out


#: Voxels of the pairs whose flip/shift/rotation search runs as one batch in verify_pairs (2^15: 14 slices of
#: 48 x 48; items of more voxels one at a time). The batch's spectra stay in L2: batches of 2^22 voxels took
#: the FFTs of 176 x 208 slices to 1.9x their time one pair at a time (arrays of 18 MB); 48 x 48 slices gain
#: 2-2.4x from the batching (numpy's per-call overhead), larger items neither gain nor lose.
_SEARCH_VOXELS = 1 << 15


def _search_transforms(
    T: np.ndarray, S: np.ndarray, *, flips: bool, shifts: int, rotations: float, spatial_dims: int,
    overlap: bool, all_mirrors: bool,
) -> list[list[tuple]]:
    """For each pair (T[i], S[i]) of the batch, the transforms verify_pairs weighs, as (-correlation, order,
    flip, angle, shift, image) in the order it found them (the order breaks ties): each flip with its best
    shift, then the rotations of the unflipped image and of the best flip (before format 8, of the best flip
    only). Batched over the pairs: the same values, pair by pair, as one pair at a time."""
    g, nd = len(T), T.ndim - 1
    shape = T.shape[1:]
    tc = np.stack([t.astype(np.float64) - t.mean() for t in T])
    # zero-padded by the largest reach of a shift search below (linear correlation, see _best_shift)
    pad = max(shifts, 1) if overlap else 0
    t_pad = tuple(_fft_len(n + pad) if pad else n for n in shape)
    t_fft = np.fft.rfftn(tc, s=t_pad, axes=tuple(range(1, nd + 1)))
    t_sq = _square_tables(tc, pad)
    scored: list[list[tuple]] = [[] for _ in range(g)]
    flipped: dict[str, np.ndarray] = {}
    reach: dict[str, tuple[int, ...]] = {}
    for fname, axes in _flip_variants(flips, spatial_dims, all_mirrors):
        V = np.ascontiguousarray(np.flip(S, axis=tuple(a + 1 for a in axes))) if axes else S
        flipped[fname] = V
        # a flip mirrors the fitted item about its centre, which is half a voxel off the centre of the file's
        # image where center_fit cropped or padded an odd number of voxels on that axis: the mirrored copy of a
        # training file then lies one voxel off. Along a flipped axis the shift search reaches at least 1 voxel
        # (ties still prefer no shift).
        reach[fname] = tuple(max(shifts, 1) if ax in axes else shifts for ax in range(nd))
        ds, scores = _best_shifts(t_fft, t_sq, shape, t_pad, V, reach[fname], linear=overlap)
        for i in range(g):
            scored[i].append((-scores[i], len(scored[i]), fname, 0.0, ds[i], V[i]))
    if rotations > 0:
        # rotations are searched for the unflipped image and the best flip (flip first, then angle, then shift)
        top = [min(sc, key=lambda z: (z[0], z[1]))[2] for sc in scored]
        turned = [list(dict.fromkeys(("", f))) if all_mirrors else [f] for f in top]
        for slot in range(max(len(x) for x in turned)):
            for deg in _rotation_angles(rotations)[1:]:
                by_flip: dict[str, list[int]] = {}
                for i in range(g):
                    if len(turned[i]) > slot:
                        by_flip.setdefault(turned[i][slot], []).append(i)
                for fname, members in by_flip.items():
                    R = np.stack([_rotate(flipped[fname][i], deg) for i in members])
                    m = np.asarray(members)
                    ds, scores = _best_shifts(t_fft[m], (t_sq[0], t_sq[1][m], t_sq[2]), shape, t_pad, R,
                                              reach[fname], linear=overlap)
                    for q, i in enumerate(members):
                        scored[i].append((-scores[q], len(scored[i]), fname, deg, ds[q], R[q]))
    return scored


def _shift_slices(d: tuple[int, ...], shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(source, destination) slices of a translation by d pixels: where the image's content lands."""
    src, dst = [], []
    for di, n in zip(d, shape, strict=True):
        if di >= 0:
            src.append(slice(0, n - di))
            dst.append(slice(di, n))
        else:
            src.append(slice(-di, n))
            dst.append(slice(0, n + di))
    return tuple(src), tuple(dst)


def _overlap_slices(d: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Where an image shifted by d still holds its own content (the overlap of the two fields of view), or
    None where that is narrower than the SSIM window on some side (not scored on its own)."""
    dst = _shift_slices(d, shape)[1]
    return dst if all(sl.stop - sl.start >= _SSIM_WINDOW for sl in dst) else None


def _shift(img: np.ndarray, d: tuple[int, ...]) -> np.ndarray:
    """Translate by d pixels (positive = towards higher indices), filling with the image minimum."""
    out = np.full_like(img, img.min())
    src, dst = _shift_slices(d, img.shape)
    out[dst] = img[src]
    return out



def _transform_name(flip: str, deg: float, d: tuple[int, ...]) -> str:
    parts = [flip] if flip else []
    if deg:
        parts.append(f"rot({deg:+g})")
    if any(d):
        parts.append("shift(" + ",".join(str(x) for x in d) + ")")
    return "+".join(parts) or "none"


def verify_pairs(
    train_px: np.ndarray,
    synth_px: np.ndarray,
    *,
    spatial_dims: int,
    flips: bool = False,
    shifts: int = 0,
    rotations: float = 0.0,
    candidates: int = 2,
    backend: str | None = None,
    extra: Sequence[tuple[str, Callable[[np.ndarray], np.ndarray]] | None] | None = None,
    overlap: bool = True,
    all_mirrors: bool = True,
    extra_overlap: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """Verified SSIM of the pairs (train_px[i], synth_px[i]), each (B, *size) → (best SSIM (B,) f64, names).

    The synthetic image is transformed by each flip (none, or also those of :func:`_flip_variants` when
    ``flips``: horizontal, vertical and both in 2D, each set of axes in 3D), and the unflipped image and
    the flip of highest correlation also by the rotations ±r/2, ±r degrees (r = ``rotations``; 2D only; with
    the best flip alone, a copy turned by 90° was lost when flips were asked for as well: the flip that
    correlated best was the wrong one); each
    variant is followed by the integer shift within ±``shifts`` that maximises its cross-correlation with the
    training image (computed by FFT; along a flipped axis within at least ±1, as an item centre-fitted by an
    odd number of voxels is mirrored one voxel off its file's mirror image). The untransformed
    pair and the ``candidates`` transforms of highest normalised correlation are scored with exact SSIM
    (``preset="deepssim"``, training image first); the best SSIM and its transform name are returned.
    ``extra`` (B entries, each None or (name, image -> image)): one more transform scored per pair, the
    search variant that gave the pair its search score (:func:`_search_variants`; the audit passes it, so
    that the verified SSIM is not below the search's SSIM of that variant, which a shift chosen by
    correlation can miss, beyond float32 rounding: the search's ssim_matrix and this pair-by-pair ssim sum in
    different orders, 1 ulp apart at times), unless a transform of that name is scored already.
    ``extra_overlap`` (format 9; ``False``: as audits before it verified, for :func:`evaluate`): an ``extra``
    transform that is shifted is scored on the overlap as well (with ``overlap``).
    ``all_mirrors`` (format 8; ``False``: as audits before it verified, for :func:`evaluate`): the flips of
    several axes, and the rotations of the unflipped image as well as of the best flip.
    ``overlap`` (format 6; ``False``: as audits before it verified, for :func:`evaluate`): each variant's shift
    is the one of highest normalised cross-correlation over the overlap (linear, not circular: see
    :func:`_best_shift`), and a shifted transform is also scored on the overlap alone, the part of the field
    of view both images see (the training image and the shifted image cropped to where the shifted content
    lies), keeping the better of the two scores. Filled with the image minimum, the band the shift uncovered
    counts as a difference: an exact mirrored copy of a file centre-fitted by an odd number of voxels scored
    0.989–0.996 on MNI slices, and smaller items lower. On the overlap it scores 1. (Skipped where the
    overlap is narrower than the SSIM window.)
    The scored images are stacked for the SSIM engine a few pairs at a time (about ``_VERIFY_VOXELS``
    voxels a side; pairs of one shape together), so whole volumes need no copy of every pair's variants at
    once.
    """
    if len(train_px) != len(synth_px):
        raise ValueError(f"verify_pairs: {len(train_px)} training vs {len(synth_px)} synthetic images")
    if extra is not None and len(extra) != len(train_px):
        raise ValueError(f"verify_pairs: {len(extra)} extra transforms for {len(train_px)} pairs")
    if spatial_dims == 3 and rotations:
        raise ValueError("rotations are searched for 2D items only")
    b = len(train_px)
    names: list[str] = []
    owner: list[int] = []
    # images waiting to be scored, by shape: (training images, transformed images, their slots in names)
    pending: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray], list[int]]] = {}
    scored_at: dict[int, float] = {}
    held = 0  # voxels of the training images pending (the transformed ones are as many)

    def flush() -> None:
        """Score the pairs gathered so far: at most ~``_VERIFY_VOXELS`` voxels a side are stacked at once."""
        nonlocal held
        for xs, ys, slots in pending.values():
            v = _ssim_pairs(np.stack(xs), np.stack(ys), spatial_dims=spatial_dims, backend=backend)
            scored_at.update(zip(slots, (float(x) for x in v), strict=True))
        pending.clear()
        held = 0

    def add(name: str, i: int, x: np.ndarray, y: np.ndarray) -> None:
        nonlocal held
        xs, ys, slots = pending.setdefault(x.shape, ([], [], []))
        xs.append(x)
        ys.append(np.ascontiguousarray(y, dtype=np.float32))
        slots.append(len(names))
        names.append(name)
        owner.append(i)
        held += x.size

    search = flips or shifts > 0 or rotations > 0
    group: list[list[tuple]] = []
    g0 = g1 = 0
    for i in range(b):
        t = np.asarray(train_px[i], dtype=np.float32)
        s = np.asarray(synth_px[i], dtype=np.float32)
        picks: list[tuple[str, np.ndarray]] = [("none", s)]
        overlaps: list[tuple[str, np.ndarray, tuple[slice, ...]]] = []
        if search:
            if i >= g1:  # the next batch of pairs of this shape: their transforms searched at once
                per = max(1, _SEARCH_VOXELS // max(1, t.size))
                g0, g1 = i, i + 1
                while g1 < min(b, i + per) and np.shape(train_px[g1]) == t.shape and np.shape(synth_px[g1]) == t.shape:
                    g1 += 1
                group = _search_transforms(
                    np.stack([np.asarray(train_px[j], dtype=np.float32) for j in range(g0, g1)]),
                    np.stack([np.asarray(synth_px[j], dtype=np.float32) for j in range(g0, g1)]),
                    flips=flips, shifts=shifts, rotations=rotations, spatial_dims=spatial_dims, overlap=overlap,
                    all_mirrors=all_mirrors)
            scored = [z for z in group[i - g0] if z[2] or z[3] or any(z[4])]
            scored.sort(key=lambda z: (z[0], z[1]))
            for _, _, fname, deg, d, r in scored[:candidates]:
                name = _transform_name(fname, deg, d)
                if not any(d):
                    picks.append((name, r))
                    continue
                shifted = _shift(r, d)
                picks.append((name, shifted))
                dst = _overlap_slices(d, r.shape) if overlap else None
                if dst is not None:
                    overlaps.append((name, shifted, dst))
        if extra is not None and extra[i] is not None and extra[i][0] not in {n for n, _ in picks}:
            name, img = extra[i][0], extra[i][1](s)
            picks.append((name, img))
            # a shifted search variant is scored on the overlap too, as the shifts above are (it had the
            # filled score alone: 0.178 where the overlap gives 0.189)
            m = re.search(r"shift\((-?\d+(?:,-?\d+)*)\)", name)
            d = tuple(int(x) for x in m.group(1).split(",")) if m is not None else ()
            dst = _overlap_slices(d, img.shape) if overlap and extra_overlap and len(d) == img.ndim else None
            if dst is not None:
                overlaps.append((name, img, dst))
        for name, img in picks:
            add(name, i, t, img)
        for name, img, dst in overlaps:
            add(name, i, np.ascontiguousarray(t[dst]), img[dst])
        if held >= _VERIFY_VOXELS:
            flush()
    flush()
    vals = np.array([scored_at[j] for j in range(len(names))], dtype=np.float64)
    if not np.isfinite(vals).all():
        raise RuntimeError("SSIM returned non-finite values during verification")
    best = np.full(b, -np.inf)
    best_name = ["none"] * b
    for v, n, o in zip(vals, names, owner, strict=True):
        if v > best[o]:
            best[o], best_name[o] = float(v), n
    return best, best_name


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """What :func:`audit` produced: the output directory, the summary (as written) and the output files."""

    out: Path
    summary: dict
    files: dict[str, Path]

    @property
    def fraction_memorised(self) -> float:
        return float(self.summary["fraction_memorised"])

    # (the repr names these as fields: r.counts raised AttributeError, the numbers being in r.summary only)
    @property
    def metric(self) -> str:
        return str(self.summary["metric"])

    @property
    def n_synth(self) -> int:
        return int(self.summary["n_synth"])

    @property
    def n_train(self) -> int:
        return int(self.summary["n_train"])

    @property
    def counts(self) -> dict[str, int]:
        """Synthetic items by label, ``{"different", "similar", "duplicate"}``."""
        return dict(self.summary["counts"])

    @property
    def skipped(self) -> list[dict]:
        """The inputs left out, each with its path, set and reason."""
        return list(self.summary.get("skipped") or [])

    @property
    def report(self) -> Path | None:
        return self.files.get("report.html")

    def __repr__(self) -> str:
        # the headline, not the whole summary (its skipped inputs alone can run to thousands of lines)
        s = self.summary
        return (f"AuditResult(out={str(self.out)!r}, metric={s.get('metric')!r}, n_synth={s.get('n_synth')}, "
                f"n_train={s.get('n_train')}, counts={s.get('counts')}, "
                f"fraction_memorised={s.get('fraction_memorised')}, skipped={len(s.get('skipped') or [])}, "
                f"report={str(self.files.get('report.html', ''))!r})")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from . import __version__

    v = {
        "deepssim_fast": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
    }
    try:
        import matplotlib

        v["matplotlib"] = matplotlib.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


_OUTPUT_FILES = ("matches.csv", "summary.json", "histogram.png", "gallery.png", "report.html", "evaluation.json")


def _state_digest(fingerprint: dict) -> str:
    """What summary.json records of the run's configuration (evaluate checks it against OUT/work)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# Settings that change only what the search counts over all pairs (class counts, histogram): not the items,
# their pixels, the top-k or the verified SSIM of a candidate.
_SEARCH_COUNTS_ONLY = ("thresholds", "bins")


def _engine_token(backend: str | None, device: Any, metric: str) -> dict:
    """What decides the engines of a run, for its fingerprint: the engine the SSIM and search calls resolve
    to for the audit's host data (the argument, else ``$DEEPSSIM_FAST_BACKEND``, else native where the
    extension is, else torch), and, for ``metric="deepssim"``, the encoder's device (None and "cuda" written as
    the device they mean, so that the same engine asked for in other words is no change)."""
    import torch

    from .backends import resolve

    token = {"backend": resolve(backend, [np.empty(0)])}
    if metric == "deepssim":
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        token["device"] = str(dev)
    return token


def _warn_undiscriminating_search(pair_counts: dict, n_train: int, n_synth: int, metric: str, verify: str) -> None:
    """Warn when the search scores at least half of all pairs a duplicate. An encoder that tells images apart
    scores most pairs of different images low; one trained for a few steps scored all 140 pairs of an audit
    duplicate, blank images included, and with ``--verify none`` (labels from the search) the audit reported
    100 % memorised without a word (the demo warned; the audit did not)."""
    n_pairs = n_train * n_synth
    dup = int(pair_counts.get("duplicate", 0))
    # (embedding searches only: exact SSIM is the label's own score, and registered anatomy correlates highly)
    if metric not in ("deepssim", "embeddings") or n_train < 4 or n_pairs < 100 or dup < 0.5 * n_pairs:
        return
    what = {"deepssim": "the encoder's embeddings", "embeddings": "the given embeddings"}[metric]
    labels = ("the labels are these scores (--verify none): the fraction memorised means little"
              if verify == "none" else "the labels come from exact SSIM, which does not depend on it")
    logger.warning("the search on %s scores %d of %d pairs (%.0f %%) a duplicate: they do not tell these images "
                   "apart (an encoder barely trained, or trained on other images or another size?); %s", what, dup,
                   n_pairs, 100.0 * dup / n_pairs, labels)


# the run fingerprint's keys, as a warning names them (see audit(): fingerprint)
_FINGERPRINT_NAMES = {"v": "audit format", "chunk": "chunk size", "files": "input files", "train": "training items",
                      "synth": "synthetic items", "policy": "slice policy", "size": "item size",
                      "preprocess": "preprocessing version", "shifts": "verify shifts", "flips": "verify flips",
                      "rotations": "verify rotations", "reader": "image reader version"}


def _clear_stage_files(work: Path, *, keep_verified: bool) -> None:
    """Remove the outputs in ``work.parent`` and the stage files in ``work`` that belong to another
    configuration: the searches and their shard folders, and (unless ``keep_verified``) the verified chunks
    and the pixel stores. The per-file caches (decoded items, embeddings) are keyed by content and stay."""
    for name in _OUTPUT_FILES:  # (first: an interrupted rerun must not leave them beside its work)
        (work.parent / name).unlink(missing_ok=True)
    stale = sorted(work.glob("search*.npz"))
    if not keep_verified:
        # (the stores' checksums before the stores: a store left without them is built again, never reused)
        stale += (sorted(work.glob("verify_*.npz")) + sorted(work.glob("*_pixels.crc.npy"))
                  + sorted(work.glob("*_pixels.npy")))
    for f in stale:
        f.unlink()
    for d in sorted(work.parent.glob("shards*")):  # the search's (shards) and its variants' folders
        if not _SHARD_FOLDER.fullmatch(d.name) or not d.is_dir():
            continue
        if _audit_shards(d):
            shutil.rmtree(d, ignore_errors=True)
        elif d.is_symlink() and _audit_shards(d, linked=True):  # (a link to scratch: its checkpoints, not it)
            for f in d.iterdir():
                f.unlink(missing_ok=True)
        else:  # (a folder of the user's that has the name: a probe's data/shards of training images was deleted)
            logger.info("leaving %s alone: it holds files that are not all-pairs checkpoints", d)


#: The folders a Dask search keeps its shards in (OUT/shards, and OUT/shards_<variant> for each flip or shift
#: searched, :func:`_search_variants`), and the files it writes there (distributed's ``allpairs-<job>.json``
#: manifests and ``allpairs-<job>-<shard>.npz`` results, and their temporaries ``.<name>.<random>.tmp``). A
#: folder of that name holding anything else is not the audit's: it is neither removed nor left out of the inputs.
_SHARD_FOLDER = re.compile(r"shards(_(hflip|vflip|hvflip|flip\d+|shift\d+))?")
_CHECKPOINT_FILE = re.compile(r"\.?allpairs-[0-9a-f]+(-[\w.-]+)?\.(json|npz)(\.\w+\.tmp)?")


def _audit_shards(d: Path, *, linked: bool = False) -> bool:
    """Whether folder ``d`` holds nothing but a Dask search's checkpoint files (:data:`_CHECKPOINT_FILE`; an
    empty folder too): the audit's to remove and to leave out of its inputs. A link is never the audit's to
    remove; ``linked=True`` asks only whether the search may write into it (OUT/shards linked to a scratch disk:
    its checkpoint files are replaced there, the link and its folder stay)."""
    try:
        return (d.is_dir() and (linked or not d.is_symlink())
                and all(_CHECKPOINT_FILE.fullmatch(f.name) and f.is_file() and not f.is_symlink()
                        for f in d.iterdir()))
    except OSError:
        return False


def _refuse_foreign_files(out: Path, *, owned: bool, shard_folders: Sequence[str]) -> None:
    """ValueError, before any work, where the audit would overwrite or remove files it did not write.

    ``owned``: whether ``out`` was an audit's output folder before this run (:func:`_is_audit_out`, checked
    before this run's lock file makes it one). In an audit's OUT the audit's outputs and OUT/work are its own
    to replace; in any other folder (a project folder given as --out) files of those names are the user's: the
    audit's outputs (matches.csv, ..., and evaluation.json, which it removes), and anything in OUT/work, where
    it keeps its stores and removes stale ones. ``shard_folders``: the shard folders a Dask search of this run
    writes (empty without Dask); one that holds other files than all-pairs checkpoints is refused in any OUT."""
    problems = []
    if not owned and out.is_dir():
        theirs = [n for n in _OUTPUT_FILES if os.path.lexists(out / n)]
        work = out / "work"
        if os.path.lexists(work) and not work.is_dir():
            theirs.append("work (a file; the audit keeps its stores in a folder of that name)")
        elif work.is_dir():
            try:
                inside = sorted(q.name for q in work.iterdir())
            except OSError as exc:
                inside = [f"(unreadable: {one_line(exc)})"]
            if inside:
                more = f" and {len(inside) - 1} more" if len(inside) > 1 else ""
                theirs.append(f"work/{inside[0]}{more} (the audit keeps its stores in OUT/work and removes stale ones)")
        if theirs:
            problems.append(f"{out} is not an audit's output folder (it holds no {_LOCK_FILE}, work/state.json, or "
                            f"summary.json beside matches.csv), but it holds files of the names the audit writes or "
                            f"removes there: {', '.join(theirs)}")
    for name in shard_folders:
        d = out / name
        if os.path.lexists(d) and not _audit_shards(d, linked=True):
            try:
                eg = next((q.name for q in d.iterdir() if not _CHECKPOINT_FILE.fullmatch(q.name)), None)
            except OSError:
                eg = None
            problems.append(f"{d} holds files other than the all-pairs checkpoints that the search on Dask "
                            f"(workers/scheduler) keeps there and removes when the configuration changes"
                            + (f" (e.g. {eg})" if eg else ""))
    if problems:
        raise ValueError("; ".join(problems) + "; nothing was changed: move those files, or give another --out "
                         "(out=): a new folder, or an earlier audit's")


def _stage_state(work: Path, fingerprint: dict, *, owned: bool = True) -> bool:
    """Reset OUT/work when the configuration changed; record the fingerprint. True when OUT/work already
    belonged to this configuration (a resume: its pixel stores, where present, are this configuration's).
    ``owned``: whether OUT was an audit's output folder before this run (:func:`_is_audit_out`); in one that
    was not, nothing is removed (:func:`_refuse_foreign_files` refused files the audit would replace).

    When only the thresholds or bins changed, the search runs again (its class counts and histogram depend
    on them) but the pixel stores and the verified chunks are kept (True): they are the same items, and a
    verified chunk is reused only for the candidates it holds (see :func:`_verify_all`)."""
    state = work / "state.json"
    resumed = False
    if state.exists():
        try:
            old = json.loads(state.read_text())
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            def rest(f: dict) -> dict:
                return {key: v for key, v in f.items() if key not in _SEARCH_COUNTS_ONLY}

            counts_only = isinstance(old, dict) and rest(old) == rest(fingerprint)
            changed = sorted(k for k in set(old or {}) | set(fingerprint)
                             if not isinstance(old, dict) or old.get(k) != fingerprint.get(k))
            names = [_FINGERPRINT_NAMES.get(k, k) + (" (not recorded by the earlier version)"
                                                     if isinstance(old, dict) and k not in old else "")
                     for k in changed]
            what = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if isinstance(old, dict) \
                else "unreadable state.json"
            # (a WARNING: a mistyped option silently threw away hours of finished search and verification)
            if counts_only:
                logger.warning("%s: only the thresholds or bins changed since the last run (%s): searching again "
                               "for the class counts and histogram, keeping the pixel stores and verified SSIM",
                               work, what, extra=_RUN_ONLY)
            else:
                logger.warning("%s: the configuration changed since the last run (%s): its finished search and "
                               "verification are discarded and the audit starts over", work, what,
                               extra=_RUN_ONLY)
            _clear_stage_files(work, keep_verified=counts_only)
            state.unlink()
            resumed = counts_only
        else:
            resumed = True
            logger.warning("%s: resuming the earlier run of this configuration (finished steps are kept)", work,
                           extra=_RUN_ONLY)
    else:
        # outputs without the work folder that made them (deleted to free its stores, or a fresh run into
        # an old OUT): they are not this run's, and an evaluation.json (which the audit does not rewrite)
        # stayed beside the new outputs as if it scored them. The same for a work folder without its
        # state.json: its search and verified chunks were reused under other options (matches.csv with flips
        # and 5 ranks beside a summary saying no flips and k = 3)
        # (only in an audit's OUT: in a folder of the user's, files of these names are the user's, and a shards
        # folder of training images was deleted without a word)
        if owned:
            old_outputs = [work.parent / n for n in _OUTPUT_FILES if (work.parent / n).exists()]
            if old_outputs:
                logger.info("removing the outputs of an earlier run in %s (no record of its configuration in "
                            "%s): %s", work.parent, work, ", ".join(p.name for p in old_outputs))
            _clear_stage_files(work, keep_verified=False)
    work.mkdir(parents=True, exist_ok=True)
    if not resumed:
        # the search variants' embeddings (work/<set>_vectors_<variant>.npy, see _variant_vectors) are kept
        # for a resume or a change of thresholds or bins only: otherwise they may be another encoder's, or
        # other items' of the same count (and with no state, nobody knows whose they are)
        for f in sorted(work.glob("*_vectors_*.npy")):
            f.unlink()
    if not state.exists():
        _atomic_json(state, fingerprint)
    return resumed


def _own_output_paths(out: Path, cache: Path) -> tuple[list[str], list[str]]:
    """(folders, files) the audit writes image-named files to, both as given and resolved: OUT/work (the
    pixel and vector stores), OUT/shards* (those holding only checkpoints, :func:`_audit_shards`), the cache's
    items/ and embeddings/, OUT/histogram.png and OUT/gallery.png. Not OUT itself: OUT may hold the inputs (the
    demo's OUT/data)."""
    folders = [out / "work", cache / "items", cache / "embeddings"]
    # (a shards folder holding anything but the Dask search's checkpoints is not the audit's: its images are inputs)
    folders += [d for d in sorted(out.glob("shards*")) if re.fullmatch(r"shards(_\w+)?", d.name) and _audit_shards(d)]
    files = [out / n for n in _OUTPUT_FILES if n.endswith(".png")]

    def both(ps: list[Path]) -> list[str]:
        return sorted({os.path.abspath(q) for q in ps} | {os.path.realpath(q) for q in ps})

    return both(folders), both(files)


def _drop_own_outputs(sets: dict[str, list[Path]], out: Path, cache: Path) -> dict[str, list[Path]]:
    """Each input set without the audit's own outputs (:func:`_own_output_paths`), so that an OUT (or cache)
    inside an input folder does not make a rerun audit the previous run's figures and stores; one warning
    says how many were left out. A set left with nothing is an error."""
    folders, files = _own_output_paths(out, cache)

    def own(p: Path) -> bool:  # (as given or resolved: one of the files, or in one of the folders)
        return str(p) in files or os.path.realpath(p) in files or _under(p, folders)

    kept: dict[str, list[Path]] = {}
    dropped: list[Path] = []
    for name, paths in sets.items():
        mine = [own(p) for p in paths]
        kept[name] = [p for p, m in zip(paths, mine, strict=True) if not m]
        dropped += [p for p, m in zip(paths, mine, strict=True) if m]
        if not kept[name]:
            raise ValueError(
                f"the {name} set holds only this audit's own outputs (under {out} or the cache {cache}): "
                "give an --out (and --cache-dir) outside the input folders"
            )
    if dropped:
        logger.warning(
            "left out %d input file(s) that are this audit's own outputs (under %s%s), e.g. %s; "
            "an --out outside the input folders avoids this",
            len(dropped), out, "" if cache == out / "cache" else f" and the cache {cache}", dropped[0],
            extra=_RUN_ONLY,
        )
    return _drop_earlier_outputs(kept)


def _is_audit_out(d: Path) -> bool:
    """Whether folder ``d`` is the output folder of an audit (or the demo): its lock file, its work state, or
    its summary and matches beside each other."""
    return ((d / _LOCK_FILE).is_file() or (d / "work" / "state.json").is_file()
            or ((d / "summary.json").is_file() and (d / "matches.csv").is_file()))


class _EarlierOutputs:
    """``finder(p)``: the output folder of an audit (:func:`_is_audit_out`) among the folders enclosing ``p``
    whose stores and figures (:func:`_own_output_paths`) include ``p``, or None; each folder is looked at once
    (10^5 files share few folders)."""

    def __init__(self) -> None:
        self._outs_at: dict[str, tuple[str, ...]] = {}  # folder -> the audit OUTs among it and its ancestors
        self._owned: dict[str, tuple[list[str], list[str]]] = {}

    def _outs_above(self, d: str) -> tuple[str, ...]:
        if d not in self._outs_at:
            up = os.path.dirname(d)
            self._outs_at[d] = (self._outs_above(up) if up != d else ()) + ((d,) if _is_audit_out(Path(d)) else ())
        return self._outs_at[d]

    def __call__(self, p: Path) -> Path | None:
        a = os.path.abspath(p)
        for d in reversed(self._outs_above(os.path.dirname(a))):  # (the nearest first)
            if d not in self._owned:
                self._owned[d] = _own_output_paths(Path(d), Path(d) / "cache")
            folders, files = self._owned[d]
            if a in files or os.path.realpath(p) in files or _under(p, folders):
                return Path(d)
        return None


def _drop_earlier_outputs(sets: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """Each input set without the stores and figures of *other* audits whose output folders lie inside the
    input folders (:func:`_own_output_paths` of each such folder, found by :func:`_is_audit_out`): an audit
    into gen/audit1 and then one into gen/audit2 read audit1's gallery, histogram and pixel stores as 58 more
    synthetic items (7.7 % memorised instead of 50 %; with --axis 0, audit1's stored training pixels came back
    as exact copies: 69.6 %). One warning per such folder names it. A set left with nothing is an error."""
    earlier_out = _EarlierOutputs()
    kept: dict[str, list[Path]] = {}
    by_out: dict[Path, list[Path]] = {}
    for name, paths in sets.items():
        kept[name] = []
        for p in paths:
            d = earlier_out(p)
            if d is None:
                kept[name].append(p)
            else:
                by_out.setdefault(d, []).append(p)
        if not kept[name] and paths:
            raise ValueError(f"the {name} set holds only the outputs of earlier audits (under "
                             f"{', '.join(str(d) for d in by_out)}): give the folders of the images to audit")
    for d, ps in by_out.items():
        logger.warning("left out %d input file(s) that are the stores and figures of an earlier audit's output "
                       "folder %s, e.g. %s; an --out outside the input folders avoids this", len(ps), d, ps[0])
    return kept


def _chunk_hook(stage: str, index: int) -> None:
    """Called after every finished chunk (a seam for fault-injection tests)."""


class OutputInUse(RuntimeError):
    """Another audit is writing to the same output folder."""


#: The lock descriptors this process holds (:func:`_out_lock`). An flock belongs to the open file description,
#: which a forked child shares: the decode workers (DataLoader processes, forked) kept OUT locked for ~5 s after
#: the audit was killed (SIGKILL), until their watchdog ended them. Every forked child closes its copies at once
#: (:func:`_close_locks_in_child`; closing a copy does not release the parent's lock, an unlock would); a spawned
#: or exec'd one never has them (Python opens them close-on-exec).
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` (on this machine) is running; None where that cannot be told."""
    if os.name != "posix":  # (signal 0 is CTRL_C_EVENT on Windows)
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's)
        return True
    except (OSError, ValueError, OverflowError):
        return None
    return True


@contextlib.contextmanager
def _out_lock(out: Path, command: str = "audit") -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (``out/.deepssim_fast.lock``, an ``flock``) for one audit: two audits into
    one OUT (a rerun with other thresholds started beside the first) reset each other's work folder, and
    the survivor kept the other's counts under its own state, on every rerun. The second now stops at once,
    naming the process that holds it (and saying so when that process is no longer running). ``command``:
    ``"audit"`` or ``"evaluate"`` (which reads an audit's results and must not run beside an audit rewriting
    them), recorded beside the process id. Where the file system has no locks (ENOLCK, some network mounts) the
    audit goes on with a warning. Forked children do not keep the lock (:data:`_LOCK_FDS`)."""
    try:
        import fcntl
    except ImportError:  # (no flock: not a POSIX system)
        yield
        return
    writable = True
    try:
        fd = os.open(out / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as exc:
        if not (out / _LOCK_FILE).exists():  # (an OUT this user cannot write in: the read-only retry below said
            # "No such file or directory" of the lock file)
            raise PermissionError(exc.errno, f"{exc.strerror}: cannot write in this output folder",
                                  str(out)) from exc
        # another user's lock file in a shared, group-writable folder: flock works on a read-only descriptor
        # (evaluate then failed at the lock before any work, though it could write evaluation.json)
        fd = os.open(out / _LOCK_FILE, os.O_RDONLY)
        writable = False
    _LOCK_FDS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUse(_in_use(out, os.pread(fd, 64, 0).decode(errors="replace"), command)) from None
        except OSError as exc:
            logger.warning("could not lock %s (%s): do not run two audits into it at once", out, exc, extra=_RUN_ONLY)
        else:
            if writable:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (f"{os.getpid()}" + ("" if command == "audit" else f" {command}") + "\n").encode(), 0)
        yield
    finally:
        if fd in _LOCK_FDS:  # (a forked child that came here has closed its copy already)
            _LOCK_FDS.discard(fd)
            os.close(fd)  # (releases the lock)


def _in_use(out: Path, record: str, command: str) -> str:
    """The error of ``command`` ("audit", "evaluate") finding ``out`` locked, from the lock file's ``record``
    ("<pid>" of an audit, "<pid> evaluate" of an evaluation)."""
    pid, _, what = record.strip().partition(" ")
    holder = {("audit", "audit"): "another audit", ("audit", "evaluate"): "an evaluation",
              ("evaluate", "audit"): "an audit", ("evaluate", "evaluate"): "another evaluation"}[
        (command, "evaluate" if what.strip() == "evaluate" else "audit")]
    alive = _pid_alive(int(pid)) if pid.isdigit() and int(pid) > 0 else None
    if alive is False:  # (the lock outlived its process: a child of it still has the lock file open)
        children = "its child processes" if what.strip() == "evaluate" else "its decode workers"
        # (or the holder runs on another machine or in another container sharing this folder, where its process
        # id means nothing here: then it is running, and the lock is not stale)
        return (f"{out} is in use: its lock {out / _LOCK_FILE} is held by process {pid}, which is not running on "
                f"this machine. If {holder} into it runs on another machine or container, wait for it to finish; "
                f"otherwise {children} may still be exiting: retry in a few seconds")
    if command == "evaluate":
        return (f"{out} is in use by {holder} (process {pid or '?'}), which may be rewriting the results evaluate "
                "reads; wait for it to finish, then evaluate again")
    return f"{out} is in use by {holder} (process {pid or '?'}); wait for it to finish, or give another --out (out=)"


_LOCK_FILE = ".deepssim_fast.lock"
_LOCKS: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar("_LOCKS", default=None)


def _holding_out_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``audit`` with a place for its lock (:func:`_lock_out`, taken once its arguments are checked and OUT
    exists), released when it returns or raises."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _LOCKS.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _LOCKS.reset(token)

    return run


#: ``extra=`` of a warning about the run itself rather than its results (a resume, a cache entry decoded again,
#: the lock, the audit's own outputs left out of its inputs) or about what summary.json lists apart (the skipped
#: inputs): it goes to the log only, not into summary.json's "warnings" (and a resumed run's summary and report
#: read as an uninterrupted run's)
_RUN_ONLY = {"audit_result": False}

#: The loggers whose warnings an audit reports (summary.json's "warnings", report.html): the audit's own,
#: reading the inputs (files of formats not read, folders not searched) and the encoder's (its preprocessing)
_REPORTED_LOGGERS = ("deepssim_fast.audit", "deepssim_fast.io", "deepssim_fast.model")


class _WarningLog(logging.Handler):
    """The text of every warning (WARNING and above) logged in one thread by :data:`_REPORTED_LOGGERS` that is
    not :data:`_RUN_ONLY`, in order, each once: another audit running in another thread of the process logs
    into its own. It sees what is logged: a logging setup that silences deepssim_fast's warnings (a level
    above WARNING) leaves them out of it too."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread or not getattr(record, "audit_result", True):
            return
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call is logging's to report, not the audit's to fail on
            self.handleError(record)
            return
        if text not in self.messages:
            self.messages.append(text)


_WARNED: contextvars.ContextVar[_WarningLog | None] = contextvars.ContextVar("_WARNED", default=None)


def _collecting_warnings(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``audit`` with its warnings collected (:class:`_WarningLog`) for :func:`_audit_warnings`.

    Every run collects its own from the start: discovery, decoding (from the cache too) and the search log
    theirs again on a resume, so the warnings of a run resumed after an interruption are those of a run that
    was not interrupted, neither lost nor twice. (Kept from the interrupted part instead, they would outlive
    their cause: a .dcm file deleted before the rerun leaves the files audited, and so the resume, the same.)"""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from .io import reset_warnings

        reset_warnings()  # (each audit names its own files of the kind io says a few of)
        log = _WarningLog()
        loggers = [logging.getLogger(name) for name in _REPORTED_LOGGERS]
        for lg in loggers:
            lg.addHandler(log)
        token = _WARNED.set(log)
        try:
            return fn(*args, **kwargs)
        finally:
            _WARNED.reset(token)
            for lg in loggers:
                lg.removeHandler(log)

    return run


def _audit_warnings() -> list[str]:
    """The warnings the audit in progress has logged so far (see :class:`_WarningLog`); none outside one."""
    log = _WARNED.get()
    return list(log.messages) if log is not None else []


def _lock_out(out: Path, made: Path | None = None) -> None:
    """Take :func:`_out_lock` of ``out`` until the audit in progress returns. ``made``: the topmost folder this
    audit created for ``out`` (``out`` itself, or an ancestor it made with it); if ``out`` still holds nothing but
    the lock file when the audit ends (an error before any work: a missing model, a bad argument), it goes, and
    so do the empty folders made for it up to ``made``: a failed call leaves no folder behind."""
    stack = _LOCKS.get()
    if stack is not None:
        stack.enter_context(_out_lock(out))
        if made is not None:
            stack.callback(_drop_if_only_the_lock, out, made)


def _drop_if_only_the_lock(out: Path, made: Path) -> None:
    try:
        if [q.name for q in out.iterdir()] != [_LOCK_FILE]:
            return
        (out / _LOCK_FILE).unlink()
        for folder in (out, *out.parents):
            folder.rmdir()  # (OSError when not empty: something else was put there; it stays)
            if folder == made:
                break
    except OSError:  # (someone else's file appeared, or the folder went: leave it)
        pass


@_collecting_warnings
@_holding_out_lock
def audit(
    train: Spec,
    synth: Spec,
    *,
    model: Any = None,
    metric: str = "deepssim",
    k: int = 5,
    thresholds: Sequence[float] = (0.6, 0.85),
    verify: str = "ssim",
    out: str | os.PathLike = "audit_out",
    workers: int | None = None,
    scheduler: Any = None,
    policy: SlicePolicy | None = None,
    mode: str = "slices",
    size: Sequence[int] | None = None,
    verify_shifts: int = 0,
    verify_flips: bool = False,
    verify_rotations: float = 0.0,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = None,
    decode_workers: int = 0,
    batch_size: int = 64,
    chunk_size: int = 256,
    bins: int = 200,
    gallery: int = 12,
    device: Any = None,
    backend: str | None = None,
    progress: bool = True,
) -> AuditResult:
    """Audit ``synth`` against ``train`` for memorised copies and write the report to ``out``.

    Args:
        train, synth: a directory, glob pattern, file, or list of these (.nii/.nii.gz/.png/.npy).
        model: for ``metric="deepssim"``: a checkpoint / TorchScript path or a loaded model (required; with
            another metric, which does not embed, giving one is an error).
        metric: ``"deepssim"`` (encoder cosine), ``"ssim"`` (exact SSIM all pairs; small sets),
            ``"correlation"`` (pixel Pearson correlation), ``"embeddings"`` (cosine of user .npy rows).
        k: candidates kept per synthetic item (clipped to the training set size).
        thresholds: (low, high) label thresholds, see the module docstring.
        verify: ``"ssim"`` (re-score candidates with exact SSIM) or ``"none"`` (label from the search score).
        out: output directory (created). workers / scheduler: run the cosine search (metrics deepssim,
            correlation, embeddings) on Dask (:func:`deepssim_fast.distributed.all_pairs_distributed`, shards
            checkpointed in ``out/shards``); the ``ssim`` metric's exact search runs in this process, and
            giving them with it is an error.
        policy: slice policy (mode "slices"). mode: ``"slices"`` or ``"volumes"`` (3D; every frame of a 4D
            file is a volume).
        size: common item shape (centre crop/pad), positive integers; None = the first training item's
            shape. With exact SSIM (metric ``ssim`` or ``verify='ssim'``) every side must be at least the
            7-pixel SSIM window (an error names the item the size came from).
        verify_shifts, verify_flips, verify_rotations: transforms searched during verification (shifts in
            pixels, less than half of every side of the item size; rotations in degrees, 2D only; see
            :func:`verify_pairs`). Flips are horizontal, vertical and both for slices, along each axis and
            each set of axes for volumes (7 mirrors). With ``verify_flips`` the candidate search is
            flip-aware too: the flipped synthetic items are searched as well and each pair keeps its best
            score (the histogram and ``pair_counts_search`` stay the unflipped search's; each flipped search's own
            are beside them); with ``verify_shifts`` it is shift-aware the same way (the
            items translated by ±verify_shifts pixels: 8 more searches in 2D, 6 in 3D, each costing one
            embedding pass over the synthetic set for ``deepssim``, and for ``ssim`` one more exact SSIM
            search over all pairs). ``embeddings`` has no pixels to transform.
        strict: abort on the first unreadable file (or, for ``correlation``, constant item; for
            ``embeddings``, file of another width) instead of skipping it.
        cache_dir: per-file decode/embedding cache (default ``out/cache``).
        decode_workers: DataLoader worker processes for decoding. batch_size: encoder batch size.
        chunk_size: synthetic items per search/verification chunk (the unit of resume).
        bins: histogram bins over [-1, 1]. gallery: number of suspected copies shown.
        device: torch device of the encoder (``deepssim``; default CPU). backend: SSIM and all-pairs engine
            (``"native"``, ``"torch"``, ``"triton"``; default by where the data lives). progress: progress
            bars on a terminal.

    Returns:
        :class:`AuditResult`; the files are matches.csv, summary.json, histogram.png, gallery.png,
        report.html in ``out``.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    if mode not in ("slices", "volumes"):
        raise ValueError(f"mode must be 'slices' or 'volumes', got {mode!r}")
    spatial_dims = 3 if mode == "volumes" else 2
    if mode == "volumes" and metric not in ("ssim", "correlation"):
        raise ValueError(f"mode='volumes' supports metric 'ssim' or 'correlation' (3D), not {metric!r}")
    if metric == "embeddings" and verify != "none":
        raise ValueError(
            "metric='embeddings' has no pixels to verify: pass verify='none' (command line: --verify none)"
        )
    if metric != "deepssim" and model is not None:  # (it would be silently unused)
        raise ValueError(
            f"model is used by metric='deepssim' only; metric={metric!r} does not embed: drop model (--model) "
            "or use metric='deepssim'"
        )
    if metric != "deepssim" and device is not None and str(device).split(":")[0] != "cpu":
        # (device="cuda" placed nothing: the CPU engine ran, without a word; "cpu" is what runs anyway)
        raise ValueError(
            f"device is the encoder's, used by metric='deepssim' only; metric={metric!r} does not embed: drop "
            f"device (--device {device}); for its SSIM and search on a GPU, give backend='triton' "
            "(--backend triton)"
        )
    if metric == "deepssim" and model is None:
        raise ValueError(
            "metric='deepssim' needs a model: a checkpoint or TorchScript path (train one with "
            "`deepssim-fast train`), or use metric='ssim' / 'correlation' without a model"
        )
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    # (checked before any decoding: the search is reached after the whole decode and embedding; and with flips
    # or shifts one local cluster was started for workers=, leaving the scheduler given beside it unused)
    from .distributed import check_cluster_options  # (imports no Dask)

    check_cluster_options(workers, scheduler)  # (first: workers=0 is a bad count, whatever the metric)
    if metric == "ssim" and (workers is not None or scheduler is not None):
        raise ValueError(
            "workers/scheduler shard the cosine search of the deepssim, correlation and embeddings metrics on "
            "Dask; the ssim metric's exact SSIM search runs in this process (its chunks resume from OUT/work): "
            "drop workers/scheduler, or use metric 'deepssim' or 'correlation'"
        )
    if scheduler is not None:
        # its type and whether a scheduler answers, now: a LocalCluster object, an int, an address where none
        # listens, a closed Client were found only at the search, after the decoding and the embedding (work
        # files written)
        from .distributed import check_scheduler

        check_scheduler(scheduler)
    for name, value in (("verify_flips", verify_flips), ("strict", strict), ("progress", progress)):
        check_bool(value, name)  # (strict="no" was strict, by its truth value)
    for name, value, least in (("verify_shifts", verify_shifts, 0), ("chunk_size", chunk_size, 1),
                               ("batch_size", batch_size, 1), ("bins", bins, 1), ("gallery", gallery, 0)):
        # whole numbers only: a shift of 2.5 pixels failed deep in verification ("arrays used as indices must
        # be of integer type"), a chunk size of 2.5 in range()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if size is not None and (
        len(tuple(size)) != spatial_dims
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise ValueError(
            f"size must be {spatial_dims} positive integers (the item shape for mode={mode!r}), "
            f"got {tuple(size)}"
        )
    if not isinstance(decode_workers, (int, np.integer)) or decode_workers < 0:
        raise ValueError(f"decode_workers must be a non-negative integer (0: decode in this process), "
                         f"got {decode_workers!r}")
    if not np.isfinite(verify_rotations) or not 0 <= verify_rotations <= 180:
        # (a turn of more than 180 degrees is a smaller one the other way: 400 was accepted)
        raise ValueError(f"verify_rotations (--verify-rotations) must be a number of degrees in [0, 180] (small "
                         f"rotations: a few degrees), got {verify_rotations!r}")
    if mode == "volumes" and verify_rotations:
        raise ValueError("verify_rotations applies to 2D slices only, not mode='volumes'")
    if verify == "none" and verify_rotations:
        raise ValueError(
            "verify_rotations (--verify-rotations) is applied when verifying (verify='ssim', --verify ssim); with "
            "verify='none' (--verify none) it would be ignored: drop it, or verify with exact SSIM"
        )
    if verify == "none" and metric in ("ssim", "embeddings") and (verify_flips or verify_shifts):
        # (embedding rows have no pixels: neither verification nor the correlation metric can apply to them)
        remedy = ("drop verify_flips/verify_shifts (embedding rows have no pixels to flip or shift)"
                  if metric == "embeddings" else
                  "drop verify_flips/verify_shifts, verify with exact SSIM (verify='ssim'), or use metric "
                  "'correlation'")
        raise ValueError(
            f"with verify='none' flips and shifts are tried by the search, which metric {metric!r} does not do "
            f"(with verify='none' only 'deepssim' and 'correlation' search transformed items): they would be "
            f"ignored; {remedy}"
        )
    th = _check_thresholds(thresholds)
    if th[1] >= 1.0:  # (duplicate means a score above high, and no score is above 1: 0 % memorised, always)
        logger.warning("thresholds %s: the high threshold is 1, and an item's score is at most 1, so no item "
                       "can be labelled duplicate (give a high threshold below 1, e.g. 0.85)", th)
    if mode == "volumes" and policy is not None and policy != SlicePolicy():
        # (they were accepted without a word, and still changed the saved search's key)
        logger.warning("mode='volumes' compares whole volumes: the slice policy (%s; --axis, --slice-*, "
                       "--min-foreground) is ignored", policy)
    policy = policy or SlicePolicy()
    policy_token = policy.token() if mode == "slices" else "volumes"
    # the engine and the device by name, before any decoding (a bad --backend was found after it)
    import torch

    from .backends import BACKENDS

    if backend not in (None, "auto") and backend not in BACKENDS:
        raise ValueError(f"backend (--backend) {backend!r} is not one of {BACKENDS} (or 'auto')")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"device (--device) {device!r} is not a torch device ({one_line(exc)[:80]}...); "
                             "give e.g. 'cpu' or 'cuda'") from exc
    out = Path(out)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    for folder, what, option in ((out, "output folder", "out (--out)"),
                                 (cache, "cache folder", "cache_dir (--cache-dir)")):
        blocker = file_in_the_way(folder, itself=True)
        if blocker is not None:  # (mkdir would say only "[Errno 17] File exists" or "Not a directory")
            where = "" if blocker == folder else f": {blocker} is not a directory"
            made = "is an existing file, not a folder" if blocker == folder else "cannot be made"
            raise ValueError(f"{what} {folder} {made}{where}; give a folder for {option}")
    # whether OUT is an audit's, known before this run's lock file makes it one: only then are the files of the
    # audit's names in it (outputs, OUT/work, shard folders) the audit's to replace or remove; in another folder
    # files of those names are refused before any work, and left alone
    owned = _is_audit_out(out)
    dask = metric != "ssim" and (workers is not None or scheduler is not None)
    shard_folders = ["shards"] + [f"shards_{v}" for v, _, _ in
                                  _search_variants(metric, verify_flips, verify_shifts, spatial_dims)]
    _refuse_foreign_files(out, owned=owned, shard_folders=shard_folders if dask else [])
    made = next((q for q in reversed((out, *out.parents)) if not q.exists()), None)  # (the topmost new folder)
    out.mkdir(parents=True, exist_ok=True)
    _lock_out(out, made)  # (before anything in OUT is touched: a second audit stops here)
    work = out / "work"
    # temporary files of a run killed mid-write: in OUT those of the audit's own outputs only (OUT may be a
    # folder of the user's), in OUT/work any
    remove_temporaries(out, _OUTPUT_FILES)
    remove_temporaries(work)
    # and in the cache, which other audits may be writing to right now, those too old to be a running write's
    for sub in ("items", "embeddings"):
        remove_temporaries(cache / sub, older_than=_CACHE_TMP_AGE_S)
    _remove_legacy_entries(cache)

    t0 = time.perf_counter()
    # the .npz stores of this audit and of earlier audits into folders inside the inputs are no unread images
    # of the user's (an earlier audit's were named in the warning about image formats this tool does not read)
    own_folders = _own_output_paths(out, cache)[0]  # (absolute, as given and resolved)
    earlier = _EarlierOutputs()

    def is_output(q: Path) -> bool:
        return _under(q, own_folders) or earlier(q) is not None

    found = _drop_own_outputs(
        {"train": discover(train, outputs=is_output), "synth": discover(synth, outputs=is_output)}, out, cache
    )
    train_paths, synth_paths = found["train"], found["synth"]
    _warn_shared_files(train_paths, synth_paths)
    timings["discover"] = time.perf_counter() - t0
    logger.info(
        "audit: %d training files, %d synthetic files, metric %s", len(train_paths), len(synth_paths), metric
    )

    # The input files' identities, taken before they are read: a file rewritten while the audit decodes (a
    # generator still writing its samples) then no longer matches on the rerun, which decodes it again. Taken
    # after decoding, they recorded the new file beside results of the old content, and every rerun resumed
    # them.
    files_digest = hashlib.sha256(
        "\n".join(_file_key(p, policy_token) for p in (*train_paths, *synth_paths)).encode()
    ).hexdigest()

    model_obj, model_path, model_hash = (None, None, None)
    if metric == "deepssim":
        model_obj, model_path, model_hash = _load_model(model)

    # ---- decode + cache ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    fit: tuple[int, ...] | None = tuple(int(s) for s in size) if size is not None else None
    if metric == "embeddings":
        tset = _load_embeddings("train", train_paths, strict=strict)
        sset = _load_embeddings("synth", synth_paths, strict=strict, width=int(tset.vectors.shape[1]))
        work.mkdir(parents=True, exist_ok=True)
    else:
        if fit is None:
            fit, first = _first_item_shape(train_paths, mode=mode, policy=policy)
            origin = f"the shape of the first training item {first}"
        else:
            origin = "the size asked for"
        if fit is not None and (metric == "ssim" or verify == "ssim"):
            _check_item_size(fit, origin, mode=mode)
        if fit is not None and verify_shifts and 2 * verify_shifts >= min(fit):
            # the best shift is found by circular cross-correlation: a shift d and d - n of an n-pixel side
            # score the same, so from n/2 on the scan picked the wrong one of the two (a copy shifted by 3 px
            # of a 29-pixel item, verified with 28, was 'none', SSIM 0.09), and from n on _shift failed
            # ('could not broadcast input array')
            raise ValueError(
                f"verify_shifts {verify_shifts} (--verify-shifts) must be less than half of every side of the "
                f"item size {fit} ({origin}): a shift of half a side or more leaves most of the item out of the "
                "overlap it is scored on; give a smaller shift or a larger --size (size=)"
            )
        t_entries, fit, t_skip, t_heads = _decode_all(
            "train",
            train_paths,
            mode=mode,
            policy=policy,
            size=fit,
            cache=cache,
            strict=strict,
            workers=decode_workers,
            progress=progress,
        )
        if fit is None:
            raise ValueError(
                f"the train set has no usable items ({len(train_paths)} files; skipped: "
                + "; ".join(r for _, r in t_skip[:5])
                + ")"
            )
        s_entries, _, s_skip, s_heads = _decode_all(
            "synth",
            synth_paths,
            mode=mode,
            policy=policy,
            size=fit,
            cache=cache,
            strict=strict,
            workers=decode_workers,
            progress=progress,
        )
        work.mkdir(parents=True, exist_ok=True)
        opts = {"mode": mode, "drop_constant": metric == "correlation", "strict": strict}
        tset = _build_items("train", train_paths, t_entries, fit, work, t_skip, heads=t_heads, **opts)
        sset = _build_items("synth", synth_paths, s_entries, fit, work, s_skip, heads=s_heads, **opts)
        if metric != "correlation":  # (which skips them, each named among the skipped inputs)
            _warn_constant_items(tset, sset)
        _warn_orientations([("training", train_paths, t_entries, t_heads),
                            ("synthetic", synth_paths, s_entries, s_heads)], verify_flips)
    timings["decode"] = time.perf_counter() - t0
    if len(tset) == 0 or len(sset) == 0:  # pragma: no cover - _build_items raises first
        raise ValueError("empty input set")

    fingerprint = {
        "v": _FORMAT_VERSION,
        "metric": metric,
        "k": int(k),
        "thresholds": list(th),
        "verify": verify,
        "mode": mode,
        "size": list(fit) if fit else None,
        "policy": policy_token,
        "flips": bool(verify_flips),
        "shifts": int(verify_shifts),
        "rotations": float(verify_rotations),
        "bins": int(bins),
        "model": model_hash,
        "train": hashlib.sha256(os.fsencode("\n".join(tset.ids))).hexdigest(),
        "synth": hashlib.sha256(os.fsencode("\n".join(sset.ids))).hexdigest(),
        "chunk": int(chunk_size),
        # the engines: a resume with another --backend (or $DEEPSSIM_FAST_BACKEND, or a node without the
        # native extension) mixed two engines' scores in one matches.csv; for deepssim, the encoder's device
        "engine": _engine_token(backend, device, metric),
        **({"preprocess": _preprocess_version()} if metric == "deepssim" else {}),  # (its embeddings' version)
        # file identities (path, size, mtime, ctime, inode, policy): a changed file invalidates the saved search
        "files": files_digest,
        "reader": _READER_VERSION,  # (named in the message when it changes, rather than 'input files' alone)
    }
    t0 = time.perf_counter()
    resumed = _stage_state(work, fingerprint, owned=owned)
    if metric != "embeddings":  # the pixel stores, only now that work/ belongs to this configuration
        for items in (tset, sset):  # (a resume keeps the stores it finished: 10^5 items are ~26 GB to rewrite)
            if not (resumed and _pixels_stored(items, work)):
                _write_pixels(items, work)
    timings["stores"] = time.perf_counter() - t0  # (it fell between the timed phases: 4.5 s of 79 at 10^5 items)

    # ---- embed -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if metric == "deepssim":
        # (the items the model's size policy crops or pads past half are said once, with their number among all
        # the items, also when their embeddings are cached; the embed calls themselves say nothing: _embed)
        _warn_encoder_fit(model_obj, fit, len(tset) + len(sset))
        for side, paths, entries in ((tset, train_paths, t_entries), (sset, synth_paths, s_entries)):
            side.vectors = _embed_items(side, paths, entries, model_obj, model_hash, cache=cache,
                                        batch_size=batch_size, device=device, progress=progress)
    # (correlation: the centred rows are made where the search needs them, not on a rerun that reuses it)
    timings["embed"] = time.perf_counter() - t0
    _atomic_json(
        work / "items.json",
        {s.name: {"ids": s.ids, "paths": s.paths, "indices": s.indices,
                  **({"fit": s.fit.tolist()} if s.fit is not None else {})} for s in (tset, sset)},
    )
    for s in (tset, sset):
        if s.vectors is not None and metric != "correlation":
            buf = _io.BytesIO()
            np.save(buf, s.vectors)
            _atomic_bytes(work / f"{s.name}_vectors.npy", buf.getvalue())

    # ---- search ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    kk = int(min(k, len(tset)))
    if kk < k:  # (it was clamped without a word; the summary said "top 20" only)
        logger.warning("k=%d is more than the %d training items: every training item is kept for each synthetic "
                       "item (k=%d)", k, len(tset), kk)
    search_file = work / "search.npz"
    variants = _search_variants(metric, verify_flips, verify_shifts, spatial_dims, sset.fit)
    res = _saved_search(search_file, len(sset), kk)
    if res is not None and variants and verify == "none" and res.transforms is None:
        # saved before the search recorded which transform gave each score (matches.csv's transform with
        # verify='none'): searched again (the shards of a Dask search are reused)
        logger.info("%s does not record the searched transforms: searching again", search_file)
        res = None
    if res is not None and variants and res.variant_counts is None:
        # saved before each transformed search's own counts were kept (summary.json's pair_counts_search_variants):
        # searched again (the chunks of an exact SSIM search, the shards of a Dask search and the variants'
        # embeddings are reused)
        logger.info("%s does not record the counts of the flip/shift searches: searching again", search_file)
        res = None
    if res is None and metric == "ssim":
        res = _ssim_search(
            tset,
            sset,
            k=kk,
            thresholds=th,
            bins=bins,
            chunk_size=chunk_size,
            spatial_dims=spatial_dims,
            work=work,
            backend=backend,
            progress=progress,
        )
        # flip- and shift-aware candidates (verify='ssim' only; see _search_variants): the exact SSIM search
        # once more per transform of the synthetic items, each pair keeping its best score; the histogram
        # and pair counts stay the plain search's (each variant's own are kept beside them)
        for vname, tname, fn in variants:
            rv = _ssim_search(tset, sset, k=kk, thresholds=th, bins=bins, chunk_size=chunk_size,
                              spatial_dims=spatial_dims, work=work, backend=backend, progress=progress,
                              transform=fn, tag=f"{vname}_")
            res = _merge_topk(res, rv, kk, tname)
        res.save(search_file)
    elif res is None:
        with contextlib.ExitStack() as stack:
            if metric == "correlation":  # file-backed rows under OUT/work, removed after the search
                for s in (tset, sset):
                    s.vectors = _centred_rows(s.pixels, s, out=stack.enter_context(_row_store(work, s.name, s)))
                stack.callback(lambda: setattr(tset, "vectors", None) or setattr(sset, "vectors", None))
            w, sch = workers, scheduler
            if workers is not None and variants:  # one embedded cluster for the plain search and every variant
                from .distributed import cluster_client

                w, sch = None, stack.enter_context(cluster_client(workers=workers))
            res = _cosine_search(
                tset.vectors,
                sset.vectors,
                k=kk,
                thresholds=th,
                bins=bins,
                backend=backend,
                progress=progress,
                workers=w,
                scheduler=sch,
                shard_dir=out / "shards",
            )
            # flip- and shift-aware candidates: also search with transformed synthetic items (flips; translations
            # by ±verify_shifts) and keep each pair's best score and the transform that gave it; the histogram
            # stays that of the plain search (each variant's own is kept beside it)
            if variants:
                from tqdm import tqdm

                # one bar over every transformed synthetic item (each variant: transform, embed, search)
                bar = tqdm(
                    total=len(variants) * len(sset),
                    desc="flip/shift search",
                    unit="item",
                    disable=None if progress else True,
                )
                try:
                    for vname, tname, fn in variants:
                        bar.set_postfix_str(vname, refresh=False)
                        with contextlib.ExitStack() as vstack:  # (correlation: the variant's rows in a file)
                            rows = (vstack.enter_context(_row_store(work, f"{sset.name}_{vname}", sset))
                                    if metric == "correlation" else None)
                            vv = _variant_vectors(
                                work, vname, sset, fn, metric=metric, model=model_obj, batch_size=batch_size,
                                device=device, bar=bar, rows_out=rows,
                            )
                            rv = _cosine_search(
                                tset.vectors, vv, k=kk, thresholds=th, bins=bins, backend=backend,
                                progress=False, workers=w, scheduler=sch, shard_dir=out / f"shards_{vname}",
                            )
                            res = _merge_topk(res, rv, kk, tname)
                            del vv, rv, rows  # (before the next variant's: a third copy of the pixels otherwise)
                finally:
                    bar.close()
        res.save(search_file)
    if not (np.isfinite(res.scores).all() and (res.indices >= 0).all() and (res.indices < len(tset)).all()):
        raise RuntimeError(
            f"the search returned invalid results (non-finite scores or indices outside "
            f"0..{len(tset) - 1}); delete {search_file} and rerun"
        )
    timings["search"] = time.perf_counter() - t0

    # ---- verify ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if verify == "ssim":
        ver, trans = _verify_all(
            tset,
            sset,
            res,
            spatial_dims=spatial_dims,
            flips=verify_flips,
            shifts=verify_shifts,
            rotations=verify_rotations,
            chunk_size=chunk_size,
            work=work,
            backend=backend,
            progress=progress,
            variants=variants,
        )
    else:  # the searched transform that gave the score, if the search tried any
        ver = np.full(res.scores.shape, np.nan)
        trans = res.transforms if res.transforms is not None else np.full(res.scores.shape, "", dtype=object)
    timings["verify"] = time.perf_counter() - t0

    # ---- report ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    decision = ver if verify == "ssim" else res.scores.astype(np.float64)
    labels = label_of(decision, th)
    best_rank = np.argmax(np.where(np.isfinite(decision), decision, -np.inf), axis=1)  # first max on ties
    per_sample = labels[np.arange(len(sset)), best_rank]
    counts = {n: int((per_sample == i).sum()) for i, n in enumerate(LABELS)}
    files = {
        name: out / name
        for name in _OUTPUT_FILES[:-1]  # (evaluation.json: written by evaluate)
    }
    _write_matches(files["matches.csv"], tset, sset, res, ver, labels, trans, verify, th, best_rank)
    skipped = [{"set": "train", "path": p, "reason": r} for p, r in tset.skipped] + [
        {"set": "synth", "path": p, "reason": r} for p, r in sset.skipped
    ]
    _warn_undiscriminating_search(res.class_counts, len(tset), len(sset), metric, verify)
    summary = {
        "format_version": _FORMAT_VERSION,
        "state": _state_digest(fingerprint),
        "metric": metric,
        "search_score": {
            "deepssim": "cosine of encoder embeddings",
            "embeddings": "cosine of given embeddings",
            "correlation": "Pearson correlation of pixels",
            "ssim": "SSIM (preset deepssim)",
        }[metric],
        "model": {"path": model_path, "hash": model_hash} if metric == "deepssim" else None,
        "thresholds": {
            "low": th[0],
            "high": th[1],
            "rule": "duplicate if s > high; similar if low < s <= high; different if s <= low",
        },
        "label_score": "verified SSIM (preset deepssim)" if verify == "ssim" else "search score",
        "verify": {
            "method": verify,
            "flips": bool(verify_flips),
            "max_shift": int(verify_shifts),
            "max_rotation_deg": float(verify_rotations),
        },
        "k": kk,
        "mode": mode,
        "item_size": list(fit) if fit else None,
        "slice_policy": (policy.__dict__ if mode == "slices" and metric != "embeddings" else None),
        "n_train": len(tset),
        "n_synth": len(sset),
        "n_train_files": tset.n_files,
        "n_synth_files": sset.n_files,
        "counts": counts,
        "fraction_memorised": counts["duplicate"] / len(sset),
        "pair_counts_search": res.class_counts,
        "pair_counts_search_covers": _pair_counts_cover(res),
        "pair_counts_search_variants": {name: cc for name, (_, cc) in (res.variant_counts or {}).items()},
        "n_pairs": len(tset) * len(sset),
        "skipped": skipped,
        # what changes how the results read (files of formats not read, files in both sets, ...): the warnings
        # logged so far; none is logged after this point
        "warnings": _audit_warnings(),
        "versions": _versions(),
        "engine": fingerprint["engine"],  # (the engine the calls resolve to; for deepssim, the encoder's device)
        "timings_s": {},
    }
    from .report import write_report

    rows = _top_suspects(tset, sset, res, ver, decision, best_rank, trans, gallery)
    write_report(
        out,
        summary=summary,
        hist_counts=res.counts,
        hist_edges=res.edges,
        verified=ver[np.isfinite(ver)] if verify == "ssim" else None,
        thresholds=th,
        suspects=rows,
        files=files,
        hist_variants={name: h for name, (h, _) in (res.variant_counts or {}).items()},
    )
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = {kx: round(v, 4) for kx, v in timings.items()}
    _atomic_json(files["summary.json"], summary)
    logger.info(
        "audit done: %d/%d synthetic items labelled duplicate; report in %s",
        counts["duplicate"],
        len(sset),
        files["report.html"],
    )
    return AuditResult(out, summary, files)


def _pair_counts_cover(res: SearchResult) -> str:
    """What summary.json's ``pair_counts_search`` (and histogram.png's bars) count, in words."""
    if not res.variant_counts:
        return "the synthetic items as given (no flips or shifts were searched): every pair's search score"
    from .report import _variants_txt

    what, each = _variants_txt(res.variant_counts), _variants_txt(res.variant_counts, each=True)
    return (f"the synthetic items as given (the search without {what}); each {each} search's own counts are in "
            "pair_counts_search_variants; a pair's best score over these searches, which matches.csv keeps, is "
            "in none of them")


def _search_offsets(s: int, spatial_dims: int) -> list[tuple[int, ...]]:
    """Translations the shift-aware search queries: ±s along each axis, plus the diagonals in 2D."""
    if spatial_dims == 2:
        return [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s) if dy or dx]
    return [tuple(sign * s if q == ax else 0 for q in range(3)) for ax in range(3) for sign in (-1, 1)]


_ROWS_IN_MEMORY_BYTES = 256 << 20


@contextlib.contextmanager
def _row_store(work: Path, tag: str, items: ItemSet) -> Iterator[np.ndarray]:
    """A file-backed float32 array (len(items), voxels) for a correlation search's centred rows, in
    ``work/<tag>_rows.tmp.npy``, removed on exit: the search reads it a block at a time, so the rows are page
    cache the system can drop rather than memory held (10^5 items of 256×256 were a 27 GB array). Rows of at
    most :data:`_ROWS_IN_MEMORY_BYTES` stay in memory."""
    f = work / f".{tag}_rows.tmp"  # (a temporary's name: a killed run's is removed at the next start)
    shape = (len(items), int(np.prod(items.pixels.shape[1:])))
    if 4 * shape[0] * shape[1] <= _ROWS_IN_MEMORY_BYTES:  # (small: in memory, as fast; a file cost ~20 % here)
        yield np.empty(shape, dtype=np.float32)
        return
    arr = np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=shape)
    try:
        reserve(f)  # (a sparse file on a full disk: SIGBUS at the first write to a page, not a Python error)
        yield arr
    finally:
        del arr
        f.unlink(missing_ok=True)


def _transformed_vectors(
    items: ItemSet, fn: Any, *, metric: str, model: Any, batch_size: int, device: Any, bar: Any = None,
    rows_out: np.ndarray | None = None,
) -> np.ndarray:
    """Search vectors of the items transformed image by image by ``fn`` (embeddings, or centred rows).

    ``bar``: a tqdm bar advanced by the number of items done. For ``correlation`` a transformed item that
    is constant (a shift that left only background) keeps the untransformed item's row, and the items are
    transformed a block of at most about ``_ROW_VOXELS`` voxels at a time (whole volumes: one or two), the
    rows written into one float32 array (a block of 256 items and the parts' concatenation held 3 copies of
    every transformed volume besides)."""
    n = len(items)
    step = max(batch_size * 4, 256)
    if metric == "correlation":
        voxels = int(np.prod(items.pixels.shape[1:]))
        step = max(1, min(step, _ROW_VOXELS // max(1, voxels)))
        out = np.empty((n, voxels), dtype=np.float32) if rows_out is None else rows_out
    parts = []
    for a in range(0, n, step):
        block = np.ascontiguousarray(
            np.stack([fn(np.asarray(img), a + j) for j, img in enumerate(items.pixels[a : a + step])])
        )
        if metric == "deepssim":
            parts.append(_embed(list(block), model, batch_size=batch_size, device=device))
        else:
            sub = ItemSet(
                items.name,
                items.ids[a : a + step],
                items.paths[a : a + step],
                items.indices[a : a + step],
                block,
            )
            out[a : a + len(block)] = _centred_rows(block, sub, fallback=items.vectors[a : a + step])
        if bar is not None:
            bar.update(len(block))
    return out if metric == "correlation" else np.concatenate(parts).astype(np.float32)


def _variant_vectors(
    work: Path, vname: str, items: ItemSet, fn: Any, *, metric: str, model: Any, batch_size: int, device: Any,
    bar: Any = None, rows_out: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`_transformed_vectors`, for ``deepssim`` kept in ``work/<set>_vectors_<vname>.npy`` (the
    embeddings of a search variant, reused by a rerun with other thresholds or bins, or a resume: embedding
    them is most of a flip/shift search). ``correlation`` rows are as large as the pixels: not kept."""
    if metric != "deepssim":
        return _transformed_vectors(items, fn, metric=metric, model=model, batch_size=batch_size, device=device,
                                    bar=bar, rows_out=rows_out)
    f = work / f"{items.name}_vectors_{vname}.npy"
    try:
        v = _load_checked(f)  # (written without fsync, and checksummed: see _save_checked)
        if v.dtype == np.float32 and v.shape == items.vectors.shape and np.isfinite(v).all():
            if bar is not None:
                bar.update(len(items))
            return v
        logger.warning("%s: %s %s, not %s float32: embedding again", f, v.shape, v.dtype, items.vectors.shape,
                       extra=_RUN_ONLY)
    except FileNotFoundError:
        pass
    except _NoChecksum:
        logger.debug("%s has no checksum (an earlier version's): embedding again", f)
    except _DamagedEntry as exc:
        logger.warning("%s: embedding again", exc, extra=_RUN_ONLY)
    v = _transformed_vectors(items, fn, metric=metric, model=model, batch_size=batch_size, device=device, bar=bar)
    _save_checked(f, v, durable=False)  # (can always be embedded again)
    return v


def _flip_item(img: np.ndarray, axes: tuple[int, ...], offset: Sequence[int] | None) -> np.ndarray:
    """``img`` flipped along ``axes`` and, along a flipped axis where the item's :func:`_fit_offset`
    ``offset`` is odd, moved by it by one voxel: the mirror of the item about the centre of its file, before
    the centre crop or pad. After an odd pad (-1) the slab moved out is padding, and it fills the slab
    uncovered at the other end, which is padding too: exact. After an odd crop (+1) the uncovered slab lay
    outside the crop; it repeats its neighbour, the nearest estimate. ``offset`` None: the plain flip
    (audits before format 7)."""
    out = np.flip(img, axis=axes)
    for a in axes:
        d = int(offset[a]) if offset is not None else 0
        if d < 0:
            out = np.roll(out, d, axis=a)
        elif d > 0:
            n = out.shape[a]
            out = np.take(out, np.clip(np.arange(n) - d, 0, n - 1), axis=a)
    return np.ascontiguousarray(out)


def _search_variants(
    metric: str, flips: bool, shifts: int, spatial_dims: int, fit: np.ndarray | None = None,
    all_mirrors: bool = True,
) -> list[tuple[str, str, Any]]:
    """The transforms the flip/shift-aware search applies to the synthetic items (``deepssim``,
    ``correlation`` and ``ssim``; the audit refuses flips and shifts for ``ssim`` with ``verify='none'``), in
    the order searched, as (key, name, (image, item index) -> image): ``key`` names the variant's
    shard folder (``shards_<key>``), ``name`` is the transform as matches.csv writes it (the flips ``hflip``,
    ``vflip``, ``hvflip`` / ``flip0``..``flip012`` (:func:`_flip_variants`; ``all_mirrors=False``: the
    single-axis ones, as before format 8), then the translations ``shift(dy,dx)`` of :func:`_search_offsets`, as
    verification names them); a pair's search score is its best over the untransformed item and these.

    A flip mirrors the synthetic item about the centre of its file (:func:`_flip_item`, with the item's row
    of ``fit``, the synthetic items' :func:`_fit_offset`; None: about the fitted item's centre, as audits
    before format 7 did)."""
    variants: list[tuple[str, str, Any]] = []
    if metric in ("deepssim", "correlation", "ssim"):
        if flips:
            variants += [
                (fname, fname, lambda img, i, axes=axes: _flip_item(img, axes, None if fit is None else fit[i]))
                for fname, axes in _flip_variants(True, spatial_dims, all_mirrors)[1:]
            ]
        if shifts > 0:
            variants += [(f"shift{j}", _transform_name("", 0.0, d), lambda img, i, d=d: _shift(img, d))
                         for j, d in enumerate(_search_offsets(shifts, spatial_dims))]
    return variants


def _merge_topk(a: SearchResult, b: SearchResult, k: int, b_name: str = "") -> SearchResult:
    """Per synthetic item, the k best training items over both results (a pair keeps its best score; ties to
    the lower training index). The histogram and pair counts stay those of ``a`` (the unflipped search);
    ``b``'s are kept beside them in ``variant_counts``, under ``b_name``.

    Each kept pair also keeps the transform that gave its score: ``a``'s (``"none"`` where ``a`` records
    none) or ``b_name`` for ``b``'s; on equal scores ``a``'s. Merging the variants one by one in the order
    searched therefore names, on a tie, the untransformed item first, then the earliest variant."""
    scores = np.empty_like(a.scores)
    indices = np.empty_like(a.indices)
    names = np.empty(a.scores.shape, dtype=object)
    a_names = a.transforms if a.transforms is not None else np.full(a.scores.shape, "none", dtype=object)
    for i in range(len(a.scores)):
        best: dict[int, tuple[float, str]] = {}
        for s_, j, n_ in zip(
            np.concatenate([a.scores[i], b.scores[i]]),
            np.concatenate([a.indices[i], b.indices[i]]),
            [str(x) for x in a_names[i]] + [b_name] * len(b.scores[i]),
            strict=True,
        ):
            j = int(j)
            if j not in best or s_ > best[j][0]:  # strictly better only: a tie keeps the earlier transform
                best[j] = (float(s_), n_)
        order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        scores[i] = [v for _, (v, _) in order]
        indices[i] = [j for j, _ in order]
        names[i] = [n for _, (_, n) in order]
    variants = {**(a.variant_counts or {}), b_name: (b.counts, b.class_counts)}
    return SearchResult(scores, indices, a.counts, a.edges, a.class_counts, names, variants)


def _ssim_search(
    tset: ItemSet,
    sset: ItemSet,
    *,
    k: int,
    thresholds: tuple[float, float],
    bins: int,
    chunk_size: int,
    spatial_dims: int,
    work: Path,
    backend: str | None,
    progress: bool,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    tag: str = "",
) -> SearchResult:
    """Exact SSIM over all pairs, chunk by chunk of synthetic items (each chunk saved for resume, as
    ``search_<tag><chunk>.npz``); ``transform``: applied to each synthetic item first (a search variant)."""
    from tqdm import tqdm

    n = len(sset)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    scores = np.empty((n, k), dtype=np.float32)
    indices = np.empty((n, k), dtype=np.int64)
    counts = np.zeros(bins, dtype=np.int64)
    cc = np.zeros(3, dtype=np.int64)
    train_px = np.asarray(tset.pixels)
    starts = list(range(0, n, chunk_size))
    desc = f"ssim search {tag.rstrip('_')}".rstrip()
    for c, a in enumerate(tqdm(starts, desc=desc, disable=None if progress else True)):
        f = work / f"search_{tag}{c:05d}.npz"
        nc = min(chunk_size, n - a)
        z = _stage_arrays(f, {"scores": (nc, k), "indices": (nc, k), "counts": (bins,), "cc": (3,)},
                          "searching that chunk again")
        if z is None:
            block = np.asarray(sset.pixels[a : a + chunk_size])
            if transform is not None:
                block = np.stack([np.ascontiguousarray(transform(img, a + j)) for j, img in enumerate(block)])
            m = _ssim_matrix(
                train_px, block, spatial_dims=spatial_dims, backend=backend
            ).T  # (chunk, n_train)
            m = np.asarray(m, dtype=np.float32)
            if not np.isfinite(m).all():
                raise RuntimeError("SSIM returned non-finite values in the all-pairs search")
            order = np.argsort(-m, axis=1, kind="stable")[:, :k]
            idx = np.clip(np.floor((m.astype(np.float64) + 1.0) / 2.0 * bins), 0, bins - 1).astype(np.int64)
            z = {
                "scores": np.take_along_axis(m, order, axis=1),
                "indices": order.astype(np.int64),
                "counts": np.bincount(idx.ravel(), minlength=bins).astype(np.int64),
                "cc": np.bincount(label_of(m, thresholds).ravel(), minlength=3).astype(np.int64),
            }
            _atomic_npz(f, **z)
            _chunk_hook("search", c)
        scores[a : a + chunk_size], indices[a : a + chunk_size] = z["scores"], z["indices"]
        counts += z["counts"]
        cc += z["cc"]
    return SearchResult(
        scores, indices, counts, edges, {nm: int(v) for nm, v in zip(LABELS, cc, strict=True)}
    )


def _stage_arrays(f: Path, shapes: dict[str, tuple[int, ...] | None], again: str) -> dict[str, np.ndarray] | None:
    """The arrays ``shapes`` names (each of that shape; None: any) of the stage file ``f`` (an .npz under OUT/work),
    read whole, or None when ``f`` is not there, or is unreadable (a disk error, a file cut short or changed in
    place: every member of an .npz carries a CRC-32, checked as it is read) or holds other shapes: then a
    warning names it and what is done instead (``again``: "searching that chunk again"), as for an unreadable
    state.json, and the caller computes it anew (a damaged stage file stopped every rerun with a BadZipFile
    traceback)."""
    if not f.exists():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            got = {name: np.asarray(z[name]) for name in shapes if name in z.files}
        for name, shape in shapes.items():
            if name not in got:
                raise KeyError(f"no {name}")
            if shape is not None and got[name].shape != shape:
                raise ValueError(f"{name} of shape {got[name].shape}, expected {shape}")
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("%s: unreadable (%s): %s", f, one_line(f"{type(exc).__name__}: {exc}"), again,
                       extra=_RUN_ONLY)
        return None
    return got


def _verified_chunk(f: Path, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(verified SSIM, transforms) of the verified chunk ``f`` if it is there, readable (:func:`_stage_arrays`)
    and holds the candidates ``idx``; else None (a chunk kept from a run with other thresholds or bins is reused
    only for the same top-k; one without its indices is computed again)."""
    shape = tuple(np.shape(idx))
    z = _stage_arrays(f, {"indices": None, "ssim": shape, "transform": shape}, "verifying that chunk again")
    if z is None or not np.array_equal(z["indices"], idx):
        return None
    return z["ssim"], z["transform"]


def _verified_for(f: Path, idx: np.ndarray) -> bool:
    """Whether the verified chunk ``f`` exists, is readable and holds the candidates ``idx``
    (:func:`_verified_chunk`)."""
    return _verified_chunk(f, idx) is not None


def _verify_indexed(
    train_px: np.ndarray, synth_px: np.ndarray, ti: np.ndarray, si: np.ndarray, **kwargs: Any
) -> tuple[np.ndarray, list[str]]:
    """:func:`verify_pairs` of the pairs ``(train_px[ti[p]], synth_px[si[p]])``, p = 0..P-1 (``ti``, ``si``
    int (P,); the stores (n, *size) float32, memory-mapped): the images are read a batch of pairs at a time,
    about ``_VERIFY_VOXELS`` voxels a side, so that verifying a chunk of whole volumes holds a few of them,
    not a copy of every pair's (256 synthetic MNI volumes × k = 5 candidates were 2 × 42 GB). Each pair's
    score does not depend on the batching. Returns the best SSIM (P,) float64 and the transform names."""
    ti, si = np.asarray(ti, dtype=np.int64), np.asarray(si, dtype=np.int64)
    per = max(1, _VERIFY_VOXELS // max(1, int(np.prod(train_px.shape[1:]))))
    vals: list[np.ndarray] = [np.empty(0)]
    names: list[str] = []
    extra = kwargs.pop("extra", None)  # (per pair: sliced with the batch)
    for a in range(0, len(ti), per):
        if extra is not None:
            kwargs["extra"] = extra[a : a + per]
        v, n = verify_pairs(np.asarray(train_px[ti[a : a + per]]), np.asarray(synth_px[si[a : a + per]]), **kwargs)
        vals.append(v)
        names += n
    return np.concatenate(vals), names


def _variant_picks(names: Iterable[Any], items: Iterable[int], variants: Sequence[tuple[str, str, Any]]
                   ) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]] | None]:
    """verify_pairs' ``extra`` for pairs whose search scores came from the transforms ``names`` (``"none"``:
    the item itself, no extra pick), of the synthetic items ``items`` (their indices): (name, transform) of
    each name among the search ``variants``."""
    fns = {name: fn for _, name, fn in variants}
    return [(str(n), functools.partial(fns[str(n)], i=int(i))) if str(n) in fns else None
            for n, i in zip(names, items, strict=True)]


def _verify_all(
    tset: ItemSet,
    sset: ItemSet,
    res: SearchResult,
    *,
    spatial_dims: int,
    flips: bool,
    shifts: int,
    rotations: float,
    chunk_size: int,
    work: Path,
    backend: str | None,
    progress: bool,
    variants: Sequence[tuple[str, str, Any]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Verified SSIM and transform of every candidate (n_synth, k), chunk by chunk (saved for resume); each
    pair also scores the search variant that gave it its search score (``res.transforms``, one of
    ``variants``; see :func:`verify_pairs`)."""
    from tqdm import tqdm

    n, k = res.indices.shape
    ver = np.empty((n, k), dtype=np.float64)
    trans = np.empty((n, k), dtype=object)
    starts = list(range(0, n, chunk_size))
    for c, a in enumerate(tqdm(starts, desc="verify", disable=None if progress else True)):
        f = work / f"verify_{c:05d}.npz"
        idx = res.indices[a : a + chunk_size]
        done = _verified_chunk(f, idx)
        if done is None:
            rows = np.repeat(np.arange(a, a + len(idx)), k)
            extra = None
            if res.transforms is not None and variants:
                extra = _variant_picks(res.transforms[a : a + len(idx)].ravel(), rows, variants)
            v, names = _verify_indexed(
                tset.pixels,
                sset.pixels,
                idx.ravel(),
                rows,
                spatial_dims=spatial_dims,
                flips=flips,
                shifts=shifts,
                rotations=rotations,
                backend=backend,
                extra=extra,
            )
            done = (v.reshape(len(idx), k), np.array(names).reshape(len(idx), k))
            _atomic_npz(f, ssim=done[0], transform=done[1], indices=idx)
            _chunk_hook("verify", c)
        ver[a : a + chunk_size] = done[0]
        trans[a : a + chunk_size] = done[1].astype(object)
    return ver, trans


def _write_matches(
    path: Path,
    tset: ItemSet,
    sset: ItemSet,
    res: SearchResult,
    ver: np.ndarray,
    labels: np.ndarray,
    trans: np.ndarray,
    verify: str,
    thresholds: Sequence[float],
    best_rank: np.ndarray,
) -> None:
    """matches.csv: a row per synthetic item and rank (:data:`MATCHES_HEADER`); ``decides_label`` is 1 on the
    row at ``best_rank`` (the candidate whose label is the item's), 0 on the others."""
    from .report import format_score

    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # With "\n" rows, csv quotes a field holding "\n" but not one holding "\r", which readers then take for
    # a line break (a file named "cr\rname.npy" split its row in two): rows naming such a file quote all.
    wq = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def cr(ids: Sequence[str], paths: Sequence[str]) -> np.ndarray:
        return np.array([("\r" in a) or ("\r" in b) for a, b in zip(ids, paths, strict=True)], dtype=bool)

    s_cr, t_cr = cr(sset.ids, sset.paths), cr(tset.ids, tset.paths)
    s_pf, t_pf = [_file_and_frame(q) for q in sset.paths], [_file_and_frame(q) for q in tset.paths]
    w.writerow(MATCHES_HEADER)
    n, k = res.indices.shape
    for i in range(n):
        for r in range(k):
            j = int(res.indices[i, r])
            (wq if s_cr[i] or t_cr[j] else w).writerow(
                [
                    sset.ids[i],
                    s_pf[i][0],
                    sset.indices[i],
                    tset.ids[j],
                    t_pf[j][0],
                    tset.indices[j],
                    r + 1,
                    format_score(res.scores[i, r], thresholds, 6),
                    format_score(ver[i, r], thresholds, 6) if verify == "ssim" else "",
                    LABELS[int(labels[i, r])],
                    trans[i, r],
                    s_pf[i][1],
                    t_pf[j][1],
                    int(r == best_rank[i]),
                ]
            )
    _atomic_bytes(path, os.fsencode(buf.getvalue()))


def _top_suspects(
    tset: ItemSet,
    sset: ItemSet,
    res: SearchResult,
    ver: np.ndarray,
    decision: np.ndarray,
    best_rank: np.ndarray,
    trans: np.ndarray,
    n: int,
) -> list[dict]:
    """The ``n`` synthetic items with the highest decision score, each with its best training match."""
    rows = np.arange(len(sset))
    best = decision[rows, best_rank]
    order = np.argsort(-best, kind="stable")[:n]
    out = []
    for i in order:
        r = int(best_rank[i])
        j = int(res.indices[i, r])
        out.append(
            {
                "synth_id": sset.ids[i],
                "train_id": tset.ids[j],
                "rank": r + 1,
                "cosine": float(res.scores[i, r]),
                "ssim": float(ver[i, r]) if np.isfinite(ver[i, r]) else None,
                "transform": str(trans[i, r]) if trans[i, r] else "",
                # (an embeddings audit has no pixels: the images its item ids name, where they are readable)
                "synth_image": _image_of_id(sset.ids[i]) if sset.pixels is None else np.asarray(sset.pixels[i]),
                "train_image": _image_of_id(tset.ids[j]) if tset.pixels is None else np.asarray(tset.pixels[j]),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Evaluation against labelled pairs
# ----------------------------------------------------------------------------------------------------
_LABEL_COLUMNS = ("real_key", "synth_key", "label")


def _label_rows(path: str | os.PathLike) -> list[tuple[str, str, int, int]]:
    """The labelled pairs of a reference label CSV with their line numbers: (real_key, synth_key, label, line).

    UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8"); keys and header names are stripped of
    surrounding spaces. Every error names the file and, for a row, its line.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"labels file {p} is a directory; give the CSV file")
    if not p.is_file():
        raise FileNotFoundError(f"labels file {p} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{p}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the labels as CSV UTF-8"
        ) from None
    reader = csv.DictReader(_io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{p}: empty file; expected a header line {','.join(_LABEL_COLUMNS)}")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    header = reader.fieldnames
    if not set(_LABEL_COLUMNS) <= set(header):
        hint = ""
        if len(header) == 1 and any(d in header[0] for d in ";\t|"):
            hint = " (the file must be comma-separated)"
        raise ValueError(f"{p}: expected columns {', '.join(_LABEL_COLUMNS)}; got {header}{hint}")
    twice = sorted({c for c in header if c in _LABEL_COLUMNS and header.count(c) > 1})
    if twice:  # (csv.DictReader keeps the last of two columns of one name: label,label scored the second)
        raise ValueError(f"{p}: the header names column(s) {', '.join(twice)} more than once: {header}")
    out = []
    for row in reader:
        line = reader.line_num
        over = row.pop(None, None) or []  # values beyond the header (DictReader's restkey)
        given = sum(v is not None for v in row.values()) + len(over)
        if any(v.strip() for v in over) or any(row[c] is None for c in _LABEL_COLUMNS):
            raise ValueError(
                f"{p}:{line}: expected {len(header)} fields ({', '.join(header)}), got {given}"
            )
        # (kept as written: a key is looked up as it is first, then without its surrounding spaces, so that
        # " lead.npy" names that file and not "lead.npy")
        real, synth = row["real_key"], row["synth_key"]
        for col, v in (("real_key", real), ("synth_key", synth)):
            if not v.strip():
                raise ValueError(f"{p}:{line}: empty {col}")
        try:
            lab = int(row["label"])
        except ValueError:
            raise ValueError(
                f"{p}:{line}: label {row['label']!r} is not an integer "
                "(0 different, 1 duplicate, 2 similar)"
            ) from None
        if lab not in (0, 1, 2):
            raise ValueError(f"{p}:{line}: label {lab} must be 0 (different), 1 (duplicate) or 2 (similar)")
        out.append((real, synth, lab, line))
    if not out:
        raise ValueError(f"{p}: no labelled pairs")
    return out


def read_labels(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Reference label CSV: columns real_key, synth_key, label (0 different, 1 duplicate, 2 similar).

    UTF-8, with or without a byte-order mark; errors name the file and the line."""
    return [(r, s_, lab) for r, s_, lab, _ in _label_rows(path)]


# reference label codes <-> audit labels
_REF_CODE = {"different": 0, "duplicate": 1, "similar": 2}
_REF_NAME = {0: "different", 1: "duplicate", 2: "similar"}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Per-class precision, recall, F1 and support, plus macro averages (reference codes: 0 different,
    1 duplicate, 2 similar).

    ``per_class`` lists the three classes always (different, similar, duplicate; then any other code
    present). A class that occurs neither among the labels nor among the predictions has support 0 and
    precision, recall and F1 ``None`` (not defined; ``null`` in evaluation.json); for the other classes 0/0
    counts as 0 (sklearn's convention). The macro averages are the means over the classes whose scores are
    defined — those that occur in ``y_true`` or ``y_pred``, as sklearn's ``average="macro"`` without
    ``labels`` — named in ``macro_classes``; ``None`` when there is none."""
    yt, yp = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in length: {yt.shape} vs {yp.shape}")
    known = [_REF_CODE[n] for n in LABELS]
    classes = known + sorted((set(yt.tolist()) | set(yp.tolist())) - set(known))
    per = {}
    for c in classes:
        tp = int(((yp == c) & (yt == c)).sum())
        npred, ntrue = int((yp == c).sum()), int((yt == c).sum())
        prec: float | None = None
        rec: float | None = None
        f1: float | None = None
        if npred or ntrue:
            prec = tp / npred if npred else 0.0
            rec = tp / ntrue if ntrue else 0.0
            f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[_REF_NAME.get(c, str(c))] = {
            "label": c,
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": ntrue,
        }
    averaged = [name for name, v in per.items() if v["f1"] is not None]
    macro = {
        m: float(np.mean([per[name][m] for name in averaged])) if averaged else None
        for m in ("precision", "recall", "f1")
    }
    return {
        "per_class": per,
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "macro_classes": averaged,
        "accuracy": float((yt == yp).mean()) if len(yt) else 0.0,
        "n": int(len(yt)),
    }


def _evaluation_model(summary: dict, model: Any) -> Any:
    """The encoder of a deepssim audit, for :func:`evaluate`: ``model`` or the recorded file, checked against
    the recorded hash."""
    rec = summary.get("model") or {}
    if model is None:
        if not rec.get("path"):
            raise ValueError(
                "this deepssim audit searched flip/shift variants, which evaluate embeds again, and it "
                "recorded no model file: pass model= (the encoder the audit used)"
            )
        model = rec["path"]
        if not Path(model).exists():  # (evaluate said only "model file ... does not exist")
            raise FileNotFoundError(
                f"this deepssim audit searched flip/shift variants, which evaluate embeds again with the encoder "
                f"it recorded in summary.json, {model}, and that file is no longer there: pass model= (--model) "
                "the encoder's file where it is now (it is checked against the recorded hash)"
            )
    obj, path, digest = _load_model(model)
    if rec.get("hash") and digest != rec["hash"] and not _same_module(obj, rec):
        raise ValueError(
            f"model {path or type(obj).__name__} is not the encoder this audit used (hash {digest[:12]}…, "
            f"recorded {rec['hash'][:12]}…)"
        )
    return obj


def _same_module(obj: Any, rec: dict) -> bool:
    """Whether the loaded encoder ``obj`` is the one ``rec`` (summary.json's ``model``) records, by module hash.

    A file is recorded by the hash of its bytes, a model object by :func:`_module_hash` (its class, settings and
    weights), so the encoder given as an object for an audit run with a file (or as a file for one run with an
    object) has another hash: the two are compared as modules, the recorded file (when it is still the file
    with the recorded hash) loaded for that."""
    want = rec["hash"]
    f = Path(rec["path"]) if rec.get("path") else None
    if f is not None and f.is_file() and _file_sha256(f) == want:
        from .model import load_model

        want = _module_hash(load_model(f))
    return _module_hash(obj) == want


_FRAME_SUFFIX = re.compile(r"@t\d+$")  # the frame of a 4D file in an item's path: <file>@t<t>


def _resolver(ids: Sequence[str], paths: Sequence[str],
              skipped: Sequence[tuple[str, str]] = ()) -> Callable[[str], int]:
    """Label key -> item index. ``skipped``: (path, reason) of the inputs the audit left out, so that a key
    naming one is told why it has no item."""
    exact = {s: i for i, s in enumerate(ids)}
    by_path: dict[str, list[int]] = {}
    by_base: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    by_ref: dict[str, list[int]] = {}  # the reference's "<parent folder>___<stem>" keys
    for i, p in enumerate(paths):
        # an item of frame t of a 4D file has the path <file>@t<t>: it is found by that, and by the file's own
        # path, name and stem (with the file's other items: a key naming the file is then ambiguous, and said
        # to be, instead of matching no audited item)
        file = _FRAME_SUFFIX.sub("", p)
        for q in dict.fromkeys((p, file)):
            by_path.setdefault(q, []).append(i)
            base = os.path.basename(q)
            by_base.setdefault(base, []).append(i)
            if q == file:
                stem = base[:-7] if base.lower().endswith(".nii.gz") else os.path.splitext(base)[0]
                by_stem.setdefault(stem, []).append(i)
                by_ref.setdefault(f"{os.path.basename(os.path.dirname(q))}___{stem}", []).append(i)

    def lookup(key: str, tables: Sequence[dict[str, list[int]]]) -> int | None:
        if key in exact:
            return exact[key]
        for table in tables:
            hit = table.get(key)
            if hit is not None:
                if len(hit) > 1:
                    raise ValueError(
                        f"label key {key!r} matches {len(hit)} items (e.g. {ids[hit[0]]}); "
                        "use the full item id from matches.csv"
                    )
                return hit[0]
        return None

    def resolve(key: str) -> int | None:
        hit = lookup(key, (by_path, by_base, by_stem, by_ref))
        if hit is None:
            # a relative path (or id) names a file from the working directory, as the audit's inputs do
            # (discover makes them absolute): ``train/t060.png``, ``train/t060.png#2:0``
            absolute = os.path.abspath(os.path.expanduser(key))
            if absolute != key:
                hit = lookup(absolute, (by_path,))
        return hit

    def find(key: str) -> int:
        # the key as written, then without surrounding spaces (a file may be named " lead.npy")
        hit = resolve(key)
        if hit is None and key.strip() != key:
            key = key.strip()
            hit = resolve(key)
        if hit is None:
            absolute = os.path.abspath(os.path.expanduser(key.split("#")[0].split("@")[0]))
            for path, reason in skipped:
                base = os.path.basename(path)
                stem = base[:-7] if base.lower().endswith(".nii.gz") else os.path.splitext(base)[0]
                if key in (path, base, stem) or absolute == path or key.startswith((path + "#", path + "@")):
                    raise ValueError(f"label key {key!r} names an input the audit skipped: {path}: {reason}")
            raise ValueError(
                f"label key {key!r} matches no audited item (use an id, a path — absolute, or relative to "
                "the working directory — a file name or a stem)"
            )
        return hit

    return find


def _evaluation_search(f: Path, d: Path) -> SearchResult:
    """The audit's saved search ``f`` for :func:`evaluate`; an unreadable one is named, with the remedy."""
    try:
        return SearchResult.load(f)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{f}: unreadable ({type(exc).__name__}: {one_line(exc)}); run the audit into {d} again "
                         "(it searches again), then evaluate") from exc


def _warn_repeated_pairs(labels: Any, rows: Sequence[tuple], ti: Sequence[int], si: Sequence[int]) -> None:
    """A warning naming the lines of pairs labelled more than once (each row counts, so a pair labelled twice
    weighs twice, and one labelled two ways is both right and wrong); they were counted silently."""
    lines: dict[tuple[int, int], list[tuple[int, Any]]] = {}
    for (_, _, label, line), t, s_ in zip(rows, ti, si, strict=True):
        lines.setdefault((t, s_), []).append((line, label))
    repeated = [v for v in lines.values() if len(v) > 1]
    if not repeated:
        return
    conflicting = [v for v in repeated if len({lab for _, lab in v}) > 1]
    worst = conflicting or repeated
    shown = "; ".join(", ".join(f"line {n} (label {lab})" for n, lab in v) for v in worst[:3])
    logger.warning("%s: %d pair(s) are labelled on more than one line (%d of them with different labels); each "
                   "line counts: %s%s", labels, len(repeated), len(conflicting), shown,
                   " ..." if len(worst) > 3 else "")


def _audited_labels(f: Path, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(synth id, train id) -> the label matches.csv ``f`` gives that pair, for the pairs in ``wanted``; {} when
    there is no such file (a warning when it cannot be read: the pairs are then labelled by their scores). The
    file is the audit's output, trusted as such: a hand-edited label is taken as the audit's."""
    out: dict[tuple[str, str], str] = {}
    try:
        # (utf-8-sig: a file saved again by a spreadsheet starts with a byte-order mark; surrogateescape: names
        # that are not UTF-8 are written as their bytes, and one such name made the whole file unreadable)
        with open(f, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            for row in csv.DictReader(fh):
                key = (row.get("synth_id"), row.get("train_id"))
                if key in wanted and row.get("label") in LABELS:
                    out[key] = row["label"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, csv.Error) as exc:
        logger.warning("%s: unreadable (%s): the labelled pairs are labelled by their scores computed again", f,
                       one_line(exc))
        return {}
    return out


def evaluate(
    audit_dir: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    backend: str | None = None,
    model: Any = None,
    batch_size: int = 64,
    device: Any = None,
) -> dict:
    """Score an audit against labelled pairs (reference format) and write ``audit_dir/evaluation.json``.

    Each labelled pair (real_key → training item, synth_key → synthetic item; keys may be item ids, paths
    — absolute, or relative to the working directory as the audit's inputs are — file names or stems) is
    scored exactly as the audit labels a pair — verified SSIM (same flips/shifts) or, when the audit ran
    with ``verify="none"``, the search score of the audit's metric: exact SSIM
    (``ssim``), Pearson correlation of the stored pixels (``correlation``) or the cosine of the stored
    vectors (``deepssim``, ``embeddings``), each the best over the same flip/shift variants as the search —
    and labelled with the audit's thresholds. Returns per-class precision/recall/F1 (all three classes; a
    class absent from both labels and predictions with support 0 and scores ``None``) and the macro averages
    over the classes that occur (see :func:`classification_metrics`). Errors
    about a label row name the labels file and its line; keys that name no audited item (or several, or an
    input the audit skipped) are all reported in one error, not one per run.

    ``model``: only for a ``deepssim`` audit run with ``verify="none"`` and flips or shifts, whose variants
    are embedded again: the encoder the audit used (default: the file recorded in ``summary.json``), as a file
    or a loaded model; it must have the recorded hash, or be the same module (class, settings and weights) as
    the recorded one. ``batch_size``, ``device``: for that embedding.

    ``audit_dir`` is locked while evaluate reads it and writes evaluation.json, with the lock an audit holds
    (:func:`_out_lock`): run beside an audit rerun into the same folder, evaluate could write an evaluation.json
    whose thresholds were not those of the summary.json beside it. It stops (:class:`OutputInUse`) while an
    audit holds the folder, and an audit started while it runs stops the same way.
    """
    d = Path(audit_dir)
    if not (d / "summary.json").is_file():
        raise FileNotFoundError(f"{d} is not an audit directory (no summary.json)")
    with _out_lock(d, "evaluate"):
        return _evaluate(d, labels, backend=backend, model=model, batch_size=batch_size, device=device)


def _evaluate(d: Path, labels: str | os.PathLike, *, backend: str | None, model: Any, batch_size: int,
              device: Any) -> dict:
    """:func:`evaluate` of the audit folder ``d``, whose lock the caller holds."""
    sfile = d / "summary.json"
    try:
        summary = json.loads(sfile.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{sfile}: not a readable audit summary ({exc}); run the audit into {d} again") from exc
    need = ("thresholds", "metric", "mode", "verify")
    missing = [k for k in need if k not in summary] if isinstance(summary, dict) else list(need)
    if missing:
        raise ValueError(f"{sfile}: not an audit summary (no {', '.join(missing)}); run the audit into {d} again")
    work = d / "work"
    try:
        state = json.loads((work / "state.json").read_text())
    except (OSError, ValueError):
        state = None
    if state is not None and summary.get("state") not in (None, _state_digest(state)):
        raise ValueError(
            f"{sfile} and {work} come from different runs (a rerun with other settings did not finish?); "
            f"run the audit into {d} again"
        )
    rows = _label_rows(labels)
    pairs = [(r, s_, lab) for r, s_, lab, _ in rows]
    th = (float(summary["thresholds"]["low"]), float(summary["thresholds"]["high"]))
    metric = summary["metric"]
    spatial_dims = 3 if summary["mode"] == "volumes" else 2
    v = summary.get("verify") or {}
    if model is not None and not (metric == "deepssim" and v.get("method") == "none"
                                  and (v.get("flips") or v.get("max_shift"))):
        # (it was ignored without a word: only such an audit's transformed items are embedded again)
        logger.warning("model= (--model) is not used for this audit (metric %r, verify %r): only a deepssim "
                       "audit with verify 'none' and flips or shifts embeds anything again", metric, v.get("method"))

    def stored(name: str) -> Path:
        f = work / name
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing: evaluate re-scores the labelled pairs from what the audit "
                f"(metric {metric!r}, verify {summary['verify']['method']!r}) leaves in {work}; "
                f"run the audit into {d} again"
            )
        return f

    def pixels(side: str) -> _PixelStore:
        """The audit's pixel store of ``side``, each row checked against its checksum as it is read."""
        f = stored(f"{side}_pixels.npy")
        crc = _store_crc_path(f)
        if not crc.is_file():
            raise FileNotFoundError(
                f"{crc} is missing: the checksums of {f} (an audit of an earlier version kept none); run the "
                f"audit into {d} again, which builds the store again with them"
            )
        try:
            return _open_store(f, ids[side])
        except (OSError, ValueError) as exc:
            raise ValueError(f"{one_line(exc)}; run the audit into {d} again, which builds the store again") from exc

    ids, paths = {}, {}
    # The item tables are rebuilt from the stores the audit left in work/.
    meta = json.loads(stored("items.json").read_text())
    for side in ("train", "synth"):
        ids[side], paths[side] = meta[side]["ids"], meta[side]["paths"]
    # the synthetic items' fit offsets: the search's flips mirror about each file's centre (format 7; before
    # it, about the fitted item's centre)
    s_fit = None
    all_mirrors = summary.get("format_version", 0) >= 8  # (before it: single-axis flips, rotations of one flip)
    if summary.get("format_version", 0) >= 7 and meta["synth"].get("fit") is not None:
        s_fit = np.asarray(meta["synth"]["fit"], dtype=np.int8).reshape(len(ids["synth"]), -1)
    skipped = {side: [(str(x["path"]), str(x["reason"])) for x in summary.get("skipped") or [] if x.get("set") == side]
               for side in ("train", "synth")}
    ft = _resolver(ids["train"], paths["train"], skipped["train"])
    fs = _resolver(ids["synth"], paths["synth"], skipped["synth"])
    ti, si = [], []
    problems: list[str] = []  # every unusable key, named by line: the whole file is checked before failing
    bad_rows: set[int] = set()
    for real, synth, _, line in rows:
        for find, key, dest, other, side in ((ft, real, ti, fs, "synthetic"), (fs, synth, si, ft, "training")):
            try:
                dest.append(find(key))
            except ValueError as exc:
                hint = ""
                try:  # a key of the other set: the columns are likely swapped
                    other(key)
                    hint = (f" (it names a {side} item: real_key must name the training item and synth_key the "
                            "synthetic one; are the columns swapped?)")
                except ValueError:
                    pass
                problems.append(f"{labels}:{line}: {exc}{hint}")
                bad_rows.add(line)
    if problems:
        shown = 10
        rest = "".join(f"\n  {p}" for p in problems[1:shown])
        if len(problems) > shown:
            rest += f"\n  and {len(problems) - shown} more"
        more = (f"\n({len(problems)} label keys in {len(bad_rows)} rows do not name exactly one audited item; "
                f"the others:{rest})")
        raise ValueError(problems[0] + (more if len(problems) > 1 else ""))
    _warn_repeated_pairs(labels, rows, ti, si)
    # A pair the audit labelled (a row of matches.csv) takes that very label (below): a score computed again here
    # (the per-pair SSIM kernel against the search's matrix, another engine than the audit's) can fall one float32
    # step to the other side of a threshold (similar recall 0 for a pair matches.csv calls similar)
    audited = _audited_labels(d / "matches.csv", {(ids["synth"][s_], ids["train"][t_]) for t_, s_ in zip(ti, si,
                                                                                                      strict=True)})
    if summary["verify"]["method"] == "ssim":
        tp, sp = pixels("train"), pixels("synth")
        # a pair the audit verified also scored the search variant that gave it its search score: the same here
        variants = _search_variants(metric, summary["verify"]["flips"], summary["verify"]["max_shift"],
                                    spatial_dims, s_fit, all_mirrors)
        extra = None
        if variants and summary.get("format_version", 0) >= 5:  # (audits before format 5 verified without it)
            found = _evaluation_search(stored("search.npz"), d)
            if found.transforms is not None:
                by_pair = {(int(i), int(j)): str(tn) for i, (row, names) in enumerate(
                    zip(found.indices, found.transforms, strict=True)) for j, tn in zip(row, names, strict=True)}
                extra = _variant_picks((by_pair.get((s_, t_), "none") for t_, s_ in zip(ti, si, strict=True)),
                                       si, variants)
        score, _ = _verify_indexed(
            tp,
            sp,
            np.asarray(ti, dtype=np.int64),
            np.asarray(si, dtype=np.int64),
            spatial_dims=spatial_dims,
            flips=summary["verify"]["flips"],
            shifts=summary["verify"]["max_shift"],
            rotations=summary["verify"]["max_rotation_deg"],
            backend=backend,
            extra=extra,
            overlap=summary.get("format_version", 0) >= 6,  # (audits before format 6 verified without it)
            all_mirrors=all_mirrors,
            extra_overlap=summary.get("format_version", 0) >= 9,
        )
    elif metric == "ssim":  # the search score itself: exact SSIM, training item first
        tp, sp = pixels("train"), pixels("synth")
        # (the pairs a batch at a time, ~_VERIFY_VOXELS a side: whole volumes are not all copied at once)
        per = max(1, _VERIFY_VOXELS // max(1, int(np.prod(tp.shape[1:]))))
        score = np.concatenate([np.empty(0)] + [
            _ssim_pairs(np.ascontiguousarray(tp[ti[a0 : a0 + per]]), np.ascontiguousarray(sp[si[a0 : a0 + per]]),
                        spatial_dims=spatial_dims, backend=backend)
            for a0 in range(0, len(ti), per)
        ])
    else:
        def centred(px: Any) -> np.ndarray:  # flattened pixels minus their mean, in float64
            x = np.asarray(px, dtype=np.float64).reshape(len(px), -1)
            return x - x.mean(axis=1, keepdims=True)

        # (metric embeddings has no pixels, and no variants)
        sp = pixels("synth") if metric != "embeddings" else None
        if metric == "correlation":  # Pearson correlation of the stored pixels
            tp = pixels("train")
            # the labelled pairs a batch of about _ROW_VOXELS voxels a side at a time: for whole volumes every
            # pair's float64 copies and variants at once were ~190 volumes' worth for 16 pairs of MNI volumes
            per = max(1, _ROW_VOXELS // max(1, int(np.prod(tp.shape[1:]))))
        else:  # deepssim, embeddings: cosine of the stored search vectors
            tv, sv = np.load(stored("train_vectors.npy")), np.load(stored("synth_vectors.npy"))
            per = max(1, len(ti))  # (one batch: small vectors, and the variants embedded in one pass)

        def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

        variants = _search_variants(
            metric, summary["verify"]["flips"], summary["verify"]["max_shift"], spatial_dims, s_fit, all_mirrors
        )
        model_obj = _evaluation_model(summary, model) if variants and metric == "deepssim" else None
        parts = [np.empty(0)]
        for a0 in range(0, len(ti), per):
            bt, bs = ti[a0 : a0 + per], si[a0 : a0 + per]
            if metric == "correlation":
                a, b = centred(tp[bt]), centred(sp[bs])
            else:
                a, b = tv[bt].astype(np.float64), sv[bs].astype(np.float64)
            part = cosine(a, b)
            if variants:  # the search score is the best over the transformed synthetic items too
                spx = np.asarray(sp[bs])
                for _, _, fn in variants:
                    block = np.ascontiguousarray(np.stack([fn(img, i) for img, i in zip(spx, bs, strict=True)]))
                    if metric == "deepssim":
                        bv = _embed(list(block), model_obj, batch_size=batch_size, device=device).astype(np.float64)
                    else:  # a transformed item that is constant keeps the untransformed item's row (as the search)
                        bv = np.where(_constant_items(block)[:, None], b, centred(block))
                    part = np.maximum(part, cosine(a, bv))
            parts.append(part)
        score = np.clip(np.concatenate(parts), -1.0, 1.0)  # as the search's scores
        # A pair the search kept (a row of matches.csv) takes the very score the audit labelled it with: the
        # float64 value above can fall on the other side of a threshold than the search's float32 one (0.90140995
        # against 0.90140998 with high = 0.90140997), and evaluate then disagreed with the audit's own label.
        # (Other pairs keep the float64 score: the audit labelled none of them.) Needed only where matches.csv,
        # which gives those pairs their labels, could not be read.
        if not audited and (work / "search.npz").is_file():
            found = _evaluation_search(stored("search.npz"), d)
            kept = {(int(i), int(j)): float(v) for i, (row, vals) in enumerate(zip(found.indices, found.scores,
                                                                                  strict=True))
                    for j, v in zip(row, vals, strict=True)}
            score = np.array([kept.get((int(s_), int(t_)), float(v)) for t_, s_, v in zip(ti, si, score, strict=True)],
                             dtype=np.float64)
    pred_names = [LABELS[int(v)] for v in label_of(score, th)]
    for n_, (t_, s_) in enumerate(zip(ti, si, strict=True)):
        lab = audited.get((ids["synth"][s_], ids["train"][t_]))
        if lab is not None:
            pred_names[n_] = lab
    y_pred = [_REF_CODE[n] for n in pred_names]
    y_true = [lab for _, _, lab in pairs]
    result = classification_metrics(y_true, y_pred)
    result.update(
        thresholds=list(th), label_score=summary["label_score"], labels_file=str(Path(labels)), audit=str(d)
    )
    _atomic_json(d / "evaluation.json", result)
    return result
