"""Exact streaming cosine top-k over every (synthetic, training) pair, with a fused score histogram.

:func:`all_pairs` answers the question a memorisation audit asks — for each synthetic sample, which
training samples are nearest, and how are all n_synth × n_train scores distributed — without ever
building the n_synth × n_train matrix. Memory stays O((n_train + n_synth)·d + tile) (on a GPU the tile term
is a launch's candidates and merge buffers: see ``block``/``tile``).

Conventions (the same on every backend; native results are bit-identical across blocks, threads, SIMD)
------------------------------------------------------------------------------------------------------
* Cosine similarity: every row is L2-normalised inside (norm in float64, row stored as float32); an
  all-zero row is an error naming the set and row.
* A pair's score on CPU is its *canonical* fp32 dot product of the normalised rows: 16 lanes of
  sequential fp32 FMA (lane l sums components l, l + 16, ...), then a fixed pairwise tree; rows longer than
  4096 are cut into 4096-column blocks so scored, whose sums are added in float64 and rounded once (see
  ``csrc/topk.cpp``; within ~2e-6 of the exact dot product at d = 256, typically ~1e-8, and ~2e-5 at most
  whatever d). The native
  engine finds every pair's bin, class and top-k membership from a fast approximate score with a proven
  error bound (int16 products, by AVX-512 VNNI or AVX2, unless the bins are too fine for their bound;
  else an fp32 GEMM; ``$DEEPSSIM_FAST_TOPK_KERNEL`` or ``_native.set_topk_kernel`` overrides the
  choice), and computes the
  canonical score of every pair the bound leaves undecided, so results do not depend on the kernel,
  tiling, threads or SIMD level. Rows of 2^14 components or more (images of 128 x 128 and up, whole
  volumes), where those bounds approach a bin's width, have every pair scored canonically, a 4096-column
  block of both sets at a time.
* ``scores`` (n_synth, k) float32 descending; ``indices`` (n_synth, k) int64 into ``train``; equal
  scores go to the lower training index. A score may lie a float32 ulp or two outside [-1, 1] (1.0000001
  for some rows against an identical row: a row normalised in float64 and rounded to float32 is not exactly
  unit); the histogram's end bins take such scores, and the class counts compare them as they are.
* Histogram: ``bins`` equal-width bins on [-1, 1]; bin = floor((s - lo) / (hi - lo) * bins) computed in
  float64 from the float32 score, clamped to [0, bins - 1]. That rule decides; the edges returned beside
  the counts (``np.linspace(-1, 1, bins + 1)``) are its nominal edges, rounded, so ``np.histogram`` with
  them can put a score within ~1e-16 of an edge in the neighbouring bin (0.5 on 364 bins; a negative score
  smaller than ~1e-16 in magnitude, which the rule counts with 0).
* Class counts, over all pairs: ``different`` s <= low < ``similar`` <= high < ``duplicate`` (the float32
  score compared in float64 with the thresholds as given). Bins are closed on the left and classes on the
  right, so a score exactly equal to a threshold that is also a bin edge (0.5 or 0.75 on 200 bins) is in
  the bin above the edge but the class below; the defaults 0.6 and 0.85 are no float32 value, and there
  the histogram and the class counts always agree.
* ``train_hits[j]``: how many synthetic samples have training row j as their nearest neighbour.
* ``all_pairs(train, None)`` compares ``train`` with itself and equals ``all_pairs(train, train,
  self_offset=0)``: self-pairs are excluded from top-k, histogram and class counts, so the histogram
  counts ordered pairs i != j (each unordered pair twice).

Backends: ``"native"`` (CPU default: a C++ GEMM micro-kernel (int16 VNNI / AVX2, or fp32) fused with selection
and histogram),
``"triton"`` (default for CUDA tensors / cupy arrays; on CPU tensors only with ``TRITON_INTERPRET=1``)
and ``"torch"`` (chunked ``torch.mm`` + stable sort, the portable fallback). The GPU and torch backends
score pairs with their own fp32 GEMM, whose rounding depends on a pair's place in the product. Their top-k
is then made exact: each row keeps k + max(k, 8) GEMM candidates, which are scored again pair by pair
(float32 products summed in float64, rounded once: the same operations for every pair, so identical
training rows score identically and the lower index wins), and a row whose candidates cannot prove its
top-k (more near-equal rows than it kept) is scored that way against every training row. Those scores may
differ from the canonical ones in the last bit (Triton with ``precision`` tf32, fp16 or bf16 keeps its own
scores). The histogram and class counts take each returned pair at its returned score (its count moved
from the bin and class of its GEMM score, which can lie an ulp away, across a threshold), so they agree
with the top-k they come with: a returned score above ``high`` is counted a duplicate. Every other pair is
counted at its GEMM score, so those counts may differ from the native ones for pairs within ~1e-6 of a bin
edge or threshold, and may change with ``block`` and ``tile``. (A returned pair that was not among its
row's candidates, in a row scored against every training row, has a GEMM score known only within the
GEMM's error bound; where a bin edge or threshold lies that close it stays counted at that score, and the
call logs how many did.) Results always come back as numpy arrays in :class:`AllPairsResult`, whatever the
input kind or device.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._arrays import check_readable, ieee_floats, to_torch
from ._ssim_common import check_bool, check_count_or_none
from ._atomic import atomic_write
from .backends import BACKENDS
from .backends import ENV_VAR as _BACKEND_ENV
from .backends import BackendUnavailableError
from .backends import available as _available
from .backends import resolve as _resolve
from .backends import triton_device as _triton_device

logger = logging.getLogger(__name__)

HIST_RANGE = (-1.0, 1.0)
CLASS_NAMES = ("different", "similar", "duplicate")
PRECISIONS = ("ieee", "tf32x3", "tf32", "fp16", "bf16")  # Triton's matmul input precisions (kernels.cosine_topk)
_INT64_MAX = np.iinfo(np.int64).max
_PAD = 8  # rows are zero-padded to a multiple of 8 floats (32-byte rows; zeros do not change a score)
_NORM_CHUNK = 1 << 12
_NORM_CHUNK_BYTES = 256 << 20  # float64 rows of one normalisation chunk (see _norm_rows)
#: Native engine: the synthetic rows are normalised a block at a time, at most this many bytes of float32
#: (the training rows, scored against every block, are normalised once, whole). A correlation audit of whole
#: volumes has rows of ~2.5e7 bytes: its normalised synthetic set was a second copy of the set.
_Q_BLOCK_BYTES = 1 << 30
#: Native engine: rows of at least this many (padded) components are scored by :func:`_wide_scores`, every
#: pair canonically, a 4096-column block at a time with the blocks of both sets cache-resident. The fast
#: kernels' error bounds grow with the row (~1e-2 at 2e6 components against bins 1e-2 wide), so they left
#: many such pairs to the canonical score, which read both rows whole from memory for each pair. Measured
#: crossover (Zen 3, 1000 x 1000 random rows): fused 0.58 s against 0.71 s at 12288, 1.08 against 0.95 at
#: 16384; 525 x 525 centred MNI slices of 176 x 208: 1.03-1.06 s against 0.63-0.68 s.
_WIDE_DP = 1 << 14
_WIDE_TILE = 256  # training rows per tile on that path (their 4096-column block: 4 MB)
_WIDE_Q_ROWS = 4096  # synthetic rows per block on that path, at most (their 4096-column block: 64 MB)
_CANON_BLOCK = 4096  # the canonical score's column block (kCanonBlock, csrc/topk.cpp)


# ---------------------------------------------------------------------------------------------- result
@dataclass
class AllPairsResult:
    """What :func:`all_pairs` returns; every array is numpy on the host.

    Attributes
    ----------
    scores : (n_synth, k) float32, descending per row.
    indices : (n_synth, k) int64 row indices into ``train`` (ties to the lower index).
    histogram : ``(counts, edges)``: counts int64 (bins,) over all compared pairs, edges float64 (bins + 1,).
    class_counts : ``{"different", "similar", "duplicate"}`` pair counts over all compared pairs.
    train_hits : (n_train,) int64, how often each training row is some synthetic row's nearest neighbour.
    thresholds : ``(low, high)`` used for the class counts.
    n_train, n_synth, k : problem sizes.
    matrix : the dense (n_synth, n_train) float32 score matrix when asked for (``dense=True`` or ``out=``),
        else None (native: the canonical scores; torch/triton: ``torch.mm`` scores, which may differ in the
        last bit from their re-scored top-k). Self-pairs keep their score there.
    backend : which backend computed it.
    """

    scores: np.ndarray
    indices: np.ndarray
    histogram: tuple[np.ndarray, np.ndarray]
    class_counts: dict[str, int]
    train_hits: np.ndarray
    thresholds: tuple[float, float]
    n_train: int
    n_synth: int
    k: int
    matrix: np.ndarray | None = field(default=None, repr=False)
    backend: str = ""

    def __eq__(self, other: object) -> bool:
        # the generated __eq__ compared the arrays with ==, and `a == b` raised numpy's "truth value of an
        # array is ambiguous": equal results are equal in every array and number (not the backend's name,
        # which the engines' results are meant to be independent of); a dense matrix counts where either has one
        if not isinstance(other, AllPairsResult):
            return NotImplemented
        if (self.n_train, self.n_synth, self.k, tuple(self.thresholds), self.class_counts) != (
                other.n_train, other.n_synth, other.k, tuple(other.thresholds), other.class_counts):
            return False
        arrays = [(self.scores, other.scores), (self.indices, other.indices), (self.train_hits, other.train_hits),
                  (self.histogram[0], other.histogram[0]), (self.histogram[1], other.histogram[1])]
        if self.matrix is not None or other.matrix is not None:
            if self.matrix is None or other.matrix is None:
                return False
            arrays.append((self.matrix, other.matrix))
        return all(np.array_equal(a, b) for a, b in arrays)

    __hash__ = None  # mutable, like the dataclass it replaces

    @property
    def n_pairs(self) -> int:
        """Number of pairs counted in the histogram and class counts."""
        return int(self.histogram[0].sum())

    def __repr__(self) -> str:
        # a summary, not the arrays: the dataclass repr printed every score, index, bin count and edge
        best = f"{float(self.scores[:, 0].max()):.4f}" if self.scores.size else "n/a"
        dense = "" if self.matrix is None else f", matrix={tuple(self.matrix.shape)}"
        return (f"AllPairsResult(n_synth={self.n_synth}, n_train={self.n_train}, k={self.k}, "
                f"backend={self.backend!r}, pairs={self.n_pairs}, bins={len(self.histogram[0])}, "
                f"thresholds={tuple(self.thresholds)}, class_counts={self.class_counts}, best_score={best}{dense})")

    # ------------------------------------------------------------------------------------- merge
    @staticmethod
    def merge(parts: Sequence[AllPairsResult], *, axis: str = "synth",
              train_offsets: Sequence[int] | None = None) -> AllPairsResult:
        """Combine the results of shards exactly (bit-identical to one un-sharded call).

        ``axis="synth"``: the parts cover consecutive synthetic rows (in order) against the same training
        set; rows are concatenated, histograms, class counts and train hits summed.
        ``axis="train"``: the parts cover the same synthetic rows against consecutive training shards;
        ``train_offsets[p]`` is the global index of shard p's row 0 (default: cumulative ``n_train``).
        Top-k lists are merged on (score descending, global index ascending); histograms and class
        counts are summed and ``train_hits`` is recomputed from the merged nearest neighbours. ``backend``
        names every engine of the parts, joined by ``+`` in order of first appearance (``"native+torch"``):
        engines order their sums differently, so parts from two of them can differ in the last bits.
        Dense matrices are not merged: the merged result has none (``matrix`` None).
        """
        parts = list(parts)
        if not parts:
            raise ValueError("merge: no parts given")
        if axis not in ("synth", "train"):
            raise ValueError(f"merge: axis must be 'synth' or 'train', got {axis!r}")
        if axis == "synth" and train_offsets is not None:
            raise ValueError("merge(axis='synth'): train_offsets applies to axis='train' only (synth-axis parts "
                             "share one training set)")
        k = parts[0].k
        thr = tuple(parts[0].thresholds)
        edges = parts[0].histogram[1]
        for i, p in enumerate(parts):
            if p.k != k:
                raise ValueError(f"merge: part {i} has k={p.k}, part 0 has k={k}")
            if tuple(p.thresholds) != thr:
                raise ValueError(f"merge: part {i} has thresholds {p.thresholds}, part 0 has {thr}")
            if p.histogram[1].shape != edges.shape or not np.array_equal(p.histogram[1], edges):
                raise ValueError(f"merge: part {i} has different histogram bins than part 0")
        counts = np.sum([p.histogram[0] for p in parts], axis=0).astype(np.int64)
        cls = {c: int(sum(p.class_counts[c] for p in parts)) for c in CLASS_NAMES}
        if axis == "synth":
            n_train = parts[0].n_train
            for i, p in enumerate(parts):
                if p.n_train != n_train:
                    raise ValueError(f"merge(axis='synth'): part {i} has n_train={p.n_train}, "
                                     f"part 0 has {n_train}")
            scores = np.concatenate([p.scores for p in parts], axis=0)
            indices = np.concatenate([p.indices for p in parts], axis=0)
            hits = np.sum([p.train_hits for p in parts], axis=0).astype(np.int64)
            return AllPairsResult(scores, indices, (counts, edges.copy()), cls, hits, thr, n_train,
                                  int(scores.shape[0]), k, backend=_joint_backend(parts))
        n_synth = parts[0].n_synth
        for i, p in enumerate(parts):
            if p.n_synth != n_synth:
                raise ValueError(f"merge(axis='train'): part {i} has n_synth={p.n_synth}, "
                                 f"part 0 has {n_synth}")
        if train_offsets is None:
            train_offsets = np.cumsum([0] + [p.n_train for p in parts[:-1]]).tolist()
        if len(train_offsets) != len(parts):
            raise ValueError(f"merge: {len(train_offsets)} train_offsets for {len(parts)} parts")
        for i, o in enumerate(train_offsets):  # (12.5 was cut to 12)
            if isinstance(o, (bool, np.bool_)) or not isinstance(o, (int, np.integer)):
                raise ValueError(f"merge(axis='train'): train_offsets[{i}]={o!r} is not an integer (a row index)")
        # the shards must tile 0 .. n_train - 1: overlapping ones put one training row twice in a top-k, a gap
        # left rows unaccounted for, a negative offset failed as an "internal error"
        spans = sorted((int(o), int(o) + p.n_train, i) for i, (o, p) in enumerate(zip(train_offsets, parts,
                                                                                     strict=True)))
        end = 0
        for a, b, i in spans:
            if a < 0:
                raise ValueError(f"merge(axis='train'): train_offsets[{i}]={a} is negative")
            if a != end:
                raise ValueError(f"merge(axis='train'): the parts must cover consecutive training rows from 0; part "
                                 f"{i} starts at train_offsets[{i}]={a}, where "
                                 + (f"row {end} is next" if a > end else f"rows {a}..{end - 1} are another part's"))
            end = b
        n_train = end
        cs = np.concatenate([p.scores for p in parts], axis=1)
        ci = np.concatenate([p.indices + int(o) for o, p in zip(train_offsets, parts, strict=True)], axis=1)
        scores, indices = _select_sorted(cs, ci, k)
        hits = _train_hits(indices, n_train)
        return AllPairsResult(scores, indices, (counts, edges.copy()), cls, hits, thr, n_train, n_synth, k,
                              backend=_joint_backend(parts))

    # ------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (npz), atomically: a temporary file in the same folder, then ``os.replace``.

        The dense matrix, if any, is not saved (use ``out=`` for that).
        """
        return self._save(path)

    def _save(self, path: str | os.PathLike, **extra: np.ndarray) -> Path:
        """:meth:`save`, with ``extra`` arrays stored beside the result's (which :meth:`load` ignores)."""
        return atomic_write(path, lambda f: np.savez(
            f, scores=self.scores, indices=self.indices, hist_counts=self.histogram[0],
            hist_edges=self.histogram[1],
            class_counts=np.array([self.class_counts[c] for c in CLASS_NAMES], dtype=np.int64),
            train_hits=self.train_hits, thresholds=np.array(self.thresholds, dtype=np.float64),
            sizes=np.array([self.n_train, self.n_synth, self.k], dtype=np.int64),
            backend=np.array(self.backend), **extra))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AllPairsResult:
        """Read a result written by :meth:`save`; any other file (or a damaged one) is a ValueError naming it."""
        return cls._load(path)[0]

    @classmethod
    def _load(cls, path: str | os.PathLike, extra: Sequence[str] = ()) -> tuple[AllPairsResult, dict[str, Any]]:
        """:meth:`load`, and the ``extra`` arrays :meth:`_save` stored beside the result (those present)."""
        p = Path(path)
        if p.is_dir():  # (it was called "no such file")
            raise IsADirectoryError(f"{p}: a folder, not a result written by AllPairsResult.save")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (a result written by AllPairsResult.save)")
        try:
            with np.load(p, allow_pickle=False) as z:
                n_train, n_synth, k = (int(v) for v in z["sizes"])
                cc = z["class_counts"]
                r = cls(scores=z["scores"], indices=z["indices"],
                        histogram=(z["hist_counts"], z["hist_edges"]),
                        class_counts={c: int(v) for c, v in zip(CLASS_NAMES, cc, strict=True)},
                        train_hits=z["train_hits"], thresholds=tuple(float(v) for v in z["thresholds"]),
                        n_train=n_train, n_synth=n_synth, k=k, backend=str(z["backend"]))
                found = {name: z[name] for name in extra if name in z.files}
        except Exception as exc:  # noqa: BLE001 - numpy and zipfile raise many types for foreign/damaged files
            raise ValueError(f"{p}: not a result written by AllPairsResult.save, or damaged "
                             f"({type(exc).__name__}: {exc})") from exc
        bins = len(r.histogram[0])
        if (r.scores.shape != (n_synth, k) or r.indices.shape != (n_synth, k) or r.train_hits.shape != (n_train,)
                or r.histogram[1].shape != (bins + 1,) or len(r.thresholds) != 2
                # (and the dtypes the class promises: float64 scores or float indices loaded unnoticed)
                or r.scores.dtype != np.float32 or r.indices.dtype != np.int64 or r.train_hits.dtype != np.int64
                or r.histogram[0].dtype != np.int64):
            raise ValueError(f"{p}: inconsistent saved result (sizes n_train={n_train}, n_synth={n_synth}, k={k}; "
                             f"scores {r.scores.dtype}{r.scores.shape}, indices {r.indices.dtype}{r.indices.shape}, "
                             f"train_hits {r.train_hits.dtype}{r.train_hits.shape}, histogram {r.histogram[0].dtype})")
        if r.indices.size and (r.indices.min() < 0 or r.indices.max() >= n_train):
            # (a foreign or edited file: it failed later, in merge, as an "internal error")
            raise ValueError(f"{p}: inconsistent saved result: indices outside [0, n_train={n_train}) (from "
                             f"{int(r.indices.min())} to {int(r.indices.max())})")
        return r, found


