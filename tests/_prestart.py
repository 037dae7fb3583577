"""Long subprocess checks, started in the background at the start of the run.

A few checks run a script in a subprocess for minutes (the Triton kernels compiled ahead of time, the
interpreted Triton suites, the GPU scripts' dry runs). The suite itself runs in one process, mostly on one
core, so on a 2-core CI machine these scripts can run beside it: ``conftest.py`` queues every registered
job whose tests were collected (and not deselected), and one runner thread starts them one at a time, at
the lowest CPU priority, in the order their tests will ask for them. The test (or fixture) then calls
:func:`result`, which waits for its job, or runs it at once if it has not started yet.

The job's arguments are made when it is queued, before any test runs (``make``, in the suite's environment
and working directory), with its own temporary folder, removed at the end of the session. Only when the job
runs and what else runs beside it change; what it computes and what the test asserts do not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

# make(tmp) -> (argv, popen keyword arguments, context): tmp is the job's own empty folder
Make = Callable[[Path], "tuple[list[str], dict[str, Any], dict[str, Any]]"]


@dataclass
class _Job:
    name: str
    wanted_by: Callable[[Any], bool]  # a collected pytest item -> whether it needs this job
    make: Make
    timeout: float
    state: str = "registered"  # registered -> queued -> running -> done
    tmp: Path | None = None
    argv: list[str] | None = None  # (made when queued: _prepare)
    kwargs: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    outcome: subprocess.CompletedProcess | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


_JOBS: dict[str, _Job] = {}
_QUEUE: list[str] = []
_LOCK = threading.Lock()
_WAKE = threading.Condition(_LOCK)
_RUNNER: threading.Thread | None = None
_CLOSED = False


def register(name: str, *, wanted_by: Callable[[Any], bool], make: Make, timeout: float) -> None:
    """Declare a job (at a test module's import, i.e. at collection). ``timeout`` counts from when the test
    asks for the result, as a plain ``subprocess.run(..., timeout=)`` in the test did."""
    with _LOCK:
        if name not in _JOBS:
            _JOBS[name] = _Job(name, wanted_by, make, timeout)


def uses(module: str, *, fixture: str | None = None, test: str | None = None) -> Callable[[Any], bool]:
    """A ``wanted_by``: the items of test module ``module`` that use ``fixture``, or the test function
    ``test`` (each of its parametrisations)."""

    def wanted(item: Any) -> bool:
        if getattr(getattr(item, "module", None), "__name__", None) != module:
            return False
        if fixture is not None:
            return fixture in getattr(item, "fixturenames", ())
        return getattr(item, "originalname", None) == test

    return wanted


def interpreted_script(script: str) -> Make:
    """A ``make`` for ``python -c script`` with the Triton kernels in the interpreter (TRITON_INTERPRET=1) and
    this folder on PYTHONPATH (the scripts import ``_triton_launches`` from it)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def make(tmp: Path) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        return [sys.executable, "-c", script], dict(env=env), {}

    return make


def queue_for(items: list) -> list[str]:
    """Queue the registered jobs some of ``items`` need, in the order of their first such item, and start the
    runner thread. Returns the names queued."""
    global _RUNNER, _CLOSED
    with _LOCK:
        if _CLOSED:  # (a second session in this process, pytest.main() run twice: its jobs start afresh)
            for name, job in list(_JOBS.items()):
                _JOBS[name] = _Job(name, job.wanted_by, job.make, job.timeout)
            _QUEUE.clear()
            _RUNNER, _CLOSED = None, False
    firsts: dict[str, int] = {}
    for pos, item in enumerate(items):
        for name, job in _JOBS.items():
            if name not in firsts and job.wanted_by(item):
                firsts[name] = pos
    # (each job is made now, before any test runs: a job made when it starts would take the environment and
    # working directory of whatever test runs then, a monkeypatched DEEPSSIM_FAST_* variable or a chdir)
    for name in sorted(firsts, key=firsts.get):
        job = _JOBS[name]
        if job.state == "registered" and job.argv is None:
            try:
                _prepare(job)
            except Exception as exc:  # (reported by result(), in the test that wants the job, not as an
                job.error = exc       # INTERNALERROR of the whole session)
                job.state = "done"
                job.done.set()
    _end_with_the_suite()
    with _LOCK:
        for name in sorted(firsts, key=firsts.get):
            if _JOBS[name].state == "registered":
                _JOBS[name].state = "queued"
                _QUEUE.append(name)
        if _QUEUE and _RUNNER is None:
            _RUNNER = threading.Thread(target=_run_queue, name="prestart", daemon=True)
            _RUNNER.start()
        _WAKE.notify_all()
    return [n for n in sorted(firsts, key=firsts.get)]


def _prepare(job: _Job) -> None:
    """Make ``job``'s folder and arguments, in the environment and working directory of this moment."""
    job.tmp = Path(tempfile.mkdtemp(prefix=f"deepssim_prestart_{job.name}_"))
    job.argv, job.kwargs, job.context = job.make(job.tmp)
    job.kwargs.setdefault("cwd", os.getcwd())
    job.kwargs.setdefault("env", dict(os.environ))


_ENDED = False


def _end_with_the_suite() -> None:
    """The jobs run in sessions of their own (a test's Ctrl-C to its own children does not reach them), so the
    suite ends them: at exit, and on SIGTERM (a cancelled CI run) or SIGHUP (the terminal or ssh session
    closed), which otherwise end Python without pytest's session finish; the signal then takes its default
    course."""
    global _ENDED
    import atexit
    import signal

    if _ENDED:
        return
    _ENDED = True
    atexit.register(close)
    if threading.current_thread() is not threading.main_thread():
        return

    def on_signal(signum: int, frame: Any) -> None:
        # Without _LOCK: the handler runs in the main thread, which may hold it (result(), queue_for()); close()
        # taking it here deadlocked a SIGTERM that landed there. Reading the jobs' processes needs no lock.
        # _CLOSED first (a plain assignment): the runner then starts no further job, kills one it is starting
        # (_start) and reads no folder (_finish); it is given a moment to get there before the last sweep.
        global _CLOSED
        _CLOSED = True
        _kill_all(remove_folders=True)
        runner = _RUNNER
        if runner is not None and runner is not threading.current_thread():
            runner.join(timeout=2)
        _kill_all(remove_folders=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, on_signal)


def _kill_all(*, remove_folders: bool = False) -> None:
    """Kill every started job that still runs (and, ``remove_folders``, remove every job's folder), without
    taking _LOCK."""
    for job in list(_JOBS.values()):
        proc = job.proc
        if proc is not None and proc.poll() is None:
            _kill(proc)
        if remove_folders and job.tmp is not None:
            shutil.rmtree(job.tmp, ignore_errors=True)


def _start(job: _Job, background: bool) -> None:
    """Start ``job`` (called with _LOCK held, state queued or registered)."""
    try:
        if job.argv is None:
            _prepare(job)
        assert job.argv is not None and job.tmp is not None
        # (the lowest CPU priority through nice(1), inherited by the job's own children; not preexec_fn, which
        # is not safe in a process with other threads)
        nice = ["nice", "-n", "19"] if background and shutil.which("nice") else []
        with open(job.tmp / "stdout", "wb") as out, open(job.tmp / "stderr", "wb") as err:
            job.proc = subprocess.Popen(nice + job.argv, stdout=out, stderr=err, start_new_session=True,
                                        **job.kwargs)
        if _CLOSED:  # (a signal's handler ran while this job was being started: it ends with the rest)
            _kill(job.proc)
    except BaseException as exc:  # reported by result()
        job.error = exc
        job.state = "done"
        job.done.set()
        return
    job.state = "running"


def _finish(job: _Job, rc: int) -> None:
    """Called with _LOCK held. After close() the job's folder may be gone: nothing is read then."""
    if _CLOSED:
        job.state = "done"
        job.done.set()
        return
    assert job.tmp is not None and job.proc is not None
    try:
        out = (job.tmp / "stdout").read_bytes().decode(errors="replace")
        err = (job.tmp / "stderr").read_bytes().decode(errors="replace")
    except OSError:
        if not _CLOSED:  # (a signal's handler removed the folder between the check above and these reads)
            raise
        job.state = "done"
        job.done.set()
        return
    job.outcome = subprocess.CompletedProcess(job.proc.args, rc, out, err)
    job.state = "done"
    job.done.set()


def _run_queue() -> None:
    while True:
        with _LOCK:
            while not _QUEUE and not _CLOSED:
                _WAKE.wait()
            if _CLOSED:
                return
            job = _JOBS[_QUEUE.pop(0)]
            if job.state != "queued":  # taken by result() meanwhile
                continue
            _start(job, background=True)
        if job.proc is not None and job.state == "running":
            rc = job.proc.wait()
            with _LOCK:
                if job.state == "running":
                    _finish(job, rc)


def result(name: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """The finished job ``name``: its CompletedProcess (text stdout/stderr) and the context its ``make``
    returned. Starts it at once (at normal priority) if it has not started; raises
    ``subprocess.TimeoutExpired`` after the job's timeout, counted from this call, killing it."""
    job = _JOBS[name]
    with _LOCK:
        if job.state in ("registered", "queued"):
            _start(job, background=False)
            if job.state == "running":
                threading.Thread(target=lambda: _reap(job), daemon=True).start()
    if not job.done.wait(job.timeout):
        with _LOCK:
            if job.proc is not None and job.proc.poll() is None:
                _kill(job.proc)
        raise subprocess.TimeoutExpired(job.proc.args if job.proc else name, job.timeout)
    if job.error is not None:
        raise job.error
    assert job.outcome is not None
    return job.outcome, job.context


def _reap(job: _Job) -> None:
    assert job.proc is not None
    rc = job.proc.wait()
    with _LOCK:
        if job.state == "running":
            _finish(job, rc)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)  # (the job's own session: its children too)
    except (ProcessLookupError, PermissionError):
        pass


def session_ids() -> set[int]:
    """The session ids of the jobs started so far: their processes are the suite's children but not any
    test's (a test that counts the processes it leaves behind leaves these out)."""
    with _LOCK:
        return {j.proc.pid for j in _JOBS.values() if j.proc is not None}


def close() -> None:
    """End of the session: kill what still runs, remove every job's folder."""
    global _CLOSED
    with _LOCK:
        _CLOSED = True
        _WAKE.notify_all()
        _kill_all()
    deadline = time.monotonic() + 10
    for job in _JOBS.values():
        if job.proc is not None:
            try:
                job.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    with _LOCK:  # (_finish reads a job's folder under the lock, and not at all once _CLOSED is set)
        for job in _JOBS.values():
            if job.tmp is not None:
                shutil.rmtree(job.tmp, ignore_errors=True)
                job.tmp = None
