"""Which compute backends are usable, and how each public function picks one.

Dispatch follows where the data lives (as FAISS's torch utilities do): a CUDA tensor or a cupy array
goes to the GPU path (Triton), anything on the CPU to the native extension. ``backend=`` on every
public function, or the environment variable ``DEEPSSIM_FAST_BACKEND``, forces a choice; a forced
backend that is not available raises :class:`BackendUnavailableError` saying what to install.

Backend names
-------------
``"native"``  the C++ extension ``deepssim_fast._native`` (CPU, SIMD, multithreaded)
``"torch"``   plain vectorised torch (CPU or GPU); also the reference fallback
``"triton"``  Triton kernels (CUDA GPU; on CPU tensors only with ``TRITON_INTERPRET=1``)
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Any
from collections.abc import Sequence

logger = logging.getLogger(__name__)

BACKENDS = ("native", "torch", "triton")
ENV_VAR = "DEEPSSIM_FAST_BACKEND"

_INSTALL_HINT = {
    "native": "the C++ extension deepssim_fast._native did not import; reinstall the package from source "
    "(`pip install -e .` needs a C++17 compiler and pybind11)",
    "triton": "Triton needs an NVIDIA GPU with a CUDA build of torch, which brings it (else `pip install "
    "\"deepssim_fast[gpu]\"`) "
    "(on a CPU, set TRITON_INTERPRET=1 to run kernels in the interpreter, for tests only)",
    "torch": "install torch",
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for (argument or environment) but cannot run here."""


_NATIVE_MISSING_SAID = False


def _native():
    try:
        return importlib.import_module("deepssim_fast._native")
    except ImportError as exc:
        logger.debug("native extension unavailable: %s", exc)
        return None


def _say_native_missing() -> None:
    """Once per process, where the engine is chosen for the caller (no backend asked for) and the native one
    cannot run: the CPU work then runs on the torch engine, 20-300x slower, and nothing else showed it (a
    source tree shadowing an installed package, a wheel built for a newer glibc)."""
    global _NATIVE_MISSING_SAID
    if _NATIVE_MISSING_SAID:
        return
    _NATIVE_MISSING_SAID = True
    try:
        importlib.import_module("deepssim_fast._native")
        return
    except ImportError as exc:
        why = str(exc)
    warnings.warn(f"deepssim_fast: {_INSTALL_HINT['native']} ({why}); CPU work runs on the torch engine, much "
                  "slower; `deepssim-fast doctor` shows what this machine can use", RuntimeWarning, stacklevel=4)


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: The oldest Triton the kernels compile with: ``tl.gather`` (the separable SSIM kernel) arrived in 3.3
#: (Triton 3.2.0 fails on it). The all-pairs kernel's tile histograms need 3.4 (``tl.histogram`` with a
#: mask); before that it uses per-pair atomics (``kernels/cosine_topk.py``, ``histogram_mode``).
MIN_TRITON = (3, 3)


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return triton.__version__


def _triton_too_old(version: str) -> bool:
    """True when ``version`` is a Triton release older than ``MIN_TRITON`` (unreadable versions pass)."""
    try:
        release = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        return False
    return release < MIN_TRITON


def _cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cupy_version() -> str | None:
    try:
        import cupy
    except Exception:  # noqa: BLE001
        return None
    return cupy.__version__