def _joint_backend(parts: Sequence[AllPairsResult]) -> str:
    """The engines of ``parts`` (each maybe already a ``+``-joined list), in order of first appearance."""
    names: list[str] = []
    for p in parts:
        for b in str(p.backend or "").split("+"):
            if b and b not in names:
                names.append(b)
    return "+".join(names)


def _select_sorted(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score descending, index ascending) of the candidate columns."""
    if scores.shape[0] == 0:
        return scores[:, :k].astype(np.float32), indices[:, :k].astype(np.int64)
    # ordered by the scores' bits, made monotone integers (-0.0 as +0.0, a tie): a float compare under the
    # caller's denormals-are-zero mode (torch.set_flush_denormal) saw every subnormal score as 0
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
    key[bits == np.int32(-(2**31))] = 0
    order = np.lexsort((indices, -key.astype(np.int64)), axis=1)[:, :k]
    return (np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False),
            np.take_along_axis(indices, order, axis=1).astype(np.int64, copy=False))


def _train_hits(indices: np.ndarray, n_train: int) -> np.ndarray:
    if indices.shape[0] == 0 or indices.shape[1] == 0:
        return np.zeros(n_train, dtype=np.int64)
    top = indices[:, 0]
    # an unfilled top-k slot (the INT64_MAX sentinel) must never reach np.bincount, which would try to
    # allocate (and write) past it
    if top.min() < 0 or top.max() >= n_train:
        bad = int(np.flatnonzero((top < 0) | (top >= n_train))[0])
        raise RuntimeError(f"all_pairs: internal error, synth row {bad} has nearest-neighbour index "
                           f"{int(top[bad])}, outside [0, {n_train}) (a top-k slot was not filled)")
    return np.bincount(top, minlength=n_train).astype(np.int64)


def hist_edges(bins: int) -> np.ndarray:
    """Bin edges (bins + 1,) float64 of the score histogram on [-1, 1]."""
    return np.linspace(HIST_RANGE[0], HIST_RANGE[1], bins + 1)


# ------------------------------------------------------------------------------------------ validation
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_set(x: Any, name: str, d: int | None = None) -> torch.Tensor:
    """``x`` as a 2-D real torch tensor (a view when possible) with finite rows, else a clear error. With ``d``
    (the training set's width), an empty synthetic set of any shape (``[]``, ``np.array([])``) is (0, d)."""
    # read_only: the engines only read the inputs (they normalise into their own buffers), so a memory-mapped
    # read-only set is not copied whole into memory
    t = to_torch(x, name=name, read_only=True).detach()
    check_readable(t, name, "all_pairs")  # (a meta tensor failed inside torch.nonzero below)
    if d is not None and t.numel() == 0 and t.ndim != 2:
        t = t.reshape(0, d)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d) of embeddings, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    if t.is_floating_point() and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if t.shape[0] and t.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have d=0 (shape {tuple(t.shape)})")
    if t.is_floating_point() and t.numel():
        # numpy on the host (single-threaded: no torch worker threads left spinning on the cores)
        if t.device.type == "cpu":  # (in chunks: a whole set's isfinite mask was n x d bytes, 763 MiB for 400
            bad = _first_row(t, lambda c: ~np.isfinite(c).all(axis=1))  # rows of 2e6)
        else:
            rows = (~torch.isfinite(t).all(dim=1)).nonzero().flatten()
            bad = int(rows[0]) if rows.numel() else -1
        if bad >= 0:
            raise ValueError(f"{name} row {bad} contains NaN or Inf")
    return t


