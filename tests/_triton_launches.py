"""Counting a Triton kernel's launches in the interpreted test scripts: their results must come from the
kernel itself, not from a fallback engine that computes the same numbers."""

from __future__ import annotations

from typing import Any


def count_launches(module: Any, name: str) -> list[int]:
    """Replace the @triton.jit kernel ``module.name`` by a wrapper that counts launches (``kernel[grid](...)``)
    and still runs them; returns the one-element counter list."""
    count = [0]
    kernel = getattr(module, name)

    class Counting:
        def __getitem__(self, grid: Any) -> Any:
            launch = kernel[grid]

            def run(*args: Any, **kwargs: Any) -> Any:
                count[0] += 1
                return launch(*args, **kwargs)

            return run

    setattr(module, name, Counting())
    return count
