"""Argument checking and conventions shared by every SSIM backend and by the reference.

Conventions (equal to ``skimage.metrics.structural_similarity``):

* window ``"uniform"``: a ``win_size``-wide box (default 7); ``"gaussian"``: σ = ``sigma``, truncated at
  3.5 σ, i.e. ``2 * int(3.5 * sigma + 0.5) + 1`` taps (11 for σ = 1.5), as scipy's ``gaussian_filter``;
  its size is sigma's alone, so a ``win_size`` other than those taps is refused (scikit-image would crop
  its borders by that ``win_size`` instead).
* The SSIM map is filtered, then ``(win - 1) // 2`` pixels are cropped from every border and the rest is
  averaged — the same as a "valid" convolution.
* ``sample_covariance=True`` scales variances by N/(N−1) with N = win ** spatial_dims.
* ``data_range``: explicit value (> 0); None → integer dtypes use the dtype range as scikit-image's
  ``dtype_range`` (uint8: 255, int64: 2^64 − 1; bool images count as {0, 1}, range 1), floats use
  max − min over BOTH images of the pair (symmetric; scikit-image requires it explicitly for floats).
  If that range is 0 the two images are the same constant and their SSIM is 1.
* ``preset="deepssim"``: each image is z-scored, (x − mean) / std (std = 0 → all zeros), then the defaults
  above with ``data_range`` = max − min of the FIRST image, as the DeepSSIM reference computes its labels
  (asymmetric on purpose, for compatibility). If the first image is constant its range is 0 and the
  pair's range is used instead (the reference would return NaN).
* Whatever the mode, a pair whose resolved range is 0 is two equal constant images: SSIM = 1, never NaN.
  Under ``preset="deepssim"`` every constant image z-scores to zeros, so ANY two constant images (a black
  and a white one too) are equal there and score 1.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PRESETS = (None, "deepssim")
WINDOWS = ("uniform", "gaussian")

# scikit-image's dtype_range (max - min) of every integer dtype, and bool as {0, 1}
_INT_RANGES = {
    torch.bool: 1.0,
    torch.uint8: 255.0,
    torch.int8: 255.0,
    torch.int16: 65535.0,
    torch.uint16: 65535.0,
    torch.int32: 4294967295.0,
    torch.uint32: 4294967295.0,
    torch.int64: 18446744073709551615.0,
    torch.uint64: 18446744073709551615.0,
}

# Dtypes that float32 may not hold exactly (the others — float32, float16, bfloat16, 8- and 16-bit integers,
# bool — convert exactly, so the float32 kernels see the caller's values).
_WIDE_DTYPES = frozenset({torch.float64, torch.int32, torch.uint32, torch.int64, torch.uint64})
# Largest float32 rounding error, relative to the image's own range (max - min), that the float32 kernels
# (native, Triton) accept. Rounding to float32 moves a value by at most 2^-24 of its magnitude; an image
# whose values span [0, max] (MRI intensities; any image whose span includes 0) has magnitudes <= its
# range, so its error is <= 2^-24 ~ 6e-8 of the range and it never trips this (~4 x 2^-24: images offset by
# up to about 4 x their spread pass too). Past it — large offsets against small variations, e.g. float64
# 1e4 + [0, 1) (error 5e-4 of the range, SSIM 1e-5 off) or int32 around 2^30 — the pairs run in float64.
FLOAT32_ROUNDING_TOL = 2.5e-7


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


def positive_real(v: Any, name: str, alt: str = "") -> float:
    """``float(v)`` for a positive finite real scalar: a Python or numpy number, or a 0-d numpy array or torch
    tensor of a real dtype. bool, complex, strings, arrays with elements, NaN, Inf and values <= 0 raise
    ValueError naming the parameter (``alt`` is appended to the expectation, e.g. " or None")."""
    if isinstance(v, torch.Tensor):
        ok = v.ndim == 0 and not v.dtype.is_complex and v.dtype != torch.bool
    elif isinstance(v, np.ndarray):
        ok = v.ndim == 0 and (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating))
    else:
        ok = isinstance(v, (numbers.Real, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    if ok:
        f = float(v)
        if math.isfinite(f) and f > 0:
            return f
    raise ValueError(f"{name} must be a positive finite real number{alt}, got {v!r}")


def is_integer(v: Any) -> bool:
    """A Python or numpy integer; bool (a subclass of int in Python) does not count."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _got(v: Any) -> str:
    """``repr(v)`` for an error message, marking bools (which Python would take as the integers 0 and 1)."""
    return f"{v!r} (a bool)" if isinstance(v, (bool, np.bool_)) else repr(v)