def _topk_kernel_in_force(nat: Any) -> dict[str, Any]:
    """The all-pairs GEMM kernel a call would use here: ``topk_kernel`` (``int16-vnni``, ``int16-avx2`` or
    ``fp32``), ``topk_kernel_choice`` (``auto``: int16 where the CPU has one, unless the bins are so fine, or
    the CPU's int16 AVX2 kernel so slow (``topk_int16_speedup``, measured), that fp32 costs less; or
    ``fp32``/``int16``, forced by ``set_topk_kernel`` or DEEPSSIM_FAST_TOPK_KERNEL) and,
    when that variable holds no kernel name, ``topk_kernel_error`` (every all_pairs call raises it). Reported
    before as what the CPU could run, whatever was forced."""
    if not hasattr(nat, "topk_kernel_choice"):  # (an extension built before it: rebuild to see the choice)
        return {"topk_kernel": None, "topk_kernel_choice": None}
    int16 = nat.topk_int16_kernel()
    try:
        choice = nat.topk_kernel_choice()
    except ValueError as exc:
        return {"topk_kernel": None, "topk_kernel_choice": None, "topk_kernel_error": str(exc)}
    kernel = "fp32" if choice == "fp32" or int16 is None else int16
    out: dict[str, Any] = {"topk_kernel": kernel, "topk_kernel_choice": choice}
    if int16 == "int16-avx2" and choice == "auto" and hasattr(nat, "topk_int16_speedup"):
        # the automatic choice weighs the int16 AVX2 kernel's speed measured on this CPU (on some, Zen 1, it is
        # no faster than fp32): what it takes for typical embeddings (unit rows, d = 256, the default 200 bins)
        out["topk_int16_speedup"] = float(nat.topk_int16_speedup())
        out["topk_kernel"] = _auto_kernel_for_typical_rows(nat)
    return out


def _auto_kernel_for_typical_rows(nat: Any) -> str:
    """The approximate-score kernel ``topk_fused`` picks for 64 x 64 random unit rows of d = 256 at the default
    200 bins on [-1, 1] (the kernel choice weighs the data's int16 rounding and the CPU's kernel speeds)."""
    import numpy as np

    rows = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    top_s, top_i = np.full((64, 1), -np.inf, np.float32), np.full((64, 1), np.iinfo(np.int64).max, np.int64)
    return str(nat.topk_fused(rows, rows, 0, 0, -1, top_s, top_i, np.zeros(200, np.int64), np.zeros(3, np.int64),
                              -1.0, 1.0, 0.6, 0.85))


def backends() -> dict[str, Any]:
    """What is usable on this machine.

    Returns a dict with one entry per backend (``native``, ``torch``, ``triton``) plus ``cuda``
    (device names), ``cupy`` (version or None) and ``environment`` (the DEEPSSIM_FAST_* variables set). Each
    backend entry has ``available`` and details (native: the all-pairs kernel in force, see
    :func:`_topk_kernel_in_force`).
    """
    import torch

    nat = _native()
    native = {"available": nat is not None}
    if nat is not None:
        native.update(
            simd=nat.simd_level(),
            detected_simd=nat.detected_simd_level(),
            threads=nat.num_threads(),
            capabilities=list(nat.capabilities),
        )
        native.update(_topk_kernel_in_force(nat))
    cuda = _cuda_devices()
    tv = _triton_version()
    triton_ok = tv is not None and not _triton_too_old(tv) and (bool(cuda) or triton_interpret())
    if triton_ok:
        why = None
    elif tv is None:
        why = "triton is not installed"
    elif _triton_too_old(tv):
        why = f"triton {tv} is too old"
    else:
        why = "no CUDA device; TRITON_INTERPRET=1 runs the kernels on the CPU, for tests"
    return {
        "native": native,
        "torch": {"available": True, "version": torch.__version__, "threads": torch.get_num_threads()},
        "triton": {
            "available": triton_ok,
            "version": tv,
            "mode": ("gpu" if cuda else "interpreter") if triton_ok else None,
            "reason": why,
        },
        "cuda": cuda,
        "cupy": _cupy_version(),
        # the settings that change what runs (a forced backend, a capped SIMD level, ...), as set here
        "environment": {k: v for k, v in sorted(os.environ.items())
                        if k.startswith("DEEPSSIM_FAST_") or k == "TRITON_INTERPRET"},
    }


