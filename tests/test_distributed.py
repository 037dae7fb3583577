"""Scale-out over Dask: sharded all-pairs equals one process bit for bit, survives a killed worker, resumes.

One 2-worker LocalCluster (loopback) is shared by the module; a few tests start their own through the
public ``workers=`` argument. Embeddings are real MRI (downsampled MNI152 slices, flattened) plus seeded
random rows, so near-ties and exact duplicates both occur.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed")

from deepssim_fast import distributed as dd  # noqa: E402
from deepssim_fast.all_pairs import AllPairsResult, all_pairs  # noqa: E402
from deepssim_fast.data import SlicePolicy, real_slices  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- helpers
def _bits(a: np.ndarray) -> np.ndarray:
    """Floats as their bit patterns, so "equal" means bit for bit (-0.0 != 0.0)."""
    return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a


def assert_same(got: AllPairsResult, want: AllPairsResult) -> None:
    """Every field bit for bit; on failure, show the first mismatching elements."""
    for name in ("scores", "indices", "train_hits"):
        g, w = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
        diff = np.argwhere(_bits(g) != _bits(w))
        first = [tuple(i) for i in diff[:5]]
        assert diff.size == 0, (f"{name}: {len(diff)} mismatches, first at {first}: "
                                f"got {[g[i] for i in first]} want {[w[i] for i in first]}")
    gc, wc = got.histogram[0], want.histogram[0]
    assert np.array_equal(gc, wc), f"histogram differs in bins {np.nonzero(gc != wc)[0][:10].tolist()}"
    assert np.array_equal(got.histogram[1], want.histogram[1])
    assert got.class_counts == want.class_counts
    assert (got.n_train, got.n_synth, got.k) == (want.n_train, want.n_synth, want.k)
    assert tuple(got.thresholds) == tuple(want.thresholds)


def _real_embeddings() -> np.ndarray:
    """(n, 256) float32: every other slice of MNI152 along each axis, centre-fit to 64², 4×4 mean-pooled."""
    rows = []
    for ax in (0, 1, 2):
        for s in real_slices((64, 64), datasets=["mni152"], policy=SlicePolicy(axis=ax, step=2)):
            rows.append(s.array.reshape(16, 4, 16, 4).mean((1, 3)).ravel())
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def emb() -> dict[str, np.ndarray]:
    real = _real_embeddings()
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((61, real.shape[1])).astype(np.float32) * real.std() + real.mean()
    train = np.concatenate([real[0::2], noise[:31]])
    # real[4:9] (rows 2..4 of train) come back as exact duplicates
    synth = np.concatenate([real[1::2], noise[31:], real[4:9]])
    return {"train": train, "synth": synth}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as c:
        yield c


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _prestarted(p) -> bool:
    """A process of the checks the suite runs beside the tests (``_prestart``; a compiler they start)."""
    import _prestart

    try:
        return os.getsid(p.pid) in _prestart.session_ids()
    except ProcessLookupError:
        return False


def _mp_helper(p) -> bool:
    """multiprocessing's resource tracker / forkserver: started once, they live as long as this process."""
    import psutil

    try:
        return any("resource_tracker" in c or "forkserver" in c for c in p.cmdline())
    except psutil.NoSuchProcess:
        return False


def _healthy(client, n: int = 2) -> None:
    client.wait_for_workers(n, timeout=60)


# --------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("n_synth,n_train,shard,tshard,self_mode,k", [
    (1, 1, 1, None, False, 1), (7, 9, 2, 4, False, 3), (57, 57, 5, 11, True, 4), (100, 100, 100, 30, True, 1),
    (33, 1000, 7, 333, False, 5), (64, 64, 16, 16, True, 15), (3000, 3000, 2048, 2443, True, 5)])
def test_plan_covers_every_pair_once(n_synth, n_train, shard, tshard, self_mode, k):
    shards = dd.plan_shards(n_synth, n_train, k=k, shard_size=shard, train_shard_size=tshard,
                            self_mode=self_mode)
    cover = np.zeros((n_synth, n_train), np.int64)
    for s in shards:
        assert s.n_train >= (k + 1 if self_mode else k), s
        cover[s.s0:s.s1, s.t0:s.t1] += 1
        if self_mode and s.self_offset is not None:
            assert s.t0 + s.self_offset == s.s0 and s.s1 <= s.t1  # synth rows inside the block
        elif self_mode:
            assert s.s1 <= s.t0 or s.s0 >= s.t1  # disjoint
    assert (cover == 1).all()
    assert [s.sindex for s in shards] == sorted(s.sindex for s in shards)


def test_self_mode_training_blocks_stay_within_the_rows_asked_for():
    """Self-mode blocks are whole synthetic shards: rounded up, the 2443 rows a worker's memory budget allowed
    became 4096 and one block held the whole 3000-row set. They are rounded down now (at least one shard)."""
    blocks = sorted({(s.t0, s.t1) for s in dd.plan_shards(3000, 3000, k=5, shard_size=2048, train_shard_size=2443,
                                                          self_mode=True)})
    assert blocks == [(0, 2048), (2048, 3000)]
    blocks = sorted({(s.t0, s.t1) for s in dd.plan_shards(57, 57, k=4, shard_size=5, train_shard_size=11,
                                                          self_mode=True)})
    assert max(b - a for a, b in blocks) <= 11 and all(a % 5 == 0 for a, _ in blocks)
    blocks = sorted({(s.t0, s.t1) for s in dd.plan_shards(57, 57, k=4, shard_size=20, train_shard_size=11,
                                                          self_mode=True)})
    assert blocks[0] == (0, 20)  # (a shard is the least a block holds)


def test_an_unknown_backend_is_refused_before_a_cluster_starts(monkeypatch):
    """backend='bogus' with workers= was refused on a worker, after the cluster had started."""
    def no_cluster(*a, **kw):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="backend 'bogus' is not supported"):
        dd.all_pairs_distributed(tr, tr[:5], k=2, workers=2, backend="bogus")


def test_a_train_shard_size_under_k_is_refused_in_both_modes_before_a_cluster_starts(monkeypatch):
    """train_shard_size=3 with k=7 was refused in cross mode only once a local cluster had started, and in self
    mode was rounded up to blocks of 8 rows without a word. Both modes refuse a size under the rows a block
    needs (k; k + 1 in self mode), before any cluster; sizes that suffice still plan in both."""
    def no_cluster(*a, **kw):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    tr = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"train_shard_size=3 leaves training blocks with fewer than 7 rows; k=7"):
        dd.all_pairs_distributed(tr, tr[:10], k=7, workers=2, train_shard_size=3, progress=False)
    with pytest.raises(ValueError, match=r"train_shard_size=3 leaves training blocks with fewer than 8 rows; k=7 "
                                         r"needs at least 8 \(k \+ 1 in self mode"):
        dd.all_pairs_distributed(tr, None, k=7, workers=1, train_shard_size=3, shard_size=2, progress=False)
    with pytest.raises(ValueError, match="train_shard_size=7 leaves training blocks with fewer than 8 rows"):
        dd.plan_shards(30, 30, k=7, shard_size=2, train_shard_size=7, self_mode=True)
    assert {s.n_train for s in dd.plan_shards(30, 30, k=7, shard_size=2, train_shard_size=8, self_mode=True)} >= {8}
    assert {s.n_train for s in dd.plan_shards(10, 30, k=7, shard_size=2, train_shard_size=7, self_mode=False)} \
        >= {7}


def test_a_self_mode_checkpoint_planned_from_a_size_under_k_plus_one_is_still_found(client, emb, tmp_path,
                                                                                   monkeypatch, caplog):
    """An earlier version rounded a self-mode train_shard_size under k + 1 up and saved the size as given; a
    rerun that keeps the saved plan (the default train_shard_size) plans from k + 1, which gives the same
    blocks: the saved shards are found, not refused or recomputed."""
    tr = emb["train"]
    kw = dict(k=4, scheduler=client, shard_size=20, progress=False, checkpoint_dir=tmp_path)
    want = all_pairs(tr, None, k=4, progress=False)
    assert_same(dd.all_pairs_distributed(tr, None, train_shard_size=5, **kw), want)
    manifest = next(tmp_path.glob("allpairs-*.json"))
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(m, train_shard_size=3), indent=1))  # (as the earlier version saved it)
    saved = len(list(tmp_path.glob("allpairs-*-s*.npz")))
    monkeypatch.setattr(dd, "_auto_train_shard_size", lambda client, train, min_rows: 40)
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        assert_same(dd.all_pairs_distributed(tr, None, **kw), want)
    assert any(f"{saved} from checkpoint, 0 to run" in r.getMessage() for r in caplog.records), caplog.text


