"""Exact, scikit-image-compatible windowed SSIM: batches of pairs, one-vs-many, and whole SSIM matrices.

SSIM here is a *target* (the label DeepSSIM learns and the exact check of suspected copies), not a loss:
nothing in this module is differentiable, and torch inputs are read under ``torch.no_grad``.

Conventions (the single home is :mod:`deepssim_fast._ssim_common`): the last ``spatial_dims`` axes are
spatial, leading axes are batch; the SSIM map is filtered, cropped by ``(win - 1) // 2`` on every border
("valid" filtering) and averaged, as ``skimage.metrics.structural_similarity``; defaults equal its defaults
(uniform 7-wide window, sample covariance). ``window="gaussian", sample_covariance=False`` equals
scikit-image's ``gaussian_weights=True, use_sample_covariance=False`` (σ 1.5, 11 taps), which pytorch-msssim
and MONAI compute too.

Backends (``backend=`` or ``$DEEPSSIM_FAST_BACKEND``; default by where the data lives):

* ``"native"`` — C++ (``csrc/ssim.cpp``): uniform windows (2D and 3D) use O(1)-per-pixel running (box)
  sums in fp64 (exact enough that E[x²] − E[x]² does not cancel; ``DEEPSSIM_FAST_SSIM_BOX=0`` turns them
  off, and so does k1 or k2 below 1e-5, where a running sum's rounding is no longer small beside C1, C2;
  ``ssim_matrix`` reuses each image's 2D moments across its pairs, and runs 3D through the pair kernel);
  Gaussian windows (or uniform ones with the running sums off) use separable fp32 window passes
  that centre every lane on its window's middle value (law of total variance). AVX2/FMA, fp64 map sums,
  threads over pairs (2D) or rows/planes (few pairs, 3D), GIL released.
* ``"torch"`` — vectorised torch in float64 (CPU or GPU), separable grouped convolutions.
* ``"triton"`` — ``kernels/ssim.py``: one fused launch per batch (CUDA; or ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from . import _ssim_common as sc
from ._atomic import atomic_path, check_writable, reserve
from .backends import resolve as _resolve_backend
from .backends import triton_device as _triton_device
from ._arrays import check_readable, is_cupy, like_input, to_torch

logger = logging.getLogger(__name__)

__all__ = ["ssim", "ssim_matrix"]

_SUPPORTED = ("native", "torch", "triton")
# Budget (bytes) for the per-image moment cache of one ssim_matrix tile (native backend; about 16 bytes per
# pixel per image: interleaved rows, fp64 window sums, fp32 variance numerators).
_MATRIX_TILE_BYTES = 256 << 20
# The other backends' ssim_matrix tiles: at most this many images of A (and of B).
_MATRIX_TILE_IMAGES = 256


def _to_torch(x: Any, name: str) -> torch.Tensor:
    """As _arrays.to_torch, also accepting numpy views with negative strides (flipped arrays); a tensor that
    holds no readable data here (on the meta device, sparse) is a clear error naming ``name`` (torch's own
    said "Cannot copy out of meta tensor" or "reshape is not implemented for sparse tensors")."""
    if isinstance(x, np.ndarray) and any(st < 0 for st in x.strides):
        x = np.ascontiguousarray(x)
    t = to_torch(x, name=name)
    check_readable(t, name, "ssim")
    return t


def _dt(t: torch.Tensor) -> str:
    """A dtype as the user wrote it: ``float32``, not ``torch.float32`` (for numpy input too)."""
    return str(t.dtype).removeprefix("torch.")


def _native():
    from . import _native as nat

    return nat


def _box_off() -> bool:
    """Whether ``DEEPSSIM_FAST_SSIM_BOX`` turns the running-sum kernels off ("0", "off", "false" or "no"), as the
    native kernels read it (csrc/ssim.cpp box_off_env)."""
    return bool(_native().ssim_box_off())


def _range_mode(p: sc.SSIMParams, dtype: torch.dtype) -> tuple[int, float, float]:
    """(mode, value, scale) for the native kernels: mode 0 fixed value, 1 per-pair max-min, 2 deepssim preset;
    the kernels get the images and the value multiplied by ``scale`` (``_ssim_common.kernel_scale``)."""
    if p.preset == "deepssim":
        return 2, 0.0, 1.0
    if p.data_range is not None:
        return 0, p.data_range, 1.0
    r = sc.dtype_range(dtype)
    if r is not None:
        scale = sc.kernel_scale(p, dtype)
        return 0, r * scale, scale
    return 1, 0.0, 1.0


def _as_float32_numpy(t: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """A C-contiguous float32 numpy view/copy of a CPU tensor times ``scale`` (a power of two; copies only
    when needed)."""
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    if scale != 1.0:
        t = t * scale
    return np.ascontiguousarray(t.contiguous().numpy())


# Which of the caller's images two inputs hold, for error messages: per input, the caller's index of each of
# its images (a tile of ssim_matrix: np.arange(i0, i1)), or None when it is the caller's input itself.
Indices = tuple[np.ndarray | None, np.ndarray | None]
_OWN: Indices = (None, None)


def _check_finite(
    tx: torch.Tensor,
    ty: torch.Tensor,
    p: sc.SSIMParams,
    names: tuple[str, str],
    indices: Indices = _OWN,
    batch: tuple[int, ...] | None = None,
) -> None:
    """NaN/Inf in ``tx`` or ``ty``: ValueError naming the input (``names``) and the image as the caller
    numbers it (``indices``, or ``batch``, the pairs' broadcast batch shape: see
    ``_ssim_common.check_finite``)."""
    sc.check_finite(tx, names[0], p, indices[0], batch)
    sc.check_finite(ty, names[1], p, indices[1], batch)


def _check_overflow(
    exc: ValueError,
    tx: torch.Tensor,
    ty: torch.Tensor,
    p: sc.SSIMParams,
    names: tuple[str, str] = ("x", "y"),
    indices: Indices = _OWN,
    batch: tuple[int, ...] | None = None,
) -> None:
    """Classify the native extension's "nonfinite" report (an image's float32 sum is not finite).

    NaN/Inf in the inputs: raise the canonical message naming the pair index. Finite inputs: return — the
    values are so large that a float32 sum overflows, and the caller computes the pairs in float64. Any other
    error is re-raised.
    """
    if not str(exc).startswith("nonfinite"):
        raise exc
    _check_finite(tx, ty, p, names, indices, batch)


# A pair's name in error messages: its flat position in one call -> its index in the caller's terms (the
# batch index of ssim, (i, j) of ssim_matrix).
Where = Callable[[int], tuple[int, ...]]


def _flat(k: int) -> tuple[int, ...]:
    return (k,)


# --------------------------------------------------------------------------------------------------
# torch backend (float64, any device)


def _filter_valid(m: torch.Tensor, w: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Separable valid filtering of the last ``spatial_dims`` axes of m with 1D taps w.

    Each axis is one matmul with a banded (n, n - K + 1) Toeplitz matrix T[i, o] = w[i - o]: BLAS-fast in
    float64 on CPU and GPU, the same for the uniform and the Gaussian window.
    """
    k = w.numel()
    for axis in range(m.ndim - spatial_dims, m.ndim):
        n = m.shape[axis]
        i = torch.arange(n, device=m.device)[:, None]
        o = torch.arange(n - k + 1, device=m.device)[None, :]
        d = i - o
        t = torch.where(
            (d >= 0) & (d < k), w[d.clamp(0, k - 1)], torch.zeros((), dtype=w.dtype, device=m.device)
        )
        m = (m.movedim(axis, -1) @ t).movedim(-1, axis)
    return m


