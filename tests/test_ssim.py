"""SSIM engine: native and torch backends against scikit-image (float64 oracle) and reference.ssim_reference.

Triton runs interpreted in tests/test_ssim_triton.py (a subprocess, so this process never runs interpreted).
"""

from __future__ import annotations

import fractions
import importlib
import logging
import re
import sys
import zlib

import numpy as np
import pytest
from _checkout import assert_ok, run_python
import torch

from deepssim_fast import _native, data
from deepssim_fast.reference import ssim_reference
from deepssim_fast.ssim import ssim, ssim_matrix

skm = pytest.importorskip("skimage.metrics")

TOL = 1e-5
BACKENDS = ["native", "torch"]
GAUSS = dict(window="gaussian", sample_covariance=False)


def assert_close(got, want, tol=TOL, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = np.argwhere(~(err <= tol))
    if bad.size:
        first = [(tuple(int(i) for i in b), float(got[tuple(b)]), float(want[tuple(b)])) for b in bad[:5]]
        raise AssertionError(
            f"{what}: {len(bad)} of {err.size} differ by > {tol} (max {err.max():.3g}); "
            f"first (index, got, want): {first}"
        )


def skimage_ssim(x, y, spatial_dims=2, window="uniform", preset=None, data_range=None):
    """The oracle: scikit-image in float64, pair by pair, with our documented data-range convention."""
    x = np.asarray(x)
    y = np.asarray(y)
    int_range = {np.uint8: 255.0, np.uint16: 65535.0}.get(x.dtype.type)
    batch = x.shape[: x.ndim - spatial_dims]
    xf = x.reshape(-1, *x.shape[x.ndim - spatial_dims :]).astype(np.float64)
    yf = y.reshape(-1, *y.shape[y.ndim - spatial_dims :]).astype(np.float64)
    out = []
    for a, b in zip(xf, yf, strict=True):
        if preset == "deepssim":
            a = (a - a.mean()) / a.std()
            b = (b - b.mean()) / b.std()
            dr = a.max() - a.min()
        elif data_range is not None:
            dr = data_range
        elif int_range is not None:
            dr = int_range
        else:
            dr = max(a.max(), b.max()) - min(a.min(), b.min())
        kw = (
            dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
            if window == "gaussian"
            else {}
        )
        out.append(skm.structural_similarity(a, b, data_range=dr, **kw))
    return np.array(out).reshape(batch)


def random_pair(rng, shape, dtype):
    if dtype in (np.uint8, np.uint16):
        hi = np.iinfo(dtype).max
        x = rng.integers(0, hi, size=shape, endpoint=True).astype(dtype)
        noise = rng.integers(-hi // 8, hi // 8, size=shape)
        y = np.clip(x.astype(np.int64) + noise, 0, hi).astype(dtype)
        return x, y
    x = rng.standard_normal(shape)
    y = x + 0.5 * rng.standard_normal(shape)
    return x.astype(dtype), y.astype(dtype)


@pytest.fixture(scope="module")
def mri_slices():
    """Real 2D slices: MNI152 and the dipy T1 slice, centre-fit to 96x112."""
    sl = [s.array for s in data.real_slices((96, 112), datasets=["mni152"])][::25]
    sl.append(data.center_fit(data.load_volume("t1_coronal_slice").array, (96, 112)))
    return np.stack(sl).astype(np.float32)


def variants(x, rng):
    """Flipped, shifted, noisy, contrast-changed and neighbouring copies of a stack of slices."""
    return {
        "flipped": x[:, ::-1, :].copy(),
        "shifted": np.roll(x, (3, -2), axis=(1, 2)),
        "noisy": (x + rng.normal(0, 0.05 * x.std(), x.shape)).astype(np.float32),
        "contrast": (1.7 * x + 0.2 * x.max()).astype(np.float32),
        "gamma": (x.max() * (np.clip(x, 0, None) / x.max()) ** 0.7).astype(np.float32),
        "neighbour": np.roll(x, 1, axis=0),
    }


# ---------------------------------------------------------------- random inputs, odd shapes, dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 255, 257)], ids=["7x9", "255x257"])
def test_random_vs_skimage(backend, window, dtype, shape):
    if window == "gaussian" and shape[1] < 11:
        shape = (3, 11, 13)  # the 11-tap Gaussian needs sides >= 11
    rng = np.random.default_rng(zlib.crc32(repr((backend, window, str(dtype), shape)).encode()))  # stable per case
    x, y = random_pair(rng, shape, dtype)
    kw = GAUSS if window == "gaussian" else {}
    got = ssim(x, y, spatial_dims=2, backend=backend, **kw)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == shape[:1]
    want = skimage_ssim(
        x.astype(np.float64) if dtype == np.float16 else x,
        y.astype(np.float64) if dtype == np.float16 else y,
        window=window,
    )
    assert_close(got, want, what=f"{backend} {window} {dtype.__name__}")
    assert_close(got, ssim_reference(x, y, spatial_dims=2, **kw), what="vs reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_3d_real_volume_vs_skimage(backend, window):
    vol = data.load_volume("anatomical").array  # 33 x 41 x 25, a real T1
    rng = np.random.default_rng(3)
    y = np.stack(
        [
            vol[::-1].copy(),
            np.roll(vol, 2, axis=1),
            (vol + rng.normal(0, 0.05 * vol.std(), vol.shape)).astype(np.float32),
        ]
    )
    x = np.broadcast_to(vol, y.shape)
    kw = GAUSS if window == "gaussian" else {}
    got = ssim(x, y, spatial_dims=3, backend=backend, **kw)
    assert got.shape == (3,)
    assert_close(got, skimage_ssim(np.ascontiguousarray(x), y, spatial_dims=3, window=window), what="3D")
    assert_close(got, ssim_reference(x, y, spatial_dims=3, **kw), what="3D vs reference")


# ---------------------------------------------------------------- real MRI


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["uniform", "gaussian", "deepssim"])
def test_real_slices_vs_skimage(mri_slices, backend, mode):
    rng = np.random.default_rng(11)
    kw = GAUSS if mode == "gaussian" else (dict(preset="deepssim") if mode == "deepssim" else {})
    for name, y in variants(mri_slices, rng).items():
        got = ssim(mri_slices, y, spatial_dims=2, backend=backend, **kw)
        want = skimage_ssim(
            mri_slices,
            y,
            window="gaussian" if mode == "gaussian" else "uniform",
            preset="deepssim" if mode == "deepssim" else None,
        )
        assert_close(got, want, what=f"{backend} {mode} {name}")


def test_real_256_slices_native_vs_skimage():
    """Full-size 256x256 slices (the benchmark case): MNI152 neighbours and the dipy T1 slice."""
    sl = [s.array for s in data.real_slices((256, 256), datasets=["mni152"])][::40]
    x = np.stack(sl[:-1])
    y = np.stack(sl[1:])
    assert_close(ssim(x, y, spatial_dims=2), skimage_ssim(x, y), what="256 uniform")
    assert_close(
        ssim(x, y, spatial_dims=2, preset="deepssim"),
        skimage_ssim(x, y, preset="deepssim"),
        what="256 deepssim",
    )


def test_deepssim_preset_is_asymmetric_like_the_reference(mri_slices):
    x, y = mri_slices[:3], 0.5 * mri_slices[3:6] ** 1.2
    ab = ssim(x, y, spatial_dims=2, preset="deepssim")
    ba = ssim(y, x, spatial_dims=2, preset="deepssim")
    assert_close(ab, skimage_ssim(x, y, preset="deepssim"), what="ab")
    assert_close(ba, skimage_ssim(y, x, preset="deepssim"), what="ba")
    assert np.abs(ab - ba).max() > 1e-4  # the first image's range is used, on purpose


# ---------------------------------------------------------------- SIMD levels and threads


def test_scalar_and_avx2_paths_agree(mri_slices):
    x, y = mri_slices, np.roll(mri_slices, 2, axis=2)
    vol = data.load_volume("anatomical").array
    want2 = skimage_ssim(x, y)
    want3 = skimage_ssim(vol[None], vol[None, ::-1], spatial_dims=3)
    got = {}
    try:
        for level in ("scalar", "auto"):
            _native.set_simd_level(level)
            got[level] = (
                ssim(x, y, spatial_dims=2),
                ssim(x, y, spatial_dims=2, **GAUSS),
                ssim(vol, vol[::-1], spatial_dims=3),
                _native.simd_level(),
            )
    finally:
        _native.set_simd_level("auto")
    assert got["scalar"][3] == "scalar"
    for level in ("scalar", "auto"):
        assert_close(got[level][0], want2, what=f"{level} 2D")
        assert_close(got[level][1], skimage_ssim(x, y, window="gaussian"), what=f"{level} 2D gaussian")
        assert_close(got[level][2], want3[0], what=f"{level} 3D")


def test_thread_counts_agree(mri_slices):
    x, y = mri_slices, mri_slices[::-1]
    try:
        _native.set_num_threads(1)
        assert _native.num_threads() == 1
        one = ssim(x, y, spatial_dims=2)
        one_m = ssim_matrix(x[:3], y[:4], progress=False)
    finally:
        _native.set_num_threads(0)
    np.testing.assert_array_equal(one, ssim(x, y, spatial_dims=2))
    np.testing.assert_array_equal(one_m, ssim_matrix(x[:3], y[:4], progress=False))


# ---------------------------------------------------------------- batch shapes, broadcasting, array kinds


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_shapes_and_broadcasting(mri_slices, backend):
    x = mri_slices[:6].reshape(2, 3, 96, 112)
    y = np.roll(x, 4, axis=-1)
    got = ssim(x, y, spatial_dims=2, backend=backend)
    assert got.shape == (2, 3)
    assert_close(got, skimage_ssim(x, y), what="(2,3) batch")
    # one-vs-many: (H, W) against (B, H, W)
    one = ssim(mri_slices[0], mri_slices, spatial_dims=2, backend=backend)
    assert one.shape == (len(mri_slices),)
    assert_close(
        one, skimage_ssim(np.broadcast_to(mri_slices[0], mri_slices.shape), mri_slices), what="1-vs-many"
    )
    assert abs(float(one[0]) - 1.0) < 1e-6
    # (B, 1, H, W) against (1, C, H, W) -> (B, C)
    grid = ssim(mri_slices[:3, None], mri_slices[None, 3:7], spatial_dims=2, backend=backend)
    assert grid.shape == (3, 4)
    assert_close(
        grid,
        skimage_ssim(
            np.broadcast_to(mri_slices[:3, None], (3, 4, 96, 112)),
            np.broadcast_to(mri_slices[None, 3:7], (3, 4, 96, 112)),
        ),
        what="grid",
    )


def test_single_pair_is_0d_and_torch_in_torch_out(mri_slices):
    s = ssim(mri_slices[0], mri_slices[1])
    assert isinstance(s, np.ndarray) and s.shape == () and s.dtype == np.float32
    t = ssim(torch.from_numpy(mri_slices[:2]), torch.from_numpy(mri_slices[2:4]), spatial_dims=2)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2,)
    assert_close(t.numpy(), skimage_ssim(mri_slices[:2], mri_slices[2:4]), what="torch input")
    bf = ssim(
        torch.from_numpy(mri_slices[:2]).bfloat16(),
        torch.from_numpy(mri_slices[2:4]).bfloat16(),
        spatial_dims=2,
    )
    xb = torch.from_numpy(mri_slices[:2]).bfloat16().double().numpy()
    yb = torch.from_numpy(mri_slices[2:4]).bfloat16().double().numpy()
    assert_close(bf.numpy(), skimage_ssim(xb, yb), what="bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_strided_inputs(mri_slices, backend):
    x = mri_slices.transpose(0, 2, 1)  # non-contiguous view
    y = mri_slices[:, ::2, ::-1].repeat(2, axis=1)[:, :96].transpose(0, 2, 1)
    got = ssim(x, y, spatial_dims=2, backend=backend)
    assert_close(got, skimage_ssim(np.ascontiguousarray(x), np.ascontiguousarray(y)), what="strided")
    tx = torch.from_numpy(mri_slices)[:, 1::2, ::3]
    ty = torch.from_numpy(mri_slices[::-1].copy())[:, 1::2, ::3]
    assert_close(
        ssim(tx, ty, spatial_dims=2, backend=backend).numpy(),
        skimage_ssim(tx.contiguous().numpy(), ty.contiguous().numpy()),
        what="torch strided",
    )


def test_training_call_shape_and_dtype():
    """What the training engineer calls each step: (B, 128, 128) float32 torch, preset deepssim."""
    sl = [s.array for s in data.real_slices((128, 128), datasets=["mni152"])][::12][:8]
    x = torch.from_numpy(np.stack(sl))
    y = torch.flip(x, dims=(-1,))
    got = ssim(x, y, spatial_dims=2, preset="deepssim")
    assert got.shape == (len(sl),) and got.dtype == torch.float32
    assert_close(got.numpy(), skimage_ssim(x.numpy(), y.numpy(), preset="deepssim"), what="training call")


# ---------------------------------------------------------------- constant images, empty batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_constant_images_score_one(backend):
    c = np.full((2, 16, 16), 3.5, dtype=np.float32)
    for kw in ({}, dict(preset="deepssim"), GAUSS):
        got = ssim(c, c.copy(), spatial_dims=2, backend=backend, **kw)
        np.testing.assert_array_equal(got, np.ones(2, dtype=np.float32))
    z = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    assert float(ssim(z, z, spatial_dims=3, backend=backend)[0]) == 1.0
    # different constants with an explicit range: defined and finite, equal to scikit-image
    a, b = np.zeros((16, 16)), np.ones((16, 16))
    assert_close(
        ssim(a, b, data_range=2.0, backend=backend),
        skm.structural_similarity(a, b, data_range=2.0),
        what="constants",
    )
    # data_range=None: the pair's own range (max - min over both = 1), as scikit-image given that range
    assert_close(ssim(a, b, backend=backend), skm.structural_similarity(a, b, data_range=1.0),
                 what="constants, pair range")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    e = np.zeros((0, 9, 9), dtype=np.float32)
    got = ssim(e, e, spatial_dims=2, backend=backend)
    assert got.shape == (0,) and got.dtype == np.float32
    got = ssim(
        np.zeros((2, 0, 9, 9), np.float32),
        np.zeros((2, 0, 9, 9), np.float32),
        spatial_dims=2,
        backend=backend,
    )
    assert got.shape == (2, 0)
    m = ssim_matrix(np.zeros((0, 9, 9), np.float32), np.zeros((4, 9, 9), np.float32), progress=False)
    assert m.shape == (0, 4) and m.dtype == np.float32


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_names_the_pair(backend, bad):
    x = np.random.default_rng(0).random((2, 3, 12, 12)).astype(np.float32)
    y = x.copy()
    y[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match=r"y has NaN or Inf values at pair index \(1, 2\)"):
        ssim(x, y, spatial_dims=2, backend=backend)
    x[0, 1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"x has NaN or Inf values at pair index \(0, 1\)"):
        ssim(x, y, spatial_dims=2, backend=backend)
    with pytest.raises(ValueError, match=r"^A\[1\] has NaN or Inf values$"):  # an image of A, not a pair
        ssim_matrix(x[0], y[0, :2], progress=False, backend=backend)
    with pytest.raises(ValueError, match=r"^x has NaN or Inf values$"):  # one image against a batch: no index
        ssim(x[0, 1], y[1, :2], spatial_dims=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "gaussian", "3d", "float64-offset"])
def test_matrix_nan_inf_names_the_image_of_A_or_B_in_any_tile(monkeypatch, backend, kind):
    """ssim_matrix runs in tiles (here of 3 images of A by 3 of B); a NaN/Inf image is named by its index in A
    or B, not by its position in its tile (A[7] was reported as (1,), B[5] as (2,)). Covers the native
    moment-reuse blocks (uniform, Gaussian), its pair kernel (3D), the float64 rows of images float32 cannot
    hold (offset by 1e5) and the torch backend."""
    mod = _ssim_module()
    shape, kw = {"uniform": ((12, 13), {}), "gaussian": ((12, 13), GAUSS), "3d": ((7, 8, 9), dict(spatial_dims=3)),
                 "float64-offset": ((12, 13), {})}[kind]
    monkeypatch.setattr(mod, "_MATRIX_TILE_BYTES", 3 * 2 * 16 * int(np.prod(shape)))  # native: 3 images
    monkeypatch.setattr(mod, "_MATRIX_TILE_IMAGES", 3)  # torch, Triton
    rng = np.random.default_rng(35)
    A, B = rng.random((8, *shape)), rng.random((7, *shape))
    if kind == "float64-offset":
        A[::2] += 1e5
        B[1::2] += 1e5
    else:
        A, B = A.astype(np.float32), B.astype(np.float32)
    M = ssim_matrix(A, B, progress=False, backend=backend, **kw)
    assert_close(M, ssim_reference(A[:, None], B[None], **{"spatial_dims": 2, **kw}), what="finite inputs")
    for name, bad, k in (("A", np.nan, 7), ("A", -np.inf, 4), ("B", np.inf, 5), ("B", np.nan, 1)):
        a, b = A.copy(), B.copy()
        (a if name == "A" else b)[k].flat[17] = bad
        msg = rf"^{name}\[{k}\] has NaN or Inf values$"
        with pytest.raises(ValueError, match=msg):
            ssim_matrix(a, b, progress=False, backend=backend, **kw)


def test_bad_shapes_and_options():
    a = np.zeros((4, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"\(4, 16, 16\) and \(4, 16, 17\)"):
        ssim(a, np.zeros((4, 16, 17), np.float32), spatial_dims=2)
    with pytest.raises(ValueError, match=r"\(4, 16, 16\) and \(3, 16, 16\)"):
        ssim(a, np.zeros((3, 16, 16), np.float32), spatial_dims=2)
    with pytest.raises(ValueError, match="smaller than the 7-wide uniform window"):
        ssim(np.zeros((6, 20)), np.zeros((6, 20)))
    with pytest.raises(ValueError, match="smaller than the 11-wide gaussian window"):
        ssim(np.zeros((10, 20)), np.zeros((10, 20)), window="gaussian")
    with pytest.raises(ValueError, match="win_size must be odd"):
        ssim(a, a, spatial_dims=2, win_size=8)
    with pytest.raises(ValueError, match="ambiguous"):
        ssim(a, a)
    with pytest.raises(ValueError, match="ambiguous"):
        ssim(a[None], a[None])
    with pytest.raises(ValueError, match="data_range must be a positive"):
        ssim(a, a, spatial_dims=2, data_range=0)
    with pytest.raises(ValueError, match="do not pass data_range"):
        ssim(a, a, spatial_dims=2, data_range=1.0, preset="deepssim")
    with pytest.raises(ValueError, match="preset must be one of"):
        ssim(a, a, spatial_dims=2, preset="nope")
    with pytest.raises(ValueError, match="not supported"):
        ssim(a, a, spatial_dims=2, backend="cuda")
    with pytest.raises(ValueError, match="image shapes differ"):
        ssim_matrix(a, np.zeros((2, 16, 17), np.float32), progress=False)


def test_one_tap_gaussian_window_with_sample_covariance_is_refused_by_name():
    """sigma < 1/7 gives a 1-tap Gaussian window, over which N/(N-1) divides by zero: a ValueError naming
    sigma and the way out (it was a bare ZeroDivisionError); with sample_covariance=False the 1-tap window
    is well defined and equals scikit-image."""
    from skimage.metrics import structural_similarity as sk

    rng = np.random.default_rng(11)
    x, y = random_pair(rng, (2, 16, 17), np.float64)
    for sigma in (0.1, 0.14):
        for f in (lambda **kw: ssim(x, y, spatial_dims=2, **kw),
                  lambda **kw: ssim_reference(x, y, spatial_dims=2, **kw),
                  lambda **kw: ssim_matrix(x, y, progress=False, **kw)):
            with pytest.raises(ValueError, match=rf"sigma={sigma} gives a 1-tap Gaussian window.*"
                               "sample_covariance=False"):
                f(window="gaussian", sigma=sigma)
        got = ssim(x, y, spatial_dims=2, window="gaussian", sigma=sigma, sample_covariance=False)
        want = [sk(a, b, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                   data_range=float(max(a.max(), b.max()) - min(a.min(), b.min())))
                for a, b in zip(x, y, strict=True)]
        assert_close(got, np.array(want), what=f"1-tap gaussian sigma={sigma}")


def test_option_types_are_checked_not_coerced():
    """sample_covariance must be a bool (not a truthy string or 0/1); integer options refuse bools (which
    Python would read as 0 and 1) and floats; ssim_matrix's out= must be a path or an array."""
    rng = np.random.default_rng(3)
    x, y = random_pair(rng, (2, 16, 17), np.float32)
    for bad in ("no", "False", 0, 1, None):
        for f in (ssim, ssim_reference):
            with pytest.raises(TypeError, match=r"sample_covariance must be a bool \(True or False\)"):
                f(x, y, spatial_dims=2, sample_covariance=bad)
        with pytest.raises(TypeError, match="sample_covariance must be a bool"):
            ssim_matrix(x, y, sample_covariance=bad, progress=False)
    for ok in (False, np.bool_(False)):
        assert_close(ssim(x, y, spatial_dims=2, sample_covariance=ok),
                     ssim(x, y, spatial_dims=2, sample_covariance=False), tol=0, what=f"sample_covariance={ok!r}")
    for bad in (True, np.bool_(True), 7.0, "7"):
        with pytest.raises(ValueError, match=r"win_size must be a positive odd integer, got .*" +
                           (r"\(a bool\)" if isinstance(bad, (bool, np.bool_)) else "")):
            ssim(x, y, spatial_dims=2, win_size=bad)
        with pytest.raises(ValueError, match="win_size must be a positive odd integer"):
            ssim_matrix(x, y, win_size=bad, progress=False)
    assert_close(ssim(x, y, spatial_dims=2, win_size=np.int64(5)), ssim(x, y, spatial_dims=2, win_size=5), tol=0,
                 what="numpy integer win_size")
    for bad in (True, 2.0, "2"):
        with pytest.raises(ValueError, match=r"spatial_dims must be 2 or 3 \(an integer\) or None, got"):
            ssim(x, y, spatial_dims=bad)
        with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
            ssim_matrix(x, y, spatial_dims=bad, progress=False)
    assert_close(ssim(x, y, spatial_dims=np.int64(2)), ssim(x, y, spatial_dims=2), tol=0, what="numpy spatial_dims")
    for bad in ([[0.0, 0.0], [0.0, 0.0]], ((0.0, 0.0), (0.0, 0.0)), 3):
        with pytest.raises(TypeError, match=r"out must be None, a path .* or a preallocated float32 array of "
                           r"shape \(2, 2\)"):
            ssim_matrix(x, y, out=bad, progress=False)


def test_inputs_with_too_few_dimensions_are_named_by_shape():
    """Rank-0/1 inputs are not "ambiguous": they have too few dimensions for spatial_dims; the error quotes
    their shapes (and ssim_matrix's the stacks' shapes and what spatial_dims=3 needs)."""
    for x in (np.float32(1.0), np.zeros(16, np.float32)):
        for f in (ssim, ssim_reference):
            with pytest.raises(ValueError, match=re.escape(f"x of shape {x.shape}") + r".* too few dimensions "
                               r"for spatial_dims=2 \(the default\)") as err:
                f(x, x)
            assert "ambiguous" not in str(err.value)
    with pytest.raises(ValueError, match=r"x of shape \(16,\) and y of shape \(16,\): too few dimensions for "
                       r"spatial_dims=2,"):
        ssim(np.zeros(16), np.zeros(16), spatial_dims=2)
    with pytest.raises(ValueError, match=r"too few dimensions for spatial_dims=3, which needs images of at "
                       r"least 3 dimensions \(D, H, W\)"):
        ssim(np.zeros((16, 16)), np.zeros((16, 16)), spatial_dims=3)
    a = np.zeros((2, 16, 16), np.float32)
    msg = (r"ssim_matrix: spatial_dims=3 needs A and B to be stacks of volumes \(N, D, H, W\) \(4 dimensions\), "
           r"got A of shape \(2, 16, 16\) and B of shape \(2, 16, 16\); for stacks of 2D images")
    with pytest.raises(ValueError, match=msg) as err:
        ssim_matrix(a, a, spatial_dims=3, progress=False)
    assert "only 2 dimensions" not in str(err.value)
    with pytest.raises(ValueError, match=r"got A of shape \(2, 16, 16\) and B of shape \(1, 2, 16, 16\)"):
        ssim_matrix(a, a[None], spatial_dims=3, progress=False)


# ---------------------------------------------------------------- ssim_matrix


@pytest.mark.parametrize("mode", ["uniform", "gaussian", "deepssim"])
@pytest.mark.parametrize("box", ["1", "0"], ids=["box-reuse", "separable-reuse"])
def test_matrix_equals_pairwise(monkeypatch, mri_slices, mode, box):
    # 1: uniform windows reuse moments on the running-sum layout; 0: on the separable fp32 kernel
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", box)
    kw = GAUSS if mode == "gaussian" else (dict(preset="deepssim") if mode == "deepssim" else {})
    A = mri_slices[:4]
    B = np.concatenate([np.roll(mri_slices[2:7], 5, axis=1), mri_slices[:1]])
    M = ssim_matrix(A, B, progress=False, **kw)
    assert M.shape == (4, 6) and M.dtype == np.float32
    pair = ssim(A[:, None], B[None], spatial_dims=2, **kw)
    assert_close(M, pair, tol=1e-6, what="matrix vs pairwise")
    want = skimage_ssim(
        np.broadcast_to(A[:, None], (4, 6, 96, 112)),
        np.broadcast_to(B[None], (4, 6, 96, 112)),
        window="gaussian" if mode == "gaussian" else "uniform",
        preset="deepssim" if mode == "deepssim" else None,
    )
    assert_close(M, want, what="matrix vs skimage")
    assert_close(ssim_matrix(A, B, progress=False, backend="torch", **kw), want, what="torch matrix")


@pytest.mark.parametrize("level", ["scalar", "auto"])
def test_box_matrix_blocks_odd_shapes_scales_and_constants(level, mri_slices):
    """2D uniform ssim_matrix (per-image running-sum moments, pairs in 8 x 8 image blocks): partial blocks,
    odd widths (every lane split), extreme value scales, constant images, and real MRI with flips: equal to
    the pair kernel to float32 rounding and to scikit-image."""
    rng = np.random.default_rng(4242)
    try:
        _native.set_simd_level(level)
        for (h, w), na, nb in [((7, 9), 3, 11), ((12, 13), 9, 10), ((23, 41), 17, 5)]:
            A = rng.random((na, h, w)).astype(np.float32)
            B = (A[rng.integers(0, na, nb)] + 0.3 * rng.random((nb, h, w))).astype(np.float32)
            for kw in ({}, dict(data_range=2.0), dict(preset="deepssim")):
                M = ssim_matrix(A, B, progress=False, **kw)
                pair = ssim(A[:, None], B[None], spatial_dims=2, **kw)
                assert_close(M, pair, tol=1e-6, what=f"{level} {h}x{w} {na}x{nb} {kw}")
        for scale in (1e-20, 1e18, 1e30):
            x = (rng.random((3, 20, 27)) * scale).astype(np.float32)
            y = (x + 0.3 * scale * rng.random(x.shape)).astype(np.float32)
            M = ssim_matrix(x, y, progress=False)
            assert np.isfinite(M).all(), f"{level} scale {scale}: {M}"
            assert_close(np.diag(M), _skimage_uniform(x, y, 7), what=f"{level} matrix scale {scale}")
        const = np.stack([np.full((16, 18), 3.0, np.float32), np.full((16, 18), 3.0, np.float32),
                          rng.random((16, 18)).astype(np.float32)])
        M = ssim_matrix(const, const, progress=False)
        assert np.isfinite(M).all() and M[0, 1] == 1.0 and M[1, 0] == 1.0
        assert_close(M, ssim(const[:, None], const[None], spatial_dims=2), tol=1e-6, what="constants")
        x = mri_slices[:6]
        y = np.concatenate([x[::-1, ::-1], x[:3] + 0.05 * x.std() * rng.standard_normal(x[:3].shape)])
        y = y.astype(np.float32)
        M = ssim_matrix(x, y, progress=False, preset="deepssim")
        want = skimage_ssim(np.broadcast_to(x[:, None], (6, 9) + x.shape[1:]),
                            np.broadcast_to(y[None], (6, 9) + x.shape[1:]), preset="deepssim")
        assert_close(M, want, what=f"{level} real MRI, deepssim preset")
    finally:
        _native.set_simd_level("auto")


def test_matrix_out_memmap_and_array(tmp_path, mri_slices):
    A, B = mri_slices[:5], mri_slices[2:]
    want = ssim(A[:, None], B[None], spatial_dims=2)
    path = tmp_path / "m.f32"
    got = ssim_matrix(A, B, out=path, progress=False)
    assert isinstance(got, np.memmap)
    back = np.memmap(path, dtype=np.float32, mode="r", shape=(5, len(B)))
    assert_close(back, want, tol=1e-6, what="memmap")
    npy = ssim_matrix(A, B, out=tmp_path / "m.npy", progress=False)
    assert_close(np.load(tmp_path / "m.npy"), want, tol=1e-6, what="npy")
    assert npy.shape == (5, len(B))
    # an upper-case suffix is a .npy file too (it was written raw, without the header np.load needs)
    ssim_matrix(A, B, out=tmp_path / "M.NPY", progress=False)
    assert_close(np.load(tmp_path / "M.NPY"), want, tol=1e-6, what="NPY")
    out = np.full((5, len(B)), np.nan, dtype=np.float32)  # poisoned
    assert ssim_matrix(A, B, out=out, progress=False) is out
    assert np.isfinite(out).all()
    assert_close(out, want, tol=1e-6, what="array out")
    with pytest.raises(ValueError, match="out has shape"):
        ssim_matrix(A, B, out=np.zeros((2, 2), np.float32), progress=False)


@pytest.mark.parametrize("suffix", [".npy", ".f32"])
def test_matrix_out_path_is_written_atomically(monkeypatch, tmp_path, suffix):
    """A call that fails part-way (NaN in a later tile) leaves an existing out file as it was and a new path
    absent, with no temporary file behind (it used to zero the existing matrix, or leave a zero-filled one);
    a call that succeeds returns the finished file, memory-mapped."""
    mod = importlib.import_module("deepssim_fast.ssim")
    rng = np.random.default_rng(12)
    A, B = random_pair(rng, (3, 16, 17), np.float32)
    read = ((lambda p: np.load(p)) if suffix == ".npy"
            else (lambda p: np.fromfile(p, dtype=np.float32).reshape(3, 3)))
    path = tmp_path / f"m{suffix}"
    got = ssim_matrix(A, B, out=path, progress=False)
    assert isinstance(got, np.memmap) and got.shape == (3, 3)
    want = read(path).copy()
    assert_close(want, ssim(A[:, None], B[None], spatial_dims=2), tol=1e-6, what="matrix file")
    del got
    bad = B.copy()
    bad[2, 5, 5] = np.nan
    # one image per tile: the NaN is met after other tiles were written
    monkeypatch.setattr(mod, "_MATRIX_TILE_BYTES", 2 * 16 * 16 * 17)
    for target in (path, tmp_path / f"new{suffix}"):
        with pytest.raises(ValueError, match=r"B\[2\] has NaN or Inf values"):
            ssim_matrix(A, bad, out=target, progress=False)
    assert np.array_equal(read(path), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{suffix}"]
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path"):
        ssim_matrix(A, B, out=tmp_path, progress=False)


def test_matrix_tiles_and_3d(monkeypatch, mri_slices):
    mod = importlib.import_module("deepssim_fast.ssim")

    A, B = mri_slices[:5], mri_slices[1:]
    whole = ssim_matrix(A, B, progress=False)
    monkeypatch.setattr(mod, "_MATRIX_TILE_BYTES", 2 * 16 * 96 * 112 * 2)  # tiles of 2 images
    np.testing.assert_array_equal(ssim_matrix(A, B, progress=False), whole)
    vol = data.load_volume("anatomical").array
    V = np.stack([vol, vol[::-1], np.roll(vol, 3, axis=2)])
    M3 = ssim_matrix(V, V[:2], spatial_dims=3, progress=False)
    assert_close(M3, ssim(V[:, None], V[None, :2], spatial_dims=3), tol=1e-6, what="3D matrix")
    assert abs(M3[0, 0] - 1.0) < 1e-6


# ---------------------------------------------------------------- native uniform-window running-sum kernel
# 2D uniform windows run on fp64 running (box) sums over segment-interleaved rows (csrc/ssim.cpp,
# box2d_rows_t); DEEPSSIM_FAST_SSIM_BOX=0 switches back to the separable locally-centred fp32 kernel, so
# both stay tested. Widths cover every segment/lane split (Wo = W - K + 1 not a multiple of 4, Wo < 4).


def _skimage_uniform(x, y, win_size, data_range=None, preset=None):
    out = []
    for a, b in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
        if preset == "deepssim":
            a = (a - a.mean()) / a.std()
            b = (b - b.mean()) / b.std()
            dr = a.max() - a.min()
        else:
            dr = data_range if data_range is not None else max(a.max(), b.max()) - min(a.min(), b.min())
        out.append(skm.structural_similarity(a, b, win_size=win_size, data_range=dr))
    return np.array(out)


@pytest.mark.parametrize("level", ["scalar", "avx2", "auto"])
@pytest.mark.parametrize("box", ["1", "0"], ids=["box", "separable"])
@pytest.mark.parametrize("win_size", [3, 7, 9])
def test_box_kernel_odd_widths_vs_skimage(monkeypatch, level, box, win_size):
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", box)
    rng = np.random.default_rng(1000 + win_size)
    try:
        _native.set_simd_level(level)
        for h, w in [(9, 9), (10, 11), (12, 13), (17, 33), (23, 41), (31, 130)]:
            if min(h, w) < win_size:
                continue
            x, y = random_pair(rng, (6, h, w), np.float32)
            for kw in ({}, dict(data_range=12.0), dict(preset="deepssim")):
                want = _skimage_uniform(x, y, win_size, kw.get("data_range"), kw.get("preset"))
                many = ssim(x, y, spatial_dims=2, win_size=win_size, **kw)  # pair-parallel path
                # one pair per call: the row-band (threads inside a pair) path
                one = np.array([ssim(x[i], y[i], win_size=win_size, **kw) for i in range(len(x))])
                assert_close(many, want, what=f"{level} box={box} {h}x{w} K={win_size} {kw} batch")
                assert_close(one, want, what=f"{level} box={box} {h}x{w} K={win_size} {kw} single")
    finally:
        _native.set_simd_level("auto")


@pytest.mark.parametrize("level", ["scalar", "avx2", "auto"])
def test_box_kernel_real_mri_flat_backgrounds(monkeypatch, level, mri_slices):
    """Real MRI with its flat background, offset far from 0 (fp32 ulp 2e-3 there) and z-scored: the running
    sums must not drift. The box and the separable kernel agree and both match scikit-image."""
    rng = np.random.default_rng(21)
    x = mri_slices
    cases = {name: y for name, y in variants(x, rng).items() if name in ("shifted", "noisy", "neighbour")}
    try:
        _native.set_simd_level(level)
        for name, y in cases.items():
            for offset in (0.0, 20000.0):
                xo, yo = (x + offset).astype(np.float32), (y + offset).astype(np.float32)
                for kw in ({}, dict(preset="deepssim")):
                    want = _skimage_uniform(xo, yo, 7, preset=kw.get("preset"))
                    got = {}
                    for box in ("1", "0"):
                        monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", box)
                        got[box] = ssim(xo, yo, spatial_dims=2, **kw)
                        assert_close(got[box], want, what=f"{level} box={box} {name} +{offset} {kw}")
                    assert_close(got["1"], got["0"], tol=2e-6, what=f"{level} box vs separable {name}")
    finally:
        _native.set_simd_level("auto")


@pytest.mark.skipif(_native.detected_simd_level() != "avx512",
                    reason="the two-band AVX-512 kernel needs a CPU with AVX-512 F/DQ/VL/BW/VBMI2")
def test_avx512_two_band_box_kernel_is_bit_identical_to_avx2(mri_slices):
    """On AVX-512 CPUs the 2D uniform kernel runs two bands of output rows in 8 fp64 lanes; every lane does the
    4-lane kernel's arithmetic and row sums are added in the same order, so results equal the AVX2 path bit
    for bit: real MRI (and its flipped, shifted, noisy, contrast copies, the deepssim preset), heights around
    the two-band threshold (2 K output rows), odd widths, one pair (row ranges split across threads) and many."""
    rng = np.random.default_rng(512)
    cases = [(mri_slices, y, kw) for y in variants(mri_slices, rng).values()
             for kw in ({}, dict(preset="deepssim"), dict(data_range=7.5))]
    # output rows 2 K - 1, 2 K, 2 K + 1 around the split threshold (K = 7: heights 19-21; K = 3: 7-9), odd
    # and even row counts (band 2 one row short), and a wide image
    for h, w in [(13, 9), (19, 33), (20, 17), (21, 12), (7, 10), (8, 11), (9, 9), (29, 31), (64, 300),
                 (255, 257)]:
        x, y = random_pair(rng, (3, h, w), np.float32)
        cases += [(x, y, {}), (x[:1], y[:1], {}), (x, y, dict(win_size=3))]
        if min(h, w) >= 9:
            cases.append((x, y, dict(win_size=9)))
    try:
        for x, y, kw in cases:
            got = {}
            for level in ("avx2", "avx512"):
                _native.set_simd_level(level)
                got[level] = ssim(x, y, spatial_dims=2, **kw)
            assert np.array_equal(got["avx2"], got["avx512"]), (x.shape, kw, got["avx2"] - got["avx512"])
            assert_close(got["avx512"], _skimage_uniform(x, y, kw.get("win_size", 7), kw.get("data_range"),
                                                          kw.get("preset")), what=f"avx512 {x.shape} {kw}")
    finally:
        _native.set_simd_level("auto")


def test_box_kernel_many_pairs_shared_and_single_use_images(mri_slices):
    """One-vs-many (x shared by every pair: statistics up front) and distinct pairs (statistics computed
    right before each pair): values match scikit-image, and a NaN in a single-use image names its pair."""
    x = mri_slices
    y = np.concatenate([np.roll(x, k, axis=2) for k in (1, 3)])
    shared = ssim(x[0], y, spatial_dims=2)
    assert_close(shared, _skimage_uniform(np.broadcast_to(x[0], y.shape), y, 7), what="one-vs-many")
    xs = np.concatenate([x, x[::-1]])
    distinct = ssim(xs, y, spatial_dims=2)
    assert_close(distinct, _skimage_uniform(xs, y, 7), what="distinct pairs")
    bad = y.copy()
    bad[len(y) - 3, 40, 50] = np.nan
    with pytest.raises(ValueError, match=rf"y has NaN or Inf values at pair index \({len(y) - 3},\)"):
        ssim(xs, bad, spatial_dims=2)


@pytest.mark.parametrize("level", ["scalar", "avx2", "auto"])
def test_box_kernel_extreme_value_scales(level):
    """The box kernel evaluates the formula on values divided by the pair's range, so tiny (1e-20) and huge
    (1e30) float32 data neither underflow c1/c2 nor overflow the squares."""
    rng = np.random.default_rng(77)
    try:
        _native.set_simd_level(level)
        for scale in (1e-20, 1e18, 1e30):
            x = (rng.random((6, 20, 27)) * scale).astype(np.float32)
            y = (x + 0.3 * scale * rng.random(x.shape)).astype(np.float32)
            got = ssim(x, y, spatial_dims=2)
            assert np.isfinite(got).all(), f"{level} scale {scale}: {got}"
            assert_close(got, _skimage_uniform(x, y, 7), what=f"{level} scale {scale}")
    finally:
        _native.set_simd_level("auto")


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_no_nan_escapes_at_extreme_scales_gaussian_and_matrix(backend):
    """Gaussian windows and ssim_matrix run the separable fp32 kernel; pairs whose values leave the float32
    range there are recomputed in float64, so scores stay finite and equal to scikit-image's."""
    from skimage.metrics import structural_similarity as sk

    rng = np.random.default_rng(78)
    for scale in (1e-20, 1e18, 1e30):
        x = (rng.random((3, 20, 27)) * scale).astype(np.float32)
        y = (x + 0.3 * scale * rng.random(x.shape)).astype(np.float32)
        want = np.array([sk(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False,
                            data_range=float(max(a.max(), b.max()) - min(a.min(), b.min())))
                         for a, b in zip(x, y, strict=True)])
        got = ssim(x, y, spatial_dims=2, window="gaussian", sample_covariance=False, backend=backend)
        assert_close(got, want, what=f"gaussian scale {scale}")
        mat = ssim_matrix(x, y, window="gaussian", sample_covariance=False, progress=False, backend=backend)
        assert np.isfinite(mat).all(), f"scale {scale}: {mat}"
        assert_close(np.diag(mat), want, what=f"matrix scale {scale}")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_data_range_far_below_the_images_span_is_scored_as_float64_scores_it(monkeypatch, caplog, spatial_dims,
                                                                             mri_slices):
    """Values 1000 +- 1e-3 with one 0-valued pixel and data_range=0.01: the separable fp32 kernel (Gaussian
    windows, ssim_matrix in 3D, uniform with the running sums off) keeps each window's means to an ulp of
    1000, and scored 3e-4 off float64 (C2 = 9e-8 against variances of 1e-6). Such pairs now go to the float64
    path; real MRI, at its own range or at data_range=1, stays on the fp32 kernel."""
    rng = np.random.default_rng(0)
    shape = (64, 64) if spatial_dims == 2 else (14, 15, 16)
    n = rng.standard_normal((2, *shape))
    x = (1000 + 1e-3 * n[0]).astype(np.float32)
    y = (1000 + 1e-3 * (0.7 * n[0] + 0.3 * n[1])).astype(np.float32)
    x.flat[len(x.flat) // 2] = y.flat[len(y.flat) // 2] = 0
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", "0")
    caplog.set_level(logging.DEBUG, logger="deepssim_fast.ssim")
    for kw in (GAUSS, {}):
        opts = dict(spatial_dims=spatial_dims, data_range=0.01, **kw)
        want = float(ssim(x, y, backend="torch", **opts))
        caplog.clear()
        assert abs(float(ssim(x, y, **opts)) - want) < 1e-6, kw
        got = ssim_matrix(x[None], y[None], progress=False, **opts)
        assert abs(float(got[0, 0]) - want) < 1e-6, kw
        assert "recomputing them in float64" in caplog.text, kw
    a, b = mri_slices[:2].astype(np.float32)
    if spatial_dims == 3:
        a, b = np.stack([a[:24, :24]] * 12), np.stack([b[:24, :24]] * 12)
    for dr in (None, 1.0):  # (real MRI spans 0..236 here: at data_range=1 the ratio is ~8e3, under the limit)
        caplog.clear()
        ssim(a, b, spatial_dims=spatial_dims, data_range=dr, **GAUSS)
        ssim_matrix(a[None], b[None], spatial_dims=spatial_dims, data_range=dr, progress=False, **GAUSS)
        assert "float64" not in caplog.text, dr


@pytest.mark.parametrize("level", ["scalar", "avx2", "auto"])
def test_separable_kernel_tiny_ranges_like_adc_maps_in_si_units(monkeypatch, level, mri_slices):
    """Images of data range ~1e-9 (ADC maps in m^2/s): the separable fp32 kernel's formula multiplies two
    factors of order range^2, so its numerator and denominator (~range^4) went subnormal and scores came out
    up to 5e-2 off scikit-image, silently (Gaussian windows, ssim_matrix, uniform windows with the running sums
    off, 3D). Now scaling the images by a power of two leaves every score as it was, bit for bit, and equal
    to scikit-image, down to the ranges where the float64 path takes over."""
    from skimage.metrics import structural_similarity as sk

    rng = np.random.default_rng(109)
    x = (mri_slices[:3] / mri_slices.max()).astype(np.float32)
    y = np.clip(np.roll(x, 2, axis=2) + 0.05 * rng.standard_normal(x.shape), 0, None).astype(np.float32)
    vol = data.load_volume("anatomical").array[:13, :14, :12]
    v = (vol / vol.max()).astype(np.float32)[None]
    w = np.clip(v[:, ::-1] + 0.05 * rng.standard_normal(v.shape), 0, None).astype(np.float32)
    cases = [("gaussian", 2, x, y, GAUSS), ("uniform box off", 2, x, y, {}), ("3D gaussian", 3, v, w, GAUSS)]
    try:
        _native.set_simd_level(level)
        monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", "0")
        for name, sd, a, b, kw in cases:
            base = ssim(a, b, spatial_dims=sd, **kw)
            base_m = ssim_matrix(a, b, spatial_dims=sd, progress=False, **kw)
            for k in (-36, -30, -20, 20):  # ranges ~1e-11 .. 1e6 (k = -30: ~1e-9)
                f = np.float32(2.0**k)
                got = ssim(a * f, b * f, spatial_dims=sd, **kw)
                assert np.array_equal(got, base), (name, k, got - base)
                got_m = ssim_matrix(a * f, b * f, spatial_dims=sd, progress=False, **kw)
                assert np.array_equal(got_m, base_m), (name, k, got_m - base_m)
            for scale in (3e-9, 1e-10, 3e-11, 1e-12):  # ADC in m^2/s, and on down to the float64 path
                xs, ys = (a * scale).astype(np.float32), (b * scale).astype(np.float32)
                want = []
                for p, q in zip(xs.astype(np.float64), ys.astype(np.float64), strict=True):
                    dr = float(max(p.max(), q.max()) - min(p.min(), q.min()))
                    skw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) if kw else {}
                    want.append(sk(p, q, data_range=dr, **skw))
                assert_close(ssim(xs, ys, spatial_dims=sd, **kw), want, what=f"{level} {name} x {scale}")
                M = ssim_matrix(xs, ys, spatial_dims=sd, progress=False, **kw)
                assert_close(np.diag(M), want, what=f"{level} {name} matrix x {scale}")
    finally:
        _native.set_simd_level("auto")


@pytest.mark.parametrize("level", ["scalar", "avx2", "auto"])
def test_separable_kernel_statistics_past_float32_are_recomputed_not_scored_zero(monkeypatch, level):
    """Window statistics past the float32 range (int64 near +-2^62 with an explicit range of 2^64, float32
    around 1e19) are inf: with the formula's factors scaled to O(1) a finite numerator over an infinite
    denominator scored 0 where the value is not (0.08 off scikit-image); such outputs are NaN, and the pair
    is recomputed in float64."""
    from skimage.metrics import structural_similarity as sk

    rng = np.random.default_rng(62)
    a = rng.integers(-(2**62), 2**62, (2, 14, 15), dtype=np.int64)
    b = np.where(rng.random(a.shape) < 0.3, a // 3, a)
    f = (rng.standard_normal((2, 14, 15)) * 1e19).astype(np.float32)
    g = (0.5 * f + 5e18 * rng.standard_normal(f.shape)).astype(np.float32)
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", "0")
    try:
        _native.set_simd_level(level)
        for name, x, y, dr in (("int64", a, b, 2.0**64), ("float32 1e19", f, g, None)):
            for kw, skw in (({}, {}), (GAUSS, dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False))):
                want = []
                for p, q in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
                    r = dr if dr is not None else float(max(p.max(), q.max()) - min(p.min(), q.min()))
                    want.append(sk(p, q, data_range=r, **skw))
                got = ssim(x, y, spatial_dims=2, data_range=dr, **kw)
                assert_close(got, want, what=f"{level} {name} {kw}")
                M = ssim_matrix(x, y, data_range=dr, progress=False, **kw)
                assert_close(np.diag(M), want, what=f"{level} {name} {kw} matrix")
    finally:
        _native.set_simd_level("auto")


@pytest.mark.parametrize("level", ["scalar", "auto"])
@pytest.mark.parametrize("box", ["1", "0"], ids=["box", "separable"])
def test_box_kernel_3d_odd_shapes_and_real_volume(monkeypatch, level, box):
    """3D uniform windows: z running sums on top of the 2D box kernel (box) or the separable kernel, on odd
    shapes, window sizes 3 and 7, fixed / per-pair / deepssim ranges, and a real T1 volume."""
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", box)
    rng = np.random.default_rng(31)
    vol = data.load_volume("anatomical").array  # 33 x 41 x 25
    try:
        _native.set_simd_level(level)
        cases = [(rng.standard_normal((2, 7, 9, 8)), 7), (rng.standard_normal((2, 12, 8, 13)), 3)]
        cases.append((np.stack([vol, np.roll(vol, 2, axis=0)]), 7))
        for x, k in cases:
            x = x.astype(np.float32)
            y = (x + 0.4 * x.std() * rng.standard_normal(x.shape)).astype(np.float32)
            for kw in ({}, dict(data_range=9.0), dict(preset="deepssim")):
                want = []
                for a, b in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
                    if kw.get("preset"):
                        a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
                        dr = a.max() - a.min()
                    else:
                        dr = kw.get("data_range", max(a.max(), b.max()) - min(a.min(), b.min()))
                    want.append(skm.structural_similarity(a, b, win_size=k, data_range=dr))
                got = ssim(x, y, spatial_dims=3, win_size=k, **kw)
                assert_close(got, want, what=f"{level} box={box} 3D {x.shape} K={k} {kw}")
    finally:
        _native.set_simd_level("auto")


# ---------------------------------------------------------------- inputs float32 cannot hold, huge values


def _ssim_module():
    return importlib.import_module("deepssim_fast.ssim")


def _far_from_zero_cases(rng):
    """(name, x, y, kw): stacks whose values sit far from 0 against their spread, in dtypes float32 rounds."""
    cases = []
    for off in (1e3, 1e4, 1e5):
        x = off + rng.random((3, 20, 23))
        cases.append((f"float64 +{off:g}", x, x + 0.1 * rng.random(x.shape), {}))
    for dt, base in ((np.int32, 2**30), (np.uint32, 3 * 2**30), (np.int64, 2**40), (np.uint64, 2**50)):
        a = (rng.integers(0, 1000, (3, 20, 23)) + base).astype(dt)
        b = (a + rng.integers(0, 1000, a.shape)).astype(dt)
        dr = float(max(a.max(), b.max())) - float(min(a.min(), b.min()))
        cases.append((f"{np.dtype(dt).name} +{base}", a, b, dict(data_range=dr)))
    return cases


@pytest.mark.parametrize("mode", ["uniform", "gaussian", "deepssim"])
def test_far_from_zero_wide_dtypes_equal_the_float64_reference(caplog, mode):
    """float64 and 32/64-bit integer images far from 0 (float32 would round them by 1e-4..1e-1 of their
    range): the native backend computes their pairs in float64, logged once, and equals the reference."""
    rng = np.random.default_rng(2024)
    kw_m = GAUSS if mode == "gaussian" else (dict(preset="deepssim") if mode == "deepssim" else {})
    for name, x, y, kw in _far_from_zero_cases(rng):
        if mode == "deepssim" and kw:
            continue  # the preset sets the range itself
        with caplog.at_level(logging.INFO, logger="deepssim_fast.ssim"):
            caplog.clear()
            got = ssim(x, y, spatial_dims=2, **kw, **kw_m)
        assert_close(got, ssim_reference(x, y, spatial_dims=2, **kw, **kw_m), tol=2e-7, what=f"{name} {mode}")
        logs = [r.getMessage() for r in caplog.records if "float32 would round" in r.getMessage()]
        assert len(logs) == 1 and logs[0].startswith("ssim: 3 of 3 pairs"), logs
        with caplog.at_level(logging.INFO, logger="deepssim_fast.ssim"):
            caplog.clear()
            M = ssim_matrix(x, y, progress=False, **kw, **kw_m)
        want = ssim_reference(x[:, None], y[None], spatial_dims=2, **kw, **kw_m)
        assert_close(M, want, tol=2e-7, what=f"{name} {mode} matrix")
        logs = [r.getMessage() for r in caplog.records if "float32 would round" in r.getMessage()]
        assert len(logs) == 1 and logs[0].startswith("ssim_matrix: 9 of 9 pairs"), logs


def _cs_only(x, y, data_range):
    """Mean SSIM of 2D images whose luminance term is 1 to float64 precision (offsets near 2^62 against
    differences of means of ~1e3): the mean of the contrast-structure map, uniform 7 x 7, sample covariance,
    from the exact integers ``x``, ``y`` (small: float64 holds them)."""
    from scipy.ndimage import uniform_filter

    x, y = x.astype(np.float64), y.astype(np.float64)
    f, cn = (lambda z: uniform_filter(z, 7)), 49 / 48
    mx, my = f(x), f(y)
    vx, vy, vxy = cn * (f(x * x) - mx * mx), cn * (f(y * y) - my * my), cn * (f(x * y) - mx * my)
    c2 = (0.03 * data_range) ** 2
    return ((2 * vxy + c2) / (vx + vy + c2))[3:-3, 3:-3].mean()


@pytest.mark.parametrize("dtype,offset", [(np.int64, 2**62), (np.int64, 2**63 - 4000), (np.uint64, 2**63 + 2**62),
                                          (np.uint64, 2**64 - 4000), (np.int64, -(2**63))])
def test_64bit_integers_past_2_53_are_not_rounded_to_constants(dtype, offset):
    """int64/uint64 images past 2^53, which float64 cannot hold: a cast rounded two unrelated images offset by
    2^62 to one constant each, and ssim, ssim_matrix and the reference scored them 1.0. Each image is centred
    on its minimum in integer arithmetic now: the preset's z-scores equal the un-offset images', and with a
    data range the score is the contrast-structure term (luminance is 1 at such offsets)."""
    rng = np.random.default_rng(53)
    a = rng.integers(0, 500, (2, 24, 27))
    b = rng.integers(0, 500, (2, 24, 27))
    near = a + rng.integers(0, 3, a.shape)  # a near-copy of a
    big = [v.astype(dtype) + dtype(offset) for v in (a, b, near)]
    A, B, N = big
    z = ssim(a, b, preset="deepssim", spatial_dims=2)
    for got in (ssim(A, B, preset="deepssim", spatial_dims=2), ssim_reference(A, B, preset="deepssim", spatial_dims=2),
                np.diagonal(ssim_matrix(A, B, preset="deepssim", progress=False))):
        assert_close(got, z, tol=1e-6, what=f"{np.dtype(dtype).name}+{offset} deepssim")
        assert np.all(np.abs(got) < 0.5), got  # (unrelated: was 1.0)
    want = np.array([_cs_only(a[i], near[i], 5000) for i in range(2)])
    for got in (ssim(A, N, data_range=5000, spatial_dims=2), ssim_reference(A, N, data_range=5000, spatial_dims=2),
                np.diagonal(ssim_matrix(A, N, data_range=5000, progress=False))):
        assert_close(got, want, tol=1e-7, what=f"{np.dtype(dtype).name}+{offset} data_range")
    assert np.all(ssim(A, B, data_range=500, spatial_dims=2) < 0.2)
    assert_close(ssim(A, A, data_range=500, spatial_dims=2), np.ones(2), tol=0, what="self")
    # (images that span most of the range past 2^53 are held by float32 to 2^-24 of their span: they stay on
    # the float32 kernels, only offset ones leave them)
    from deepssim_fast import _ssim_common as sc

    wide = torch.from_numpy(rng.integers(-(2**62), 2**62, (2, 12, 13)))
    assert not sc.float32_inexact(wide).any() and sc.float32_inexact(torch.from_numpy(A)).all()


@pytest.mark.parametrize("box", ["1", "0"], ids=["box", "separable"])
def test_only_pairs_with_inexact_images_leave_the_fast_path(monkeypatch, mri_slices, box):
    """One image of a float64 stack offset by 1e5 (float32 rounds it by ~3e-5 of its range): only the pairs
    that involve it run in float64 (torch)."""
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", box)
    mod = _ssim_module()
    calls = []
    real = mod._torch_pairs

    def spy(xf, yf, ix, iy, *args):
        calls.extend(zip(ix.tolist(), iy.tolist(), strict=True))
        return real(xf, yf, ix, iy, *args)

    monkeypatch.setattr(mod, "_torch_pairs", spy)
    x = mri_slices[:4].astype(np.float64) / 3.0  # (integer intensities +1e5 would still be exact in float32)
    x[2] += 1e5
    y = np.roll(x, 2, axis=2)
    got = ssim(x, y, spatial_dims=2)
    assert calls == [(2, 2)]
    want = ssim_reference(x, y, spatial_dims=2)
    assert_close(got, want, what="pairs")
    assert abs(float(got[2]) - float(want[2])) <= 2e-7
    calls.clear()
    M = ssim_matrix(x, y[:3], progress=False)
    assert sorted(calls) == sorted({(i, j) for i in range(4) for j in range(3) if 2 in (i, j)})
    want = ssim_reference(x[:, None], y[None, :3], spatial_dims=2)
    assert_close(M, want, what="matrix")
    assert_close(M[2], want[2], tol=2e-7, what="matrix row 2")
    assert_close(M[:, 2], want[:, 2], tol=2e-7, what="matrix column 2")


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.uint16, np.int16, np.float64, np.int32, np.int64])
def test_common_dtypes_stay_on_the_fast_path(monkeypatch, mri_slices, dtype):
    """MRI intensities in the usual storage dtypes (floats spanning [0, max], integers from 0) never reach the
    float64 torch path on the native backend, for pairs and matrices, and match the reference."""
    mod = _ssim_module()

    def boom(*args, **kwargs):
        raise AssertionError("_torch_pairs called for data the float32 kernels hold")

    monkeypatch.setattr(mod, "_torch_pairs", boom)
    unit = mri_slices / mri_slices.max()
    if np.issubdtype(dtype, np.integer):
        top = min(np.iinfo(dtype).max, 4095) if dtype in (np.int32, np.int64) else np.iinfo(dtype).max
        x = np.round(unit * top).astype(dtype)
    else:
        x = (unit * 1000.0).astype(dtype)
    y = np.concatenate([x[:, ::-1], np.roll(x[:3], 3, axis=2)])
    x = np.concatenate([x, x[:3]])
    for kw in ({}, GAUSS, dict(preset="deepssim")):
        got = ssim(x, y, spatial_dims=2, **kw)
        assert_close(got, ssim_reference(x, y, spatial_dims=2, **kw), what=f"{np.dtype(dtype).name} {kw}")
        M = ssim_matrix(x[:3], y[:4], progress=False, **kw)
        want = ssim_reference(x[:3, None], y[None, :4], spatial_dims=2, **kw)
        assert_close(M, want, what=f"{np.dtype(dtype).name} {kw} matrix")


@pytest.mark.filterwarnings("ignore:Setting data_range based on im1.dtype")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_integer_dtypes_use_the_dtype_range_like_skimage(backend, dtype):
    """data_range=None on integer images is the dtype's range, as scikit-image (int64/uint64: 2^64 - 1)."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(64)
    small = rng.integers(0, 100, (2, 16, 17))
    wide = rng.integers(info.min, info.max, (2, 16, 17), dtype=dtype, endpoint=True)
    other = rng.integers(info.min, info.max, (2, 16, 17), dtype=dtype, endpoint=True)
    for name, x, y in (
        ("small", small.astype(dtype), np.clip(small + rng.integers(-30, 30, small.shape), 0, 127).astype(dtype)),
        ("wide", wide, np.where(rng.random(wide.shape) < 0.3, other, wide)),
    ):
        want = [skm.structural_similarity(a, b) for a, b in zip(x, y, strict=True)]
        got = ssim(x, y, spatial_dims=2, backend=backend)
        assert_close(got, want, what=f"{np.dtype(dtype).name} {name}")
        assert_close(ssim_reference(x, y, spatial_dims=2), want, what=f"reference {np.dtype(dtype).name} {name}")


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_finite_values_beyond_float32_sums_are_scored_in_float64(window):
    """float32 images up to 1e37 are finite: the native kernel's float32 sums overflow, so the pairs run in
    float64 instead of raising a NaN/Inf error; equal to scikit-image on every backend and in the matrix."""
    rng = np.random.default_rng(37)
    x = (rng.random((2, 64, 64)) * 1e37).astype(np.float32)
    y = (0.5 * x + 2e36 * rng.random(x.shape)).astype(np.float32)
    kw = GAUSS if window == "gaussian" else {}
    want = skimage_ssim(x.astype(np.float64), y.astype(np.float64), window=window)
    for backend in BACKENDS:
        assert_close(ssim(x, y, spatial_dims=2, backend=backend, **kw), want, what=f"{backend} {window}")
        M = ssim_matrix(x, y, progress=False, backend=backend, **kw)
        assert np.isfinite(M).all(), M
        assert_close(np.diag(M), want, what=f"{backend} {window} matrix")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e300, 1e-200])
def test_values_beyond_float64_raise_naming_the_pair(backend, scale):
    """Values whose squares leave the float64 range cannot be scored: a ValueError names the pair, no NaN."""
    rng = np.random.default_rng(300)
    x = rng.random((3, 20, 20))
    y = x + 0.1 * rng.random(x.shape)
    x[1] *= scale
    y[1] *= scale
    msg = r"cannot be scored: its values \(largest \|value\| .*\) are too large \(or too small\)"
    with pytest.raises(ValueError, match=r"^ssim: pair index \(1,\) " + msg):
        ssim(x, y, spatial_dims=2, backend=backend)
    with pytest.raises(ValueError, match=r"^ssim: the pair " + msg):
        ssim(x[1], y[1], backend=backend)
    # the first pair (row-major) past float64: (0, 1) when huge (range 1e300), (1, 1) when tiny; the message
    # names ssim_matrix (it began "ssim:")
    first = r"\(0, 1\)" if scale > 1 else r"\(1, 1\)"
    with pytest.raises(ValueError, match=r"^ssim_matrix: pair index " + first + " " + msg):
        ssim_matrix(x, y, progress=False, backend=backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_constants_out_of_float64_range_are_named_not_blamed_on_the_values(backend):
    """k1 or k2 so extreme that C1/C2 underflow (or overflow) float64 make flat regions 0/0: the error names
    k1 and k2 (it said the values, of |value| 1, were too large or small and to rescale the images); values
    out of range still get the rescale message, also at the default constants."""
    rng = np.random.default_rng(14)
    a = rng.random((24, 30))
    b = np.clip(a + 0.2 * rng.random(a.shape), 0, 1)
    a[:, :12] = 0
    b[:, :12] = 0
    for k1, k2 in ((1e-200, 1e-200), (0.01, 1e-200), (1e200, 0.03)):
        named = re.escape(f"pair cannot be scored with k1={k1!r}, k2={k2!r}: with its data range 1 they make C1 = ")
        with pytest.raises(ValueError, match=named + ".* outside float64's range"):
            ssim(a, b, k1=k1, k2=k2, backend=backend)
    for scale in (1e-160, 1e100):
        with pytest.raises(ValueError, match=r"its values \(largest \|value\| 1e[-+]\d+\) are too large .*rescale"):
            ssim(a * scale, b * scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", ["uniform", "gaussian"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_deepssim_preset_scores_unrelated_images_alike_at_every_magnitude(backend, window, dtype):
    """The preset z-scores each image, so scaling both images by a power of two (exact) leaves every score as
    it was. Squares that leave float32 (|x| from ~1e19 up, ~1e-23 down, int64 near ±2^62: the native
    kernel's statistics) or float64 (from ~1e154 up, ~1e-162 down: the torch path and the reference) made a
    std inf or 0, every z-score 0, and unrelated images scored exactly 1 (a "duplicate")."""
    rng = np.random.default_rng(62)
    kw = dict(spatial_dims=2, preset="deepssim", window=window)
    x, y = rng.random((2, 3, 20, 21))
    if dtype == np.int64:
        a, b = (np.round((2.0 * v - 1.0) * 2.0**62).astype(np.int64) for v in (x, y))
        cases = {"int64 in ±2^62": (a, b)}
        want = ssim_reference(a, b, **kw)  # float64 holds their squares (2^124)
        want_m = ssim_reference(a[:, None], b[None], **kw)
    else:
        x, y = x.astype(dtype), y.astype(dtype)
        want = ssim_reference(x, y, **kw)
        want_m = ssim_reference(x[:, None], y[None], **kw)
        exps = (-120, -80, 70, 120) if dtype == np.float32 else (-1000, -700, 100, 540, 1000)
        cases = {f"{np.dtype(dtype).name} x 2^{k}": (x * dtype(2.0**k), y * dtype(2.0**k)) for k in exps}
    assert np.abs(want).max() < 0.1  # unrelated images
    for name, (a, b) in cases.items():
        assert_close(ssim(a, b, backend=backend, **kw), want, what=f"{name} ssim")
        M = ssim_matrix(a, b, progress=False, backend=backend, **kw)
        assert_close(M, want_m, what=f"{name} ssim_matrix")
        if dtype != np.int64:
            assert_close(ssim_reference(a, b, **kw), want, tol=1e-9, what=f"{name} reference")


# ---------------------------------------------------------------- parameters, bool images, the reference


def test_parameters_take_any_real_scalar():
    """sigma, data_range, k1, k2 as numpy scalars, 0-d arrays and tensors, fractions: converted with float();
    bool, strings, complex, NaN, non-positive values and arrays with elements are refused, naming the option."""
    rng = np.random.default_rng(5)
    x, y = random_pair(rng, (2, 16, 17), np.float32)
    xd, yd = x.astype(np.float64), y.astype(np.float64)

    def sk(**kw):
        return [skm.structural_similarity(a, b, data_range=2.0, **kw) for a, b in zip(xd, yd, strict=True)]

    want_g = sk(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    for sigma in (np.float32(1.5), np.float64(1.5), np.array(1.5), torch.tensor(1.5), fractions.Fraction(3, 2)):
        got = ssim(x, y, spatial_dims=2, sigma=sigma, data_range=2.0, **GAUSS)
        assert_close(got, want_g, what=f"sigma={sigma!r}")
    for dr in (np.float32(2.0), np.int64(2), np.array(2.0), torch.tensor(2.0), torch.tensor(2, dtype=torch.int32)):
        assert_close(ssim(x, y, spatial_dims=2, data_range=dr), sk(), what=f"data_range={dr!r}")
    for k1, k2 in ((np.float32(0.02), np.float64(0.04)), (torch.tensor(0.02, dtype=torch.float64), np.array(0.04))):
        got = ssim(x, y, spatial_dims=2, data_range=2.0, k1=k1, k2=k2)
        assert_close(got, sk(K1=float(k1), K2=float(k2)), what=f"k1={k1!r} k2={k2!r}")
    for name, bad in (("sigma", True), ("sigma", "1.5"), ("sigma", np.float32("nan")), ("k1", -0.01), ("k2", 0),
                      ("k2", 0.03j), ("data_range", np.bool_(True)), ("data_range", torch.tensor([1.0])),
                      ("data_range", torch.tensor(True)), ("data_range", np.inf)):
        with pytest.raises(ValueError, match=f"{name} must be a positive finite real number"):
            ssim(x, y, spatial_dims=2, window="gaussian", **{name: bad})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_images_like_skimage(backend):
    """bool images are {0, 1} with data range 1, as scikit-image's dtype_range[bool]."""
    rng = np.random.default_rng(1)
    x = rng.random((3, 16, 17)) > 0.5
    y = x.copy()
    y[:, 0] = ~y[:, 0]
    y[2] = rng.random((16, 17)) > 0.3
    want = [skm.structural_similarity(a, b) for a, b in zip(x, y, strict=True)]
    assert_close(ssim(x, y, spatial_dims=2, backend=backend), want, what="bool uniform")
    assert_close(ssim_reference(x, y, spatial_dims=2), want, what="bool reference")
    want_g = [skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
              for a, b in zip(x, y, strict=True)]
    assert_close(ssim(x, y, spatial_dims=2, backend=backend, **GAUSS), want_g, what="bool gaussian")
    assert_close(ssim(x, y, spatial_dims=2, backend=backend, preset="deepssim"),
                 skimage_ssim(x.astype(np.float64), y.astype(np.float64), preset="deepssim"), what="bool deepssim")
    M = ssim_matrix(x, y, progress=False, backend=backend)
    assert_close(np.diag(M), want, what="bool matrix")
    with pytest.raises(TypeError, match="x has unsupported dtype"):
        ssim(x.astype(np.complex64), y.astype(np.complex64), spatial_dims=2, backend=backend)


def test_reference_broadcasts_like_ssim(mri_slices):
    """ssim_reference takes the same broadcast batch dims as ssim (one-vs-many, grids)."""
    one = ssim_reference(mri_slices[0], mri_slices, spatial_dims=2)
    assert one.shape == (len(mri_slices),)
    assert_close(one, ssim(mri_slices[0], mri_slices, spatial_dims=2), what="one-vs-many vs ssim")
    assert_close(one, skimage_ssim(np.broadcast_to(mri_slices[0], mri_slices.shape), mri_slices),
                 what="one-vs-many vs skimage")
    grid = ssim_reference(mri_slices[:3, None], mri_slices[None, 3:7], spatial_dims=2, preset="deepssim")
    assert grid.shape == (3, 4)
    assert_close(grid, ssim(mri_slices[:3, None], mri_slices[None, 3:7], spatial_dims=2, preset="deepssim"),
                 what="grid vs ssim")
    with pytest.raises(ValueError, match="do not broadcast"):
        ssim_reference(mri_slices[:3], mri_slices[:4], spatial_dims=2)


def test_reference_flat_backgrounds_with_tiny_constants_equal_skimage():
    """A flat background has windowed variance exactly 0 in scikit-image; the reference centred each image
    on its mean, which left ~1e-17 of rounding there, and with k2 = 1e-30 (C2 ~ 1e-60) that rounding gave a
    score of -1.4e43. Centred on the minimum, the background stays exact zeros: the reference equals
    scikit-image, as ssim does."""
    from skimage.metrics import structural_similarity as sk

    for seed, k1, k2 in ((0, 1e-30, 1e-30), (1, 0.01, 1e-30), (2, 0.01, 1e-30), (0, 0.01, 0.03)):
        rng = np.random.default_rng(seed)
        a = rng.random((24, 30))
        b = np.clip(a + 0.2 * rng.random(a.shape), 0, 1)
        a[:, :12] = 0
        b[:, :12] = 0
        want = sk(a, b, data_range=1.0, K1=k1, K2=k2)
        got = ssim_reference(a, b, data_range=1.0, k1=k1, k2=k2)
        assert abs(float(got) - want) < 1e-12, (seed, k1, k2, float(got), want)
        assert_close(ssim(a, b, data_range=1.0, k1=k1, k2=k2), np.float64(want), what=f"ssim k1={k1} k2={k2}")


def test_matrix_of_a_single_image_says_to_pass_a_stack():
    a = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match=r"not a stack of images; pass a stack \(N, H, W\)"):
        ssim_matrix(a, np.zeros((2, 16, 16), np.float32), progress=False)


_MATRIX_INTERRUPT_CODE = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job starts with SIGINT ignored)
import numpy as np
import deepssim_fast as dsf
rng = np.random.default_rng(0)
x = rng.random((400, 128, 128), dtype=np.float32)
kw = dict(window="gaussian", sample_covariance=False, progress=False)
small = dsf.ssim_matrix(x[:6], x[6:12], **kw)
t0 = time.perf_counter()
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    dsf.ssim_matrix(x, x, **kw)  # one native call of 160000 pairs, ~20 s at the scalar level on 2 threads
    print("not interrupted")
    sys.exit(1)
