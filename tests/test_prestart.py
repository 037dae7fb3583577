"""The suite's background runner of long subprocess checks (``tests/_prestart.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _prestart
import pytest

_SCRIPT = "import os; print(os.environ.get('DSF_PRESTART_PROBE'), os.getcwd())"


def test_a_job_runs_in_the_environment_and_folder_of_when_it_was_queued(monkeypatch, tmp_path: Path) -> None:
    """A job made when it started took the environment and working directory of whatever test ran then (a
    monkeypatched DEEPSSIM_FAST_* variable, a chdir). It is made when queued, before the tests run."""
    _prestart.register("selftest_env", wanted_by=lambda item: item == "selftest_env", timeout=120,
                       make=lambda tmp: ([sys.executable, "-c", _SCRIPT], {}, {"tmp": tmp}))
    # (a job ahead of it in the queue, so that it cannot start before the test below changes both)
    _prestart.register("selftest_ahead", wanted_by=lambda item: item == "selftest_ahead", timeout=120,
                       make=lambda tmp: ([sys.executable, "-c", "import time; time.sleep(1.5)"], {}, {}))
    monkeypatch.setenv("DSF_PRESTART_PROBE", "when-queued")
    queued_in = os.getcwd()
    assert _prestart.queue_for(["selftest_ahead", "selftest_env"]) == ["selftest_ahead", "selftest_env"]
    monkeypatch.setenv("DSF_PRESTART_PROBE", "later")  # (a test that runs while the job waits its turn)
    monkeypatch.chdir(tmp_path)
    proc, ctx = _prestart.result("selftest_env")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["when-queued", queued_in]
    assert ctx["tmp"].is_dir() and ctx["tmp"].name.startswith("deepssim_prestart_selftest_env_")


def test_a_job_that_cannot_start_is_its_tests_error(tmp_path: Path) -> None:
    _prestart.register("selftest_missing", wanted_by=lambda item: False, timeout=60,
                       make=lambda tmp: ([str(tmp_path / "no-such-program")], {}, {}))
    with pytest.raises(FileNotFoundError):
        _prestart.result("selftest_missing")