def test_plan_rejects_blocks_smaller_than_k():
    with pytest.raises(ValueError, match="fewer than 6 rows"):
        dd.plan_shards(10, 100, k=6, shard_size=5, train_shard_size=4, self_mode=False)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        dd.plan_shards(10, 100, k=1, shard_size=0, train_shard_size=None, self_mode=False)


def test_self_mode_blocks_rounded_to_shards_still_hold_k_plus_one_rows():
    """In self mode a training block is rounded down to whole synthetic shards, and could fall under k + 1
    rows: train_shard_size=61 with k=60 and shards of 30 became 60, and the plan refused the size it had been
    given ("train_shard_size=61 leaves training blocks with fewer than 61 rows"), or the size the memory
    budget had chosen, after the cluster started. It rounds up to the first multiple of k + 1 rows or more
    then; every valid size plans, and every pair is covered once."""
    blocks = sorted({(s.t0, s.t1) for s in dd.plan_shards(211, 211, k=60, shard_size=30, train_shard_size=61,
                                                          self_mode=True)})
    assert blocks[0] == (0, 90) and all(b - a >= 61 for a, b in blocks)
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(2, 80))
        k = int(rng.integers(1, n))
        ss = int(rng.integers(1, n + 1))
        ts = int(rng.integers(k + 1, n + 1))
        shards = dd.plan_shards(n, n, k=k, shard_size=ss, train_shard_size=ts, self_mode=True)
        cover = np.zeros((n, n), np.int64)
        for s in shards:
            assert s.n_train >= k + 1, (n, k, ss, ts, s)
            cover[s.s0:s.s1, s.t0:s.t1] += 1
            assert s.self_offset is not None or s.s1 <= s.t0 or s.s0 >= s.t1
        assert (cover == 1).all(), (n, k, ss, ts)