#: Every DEEPSSIM_FAST_* variable the package reads (``doctor`` names any other as read by nothing: a misspelt
#: DEEPSSIM_FAST_NUM_THREAD was listed among the settings in force).
KNOWN_ENV = frozenset({
    "DEEPSSIM_FAST_BACKEND", "DEEPSSIM_FAST_NUM_THREADS", "DEEPSSIM_FAST_SIMD", "DEEPSSIM_FAST_SSIM_BOX",
    "DEEPSSIM_FAST_TOPK_KERNEL", "DEEPSSIM_FAST_TRITON_HIST_MODE", "DEEPSSIM_FAST_TRITON_SSIM",
    "DEEPSSIM_FAST_TEST_KILL_ONCE",
})


def is_gpu_array(x: Any) -> bool:
    """True for a CUDA torch tensor or a cupy array."""
    if type(x).__module__.startswith("cupy"):
        return True
    return bool(getattr(x, "is_cuda", False))


def available(name: str) -> bool:
    if name == "torch":
        return True
    if name == "native":
        return _native() is not None
    if name == "triton":
        version = _triton_version()
        if version is None or _triton_too_old(version):
            return False
        return bool(_cuda_devices()) or triton_interpret()
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def triton_device(t: Any) -> Any:
    """Where a torch tensor must be for the Triton kernels: host tensors go to the current CUDA device, unless
    the interpreter (``TRITON_INTERPRET=1``) runs them on the CPU. (``backend="triton"`` with numpy data.)"""
    if t.device.type == "cpu" and not triton_interpret():
        return t.to("cuda")
    return t


def require(name: str) -> None:
    """Raise BackendUnavailableError if ``name`` cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if not available(name):
        version = _triton_version() if name == "triton" else None
        if version is not None and _triton_too_old(version):
            raise BackendUnavailableError(
                f"backend 'triton' is not available: Triton {version} is installed, and the kernels need "
                f"Triton >= {'.'.join(map(str, MIN_TRITON))} (tl.gather); `pip install -U 'triton>="
                f"{'.'.join(map(str, MIN_TRITON))}'`")
        raise BackendUnavailableError(f"backend {name!r} is not available: {_INSTALL_HINT[name]}")


def env_backend() -> tuple[str, str | None]:
    """``$DEEPSSIM_FAST_BACKEND`` as set (for messages) and as calls read it: in any case, as
    ``$DEEPSSIM_FAST_SIMD`` and ``$DEEPSSIM_FAST_TOPK_KERNEL`` take theirs, blanks dropped; None when unset or
    empty."""
    raw = os.environ.get(ENV_VAR, "")
    return raw, raw.strip().lower() or None


def resolve(backend: str | None, arrays: Sequence[Any], *, cpu_default: str = "native",
            supported: Sequence[str] = BACKENDS) -> str:
    """Pick the backend for a call.

    Order: the explicit ``backend`` argument, then ``$DEEPSSIM_FAST_BACKEND``, then where the data
    lives (any GPU array -> ``"triton"``; CPU -> ``cpu_default``, falling back to ``"torch"`` when the
    native extension is missing). ``"auto"`` means "decide from the data".
    """
    from_env = backend in (None, "auto")
    raw, requested = env_backend() if from_env else (backend, backend)
    if requested == "auto":
        requested = None
    if requested is not None:
        # a value from the environment is named as such: the caller did not pass it and may not know it is set
        source = f"${ENV_VAR}={raw!r}" if from_env else f"backend {requested!r}"
        if requested not in supported:
            hint = " (or 'auto', or unset it)" if from_env else ""
            raise ValueError(f"{source} is not supported here; expected one of {tuple(supported)}{hint}")
        try:
            require(requested)
        except BackendUnavailableError as exc:
            if from_env:
                raise BackendUnavailableError(f"{source}: {exc}") from None
            raise
        return requested
    if any(is_gpu_array(a) for a in arrays):
        return "triton" if "triton" in supported and available("triton") else "torch"
    if cpu_default in supported and available(cpu_default):
        return cpu_default
    if cpu_default == "native":
        _say_native_missing()
    return "torch"
