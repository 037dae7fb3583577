"""Shared pytest configuration: the run says which CPU code paths this machine exercised."""

from __future__ import annotations

import pytest


def _native_line() -> str:
    try:
        from deepssim_fast import _native
    except ImportError as exc:  # pragma: no cover - the suite's own tests report this
        return f"deepssim_fast._native: not importable ({exc})"
    simd, active = _native.detected_simd_level(), _native.simd_level()
    level = simd if active == simd else f"{active} (capped; the CPU has {simd})"
    line = (f"deepssim_fast native: SIMD {level}, all-pairs int16 kernel {_native.topk_int16_kernel()}, "
            f"{_native.num_threads()} threads")
    if active != "avx512":
        line += " (the AVX-512 paths were not exercised)"
    return line


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Several native kernels are chosen by the CPU (AVX-512 SSIM bands, the VNNI all-pairs kernel); tests
    of a level the CPU lacks are skipped or resolve to a lower level. Say which, also under -q (CI logs)."""
    terminalreporter.write_line(_native_line())


@pytest.fixture
def axes_titles(monkeypatch) -> list:
    """The titles matplotlib axes are given while the test runs (the report's figures: histogram, gallery)."""
    import matplotlib.axes

    titles: list[str] = []
    set_title = matplotlib.axes.Axes.set_title

    def spy(self, label, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        titles.append(label)
        return set_title(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", spy)
    return titles


def pytest_collection_finish(session) -> None:
    """Start the long subprocess checks the selected tests need beside the suite (``_prestart``)."""
    import _prestart

    _prestart.queue_for(session.items)


def pytest_sessionfinish(session, exitstatus) -> None:
    import _prestart

    _prestart.close()
