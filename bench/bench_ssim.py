"""Benchmark of deepssim_fast.ssim / ssim_matrix (issue 3): exact windowed SSIM against the usual tools.

Cases (every provider in the same process, same real inputs; rates compared within a case):
* 2D 256×256, 1024 pairs of neighbouring MNI152 slices (centre-fit), default convention (uniform 7,
  sample covariance, per-pair data range): deepssim_fast native vs scikit-image (loop; float32 arithmetic for
  this float32 input, only its final mean in float64; one thread; timed on fewer pairs and scaled to pairs/s,
  same per-pair range), pytorch-msssim (uniform window through ``win=``, one data range per batch, population
  covariance), MONAI ``SSIMMetric`` (uniform 7, one data range per batch, population covariance).
* 3D 160×192×160 (MNI152 centre-fit), 4 pairs: native vs scikit-image, MONAI, pytorch-msssim (uniform 7).
* In both CPU cases our native engine runs on all usable cores (its default) and again on one thread
  ("deepssim_fast native, 1 thread"): scikit-image's loop runs on one core, so that row's ratio is the
  equal-cores one and the all-cores row's ratio also counts the extra cores.
* The competitors' outputs are checked before they are timed, as ours are: each against scikit-image run with
  the competitor's settings (one data range per batch, population covariance), so a misconfigured competitor
  is refused instead of getting a ratio.
* ``ssim_matrix`` 512×512 of 128×128 slices: pairs/s, and the gain of moment reuse over calling ``ssim``
  pair by pair (the pair-by-pair route is timed on a band of rows and scaled).
* The training call: ``ssim(x, y, spatial_dims=2, preset="deepssim")`` on (32, 128, 128) float32 torch.
* ``gpu`` (only with CUDA): Triton 2D and 3D vs pytorch-msssim and MONAI on the same GPU, pairs/s and the
  fraction of the GPU's nominal FP32 peak (its spec sheet's figure, not a measured ceiling) for the
  separable-window FLOP counts of bench/gpu_suite.py's ``SSIM_FLOP`` (2D 161 / 241 per pixel, 3D 232 / 352
  per voxel, uniform 7 / Gaussian 11).

``python -m bench.bench_ssim [--quick] [--no-append] [--cases 2d 3d matrix training gpu] [--simd avx2]``
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from bench.harness import Row, append_markdown, markdown_table, run_case

logger = logging.getLogger(__name__)

CAP = "ssim"
TOL = 1e-4  # |ours - reference| allowed before a case is timed (fp32 kernels against float64 references)


def _slices(shape: tuple[int, int], n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """n_pairs pairs of neighbouring real MNI152 slices centre-fit to ``shape`` (cycled if needed)."""
    from deepssim_fast.data import real_slices

    sl = np.stack([s.array for s in real_slices(shape, datasets=["mni152"])]).astype(np.float32)
    idx = np.arange(n_pairs) % (len(sl) - 1)
    return np.ascontiguousarray(sl[idx]), np.ascontiguousarray(sl[idx + 1])


def _volumes(shape: tuple[int, int, int], n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 volume centre-fit to ``shape`` against shifted / noisy / flipped / contrast copies."""
    from deepssim_fast.data import center_fit, load_volume

    v = center_fit(load_volume("mni152").array, shape).astype(np.float32)
    rng = np.random.default_rng(0)
    ys = [
        np.roll(v, 2, axis=0),
        v + rng.normal(0, 0.05 * v.std(), v.shape).astype(np.float32),
        v[:, ::-1].copy(),
        1.5 * v + 10.0,
    ]
    y = np.stack([ys[i % len(ys)] for i in range(n_pairs)]).astype(np.float32)
    return np.ascontiguousarray(np.broadcast_to(v, y.shape)), y


