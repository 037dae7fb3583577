"""Fused windowed SSIM in Triton: one launch per batch of pairs, 2D and 3D, uniform or Gaussian window.

Grid = (pairs, tiles of a plane, output planes). Each program loads its tile of both images straight from
the inputs (halo included, masked), forms the five statistics in fp32, evaluates the SSIM formula and
reduces its part of the SSIM map to one partial sum: no image-sized intermediate map is ever written. The
partial sums (one float per program) are added in fp64 by the launcher. Two variants, same values:

* ``"separable"`` (default): a tile of R x C input positions (powers of two) in registers. 3D: a z pass of
  KZ loads per position; then an x pass and a y pass that gather the taps from the tile itself
  (``tl.gather`` along the axis: warp shuffles, no shared-memory staging written by hand), giving
  (R - K + 1) x (C - K + 1) outputs. About 3K taps of work per output instead of K^3 (3D) or K^2 (2D).
* ``"direct"``: every window tap per output pixel (the outer product of the 1D taps), BH x BW outputs per
  program. More arithmetic, simplest code; kept as a cross-check and for timing against the default.

Exactness: plain E[x^2] - E[x]^2 in fp32 drifts ~1e-5 from scikit-image on MRI with flat backgrounds.
Here every pass centres its taps on the middle tap's value (the previous pass's mean) and combines
partial statistics by the law of total variance (var = mean of variances + variance of means), so every
squared quantity is a local difference; the direct variant centres on the output pixel's own value.

Inputs: float16, bfloat16 or float32 (other dtypes are converted to float32 by the launcher: the front end,
``deepssim_fast.ssim``, sends here only images float32 holds to ``FLOAT32_ROUNDING_TOL`` of their range and
computes the others in float64); arithmetic is fp32. ``preset="deepssim"``: the launcher z-scores every image
in float64 on the device and hands the kernel the float32 z-scores; centring in the kernel on the float32
mean instead would shift every z-score by up to half an ulp of the mean (SSIM 5e-5 off at an offset of 1e4).
Runs compiled on NVIDIA GPUs and under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from deepssim_fast import _ssim_common as sc

from . import FP_FUSION

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z dimensions (tiles of a plane, output planes)
VARIANTS = ("separable", "direct")


@triton.jit
def _ltv_pass(ma, mb, va, vb, cab, w_ptr, pos, AXIS: tl.constexpr, LIM: tl.constexpr, K: tl.constexpr,
              FROM_RAW: tl.constexpr, CROSS: tl.constexpr):
    """One separable window pass along AXIS of the five statistics held in registers.

    ``pos`` (int32, the tensor's shape) is each element's position along AXIS; the window of the output at
    position p covers positions p .. p + K - 1 (gathered from the same tensor; positions past LIM - 1
    are clamped and only reach outputs that are masked). Centred on the middle tap's means (law of total
    variance): every squared quantity is a local difference, so nothing cancels in fp32. FROM_RAW: the
    inputs are plain values (va, vb, cab are ignored). CROSS: only the means and the covariance are formed
    (va, vb are ignored and returned as zeros; ssim_matrix has the variances per image).
    """
    h: tl.constexpr = (K - 1) // 2
    mid = tl.minimum(pos + h, LIM - 1)
    cen_a = tl.gather(ma, mid, AXIS)
    cen_b = tl.gather(mb, mid, AXIS)
    sa = tl.zeros(ma.shape, dtype=tl.float32)
    sb = tl.zeros(ma.shape, dtype=tl.float32)
    qa = tl.zeros(ma.shape, dtype=tl.float32)
    qb = tl.zeros(ma.shape, dtype=tl.float32)
    qab = tl.zeros(ma.shape, dtype=tl.float32)
    for t in tl.static_range(K):
        at = tl.minimum(pos + t, LIM - 1)
        wt = tl.load(w_ptr + t)
        if t != h:
            ea = tl.gather(ma, at, AXIS) - cen_a
            eb = tl.gather(mb, at, AXIS) - cen_b
            wa = wt * ea
            wb = wt * eb
            sa += wa
            sb += wb
            qab += wa * eb
            if not CROSS:
                qa += wa * ea
                qb += wb * eb
        if not FROM_RAW:
            qab += wt * tl.gather(cab, at, AXIS)
            if not CROSS:
                qa += wt * tl.gather(va, at, AXIS)
                qb += wt * tl.gather(vb, at, AXIS)
    return cen_a + sa, cen_b + sb, qa - sa * sa, qb - sb * sb, qab - sa * sb


@triton.jit
def _add_tap(xb, yb, off, mask, xc, yc, sx, sy, wt, sa, sb, qa, qb, qab):
    """Add one window tap (weight wt, at offset off of both images) to the sums of differences from the
    centres (xc, yc): sum w d, sum w d^2 per image and sum w da db."""
    ea = (tl.load(xb + off, mask=mask, other=0.0).to(tl.float32) - xc) * sx
    eb = (tl.load(yb + off, mask=mask, other=0.0).to(tl.float32) - yc) * sy
    wa = wt * ea
    wb = wt * eb
    return sa + wa, sb + wb, qa + wa * ea, qb + wb * eb, qab + wa * eb


@triton.jit
def _ssim_kernel(
    x_ptr,
    y_ptr,
    ix_ptr,
    iy_ptr,
    cx_ptr,
    sx_ptr,
    cy_ptr,
    sy_ptr,
    c1_ptr,
    c2_ptr,
    fs_ptr,
    w_ptr,
    wz_ptr,
    part_ptr,
    mom_x_ptr,
    mom_y_ptr,
    H,
    W,
    Ho,
    Wo,
    tiles_w,
    n_tiles,
    n_planes,
    tile0,
    oz0,
    plane_stride,
    image_stride,
    cov_norm,
    K: tl.constexpr,
    KZ: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    SEPARABLE: tl.constexpr,
    MODE: tl.constexpr,
):
    """Partial SSIM sum of one (pair, tile, output plane) program.

    SEPARABLE: the tile is BR x BC input positions and gives (BR - K + 1) x (BC - K + 1) outputs (z pass of
    KZ loads per position, centred on the middle plane's value; then _ltv_pass along x and along y).
    Direct: the tile is BR x BC outputs, each summing its K^2 (2D) or K^3 (3D) taps, centred on its own
    centre pixel. Both centre every difference locally (see the module docstring).
    MODE (separable only): 0, SSIM of the pairs; 1, the windowed mean and variance maps of the x images
    (pair p = image p; y must be x) into mom_x, laid out (image, [mean, variance], Do, Ho, Wo); 2, SSIM of
    the pairs from their cross term only, with the variances read from mom_x / mom_y (ssim_matrix).
    """
    pair = tl.program_id(0)
    tile = tile0 + tl.program_id(1)  # (a launch covers tiles tile0 ... and planes oz0 ...: see _launch)
    oz = oz0 + tl.program_id(2)
    i = tl.load(ix_ptr + pair).to(tl.int64)
    j = tl.load(iy_ptr + pair).to(tl.int64)
    xb = x_ptr + i * image_stride
    yb = y_ptr + j * image_stride
    cx = tl.load(cx_ptr + i)
    sx = tl.load(sx_ptr + i)
    cy = tl.load(cy_ptr + j)
    sy = tl.load(sy_ptr + j)
    c1 = tl.load(c1_ptr + pair)
    c2 = tl.load(c2_ptr + pair)
    fs = tl.load(fs_ptr + pair)  # ~ 1 / range^2, a power of two (see _formula_scale)
    h: tl.constexpr = (K - 1) // 2
    hz: tl.constexpr = (KZ - 1) // 2
    lr = tl.arange(0, BR)[:, None]
    lc = tl.arange(0, BC)[None, :]
    zero = tl.zeros((BR, BC), dtype=tl.float32)
    if SEPARABLE:
        TR: tl.constexpr = BR - K + 1
        TC: tl.constexpr = BC - K + 1
        rows = (tile // tiles_w) * TR + lr  # input rows and columns of the tile
        cols = (tile % tiles_w) * TC + lc
        inside = (rows < H) & (cols < W)
        centre = (oz + hz).to(tl.int64) * plane_stride + rows * W + cols
        xc = tl.load(xb + centre, mask=inside, other=0.0).to(tl.float32)
        yc = tl.load(yb + centre, mask=inside, other=0.0).to(tl.float32)
        ma = (xc - cx) * sx
        mb = (yc - cy) * sy
        pos_c = tl.broadcast_to(lc, (BR, BC))
        pos_r = tl.broadcast_to(lr, (BR, BC))
        if KZ > 1:
            sa = zero
            sb = zero
            qa = zero
            qb = zero
            qab = zero
            for dz in tl.static_range(KZ):
                if dz != hz:
                    off = (oz + dz).to(tl.int64) * plane_stride + rows * W + cols
                    sa, sb, qa, qb, qab = _add_tap(xb, yb, off, inside, xc, yc, sx, sy, tl.load(wz_ptr + dz),
                                                   sa, sb, qa, qb, qab)
            ma, mb, va, vb, cab = _ltv_pass(ma + sa, mb + sb, qa - sa * sa, qb - sb * sb, qab - sa * sb,
                                            w_ptr, pos_c, 1, BC, K, False, MODE == 2)
        else:
            ma, mb, va, vb, cab = _ltv_pass(ma, mb, zero, zero, zero, w_ptr, pos_c, 1, BC, K, True, MODE == 2)
        ux, uy, vx, vy, vxy = _ltv_pass(ma, mb, va, vb, cab, w_ptr, pos_r, 0, BR, K, False, MODE == 2)
        ux = ux + cx * sx  # the means relative to the image centres -> the means (luminance term)
        uy = uy + cy * sy
        valid = (lr < TR) & (lc < TC) & (rows < Ho) & (cols < Wo)
        if MODE > 0:
            plane = tl.cast(Ho, tl.int64) * Wo  # (int64: 2 * n_planes * plane passes 2^31 at ~1024^3)
            at = oz.to(tl.int64) * plane + rows * Wo + cols  # output (oz, row, col) of this position
            if MODE == 1:
                mx = mom_x_ptr + i * (2 * n_planes * plane)
                tl.store(mx + at, ux, mask=valid)
                tl.store(mx + n_planes * plane + at, vx, mask=valid)
            else:
                vx = tl.load(mom_x_ptr + i * (2 * n_planes * plane) + n_planes * plane + at, mask=valid, other=0.0)
                vy = tl.load(mom_y_ptr + j * (2 * n_planes * plane) + n_planes * plane + at, mask=valid, other=0.0)
    else:
        rows = (tile // tiles_w) * BR + lr  # output rows and columns
        cols = (tile % tiles_w) * BC + lc
        valid = (rows < Ho) & (cols < Wo)
        centre = (oz + hz).to(tl.int64) * plane_stride + (rows + h) * W + (cols + h)
        xc = tl.load(xb + centre, mask=valid, other=0.0).to(tl.float32)
        yc = tl.load(yb + centre, mask=valid, other=0.0).to(tl.float32)
        ea = zero
        eb = zero
        eaa = zero
        ebb = zero
        eab = zero
        for dz in range(KZ):
            wz = tl.load(wz_ptr + dz)
            zoff = (oz + dz).to(tl.int64) * plane_stride
            for dy in range(K):
                wzy = wz * tl.load(w_ptr + dy)
                roff = zoff + (rows + dy) * W
                for dx in tl.static_range(K):
                    ea, eb, eaa, ebb, eab = _add_tap(xb, yb, roff + (cols + dx), valid, xc, yc, sx, sy,
                                                     wzy * tl.load(w_ptr + dx), ea, eb, eaa, ebb, eab)
        ux = xc * sx + ea  # (ea, eb: differences from the centre pixel, so the means need no centre)
        uy = yc * sy + eb
        vx = eaa - ea * ea
        vy = ebb - eb * eb
        vxy = eab - ea * eb
    if MODE != 1:
        vx = cov_norm * vx
        vy = cov_norm * vy
        vxy = cov_norm * vxy
        num = ((2.0 * ux * uy + c1) * fs) * ((2.0 * vxy + c2) * fs)
        den = ((ux * ux + uy * uy + c1) * fs) * ((vx + vy + c2) * fs)
        # a statistic past the float32 range makes den inf: NaN (recomputed in float64), not num / inf = 0
        r = tl.where(den < float("inf"), num / tl.where(valid, den, 1.0), float("nan"))
        s = tl.where(valid, r, 0.0)
        total = tl.sum(tl.sum(s, axis=1), axis=0)
        tl.store(part_ptr + (pair.to(tl.int64) * n_planes + oz) * n_tiles + tile, total)


def _image_stats(t: torch.Tensor, need_std: bool) -> tuple[torch.Tensor, ...]:
    """Per-image (mean, std, min, max) in float64 for t shaped (N, *spatial), without an fp64 copy of t."""
    f = t.reshape(t.shape[0], -1)
    mn = f.amin(dim=1).to(torch.float64)
    mx = f.amax(dim=1).to(torch.float64)
    mean = f.sum(dim=1, dtype=torch.float64) / f.shape[1]
    if need_std:
        var = torch.empty_like(mean)
        chunk = max(1, (256 << 20) // (8 * max(1, f.shape[1])))  # bounded fp64 temporaries
        for s in range(0, f.shape[0], chunk):
            d = f[s : s + chunk].to(torch.float64) - mean[s : s + chunk, None]
            var[s : s + chunk] = (d * d).mean(dim=1)
        std = var.sqrt()
    else:
        std = torch.ones_like(mean)
    return mean, std, mn, mx


def _zscored(t: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (x - mean) * scale of t shaped (N, *spatial), computed in float64 in chunks of images."""
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    f, o = t.reshape(t.shape[0], -1), out.view(t.shape[0], -1)
    chunk = max(1, (256 << 20) // (8 * max(1, f.shape[1])))  # bounded fp64 temporaries
    for s in range(0, f.shape[0], chunk):
        o[s : s + chunk] = (f[s : s + chunk].to(torch.float64) - mean[s : s + chunk, None]) * scale[s : s + chunk, None]
    return out


#: Pairs whose images span more than this many times sqrt(C2) = k2 range go to float64 (as the native kernel's
#: kMaxSpanRatio, csrc/ssim.cpp): the window means are kept to an ulp of the span, which is no longer small
#: against C2 there (1000 +- 1e-3 with one 0-valued pixel at data_range=0.01: 2e-4 to 4e-4 off float64;
#: 3000 +- 0.09 with one 0-valued pixel, Gaussian window: 1.5e-5 off at 32768, the limit before, 2.2e-6 at 8192)
MAX_SPAN_RATIO = 8192.0


def _formula_scale(rng: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Per pair (float32, (P,)): the power of two nearest 1 / range^2 by which the kernel multiplies each
    factor of the SSIM formula's numerator and denominator, or NaN where the range is too small for float32.

    The factors are of order range^2 (means ~ range, variances and C1, C2 ~ range^2), so their products went
    subnormal below ranges of ~1e-9 (ADC maps in m^2/s, say) and lost digits silently; scaled, they are O(1),
    exactly. A range whose square, C1 or C2 (float64, (P,) like ``rng``) is below 2^-100 leaves the window
    statistics themselves too near float32's subnormals: NaN, so the pair scores NaN and the caller recomputes
    it in float64; so does a pair whose centred images span (``span``, float64 (P,)) more than
    ``MAX_SPAN_RATIO`` sqrt(C2).
    """
    e = (torch.frexp(rng).exponent - 1).clamp(-62, 62)  # rng in [2^e, 2^(e+1)) (clamped)
    fs = torch.ldexp(torch.ones_like(rng), -2 * e)
    tiny = 2.0**-100
    ok = (rng * rng >= tiny) & (c1 >= tiny) & (c2 >= tiny) & (span <= MAX_SPAN_RATIO * torch.sqrt(c2))
    return torch.where(ok, fs, torch.full_like(fs, float("nan"))).to(torch.float32)


def _prepare(
    xf: torch.Tensor,
    yf: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    p: sc.SSIMParams,
    in_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """The kernel's inputs and constants: (x, y, (cx, sx, cy, sy, c1, c2, fs), range).

    x, y: the stacks as the kernel reads them (the inputs; for ``deepssim``, their float32 z-scores, computed
    in float64). cx, sx / cy, sy: the per-image centre and scale the kernel applies (z-scores: 0 and 1;
    otherwise each image's minimum and 1), float32; c1, c2: per pair, float32; fs: per pair, the formula's scale
    (:func:`_formula_scale`), float32; range: the pair's data range,
    float64.
    """
    preset = p.preset == "deepssim"
    mx_, sx_, lx, hx = _image_stats(xf, preset)
    my_, sy_, ly, hy = _image_stats(yf, preset)
    if preset:
        scx = torch.where(sx_ > 0, 1.0 / torch.where(sx_ > 0, sx_, 1.0), torch.zeros_like(sx_))
        scy = torch.where(sy_ > 0, 1.0 / torch.where(sy_ > 0, sy_, 1.0), torch.zeros_like(sy_))
        zxh, zxl = ((hx - mx_) * scx)[ix], ((lx - mx_) * scx)[ix]
        zyh, zyl = ((hy - my_) * scy)[iy], ((ly - my_) * scy)[iy]
        first = zxh - zxl
        rng = torch.where(first > 0, first, torch.maximum(zxh, zyh) - torch.minimum(zxl, zyl))
        span = torch.maximum(first, zyh - zyl)
        xf = _zscored(xf, mx_, scx)
        yf = xf if yf is xf else _zscored(yf, my_, scy)
    else:
        fixed = p.data_range if p.data_range is not None else sc.dtype_range(in_dtype)
        scale = sc.kernel_scale(p, in_dtype)
        if scale != 1.0:  # the 64-bit integer range: images and range times a power of two (exact)
            same = yf is xf
            xf = xf.to(torch.float32) * scale
            yf = xf if same else yf.to(torch.float32) * scale
            fixed = fixed * scale
        if fixed is not None:
            rng = torch.full((ix.numel(),), float(fixed), dtype=torch.float64, device=xf.device)
        else:
            rng = torch.maximum(hx[ix], hy[iy]) - torch.minimum(lx[ix], ly[iy])
        span = torch.maximum(hx[ix] - lx[ix], hy[iy] - ly[iy]).to(torch.float64) * scale
    c1d, c2d = (p.k1 * rng) ** 2, (p.k2 * rng) ** 2
    c1, c2, fs = c1d.to(torch.float32), c2d.to(torch.float32), _formula_scale(rng, c1d, c2d, span)
    one = torch.ones(xf.shape[0], dtype=torch.float32, device=xf.device)
    one_y = torch.ones(yf.shape[0], dtype=torch.float32, device=yf.device)
    if preset:  # z-scores: centred already
        cxv = torch.zeros(xf.shape[0], dtype=torch.float32, device=xf.device)
        cyv = torch.zeros(yf.shape[0], dtype=torch.float32, device=yf.device)
    else:
        # every image centred on its minimum: a large offset against a small spread then never enters the
        # window sums (whose squares would lose the spread to float32 rounding); the means get it back
        scale = sc.kernel_scale(p, in_dtype)
        cxv = (lx * scale).to(torch.float32)
        cyv = (ly * scale).to(torch.float32)
    return xf, yf, (cxv, one, cyv, one_y, c1, c2, fs), rng


class _Geometry:
    """Sizes of one launch: spatial shape, window, output shape, tile and tiles per plane."""

    def __init__(self, spatial: tuple[int, ...], p: sc.SSIMParams, variant: str, block: tuple[int, int] | None):
        self.K = K = p.win_size
        if p.spatial_dims == 3:
            self.D, self.H, self.W = spatial
            self.KZ = K
        else:
            (self.H, self.W), self.D, self.KZ = spatial, 1, 1
        self.Do, self.Ho, self.Wo = self.D - self.KZ + 1, self.H - K + 1, self.W - K + 1
        self.separable = variant == "separable"
        if self.separable:
            br, bc = block or default_separable_block(K)
            if br & (br - 1) or bc & (bc - 1) or br < K or bc < K:
                raise ValueError(f"separable block {(br, bc)}: both sides must be powers of two and at least {K}")
            self.tiles_w = triton.cdiv(self.Wo, bc - K + 1)
            tiles_h = triton.cdiv(self.Ho, br - K + 1)
        else:
            br, bc = block or (16, 32)
            if br < 1 or bc < 1 or br & (br - 1) or bc & (bc - 1):
                raise ValueError(f"direct block {(br, bc)}: both sides must be powers of two (output rows x columns)")
            self.tiles_w = triton.cdiv(self.Wo, bc)
            tiles_h = triton.cdiv(self.Ho, br)
        self.br, self.bc = br, bc
        self.n_tiles = tiles_h * self.tiles_w
        # in-plane offsets (row * W + column, over the tile's rows, some past the image) are int32
        if (self.H + br) * self.W >= 2**31:
            raise ValueError(f"image of spatial shape {spatial}: a plane of {self.H} x {self.W} pixels is too large "
                             f"for the Triton SSIM kernel's int32 in-plane offsets ((H + {br}) x W must stay below "
                             "2^31); use the native backend")


def _launch(g: _Geometry, p: sc.SSIMParams, xf: torch.Tensor, yf: torch.Tensor, ix: torch.Tensor,
            iy: torch.Tensor, consts: tuple[torch.Tensor, ...], *, mode: int = 0, mom_x: torch.Tensor | None = None,
            mom_y: torch.Tensor | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The kernel over the pairs (ix, iy) (one launch, or several for grids past ``MAX_GRID_YZ`` tiles or
    planes); returns the partial sums (P, Do, tiles) (mode 1: unused)."""
    dev = xf.device
    w = torch.tensor(sc.window_weights(p), dtype=torch.float32, device=dev)
    wz = w if g.KZ > 1 else torch.ones(1, dtype=torch.float32, device=dev)  # z taps (one tap of 1 in 2D)
    n_pairs = ix.numel()
    part = torch.empty((n_pairs if mode != 1 else 1, g.Do, g.n_tiles), dtype=torch.float32, device=dev)
    variant = "separable" if g.separable else "direct"
    logger.debug("triton ssim (%s, mode %d): grid %s, block %s, K=%d, KZ=%d", variant, mode,
                 (n_pairs, g.n_tiles, g.Do), (g.br, g.bc), g.K, g.KZ)
    if num_warps is None:
        num_warps = default_num_warps(variant, g.K, g.KZ) if dev.type == "cuda" else 4
    # grid (pairs, tiles, planes); CUDA takes at most MAX_GRID_YZ on axes y and z, so a plane of more tiles
    # (a 2D image past ~10^4 x 10^4 pixels) or a volume of more planes runs in several launches
    for oz0 in range(0, g.Do, MAX_GRID_YZ):
        for tile0 in range(0, g.n_tiles, MAX_GRID_YZ):
            grid = (n_pairs, min(MAX_GRID_YZ, g.n_tiles - tile0), min(MAX_GRID_YZ, g.Do - oz0))
            _launch_one(g, p, grid, xf, yf, ix, iy, consts, w, wz, part, mom_x, mom_y, tile0, oz0, mode, num_warps)
    return part


def _launch_one(g: _Geometry, p: sc.SSIMParams, grid: tuple[int, int, int], xf: torch.Tensor, yf: torch.Tensor,
                ix: torch.Tensor, iy: torch.Tensor, consts: tuple[torch.Tensor, ...], w: torch.Tensor,
                wz: torch.Tensor, part: torch.Tensor, mom_x: torch.Tensor | None, mom_y: torch.Tensor | None,
                tile0: int, oz0: int, mode: int, num_warps: int) -> None:
    cx, scx, cy, scy, c1, c2, fs = consts
    dummy = part  # mom_x / mom_y when the mode does not use them
    _ssim_kernel[grid](
        xf,
        yf,
        ix,
        iy,
        cx,
        scx,
        cy,
        scy,
        c1,
        c2,
        fs,
        w,
        wz,
        part,
        dummy if mom_x is None else mom_x,
        dummy if mom_y is None else mom_y,
        g.H,
        g.W,
        g.Ho,
        g.Wo,
        g.tiles_w,
        g.n_tiles,
        g.Do,
        tile0,
        oz0,
        g.H * g.W,
        g.D * g.H * g.W,
        float(p.cov_norm),
        K=g.K,
        KZ=g.KZ,
        BR=g.br,
        BC=g.bc,
        SEPARABLE=g.separable,
        MODE=mode,
        num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def _mean_ssim(part: torch.Tensor, g: _Geometry, rng: torch.Tensor) -> torch.Tensor:
    """Per-pair mean SSIM (float64) from the programs' partial sums; a pair of range 0 scores 1."""
    res = part.to(torch.float64).sum(dim=(1, 2)) / (float(g.Do) * g.Ho * g.Wo)
    return torch.where(rng > 0, res, torch.ones_like(res))


def _kernel_inputs(xf: torch.Tensor, yf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both stacks in one kernel dtype (float16, bfloat16 or float32), contiguous."""
    if xf.dtype not in _KERNEL_DTYPES:
        xf = xf.to(torch.float32)
    if yf.dtype not in _KERNEL_DTYPES:
        yf = yf.to(torch.float32)
    if yf.dtype != xf.dtype:
        yf = yf.to(xf.dtype)
    return xf.contiguous(), yf.contiguous()


def resolve_variant(variant: str | None) -> str:
    """The kernel variant: as given, else ``DEEPSSIM_FAST_TRITON_SSIM``, else ``"separable"``."""
    source = "variant"
    if variant is None:
        raw = os.environ.get("DEEPSSIM_FAST_TRITON_SSIM", "")
        variant = raw.strip().lower() or "separable"
        source = f"$DEEPSSIM_FAST_TRITON_SSIM={raw!r}"  # (the caller passed no variant: name what it set)
    if variant not in VARIANTS:
        raise ValueError(f"{source}: expected one of {VARIANTS}" + (f", got {variant!r}" if source == "variant"
                                                                     else " (or unset: separable)"))
    return variant


def ssim_pairs(
    xf: torch.Tensor,
    yf: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    p: sc.SSIMParams,
    *,
    in_dtype: torch.dtype | None = None,
    block: tuple[int, int] | None = None,
    variant: str | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Mean SSIM (float64, shape (P,)) of the pairs (xf[ix[k]], yf[iy[k]]).

    xf: (Nx, *spatial), yf: (Ny, *spatial) on one device (CUDA, or CPU under TRITON_INTERPRET=1), finite
    (the caller checks). ix, iy: int64 index tensors of length P. ``p`` holds the resolved options
    (``_ssim_common.resolve_params``); ``in_dtype`` is the caller's dtype (integer dtypes set the range).
    ``variant``: ``"separable"`` (z, x, y passes on a tile in registers, ``block`` = its input rows x
    columns, powers of two, each at least K) or ``"direct"`` (every window tap per output pixel, ``block``
    = output rows x columns); both give the same values to fp32 rounding. None: the environment variable
    ``DEEPSSIM_FAST_TRITON_SSIM``, else ``"separable"``.
    """
    variant = resolve_variant(variant)
    in_dtype = in_dtype or xf.dtype
    dev = xf.device
    xf, yf = _kernel_inputs(xf, yf)
    ix = ix.to(device=dev, dtype=torch.int64).contiguous()
    iy = iy.to(device=dev, dtype=torch.int64).contiguous()
    if ix.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=dev)
    g = _Geometry(tuple(xf.shape[1:]), p, variant, block)
    xf, yf, consts, rng = _prepare(xf, yf, ix, iy, p, in_dtype)
    part = _launch(g, p, xf, yf, ix, iy, consts, num_warps=num_warps)
    return _mean_ssim(part, g, rng)


def ssim_matrix_block(
    xa: torch.Tensor,
    xb: torch.Tensor,
    p: sc.SSIMParams,
    *,
    in_dtype: torch.dtype | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SSIM (float64, (Na, Nb)) of every pair (xa[i], xb[j]) with per-image moment reuse.

    Each image's windowed mean and variance maps are computed once (separable kernel, mode 1: 2 x the
    output size in float32 per image); a pair then runs only the means and the covariance through the
    passes (mode 2), reading both variances from the maps. Same values as :func:`ssim_pairs` to fp32
    rounding.
    """
    in_dtype = in_dtype or xa.dtype
    dev = xa.device
    xa, xb = _kernel_inputs(xa, xb)
    na, nb = xa.shape[0], xb.shape[0]
    if na == 0 or nb == 0:
        return torch.zeros((na, nb), dtype=torch.float64, device=dev)
    g = _Geometry(tuple(xa.shape[1:]), p, "separable", block)
    ia = torch.arange(na, device=dev).repeat_interleave(nb)
    ib = torch.arange(nb, device=dev).repeat(na)
    xa, xb, (cx, scx, cy, scy, c1, c2, fs), rng = _prepare(xa, xb, ia, ib, p, in_dtype)
    maps = []
    for imgs, c, sc_ in ((xa, cx, scx), (xb, cy, scy)):
        n = imgs.shape[0]
        mom = torch.empty((n, 2, g.Do, g.Ho, g.Wo), dtype=torch.float32, device=dev)
        idx = torch.arange(n, device=dev)
        zeros = torch.zeros(n, dtype=torch.float32, device=dev)
        _launch(g, p, imgs, imgs, idx, idx, (c, sc_, c, sc_, zeros, zeros, zeros), mode=1, mom_x=mom)
        maps.append(mom)
    part = _launch(g, p, xa, xb, ia, ib, (cx, scx, cy, scy, c1, c2, fs), mode=2, mom_x=maps[0], mom_y=maps[1])
    return _mean_ssim(part, g, rng).reshape(na, nb)


def default_num_warps(variant: str, K: int, KZ: int) -> int:
    """Warps per program on a GPU. Separable: 8 (a 32 x 64 tile is 8 values per thread and statistic);
    16 for 3D windows wider than 7, whose z pass needs more live values (255 registers at 8 warps on sm_90,
    128 at 16: see ``bench/kernel_resources.py``). Direct: 4."""
    if variant != "separable":
        return 4
    return 16 if KZ > 1 and K > 7 else 8


def default_separable_block(K: int) -> tuple[int, int]:
    """Input tile (rows, columns) of the separable kernel: at least 32 x 64, and at least 2K per side."""
    r = 1 << max(5, (2 * K - 1).bit_length())
    c = 1 << max(6, (2 * K - 1).bit_length())
    return r, c