def check_bool(v: Any, name: str) -> bool:
    """``v`` as a bool: True or False (Python or numpy bool). Anything else — 0/1, strings such as "no",
    None — raises TypeError naming the parameter, rather than being read by its truth value."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise TypeError(f"{name} must be a bool (True or False), got {v!r} of type {type(v).__name__}")


def check_count_or_none(v: Any, name: str) -> None:
    """ValueError naming the parameter unless ``v`` is None or a positive integer (Python or numpy; not a bool,
    a float or a string, which int() would have taken: "7", 2.7, True)."""
    if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {v!r}")


def _describe(shapes: dict[str, tuple[int, ...]] | None, ndim: int) -> str:
    if shapes:
        return " and ".join(f"{name} of shape {tuple(shape)}" for name, shape in shapes.items())
    return f"inputs of rank {ndim}"


def resolve_params(
    *,
    ndim: int | None,
    spatial_dims: int | None,
    window: str,
    win_size: int | None,
    sigma: float,
    data_range: float | None,
    k1: float,
    k2: float,
    sample_covariance: bool,
    preset: str | None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> SSIMParams:
    """Validate the options and fill defaults.

    ``ndim`` is the rank of the inputs (the larger of the two); rank 2 defaults to ``spatial_dims=2``, and
    inputs with fewer than ``spatial_dims`` (default 2) dimensions raise ValueError. None: the caller checks
    the rank itself and passes ``spatial_dims``. ``shapes`` (name -> shape, e.g. ``{"x": ..., "y": ...}``)
    names the inputs in those errors.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if spatial_dims is not None and (not is_integer(spatial_dims) or spatial_dims not in (2, 3)):
        raise ValueError(f"spatial_dims must be 2 or 3 (an integer) or None, got {_got(spatial_dims)}")
    if ndim is not None:
        sd = 2 if spatial_dims is None else int(spatial_dims)
        if ndim < sd:
            need = "(H, W)" if sd == 2 else "(D, H, W)"
            default = " (the default)" if spatial_dims is None else ""
            raise ValueError(
                f"{_describe(shapes, ndim)}: too few dimensions for spatial_dims={sd}{default}, which needs "
                f"images of at least {sd} dimensions {need} (leading dimensions are batch)"
            )
        if spatial_dims is None and ndim != 2:
            raise ValueError(
                f"{_describe(shapes, ndim)} are ambiguous: pass spatial_dims=2 (a batch of 2D slices) or "
                "spatial_dims=3 (3D volumes). Only 2D arrays default to spatial_dims=2."
            )
        spatial_dims = sd
    elif spatial_dims is None:
        raise ValueError("spatial_dims must be given (2 or 3)")
    spatial_dims = int(spatial_dims)
    sample_covariance = check_bool(sample_covariance, "sample_covariance")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    sigma = positive_real(sigma, "sigma")
    if window == "gaussian":
        taps = gaussian_taps(sigma)
        if taps == 1 and sample_covariance:
            raise ValueError(
                f"sigma={sigma!r} gives a 1-tap Gaussian window (2 * int(3.5 * sigma + 0.5) + 1 taps), over "
                "which the sample covariance N/(N-1) is undefined (N = 1); pass sample_covariance=False, or "
                "sigma >= 1/7 for at least 3 taps"
            )
        if win_size is not None and not (is_integer(win_size) and win_size == taps):
            # scikit-image (gaussian_weights=True) uses such a win_size only for the border it crops; here the
            # window's extent is sigma's alone, and a win_size beside it was ignored without a word
            raise ValueError(
                f"win_size={_got(win_size)} with window='gaussian': the Gaussian window's size is set by sigma "
                f"({taps} taps for sigma={sigma!r}, 2 * int(3.5 * sigma + 0.5) + 1); leave win_size unset (or "
                f"pass {taps}), or change sigma"
            )
    else:
        win_size = 7 if win_size is None else win_size
        if not is_integer(win_size) or win_size < 1:
            raise ValueError(f"win_size must be a positive odd integer, got {_got(win_size)}")
        if win_size % 2 == 0:
            raise ValueError(f"win_size must be odd, got {win_size}")
        if win_size < 3:
            raise ValueError(f"win_size must be at least 3, got {win_size}")
        taps = int(win_size)
    if data_range is not None:
        data_range = positive_real(data_range, "data_range", " or None")
        if preset == "deepssim":
            raise ValueError(
                "preset='deepssim' sets data_range itself (max - min of the first image); "
                "do not pass data_range with it"
            )
    k1, k2 = positive_real(k1, "k1"), positive_real(k2, "k2")
    return SSIMParams(
        spatial_dims,
        window,
        taps,
        sigma,
        data_range,
        k1,
        k2,
        sample_covariance,
        preset,
    )