def _pair_ranges(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    b = x.shape[0]
    fx, fy = x.reshape(b, -1), y.reshape(b, -1)
    return (np.maximum(fx.max(1), fy.max(1)) - np.minimum(fx.min(1), fy.min(1))).astype(np.float64)


def check_close(name: str, ours: object, ref: object, tol: float) -> None:
    """Raise ``AssertionError`` unless ``ours`` equals the reference ``ref`` within ``tol`` everywhere
    (run before a provider is timed: a fast wrong answer gets no ratio)."""
    a = np.asarray(ours.cpu() if isinstance(ours, torch.Tensor) else ours, dtype=np.float64)
    b = np.asarray(ref.cpu() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {a.shape}, reference {b.shape}")
    err = np.abs(a - b)
    if not np.all(err <= tol):  # (NaN fails too)
        i = np.unravel_index(int(np.argmax(np.where(np.isnan(err), np.inf, err))), err.shape)
        raise AssertionError(f"{name}: {a[i]!r} at {i}, reference {b[i]!r} (|diff| {err[i]:.3g} > {tol:g})")


def spread(n: int, k: int) -> np.ndarray:
    """``k`` indices (fewer when ``n < k``) spread over ``range(n)``, first and last included: the pairs at which
    a batch is checked (checks of a batch's first pairs let a fault in its later ones through)."""
    return np.unique(np.linspace(0, n - 1, max(1, min(n, k))).astype(int))


@contextmanager
def threads(n: int) -> Iterator[None]:
    """The native loops and torch's intra-op pool on ``n`` threads inside; the caller's counts restored after
    (the native override, 0 when none was set: DEEPSSIM_FAST_NUM_THREADS or the usable cores decide again)."""
    from deepssim_fast import _native

    saved_native, saved_torch = _native.num_threads_override(), torch.get_num_threads()
    _native.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        _native.set_num_threads(saved_native)
        torch.set_num_threads(saved_torch)


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run on one thread (native and torch), for the equal-cores row: scikit-image's loop uses one core."""

    def call() -> object:
        with threads(1):
            return fn()

    return call


ONE_THREAD = "deepssim_fast native, 1 thread"


def _notes_threads() -> dict[str, str]:
    """Notes of the rows that say how many cores each side used (the ratios to scikit-image are of wall time)."""
    from deepssim_fast import _native

    return {
        "deepssim_fast native": f"{_native.num_threads()} native threads (all usable cores)",
        ONE_THREAD: "1 thread (native and torch): the equal-cores ratio to scikit-image",
    }


def check_competitor(name: str, call: Callable[[], object], n: int, at: np.ndarray, ref: object,
                     tol: float = TOL) -> None:
    """Check a competitor's output, of the call that is timed (``n`` scores), at the pairs ``at`` against
    scikit-image run with the competitor's own settings (``ref``), before it is timed: a competitor set up with
    another window, data range or covariance is refused (``AssertionError``), as ours are, instead of getting a
    ratio. A competitor that cannot run (not installed) is left to its provider, whose row reports the error."""
    try:
        out = call()
    except Exception as exc:  # noqa: BLE001 - its own row reports it (a missing package is not a wrong value)
        logger.warning("%s not checked: %s: %s (its row reports the failure)", name, type(exc).__name__, exc)
        return
    a = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out, dtype=np.float64).reshape(-1)
    if a.size != n:
        raise AssertionError(f"{name}: {a.size} scores for {n} pairs")
    check_close(name, a[at], ref, tol)


def _skimage_population(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """scikit-image's SSIM with the competitors' settings: uniform 7, population covariance, the given range."""
    from skimage.metrics import structural_similarity

    return structural_similarity(x, y, data_range=data_range, use_sample_covariance=False)


def _case(
    case: str,
    providers: dict[str, tuple[Callable[[], object], float]],
    unit: str,
    baseline: str,
    repeat: int,
    notes: dict[str, str] | None = None,
    repeats: dict[str, int] | None = None,
) -> list[Row]:
    """Like harness.run_case, but each provider has its own work count; ratios are rate ratios."""
    rows: list[Row] = []
    for name, (fn, work) in providers.items():
        rows += run_case(
            CAP,
            case,
            {name: fn},
            work=work,
            unit=unit,
            repeat=(repeats or {}).get(name, repeat),
            notes={name: (notes or {}).get(name, "")},
        )
    base = next((r for r in rows if r.provider == baseline and r.times), None)
    for r in rows:
        r.baseline = baseline
        r.ratio = (r.rate / base.rate) if base is not None and r.times else None
    return rows


def _msssim_uniform(x: torch.Tensor, y: torch.Tensor, dr: float, spatial_dims: int) -> torch.Tensor:
    import pytorch_msssim

    win = torch.full((1, 1, 7), 1.0 / 7, dtype=x.dtype, device=x.device).repeat(
        [x.shape[1]] + [1] * (x.ndim - 1)
    )
    return pytorch_msssim.ssim(x, y, data_range=dr, win=win, size_average=False)


class _Lazy:
    """``make(*args)`` built on the first call and kept: a competitor whose package is missing (MONAI) fails in
    its own provider, a row with its error, instead of before the case, which lost every row of it (ours
    included)."""

    def __init__(self, make, *args) -> None:
        self.make, self.args, self.value = make, args, None

    def __call__(self):
        if self.value is None:
            self.value = self.make(*self.args)
        return self.value


def _monai(spatial_dims: int, dr: float, kernel: str = "uniform"):
    from monai.metrics import SSIMMetric

    return SSIMMetric(
        spatial_dims=spatial_dims,
        data_range=dr,
        kernel_type=kernel,
        win_size=7 if kernel == "uniform" else 11,
        kernel_sigma=1.5,
        reduction="none",
    )


def _cpu_2d(quick: bool) -> list[Row]:
    from skimage.metrics import structural_similarity

    from deepssim_fast.ssim import ssim

    n = 64 if quick else 1024
    x, y = _slices((256, 256), n)
    rng = _pair_ranges(x, y)
    n_sk, n_t = (4, 16) if quick else (24, 64)
    tx, ty = torch.from_numpy(x[:n_t, None]), torch.from_numpy(y[:n_t, None])
    dr = float(rng[:n_t].max())

    def skimage_loop():
        for i in range(n_sk):
            structural_similarity(x[i], y[i], data_range=rng[i])

    # checked on the outputs of the calls that are timed (a check of a 4-pair call let a batch-size bug through
    # to a published ratio), at pairs spread over the whole batch
    idx = spread(n, n_sk)
    sk = [structural_similarity(x[i], y[i], data_range=rng[i]) for i in idx]
    check_close("deepssim_fast native vs scikit-image", np.asarray(ssim(x, y, spatial_dims=2))[idx], sk, TOL)
    check_close("deepssim_fast native (1 thread) vs scikit-image",
                np.asarray(one_thread(lambda: ssim(x, y, spatial_dims=2))())[idx], sk, TOL)
    # the torch provider at pairs spread over its own (smaller) batch: it was checked at idx < n_t, its first pair
    idx_t = spread(n_t, n_sk)
    check_close("deepssim_fast torch vs scikit-image",
                np.asarray(ssim(x[:n_t], y[:n_t], spatial_dims=2, backend="torch"))[idx_t],
                [structural_similarity(x[i], y[i], data_range=rng[i]) for i in idx_t], TOL)
    monai_metric = _Lazy(_monai, 2, dr)
    providers = {
        "scikit-image (loop)": (skimage_loop, n_sk),
        "deepssim_fast native": (lambda: ssim(x, y, spatial_dims=2), n),
        ONE_THREAD: (one_thread(lambda: ssim(x, y, spatial_dims=2)), n),
        "deepssim_fast torch": (lambda: ssim(x[:n_t], y[:n_t], spatial_dims=2, backend="torch"), n_t),
        "pytorch-msssim (win=uniform 7)": (lambda: _msssim_uniform(tx, ty, dr, 2), n_t),
        "MONAI SSIMMetric (uniform 7)": (lambda: monai_metric()(tx, ty), n_t),
    }
    # the competitors too (they were timed unchecked): against scikit-image with their settings, one data range
    # for the batch and population covariance
    sk_pop = [_skimage_population(x[i], y[i], dr) for i in idx_t]
    for name in ("pytorch-msssim (win=uniform 7)", "MONAI SSIMMetric (uniform 7)"):
        check_competitor(f"{name} vs scikit-image", providers[name][0], n_t, idx_t, sk_pop)
    notes = {
        **_notes_threads(),
        "pytorch-msssim (win=uniform 7)": "one data range per batch, population covariance; checked",
        "MONAI SSIMMetric (uniform 7)": "one data range per batch, population covariance; checked",
        "scikit-image (loop)": f"{n_sk} pairs timed, per-pair data range, one thread",
    }
    return _case(
        f"2D 256x256 {n} real pairs", providers, "pairs", "scikit-image (loop)", 3 if quick else 5, notes
    )


def _cpu_3d(quick: bool) -> list[Row]:
    from skimage.metrics import structural_similarity

    from deepssim_fast.ssim import ssim

    shape = (48, 56, 48) if quick else (160, 192, 160)
    x, y = _volumes(shape, 4)
    rng = _pair_ranges(x, y)
    tx, ty = torch.from_numpy(x[:1, None]), torch.from_numpy(y[:1, None])
    check_close("deepssim_fast native 3D vs scikit-image", ssim(x, y, spatial_dims=3),  # (the timed call)
                [structural_similarity(x[i], y[i], data_range=rng[i]) for i in range(len(x))], TOL)
    check_close("deepssim_fast native 3D (1 thread) vs scikit-image",
                one_thread(lambda: ssim(x, y, spatial_dims=3))(),
                [structural_similarity(x[i], y[i], data_range=rng[i]) for i in range(len(x))], TOL)
    monai_metric = _Lazy(_monai, 3, float(rng[0]))
    providers = {
        "scikit-image": (lambda: structural_similarity(x[0], y[0], data_range=rng[0]), 1),
        "deepssim_fast native": (lambda: ssim(x, y, spatial_dims=3), 4),
        ONE_THREAD: (one_thread(lambda: ssim(x, y, spatial_dims=3)), 4),
        "MONAI SSIMMetric (uniform 7)": (lambda: monai_metric()(tx, ty), 1),
        "pytorch-msssim (win=uniform 7)": (lambda: _msssim_uniform(tx, ty, float(rng[0]), 3), 1),
    }
    sk_pop = [_skimage_population(x[0], y[0], float(rng[0]))]
    for name in ("MONAI SSIMMetric (uniform 7)", "pytorch-msssim (win=uniform 7)"):
        check_competitor(f"{name} 3D vs scikit-image", providers[name][0], 1, np.array([0]), sk_pop)
    reps = 2 if quick else 3
    return _case(
        f"3D {'x'.join(map(str, shape))} 4 pairs",
        providers,
        "pairs",
        "scikit-image",
        reps,
        notes={**_notes_threads(), "scikit-image": "one thread",
               "MONAI SSIMMetric (uniform 7)": "population covariance; checked",
               "pytorch-msssim (win=uniform 7)": "population covariance; checked"},
        repeats={"MONAI SSIMMetric (uniform 7)": reps},
    )


def _matrix(quick: bool) -> list[Row]:
    from skimage.metrics import structural_similarity

    from deepssim_fast.ssim import ssim, ssim_matrix

    n = 64 if quick else 512
    a, _ = _slices((128, 128), n)
    b = np.ascontiguousarray(a[::-1])
    band = 8 if quick else 32
    base = "ssim pair by pair (no reuse)"
    rows: list[Row] = []
    for label, kw, sk_kw, reuse in (
        ("uniform 7", {}, {}, "ssim_matrix (moment reuse, running sums)"),
        ("Gaussian 11", {"window": "gaussian", "sample_covariance": False},
         {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}, "ssim_matrix (moment reuse)"),
    ):
        rows_at = np.linspace(0, n - 1, band).astype(int)  # (rows of the timed call, over the whole matrix)
        m = np.asarray(ssim_matrix(a, b, progress=False, **kw))
        check_close(f"ssim_matrix ({label}) vs ssim pair by pair", m[rows_at],
                    ssim(a[rows_at, None], b[None], spatial_dims=2, **kw), TOL)
        # and a few entries against scikit-image (independent of both; ssim and ssim_matrix share the front end),
        # with the matrix's per-pair data range (max - min over both images)
        at = [(int(i), int(j)) for i, j in zip(rows_at[:: max(1, band // 4)], np.linspace(n - 1, 0, 4).astype(int),
                                                strict=False)]
        check_close(f"ssim_matrix ({label}) vs scikit-image", [m[i, j] for i, j in at],
                    [structural_similarity(a[i], b[j], data_range=float(_pair_ranges(a[i:i + 1], b[j:j + 1])[0]),
                                           **sk_kw) for i, j in at], TOL)
        providers = {
            base: (lambda kw=kw: ssim(a[:band, None], b[None], spatial_dims=2, **kw), band * n),
            reuse: (lambda kw=kw: ssim_matrix(a, b, progress=False, **kw), n * n),
        }
        rows += _case(f"ssim_matrix {n}x{n} of 128x128, {label}", providers, "pairs", base, 2 if quick else 3,
                      notes={base: f"{band} rows timed"})
    return rows


def _training_call(quick: bool) -> list[Row]:
    from deepssim_fast.reference import ssim_reference
    from deepssim_fast.ssim import ssim

    x, y = _slices((128, 128), 32)
    tx, ty = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(y[:, :, ::-1]))
    # against the float64 reference (independent: the torch backend shares the native one's front end, so a fault
    # there passed a native-vs-torch comparison), as bench_train checks its targets
    want = np.asarray(ssim_reference(tx, ty, spatial_dims=2, preset="deepssim"), dtype=np.float64)
    check_close("training targets, native vs the float64 reference", ssim(tx, ty, spatial_dims=2, preset="deepssim"),
                want, TOL)
    check_close("training targets, torch backend vs the float64 reference",
                ssim(tx, ty, spatial_dims=2, preset="deepssim", backend="torch"), want, TOL)
    providers = {
        "deepssim_fast native (preset=deepssim, torch in/out)": lambda: ssim(
            tx, ty, spatial_dims=2, preset="deepssim"
        ),
        "deepssim_fast torch backend": lambda: ssim(
            tx, ty, spatial_dims=2, preset="deepssim", backend="torch"
        ),
    }
    return run_case(
        CAP, "training step targets 32x128x128", providers, work=32, unit="pairs", repeat=5 if quick else 20
    )


# Nominal FP32 (non-tensor) peaks of NVIDIA's spec sheets, FLOP/s, by a part of the device name (first match):
# the roofline fraction is of this figure, not of a measured ceiling (bench/gpu_suite.py measures one).
NOMINAL_FP32_PEAK = (("H200 NVL", 60e12), ("H100 NVL", 60e12), ("H100 PCIe", 51e12), ("H200", 67e12),
                     ("H100", 67e12))


def ssim_flop(spatial_dims: int, window: str) -> float:
    """FLOP per pixel (2D) or voxel (3D) of the separable SSIM with a uniform-7 or Gaussian-11 window: the one
    table, bench/gpu_suite.py's SSIM_FLOP (3D was charged the 2D counts here)."""
    from bench.gpu_suite import SSIM_FLOP

    return SSIM_FLOP[(spatial_dims, window)]


def nominal_fp32_peak(device_name: str) -> tuple[str, float] | None:
    """(the matched part name, its nominal FP32 peak in FLOP/s) for a device name, or None when unknown."""
    return next(((part, peak) for part, peak in NOMINAL_FP32_PEAK if part in device_name), None)


def roofline_note(rate: float, shape: tuple[int, ...], spatial_dims: int, window: str, device_name: str) -> str:
    """The note of a GPU row: its FLOP rate (pairs/s × pixels × FLOP per pixel) as a fraction of the device's
    nominal FP32 peak, labelled as nominal; "" for a device without a known peak."""
    peak = nominal_fp32_peak(device_name)
    if peak is None:
        return ""
    part, flops = peak
    flop = ssim_flop(spatial_dims, window)
    per = "px" if spatial_dims == 2 else "voxel"
    return (f"{rate * float(np.prod(shape)) * flop / flops:.1%} of the nominal FP32 peak ({part} spec sheet, "
            f"{flops / 1e12:.0f} TFLOP/s; {flop:.0f} FLOP/{per})")


def _gpu(quick: bool, *, device: str = "cuda", cases: tuple | None = None) -> list[Row]:
    """Triton vs the torch libraries on the same GPU; nominal-peak fraction in the note. Triton's output is
    checked against the CPU engine at every pair, before timing and after (its last timed call).
    ``device="cpu"`` under ``TRITON_INTERPRET=1`` with tiny ``cases`` ((spatial_dims, shape, pairs), ...)
    runs it without a GPU (the tests)."""
    from deepssim_fast.ssim import ssim

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name(0) if cuda else ""
    rows: list[Row] = []
    cases = cases or ((2, (256, 256), 256 if quick else 4096), (3, (160, 192, 160), 2 if quick else 8))
    for sd, shape, n in cases:
        if sd == 2:
            xn, yn = _slices(shape, n)
        else:
            xn, yn = _volumes(shape, n)
        x, y = torch.tensor(xn, device=dev), torch.tensor(yn, device=dev)  # (copies: xn may be a read-only view)
        dr = float(_pair_ranges(xn, yn).max())
        monai_u = _Lazy(_monai, sd, dr)
        for window in ("uniform", "gaussian"):
            kw = {} if window == "uniform" else dict(window="gaussian", sample_covariance=False)

            kept: list[object] = []  # the last timed output, checked after the timing

            def tri(kw=kw, x=x, y=y, sd=sd, kept=kept):
                kept[:] = [ssim(x, y, spatial_dims=sd, backend="triton", **kw)]
                sync()

            def msssim(window=window, x=x, y=y, dr=dr, sd=sd):
                if window == "uniform":
                    _msssim_uniform(x[:, None], y[:, None], dr, sd)
                else:
                    import pytorch_msssim

                    pytorch_msssim.ssim(x[:, None], y[:, None], data_range=dr, size_average=False)
                sync()

            def monai(window=window, x=x, y=y, dr=dr, sd=sd, monai_u=monai_u):
                (monai_u() if window == "uniform" else _monai(sd, dr, "gaussian"))(x[:, None], y[:, None])
                sync()

            case = f"GPU {sd}D {'x'.join(map(str, shape))} {window} {n} pairs"
            tri()  # checked before it is timed, and its last timed output after (every pair, against the CPU engine)
            ref = ssim(xn, yn, spatial_dims=sd, **kw)
            check_close(f"deepssim_fast triton vs native, {case}", kept[0], ref, TOL)
            rs = run_case(
                CAP,
                case,
                {"deepssim_fast triton": tri, "pytorch-msssim": msssim, "MONAI": monai},
                work=n,
                unit="pairs",
                baseline="pytorch-msssim",
                repeat=5,
            )
            check_close(f"deepssim_fast triton (timed) vs native, {case}", kept[0], ref, TOL)
            for r in rs:
                if r.times:
                    r.note = (r.note + " " + roofline_note(r.rate, shape, sd, window, name)).strip()
            rows += rs
    return rows


CASES = {"2d": "_cpu_2d", "3d": "_cpu_3d", "matrix": "_matrix", "training": "_training_call", "gpu": "_gpu"}


def run(quick: bool = False, append: bool = True, cases: list[str] | None = None,
        simd: str | None = None) -> list[Row]:
    """Run the cases (default: all; ``gpu`` only where CUDA is present); append the table to BENCHMARKS.md
    unless ``append=False``. ``simd`` caps the native SIMD level ("scalar", "avx2", "avx512") for the run; the
    caller's cap is restored after it. A case that fails or is refused is a row: the other cases' rows are kept
    (and appended), and the run raises at its end."""
    from deepssim_fast import _native

    saved = _native.simd_cap()  # (the cap stayed set after run(): later calls of this process ran capped)
    rows: list[Row] = []
    try:
        if simd:
            _native.set_simd_level(simd)
        level = _native.simd_level()
        for c in cases or list(CASES):
            if c == "gpu" and not torch.cuda.is_available():
                logger.info("GPU case skipped (no CUDA device)")
                continue
            fn = globals()[CASES[c]]
            try:  # (the GPU case sat outside this, ignoring --cases: a failing GPU check lost every CPU row)
                rows += fn(quick)
            except Exception as exc:  # noqa: BLE001 - a failing case is reported, the others still run
                logger.exception("case %s failed", fn.__name__)
                rows.append(
                    Row(CAP, fn.__name__, "failed", 0, "pairs", note=f"{type(exc).__name__}: {exc}"[:200])
                )
    finally:
        _native.set_simd_level(saved)
    if append:
        append_markdown(
            f"SSIM engine{' (quick)' if quick else ''}",
            rows,
            comment=f"native: {level}, {_native.num_threads()} threads; "
            f"torch threads {torch.get_num_threads()}. Rates within a case are comparable; "
            f"'vs baseline' is the ratio of rates (pairs/s). scikit-image runs on one thread: the "
            f"'{ONE_THREAD}' rows give the equal-cores ratio, the 'deepssim_fast native' rows use every core.",
        )
    failed = [r.case for r in rows if r.provider == "failed"]
    if failed:  # (the other cases' rows are kept above; the run itself fails, as the other benches' runs do: it
        # exited 0 and the runner said "ok" for a case refused as wrong)
        raise RuntimeError(f"{len(failed)} SSIM case(s) failed or were refused: {', '.join(failed)} (see the log)")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), help="run only these cases")
    ap.add_argument("--simd", choices=["scalar", "avx2", "avx512"], help="cap the native SIMD level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    rows = run(quick=args.quick, append=not args.no_append, cases=args.cases, simd=args.simd)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
