"""Plain, obviously-right versions of every fast path. Slow on purpose; used by tests and as fallbacks.

* :func:`ssim_reference` — windowed SSIM in float64 torch over every "valid" window, its variances and
  covariance taken around the window's own mean (two passes, plain loops over the window's offsets), with
  scikit-image's conventions (see ``_ssim_common``).
* :func:`topk_reference` — cosine top-k by one dense ``torch.mm`` and a stable sort: scores descending,
  ties to the lower training index.
* :func:`histogram_reference`, :func:`class_counts_reference` — over the dense score matrix.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from . import _ssim_common as sc
from ._arrays import to_torch


def _window_moments(x: torch.Tensor, y: torch.Tensor, w: np.ndarray, spatial_dims: int
                    ) -> tuple[torch.Tensor, ...]:
    """For every valid window of x and y (B, *spatial): the weighted means, and the variances and covariance
    around the window's own means (two passes over the window's pixels, by plain loops over its offsets; each
    window's pixels shifted by its centre pixel first, so a window of equal values gives exact zeros).

    Not the one-pass E[x^2] - E[x]^2, whose rounding (~1e-16 of the squared values) a small C2 turns into any
    score: a flat region shared by both images at 970 in [0, 1000] scored 0.76, or 2.6, with ``data_range``
    1e-3, where the exact score is 0.9989. Taps are the separable window's, normalised to sum 1."""
    k = len(w)
    out = [n - k + 1 for n in x.shape[x.ndim - spatial_dims:]]
    offsets = list(itertools.product(range(k), repeat=spatial_dims))
    taps = [math.prod(float(w[i]) for i in o) for o in offsets]
    total = math.fsum(taps)

    def at(t: torch.Tensor, o: tuple[int, ...]) -> torch.Tensor:
        return t[(...,) + tuple(slice(a, a + n) for a, n in zip(o, out, strict=True))]

    centre = (k // 2,) * spatial_dims
    x0, y0 = at(x, centre), at(y, centre)
    mx, my = torch.zeros_like(x0), torch.zeros_like(y0)
    for o, t in zip(offsets, taps, strict=True):
        mx += (t / total) * (at(x, o) - x0)
        my += (t / total) * (at(y, o) - y0)
    vx, vy, vxy = torch.zeros_like(x0), torch.zeros_like(x0), torch.zeros_like(x0)
    for o, t in zip(offsets, taps, strict=True):
        dx, dy = at(x, o) - x0 - mx, at(y, o) - y0 - my
        vx += (t / total) * dx * dx
        vy += (t / total) * dy * dy
        vxy += (t / total) * dx * dy
    return x0 + mx, y0 + my, vx, vy, vxy


def ssim_reference(x: Any, y: Any, *, spatial_dims: int | None = None, window: str = "uniform",
                   win_size: int | None = None, sigma: float = 1.5, data_range: float | None = None,
                   k1: float = 0.01, k2: float = 0.03, sample_covariance: bool = True,
                   preset: str | None = None) -> np.ndarray:
    """Mean SSIM per pair, float64 numpy array of the broadcast batch shape (a 0-d array for a single pair).

    Same signature and conventions as :func:`deepssim_fast.ssim`: batch dims broadcast (one-vs-many), integer
    dtypes use the dtype range, bool images count as {0, 1} (range 1). Everything runs in float64 on the CPU.
    """
    tx, ty = to_torch(x, name="x"), to_torch(y, name="y")
    p = sc.resolve_params(ndim=max(tx.ndim, ty.ndim), spatial_dims=spatial_dims, window=window,
                          win_size=win_size, sigma=sigma, data_range=data_range, k1=k1, k2=k2,
                          sample_covariance=sample_covariance, preset=preset,
                          shapes={"x": tuple(tx.shape), "y": tuple(ty.shape)})
    if tx.dtype != ty.dtype:  # (as ssim: the dtype range of integer images would be x's alone)
        raise TypeError(f"x and y must have the same dtype, got {tx.dtype} and {ty.dtype}")
    batch = sc.broadcast_pair(tx, ty, p)
    sc.check_finite(tx, "x", p, pairs=batch)
    sc.check_finite(ty, "y", p, pairs=batch)
    spatial = tuple(tx.shape[tx.ndim - p.spatial_dims:])
    in_dtype = tx.dtype
    # (64-bit integers past 2^53, which float64 cannot hold: taken as minimum + exact rest, see exact_float64)
    bx, sx = sc.exact_float64(torch.broadcast_to(tx, batch + spatial).reshape(-1, *spatial).cpu(), p.spatial_dims)
    by, sy = sc.exact_float64(torch.broadcast_to(ty, batch + spatial).reshape(-1, *spatial).cpu(), p.spatial_dims)
    if bx.shape[0] == 0:
        return np.zeros(batch, dtype=np.float64)
    if p.preset == "deepssim":
        bx, by = sc.zscore(bx, p.spatial_dims), sc.zscore(by, p.spatial_dims)
        sx = sy = None
    rng = sc.pair_data_range(bx if sx is None else bx + sx, by if sy is None else by + sy, p, input_dtype=in_dtype)
    ux, uy, vx, vy, vxy = _window_moments(bx, by, sc.window_weights(p), p.spatial_dims)
    ux, uy = (u if o is None else u + o for u, o in ((ux, sx), (uy, sy)))
    vx, vy, vxy = p.cov_norm * vx, p.cov_norm * vy, p.cov_norm * vxy
    shape = (-1,) + (1,) * (ux.ndim - 1)
    c1 = ((p.k1 * rng) ** 2).view(shape)
    c2 = ((p.k2 * rng) ** 2).view(shape)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    out = s.flatten(1).mean(dim=1)
    out = torch.where(rng > 0, out, torch.ones_like(out))
    bad = ~torch.isfinite(out)
    if bool(bad.any()):  # (values or constants past float64's range: NaN came back without a word; ssim raises)
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"ssim_reference: pair {tuple(int(i) for i in np.unravel_index(k, batch))} has no finite "
                         "SSIM in float64 (values, data_range or k1/k2 too large or too small)")
    return out.reshape(batch).numpy()


