"""Scale-out of the all-pairs search over Dask, with exact merges and resumable shards.

The work of ``all_pairs(train, synth)`` is cut into *shards*: blocks of synthetic rows, and — when the
training set is too large for one worker's memory — blocks of training rows as well. Every shard runs
the same single-process engine (:func:`deepssim_fast.all_pairs.all_pairs`) on a worker; the per-shard
results (top-k lists, histogram, class counts, train_hits) are merged with
:meth:`AllPairsResult.merge`, so with the native engine (CPU workers) the result is identical, bit for bit,
to one process. The torch and Triton engines (GPU workers, or ``backend="torch"``) order each dot product by
the shape of the block they get, so their GEMM scores can differ from one process's in the last bits (as
they differ from the native engine's), and pairs that close to an edge can move between neighbouring bins;
their top-k is re-scored pair by pair (see :mod:`deepssim_fast.all_pairs`), the same in every shard.

Where the work runs
-------------------
``workers=N``                  an embedded :class:`distributed.LocalCluster` of N processes on this
                               machine (loopback only), or, when several GPUs are present and
                               ``dask_cuda`` is installed, a ``LocalCUDACluster`` with one worker per GPU.
``scheduler="tcp://host:8786"`` an existing cluster (``dask scheduler`` + ``dask worker``, dask-jobqueue
                               on SLURM/PBS, dask-cuda workers ...). A :class:`distributed.Client` is
                               accepted too and is left open, and a cluster object (``LocalCluster``,
                               dask-jobqueue's ...), left running.

Nothing about Dask is imported until one of these is asked for: importing this module is cheap.

Data movement
-------------
The training embeddings are scattered once and broadcast to every worker (one copy per worker, not
per task); split into training blocks, each block is scattered once and Dask copies it to the workers
that need it. A synthetic shard travels once, just before its task runs: inside the task when it is small
(under :data:`SCATTER_MIN_BYTES`), scattered to a worker otherwise; a few shards per worker thread are in
flight at a time. In self mode (``synth=None``) the synthetic rows are sliced from the training block on
the worker and never travel.

Faults and resume
-----------------
A worker that dies mid-task has its task re-run by the scheduler (up to Dask's
``distributed.scheduler.allowed-failures`` times); an error raised by the engine itself (bad input found on a
worker) is not retried: it is raised at once, naming the rows by their global numbers. Data
that only the dead worker held is scattered again from this process and the shard is resubmitted.
With ``checkpoint_dir`` every finished shard is saved (``AllPairsResult.save``, atomic) as soon as it
arrives; a restarted run with the same inputs and options loads the valid ones and runs the rest (two runs
of one job may share the folder at once; a temporary file there is removed only once it is old enough to be a
killed run's, :data:`_TEMPORARY_AGE_S`). With
``backend=None`` a run resumed on other workers (GPUs after CPUs) can mix engines: the result's ``backend``
then names them all (``"native+triton"``) and a warning says so; pass ``backend=`` for one engine.

Conventions are those of :func:`deepssim_fast.all_pairs.all_pairs`: scores float32 descending,
indices int64 into ``train``, ties to the lower index.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._atomic import atomic_write_bytes, remove_temporaries
from ._ssim_common import check_count_or_none
from .backends import BACKENDS
from .backends import env_backend
from .backends import resolve as _resolve_backend

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from .all_pairs import AllPairsResult

logger = logging.getLogger(__name__)

#: Test hook: when this environment variable names an existing file in the *calling* process, the first
#: shard task that manages to delete that file kills its own worker process (``os._exit(1)``).
KILL_ONCE_ENV = "DEEPSSIM_FAST_TEST_KILL_ONCE"

#: Default synthetic rows per shard lie in [MIN_SHARD_ROWS, MAX_SHARD_ROWS]: every shard re-reads (and the
#: engine re-normalises) the whole training block, a cost of O(n_train·d) that a shard of a few thousand
#: rows amortises, while more, smaller shards balance the load and make resumes finer.
MIN_SHARD_ROWS = 2048
MAX_SHARD_ROWS = 16384
#: Default synthetic shards per problem at least (load balance), when the rows allow it.
MIN_SHARDS = 16
#: Fraction of a worker's memory limit one training block may take before the training set is sharded.
TRAIN_MEMORY_FRACTION = 0.25
#: Shards in flight per worker thread (scattered and submitted ahead of completion).
IN_FLIGHT_PER_THREAD = 2
#: How often one shard may be resubmitted after its data was lost with a worker.
MAX_RESUBMITS = 3
#: Consecutive finished synthetic shards that are merged into the running result at once.
FOLD_EVERY = 16
#: How often scattering one block is retried when its target worker just went away.
SCATTER_RETRIES = 5
#: Synthetic blocks of at least this many bytes are scattered; smaller ones travel inside their task.
SCATTER_MIN_BYTES = 4 << 20
#: How long to wait for a first worker to join an existing cluster (e.g. SLURM jobs still queued).
WORKER_WAIT_S = 600
#: How long to wait for an existing scheduler to answer.
CONNECT_TIMEOUT = "30s"
_CHECKPOINT_VERSION = 2  # (2: each shard's file records its shard)
#: A temporary file in checkpoint_dir older than this is what a killed run left: removed at a run's start. A
#: younger one may be another run's write in progress (two runs of one job sharing the folder): removing it
#: made that run fail in os.replace ("No such file or directory"). As training's output folder does.
_TEMPORARY_AGE_S = 600.0


class DistributedError(RuntimeError):
    """A shard could not be computed on the cluster (the message names the shard and the cause)."""


# ----------------------------------------------------------------------------------------------------
# The shard plan
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: synthetic rows ``[s0, s1)`` against training rows ``[t0, t1)``.

    ``self_offset`` (self mode only): the synthetic rows are rows ``self_offset..`` of the training
    *block*, so the engine excludes those self-pairs; None when the block holds none of them.
    ``tblock`` is the index of the training block, ``sindex`` of the synthetic shard.
    """

    sindex: int
    tblock: int
    s0: int
    s1: int
    t0: int
    t1: int
    self_offset: int | None

    @property
    def name(self) -> str:
        return f"s{self.s0:010d}-{self.s1:010d}_t{self.t0:010d}-{self.t1:010d}"

    @property
    def n_synth(self) -> int:
        return self.s1 - self.s0

    @property
    def n_train(self) -> int:
        return self.t1 - self.t0


def default_shard_size(n_synth: int, n_train: int) -> int:
    """Synthetic rows per shard when none is given: ``n_synth / MIN_SHARDS`` clamped to
    [:data:`MIN_SHARD_ROWS`, :data:`MAX_SHARD_ROWS`] (and to ``n_synth``).

    It depends on the problem size only (not on the cluster), so a resumed run finds the same shards.
    ``n_train`` is accepted for future rules that weigh the per-shard training pass.
    """
    del n_train
    rows = min(MAX_SHARD_ROWS, max(MIN_SHARD_ROWS, math.ceil(n_synth / MIN_SHARDS)))
    return int(max(1, min(n_synth, rows)))