def _host_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (no copy, except bfloat16, widened exactly to float32)."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _zero_row(name: str, row: int) -> ValueError:
    return ValueError(f"{name} row {row} is all zeros; cosine similarity is undefined")


# Row norms outside [2^-450, 2^450] may have over- or underflowed in the float64 sum of squares: such rows
# are first scaled by a power of two (exact) that brings their largest entry into [0.5, 1). For every other
# row the result is bit for bit that of the plain rule, and a scaled row gets the same quotients x / |x|
# the plain rule would give without overflow (a power of two cancels exactly in the division).
_NORM_SAFE = (2.0 ** -450, 2.0 ** 450)


def _rescale_extreme_numpy(c: np.ndarray, norm: np.ndarray) -> None:
    """In place: rows of c (float64) whose norm left the safe range scaled by 2^-e, their norms recomputed."""
    bad = np.flatnonzero(~((norm >= _NORM_SAFE[0]) & (norm <= _NORM_SAFE[1])))
    if not bad.size:
        return
    m = np.abs(c[bad]).max(axis=1)
    bad, m = bad[m > 0], m[m > 0]  # (a row of zeros stays a zero row)
    if bad.size:
        c[bad] = np.ldexp(c[bad], -np.frexp(m)[1][:, None])
        norm[bad] = np.linalg.norm(c[bad], axis=1)


def _rescale_extreme_torch(c: torch.Tensor, norm: torch.Tensor) -> None:
    """The torch twin of :func:`_rescale_extreme_numpy` (any device)."""
    bad = (~((norm >= _NORM_SAFE[0]) & (norm <= _NORM_SAFE[1]))).nonzero().flatten()
    if not bad.numel():
        return
    m = c[bad].abs().amax(dim=1)
    bad, m = bad[m > 0], m[m > 0]
    if bad.numel():
        # torch.ldexp multiplies by 2^-e, which overflows to inf where the largest entry is below 2^-1024 (a
        # subnormal): apply at most 2^1023 at once, then the rest (both exact up-scalings there; elsewhere the
        # rest is 2^0, which changes nothing)
        e = -torch.frexp(m).exponent[:, None].to(c.dtype)
        first = e.clamp(max=1023)
        c[bad] = torch.ldexp(torch.ldexp(c[bad], first), e - first)
        norm[bad] = torch.linalg.vector_norm(c[bad], dim=1)