def check_real(x: torch.Tensor, y: torch.Tensor, names: tuple[str, str] = ("x", "y")) -> None:
    """Raise TypeError naming the argument whose dtype is not real (complex). bool counts as {0, 1}."""
    for name, t in zip(names, (x, y), strict=True):
        if t.dtype.is_complex:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}: SSIM needs real-valued images")


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
    check_real(x, y)
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
    check_real(x, y)
    return batch


def check_finite(
    x: torch.Tensor,
    name: str,
    params: SSIMParams,
    index: Sequence[int] | None = None,
    pairs: tuple[int, ...] | None = None,
) -> None:
    """Raise ValueError naming the first image of x that holds NaN or Inf.

    ``index``: when x is part of the caller's stack (N, *spatial), e.g. a tile of ssim_matrix's A, the
    caller's index of each of x's images (x[k] is image index[k]); the error names that image, ``A[2]``.
    None: x is the caller's input itself; the error names the pair index (its batch index), or just the
    input when it is a single image. ``pairs``: the broadcast batch shape of the pairs, when x's own batch
    shape broadcasts to it (one-vs-many); the error then names the first pair holding the image, and the
    image by its index in x.
    """
    if not x.dtype.is_floating_point:
        return
    flat = x.reshape(-1, *x.shape[x.ndim - params.spatial_dims :])
    if x.dtype.itemsize == 1:  # (float8: torch has no isfinite for it; float32 holds its values exactly)
        flat = flat.to(torch.float32)
    bad = ~torch.isfinite(flat).flatten(1).all(dim=1)
    if bool(bad.any()):
        idx = int(torch.nonzero(bad)[0])
        if index is not None:  # an image of a stack (ssim_matrix's A or B), not a pair
            raise ValueError(f"{name}[{int(index[idx])}] has NaN or Inf values")
        batch_shape = tuple(x.shape[: x.ndim - params.spatial_dims])
        if not batch_shape:  # one image (compared with every image of the other input)
            raise ValueError(f"{name} has NaN or Inf values")
        where = tuple(int(i) for i in np.unravel_index(idx, batch_shape))
        if pairs is None or tuple(pairs) == batch_shape:
            raise ValueError(f"{name} has NaN or Inf values at pair index {where} (flat index {idx})")
        own = ", ".join(str(i) for i in where)
        where = (0,) * (len(pairs) - len(where)) + where  # (its size-1 dims broadcast: their index is 0)
        flat = int(np.ravel_multi_index(where, tuple(pairs)))
        raise ValueError(
            f"{name} has NaN or Inf values at pair index {where} (flat index {flat}), the first pair of its image "
            f"{name}[{own}] ({name}'s batch shape {batch_shape} broadcasts to the pairs' {tuple(pairs)})"
        )


