"""Argument checking and conventions shared by every SSIM backend and by the reference.

Conventions (equal to ``skimage.metrics.structural_similarity``):

* window ``"uniform"``: a ``win_size``-wide box (default 7); ``"gaussian"``: σ = ``sigma``, truncated at
  3.5 σ, i.e. ``2 * int(3.5 * sigma + 0.5) + 1`` taps (11 for σ = 1.5), as scipy's ``gaussian_filter``.
* The SSIM map is filtered, then ``(win - 1) // 2`` pixels are cropped from every border and the rest is
  averaged — the same as a "valid" convolution.
* ``sample_covariance=True`` scales variances by N/(N−1) with N = win ** spatial_dims.
* ``data_range``: explicit value (> 0); None → integer dtypes use the dtype range (uint8: 255), floats use
  max − min over BOTH images of the pair (symmetric; scikit-image requires it explicitly for floats).
  If that range is 0 the two images are the same constant and their SSIM is 1.
* ``preset="deepssim"``: each image is z-scored, (x − mean) / std (std = 0 → all zeros), then the defaults
  above with ``data_range`` = max − min of the FIRST image, as the DeepSSIM reference computes its labels
  (asymmetric on purpose, for compatibility). If the first image is constant its range is 0 and the
  pair's range is used instead (the reference would return NaN).
* Whatever the mode, a pair whose resolved range is 0 is two equal constant images: SSIM = 1, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PRESETS = (None, "deepssim")
WINDOWS = ("uniform", "gaussian")

_INT_RANGES = {
    torch.uint8: 255.0,
    torch.int8: 255.0,
    torch.int16: 65535.0,
    torch.uint16: 65535.0,
    torch.int32: 4294967295.0,
    torch.uint32: 4294967295.0,
}


@dataclass(frozen=True)
class SSIMParams:
    spatial_dims: int
    window: str
    win_size: int  # number of taps actually used
    sigma: float
    data_range: float | None  # explicit value, or None = per pair
    k1: float
    k2: float
    sample_covariance: bool
    preset: str | None

    @property
    def pad(self) -> int:
        return (self.win_size - 1) // 2

    @property
    def cov_norm(self) -> float:
        n = self.win_size**self.spatial_dims
        return n / (n - 1.0) if self.sample_covariance else 1.0


def gaussian_taps(sigma: float) -> int:
    return 2 * int(3.5 * sigma + 0.5) + 1


def window_weights(params: SSIMParams) -> np.ndarray:
    """1D filter taps (float64, summing to 1) of the separable window."""
    if params.window == "uniform":
        return np.full(params.win_size, 1.0 / params.win_size)
    r = params.pad
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / params.sigma) ** 2)
    return w / w.sum()


def resolve_params(
    *,
    ndim: int,
    spatial_dims: int | None,
    window: str,
    win_size: int,
    sigma: float,
    data_range: float | None,
    k1: float,
    k2: float,
    sample_covariance: bool,
    preset: str | None,
) -> SSIMParams:
    """Validate the options and fill defaults. ``ndim`` is the rank of the inputs."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if spatial_dims is None:
        if ndim == 2:
            spatial_dims = 2
        else:
            raise ValueError(
                f"inputs of rank {ndim} are ambiguous: pass spatial_dims=2 (a batch of 2D slices) or "
                f"spatial_dims=3 (3D volumes). Only 2D arrays default to spatial_dims=2."
            )
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if ndim < spatial_dims:
        raise ValueError(f"spatial_dims={spatial_dims} but the inputs have only {ndim} dimensions")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if window == "gaussian":
        taps = gaussian_taps(float(sigma))
    else:
        if not isinstance(win_size, (int, np.integer)) or win_size < 1:
            raise ValueError(f"win_size must be a positive odd integer, got {win_size!r}")
        if win_size % 2 == 0:
            raise ValueError(f"win_size must be odd, got {win_size}")
        if win_size < 3:
            raise ValueError(f"win_size must be at least 3, got {win_size}")
        taps = int(win_size)
    if data_range is not None:
        if not (
            isinstance(data_range, (int, float, np.floating, np.integer))
            and math.isfinite(data_range)
            and data_range > 0
        ):
            raise ValueError(f"data_range must be a positive finite number or None, got {data_range!r}")
        if preset == "deepssim":
            raise ValueError(
                "preset='deepssim' sets data_range itself (max - min of the first image); "
                "do not pass data_range with it"
            )
    for name, v in (("k1", k1), ("k2", k2)):
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    return SSIMParams(
        spatial_dims,
        window,
        taps,
        float(sigma),
        None if data_range is None else float(data_range),
        float(k1),
        float(k2),
        bool(sample_covariance),
        preset,
    )


