"""deepssim_fast — exact SSIM, streaming all-pairs cosine top-k and DeepSSIM memorisation audits.

Public API:

* :func:`ssim`, :func:`ssim_matrix` — exact windowed SSIM (2D/3D), native CPU and Triton GPU.
* :func:`all_pairs` — exact cosine top-k over every (synthetic, training) pair with a fused histogram.
* :func:`train`, :func:`embed`, :func:`load_model`, :func:`build_model` — the DeepSSIM encoder.
* :func:`audit` — the memorisation audit pipeline.
* :func:`backends` — what can run here.

Functions that share their module's name (``ssim``, ``all_pairs``, ``audit``, ``backends``) are bound
eagerly, so the package attribute is always the function, while ``from deepssim_fast.ssim import ...``
still reaches the module. The encoder (``model``, ``training``) is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .all_pairs import AllPairsResult, all_pairs
from .audit import audit
from .backends import backends
from .ssim import ssim, ssim_matrix

__version__ = "0.1.0"

_LAZY = {
    "train": "deepssim_fast.training",
    "embed": "deepssim_fast.model",
    "load_model": "deepssim_fast.model",
    "build_model": "deepssim_fast.model",
}

__all__ = ["AllPairsResult", "__version__", "all_pairs", "audit", "backends", "build_model", "embed",
           "load_model", "ssim", "ssim_matrix", "train"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'deepssim_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