def warn_dtype_range(params: SSIMParams, dtype: torch.dtype, names: str = "x and y") -> None:
    """Warn, as scikit-image does, when an integer dtype other than uint8 (and bool) sets the data range: int16
    MRI of values in the thousands, scored against int16's 65535, comes out near 1 whatever the images (two
    slices of a brain 40 mm apart: 0.88, above the duplicate threshold; 0.50 with their own range)."""
    if params.data_range is not None or params.preset is not None:
        return
    r = dtype_range(dtype)
    if r is None or dtype in (torch.uint8, torch.bool):
        return
    warnings.warn(
        f"{names} are {str(dtype).removeprefix('torch.')}: data_range is that dtype's range, {r:.6g} (scikit-image's "
        "convention, which warns too); images that span much less of it score near 1 whatever they show. Pass "
        "data_range (e.g. the images' max - min, or the scanner's range)",
        UserWarning,
        stacklevel=3,
    )


def dtype_range(dtype: torch.dtype) -> float | None:
    """Data range of an integer dtype (max - min of scikit-image's dtype_range; bool: 1), None for floats."""
    return _INT_RANGES.get(dtype)


def kernel_scale(params: SSIMParams, input_dtype: Any) -> float:
    """Power of two by which the float32 kernels (native, Triton) multiply the images and a fixed data range.

    SSIM does not change when the images and the range scale together, and a power of two scales float32
    values exactly. 2^-33 for the 64-bit integer dtype range (2^64): unscaled, C1 ~ 3e34 and C2 ~ 3e35 make
    the products in the SSIM formula overflow float32 (those pairs would all be recomputed in float64);
    scaled, the range is 2^31 and |values| <= 2^31, about what int32 data gives. 1 otherwise.
    """
    if params.preset is None and params.data_range is None and input_dtype in (torch.int64, torch.uint64):
        return 2.0**-33
    return 1.0


# 64-bit integer images: float64 holds their values exactly only up to 2^53 in magnitude. Past it, a cast
# rounded two different images offset by ~2^62 (uint64 near its top) to one constant each, and any two
# constants score 1: unrelated images came out as duplicates. Such images are centred on their minimum in
# integer arithmetic first (below), which SSIM's variances and covariance do not see, and the minimum is
# added back to the window means in float64 (a relative error of 2^-53 there, as for any float64 input).
_FLOAT64_EXACT = float(2**53)