except KeyboardInterrupt:
    print("KeyboardInterrupt after", round(time.perf_counter() - t0, 2), flush=True)
    assert time.perf_counter() - t0 < 0.9
assert np.array_equal(dsf.ssim_matrix(x[:6], x[6:12], **kw), small)  # the engine still works
print("ok")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_a_long_native_ssim_matrix_tile():
    """ssim_matrix computes a tile of up to 512 x 512 pairs (128 x 128 images) in one native call with the
    GIL released: Ctrl-C waited for the tile (4.6 s for 200 x 200 Gaussian-window pairs at the scalar level),
    then, polling between chunks, for the chunks of 5000 pairs the threads were running (400 x 400: ~1 s).
    The pair loops now poll every 64 pairs. In a subprocess (a hang fails this test only)."""
    assert_ok(run_python(_MATRIX_INTERRUPT_CODE,
                         env={"DEEPSSIM_FAST_SIMD": "scalar", "DEEPSSIM_FAST_NUM_THREADS": "2"}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_in_a_broadcast_input_names_a_pair_of_the_result(backend):
    # x's batch (3,) broadcasts against y's (4, 3): the error named x's own index (1,) as a "pair index",
    # which is no index of the (4, 3) result; and with x (4, 1) against y (1, 3) it named pair (2, 0)
    # "flat index 2", which is flat index 6 of the result
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 9, 9)), rng.random((4, 3, 9, 9))
    x[1, 2, 2] = np.nan
    with pytest.raises(ValueError, match=r"x has NaN or Inf values at pair index \(0, 1\) \(flat index 1\).*x\[1\]"):
        ssim(x, y, spatial_dims=2, backend=backend)
    x, y = rng.random((4, 1, 9, 9)), rng.random((1, 3, 9, 9))
    x[2, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"x has NaN or Inf values at pair index \(2, 0\) \(flat index 6\).*x\[2, 0\]"):
        ssim(x, y, spatial_dims=2, backend=backend)


