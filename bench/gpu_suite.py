#!/usr/bin/env python
"""One-shot GPU validation and timing of every Triton path, in one command of a few minutes.

Usage (repository root)::

    python bench/gpu_suite.py --out gpu_out              # NVIDIA GPU machine, <= 8 min on an H100/H200
    python bench/gpu_suite.py --out gpu_out --append-md  # ... and record the table in BENCHMARKS.md
    python bench/gpu_suite.py --dry-run --out /tmp/gs    # every check, tiny shapes, TRITON_INTERPRET=1, CPU

What it does, in order:

1. **Ceilings**: device-to-device copy bandwidth (one large ``copy_``, read + write bytes counted) and
   matmul rates, bf16 and fp32 with TF32 off. CUDA events, medians.
2. **Checks**: every Triton path, compiled (not interpreted, unless ``--dry-run``), through the public API
   (``deepssim_fast.ssim.ssim``/``ssim_matrix`` and ``deepssim_fast.all_pairs.all_pairs`` with
   ``backend="triton"``) against its plain reference (``deepssim_fast.reference``) on fresh random inputs
   (the seed is logged) and on real MRI slices. Outputs are poisoned before each call: ``out=`` buffers
   are NaN-filled where the API takes one, and the device allocator's cache is flooded with NaN before
   every call, so an output allocated with ``torch.empty`` whose elements the kernel never writes shows
   up as NaN (the check fails on any non-finite value).
3. **Timings**: Triton against the torch baselines (pytorch-msssim and MONAI for SSIM when installed —
   marked absent otherwise; ``torch.mm`` bf16 + ``torch.topk`` in chunks for all-pairs) at sizes that fill
   the GPU, with CUDA events, medians with min–max. The output of each of our timed providers' last call
   is checked too (all-pairs: every pair's float64 cosine recounted on the device, at the precision's
   rounding bound; SSIM: the float64 reference at pairs spread over the batch and the torch backend at all
   of them), as a check of the suite, so a timing stands only with a correct result at its own size.
   ``--budget-s`` skips the remaining timing cases when the time left is short; the checks may use
   ``--checks-share`` of it (default half), so that slow compiles leave the timings time to run, and the
   checks past it are reported as skipped, not passed.
4. One short table printed last (kernel, size, provider, ms, rate, fraction of ceiling, speed-up), and under
   ``--out``: ``gpu_suite.log`` (full log), ``gpu_suite.json`` (everything), ``gpu_suite.md`` (the table),
   ``gpu_suite.benchmarks.md`` (the section ``--append-md`` adds to BENCHMARKS.md: where only ``--out``
   comes back from the GPU machine, append that file to BENCHMARKS.md here).

Needs only torch, triton, numpy and this project (no download; run from a source checkout even when the
package is not installed). Real slices come from ``deepssim_fast.data`` (MRI shipped in the nilearn / dipy
/ nibabel wheels); when those packages are absent the suite says so and uses smooth synthetic phantoms.

Fractions of the ceiling: SSIM counts the FLOP of a separable window (PERF-NOTES.md: 2D uniform-7 161 and
Gaussian-11 241 FLOP per pixel; 3D 232 and 352 per voxel, i.e. 1.14 G and 1.73 G per 160×192×160 pair)
against the measured fp32 matmul rate; all-pairs counts 2·n·m·d against the measured bf16 matmul rate.
Exit status: 0 when every check passed, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import os
import sys

# The interpreter flag must be set before triton is imported anywhere (torch, the project, this script).
DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import types  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("deepssim_fast.gpu_suite")

# FLOP per pixel/voxel of the separable SSIM (see PERF-NOTES.md).
SSIM_FLOP = {(2, "uniform"): 161.0, (2, "gaussian"): 241.0, (3, "uniform"): 232.0, (3, "gaussian"): 352.0}
# Tolerances against the float64 reference: fp32 arithmetic everywhere; half-precision inputs are compared
# with the reference computed on the same (rounded) values, so the same bound applies, with a little slack.
SSIM_TOL = {torch.float32: 1e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5, torch.uint8: 1e-5}
SCORE_TOL = 1e-5  # cosine scores (fp32) against the float64 reference rounded to fp32


# ----------------------------------------------------------------------------------------------------------
# project import (works from a bare source checkout)
# ----------------------------------------------------------------------------------------------------------
def bootstrap_project() -> str:
    """Make ``deepssim_fast`` (and ``deepssim_fast.kernels``) importable from this checkout; return its path.

    An installed package is used as is. Otherwise the repository root goes on ``sys.path`` and the
    top-level ``kernels/`` folder is registered as ``deepssim_fast.kernels`` (setup.py maps it so at install).
    """
    try:
        import tqdm  # noqa: F401 - a core dependency of the project, but not of this suite
    except ImportError:
        # The suite calls everything with progress=False; a no-op stand-in lets the project import.
        log.warning("tqdm is not installed; using a no-op stand-in (progress bars are off in this suite)")
        shim = types.ModuleType("tqdm")

        class _NoBar:
            def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
                self.iterable = iterable

            def __iter__(self) -> Any:
                return iter(self.iterable if self.iterable is not None else ())

            def __enter__(self) -> _NoBar:
                return self

            def __exit__(self, *exc: Any) -> None:
                return None

            def __getattr__(self, name: str) -> Callable[..., None]:
                return lambda *a, **k: None

        shim.tqdm = _NoBar  # type: ignore[attr-defined]
        auto = types.ModuleType("tqdm.auto")
        auto.tqdm = _NoBar  # type: ignore[attr-defined]
        shim.auto = auto  # type: ignore[attr-defined]
        sys.modules["tqdm"], sys.modules["tqdm.auto"] = shim, auto
    try:
        import deepssim_fast
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import deepssim_fast
    try:
        importlib.import_module("deepssim_fast.kernels")
    except ImportError:
        kdir = ROOT / "kernels"
        if (kdir / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location(
                "deepssim_fast.kernels", kdir / "__init__.py", submodule_search_locations=[str(kdir)])
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules["deepssim_fast.kernels"] = mod
            spec.loader.exec_module(mod)
            deepssim_fast.kernels = mod  # type: ignore[attr-defined]
    return str(Path(deepssim_fast.__file__).parent)


def _harness():
    """bench/harness.py (for machine_info / BENCHMARKS.md), imported from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("bench.harness")


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------
def with_env(name: str, value: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(...) with an environment variable set (the kernels read theirs at each call)."""
    from deepssim_fast.kernels.aot import env_set

    with env_set(name, value):
        return fn(*args, **kwargs)


def with_variant(variant: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(...) with the Triton SSIM kernel variant ``variant`` (``DEEPSSIM_FAST_TRITON_SSIM``)."""
    return with_env("DEEPSSIM_FAST_TRITON_SSIM", variant, fn, *args, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeat: int | None = None,
            target_s: float = 1.0, min_repeat: int = 3, max_repeat: int = 20,
            time_left_s: float | None = None) -> list[float]:
    """Times (ms) of repeated calls of ``fn`` after ``warmup`` calls.

    On CUDA each call is bracketed by CUDA events on the current stream; on CPU by ``perf_counter``.
    With ``repeat=None`` the count is chosen from one calibration run so the timed runs take about
    ``target_s`` seconds (clamped to [min_repeat, max_repeat]); ``time_left_s`` caps the count further so
    a slow provider does not overrun the run's budget (at least one timed run is always kept).
    """
    for _ in range(warmup):
        fn()
    sync(device)

    def once() -> float:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    first = once()
    if repeat is None:
        repeat = int(min(max_repeat, max(min_repeat, target_s * 1e3 / max(first, 1e-3))))
    if time_left_s is not None:
        repeat = min(repeat, int(time_left_s * 1e3 / max(first, 1e-3)))
    repeat = max(1, repeat)
    return [first] + [once() for _ in range(repeat - 1)]


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Fill ``nbytes`` of the device allocator's cache with NaN and free them again.

    torch's CUDA caching allocator hands freed blocks to the next ``torch.empty`` of a fitting size, so an
    output the kernel leaves partly unwritten then holds NaN instead of stale valid-looking numbers.
    On the CPU this is best effort (malloc may or may not reuse the pages).
    """
    # blocks of <= 1 MiB come from the allocator's small pool, larger ones from the large pool: flood both
    sizes = [1 << 19] * 4 + [max(nbytes, 2 << 20)] * 2
    bufs = [torch.full((max(1, n // 4),), float("nan"), dtype=torch.float32, device=device) for n in sizes]
    del bufs


# ----------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    err: float | None = None
    tol: float | None = None
    detail: str = ""
    seconds: float = 0.0
    skipped: bool = False  # not run: the checks' share of the time budget was spent (ok is False)


@dataclass
class Timing:
    kernel: str
    size: str
    provider: str
    times_ms: list[float] = field(default_factory=list)
    work: float = 0.0  # items per call
    unit: str = ""
    flop: float | None = None  # per call
    ceiling: str | None = None  # which measured ceiling the fraction refers to
    frac: float | None = None
    speedup: float | None = None  # baseline median / this median
    baseline: str | None = None
    note: str = ""

    @property
    def ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def rate(self) -> float:
        return self.work / (self.ms * 1e-3) if self.times_ms and self.ms > 0 else float("nan")


class Budget:
    """Wall-clock budget of the whole run; timing cases are skipped when too little is left."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()


def precision_tol(precision: str) -> float:
    """Largest |score - exact cosine| a Triton all-pairs score may have at ``precision`` (unit rows).

    ``"ieee"`` and ``"tf32x3"`` are exact to fp32 (SCORE_TOL). Rounding each input component to a format of
    unit roundoff u moves a dot product of unit rows by at most (2u + u²)·Σ|q_i t_i| ≤ 2u + u², plus fp32
    accumulation: fp16 (10 stored bits, torch rounds to nearest) u = 2^-11, bf16 u = 2^-8; tf32 has fp16's
    mantissa, but the tensor cores may truncate fp32 inputs to it (Triton's tf32 dot does not round unless asked
    to): u = 2^-10.
    """
    u = {"tf32": 2.0**-10, "fp16": 2.0**-11, "bf16": 2.0**-8}.get(precision)
    return SCORE_TOL if u is None else 2.0 * u + u * u + SCORE_TOL


def _host(a: Any) -> torch.Tensor:
    """A result field (numpy, torch on any device, cupy) as a CPU torch tensor."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    if hasattr(a, "get") and not isinstance(a, np.ndarray):  # cupy
        a = a.get()
    return torch.as_tensor(np.asarray(a))


def verify_all_pairs(scores: Any, indices: Any, counts: Any, class_counts: dict[str, int] | Sequence[int],
                     train: torch.Tensor, synth: torch.Tensor | None, *, tol: float,
                     thresholds: tuple[float, float] = (0.6, 0.85), hist_range: tuple[float, float] = (-1.0, 1.0),
                     train_hits: Any = None, chunk: int | None = None) -> tuple[bool, float | None, str]:
    """Check an all-pairs result against the float64 cosines of every pair, ``chunk`` synthetic rows at a
    time on ``train``'s device (so a 10^5 × 10^5 result is checked in full on a GPU, never as one matrix).

    ``tol`` bounds |returned score - exact cosine| (``precision_tol``). Passes when: shapes, finiteness and
    index range are right; every returned score is its index's cosine within ``tol``; the returned set is a
    top-k set (nothing left out scores above the k-th returned by more than 2·tol: near-ties may swap);
    scores descend and indices are distinct per row; ``train_hits`` (if given) counts the rank-0 indices;
    the histogram and class counts account for every pair (self-pairs left out when ``synth`` is None), and
    each bin's (class's) count lies between the pairs whose cosine is in it by more than ``tol`` from its
    edges and the pairs whose cosine is within ``tol`` of it, and so does every prefix of the bins (a pair can
    move only to a bin its tolerance reaches: moving counts far away kept each bin within its own bounds).
    ``chunk`` rows at a time (default: what a tenth of the device's free memory holds, at most 4096).
    Returns ``(ok, max score error, detail)``.
    """
    dev = train.device
    self_mode = synth is None
    if chunk is None:  # (~10 float64 temporaries of chunk × n_train: ~30 GB at 4096 × 10^5)
        chunk = 4096
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            chunk = int(max(64, min(4096, free // 10 // (10 * 8 * max(1, train.shape[0])))))
    t64 = torch.nn.functional.normalize(train.to(torch.float64), dim=1)
    q64 = t64 if self_mode else torch.nn.functional.normalize(synth.to(dev, torch.float64), dim=1)
    ns, nt = q64.shape[0], t64.shape[0]
    s, idx = _host(scores), _host(indices)
    cnt = _host(counts).to(torch.int64)
    cc = (np.asarray([class_counts[c] for c in ("different", "similar", "duplicate")], dtype=np.int64)
          if isinstance(class_counts, dict) else _host(class_counts).to(torch.int64).numpy())
    k = s.shape[1] if s.ndim == 2 else -1
    if s.ndim != 2 or tuple(s.shape) != (ns, k) or tuple(idx.shape) != (ns, k) or k < 1:
        return False, None, f"scores {tuple(s.shape)} / indices {tuple(idx.shape)}, expected ({ns}, k)"
    if not bool(torch.isfinite(s).all()):
        return False, None, f"{int((~torch.isfinite(s)).sum())} non-finite scores (unwritten?)"
    if ns and (int(idx.min()) < 0 or int(idx.max()) >= nt):
        return False, None, f"indices out of [0, {nt}): {int(idx.min())}..{int(idx.max())}"
    lo, hi = (float(v) for v in hist_range)
    low, high = (float(v) for v in thresholds)
    bins = int(cnt.numel())
    width = (hi - lo) / bins
    # per bin / class: pairs surely in it (any score within tol of the cosine lands there) and pairs possibly
    # in it (as a difference array: +1 at the lowest bin a pair may land in, -1 past the highest)
    sure = torch.zeros(bins, dtype=torch.int64, device=dev)
    maybe = torch.zeros(bins + 1, dtype=torch.int64, device=dev)
    lowest = torch.zeros(bins, dtype=torch.int64, device=dev)  # pairs by the lowest bin they may land in
    highest = torch.zeros(bins, dtype=torch.int64, device=dev)  # and by the highest
    sure_cc = torch.zeros(3, dtype=torch.int64, device=dev)
    maybe_cc = torch.zeros(4, dtype=torch.int64, device=dev)
    err = gap = 0.0
    s_dev, idx_dev = s.to(dev, torch.float64), idx.to(dev)
    for a in range(0, ns, chunk):
        b = min(ns, a + chunk)
        sc = q64[a:b] @ t64.T
        valid = torch.ones_like(sc, dtype=torch.bool)
        if self_mode:
            rows = torch.arange(b - a, device=dev)
            valid[rows, rows + a] = False
        masked = sc.masked_fill(~valid, float("-inf"))
        true = torch.gather(masked, 1, idx_dev[a:b])
        err = max(err, float((true - s_dev[a:b]).abs().max()))
        kth = torch.topk(masked, k, dim=1).values[:, -1]
        gap = max(gap, float((kth - true.min(dim=1).values).clamp(min=0).max()))
        v = sc[valid]
        b_lo = ((v - tol - lo) / width).floor().clamp(0, bins - 1).to(torch.int64)
        b_hi = ((v + tol - lo) / width).floor().clamp(0, bins - 1).to(torch.int64)
        sure += torch.bincount(b_lo[b_lo == b_hi], minlength=bins)
        maybe += torch.bincount(b_lo, minlength=bins + 1) - torch.bincount(b_hi + 1, minlength=bins + 1)
        lowest += torch.bincount(b_lo, minlength=bins)
        highest += torch.bincount(b_hi, minlength=bins)
        c_lo = (v - tol > low).to(torch.int64) + (v - tol > high).to(torch.int64)  # 0 different, 1, 2 duplicate
        c_hi = (v + tol > low).to(torch.int64) + (v + tol > high).to(torch.int64)
        sure_cc += torch.bincount(c_lo[c_lo == c_hi], minlength=3)
        maybe_cc += torch.bincount(c_lo, minlength=4) - torch.bincount(c_hi + 1, minlength=4)
        del sc, valid, masked, v, b_lo, b_hi, c_lo, c_hi
    total = ns * nt - (ns if self_mode else 0)
    sure, maybe = sure.cpu(), maybe.cumsum(0)[:bins].cpu()
    sure_cc, maybe_cc = sure_cc.cpu().numpy(), maybe_cc.cumsum(0)[:3].cpu().numpy()
    bad_bins = torch.nonzero((cnt < sure) | (cnt > maybe)).flatten().tolist()
    # bins 0..b hold at least the pairs whose highest reachable bin is <= b, at most those whose lowest is
    cum, cum_lo, cum_hi = cnt.cumsum(0), highest.cumsum(0).cpu(), lowest.cumsum(0).cpu()
    bad_prefix = torch.nonzero((cum < cum_lo) | (cum > cum_hi)).flatten().tolist()
    bad_cc = [c for c, n, a, b in zip(("different", "similar", "duplicate"), cc, sure_cc, maybe_cc, strict=True)
              if not a <= n <= b]
    hist_l1 = int((cnt - sure).abs().sum())
    descending = bool((s[:, :-1] >= s[:, 1:]).all()) if k > 1 else True
    distinct = bool((torch.sort(idx, dim=1).values.diff(dim=1) != 0).all()) if k > 1 else True
    hits_ok = True
    if train_hits is not None:
        h = _host(train_hits).to(torch.int64)
        hits_ok = tuple(h.shape) == (nt,) and bool(torch.equal(h, torch.bincount(idx[:, 0], minlength=nt)))
    problems = []
    if err > tol:
        problems.append(f"a returned score is {err:.2e} off its pair's cosine (tol {tol:.0e})")
    if gap > 2 * tol:
        problems.append(f"a left-out pair scores {gap:.2e} above a returned one (not a top-k set)")
    if not descending:
        problems.append("scores not descending")
    if not distinct:
        problems.append("an index repeats within a row")
    if not hits_ok:
        problems.append("train_hits differ from the count of rank-0 indices")
    if int(cnt.sum()) != total or int(cc.sum()) != total:
        problems.append(f"histogram {int(cnt.sum()):,} / classes {int(cc.sum()):,} pairs, expected {total:,}")
    if bad_bins:
        b = bad_bins[0]
        problems.append(f"histogram bin {b} counts {int(cnt[b]):,}, the float64 recount puts {int(sure[b]):,}–"
                        f"{int(maybe[b]):,} pairs there ({len(bad_bins)} bin(s) off)")
    if bad_prefix and not bad_bins:
        b = bad_prefix[0]
        problems.append(f"histogram bins 0..{b} count {int(cum[b]):,} pairs, the float64 recount puts "
                        f"{int(cum_lo[b]):,}–{int(cum_hi[b]):,} there (counts moved further than a tolerance)")
    if bad_cc:
        problems.append(f"class counts {cc.tolist()}, the float64 recount {sure_cc.tolist()}–{maybe_cc.tolist()} "
                        f"(off: {', '.join(bad_cc)})")
    detail = (f"{ns}x{nt} k={k}: set gap {gap:.1e}, |histogram - pairs surely in each bin| {hist_l1} "
              f"(pairs within tol of an edge {int((maybe - sure).sum())})")
    return not problems, err, ("; ".join(problems) + " — " if problems else "") + detail


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------
def phantoms_2d(n: int, shape: Sequence[int], seed: int) -> np.ndarray:
    """``n`` smooth synthetic head-like images (float32, ~[0, 1]): blobs on a dark background, plus noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((n, h, w), np.float32)
    for i in range(n):
        img = np.zeros((h, w), np.float32)
        skull = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.36 * w)) ** 2
        img += 0.6 * (skull < 1.0)
        for _ in range(6):
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            s = rng.uniform(0.04, 0.15) * min(h, w)
            img += rng.uniform(0.1, 0.4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img += 0.02 * rng.standard_normal((h, w)).astype(np.float32)
        out[i] = img
    return out


REAL_2D_ORDER = ("mni152", "example4d", "s0_10slices", "piesno", "anatomical")  # largest first
REAL_3D_ORDER = ("mni152", "example4d", "s0_10slices", "piesno", "anatomical")


def real_slice_stack(shape: Sequence[int], limit: int, *, dry: bool, seed: int) -> tuple[np.ndarray, str]:
    """Up to ``limit`` real MRI slices in order, centre-fit to ``shape`` (float32 (N, H, W)); their source.

    Tries the shipped scans largest first (``deepssim_fast.data``; the small nibabel ``anatomical`` scan for
    ``--dry-run``). When none can be read (nilearn / dipy / nibabel absent) it says so and returns ``limit``
    synthetic smooth phantoms instead, so the suite still runs.
    """
    errors = []
    try:
        from deepssim_fast.data import SlicePolicy, real_slices
    except Exception as exc:  # noqa: BLE001
        errors.append(f"deepssim_fast.data: {type(exc).__name__}: {exc}")
    else:
        policy = SlicePolicy(axis=2, min_foreground=0.1)
        for name in (("anatomical",) if dry else REAL_2D_ORDER):
            try:
                sl = [s.array for s in real_slices(shape, datasets=[name], policy=policy)]
            except Exception as exc:  # noqa: BLE001 - data packages are optional on the GPU machine
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if len(sl) >= 4:
                step = max(1, len(sl) // limit) if len(sl) > limit else 1
                arr = np.stack(sl[::step][:limit]).astype(np.float32)
                return arr, f"real MRI {name}: {len(arr)} slices of {len(sl)} (every {step})"
            errors.append(f"{name}: only {len(sl)} slices with foreground")
    log.warning("real slices unavailable (%s); using synthetic smooth phantoms", "; ".join(errors))
    return phantoms_2d(limit, shape, seed), "synthetic phantoms (real MRI data absent)"


def real_volume(shape: Sequence[int], *, dry: bool, seed: int) -> tuple[np.ndarray, str]:
    """One real 3D MRI volume centre-fit to ``shape`` (float32), or a stacked phantom when data is absent."""
    errors = []
    try:
        from deepssim_fast.data import center_fit, load_volume
    except Exception as exc:  # noqa: BLE001
        errors.append(f"deepssim_fast.data: {type(exc).__name__}: {exc}")
    else:
        for name in (("anatomical",) if dry else REAL_3D_ORDER):
            try:
                v = load_volume(name, frame=0 if name == "example4d" else None).array
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            return center_fit(v, shape).astype(np.float32), f"real MRI volume {name} {v.shape}"
    log.warning("real volume unavailable (%s); using a synthetic phantom", "; ".join(errors))
    sl = phantoms_2d(shape[2], shape[:2], seed)
    return np.ascontiguousarray(np.moveaxis(sl, 0, -1)), "synthetic phantom volume (real MRI data absent)"


def fit2d(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Centre crop / pad (with the minimum) of one 2D image to ``shape``."""
    out = np.full(tuple(shape), float(a.min()), np.float32)
    h, w = min(a.shape[0], shape[0]), min(a.shape[1], shape[1])
    ay, ax = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
    oy, ox = (shape[0] - h) // 2, (shape[1] - w) // 2
    out[oy:oy + h, ox:ox + w] = a[ay:ay + h, ax:ax + w]
    return out


def perturb(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flipped / shifted / noisy / contrast-changed copies of a batch (N, *spatial): the planted kinds."""
    out = x.clone()
    n = x.shape[0]
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out[i] = torch.flip(x[i], dims=(-1,))
        elif kind == 1:
            out[i] = torch.roll(x[i], shifts=2, dims=-2)
        elif kind == 2:
            noise = torch.randn(x[i].shape, generator=gen, dtype=torch.float32).to(x.device)
            out[i] = x[i] + 0.05 * float(x[i].std()) * noise.to(x.dtype)
        else:
            lo = float(x[i].min())
            out[i] = (x[i] - lo).abs() ** 0.8 + lo
    return out


def embeddings_from_slices(slices: np.ndarray, d: int) -> np.ndarray:
    """Real "embeddings": slices average-pooled to a d-pixel grid, flattened (n, d); positive, close."""
    t = torch.from_numpy(slices).float().unsqueeze(1)
    side = int(round(math.sqrt(d)))
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, (side, side)).flatten(1)
    if pooled.shape[1] < d:
        pooled = torch.nn.functional.pad(pooled, (0, d - pooled.shape[1]), value=0.01)
    return pooled[:, :d].contiguous().numpy()


# ----------------------------------------------------------------------------------------------------------
# the suite
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """Problem sizes of one run: tiny for --dry-run, GPU-filling otherwise."""

    copy_bytes: int
    mm_n: int
    ssim2d_check: tuple[int, int, int]  # (pairs, H, W) random
    ssim2d_real: tuple[int, int]  # real slice shape
    real_pairs: int  # neighbouring real slice pairs checked
    real_limit: int  # real slices loaded (pairs + embeddings)
    ssim3d_check: tuple[int, int, int, int]
    ssim3d_real: tuple[int, int, int]
    matrix_check: tuple[int, int, int, int]  # (na, nb, H, W)
    ap_checks: tuple[tuple[int, int, int, int], ...]  # (n_train, n_synth, d, k)
    ap_self: tuple[int, int, int]  # (n, d, k)
    ap_real_d: int  # embedding width of the real-slice "embeddings"
    ap_wide: tuple[int, int, int]  # (n_train, d, planted row): row * d > 2^31 on the GPU (int64 offsets)
    ssim2d_time: tuple[int, int, int]
    ssim3d_time: tuple[int, int, int, int]
    matrix_time: tuple[int, int, int, int]
    ap_time: tuple[int, int, int, int]
    ap_chunk: int
    target_s: float
    max_repeat: int
    warmup: int


DRY_SIZES = Sizes(
    copy_bytes=1 << 20, mm_n=64,
    ssim2d_check=(3, 13, 17), ssim2d_real=(24, 28), real_pairs=2, real_limit=12,
    ssim3d_check=(1, 11, 12, 11), ssim3d_real=(11, 12, 11),
    matrix_check=(2, 3, 12, 13),
    ap_checks=((37, 9, 16, 5), (7, 3, 8, 1)), ap_self=(11, 8, 3), ap_real_d=16, ap_wide=(40, 64, 33),
    ssim2d_time=(2, 16, 16), ssim3d_time=(1, 11, 11, 11), matrix_time=(2, 2, 12, 12),
    ap_time=(64, 16, 16, 5), ap_chunk=8, target_s=0.0, max_repeat=1, warmup=0,
)

GPU_SIZES = Sizes(
    copy_bytes=2 << 30, mm_n=8192,
    ssim2d_check=(17, 255, 257), ssim2d_real=(256, 256), real_pairs=24, real_limit=400,
    ssim3d_check=(2, 41, 47, 39), ssim3d_real=(96, 112, 96),
    matrix_check=(9, 13, 128, 128),
    ap_checks=((4097, 1023, 256, 10), (1023, 257, 64, 100), (7, 5, 256, 1)), ap_self=(1500, 256, 10),
    ap_real_d=256, ap_wide=(1100, 1 << 21, 1050),  # 9.2 GB of training rows; row 1050 starts at 2^31.1
    ssim2d_time=(4096, 256, 256), ssim3d_time=(8, 160, 192, 160), matrix_time=(1024, 1024, 128, 128),
    ap_time=(100_000, 100_000, 256, 10), ap_chunk=8192, target_s=1.0, max_repeat=20, warmup=1,
)


class Suite:
    def __init__(self, device: torch.device, sizes: Sizes, *, seed: int, budget: Budget, dry: bool,
                 sections: set[str], checks_share: float = 1.0) -> None:
        self.device = device
        self.checks_until_s = checks_share * budget.total_s  # no check starts past this elapsed time
        self.sizes = sizes
        self.seed = seed
        self.budget = budget
        self.dry = dry
        self.sections = sections
        self.checks: list[Check] = []
        self.timings: list[Timing] = []
        self.ceilings: dict[str, float] = {}
        self.data_sources: dict[str, str] = {}
        self.competitors: dict[str, str] = {}
        self.gen = torch.Generator().manual_seed(seed)

    # -- helpers -----------------------------------------------------------------------------------------
    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Fresh uniform [0, 1) values drawn on the CPU from the logged seed, moved to the device."""
        return torch.rand(shape, generator=self.gen, dtype=torch.float32).to(self.device, dtype)

    def randn(self, *shape: int) -> torch.Tensor:
        """Fresh standard normal values from the logged seed: drawn on the CPU and moved to the device, except
        very large ones on a GPU (the wide-row check's 2.3e9 values took ~15 s on the CPU, of the device's
        time), which a generator on the device draws, seeded from the CPU generator."""
        n = math.prod(shape)
        if self.device.type == "cuda" and n > 1 << 27:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
            gen = torch.Generator(device=self.device).manual_seed(seed)
            return torch.randn(shape, generator=gen, dtype=torch.float32, device=self.device)
        return torch.randn(shape, generator=self.gen, dtype=torch.float32).to(self.device)

    def check(self, name: str, fn: Callable[[], tuple[bool, float | None, float | None, str]], *,
              gated: bool = True) -> bool:
        """Run one correctness check; an exception is a failed check with its message. Past the checks'
        share of the budget the check is recorded as skipped (not passed) without running, unless
        ``gated`` is False (the checks of timed outputs: a timing row stands only with its check).
        Returns whether it passed."""
        if gated and self.budget.elapsed() > self.checks_until_s:
            self.checks.append(Check(name, False, detail="skipped: time budget", skipped=True))
            log.warning("[SKIP] %s: the checks' share of the budget (%.0f s) is spent", name, self.checks_until_s)
            return False
        t0 = time.perf_counter()
        try:
            ok, err, tol, detail = fn()
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, the suite goes on
            ok, err, tol, detail = False, None, None, f"{type(exc).__name__}: {exc}"[:400]
            log.debug("check %s raised:\n%s", name, traceback.format_exc())
        sync(self.device)
        c = Check(name, bool(ok), err, tol, detail, time.perf_counter() - t0)
        self.checks.append(c)
        status = "PASS" if c.ok else "FAIL"
        err_s = f"err {err:.2e} (tol {tol:.0e})" if err is not None and tol is not None else ""
        log.info("[%s] %-58s %-26s %s (%.1f s)", status, name, err_s, detail, c.seconds)
        return c.ok

    def poison(self, nbytes: int) -> None:
        poison_allocator(self.device, nbytes)

    # -- 1. ceilings -------------------------------------------------------------------------------------
    def run_ceilings(self) -> None:
        s, dev = self.sizes, self.device
        n = s.copy_bytes // 4
        src = torch.rand(n, device=dev)
        dst = torch.empty_like(src)
        t = time_ms(lambda dst=dst, src=src: dst.copy_(src), dev, warmup=s.warmup, target_s=s.target_s,
                    max_repeat=s.max_repeat)
        bw = 2 * s.copy_bytes / (statistics.median(t) * 1e-3)
        self.ceilings["copy_GBps"] = bw / 1e9
        self.timings.append(Timing("ceiling: d2d copy", f"{s.copy_bytes / 2**30:.3g} GiB", "torch copy_", t,
                                   work=2 * s.copy_bytes / 1e9, unit="GB", ceiling="copy", frac=1.0,
                                   note="read + write bytes"))
        del src, dst
        m = s.mm_n
        prev_precision = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")  # fp32 matmul in full fp32: TF32 off
            for dtype, key in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                a = torch.randn(m, m, device=dev, dtype=dtype)
                b = torch.randn(m, m, device=dev, dtype=dtype)
                c = torch.empty(m, m, device=dev, dtype=dtype)
                t = time_ms(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), dev, warmup=s.warmup,
                            target_s=s.target_s, max_repeat=s.max_repeat)
                flop = 2.0 * m ** 3
                rate = flop / (statistics.median(t) * 1e-3)
                self.ceilings[f"mm_{key}_TFLOPs"] = rate / 1e12
                self.timings.append(Timing(f"ceiling: matmul {key}", f"{m}³", "torch.mm", t, work=flop / 1e12,
                                           unit="TFLOP", flop=flop, ceiling=f"mm_{key}", frac=1.0,
                                           note="tf32 off" if key == "fp32" else ""))
                del a, b, c
        finally:
            torch.set_float32_matmul_precision(prev_precision)
        log.info("ceilings: copy %.1f GB/s, bf16 mm %.2f TFLOP/s, fp32 mm %.2f TFLOP/s",
                 self.ceilings["copy_GBps"], self.ceilings["mm_bf16_TFLOPs"], self.ceilings["mm_fp32_TFLOPs"])

    # -- 2. checks ---------------------------------------------------------------------------------------
    def _ssim_check(self, x: torch.Tensor, y: torch.Tensor, *, spatial_dims: int, tol: float,
                    **opts: Any) -> tuple[bool, float | None, float | None, str]:
        from deepssim_fast.reference import ssim_reference
        from deepssim_fast.ssim import ssim

        bx, by = torch.broadcast_tensors(x, y)  # the reference takes equal shapes; the API broadcasts
        batch = tuple(bx.shape[: bx.ndim - spatial_dims])
        self.poison(8 * max(1, math.prod(batch)) * 4 + (1 << 20))
        got = ssim(x, y, spatial_dims=spatial_dims, backend="triton", **opts)
        sync(self.device)
        if not isinstance(got, torch.Tensor):
            return False, None, tol, f"returned {type(got).__name__}, expected a torch tensor on {x.device}"
        problems = []
        if got.device != x.device:
            problems.append(f"result on {got.device}, input on {x.device}")
        if tuple(got.shape) != batch:
            problems.append(f"shape {tuple(got.shape)} != batch shape {batch}")
        if got.dtype != torch.float32:
            problems.append(f"dtype {got.dtype} != float32")
        g = got.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(g).all()):
            problems.append(f"{int((~torch.isfinite(g)).sum())} non-finite outputs (unwritten or NaN)")
        if problems:
            return False, None, tol, "; ".join(problems)
        ref = torch.from_numpy(np.asarray(ssim_reference(bx.cpu(), by.cpu(), spatial_dims=spatial_dims,
                                                         **opts)))
        err = float((g - ref.reshape(g.shape)).abs().max()) if g.numel() else 0.0
        return err <= tol, err, tol, f"{math.prod(batch)} pairs, mean ssim {float(ref.mean()):.3f}"

    def _matrix_check(self, a: torch.Tensor, b: torch.Tensor, **opts: Any
                      ) -> tuple[bool, float | None, float | None, str]:
        from deepssim_fast.reference import ssim_reference
        from deepssim_fast.ssim import ssim_matrix

        na, nb = a.shape[0], b.shape[0]
        out = torch.full((na, nb), float("nan"), dtype=torch.float32, device=self.device)
        self.poison(16 * na * nb + (1 << 20))
        note = "out= NaN buffer"
        try:
            got = ssim_matrix(a, b, spatial_dims=2, out=out, progress=False, backend="triton", **opts)
        except TypeError as exc:  # out= of this kind not accepted: check the allocated result instead
            log.info("ssim_matrix does not take a device tensor as out= (%s); checking its own result", exc)
            note = "own allocation (out= device tensor refused)"
            got = ssim_matrix(a, b, spatial_dims=2, progress=False, backend="triton", **opts)
        g = torch.as_tensor(np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got),
                            dtype=torch.float64)
        if note.startswith("out=") and isinstance(got, torch.Tensor) and got.data_ptr() != out.data_ptr():
            g_out = out.to("cpu", torch.float64)
            if not bool(torch.isfinite(g_out).all()):
                return False, None, None, f"out= buffer left {int((~torch.isfinite(g_out)).sum())} NaN"
        if tuple(g.shape) != (na, nb):
            return False, None, None, f"shape {tuple(g.shape)} != {(na, nb)}"
        if not bool(torch.isfinite(g).all()):
            return False, None, None, f"{int((~torch.isfinite(g)).sum())} non-finite entries (unwritten?)"
        h, w = a.shape[-2:]
        xa = a.cpu()[:, None].expand(na, nb, h, w)
        xb = b.cpu()[None, :].expand(na, nb, h, w)
        ref = torch.from_numpy(np.asarray(ssim_reference(xa, xb, spatial_dims=2, **opts)))
        err = float((g - ref).abs().max())
        tol = SSIM_TOL[a.dtype] if a.dtype in SSIM_TOL else 1e-5
        return err <= tol, err, tol, f"{na}x{nb} of {h}x{w}, {note}"

    def _all_pairs_check(self, train: torch.Tensor, synth: torch.Tensor | None, k: int, *,
                         tie_row: tuple[int, list[int]] | None = None, bins: int = 200,
                         precision: str = "ieee") -> tuple[bool, float | None, float | None, str]:
        """Top-k, histogram, class counts and train_hits of ``all_pairs(..., backend="triton")``.

        The result is checked by ``verify_all_pairs`` against the float64 cosines of every pair, at the
        tolerance of ``precision`` (fp32 for the exact ones). ``tie_row=(row, indices)``: a planted exact tie
        whose order must be the lower index first.
        """
        from deepssim_fast.all_pairs import all_pairs

        self_mode = synth is None
        nt = train.shape[0]
        ns = nt if self_mode else synth.shape[0]
        self.poison(64 * ns * k + 16 * nt + (4 << 20))
        res = all_pairs(train, synth, k=k, backend="triton", progress=False, bins=bins, precision=precision)
        scores = torch.as_tensor(np.asarray(res.scores))
        idx = torch.as_tensor(np.asarray(res.indices))
        problems = []
        if tuple(scores.shape) != (ns, k) or tuple(idx.shape) != (ns, k):
            problems.append(f"scores {tuple(scores.shape)} / indices {tuple(idx.shape)} != {(ns, k)}")
        if scores.dtype != torch.float32 or idx.dtype != torch.int64:
            problems.append(f"dtypes {scores.dtype}/{idx.dtype}, expected float32/int64")
        if problems:
            return False, None, SCORE_TOL, "; ".join(problems)
        if self_mode and bool((idx == torch.arange(ns)[:, None]).any()):
            return False, None, SCORE_TOL, "a self-pair was returned in self mode"
        thresholds = tuple(float(t) for t in getattr(res, "thresholds", (0.6, 0.85)))
        edges = np.asarray(res.histogram[1], dtype=np.float64)
        tol = precision_tol(precision)
        ok, err, detail = verify_all_pairs(scores, idx, res.histogram[0], dict(res.class_counts), train, synth,
                                           tol=tol, thresholds=thresholds,
                                           hist_range=(float(edges[0]), float(edges[-1])),
                                           train_hits=res.train_hits)
        if tie_row is not None:
            row, want = tie_row
            tie_ok = idx[row, : len(want)].tolist() == want
            ok, detail = ok and tie_ok, detail + f", tie order={tie_ok}"
        return ok, err, tol, detail

    def run_checks(self) -> None:
        s = self.sizes
        b, h, w = s.ssim2d_check
        # SSIM 2D, fresh random inputs, every window and input dtype
        for window in ("uniform", "gaussian"):
            cov = window == "uniform"  # uniform: scikit-image defaults; gaussian: the msssim/MONAI convention
            dtypes = (torch.float32, torch.float16, torch.bfloat16)
            if self.dry and window == "gaussian":  # the interpreter is slow: half dtypes on one window only
                dtypes = (torch.float32,)
            for dtype in dtypes:
                x = self.rand(b, h, w, dtype=dtype)
                y = (x.float() * 0.7 + 0.3 * self.rand(b, h, w)).to(dtype)
                self.check(f"ssim2d {window} {str(dtype)[6:]} random {b}x{h}x{w}",
                           lambda x=x, y=y, window=window, cov=cov, dtype=dtype: self._ssim_check(
                               x, y, spatial_dims=2, tol=SSIM_TOL[dtype], window=window,
                               sample_covariance=cov))
        x8 = (self.rand(b, h, w) * 255).to(torch.uint8)
        y8 = (self.rand(b, h, w) * 255).to(torch.uint8)
        self.check(f"ssim2d uniform uint8 random {b}x{h}x{w}",
                   lambda: self._ssim_check(x8, y8, spatial_dims=2, tol=SSIM_TOL[torch.uint8]))
        # SSIM 2D on real slices: neighbouring pairs and perturbed copies, both windows, the deepssim preset
        stack, src = real_slice_stack(s.ssim2d_real, s.real_limit, dry=self.dry, seed=self.seed)
        self.data_sources["2d"] = src
        tag = "real" if src.startswith("real") else "phantom"
        pick = np.unique(np.linspace(0, len(stack) - 2, num=min(s.real_pairs, len(stack) - 1)).astype(int))
        xr = torch.from_numpy(stack[pick]).to(self.device)
        yr = torch.from_numpy(stack[pick + 1]).to(self.device)
        yp = perturb(xr, self.gen)
        for window in ("uniform", "gaussian"):
            self.check(f"ssim2d {window} {tag} neighbours {tuple(xr.shape)}",
                       lambda w=window: self._ssim_check(xr, yr, spatial_dims=2, tol=1e-5, window=w))
            self.check(f"ssim2d {window} {tag} perturbed copies {tuple(xr.shape)}",
                       lambda w=window: self._ssim_check(xr, yp, spatial_dims=2, tol=1e-5, window=w))
        self.check(f"ssim2d preset=deepssim {tag} {tuple(xr.shape)}",
                   lambda: self._ssim_check(xr, yp, spatial_dims=2, tol=1e-5, preset="deepssim"))
        # one-vs-many broadcasting: x (H, W) against y (B, H, W)
        self.check(f"ssim2d broadcast (H,W) vs {tuple(yr.shape)} {tag}",
                   lambda: self._ssim_check(xr[0], yr, spatial_dims=2, tol=1e-5))
        # SSIM 3D: random and a real volume with perturbed copies
        b3, d1, d2, d3 = s.ssim3d_check
        # (dry run: random 3D on the uniform window; the Gaussian 3D path is checked on the real volume below)
        for window in (("uniform",) if self.dry else ("uniform", "gaussian")):
            x = self.rand(b3, d1, d2, d3)
            y = x * 0.6 + 0.4 * self.rand(b3, d1, d2, d3)
            self.check(f"ssim3d {window} random {b3}x{d1}x{d2}x{d3}",
                       lambda x=x, y=y, window=window: self._ssim_check(x, y, spatial_dims=3, tol=1e-5,
                                                                        window=window))
        vol, vsrc = real_volume(s.ssim3d_real, dry=self.dry, seed=self.seed)
        self.data_sources["3d"] = vsrc
        vtag = "real" if vsrc.startswith("real") else "phantom"
        v = torch.from_numpy(vol).to(self.device)[None]
        vy = torch.cat([torch.flip(v, dims=(-1,)), v + 0.03 * float(v.std()) * self.randn(*v.shape)])
        vx = torch.cat([v, v])
        if self.dry:  # the interpreter is slow on 3D: one pair per window (flipped copy; noisy copy)
            pairs = {"uniform": (vx[:1], vy[:1]), "gaussian": (vx[1:], vy[1:])}
        else:
            pairs = {"uniform": (vx, vy), "gaussian": (vx, vy)}
        for window, (px, py) in pairs.items():
            self.check(f"ssim3d {window} {vtag} volume {tuple(px.shape)}",
                       lambda w=window, px=px, py=py: self._ssim_check(px, py, spatial_dims=3, tol=1e-5,
                                                                       window=w))
        # the "direct" SSIM kernel (every tap per output; timed against the default below) on real data
        for window in ("uniform", "gaussian"):
            self.check(f"ssim2d {window} {tag} perturbed copies, direct kernel",
                       lambda w=window: with_variant("direct", self._ssim_check, xr, yp, spatial_dims=2,
                                                     tol=1e-5, window=w))
        px, py = pairs["uniform"]
        self.check(f"ssim3d uniform {vtag} volume {tuple(px.shape)}, direct kernel",
                   lambda: with_variant("direct", self._ssim_check, px[:1], py[:1], spatial_dims=3, tol=1e-5))
        # ssim_matrix with a NaN-poisoned out= buffer
        na, nb, mh, mw = s.matrix_check
        ma, mb = self.rand(na, mh, mw), self.rand(nb, mh, mw)
        self.check(f"ssim_matrix random {na}x{nb} of {mh}x{mw}", lambda: self._matrix_check(ma, mb))
        rows = np.linspace(0, len(stack) - 1, num=na + nb).astype(int)
        fitted = np.stack([fit2d(stack[i], (mh, mw)) for i in rows])
        ra = torch.from_numpy(fitted[:na]).to(self.device)
        rb = torch.from_numpy(fitted[na:]).to(self.device)
        self.check(f"ssim_matrix preset=deepssim {tag} {na}x{nb} of {mh}x{mw}",
                   lambda: self._matrix_check(ra, rb, preset="deepssim"))
        # all-pairs top-k + histogram + class counts + train_hits
        for nt, ns, d, k in s.ap_checks:
            tr, sy = self.randn(nt, d), self.randn(ns, d)
            planted = ns > 1 and nt > 2
            if planted:  # exact duplicates: synth 0 equals train 1 and train 2 (ties go to the lower index)
                tr[2] = tr[1]
                sy[0] = tr[1]
            self.check(f"all_pairs random {ns}x{nt}x{d} k={k}",
                       lambda tr=tr, sy=sy, k=k, planted=planted: self._all_pairs_check(
                           tr, sy, k, tie_row=(0, [1, 2][:k]) if planted else None))
        # fp32 split over three tf32 tensor-core products: must pass the fp32 tolerances
        self.check(f"all_pairs random {ns}x{nt}x{d} k={k}, precision tf32x3",
                   lambda tr=tr, sy=sy, k=k: self._all_pairs_check(tr, sy, k, precision="tf32x3"))
        # more bins than a tile histogram holds: the per-pair global-atomic path
        self.check(f"all_pairs random {ns}x{nt}x{d} k={k}, 4096 bins",
                   lambda tr=tr, sy=sy, k=k: self._all_pairs_check(tr, sy, k, bins=4096))
        n_self, d_self, k_self = s.ap_self
        ts = self.randn(n_self, d_self)
        self.check(f"all_pairs self mode {n_self}x{d_self} k={k_self}",
                   lambda: self._all_pairs_check(ts, None, k_self))
        # real "embeddings": pooled real slices, all positive so the scores crowd near 1 (many near-ties)
        emb = embeddings_from_slices(stack, s.ap_real_d)
        et = torch.from_numpy(emb).to(self.device)
        es = torch.from_numpy(emb[1::3].copy()).to(self.device)
        k_real = min(10, et.shape[0])
        self.check(f"all_pairs {tag} slice embeddings {es.shape[0]}x{et.shape[0]}x{s.ap_real_d} k={k_real}",
                   lambda: self._all_pairs_check(et, es, k_real))
        # rows so wide that row x d passes 2^31 (a correlation audit of whole volumes): a planted copy far down
        nw, dw, roww = s.ap_wide
        self.check(f"all_pairs wide rows {nw}x{dw}, copy of row {roww} (offset {roww * dw:.3g})",
                   lambda: self._wide_check(nw, dw, roww))
        for low, high in ((0.6, 0.85), (1.0 / 3.0, 0.5)):
            self.check(f"all_pairs class counts at float32(thresholds) {low:.4f}, {high:.4f}",
                       lambda low=low, high=high: self._threshold_check(low, high))

    def _wide_check(self, n: int, d: int, row: int) -> tuple[bool, float | None, float | None, str]:
        """One synthetic row equal to training row ``row`` of n random rows of width d: found, score 1, one
        duplicate pair, the rest in the histogram's middle (random rows of this width are near-orthogonal)."""
        from deepssim_fast.all_pairs import all_pairs

        train = self.randn(n, d)
        synth = train[row : row + 1].clone()
        r = all_pairs(train, synth, k=2, backend="triton", progress=False)
        del train
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        counts = r.histogram[0]
        err = abs(float(r.scores[0, 0]) - 1.0)
        ok = (int(r.indices[0, 0]) == row and err <= 1e-5 and r.class_counts["duplicate"] == 1
              and int(counts[-1]) == 1 and int(counts.sum()) == n)
        return ok, err, 1e-5, f"top-1 {int(r.indices[0, 0])} ({float(r.scores[0, 0]):.6f}), {r.class_counts}"

    def _threshold_check(self, low: float, high: float) -> tuple[bool, float | None, float | None, str]:
        """Scores exactly at float32(low), float32(high) and their neighbours: classes by the float64 rule.

        Train rows are unit axes, so each score is one exact product (the synthetic row's component).
        """
        from deepssim_fast.all_pairs import all_pairs

        comps = []
        for t in (low, high):
            f = np.float32(t)
            comps += [f, np.nextafter(f, np.float32(2)), np.nextafter(f, np.float32(-2))]
        c = np.array(comps, dtype=np.float32)
        synth = np.stack([c, np.sqrt(1.0 - c.astype(np.float64) ** 2).astype(np.float32)], axis=1)
        train = np.eye(2, dtype=np.float32)
        r = all_pairs(torch.from_numpy(train).to(self.device), torch.from_numpy(synth).to(self.device), k=2,
                      thresholds=(low, high), backend="triton", progress=False)
        sc = r.scores.ravel().astype(np.float64)
        want = {"different": int((sc <= low).sum()), "similar": int(((sc > low) & (sc <= high)).sum()),
                "duplicate": int((sc > high).sum())}
        at = int(np.isin(r.scores.ravel(), c[[0, 3]]).sum())
        ok = r.class_counts == want and at == 2
        return ok, None, None, f"got {r.class_counts}, rule {want}, {at} scores at float32(threshold)"

    # -- 3. timings --------------------------------------------------------------------------------------
    def _competitors(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, mod in (("pytorch-msssim", "pytorch_msssim"), ("monai", "monai.metrics")):
            try:
                found[name] = importlib.import_module(mod)
                top = importlib.import_module(mod.split(".")[0])
                self.competitors[name] = getattr(top, "__version__", "?")
            except Exception as exc:  # noqa: BLE001 - optional on the GPU machine
                self.competitors[name] = f"absent ({type(exc).__name__})"
        return found

    def _time_case(self, kernel: str, size: str, providers: dict[str, Callable[[], object]], *, work: float,
                   unit: str, flop: float | None, ceiling: str | None, baseline: str, est_s: float,
                   absent: Sequence[str] = (), works: dict[str, float] | None = None,
                   checks: dict[str, Callable[[Any], tuple[bool, float | None, float | None, str]]] | None = None
                   ) -> None:
        """Time every provider on one case; speed-up = rate / the baseline's rate (same inputs, same run).

        ``works`` overrides ``work`` (items per call) for a provider that does a part of the case;
        ``flop`` is per item-of-work × work, so the fraction of ``ceiling`` scales with it. ``checks[name]``
        checks the output of that provider's last timed call (a check at small sizes does not cover the
        timed ones); it is a check of the suite like the others, and its row's note says how it went.
        """
        if self.budget.left() < est_s:
            log.warning("budget: %.0f s left < %.0f s estimated; skipping %s %s", self.budget.left(), est_s,
                        kernel, size)
            for name in list(providers) + list(absent):
                self.timings.append(Timing(kernel, size, name, note="skipped: time budget"))
            return
        rows = []
        for name, fn in providers.items():
            wk = (works or {}).get(name, work)
            t = Timing(kernel, size, name, work=wk, unit=unit, flop=flop * wk / work if flop else None,
                       ceiling=ceiling)
            if self.budget.left() < 5.0:
                t.note = "skipped: time budget"
                rows.append(t)
                continue
            kept: list[Any] = []  # the output of the last timed call, when it is checked
            timed = fn
            if checks and name in checks:
                def timed(fn: Callable[[], object] = fn, kept: list[Any] = kept) -> None:
                    kept[:] = [fn()]
            try:
                t.times_ms = time_ms(timed, self.device, warmup=self.sizes.warmup, target_s=self.sizes.target_s,
                                     max_repeat=self.sizes.max_repeat, time_left_s=self.budget.left() - 5.0)
            except Exception as exc:  # noqa: BLE001 - a failing provider is a result
                t.note = f"failed: {type(exc).__name__}: {exc}"[:200]
                log.debug("%s / %s raised:\n%s", kernel, name, traceback.format_exc())
            if kept and t.times_ms:
                out = kept.pop()
                ok = self.check(f"timed output: {kernel} {size} {name}",
                                lambda out=out, c=checks[name]: c(out), gated=False)
                t.note = (t.note + (" output checked" if ok else " output FAILED its check")).strip()
                del out
            kept.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("  %-22s %-22s %-28s %s", kernel, size, name,
                     f"{t.ms:10.3f} ms  {t.rate:14.1f} {unit}/s" if t.times_ms else t.note)
            rows.append(t)
        for name in absent:
            rows.append(Timing(kernel, size, name, note="absent (not installed)"))
        base = next((r.rate for r in rows if r.provider == baseline and r.times_ms), None)
        for r in rows:
            r.baseline = baseline
            if r.times_ms:
                if base:
                    r.speedup = r.rate / base
                cap = self.ceilings.get({"mm_fp32": "mm_fp32_TFLOPs", "mm_bf16": "mm_bf16_TFLOPs"}.get(
                    ceiling or "", ""))
                if r.flop and cap:
                    r.frac = r.flop / (r.ms * 1e-3) / (cap * 1e12)
        self.timings.extend(rows)

    def run_timings(self) -> None:
        """All-pairs, SSIM batches and ssim_matrix; a part that cannot run is a table row, not the end."""
        # all-pairs first: its GPU row is the one an open issue still waits for, so a short budget spends
        # itself on the SSIM cases, not on it
        for kernel, part in (("all_pairs", self._time_all_pairs), ("ssim", self._time_ssim),
                             ("ssim_matrix", self._time_matrix)):
            try:
                part()
            except Exception as exc:  # noqa: BLE001
                log.error("timings of %s stopped: %s: %s\n%s", kernel, type(exc).__name__, exc,
                          traceback.format_exc())
                note = f"failed: {type(exc).__name__}: {exc}"[:160]
                self.timings.append(Timing(kernel, "-", "-", note=note))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _ssim_output_check(self, x: torch.Tensor, y: torch.Tensor, opts: dict[str, Any], *,
                           pairs: Sequence[int]) -> Callable[[Any], tuple[bool, float | None, float | None, str]]:
        """A check of a timed ``ssim`` output on the batch (x, y): shape and finiteness, the float64 reference
        at ``pairs`` (spread over the batch: a wrong result past some batch position was once published from a
        4-pair check) and every pair against deepssim_fast's torch backend (a separate, convolution-based
        implementation), both computed once, at the first check."""
        from deepssim_fast.reference import ssim_reference
        from deepssim_fast.ssim import ssim

        b, sd = x.shape[0], int(opts["spatial_dims"])
        pick = sorted(set(int(i) for i in pairs))
        ref_opts = {k: v for k, v in opts.items() if k != "spatial_dims"}
        cache: dict[str, torch.Tensor] = {}

        def checker(out: Any) -> tuple[bool, float | None, float | None, str]:
            g = _host(out).to(torch.float64)
            if tuple(g.shape) != (b,):
                return False, None, 1e-5, f"shape {tuple(g.shape)} != ({b},)"
            if not bool(torch.isfinite(g).all()):
                return False, None, 1e-5, f"{int((~torch.isfinite(g)).sum())} non-finite outputs"
            if not cache:
                cache["ref"] = torch.as_tensor(np.asarray(ssim_reference(
                    x[pick].cpu(), y[pick].cpu(), spatial_dims=sd, **ref_opts), dtype=np.float64)).reshape(-1)
                cache["cross"] = _host(ssim(x, y, backend="torch", **opts)).to(torch.float64)
            err = float((g[pick] - cache["ref"]).abs().max())
            diff = float((g - cache["cross"]).abs().max())
            return (err <= 1e-5 and diff <= 2e-5, err, 1e-5,
                    f"pairs {pick} vs the float64 reference; all {b} vs the torch backend: |diff| ≤ {diff:.1e} "
                    f"(tol 2e-05)")
        return checker

    def _time_ssim(self) -> None:
        from deepssim_fast.ssim import ssim

        s, dev = self.sizes, self.device
        # competitors are imported only when some SSIM case can still run (MONAI takes seconds to import)
        comp = self._competitors() if self.budget.left() >= 30.0 else {}
        absent = [n for n in ("pytorch-msssim", "monai") if n not in comp]
        # SSIM 2D and 3D batches, fixed data_range=1 for every provider (inputs in [0, 1))
        for sd, shape, est in ((2, s.ssim2d_time, 30.0), (3, s.ssim3d_time, 40.0)):
            x = self.rand(*shape)
            y = (x * 0.8 + 0.2 * self.rand(*shape)).contiguous()
            X, Y = x.unsqueeze(1), y.unsqueeze(1)
            npix = math.prod(shape[1:])
            for window in ("uniform", "gaussian"):
                cov = window == "uniform"
                opts = dict(spatial_dims=sd, window=window, data_range=1.0, sample_covariance=cov)
                providers: dict[str, Callable[[], object]] = {
                    "triton": lambda x=x, y=y, opts=opts: ssim(x, y, backend="triton", **opts),
                    "triton direct taps": lambda x=x, y=y, opts=opts: with_variant(
                        "direct", ssim, x, y, backend="triton", **opts),
                    "torch (deepssim_fast)": lambda x=x, y=y, opts=opts: ssim(x, y, backend="torch", **opts),
                }
                if "pytorch-msssim" in comp:
                    pm = comp["pytorch-msssim"]
                    taps = 7 if window == "uniform" else 11
                    win = (torch.full((1, 1, taps), 1.0 / taps, device=dev) if window == "uniform" else None)
                    if win is not None:
                        win = win.repeat([1] + [1] * (X.ndim - 1))
                    providers["pytorch-msssim"] = lambda pm=pm, win=win, X=X, Y=Y: pm.ssim(
                        X, Y, data_range=1.0, size_average=False, win=win, win_size=11, win_sigma=1.5)
                if "monai" in comp:
                    metric = comp["monai"].SSIMMetric(spatial_dims=sd, data_range=1.0, kernel_type=window,
                                                      win_size=7 if window == "uniform" else 11,
                                                      kernel_sigma=1.5, reduction="none")
                    providers["monai"] = lambda metric=metric, X=X, Y=Y: metric(X, Y)
                kernel = f"ssim{sd}d {'u7' if window == 'uniform' else 'g11'}"
                size = f"{shape[0]}×{'×'.join(map(str, shape[1:]))}"
                base = "pytorch-msssim" if "pytorch-msssim" in comp else "torch (deepssim_fast)"
                # (one reference pair in 3D: the float64 reference of a 160×192×160 pair takes seconds)
                b = shape[0]
                check = self._ssim_output_check(x, y, opts, pairs=[b - 1] if sd == 3 else [0, b // 2, b - 1])
                self._time_case(kernel, size, providers, work=shape[0], unit="pairs",
                                flop=SSIM_FLOP[(sd, window)] * npix * shape[0], ceiling="mm_fp32",
                                baseline=base, est_s=est, absent=absent,
                                checks=dict.fromkeys(("triton", "triton direct taps", "torch (deepssim_fast)"),
                                                     check))
            del x, y, X, Y

    def _time_matrix(self) -> None:
        """ssim_matrix (per-image moments reused) against one-vs-many ssim calls for some of its rows."""
        from deepssim_fast.ssim import ssim, ssim_matrix

        na, nb, mh, mw = self.sizes.matrix_time
        a, b2 = self.rand(na, mh, mw), self.rand(nb, mh, mw)
        rows = max(1, min(na, 64))

        def one_vs_many(a: torch.Tensor = a, b2: torch.Tensor = b2) -> object:
            return [ssim(a[i], b2, spatial_dims=2, data_range=1.0, backend="triton") for i in range(rows)]

        from deepssim_fast.reference import ssim_reference

        # the timed outputs, checked at entries spread over them against the float64 reference
        entries = sorted({(0, 0), (rows // 2, nb // 3), (rows - 1, nb - 1), (na - 1, nb // 2), (na - 1, nb - 1)})
        ref: dict[tuple[int, int], float] = {}

        def check(out: Any, shape: tuple[int, int]) -> tuple[bool, float | None, float | None, str]:
            g = (torch.stack([_host(r) for r in out]) if isinstance(out, list) else _host(out)).to(torch.float64)
            if tuple(g.shape) != shape:
                return False, None, 1e-5, f"shape {tuple(g.shape)} != {shape}"
            if not bool(torch.isfinite(g).all()):
                return False, None, 1e-5, f"{int((~torch.isfinite(g)).sum())} non-finite entries"
            mine = [e for e in entries if e[0] < shape[0]]
            for i, j in mine:
                if (i, j) not in ref:
                    ref[i, j] = float(np.asarray(ssim_reference(a[i].cpu(), b2[j].cpu(), spatial_dims=2,
                                                                data_range=1.0)))
            err = max(abs(float(g[i, j]) - ref[i, j]) for i, j in mine)
            return err <= 1e-5, err, 1e-5, f"entries {mine} vs the float64 reference"

        self._time_case("ssim_matrix u7", f"{na}×{nb} of {mh}²", {
            "triton ssim_matrix": lambda a=a, b2=b2: ssim_matrix(a, b2, spatial_dims=2, data_range=1.0,
                                                                 progress=False, backend="triton"),
            f"triton ssim 1-vs-many ({rows} rows)": one_vs_many,
        }, work=na * nb, unit="pairs", flop=None, ceiling=None,
            baseline=f"triton ssim 1-vs-many ({rows} rows)", est_s=40.0,
            works={f"triton ssim 1-vs-many ({rows} rows)": rows * nb},
            checks={"triton ssim_matrix": lambda out: check(out, (na, nb)),
                    f"triton ssim 1-vs-many ({rows} rows)": lambda out: check(out, (rows, nb))})

    def _time_all_pairs(self) -> None:
        """Triton all_pairs (top-k + histogram + class counts) vs torch.mm bf16 + torch.topk in chunks."""
        from deepssim_fast.all_pairs import all_pairs

        s, dev = self.sizes, self.device
        nt, ns, d, k = s.ap_time
        train = torch.nn.functional.normalize(self.randn(nt, d), dim=1)
        synth = torch.nn.functional.normalize(self.randn(ns, d), dim=1)
        tb, sb = train.to(torch.bfloat16), synth.to(torch.bfloat16)
        chunk = s.ap_chunk

        def torch_topk(a_train: torch.Tensor, a_synth: torch.Tensor, hist: bool = False) -> object:
            vals = torch.empty(ns, k, device=dev)
            idx = torch.empty(ns, k, dtype=torch.int64, device=dev)
            counts = torch.zeros(200, device=dev)
            classes = torch.zeros(2, dtype=torch.int64, device=dev)
            for i in range(0, ns, chunk):
                sc = torch.mm(a_synth[i:i + chunk], a_train.T)
                v, j = torch.topk(sc, k, dim=1)
                vals[i:i + chunk], idx[i:i + chunk] = v.float(), j
                if hist:  # what all_pairs also returns: the histogram of every score and the class counts
                    f = sc.float()
                    counts += torch.histc(f, bins=200, min=-1.0, max=1.0)
                    classes[0] += (f > 0.6).sum()
                    classes[1] += (f > 0.85).sum()
            return vals, idx, counts, classes

        half = "fp16" if self.dry else "bf16"
        self._time_case("all_pairs top-k", f"{ns}×{nt}×{d} k={k}", {
            "triton all_pairs": lambda: all_pairs(train, synth, k=k, backend="triton", progress=False),
            # (the interpreter cannot run bf16 dots: the dry run times fp16, the same tensor-core path)
            f"triton all_pairs {half}": lambda: all_pairs(train, synth, k=k, backend="triton", progress=False,
                                                          precision=half),
            # the tile-histogram modes (kernels/cosine_topk.py histogram_mode picks one by Triton release)
            **{f"triton all_pairs {half} hist_mode {m}": (
                lambda m=m: with_env("DEEPSSIM_FAST_TRITON_HIST_MODE", str(m), all_pairs, train, synth, k=k,
                                     backend="triton", progress=False, precision=half)) for m in (1, 2)},
            "triton all_pairs tf32": lambda: all_pairs(train, synth, k=k, backend="triton", progress=False,
                                                       precision="tf32"),
            "triton all_pairs tf32x3": lambda: all_pairs(train, synth, k=k, backend="triton", progress=False,
                                                         precision="tf32x3"),
            # the earlier launch sizes (8192 synthetic x 16384 training rows), for the record
            f"triton all_pairs {half}, launches 8192 x 16384": lambda: all_pairs(
                train, synth, k=k, backend="triton", progress=False, precision=half, block=8192, tile=16384),
            "torch.mm bf16 + topk": lambda: torch_topk(tb, sb),
            "torch.mm bf16 + topk + histc + classes": lambda: torch_topk(tb, sb, hist=True),
            "torch.mm fp32 + topk": lambda: torch_topk(train, synth),
        }, work=ns * nt, unit="pairs", flop=2.0 * ns * nt * d, ceiling="mm_bf16",
            baseline="torch.mm bf16 + topk", est_s=90.0, checks={
                name: (lambda res, p=p: self._timed_all_pairs_check(res, train, synth, p)) for name, p in (
                    ("triton all_pairs", "ieee"), (f"triton all_pairs {half}", half),
                    (f"triton all_pairs {half} hist_mode 1", half), (f"triton all_pairs {half} hist_mode 2", half),
                    ("triton all_pairs tf32", "tf32"), ("triton all_pairs tf32x3", "tf32x3"),
                    (f"triton all_pairs {half}, launches 8192 x 16384", half))})

    @staticmethod
    def _timed_all_pairs_check(res: Any, train: torch.Tensor, synth: torch.Tensor, precision: str
                               ) -> tuple[bool, float | None, float | None, str]:
        """``verify_all_pairs`` on a timed result, every pair recounted on the device, at ``precision``'s
        tolerance (bf16/fp16/tf32 keep their own scores: checked to their rounding bound)."""
        tol = precision_tol(precision)
        ok, err, detail = verify_all_pairs(res.scores, res.indices, res.histogram[0], dict(res.class_counts),
                                           train, synth, tol=tol, train_hits=res.train_hits)
        return ok, err, tol, f"precision {precision}: {detail}"

    # -- report ------------------------------------------------------------------------------------------
    def table_lines(self) -> list[str]:
        """The short final table (markdown)."""
        lines = ["| kernel | size | provider | ms (min–max) | rate | frac. of ceiling | speed-up |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.timings:
            if t.times_ms:
                ms = f"{t.ms:.3f} ({min(t.times_ms):.3f}–{max(t.times_ms):.3f})"
                rate = f"{_si(t.rate)} {t.unit}/s"
                frac = f"{t.frac:.3g} {t.ceiling}" if t.frac is not None else "-"
                sp = f"{t.speedup:.3g}×" if t.speedup is not None else "-"
            else:
                ms, rate, frac, sp = t.note or "-", "-", "-", "-"
            lines.append(f"| {t.kernel} | {t.size} | {t.provider} | {ms} | {rate} | {frac} | {sp} |")
        return lines


def _si(v: float) -> str:
    if v != v:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:.3g}"


def environment(device: torch.device, dry: bool) -> dict[str, Any]:
    try:
        import triton

        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001
        tv = f"unavailable ({type(exc).__name__}: {exc})"
    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "triton": tv,
        "numpy": np.__version__, "device": str(device), "dry_run": dry,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_GiB=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count, cuda=torch.version.cuda)
    return env


def markdown_block(suite: Suite, env: dict[str, Any]) -> str:
    """The BENCHMARKS.md section of this run: heading, machine line, checks, ceilings and the table."""
    info = _harness().machine_info()
    n_ok = sum(c.ok for c in suite.checks)
    skipped = [c.name for c in suite.checks if c.skipped]
    failed = [c.name for c in suite.checks if not c.ok and not c.skipped]
    warn = ("" if suite.checks and not failed else
            f"**{len(failed)} check(s) failed{' (or none ran)' if not suite.checks else ''}: the timings below "
            f"are of code that did not pass its checks and support no claim** (failed: "
            f"{', '.join(failed)[:300] or 'no checks ran'}). ")
    skip = (f"**{len(skipped)} check(s) did not run (time budget): the timings below support claims only for "
            f"the paths checked** (skipped: {', '.join(skipped)[:300]}). " if skipped else "")
    dry = " (dry run: tiny shapes interpreted on the CPU, not GPU timings)" if env.get("dry_run") else ""
    head = (f"\n### GPU suite — {env.get('gpu', env['device'])}{dry}\n\n_{info['date']} · {info['cpu']} · "
            f"{info['cores']} cores · GPU {info['gpu']} · torch {env['torch']} · triton {env['triton']} · "
            f"commit {info['commit']}_\n\n_{info.get('packages', '')}_\n\n"
            f"Checks: {n_ok}/{len(suite.checks)} passed (seed {suite.seed}). {warn}{skip}"
            f"Ceilings: copy {suite.ceilings.get('copy_GBps', float('nan')):.0f} GB/s, bf16 mm "
            f"{suite.ceilings.get('mm_bf16_TFLOPs', float('nan')):.1f} TFLOP/s, fp32 mm (tf32 off) "
            f"{suite.ceilings.get('mm_fp32_TFLOPs', float('nan')):.1f} TFLOP/s.\n\n")
    return head + "\n".join(suite.table_lines()) + "\n"


def append_markdown(block: str, path: Path) -> None:
    """Append a section (``markdown_block``) to BENCHMARKS.md."""
    _harness().append_text(path, block)


def check_out_arg(p: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` must be a folder or not exist yet (a file there failed at the end of a run, its work lost)."""
    if out.exists() and not out.is_dir():
        p.error(f"--out {str(out)!r} is a file; give a folder (created if missing)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    # (allow_abbrev=False: "--dry" was taken for --dry-run by argparse but not by the interpreter switch above)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_suite_out"),
                   help="folder for the log, JSON and table")
    p.add_argument("--dry-run", action="store_true",
                   help="every check on tiny shapes under TRITON_INTERPRET=1 on the CPU (< 60 s)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget; timing cases that would not fit in what is left are skipped")
    p.add_argument("--checks-share", type=float, default=None,
                   help="fraction of --budget-s the checks may use when timings follow; later checks are "
                        "skipped and reported (default 0.5; 1 with --dry-run, which checks rather than times)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random inputs (default: fresh, logged)")
    p.add_argument("--sections", default="ceilings,checks,timings",
                   help="comma-separated subset of ceilings,checks,timings")
    p.add_argument("--append-md", action="store_true", help="append the final table to BENCHMARKS.md")
    p.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = set(args.sections.split(",")) - {"ceilings", "checks", "timings"}
    if bad:
        p.error(f"unknown section(s) {sorted(bad)}; choose from ceilings, checks, timings")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        p.error(f"--seed must be in [0, 2^63), got {args.seed}")
    check_out_arg(p, args.out)
    if args.checks_share is None:
        args.checks_share = 1.0 if args.dry_run else 0.5
    if not 0 < args.checks_share <= 1:
        p.error(f"--checks-share must be in (0, 1], got {args.checks_share}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dry = bool(args.dry_run)
    if dry and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # main() called in-process without --dry-run in sys.argv: too late to switch triton to the interpreter
        print("gpu_suite: --dry-run needs TRITON_INTERPRET=1 set before triton is imported; "
              "run it as a script", file=sys.stderr)
        return 2
    if dry:
        device = torch.device("cpu")
        sizes = DRY_SIZES
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        sizes = GPU_SIZES
    else:
        print("gpu_suite: no CUDA device found; on a CPU run it with --dry-run", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    handlers = setup_logging(args.out / "gpu_suite.log")
    try:
        return _run(args, device, sizes, budget)
    finally:
        for logger_, h in handlers:
            logger_.removeHandler(h)
            h.close()


def setup_logging(path: Path) -> list[tuple[logging.Logger, logging.Handler]]:
    """The suite's progress to stderr (INFO); everything, the project's own logs and warnings included, to
    ``path`` (DEBUG). Returns the (logger, handler) pairs to remove afterwards."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(path, mode="w")
    fh.setFormatter(fmt)
    fh.setLevel(logging.DEBUG)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    sh.setLevel(logging.INFO)
    logging.captureWarnings(True)
    project = logging.getLogger("deepssim_fast")  # parent of this suite's logger and of the library's
    project.setLevel(logging.DEBUG)
    warn = logging.getLogger("py.warnings")
    pairs = [(log, sh), (project, fh), (warn, fh)]
    for logger_, h in pairs:
        logger_.addHandler(h)
    log.setLevel(logging.DEBUG)
    return pairs


def _run(args: argparse.Namespace, device: torch.device, sizes: Sizes, budget: Budget) -> int:
    dry = bool(args.dry_run)
    where = bootstrap_project()
    seed = args.seed if args.seed is not None else int(time.time_ns() % (2**31 - 1))
    env = environment(device, dry)
    env["project"] = where
    log.info("gpu_suite: %s", json.dumps(env))
    log.info("seed %d (rerun with --seed %d to repeat these inputs)", seed, seed)
    sections = set(args.sections.split(","))
    # (checks alone: the whole budget is theirs)
    share = args.checks_share if "timings" in sections else 1.0
    suite = Suite(device, sizes, seed=seed, budget=budget, dry=dry, sections=sections, checks_share=share)
    section_errors: dict[str, str] = {}
    for name, fn in (("ceilings", suite.run_ceilings), ("checks", suite.run_checks),
                     ("timings", suite.run_timings)):
        if name not in sections:
            continue
        log.info("== %s (%.0f s elapsed, %.0f s left)", name, budget.elapsed(), budget.left())
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - report and carry on with the other sections
            section_errors[name] = f"{type(exc).__name__}: {exc}"
            log.error("section %s stopped: %s\n%s", name, section_errors[name], traceback.format_exc())
            if name == "checks":
                suite.checks.append(Check(f"section {name}", False, detail=section_errors[name]))
    # which Triton kernel modules actually ran (a backend that silently fell back would leave them out)
    kernels_loaded = sorted(m for m in sys.modules if m.startswith("deepssim_fast.kernels."))
    log.info("kernel modules loaded: %s", ", ".join(kernels_loaded) or "none")
    n_ok = sum(c.ok for c in suite.checks)
    passed = n_ok == len(suite.checks) and not section_errors and "checks" in sections and bool(suite.checks)
    if "checks" not in sections:
        passed = not section_errors
    result = {
        "passed": passed, "elapsed_s": budget.elapsed(), "budget_s": args.budget_s, "seed": seed, "env": env,
        "sizes": asdict(sizes), "ceilings": suite.ceilings, "data_sources": suite.data_sources,
        "competitors": suite.competitors, "section_errors": section_errors, "kernels_loaded": kernels_loaded,
        "checks": [asdict(c) for c in suite.checks],
        "timings": [dict(asdict(t), ms=t.ms if t.times_ms else None, rate=t.rate if t.times_ms else None)
                    for t in suite.timings],
    }
    (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str))
    table = suite.table_lines()
    (args.out / "gpu_suite.md").write_text("\n".join(table) + "\n")
    # the section for BENCHMARKS.md, also under --out: on a lent GPU machine only --out comes back, so the
    # section is appended here afterwards (cat OUT/gpu_suite.benchmarks.md >> BENCHMARKS.md)
    block = markdown_block(suite, env)
    (args.out / "gpu_suite.benchmarks.md").write_text(block)
    if args.append_md:
        append_markdown(block, args.benchmarks_md)
    failed = [c for c in suite.checks if not c.ok and not c.skipped]
    for c in failed:
        log.error("FAILED %s: %s", c.name, c.detail)
    n_skip = sum(c.skipped for c in suite.checks)
    if n_skip:
        log.error("%d check(s) skipped for time: the suite does not pass (--budget-s, --checks-share)", n_skip)
    for h in log.handlers:
        h.flush()
    # the short table comes last on stdout
    mode = "(dry run, interpreted, tiny shapes) " if dry else ""
    skip_s = f" ({n_skip} skipped: time budget)" if n_skip else ""
    print(f"\ngpu_suite {mode}on {env.get('gpu', env['device'])}: checks {n_ok}/{len(suite.checks)} passed{skip_s}, "
          f"{budget.elapsed():.0f} s; full log and JSON in {args.out}/")
    print("\n".join(table))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
