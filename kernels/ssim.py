"""Fused windowed SSIM in Triton: one launch per batch of pairs, 2D and 3D, uniform or Gaussian window.

Kernel layout: grid = (pairs, output tiles of BH x BW in a plane, output planes). Each program loads the
window around its tile straight from both images (halo included, masked), forms the five moments in fp32,
evaluates the SSIM formula and reduces its tile of the SSIM map to one partial sum: no image-sized
intermediate map is ever written. The partial sums (one float per program) are added in fp64 by the
launcher.

Exactness: every tap is taken as a difference from the image value at the output pixel's window centre,
d = (x - x_centre) * scale, so flat regions (MRI background or tissue) give small numbers and
E[d^2] - E[d]^2 does not cancel in fp32 (the separable window weight of a tap is w[dz] * w[dy] * w[dx]).
The window is applied as the outer product of the 1D taps per output pixel (no shared row sums between
output rows), which trades FLOPs for a kernel without shared-memory staging.

Inputs: float16, bfloat16 or float32 (other dtypes are converted to float32 by the launcher); arithmetic is
fp32. Runs compiled on NVIDIA GPUs and under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from deepssim_fast import _ssim_common as sc

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _ssim_tile_kernel(
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
    w_ptr,
    wz_ptr,
    part_ptr,
    H,
    W,
    Ho,
    Wo,
    tiles_w,
    n_tiles,
    n_planes,
    plane_stride,
    image_stride,
    cov_norm,
    K: tl.constexpr,
    KZ: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    pair = tl.program_id(0)
    tile = tl.program_id(1)
    oz = tl.program_id(2)
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
    th = tile // tiles_w
    tw = tile % tiles_w
    rows = th * BH + tl.arange(0, BH)[:, None]
    cols = tw * BW + tl.arange(0, BW)[None, :]
    valid = (rows < Ho) & (cols < Wo)
    h: tl.constexpr = (K - 1) // 2
    hz: tl.constexpr = (KZ - 1) // 2
    centre = (oz + hz).to(tl.int64) * plane_stride + (rows + h) * W + (cols + h)
    xc = tl.load(xb + centre, mask=valid, other=0.0).to(tl.float32)
    yc = tl.load(yb + centre, mask=valid, other=0.0).to(tl.float32)
    ea = tl.zeros((BH, BW), dtype=tl.float32)
    eb = tl.zeros((BH, BW), dtype=tl.float32)
    eaa = tl.zeros((BH, BW), dtype=tl.float32)
    ebb = tl.zeros((BH, BW), dtype=tl.float32)
    eab = tl.zeros((BH, BW), dtype=tl.float32)
    for dz in range(KZ):
        wz = tl.load(wz_ptr + dz)
        zoff = (oz + dz).to(tl.int64) * plane_stride
        for dy in range(K):
            wzy = wz * tl.load(w_ptr + dy)
            roff = zoff + (rows + dy) * W
            for dx in tl.static_range(K):
                wt = wzy * tl.load(w_ptr + dx)
                off = roff + (cols + dx)
                xv = tl.load(xb + off, mask=valid, other=0.0).to(tl.float32)
                yv = tl.load(yb + off, mask=valid, other=0.0).to(tl.float32)
                da = (xv - xc) * sx
                db = (yv - yc) * sy
                ta = wt * da
                tb = wt * db
                ea += ta
                eb += tb
                eaa += ta * da
                ebb += tb * db
                eab += ta * db
    ux = (xc - cx) * sx + ea
    uy = (yc - cy) * sy + eb
    vx = cov_norm * (eaa - ea * ea)
    vy = cov_norm * (ebb - eb * eb)
    vxy = cov_norm * (eab - ea * eb)
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    s = tl.where(valid, num / tl.where(valid, den, 1.0), 0.0)
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


def _pair_constants(
    xf: torch.Tensor,
    yf: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    p: sc.SSIMParams,
    in_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """Per-image centre/scale and per-pair C1, C2 (float32) and the pair's data range (float64)."""
    preset = p.preset == "deepssim"
    mx_, sx_, lx, hx = _image_stats(xf, preset)
    my_, sy_, ly, hy = _image_stats(yf, preset)
    if preset:
        scx = torch.where(sx_ > 0, 1.0 / torch.where(sx_ > 0, sx_, 1.0), torch.zeros_like(sx_))
        scy = torch.where(sy_ > 0, 1.0 / torch.where(sy_ > 0, sy_, 1.0), torch.zeros_like(sy_))
        cx, cy = mx_, my_
        zxh, zxl = ((hx - mx_) * scx)[ix], ((lx - mx_) * scx)[ix]
        zyh, zyl = ((hy - my_) * scy)[iy], ((ly - my_) * scy)[iy]
        first = zxh - zxl
        rng = torch.where(first > 0, first, torch.maximum(zxh, zyh) - torch.minimum(zxl, zyl))
    else:
        scx, scy = torch.ones_like(mx_), torch.ones_like(my_)
        cx, cy = torch.zeros_like(mx_), torch.zeros_like(my_)
        fixed = p.data_range if p.data_range is not None else sc.dtype_range(in_dtype)
        if fixed is not None:
            rng = torch.full((ix.numel(),), float(fixed), dtype=torch.float64, device=xf.device)
        else:
            rng = torch.maximum(hx[ix], hy[iy]) - torch.minimum(lx[ix], ly[iy])
    c1 = ((p.k1 * rng) ** 2).to(torch.float32)
    c2 = ((p.k2 * rng) ** 2).to(torch.float32)
    f32 = torch.float32
    return cx.to(f32), scx.to(f32), cy.to(f32), scy.to(f32), c1, c2, rng