@pytest.mark.parametrize("k", [1e-9, 1e-7])
def test_tiny_k_constants_stay_exact_beside_a_bright_voxel(k: float) -> None:
    """The native running (box) sums lose the tiny squares added while a bright voxel is in the window: with
    k1 = k2 = 1e-9 (C2 ~ 1e-18) a region of values ~1e-9 scored 2.0e-3 off float64, 2D and 3D. Such k now take
    the separable kernel; both dims and ssim_matrix agree with the float64 reference."""
    from deepssim_fast.reference import ssim_reference
    rng = np.random.default_rng(12)
    for shape in ((16, 16), (9, 12, 12)):
        x, y = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        x[(0,) * len(shape)] = 1.0
        sl = tuple(slice(3, None) for _ in shape)
        x[sl] = (k * rng.random(x[sl].shape)).astype(np.float32)
        y[sl] = (k * rng.random(y[sl].shape)).astype(np.float32)
        d = len(shape)
        want = float(ssim_reference(x, y, k1=k, k2=k, spatial_dims=d))
        assert float(ssim(x, y, k1=k, k2=k, spatial_dims=d, backend="native")) == pytest.approx(want, abs=1e-6)
        m = ssim_matrix(np.stack([x, y]), np.stack([y, x]), k1=k, k2=k, spatial_dims=d, backend="native")
        want_m = [[float(ssim_reference(a, b, k1=k, k2=k, spatial_dims=d)) for b in (y, x)] for a in (x, y)]
        np.testing.assert_allclose(np.asarray(m, np.float64), want_m, atol=1e-6, rtol=0)