def _norm_rows(d: int) -> int:
    """Rows per normalisation chunk of width ``d``: at most ``_NORM_CHUNK``, and few enough that the chunk in
    float64 takes at most ``_NORM_CHUNK_BYTES`` (a whole-volume correlation audit has d ~ 7e6: 4096 such rows
    are 229 GB of float64, and the GPU path holds two such temporaries at once)."""
    return max(1, min(_NORM_CHUNK, _NORM_CHUNK_BYTES // (8 * max(1, d))))


def _normalize_rows_numpy(t: torch.Tensor, out_np: np.ndarray) -> int:
    """The float64 rule in numpy (where the native extension is missing), in chunks over the caller's threads;
    out_np must be zero-filled. Returns the first all-zero row, or -1."""
    n, d = t.shape
    chunk = _norm_rows(d)

    def rows(a: int) -> int:
        # numpy releases the GIL in these loops: chunks run on all cores
        c = _host_view(t[a:a + chunk]).astype(np.float64)
        norm = np.linalg.norm(c, axis=1)
        _rescale_extreme_numpy(c, norm)
        zero = np.flatnonzero(norm == 0)
        if zero.size:
            return a + int(zero[0])
        out_np[a:a + c.shape[0], :d] = c / norm[:, None]
        return -1

    starts = range(0, n, chunk)
    workers = min(len(starts), torch.get_num_threads())  # the caller's thread budget (Dask tasks set it)
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            zero_rows = list(pool.map(rows, starts))
    else:
        zero_rows = [rows(a) for a in starts]
    bad = [r for r in zero_rows if r >= 0]
    return min(bad) if bad else -1


def _normalize(t: torch.Tensor, name: str, dp: int, device: torch.device | str, offset: int = 0) -> torch.Tensor:
    """Rows L2-normalised (norm and division in float64, then rounded to float32), zero-padded to (n, dp),
    on ``device``. On CPU by the native extension (threaded), else in chunks so the float64 temporaries stay
    small. Rows of extreme magnitude are scaled by a power of two first (see ``_NORM_SAFE``), so any non-zero
    finite row normalises. ``offset``: the set's row number of ``t``'s first row (for the error)."""
    n, d = t.shape
    if torch.device(device).type == "cpu" and t.device.type == "cpu":
        out_np = np.zeros((n, dp), dtype=np.float32)
        if _available("native"):
            from . import _native

            c = _host_view(t)
            if c.dtype not in (np.float32, np.float64):
                # float16 widens exactly to float32; integers go to float64, which holds them exactly up to
                # 2^53 (float32 would round entries past 2^24 before the float64 norm, unlike every other path)
                c = c.astype(np.float32 if c.dtype.kind == "f" else np.float64)
            zero = _native.normalize_rows(np.ascontiguousarray(c), out_np)
        else:
            zero = _normalize_rows_numpy(t, out_np)
        if zero >= 0:
            raise _zero_row(name, offset + zero)
        return torch.from_numpy(out_np)
    out = torch.zeros((n, dp), dtype=torch.float32, device=device)
    chunk = _norm_rows(d)
    for a in range(0, n, chunk):
        c = t[a:a + chunk].to(device=device, dtype=torch.float64)
        norm = torch.linalg.vector_norm(c, dim=1)
        _rescale_extreme_torch(c, norm)
        zero = (norm == 0).nonzero()
        if zero.numel():
            raise _zero_row(name, offset + a + int(zero[0]))
        out[a:a + c.shape[0], :d] = (c / norm[:, None]).to(torch.float32)
    return out


def _first_row(t: torch.Tensor, bad: Any) -> int:
    """The first row of a CPU set for which ``bad`` (a numpy chunk of rows -> (rows,) bool) holds, or -1; a
    chunk of at most 2^22 elements at a time, so its temporaries stay small whatever the set."""
    n, d = t.shape
    step = max(1, (1 << 22) // max(1, d))
    for a in range(0, n, step):
        hit = np.flatnonzero(bad(_host_view(t[a:a + step])))
        if hit.size:
            return a + int(hit[0])
    return -1


def _first_zero_row(t: torch.Tensor) -> int:
    """The first all-zero row of a finite CPU set (the rows whose norm is 0), or -1 (a check before the blocks
    are normalised one by one, so that the error comes before any work)."""
    return _first_row(t, lambda c: ~(c != 0).any(axis=1))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pair", unit_scale=True, desc=desc, disable=None if enabled else True,
                smoothing=0.1, leave=False)


# ------------------------------------------------------------------------------------------- public API
def _check_dims(train_shape: tuple, synth_shape: tuple) -> None:
    """Both sets' rows have the same width (also checked by the Dask driver, in the same words)."""
    if synth_shape[1] != train_shape[1]:
        raise ValueError(f"all_pairs: train and synth have different embedding sizes: "
                         f"train {train_shape}, synth {synth_shape}")


def _check_candidates(train_shape: tuple, k: int, self_pairs: bool) -> None:
    """Every query has at least k candidates: training rows, less its own with self-pairs excluded (also checked
    by the Dask driver, in the same words)."""
    n_train = train_shape[0]
    if n_train == 0:  # ("k=1 exceeds the -1 candidates per query" in self mode)
        raise ValueError(f"all_pairs: train has no rows (shape {train_shape}): there is nothing to search")
    n_cand = n_train - (1 if self_pairs else 0)
    if k > n_cand:
        what = "n_train - 1 (self-pairs excluded)" if self_pairs else "n_train"
        raise ValueError(f"all_pairs: k={k} exceeds the {n_cand} candidates per query ({what}, "
                         f"train shape {train_shape})")


@ieee_floats
def all_pairs(train: Any, synth: Any | None, *, k: int = 5, thresholds: tuple[float, float] = (0.6, 0.85),
              bins: int = 200, device: str | torch.device | None = None, backend: str | None = None,
              progress: bool = True, dense: bool = False, out: str | os.PathLike | None = None,
              workers: Any = None, scheduler: Any = None, self_offset: int | None = None,
              block: int | None = None, tile: int | None = None, precision: str = "ieee") -> AllPairsResult:
    """Exact cosine top-k of every synthetic row among the training rows, plus the score histogram.

    Parameters
    ----------
    train : (n_train, d) embeddings — numpy, torch (CPU or CUDA) or cupy; float16/bfloat16/float32/float64
        or integer (normalised from the exact values in float64, then computed in fp32).
    synth : (n_synth, d) embeddings, or None to compare ``train`` with itself (self-pairs excluded).
    k : neighbours per synthetic row, 1 <= k <= number of candidates (n_train, minus one with self-pairs).
    thresholds : ``(low, high)``: class counts different <= low < similar <= high < duplicate.
    bins : histogram bins, equal width on [-1, 1]. Native engine: past ~10^4 bins most pairs lie within the
        fast kernel's error bound of a bin edge and are re-scored exactly (2^16 bins: ~4x the time of 200).
    device : where to compute: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``; any other device is an error); default:
        where the data lives.
    backend : ``"native"``, ``"torch"`` or ``"triton"``; default from ``$DEEPSSIM_FAST_BACKEND`` or the data.
    progress : show a tqdm bar with pairs/s (only on a TTY).
    dense : also return the full (n_synth, n_train) float32 matrix in ``result.matrix`` (small problems).
    out : write the full matrix to this path as a ``.npy`` memmap (implies ``dense``).
    workers, scheduler : run on a Dask cluster via :func:`deepssim_fast.distributed.all_pairs_distributed`.
    self_offset : synth rows are rows ``self_offset ...`` of ``train``; pairs (i, self_offset + i) are
        excluded.
    block, tile : synthetic rows per block and training rows per tile (tuning). Native engine: results are bit
        for bit the same for any block and tile. torch: they set the shapes of the ``torch.mm`` calls, so a
        GEMM score may change in its last bit with them (seen: 1 ulp at ``block=7, tile=13``), and with it
        the bin of a pair at a bin edge; the top-k, re-scored pair by pair (and counted at those scores),
        does not. Triton: they regroup
        the rows into launches (``matrix`` comes from ``torch.mm`` as on torch); by default a CUDA launch
        takes 65536 training rows and as many synthetic rows as keep its candidates within 1 GiB (1/32 of
        the GPU's memory if less), ~5 GB with the merge's buffers at most; smaller values hold less.
    precision : Triton only: ``"ieee"`` (fp32 inputs, default, exact fp32 on the CUDA cores);
        ``"tf32x3"`` (each fp32 input split into two tf32 parts, three tensor-core products: scores within
        ~1e-6 of fp32; on an H200 the whole call took 392 ms against 547 ms for ``"ieee"``, 10^10 pairs);
        ``"tf32"``, ``"fp16"`` or ``"bf16"`` inputs (bf16 on CUDA only: the Triton interpreter has no
        bfloat16), fp32 accumulation — low precision changes scores by ~1e-3, and so the top-k.

    Returns
    -------
    AllPairsResult with numpy arrays (see the module docstring for the conventions).
    """
    if precision not in PRECISIONS:  # (used by Triton only, but a wrong value is an error on every backend)
        raise ValueError(f"all_pairs: precision must be one of {PRECISIONS}, got {precision!r}")
    # (dense="no" returned the dense matrix, by its truth value; out=5 failed naming no parameter)
    dense, progress = check_bool(dense, "all_pairs: dense"), check_bool(progress, "all_pairs: progress")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"all_pairs: out must be a path (str or os.PathLike) of the .npy file to write the dense "
                        f"matrix to, or None; got {type(out).__name__}")
    if workers is not None or scheduler is not None:
        given = [n for n, v in (("dense", dense or None), ("out", out), ("self_offset", self_offset),
                                ("device", device), ("block", block), ("tile", tile)) if v is not None]
        if given:  # (the shards choose their own blocks and tiles: see all_pairs_distributed)
            raise ValueError(f"all_pairs: {', '.join(given)} cannot be combined with workers/scheduler "
                             "(dense/out/self_offset/device/block/tile are single-process options)")
        from .distributed import all_pairs_distributed

        return all_pairs_distributed(train, synth, k=k, thresholds=thresholds, bins=bins, backend=backend,
                                     progress=progress, workers=workers, scheduler=scheduler,
                                     precision=precision)
    k, low, high, bins = _check_params(k, thresholds, bins)
    if self_offset is not None and (isinstance(self_offset, (bool, np.bool_))
                                    or not isinstance(self_offset, (int, np.integer))):
        raise ValueError(f"all_pairs: self_offset must be a non-negative integer or None, got {self_offset!r}")
    if synth is None:
        if self_offset not in (None, 0):
            raise ValueError(f"all_pairs: synth=None compares train with itself; self_offset must be 0 "
                             f"or None, got {self_offset}")
        synth, self_offset = train, 0
    tt = _check_set(train, "train")
    ts = tt if synth is train else _check_set(synth, "synth", d=tt.shape[1] if tt.ndim == 2 else None)
    n_train, d = tt.shape
    n_synth = ts.shape[0]
    _check_dims(tuple(tt.shape), tuple(ts.shape))
    if self_offset is not None:
        if not 0 <= self_offset <= n_train - n_synth:
            raise ValueError(f"all_pairs: self_offset={self_offset} with n_synth={n_synth} does not fit in "
                             f"n_train={n_train}")
        self_offset = int(self_offset)
    _check_candidates(tuple(tt.shape), k, self_offset is not None)
    n_cand = n_train - (1 if self_offset is not None else 0)
    for name, v in (("block", block), ("tile", tile)):
        check_count_or_none(v, f"all_pairs: {name}")
    if device is not None:
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"all_pairs: device={device!r} is not supported; use 'cpu', 'cuda' (or 'cuda:N'), or "
                             "leave device=None to compute where the data lives")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"all_pairs: device={device!r}, but torch sees no CUDA device here "
                                          f"(torch {torch.__version__}, CUDA build: "
                                          f"{torch.version.cuda or 'no'}); install a CUDA build of torch on "
                                          "a machine with an NVIDIA GPU, or use device='cpu'")
        bk = _resolve(backend, [], supported=BACKENDS)
        if dev.type == "cuda" and backend in (None, "auto") and os.environ.get(_BACKEND_ENV, "") in ("", "auto"):
            bk = "triton" if _available("triton") else "torch"
    else:
        bk = _resolve(backend, [tt, ts], supported=BACKENDS)
        dev = tt.device if bk != "native" else torch.device("cpu")
        if bk == "triton":  # host data asked onto Triton: the GPU (or the interpreter's CPU)
            dev = _triton_device(torch.empty(0, device=dev)).device
    if bk == "native":
        dev = torch.device("cpu")
        from . import _native

        if hasattr(_native, "topk_kernel_choice"):  # (an extension built before it has no such setting)
            # a bad $DEEPSSIM_FAST_TOPK_KERNEL fails every native call, now: wide rows and an empty synthetic
            # set never reach the GEMM kernel, and ran as if it were unset
            _native.topk_kernel_choice()
    if precision != "ieee" and bk != "triton":  # (it was accepted and ignored without a word)
        warnings.warn(f"all_pairs: precision={precision!r} applies to the Triton backend only; the {bk} backend "
                      "computes exact fp32 scores", UserWarning, stacklevel=2)
    logger.info("all_pairs: %d synth x %d train, d=%d, k=%d, backend=%s, device=%s", n_synth, n_train, d, k,
                bk, dev)
    if out is not None and Path(os.fspath(out)).is_dir():  # (found now, not after the whole run)
        raise IsADirectoryError(f"all_pairs: out={os.fspath(out)!r} is a folder; give the path of the .npy file "
                                "to write the dense matrix to")
    if out is not None:
        from ._atomic import check_writable

        check_writable(out)  # (a read-only file was replaced after the whole run, then failed to reopen)
    edges = hist_edges(bins)
    dp = -(-d // _PAD) * _PAD
    # wide rows on the native engine: normalised a column block at a time as they are scored (_WideRows), not
    # copied whole (a correlation audit of volumes holds its rows already: the copy doubled that)
    wide = bk == "native" and dp >= _WIDE_DP and _raw_rows_ok(tt) and (ts is tt or _raw_rows_ok(ts))
    # (normalised or checked before the empty case: an all-zero training row is an error there too)
    T = _WideRows.of(tt, "train") if wide else _normalize(tt, "train", dp, dev)
    if n_synth == 0:
        matrix = None
        if out is not None:
            matrix = _dense_out(out, (0, n_train), lambda m: None)
        elif dense:
            matrix = np.empty((0, n_train), dtype=np.float32)
        return AllPairsResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64),
                              (np.zeros(bins, np.int64), edges), dict.fromkeys(CLASS_NAMES, 0),
                              np.zeros(n_train, np.int64), (low, high), n_train, 0, k, matrix, bk)
    same = synth is train and self_offset == 0 and n_synth == n_train
    if wide:
        Q = T if same else _WideRows.of(ts, "synth")
    elif bk == "native" and not same:
        # the synthetic rows are normalised a block at a time (_run_native): found to be all zero first
        zero = _first_zero_row(ts)
        if zero >= 0:
            raise _zero_row("synth", zero)
        Q = None
    else:
        Q = T if same else _normalize(ts, "synth", dp, dev)

    def run(matrix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        state = dict(k=k, low=low, high=high, bins=bins, self_offset=self_offset, progress=progress,
                     matrix=matrix)
        if bk == "native":
            rows = max(1, min(block or 65536, _Q_BLOCK_BYTES // (4 * dp)))
            if wide:  # (a block's 4096-column slab, normalised: at most _WIDE_Q_ROWS x 16 KB)
                return _run_native(Q.rows, n_synth, T, block=min(block or _WIDE_Q_ROWS, _WIDE_Q_ROWS),
                                   tile=tile or 32768, **state)
            queries = (lambda a, b: Q.numpy()[a:b]) if Q is not None else (
                lambda a, b: _normalize(ts[a:b], "synth", dp, dev, offset=a).numpy())
            return _run_native(queries, n_synth, T.numpy(), block=rows, tile=tile or 32768, **state)
        e = _approx_bound(bk, d, precision)
        if e is None:  # low-precision Triton inputs: their own scores, as documented
            return _run_triton(Q, T, d=d, block=block, tile=tile, precision=precision, **state)
        # GEMM scores round differently by a row's place in the product (seen: 27 identical training rows
        # one ulp below 3 others at the end of the tile, so the three were "nearest"): these engines keep
        # k + slack candidates, which _rerank scores again pair by pair (identical rows, identical scores)
        state["k"] = min(n_cand, k + max(k, _RERANK_SLACK))
        if bk == "torch":
            s, i, h, c = _run_torch(Q, T, d=d, block=block or 4096, tile=tile or 8192, **state)
        else:
            s, i, h, c = _run_triton(Q, T, d=d, block=block, tile=tile, precision=precision, **state)
        fs, fi = _rerank(Q, T, d, s, i, k, e, self_offset, n_cand)
        # the counts follow the returned scores: a returned pair counted at its GEMM score (an ulp off, across
        # a threshold) contradicted the result's own top-k (score > high, counted as not a duplicate)
        left = _recount(s, i, fs, fi, h, c, n_train=n_train, bins=bins, low=low, high=high, e=e,
                        self_offset=self_offset)
        if left:
            logger.info("all_pairs: %d returned pairs outside their rows' GEMM candidates lie within the GEMM's "
                        "error bound of a bin edge or threshold: counted at their GEMM scores", left)
        return fs, fi, h, c

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    if out is not None:
        matrix = _dense_out(out, (n_synth, n_train), lambda m: parts.append(run(m)))
    else:
        matrix = np.empty((n_synth, n_train), dtype=np.float32) if dense else None
        parts.append(run(matrix))
    scores, indices, counts, cls = parts[0]
    hits = _train_hits(indices, n_train)
    return AllPairsResult(scores, indices, (counts, edges), dict(zip(CLASS_NAMES, (int(c) for c in cls),
                                                                         strict=True)),
                          hits, (low, high), n_train, n_synth, k, matrix, bk)


def _dense_out(out: str | os.PathLike, shape: tuple[int, int], fill: Any) -> np.memmap:
    """Write the dense matrix to ``out`` (.npy) atomically: ``fill(memmap)`` writes a temporary file beside
    it, which replaces ``out`` only once complete, so a failed call leaves an existing file as it was and no
    partial file behind. Returns the finished file, memory-mapped read-write."""
    from ._atomic import atomic_path, reserve

    path = Path(os.fspath(out))
    with atomic_path(path) as tmp:
        m = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        reserve(tmp)  # (a full disk: an OSError now, not a SIGBUS in fill)
        fill(m)
        m.flush()
        del m
    return np.load(path, mmap_mode="r+")


def _check_params(k: Any, thresholds: Any, bins: Any) -> tuple[int, float, float, int]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"all_pairs: k must be a positive integer, got {k!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 1 << 20:
        raise ValueError(f"all_pairs: bins must be an integer in [1, 2^20], got {bins!r}")
    try:
        if isinstance(thresholds, (str, bytes)):  # ("01" was taken as (0.0, 1.0), a character each)
            raise TypeError("a string")
        low, high = (float(v) for v in thresholds)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"all_pairs: thresholds must be two numbers (low, high), "
                         f"got {thresholds!r}") from exc
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"all_pairs: thresholds must be finite with low <= high, got {thresholds!r}")
    return int(k), low, high, int(bins)


# ------------------------------------------------------------------------------------------ native engine
def _run_native(queries: Any, ns: int, T: np.ndarray, *, k: int, low: float, high: float, bins: int,
                self_offset: int | None, progress: bool, matrix: np.ndarray | None, block: int, tile: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of queries x chunks of training rows, each folded by one native call (GEMM micro-kernel fused
    with selection, histogram and class counts; multithreaded over queries, GIL released). ``queries(a, b)``:
    the normalised, padded query rows a..b-1 of ``ns``, asked for once per block."""
    from . import _native

    nt = T.shape[0]
    so = -1 if self_offset is None else self_offset
    lo, hi = HIST_RANGE
    scores = np.empty((ns, k), dtype=np.float32)
    indices = np.empty((ns, k), dtype=np.int64)
    hist = np.zeros(bins, dtype=np.int64)
    cls = np.zeros(3, dtype=np.int64)
    wide = isinstance(T, _WideRows) or T.shape[1] >= _WIDE_DP
    step = min(tile, _WIDE_TILE) if wide else tile
    with _progress(ns * nt, progress, "all_pairs[native]") as bar:
        for b0 in range(0, ns, block):
            b1 = min(ns, b0 + block)
            q = queries(b0, b1)
            top_s = np.full((b1 - b0, k), -np.inf, dtype=np.float32)
            top_i = np.full((b1 - b0, k), _INT64_MAX, dtype=np.int64)
            for c0 in range(0, nt, step):
                c1 = min(nt, c0 + step)
                t = T.rows(c0, c1) if isinstance(T, _WideRows) else T[c0:c1]
                if wide:
                    sc = _wide_scores(q, t)
                    if matrix is not None:
                        matrix[b0:b1, c0:c1] = sc
                    _fold_scores(sc, b0, c0, so, top_s, top_i, hist, cls, low=low, high=high)
                else:
                    if matrix is not None:
                        _dense_tile(q, t, matrix, b0, c0)
                    _native.topk_fused(q, t, b0, c0, so, top_s, top_i, hist, cls, lo, hi, low, high)
                bar.update((b1 - b0) * (c1 - c0))
            scores[b0:b1], indices[b0:b1] = _select_sorted(top_s, top_i, k)
    return scores, indices, hist, cls


def _wide_scores(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The canonical scores (m, n) float32 of rows ``q`` (m, dp) against ``t`` (n, dp), dp > 4096, by their
    definition: each 4096-column block's canonical score (``_native.cosine_scores`` of the block's columns,
    copied contiguous: at most 4096 columns, so its 16-lane sum and tree as they are), the blocks' scores added
    in order in float64, the total rounded once. Bit for bit what the native engine computes pair by pair, but
    a block of both sets at a time, from cache. (The copies pay: scoring the columns in place, rows 64 KB
    apart at d = 16384, took 4.0-4.2 s against 3.3-3.4 s for 2000 x 2000 rows.)"""
    from . import _native

    q, t = _WideRows.wrap(q), _WideRows.wrap(t)
    m, n, dp = q.shape[0], t.shape[0], q.dp
    total = np.zeros((m, n), dtype=np.float64)
    part = np.empty((m, n), dtype=np.float32)
    for b in range(0, dp, _CANON_BLOCK):
        e = min(dp, b + _CANON_BLOCK)
        _native.cosine_scores(q.cols(b, e), t.cols(b, e), part)
        total += part
    return total.astype(np.float32)


def _raw_rows_ok(t: torch.Tensor) -> bool:
    """Whether the native extension can normalise ``t``'s rows a column block at a time in place: C-contiguous
    float32 or float64 on the host (other dtypes and layouts are normalised whole, by _normalize)."""
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous()
            and _available("native"))


class _WideRows:
    """Rows of one set for the wide path, normalised on request a column block at a time: ``cols(b, e)`` is
    bit for bit ``_normalize(set)[rows, b:e]`` (the native normaliser's norms, ``_native.row_norms``, computed
    once; ``_native.normalize_cols`` writes the block), without the set's normalised copy. Wraps an array
    that is already normalised and padded as well (``norms`` None)."""

    def __init__(self, x: np.ndarray, norms: np.ndarray | None, dp: int):
        self.x, self.norms, self.dp = x, norms, dp
        self.shape = (x.shape[0], dp)

    @classmethod
    def of(cls, t: torch.Tensor, name: str) -> _WideRows:
        from . import _native

        x = _host_view(t)
        norms = np.empty((x.shape[0], 3), dtype=np.float64)
        zero = _native.row_norms(x, norms)
        if zero >= 0:
            raise _zero_row(name, zero)
        return cls(x, norms, -(-x.shape[1] // _PAD) * _PAD)

    @classmethod
    def wrap(cls, a: Any) -> _WideRows:
        return a if isinstance(a, _WideRows) else cls(a, None, a.shape[1])

    def rows(self, a: int, b: int) -> _WideRows:
        return _WideRows(self.x[a:b], None if self.norms is None else self.norms[a:b], self.dp)

    def cols(self, b: int, e: int) -> np.ndarray:
        if self.norms is None:
            return np.ascontiguousarray(self.x[:, b:e])
        from . import _native

        out = np.empty((self.x.shape[0], e - b), dtype=np.float32)
        _native.normalize_cols(self.x, self.norms, b, out)
        return out


def _fold_scores(s: np.ndarray, r0: int, c0: int, so: int, top_s: np.ndarray, top_i: np.ndarray,
                 hist: np.ndarray, cls: np.ndarray, *, low: float, high: float) -> None:
    """Fold the scores ``s`` of query rows ``r0..`` (local rows of ``top_s``/``top_i``) against training rows
    ``c0..`` into the running top-k, the histogram and the class counts, by the engines' rules (the torch
    engine's helpers, on these arrays without copies: bin and class from the float32 score in float64, ties
    to the lower index, the pair (r, so + r) left out when ``so >= 0``)."""
    m, n = s.shape
    st = torch.from_numpy(s)
    valid = _self_mask(m, n, r0, c0, so if so >= 0 else None, "cpu")
    _hist_update(st, valid, len(hist), low, high, torch.from_numpy(hist), torch.from_numpy(cls))
    cand = st if valid is None else st.masked_fill(~valid, float("-inf"))
    idx = torch.arange(c0, c0 + n, dtype=torch.int64).expand(m, n)
    best_s, best_i = _merge_running(torch.from_numpy(top_s), torch.from_numpy(top_i), cand, idx, top_s.shape[1])
    top_s[:], top_i[:] = best_s.numpy(), best_i.numpy()


_DENSE_BUFFER_BYTES = 32 << 20


def _dense_tile(q: np.ndarray, t: np.ndarray, matrix: np.ndarray, r0: int, c0: int) -> None:
    """Canonical scores of rows ``q`` (m, dp) against ``t`` (n, dp) into ``matrix[r0:r0+m, c0:c0+n]``, through a
    buffer of at most ``_DENSE_BUFFER_BYTES`` (a whole block x tile would be 8 GiB at the default sizes, on top
    of the matrix itself, which may be a memmap)."""
    from . import _native

    m, n = q.shape[0], t.shape[0]
    rows = max(1, min(m, _DENSE_BUFFER_BYTES // (4 * max(n, 1))))
    buf = np.empty(rows * n, dtype=np.float32)
    for a in range(0, m, rows):
        b = min(m, a + rows)
        part = buf[: (b - a) * n].reshape(b - a, n)
        _native.cosine_scores(q[a:b], t, part)
        matrix[r0 + a : r0 + b, c0 : c0 + n] = part


# ------------------------------------------------------------------- exact re-ranking (torch and Triton)
#: Candidates kept beyond k by the torch and Triton engines for _rerank (at least k more)
_RERANK_SLACK = 8
_RERANK_ELEMS = 1 << 24  # float64 products per step of _dot64 (128 MB)


def _approx_bound(backend: str, d: int, precision: str) -> float | None:
    """A bound on |GEMM score - exact dot| for unit rows on the torch and Triton engines (any order of d
    float32 roundings: gamma(d); torch sums rows past ``_MM_LONG`` in float64 over ``_MM_BLOCK`` columns;
    tf32x3 adds ~2^-20 per product), plus the float32 roundings of both scores; None where the engine's
    inputs are rounded to tf32/fp16/bf16 (those scores are approximate by choice)."""
    if backend == "triton" and precision not in ("ieee", "tf32x3"):
        return None
    u = 2.0**-24
    n = _MM_BLOCK if backend == "torch" and d > _MM_LONG else d
    e = n * u / (1 - n * u) * 1.001 + 4 * u  # (unit rows: |q||t| <= 1 + ~1e-7)
    return e + (2.0**-18 if backend == "triton" and precision == "tf32x3" else 0.0)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Scores (r, c) float32 of rows ``a`` (r, d) against ``b`` (r, c, d) (or (1, c, d), broadcast): each
    pair's float32 products added in float64 (exact products; the sum within ~d 2^-53 of exact), rounded
    once. The same elementwise product and last-axis sum for every pair, whatever its place: identical rows
    score identically."""
    return (a[:, None, :].to(torch.float64) * b.to(torch.float64)).sum(-1).to(torch.float32)


def _pair_scores(q: torch.Tensor, T: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`_dot64` of each row of ``q`` (m, d) with its candidates ``T[idx]`` (idx (m, c)), in steps of at
    most ``_RERANK_ELEMS`` products."""
    m, c = idx.shape
    d = q.shape[1]
    out = torch.empty((m, c), dtype=torch.float32, device=q.device)
    if c * d <= _RERANK_ELEMS:
        rows = _RERANK_ELEMS // max(1, c * d)
        for a in range(0, m, rows):
            b = min(m, a + rows)
            out[a:b] = _dot64(q[a:b], T[idx[a:b]])
        return out
    cols = max(1, _RERANK_ELEMS // max(1, d))  # wide rows: a few candidates at a time
    for r in range(m):
        for a in range(0, c, cols):
            b = min(c, a + cols)
            out[r, a:b] = _dot64(q[r:r + 1], T[idx[r, a:b]][None])[0]
    return out


def _select(s: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row: score descending, ties to the lower index."""
    o = torch.sort(i, dim=1, stable=True).indices
    s, i = torch.gather(s, 1, o), torch.gather(i, 1, o)
    o = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return torch.gather(s, 1, o), torch.gather(i, 1, o)


def _rerank(Q: torch.Tensor, T: torch.Tensor, d: int, s: np.ndarray, i: np.ndarray, k: int, e: float,
            self_offset: int | None, n_cand: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k by the :func:`_dot64` score, from each row's approximate top ``c`` (``s``, ``i``,
    descending; GEMM scores within ``e`` of exact). Every pair outside them scores at most the c-th GEMM score
    + e, so a row whose k-th re-scored candidate lies above that (+ e for its own rounding) has its exact
    top-k among them; any other row (many near-equal rows) is scored against every training row."""
    dev = Q.device
    Qd, Td = Q[:, :d], T[:, :d]
    si = torch.from_numpy(i).to(dev)
    ex = _pair_scores(Qd, Td, si)
    out_s, out_i = _select(ex, si, k)
    c = i.shape[1]
    if c >= n_cand:  # every candidate was re-scored
        return out_s.cpu().numpy(), out_i.cpu().numpy()
    bound = torch.from_numpy(s[:, -1].astype(np.float64)).to(dev) + 2 * e
    redo = torch.nonzero(~(out_s[:, -1].to(torch.float64) > bound)).flatten().tolist()
    if redo:
        logger.info("all_pairs: %d of %d rows have more than %d near-equal candidates: re-scored against every "
                    "training row", len(redo), Q.shape[0], c)
    # those rows: a float64 GEMM (its products exact, its sums within ~d 2^-53 of exact: rounded to float32,
    # the _dot64 score but for one chance in ~10^8 per pair), 256 rows at a time
    cols = max(1, _RERANK_ELEMS // max(1, d))
    nt = Td.shape[0]
    for g in range(0, len(redo), 256):
        rows = torch.tensor(redo[g:g + 256], dtype=torch.int64, device=dev)
        q64 = Qd[rows].to(torch.float64)
        best_s = torch.empty((len(rows), 0), dtype=torch.float32, device=dev)
        best_i = torch.empty((len(rows), 0), dtype=torch.int64, device=dev)
        for a in range(0, nt, cols):
            b = min(nt, a + cols)
            sc = (q64 @ Td[a:b].to(torch.float64).T).to(torch.float32)
            idx = torch.arange(a, b, device=dev).expand(len(rows), b - a)
            if self_offset is not None:
                own = rows + self_offset - a
                hit = (own >= 0) & (own < b - a)
                sc[hit.nonzero().flatten(), own[hit]] = float("-inf")
            best_s, best_i = _select(torch.cat([best_s, sc], 1), torch.cat([best_i, idx], 1), k)
        out_s[rows], out_i[rows] = best_s, best_i
    return out_s.cpu().numpy(), out_i.cpu().numpy()


_RECOUNT_ELEMS = 1 << 22  # candidate slots per block of rows in _recount (~10 arrays of 32 MB)


def _bin_class(s: np.ndarray, bins: int, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Histogram bin and class (0 different, 1 similar, 2 duplicate) of scores ``s`` (float32 scores, or
    bounds in float64), by the rules of :func:`_hist_update` and the kernels, in float64."""
    s64 = np.asarray(s, dtype=np.float64)
    lo, hi = HIST_RANGE
    b = np.clip(np.floor((s64 - lo) / (hi - lo) * bins), 0, bins - 1).astype(np.int64)
    return b, (s64 > low).astype(np.int64) + (s64 > high).astype(np.int64)


def _recount(s: np.ndarray, i: np.ndarray, out_s: np.ndarray, out_i: np.ndarray, hist: np.ndarray,
             cls: np.ndarray, *, n_train: int, bins: int, low: float, high: float, e: float,
             self_offset: int | None) -> int:
    """Move each returned pair's count from the histogram bin and class of its GEMM score to those of its
    returned (re-scored) score, in place, so the counts agree with the top-k they come with.

    ``s``, ``i``: each row's GEMM candidates, descending, as the engine counted them (the scores it binned);
    ``out_s``, ``out_i``: the returned top-k. A returned pair among its row's candidates moves by its GEMM
    score. A row :func:`_rerank` scored against every training row (more near-equal candidates than it kept)
    may return a pair that is not among them: its GEMM score is then known only to lie within ``2 e`` of the
    returned one and at most the row's last candidate score, and it moves where those bounds fix its bin
    and class; the others (any bin edge or threshold that close) are left and counted in the return value.
    O(n_synth * c log c), a block of rows at a time: no pair is counted twice, self pairs (never counted,
    never returned) are skipped."""
    n, kk = out_i.shape
    if n == 0 or kk == 0 or i.shape[1] == 0:
        return 0
    step = max(1, _RECOUNT_ELEMS // i.shape[1])
    if n > step:
        return sum(_recount(s[a:a + step], i[a:a + step], out_s[a:a + step], out_i[a:a + step], hist, cls,
                            n_train=n_train, bins=bins, low=low, high=high, e=e,
                            self_offset=None if self_offset is None else self_offset + a)
                   for a in range(0, n, step))
    rows = np.arange(n, dtype=np.int64)
    # the pairs the engine counted: a real training row, a finite score, not the row's self pair
    ok = np.isfinite(s) & (i >= 0) & (i < n_train)
    counted = np.isfinite(out_s) & (out_i >= 0) & (out_i < n_train)
    if self_offset is not None:
        ok &= i != rows[:, None] + self_offset
        counted &= out_i != rows[:, None] + self_offset
    # the candidates as sorted keys row * (n_train + 1) + index (any other slot keys as index n_train, never
    # a returned pair's), found for the returned pairs by one binary search
    stride = n_train + 1
    ci = np.where(ok, i, n_train)
    order = np.argsort(ci, axis=1, kind="stable")
    keys = (rows[:, None] * stride + np.take_along_axis(ci, order, 1)).ravel()
    kern = np.take_along_axis(s, order, 1).ravel()
    counted = counted.ravel()
    want = np.where(counted, (rows[:, None] * stride + np.clip(out_i, 0, n_train - 1)).ravel(), -1)
    at = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    found = counted & (keys[at] == want)
    f = out_s.ravel()
    new_b, new_c = _bin_class(f, bins, low, high)
    # the GEMM score's bin and class: known for a candidate; else bounded
    old_b, old_c = _bin_class(kern[at], bins, low, high)
    miss = counted & ~found
    unresolved = 0
    if miss.any():
        f64 = f[miss].astype(np.float64)
        last = np.repeat(np.where(ok, s, np.inf).min(axis=1).astype(np.float64), kk)[miss]
        b_lo, c_lo = _bin_class(f64 - 2 * e, bins, low, high)
        b_hi, c_hi = _bin_class(np.minimum(f64 + 2 * e, last), bins, low, high)
        fixed = (b_lo == b_hi) & (c_lo == c_hi) & (f64 - 2 * e <= last)
        old_b[miss], old_c[miss] = b_lo, c_lo
        unresolved = int((~fixed).sum())
        sel = np.flatnonzero(miss)[~fixed]
        old_b[sel], old_c[sel] = new_b[sel], new_c[sel]  # (left where the GEMM counted it)
    move = counted & ((old_b != new_b) | (old_c != new_c))
    if move.any():
        hist -= np.bincount(old_b[move], minlength=bins).astype(hist.dtype)
        hist += np.bincount(new_b[move], minlength=bins).astype(hist.dtype)
        cls -= np.bincount(old_c[move], minlength=3).astype(cls.dtype)
        cls += np.bincount(new_c[move], minlength=3).astype(cls.dtype)
    return unresolved


# ------------------------------------------------------------------------------------------- torch engine
def _hist_update(s: torch.Tensor, valid: torch.Tensor | None, bins: int, low: float, high: float,
                 hist: torch.Tensor, cls: torch.Tensor) -> None:
    """Add the float32 scores ``s`` (where ``valid``) to the histogram and class counts (float64 rule)."""
    v = s if valid is None else s[valid]
    v64 = v.to(torch.float64)
    lo, hi = HIST_RANGE
    idx = torch.floor((v64 - lo) / (hi - lo) * bins).clamp_(0, bins - 1).to(torch.int64)
    hist += torch.bincount(idx.flatten(), minlength=bins)
    gl = int((v64 > low).sum())
    gh = int((v64 > high).sum())
    cls[0] += v.numel() - gl
    cls[1] += gl - gh
    cls[2] += gh


def _self_mask(rows: int, cols: int, r0: int, c0: int, self_offset: int | None,
               device: Any) -> torch.Tensor | None:
    """Boolean (rows, cols) mask that is False on the excluded self pairs, or None if there are none here."""
    if self_offset is None:
        return None
    r = torch.arange(rows, device=device) + (self_offset + r0 - c0)
    if not bool(((r >= 0) & (r < cols)).any()):
        return None
    return r[:, None] != torch.arange(cols, device=device)[None, :]


def _merge_running(run_s: torch.Tensor, run_i: torch.Tensor, cand_s: torch.Tensor, cand_i: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best of running + candidates per row: score descending, index ascending."""
    return _select(torch.cat([run_s, cand_s], dim=1), torch.cat([run_i, cand_i], dim=1), k)


_MM_LONG, _MM_BLOCK = 4096, 1024


def _scores_mm(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``q @ t.T`` in float32 (m, n); rows longer than ``_MM_LONG`` as float64 sums of float32 products over
    blocks of ``_MM_BLOCK`` columns (as the native canonical score adds blocks): one float32 GEMM over a whole
    volume (8.7e6 voxels) was 1.4e-2 off on CPU torch, and 4096-column blocks still 3e-6."""
    d = q.shape[1]
    if d <= _MM_LONG:
        return q @ t.T
    acc = torch.zeros((q.shape[0], t.shape[0]), dtype=torch.float64, device=q.device)
    for b in range(0, d, _MM_BLOCK):
        acc += (q[:, b : b + _MM_BLOCK] @ t[:, b : b + _MM_BLOCK].T).to(torch.float64)
    return acc.to(torch.float32)


def _run_torch(Q: torch.Tensor, T: torch.Tensor, *, d: int, k: int, low: float, high: float, bins: int,
               self_offset: int | None, progress: bool, matrix: np.ndarray | None, block: int, tile: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chunked ``torch.mm`` + stable sort on the data's device: the portable fallback."""
    dev = Q.device
    ns, nt = Q.shape[0], T.shape[0]
    Q, T = Q[:, :d], T[:, :d]
    hist = torch.zeros(bins, dtype=torch.int64, device=dev)
    cls = torch.zeros(3, dtype=torch.int64, device=dev)
    scores = np.empty((ns, k), dtype=np.float32)
    indices = np.empty((ns, k), dtype=np.int64)
    with _progress(ns * nt, progress, "all_pairs[torch]") as bar:
        for b0 in range(0, ns, block):
            b1 = min(ns, b0 + block)
            q = Q[b0:b1]
            run_s = torch.empty((b1 - b0, 0), dtype=torch.float32, device=dev)
            run_i = torch.empty((b1 - b0, 0), dtype=torch.int64, device=dev)
            for c0 in range(0, nt, tile):
                c1 = min(nt, c0 + tile)
                s = _scores_mm(q, T[c0:c1])
                if matrix is not None:
                    matrix[b0:b1, c0:c1] = s.cpu().numpy()
                valid = _self_mask(b1 - b0, c1 - c0, b0, c0, self_offset, dev)
                _hist_update(s, valid, bins, low, high, hist, cls)
                if valid is not None:
                    s = s.masked_fill(~valid, float("-inf"))
                kk = min(k, c1 - c0)
                top = torch.topk(s, kk, dim=1)
                if bool(((s >= top.values[:, -1:]).sum(dim=1) == kk).all()):
                    sel = top.indices  # no tie straddles the k-th place: topk's set is the exact set
                else:  # a tie at the k-th place: the stable sort keeps the lower indices
                    sel = torch.sort(-s, dim=1, stable=True).indices[:, :kk]
                run_s, run_i = _merge_running(run_s, run_i, torch.gather(s, 1, sel), sel + c0, k)
                bar.update((b1 - b0) * (c1 - c0))
            scores[b0:b1] = run_s.cpu().numpy()
            indices[b0:b1] = run_i.cpu().numpy()
    if self_offset is not None and (indices == _INT64_MAX).any():  # pragma: no cover - guarded by k check
        raise RuntimeError("all_pairs: internal error, a top-k slot was not filled")
    return scores, indices, hist.cpu().numpy(), cls.cpu().numpy()


# ------------------------------------------------------------------------------------------ triton engine
def _run_triton(Q: torch.Tensor, T: torch.Tensor, *, d: int, k: int, low: float, high: float, bins: int,
                self_offset: int | None, progress: bool, matrix: np.ndarray | None, block: int | None,
                tile: int | None, precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Triton tiles (scores + histogram + per-tile top-k candidates), merged by a second step."""
    from deepssim_fast.kernels import cosine_topk as ck

    res = ck.cosine_topk(Q, T, k=k, bins=bins, hist_range=HIST_RANGE, thresholds=(low, high),
                         self_offset=self_offset, synth_block=block, train_chunk=tile, progress=progress,
                         precision=precision,
                         dense_out=matrix)
    scores, indices, hist, cls = res
    return scores.cpu().numpy(), indices.cpu().numpy(), hist.cpu().numpy(), cls.cpu().numpy()