def test_options_are_checked_before_a_cluster_starts(monkeypatch, tmp_path):
    """shard_size="7", 2.7 and True were read through int(); train_shard_size=2.5 and threads_per_task="x"
    failed in Python's own words, 2.5 threads on a worker; device="mps" and float128 rows were refused on a
    worker; an empty synthetic set returned before workers=-1 was refused; a checkpoint_dir that is a file
    said "File exists" after the cluster started. Each is named now, before any cluster."""
    def no_cluster(*a, **k):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    cases = [(dict(shard_size="7"), "shard_size must be a positive integer or None, got '7'"),
             (dict(shard_size=2.7), "shard_size must be a positive integer or None, got 2.7"),
             (dict(shard_size=True), "shard_size must be a positive integer or None, got True"),
             (dict(train_shard_size=2.5), "train_shard_size must be a positive integer or None, got 2.5"),
             (dict(train_shard_size="10"), "train_shard_size must be a positive integer or None, got '10'"),
             (dict(threads_per_task="x"), "threads_per_task must be a positive integer or None, got 'x'"),
             (dict(threads_per_task=np.float64(2.0)), "threads_per_task must be a positive integer"),
             (dict(device="mps"), "device='mps' is not supported"),
             (dict(device="nonsense"), "device='nonsense' is not a device")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            dd.all_pairs_distributed(tr, tr[:5], k=2, workers=2, progress=False, **kw)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        dd.all_pairs_distributed(tr, tr[:0], k=2, workers=-1, progress=False)
    with pytest.raises(ValueError, match="scheduler must be a Dask scheduler address"):
        dd.all_pairs_distributed(tr, tr[:0], k=2, scheduler="", progress=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="checkpoint_dir .*afile.* is an existing file"):
        dd.all_pairs_distributed(tr, tr[:5], k=2, workers=2, progress=False, checkpoint_dir=tmp_path / "afile")
    if hasattr(np, "float128"):
        with pytest.raises(TypeError, match="synth: dtype float128 is not supported"):
            dd.all_pairs_distributed(tr, tr[:5].astype(np.float128), k=2, workers=2, progress=False)


def test_a_closed_client_is_named():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        c = Client(cluster)
        c.close()
        tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
        with pytest.raises(dd.DistributedError, match="the Client given as scheduler is closed; pass an open one"):
            dd.all_pairs_distributed(tr, tr[:5], k=2, scheduler=c, progress=False)


def test_tasks_in_the_callers_process_leave_its_thread_settings(monkeypatch):
    """Two tasks running at once in the caller's process (a Client(processes=False)) each saved the thread
    settings they found and restored them: the second saved the first one's 1 thread, and after the run the
    caller's later all_pairs and torch work ran on 1 thread. The settings are saved by the first task to
    start and restored by the last to end."""
    import importlib
    import threading

    import torch

    from deepssim_fast import _native

    ap = importlib.import_module("deepssim_fast.all_pairs")
    a_in, b_in = threading.Event(), threading.Event()
    threads: dict[str, threading.Thread] = {}

    def task_body(train, synth, **kw):
        if threading.current_thread() is threads["a"]:
            a_in.set()
            assert b_in.wait(10)
        else:
            b_in.set()
            threads["a"].join(10)  # (b ends last, after a has ended)
        return "result"

    monkeypatch.setattr(ap, "all_pairs", task_body)
    before = torch.get_num_threads(), _native.num_threads_override()
    torch.set_num_threads(2)
    _native.set_num_threads(2)
    try:
        train = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
        shard = dd.Shard(sindex=0, tblock=0, s0=0, s1=3, t0=0, t1=10, self_offset=None)
        opts = {"k": 2, "thresholds": (0.6, 0.85), "bins": 10, "backend": "native", "device": None,
                "threads": 1, "precision": "ieee"}
        run = lambda: dd._run_shard(train, train[:3], shard, opts)  # noqa: E731
        threads["a"] = threading.Thread(target=run)
        threads["b"] = threading.Thread(target=run)
        threads["a"].start()
        assert a_in.wait(10)
        threads["b"].start()
        threads["b"].join(20)
        assert torch.get_num_threads() == 2 and _native.num_threads() == 2
    finally:
        torch.set_num_threads(before[0])
        _native.set_num_threads(before[1])


def test_the_callers_simd_cap_and_kernel_choice_reach_the_workers(client, emb, monkeypatch):
    """set_simd_level / set_topk_kernel are per process: a worker process ran its shards at its own level
    (a cap set to compare kernels or to stay off AVX-512 did not apply), while environment variables did.
    The caller's settings go with the job's options; each task sets them and the worker's own come back."""
    from deepssim_fast import _native

    seen: dict = {}
    real = dd._run_shards

    def spy(client_, tr, sy, todo, opts, **kw):
        seen.update(opts)
        return real(client_, tr, sy, todo, opts, **kw)

    monkeypatch.setattr(dd, "_run_shards", spy)
    _native.set_simd_level("scalar")
    _native.set_topk_kernel("fp32")
    try:
        got = dd.all_pairs_distributed(emb["train"], emb["synth"], k=3, scheduler=client, shard_size=40,
                                       progress=False)
    finally:
        _native.set_simd_level("auto")
        _native.set_topk_kernel("auto")
    assert (seen["simd"], seen["topk_kernel"]) == ("scalar", "fp32")
    assert_same(got, all_pairs(emb["train"], emb["synth"], k=3, progress=False))
    assert dd._caller_engine_settings() == {"simd": "auto", "topk_kernel": "auto"}

    def in_task(simd, kernel):
        from deepssim_fast import _native as nat
        from deepssim_fast import distributed as d

        with d._engine_threads(1, simd=simd, topk_kernel=kernel):
            inside = nat.simd_level(), nat.topk_kernel_choice()
        return inside, (nat.simd_cap(), nat.topk_kernel_override())

    inside, after = client.submit(in_task, "scalar", "fp32", pure=False).result(timeout=60)
    assert inside == ("scalar", "fp32")
    assert after == ("auto", "auto")  # the worker's own settings again
    inside, _ = client.submit(in_task, "auto", "auto", pure=False).result(timeout=60)
    assert inside == (_native.detected_simd_level(), "auto")  # "auto" leaves the worker's own


def test_default_shard_size_depends_on_problem_only():
    assert dd.default_shard_size(10, 10) == 10
    assert dd.default_shard_size(5000, 10) == dd.MIN_SHARD_ROWS
    assert dd.default_shard_size(10**6, 10**6) == dd.MAX_SHARD_ROWS
    assert dd.default_shard_size(100_000, 100) == 100_000 // dd.MIN_SHARDS


# ------------------------------------------------------------------------------- identical to one process
@pytest.mark.parametrize("shard_size,train_shard_size",
                         [(23, None), (40, 61), (500, 100), (3, None), (6, 40)])
def test_sharded_equals_one_process_real(client, emb, shard_size, train_shard_size):
    want = all_pairs(emb["train"], emb["synth"], k=7, progress=False)
    # (3, None) and (6, 40): more shards than FOLD_EVERY, so the incremental fold is exercised
    got = dd.all_pairs_distributed(emb["train"], emb["synth"], k=7, scheduler=client, shard_size=shard_size,
                                   train_shard_size=train_shard_size, progress=False)
    assert_same(got, want)
    assert want.class_counts["duplicate"] >= 5  # the planted exact duplicates are there


@pytest.mark.parametrize("shard_size,train_shard_size", [(17, None), (17, 40), (64, 64)])
def test_self_mode_equals_one_process(client, emb, shard_size, train_shard_size):
    train = emb["train"]
    want = all_pairs(train, None, k=5, progress=False)
    got = dd.all_pairs_distributed(train, None, k=5, scheduler=client, shard_size=shard_size,
                                   train_shard_size=train_shard_size, progress=False)
    assert_same(got, want)
    assert got.n_pairs == len(train) * (len(train) - 1)


def test_training_set_too_large_for_a_worker_is_sharded(client, emb, monkeypatch, caplog):
    """Training blocks are chosen from the workers' memory limit; the merged result is still exact."""
    limit = min(w["memory_limit"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
    row_bytes = emb["train"].shape[1] * 4
    monkeypatch.setattr(dd, "TRAIN_MEMORY_FRACTION", 40.5 * row_bytes / limit)  # 40 training rows a block
    want = all_pairs(emb["train"], emb["synth"], k=3, progress=False)
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        got = dd.all_pairs_distributed(emb["train"], emb["synth"], k=3, scheduler=client, progress=False)
    assert any("training blocks of at most 40 rows" in r.getMessage() for r in caplog.records), caplog.text
    assert any("4 training blocks of 40/23 rows" in r.getMessage() for r in caplog.records), caplog.text
    assert_same(got, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n_synth,n_train,k", [(1, 1, 1), (13, 7, 7), (101, 257, 10)])
def test_random_odd_shapes_and_dtypes(client, dtype, n_synth, n_train, k):
    rng = np.random.default_rng(n_synth * 1000 + n_train)
    train = rng.standard_normal((n_train, 19)).astype(dtype)
    synth = rng.standard_normal((n_synth, 19)).astype(dtype)
    synth[: min(n_synth, n_train) // 2] = train[: min(n_synth, n_train) // 2]  # exact duplicates
    want = all_pairs(train, synth, k=k, bins=37, thresholds=(0.1, 0.5), progress=False)
    got = dd.all_pairs_distributed(train, synth, k=k, bins=37, thresholds=(0.1, 0.5), scheduler=client,
                                   shard_size=max(1, n_synth // 3), train_shard_size=max(k, n_train // 2),
                                   progress=False)
    assert_same(got, want)


def test_torch_bfloat16_input(client):
    import torch

    g = torch.Generator().manual_seed(3)
    train = torch.randn(90, 24, generator=g).to(torch.bfloat16)
    synth = torch.randn(31, 24, generator=g).to(torch.bfloat16)
    want = all_pairs(train, synth, k=3, progress=False)
    got = dd.all_pairs_distributed(train, synth, k=3, scheduler=client, shard_size=8, progress=False)
    assert_same(got, want)


def test_public_api_scheduler_address(client, emb, caplog):
    """all_pairs(..., scheduler="tcp://...") connects to the running cluster and logs its dashboard."""
    want = all_pairs(emb["train"], emb["synth"], k=3, progress=False)
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        got = all_pairs(emb["train"], emb["synth"], k=3, progress=False, scheduler=client.scheduler.address)
    assert_same(got, want)
    assert any("Dask dashboard: http://127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_public_api_workers_starts_and_closes_local_cluster(emb, monkeypatch):
    """workers=2: an embedded LocalCluster (loopback) runs the shards; self mode through all_pairs."""
    import psutil

    clusters = []
    start = dd.start_local_cluster

    def spy(n):
        clusters.append((n, start(n)))
        return clusters[-1][1]

    monkeypatch.setattr(dd, "start_local_cluster", spy)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    want = all_pairs(emb["train"], None, k=4, progress=False)
    got = all_pairs(emb["train"], None, k=4, progress=False, workers=2)
    assert_same(got, want)
    # a cluster of 2 workers really ran, and was closed
    assert [n for n, _ in clusters] == [2]
    assert clusters[0][1].status.name == "closed", clusters[0][1].status
    started = [p for p in me.children(recursive=True)
               if p.pid not in before and not _mp_helper(p) and not _prestarted(p)]
    gone, alive = psutil.wait_procs(started, timeout=10)
    alive = [p for p in alive if _running(p)]
    assert not alive, f"worker processes left running: {[p.pid for p in alive]}"


# ------------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("scatter_min_bytes", [0, dd.SCATTER_MIN_BYTES], ids=["scattered", "in-task"])
def test_killed_worker_gives_identical_result(client, emb, tmp_path, monkeypatch, scatter_min_bytes):
    """A worker dies mid-task: its task is rerun; synthetic blocks it held (scattered) are sent again."""
    flag = tmp_path / "kill-once"
    flag.touch()
    monkeypatch.setenv(dd.KILL_ONCE_ENV, str(flag))
    monkeypatch.setattr(dd, "SCATTER_MIN_BYTES", scatter_min_bytes)
    want = all_pairs(emb["train"], emb["synth"], k=6, progress=False)
    try:
        got = dd.all_pairs_distributed(emb["train"], emb["synth"], k=6, scheduler=client, shard_size=20,
                                       progress=False)
    finally:
        _healthy(client)
    assert not flag.exists(), "the test hook did not fire: no worker was killed"
    assert_same(got, want)


def test_killed_only_worker_rescatters_training_set(emb, tmp_path, monkeypatch):
    """With one worker, the broadcast training set dies with it and is scattered again."""
    flag = tmp_path / "kill-once"
    flag.touch()
    monkeypatch.setenv(dd.KILL_ONCE_ENV, str(flag))
    want = all_pairs(emb["train"], emb["synth"], k=2, progress=False)
    got = dd.all_pairs_distributed(emb["train"], emb["synth"], k=2, workers=1, shard_size=50, progress=False)
    assert not flag.exists()
    assert_same(got, want)


# ------------------------------------------------------------------------------------------------ resume
def test_checkpoint_resume_skips_finished_shards(client, emb, tmp_path, caplog):
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=30, progress=False, checkpoint_dir=tmp_path)
    want = all_pairs(tr, sy, k=4, progress=False)
    first = dd.all_pairs_distributed(tr, sy, **kw)
    assert_same(first, want)
    files = sorted(tmp_path.glob("allpairs-*-s*.npz"))
    n = -(-len(sy) // 30)
    assert len(files) == n and len(list(tmp_path.glob("allpairs-*.json"))) == 1

    # Remove two shards, corrupt a third, and poison a fourth with a valid but different result: a resumed
    # run must recompute exactly the three, and load (not recompute) the poisoned one.
    files[0].unlink()
    files[-1].unlink()
    files[2].write_bytes(b"not an npz")
    poisoned = AllPairsResult.load(files[1])
    poisoned.class_counts = dict(poisoned.class_counts, duplicate=poisoned.class_counts["duplicate"] + 1000)
    _resave(poisoned, files[1])
    untouched = {f: f.stat().st_mtime_ns for f in files[3:-1]}
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        second = dd.all_pairs_distributed(tr, sy, **kw)
    assert any(f"{n - 3} from checkpoint, 3 to run" in r.getMessage() for r in caplog.records)
    assert any("not usable" in r.getMessage() for r in caplog.records)
    assert second.class_counts["duplicate"] == want.class_counts["duplicate"] + 1000  # loaded, not rerun
    assert {f: f.stat().st_mtime_ns for f in untouched} == untouched
    assert files[0].exists() and files[-1].exists()

    # Repair the poisoned shard: the full result is identical again, with nothing left to run.
    AllPairsResult.load(files[0])  # recomputed file is readable
    first_parts = dd.plan_shards(len(sy), len(tr), k=4, shard_size=30, train_shard_size=None, self_mode=False)
    assert len(first_parts) == n
    files[1].unlink()
    third = dd.all_pairs_distributed(tr, sy, **kw)
    assert_same(third, want)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        fourth = dd.all_pairs_distributed(tr, sy, **kw)
    assert any(f"{n} from checkpoint, 0 to run" in r.getMessage() for r in caplog.records)
    assert_same(fourth, want)


def _resave(res: AllPairsResult, f: Path) -> None:
    """Write ``res`` over the checkpoint file ``f``, keeping the shard tag the file holds."""
    with np.load(f) as z:
        tag = z["shard_tag"]
    res._save(f, shard_tag=tag)


def test_a_checkpoint_file_of_another_shard_is_not_used(client, emb, tmp_path, caplog):
    """A shard file copied or renamed over another shard's of the same size was loaded as that shard: the
    resumed result was wrong (23 scores and 27 indices off in a probe) without a word. Each file records its
    job and shard now; a file holding another one is named and recomputed."""
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=30, progress=False, checkpoint_dir=tmp_path)
    want = all_pairs(tr, sy, k=4, progress=False)
    dd.all_pairs_distributed(tr, sy, **kw)
    files = sorted(tmp_path.glob("allpairs-*-s*.npz"))  # (shard names are zero-padded: in row order)
    assert AllPairsResult.load(files[1]).n_synth == AllPairsResult.load(files[2]).n_synth
    shutil.copy(files[1], files[2])
    old = AllPairsResult.load(files[3])
    old.save(files[3])  # (a file without a tag, as the previous format wrote them)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        got = dd.all_pairs_distributed(tr, sy, **kw)
    assert_same(got, want)
    msgs = [r.getMessage() for r in caplog.records]
    name1, name2 = (f.stem.split("-", 2)[2] for f in files[1:3])  # (allpairs-<job>-<shard>)
    assert any(str(files[2]) in m and f"it holds shard {name1}, not shard {name2}" in m for m in msgs), msgs
    assert any(str(files[3]) in m and "no shard tag" in m for m in msgs), msgs
    assert any("2 to run" in m for m in msgs), msgs


def test_checkpoints_of_an_earlier_format_are_said_to_be_computed_again(client, emb, tmp_path, caplog):
    """The checkpoint format is part of a job's key: after an upgrade, an interrupted job resumed computed
    every shard again without a word, its old files left on disk. A warning says so now."""
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=60, progress=False, checkpoint_dir=tmp_path)
    dd.all_pairs_distributed(tr, sy, **kw)
    manifest = next(tmp_path.glob("allpairs-*.json"))
    m = json.loads(manifest.read_text())
    (tmp_path / "allpairs-0ld.json").write_text(json.dumps(dict(m, version=dd._CHECKPOINT_VERSION - 1)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
        dd.all_pairs_distributed(tr, sy, **kw)
    msgs = [r.getMessage() for r in caplog.records if "earlier checkpoint format" in r.getMessage()]
    assert len(msgs) == 1 and "1 all-pairs job(s)" in msgs[0] and "allpairs-0ld.json" in msgs[0], msgs


def test_resume_from_shards_of_another_engine_is_named_and_warned(client, emb, tmp_path, caplog):
    # backend=None picks each worker's engine: a run resumed on other workers (GPU after CPU) mixes engines,
    # whose scores differ in the last bits. The result was labelled with one of them, without a word.
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=30, progress=False, checkpoint_dir=tmp_path)
    first = dd.all_pairs_distributed(tr, sy, **kw)
    assert first.backend == "native"
    files = sorted(tmp_path.glob("allpairs-*-s*.npz"))
    other = AllPairsResult.load(files[1])
    other.backend = "triton"  # as a GPU worker would have labelled it
    _resave(other, files[1])
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
        second = dd.all_pairs_distributed(tr, sy, **kw)
    assert second.backend == "native+triton"
    assert any("different engines (native, triton)" in r.getMessage() and "backend=" in r.getMessage()
               for r in caplog.records)
    assert_same(second, first)  # (the relabelled shard holds the native scores)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
        dd.all_pairs_distributed(tr, sy, k=4, scheduler=client, shard_size=30, progress=False)
    assert not any("different engines" in r.getMessage() for r in caplog.records)


def test_resume_removes_the_half_written_files_of_this_job_only(client, emb, tmp_path):
    """A run removes the temporary files a killed run of its job left (old enough to be a killed run's), and
    neither another job's nor a young one: that may be the write in progress of another run of this job."""
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=60, progress=False, checkpoint_dir=tmp_path)
    dd.all_pairs_distributed(tr, sy, **kw)
    shard = sorted(tmp_path.glob("allpairs-*-s*.npz"))[0]
    manifest = next(tmp_path.glob("allpairs-*.json"))
    # what a run killed while saving leaves (atomic_path's temporary names), and a file of someone else's
    stale = [tmp_path / f".{shard.name}.k1ll3d.tmp", tmp_path / f".{manifest.name}.x9.tmp"]
    other = tmp_path / ".allpairs-otherjob-s0.npz.a1.tmp"
    young = tmp_path / f".{shard.name}.wr1t1ng.tmp"  # (another run's save, under way)
    for f in stale + [other, young]:
        f.write_bytes(b"partial")
    old = time.time() - dd._TEMPORARY_AGE_S - 60
    for f in stale + [other]:
        os.utime(f, (old, old))
    got = dd.all_pairs_distributed(tr, sy, **kw)
    assert_same(got, all_pairs(tr, sy, k=4, progress=False))
    assert not any(f.exists() for f in stale)
    assert other.exists() and young.exists()


def test_two_runs_of_one_job_sharing_the_checkpoint_folder_both_finish(client, emb, tmp_path, monkeypatch):
    """A run's start removed every temporary file of its job in checkpoint_dir, among them the one a second
    run of the same job was writing at that moment: that run failed in os.replace ("No such file or
    directory"), its manifest's or a shard's save lost. Here run A is held inside its manifest's write while
    run B starts, runs and ends; then A goes on. Both give the whole result."""
    import threading

    from deepssim_fast import _atomic

    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=60, progress=False, checkpoint_dir=tmp_path)
    a_writing, b_done = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def held_write(path, data, **kwargs):  # run A's first manifest write waits, its temporary file there
        def write(f):
            f.write(data)
            if threading.current_thread().name == "run-a" and not a_writing.is_set():
                a_writing.set()
                assert b_done.wait(120)
        return _atomic.atomic_write(path, write, **kwargs)

    monkeypatch.setattr(dd, "atomic_write_bytes", held_write)

    def run(name: str) -> None:
        try:
            results[name] = dd.all_pairs_distributed(tr, sy, **kw)
        except BaseException as exc:  # noqa: BLE001 - checked below
            results[name] = exc
        finally:
            if name == "run-b":
                b_done.set()

    a = threading.Thread(target=run, args=("run-a",), name="run-a")
    a.start()
    try:
        assert a_writing.wait(120), results
        assert list(tmp_path.glob(".allpairs-*.json.*.tmp")), "run A's manifest is not being written"
        b = threading.Thread(target=run, args=("run-b",), name="run-b")
        b.start()
        b.join(120)
    finally:
        b_done.set()
        a.join(120)
    want = all_pairs(tr, sy, k=4, progress=False)
    for name in ("run-a", "run-b"):
        assert isinstance(results.get(name), AllPairsResult), (name, results.get(name))
        assert_same(results[name], want)
    assert not list(tmp_path.glob(".*.tmp"))


def test_foreign_json_files_in_the_checkpoint_folder_are_skipped(client, emb, tmp_path):
    """An allpairs-*.json of someone else's that is valid JSON but no object ([], null, 3, "x") failed in a bare
    AttributeError ('list' object has no attribute 'get'), after the cluster had started; one with our keys but
    odd values (a train_shard_size of "x", a job that is no key) is no manifest of this module's either."""
    tr, sy = emb["train"], emb["synth"]
    inputs = dd._inputs_key(tr, sy, {"k": 4, "thresholds": (0.6, 0.85), "bins": 200, "backend": None,
                                     "device": None, "precision": "ieee"})
    foreign = ["[]", "null", "3", '"x"', json.dumps({"inputs": inputs, "shard_size": 60, "train_shard_size": "x",
                                                      "job": "j"}),
               json.dumps({"inputs": inputs, "shard_size": 60, "train_shard_size": 40, "job": "../../x"})]
    for i, text in enumerate(foreign):
        (tmp_path / f"allpairs-notes{i}.json").write_text(text)
    got = dd.all_pairs_distributed(tr, sy, k=4, scheduler=client, shard_size=60, progress=False,
                                   checkpoint_dir=tmp_path)
    assert_same(got, all_pairs(tr, sy, k=4, progress=False))
    assert len(list(tmp_path.glob("allpairs-*.json"))) == len(foreign) + 1


def test_complete_checkpoints_in_a_folder_that_cannot_be_written_are_reused(client, emb, tmp_path, monkeypatch,
                                                                           caplog):
    """The manifest was rewritten at every start, before a shard was read: a complete set of checkpoints in a
    read-only folder (an archive, another user's) failed in PermissionError. It is written only when it is not
    there as it would be; when that write fails with every shard saved, a warning says so and the run goes on;
    with shards left to run, it is an error before any of them runs. (The writes are refused by a stand-in:
    root may write a chmod'ed folder.)"""
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=60, progress=False, checkpoint_dir=tmp_path)
    want = all_pairs(tr, sy, k=4, progress=False)
    dd.all_pairs_distributed(tr, sy, **kw)
    writes: list[Path] = []

    def refused(path, data, **kwargs):
        writes.append(Path(path))
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dd, "atomic_write_bytes", refused)
    assert_same(dd.all_pairs_distributed(tr, sy, **kw), want)
    assert writes == []  # (the manifest is there, as this run would write it)
    manifest = next(tmp_path.glob("allpairs-*.json"))
    manifest.unlink()  # (e.g. shards copied without it)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
        assert_same(dd.all_pairs_distributed(tr, sy, **kw), want)
    assert writes == [manifest]
    assert any("could not write the checkpoint manifest" in r.getMessage() and "every shard of the job is saved"
               in r.getMessage() for r in caplog.records), caplog.text
    shards = sorted(tmp_path.glob("allpairs-*-s*.npz"))
    shards[0].unlink()
    with pytest.raises(PermissionError, match="Permission denied"):
        dd.all_pairs_distributed(tr, sy, **kw)
    assert sorted(tmp_path.glob("allpairs-*-s*.npz")) == shards[1:]  # (refused before the shard ran)


def test_checkpoint_of_another_job_is_not_reused(client, emb, tmp_path):
    tr, sy = emb["train"], emb["synth"]
    dd.all_pairs_distributed(tr, sy, k=4, scheduler=client, shard_size=60, progress=False,
                             checkpoint_dir=tmp_path)
    sy2 = sy.copy()
    sy2[0, 0] += 1.0  # different inputs: a different job key, nothing reused
    want = all_pairs(tr, sy2, k=4, progress=False)
    got = dd.all_pairs_distributed(tr, sy2, k=4, scheduler=client, shard_size=60, progress=False,
                                   checkpoint_dir=tmp_path)
    assert_same(got, want)
    assert len(list(tmp_path.glob("allpairs-*.json"))) == 2


def test_resume_on_a_cluster_of_other_memory_keeps_the_saved_plan(client, emb, tmp_path, monkeypatch, caplog):
    """Training blocks follow the workers' memory limits; a rerun on another cluster (say other workers) must
    still find the first run's shards: it keeps the saved plan when its blocks fit, else plans anew."""
    tr, sy = emb["train"], emb["synth"]
    kw = dict(k=4, scheduler=client, shard_size=60, progress=False, checkpoint_dir=tmp_path)
    want = all_pairs(tr, sy, k=4, progress=False)
    monkeypatch.setattr(dd, "_auto_train_shard_size", lambda client, train, min_rows: 40)
    assert_same(dd.all_pairs_distributed(tr, sy, **kw), want)
    saved = len(list(tmp_path.glob("allpairs-*-s*.npz")))
    assert saved > 2
    for auto in (None, 50):  # more memory (one block would fit, or larger blocks): the saved plan is kept
        monkeypatch.setattr(dd, "_auto_train_shard_size", lambda client, train, min_rows, a=auto: a)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
            assert_same(dd.all_pairs_distributed(tr, sy, **kw), want)
        assert any(f"{saved} from checkpoint, 0 to run" in r.getMessage() for r in caplog.records), caplog.text
    # less memory than the saved blocks need: a new plan (and new shards), still the same result
    monkeypatch.setattr(dd, "_auto_train_shard_size", lambda client, train, min_rows: 20)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deepssim_fast.distributed"):
        assert_same(dd.all_pairs_distributed(tr, sy, **kw), want)
    assert any("0 from checkpoint" in r.getMessage() for r in caplog.records), caplog.text


# ------------------------------------------------------------------------------------------ GPU code paths
def test_several_gpus_start_one_cuda_worker_each(monkeypatch, caplog):
    """With >1 GPU and dask_cuda importable, workers=N starts LocalCUDACluster on the first N GPUs.

    No GPU here: dask_cuda is a recording stand-in; this checks the arguments of the (small) code path.
    """
    import importlib.machinery
    import types

    calls: list[dict] = []

    class RecordingCUDACluster:
        def __init__(self, **kw):
            calls.append(kw)

    mod = types.ModuleType("dask_cuda")
    mod.LocalCUDACluster = RecordingCUDACluster
    mod.__spec__ = importlib.machinery.ModuleSpec("dask_cuda", None)
    monkeypatch.setitem(sys.modules, "dask_cuda", mod)
    monkeypatch.setattr(dd, "_cuda_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert isinstance(dd.start_local_cluster(2), RecordingCUDACluster)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
        dd.start_local_cluster(6)
    assert calls[0]["CUDA_VISIBLE_DEVICES"] == "0,1" and calls[0]["n_workers"] == 2
    assert calls[1]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and calls[1]["n_workers"] == 4
    assert "only 4 GPUs" in caplog.text
    # the caller's own choice of GPUs is kept (LocalCUDACluster uses an explicit list as given)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 5,6,7")
    dd.start_local_cluster(3)
    assert calls[2]["CUDA_VISIBLE_DEVICES"] == "4,5,6" and calls[2]["n_workers"] == 3
    for kw in calls:
        assert kw["threads_per_worker"] == 1 and kw["host"] == "127.0.0.1"
        assert kw["dashboard_address"] == "127.0.0.1:0" and kw["silence_logs"] == logging.ERROR
    with caplog.at_level(logging.INFO, logger="deepssim_fast"):  # (-v: Dask's warnings too)
        dd.start_local_cluster(1)
    assert calls[3]["silence_logs"] == logging.WARNING


def test_shard_task_picks_the_worker_gpu(monkeypatch):
    """A worker that sees a GPU runs the engine there unless backend='native'; self-mode rows are sliced."""
    import importlib

    import torch

    # the module itself: the package attribute deepssim_fast.all_pairs may be the function of that name
    ap = importlib.import_module("deepssim_fast.all_pairs")
    seen: list[dict] = []

    def recording_all_pairs(train, synth, **kw):
        seen.append(dict(kw, synth=np.array(synth), n_train=len(train)))
        return "result"

    monkeypatch.setattr(ap, "all_pairs", recording_all_pairs)
    threads_before = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
    shard = dd.Shard(sindex=1, tblock=0, s0=3, s1=6, t0=0, t1=10, self_offset=3)
    opts = {"k": 2, "thresholds": (0.6, 0.85), "bins": 10, "backend": None, "device": None, "threads": 1,
            "precision": "ieee"}
    assert dd._run_shard(train, None, shard, opts) == "result"
    dd._run_shard(train, None, shard, dict(opts, backend="native"))
    assert seen[0]["device"] == "cuda" and seen[1]["device"] is None
    assert np.array_equal(seen[0]["synth"], train[3:6]) and seen[0]["self_offset"] == 3
    assert seen[0]["progress"] is False and seen[0]["n_train"] == 10
    assert torch.get_num_threads() == threads_before  # the calling process is left as it was




# ------------------------------------------------------------------------------------- errors and imports
def test_bad_inputs_name_the_problem(client, emb, monkeypatch):
    tr, sy = emb["train"], emb["synth"]
    bad = sy.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="synth row 3 contains NaN"):
        dd.all_pairs_distributed(tr, bad, scheduler=client, progress=False)
    zero = tr.copy()
    zero[11] = 0
    with pytest.raises(ValueError, match="train row 11 is all zeros"):
        dd.all_pairs_distributed(zero, sy, scheduler=client, progress=False)
    with pytest.raises(ValueError, match="different embedding sizes"):
        dd.all_pairs_distributed(tr, sy[:, :10], scheduler=client, progress=False)
    with pytest.raises(ValueError, match="expected a 2-D array"):
        dd.all_pairs_distributed(tr[0], sy, scheduler=client, progress=False)
    with pytest.raises(ValueError, match="k=300 exceeds"):
        dd.all_pairs_distributed(tr[:300], None, k=300, scheduler=client, progress=False)
    with pytest.raises(ValueError, match="low <= high"):
        dd.all_pairs_distributed(tr, sy, thresholds=(0.9, 0.1), scheduler=client, progress=False)
    with pytest.raises(ValueError, match="bins must be"):
        dd.all_pairs_distributed(tr, sy, bins=0, scheduler=client, progress=False)
    with pytest.raises(ValueError, match="not both"):
        dd.all_pairs_distributed(tr, sy, workers=2, scheduler=client, progress=False)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        dd.all_pairs_distributed(tr, sy, workers=0, progress=False)
    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(dd.DistributedError, match="cannot connect to the Dask scheduler at tcp://127.0.0.1:9"):
        dd.all_pairs_distributed(tr, sy, scheduler="tcp://127.0.0.1:9", progress=False)


def test_an_address_that_is_not_a_dask_scheduler_fails_fast_with_a_clear_error(emb, monkeypatch):
    """A port that accepts connections but does not speak Dask (the dashboard's 8787 given for the scheduler's
    8786, an SSH server) hung forever in Client's handshake, or raised a MemoryError of exbibytes."""
    import contextlib
    import socket
    import threading
    import time

    tr, sy = emb["train"], emb["synth"]
    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "1s")
    silent = socket.socket()  # listens (the kernel accepts connections) but never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    banner = socket.socket()  # greets every connection as an SSH server does
    banner.bind(("127.0.0.1", 0))
    banner.listen(8)

    def greet() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = banner.accept()
                c.sendall(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n")

    threading.Thread(target=greet, daemon=True).start()
    try:
        for sock in (silent, banner):
            addr = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            result: list = []

            def run(addr: str = addr, result: list = result) -> None:
                try:
                    dd.all_pairs_distributed(tr, sy, scheduler=addr, progress=False)
                except BaseException as exc:  # noqa: BLE001 - checked below
                    result.append(exc)

            t0 = time.perf_counter()
            th = threading.Thread(target=run, daemon=True)
            th.start()
            th.join(30)
            assert not th.is_alive(), f"{addr}: still waiting after 30 s"
            assert time.perf_counter() - t0 < 20
            assert len(result) == 1 and isinstance(result[0], dd.DistributedError), result
            msg = str(result[0])
            assert f"cannot connect to the Dask scheduler at {addr}" in msg and "is it a Dask scheduler?" in msg
    finally:
        silent.close()
        banner.close()
    with pytest.raises(ValueError, match="missing port"):  # a malformed address is still a ValueError
        dd.all_pairs_distributed(tr, sy, scheduler="localhost", progress=False)


def test_empty_synth_set_gives_the_empty_result(client, emb):
    tr = emb["train"]
    empty = np.zeros((0, tr.shape[1]), tr.dtype)
    res = dd.all_pairs_distributed(tr, empty, k=3, scheduler=client, progress=False)
    one = all_pairs(tr, empty, k=3, progress=False)
    assert res.scores.shape == (0, 3) and res.indices.shape == (0, 3) and res.n_synth == 0
    assert res.class_counts == one.class_counts and np.array_equal(res.histogram[0], one.histogram[0])
    assert np.array_equal(res.train_hits, one.train_hits)
    # labelled with the backend asked for (it said 'native' for backend='torch')
    labelled = dd.all_pairs_distributed(tr, empty, k=3, scheduler=client, progress=False, backend="torch")
    assert labelled.backend == "torch"
    with pytest.raises(ValueError, match="different embedding sizes"):
        dd.all_pairs_distributed(tr, np.zeros((0, 3), tr.dtype), scheduler=client, progress=False)


def test_engine_errors_on_a_worker_name_global_rows_and_are_not_retried(client, emb, monkeypatch):
    """An error the engine raises inside a shard names the rows by their numbers in the whole sets (not in
    the shard), and is raised at once: submit() asks for no retries of such errors."""
    tr, sy = emb["train"], emb["synth"]
    shard = dd.Shard(sindex=2, tblock=1, s0=20, s1=30, t0=100, t1=160, self_offset=None)
    bad = sy[20:30].copy()
    bad[5] = 0  # (the driver checks zero rows first; this calls the worker task directly)
    opts = {"k": 3, "thresholds": (0.6, 0.85), "bins": 200, "backend": "native", "threads": 1, "precision": "ieee"}
    with pytest.raises(ValueError, match=r"synth row 25 is all zeros.*shard s0000000020"):
        dd._run_shard(tr[100:160], bad, shard, opts)
    zero = tr[100:160].copy()
    zero[7] = 0
    with pytest.raises(ValueError, match=r"train row 107 is all zeros"):
        dd._run_shard(zero, sy[20:30], shard, opts)
    submitted: list[dict] = []
    real_submit = client.submit

    def recording_submit(*args, **kw):
        submitted.append(kw)
        return real_submit(*args, **kw)

    monkeypatch.setattr(client, "submit", recording_submit)
    dd.all_pairs_distributed(tr, sy, k=3, scheduler=client, progress=False, shard_size=64)
    assert submitted and all(not kw.get("retries") for kw in submitted)


def test_missing_dask_says_what_to_install(monkeypatch):
    from deepssim_fast.backends import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'deepssim_fast\[dask\]'"):
        dd.all_pairs_distributed(np.ones((5, 3), np.float32), None, k=1, workers=1, progress=False)


def test_no_dask_import_without_workers_or_scheduler():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import deepssim_fast
        import deepssim_fast.distributed  # the module itself imports Dask lazily
        rng = np.random.default_rng(0)
        r = deepssim_fast.all_pairs(rng.standard_normal((50, 8)), rng.standard_normal((9, 8)), k=3,
                                    progress=False)
        assert r.scores.shape == (9, 3)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed"))
        print("DASK:", bad)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert "DASK: []" in out.stdout, out.stdout


def test_inputs_numpy_cannot_hold_are_errors_that_name_the_set():
    import torch

    x = torch.ones((4, 3))
    with pytest.raises(TypeError, match=r"synth: torch.sparse_coo tensors are not supported"):
        dd._as_matrix(x.to_sparse(), "synth")
    with pytest.raises(TypeError, match=r"train: dtype torch.float8_e4m3fn is not supported"):
        dd._as_matrix(x.to(torch.float8_e4m3fn), "train")


def test_precision_is_checked_before_a_cluster_starts():
    with pytest.raises(ValueError, match=r"precision must be one of \('ieee'.*got 'tf23'"):
        dd.all_pairs_distributed(np.ones((5, 3), np.float32), None, k=1, workers=1, precision="tf23",
                                 progress=False)


def test_a_failed_run_on_a_users_cluster_leaves_nothing_there(emb, monkeypatch):
    """After a run on the user's own Client failed (or was interrupted), its scattered training set and its
    shards in flight stayed on the cluster (tasks running, bytes held) for as long as the exception was kept:
    its traceback holds the run's frames and their futures, and a REPL or Jupyter keeps sys.last_traceback.
    Here one shard's engine fails while another is still running: the scheduler forgets every task of the
    run while the exception is still held. (A cluster in this process, so that the engine can be replaced.)"""
    import importlib
    import threading

    from distributed import Client, LocalCluster

    ap = importlib.import_module("deepssim_fast.all_pairs")
    release = threading.Event()
    calls: list[int] = []
    lock = threading.Lock()

    def engine(train, synth, **kw):
        with lock:
            calls.append(len(calls))
            first = len(calls) == 1
        if first:
            raise ValueError("engine failure")
        assert release.wait(60)  # (still running when the run fails)
        raise ValueError("released")

    monkeypatch.setattr(ap, "all_pairs", engine)

    def held(dask_scheduler):
        tasks = dask_scheduler.tasks.values()
        return len(tasks), sum(t.nbytes for t in tasks if t.state == "memory")

    tr, sy = emb["train"], emb["synth"]
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        try:
            with pytest.raises(ValueError, match="engine failure") as info:
                dd.all_pairs_distributed(tr, sy, k=3, scheduler=c, shard_size=20, progress=False)
            kept = info.value  # (with its traceback, as a REPL keeps it)
            assert kept.__traceback__ is not None
            deadline = time.monotonic() + 30
            while (state := c.run_on_scheduler(held)) != (0, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert state == (0, 0), f"the cluster still holds {state[0]} tasks and {state[1]} bytes of the run"
            assert len(calls) >= 2  # (a second shard was running when the first failed)
        finally:
            release.set()


def test_a_lost_scheduler_is_a_distributed_error_not_an_attribute_error(caplog):
    """With the scheduler gone mid-run, the shards came back "cancelled for reason: scheduler-connection-lost",
    were resubmitted, and the next scatter failed in "'NoneType' object has no attribute 'scatter'" (39 s in:
    killed scheduler, probe of 2026-11-30). Both places now name the lost connection."""
    class Gone:  # what a Client that stopped reconnecting looks like
        status, scheduler = "closed", None

    with pytest.raises(dd.DistributedError, match=r"lost the connection to the Dask scheduler while scattering "
                                                  r"block b0 \(client closed\)"):
        dd._Scattered(Gone(), broadcast=False).get("b0", np.zeros(3))

    class Running:
        status, scheduler = "running", type("rpc", (), {"address": "tcp://10.0.0.1:8786"})()

    cancelled = Exception("shard x was cancelled for reason: scheduler-connection-lost.")
    with pytest.raises(dd.DistributedError, match=r"lost the connection to tcp://10.0.0.1:8786 while running shard"):
        dd._check_connected(Running(), "running shard s1", cancelled)
    dd._check_connected(Running(), "running shard s1", Exception("cancelled: lost dependencies"))  # (resubmitted)


def test_a_scheduler_without_workers_is_said_at_the_default_verbosity(emb, monkeypatch, caplog):
    """A scheduler with no worker was a silent wait of up to 10 minutes (logged at INFO only)."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(dd, "WORKER_WAIT_S", 1)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, Client(cluster) as c:
        with caplog.at_level(logging.WARNING, logger="deepssim_fast.distributed"):
            with pytest.raises(dd.DistributedError, match="no Dask worker joined .* within 1 s"):
                dd.all_pairs_distributed(emb["train"], emb["synth"], k=2, scheduler=c, progress=False)
    assert "no Dask worker in" in caplog.text and "waiting up to 1 s" in caplog.text


def test_a_malformed_scheduler_address_is_refused_before_the_audit_reads_anything(tmp_path):
    """--scheduler tcp://127.0.0.1 (no port) failed only when the search connected, after the decoding and the
    embedding of every file (OUT/work written), in Dask's words only."""
    import importlib

    audit = importlib.import_module("deepssim_fast.audit").audit
    with pytest.raises(ValueError, match=r"scheduler \(--scheduler\) 'tcp://127.0.0.1' is not a Dask scheduler "
                                         r"address \(missing port number"):
        audit(tmp_path / "not_read", tmp_path / "not_read_either", metric="correlation", verify="none",
              scheduler="tcp://127.0.0.1", out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_the_audit_checks_its_scheduler_before_any_work_and_takes_a_cluster_object(client, tmp_path, monkeypatch):
    """The audit checked scheduler= by its form only: the port as an int, an address where no scheduler
    listens, a closed Client were found at the search, after the decoding and the embedding (OUT/work
    written), and a LocalCluster object was refused there. Each is an error before anything is read now; a
    cluster object is used through a Client of its own (as distributed.Client accepts one) and left running."""
    import importlib

    from distributed import Client, LocalCluster

    audit = importlib.import_module("deepssim_fast.audit").audit
    rng = np.random.default_rng(2)
    train = rng.standard_normal((12, 16)).astype(np.float32)
    synth = np.concatenate([train[3:5], rng.standard_normal((5, 16)).astype(np.float32)])
    for name, rows in (("train", train), ("synth", synth)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / f"{name}.npy", rows)
    kw = dict(metric="embeddings", verify="none", k=3, progress=False)
    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "1s")
    closed_client = Client(client.cluster)
    closed_client.close()
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as closed_cluster:
        pass
    cases = [(8786, ValueError, "scheduler must be a Dask scheduler address like 'tcp://host:8786', a distributed "
                                "Client or a Dask cluster object (LocalCluster, ...), got int 8786"),
             ("tcp://127.0.0.1:9", dd.DistributedError, "cannot connect to the Dask scheduler at tcp://127.0.0.1:9"),
             (closed_client, dd.DistributedError, "the Client given as scheduler is closed; pass an open one"),
             (closed_cluster, dd.DistributedError, "the cluster given as scheduler (LocalCluster) is closed")]
    for i, (scheduler, error, message) in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(error, match=re.escape(message)):
            audit(tmp_path / "train", tmp_path / "synth", out=out, scheduler=scheduler, **kw)
        assert not out.exists(), scheduler
    local = audit(tmp_path / "train", tmp_path / "synth", out=tmp_path / "local", **kw)
    on_cluster = audit(tmp_path / "train", tmp_path / "synth", out=tmp_path / "dask", scheduler=client.cluster, **kw)
    assert on_cluster.counts == local.counts and on_cluster.counts["duplicate"] == 2
    assert on_cluster.summary["pair_counts_search"] == local.summary["pair_counts_search"]
    assert client.cluster.status.name == "running" and client.status == "running"
    got = dd.all_pairs_distributed(train, synth, k=3, scheduler=client.cluster, progress=False)
    assert_same(got, all_pairs(train, synth, k=3, progress=False))


def test_an_address_whose_protocol_cannot_be_used_here_says_so():
    """--scheduler ucx://... (its package not installed) and inproc://x were said to be "something listens
    there but did not complete Dask's handshake; is it a Dask scheduler?". The protocol is named now, before
    any connection; the inproc:// address of a scheduler in this process is one (it works)."""
    from distributed import LocalCluster
    from distributed.comm.registry import get_backend

    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    cases = [("inproc://x", "inproc:// reaches a scheduler inside this same process only")]
    try:
        get_backend("ucx").get_connector()
    except Exception:  # noqa: BLE001 - Dask's own ucx backend is a stub without distributed-ucxx
        cases.append(("ucx://127.0.0.1:8786", "the ucx:// protocol is not usable here"))
    for address, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"scheduler (--scheduler) {address!r} cannot be reached from "
                                                       f"here: {message}")) as err:
            dd.all_pairs_distributed(tr, tr[:5], k=2, scheduler=address, progress=False)
        assert "handshake" not in str(err.value)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        got = dd.all_pairs_distributed(tr, tr[:5], k=2, scheduler=cluster.scheduler_address, progress=False)
    assert_same(got, all_pairs(tr, tr[:5], k=2, progress=False))


def test_a_precision_the_workers_engines_ignore_is_said_once_by_the_caller(client, emb):
    """precision='fp16' on CPU workers: all_pairs' "applies to the Triton backend only" warning was printed once
    per worker process. The caller says it once now, naming the engines that ran; the shard tasks keep quiet
    about it (a filter in place while they run: a direct call afterwards still warns)."""
    import warnings

    tr, sy = emb["train"][:60], emb["synth"][:30]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = dd.all_pairs_distributed(tr, sy, k=3, scheduler=client, shard_size=10, progress=False,
                                       precision="fp16")
    said = [str(w.message) for w in seen if "applies to the Triton backend only" in str(w.message)]
    assert said == ["all_pairs_distributed: precision='fp16' applies to the Triton backend only; the shards ran "
                    "on the native backend, which computes exact fp32 scores"], said
    assert_same(got, all_pairs(tr, sy, k=3, progress=False))

    def shard_task():
        import warnings

        import numpy as np

        from deepssim_fast import distributed as d

        x = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
        opts = {"k": 2, "thresholds": (0.6, 0.85), "bins": 10, "backend": None, "device": None, "threads": 1,
                "precision": "fp16"}
        with warnings.catch_warnings(record=True) as w:  # (the process's own filters, its shown-once reset)
            d._run_shard(x, x[:3], d.Shard(0, 0, 0, 3, 0, 10, None), opts)
        return [str(m.message) for m in w]

    assert client.submit(shard_task, pure=False).result(timeout=60) == []  # on a worker
    assert shard_task() == []  # and in this process
    with warnings.catch_warnings(record=True) as seen:
        all_pairs(tr, sy, k=3, progress=False, precision="fp16")
    assert any("applies to the Triton backend only" in str(w.message) for w in seen)


def test_a_shard_in_the_callers_process_leaves_the_thread_setting_as_set(monkeypatch) -> None:
    """A probe: the first task saved the native thread count it resolved (2) and restored it as a fixed
    setting, so DEEPSSIM_FAST_NUM_THREADS no longer applied in the caller's process; and in a worker the
    variable was overridden by the cores' share. The setting as set is restored; the variable caps a task."""
    import torch

    from deepssim_fast import _native

    before = torch.get_num_threads(), _native.num_threads_override()
    _native.set_num_threads(0)
    monkeypatch.delenv("DEEPSSIM_FAST_NUM_THREADS", raising=False)
    try:
        train = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
        shard = dd.Shard(sindex=0, tblock=0, s0=0, s1=3, t0=0, t1=10, self_offset=None)
        opts = {"k": 2, "thresholds": (0.6, 0.85), "bins": 10, "backend": "native", "device": None,
                "threads": 1, "precision": "ieee"}
        dd._run_shard(train, train[:3], shard, opts)
        assert _native.num_threads_override() == 0
        monkeypatch.setenv("DEEPSSIM_FAST_NUM_THREADS", "1")
        assert _native.num_threads() == 1  # (the variable applies again)
        assert dd._task_threads({}) == 1
    finally:
        torch.set_num_threads(before[0])
        _native.set_num_threads(before[1])


def test_an_embedded_clusters_dask_warnings_are_quiet_at_the_default_verbosity():
    """An interrupted --workers audit printed the workers' "distributed.worker.state_machine - WARNING - Async
    instruction for <Task cancelled ...> ended with CancelledError" (Dask's format, from the workers) and the
    nanny's "WARNING distributed.nanny: Worker process still alive after 4.0 seconds, killing" (this process)
    before the command's one line: the embedded cluster logged at WARNING whatever the verbosity. Its Dask
    warnings now show where this package's INFO lines do (-v), here as in the workers."""
    code = textwrap.dedent("""
        import logging
        import numpy as np
        import deepssim_fast.distributed as dd

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # as the CLI
        import distributed  # noqa: F401 - its import sets its loggers; the CLI's level comes after
        logging.getLogger("distributed").setLevel(logging.WARNING)
        real_run, real_size = dd._run_shard, dd._auto_train_shard_size

        def on_a_worker(*args, **kw):
            logging.getLogger("distributed.worker").warning("the worker's warning")
            return real_run(*args, **kw)

        def in_this_process(*args, **kw):
            logging.getLogger("distributed.nanny").warning("the nanny's warning")
            return real_size(*args, **kw)

        dd._run_shard, dd._auto_train_shard_size = on_a_worker, in_this_process
        tr = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
        for level in (logging.WARNING, logging.INFO):  # (the CLI's default verbosity, then -v)
            logging.getLogger("deepssim_fast").setLevel(level)
            dd.all_pairs_distributed(tr, tr[:6], k=2, workers=1, progress=False)
            logging.getLogger("distributed").warning("RUN DONE")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    quiet, verbose, rest = out.stderr.split("WARNING distributed: RUN DONE\n")
    assert "warning" not in quiet, quiet
    assert "the worker's warning" in verbose and "the nanny's warning" in verbose, verbose
    assert not rest.strip(), rest


def test_a_backend_this_machine_cannot_run_is_refused_before_a_local_cluster_starts(monkeypatch):
    """backend="triton" with workers=2 on a machine without CUDA started the local cluster (~10 s), then failed
    on a worker with a long "distributed.worker - ERROR - Compute Failed" block; one process raises the
    BackendUnavailableError at once. The workers of workers=N run here, so it is raised as one process raises
    it, before any cluster (for $DEEPSSIM_FAST_BACKEND too); a user's cluster (scheduler=) may have what this
    machine lacks (a GPU worker's Triton), so there the workers still decide."""
    import importlib

    from deepssim_fast.backends import BackendUnavailableError

    backends = importlib.import_module("deepssim_fast.backends")  # (the package's own backends is a function)
    started: list = []

    def no_cluster(*a, **kw):
        started.append(a)
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    monkeypatch.setattr(backends, "_cuda_devices", list)  # (no GPU, whatever the machine)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DEEPSSIM_FAST_BACKEND", raising=False)
    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    for kw, env in ((dict(backend="triton"), None), ({}, "triton")):
        if env is not None:
            monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", env)
        with pytest.raises(BackendUnavailableError) as one:
            all_pairs(tr, tr[:5], k=2, progress=False, **kw)
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailableError) as two:
            all_pairs(tr, tr[:5], k=2, progress=False, workers=2, **kw)
        assert str(two.value) == str(one.value) and time.perf_counter() - t0 < 5
    assert not started
    with pytest.raises(AssertionError, match="a cluster was started"):  # (a user's cluster: its workers decide)
        all_pairs(tr, tr[:5], k=2, progress=False, backend="triton", scheduler="tcp://127.0.0.1:8786")


def test_a_scheduler_address_where_nothing_listens_is_refused_at_once(monkeypatch):
    """scheduler="tcp://127.0.0.1:1" waited the whole CONNECT_TIMEOUT (30 s: Dask retries a refused connection)
    and then said "Timed out trying to connect". A refused connection is said at once now; a connection that
    gets no answer still ends after CONNECT_TIMEOUT, once (not once per probe)."""
    import socket

    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "20s")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # (the port was free a moment ago: nothing listens there now)
    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    t0 = time.perf_counter()
    with pytest.raises(dd.DistributedError, match=re.escape(f"cannot connect to the Dask scheduler at {addr}: "
                                                            "connection refused (is the scheduler running, is the "
                                                            "port right?)")):
        all_pairs(tr, tr[:5], k=2, scheduler=addr, progress=False)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(dd.DistributedError, match="connection refused"):
        dd.check_scheduler(addr)

    def no_answer(address, timeout=None, **kw):
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)  # (a firewall that drops the packets)
    t0 = time.perf_counter()
    with pytest.raises(dd.DistributedError, match=re.escape(f"cannot connect to the Dask scheduler at {addr}: "
                                                            "Timed out trying to connect to")):
        dd.check_scheduler(addr)
    assert time.perf_counter() - t0 < 5  # (Dask's own probe did not wait as long again)