def _normalize_rows(a: torch.Tensor, name: str) -> torch.Tensor:
    """Rows over their L2 norms, in float64. Each row is first scaled by the power of two that brings its
    largest entry into [0.5, 1) (exact): a plain norm of rows around 1e160 overflowed (scores of 0 at the
    wrong index), and of rows around 1e-162 underflowed (scores above 1, or "all zeros")."""
    a = a.to(torch.float64)
    m = a.abs().amax(dim=1)
    e = torch.where(m > 0, -torch.frexp(m).exponent.to(torch.float64), torch.zeros_like(m))[:, None]
    first = e.clamp(-1000, 1000)  # (2^e itself overflows past 2^1023: two exact steps)
    a = torch.ldexp(torch.ldexp(a, first), e - first)
    n = a.norm(dim=1, keepdim=True)
    zero = (n.squeeze(1) == 0).nonzero()
    if zero.numel():
        raise ValueError(f"{name} row {int(zero[0])} is all zeros; cosine similarity is undefined")
    return a / n


def _embedding_rows(x: Any, name: str) -> torch.Tensor:
    """``x`` as a 2-D tensor on the CPU with finite rows, else the error all_pairs gives (a NaN row counted as
    "different" here, and a d mismatch failed inside the matrix product)."""
    t = to_torch(x, name=name).detach().cpu()
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, d) of embeddings, got shape {tuple(t.shape)}")
    if t.is_floating_point() and t.numel():
        bad = (~torch.isfinite(t).all(dim=1)).nonzero()
        if bad.numel():
            raise ValueError(f"{name} row {int(bad[0])} contains NaN or Inf")
    return t


def cosine_matrix_reference(train: Any, synth: Any) -> torch.Tensor:
    """Dense (n_synth, n_train) cosine similarity matrix, float64."""
    tt, ts = _embedding_rows(train, "train"), _embedding_rows(synth, "synth")
    if tt.shape[1] != ts.shape[1]:
        raise ValueError(f"train and synth have different embedding sizes: train {tuple(tt.shape)}, "
                         f"synth {tuple(ts.shape)}")
    t = _normalize_rows(tt, "train")
    return _normalize_rows(ts, "synth") @ t.T


def topk_reference(train: Any, synth: Any | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute force: (scores float32 (n_synth, k) descending, indices int64 (n_synth, k)).

    Scores are the float64 cosines rounded to float32; equal scores go to the lower training index.

    ``synth=None`` compares ``train`` with itself and excludes self-pairs.
    """
    self_mode = synth is None
    sim = cosine_matrix_reference(train, train if self_mode else synth).to(torch.float32)
    n_cand = sim.shape[1] - (1 if self_mode else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_cand:
        raise ValueError(f"topk_reference: k must be an integer in [1, {n_cand}] (candidates per row), "
                         f"got {k!r}")
    if self_mode:
        sim.fill_diagonal_(float("-inf"))
    # stable sort on -score keeps equal scores in index order -> ties go to the lower index
    order = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    scores = torch.gather(sim, 1, order)
    return scores.numpy(), order.to(torch.int64).numpy()


def histogram_reference(train: Any, synth: Any | None, bins: int = 200,
                        range_: tuple[float, float] = (-1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of all cosine scores: (counts int64 (bins,), edges float64 (bins + 1,)).

    bin = floor((s - lo) / (hi - lo) * bins) computed in float64 from the float32 score, clamped to
    [0, bins - 1] (so bins are right-open, the last one closed, and out-of-range scores land at the ends).
    ``synth=None`` counts the ordered pairs i != j of ``train``.
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"histogram_reference: bins must be a positive integer, got {bins!r}")
    lo, hi = (float(v) for v in range_)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"histogram_reference: range_ must be finite with lo < hi, got {range_!r}")
    self_mode = synth is None
    sim = cosine_matrix_reference(train, train if self_mode else synth).to(torch.float32)
    vals = sim[~torch.eye(sim.shape[0], dtype=torch.bool)] if self_mode else sim.flatten()
    idx = torch.floor((vals.to(torch.float64) - lo) / (hi - lo) * bins).clamp(0, bins - 1).to(torch.int64)
    counts = torch.bincount(idx, minlength=bins).numpy().astype(np.int64)
    return counts, np.linspace(lo, hi, bins + 1)


def class_counts_reference(train: Any, synth: Any | None, thresholds: tuple[float, float] = (0.6, 0.85)
                           ) -> dict[str, int]:
    """Pair counts: different <= low < similar <= high < duplicate.

    The float32 score is compared in float64 with the thresholds as given (so a score of float32(0.6),
    which is 0.6000000238..., counts as "similar" for low = 0.6).
    """
    low, high = (float(t) for t in thresholds)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"class_counts_reference: thresholds must be finite with low <= high, got {thresholds!r}")
    self_mode = synth is None
    sim = cosine_matrix_reference(train, train if self_mode else synth).to(torch.float32)
    vals = sim[~torch.eye(sim.shape[0], dtype=torch.bool)] if self_mode else sim.flatten()
    vals = vals.to(torch.float64)
    dup = int((vals > high).sum())
    sim_ = int(((vals > low) & (vals <= high)).sum())
    return {"different": int(vals.numel()) - dup - sim_, "similar": sim_, "duplicate": dup}
