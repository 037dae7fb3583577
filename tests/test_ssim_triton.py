"""ssim with backend="triton": the fused Triton kernel under TRITON_INTERPRET=1 on CPU tensors.

The interpreter must be on before Triton is imported and the rest of the suite must not run interpreted,
so the checks run in a fresh interpreter (subprocess) with the variable set. The script prints one JSON
object with every comparison; the tests below assert on it. Shapes are small (the interpreter is slow).
"""

from __future__ import annotations

import json
import textwrap

import _prestart
import pytest

pytest.importorskip("triton")
pytest.importorskip("skimage")

_SCRIPT = textwrap.dedent(r"""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import numpy as np
    import torch
    from skimage.metrics import structural_similarity as sk
    from deepssim_fast import data
    from deepssim_fast.reference import ssim_reference
    from deepssim_fast.ssim import ssim, ssim_matrix

    GAUSS = dict(window="gaussian", sample_covariance=False)
    res = {}

    # count the SSIM kernel's launches (each record holds those since the previous one): results must come
    # from the Triton kernel, not from a fallback that computes the same numbers
    from deepssim_fast.kernels import ssim as ks_mod
    from _triton_launches import count_launches
    LAUNCHES = count_launches(ks_mod, "_ssim_kernel")
    LAST = [0]  # the count at the last record

    def oracle(x, y, window="uniform", preset=None, dr=None):
        x = x.astype(np.float64); y = y.astype(np.float64)
        if preset == "deepssim":
            x = (x - x.mean()) / x.std(); y = (y - y.mean()) / y.std(); dr = x.max() - x.min()
        elif dr is None:
            dr = max(x.max(), y.max()) - min(x.min(), y.min())
        kw = {} if window != "gaussian" else dict(gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False)
        return sk(x, y, data_range=dr, **kw)

    def record(name, got, want, ref=None):
        got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        want = np.asarray(want, dtype=np.float64)
        res[name] = dict(shape=list(got.shape), want_shape=list(want.shape), dtype=str(got.dtype),
                         err=float(np.abs(got - want).max()) if got.size else 0.0,
                         ref_err=None if ref is None else float(np.abs(got - np.asarray(ref)).max()),
                         launches=LAUNCHES[0] - LAST[0])
        LAST[0] = LAUNCHES[0]

    sl = [s.array for s in data.real_slices((19, 23), datasets=["mni152"])]
    sl = [a for a in sl if a[4:15, 4:19].std() > 0]
    sl = sl[::len(sl) // 4][:4]
    X = torch.from_numpy(np.stack(sl))
    Y = torch.flip(X, dims=(-1,)) + 0.02 * X.std() * torch.from_numpy(
        np.random.default_rng(0).standard_normal(X.shape).astype(np.float32))
    for mode, kw in (("uniform", {}), ("gaussian", GAUSS), ("deepssim", dict(preset="deepssim"))):
        got = ssim(X, Y, spatial_dims=2, backend="triton", **kw)
        want = [oracle(a.numpy(), b.numpy(), window="gaussian" if mode == "gaussian" else "uniform",
                       preset="deepssim" if mode == "deepssim" else None) for a, b in zip(X, Y)]
        record("real_" + mode, got, want, ssim_reference(X, Y, spatial_dims=2, **kw))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 9)).astype(np.float32)
    y = (x + rng.standard_normal(x.shape)).astype(np.float32)
    record("odd_7x9", ssim(torch.from_numpy(x), torch.from_numpy(y), spatial_dims=2, backend="triton"),
           [oracle(a, b) for a, b in zip(x, y)])
    xu = rng.integers(0, 256, (2, 9, 11)).astype(np.uint8)
    yu = rng.integers(0, 256, (2, 9, 11)).astype(np.uint8)
    record("uint8", ssim(torch.from_numpy(xu), torch.from_numpy(yu), spatial_dims=2, backend="triton"),
           [oracle(a, b, dr=255.0) for a, b in zip(xu, yu)])
    for dt in (torch.float16, torch.bfloat16):
        xh, yh = X[:2].to(dt), Y[:2].to(dt)
        record(str(dt), ssim(xh, yh, spatial_dims=2, backend="triton"),
               [oracle(a.double().numpy(), b.double().numpy()) for a, b in zip(xh, yh)])
    # one-vs-many broadcasting and a (2, 2) batch
    record("broadcast", ssim(X[0], X, spatial_dims=2, backend="triton"),
           [oracle(X[0].numpy(), b.numpy()) for b in X])
    record("batch_2x2", ssim(X.reshape(2, 2, 19, 23), Y.reshape(2, 2, 19, 23), spatial_dims=2,
                             backend="triton"),
           np.array([oracle(a.numpy(), b.numpy()) for a, b in zip(X, Y)]).reshape(2, 2))
    # non-contiguous input
    record("strided", ssim(X.transpose(1, 2), Y.transpose(1, 2), spatial_dims=2, backend="triton"),
           [oracle(a.T.numpy(), b.T.numpy()) for a, b in zip(X, Y)])
    # 3D: a real volume crop (odd sides), uniform and gaussian
    vol = data.load_volume("anatomical").array[:13, :12, :11].copy()
    V = torch.from_numpy(vol); W = torch.flip(V, dims=(0,))
    record("3d_uniform", ssim(V, W, spatial_dims=3, backend="triton"), oracle(vol, vol[::-1]))
    record("3d_gaussian", ssim(V, W, spatial_dims=3, backend="triton", **GAUSS),
           oracle(vol, vol[::-1], "gaussian"))
    # constant identical images -> 1; empty batch
    c = torch.full((1, 9, 9), 2.0)
    record("constant", ssim(c, c.clone(), spatial_dims=2, backend="triton"), [1.0])
    record("empty", ssim(torch.zeros(0, 9, 9), torch.zeros(0, 9, 9), spatial_dims=2, backend="triton"),
           np.zeros(0))
    # ssim_matrix on the triton backend equals the native matrix
    m = ssim_matrix(X[:2], Y[:3], backend="triton", progress=False)
    record("matrix", m, ssim_matrix(X[:2].numpy(), Y[:3].numpy(), progress=False))
    # both kernel variants on shapes that span several tiles in each direction (small tiles), real MRI
    import deepssim_fast.kernels.ssim as ks
    from deepssim_fast import _ssim_common as sc
    from kernels import aot

    def params(sd, gauss, preset=None):
        return sc.resolve_params(ndim=sd + 1, spatial_dims=sd, window="gaussian" if gauss else "uniform",
                                 win_size=11 if gauss else 7, sigma=1.5, data_range=None, k1=0.01, k2=0.03,
                                 sample_covariance=not gauss, preset=preset)

    big = [s.array for s in data.real_slices((37, 45), datasets=["mni152"])]
    big = [a for a in big if a.std() > 0][::9][:3]
    BX = torch.from_numpy(np.stack(big))
    BY = torch.flip(BX, dims=(-2,)) + 0.05 * BX.std() * torch.from_numpy(
        np.random.default_rng(2).standard_normal(BX.shape).astype(np.float32))
    bi = torch.arange(3)
    vol2 = data.load_volume("anatomical").array[8:25, 10:33, 3:22].copy()  # 17 x 23 x 19
    V2 = torch.from_numpy(vol2)[None]; W2 = torch.flip(V2, dims=(2,))
    for gauss in (False, True):
        name = "gaussian" if gauss else "uniform"
        want2 = [oracle(a.numpy(), b.numpy(), window=name) for a, b in zip(BX, BY)]
        if not gauss:
            want2_uniform = want2
        want3 = oracle(vol2, vol2[:, ::-1], name)
        for variant, block in (("separable", (16, 16)), ("separable", (16, 32)), ("direct", (8, 16))):
            tag = f"{variant}_{block[0]}x{block[1]}_{name}"
            record("tiles2d_" + tag, ks.ssim_pairs(BX, BY, bi, bi, params(2, gauss), variant=variant,
                                                   block=block).float(), want2)
            if variant == "direct":  # K^3 taps per output: slow interpreted, so a thin uniform slab only
                if not gauss:
                    record("tiles3d_" + tag, ks.ssim_pairs(V2[:, :9], W2[:, :9], bi[:1], bi[:1], params(3, False),
                                                           variant=variant, block=block).float(),
                           [oracle(vol2[:9], vol2[:9, ::-1], name)])
                continue
            record("tiles3d_" + tag, ks.ssim_pairs(V2, W2, bi[:1], bi[:1], params(3, gauss), variant=variant,
                                                   block=block).float(), [want3])
    want_p = ssim_reference(BX, BY, spatial_dims=2, preset="deepssim")
    for variant in ks.VARIANTS:
        record("tiles2d_deepssim_" + variant, ks.ssim_pairs(BX, BY, bi, bi, params(2, False, "deepssim"),
                                                            variant=variant, block=(16, 16)).float(), want_p)
    # ssim_matrix with per-image moment reuse (mode 1 maps, mode 2 cross terms) on multi-tile real slices,
    # both windows and the preset, and 3D; equal to the native matrix
    for tag, kw in (("uniform", {}), ("gaussian", GAUSS), ("deepssim", dict(preset="deepssim"))):
        record("matrix_tiles_" + tag, ssim_matrix(BX[:2], BY, backend="triton", progress=False, **kw),
               ssim_matrix(BX[:2].numpy(), BY.numpy(), progress=False, **kw))
    V3 = torch.from_numpy(np.stack([vol2, vol2[:, ::-1].copy()]))
    record("matrix_3d", ssim_matrix(V3, V3[:1], spatial_dims=3, backend="triton", progress=False),
           ssim_matrix(V3.numpy(), V3[:1].numpy(), spatial_dims=3, progress=False))
    with aot.record_launches(ks, "_ssim_kernel") as rec:
        ks.ssim_matrix_block(BX[:2], BY, params(2, False))
    res["matrix_modes"] = [int(r.kwargs["MODE"]) for r in rec]
    os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = "direct"
    with aot.record_launches(ks, "_ssim_kernel") as rec:
        try:
            ssim_matrix(BX[:2], BY, backend="triton", progress=False)
        except Exception:  # the recorder computes nothing; only the launches matter here
            pass
    res["matrix_modes_direct"] = [int(r.kwargs["MODE"]) for r in rec]
    del os.environ["DEEPSSIM_FAST_TRITON_SSIM"]
    # which kernel runs: the default, and DEEPSSIM_FAST_TRITON_SSIM=direct
    def launched():
        with aot.record_launches(ks, "_ssim_kernel") as rec:
            ks.ssim_pairs(BX, BY, bi, bi, params(2, False))
        sep = sum(bool(r.kwargs["SEPARABLE"]) for r in rec)
        return [sep, len(rec) - sep]
    res["launched_default"] = launched()
    os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = "direct"
    res["launched_env_direct"] = launched()
    del os.environ["DEEPSSIM_FAST_TRITON_SSIM"]
    errors = []
    for kw in (dict(variant="fast"), dict(variant="separable", block=(24, 32)),
               dict(variant="separable", block=(4, 32)), dict(variant="direct", block=(3, 5))):
        try:
            ks.ssim_pairs(BX, BY, bi, bi, params(2, False), **kw)
            errors.append("")
        except ValueError as exc:
            errors.append(str(exc))
    res["bad_options"] = errors
    # grids past CUDA's 65535 tiles (y) or planes (z) run in several launches, each from its first tile and
    # plane: the limit lowered to 2 here, so every shape below takes several launches of both kinds
    ks.MAX_GRID_YZ = 2
    with aot.record_launches(ks, "_ssim_kernel") as rec:
        ks.ssim_pairs(V2[:, :9], W2[:, :9], bi[:1], bi[:1], params(3, False), block=(16, 16))
    res["split_grids"] = [list(r.grid) for r in rec]
    record("split_2d_separable", ks.ssim_pairs(BX[:2], BY[:2], bi[:2], bi[:2], params(2, False),
                                               block=(16, 16)).float(), want2_uniform[:2])
    record("split_2d_direct", ks.ssim_pairs(BX[:2], BY[:2], bi[:2], bi[:2], params(2, False), variant="direct",
                                            block=(8, 16)).float(), want2_uniform[:2])
    record("split_3d_separable", ks.ssim_pairs(V2[:, :9], W2[:, :9], bi[:1], bi[:1], params(3, False),
                                               block=(16, 16)).float(), [oracle(vol2[:9], vol2[:9, ::-1])])
    record("split_matrix_block", ks.ssim_matrix_block(BX[:2], BY[:2], params(2, False), block=(16, 16)).float(),
           ssim_matrix(BX[:2].numpy(), BY[:2].numpy(), progress=False))
    ks.MAX_GRID_YZ = 65535
    # preset deepssim far from 0 (float32 + 1e3, 1e4): z-scores computed in float64, as accurate as native
    rng = np.random.default_rng(5)
    X0 = rng.random((2, 12, 13)).astype(np.float32)
    Y0 = (X0 + 0.3 * rng.random(X0.shape)).astype(np.float32)
    for off in (0, 1000, 10000):
        xo, yo = (X0 * 100 + off).astype(np.float32), (Y0 * 100 + off).astype(np.float32)
        record(f"deepssim_offset_{off}", ssim(torch.from_numpy(xo), torch.from_numpy(yo), spatial_dims=2,
                                             backend="triton", preset="deepssim"),
               ssim_reference(xo, yo, spatial_dims=2, preset="deepssim"))
        record(f"deepssim_offset_{off}_matrix", ssim_matrix(torch.from_numpy(xo), torch.from_numpy(yo),
                                                            backend="triton", preset="deepssim", progress=False),
               ssim_reference(xo[:, None], yo[None], spatial_dims=2, preset="deepssim"))
    # float32 data with a large offset against a small spread (1e4 + [0, 1)): the kernel centres each image on
    # its minimum, so the window sums see only the spread (centred on 0 it was 1.6e-5 to 6.6e-5 off)
    for off in (1e4, 3e4):
        xo = (off + X0).astype(np.float32); yo = (off + Y0 / 1.3).astype(np.float32)
        for w, kw in (("uniform", {}), ("gaussian", GAUSS)):
            for v in ("separable", "direct"):
                os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = v
                record(f"f32_offset_{int(off)}_{w}_{v}",
                       ssim(torch.from_numpy(xo), torch.from_numpy(yo), spatial_dims=2, backend="triton", **kw),
                       ssim_reference(xo, yo, spatial_dims=2, **kw))
            os.environ.pop("DEEPSSIM_FAST_TRITON_SSIM")
            record(f"f32_offset_{int(off)}_{w}_matrix",
                   ssim_matrix(torch.from_numpy(xo), torch.from_numpy(yo), backend="triton", progress=False, **kw),
                   ssim_reference(xo[:, None], yo[None], spatial_dims=2, **kw))
    # data of range ~1e-9 (ADC maps in m^2/s): the formula's numerator and denominator (~range^4) went
    # subnormal in float32 (2e-3 off at 3e-11); each factor is now scaled by a power of two ~ 1 / range^2
    for scale in (1e-10, 3e-11):
        xt = (X0 * scale).astype(np.float32); yt = (Y0 * scale).astype(np.float32)
        for w, kw in (("uniform", {}), ("gaussian", GAUSS)):
            for v in ("separable", "direct"):
                os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = v
                record(f"tiny_range_{scale:g}_{w}_{v}",
                       ssim(torch.from_numpy(xt), torch.from_numpy(yt), spatial_dims=2, backend="triton", **kw),
                       [oracle(a, b, window=w) for a, b in zip(xt, yt)])
            os.environ.pop("DEEPSSIM_FAST_TRITON_SSIM")
            record(f"tiny_range_{scale:g}_{w}_matrix",
                   ssim_matrix(torch.from_numpy(xt), torch.from_numpy(yt), backend="triton", progress=False, **kw),
                   ssim_reference(xt[:, None], yt[None], spatial_dims=2, **kw))
    # window statistics past float32 (values ~1e19): inf over a scaled, finite numerator scored 0 (0.46 off);
    # such outputs are NaN and the pair is recomputed in float64
    xh = (rng.standard_normal((2, 12, 13)) * 1e19).astype(np.float32)
    yh = (0.5 * xh + 5e18 * rng.standard_normal(xh.shape)).astype(np.float32)
    for v in ("separable", "direct"):
        os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = v
        record(f"stats_past_float32_{v}",
               ssim(torch.from_numpy(xh), torch.from_numpy(yh), spatial_dims=2, backend="triton", **GAUSS),
               [oracle(a, b, window="gaussian") for a, b in zip(xh, yh)])
    os.environ.pop("DEEPSSIM_FAST_TRITON_SSIM")
    # float64 far from 0 (float32 would round it by 5e-4 of its range): computed in float64, pairs and matrix
    xd = 1e4 + rng.random((2, 12, 13)); yd = xd + 0.1 * rng.random(xd.shape)
    record("float64_offset", ssim(torch.from_numpy(xd), torch.from_numpy(yd), spatial_dims=2, backend="triton"),
           ssim_reference(xd, yd, spatial_dims=2))
    record("float64_offset_matrix", ssim_matrix(torch.from_numpy(xd), torch.from_numpy(yd), backend="triton",
                                                progress=False),
           ssim_reference(xd[:, None], yd[None], spatial_dims=2))
    # int64 (numpy's default integer) uses its dtype range, bool images count as {0, 1}: as scikit-image
    xi = rng.integers(0, 200, (2, 12, 13)); yi = np.clip(xi + rng.integers(-30, 30, xi.shape), 0, 255)
    record("int64_range", ssim(torch.from_numpy(xi), torch.from_numpy(yi), spatial_dims=2, backend="triton"),
           [sk(a, b) for a, b in zip(xi, yi)])
    xw = rng.integers(-2**62, 2**62, (2, 12, 13)); yw = np.where(rng.random(xw.shape) < 0.3, -xw, xw)
    record("int64_wide", ssim(torch.from_numpy(xw), torch.from_numpy(yw), spatial_dims=2, backend="triton"),
           [sk(a, b) for a, b in zip(xw, yw)])
    xb = rng.random((2, 12, 13)) > 0.5; yb = xb.copy(); yb[:, 0] = ~yb[:, 0]
    record("bool", ssim(torch.from_numpy(xb), torch.from_numpy(yb), spatial_dims=2, backend="triton"),
           [sk(a, b) for a, b in zip(xb, yb)])
    # finite float32 values near the float32 limit (the fp32 kernel overflows): recomputed in float64
    xl = (rng.random((2, 12, 13)) * 1e37).astype(np.float32); yl = (0.5 * xl + 1e36).astype(np.float32)
    record("large_finite", ssim(torch.from_numpy(xl), torch.from_numpy(yl), spatial_dims=2, backend="triton"),
           [oracle(a, b) for a, b in zip(xl, yl)])
    # a data range far below the images' span (1000 +- 1e-3 with one 0-valued pixel, data_range=0.01): the fp32
    # window means kept to an ulp of 1000 were 2e-4 to 4e-4 off float64; such pairs now run in float64
    nz = np.random.default_rng(0).standard_normal((3, 20, 21))
    xs = (1000 + 1e-3 * nz[:2]).astype(np.float32); ys = (1000 + 1e-3 * (0.7 * nz[:2] + 0.3 * nz[2])).astype(np.float32)
    xs[:, 9, 9] = ys[:, 9, 9] = 0
    for w, kw in (("uniform", {}), ("gaussian", GAUSS)):
        want = np.asarray(ssim(xs, ys, spatial_dims=2, data_range=0.01, backend="torch", **kw))
        record(f"span_{w}", ssim(torch.from_numpy(xs), torch.from_numpy(ys), spatial_dims=2, data_range=0.01,
                                 backend="triton", **kw), want)
        record(f"span_{w}_matrix", np.diag(np.asarray(ssim_matrix(torch.from_numpy(xs), torch.from_numpy(ys),
                                                                 data_range=0.01, backend="triton", progress=False,
                                                                 **kw))), want)
    # variation of the order of sqrt(C2) at a span just under the float64 switch as it was (32768 sqrt(C2)):
    # 3000 +- 0.09 with one 0-valued pixel, Gaussian window, scored 1.5e-5 off float64; the switch is at 8192 now
    nz = np.random.default_rng(106).standard_normal((3, 24, 24))
    xs = (3000 + 0.09 * nz[:2]).astype(np.float32); ys = (3000 + 0.09 * (0.7 * nz[:2] + 0.3 * nz[2])).astype(np.float32)
    xs[:, 9, 9] = ys[:, 9, 9] = 0
    dr = 3000 / (0.03 * 32768) * 1.001
    for w, kw in (("uniform", {}), ("gaussian", GAUSS)):
        want = ssim_reference(xs.astype(np.float64), ys.astype(np.float64), spatial_dims=2, data_range=dr, **kw)
        record(f"span_sqrt_c2_{w}", ssim(torch.from_numpy(xs), torch.from_numpy(ys), spatial_dims=2, data_range=dr,
                                         backend="triton", **kw), want)
    f = rng.random((2, 12, 13)); f[1] *= 1e300
    try:
        ssim(torch.from_numpy(f), torch.from_numpy(0.5 * f), spatial_dims=2, backend="triton")
        res["float64_overflow_error"] = ""
    except ValueError as exc:
        res["float64_overflow_error"] = str(exc)
    # NaN naming the pair index
    bad = Y.clone(); bad[2, 3, 4] = float("nan")
    try:
        ssim(X, bad, spatial_dims=2, backend="triton")
        res["nan_error"] = ""
    except ValueError as exc:
        res["nan_error"] = str(exc)
    # ssim_matrix in tiles of 2 x 2 images: a NaN/Inf image is named by its index in A or B, not in its tile,
    # on the moment-reuse blocks and on the pair kernel (DEEPSSIM_FAST_TRITON_SSIM=direct). Last: it
    # launches kernels that no record() counts.
    import importlib; ssim_mod = importlib.import_module("deepssim_fast.ssim")  # (the package rebinds .ssim)
    ssim_mod._MATRIX_TILE_IMAGES = 2
    TA = torch.from_numpy(rng.random((3, 12, 13)).astype(np.float32)); TB = TA.flip(-1)
    res["matrix_tile_errors"] = []
    for v in ("separable", "direct"):
        os.environ["DEEPSSIM_FAST_TRITON_SSIM"] = v
        for side, bad in (("A", float("nan")), ("B", float("inf"))):
            a, b = TA.clone(), TB.clone()
            (a if side == "A" else b)[2, 3, 4] = bad
            try:
                ssim_matrix(a, b, backend="triton", progress=False)
                res["matrix_tile_errors"].append("")
            except ValueError as exc:
                res["matrix_tile_errors"].append(str(exc))
    del os.environ["DEEPSSIM_FAST_TRITON_SSIM"]
    print("RESULT " + json.dumps(res))
""")


