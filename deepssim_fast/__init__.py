"""deepssim_fast — exact SSIM, streaming all-pairs cosine top-k and DeepSSIM memorisation audits.

Public API (imported lazily, so ``import deepssim_fast`` stays light):

* :func:`ssim`, :func:`ssim_matrix` — exact windowed SSIM (2D/3D), native CPU and Triton GPU.
* :func:`all_pairs` — exact cosine top-k over every (synthetic, training) pair with a fused histogram.
* :func:`train`, :func:`embed`, :func:`load_model` — the DeepSSIM encoder.
* :func:`audit` — the memorisation audit pipeline.
* :func:`backends` — what can run here.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ssim": "deepssim_fast.ssim",
    "ssim_matrix": "deepssim_fast.ssim",
    "all_pairs": "deepssim_fast.all_pairs",
    "AllPairsResult": "deepssim_fast.all_pairs",
    "train": "deepssim_fast.training",
    "embed": "deepssim_fast.model",
    "load_model": "deepssim_fast.model",
    "build_model": "deepssim_fast.model",
    "audit": "deepssim_fast.audit",
}

# Functions that share their module's name are bound eagerly, so the package attribute is always the
# function (``deepssim_fast.backends()``) while ``from deepssim_fast.backends import resolve`` still
# reaches the module through sys.modules.
from .backends import backends  # noqa: E402

__all__ = sorted(_EXPORTS) + ["__version__", "backends"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'deepssim_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