def _ordered_int64(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(v, shift)``: int64 ``v`` with ``t == v + shift`` exactly, in the same order (uint64, whose min/max torch
    does not implement, is its top bit flipped: ``shift = 2^63``)."""
    if t.dtype == torch.uint64:
        return t.view(torch.int64) ^ torch.iinfo(torch.int64).min, 2**63
    return t, 0


def _int64_extremes(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    v, shift = _ordered_int64(t)
    return v.amin(dim=dims, keepdim=True), v.amax(dim=dims, keepdim=True), shift


def _magnitude(lo: torch.Tensor, hi: torch.Tensor, shift: int) -> torch.Tensor:
    """The largest |value| (float64) of an image of int64 extremes ``lo``, ``hi`` (plus ``shift``)."""
    return torch.maximum((lo.to(torch.float64) + shift).abs(), (hi.to(torch.float64) + shift).abs())


def _as_unsigned64(d: torch.Tensor) -> torch.Tensor:
    """float64 of int64 differences ``d`` that may have wrapped (a spread past 2^63): read as their uint64."""
    f = d.to(torch.float64)
    return torch.where(f < 0, f + 2.0**64, f)


def exact_float64(t: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(c, o)``: the images ``t`` (N, *spatial) as float64, ``t = c + o``. ``o`` is None (and ``c`` a plain cast)
    unless ``t`` is a 64-bit integer batch with a value past 2^53 in magnitude; then every image is centred on
    its minimum in integer arithmetic, ``c = t - min`` (exact below a spread of 2^53, rounded relative to the
    spread past it) and ``o`` (N, 1, ...) the minimum in float64."""
    if t.dtype not in (torch.int64, torch.uint64) or t.numel() == 0:
        return t.to(torch.float64), None
    dims = tuple(range(t.ndim - spatial_dims, t.ndim))
    lo, hi, shift = _int64_extremes(t, dims)
    if not bool((_magnitude(lo, hi, shift) >= _FLOAT64_EXACT).any()):
        return t.to(torch.float64), None
    v, _ = _ordered_int64(t)
    return _as_unsigned64(v - lo), lo.to(torch.float64) + shift


def float32_inexact(t: torch.Tensor, tol: float = FLOAT32_ROUNDING_TOL,
                    data_range: float | None = None) -> torch.Tensor | None:
    """Which images of ``t`` (shaped (N, *spatial)) float32 cannot hold to ``tol`` of their own range.

    Returns a bool (N,) tensor on t's device: True where max |float32(x) - x| > tol * (max - min), measured in
    float64 (in chunks of images, so the float64 temporaries stay small). An explicit ``data_range`` smaller
    than an image's range takes its place: SSIM's constants scale with it, so rounding that is small beside
    the image's span can still move the score (texture 1e-4 high on an offset of 3, with one voxel at 4 and
    data_range 0.0015, scored 1.5e-4 off on the float32 path). Constant images are fine (their
    SSIM terms do not depend on a common rounding); values float32 cannot represent at all (|x| > 3.4e38)
    count as inexact; NaN/Inf images are left to the caller's finiteness check. None when ``t``'s dtype
    converts to float32 exactly (see ``_WIDE_DTYPES``): the common case costs nothing.
    """
    if t.dtype not in _WIDE_DTYPES:
        return None
    n = t.shape[0]
    f = t.reshape(n, -1)
    out = torch.zeros(n, dtype=torch.bool, device=t.device)
    chunk = max(1, (64 << 20) // (8 * max(1, f.shape[1])))
    for s in range(0, n, chunk):
        blk = f[s : s + chunk]
        if t.dtype in (torch.int64, torch.uint64):
            # (values past 2^53, which float64 cannot measure, see above: float32's rounding of a value is at
            # most 2^-24 of its magnitude, so that bound against the exact range decides; a bound, where the
            # others are measured, so an image near the line may take the float64 path needlessly)
            lo, hi, shift = _int64_extremes(blk, (1,))
            big = _magnitude(lo, hi, shift).flatten()
            past = big >= _FLOAT64_EXACT
            if bool(past.any()):
                rng = _as_unsigned64(hi - lo).flatten()
                scale = rng if data_range is None else torch.clamp(rng, max=float(data_range))
                out[s : s + chunk] = past & (big * 2.0**-24 > tol * scale) & (rng > 0)
                keep = torch.nonzero(~past).flatten()
                if keep.numel():
                    out[s + keep] = float32_inexact(blk[keep], tol, data_range)
                continue
        d = blk.to(torch.float64)
        err = (blk.to(torch.float32).to(torch.float64) - d).abs().amax(dim=1)
        rng = d.amax(dim=1) - d.amin(dim=1)
        scale = rng if data_range is None else torch.clamp(rng, max=float(data_range))
        out[s : s + chunk] = (err > tol * scale) & ((rng > 0) | torch.isinf(err))
    return out


def zscore(x: torch.Tensor, spatial_dims: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-image (x - mean) / std computed in ``dtype`` (population std, as numpy); a constant image gives zeros.

    Each image is first multiplied by the power of two that brings its largest |value| to [0.5, 1) (kept a
    normal number of ``dtype``). That is exact and leaves the z-scores as they were, but keeps the squares
    behind the std inside ``dtype``'s range: unscaled, float64 squares overflow from |x| ~ 1e154 (std = inf)
    and underflow below ~1e-162 (std = 0), and either made every z-score 0, so unrelated images scored 1.
    """
    dims = tuple(range(x.ndim - spatial_dims, x.ndim))
    x = x.to(dtype)
    big = x.abs().amax(dim=dims, keepdim=True)
    lim = math.frexp(torch.finfo(dtype).max)[1] - 2
    x = x * torch.ldexp(torch.ones_like(big), (-torch.frexp(big).exponent).clamp(-lim, lim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    # a constant image is told by its values, not by its std: the rounded mean of a constant 0.1 differs from
    # 0.1 by a tiny d, its std comes out |d| > 0, and the z-score was a uniform -1 or +1 image instead of
    # zeros, which of them depending on the reduction order (the batch the image is in)
    ok = (std > 0) & (x.amax(dim=dims, keepdim=True) > x.amin(dim=dims, keepdim=True))
    return torch.where(ok, (x - mean) / torch.where(ok, std, 1.0), torch.zeros_like(x))


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
