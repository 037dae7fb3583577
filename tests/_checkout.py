"""Running a script in a fresh interpreter against this checkout's package (for tests whose subject is a
process: a crash, a hang, a signal, a resource limit, a forced environment)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import deepssim_fast

PKG_ROOT = str(Path(deepssim_fast.__file__).resolve().parents[1])  # this checkout's package, not an installed one


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
               **kwargs) -> subprocess.CompletedProcess:
    """``python -c code *args`` with this checkout first on PYTHONPATH and ``env`` added to the environment;
    output captured as text. ``kwargs`` go to subprocess.run."""
    full = {**os.environ, **(env or {}),
            "PYTHONPATH": os.pathsep.join([PKG_ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def assert_ok(r: subprocess.CompletedProcess) -> None:
    """The script exited 0 and its last line of output is "ok"."""
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout, r.stderr[-2000:])