def test_a_scheduler_host_name_that_does_not_resolve_is_refused_at_once(monkeypatch):
    """Found by a review: scheduler="tcp://nonexistent.invalid:8786" waited the whole CONNECT_TIMEOUT (Dask's probe
    retries a name that does not resolve) and then said "Timed out trying to connect", though the plain connect
    had failed at once with "Name or service not known". It is said at once now, naming the host."""
    import socket

    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "20s")

    def no_name(address, timeout=None, **kw):  # (as getaddrinfo fails, without asking this machine's resolver)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_name)
    addr = "tcp://nonexistent.invalid:8786"
    tr = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    t0 = time.perf_counter()
    with pytest.raises(dd.DistributedError, match=re.escape(f"cannot connect to the Dask scheduler at {addr}: the "
                                                            "host name 'nonexistent.invalid' does not resolve (Name "
                                                            "or service not known)")):
        all_pairs(tr, tr[:5], k=2, scheduler=addr, progress=False)
    assert time.perf_counter() - t0 < 5


def _input_case(name: str):
    """(train, synth, k) of one bad input of test_bad_inputs_are_refused_as_one_process_refuses_them."""
    import torch

    rng = np.random.default_rng(3)
    tr = rng.standard_normal((40, 16)).astype(np.float32)
    sy = rng.standard_normal((50, 16)).astype(np.float32)
    if name == "nan synth row":
        sy[37, 3] = np.nan
    elif name == "inf train row, self mode":
        tr[29, 0] = np.inf
        sy = None
    elif name == "zero synth row":
        sy[41] = 0
    elif name == "zero train row":
        tr[11] = 0
    elif name == "k over the candidates":
        return tr[:3], sy, 4
    elif name == "k over the candidates, self mode":
        return tr[:3], None, 3
    elif name == "empty train":
        return tr[:0], sy, 1
    elif name == "meta tensor":
        return torch.empty(3, 16, device="meta"), sy, 1
    elif name == "1-D train":
        return tr[0], sy, 1
    elif name == "other widths":
        return tr, sy[:, :10], 1
    elif name == "empty synth of another width":
        return tr, np.zeros((0, 3), np.float32), 1
    elif name == "bool":
        return tr > 0, sy, 1
    elif name == "float128":
        return tr, sy.astype(getattr(np, "float128", np.complex64)), 1
    elif name == "sparse tensor":
        return torch.from_numpy(tr).to_sparse(), sy, 1
    elif name == "float8 tensor":
        return tr, torch.from_numpy(sy).to(torch.float8_e4m3fn), 1
    elif name == "thresholds as a string":
        return tr, sy, "01"
    return tr, sy, 2