def check_pair(x: torch.Tensor, y: torch.Tensor, params: SSIMParams) -> tuple[int, ...]:
    """Validate shapes; return the batch shape."""
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    spatial = tuple(x.shape[x.ndim - params.spatial_dims :])
    if any(s < params.win_size for s in spatial):
        raise ValueError(
            f"image of spatial shape {spatial} is smaller than the {params.win_size}-wide "
            f"{params.window} window; every spatial side must be >= {params.win_size}"
        )
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"unsupported dtype {x.dtype}")
    return tuple(x.shape[: x.ndim - params.spatial_dims])


def broadcast_pair(x: torch.Tensor, y: torch.Tensor, params: SSIMParams) -> tuple[int, ...]:
    """Validate shapes allowing broadcast batch dims (one-vs-many); return the broadcast batch shape.

    The spatial shapes (last ``spatial_dims`` axes) must be equal; the leading batch dims broadcast as numpy.
    """
    sd = params.spatial_dims
    for name, t in (("x", x), ("y", y)):
        if t.ndim < sd:
            raise ValueError(f"{name} of shape {tuple(t.shape)} has fewer than spatial_dims={sd} dimensions")
    sx, sy = tuple(x.shape[x.ndim - sd :]), tuple(y.shape[y.ndim - sd :])
    if sx != sy:
        raise ValueError(
            f"x and y must have the same spatial shape, got {tuple(x.shape)} and {tuple(y.shape)} "
            f"(spatial_dims={sd})"
        )
    try:
        batch = tuple(np.broadcast_shapes(tuple(x.shape[: x.ndim - sd]), tuple(y.shape[: y.ndim - sd])))
    except ValueError:
        raise ValueError(
            f"x and y batch dims do not broadcast: shapes {tuple(x.shape)} and {tuple(y.shape)} "
            f"(spatial_dims={sd})"
        ) from None
    if any(s < params.win_size for s in sx):
        raise ValueError(
            f"image of spatial shape {sx} is smaller than the {params.win_size}-wide "
            f"{params.window} window; every spatial side must be >= {params.win_size}"
        )
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"unsupported dtype {x.dtype}")
    return batch


def check_finite(x: torch.Tensor, name: str, params: SSIMParams) -> None:
    """Raise ValueError naming the first pair index whose image holds NaN or Inf."""
    if not x.dtype.is_floating_point:
        return
    flat = x.reshape(-1, *x.shape[x.ndim - params.spatial_dims :])
    bad = ~torch.isfinite(flat).flatten(1).all(dim=1)
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0])
        batch_shape = tuple(x.shape[: x.ndim - params.spatial_dims])
        where = np.unravel_index(idx, batch_shape) if batch_shape else ()
        raise ValueError(
            f"{name} has NaN or Inf values at pair index {tuple(int(i) for i in where)} (flat index {idx})"
        )


def dtype_range(dtype: torch.dtype) -> float | None:
    """Data range of an integer dtype (as scikit-image's dtype_range), None for floats."""
    return _INT_RANGES.get(dtype)


def zscore(x: torch.Tensor, spatial_dims: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-image (x - mean) / std computed in ``dtype`` (population std, as numpy); std == 0 gives zeros."""
    dims = tuple(range(x.ndim - spatial_dims, x.ndim))
    x = x.to(dtype)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return torch.where(std > 0, (x - mean) / torch.where(std > 0, std, 1.0), torch.zeros_like(x))


def pair_data_range(
    x: torch.Tensor, y: torch.Tensor, params: SSIMParams, *, input_dtype: Any
) -> torch.Tensor:
    """Per-pair data range (float64, batch-flat shape (B,)) for inputs shaped (B, *spatial).

    Call after the preset transform: for ``deepssim`` ``x`` and ``y`` are already z-scored.
    """
    b = x.shape[0]
    if params.data_range is not None:
        return torch.full((b,), params.data_range, dtype=torch.float64, device=x.device)
    r = dtype_range(input_dtype)
    if r is not None and params.preset is None:
        return torch.full((b,), r, dtype=torch.float64, device=x.device)
    fx, fy = x.reshape(b, -1), y.reshape(b, -1)
    hi = torch.maximum(fx.amax(dim=1), fy.amax(dim=1))
    lo = torch.minimum(fx.amin(dim=1), fy.amin(dim=1))
    pair = (hi - lo).to(torch.float64)
    if params.preset == "deepssim":
        first = (fx.amax(dim=1) - fx.amin(dim=1)).to(torch.float64)
        return torch.where(first > 0, first, pair)
    return pair