def _blocks(n: int, size: int, min_last: int) -> list[tuple[int, int]]:
    """``[0, n)`` in ``size``-row blocks; a last block under ``min_last`` rows joins the previous one."""
    edges = list(range(0, n, size)) + [n]
    out = [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_last:
        out[-2:] = [(out[-2][0], n)]
    return out


def plan_shards(n_synth: int, n_train: int, *, k: int, shard_size: int, train_shard_size: int | None,
                self_mode: bool) -> list[Shard]:
    """The shards of one run, synthetic-major (all training blocks of synthetic shard 0 first).

    Training blocks hold at least ``k`` candidates (``k + 1`` in self mode): a short last block joins the
    previous one, and a ``train_shard_size`` under that many rows is refused in both modes (see
    :func:`check_train_shard_size`). In self mode training blocks are whole multiples of ``shard_size``
    (rounded down, at least one, and up to the first multiple of at least ``k + 1`` rows), so a synthetic
    shard is either inside a training block (``self_offset`` set) or disjoint from it.
    (Rounded up, a block of 2443 rows asked for by the memory budget became 4096, which held the whole
    3000-row set: the budget was ignored.)
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    check_train_shard_size(train_shard_size, k=k, self_mode=self_mode)
    tsize = n_train if train_shard_size is None else min(train_shard_size, n_train)
    need = k + 1 if self_mode else k
    if self_mode and tsize < n_train:
        # (rounded down, a block could fall under k + 1 rows: train_shard_size=61 with k=60 and shards of 30
        # became 60, and the plan refused the size it had been given, or the one the memory budget chose)
        tsize = max(shard_size, tsize // shard_size * shard_size)
        if tsize < need:
            tsize = -(-need // shard_size) * shard_size
        tsize = min(n_train, tsize)
    if tsize < need:  # (n_train itself is too small: k is checked against it first by all_pairs_distributed)
        raise ValueError(f"train_shard_size={train_shard_size} leaves training blocks with fewer than {need} "
                         f"rows; k={k} needs at least {need}")
    sblocks = _blocks(n_synth, shard_size, 1)
    tblocks = _blocks(n_train, tsize, need)
    shards = []
    for si, (s0, s1) in enumerate(sblocks):
        for ti, (t0, t1) in enumerate(tblocks):
            off = None
            if self_mode and t0 <= s0 < t1:
                off = s0 - t0
            shards.append(Shard(si, ti, s0, s1, t0, t1, off))
    return shards


def check_train_shard_size(train_shard_size: int | None, *, k: int, self_mode: bool) -> None:
    """ValueError unless ``train_shard_size`` (None: no training blocks) gives blocks of at least the ``k``
    candidates a row needs (``k + 1`` in self mode, where a row's own pair is left out). Both modes refuse a
    smaller size: self mode had rounded it up without a word (3 rows with k=7 became blocks of 8), where the
    other mode refused it, and only once a cluster had started."""
    if train_shard_size is None:
        return
    need = k + 1 if self_mode else k
    if train_shard_size < 1:
        raise ValueError(f"train_shard_size must be >= 1, got {train_shard_size}")
    if train_shard_size < need:
        raise ValueError(f"train_shard_size={train_shard_size} leaves training blocks with fewer than {need} rows; "
                         f"k={k} needs at least {need}" + (" (k + 1 in self mode: a row's own pair is left out)"
                                                           if self_mode else ""))


# ----------------------------------------------------------------------------------------------------
# Clusters
# ----------------------------------------------------------------------------------------------------
def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _cuda_devices(n: int) -> list[str]:
    """The first n GPUs this process sees, as CUDA_VISIBLE_DEVICES entries for the workers: the caller's own
    ``$CUDA_VISIBLE_DEVICES`` entries (ids or UUIDs) when it is set, else 0..n-1. (An explicit list passed to
    LocalCUDACluster is used as given, so indices 0..n-1 would ignore the caller's choice.)"""
    seen = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return seen[:n] if seen else [str(i) for i in range(n)]


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _dashboard_address() -> str:
    """The dashboard listens on loopback, on a free port (several clusters may run side by side)."""
    return "127.0.0.1:0"


def start_local_cluster(workers: int) -> Any:
    """Start an in-process cluster of ``workers`` worker processes on this machine.

    CPU: a :class:`distributed.LocalCluster` on loopback, one thread per worker process (each task then
    uses ``cores // workers`` threads in the engine, so workers × threads ≤ cores), logs at
    :func:`_dask_log_level`.
    Several GPUs and ``dask_cuda`` installed: a ``dask_cuda.LocalCUDACluster`` on the first
    ``min(workers, GPUs)`` GPUs this process sees (those of ``$CUDA_VISIBLE_DEVICES`` when it is set), one
    worker (and one task at a time) per GPU.
    """
    import importlib.util

    check_cluster_options(workers, None)
    workers = int(workers)
    common = dict(dashboard_address=_dashboard_address(), silence_logs=_dask_log_level())
    ngpu = _cuda_count()
    if ngpu > 1 and importlib.util.find_spec("dask_cuda") is not None:
        from dask_cuda import LocalCUDACluster

        n = min(workers, ngpu)
        if n < workers:
            logger.warning("workers=%d but only %d GPUs: starting %d GPU workers", workers, ngpu, n)
        logger.info("starting LocalCUDACluster with %d GPU workers", n)
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(_cuda_devices(n)), n_workers=n,
                                threads_per_worker=1, host="127.0.0.1", **common)
    if ngpu > 1:
        logger.warning("%d GPUs present but dask_cuda is not installed: CPU LocalCluster "
                       "(pip install dask-cuda for one worker per GPU)", ngpu)
    from distributed import LocalCluster

    cores = usable_cores()
    if workers > cores:
        logger.warning("workers=%d exceeds the %d usable cores; workers will share cores", workers, cores)
    per = str(max(1, cores // workers))  # Dask's nanny would pin BLAS/OpenMP to 1 thread otherwise
    env = {v: per for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    logger.info("starting LocalCluster: %d worker processes x 1 task, %s engine threads each (%d cores)",
                workers, per, cores)
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", env=env,
                        **common)


def _dask_log_level() -> int:
    """The level of what an embedded cluster's Dask logs: WARNING where this package's INFO lines are asked for
    (the CLI's -v), else ERROR. At WARNING, an interrupted run printed the workers' "Async instruction for
    <Task cancelled ...> ended with CancelledError" and the nanny's "Worker process still alive after 4.0
    seconds, killing", in Dask's own format, before the command's one line."""
    return logging.WARNING if logging.getLogger("deepssim_fast").isEnabledFor(logging.INFO) else logging.ERROR


@contextlib.contextmanager
def _quiet_dask_here(level: int) -> Iterator[None]:
    """The ``distributed`` logger of this process (the embedded cluster's scheduler and nannies) at ``level`` at
    least while the block runs, where ``level`` is ERROR: ``silence_logs`` quiets Dask's own handler only, not
    the caller's (the CLI's) that its records reach."""
    lg = logging.getLogger("distributed")
    old = lg.level
    if level < logging.ERROR or lg.getEffectiveLevel() >= level:
        yield
        return
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(old)


def check_cluster_options(workers: Any, scheduler: Any) -> None:
    """The checks of ``workers``/``scheduler`` that need no connection (callers such as the audit run them before
    any work): not both; ``workers`` a positive integer; ``scheduler`` an address (a string not empty), a Client or
    a cluster object; where Dask is installed, an address of Dask's form whose protocol is usable here. Imports no
    Dask where it is not installed. (:func:`check_scheduler` also connects.)"""
    if workers is not None and scheduler is not None:
        raise ValueError(
            "give workers (--workers: start a local Dask cluster) or scheduler (--scheduler: use a running one), "
            f"not both; got workers={workers!r} and scheduler={scheduler!r}"
        )
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer (Dask worker processes), got {workers!r}")
    if isinstance(scheduler, str) and not scheduler.strip():
        raise ValueError("scheduler must be a Dask scheduler address like 'tcp://host:8786' or a Client, got ''")
    if scheduler is not None and not isinstance(scheduler, str) and not _is_client_or_cluster(scheduler):
        # (a LocalCluster object, or the port as an int, failed only at the search: after an audit's decoding and
        # embedding, with work files written)
        raise ValueError(f"scheduler must be a Dask scheduler address like 'tcp://host:8786', a distributed Client "
                         f"or a Dask cluster object (LocalCluster, ...), got {type(scheduler).__name__} "
                         f"{scheduler!r}")
    if isinstance(scheduler, str):
        # the address's form, now (where Dask is installed): a missing port was found only when the search
        # connected, after a whole audit's decoding and embedding
        try:
            from distributed.comm.addressing import parse_address, parse_host_port
            from distributed.comm.registry import get_backend
        except ImportError:
            return
        try:
            scheme, loc = parse_address(scheduler)
            get_backend(scheme)
            if scheme in ("tcp", "tls"):
                parse_host_port(loc)
        except ValueError as exc:
            raise ValueError(f"scheduler (--scheduler) {scheduler!r} is not a Dask scheduler address ({exc}); "
                             "give one like 'tcp://host:8786'") from exc
        why = _unusable_protocol(scheme, loc)
        if why:
            raise ValueError(f"scheduler (--scheduler) {scheduler!r} cannot be reached from here: {why}")


def _is_client_or_cluster(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`distributed.Client` or a Dask cluster object (LocalCluster, SpecCluster,
    dask-jobqueue's, ...). Imports no Dask: an object of those types means Dask is imported already."""
    client = sys.modules.get("distributed.client")
    cluster = sys.modules.get("distributed.deploy.cluster")
    return bool((client is not None and isinstance(obj, client.Client))
                or (cluster is not None and isinstance(obj, cluster.Cluster)))


def _unusable_protocol(scheme: str, loc: str) -> str | None:
    """Why an address of a known ``scheme`` cannot be reached from this process, found without connecting, or
    None. Each was said to be "something listens there but did not complete Dask's handshake": ucx:// without
    its package (Dask's own ucx backend is only a stub now), an inproc:// address (it reaches a scheduler in
    the same process only) that names none here, tls:// without TLS settings."""
    from distributed.comm.registry import get_backend
    from distributed.security import Security

    try:
        get_backend(scheme).get_connector()
    except Exception as exc:  # noqa: BLE001 - "Can't instantiate abstract class UCXConnector ..." (a TypeError)
        return (f"the {scheme}:// protocol is not usable here ({type(exc).__name__}: {exc}); install the package "
                "that provides it (ucx: distributed-ucxx), or give the scheduler's tcp:// address")
    if scheme == "inproc":
        from distributed.comm.inproc import global_manager

        try:
            here = global_manager.get_listener_for(loc) is not None
        except ValueError:  # (another process's inproc address, or not one at all)
            here = False
        if not here:
            return ("inproc:// reaches a scheduler inside this same process only (a LocalCluster(processes=False)), "
                    "and none listens at that address here; give the scheduler's tcp:// address, or pass its "
                    "Client or cluster object")
    if scheme == "tls" and Security().get_connection_args("client").get("ssl_context") is None:
        return ("tls:// needs TLS settings and Dask's configuration holds none (distributed.comm.tls.ca-file, "
                "distributed.comm.tls.client.cert and .key); or pass a Client made with security=")
    return None


@contextlib.contextmanager
def cluster_client(workers: int | None = None, scheduler: Any = None) -> Iterator[Client]:
    """A :class:`distributed.Client` for ``workers`` (embedded cluster) or ``scheduler`` (existing cluster).

    ``scheduler`` is an address (``"tcp://host:8786"``), an open ``Client`` (used as is, not closed) or a
    cluster object (``LocalCluster``, dask-jobqueue's ...: a Client of this function's on it, as
    ``distributed.Client(cluster)`` makes one; the cluster is left running).
    What this function started (client, local cluster) is closed on exit. Logs the dashboard link.
    """
    check_cluster_options(workers, scheduler)
    if workers is None and scheduler is None:
        raise ValueError("cluster_client needs workers= or scheduler=")
    Client = _client_class()
    if scheduler is not None:
        _check_usable(scheduler, Client)
    if isinstance(scheduler, Client):
        _log_dashboard(scheduler)
        yield scheduler
        return
    with contextlib.ExitStack() as stack:
        if isinstance(scheduler, str):
            try:
                client = Client(scheduler, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                raise DistributedError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from exc
        elif scheduler is not None:
            client = Client(scheduler)
        else:
            stack.enter_context(_quiet_dask_here(_dask_log_level()))  # (first in, last out: through the close)
            cluster = stack.enter_context(start_local_cluster(workers))
            client = Client(cluster)
        stack.enter_context(client)
        _log_dashboard(client)
        yield client


def check_scheduler(scheduler: Any) -> None:
    """The checks of a ``scheduler=`` that need Dask, for callers with work to do before they use it (the audit
    decodes and embeds first; a wrong scheduler was found at its search, work files written): those of
    :func:`check_cluster_options`, then an open Client, a cluster object not closed, or an address where a Dask
    scheduler answers (:class:`DistributedError` otherwise). Nothing to check for None."""
    check_cluster_options(None, scheduler)
    if scheduler is not None:
        _check_usable(scheduler, _client_class())


def _client_class() -> type:
    """:class:`distributed.Client`, or BackendUnavailableError saying what to install."""
    try:
        from distributed import Client
    except ImportError as exc:
        from .backends import BackendUnavailableError

        raise BackendUnavailableError("workers=/scheduler= need Dask: pip install 'deepssim_fast[dask]' "
                                      f"(dask and distributed); import failed: {exc}") from exc
    return Client


def _check_usable(scheduler: Any, client_class: type) -> None:
    """DistributedError unless ``scheduler`` (of a form :func:`check_cluster_options` passed) can be used now: a
    Client not closed, a cluster object not closed, an address where a Dask scheduler answers."""
    if isinstance(scheduler, str):
        _check_scheduler(scheduler)
    elif isinstance(scheduler, client_class):
        if scheduler.status in ("closing", "closed"):  # (it failed with "IOLoop is closed")
            raise DistributedError(f"the Client given as scheduler is {scheduler.status}; pass an open one")
    else:  # a cluster object
        status = getattr(scheduler, "status", None)
        status = getattr(status, "name", status)
        if status in ("closing", "closed", "failed"):  # (Client(cluster): "Trying to connect to an already closed")
            raise DistributedError(f"the cluster given as scheduler ({type(scheduler).__name__}) is {status}; "
                                   "pass a running one")


def _check_scheduler(address: str) -> None:
    """Raise :class:`DistributedError` unless a Dask peer at ``address`` answers Dask's handshake within
    :data:`CONNECT_TIMEOUT`.

    ``Client(address, timeout=...)`` bounds the TCP connection only, not the handshake that follows: a port
    that accepts connections but does not speak Dask (the dashboard's 8787 instead of the scheduler's 8786,
    a web or SSH server) made it wait forever, or fail with a MemoryError of exbibytes (the peer's first
    bytes read as a message length). The probe runs on its own event loop in a helper thread, so it works
    where the caller's thread already runs one (Jupyter). A malformed address stays a ValueError.

    A tcp:// (tls://) address is first connected to plainly: a refused connection, or a host name that does not
    resolve, is said at once (Dask retries both until the timeout, so a scheduler not running, a wrong port or a
    mistyped host was "Timed out ... after 30 s").
    """
    import asyncio
    import socket
    import threading

    from dask.utils import parse_timedelta
    from distributed.comm import connect
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend
    from distributed.security import Security

    scheme, loc = parse_address(address)
    get_backend(scheme)  # ValueError: unknown address scheme
    timeout = float(parse_timedelta(CONNECT_TIMEOUT, default="seconds"))
    if scheme in ("tcp", "tls"):
        host, port = parse_host_port(loc)  # ValueError: missing port number
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except ConnectionRefusedError as exc:
            raise DistributedError(f"cannot connect to the Dask scheduler at {address}: connection refused (is the "
                                   "scheduler running, is the port right?)") from exc
        except TimeoutError as exc:  # (Dask's probe would wait as long again: its words, now)
            raise DistributedError(f"cannot connect to the Dask scheduler at {address}: Timed out trying to connect "
                                   f"to {address} after {timeout:g} s") from exc
        except socket.gaierror as exc:  # (Dask's probe retried it until the timeout: "Timed out ... after 30 s")
            raise DistributedError(f"cannot connect to the Dask scheduler at {address}: the host name {host!r} does "
                                   f"not resolve ({exc.strerror or exc})") from exc
        except OSError:  # (no route, network down ...: Dask's probe says it in its words)
            pass
    args = Security().get_connection_args("client")  # (what Client uses when given no security=)
    failure: list[BaseException] = []

    async def hello() -> None:
        # (connect gives up at ``timeout`` when nothing accepts the connection; the margin lets its own
        # error, which says so, come first)
        comm = await asyncio.wait_for(connect(address, timeout=timeout, **args), timeout + 2.0)
        await comm.close()

    def probe() -> None:
        try:
            asyncio.run(hello())
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            failure.append(exc)

    t = threading.Thread(target=probe, name="deepssim-fast-scheduler-probe", daemon=True)
    t.start()
    t.join(timeout + 10.0)  # (wait_for ends the probe; the margin is for its clean-up)
    if t.is_alive():  # pragma: no cover - wait_for did not return
        raise DistributedError(f"cannot connect to the Dask scheduler at {address}: no answer within "
                               f"{timeout:g} s")
    if not failure:
        return
    exc = failure[0]
    if isinstance(exc, OSError) and "Timed out trying to connect" in str(exc):  # nothing accepted it
        cause = str(exc)
    else:  # something accepted the connection but does not speak Dask
        cause = (f"something listens there but did not complete Dask's handshake ({type(exc).__name__}"
                 + (f": {exc}" if str(exc) else f" after {timeout:g} s") + "); is it a Dask scheduler? "
                 "A scheduler listens on port 8786 by default (8787 is its dashboard)")
    raise DistributedError(f"cannot connect to the Dask scheduler at {address}: {cause}") from exc


def dashboard_link(client: Client) -> str | None:
    """The cluster's dashboard URL, or None when its scheduler serves none."""
    services = client.scheduler_info(n_workers=0).get("services", {})
    return client.dashboard_link if "dashboard" in services else None


def _log_dashboard(client: Client) -> None:
    link = dashboard_link(client)
    if link:
        logger.info("Dask dashboard: %s", link)
    else:
        logger.info("Dask scheduler %s (serves no dashboard)", client.scheduler.address)


# ----------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------
def _maybe_die(flag: str | None) -> None:
    """Test hook (see :data:`KILL_ONCE_ENV`): the first task to delete ``flag`` kills its own process."""
    if not flag:
        return
    try:
        os.remove(flag)
    except FileNotFoundError:
        return
    logger.warning("test hook %s: killing worker process %d", KILL_ONCE_ENV, os.getpid())
    os._exit(1)


def _task_threads(host_workers: dict[str, int]) -> int:
    """Engine threads for one task: this host's cores shared among its workers and their threads, at most
    ``$DEEPSSIM_FAST_NUM_THREADS`` where the worker's environment sets it (it was overridden without a word)."""
    try:
        from distributed import get_worker

        w = get_worker()
        per_worker = host_workers.get(w.address.rsplit(":", 1)[0], 1) * max(1, w.state.nthreads)
    except (ImportError, ValueError):  # not on a worker (direct call)
        per_worker = 1
    n = max(1, usable_cores() // per_worker)
    from .backends import _native

    nat = _native()
    cap = nat.threads_from_env() if nat is not None else 0  # (the variable as the native loops parse it)
    return min(n, cap) if cap > 0 else n


_BLAS_CONTROLLER: Any = None


def _blas_limit(threads: int) -> Any:
    """Cap numpy's BLAS thread pool at ``threads`` threads (so that numpy work inside a task does not spread
    over cores that other workers own); returns the limiter, whose ``restore_original_limits()`` undoes it,
    or None without threadpoolctl.

    Uses threadpoolctl when it is installed (the library scan is done once per worker process).
    """
    global _BLAS_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=threads, user_api="blas")


def _run_shard(train_block: np.ndarray, synth_block: np.ndarray | None, shard: Shard, opts: dict[str, Any]
               ) -> AllPairsResult:
    """Worker task: the single-process engine on one shard (synth rows sliced from the block in self mode)."""
    _maybe_die(opts.get("kill_flag"))
    import torch

    from .all_pairs import all_pairs

    if synth_block is None:
        a = shard.s0 - shard.t0
        synth_block = train_block[a:a + shard.n_synth]
    device = opts.get("device")
    if device is None and opts.get("backend") != "native" and torch.cuda.is_available():
        device = "cuda"  # a GPU worker (dask-cuda gives each worker its own device)
    threads = opts.get("threads") or _task_threads(opts.get("host_workers", {}))
    quiet = _quiet_precision_warning() if opts["precision"] != "ieee" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with _engine_threads(threads, simd=opts.get("simd", "auto"), topk_kernel=opts.get("topk_kernel", "auto")), quiet:
        try:
            res = all_pairs(train_block, synth_block, k=opts["k"], thresholds=opts["thresholds"],
                            bins=opts["bins"], device=device, backend=opts.get("backend"),
                            progress=False, self_offset=shard.self_offset,
                            precision=opts["precision"])
        except ValueError as exc:
            raise ValueError(f"{_global_rows(str(exc), shard)} (shard {shard.name})") from exc
    logger.debug("shard %s: %.3f s on %d threads", shard.name, time.perf_counter() - t0, threads)
    return res


_QUIET_LOCK = threading.Lock()
_QUIET_STATE: dict[str, Any] = {"tasks": 0, "filter": None}


@contextlib.contextmanager
def _quiet_precision_warning() -> Iterator[None]:
    """Keep the engine of shard tasks quiet about a ``precision`` that does not apply to it (it is the Triton
    backend's; CPU workers run another): each worker process said so once, a run as many times as it had
    workers, and the caller says it once (:func:`all_pairs_distributed`). The filter is in place while tasks
    run in this process: added by the first to start, removed by the last to end (warnings filters are
    process-wide; a task of a worker in the caller's process must not leave the caller's own calls silenced)."""
    with _QUIET_LOCK:
        if _QUIET_STATE["tasks"] == 0:
            warnings.filterwarnings("ignore", message=r"all_pairs: precision=.* applies to the Triton backend only",
                                    category=UserWarning)
            _QUIET_STATE["filter"] = warnings.filters[0]
        _QUIET_STATE["tasks"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_STATE["tasks"] -= 1
            if _QUIET_STATE["tasks"] == 0:
                with contextlib.suppress(ValueError):  # (already gone: warnings.resetwarnings() and the like)
                    warnings.filters.remove(_QUIET_STATE["filter"])
                _QUIET_STATE["filter"] = None


_THREADS_LOCK = threading.Lock()
_THREADS_STATE: dict[str, Any] = {"tasks": 0, "saved": None, "blas": None}


def _caller_engine_settings() -> dict[str, str]:
    """The native engine's SIMD cap and top-k kernel choice as this process's caller set them
    (``_native.set_simd_level`` / ``set_topk_kernel``; "auto" where unset), for the workers' tasks: those
    settings are per process, so a worker process went on with its own (the environment's), and a cap set
    to compare kernels or to stay off AVX-512 did not apply to the shards. Results never depend on them."""
    from .backends import _native

    nat = _native()
    if nat is None:
        return {"simd": "auto", "topk_kernel": "auto"}
    return {"simd": nat.simd_cap(), "topk_kernel": nat.topk_kernel_override()}


@contextlib.contextmanager
def _engine_threads(threads: int, *, simd: str = "auto", topk_kernel: str = "auto") -> Iterator[None]:
    """Engine threads (torch, the native extension, numpy's BLAS) set to ``threads`` for a task, and the
    native SIMD cap and top-k kernel to the caller's (see :func:`_caller_engine_settings`; "auto" leaves the
    worker's own), and the process's own settings restored when the last task running in it ends. The
    settings are process-wide: two tasks of a worker that runs in the caller's process (``processes=False``)
    each saved what they found and restored it, so the second saved the first one's setting and left the
    caller on 1 thread."""
    import torch

    from .backends import _native

    nat = _native()
    with _THREADS_LOCK:
        if _THREADS_STATE["tasks"] == 0:
            # the native setting as set (0: none; the environment or the usable cores decide), not the count it
            # resolves to: restoring that count fixed it, and DEEPSSIM_FAST_NUM_THREADS no longer applied
            _THREADS_STATE["saved"] = (torch.get_num_threads(),
                                       (nat.num_threads_override(), nat.simd_cap(), nat.topk_kernel_override())
                                       if nat is not None else None)
            _THREADS_STATE["blas"] = _blas_limit(threads)
        _THREADS_STATE["tasks"] += 1
        torch.set_num_threads(threads)
        if nat is not None:
            nat.set_num_threads(threads)
            if simd != "auto":
                nat.set_simd_level(simd)
            if topk_kernel != "auto":
                nat.set_topk_kernel(topk_kernel)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["tasks"] -= 1
            if _THREADS_STATE["tasks"] == 0:
                torch_n, nat_saved = _THREADS_STATE["saved"]
                torch.set_num_threads(torch_n)
                if nat is not None and nat_saved is not None:
                    nat.set_num_threads(nat_saved[0])
                    nat.set_simd_level(nat_saved[1])
                    nat.set_topk_kernel(nat_saved[2])
                blas, _THREADS_STATE["blas"] = _THREADS_STATE["blas"], None
                if blas is not None:
                    blas.restore_original_limits()


def _global_rows(msg: str, shard: Shard) -> str:
    """An engine message about a shard's rows ("synth row 5 ...") with the rows' numbers in the whole sets."""
    def fix(m: re.Match) -> str:
        base = shard.s0 if m.group(1) == "synth" else shard.t0
        return f"{m.group(1)} row {base + int(m.group(2))}"

    return re.sub(r"\b(synth|train) row (\d+)", fix, msg)


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------
def _as_matrix(x: Any, name: str, d: int | None = None) -> np.ndarray:
    """``x`` checked as one process checks it (:func:`deepssim_fast.all_pairs._check_set`: a 2-D real array with
    finite rows; ``d``: an empty synthetic set of any shape is (0, d)), as a C-contiguous numpy array on the host
    (bfloat16 widened to float32, exactly). The driver's own checks said other words, some with another type
    ("synth: row 5 contains NaN or Inf" for "synth row 5 ...", a TypeError for a meta tensor's ValueError)."""
    from .all_pairs import _check_set, _host_view

    return np.ascontiguousarray(_host_view(_check_set(x, name, d=d).cpu()))


def _check_zero_rows(a: np.ndarray, name: str) -> None:
    """The error of one process for the first all-zero row of ``a`` (cosine similarity is undefined there)."""
    from .all_pairs import _zero_row

    step = max(1, (1 << 24) // max(1, a.shape[1]))
    for r in range(0, a.shape[0], step):
        zero = ~a[r:r + step].any(axis=1)
        if zero.any():
            raise _zero_row(name, r + int(np.argmax(zero)))


def _inputs_key(train: np.ndarray, synth: np.ndarray | None, opts: dict[str, Any]) -> str:
    """Fingerprint of the inputs and options (what the result depends on; the shard plan aside)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (train, synth):
        if a is None:
            h.update(b"self")
            continue
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(json.dumps({"k": opts["k"], "thresholds": list(opts["thresholds"]), "bins": opts["bins"],
                         "backend": opts.get("backend"), "device": opts.get("device"),
                         "precision": opts["precision"], "v": _CHECKPOINT_VERSION},
                        sort_keys=True).encode())
    return h.hexdigest()


def _job_key(inputs: str, shards: Sequence[Shard]) -> str:
    """Fingerprint of the inputs, options and shard plan (names the checkpoint files of this job)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(inputs.encode())
    h.update(";".join(s.name for s in shards).encode())
    return h.hexdigest()


def _saved_train_shard_size(folder: str | os.PathLike, inputs: str, shard_size: int) -> tuple[bool, int | None]:
    """(found, train_shard_size) of the checkpointed job with these inputs and synthetic shard size that has
    the most saved shards: a rerun on a cluster of other memory limits keeps that plan, and so its shards."""
    best: tuple[int, int | None] | None = None
    for f in Path(folder).glob("allpairs-*.json"):
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict):  # (someone's [] or null: a bare AttributeError, after the cluster started)
            continue
        if m.get("inputs") != inputs or m.get("shard_size") != shard_size or "train_shard_size" not in m:
            continue
        tss = m["train_shard_size"]
        if not (tss is None or (isinstance(tss, int) and not isinstance(tss, bool) and tss >= 1)) \
                or not isinstance(m.get("job"), str) or not re.fullmatch(r"[0-9a-f]+", m["job"]):
            continue  # (not a manifest this module wrote)
        saved = len(list(Path(folder).glob(f"allpairs-{m.get('job')}-*.npz")))
        if best is None or saved > best[0]:
            best = (saved, m["train_shard_size"])
    return (False, None) if best is None or best[0] == 0 else (True, best[1])


def _warn_old_checkpoints(folder: Path) -> None:
    """One warning when ``folder`` holds jobs saved in an earlier checkpoint format: they are never reused
    (the format is part of the job's key), so a run resumed after an upgrade computed every shard again
    without a word."""
    old: dict[str, int] = {}
    for f in sorted(folder.glob("allpairs-*.json")):
        try:
            v = json.loads(f.read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(v, int) and v < _CHECKPOINT_VERSION:
            old[f.name] = v
    if old:
        logger.warning("%s holds %d all-pairs job(s) saved in an earlier checkpoint format (version %s; this "
                       "version writes %d), which is never reused: if this run repeats one of them, its shards are "
                       "computed again; delete their allpairs-<job>* files (e.g. %s) to free the space", folder,
                       len(old),
                       "/".join(str(v) for v in sorted(set(old.values()))), _CHECKPOINT_VERSION, next(iter(old)))


class _Checkpoints:
    """Shard results on disk: ``allpairs-<job>-<shard>.npz`` plus a human-readable manifest."""

    def __init__(self, folder: str | os.PathLike, key: str, opts: dict[str, Any], shards: Sequence[Shard],
                 n_train: int, n_synth: int, *, inputs: str, shard_size: int,
                 train_shard_size: int | None) -> None:
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        _warn_old_checkpoints(self.dir)
        self.key = key
        self.opts = opts
        self.manifest = {"job": key, "inputs": inputs, "version": _CHECKPOINT_VERSION, "n_train": n_train,
                         "n_synth": n_synth, "k": opts["k"], "thresholds": list(opts["thresholds"]),
                         "bins": opts["bins"], "backend": opts.get("backend"), "shard_size": shard_size,
                         "train_shard_size": train_shard_size, "shards": [s.name for s in shards]}
        self.manifest_path = self.dir / f"allpairs-{key}.json"
        # what a killed run of this job left half-written (the folder may hold other jobs' files too): only
        # temporaries old enough to be a killed run's, never the write in progress of another run of this job
        try:
            remove_temporaries(self.dir, [self.manifest_path.name] + [self.path(s).name for s in shards],
                               older_than=_TEMPORARY_AGE_S)
        except OSError as exc:  # (a folder this process may not write; its saved shards are still of use)
            logger.warning("could not remove the temporary files a killed run left in %s: %s", self.dir, exc)

    def write_manifest(self, *, complete: bool) -> None:
        """Write the job's manifest (by which a rerun finds the plan of its shards) unless it is there as it
        would be written. It was rewritten unconditionally, so a complete set of checkpoints in a folder this
        process may not write could not be reused (PermissionError before a shard was read); with every shard
        saved (``complete``) a failed write is now a warning, otherwise it is raised (before any work)."""
        data = json.dumps(self.manifest, indent=1).encode()
        try:
            if self.manifest_path.read_bytes() == data:
                return
        except OSError:
            pass
        try:
            atomic_write_bytes(self.manifest_path, data)
        except OSError as exc:
            if not complete:
                raise
            logger.warning("could not write the checkpoint manifest %s (%s); every shard of the job is saved "
                           "already, so none is needed", self.manifest_path, exc)

    def path(self, shard: Shard) -> Path:
        return self.dir / f"allpairs-{self.key}-{shard.name}.npz"

    def tag(self, shard: Shard) -> str:
        """What a shard's file records of the job and the shard it holds."""
        return f"{self.key}/{shard.name}"

    def load(self, shard: Shard, cls: type) -> AllPairsResult | None:
        """The saved result of ``shard`` if its file is there, holds that shard (by the tag saved in it: a file
        of another shard of the same size, copied or renamed over it, was used silently) and matches it; else
        None."""
        p = self.path(shard)
        if not p.is_file():
            return None
        try:
            res, found = cls._load(p, extra=("shard_tag",))
            tag = str(found["shard_tag"]) if "shard_tag" in found else None
            if tag != self.tag(shard):
                raise ValueError(f"it holds {'shard ' + tag.rsplit('/', 1)[-1] if tag else 'no shard tag'}"
                                 f"{' of another job' if tag and not tag.startswith(self.key + '/') else ''}, "
                                 f"not shard {shard.name}")
            _check_part(res, shard, self.opts)
        except Exception as exc:  # noqa: BLE001 - any unreadable or mismatched file is recomputed
            logger.warning("checkpoint %s is not usable (%s); recomputing the shard", p, exc)
            return None
        return res

    def save(self, shard: Shard, res: AllPairsResult) -> None:
        res._save(self.path(shard), shard_tag=np.array(self.tag(shard)))


def _check_part(res: AllPairsResult, shard: Shard, opts: dict[str, Any]) -> None:
    """Raise ValueError when a shard result does not have the shape the shard asked for."""
    k = opts["k"]
    problems = []
    if int(res.n_synth) != shard.n_synth or int(res.n_train) != shard.n_train:
        problems.append(f"n_synth×n_train {res.n_synth}×{res.n_train}, "
                        f"expected {shard.n_synth}×{shard.n_train}")
    if int(res.k) != k or tuple(np.shape(res.scores)) != (shard.n_synth, k) \
            or tuple(np.shape(res.indices)) != (shard.n_synth, k):
        problems.append(f"k={res.k}, scores {np.shape(res.scores)}, indices {np.shape(res.indices)}; "
                        f"expected k={k} and ({shard.n_synth}, {k})")
    counts = res.histogram[0]
    if len(counts) != opts["bins"]:
        problems.append(f"{len(counts)} histogram bins, expected {opts['bins']}")
    if tuple(float(t) for t in res.thresholds) != tuple(float(t) for t in opts["thresholds"]):
        problems.append(f"thresholds {tuple(res.thresholds)}, expected {tuple(opts['thresholds'])}")
    if problems:
        raise ValueError(f"shard {shard.name}: " + "; ".join(problems))


def _auto_train_shard_size(client: Client, train: np.ndarray, min_rows: int) -> int | None:
    """Training rows per block so that one block takes at most TRAIN_MEMORY_FRACTION of the smallest
    worker memory limit (at least ``min_rows``); None (no training shards) when the whole set fits or
    limits are unknown."""
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info(n_workers=-1)["workers"].values()]
    limits = [m for m in limits if m > 0]
    if not limits:
        return None
    budget = TRAIN_MEMORY_FRACTION * min(limits)
    if train.nbytes <= budget:
        return None
    rows = max(min_rows, int(budget // (train.itemsize * train.shape[1])))
    logger.info("training set (%.1f MiB) exceeds %.1f MiB per worker: training blocks of at most %d rows",
                train.nbytes / 2**20, budget / 2**20, rows)
    return rows


class _Scattered:
    """Driver-side owner of scattered blocks: scatters lazily and again when a copy was lost."""

    def __init__(self, client: Client, broadcast: bool) -> None:
        self.client = client
        self.broadcast = broadcast
        self.futures: dict[Any, Any] = {}

    def get(self, key: Any, data: np.ndarray) -> Any:
        fut = self.futures.get(key)
        if fut is None or fut.status != "finished":
            if fut is not None:
                logger.warning("scattered block %s was lost (status %s); scattering it again", key,
                               fut.status)
            fut = self._scatter(key, data)
            self.futures[key] = fut
        return fut

    def _scatter(self, key: Any, data: np.ndarray) -> Any:
        """Scatter with a few retries: a worker that just died may still be chosen as the target."""
        for attempt in range(SCATTER_RETRIES + 1):
            _check_connected(self.client, f"scattering block {key}")
            try:
                return self.client.scatter(data, broadcast=self.broadcast, hash=False)
            except OSError as exc:  # CommClosedError and connection resets
                if attempt == SCATTER_RETRIES:
                    raise DistributedError(f"could not scatter block {key} to the workers: {exc}") from exc
                logger.warning("scattering block %s failed (%s); retrying", key, exc)
                time.sleep(0.25 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def drop(self, key: Any) -> None:
        self.futures.pop(key, None)


def _check_connected(client: Any, doing: str, exc: BaseException | None = None) -> None:
    """DistributedError when ``client`` has lost its scheduler (``exc``: the error that said so, e.g. a task
    "cancelled for reason: scheduler-connection-lost"). The run had resubmitted its shards and then failed in
    a bare AttributeError ('NoneType' object has no attribute 'scatter') once the client stopped reconnecting."""
    lost = "scheduler-connection-lost" in str(exc or "")
    status = str(getattr(client, "status", "running"))
    if lost or status not in ("running", "connecting", "newly-created") or getattr(client, "scheduler", 1) is None:
        where = getattr(getattr(client, "scheduler", None), "address", None) or "the Dask scheduler"
        raise DistributedError(f"lost the connection to {where} while {doing} (client {status}); finished shards "
                               "are kept in the checkpoint folder, if any: run again once the scheduler is back "
                               "to resume") from exc


def all_pairs_distributed(train: Any, synth: Any | None, *, k: int = 5,
                          thresholds: Sequence[float] = (0.6, 0.85), bins: int = 200,
                          backend: str | None = None, progress: bool = True,
                          workers: int | None = None, scheduler: Any = None,
                          checkpoint_dir: str | os.PathLike | None = None, shard_size: int | None = None,
                          train_shard_size: int | None = None, device: str | None = None,
                          threads_per_task: int | None = None, precision: str = "ieee") -> AllPairsResult:
    """Exact all-pairs cosine top-k, histogram and class counts, sharded over a Dask cluster.

    Parameters
    ----------
    train:      (n_train, d) float array (numpy, torch or cupy; copied to the host).
    synth:      (n_synth, d) float array, or None to compare ``train`` with itself (self-pairs excluded).
    k, thresholds, bins, backend:  as :func:`deepssim_fast.all_pairs.all_pairs`; ``backend`` is used on
                every worker.
    progress:   one tqdm bar over shards (also off when stderr is not a terminal).
    workers:    start an embedded cluster of this many workers (see :func:`start_local_cluster`).
    scheduler:  or use an existing cluster: ``"tcp://host:8786"``, an open ``distributed.Client`` or a
                cluster object (``LocalCluster``, ...; as ``distributed.Client`` accepts one).
    checkpoint_dir: save every finished shard here and skip shards already saved by an earlier run of
                the same job (same inputs, options and shards).
    shard_size: synthetic rows per shard (default :func:`default_shard_size`).
    train_shard_size: training rows per block (default: the whole training set, unless it exceeds a
                quarter of a worker's memory limit); at least ``k`` (``k + 1`` in self mode), else refused in
                either mode. In self mode blocks are whole synthetic shards: the size is rounded down to a
                multiple of ``shard_size`` (at least one shard), and up where that leaves under ``k + 1`` rows.
    device:     engine device on the workers; None: each worker's GPU when it has one (and the backend
                is not ``"native"``), else its CPU.
    threads_per_task: engine threads (native, torch, BLAS) in each task; default: the worker host's usable
                cores divided among the workers of this cluster on that host and their threads.
    precision:  GPU workers' dot-product precision, as :func:`deepssim_fast.all_pairs.all_pairs` (Triton only:
                where other engines ran the shards, one warning says so).

    Returns the :class:`~deepssim_fast.all_pairs.AllPairsResult` of one process over the whole problem
    (bit for bit with the native engine; torch/Triton engines: to the last bits, see the module docstring):
    scores (n_synth, k) float32 descending, indices (n_synth, k) int64 into ``train``, ties
    to the lower index, histogram, class counts and train_hits over all pairs.
    """
    from .all_pairs import PRECISIONS, AllPairsResult, _check_candidates, _check_dims, _check_params

    # (first, whatever the inputs: an empty synthetic set returned before workers=-1 was refused, and the
    # shard sizes were checked once a cluster had started, some read through int(): "7", 2.7, True)
    check_cluster_options(workers, scheduler)
    for name, v in (("shard_size", shard_size), ("train_shard_size", train_shard_size),
                    ("threads_per_task", threads_per_task)):
        check_count_or_none(v, name)
    if device is not None:
        import torch

        try:
            dev_type = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a device ({exc})") from exc
        if dev_type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' (or 'cuda:N'), or None "
                             "(each worker's GPU when it has one)")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise NotADirectoryError(f"checkpoint_dir {os.fspath(checkpoint_dir)!r} is an existing file, not a folder")
    # the inputs are checked as one process checks them, in its words (the rows by their numbers in the whole sets)
    k, low, high, bins = _check_params(k, thresholds, bins)
    self_mode = synth is None
    tr = _as_matrix(train, "train")
    sy = None if self_mode else _as_matrix(synth, "synth", d=tr.shape[1])
    if sy is not None:
        _check_dims(tr.shape, sy.shape)
    n_train = tr.shape[0]
    n_synth = n_train if self_mode else sy.shape[0]
    _check_candidates(tr.shape, k, self_mode)
    _check_zero_rows(tr, "train")
    if sy is not None:
        _check_zero_rows(sy, "synth")
    check_train_shard_size(train_shard_size, k=k, self_mode=self_mode)  # (it was found once a cluster ran)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    opts: dict[str, Any] = {"k": k, "thresholds": (low, high), "bins": int(bins),
                            "backend": backend, "device": device,
                            "threads": None if threads_per_task is None else int(threads_per_task),
                            "precision": precision,
                            **_caller_engine_settings()}  # (not in the checkpoints' key: results do not change)
    if backend not in (None, "auto", *BACKENDS):
        # (the name is checked here, before a cluster starts: it was refused on a worker, after start-up; whether
        # it is available is the workers' matter on a user's cluster, a GPU worker's Triton say)
        raise ValueError(f"backend {backend!r} is not supported here; expected one of {BACKENDS} or 'auto'")
    if workers is not None and (backend not in (None, "auto")
                                or env_backend()[1] not in (None, "auto")):
        # the workers of an embedded cluster run here: a backend they cannot run is said now, as one process says
        # it (backend="triton" without CUDA started the cluster, then failed on a worker in Dask's words)
        _resolve_backend(backend, [], supported=BACKENDS)
    if n_synth == 0:  # nothing to distribute: the empty result, as one process gives it
        from .all_pairs import all_pairs

        empty = all_pairs(tr, sy, k=k, thresholds=(low, high), bins=int(bins), progress=False)
        if backend not in (None, "auto"):  # (computed here, on this machine's default; labelled as asked)
            empty.backend = backend
        return empty
    if shard_size is None:
        shard_size = default_shard_size(n_synth, n_train)

    inputs = _inputs_key(tr, sy, opts) if checkpoint_dir is not None else ""
    with cluster_client(workers, scheduler) as client:
        if train_shard_size is None:
            train_shard_size = _auto_train_shard_size(client, tr, k + 1)
            if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
                # the plan of an interrupted run of the same job, when its training blocks fit this cluster
                found, saved = _saved_train_shard_size(checkpoint_dir, inputs, int(shard_size))
                need = k + 1 if self_mode else k
                if found and saved is not None and saved < need:
                    # (a self-mode size under k + 1, which an earlier version rounded up: k + 1 plans the same
                    # blocks; in the other mode no run planned such blocks)
                    saved = need
                if found and (train_shard_size is None or (saved is not None and saved <= train_shard_size)):
                    if saved != train_shard_size:
                        logger.info("keeping the shard plan of the checkpoint in %s (training blocks of %s rows)",
                                    checkpoint_dir, saved or "all")
                    train_shard_size = saved
        shards = plan_shards(n_synth, n_train, k=k, shard_size=int(shard_size),
                             train_shard_size=train_shard_size, self_mode=self_mode)
        tblocks = sorted({(s.t0, s.t1) for s in shards})
        if len(tblocks) > 1:
            logger.info("%d training blocks of %s rows", len(tblocks),
                        "/".join(str(n) for n in sorted({b - a for a, b in tblocks}, reverse=True)))
        ckpt = None
        fold = _Fold(shards, AllPairsResult)
        if checkpoint_dir is not None:
            key = _job_key(inputs, shards)
            ckpt = _Checkpoints(checkpoint_dir, key, opts, shards, n_train, n_synth, inputs=inputs,
                                shard_size=int(shard_size), train_shard_size=train_shard_size)
            for s in shards:
                r = ckpt.load(s, AllPairsResult)
                if r is not None:
                    fold.add(s, r)
        todo = [s for s in shards if not fold.has(s)]
        if ckpt is not None:
            ckpt.write_manifest(complete=not todo)
        logger.info("all-pairs %d×%d: %d shards (%d synth × %d train blocks), %d from checkpoint, %d to run",
                    n_synth, n_train, len(shards), shards[-1].sindex + 1, shards[-1].tblock + 1,
                    len(shards) - len(todo), len(todo))
        if todo:
            _run_shards(client, tr, sy, todo, opts, fold=fold, total=len(shards), progress=progress,
                        ckpt=ckpt)
    res = fold.result()
    other = sorted(set(res.backend.split("+")) - {"triton"})
    if precision != "ieee" and other:  # (once, here: the workers' engines keep quiet about it)
        warnings.warn(f"all_pairs_distributed: precision={precision!r} applies to the Triton backend only; the "
                      f"shards ran on the {' and '.join(other)} backend, which computes exact fp32 scores",
                      UserWarning, stacklevel=2)
    if "+" in res.backend:  # (backend=None: shards resumed from a run on other workers, CPU against GPU)
        logger.warning("all-pairs: the shards were computed by different engines (%s), whose scores differ "
                       "in the last bits, so pairs that close to a bin edge or a threshold may count on "
                       "either side; for one engine throughout, pass backend= (native, torch or triton)",
                       res.backend.replace("+", ", "))
    return res


def _run_shards(client: Client, tr: np.ndarray, sy: np.ndarray | None, todo: Sequence[Shard],
                opts: dict[str, Any], *, fold: _Fold, total: int, progress: bool, ckpt: _Checkpoints | None
                ) -> None:
    """Submit ``todo`` (a bounded number in flight), fold results in as they finish, resubmit lost ones."""
    from distributed import KilledWorker, as_completed
    from tqdm.auto import tqdm

    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        where = client.scheduler.address
        # (a warning: at the default verbosity a scheduler without workers was a silent wait of 10 minutes)
        logger.warning("no Dask worker in %s yet: waiting up to %d s for one to join", where, WORKER_WAIT_S)
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as exc:
            raise DistributedError(f"no Dask worker joined {where} within {WORKER_WAIT_S} s") from exc
        info = client.scheduler_info(n_workers=-1)["workers"]
    host_workers: dict[str, int] = {}
    for addr in info:
        host = addr.rsplit(":", 1)[0]
        host_workers[host] = host_workers.get(host, 0) + 1
    opts = dict(opts, host_workers=host_workers, kill_flag=os.environ.get(KILL_ONCE_ENV) or None)

    def window() -> int:  # shards in flight: a few per worker thread (workers may join or leave)
        return IN_FLIGHT_PER_THREAD * max(1, sum(client.nthreads().values()))

    single_block = all(s.tblock == 0 for s in todo) and all(s.t0 == 0 and s.t1 == tr.shape[0] for s in todo)
    trains = _Scattered(client, broadcast=single_block)
    synths = _Scattered(client, broadcast=False)
    pending = deque(todo)
    inflight: dict[str, Shard] = {}
    futures: dict[str, Any] = {}  # (the in-flight shards' futures, by key)
    attempts: dict[Shard, int] = {}
    ran = 0
    limit = window()
    ac = as_completed()

    def submit(s: Shard) -> None:
        tf = trains.get(s.tblock, tr[s.t0:s.t1])
        sf = None
        if sy is not None or s.self_offset is None:  # (self mode: synthetic rows outside this block)
            block = (sy if sy is not None else tr)[s.s0:s.s1]
            # a small block rides inside the task (one message, and Dask can rerun it on its own);
            # a large one is scattered first, so the scheduler never holds big task payloads
            sf = synths.get(s, block) if block.nbytes >= SCATTER_MIN_BYTES else np.ascontiguousarray(block)
        fut = client.submit(_run_shard, tf, sf, s, opts, pure=False,
                            key=f"deepssim-allpairs-{s.name}-{os.urandom(4).hex()}")
        inflight[fut.key] = s
        futures[fut.key] = fut
        ac.add(fut)

    t_start = time.perf_counter()
    try:
        while pending and len(inflight) < limit:
            submit(pending.popleft())
        with tqdm(total=total, initial=total - len(todo), unit="shard", desc="all-pairs shards",
                  disable=None if progress else True, leave=False) as bar:  # (cleared, as one process's bar)
            link = dashboard_link(client)
            if link:
                bar.set_postfix_str(f"dashboard {link}", refresh=False)
            for fut in ac:
                s = inflight.pop(fut.key)
                futures.pop(fut.key, None)
                try:
                    res = fut.result()
                except KilledWorker as exc:
                    raise DistributedError(f"shard {s.name} killed its workers repeatedly ({exc}); out of "
                                           "memory? try a smaller shard_size or train_shard_size") from exc
                except Exception as exc:  # noqa: BLE001 - lost inputs show up as cancelled futures
                    if fut.status != "cancelled" and "cancelled" not in type(exc).__name__.lower():
                        raise
                    _check_connected(client, f"running shard {s.name}", exc)
                    attempts[s] = attempts.get(s, 0) + 1
                    if attempts[s] > MAX_RESUBMITS:
                        raise DistributedError(f"shard {s.name} lost its inputs {attempts[s]} times: "
                                               f"{exc}") from exc
                    logger.warning("shard %s: %s; resubmitting (attempt %d)", s.name, exc, attempts[s] + 1)
                    synths.drop(s)
                    submit(s)
                    continue
                finally:
                    fut.release()
                _check_part(res, s, opts)
                if ckpt is not None:
                    ckpt.save(s, res)
                fold.add(s, res)
                ran += 1
                synths.drop(s)
                bar.update(1)
                if ran % 16 == 0:
                    limit = window()
                while pending and len(inflight) < limit:
                    submit(pending.popleft())
    finally:
        # a failed or interrupted run leaves nothing on the cluster: the traceback keeps this frame, and with it
        # every future, alive (a REPL or Jupyter keeps sys.last_traceback), and a user's own cluster held the
        # scattered training set and the shards in flight (their tasks still running) until it was dropped
        ac.clear()
        for f in [*futures.values(), *trains.futures.values(), *synths.futures.values()]:
            with contextlib.suppress(Exception):  # (a client whose loop has gone: nothing is held then)
                f.release()
        futures.clear()
        trains.futures.clear()
        synths.futures.clear()
    logger.info("ran %d shards in %.2f s", ran, time.perf_counter() - t_start)


class _Fold:
    """Exact, incremental merge of shard results, so the driver never holds every part at once.

    The training blocks of a synthetic shard are merged (``axis="train"``) as soon as all have arrived;
    finished synthetic shards are merged in order (``axis="synth"``) into one head result whenever
    :data:`FOLD_EVERY` consecutive ones are ready. Both merges are exact, so the order of folding does not
    change a bit of the result.
    """

    def __init__(self, shards: Sequence[Shard], cls: type) -> None:
        self.cls = cls
        self.blocks: dict[int, list[Shard]] = {}
        for s in shards:
            self.blocks.setdefault(s.sindex, []).append(s)
        self.n_rows = len(self.blocks)
        self.parts: dict[int, dict[Shard, AllPairsResult]] = {}
        self.rows: dict[int, AllPairsResult] = {}
        self.head: AllPairsResult | None = None
        self.next = 0  # first synthetic shard not folded into head
        self.folded: set[Shard] = set()

    def has(self, shard: Shard) -> bool:
        return shard in self.folded

    def add(self, shard: Shard, res: AllPairsResult) -> None:
        if shard in self.folded:
            return
        self.folded.add(shard)
        mine = self.parts.setdefault(shard.sindex, {})
        mine[shard] = res
        blocks = self.blocks[shard.sindex]
        if len(mine) < len(blocks):
            return
        parts = [mine[s] for s in blocks]
        del self.parts[shard.sindex]
        self.rows[shard.sindex] = parts[0] if len(parts) == 1 else \
            self.cls.merge(parts, axis="train", train_offsets=[s.t0 for s in blocks])
        run = 0
        while self.next + run in self.rows:
            run += 1
        if run >= FOLD_EVERY:
            self._fold(run)

    def _fold(self, run: int) -> None:
        parts = [self.head] if self.head is not None else []
        parts += [self.rows.pop(self.next + i) for i in range(run)]
        self.head = parts[0] if len(parts) == 1 else self.cls.merge(parts, axis="synth")
        self.next += run

    def result(self) -> AllPairsResult:
        missing = self.n_rows - self.next - len(self.rows)
        if missing:
            raise DistributedError(f"internal error: {missing} synthetic shards have no result")
        self._fold(self.n_rows - self.next)
        assert self.head is not None
        return self.head