@pytest.mark.parametrize("case", ["nan synth row", "inf train row, self mode", "zero synth row", "zero train row",
                                  "k over the candidates", "k over the candidates, self mode", "empty train",
                                  "meta tensor", "1-D train", "other widths", "empty synth of another width", "bool",
                                  "float128", "sparse tensor", "float8 tensor", "thresholds as a string"])
def test_bad_inputs_are_refused_as_one_process_refuses_them(case, monkeypatch):
    """The driver's checks said it in other words, some with another type: "synth: row 2345 contains NaN or Inf"
    for one process's "synth row 2345 contains NaN or Inf", "k=4 exceeds the 3 candidates per row (n_train=3)"
    for "all_pairs: k=4 exceeds the 3 candidates per query (n_train, train shape (3, 16))", "expected a non-empty
    2D array" for "train has no rows ... nothing to search", a TypeError for a meta tensor's ValueError. They are
    one process's checks now: the same type and words (rows by their numbers in the whole sets), before any
    cluster."""
    def no_cluster(*a, **kw):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    tr, sy, k = _input_case(case)
    kw = dict(thresholds=k, k=2) if isinstance(k, str) else dict(k=k)
    with pytest.raises(Exception) as one:
        all_pairs(tr, sy, progress=False, **kw)
    assert not isinstance(one.value, AssertionError)
    with pytest.raises(Exception) as two:
        all_pairs(tr, sy, progress=False, workers=2, **kw)
    assert (type(two.value), str(two.value)) == (type(one.value), str(one.value))