# Rounding of the one-pass window moments E[a^2] - E[a]^2 (and E[ab] - E[a]E[b]) above, relative to
# E[a^2] + E[b^2]: every sum adds nonnegative terms (the images are centred on their minimum), K taps per axis,
# so each window mean is within about spatial_dims * K units in the last place of its value, the products add
# a few more, and the subtraction loses all that is common to both terms. A generous multiple of that.
def _moment_rounding(p: sc.SSIMParams) -> float:
    return (4 * p.spatial_dims * p.win_size + 16) * 2.0**-53


# A window whose moments may be off by more than this fraction of vx + vy + C2 (the contrast-structure term's
# denominator, which bounds its numerator too) has them computed again around its own mean.
_REFINE_TOL = 2.0**-30


def _refine_windows(a: torch.Tensor, b: torch.Tensor, m2: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor,
                    vxy: torch.Tensor, c2: torch.Tensor, p: sc.SSIMParams) -> None:
    """Recompute, in place, the variances and covariance of every window where the one-pass form's rounding
    may matter against C2: ``sum w (a - mean)^2`` over the window's own pixels (two passes, each window
    shifted by its centre pixel first).

    Centring each image on its minimum keeps a flat region at the minimum exact, but a flat region elsewhere
    (a plateau shared by both images, 970 in [0, 1000]) left ~1e-16 x 970^2 of rounding in E[a^2] - E[a]^2,
    which a small C2 (``data_range`` far below the images' span, tiny k2) turned into scores of 0.76 or 2.6
    where the exact one is 0.9989. ``a``, ``b``: (P, *spatial), centred; ``m2``: E[a^2] + E[b^2] per window;
    ``vx``, ``vy``, ``vxy``: (P, *out) as computed (already scaled by cov_norm)."""
    den = vx + vy + c2
    flag = (4 * p.cov_norm * _moment_rounding(p)) * m2 > _REFINE_TOL * den
    flag |= ~(den > 0)  # (rounding below zero)
    # (not where C2 is 0: two equal constant images, whose score is 1 whatever the windows, or a C2 that
    # underflowed, an error either way; every window of such a pair was taken again for nothing)
    flag &= c2 > 0
    sel = flag.nonzero()
    if sel.shape[0] == 0:
        return
    d, k = p.spatial_dims, p.win_size
    a, b = a.contiguous(), b.contiguous()
    w1 = torch.from_numpy(sc.window_weights(p)).to(a.device)
    wf = w1
    for _ in range(d - 1):
        wf = torch.outer(wf, w1).reshape(-1)  # (the window's taps in C order: last axis fastest)
    wf = wf / wf.sum()
    grids = torch.meshgrid(*[torch.arange(k, device=a.device)] * d, indexing="ij")
    strides = a.stride()
    offs = sum(g.reshape(-1) * strides[1 + j] for j, g in enumerate(grids))
    base = sel[:, 0] * strides[0] + sum(sel[:, 1 + j] * strides[1 + j] for j in range(d))
    fa, fb = a.reshape(-1), b.reshape(-1)
    step = max(1, (16 << 20) // (8 * wf.numel()))  # (windows per gather: ~16 MB of indices)
    out = torch.empty(3, sel.shape[0], dtype=torch.float64, device=a.device)
    centre = wf.numel() // 2
    for s in range(0, sel.shape[0], step):
        idx = base[s : s + step, None] + offs[None, :]
        # (each window first shifted by its centre pixel: a window of equal values is then exact zeros, where
        # its computed mean, a few ulps off, left differences whose squares a C2 of 1e-24 still saw)
        pa, pb = fa[idx], fb[idx]
        pa, pb = pa - pa[:, centre : centre + 1], pb - pb[:, centre : centre + 1]
        da = pa - (pa @ wf)[:, None]
        db = pb - (pb @ wf)[:, None]
        out[0, s : s + step] = (da * da) @ wf
        out[1, s : s + step] = (db * db) @ wf
        out[2, s : s + step] = (da * db) @ wf
    where = tuple(sel.T)
    vx[where] = p.cov_norm * out[0]
    vy[where] = p.cov_norm * out[1]
    vxy[where] = p.cov_norm * out[2]


def _torch_pairs(
    xf: torch.Tensor,
    yf: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    p: sc.SSIMParams,
    in_dtype: torch.dtype,
) -> torch.Tensor:
    """Mean SSIM (float64, (P,)) of pairs (xf[ix], yf[iy]); xf, yf shaped (N, *spatial)."""
    dev = xf.device
    w = torch.from_numpy(sc.window_weights(p)).to(dev)
    n_pairs = ix.numel()
    px = int(np.prod(xf.shape[1:]))
    chunk = max(1, min(n_pairs, (64 << 20) // max(1, 5 * 8 * px)))
    out = torch.empty(n_pairs, dtype=torch.float64, device=dev)
    for s in range(0, n_pairs, chunk):
        # (64-bit integers past 2^53: centred exactly first, their minima sx, sy added back below)
        bx, sx = sc.exact_float64(xf[ix[s : s + chunk]], p.spatial_dims)
        by, sy = sc.exact_float64(yf[iy[s : s + chunk]], p.spatial_dims)
        if p.preset == "deepssim":  # (z-scores do not see an offset)
            bx, by = sc.zscore(bx, p.spatial_dims), sc.zscore(by, p.spatial_dims)
            sx = sy = None
        rng = sc.pair_data_range(bx if sx is None else bx + sx, by if sy is None else by + sy, p,
                                 input_dtype=in_dtype)
        dims = tuple(range(1, bx.ndim))
        # Centre each image by its minimum (the background of MRI) so flat regions are exact zeros.
        ox = bx.amin(dim=dims, keepdim=True)
        oy = by.amin(dim=dims, keepdim=True)
        a, b = bx - ox, by - oy
        if sx is not None:
            ox = ox + sx
        if sy is not None:
            oy = oy + sy
        m = _filter_valid(torch.stack([a, b, a * a, b * b, a * b], dim=1), w, p.spatial_dims)
        ma, mb = m[:, 0], m[:, 1]
        cn = p.cov_norm
        vx, vy, vxy = cn * (m[:, 2] - ma * ma), cn * (m[:, 3] - mb * mb), cn * (m[:, 4] - ma * mb)
        ux, uy = ma + ox, mb + oy
        shape = (-1,) + (1,) * p.spatial_dims
        c1 = ((p.k1 * rng) ** 2).view(shape)
        c2 = ((p.k2 * rng) ** 2).view(shape)
        _refine_windows(a, b, m[:, 2] + m[:, 3], vx, vy, vxy, c2, p)
        smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        r = smap.flatten(1).mean(dim=1)
        out[s : s + chunk] = torch.where(rng > 0, r, torch.ones_like(r))
    return out


# --------------------------------------------------------------------------------------------------
# shared front end


def _spatial(t: torch.Tensor, p: sc.SSIMParams) -> tuple[int, ...]:
    return tuple(t.shape[t.ndim - p.spatial_dims :])


def _pairs_from_broadcast(
    tx: torch.Tensor, ty: torch.Tensor, p: sc.SSIMParams
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Broadcast the batch dims. Returns (batch shape, x (Nx, *spatial), y (Ny, *spatial), ix, iy)."""
    batch = sc.broadcast_pair(tx, ty, p)
    sp = _spatial(tx, p)
    bx, by = tuple(tx.shape[: tx.ndim - p.spatial_dims]), tuple(ty.shape[: ty.ndim - p.spatial_dims])
    nx, ny = int(np.prod(bx, dtype=np.int64)), int(np.prod(by, dtype=np.int64))
    xf, yf = tx.reshape(nx, *sp), ty.reshape(ny, *sp)
    ix = np.broadcast_to(np.arange(nx, dtype=np.int64).reshape(bx), batch).reshape(-1)
    iy = np.broadcast_to(np.arange(ny, dtype=np.int64).reshape(by), batch).reshape(-1)
    return batch, xf, yf, np.array(ix, dtype=np.int64, order="C"), np.array(iy, dtype=np.int64, order="C")


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """The pairs (xf[ix[k]], yf[iy[k]]) of one call, with what every path needs to score and name them:
    the parameters, the caller's dtype, and ``where``, which turns a pair's position k here into its index in
    the caller's terms (the batch index of ssim, (i, j) of ssim_matrix)."""

    xf: torch.Tensor
    yf: torch.Tensor
    ix: np.ndarray
    iy: np.ndarray
    p: sc.SSIMParams
    in_dtype: torch.dtype
    where: Where = _flat
    batch: tuple[int, ...] | None = None  # ssim's broadcast batch shape (names a broadcast input's bad image)
    func: str = "ssim"  # the public function, as its errors name it

    @property
    def size(self) -> int:
        return int(self.ix.size)

    def subset(self, sel: np.ndarray) -> _Pairs:
        """The pairs at positions ``sel`` (int array), still named as in the caller."""
        outer = self.where
        return dataclasses.replace(self, ix=self.ix[sel], iy=self.iy[sel], where=lambda k: outer(int(sel[k])))


def _float64_pairs(pairs: _Pairs) -> torch.Tensor:
    """Mean SSIM (float64, (P,)) of the pairs on the float64 torch path; never non-finite.

    A pair whose score is not finite even in float64 (the formula's products, of fourth degree in the
    values, overflow or underflow float64: |values| around 1e77 and up, or 1e-77 and down) raises ValueError
    naming it; when the values are fine but k1 or k2 make C1 = (k1 range)^2 or C2 = (k2 range)^2 leave
    float64's range, the error names k1 and k2 instead.
    """
    xf, yf, ix, iy = pairs.xf, pairs.yf, pairs.ix, pairs.iy
    res = _torch_pairs(
        xf, yf, torch.from_numpy(ix).to(xf.device), torch.from_numpy(iy).to(yf.device), pairs.p, pairs.in_dtype
    )
    bad = ~torch.isfinite(res)
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        big = max(float(t[int(i)].to(torch.float64).abs().max()) for t, i in ((xf, ix[k]), (yf, iy[k])))
        idx = pairs.where(k)
        which = f"pair index {idx}" if idx else "the pair"
        p = pairs.p
        bx, by = xf[int(ix[k])][None].to(torch.float64), yf[int(iy[k])][None].to(torch.float64)
        if p.preset == "deepssim":
            bx, by = sc.zscore(bx, p.spatial_dims), sc.zscore(by, p.spatial_dims)
        rng = float(sc.pair_data_range(bx, by, p, input_dtype=pairs.in_dtype)[0])
        def normal(k: float) -> bool:  # (k range)^2 is a normal float64 (products: inf on overflow)
            return sys.float_info.min <= (k * rng) * (k * rng) <= sys.float_info.max

        c1, c2 = (p.k1 * rng) * (p.k1 * rng), (p.k2 * rng) * (p.k2 * rng)
        if normal(0.01) and normal(0.03) and not (normal(p.k1) and normal(p.k2)):
            # the default constants would be fine at this range: k1 / k2 push C1 / C2 out of float64's range
            raise ValueError(
                f"{pairs.func}: {which} cannot be scored with k1={p.k1!r}, k2={p.k2!r}: with its data range {rng:.3g} "
                f"they make C1 = (k1 * range)^2 = {c1:.3g} and C2 = (k2 * range)^2 = {c2:.3g}, outside "
                "float64's range (flat regions then score 0/0 or inf/inf); choose k1 and k2 nearer the "
                "defaults 0.01 and 0.03"
            )
        if p.data_range is not None and not (normal(p.k1) and normal(p.k2)) and 1e-100 < big < 1e100:
            # the images are fine (their squares are): the range the caller gave is what leaves float64's range
            raise ValueError(
                f"{pairs.func}: {which} cannot be scored with data_range={p.data_range!r}: it makes C1 = "
                f"(k1 * data_range)^2 = {c1:.3g} and C2 = (k2 * data_range)^2 = {c2:.3g}, outside float64's "
                f"range, while the images' largest |value| is {big:.3g}; give a data_range on the scale of the "
                "images (their max - min, or the scanner's range)"
            )
        raise ValueError(
            f"{pairs.func}: {which} cannot be scored: its values (largest |value| {big:.3g}) are too large (or too "
            "small) for SSIM even in float64 — their squares and products overflow (or underflow); rescale "
            "the images"
        )
    return res


def _repair_nonfinite(res: torch.Tensor, pairs: _Pairs) -> torch.Tensor:
    """Recompute, in float64 torch, the pairs whose fp32 score is not finite (values so large or small that
    their squares or C1/C2 leave the float32 range, or images spanning more than 32768 sqrt(C2): a data range
    far below their own), so no NaN escapes. ``res`` is (P,), indexed like the pairs."""
    bad = ~torch.isfinite(res)
    if not bool(bad.any()):
        return res
    sel = torch.nonzero(bad).flatten()
    logger.debug("ssim: %d pair(s) beyond the float32 kernel's range (values, C1/C2, or a data range far below "
                 "the images' span); recomputing them in float64", sel.numel())
    fix = _float64_pairs(pairs.subset(sel.cpu().numpy()))
    res = res.clone()
    res[sel] = fix.to(res.device, res.dtype)
    return res


def _native_pairs(
    pairs: _Pairs, tx: torch.Tensor, ty: torch.Tensor, names: tuple[str, str], indices: Indices = _OWN
) -> torch.Tensor:
    """Mean SSIM (float64, CPU, (P,)) of the pairs on the native float32 kernels.

    Finite values so large that a float32 sum in the kernel overflows (|values| of order 1e36 and up) make
    the whole call run in float64 instead (logged at INFO); NaN/Inf in ``tx``/``ty`` raise naming the pair
    index.
    """
    nat = _native()
    p = pairs.p
    mode, value, scale = _range_mode(p, pairs.in_dtype)
    xa, ya = _as_float32_numpy(pairs.xf.cpu(), scale), _as_float32_numpy(pairs.yf.cpu(), scale)
    try:
        res = nat.ssim_pairs(
            xa, ya, pairs.ix, pairs.iy, p.spatial_dims, sc.window_weights(p), p.sample_covariance, p.k1, p.k2,
            mode, value,
        )
    except ValueError as exc:
        _check_overflow(exc, tx, ty, p, names, indices, pairs.batch)
        logger.info(
            "ssim: finite values too large for the float32 kernel's sums; computing %d pair(s) in float64",
            pairs.size,
        )
        return _float64_pairs(pairs).cpu()
    return _repair_nonfinite(torch.from_numpy(res), pairs)


def _run_pairs(
    name: str,
    pairs: _Pairs,
    tx: torch.Tensor,
    ty: torch.Tensor,
    names: tuple[str, str] = ("x", "y"),
    indices: Indices = _OWN,
    *,
    slow: np.ndarray | None = None,
) -> torch.Tensor:
    """Mean SSIM (float64 tensor (P,), on the inputs' device) of the pairs on backend ``name``; ``tx``/``ty``
    are the caller's inputs (checked for NaN/Inf, named ``names`` in errors; ``indices``: which of the
    caller's images they hold, when they are tiles of its stacks).

    ``slow``: bool (P,) mask of the pairs to compute on the float64 torch path whatever the backend (those
    involving an image float32 cannot hold, see :func:`_inexact_pairs`); None: none.
    """
    if name == "torch" or (slow is not None and bool(slow.all())):
        _check_finite(tx, ty, pairs.p, names, indices, pairs.batch)
        return _float64_pairs(pairs)
    if slow is None:
        return _fast_pairs(name, pairs, tx, ty, names, indices)
    _check_finite(tx, ty, pairs.p, names, indices, pairs.batch)
    fast, sl = np.flatnonzero(~slow), np.flatnonzero(slow)
    dev = pairs.xf.device
    res = torch.empty(pairs.size, dtype=torch.float64, device=dev)
    res[torch.from_numpy(fast).to(dev)] = _fast_pairs(name, pairs.subset(fast), tx, ty, names, indices).to(dev)
    res[torch.from_numpy(sl).to(dev)] = _float64_pairs(pairs.subset(sl))
    return res


def _fast_pairs(
    name: str, pairs: _Pairs, tx: torch.Tensor, ty: torch.Tensor, names: tuple[str, str], indices: Indices = _OWN
) -> torch.Tensor:
    """Mean SSIM (float64, (P,)) of the pairs on the float32 kernels: ``"native"`` or ``"triton"``."""
    if name == "native":
        return _native_pairs(pairs, tx, ty, names, indices)
    _check_finite(tx, ty, pairs.p, names, indices, pairs.batch)
    from .kernels import ssim as ks

    xf, yf = _triton_device(pairs.xf), _triton_device(pairs.yf)  # (host data: to the GPU and back)
    tix = torch.from_numpy(pairs.ix).to(xf.device)
    tiy = torch.from_numpy(pairs.iy).to(yf.device)
    res = ks.ssim_pairs(xf, yf, tix, tiy, pairs.p, in_dtype=pairs.in_dtype).to(pairs.xf.device)
    return _repair_nonfinite(res, pairs)


def _inexact_pairs(xf: torch.Tensor, yf: torch.Tensor, ix: np.ndarray, iy: np.ndarray,
                   data_range: float | None = None) -> np.ndarray | None:
    """bool (P,) mask of the pairs (xf[ix], yf[iy]) that involve an image float32 cannot hold to
    ``FLOAT32_ROUNDING_TOL`` of its own range, or of an explicit ``data_range`` below it
    (``_ssim_common.float32_inexact``); None when there is none. Only float64 and 32/64-bit integer inputs are
    measured; other dtypes convert to float32 exactly."""
    mx, my = sc.float32_inexact(xf, data_range=data_range), sc.float32_inexact(yf, data_range=data_range)
    if mx is None and my is None:
        return None
    mask = np.zeros(ix.size, dtype=bool)
    if mx is not None:
        mask |= mx.cpu().numpy()[ix]
    if my is not None:
        mask |= my.cpu().numpy()[iy]
    return mask if mask.any() else None


def _log_inexact(what: str, n_slow: int, n_pairs: int, name: str) -> None:
    logger.info(
        "%s: %d of %d pairs involve images that float32 would round by more than %.2g of their own range "
        "(large offsets against small variations); computing them in float64 on the torch path instead of %s",
        what,
        n_slow,
        n_pairs,
        sc.FLOAT32_ROUNDING_TOL,
        name,
    )


def ssim(
    x: Any,
    y: Any,
    *,
    spatial_dims: int | None = None,
    window: str = "uniform",
    win_size: int | None = None,
    sigma: float = 1.5,
    data_range: float | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    sample_covariance: bool = True,
    preset: str | None = None,
    backend: str | None = None,
) -> Any:
    """Mean SSIM of every pair (x[i], y[i]), exactly as scikit-image computes it.

    Args:
        x, y: numpy, torch or cupy arrays shaped (*batch, *spatial); the last ``spatial_dims`` axes are
            spatial. Batch dims broadcast (one-vs-many: x (H, W) against y (B, H, W) with
            ``spatial_dims=2``; x is not copied per pair). Any real dtype; integer dtypes use their dtype
            range as ``data_range`` (as scikit-image: uint8 255, int64 2^64 − 1; a list of Python ints is
            int64, as numpy makes it: pass ``data_range``); bool images count as {0, 1} with range 1.
            64-bit integer images past 2^53, which float64 cannot hold, are centred on their minimum in
            integer arithmetic first: exact while an image's spread (max − min) is below 2^53; past that its
            values are rounded to float64 relative to the spread, so texture finer than ~2^-53 of the spread is
            lost (it matters only with a ``data_range`` far below the spread). Non-contiguous inputs are fine.
        spatial_dims: 2 or 3. Only 2D arrays default to 2; a 3D/4D input without it is ambiguous (a stack
            of slices or a volume?) and raises.
        window: ``"uniform"`` (``win_size`` taps, default 7) or ``"gaussian"`` (σ = ``sigma``, truncated at
            3.5 σ: 11 taps for σ 1.5; ``win_size`` left unset, as its size is sigma's).
        data_range: explicit value; None: dtype range for integers, else max − min over BOTH images of
            each pair (symmetric). Two identical constant images score 1.0.
        k1, k2, sample_covariance: as scikit-image (sample covariance N/(N−1) by default). ``sigma``,
            ``data_range``, ``k1``, ``k2`` take any real scalar (Python or numpy number, 0-d array/tensor).
        preset: ``"deepssim"`` reproduces the DeepSSIM reference labels: each image z-scored, then the
            defaults with ``data_range`` = max − min of the FIRST (x) image. A constant image z-scores to
            zeros, so any two constant images score 1 under it.
        backend: ``"native"``, ``"torch"``, ``"triton"`` or None (by where the data lives). The native and
            Triton kernels compute in float32. float64 and 32/64-bit integer images are first checked, in
            float64, for how far float32 rounds them: a pair with an image rounded by more than
            ``FLOAT32_ROUNDING_TOL`` (2.5e-7) of that image's own range (max − min) — a large offset against
            a small variation, e.g. 1e4 + [0, 1) — is computed in float64 on the torch path instead (logged
            at INFO). Data spanning [0, max], as MRI does, stays on the fast kernels. Finite values so large
            that the native kernel's float32 sums overflow are computed in float64 too.

    Returns:
        One float32 score per pair, shape = the broadcast batch shape (0-d for one pair), as the same kind
        of array as ``x`` (numpy; torch on x's device; cupy). Never NaN. Not differentiable.

    Raises:
        ValueError: NaN/Inf (naming the pair index), values too large (or small) for SSIM even in float64
            (naming the pair index), ``k1``/``k2`` so far from the defaults that C1 = (k1 range)² or C2 = (k2
            range)² leaves float64's range where a pair needs it (naming them), spatial shape mismatch or
            non-broadcastable batch (quoting both shapes), images smaller than the window, even ``win_size``,
            ambiguous rank (3D/4D input without ``spatial_dims``), inputs with fewer dimensions than
            ``spatial_dims`` (quoting their shapes), a ``win_size`` or ``spatial_dims`` that is not an integer
            (bools are refused), a parameter that is not a positive finite real scalar.
        TypeError: complex images (naming x or y), x and y of different dtypes, ``sample_covariance`` that is
            not a bool (Python or numpy).
    """
    with torch.no_grad():
        tx, ty = _to_torch(x, "x"), _to_torch(y, "y")
        p = sc.resolve_params(
            ndim=max(tx.ndim, ty.ndim),
            spatial_dims=spatial_dims,
            window=window,
            win_size=win_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
            sample_covariance=sample_covariance,
            preset=preset,
            shapes={"x": tuple(tx.shape), "y": tuple(ty.shape)},
        )
        if tx.dtype != ty.dtype:
            raise TypeError(f"x and y must have the same dtype, got {_dt(tx)} and {_dt(ty)}")
        sc.warn_dtype_range(p, tx.dtype)
        name = _resolve_backend(backend, [x, y], supported=_SUPPORTED)
        batch, xf, yf, ix, iy = _pairs_from_broadcast(tx, ty, p)
        if ix.size == 0:
            res = torch.zeros(batch, dtype=torch.float32, device=tx.device)
            return like_input(res, x)
        logger.debug("ssim: %d pairs of %s on %s", ix.size, _spatial(tx, p), name)
        slow = None if name == "torch" else _inexact_pairs(xf, yf, ix, iy, p.data_range)
        if slow is not None:
            _log_inexact("ssim", int(slow.sum()), ix.size, name)

        def where(k: int) -> tuple[int, ...]:
            return tuple(int(i) for i in np.unravel_index(k, batch))

        res = _run_pairs(name, _Pairs(xf, yf, ix, iy, p, tx.dtype, where, batch), tx, ty, slow=slow)
        res = res.to(device=tx.device, dtype=torch.float32).reshape(batch)
        return like_input(res, x)


# --------------------------------------------------------------------------------------------------
# ssim_matrix


def _open_memmap(
    path: Path, shape: tuple[int, int], npy: bool
) -> tuple[np.memmap, Callable[[int, int, int, int, np.ndarray], None]]:
    """A float32 memmap of ``shape`` created at ``path`` (with a ``.npy`` header when ``npy``) and a writer
    for one tile."""
    if npy:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    else:
        arr = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
    reserve(path)  # (a full disk: an OSError now, not a SIGBUS when a tile is written)

    def write(i0, i1, j0, j1, block):
        arr[i0:i1, j0:j1] = block

    return arr, write


def _open_out(
    out: Any, shape: tuple[int, int]
) -> tuple[Any, Callable[[int, int, int, int, np.ndarray], None]]:
    """The result array (numpy or torch; a path goes through :func:`_open_memmap` instead) and a writer for
    one tile."""
    if out is None:
        arr: Any = np.empty(shape, dtype=np.float32)
    elif isinstance(out, (np.ndarray, torch.Tensor)) or is_cupy(out):
        arr = out
        if tuple(arr.shape) != shape:
            raise ValueError(f"out has shape {tuple(arr.shape)}, expected {shape}")
        if str(arr.dtype).split(".")[-1] != "float32":
            raise ValueError(f"out must be float32, got {arr.dtype}")
        if isinstance(arr, np.ndarray) and not arr.flags.writeable:  # (numpy said so only at the first tile)
            raise ValueError("out is a read-only array (a memmap opened with mode 'r', a view of read-only "
                             "memory, ...); give a writable float32 array")
    else:
        raise TypeError(
            f"out must be None, a path (str or os.PathLike; a float32 memmap is written there) or a "
            f"preallocated float32 array of shape {shape} (numpy, torch or cupy), got {type(out).__name__}"
        )
    if isinstance(arr, torch.Tensor):

        def write(i0, i1, j0, j1, block):
            arr[i0:i1, j0:j1] = torch.from_numpy(block).to(arr.device)
    elif is_cupy(arr):
        import cupy

        def write(i0, i1, j0, j1, block):
            arr[i0:i1, j0:j1] = cupy.asarray(block)
    else:

        def write(i0, i1, j0, j1, block):
            arr[i0:i1, j0:j1] = block

    return arr, write


def _triton_matrix_reuse() -> bool:
    """The Triton matrix path reuses moments with the separable kernel (the default variant)."""
    from .kernels import ssim as ks

    return ks.resolve_variant(None) == "separable"


def _grid(na: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (int64, C-contiguous, (na * nb,)) of every pair of an na x nb block."""
    ii, jj = np.meshgrid(np.arange(na, dtype=np.int64), np.arange(nb, dtype=np.int64), indexing="ij")
    return np.ascontiguousarray(ii.ravel()), np.ascontiguousarray(jj.ravel())


def _triton_matrix_block(
    a: torch.Tensor, b: torch.Tensor, p: sc.SSIMParams, where: Where, indices: Indices
) -> np.ndarray:
    """float32 (len(a), len(b)) block of ssim_matrix on Triton with per-image moment reuse; a and b are the
    images ``indices`` of A and B."""
    from .kernels import ssim as ks

    _check_finite(a, b, p, ("A", "B"), indices)
    res = ks.ssim_matrix_block(_triton_device(a), _triton_device(b), p, in_dtype=a.dtype).flatten().to(a.device)
    ii, jj = _grid(a.shape[0], b.shape[0])
    res = _repair_nonfinite(res, _Pairs(a, b, ii, jj, p, a.dtype, where, func="ssim_matrix"))
    return res.to("cpu", torch.float32).numpy().reshape(a.shape[0], b.shape[0])


def _native_matrix_block(
    a: torch.Tensor, b: torch.Tensor, p: sc.SSIMParams, where: Where, indices: Indices
) -> np.ndarray:
    """float32 (len(a), len(b)) block of ssim_matrix on the native kernels with per-image moment reuse; a and
    b are the images ``indices`` of A and B.

    Finite values so large that a float32 sum overflows make the block run in float64 instead (logged at
    INFO); NaN/Inf raise naming the image's index in A or B; pairs whose fp32 score is not finite are
    recomputed in float64.
    """
    nat = _native()
    mode, value, scale = _range_mode(p, a.dtype)
    a, b = a.cpu(), b.cpu()
    try:
        block = nat.ssim_matrix_block(
            _as_float32_numpy(a, scale),
            _as_float32_numpy(b, scale),
            p.spatial_dims,
            sc.window_weights(p),
            p.sample_covariance,
            p.k1,
            p.k2,
            mode,
            value,
        )
    except ValueError as exc:
        _check_overflow(exc, a, b, p, ("A", "B"), indices)
        ii, jj = _grid(a.shape[0], b.shape[0])
        logger.info(
            "ssim_matrix: finite values too large for the float32 kernel's sums; computing %d pair(s) in "
            "float64",
            ii.size,
        )
        res = _float64_pairs(_Pairs(a, b, ii, jj, p, a.dtype, where, func="ssim_matrix"))
        return res.numpy().astype(np.float32).reshape(a.shape[0], b.shape[0])
    if not np.isfinite(block).all():
        ii, jj = _grid(a.shape[0], b.shape[0])
        flat = torch.from_numpy(block.ravel().astype(np.float64))
        res = _repair_nonfinite(flat, _Pairs(a, b, ii, jj, p, a.dtype, where, func="ssim_matrix"))
        block = res.numpy().astype(np.float32).reshape(a.shape[0], b.shape[0])
    return block


def _matrix_block(
    fast: Callable[[torch.Tensor, torch.Tensor, sc.SSIMParams, Where, Indices], np.ndarray],
    a: torch.Tensor,
    b: torch.Tensor,
    p: sc.SSIMParams,
    slow_a: np.ndarray,
    slow_b: np.ndarray,
    where: Where,
    indices: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """float32 (len(a), len(b)) block: the rows and columns of images float32 holds on ``fast`` (a block
    function with moment reuse), every pair involving a ``slow_a`` / ``slow_b`` image in float64 torch.
    a and b are the images ``indices`` of A and B (named so in errors)."""
    na, nb = a.shape[0], b.shape[0]
    ga, gb = np.flatnonzero(~slow_a), np.flatnonzero(~slow_b)
    if ga.size == na and gb.size == nb:
        return fast(a, b, p, where, indices)
    _check_finite(a, b, p, ("A", "B"), indices)
    out = np.empty((na, nb), dtype=np.float32)
    if ga.size and gb.size:
        ta, tb = torch.from_numpy(ga).to(a.device), torch.from_numpy(gb).to(b.device)
        out[np.ix_(ga, gb)] = fast(
            a[ta],
            b[tb],
            p,
            lambda k: where(int(ga[k // gb.size] * nb + gb[k % gb.size])),
            (indices[0][ga], indices[1][gb]),
        )
    ii, jj = np.nonzero(slow_a[:, None] | slow_b[None, :])
    ii, jj = ii.astype(np.int64), jj.astype(np.int64)
    res = _float64_pairs(_Pairs(a, b, ii, jj, p, a.dtype, lambda k: where(int(ii[k] * nb + jj[k])), func="ssim_matrix"))
    out[ii, jj] = res.to("cpu", torch.float32).numpy()
    return out


def _fill_matrix(
    tA: torch.Tensor,
    tB: torch.Tensor,
    p: sc.SSIMParams,
    name: str,
    write: Callable[[int, int, int, int, np.ndarray], None],
    progress: bool,
) -> None:
    """Compute ssim_matrix(tA, tB) tile by tile on backend ``name``, handing each float32 block to
    ``write(i0, i1, j0, j1, block)``."""
    from tqdm.auto import tqdm

    na, nb = tA.shape[0], tB.shape[0]
    if na == 0 or nb == 0:
        return
    px = int(np.prod(_spatial(tA, p)))
    if name == "native":
        tile = int(max(1, min(max(na, nb), _MATRIX_TILE_BYTES // (2 * 16 * px))))
    else:
        # Triton keeps a mean and a variance map (float32) per image of the tile: <= 2 GiB of maps
        tile = int(max(1, min(max(na, nb), _MATRIX_TILE_IMAGES, (1 << 31) // (16 * px))))
    tiles = [
        (i0, min(na, i0 + tile), j0, min(nb, j0 + tile))
        for i0 in range(0, na, tile)
        for j0 in range(0, nb, tile)
    ]
    logger.info(
        "ssim_matrix: %d x %d pairs of %s on %s, %d tiles", na, nb, _spatial(tA, p), name, len(tiles)
    )
    # images float32 cannot hold closely: their rows / columns run in float64 (torch)
    slow_a, slow_b = np.zeros(na, dtype=bool), np.zeros(nb, dtype=bool)
    if name != "torch":
        for mask, t in ((slow_a, tA), (slow_b, tB)):
            m = sc.float32_inexact(t, data_range=p.data_range)
            if m is not None:
                mask[:] = m.cpu().numpy()
        n_slow = na * nb - int((~slow_a).sum()) * int((~slow_b).sum())
        if n_slow:
            _log_inexact("ssim_matrix", n_slow, na * nb, name)
    # The native backend reuses each image's windowed moments across the tile (ssim_matrix_block): 2D
    # uniform windows on the running-sum layout, Gaussian windows on the separable kernel. 3D uniform
    # windows go through the running-sum pair kernel instead, which is faster there even though it
    # recomputes the moments (bench_ssim.py measures both).
    reuse = name == "native" and (
        p.window != "uniform" or p.spatial_dims == 2 or _box_off()
    )
    bar = tqdm(total=na * nb, unit="pair", disable=None if progress else True, desc="ssim_matrix")
    try:
        for i0, i1, j0, j1 in tiles:
            sa, sb = slow_a[i0:i1], slow_b[j0:j1]
            indices = (np.arange(i0, i1), np.arange(j0, j1))  # the tile's images: errors name them so

            def where(k: int, i0: int = i0, j0: int = j0, w: int = j1 - j0) -> tuple[int, ...]:
                return (i0 + k // w, j0 + k % w)

            if reuse or (name == "triton" and _triton_matrix_reuse()):
                fast = _native_matrix_block if reuse else _triton_matrix_block
                block = _matrix_block(fast, tA[i0:i1], tB[j0:j1], p, sa, sb, where, indices)
            else:
                ii, jj = _grid(i1 - i0, j1 - j0)
                slow = sa[ii] | sb[jj]
                res = _run_pairs(
                    name,
                    _Pairs(tA[i0:i1], tB[j0:j1], ii, jj, p, tA.dtype, where, func="ssim_matrix"),
                    tA[i0:i1],
                    tB[j0:j1],
                    names=("A", "B"),
                    indices=indices,
                    slow=slow if slow.any() else None,
                )
                block = res.to("cpu", torch.float32).numpy().reshape(i1 - i0, j1 - j0)
            write(i0, i1, j0, j1, block)
            bar.update((i1 - i0) * (j1 - j0))
    finally:
        bar.close()


def ssim_matrix(
    A: Any,
    B: Any,
    *,
    spatial_dims: int | None = None,
    window: str = "uniform",
    win_size: int | None = None,
    sigma: float = 1.5,
    data_range: float | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    sample_covariance: bool = True,
    preset: str | None = None,
    out: Any = None,
    progress: bool = True,
    backend: str | None = None,
) -> Any:
    """SSIM of every pair (A[i], B[j]) as a float32 (len(A), len(B)) matrix — the ground-truth matrix.

    A and B are stacks of images shaped (N, *spatial) (``spatial_dims`` defaults to 2 for 3D input here:
    (N, H, W) stacks of slices; pass ``spatial_dims=3`` for (N, D, H, W) volumes). Options as :func:`ssim`;
    with ``preset="deepssim"`` the row image A[i] is "the first image" (its range sets the data range).
    On the native and Triton backends each image's windowed mean and variance are computed once per tile,
    so a pair costs only its cross term (Triton: unless ``DEEPSSIM_FAST_TRITON_SSIM=direct``); a score may
    then differ from the pair's :func:`ssim` by a float32 ulp or two (its sums are added in another order),
    and so may ``M[i, j]`` from ``M[j, i]`` in ``ssim_matrix(A, A)``, with or without a fixed ``data_range``
    (seen on AVX2, 10 random 40 x 40 images, ``data_range=1``: 35 of 100 entries differ from pair by pair, by
    up to 2 ulps, and 36 from their transposed entry). Tiles bound
    memory; ``out`` may be a path (a float32 ``np.memmap`` is written; ``.npy`` paths get a header) or a
    preallocated float32 array (numpy, torch or cupy; anything else is a TypeError). A path is written
    atomically: the matrix goes to a temporary file beside it, which replaces it once complete, so a call
    that fails leaves an existing file as it was and no partial matrix. A progress bar shows on a TTY
    unless ``progress=False``. Returns ``out`` (a path: the finished file, memory-mapped read-write; or a
    new numpy array, or torch for torch input).

    As in :func:`ssim`, float64 and 32/64-bit integer images that float32 rounds by more than
    ``FLOAT32_ROUNDING_TOL`` (2.5e-7) of their own range are measured once up front; every pair in their
    rows or columns is computed in float64 on the torch path (logged once at INFO), the rest of the tile on
    the fast kernels. Scores are never NaN; values too large (or small) for SSIM even in float64 raise
    ValueError naming the pair (i, j), and NaN/Inf ValueError naming the image (A or B and its index there).
    """
    with torch.no_grad():
        tA, tB = _to_torch(A, "A"), _to_torch(B, "B")
        if spatial_dims is None:
            if tA.ndim < 3:
                raise ValueError(
                    f"ssim_matrix: A of shape {tuple(tA.shape)} is not a stack of images; pass a stack (N, H, W) "
                    "(A[None] for one 2D image; ssim(a, B, spatial_dims=2) scores one image against a stack)"
                )
            if tA.ndim != 3:
                raise ValueError(
                    f"ssim_matrix: A of shape {tuple(tA.shape)} is ambiguous; pass spatial_dims=3 for a stack "
                    "of volumes (N, D, H, W) (A and B are stacks (N, *spatial))"
                )
            spatial_dims = 2
        p = sc.resolve_params(
            ndim=None,  # the stacks' rank is checked below, against spatial_dims + 1
            spatial_dims=spatial_dims,
            window=window,
            win_size=win_size,
            sigma=sigma,
            data_range=data_range,
            k1=k1,
            k2=k2,
            sample_covariance=sample_covariance,
            preset=preset,
        )
        if tA.ndim != p.spatial_dims + 1 or tB.ndim != p.spatial_dims + 1:
            stack = "images (N, H, W)" if p.spatial_dims == 2 else "volumes (N, D, H, W)"
            hint = ""
            if p.spatial_dims == 3 and tA.ndim == 3 and tB.ndim == 3:
                hint = "; for stacks of 2D images (N, H, W) pass spatial_dims=2"
            elif p.spatial_dims == 2 and tA.ndim == 4 and tB.ndim == 4:
                hint = "; for stacks of volumes (N, D, H, W) pass spatial_dims=3"
            raise ValueError(
                f"ssim_matrix: spatial_dims={p.spatial_dims} needs A and B to be stacks of {stack} "
                f"({p.spatial_dims + 1} dimensions), got A of shape {tuple(tA.shape)} and B of shape "
                f"{tuple(tB.shape)}{hint}"
            )
        if _spatial(tA, p) != _spatial(tB, p):
            raise ValueError(
                f"ssim_matrix: A and B image shapes differ: {tuple(tA.shape)} and {tuple(tB.shape)}"
            )
        if tA.dtype != tB.dtype:
            raise TypeError(f"A and B must have the same dtype, got {_dt(tA)} and {_dt(tB)}")
        sc.warn_dtype_range(p, tA.dtype, "A and B")
        sc.check_real(tA, tB, names=("A", "B"))
        sc.check_pair(tA[:0], tA[:0], p)  # window fits
        name = _resolve_backend(backend, [A, B], supported=_SUPPORTED)
        na, nb = tA.shape[0], tB.shape[0]
        if isinstance(out, (str, os.PathLike)):
            # written to a temporary file beside the path, which replaces it only once complete: a failed
            # call leaves an existing file as it was and no partial matrix behind
            path = Path(os.fspath(out))
            if path.is_dir():  # (checked before the work: the file only replaces the path at the end)
                raise IsADirectoryError(f"ssim_matrix: out={os.fspath(out)!r} is a folder; give a file path")
            check_writable(path)  # (and a read-only file, which could not be reopened read-write after it)
            npy = path.name.lower().endswith(".npy")  # (".NPY" too: a header, as np.load expects)
            with atomic_path(path) as tmp:
                arr, write = _open_memmap(tmp, (na, nb), npy)
                _fill_matrix(tA, tB, p, name, write, progress)
                arr.flush()
                del arr
            if npy:
                return np.load(path, mmap_mode="r+")
            return np.memmap(path, dtype=np.float32, mode="r+", shape=(na, nb))
        arr, write = _open_out(out, (na, nb))
        _fill_matrix(tA, tB, p, name, write, progress)
        if out is None:
            return like_input(torch.from_numpy(arr), A)
        return arr