# (the interpreted checks run beside the suite from its start: _prestart)
_prestart.register("ssim_triton_interpreted", wanted_by=_prestart.uses(__name__, fixture="results"),
                   make=_prestart.interpreted_script(_SCRIPT), timeout=600)


@pytest.fixture(scope="module")
def results():
    proc, _ = _prestart.result("ssim_triton_interpreted")
    assert proc.returncode == 0, (
        f"interpreted Triton checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


CASES = [
    "real_uniform",
    "real_gaussian",
    "real_deepssim",
    "odd_7x9",
    "uint8",
    "torch.float16",
    "torch.bfloat16",
    "broadcast",
    "batch_2x2",
    "strided",
    "3d_uniform",
    "3d_gaussian",
    "constant",
    "empty",
    "matrix",
    "matrix_tiles_uniform",
    "matrix_tiles_gaussian",
    "matrix_tiles_deepssim",
    "matrix_3d",
    "tiles2d_deepssim_separable",
    "tiles2d_deepssim_direct",
    "int64_range",
    "int64_wide",
    "bool",
    "large_finite",
    "stats_past_float32_separable",
    "stats_past_float32_direct",
] + [f"tiles{sd}d_{v}_{w}" for sd in (2, 3) for v in ("separable_16x16", "separable_16x32", "direct_8x16")
     for w in ("uniform", "gaussian") if not (sd == 3 and v.startswith("direct") and w == "gaussian")]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_skimage(results, case):
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["dtype"] == "float32", r
    assert r["err"] <= 1e-5, f"{case}: max |triton - oracle| = {r['err']:.3g}"
    if r["ref_err"] is not None:
        assert r["ref_err"] <= 1e-5, f"{case}: max |triton - reference| = {r['ref_err']:.3g}"


def test_every_result_came_from_the_triton_kernel(results):
    """Each case launched the kernel (a float64 fallback would give the same numbers), except the ones that
    must not: no pairs, and float64 images float32 cannot hold (computed in float64 by design)."""
    by_design = {"empty", "float64_offset", "float64_offset_matrix"}
    cases = {k: v for k, v in results.items() if isinstance(v, dict) and "launches" in v}
    assert len(cases) > 50
    for name, r in cases.items():
        if name in by_design:
            assert r["launches"] == 0, (name, r)
        else:
            assert r["launches"] >= 1, (name, r)
    # ssim_matrix reuses moments: a map launch per side plus the pair launch
    assert all(r["launches"] == 3 for n, r in cases.items() if n.endswith("matrix") and n not in by_design)


def test_triton_nan_names_the_pair(results):
    assert "y has NaN or Inf values at pair index (2,)" in results["nan_error"]


def test_triton_matrix_nan_inf_names_the_image_of_A_or_B_in_any_tile(results):
    # A[2] and B[2] sit in the second tile of 2 images (they were named (0,), their position in it)
    want = ["A[2] has NaN or Inf values", "B[2] has NaN or Inf values"]
    assert results["matrix_tile_errors"] == want * 2  # moment reuse (separable), then the direct pair kernel


def test_separable_is_the_default_and_the_environment_selects_direct(results):
    # [separable launches, direct launches] for one call
    assert results["launched_default"] == [1, 0]
    assert results["launched_env_direct"] == [0, 1]


def test_bad_variant_or_block_is_refused_with_the_reason(results):
    unknown, not_pow2, too_small, direct_not_pow2 = results["bad_options"]
    assert "variant: expected one of ('separable', 'direct')" in unknown
    assert "powers of two and at least 7" in not_pow2
    assert "powers of two and at least 7" in too_small
    # (the direct kernel's block reached tl.arange unchecked: "arange's range must be a power of 2", an
    # interpreter error, or a compilation error on a GPU)
    assert "direct block (3, 5): both sides must be powers of two" in direct_not_pow2


@pytest.mark.parametrize("case", ["split_2d_separable", "split_2d_direct", "split_3d_separable", "split_matrix_block"])
def test_grids_past_the_cuda_limit_run_in_several_launches(results, case):
    """CUDA grids take at most 65535 on y (tiles of a plane) and z (output planes); past that a plane (a 2D
    image over ~10^4 x 10^4 pixels) used to be refused. Now the launcher splits the grid, each launch starting
    at its first tile and plane. With the limit lowered to 2, the split results equal the oracle."""
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["launches"] > 1, r
    assert r["err"] <= 1e-5, f"{case}: max |triton - oracle| = {r['err']:.3g}"
    grids = results["split_grids"]  # the 3D case: 4 tiles x 3 planes in launches of at most 2 x 2
    assert len(grids) == 4 and all(g[1] <= 2 and g[2] <= 2 for g in grids), grids
    assert sum(g[1] * g[2] for g in grids) == 4 * 3, grids


def test_a_2d_image_past_65535_tiles_is_split_not_refused():
    """A 10000 x 10000 image (66605 tiles of the separable kernel, 2.3x more for the direct one) launches in
    grids within CUDA's limits; a plane too large for the kernel's int32 offsets is refused with the reason.
    Recorded on the meta device: nothing is allocated or run."""
    import torch

    from deepssim_fast import _ssim_common as sc
    from deepssim_fast.kernels import aot
    from deepssim_fast.kernels import ssim as ks

    p = sc.resolve_params(ndim=2, spatial_dims=2, window="uniform", win_size=7, sigma=1.5, data_range=None,
                          k1=0.01, k2=0.03, sample_covariance=True, preset=None)
    x = torch.empty(1, 10000, 10000, device="meta")
    i = torch.zeros(1, dtype=torch.int64, device="meta")
    for variant in ks.VARIANTS:
        with aot.record_launches(ks, "_ssim_kernel") as rec:
            ks.ssim_pairs(x, x, i, i, p, variant=variant)
        n_tiles = rec[0].args[21]
        assert n_tiles > 65535 and len(rec) > 1
        assert all(r.grid[1] <= 65535 and r.grid[2] <= 65535 for r in rec)
        assert [r.args[23] for r in rec] == list(range(0, n_tiles, 65535))  # tile0 of each launch
    with pytest.raises(ValueError, match="int32 in-plane offsets"):
        ks.ssim_pairs(torch.empty(1, 50000, 50000, device="meta"), torch.empty(1, 50000, 50000, device="meta"),
                      i, i, p)


def test_triton_matrix_reuses_moments_unless_direct(results):
    # one tile: the A maps (mode 1), the B maps (mode 1), then the cross terms of every pair (mode 2)
    assert results["matrix_modes"] == [1, 1, 2]
    # the direct variant has no moment maps: every pair in full (mode 0)
    assert results["matrix_modes_direct"] == [0]


@pytest.mark.parametrize("case", [f"deepssim_offset_{off}{m}" for off in (0, 1000, 10000) for m in ("", "_matrix")])
def test_triton_deepssim_far_from_zero_is_as_accurate_as_native(results, case):
    # z-scores centred on the float32-rounded mean were 5e-5 off at +1e4; native is ~3e-7 off
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["err"] <= 1e-6, f"{case}: max |triton - reference| = {r['err']:.3g}"


@pytest.mark.parametrize("case", [f"f32_offset_{o}_{w}_{v}" for o in (10000, 30000) for w in ("uniform", "gaussian")
                                  for v in ("separable", "direct", "matrix")])
def test_triton_float32_far_from_zero_keeps_the_spread(results, case):
    # the float32 kernels' own rounding is ~1e-7 to 5e-7 at any offset (direct Gaussian: 2e-7 at offset 0);
    # centred on 0 the offset cost 1.6e-5 to 6.6e-5
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["err"] <= 1e-6, f"{case}: max |triton - reference| = {r['err']:.3g}"


@pytest.mark.parametrize("case", [f"tiny_range_{s}_{w}_{v}" for s in ("1e-10", "3e-11") for w in ("uniform", "gaussian")
                                  for v in ("separable", "direct", "matrix")])
def test_triton_tiny_ranges_keep_float32_accuracy(results, case):
    # range ~1e-9 to 1e-10: the formula's products went subnormal in float32 (up to 2e-3 off scikit-image);
    # scaled by a power of two ~ 1 / range^2 they keep the kernel's own rounding (~1e-7)
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["err"] <= 1e-6, f"{case}: max |triton - oracle| = {r['err']:.3g}"


@pytest.mark.parametrize("case", ["span_uniform", "span_gaussian", "span_uniform_matrix", "span_gaussian_matrix",
                                  "span_sqrt_c2_uniform", "span_sqrt_c2_gaussian"])
def test_triton_a_data_range_far_below_the_span_is_scored_as_float64_scores_it(results, case):
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["err"] <= 1e-6, f"{case}: max |triton - float64| = {r['err']:.3g}"


@pytest.mark.parametrize("case", ["float64_offset", "float64_offset_matrix"])
def test_triton_float64_far_from_zero_is_computed_in_float64(results, case):
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["err"] <= 2e-7, f"{case}: max |triton - reference| = {r['err']:.3g}"


def test_triton_values_beyond_float64_raise_naming_the_pair(results):
    msg = results["float64_overflow_error"]
    assert "pair index (1,) cannot be scored" in msg and "too large" in msg, msg


def test_a_bad_variant_in_the_environment_names_the_variable(monkeypatch) -> None:
    """DEEPSSIM_FAST_TRITON_SSIM=garbage said "variant must be one of ..." to a caller who passed no variant."""
    import importlib

    k = importlib.import_module("deepssim_fast.kernels.ssim")
    monkeypatch.setenv("DEEPSSIM_FAST_TRITON_SSIM", "garbage")
    with pytest.raises(ValueError, match=r"\$DEEPSSIM_FAST_TRITON_SSIM='garbage': expected one of"):
        k.resolve_variant(None)
    monkeypatch.setenv("DEEPSSIM_FAST_TRITON_SSIM", " Direct ")
    assert k.resolve_variant(None) == "direct"