@pytest.mark.parametrize("data_range", [0.01, 1e-3])
def test_running_sum_kernels_follow_the_span_rule(data_range: float) -> None:
    """README: a pair spanning more than 8192 k2 data_range is computed in float64. The 2D uniform window's
    running-sum kernels ignored the rule: a real slice spanning [0, 1000] against itself shifted by a row, at
    data_range=0.001, scored 1.5e-3 off float64 (ssim and ssim_matrix; the Gaussian window was right)."""
    x = (data.load_volume("t1_coronal_slice").array[::2, ::2] * 1000).astype(np.float32)
    y = np.roll(x, 1, axis=0)
    want = float(ssim(x.astype(np.float64), y.astype(np.float64), data_range=data_range, backend="torch"))
    assert float(ssim(x, y, data_range=data_range, backend="native")) == pytest.approx(want, abs=1e-7)
    m = ssim_matrix(x[None], y[None], data_range=data_range, backend="native")
    assert float(np.asarray(m)[0, 0]) == pytest.approx(want, abs=1e-6)


def test_gaussian_window_refuses_a_win_size_it_would_ignore() -> None:
    """window="gaussian" took any win_size, 8 or 1001 included, and ignored it: scikit-image crops its borders by
    that win_size instead, so a ported call changed score without a word (0.7976 against 0.8055 at 7)."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((30, 34))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    opts = dict(window="gaussian", sample_covariance=False, data_range=1.0)
    want = structural_similarity(a, b, gaussian_weights=True, use_sample_covariance=False, data_range=1.0)
    for w in (None, 11):  # unset, or sigma's own 11 taps: scikit-image's number
        assert float(ssim(a, b, win_size=w, **opts)) == pytest.approx(want, abs=1e-6)
        assert float(ssim_reference(a, b, win_size=w, **opts)) == pytest.approx(want, abs=1e-9)
    for w in (7, 8, 1001):
        with pytest.raises(ValueError, match=rf"win_size={w} with window='gaussian'.*11 taps for sigma=1.5"):
            ssim(a, b, win_size=w, **opts)
        with pytest.raises(ValueError, match="set by sigma"):
            ssim_matrix(a[None], b[None], win_size=w, progress=False, **opts)
    assert float(ssim(a, b, win_size=5, sigma=0.5, **opts)) == pytest.approx(  # (0.5: 5 taps)
        structural_similarity(a, b, gaussian_weights=True, sigma=0.5, use_sample_covariance=False,
                              data_range=1.0), abs=1e-6)
    assert float(ssim(a, b, data_range=1.0)) == pytest.approx(  # the uniform window's default is still 7
        structural_similarity(a, b, data_range=1.0), abs=1e-6)


def test_integer_dtype_range_warns_as_scikit_image_does() -> None:
    """int16 MRI in the thousands, scored against int16's range 65535, comes out near 1 for two different
    slices (0.88 here, above the duplicate threshold; 0.50 with their own range). The convention is
    scikit-image's, which warns; deepssim_fast said nothing."""
    import warnings

    vol = data.load_volume("mni152").array
    s1, s2 = (np.round(vol[:, :, z] / vol.max() * 1000).astype(np.int16) for z in (40, 80))
    with pytest.warns(UserWarning, match=r"x and y are int16: data_range is that dtype's range, 65535"):
        loose = float(ssim(s1, s2))
    with pytest.warns(UserWarning, match=r"A and B are int16"):
        m = ssim_matrix(s1[None], s2[None], progress=False)
    assert float(m[0, 0]) == pytest.approx(loose, abs=1e-6)
    own = float(ssim(s1, s2, data_range=float(max(s1.max(), s2.max()) - min(s1.min(), s2.min()))))
    assert loose > own + 0.2  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warn: uint8 and bool (as scikit-image), floats,
        ssim(s1, s2, data_range=1000.0)  # an explicit range, the deepssim preset
        ssim(s1, s2, preset="deepssim")
        ssim(s1.astype(np.float32), s2.astype(np.float32))
        ssim((s1 // 8).astype(np.uint8), (s2 // 8).astype(np.uint8))
        ssim(s1 > 300, s2 > 300)


def test_ssim_errors_name_their_real_cause() -> None:
    """A data_range so large that C1 and C2 overflow blamed the images ("rescale the images", largest value 1);
    a read-only ``out`` failed at the first tile with numpy's bare "assignment destination is read-only";
    images of different shapes in a list gave a TypeError about an "inhomogeneous shape"."""
    rng = np.random.default_rng(1)
    a, b = rng.random((12, 12)), rng.random((12, 12))
    with pytest.raises(ValueError, match=r"data_range=1e\+160: it makes C1 .* largest \|value\| is 0.99"):
        ssim(a, b, data_range=1e160)
    ro = np.zeros((1, 1), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is a read-only array"):
        ssim_matrix(a[None], b[None], out=ro, progress=False)
    imgs = [a, rng.random((13, 12))]
    with pytest.raises(ValueError, match=r"A: a list of arrays of different shapes: A\[0\] has shape \(12, 12\), "
                                         r"A\[1\] \(13, 12\)"):
        ssim_matrix(imgs, imgs, progress=False)


def test_float64_images_with_a_data_range_below_their_span_run_in_float64():
    """float64 texture 1e-4 high on an offset of 3, one voxel at 4: float32 holds each image to 1.2e-7, under
    2.5e-7 of its own range (1), so the pair stayed on the float32 path; but with data_range 0.0015 SSIM's
    constants are that small, and the score was 1.5e-4 off (0.722749 against 0.722602, ssim and ssim_matrix,
    native and Triton alike). Rounding is now measured against an explicit data_range below the span."""
    from deepssim_fast.reference import ssim_reference

    rng = np.random.default_rng(5)
    x = 3.0 + 1e-4 * rng.random((40, 40))
    y = 3.0 + 1e-4 * rng.random((40, 40))
    x[0, 0] = y[0, 0] = 4.0
    for dr in (0.0015, 0.003, 0.01):
        want = float(ssim_reference(x, y, data_range=dr))
        got = float(ssim(x, y, data_range=dr))
        assert abs(got - want) <= 1e-6, (dr, got, want)
        m = np.asarray(ssim_matrix(np.stack([x, y]), np.stack([y, x]), data_range=dr, spatial_dims=2,
                                   progress=False))
        assert abs(float(m[0, 0]) - want) <= 1e-6, (dr, m)
    # the same images with data_range at or above their span stay on the fast path (nothing to gain)
    from deepssim_fast import _ssim_common as sc

    t = torch.from_numpy(np.stack([x, y]))
    assert not sc.float32_inexact(t).any() and not sc.float32_inexact(t, data_range=2.0).any()
    assert sc.float32_inexact(t, data_range=0.0015).all()


def test_tensors_without_readable_data_and_lists_of_grad_tensors() -> None:
    """A meta or sparse tensor failed inside torch ("Cannot copy out of meta tensor; no data!", "reshape is
    not implemented for sparse tensors"), naming neither the argument nor the problem; a list of tensors that
    require grad failed in numpy ("Can't call numpy() on Tensor that requires grad"). The first two are now
    clear errors naming x or y; the list is stacked, as a list of arrays is, with the same scores."""
    vol = data.load_volume("mni152").array
    x = torch.from_numpy(np.ascontiguousarray(vol[40:80, 50:95, 90]))
    y = torch.from_numpy(np.ascontiguousarray(vol[40:80, 50:95, 92]))
    with pytest.raises(ValueError, match=r"^y: a tensor on device 'meta', which ssim cannot read"):
        ssim(x, torch.empty(x.shape, device="meta"))
    with pytest.raises(TypeError, match=r"^x: torch.sparse_coo tensors are not supported; pass a dense tensor"):
        ssim(x.to_sparse(), y)
    with pytest.raises(ValueError, match=r"^A: a tensor on device 'meta'"):
        ssim_matrix(torch.empty((2, *x.shape), device="meta"), torch.stack([x, y]))
    grads = [x.clone().requires_grad_(True), y.clone().requires_grad_(True)]
    want = ssim(torch.stack([x, y]), torch.stack([y, x]), spatial_dims=2)
    np.testing.assert_array_equal(ssim(grads, grads[::-1], spatial_dims=2), want)
    m = ssim_matrix(grads, grads)
    assert m.shape == (2, 2) and m[0, 1] == pytest.approx(float(want[0]), abs=1e-6)


@pytest.mark.parametrize("window", ["gaussian", "uniform"])
def test_a_small_data_range_against_variation_near_sqrt_c2_stays_exact(window: str) -> None:
    """Images of 3000 +- 0.09 with one 0-valued pixel, at a data_range that put their span just under the
    float64 switch (32768 sqrt(C2) then): the Gaussian window scored up to 1.6e-5 off float64 on the native
    engine, 1.5e-5 on Triton's. The switch is at 8192 sqrt(C2) now, where that error is ~2e-6 (and real MRI
    at data_range=1, ~7.9e3, stays on the float32 kernel: see the test above)."""
    worst = 0.0
    for seed in range(100, 112):
        rng = np.random.default_rng(seed)
        nz = rng.standard_normal((3, 24, 24))
        x = (3000 + 0.09 * nz[:2]).astype(np.float32)
        y = (3000 + 0.09 * (0.7 * nz[:2] + 0.3 * nz[2])).astype(np.float32)
        x[:, 9, 9] = y[:, 9, 9] = 0
        for ratio in (32768, 8192 * 1.01, 8192 * 0.99):
            kw = dict(spatial_dims=2, data_range=3000 / (0.03 * ratio), window=window,
                      sample_covariance=window == "uniform")
            got = np.asarray(ssim(x, y, backend="native", **kw), np.float64)
            want = np.asarray(ssim_reference(x.astype(np.float64), y.astype(np.float64), **kw), np.float64)
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst < 4e-6, worst


def test_the_box_kernels_switch_takes_the_usual_spellings_of_off(monkeypatch) -> None:
    """DEEPSSIM_FAST_SSIM_BOX turned the running-sum kernels off only for exactly "0": "off", "false", "no"
    (any case, blanks) left them on without a word. Checked by the result: the two kernels differ in the last
    bits on these images."""
    from deepssim_fast import ssim as ssim_fn

    rng = np.random.default_rng(3)
    x = rng.random((4, 40, 44)).astype(np.float32)
    y = (0.7 * x + 0.3 * rng.random((4, 40, 44))).astype(np.float32)
    monkeypatch.delenv("DEEPSSIM_FAST_SSIM_BOX", raising=False)
    on = np.asarray(ssim_fn(x, y, spatial_dims=2, data_range=1.0))
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", "0")
    off = np.asarray(ssim_fn(x, y, spatial_dims=2, data_range=1.0))
    assert not np.array_equal(on, off)  # (else the test could not tell them apart)
    for value in ("off", " OFF ", "false", "No"):
        monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", value)
        assert np.array_equal(np.asarray(ssim_fn(x, y, spatial_dims=2, data_range=1.0)), off), value
    monkeypatch.setenv("DEEPSSIM_FAST_SSIM_BOX", "1")
    assert np.array_equal(np.asarray(ssim_fn(x, y, spatial_dims=2, data_range=1.0)), on)


def _two_pass_longdouble(x: np.ndarray, y: np.ndarray, *, data_range: float, k1: float = 0.01, k2: float = 0.03,
                         win: int = 7) -> float:
    """Uniform-window SSIM of one 2D or 3D pair with every window's variances and covariance taken around its
    own mean, in long double, by numpy's sliding windows: independent of the package's filters."""
    from numpy.lib.stride_tricks import sliding_window_view

    d = x.ndim
    ax = tuple(range(d, 2 * d))
    X = sliding_window_view(np.asarray(x, np.longdouble), (win,) * d)
    Y = sliding_window_view(np.asarray(y, np.longdouble), (win,) * d)
    mx, my = X.mean(ax, keepdims=True), Y.mean(ax, keepdims=True)
    n = win**d
    cn = np.longdouble(n) / (n - 1)
    vx, vy = cn * ((X - mx) ** 2).mean(ax), cn * ((Y - my) ** 2).mean(ax)
    vxy = cn * ((X - mx) * (Y - my)).mean(ax)
    mx, my = mx.reshape(vx.shape), my.reshape(vx.shape)
    c1, c2 = np.longdouble(k1 * data_range) ** 2, np.longdouble(k2 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean())


@pytest.mark.parametrize("dims", [2, 3])
def test_a_shared_plateau_above_the_minimum_is_exact_at_a_tiny_c2(dims: int) -> None:
    """A flat region shared by both images at a level other than their minimum (970 in [0, 1000]) kept
    ~1e-16 x 970^2 of rounding in the float64 path's one-pass E[x^2] - E[x]^2, which a small C2 turned into
    any score: 0.76 at data_range=1e-3 (exact: 0.9989), up to 2.6 on other plateaus, and in ssim_matrix too.
    The float64 path (every backend's, for pairs past the span rule) and the reference both agree with the
    independent long-double two-pass computation now."""
    rng = np.random.default_rng(40 + dims)
    shape = (40, 40) if dims == 2 else (14, 15, 16)
    worst = 0.0
    for trial in range(6):
        x = rng.random(shape) * 1000
        y = x + rng.normal(0, 20, shape)
        level = float(rng.uniform(100, 1000))
        box = tuple(slice(1 + trial % 3, n - 2) for n in shape)
        x[box] = level
        y[box] = level
        for data_range in (1e-2, 1e-3, 1e-5):
            want = _two_pass_longdouble(x, y, data_range=data_range)
            kw = dict(data_range=data_range, spatial_dims=dims)
            got = [float(ssim(x, y, backend=b, **kw)) for b in ("native", "torch")]
            got.append(float(ssim_reference(x, y, **kw)))
            got.append(float(ssim_matrix(x[None], y[None], progress=False, **kw)[0, 0]))
            assert all(g <= 1.0 + 1e-12 for g in got), (trial, data_range, got, want)
            worst = max(worst, *(abs(g - want) for g in got))
    assert worst < 1e-6, worst


def test_tiny_k_constants_over_a_plateau_match_exact_rational_arithmetic() -> None:
    """A 12x12 pair sharing an 8x8 plateau at 5: exact rational arithmetic (and scikit-image) give 0.99933745;
    the float64 path gave 1.32 at k1 = k2 = 1e-8 and 3e7 at 1e-12, the reference 1.09 to 90."""
    from fractions import Fraction

    rng = np.random.default_rng(25)
    x = rng.random((12, 12))
    y = x + 0.2 * rng.random((12, 12))
    x[:8, :8] = y[:8, :8] = 5.0
    w = 7
    X, Y = [[Fraction(v) for v in r] for r in x], [[Fraction(v) for v in r] for r in y]
    rng_ = Fraction(float(max(x.max(), y.max()) - min(x.min(), y.min())))

    def exact(k: float) -> float:
        c1 = c2 = (Fraction(k) * rng_) ** 2
        n, cn = w * w, Fraction(w * w, w * w - 1)
        total = []
        for i in range(12 - w + 1):
            for j in range(12 - w + 1):
                xs = [X[a][b] for a in range(i, i + w) for b in range(j, j + w)]
                ys = [Y[a][b] for a in range(i, i + w) for b in range(j, j + w)]
                mx, my = sum(xs) / n, sum(ys) / n
                vx = cn * sum((v - mx) ** 2 for v in xs) / n
                vy = cn * sum((v - my) ** 2 for v in ys) / n
                vxy = cn * sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / n
                total.append(((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        return float(sum(total) / len(total))

    for k in (1e-6, 1e-8, 1e-12, 1e-30):
        want = exact(k)
        for backend in ("native", "torch"):
            assert float(ssim(x, y, k1=k, k2=k, backend=backend)) == pytest.approx(want, abs=1e-7), (k, backend)
        assert float(ssim_reference(x, y, k1=k, k2=k)) == pytest.approx(want, abs=1e-12), k


@pytest.mark.parametrize("window", ["uniform", "gaussian"])
def test_the_float64_paths_rounding_bound_holds_where_it_skips_the_two_pass(window: str) -> None:
    """The float64 path keeps its one-pass moments only where their rounding bound is under 2^-30 of
    vx + vy + C2; everywhere it does, they match the two-pass ones (long double) to that, on images built to
    cancel badly: plateaus, large offsets, small spreads, data ranges far under the span."""
    import importlib

    import deepssim_fast._ssim_common as sc

    mod = importlib.import_module("deepssim_fast.ssim")
    from numpy.lib.stride_tricks import sliding_window_view

    rng = np.random.default_rng(9)
    checked = refined = 0
    for trial in range(8):
        x = rng.random((30, 34)) * 10 ** rng.uniform(0, 4) + 10 ** rng.uniform(0, 6)
        y = x + rng.normal(0, 10 ** rng.uniform(-3, 1), x.shape)
        x[5:20, 3:25] = y[5:20, 3:25] = float(x.mean())
        p = sc.resolve_params(ndim=2, spatial_dims=2, window=window, win_size=None, sigma=1.5,
                              data_range=10 ** rng.uniform(-6, 0), k1=0.01, k2=0.03, sample_covariance=True,
                              preset=None, shapes={"x": x.shape, "y": y.shape})
        w = torch.from_numpy(sc.window_weights(p))
        a = torch.from_numpy(x - x.min())[None]
        b = torch.from_numpy(y - y.min())[None]
        m = mod._filter_valid(torch.stack([a, b, a * a, b * b, a * b], dim=1), w, 2)
        cn = p.cov_norm
        vx, vy = cn * (m[:, 2] - m[:, 0] ** 2), cn * (m[:, 3] - m[:, 1] ** 2)
        vxy = cn * (m[:, 4] - m[:, 0] * m[:, 1])
        c2 = torch.tensor((p.k2 * p.data_range) ** 2, dtype=torch.float64)
        den = vx + vy + c2
        keep = ((4 * cn * mod._moment_rounding(p)) * (m[:, 2] + m[:, 3]) <= mod._REFINE_TOL * den) & (den > 0)
        wf = np.multiply.outer(sc.window_weights(p), sc.window_weights(p)).astype(np.longdouble)
        wf /= wf.sum()
        A = sliding_window_view(a[0].numpy().astype(np.longdouble), wf.shape)
        B = sliding_window_view(b[0].numpy().astype(np.longdouble), wf.shape)
        ma, mb = (A * wf).sum((2, 3), keepdims=True), (B * wf).sum((2, 3), keepdims=True)
        ex = [cn * (((A - ma) ** 2) * wf).sum((2, 3)), cn * (((B - mb) ** 2) * wf).sum((2, 3)),
              cn * (((A - ma) * (B - mb)) * wf).sum((2, 3))]
        k = keep[0].numpy()
        dd = den[0].numpy()[k]
        for fast, exact in zip((vx, vy, vxy), ex, strict=True):
            err = np.abs(fast[0].numpy()[k] - exact[k].astype(np.float64))
            assert (err <= 2.0**-30 * dd).all(), (trial, float((err / dd).max()))
        # and the windows it refines come out as the two-pass ones
        got = [v.clone() for v in (vx, vy, vxy)]
        mod._refine_windows(a, b, m[:, 2] + m[:, 3], *got, c2, p)
        for g, exact in zip(got, ex, strict=True):
            assert np.allclose(g[0].numpy(), exact.astype(np.float64), rtol=1e-9, atol=1e-9 * float(c2))
        checked += int(k.sum())
        refined += int((~k).sum())
    assert checked > 1000 and refined > 300  # (both kinds of window were exercised)


def test_the_reference_keeps_ssims_input_rules() -> None:
    """ssim_reference said it had ssim's conventions, but took x and y of different dtypes (the dtype range
    then x's alone, so ref(u8, f32) != ref(f32, u8)), returned NaN without a word where ssim raises (values
    around 1e78, data_range 1e200), and failed inside torch on float8 images, which ssim takes."""
    rng = np.random.default_rng(0)
    a = rng.random((12, 12))
    with pytest.raises(TypeError, match="x and y must have the same dtype"):
        ssim_reference((a * 255).astype(np.uint8), a.astype(np.float32))
    for kw, x, y in (({}, a * 1e78, rng.random((12, 12)) * 1e78), ({"data_range": 1e200}, a, a[::-1].copy())):
        with pytest.raises(ValueError):
            ssim(x, y, **kw)
        with pytest.raises(ValueError, match="has no finite SSIM in float64"):
            ssim_reference(x, y, **kw)
    x8 = torch.from_numpy(a.astype(np.float32)).to(torch.float8_e4m3fn)
    y8 = torch.from_numpy(a[::-1].copy().astype(np.float32)).to(torch.float8_e4m3fn)
    assert float(ssim_reference(x8, y8)) == pytest.approx(float(ssim(x8, y8)), abs=1e-6)


def test_pairs_with_no_c2_are_not_taken_again_window_by_window() -> None:
    """Two equal constant images (range 0, so C2 = 0) score 1 whatever their windows; the two-pass step took
    every window of such a pair again (a 3D pair of constant volumes: millions of gathers) for nothing."""
    import importlib

    import deepssim_fast._ssim_common as sc

    mod = importlib.import_module("deepssim_fast.ssim")
    p = sc.resolve_params(ndim=2, spatial_dims=2, window="uniform", win_size=None, sigma=1.5, data_range=None,
                          k1=0.01, k2=0.03, sample_covariance=True, preset=None, shapes={"x": (9, 9), "y": (9, 9)})
    a = torch.zeros(1, 9, 9, dtype=torch.float64)
    sentinel = torch.full((1, 3, 3), -5.0, dtype=torch.float64)
    vx, vy, vxy = sentinel.clone(), sentinel.clone(), sentinel.clone()
    mod._refine_windows(a, a, torch.zeros(1, 3, 3, dtype=torch.float64), vx, vy, vxy,
                        torch.zeros(1, 1, 1, dtype=torch.float64), p)
    assert torch.equal(vx, sentinel) and torch.equal(vxy, sentinel)
    x = np.full((2, 20, 20), 7.0)
    assert np.array_equal(np.asarray(ssim(x, x, spatial_dims=2, backend="torch")), np.ones(2, np.float32))