def ssim_pairs(
    xf: torch.Tensor,
    yf: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    p: sc.SSIMParams,
    *,
    in_dtype: torch.dtype | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Mean SSIM (float64, shape (P,)) of the pairs (xf[ix[k]], yf[iy[k]]).

    xf: (Nx, *spatial), yf: (Ny, *spatial) on one device (CUDA, or CPU under TRITON_INTERPRET=1), finite
    (the caller checks). ix, iy: int64 index tensors of length P. ``p`` holds the resolved options
    (``_ssim_common.resolve_params``); ``in_dtype`` is the caller's dtype (integer dtypes set the range).
    """
    in_dtype = in_dtype or xf.dtype
    dev = xf.device
    if xf.dtype not in _KERNEL_DTYPES:
        xf = xf.to(torch.float32)
    if yf.dtype not in _KERNEL_DTYPES:
        yf = yf.to(torch.float32)
    if yf.dtype != xf.dtype:
        yf = yf.to(xf.dtype)
    xf, yf = xf.contiguous(), yf.contiguous()
    ix = ix.to(device=dev, dtype=torch.int64).contiguous()
    iy = iy.to(device=dev, dtype=torch.int64).contiguous()
    n_pairs = ix.numel()
    if n_pairs == 0:
        return torch.zeros(0, dtype=torch.float64, device=dev)
    spatial = tuple(xf.shape[1:])
    K = p.win_size
    if p.spatial_dims == 3:
        D, H, W = spatial
        KZ = K
    else:
        (H, W), D, KZ = spatial, 1, 1
    Do, Ho, Wo = D - KZ + 1, H - K + 1, W - K + 1
    BH, BW = block or (16, 32)
    tiles_h, tiles_w = triton.cdiv(Ho, BH), triton.cdiv(Wo, BW)
    n_tiles = tiles_h * tiles_w
    if n_tiles > 65535 or Do > 65535:
        raise ValueError(f"image of spatial shape {spatial} is too large for one launch ({n_tiles} tiles)")
    cx, scx, cy, scy, c1, c2, rng = _pair_constants(xf, yf, ix, iy, p, in_dtype)
    w = torch.tensor(sc.window_weights(p), dtype=torch.float32, device=dev)
    wz = w if KZ > 1 else torch.ones(1, dtype=torch.float32, device=dev)  # z taps (one tap of 1 in 2D)
    part = torch.empty((n_pairs, Do, n_tiles), dtype=torch.float32, device=dev)
    grid = (n_pairs, n_tiles, Do)
    logger.debug("triton ssim: grid %s, tile %dx%d, K=%d, KZ=%d", grid, BH, BW, K, KZ)
    _ssim_tile_kernel[grid](
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
        w,
        wz,
        part,
        H,
        W,
        Ho,
        Wo,
        tiles_w,
        n_tiles,
        Do,
        H * W,
        D * H * W,
        float(p.cov_norm),
        K=K,
        KZ=KZ,
        BH=BH,
        BW=BW,
    )
    count = float(Do) * Ho * Wo
    res = part.to(torch.float64).sum(dim=(1, 2)) / count
    return torch.where(rng > 0, res, torch.ones_like(res))


def flops_per_pixel(p: sc.SSIMParams) -> float:
    """Arithmetic of this kernel per output pixel (for roofline fractions): ~11 FLOP per window tap."""
    return 11.0 * math.pow(p.win_size, p.spatial_dims) + 20.0
