"""ssim with backend="triton": the fused Triton kernel under TRITON_INTERPRET=1 on CPU tensors.

The interpreter must be on before Triton is imported and the rest of the suite must not run interpreted,
so the checks run in a fresh interpreter (subprocess) with the variable set. The script prints one JSON
object with every comparison; the tests below assert on it. Shapes are small (the interpreter is slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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
                         ref_err=None if ref is None else float(np.abs(got - np.asarray(ref)).max()))

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
    # NaN naming the pair index
    bad = Y.clone(); bad[2, 3, 4] = float("nan")
    try:
        ssim(X, bad, spatial_dims=2, backend="triton")
        res["nan_error"] = ""
    except ValueError as exc:
        res["nan_error"] = str(exc)
    print("RESULT " + json.dumps(res))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
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
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_skimage(results, case):
    r = results[case]
    assert r["shape"] == r["want_shape"], r
    assert r["dtype"] == "float32", r
    assert r["err"] <= 1e-5, f"{case}: max |triton - oracle| = {r['err']:.3g}"
    if r["ref_err"] is not None:
        assert r["ref_err"] <= 1e-5, f"{case}: max |triton - reference| = {r['ref_err']:.3g}"


def test_triton_nan_names_the_pair(results):
    assert "y has NaN or Inf values at pair index (2,)" in results["nan_error"]
