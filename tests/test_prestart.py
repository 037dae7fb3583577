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


def test_a_job_whose_arguments_cannot_be_made_is_its_tests_error() -> None:
    """A ``make`` that raised stopped the whole session at collection (INTERNALERROR, no test run); the error
    is now the result of the job, raised in the test that asks for it."""
    def make(tmp: Path):
        raise FileNotFoundError("no such script")

    _prestart.register("selftest_make_fails", wanted_by=lambda item: item == "selftest_make_fails", timeout=60,
                       make=make)
    assert _prestart.queue_for(["selftest_make_fails"]) == ["selftest_make_fails"]
    with pytest.raises(FileNotFoundError, match="no such script"):
        _prestart.result("selftest_make_fails")


# A child process with its own _prestart: one job (sleep) started in the background, then a signal to itself
# while its main thread holds _prestart's lock, as result() and queue_for() do. It prints the job's pid and
# folder first.
_SIGNALLED = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
import _prestart
_prestart.register("sleeper", wanted_by=lambda item: True, timeout=60,
                   make=lambda tmp: ([sys.executable, "-c", "import time; time.sleep(60)"], {{}}, {{}}))
_prestart.queue_for(["x"])
job = _prestart._JOBS["sleeper"]
while job.proc is None:
    time.sleep(0.01)
print(job.proc.pid, job.tmp, flush=True)
with _prestart._LOCK:
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
print("survived", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_ends_the_suite_and_its_jobs_even_while_the_runner_is_locked(tmp_path: Path, sig: str) -> None:
    """SIGTERM (a cancelled CI run) that landed while the main thread held the runner's lock hung pytest for
    good: the handler's close() waited for that lock. SIGHUP (a closed terminal) left the jobs, which run in
    sessions of their own, running with their folders. Both now kill the jobs, remove their folders and end
    the process by the signal."""
    import signal
    import subprocess
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED.format(here=here, sig=sig)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=25)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"the child hung after {sig}: {out}")
    assert proc.returncode == -getattr(signal, sig), (proc.returncode, out)
    pid, folder = out.split()[:2]
    assert "survived" not in out
    for _ in range(100):  # (killed: gone once its parent, the child above, is gone and init reaped it)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(int(pid), 9)
        pytest.fail(f"the job {pid} outlived the suite's {sig}")
    assert not Path(folder).exists()


_TWICE = """
import sys
sys.path.insert(0, {here!r})
import _prestart
_prestart.register("writer", wanted_by=lambda item: True, timeout=60,
                   make=lambda tmp: ([sys.executable, "-c", f"open({{str(tmp / 'out.txt')!r}}, 'w').write('x')"],
                                     {{}}, {{"out": tmp / "out.txt"}}))
for session in (1, 2):
    _prestart.queue_for(["x"])
    proc, ctx = _prestart.result("writer")
    assert proc.returncode == 0, proc.stderr
    print(session, ctx["out"].read_text(), flush=True)
    _prestart.close()
"""


def test_a_second_session_in_one_process_runs_its_jobs_again() -> None:
    """pytest.main() twice in one process (an IDE's runner): the second session got the first's result, whose
    folder close() had removed (FileNotFoundError in the test). Each session's jobs now run afresh."""
    here = os.path.dirname(os.path.abspath(__file__))
    import subprocess

    done = subprocess.run([sys.executable, "-c", _TWICE.format(here=here)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "x", "2", "x"]


# A child with two queued jobs (each writes its pid to a file, then sleeps), signalled while the runner waits on
# the first: the handler kills it, and the runner thread then woke to read the removed folder (a traceback on
# stderr) or started the second job, which outlived the process in a session of its own.
_RACED = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
import _prestart
job = [sys.executable, "-c", "import os, time; open({pids!r}, 'a').write(f'{{os.getpid()}}\\\\n'); time.sleep(60)"]
for name in ("first", "second"):
    _prestart.register(name, wanted_by=lambda item: True, timeout=60, make=lambda tmp: (job, {{}}, {{}}))
_prestart.queue_for(["x"])
first = _prestart._JOBS["first"]
while first.proc is None:
    time.sleep(0.01)
print(first.tmp, flush=True)
# (the handler's last step, the signal sent again, is held back a second: what the runner thread does after
# the handler's sweep then happens before the process ends, instead of in a window too narrow to test)
real_kill = os.kill
def held_back(pid, sig):
    if pid == os.getpid():
        time.sleep(1.0)
    real_kill(pid, sig)
os.kill = held_back
real_kill(os.getpid(), signal.SIGHUP)
time.sleep(30)
print("survived", flush=True)
"""


def test_a_signal_while_the_runner_waits_on_a_job_leaves_no_job_and_no_traceback(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    here = os.path.dirname(os.path.abspath(__file__))
    pids = tmp_path / "pids.txt"
    for attempt in range(3):
        pids.write_text("")
        proc = subprocess.Popen([sys.executable, "-c", _RACED.format(here=here, pids=str(pids))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            pytest.fail(f"attempt {attempt}: the child hung after SIGHUP")
        assert proc.returncode == -signal.SIGHUP, (attempt, proc.returncode, out, err)
        assert "survived" not in out and "Traceback" not in err, (attempt, err)
        assert not Path(out.split()[0]).exists()
        time.sleep(0.3)  # (a second job started at the last moment has had time to write its pid)
        for pid in map(int, pids.read_text().split()):
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                pytest.fail(f"attempt {attempt}: the job {pid} outlived the process's SIGHUP")
