"""The audit end to end on small real MRI: planted copies, schema, faults, resume, metrics, evaluate."""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _checkout import assert_ok, run_python

from deepssim_fast import data
from deepssim_fast.data import DataError, SlicePolicy
from deepssim_fast.io import iter_slices
from deepssim_fast.reference import ssim_reference, topk_reference

# the package exports the function ``audit`` under the module's name; take the module itself
A = importlib.import_module("deepssim_fast.audit")

SIZE = (66, 78)
K = 14  # every training slice is a candidate (the SSIM search of the flipped items needs no large k now)
DETERMINISTIC = ("matches.csv", "histogram.png", "gallery.png", "report.html")


def _small(a: np.ndarray) -> np.ndarray:
    """A real MNI slice at a third of its resolution (strided), fitted to SIZE."""
    return data.center_fit(np.ascontiguousarray(a[::3, ::3]), SIZE)


def make_dataset(root: Path, *, seed: int = 0) -> dict:
    """Train: 14 real axial MNI slices (.npy); synth: 5 planted copies, 3 novel scans, 1 corrupt file."""
    rng = np.random.default_rng(seed)
    vol = data.load_volume("mni152").array
    tdir, sdir = root / "train", root / "synth"
    tdir.mkdir(parents=True)
    sdir.mkdir(parents=True)
    train = {}
    for i in range(30, 142, 8):
        name = f"mni_{i:03d}.npy"
        train[name] = _small(vol[:, :, i])
        np.save(tdir / name, train[name])
    names = sorted(train)
    truth = {}
    plants = [
        ("flip", lambda a: np.ascontiguousarray(a[:, ::-1])),
        ("shift", lambda a: A._shift(a, (2, -1))),
        ("noise", lambda a: a + rng.normal(0, 0.5, a.shape).astype(np.float32)),
        ("contrast", lambda a: a * 1.3 + 7.0),
        ("identity", lambda a: a.copy()),
    ]
    for q, (kind, f) in enumerate(plants):
        src = names[(3 * q + 1) % len(names)]
        nm = f"s{q:02d}.npy"
        np.save(sdir / nm, f(train[src]).astype(np.float32))
        truth[nm] = (kind, src)
    for q, (ds, idx) in enumerate([("s0_10slices", 5), ("example4d", 12), ("piesno", 7)]):
        v = data.load_volume(ds, frame=0 if ds == "example4d" else None).array
        nm = f"s{q + 10:02d}.npy"
        np.save(sdir / nm, data.center_fit(v[:, :, idx], SIZE))
        truth[nm] = ("novel", None)
    (sdir / "s99_corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    return {"train": tdir, "synth": sdir, "truth": truth, "train_arrays": train}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("audit_data"))


@pytest.fixture(scope="module")
def ssim_run(ds: dict, tmp_path_factory: pytest.TempPathFactory) -> A.AuditResult:
    out = tmp_path_factory.mktemp("ssim_run")
    return A.audit(
        ds["train"],
        ds["synth"],
        metric="ssim",
        k=K,
        out=out,
        verify_flips=True,
        verify_shifts=3,
        chunk_size=3,
        progress=False,
    )


def _rows(out: Path) -> list[dict]:
    with open(out / "matches.csv", newline="") as f:
        return list(csv.DictReader(f))


def _best(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in rows:
        n = Path(r["synth_path"]).name
        if n not in best or float(r["ssim"]) > float(best[n]["ssim"]):
            best[n] = r
    return best


def test_planted_copies_found_and_novel_not(ssim_run: A.AuditResult, ds: dict) -> None:
    best = _best(_rows(ssim_run.out))
    for name, (kind, src) in ds["truth"].items():
        r = best[name]
        if kind == "novel":
            assert r["label"] != "duplicate", (name, r)
        else:
            assert r["label"] == "duplicate", (name, kind, r)
            assert Path(r["train_path"]).name == src, (name, kind, r)
            assert float(r["ssim"]) > 0.95
    assert best["s00.npy"]["transform"].startswith("hflip")
    assert best["s01.npy"]["transform"] == "shift(-2,1)"
    assert ssim_run.summary["counts"]["duplicate"] == 5
    assert ssim_run.fraction_memorised == pytest.approx(5 / 8)


def test_matches_and_summary_schema(ssim_run: A.AuditResult, ds: dict) -> None:
    out = ssim_run.out
    with open(out / "matches.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == A.MATCHES_HEADER
    rows = _rows(out)
    assert len(rows) == 8 * K
    for i in range(0, len(rows), K):
        grp = rows[i : i + K]
        assert [int(r["rank"]) for r in grp] == list(range(1, K + 1))
        assert len({r["synth_id"] for r in grp}) == 1
        scores = [float(r["cosine"]) for r in grp]
        assert scores == sorted(scores, reverse=True)
        for r in grp:
            assert r["label"] in A.LABELS
            assert r["synth_id"].startswith(r["synth_path"] + "#")
            assert r["train_id"] == f"{r['train_path']}#2:{r['train_index']}"
            s = float(r["ssim"])
            assert np.isfinite(s) and -1 <= s <= 1
            assert r["label"] == A.LABELS[int(A.label_of(s, (0.6, 0.85)))]
            # verified SSIM is never below the plain search SSIM of the same pair
            assert s >= float(r["cosine"]) - 1e-5
    s = json.loads((out / "summary.json").read_text())
    for key in (
        "counts",
        "fraction_memorised",
        "thresholds",
        "metric",
        "model",
        "n_train",
        "n_synth",
        "skipped",
        "timings_s",
        "versions",
        "verify",
        "k",
        "pair_counts_search",
        "n_pairs",
    ):
        assert key in s, key
    assert s["n_train"] == 14 and s["n_synth"] == 8 and s["n_pairs"] == 14 * 8
    assert sum(s["counts"].values()) == 8
    assert sum(s["pair_counts_search"].values()) == 14 * 8
    assert s["thresholds"]["low"] == 0.6 and s["thresholds"]["high"] == 0.85
    assert s["metric"] == "ssim" and s["model"] is None
    assert {"decode", "search", "verify", "report", "total"} <= set(s["timings_s"])
    assert "numpy" in s["versions"] and "deepssim_fast" in s["versions"]
    (sk,) = s["skipped"]
    assert (
        sk["set"] == "synth" and sk["path"].endswith("s99_corrupt.npy") and "s99_corrupt.npy" in sk["reason"]
    )
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    for name in ("histogram.png", "gallery.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_audit_result_repr_is_its_headline(ssim_run: A.AuditResult) -> None:
    """The dataclass repr printed the whole summary (settings, versions, timings, every skipped input)."""
    text = repr(ssim_run)
    s = ssim_run.summary
    assert len(text) < 400, text
    for part in (f"metric={s['metric']!r}", f"n_synth={s['n_synth']}", f"counts={s['counts']}", "skipped=1",
                 f"fraction_memorised={s['fraction_memorised']}", "report.html"):
        assert part in text, (part, text)


def test_search_scores_equal_exact_ssim(ssim_run: A.AuditResult, ds: dict) -> None:
    """With flips and shifts the SSIM search scores each pair by its best over the synthetic item and its
    searched variants (as the deepssim and correlation searches do)."""
    rows = _rows(ssim_run.out)
    assert len(rows) >= 6
    assert len(A._search_variants("ssim", True, 3, 2)) == 11  # hflip, vflip, hvflip, 8 shifts
    for r in rows[:6]:
        t = data.center_fit(np.load(r["train_path"]), SIZE)
        raw = np.load(r["synth_path"])
        s = data.center_fit(raw, SIZE)
        variants = A._search_variants("ssim", True, 3, 2, np.array([A._fit_offset(raw.shape, SIZE)]))
        plain = float(ssim_reference(t, s, preset="deepssim"))
        want = max([plain] + [float(ssim_reference(t, np.ascontiguousarray(fn(s, 0)), preset="deepssim"))
                              for _, _, fn in variants])
        assert float(r["cosine"]) == pytest.approx(want, abs=2e-5)
        assert float(r["cosine"]) >= plain - 2e-5


def test_corrupt_input_strict_aborts_with_path(ds: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="s99_corrupt.npy"):
        A.audit(ds["train"], ds["synth"], metric="ssim", out=tmp_path, strict=True, progress=False)



def test_skip_warnings_are_logged_on_one_line(
    ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nibabel's reason for a short .nii.gz has a newline ('...\\n - could the file be damaged?'): the logged
    'skipping ...' warning is one line with the whole reason, and summary.json keeps the reason as it is."""
    import gzip

    raw = data.dataset_path("anatomical").read_bytes()
    synth = tmp_path / "synth"
    synth.mkdir()
    shutil.copy(ds["synth"] / "s00.npy", synth / "s00.npy")
    bad = synth / "short.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) - 4096]))  # a valid gzip of a truncated .nii
    with caplog.at_level("WARNING", logger="deepssim_fast"):
        r = A.audit(ds["train"], synth, metric="ssim", k=1, verify="none", out=tmp_path / "o", progress=False)
    (reason,) = [sk["reason"] for sk in r.summary["skipped"]]
    assert "\n" in reason and "damaged" in reason
    logged = [rec.getMessage() for rec in caplog.records if str(bad) in rec.getMessage()]
    assert logged and all(m.startswith("skipping") and "\n" not in m for m in logged), logged
    assert any(m.endswith(" ".join(reason.split())) for m in logged), logged

def test_bad_arguments_and_empty_sets(ds: dict, tmp_path: Path) -> None:
    kw = {"out": tmp_path, "progress": False}
    with pytest.raises(ValueError, match="metric"):
        A.audit(ds["train"], ds["synth"], metric="psnr", **kw)
    with pytest.raises(ValueError, match="thresholds"):
        A.audit(ds["train"], ds["synth"], metric="ssim", thresholds=(0.9, 0.5), **kw)
    with pytest.raises(ValueError, match="k must"):
        A.audit(ds["train"], ds["synth"], metric="ssim", k=0, **kw)
    for dask in ({"workers": 2}, {"scheduler": "tcp://127.0.0.1:1"}):  # not silently ignored
        with pytest.raises(ValueError, match="ssim metric's exact SSIM search runs in this process"):
            A.audit(ds["train"], ds["synth"], metric="ssim", **dask, **kw)
    with pytest.raises(ValueError, match="needs a model"):
        A.audit(ds["train"], ds["synth"], metric="deepssim", **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        A.audit(tmp_path / "empty", ds["synth"], metric="ssim", **kw)
    (tmp_path / "onlybad").mkdir()
    (tmp_path / "onlybad" / "x.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no usable items"):
        A.audit(ds["train"], tmp_path / "onlybad", metric="ssim", **kw)


def _compare_outputs(a: Path, b: Path) -> None:
    for name in DETERMINISTIC:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("timings_s")
    sb.pop("timings_s")
    # the skipped-input reasons and everything else must agree; paths are shared (same inputs)
    assert sa == sb


def test_interrupted_run_resumes_to_identical_outputs(
    ds: dict, ssim_run: A.AuditResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def die(stage: str, index: int) -> None:
        calls.append((stage, index))
        if stage == "verify" and index == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    with pytest.raises(KeyboardInterrupt):
        A.audit(
            ds["train"],
            ds["synth"],
            metric="ssim",
            k=K,
            out=tmp_path,
            verify_flips=True,
            verify_shifts=3,
            chunk_size=3,
            progress=False,
        )
    assert not (tmp_path / "summary.json").exists()
    assert sorted((tmp_path / "work").glob("verify_*.npz")) and (tmp_path / "work" / "search.npz").exists()
    calls.clear()
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: calls.append((stage, index)))
    A.audit(
        ds["train"],
        ds["synth"],
        metric="ssim",
        k=K,
        out=tmp_path,
        verify_flips=True,
        verify_shifts=3,
        chunk_size=3,
        progress=False,
    )
    # only the unfinished verification chunk was computed again
    assert calls == [("verify", 2)]
    _compare_outputs(ssim_run.out, tmp_path)


def test_run_interrupted_in_the_variant_search_resumes_to_identical_outputs(
    ds: dict, ssim_run: A.AuditResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SSIM search of the flipped and shifted items (one pass per variant) keeps its chunks too: a run
    killed inside it computes only the chunks it had not finished."""
    kw = dict(metric="ssim", k=K, out=tmp_path, verify_flips=True, verify_shifts=3, chunk_size=3, progress=False)
    calls: list[tuple[str, int]] = []

    def die(stage: str, index: int) -> None:
        calls.append((stage, index))
        if calls.count(("search", 1)) == 3:  # the second chunk of the second variant (vflip)
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    with pytest.raises(KeyboardInterrupt):
        A.audit(ds["train"], ds["synth"], **kw)
    n_chunks = calls.index(("search", 0), 1)  # the plain search's chunks come first
    done = sorted(f.name for f in (tmp_path / "work").glob("search_*.npz"))
    assert len(done) == 2 * n_chunks + 2 and not (tmp_path / "work" / "search.npz").exists(), done
    assert {"search_hflip_00000.npz", "search_vflip_00001.npz"} <= set(done), done
    calls.clear()
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: calls.append((stage, index)))
    A.audit(ds["train"], ds["synth"], **kw)
    searched = [c for c in calls if c[0] == "search"]
    # vflip's remaining chunks, then hvflip and the 8 shift variants whole
    assert len(searched) == (n_chunks - 2) + 9 * n_chunks, calls
    _compare_outputs(ssim_run.out, tmp_path)


def test_killed_process_resumes_to_identical_outputs(
    ds: dict, ssim_run: A.AuditResult, tmp_path: Path
) -> None:
    """A real SIGKILL in the middle of the verification stage, then a rerun of the same command."""
    out = tmp_path / "out"
    code = (
        "import importlib, sys, time; A = importlib.import_module('deepssim_fast.audit')\n"
        "orig = A._chunk_hook\n"
        "def slow(stage, index):\n"
        "    if stage == 'verify' and index >= 1: open(sys.argv[3] + '.ready', 'w').close(); time.sleep(60)\n"
        "A._chunk_hook = slow\n"
        "A.audit(sys.argv[1], sys.argv[2], metric='ssim', k=14, out=sys.argv[3], verify_flips=True,"
        " verify_shifts=3, chunk_size=3, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(ds["train"]), str(ds["synth"]), str(out)])
    try:
        deadline = time.monotonic() + 120
        while not Path(str(out) + ".ready").exists():
            assert proc.poll() is None, "the audit process ended before it could be killed"
            assert time.monotonic() < deadline, "the audit did not reach the verification stage in time"
            time.sleep(0.05)
        proc.kill()
    finally:
        proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not (out / "summary.json").exists()
    A.audit(
        ds["train"],
        ds["synth"],
        metric="ssim",
        k=K,
        out=out,
        verify_flips=True,
        verify_shifts=3,
        chunk_size=3,
        progress=False,
    )
    _compare_outputs(ssim_run.out, out)


@pytest.mark.parametrize("where", ["synth", "train"])
def test_out_inside_an_input_folder_is_not_audited_on_a_rerun(
    ds: dict, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OUT inside an input folder: the rerun must not take the first run's gallery.png, histogram.png and
    OUT/work/*.npy stores as inputs; it gives the same outputs, and says that it left them out."""
    train, synth = tmp_path / "train", tmp_path / "synth"
    shutil.copytree(ds["train"], train)
    synth.mkdir()
    for name in ("s00.npy", "s12.npy"):
        shutil.copy(ds["synth"] / name, synth / name)
    out = (synth if where == "synth" else train) / "audit"
    kw = dict(metric="ssim", k=2, verify="none", out=out, progress=False)
    r1 = A.audit(train, synth, **kw)
    first = tmp_path / "first"
    first.mkdir()
    for name in (*DETERMINISTIC, "summary.json"):
        shutil.copy(out / name, first / name)
    assert (out / "gallery.png").exists() and sorted((out / "work").glob("*.npy"))
    with caplog.at_level("WARNING", logger="deepssim_fast.audit"):
        r2 = A.audit(train, synth, **kw)
    n1, n2 = ((r.summary["n_train"], r.summary["n_synth"]) for r in (r1, r2))
    assert n1 == n2 == (14, 2)
    assert r2.summary["n_train_files"] == 14 and r2.summary["n_synth_files"] == 2
    _compare_outputs(first, out)
    assert "own outputs" in caplog.text and str(out) in caplog.text
    # inputs under OUT that are not its outputs stay inputs (the demo keeps its data in OUT/data)
    shutil.rmtree(out)
    r3 = A.audit(train, synth, metric="ssim", k=2, verify="none", out=tmp_path, progress=False)
    assert r3.summary["n_train"] == 14 and r3.summary["n_synth"] == 2


@pytest.mark.parametrize("axis", [2, 0])
def test_an_earlier_audits_out_inside_an_input_folder_is_not_audited(
    ds: dict, tmp_path: Path, axis: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An audit into gen/audit1 and then another into gen/audit2: the second read audit1's gallery,
    histogram and pixel stores as more synthetic items (7.7 % memorised instead of 50 % in a probe), and with
    --axis 0 audit1's stored training pixels came back as exact copies of the training set (69.6 %). Other
    audits' output folders inside the inputs are left out now, each named in a warning; the second audit
    counts what the first did."""
    train, gen = tmp_path / "train", tmp_path / "gen"
    shutil.copytree(ds["train"], train)
    gen.mkdir()
    for name in ("s00.npy", "s04.npy", "s12.npy"):  # a flipped copy, an exact copy, a novel scan
        shutil.copy(ds["synth"] / name, gen / name)
    # (2D inputs give themselves whatever the axis; audit1's (N, H, W) pixel stores are cut along it)
    kw = dict(metric="ssim", k=2, verify="none", progress=False, policy=SlicePolicy(axis=axis))
    r1 = A.audit(train, gen, out=gen / "audit1", **kw)
    assert r1.summary["n_synth"] == 3
    assert (gen / "audit1" / "gallery.png").exists() and sorted((gen / "audit1" / "work").glob("*.npy"))
    with caplog.at_level("WARNING", logger="deepssim_fast.audit"):
        r2 = A.audit(train, gen, out=gen / "audit2", **kw)
    for key in ("n_train", "n_synth", "n_train_files", "n_synth_files", "counts", "fraction_memorised"):
        assert r2.summary[key] == r1.summary[key], key
    assert "earlier audit's output folder" in caplog.text and str(gen / "audit1") in caplog.text
    # and its .npz stores are not called images of a format this tool does not read, to be converted
    assert sorted((gen / "audit1" / "work").glob("*.npz"))
    assert "formats this tool does not read" not in caplog.text
    # a set of nothing but another audit's outputs is named
    with pytest.raises(ValueError, match=r"synth set holds only the outputs of earlier audits .*audit1"):
        A.audit(train, gen / "audit1", out=tmp_path / "o3", **kw)


def test_own_outputs_in_a_separate_cache_are_left_out_too(tmp_path: Path) -> None:
    """The cache's embedding stores (.npy) under an input folder are outputs too, named as given or
    through a link; a set of nothing but outputs is an error naming the way out."""
    out, cache = tmp_path / "out", tmp_path / "in" / "cache"
    (cache / "embeddings").mkdir(parents=True)
    (out / "work").mkdir(parents=True)
    real = [tmp_path / "in" / "a.npy", tmp_path / "in" / "cache.npy"]
    mine = [cache / "embeddings" / "k_1.npy", out / "work" / "synth_pixels.npy", out / "gallery.png"]
    for f in real + mine:
        f.touch()
    try:
        os.symlink(cache, tmp_path / "in" / "linked_cache", target_is_directory=True)
        mine.append(tmp_path / "in" / "linked_cache" / "embeddings" / "k_1.npy")
    except (OSError, NotImplementedError):
        pass
    got = A._drop_own_outputs({"train": real + mine, "synth": real[:1]}, out, cache)
    assert got == {"train": real, "synth": real[:1]}
    with pytest.raises(ValueError, match=r"synth set holds only this audit's own outputs.*--out"):
        A._drop_own_outputs({"train": real, "synth": mine}, out, cache)


def test_changed_input_file_invalidates_saved_search(ds: dict, tmp_path: Path) -> None:
    train = tmp_path / "train"
    shutil.copytree(ds["train"], train)
    synth = tmp_path / "synth"
    shutil.copytree(ds["synth"], synth)
    out = tmp_path / "out"
    r1 = A.audit(train, synth, metric="ssim", k=2, out=out, progress=False)
    # identity, contrast and noise copies (no flips or shifts searched here)
    assert r1.summary["counts"]["duplicate"] == 3
    victim = synth / "s04.npy"
    arr = np.load(victim)
    np.save(victim, np.ascontiguousarray(arr[::-1, ::-1]))  # same name, new content (rotated 180°)
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    r2 = A.audit(train, synth, metric="ssim", k=2, out=out, progress=False)
    assert r2.summary["counts"]["duplicate"] == 2


def test_input_replaced_with_its_old_mtime_kept_invalidates_the_caches(ds: dict, tmp_path: Path) -> None:
    """``cp -p`` / ``rsync -a`` / ``tar x`` replace a file's content and keep its mtime (same size too for
    .npy slices of one shape): the decoded-item cache and the saved search must not be reused."""
    train = tmp_path / "train"
    shutil.copytree(ds["train"], train)
    synth = tmp_path / "synth"
    synth.mkdir()
    for name in ("s10.npy", "s11.npy", "s12.npy"):  # novel scans
        shutil.copy2(ds["synth"] / name, synth / name)
    out = tmp_path / "out"
    kw = dict(metric="correlation", k=1, verify="none", out=out, progress=False)
    r1 = A.audit(train, synth, **kw)
    assert r1.summary["counts"]["duplicate"] == 0
    victim = synth / "s12.npy"
    st = victim.stat()
    replacement = tmp_path / "replacement.npy"
    np.save(replacement, np.load(train / "mni_070.npy"))  # a copy of a training slice, same shape and size
    assert replacement.stat().st_size == st.st_size
    shutil.copyfile(replacement, victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p does
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    r2 = A.audit(train, synth, **kw)
    fresh = A.audit(train, synth, **dict(kw, out=tmp_path / "fresh"))
    assert fresh.summary["counts"]["duplicate"] == 1
    assert r2.summary["counts"] == fresh.summary["counts"]
    assert (out / "matches.csv").read_bytes() == (tmp_path / "fresh" / "matches.csv").read_bytes()


def test_rerun_removes_the_cache_temporaries_a_killed_run_left_but_not_a_running_write(
    ds: dict, tmp_path: Path
) -> None:
    """A run killed while writing a cache entry leaves ``.<entry>.<random>.tmp`` in the cache (for volumes,
    up to a whole decoded 4D file); a later run removes the stale ones. The cache may be shared by audits
    running at once, so a recent temporary (another audit's write in progress) is left alone."""
    cache = tmp_path / "cache"
    kw = dict(metric="correlation", k=1, verify="none", cache_dir=cache, progress=False)
    A.audit(ds["train"], ds["synth"] / "s10.npy", out=tmp_path / "a", **kw)
    for sub in ("items", "embeddings"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    stale = [cache / "items" / ".abc_66x78.items.k1ll3d.tmp", cache / "embeddings" / ".abc_66x78_0f.npy.k1ll3d.tmp"]
    for f in stale:
        f.write_bytes(b"half")
        old = time.time() - 2 * 86400  # two days ago
        os.utime(f, (old, old))
    running = cache / "items" / ".def_66x78.items.wr1t1n.tmp"
    running.write_bytes(b"half")
    A.audit(ds["train"], ds["synth"] / "s10.npy", out=tmp_path / "b", **kw)
    assert not any(f.exists() for f in stale)
    assert running.exists()


def test_correlation_metric_is_pixel_pearson(ds: dict, tmp_path: Path) -> None:
    r = A.audit(
        ds["train"], ds["synth"], metric="correlation", k=4, out=tmp_path, verify="none", progress=False
    )
    rows = _rows(tmp_path)
    tr = sorted(ds["train"].glob("*.npy"))
    T = np.stack([np.load(p).ravel() for p in tr]).astype(np.float64)
    for row in rows[:8]:
        s = np.load(row["synth_path"]).ravel().astype(np.float64)
        j = [str(p) for p in tr].index(row["train_path"])
        # float32 scores over 5148-long vectors: the all-pairs engine's accumulation gives ~5e-5 here
        assert float(row["cosine"]) == pytest.approx(np.corrcoef(s, T[j])[0, 1], abs=1e-4)
        assert (
            row["ssim"] == "" and row["label"] == A.LABELS[int(A.label_of(float(row["cosine"]), (0.6, 0.85)))]
        )
    assert r.summary["label_score"] == "search score"
    # evaluate scores labelled pairs the same way (correlation with the thresholds)
    row = rows[0]
    labels = tmp_path / "labels.csv"
    want = A.label_of(float(row["cosine"]), (0.6, 0.85))
    code = {0: 0, 1: 2, 2: 1}[int(want)]  # audit label index -> reference code
    labels.write_text(f"real_key,synth_key,label\n{row['train_id']},{row['synth_id']},{code}\n")
    ev = A.evaluate(tmp_path, labels)
    assert ev["accuracy"] == 1.0 and ev["macro_f1"] == 1.0


def test_correlation_of_identical_images_is_at_most_one(ds: dict, tmp_path: Path) -> None:
    """float32 unit rows put the self-correlation of these MNI slices at up to 1 + 3e-6 (written 1.000002);
    a Pearson correlation is clamped to [-1, 1]."""
    synth = tmp_path / "synth"
    synth.mkdir()
    for name in sorted(ds["train_arrays"]):
        np.save(synth / name, ds["train_arrays"][name])
    A.audit(ds["train"], synth, metric="correlation", k=2, verify="none", out=tmp_path / "o", progress=False)
    rows = _rows(tmp_path / "o")
    scores = [float(r["cosine"]) for r in rows]
    assert max(scores) <= 1.0 and min(scores) >= -1.0
    best = [r for r in rows if r["rank"] == "1"]
    assert len(best) == 14 and all(float(r["cosine"]) >= 1 - 1e-5 for r in best)
    assert all(Path(r["train_path"]).name == Path(r["synth_path"]).name for r in best)
    # scores that the clamp makes equal are re-ordered by the tie rule (lower training index first)
    sc, ix = A._clamp_unit(np.array([[1.000002, 1.000001, 0.5]], np.float32), np.array([[5, 3, 1]]))
    assert sc.tolist() == [[1.0, 1.0, 0.5]] and ix.tolist() == [[3, 5, 1]]


def test_shift_aware_search_brings_shifted_copies_into_the_candidates(tmp_path: Path) -> None:
    """A copy shifted by 3 px ranks below decoys that are noisy copies of the SHIFTED image; with verify_shifts
    the search also queries the synthetic item translated by ±3 px, so the true source enters the top-k and
    verification (shift search + exact SSIM) labels it a duplicate. Without it, the source is missed."""
    sl = data.load_slices("mni152", data.SlicePolicy(axis=2, step=10))
    src = np.ascontiguousarray(sl[len(sl) // 2].array[::3, ::3]).astype(np.float32)
    rng = np.random.default_rng(8)
    shifted = A._shift(src, (3, 3))
    train_dir, synth_dir = tmp_path / "train", tmp_path / "synth"
    train_dir.mkdir()
    synth_dir.mkdir()
    np.save(train_dir / "a_source.npy", src)
    for i in range(3):  # decoys: the shifted image with strong noise, more correlated with it than src is
        np.save(train_dir / f"b_decoy{i}.npy", shifted + 0.35 * src.std() * rng.standard_normal(src.shape))
    np.save(synth_dir / "copy.npy", shifted)
    for shifts, found in ((0, False), (3, True)):
        out = tmp_path / f"out{shifts}"
        A.audit(train_dir, synth_dir, metric="correlation", k=2, out=out, verify_shifts=shifts, progress=False)
        rows = _rows(out)
        cands = {Path(r["train_path"]).name for r in rows}
        assert ("a_source.npy" in cands) == found, (shifts, cands)
        if found:
            best = max(rows, key=lambda r: float(r["ssim"]))
            assert Path(best["train_path"]).name == "a_source.npy" and best["label"] == "duplicate"
            assert best["transform"] == "shift(-3,-3)" and float(best["ssim"]) > 0.99


def test_matches_marks_the_row_that_decides_the_label(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A synthetic item's label is its best verified candidate's, at any rank: a copy shifted by (2, -1) searched
    with verify_shifts=2 (the search's ±2 px translations leave it a pixel off its source) ranks a blurred
    look-alike first (similar) and its source second (duplicate, shift(-2,1), SSIM 1), as synth_0021 in the demo.
    Counting rank-1 labels miscounted against summary.json: matches.csv's last column, decides_label, marks the
    one row per item whose label counts. An earlier audit's matches.csv (without it) gets it on a rerun, which
    resumes the finished work."""
    g = np.exp(-0.5 * (np.arange(-4, 5) / 1.5) ** 2)
    g /= g.sum()

    def blur(a: np.ndarray) -> np.ndarray:  # a Gaussian blur, sigma 1.5 px
        for ax in (0, 1):
            a = np.apply_along_axis(np.convolve, ax, a, g, mode="same")
        return a.astype(np.float32)

    sl = data.load_slices("mni152", data.SlicePolicy(axis=2, step=10))
    train_dir, synth_dir = tmp_path / "train", tmp_path / "synth"
    train_dir.mkdir()
    synth_dir.mkdir()
    for q in (3, 4):
        src = np.ascontiguousarray(sl[q].array[::3, ::3]).astype(np.float32)
        copy = A._shift(src, (2, -1))
        np.save(train_dir / f"src{q}.npy", src)
        np.save(train_dir / f"blur{q}.npy", blur(copy))
        np.save(synth_dir / f"shifted{q}.npy", copy)
    np.save(synth_dir / "same5.npy", np.ascontiguousarray(sl[5].array[::3, ::3]).astype(np.float32))
    np.save(train_dir / "src5.npy", np.ascontiguousarray(sl[5].array[::3, ::3]).astype(np.float32))
    out = tmp_path / "o"
    r = A.audit(train_dir, synth_dir, metric="correlation", k=3, out=out, verify_shifts=2, progress=False)
    with open(out / "matches.csv", newline="") as f:
        assert next(csv.reader(f))[-1] == "decides_label"
    rows = _rows(out)
    marked = [x for x in rows if x["decides_label"] == "1"]
    assert {x["decides_label"] for x in rows} == {"0", "1"}
    assert sorted(x["synth_id"] for x in marked) == sorted({x["synth_id"] for x in rows})  # one per item
    assert {lab: sum(x["label"] == lab for x in marked) for lab in A.LABELS} == r.summary["counts"]
    by_name = {Path(x["synth_path"]).name: x for x in marked}
    for q in (3, 4):
        x = by_name[f"shifted{q}.npy"]
        assert (x["rank"], Path(x["train_path"]).name, x["label"]) == ("2", f"src{q}.npy", "duplicate")
        assert x["transform"] == "shift(-2,1)" and float(x["ssim"]) > 0.999
        first = next(y for y in rows if y["synth_id"] == x["synth_id"] and y["rank"] == "1")
        assert Path(first["train_path"]).name == f"blur{q}.npy" and first["label"] == "similar"
    assert by_name["same5.npy"]["rank"] == "1" and by_name["same5.npy"]["label"] == "duplicate"
    assert r.summary["counts"] == {"different": 0, "similar": 0, "duplicate": 3}
    # rank 1 alone would say 1 duplicate and 2 similar
    assert sum(x["label"] == "duplicate" for x in rows if x["rank"] == "1") == 1

    # an audit written before the column: a rerun resumes it (no bump of the format version discards its
    # search and verification) and writes matches.csv with the column
    want = (out / "matches.csv").read_bytes()
    (out / "matches.csv").write_bytes(b"".join(line.rsplit(b",", 1)[0] + b"\n" for line in want.splitlines()))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(train_dir, synth_dir, metric="correlation", k=3, out=out, verify_shifts=2, progress=False)
    assert "resuming the earlier run" in caplog.text and "configuration changed" not in caplog.text
    assert (out / "matches.csv").read_bytes() == want


def test_embeddings_metric_matches_reference_and_faiss(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    tr = rng.standard_normal((37, 16)).astype(np.float32)
    sy = np.concatenate(
        [
            tr[[3, 9]] + 0.01 * rng.standard_normal((2, 16)).astype(np.float32),
            rng.standard_normal((9, 16)).astype(np.float32),
        ]
    )
    np.save(tmp_path / "train.npy", tr)
    np.save(tmp_path / "synth.npy", sy)
    r = A.audit(
        tmp_path / "train.npy",
        tmp_path / "synth.npy",
        metric="embeddings",
        k=5,
        verify="none",
        out=tmp_path / "out",
        progress=False,
    )
    rows = _rows(tmp_path / "out")
    got_i = np.array([int(x["train_index"]) for x in rows]).reshape(11, 5)
    got_s = np.array([float(x["cosine"]) for x in rows]).reshape(11, 5)
    ref_s, ref_i = topk_reference(tr, sy, 5)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, atol=2e-6)
    faiss = pytest.importorskip("faiss")
    idx = faiss.IndexFlatIP(16)
    idx.add(tr / np.linalg.norm(tr, axis=1, keepdims=True))
    fs, fi = idx.search(sy / np.linalg.norm(sy, axis=1, keepdims=True), 5)
    np.testing.assert_array_equal(got_i[:, 0], fi[:, 0])
    np.testing.assert_allclose(got_s, fs, atol=1e-5)
    assert r.summary["counts"]["duplicate"] == 2
    assert rows[0]["train_id"] == f"{tmp_path / 'train.npy'}#row:3"
    with pytest.raises(ValueError, match="verify='none'"):
        A.audit(
            tmp_path / "train.npy",
            tmp_path / "synth.npy",
            metric="embeddings",
            out=tmp_path / "o2",
            progress=False,
        )


def test_transforms_that_verify_none_would_ignore_are_errors(ds: dict, tmp_path: Path) -> None:
    """With verify='none' nothing is verified, so rotations (a verification transform) and, for the metrics
    whose search tries no transformed items (ssim, embeddings), flips and shifts would be silently ignored
    while the report listed them as checked: each is a clear error before any work."""
    base = dict(k=1, verify="none", out=tmp_path / "o", progress=False)
    cases = [
        (dict(metric="correlation", verify_rotations=5.0), "verify_rotations"),
        (dict(metric="ssim", verify_flips=True), "metric 'ssim'"),
        (dict(metric="ssim", verify_shifts=2), "metric 'ssim'"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            A.audit(ds["train"], ds["synth"], **base, **kw)
    assert not (tmp_path / "o").exists()
    emb = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    with pytest.raises(ValueError, match="metric 'embeddings'") as err:
        A.audit(tmp_path / "e.npy", tmp_path / "e.npy", metric="embeddings", verify_flips=True, **base)
    # embedding rows have no pixels: the remedies of the ssim metric (verify with SSIM, metric 'correlation')
    # cannot apply, and the message offered them
    assert "verify='ssim'" not in str(err.value) and "use metric 'correlation'" not in str(err.value)
    assert "drop verify_flips/verify_shifts" in str(err.value)


def test_bad_rotation_and_worker_counts_are_named_before_any_work(ds: dict, tmp_path: Path) -> None:
    """verify_rotations=400 was accepted (the README's "small rotations"); workers=0 with metric 'ssim' was
    refused with the message for a Dask run of the ssim metric, not as a bad worker count."""
    base = dict(k=1, out=tmp_path / "o", progress=False)
    for deg in (400.0, 180.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"verify_rotations \(--verify-rotations\) must be a number of "
                                             r"degrees in \[0, 180\]"):
            A.audit(ds["train"], ds["synth"], metric="ssim", verify_rotations=deg, **base)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        A.audit(ds["train"], ds["synth"], metric="ssim", workers=0, **base)
    assert not (tmp_path / "o").exists()


def test_volumes_mode_uses_3d_ssim(tmp_path: Path) -> None:
    vol = data.load_volume("anatomical").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a.npy", vol)
    np.save(tmp_path / "t" / "b.npy", np.ascontiguousarray(vol[::-1]))
    rng = np.random.default_rng(3)
    noisy = (vol + rng.normal(0, 30, vol.shape)).astype(np.float32)
    np.save(tmp_path / "s" / "n.npy", noisy)
    r = A.audit(
        tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=2, out=tmp_path / "o", progress=False
    )
    rows = _rows(tmp_path / "o")
    assert rows[0]["train_path"].endswith("a.npy")
    want = float(ssim_reference(vol, noisy, spatial_dims=3, preset="deepssim"))
    assert float(rows[0]["ssim"]) == pytest.approx(want, abs=1e-4)
    assert r.summary["mode"] == "volumes" and r.summary["item_size"] == list(vol.shape)


def test_verify_pairs_identity_equals_reference_and_undoes_transforms() -> None:
    vol = data.load_volume("mni152").array
    rng = np.random.default_rng(4)
    t = np.stack([_small(vol[:, :, i]) for i in (50, 80, 110)])
    s = t + rng.normal(0, 2.0, t.shape).astype(np.float32)
    v, names = A.verify_pairs(t, s, spatial_dims=2)
    np.testing.assert_allclose(v, ssim_reference(t, s, spatial_dims=2, preset="deepssim"), atol=2e-5)
    assert names == ["none"] * 3
    moved = np.stack([A._shift(np.ascontiguousarray(a[::-1]), (1, -3)) for a in t])
    v2, names2 = A.verify_pairs(t, moved, spatial_dims=2, flips=True, shifts=3)
    assert (v2 > 0.95).all(), v2
    # found by undoing the transform: a vertical flip (axis 0) and a shift of the planted size
    assert all("vflip" in n and "shift" in n for n in names2), names2
    rot = np.stack([A._rotate(a, 2.0) for a in t])
    plain, _ = A.verify_pairs(t, rot, spatial_dims=2)
    v3, names3 = A.verify_pairs(t, rot, spatial_dims=2, rotations=2.0)
    assert (v3 > plain).all() and all("rot(-2)" in n for n in names3), (v3, plain, names3)


def test_an_image_given_to_an_embeddings_audit_is_warned_about(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """MRI slices saved as .npy and audited with --metric embeddings were read as 32 rows of 32-wide
    "embeddings" each: 100 % memorised, without a word. Nothing in a file tells the two apart, but pixels are
    non-negative and their rows not unit-norm; embeddings (signed, or unit-norm with an ids file) pass quietly."""
    vol = data.load_volume("mni152").array
    for d, zs in (("t", (40, 60, 80)), ("s", (50,))):
        (tmp_path / d).mkdir()
        for z in zs:
            np.save(tmp_path / d / f"z{z}.npy", np.ascontiguousarray(vol[60:92, 70:102, z]) + 1.0)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "t", tmp_path / "s", metric="embeddings", verify="none", k=1, out=tmp_path / "o",
                progress=False)
    assert "3 train file(s), e.g." in caplog.text and "1 synth file(s)" in caplog.text
    assert "if these are images, audit them with metric 'deepssim', 'ssim' or 'correlation'" in caplog.text
    caplog.clear()
    rng = np.random.default_rng(0)
    e = rng.standard_normal((20, 16)).astype(np.float32)
    np.save(tmp_path / "signed.npy", e)
    unit = np.abs(e) / np.linalg.norm(e, axis=1, keepdims=True)  # (non-negative but unit-norm rows)
    np.save(tmp_path / "unit.npy", unit)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "signed.npy", tmp_path / "unit.npy", metric="embeddings", verify="none", k=1,
                out=tmp_path / "o2", progress=False)
    assert "not unit-norm" not in caplog.text


def test_gallery_of_an_embeddings_audit_reads_the_images_its_ids_name(tmp_path: Path) -> None:
    """An embeddings audit has no pixels, so its gallery showed names over empty panels. Where an item id
    names a slice of a readable file (embed's ids), the gallery now reads it: a 2D image, a slice of a
    volume along any axis, a frame's slice; rows named by number, or a file gone since, have no image."""
    rng = np.random.default_rng(0)
    img = rng.random((9, 11)).astype(np.float32)
    vol = rng.random((5, 6, 7)).astype(np.float32)
    np.save(tmp_path / "im.npy", img)
    np.save(tmp_path / "vol.npy", vol)
    np.save(tmp_path / "v4.npy", np.stack([vol, vol + 1], axis=3))
    np.testing.assert_array_equal(A._image_of_id(f"{tmp_path / 'im.npy'}#2:0"), img)
    for axis in range(3):
        np.testing.assert_array_equal(A._image_of_id(f"{tmp_path / 'vol.npy'}#{axis}:3"), np.take(vol, 3, axis))
    np.testing.assert_array_equal(A._image_of_id(f"{tmp_path / 'v4.npy'}@t1#2:4"), vol[:, :, 4] + 1)
    for gone in (f"{tmp_path / 'im.npy'}#row:0", f"{tmp_path / 'vol.npy'}#2:7", f"{tmp_path / 'im.npy'}#2:1",
                 f"{tmp_path / 'moved.npy'}#2:0", f"{tmp_path / 'v4.npy'}#2:0"):
        assert A._image_of_id(gone) is None, gone


def test_an_encoder_that_crops_the_items_is_said_once_with_the_count_of_all_items(
    ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit embeds its items in a call per batch, and embed says once per model that its size policy crops
    (or pads) an image size past half: the warning gave the first batch's count ("2 of 2 images") for an audit
    of 22 items. It now counts every item the audit embeds, train and synthetic, in one warning. And it went to
    the log alone, never into summary.json's warnings or the report, and a resumed run, its embeddings cached,
    did not say it at all: the audit decides it itself, from the items' size and the model's input size and size
    policy, so that a fresh and a resumed run say it alike."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m32.pt", build_model("small", input_size=32))  # items are 66 x 78
    kw = dict(model=ckpt, metric="deepssim", k=4, batch_size=2, chunk_size=3, decode_workers=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        r = A.audit(ds["train"], ds["synth"], out=tmp_path / "out", **kw)
    said = [m for m in caplog.messages if "more than half their pixels" in m]
    assert len(said) == 1, said
    assert said[0].startswith("22 of 22 items (e.g. 66 x 78) lose more than half their pixels to the centre crop "
                              "to the model's input size 32 x 32 (size policy 'fit')"), said
    warned = r.summary["warnings"]  # (the untrained encoder's search is also said not to tell the items apart)
    assert [w for w in warned if "more than half their pixels" in w] == said
    assert said[0][:60] in (tmp_path / "out" / "report.html").read_text()

    _killed_at_verify_chunk(ds, dict(kw, out=tmp_path / "resumed"), monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        resumed = A.audit(ds["train"], ds["synth"], out=tmp_path / "resumed", **kw)  # (embeds nothing)
    assert [m for m in caplog.messages if "more than half their pixels" in m] == said
    assert resumed.summary["warnings"] == warned
    _compare_outputs(tmp_path / "out", tmp_path / "resumed")


def test_the_flipped_items_embedded_for_the_search_give_no_warning_of_their_own(
    ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: the flipped and shifted items the search embeds (a block at a time), and evaluate's, each
    call said what the encoder's centre crop loses with its own count ("5 of 5 images", "256 of 256" on a large
    set), beside or instead of the audit's count of all its items (a run whose items' embeddings were cached said
    only those). They have the items' size: the audit's one warning covers them, and they say nothing."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m32.pt", build_model("small", input_size=32))  # items are 66 x 78
    kw = dict(model=ckpt, metric="deepssim", k=2, verify="none", verify_flips=True, batch_size=2,
              cache_dir=tmp_path / "cache", progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "first", **kw)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        # (another OUT on the same cache: the items' embeddings are cached, the flipped items' are not)
        r = A.audit(ds["train"], ds["synth"], out=tmp_path / "out", **kw)
    said = [m for m in caplog.messages if "more than half their pixels" in m]
    assert len(said) == 1 and said[0].startswith("22 of 22 items (e.g. 66 x 78)"), said
    assert [w for w in r.summary["warnings"] if "more than half their pixels" in w] == said
    caplog.clear()
    labels = _labels(tmp_path / "l.csv", (ds["truth"]["s00.npy"][1], "s00.npy", 2), ("mni_030.npy", "s10.npy", 0))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        A.evaluate(tmp_path / "out", labels)  # (embeds the labelled synthetic items' flips again)
    assert not [m for m in caplog.messages if "more than half their pixels" in m], caplog.messages


def test_deepssim_metric_with_small_model_and_embedding_cache(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from deepssim_fast.model import build_model, embed, save_checkpoint

    torch.manual_seed(0)
    model = build_model("small", input_size=64)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    out = tmp_path / "out"
    r = A.audit(
        ds["train"],
        ds["synth"],
        model=ckpt,
        metric="deepssim",
        k=4,
        out=out,
        chunk_size=4,
        decode_workers=1,
        progress=False,
    )
    assert r.summary["model"]["path"] == str(Path(ckpt).resolve())
    assert r.summary["model"]["hash"] == A._file_sha256(Path(ckpt))
    rows = _rows(out)
    assert len(rows) == 8 * 4
    # search scores are the cosine of the model's embeddings of the fitted items
    first = rows[0]
    tx = data.center_fit(np.load(first["train_path"]), SIZE)
    sx = data.center_fit(np.load(first["synth_path"]), SIZE)
    e = embed([tx, sx], model, progress=False)
    assert float(first["cosine"]) == pytest.approx(float(e[0] @ e[1]), abs=1e-4)
    # the identity copy has cosine 1 with its source and is labelled duplicate by verified SSIM
    best = _best(rows)
    assert best["s04.npy"]["label"] == "duplicate" and float(best["s04.npy"]["ssim"]) == pytest.approx(1.0)
    assert len(list((out / "cache" / "embeddings").glob("*.npy"))) == 14 + 8
    # a rerun takes every embedding from the cache
    shutil.rmtree(out / "work")

    def no_embed(*args, **kwargs):
        raise AssertionError("embedding recomputed despite the cache")

    monkeypatch.setattr(A, "_embed", no_embed)
    r2 = A.audit(
        ds["train"], ds["synth"], model=ckpt, metric="deepssim", k=4, out=out, chunk_size=4, progress=False
    )
    assert (out / "matches.csv").read_bytes() == _matches_bytes(rows)
    assert r2.summary["counts"] == r.summary["counts"]


def test_embeddings_cached_before_a_preprocessing_change_are_not_reused(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of the encoder's preprocessing (PREPROCESS_VERSION; 2: constant images) gives other
    embeddings for the same model file: the cached embeddings and the saved search of the earlier version
    must not be reused. Their file names and the run's fingerprint carry the version; files of an earlier
    version untouched for an hour are removed."""
    import torch

    from deepssim_fast import model as M

    torch.manual_seed(0)
    ckpt = M.save_checkpoint(tmp_path / "m.pt", M.build_model("small", input_size=32))
    out, cache = tmp_path / "out", tmp_path / "cache"
    kw = dict(model=ckpt, metric="deepssim", k=2, out=out, cache_dir=cache, progress=False)
    A.audit(ds["train"], ds["synth"], **kw)
    names = sorted(f.name for f in (cache / "embeddings").glob("*.npy"))
    assert names and all(n.endswith(f"_p{M.PREPROCESS_VERSION}.npy") for n in names)
    # the next version: nothing of this one is reused, neither embeddings nor the saved search
    monkeypatch.setattr(M, "PREPROCESS_VERSION", M.PREPROCESS_VERSION + 1)
    calls = []
    real = A._embed
    monkeypatch.setattr(A, "_embed", lambda images, *a, **k: calls.append(len(images)) or real(images, *a, **k))
    A.audit(ds["train"], ds["synth"], **kw)
    assert sum(calls) == 14 + 8
    old = time.time() - 2 * 3600
    for n in names:
        os.utime(cache / "embeddings" / n, (old, old))
    A.audit(ds["train"], ds["synth"], **kw)
    left = sorted(f.name for f in (cache / "embeddings").glob("*.npy"))
    assert left and not set(left) & set(names)


def test_embedding_reads_each_cached_file_once(ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedding read each per-file item cache entry three times (its ids to count, its pixels, its ids again);
    now once. (The same loop also tested membership in a list of the missing files, quadratic in the number of
    files: ~36 s of Python at 10^5 files, an hour at 10^6; it is a set now.)"""
    import torch

    from deepssim_fast.model import build_model

    torch.manual_seed(0)
    model = build_model("small", input_size=64)
    inside = [False]
    loads: list[str] = []
    real_pixels, real_embed_items = A._entry_pixels, A._embed_items

    def spy_pixels(path: Path) -> np.ndarray:
        if inside[0]:
            loads.append(str(path))
        return real_pixels(path)

    def spy_embed_items(*args, **kwargs):  # noqa: ANN202
        inside[0] = True
        try:
            return real_embed_items(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(A, "_entry_pixels", spy_pixels)
    monkeypatch.setattr(A, "_embed_items", spy_embed_items)
    A.audit(ds["train"], ds["synth"], model=model, metric="deepssim", k=2, verify="none", out=tmp_path / "o",
            batch_size=5, progress=False)
    assert len(loads) == 14 + 8 and len(set(loads)) == len(loads)


def _matches_bytes(rows: list[dict]) -> bytes:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(A.MATCHES_HEADER)
    for r in rows:
        w.writerow([r[k] for k in A.MATCHES_HEADER])
    return buf.getvalue().encode()


def test_model_objects_with_the_same_weights_but_other_settings_do_not_share_embeddings(
    ds: dict, tmp_path: Path
) -> None:
    """A model passed as an object is keyed by its settings too: the same weights fed at another input size
    (``load_model(path, input_size=...)``, as the loader's warning advises) embed differently, so the cached
    embeddings and the saved search of the first must not be reused for the second."""
    import torch

    from deepssim_fast.model import build_model

    torch.manual_seed(0)
    m64 = build_model("small", input_size=64)
    torch.manual_seed(0)
    m96 = build_model("small", input_size=96)
    assert all(torch.equal(a, b) for a, b in zip(m64.state_dict().values(), m96.state_dict().values(), strict=True))
    assert A._module_hash(m64) != A._module_hash(m96)
    synth = tmp_path / "synth"
    synth.mkdir()
    for name in ("s04.npy", "s10.npy"):
        shutil.copy2(ds["synth"] / name, synth / name)
    kw = dict(metric="deepssim", k=2, verify="none", progress=False)
    A.audit(ds["train"], synth, model=m64, out=tmp_path / "out", **kw)
    again = A.audit(ds["train"], synth, model=m96, out=tmp_path / "out", **kw)
    fresh = A.audit(ds["train"], synth, model=m96, out=tmp_path / "fresh", **kw)
    assert again.summary["model"]["hash"] == fresh.summary["model"]["hash"] != A._module_hash(m64)
    assert (tmp_path / "out" / "matches.csv").read_bytes() == (tmp_path / "fresh" / "matches.csv").read_bytes()


def test_item_size_policy_crops_and_pads(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    big = rng.random((40, 50)).astype(np.float32) + 1
    np.save(tmp_path / "t" / "big.npy", big)
    np.save(tmp_path / "s" / "small.npy", big[5:35, 10:40])  # a crop: padded back with its minimum
    r = A.audit(
        tmp_path / "t", tmp_path / "s", metric="ssim", k=1, out=tmp_path / "o", size=(30, 30), progress=False
    )
    store = np.load(tmp_path / "o" / "work" / "train_pixels.npy")
    np.testing.assert_array_equal(store[0], data.center_fit(big, (30, 30)))
    assert r.summary["item_size"] == [30, 30]
    assert r.summary["counts"]["duplicate"] == 1


@pytest.mark.parametrize(
    "arg,value",
    [("verify_shifts", 2.5), ("chunk_size", 2.5), ("batch_size", 8.0), ("bins", 1.5), ("gallery", -1)],
)
def test_integer_arguments_that_are_not_whole_numbers_are_named(
    ds: dict, tmp_path: Path, arg: str, value: float
) -> None:
    """verify_shifts=2.5 failed in verification with 'arrays used as indices must be of integer (or boolean)
    type', chunk_size=2.5 in range(), and gallery=-1 silently left the last suspect out of the report."""
    with pytest.raises(ValueError, match=rf"{arg} must be an integer >= [01], got {value!r}"):
        A.audit(ds["train"], ds["synth"], metric="ssim", k=2, out=tmp_path, progress=False, **{arg: value})


@pytest.mark.parametrize("arg,value", [("strict", "no"), ("verify_flips", 1), ("progress", None)])
def test_flag_arguments_that_are_not_bools_are_named(ds: dict, tmp_path: Path, arg: str, value: object) -> None:
    """strict="no" audited strictly and verify_flips=1 searched flips (read by their truth value); progress=None
    reached all_pairs, whose error named all_pairs. Each is refused first, naming the audit's argument, and
    nothing is written."""
    with pytest.raises(TypeError, match=rf"^{arg} must be a bool \(True or False\), got {re.escape(repr(value))}"):
        A.audit(ds["train"], ds["synth"], metric="ssim", k=2, out=tmp_path / "o", **{"progress": False, arg: value})
    assert not (tmp_path / "o").exists()


def test_bad_item_sizes_are_named_before_any_work(tmp_path: Path) -> None:
    """A non-positive size failed deep inside (numpy's 'negative dimensions are not allowed', or SSIM's
    window error on a (0, 10) item), and an item size smaller than the SSIM window taken from the first
    training item (a thin stack saved as (2, H, W), cut along axis 2 into (2, H) slices) failed in the SSIM
    engine without naming the item; each is now an error up front that says what to change. (A (1, H, W)
    array is now the channel-first image itself.)"""
    img = np.random.default_rng(7).random((2, 20, 24)).astype(np.float32) + 1
    for side in ("t", "s"):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "img.npy", img)
    kw = {"metric": "ssim", "k": 1, "progress": False}
    for size in ((0, 10), (-5, 10), (20,)):
        with pytest.raises(ValueError, match=r"size must be 2 positive integers"):
            A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", size=size, **kw)
    with pytest.raises(ValueError, match="decode_workers"):
        A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", decode_workers=-1, **kw)
    # (a (2, H, W) stack cut along axis 2 into (2, H) slices: each file is now refused as a batch of images
    # saved as one array, before any item size is taken from it; the item size error stays for --size)
    with pytest.raises(ValueError, match=r"the train set has no usable items .*img\.npy: a volume of shape "
                                         r"\(2, 20, 24\) cut along axis 2 gives slices of 2 x 20 pixels.*--axis 0"):
        A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", **kw)
    # (a size that was given: the hint had said "give --size" to a user who had)
    with pytest.raises(ValueError, match=r"^size \(5, 5\) \(--size\) is smaller than the 7-pixel SSIM window .*give "
                                         r"every side at least 7$"):
        A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", size=(5, 5), policy=SlicePolicy(axis=0), **kw)
    # without exact SSIM such items are legitimate; cut along axis 0 they are (20, 24) images (the first)
    r = A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", policy=SlicePolicy(axis=0, stop=1), **kw)
    assert r.summary["item_size"] == [20, 24] and r.summary["counts"]["duplicate"] == 1


@pytest.mark.parametrize("tiny_name", ["a_tiny.npy", "z_tiny.npy"])
def test_an_image_under_the_ssim_window_is_left_out_with_a_reason(ds: dict, tmp_path: Path, tiny_name: str) -> None:
    """A 5 x 5 image among real slices was padded to the item size and audited (sorted last), or, read first,
    set an item size that stopped the whole audit ("item size (5, 5) ... is smaller than the 7-pixel SSIM
    window"). The README says such images are left out with a warning, as training leaves them out: they are
    now, named with their size; --strict stops on them."""
    train = tmp_path / "train"
    shutil.copytree(ds["train"], train)
    np.save(train / tiny_name, np.arange(25, dtype=np.float32).reshape(5, 5))
    kw = dict(metric="ssim", k=1, verify="none", progress=False)
    r = A.audit(train, ds["synth"] / "s04.npy", out=tmp_path / "o", **kw)
    assert r.summary["n_train"] == 14 and r.summary["counts"]["duplicate"] == 1
    (sk,) = [s for s in r.summary["skipped"] if s["set"] == "train"]
    assert sk["path"] == str(train / tiny_name)
    assert sk["reason"].endswith("an image of 5 x 5 pixels, smaller than the 7-pixel SSIM window (each side "
                                 "must be at least 7)")
    with pytest.raises(DataError, match=r"an image of 5 x 5 pixels, smaller than the 7-pixel SSIM window"):
        A.audit(train, ds["synth"] / "s04.npy", out=tmp_path / "o2", strict=True, **kw)


def test_verify_shifts_of_half_an_item_side_or_more_are_named_before_any_work(tmp_path: Path) -> None:
    """The best shift is found by circular cross-correlation, so shifts d and d - n of an n-pixel side tie:
    with --verify-shifts >= n/2 the scan took the wrong one (a copy of a real 29 x 29 slice shifted by (3, -2)
    verified as 'none', SSIM 0.09, with shifts 28), and with shifts >= n translating failed with numpy's
    'could not broadcast input array'. Both are an error up front naming the item size."""
    v = np.ascontiguousarray(data.load_volume("aniso_vox").array[::2, ::2, 12])  # 29 x 29
    for side, img in (("t", v), ("s", A._shift(v, (3, -2)))):
        (tmp_path / side).mkdir()
        np.save(tmp_path / side / "img.npy", img)
    for shifts, kw in ((15, {"metric": "ssim"}), (28, {"metric": "ssim"}),
                       (40, {"metric": "correlation", "verify": "none"})):
        with pytest.raises(ValueError, match=rf"verify_shifts {shifts} .* item size \(29, 29\)"):
            A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", k=1, verify_shifts=shifts,
                    progress=False, **kw)
    assert not (tmp_path / "o" / "work").exists()
    r = A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", metric="ssim", k=1, verify_shifts=14,
                progress=False)
    (row,) = _rows(tmp_path / "o")
    assert row["transform"] == "shift(-3,2)" and r.summary["counts"]["duplicate"] == 1


def test_classification_metrics_hand_computed() -> None:
    # y_true / y_pred with reference codes 0 different, 1 duplicate, 2 similar
    y_true = [1, 1, 1, 2, 2, 0, 0, 0, 0, 2]
    y_pred = [1, 1, 2, 2, 0, 0, 0, 1, 0, 2]
    m = A.classification_metrics(y_true, y_pred)
    # duplicate: tp 2, predicted 3, true 3 -> p 2/3, r 2/3, f1 2/3
    # similar:   tp 2, predicted 3, true 3 -> p 2/3, r 2/3, f1 2/3
    # different: tp 3, predicted 4, true 4 -> p 3/4, r 3/4, f1 3/4
    assert m["per_class"]["duplicate"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["different"]["recall"] == pytest.approx(3 / 4)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert m["accuracy"] == pytest.approx(0.7)
    import sklearn.metrics as skm  # (the test extra installs scikit-learn: the oracle must not be skipped)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))


def test_evaluate_reproduces_hand_computed_macro_f1(
    ssim_run: A.AuditResult, ds: dict, tmp_path: Path
) -> None:
    out = ssim_run.out
    names = sorted(ds["train_arrays"])
    truth = ds["truth"]
    # Pairs whose audit labels are known: each copy with its source (duplicate: s00..s04), a novel slice
    # with a training slice (different), and a copy with a wrong training slice (different).
    lines = ["real_key,synth_key,label"]
    for s, (kind, src) in sorted(truth.items()):
        if kind != "novel":
            lines.append(f"{src},{s},1")
    lines.append(f"{names[0]},s10.npy,0")
    lines.append(
        f"{Path(names[5]).stem},s11,2"
    )  # labelled similar by the annotator; the audit says different
    wrong = names[(names.index(truth["s04.npy"][1]) + 6) % len(names)]
    lines.append(f"{wrong},s04.npy,1")  # annotated duplicate, but it is another slice: audit says different
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    r = A.evaluate(out, labels)
    # y_true = [1,1,1,1,1,0,2,1], y_pred = [1,1,1,1,1,0,0,0]
    # duplicate: tp 5, pred 5, true 6 -> p 1, r 5/6, f1 10/11;  different: tp 1, pred 3, true 1 -> p 1/3, r 1,
    # f1 1/2;  similar: tp 0 -> f1 0.  macro F1 = (10/11 + 1/2 + 0) / 3
    assert r["macro_f1"] == pytest.approx((10 / 11 + 0.5 + 0.0) / 3)
    assert r["per_class"]["duplicate"]["recall"] == pytest.approx(5 / 6)
    assert r["per_class"]["different"]["precision"] == pytest.approx(1 / 3)
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["macro_f1"] == pytest.approx(r["macro_f1"])
    bad = tmp_path / "bad.csv"
    bad.write_text("real_key,synth_key,label\nnope.npy,s00.npy,1\n")
    with pytest.raises(ValueError, match="nope.npy"):
        A.evaluate(out, bad)
    bad.write_text("real,synth,label\na,b,1\n")
    with pytest.raises(ValueError, match="expected columns"):
        A.evaluate(out, bad)
    bad.write_text("real_key,synth_key,label\na,b,7\n")
    with pytest.raises(ValueError, match="must be 0"):
        A.evaluate(out, bad)


def test_evaluate_scores_the_audit_pairs_as_the_audit_verified_them(
    ssim_run: A.AuditResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verification also scores the search variant that gave a pair its search score (a flip or a shift of
    the flip/shift-aware search), so that the verified SSIM is never below it: evaluate does the same for the
    pairs the audit verified, so each gets the audit's verified SSIM (it missed the variant: 0.01-0.03 lower
    for pairs whose best shift by correlation was not the search's)."""
    rows = _rows(ssim_run.out)
    for r in rows:
        assert float(r["ssim"]) >= float(r["cosine"]) - 1e-5, r
    labels = _labels(tmp_path / "all.csv", *[(r["train_id"], r["synth_id"], 1) for r in rows])
    seen = _spy_evaluate_scores(monkeypatch)
    A.evaluate(ssim_run.out, labels)
    (score,) = seen
    np.testing.assert_allclose(score, [float(r["ssim"]) for r in rows], atol=2e-6)


def test_evaluate_lists_every_class_and_leaves_absent_ones_undefined(
    ssim_run: A.AuditResult, ds: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Labels with duplicates only: the table still lists different and similar, with support 0 and scores
    not defined (null in evaluation.json, 'n/a' printed, never NaN); the macro averages cover the classes
    that occur among labels or predictions (named in macro_classes), as sklearn's macro average."""
    import sklearn.metrics as skm

    from deepssim_fast.cli import main

    copies = [(src, s, 1) for s, (kind, src) in sorted(ds["truth"].items()) if kind != "novel"]
    r = A.evaluate(ssim_run.out, _labels(tmp_path / "dup.csv", *copies))
    assert list(r["per_class"]) == ["different", "similar", "duplicate"]
    for name in ("different", "similar"):
        assert r["per_class"][name] == {"label": A._REF_CODE[name], "precision": None, "recall": None,
                                        "f1": None, "support": 0}
    assert r["per_class"]["duplicate"]["support"] == 5 and r["macro_f1"] == 1.0
    assert r["macro_classes"] == ["duplicate"]
    saved = json.loads((ssim_run.out / "evaluation.json").read_text(), parse_constant=pytest.fail)
    assert saved["per_class"]["similar"]["f1"] is None and saved["macro_classes"] == ["duplicate"]
    # a novel slice annotated duplicate: 'different' is predicted but never true -> p 0, r 0, f1 0, averaged
    novel = (sorted(ds["train_arrays"])[0], "s10.npy", 1)
    labels = _labels(tmp_path / "mixed.csv", *copies, novel)
    r = A.evaluate(ssim_run.out, labels)
    assert r["per_class"]["different"] == {"label": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r["per_class"]["similar"]["f1"] is None and r["macro_classes"] == ["different", "duplicate"]
    y_true, y_pred = [1] * 6, [1] * 5 + [0]
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert r["macro_f1"] == pytest.approx((0 + 10 / 11) / 2)
    assert main(["evaluate", "--audit", str(ssim_run.out), "--labels", str(labels)]) == 0
    text = capsys.readouterr().out
    similar = next(line for line in text.splitlines() if line.startswith("similar"))
    assert similar.split() == ["similar", "n/a", "n/a", "n/a", "0"] and "nan" not in text.lower()
    none = A.classification_metrics([], [])
    assert none["macro_f1"] is None and none["macro_classes"] == [] and len(none["per_class"]) == 3


def test_slice_policy_on_nifti_inputs(tmp_path: Path) -> None:
    """NIfTI volumes are cut by the policy; the same volume as train and synth matches slice for slice."""
    p = data.dataset_path("anatomical")
    pol = SlicePolicy(axis=2, start=4, stop=20, step=4, min_foreground=0.0)
    r = A.audit(p, p, metric="ssim", k=1, policy=pol, out=tmp_path, progress=False)
    rows = _rows(tmp_path)
    assert [int(x["synth_index"]) for x in rows] == [4, 8, 12, 16]
    assert all(x["synth_index"] == x["train_index"] and float(x["ssim"]) == pytest.approx(1.0) for x in rows)
    assert r.summary["slice_policy"]["step"] == 4


def test_a_slice_range_that_selects_nothing_is_named_as_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file whose slice range selects no slice was skipped as having "no slice [that] passes the foreground
    threshold", blaming the wrong setting; the reason now names the range and the file's slice count."""
    vol = data.load_volume("aniso_vox").array.astype(np.float32)
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    big = np.concatenate([vol, vol, vol], axis=2)  # 3x the slices along axis 2
    np.save(tmp_path / "t" / "big.npy", big)
    np.save(tmp_path / "s" / "big_copy.npy", big)
    np.save(tmp_path / "s" / "small.npy", vol)  # the range is past its slices
    np.save(tmp_path / "s" / "dark.npy", np.zeros_like(big))  # in range, but no foreground
    n = vol.shape[2]
    pol = SlicePolicy(axis=2, start=n + 1, stop=n + 3, min_foreground=0.05)
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", k=1, policy=pol, out=tmp_path / "out",
                progress=False)
    reasons = {d["path"]: d["reason"] for d in r.summary["skipped"] if d["set"] == "synth"}
    small, dark = str(tmp_path / "s" / "small.npy"), str(tmp_path / "s" / "dark.npy")
    assert f"slice range {n + 1}:{n + 3}:1 selects none of its {n} slices along axis 2" in reasons[small]
    assert "no slice passes the foreground threshold" in reasons[dark]


def test_files_in_both_sets_are_warned_about(ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A synthetic file that is also a training file (the same path, or a link to it) matches itself as a
    duplicate; the audit warns, naming it, instead of reporting it as memorised without a word."""
    one = tmp_path / "synth"
    one.mkdir()
    src = ds["train"] / "mni_030.npy"
    (one / "linked.npy").symlink_to(src)
    np.save(one / "other.npy", np.load(ds["train"] / "mni_038.npy")[::-1].copy())
    with caplog.at_level("WARNING", logger="deepssim_fast.audit"):
        A.audit(ds["train"], one, metric="ssim", k=1, out=tmp_path / "out", progress=False)
    msgs = [r.getMessage() for r in caplog.records if "also training files" in r.getMessage()]
    assert len(msgs) == 1 and "1 synthetic file(s)" in msgs[0] and "linked.npy" in msgs[0]
    assert "found twice" not in caplog.text


def test_a_file_found_twice_in_one_set_is_warned_about(ds: dict, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A folder and a link to it (or a file and a link to it) in one set gave each file twice: two items, a
    synthetic copy counted twice in the fraction memorised, without a word."""
    one = tmp_path / "synth"
    one.mkdir()
    np.save(one / "a.npy", np.load(ds["train"] / "mni_030.npy"))
    np.save(one / "b.npy", np.load(ds["train"] / "mni_038.npy")[::-1].copy())
    (tmp_path / "alias").symlink_to(one, target_is_directory=True)
    with caplog.at_level("WARNING", logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], [one, tmp_path / "alias"], metric="ssim", k=1, out=tmp_path / "out",
                    progress=False)
    msgs = [m.getMessage() for m in caplog.records if "found twice" in m.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("2 synthetic file(s) are found twice"), msgs
    assert str(one / "a.npy") in msgs[0] and str(tmp_path / "alias" / "a.npy") in msgs[0]
    assert r.summary["n_synth"] == 4  # (still audited as given: the warning says so)


def test_dask_search_equals_local_search(ds: dict, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    local = A.audit(
        ds["train"], ds["synth"], metric="correlation", k=4, out=tmp_path / "local", progress=False
    )
    dask = A.audit(
        ds["train"], ds["synth"], metric="correlation", k=4, out=tmp_path / "dask", workers=1, progress=False
    )
    assert (tmp_path / "dask" / "shards").is_dir()
    assert (tmp_path / "local" / "matches.csv").read_bytes() == (
        tmp_path / "dask" / "matches.csv"
    ).read_bytes()
    assert local.summary["pair_counts_search"] == dask.summary["pair_counts_search"]


def test_dask_flip_search_starts_one_cluster_for_all_variants(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With flips (or shifts) the search runs once per transform; with workers= each run had started and
    closed its own LocalCluster (2-5 s apiece). One cluster now serves them all, with the same results."""
    pytest.importorskip("distributed")
    from deepssim_fast import distributed as dd

    started = []
    real = dd.start_local_cluster

    def spy(n: int):  # noqa: ANN202
        started.append(n)
        return real(n)

    monkeypatch.setattr(dd, "start_local_cluster", spy)
    kw = dict(metric="correlation", k=4, verify="none", verify_flips=True, progress=False)
    local = A.audit(ds["train"], ds["synth"], out=tmp_path / "local", **kw)
    assert started == []
    dask = A.audit(ds["train"], ds["synth"], out=tmp_path / "dask", workers=1, **kw)
    assert started == [1]
    assert (tmp_path / "dask" / "shards_hflip").is_dir() and (tmp_path / "dask" / "shards_vflip").is_dir()
    assert (tmp_path / "local" / "matches.csv").read_bytes() == (tmp_path / "dask" / "matches.csv").read_bytes()
    assert local.summary["pair_counts_search"] == dask.summary["pair_counts_search"]
    assert {r["transform"] for r in _rows(tmp_path / "dask")} >= {"none"}


def test_dask_options_are_checked_before_any_work(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers= and scheduler= together, or a bad workers=, were found only when the search was reached, after
    the whole decode (and embedding); and with flips or shifts a local cluster of workers= was started and the
    scheduler given beside it silently left unused. Each is now an error before any file is read."""
    pytest.importorskip("distributed")
    from deepssim_fast import distributed as dd

    def no_cluster(*args, **kw):  # noqa: ANN202
        raise AssertionError("a Dask cluster was started")

    monkeypatch.setattr(dd, "start_local_cluster", no_cluster)
    monkeypatch.setattr(dd, "cluster_client", no_cluster)
    kw = dict(metric="correlation", k=4, progress=False)
    for i, (extra, match) in enumerate([
        (dict(workers=1, scheduler="tcp://127.0.0.1:1", verify="none", verify_flips=True), "not both"),
        (dict(workers=1, scheduler="tcp://127.0.0.1:1", verify_shifts=1), "not both"),
        (dict(workers=0), "workers must be a positive integer"),
        (dict(workers=1.5), "workers must be a positive integer"),
        (dict(workers=True), "workers must be a positive integer"),
        (dict(scheduler=""), "scheduler must be a Dask scheduler address"),
    ]):
        out = tmp_path / f"o{i}"
        with pytest.raises(ValueError, match=match):
            A.audit(ds["train"], ds["synth"], out=out, **kw, **extra)
        assert not (out / "work").exists(), extra


def test_demo_data_ground_truth_is_measured(tmp_path: Path) -> None:
    """The demo set: neutral file names, truth from measured verified SSIM, rebuilt byte-identically."""
    from deepssim_fast.demo import THRESHOLDS, VERIFY, build_demo_data

    d = build_demo_data(tmp_path, seed=1, n_copies=6, n_near=3, n_novel=6)
    planted = d["planted"]
    kinds = [p.kind for p in planted]
    assert kinds.count("copy") == 6 and kinds.count("near") == 3 and 1 <= kinds.count("novel") <= 6
    assert sorted(f.name for f in d["synth_dir"].iterdir()) == [
        f"synth_{i:04d}.npy" for i in range(len(planted))
    ]
    for p in planted:
        assert p.measured_ssim is not None
        assert p.truth == A.LABELS[int(A.label_of(p.measured_ssim, THRESHOLDS))]
        if p.kind == "near":
            assert p.truth == "similar"
        if p.kind == "novel":
            assert p.truth == "different"
    copy = next(p for p in planted if p.kind == "copy")
    v, _ = A.verify_pairs(
        np.load(d["train_dir"] / copy.source)[None],
        np.load(d["synth_dir"] / copy.name)[None],
        spatial_dims=2,
        flips=VERIFY["verify_flips"],
        shifts=VERIFY["verify_shifts"],
        rotations=VERIFY["verify_rotations"],
    )
    assert v[0] == pytest.approx(copy.measured_ssim, abs=1e-6)
    rows = list(csv.DictReader(open(d["truth_csv"])))
    assert [r["synth"] for r in rows] == [p.name for p in planted]
    mtimes = {f.name: f.stat().st_mtime_ns for f in d["synth_dir"].iterdir()}
    # a damaged ground_truth.csv is replaced atomically (a new file moved over it), not rewritten in place:
    # a reader holding the old file (here a hard link to it) never sees a half-written one
    truth = d["truth_csv"].read_bytes()
    d["truth_csv"].write_text("synth,kind\n")
    os.link(d["truth_csv"], tmp_path / "held.csv")
    build_demo_data(tmp_path, seed=1, n_copies=6, n_near=3, n_novel=6)
    assert {f.name: f.stat().st_mtime_ns for f in d["synth_dir"].iterdir()} == mtimes  # unchanged files kept
    assert d["truth_csv"].read_bytes() == truth
    assert (tmp_path / "held.csv").read_text() == "synth,kind\n"
    # files the demo did not write, in a folder given as its --out: the synthetic ones were deleted as stale
    # and the training ones audited as demo data, without a word; refused now, nothing touched
    (d["synth_dir"] / ".synth_0000.npy.ab12.tmp").write_bytes(b"")  # (an interrupted write's: the demo's)
    build_demo_data(tmp_path, seed=1, n_copies=6, n_near=3, n_novel=6)
    for folder, name in ((d["synth_dir"], "my_precious_synth.npy"), (d["train_dir"], "my_train.npy")):
        np.save(folder / name, np.ones((8, 8), np.float32))
        with pytest.raises(ValueError, match=rf"holds 1 file\(s\) the demo did not write \(e\.g\. {name}\)"):
            build_demo_data(tmp_path, seed=2, n_copies=6, n_near=3, n_novel=6)
        assert (folder / name).exists()
        (folder / name).unlink()


# ----------------------------------------------------------------------------------------------------
# Regressions: odd file names, symlinks, flips of volumes, evaluate without verification, permissions,
# blank images, progress of the variant search, labels files, embedding widths, 4D volumes
# ----------------------------------------------------------------------------------------------------
def _spy_evaluate_scores(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """The scores evaluate labels, one array per label_of call (appended as it runs)."""
    seen: list[np.ndarray] = []
    real = A.label_of
    monkeypatch.setattr(A, "label_of", lambda s, th: (seen.append(np.array(s, dtype=np.float64)), real(s, th))[1])
    return seen


def _labels(path: Path, *rows: tuple[str, str, int]) -> Path:
    path.write_text("real_key,synth_key,label\n" + "".join(f"{r},{s},{lab}\n" for r, s, lab in rows))
    return path


def test_hash_in_directory_name_keeps_the_whole_path(ds: dict, tmp_path: Path) -> None:
    """Item ids are ``<path>#<axis>:<index>``: a '#' inside the path must not cut the path short."""
    synth = tmp_path / "run#3" / "synth"
    synth.mkdir(parents=True)
    src = sorted(ds["train_arrays"])[2]
    np.save(synth / "copy#1.npy", ds["train_arrays"][src])
    out = tmp_path / "o#ut"
    A.audit(ds["train"], synth, metric="ssim", k=1, verify="none", out=out, progress=False)
    (row,) = _rows(out)
    assert row["synth_path"] == str(synth / "copy#1.npy")
    assert row["synth_id"] == f"{synth / 'copy#1.npy'}#2:0"
    assert Path(row["train_path"]).name == src and row["label"] == "duplicate"
    html = (out / "report.html").read_text()
    assert "copy#1.npy#2:0" in html
    ev = A.evaluate(out, _labels(tmp_path / "l.csv", (src, "copy#1.npy", 1), (src, "copy#1", 1)))
    assert ev["accuracy"] == 1.0
    # whole volumes have the bare path as their id
    vol = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    (tmp_path / "v#t").mkdir()
    np.save(tmp_path / "v#t" / "a.npy", vol)
    A.audit(tmp_path / "v#t", tmp_path / "v#t", metric="ssim", mode="volumes", k=1, verify="none",
            out=tmp_path / "ov", progress=False)
    (row,) = _rows(tmp_path / "ov")
    assert row["synth_path"] == row["synth_id"] == str(tmp_path / "v#t" / "a.npy")


def test_file_names_that_are_not_utf8_are_audited_and_reported(ds: dict, tmp_path: Path) -> None:
    """A file named in another encoding (Latin-1 ``Müller.npy``: the byte 0xfc, which Python keeps as the lone
    surrogate ``\\udcfc``) is audited like any other: hashing its cache key raised UnicodeEncodeError, the gallery
    TypeError. matches.csv keeps the name's own bytes (so the path opens the file); the figure and the UTF-8 page
    show U+FFFD for the byte."""
    synth = tmp_path / "synth"
    synth.mkdir()
    src = sorted(ds["train_arrays"])[2]
    name = os.fsdecode(b"M\xfcller.npy")
    try:
        with open(synth / name, "wb") as f:
            np.save(f, ds["train_arrays"][src])
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    out = tmp_path / "o"
    r = A.audit(ds["train"], synth, metric="ssim", k=1, out=out, progress=False)
    assert r.summary["counts"]["duplicate"] == 1
    with open(out / "matches.csv", newline="", errors="surrogateescape") as f:
        (row,) = list(csv.DictReader(f))
    assert row["synth_path"] == str(synth / name) and Path(row["synth_path"]).is_file()
    assert Path(row["train_path"]).name == src and float(row["ssim"]) == pytest.approx(1.0)
    page = (out / "report.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert "M\ufffdller.npy#2:0" in page


def test_volumes_verify_flips_mirrors_every_axis(tmp_path: Path) -> None:
    """In mode='volumes' a copy mirrored along any of the three axes (axis 0 is left-right in RAS) is found."""
    rng = np.random.default_rng(11)
    vol = rng.random((14, 15, 16)).astype(np.float32)
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "orig.npy", vol)
    np.save(tmp_path / "t" / "other.npy", rng.random(vol.shape).astype(np.float32))
    for ax in range(3):
        np.save(tmp_path / "s" / f"flip{ax}.npy", np.ascontiguousarray(np.flip(vol, axis=ax)))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=2, verify_flips=True,
                out=tmp_path / "o", progress=False)
    rows = {Path(x["synth_path"]).stem: x for x in _best(_rows(tmp_path / "o")).values()}
    for ax in range(3):
        x = rows[f"flip{ax}"]
        assert Path(x["train_path"]).name == "orig.npy" and x["label"] == "duplicate", x
        assert float(x["ssim"]) == pytest.approx(1.0, abs=1e-5) and x["transform"] == f"flip{ax}", x
    assert r.summary["counts"]["duplicate"] == 3
    # 2D keeps its horizontal / vertical flips, and both (format 8; before it, the single ones)
    assert [n for n, _ in A._flip_variants(True, 2)] == ["", "hflip", "vflip", "hvflip"]
    assert [n for n, _ in A._flip_variants(True, 2, all_mirrors=False)] == ["", "hflip", "vflip"]
    assert [n for n, _ in A._flip_variants(True, 3)] == ["", "flip0", "flip1", "flip2", "flip01", "flip02", "flip12",
                                                        "flip012"]


def test_evaluate_ssim_metric_without_verification(ds: dict, tmp_path: Path) -> None:
    """With verify='none' evaluate scores each labelled pair with the search metric itself (here SSIM)."""
    out = tmp_path / "o"
    A.audit(ds["train"], ds["synth"], metric="ssim", k=2, verify="none", out=out, progress=False)
    rows = _rows(out)
    ref = {0: 0, 1: 2, 2: 1}  # audit label index -> reference code
    pairs = [(Path(r["train_path"]).name, Path(r["synth_path"]).name, ref[A.LABELS.index(r["label"])])
             for r in rows[::2]]
    ev = A.evaluate(out, _labels(tmp_path / "l.csv", *pairs))
    assert ev["accuracy"] == 1.0 and ev["n"] == len(pairs) == 8
    assert not (out / "work" / "train_vectors.npy").exists()


def test_evaluate_without_verification_scores_the_flip_shift_variants_as_the_search(
    ds: dict, tmp_path: Path
) -> None:
    """verify='none' with flips: the audit labels a flipped copy by its best variant score, and evaluate must
    score the labelled pair the same way (correlation from the stored pixels; deepssim by embedding the
    variants with the audit's encoder, checked by hash)."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    src = sorted(ds["train_arrays"])[4]
    synth = tmp_path / "s"
    synth.mkdir()
    np.save(synth / "up_down.npy", np.ascontiguousarray(ds["train_arrays"][src][::-1]))
    labels = _labels(tmp_path / "l.csv", (src, "up_down.npy", 1))
    out = tmp_path / "corr"
    A.audit(ds["train"], synth, metric="correlation", k=1, verify="none", verify_flips=True, out=out,
            progress=False)
    (row,) = _rows(out)
    assert Path(row["train_path"]).name == src and row["label"] == "duplicate"
    ev = A.evaluate(out, labels)
    assert ev["accuracy"] == 1.0 and ev["per_class"]["duplicate"]["recall"] == 1.0
    # deepssim: the variants are embedded again with the recorded encoder
    torch.manual_seed(0)
    model = build_model("small", input_size=64)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    out = tmp_path / "deep"
    A.audit(ds["train"], synth, model=ckpt, metric="deepssim", k=1, verify="none", verify_flips=True, out=out,
            progress=False)
    (row,) = _rows(out)
    label = row["label"]
    assert float(row["cosine"]) > 0.99999 and label == "duplicate"  # the flip variant is the copy itself
    assert A.evaluate(out, labels)["accuracy"] == 1.0
    other = save_checkpoint(tmp_path / "other.pt", build_model("small", input_size=64))
    with pytest.raises(ValueError, match="not the encoder this audit used"):
        A.evaluate(out, labels, model=other)
    # the recorded encoder moved away: said so, with the way out (it said only "model file ... does not exist")
    moved = Path(ckpt).rename(tmp_path / "moved.pt")
    with pytest.raises(FileNotFoundError, match=rf"it recorded in summary.json, {re.escape(str(ckpt))}, and that "
                                                r"file is no longer there: pass model= \(--model\)"):
        A.evaluate(out, labels)
    assert A.evaluate(out, labels, model=moved)["accuracy"] == 1.0


def test_evaluate_labels_a_searched_pair_with_the_audits_own_score(ds: dict, tmp_path: Path) -> None:
    """With verify='none', evaluate scored the labelled pairs again in float64, and a pair whose float32 search
    score and float64 value lie on either side of a threshold got another label than the audit gave it (a
    correlation of 0.9014099836 in the search, 0.9014099545 in float64, high = 0.90140997). A pair the search
    kept now takes the search's own score."""
    names = sorted(ds["train_arrays"])
    src = names[6]
    noisy = ds["train_arrays"][src] + np.random.default_rng(4).normal(0, 3.0, SIZE).astype(np.float32)
    synth = tmp_path / "s"
    synth.mkdir()
    np.save(synth / "near.npy", noisy)
    first = A.audit(ds["train"], synth, metric="correlation", k=1, verify="none", out=tmp_path / "o1",
                    progress=False)
    found = A.SearchResult.load(first.out / "work" / "search.npz")
    assert names[int(found.indices[0, 0])] == src
    s32 = float(found.scores[0, 0])
    a, b = (np.asarray(x, np.float64).ravel() for x in (ds["train_arrays"][src], noisy))
    a, b = a - a.mean(), b - b.mean()
    s64 = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert s32 != s64 and abs(s32 - s64) < 1e-6  # (the two roundings of one correlation)
    high = (s32 + s64) / 2  # a threshold between them: the two sides label the pair differently
    out = A.audit(ds["train"], synth, metric="correlation", k=1, verify="none", thresholds=(0.5, high),
                  out=tmp_path / "o2", progress=False).out
    (row,) = _rows(out)
    assert row["label"] == ("duplicate" if s32 > high else "similar")
    code = {"different": 0, "duplicate": 1, "similar": 2}[row["label"]]
    ev = A.evaluate(out, _labels(tmp_path / "l.csv", (src, "near.npy", code)))
    assert ev["accuracy"] == 1.0 and ev["n"] == 1


def test_evaluate_takes_the_audit_encoder_as_an_object_or_as_its_file(ds: dict, tmp_path: Path) -> None:
    """A file is recorded by the hash of its bytes, a model object by its module hash: evaluate told the user
    that the encoder loaded from the audit's own checkpoint 'is not the encoder this audit used' (and, for an
    audit run with a model object, that its checkpoint file was not). Either form of the same encoder is
    accepted; another encoder is still refused."""
    import torch

    from deepssim_fast.model import build_model, load_model, save_checkpoint

    src = sorted(ds["train_arrays"])[4]
    synth = tmp_path / "s"
    synth.mkdir()
    np.save(synth / "up_down.npy", np.ascontiguousarray(ds["train_arrays"][src][::-1]))
    labels = _labels(tmp_path / "l.csv", (src, "up_down.npy", 1))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64))
    other = build_model("small", input_size=64)
    kw = dict(metric="deepssim", k=1, verify="none", verify_flips=True, progress=False)
    by_file = A.audit(ds["train"], synth, model=ckpt, out=tmp_path / "f", **kw).out
    by_object = A.audit(ds["train"], synth, model=load_model(ckpt), out=tmp_path / "o", **kw).out
    assert A.evaluate(by_file, labels, model=load_model(ckpt))["accuracy"] == 1.0
    assert A.evaluate(by_object, labels, model=ckpt)["accuracy"] == 1.0
    for out in (by_file, by_object):
        with pytest.raises(ValueError, match="not the encoder this audit used"):
            A.evaluate(out, labels, model=other)


def test_a_rerun_with_another_encoder_embeds_the_search_variants_again(ds: dict, tmp_path: Path) -> None:
    """The embeddings of the flipped synthetic items are kept in OUT/work for a resume or a rerun with other
    thresholds. A rerun into the same OUT with another encoder reused the first encoder's, silently (13
    flipped MNI slices against 28: 46 of the 65 rows of matches.csv differed from the same audit into a fresh
    OUT). Now they are embedded again, and still kept when only the thresholds change."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    first = save_checkpoint(tmp_path / "a.pt", build_model("small", input_size=64))
    torch.manual_seed(1)
    second = save_checkpoint(tmp_path / "b.pt", build_model("small", input_size=64))
    kw = dict(metric="deepssim", k=5, verify="none", verify_flips=True, progress=False)
    reused = tmp_path / "reused"
    A.audit(ds["train"], ds["synth"], model=first, out=reused, **kw)
    flips = sorted((reused / "work").glob("synth_vectors_*.npy"))
    assert [f.name for f in flips] == ["synth_vectors_hflip.npy", "synth_vectors_hvflip.npy",
                                       "synth_vectors_vflip.npy"]
    A.audit(ds["train"], ds["synth"], model=second, out=reused, **kw)
    A.audit(ds["train"], ds["synth"], model=second, out=tmp_path / "fresh", **kw)
    got, want = _rows(reused), _rows(tmp_path / "fresh")
    assert len(got) == len(want) > 0
    assert [(r["train_id"], r["cosine"], r["transform"]) for r in got] == [
        (r["train_id"], r["cosine"], r["transform"]) for r in want
    ]
    # other thresholds only: the variants' embeddings are kept (not written again)
    stamps = {f.name: f.stat().st_mtime_ns for f in flips}
    A.audit(ds["train"], ds["synth"], model=second, out=reused, thresholds=(0.5, 0.9), **kw)
    assert {f.name: f.stat().st_mtime_ns for f in flips} == stamps


def test_verify_none_names_the_searched_transform_that_gave_the_score(ds: dict, tmp_path: Path) -> None:
    """verify='none' with flips and shifts: matches.csv's transform names the variant of the synthetic item
    whose search score won (as verification names transforms: 'none', 'vflip', 'shift(dy,dx)'), also after
    resuming from a search saved before transforms were recorded; on equal scores the untransformed item,
    then the earliest variant, is named."""
    names = sorted(ds["train_arrays"])
    synth = tmp_path / "s"
    synth.mkdir()
    np.save(synth / "a_same.npy", ds["train_arrays"][names[2]])
    np.save(synth / "b_updown.npy", np.ascontiguousarray(ds["train_arrays"][names[5]][::-1]))
    np.save(synth / "c_shifted.npy", A._shift(ds["train_arrays"][names[8]], (2, -2)))
    out = tmp_path / "o"
    kw = dict(metric="correlation", k=1, verify="none", verify_flips=True, verify_shifts=2, out=out, progress=False)
    A.audit(ds["train"], synth, **kw)
    want = {"a_same.npy": (names[2], "none"), "b_updown.npy": (names[5], "vflip"),
            "c_shifted.npy": (names[8], "shift(-2,2)")}
    got = {Path(r["synth_path"]).name: (Path(r["train_path"]).name, r["transform"]) for r in _rows(out)}
    assert got == want
    assert "<td>vflip</td>" in (out / "report.html").read_text()  # the report's suspects name it too
    # a search.npz of an earlier version (no transforms): searched again on resume, same outputs
    matches = (out / "matches.csv").read_bytes()
    res = A.SearchResult.load(out / "work" / "search.npz")
    assert res.transforms is not None
    res.transforms = None
    res.save(out / "work" / "search.npz")
    (out / "matches.csv").unlink()
    A.audit(ds["train"], synth, **kw)
    assert (out / "matches.csv").read_bytes() == matches
    # ties: the earlier result's transform (the plain search first, then the variants in the order searched)
    one = np.array([[0.5]], np.float32)
    r0 = A.SearchResult(one, np.array([[3]]), np.zeros(1, np.int64), np.zeros(2), dict.fromkeys(A.LABELS, 0))
    m = A._merge_topk(r0, A.SearchResult(one.copy(), np.array([[3]]), r0.counts, r0.edges, r0.class_counts), 1,
                      "hflip")
    m = A._merge_topk(m, A.SearchResult(one + 0.25, np.array([[3]]), r0.counts, r0.edges, r0.class_counts), 1,
                      "vflip")
    m2 = A._merge_topk(m, A.SearchResult(one + 0.25, np.array([[3]]), r0.counts, r0.edges, r0.class_counts), 1,
                       "shift(0,1)")
    assert m.transforms.tolist() == m2.transforms.tolist() == [["vflip"]] and m2.scores.tolist() == [[0.75]]
    assert A._merge_topk(r0, r0, 1, "hflip").transforms.tolist() == [["none"]]


def test_interrupted_rerun_with_other_settings_leaves_no_stale_outputs(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun into the same OUT with other settings removes the old run's outputs before any work, so an
    interruption cannot leave them beside the new run's work/ (where evaluate would combine the two); and
    evaluate refuses a summary.json whose run is not the one in work/. Temporary files of killed writes
    are swept at the start of a run."""
    kw = dict(metric="correlation", k=2, verify="none", out=tmp_path, progress=False)
    A.audit(ds["train"], ds["synth"], **kw)
    old_summary = (tmp_path / "summary.json").read_bytes()
    labels = _labels(tmp_path / "l.csv", ("mni_030.npy", "s00.npy", 0))
    A.evaluate(tmp_path, labels)
    assert (tmp_path / "evaluation.json").exists()

    def die(stage: str, index: int) -> None:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    for d in ("shards", "shards_hflip", "shards_shift3", "shards_backup"):  # the last one is not the audit's
        (tmp_path / d).mkdir()
    with pytest.raises(KeyboardInterrupt):
        A.audit(ds["train"], ds["synth"], **dict(kw, thresholds=(0.3, 0.5), verify="ssim"))
    assert sorted(p.name for p in tmp_path.glob("shards*")) == ["shards_backup"]
    for name in ("matches.csv", "summary.json", "report.html", "histogram.png", "gallery.png", "evaluation.json"):
        assert not (tmp_path / name).exists(), name
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        A.evaluate(tmp_path, labels)
    (tmp_path / "summary.json").write_bytes(old_summary)  # e.g. restored by hand, or copied from elsewhere
    with pytest.raises(ValueError, match="different runs"):
        A.evaluate(tmp_path, labels)
    # leftovers of killed writes go at the next start; the finished run is complete and consistent
    leftovers = [tmp_path / ".matches.csv.k1ll3d0.tmp", tmp_path / "work" / ".synth_pixels.npy.x7y8z9.tmp"]
    for f in leftovers:
        f.write_bytes(b"partial")
    theirs = tmp_path / ".notes.txt.abc.tmp"  # not one of the audit's files: OUT may be the user's folder
    theirs.write_text("keep")
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: None)
    A.audit(ds["train"], ds["synth"], **dict(kw, thresholds=(0.3, 0.5), verify="ssim"))
    assert not any(f.exists() for f in leftovers)
    assert list(tmp_path.glob(".*.tmp")) == [theirs] and not list((tmp_path / "work").glob(".*.tmp"))
    th = json.loads((tmp_path / "summary.json").read_text())["thresholds"]
    assert (th["low"], th["high"]) == (0.3, 0.5)
    A.evaluate(tmp_path, labels)


def test_rerun_killed_before_it_owns_work_leaves_the_finished_run_evaluable(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun with other inputs rewrote work/<set>_pixels.npy while building its items, before it reset the
    state of the finished run: killed in between, it left the old summary.json, state and items.json beside
    the new pixels, and evaluate scored the old ids on the new images without a word. The stores are now
    written only once the run owns work/."""
    train, synth = ds["train"], ds["synth"]
    kw = dict(metric="ssim", k=2, out=tmp_path, progress=False)
    A.audit(train, [synth / "s04.npy", synth / "s10.npy"], **kw)  # the identity copy and a novel scan
    labels = _labels(tmp_path / "l.csv", (ds["truth"]["s04.npy"][1], "s04.npy", 1), ("mni_030.npy", "s10.npy", 0))
    before = A.evaluate(tmp_path, labels)
    assert before["per_class"]["duplicate"]["recall"] == 1.0
    pixels = (tmp_path / "work" / "synth_pixels.npy").read_bytes()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_stage_state", killed)
    with pytest.raises(KeyboardInterrupt):  # as many synthetic items, other images
        A.audit(train, [synth / "s00.npy", synth / "s11.npy"], **kw)
    assert (tmp_path / "work" / "synth_pixels.npy").read_bytes() == pixels
    assert A.evaluate(tmp_path, labels) == before


def test_resume_keeps_its_pixel_stores_and_a_changed_run_never_reuses_old_ones(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run rewrote work/<set>_pixels.npy, a resume too (10^5 items of 256 x 256 are ~26 GB). A resume now
    keeps them; a run with another configuration removes them when it takes over work/, so that, killed before
    it wrote its own, the next run cannot take the previous configuration's stores for its own."""
    train, synth = ds["train"], [ds["synth"] / "s04.npy", ds["synth"] / "s10.npy"]
    kw = dict(metric="ssim", k=2, out=tmp_path / "o", progress=False)
    A.audit(train, synth, **kw)
    store = tmp_path / "o" / "work" / "train_pixels.npy"
    first = store.stat().st_mtime_ns
    matches = (tmp_path / "o" / "matches.csv").read_bytes()
    A.audit(train, synth, **kw)  # a resume of the finished run
    assert store.stat().st_mtime_ns == first and (tmp_path / "o" / "matches.csv").read_bytes() == matches

    real = A._write_pixels

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_write_pixels", killed)
    small = dict(kw, size=(96, 112))  # another configuration, killed once it owns work/
    with pytest.raises(KeyboardInterrupt):
        A.audit(train, synth, **small)
    assert not store.exists() and not (tmp_path / "o" / "work" / "synth_pixels.npy").exists()
    monkeypatch.setattr(A, "_write_pixels", real)
    A.audit(train, synth, **small)
    A.audit(train, synth, **dict(small, out=tmp_path / "fresh"))
    assert (tmp_path / "o" / "matches.csv").read_bytes().replace(b"/o/", b"/x/") == (
        tmp_path / "fresh" / "matches.csv").read_bytes().replace(b"/fresh/", b"/x/")
    assert np.load(store).shape[1:] == (96, 112)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_outputs_follow_the_umask(ssim_run: A.AuditResult, tmp_path: Path) -> None:
    from deepssim_fast._atomic import atomic_write_bytes

    want = 0o666 & ~_umask()
    for name in ("matches.csv", "summary.json", "report.html", "gallery.png", "histogram.png"):
        assert (ssim_run.out / name).stat().st_mode & 0o777 == want, name
    old = os.umask(0o022)
    try:
        assert atomic_write_bytes(tmp_path / "a.txt", b"x").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_bytes(tmp_path / "b.txt", b"x").stat().st_mode & 0o777 == 0o600
        os.chmod(tmp_path / "a.txt", 0o640)  # an existing file keeps its mode
        assert atomic_write_bytes(tmp_path / "a.txt", b"y").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_bytes() == b"y"


def test_correlation_skips_blank_images_and_reports_them(ds: dict, tmp_path: Path) -> None:
    """A blank (constant) image has no Pearson correlation: it is skipped and listed, or --strict aborts."""
    synth, train = tmp_path / "synth", tmp_path / "train"
    shutil.copytree(ds["train"], train)
    synth.mkdir()
    src = sorted(ds["train_arrays"])[4]
    np.save(synth / "copy.npy", ds["train_arrays"][src])
    np.save(synth / "blank.npy", np.zeros(SIZE, np.float32))
    np.save(train / "zz_blank.npy", np.full(SIZE, 3.0, np.float32))
    r = A.audit(train, synth, metric="correlation", k=2, out=tmp_path / "o", progress=False)
    assert r.summary["n_synth"] == 1 and r.summary["n_train"] == 14 and r.summary["counts"]["duplicate"] == 1
    sk = {(s["set"], Path(s["path"]).name): s["reason"] for s in r.summary["skipped"]}
    assert set(sk) == {("synth", "blank.npy"), ("train", "zz_blank.npy")}
    assert "constant" in sk[("synth", "blank.npy")] and "blank.npy" in sk[("synth", "blank.npy")]
    assert "blank.npy" in (tmp_path / "o" / "report.html").read_text()
    with pytest.raises(DataError, match="blank.npy.*constant"):
        A.audit(train, synth, metric="correlation", k=2, out=tmp_path / "o2", strict=True, progress=False)
    # the SSIM metric scores blank images (no skip)
    r2 = A.audit(ds["train"], synth, metric="ssim", k=1, verify="none", out=tmp_path / "o3", progress=False)
    assert r2.summary["n_synth"] == 2 and r2.summary["skipped"] == []


def test_blank_synthetic_items_are_said_to_be_scored_in_the_summary_also_after_a_resume(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a probe: with --metric ssim or deepssim a constant (blank) synthetic image is scored, and beside a
    blank training image it is a duplicate (any two constant images have SSIM 1), so a generator emitting blank
    outputs was reported as memorising without a word (only --metric correlation, which skips them, named
    them). One warning now counts them (and the blank training items, if any), names one of each and says why
    they are duplicates; it is in summary.json's warnings and the report, the same after a resume."""
    import torch

    from deepssim_fast.model import build_model

    synth, train = tmp_path / "synth", tmp_path / "train"
    shutil.copytree(ds["train"], train)
    synth.mkdir()
    for name in ("s04.npy", "s12.npy"):
        shutil.copy(ds["synth"] / name, synth / name)
    np.save(synth / "blank.npy", np.zeros(SIZE, np.float32))
    np.save(synth / "blank2.npy", np.full(SIZE, 5.0, np.float32))
    kw = dict(metric="ssim", k=2, chunk_size=1, progress=False)
    alone = A.audit(ds["train"], synth, out=tmp_path / "alone", **kw)  # (no blank training item)
    (said,) = alone.summary["warnings"]
    assert said.startswith(f"2 of the 4 synthetic items are constant (blank; e.g. {synth / 'blank.npy'}#2:0); no "
                           "training item is: they are scored as any other item, and any two constant images have "
                           "SSIM 1"), said
    assert alone.summary["counts"]["duplicate"] == 1  # (s04, the planted copy)

    np.save(train / "zz_blank.npy", np.full(SIZE, 3.0, np.float32))
    whole = A.audit(train, synth, out=tmp_path / "whole", **kw)
    (said,) = whole.summary["warnings"]
    assert said.startswith(f"2 of the 4 synthetic items are constant (blank; e.g. {synth / 'blank.npy'}#2:0), and 1 "
                           f"of the 15 training items too (e.g. {train / 'zz_blank.npy'}#2:0)"), said
    assert "each blank synthetic item is a duplicate of a blank training item" in said
    assert whole.summary["counts"]["duplicate"] == 3 and whole.summary["skipped"] == []
    assert "2 of the 4 synthetic items are constant" in (tmp_path / "whole" / "report.html").read_text()

    def die(stage: str, index: int) -> None:
        if stage == "verify" and index == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    with pytest.raises(KeyboardInterrupt):
        A.audit(train, synth, out=tmp_path / "resumed", **kw)
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: None)
    resumed = A.audit(train, synth, out=tmp_path / "resumed", **kw)
    assert resumed.summary["warnings"] == [said]
    _compare_outputs(tmp_path / "whole", tmp_path / "resumed")

    # the deepssim metric scores them too (its encoder sees a blank image as all zeros); correlation skips them
    torch.manual_seed(0)
    r = A.audit(train, synth, model=build_model("small", input_size=64), metric="deepssim", k=2, verify="none",
                out=tmp_path / "deep", progress=False)
    assert r.summary["warnings"] == [said]
    r = A.audit(train, synth, metric="correlation", k=2, verify="none", out=tmp_path / "corr", progress=False)
    assert r.summary["warnings"] == [] and len(r.summary["skipped"]) == 3


def test_symlinked_synthetic_file_keeps_the_link_path(ds: dict, tmp_path: Path) -> None:
    synth = tmp_path / "synth"
    synth.mkdir()
    src = ds["train"] / sorted(ds["train_arrays"])[1]
    try:
        os.symlink(src, synth / "generated_0001.npy")
        os.symlink(src, synth / "generated_0002.npy")
    except (OSError, NotImplementedError):
        pytest.skip("this OS cannot make symlinks")
    out = tmp_path / "o"
    r = A.audit(ds["train"], synth, metric="ssim", k=1, verify="none", out=out, progress=False)
    rows = _rows(out)
    assert [x["synth_path"] for x in rows] == [str(synth / "generated_0001.npy"), str(synth / "generated_0002.npy")]
    assert all(x["train_path"] == str(src) and x["label"] == "duplicate" for x in rows)
    assert r.summary["n_synth"] == 2
    ev = A.evaluate(out, _labels(tmp_path / "l.csv", (src.name, "generated_0001.npy", 1)))
    assert ev["accuracy"] == 1.0


def test_linked_training_folder_is_searched_and_a_broken_link_is_reported(ds: dict, tmp_path: Path) -> None:
    """A symlinked sub-folder of an input folder is part of the set; a broken link is listed as skipped."""
    train = tmp_path / "train"
    train.mkdir()
    try:
        os.symlink(ds["train"], train / "site2", target_is_directory=True)
        os.symlink(tmp_path / "missing.npy", train / "broken.npy")
    except (OSError, NotImplementedError):
        pytest.skip("this OS cannot make symlinks")
    synth = ds["synth"] / "s04.npy"  # an identical copy
    r = A.audit(train, synth, metric="ssim", k=1, verify="none", out=tmp_path / "o", progress=False)
    assert r.summary["n_train_files"] == 15 and r.summary["n_train"] == 14
    assert [(s["set"], s["path"]) for s in r.summary["skipped"]] == [("train", str(train / "broken.npy"))]
    assert "broken symbolic link" in r.summary["skipped"][0]["reason"]
    (row,) = _rows(tmp_path / "o")
    assert row["train_path"].startswith(str(train / "site2") + os.sep) and row["label"] == "duplicate"
    with pytest.raises(DataError, match="broken.npy: broken symbolic link"):
        A.audit(train, synth, metric="ssim", k=1, verify="none", out=tmp_path / "o2", strict=True, progress=False)


def test_flip_and_shift_search_shows_a_progress_bar(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tqdm

    bars: list[tuple] = []
    init = tqdm.tqdm.__init__

    def spy(self, *args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("total"), kwargs.get("disable")))
        init(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.tqdm, "__init__", spy)
    kw = dict(metric="correlation", k=2, verify="none", verify_flips=True, verify_shifts=1)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "a", progress=True, **kw)
    variant = [b for b in bars if b[0] and "flip/shift" in b[0]]
    # 3 flips + 8 shifts of the 8 synthetic items, bar on (None: shown on a terminal)
    assert variant == [("flip/shift search", 11 * 8, None)], bars
    bars.clear()
    A.audit(ds["train"], ds["synth"], out=tmp_path / "b", progress=False, **kw)
    assert all(b[2] is True for b in bars if b[0] and "flip/shift" in b[0])
    assert any(b[0] and "flip/shift" in b[0] for b in bars)


def test_read_labels_bom_encoding_and_short_rows(tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_bytes("real_key,synth_key,label\na.png,b.png,1\n".encode("utf-8-sig"))  # Excel "CSV UTF-8"
    assert A.read_labels(f) == [("a.png", "b.png", 1)]
    f.write_bytes(b"real_key,synth_key,label\na.png,b.png,1\n\xe9t\xe9.png,c.png,0\n")  # latin-1
    with pytest.raises(ValueError, match=r"labels\.csv:3: .*UTF-8"):
        A.read_labels(f)
    f.write_text("real_key,synth_key,label\na.png,b.png,1\n\nc.png,d.png\n")
    with pytest.raises(ValueError, match=r"labels\.csv:4: .*3 fields"):
        A.read_labels(f)
    f.write_text("real_key,synth_key,label\na.png,,1\n")
    with pytest.raises(ValueError, match=r"labels\.csv:2: .*synth_key"):
        A.read_labels(f)
    f.write_text("real_key;synth_key;label\na;b;1\n")
    with pytest.raises(ValueError, match=r"labels\.csv: expected columns.*comma"):
        A.read_labels(f)


def test_evaluate_names_labels_file_and_line_of_an_unknown_key(ssim_run: A.AuditResult, tmp_path: Path) -> None:
    f = _labels(tmp_path / "lab.csv", ("mni_030.npy", "s00.npy", 1), ("nope.npy", "s00.npy", 1))
    with pytest.raises(ValueError, match=r"lab\.csv:3: .*nope\.npy"):
        A.evaluate(ssim_run.out, f)


def test_evaluate_says_when_a_model_it_was_given_is_not_used(ssim_run: A.AuditResult, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """evaluate --model on an ssim audit was ignored without a word."""
    f = _labels(tmp_path / "lab.csv", ("mni_030.npy", "s00.npy", 1))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.evaluate(ssim_run.out, f, model=tmp_path / "never_read.pt")
    assert "model= (--model) is not used for this audit (metric 'ssim', verify 'ssim')" in caplog.text


def test_evaluate_names_swapped_columns_and_warns_of_pairs_labelled_twice(
        ssim_run: A.AuditResult, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A labels file with real_key and synth_key swapped said only 'matches no audited item'; a pair labelled
    on two lines, two ways, was counted both ways without a word."""
    swapped = _labels(tmp_path / "sw.csv", ("s00.npy", "mni_030.npy", 1))
    with pytest.raises(ValueError, match=r"sw\.csv:2: label key 's00\.npy' matches no audited item.*names a "
                                         r"synthetic item.*columns swapped"):
        A.evaluate(ssim_run.out, swapped)
    twice = _labels(tmp_path / "tw.csv", ("mni_030.npy", "s00.npy", 1), ("mni_038.npy", "s10.npy", 0),
                    ("mni_030.npy", "s00.npy", 0))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        res = A.evaluate(ssim_run.out, twice)
    assert "1 pair(s) are labelled on more than one line (1 of them with different labels)" in caplog.text
    assert "line 2 (label 1), line 4 (label 0)" in caplog.text
    assert res["n"] == 3  # each line still counts
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.evaluate(ssim_run.out, _labels(tmp_path / "once.csv", ("mni_030.npy", "s00.npy", 1)))
    assert "more than one line" not in caplog.text


def test_evaluate_takes_label_keys_that_are_relative_paths(
    ssim_run: A.AuditResult, ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: keys may be paths. A path relative to the working directory (as --train/--synth are given)
    matched no item ('use an id, path, file name or stem'); it now names the file it names from there."""
    monkeypatch.chdir(ds["train"].parent)
    rel = _labels(tmp_path / "rel.csv", ("train/mni_030.npy", "synth/s04.npy", 1),
                  ("./train/mni_038.npy#2:0", "synth/../synth/s10.npy", 0))
    by_name = _labels(tmp_path / "names.csv", ("mni_030.npy", "s04.npy", 1), ("mni_038.npy", "s10.npy", 0))
    assert A.evaluate(ssim_run.out, rel) | {"labels_file": ""} == A.evaluate(ssim_run.out, by_name) | {
        "labels_file": ""}
    with pytest.raises(ValueError, match=r"rel2\.csv:2: label key 'elsewhere/mni_030\.npy' matches no"):
        A.evaluate(ssim_run.out, _labels(tmp_path / "rel2.csv", ("elsewhere/mni_030.npy", "s04.npy", 1)))


def test_evaluate_takes_the_reference_keys(ssim_run: A.AuditResult, tmp_path: Path) -> None:
    """The reference's label keys are "<parent folder>___<stem>" (its images: <base>/<uid>/<name>.png); they
    matched no audited item. They now name the item of that folder and stem."""
    ref = _labels(tmp_path / "ref.csv", ("train___mni_030", "synth___s04", 1), ("train___mni_038", "synth___s10", 0))
    by_name = _labels(tmp_path / "names.csv", ("mni_030.npy", "s04.npy", 1), ("mni_038.npy", "s10.npy", 0))
    assert A.evaluate(ssim_run.out, ref) | {"labels_file": ""} == A.evaluate(ssim_run.out, by_name) | {
        "labels_file": ""}
    with pytest.raises(ValueError, match=r"ref2\.csv:2: label key 'synth___mni_030' matches no"):
        A.evaluate(ssim_run.out, _labels(tmp_path / "ref2.csv", ("synth___mni_030", "s04.npy", 1)))


def test_an_embeddings_file_without_the_numpy_header_is_skipped_with_that_reason(tmp_path: Path) -> None:
    """metric='embeddings' skipped a junk .npy with numpy's "This file contains pickled (object) data. If you
    trust the file you can load it unsafely ..." as the reason in summary.json; it now says: no NumPy header."""
    rng = np.random.default_rng(2)
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a.npy", rng.standard_normal((4, 8)).astype(np.float32))
    np.save(tmp_path / "s" / "b.npy", rng.standard_normal((2, 8)).astype(np.float32))
    (tmp_path / "s" / "junk.npy").write_bytes(b"junk")
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="embeddings", k=2, verify="none", out=tmp_path / "o",
                progress=False)
    (sk,) = r.summary["skipped"]
    assert sk["path"].endswith("junk.npy") and "no NumPy header" in sk["reason"]
    assert "pickle" not in sk["reason"]


def _embedding_dirs(root: Path, seed: int, train: dict[str, tuple[int, int]],
                    synth: dict[str, tuple[int, int]]) -> None:
    """root/t and root/s with .npy files of random float32 embedding rows of the given shapes (drawn in order)."""
    rng = np.random.default_rng(seed)
    for sub, files in (("t", train), ("s", synth)):
        (root / sub).mkdir()
        for name, shape in files.items():
            np.save(root / sub / name, rng.standard_normal(shape).astype(np.float32))


def test_embeddings_of_another_width_are_skipped_by_path(tmp_path: Path) -> None:
    _embedding_dirs(tmp_path, 2, {"a.npy": (6, 16), "b.npy": (2, 8)}, {"good.npy": (3, 16), "narrow.npy": (2, 8)})
    kw = dict(metric="embeddings", k=2, verify="none", progress=False)
    r = A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", **kw)
    assert r.summary["n_train"] == 6 and r.summary["n_synth"] == 3
    sk = {Path(s["path"]).name: s["reason"] for s in r.summary["skipped"]}
    assert set(sk) == {"b.npy", "narrow.npy"}
    assert "width 8" in sk["narrow.npy"] and "16" in sk["narrow.npy"] and "narrow.npy" in sk["narrow.npy"]
    # a label naming a skipped input says so and why (it was "matches no audited item")
    a_row, good_row = str(tmp_path / "t" / "a.npy") + "#row:0", str(tmp_path / "s" / "good.npy") + "#row:0"
    for key in ("narrow.npy", "narrow", str(tmp_path / "s" / "narrow.npy")):
        with pytest.raises(ValueError, match=r"lab\.csv:2: label key .* names an input the audit skipped: "
                                             r".*narrow\.npy: .*width 8"):
            A.evaluate(tmp_path / "o", _labels(tmp_path / "lab.csv", (a_row, key, 1)))
    with pytest.raises(ValueError, match=r"names an input the audit skipped: .*b\.npy"):
        A.evaluate(tmp_path / "o", _labels(tmp_path / "lab.csv", ("b.npy", good_row, 1)))
    with pytest.raises(DataError, match=r"b\.npy.*width 8"):
        A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o2", strict=True, **kw)
    with pytest.raises(ValueError, match=r"--verify none"):
        A.audit(tmp_path / "t", tmp_path / "s", metric="embeddings", out=tmp_path / "o3", progress=False)


def test_evaluate_names_every_bad_label_row_at_once(tmp_path: Path) -> None:
    """A labels file with several unusable keys is reported whole, one line per bad row (it stopped at the first,
    so each fix and rerun found the next)."""
    _embedding_dirs(tmp_path, 3, {"a.npy": (4, 16)}, {"good.npy": (3, 16), "narrow.npy": (2, 8)})
    A.audit(tmp_path / "t", tmp_path / "s", metric="embeddings", k=2, verify="none", out=tmp_path / "o",
            progress=False)
    a_row, good_row = str(tmp_path / "t" / "a.npy") + "#row:0", str(tmp_path / "s" / "good.npy") + "#row:0"
    rows = [(a_row, "narrow.npy", 1), (a_row, good_row, 1), ("nope.npy", good_row, 0), ("ghost", "phantom", 0)]
    rows += [("nope.npy", good_row, 0)] * 12
    with pytest.raises(ValueError) as info:
        A.evaluate(tmp_path / "o", _labels(tmp_path / "lab.csv", *rows))
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'lab.csv'}:2: label key 'narrow.npy' names an input the audit skipped: ")
    assert "16 label keys in 15 rows" in msg
    assert "lab.csv:4: label key 'nope.npy' matches no audited item" in msg
    # both keys of one row are named
    assert "lab.csv:5: label key 'ghost' matches no audited item" in msg
    assert "lab.csv:5: label key 'phantom' matches no audited item" in msg
    assert "lab.csv:3:" not in msg  # the good row
    assert "and 6 more" in msg  # 16 problems: the first 10 are quoted
    # one bad row alone: the message is that row's, as before
    with pytest.raises(ValueError, match=r"^\S*lab1\.csv:2: label key 'nope\.npy' matches no audited item \("):
        A.evaluate(tmp_path / "o", _labels(tmp_path / "lab1.csv", ("nope.npy", good_row, 0)))


def test_empty_and_complex_embedding_files_are_skipped_by_path(tmp_path: Path) -> None:
    """A 0-row .npy is an unreadable input named with its shape (it ended as 'empty input set', naming no
    file); complex rows are refused (they lost their imaginary part) as read_image refuses complex images."""
    rng = np.random.default_rng(4)
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a.npy", rng.standard_normal((6, 16)).astype(np.float32))
    np.save(tmp_path / "t" / "empty.npy", np.zeros((0, 16), np.float32))
    np.save(tmp_path / "s" / "good.npy", rng.standard_normal((3, 16)).astype(np.float32))
    np.save(tmp_path / "s" / "none.npy", np.zeros((0, 16), np.float32))
    np.save(tmp_path / "s" / "cplx.npy", (rng.standard_normal((2, 16)) + 1j).astype(np.complex64))
    kw = dict(metric="embeddings", k=2, verify="none", progress=False)
    r = A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o", **kw)
    assert r.summary["n_train"] == 6 and r.summary["n_synth"] == 3
    sk = {Path(s["path"]).name: s["reason"] for s in r.summary["skipped"]}
    assert set(sk) == {"empty.npy", "none.npy", "cplx.npy"}
    assert "none.npy: no embeddings (shape (0, 16))" in sk["none.npy"]
    assert "cplx.npy: complex embeddings" in sk["cplx.npy"]
    with pytest.raises(DataError, match=r"empty\.npy: no embeddings \(shape \(0, 16\)\)"):
        A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "o2", strict=True, **kw)
    # a set of nothing but empty files names them (it was "empty input set")
    with pytest.raises(ValueError, match=r"synth set has no usable embeddings.*none\.npy: no embeddings"):
        A.audit(tmp_path / "t" / "a.npy", tmp_path / "s" / "none.npy", out=tmp_path / "o3", **kw)


def _series_and_a_frame_copy(root: Path) -> None:
    """``root/t/series.npy``: two random 12 x 13 x 14 frames (4D); ``root/s/copy1.npy``: a copy of frame 1."""
    frames = np.random.default_rng(9).random((12, 13, 14, 2)).astype(np.float32)
    (root / "t").mkdir()
    (root / "s").mkdir()
    np.save(root / "t" / "series.npy", frames)
    np.save(root / "s" / "copy1.npy", frames[..., 1])


def test_volumes_mode_takes_every_frame_of_a_4d_file(tmp_path: Path) -> None:
    _series_and_a_frame_copy(tmp_path)
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=2, out=tmp_path / "o",
                progress=False)
    rows = _rows(tmp_path / "o")
    p = tmp_path / "t" / "series.npy"
    assert [x["train_id"] for x in rows] == [f"{p}@t1", f"{p}@t0"]
    assert [x["train_index"] for x in rows] == ["1", "0"]
    assert float(rows[0]["ssim"]) == pytest.approx(1.0) and r.summary["n_train"] == 2


def test_evaluate_label_key_naming_a_4d_file_is_ambiguous_not_unknown(tmp_path: Path) -> None:
    """The items of a 4D file have the path ``<file>@t<t>``: a label key naming the file itself (its path, name or
    stem, as the README allows) was told it 'matches no audited item'; it names several (one per frame), and
    is told so. A frame's own path still finds its item."""
    _series_and_a_frame_copy(tmp_path)
    out = tmp_path / "o"
    A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=2, out=out, progress=False)
    for key in ("series.npy", "series", str(tmp_path / "t" / "series.npy")):
        with pytest.raises(ValueError, match=rf"l\.csv:2: label key '{re.escape(key)}' matches 2 items"):
            A.evaluate(out, _labels(tmp_path / "l.csv", (key, "copy1", 1)))
    ev = A.evaluate(out, _labels(tmp_path / "l.csv", ("series.npy@t1", "copy1", 1), ("series.npy@t0", "copy1", 0)))
    assert ev["accuracy"] == 1.0


def test_ctrl_c_while_decode_workers_run_stops_within_a_second(tmp_path: Path) -> None:
    """Ctrl-C reaches the decode workers too (one process group): each left its loop with decoded items still
    queued and blocked flushing them, and the audit, raising KeyboardInterrupt, waited torch's 5 s join
    timeout before killing them (~5.3 s after the signal). The workers now ignore SIGINT and stop when the
    audit shuts them down. In a subprocess in a session of its own (the signal goes to its process group)."""
    for kind in ("train", "synth"):
        (tmp_path / kind).mkdir()
        rng = np.random.default_rng(len(kind))
        for i in range(200):  # (items large enough that two fill a pipe: the workers' flush blocked)
            np.save(tmp_path / kind / f"{kind}{i:03d}.npy", rng.random((128, 128), dtype=np.float32))
    code = """
import importlib, os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell's background job starts with SIGINT ignored)
A = importlib.import_module("deepssim_fast.audit")
write = A._write_entry
def slow(*args, **kw):  # a slow disk: the decode workers' queue stays full
    time.sleep(0.03)
    return write(*args, **kw)
A._write_entry = slow
t = []
def interrupt():  # as Ctrl-C in a terminal: to the whole process group, decode workers included
    t.append(time.perf_counter())
    os.killpg(os.getpgid(0), signal.SIGINT)
threading.Timer(1.0, interrupt).start()
try:
    A.audit(sys.argv[1], sys.argv[2], metric="ssim", out=sys.argv[3], decode_workers=2, progress=False)
    print("not interrupted")
    sys.exit(1)
except KeyboardInterrupt:
    print("KeyboardInterrupt after", round(time.perf_counter() - t[0], 2), flush=True)
    assert time.perf_counter() - t[0] < 2.0
import multiprocessing
assert not multiprocessing.active_children(), multiprocessing.active_children()
print("ok")
"""
    out = tmp_path / "out"
    assert_ok(run_python(code, str(tmp_path / "train"), str(tmp_path / "synth"), str(out), start_new_session=True))
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))  # no half-written cache entry


def test_thresholds_or_bins_change_keeps_pixel_stores_and_verified_ssim(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change of thresholds (or bins) alone removed work/ whole: the pixel stores were rewritten and every
    candidate verified again, though neither depends on them. Now only the search runs again (its class
    counts and histogram do), and the outputs equal a fresh run's with the new settings."""
    calls: list = []
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: calls.append((stage, index)))
    kw = dict(metric="ssim", k=2, out=tmp_path / "o", chunk_size=4, progress=False)
    first = A.audit(ds["train"], ds["synth"], **kw)
    n_chunks = len([c for c in calls if c[0] == "verify"])
    assert n_chunks >= 2
    store = tmp_path / "o" / "work" / "synth_pixels.npy"
    mtime = store.stat().st_mtime_ns

    calls.clear()
    new = dict(kw, thresholds=(0.3, 0.7), bins=50)
    second = A.audit(ds["train"], ds["synth"], **new)
    assert [c for c in calls if c[0] == "verify"] == []  # every verified chunk was kept
    assert store.stat().st_mtime_ns == mtime
    assert second.summary["thresholds"] != first.summary["thresholds"]
    A.audit(ds["train"], ds["synth"], **dict(new, out=tmp_path / "fresh"))
    for name in DETERMINISTIC:
        a = (tmp_path / "o" / name).read_bytes().replace(b"/o/", b"/x/")
        assert a == (tmp_path / "fresh" / name).read_bytes().replace(b"/fresh/", b"/x/"), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "o", tmp_path / "fresh"))
    sa.pop("timings_s")
    sb.pop("timings_s")
    assert sa == sb and sa["pair_counts_search"] != first.summary["pair_counts_search"]

    # another k changes the candidates: everything is verified again and the stores are rewritten
    calls.clear()
    A.audit(ds["train"], ds["synth"], **dict(new, k=3))
    assert len([c for c in calls if c[0] == "verify"]) == n_chunks
    assert store.stat().st_mtime_ns != mtime


def test_thresholds_change_of_a_flip_aware_deepssim_search_embeds_nothing_again(
    ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flip/shift-aware deepssim search embeds every transformed synthetic item; a rerun with other
    thresholds embedded them all again (most of its time at scale). They are kept in work/ now, and the
    rerun's outputs equal a fresh run's."""
    import torch

    from deepssim_fast import model as M

    torch.manual_seed(0)
    ckpt = M.save_checkpoint(tmp_path / "m.pt", M.build_model("small", input_size=32))
    kw = dict(model=ckpt, metric="deepssim", k=2, verify="none", verify_flips=True, verify_shifts=2,
              progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "o", **kw)
    assert sorted(f.name for f in (tmp_path / "o" / "work").glob("synth_vectors_*.npy"))
    calls = []
    real = A._embed
    monkeypatch.setattr(A, "_embed", lambda images, *a, **k: calls.append(len(images)) or real(images, *a, **k))
    new = dict(kw, thresholds=(0.3, 0.7))
    A.audit(ds["train"], ds["synth"], out=tmp_path / "o", **new)
    assert calls == []
    A.audit(ds["train"], ds["synth"], out=tmp_path / "fresh", **new)
    assert calls  # (the fresh run did embed)
    for name in ("matches.csv", "histogram.png"):
        a = (tmp_path / "o" / name).read_bytes().replace(b"/o/", b"/x/")
        assert a == (tmp_path / "fresh" / name).read_bytes().replace(b"/fresh/", b"/x/"), name


def test_verified_chunk_is_reused_only_for_its_own_candidates(tmp_path: Path) -> None:
    """A verified chunk holds the candidates it scored; one whose candidates differ (or that predates them,
    or is damaged) is verified again rather than read for other pairs."""
    f = tmp_path / "verify_00000.npz"
    idx = np.array([[3, 1], [0, 2]], dtype=np.int64)
    assert not A._verified_for(f, idx)
    np.savez(f, ssim=np.zeros((2, 2)), transform=np.array([["none"] * 2] * 2), indices=idx)
    assert A._verified_for(f, idx)
    assert not A._verified_for(f, idx[:, ::-1])
    assert not A._verified_for(f, idx[:1])
    np.savez(f, ssim=np.zeros((2, 2)), transform=np.array([["none"] * 2] * 2))
    assert not A._verified_for(f, idx)
    f.write_bytes(b"PK\x03\x04 damaged")
    assert not A._verified_for(f, idx)


def test_item_cache_entry_round_trip_and_damage_is_detected(tmp_path: Path) -> None:
    """Item cache entries (a JSON header and raw float32 pixels, written without fsync) read back exactly;
    an entry a crash left empty or short, one with a bad header, or one whose pixels changed fails its
    length or checksum check rather than being trusted."""
    rng = np.random.default_rng(0)
    px = rng.random((3, 9, 7)).astype(np.float32)
    ids = ["/data/scan ü.nii.gz@t1#2:0", "/data/\udcff.png#2:0", "x#2:7"]  # (an undecodable byte, as os gives it)
    f = tmp_path / "items" / "k_9x7.items"
    f.parent.mkdir()
    A._write_entry(f, ids, [0, 4, 7], px)
    head = A._entry_header(f)
    off = len(f.read_bytes()) - px.nbytes  # the pixels come last
    assert head["ids"] == ids and head["indices"] == [0, 4, 7] and head["shape"] == [3, 9, 7]
    got = A._entry_pixels(f)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, px)
    raw = f.read_bytes()
    assert raw[:8] == b"DSFITEMS" and int.from_bytes(raw[8:16], "little") == off - 16

    cases = {
        "empty": b"",
        "short": raw[:-5],
        "header only": raw[:off],
        "other file": b"\x93NUMPY" + raw[6:],
        "bad json": raw[:16] + b"}" + raw[17:],
        "longer": raw + b"\0",
    }
    for content in cases.values():
        f.write_bytes(content)
        with pytest.raises(A._DamagedEntry, match=str(f)):
            A._entry_pixels(f)
        with pytest.raises(A._DamagedEntry):
            A._entry_header(f)
    flipped = bytearray(raw)
    flipped[off + 100] ^= 0x10
    f.write_bytes(bytes(flipped))
    A._entry_header(f)  # the length is right...
    with pytest.raises(A._DamagedEntry, match="checksum"):
        A._entry_pixels(f)  # ...the pixels are not


def test_item_cache_is_written_without_fsync_and_outputs_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import deepssim_fast._atomic as at

    synced: list[int] = []  # (the inode each fsync's descriptor is: the file written, or the folder of its rename)
    real = os.fsync
    monkeypatch.setattr(at.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd))[1])
    A._write_entry(tmp_path / "e.items", ["a"], [0], np.zeros((1, 8, 8), np.float32))
    assert synced == []
    A._atomic_json(tmp_path / "s.json", {"a": 1})
    # the data, then the rename (the file synced was the temporary renamed to s.json)
    assert synced == [os.stat(tmp_path / "s.json").st_ino, os.stat(tmp_path).st_ino], synced


def test_damaged_cache_entries_are_decoded_and_embedded_again(
    ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries written without fsync may be left short by a crash: a rerun finds a short item entry and decodes
    its file again, and re-embeds for a short embedding file; the outputs equal the first run's. An entry
    damaged in place (same length) is caught when its pixels are read: the run stops naming it and removes it,
    and the next run decodes that file again."""
    import torch

    from deepssim_fast.model import build_model

    torch.manual_seed(0)
    model = build_model("small", input_size=64)
    cache = tmp_path / "cache"
    kw = dict(model=model, metric="deepssim", k=2, cache_dir=cache, progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "a", **kw)
    want = (tmp_path / "a" / "matches.csv").read_bytes()
    entries = sorted((cache / "items").glob("*.items"))
    embs = sorted((cache / "embeddings").glob("*.npy"))
    assert len(entries) == 14 + 8 and len(embs) == 14 + 8
    entries[3].write_bytes(entries[3].read_bytes()[:40])  # a crash mid-write, without fsync
    embs[5].write_bytes(b"")
    with caplog.at_level("WARNING", logger="deepssim_fast"):
        A.audit(ds["train"], ds["synth"], out=tmp_path / "b", **kw)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("decoding ") and str(entries[3]) in m for m in msgs), msgs
    assert any(m.startswith("embedding again") and str(embs[5]) in m for m in msgs), msgs
    assert (tmp_path / "b" / "matches.csv").read_bytes().replace(b"/b/", b"/a/") == want

    raw = bytearray(entries[7].read_bytes())
    raw[-3] ^= 0xFF
    entries[7].write_bytes(bytes(raw))
    with pytest.raises(RuntimeError, match="checksum.*removed: run the audit again") as ei:
        A.audit(ds["train"], ds["synth"], out=tmp_path / "c", **kw)
    assert str(entries[7]) in str(ei.value) and not entries[7].exists()
    A.audit(ds["train"], ds["synth"], out=tmp_path / "c", **kw)
    assert (tmp_path / "c" / "matches.csv").read_bytes().replace(b"/c/", b"/a/") == want


def test_item_cache_entries_of_the_earlier_format_are_removed(ds: dict, tmp_path: Path) -> None:
    """Entries were .npz files before; this version never reads them, and at scale they are as large as the
    decoded inputs. A run removes those untouched for over an hour, and leaves a recent one (an older audit
    sharing the cache may be writing it) and files of other names alone."""
    cache = tmp_path / "cache"
    (cache / "items").mkdir(parents=True)
    old = time.time() - 2 * 3600
    legacy = cache / "items" / f"{'ab' * 16}_66x78.npz"
    recent = cache / "items" / f"{'cd' * 16}_66x78.npz"
    other = cache / "items" / "notes.npz"
    for f in (legacy, recent, other):
        f.write_bytes(b"PK")
    for f in (legacy, other):
        os.utime(f, (old, old))
    A.audit(ds["train"], ds["synth"] / "s10.npy", metric="correlation", k=1, verify="none", cache_dir=cache,
            out=tmp_path / "o", progress=False)
    assert not legacy.exists() and recent.exists() and other.exists()
    assert sorted((cache / "items").glob("*.items"))  # this run's entries


def _flipped_noisy_volumes(root: Path, *, seed: int, noise: float) -> np.ndarray:
    """``root/t``: nibabel's anatomical volume and dipy's aniso_vox fitted to its shape; ``root/s``: six noisy
    copies of them (Gaussian noise of std ``noise``), flipped along axis 0, 1, 2 in turn. Returns the
    anatomical volume."""
    anat = data.load_volume("anatomical").array
    other = data.center_fit(data.load_volume("aniso_vox").array, anat.shape)
    (root / "t").mkdir()
    (root / "s").mkdir()
    np.save(root / "t" / "anat.npy", anat)
    np.save(root / "t" / "aniso.npy", other)
    rng = np.random.default_rng(seed)
    for i in range(6):
        v = np.flip([anat, other][i % 2], i % 3)
        np.save(root / "s" / f"s{i}.npy", (v + rng.normal(0, noise, v.shape)).astype(np.float32))
    return anat


def test_volume_verification_stacks_a_few_pairs_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verification stacked every pair of a chunk (chunk_size × k, each with its flip/shift variants, and
    copies of both stores' volumes) for one SSIM call: 8 synthetic MNI volumes with k=2 and flips peaked at
    6.4 GB, and the default chunk of 256 volumes would need ~100 GB. The pairs are now read and scored a
    few at a time (``_VERIFY_VOXELS`` a side), in the audit and in evaluate, with the same scores."""
    anat = _flipped_noisy_volumes(tmp_path, seed=5, noise=5)
    kw = dict(metric="ssim", mode="volumes", k=2, verify_flips=True, verify_shifts=1, progress=False)
    A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "whole", **kw)
    want = (tmp_path / "whole" / "matches.csv").read_bytes()

    stacked = []
    real = A._ssim_pairs

    def spy(x: np.ndarray, y: np.ndarray, **k: object) -> np.ndarray:
        stacked.append(len(x))
        return real(x, y, **k)

    monkeypatch.setattr(A, "_ssim_pairs", spy)
    monkeypatch.setattr(A, "_VERIFY_VOXELS", 2 * anat.size, raising=False)
    A.audit(tmp_path / "t", tmp_path / "s", out=tmp_path / "few", **kw)
    # 12 pairs, each scored untransformed, with its 2 best variants (a shifted one also on the overlap) and,
    # when it is another, the search's variant: at most 4 images a call, not 36 to 72
    assert 36 <= sum(stacked) <= 72 and max(stacked) <= 4, stacked
    assert (tmp_path / "few" / "matches.csv").read_bytes().replace(b"/few/", b"/whole/") == want
    stacked.clear()
    rows = _rows(tmp_path / "few")
    pairs = [(Path(r["train_path"]).name, Path(r["synth_path"]).name, 1) for r in rows]
    ev = A.evaluate(tmp_path / "few", _labels(tmp_path / "l.csv", *pairs))
    assert ev["n"] == 12 and max(stacked) <= 4, stacked


def test_correlation_rows_of_volumes_are_centred_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The correlation metric centred 256 items at a time in float64 with two more float64 temporaries: for
    volumes a copy of the whole collection at 6x its float32 size (6 MNI volumes: 1.2 GB for 199 MB of
    rows; 256 of them ~50 GB), and the transformed (flip/shift) search held 8x. Rows are now computed about
    ``_ROW_VOXELS`` voxels at a time, into one float32 array, with the same values."""
    import tracemalloc

    vol = data.load_volume("anatomical").array
    rng = np.random.default_rng(8)
    px = np.stack([vol * (1 + 0.1 * i) + rng.normal(0, 5, vol.shape) for i in range(24)]).astype(np.float32)
    names = [f"v{i}" for i in range(len(px))]
    items = A.ItemSet("synth", names, names, list(range(len(px))), px)
    whole = A._centred_rows(px, items)  # (24 items: one chunk, as before)
    items.vectors = whole
    flipped = A._transformed_vectors(items, lambda img, i: np.flip(img, 1), metric="correlation", model=None,
                                     batch_size=64, device=None)
    monkeypatch.setattr(A, "_ROW_VOXELS", 2 * vol.size, raising=False)
    tracemalloc.start()
    try:
        rows = A._centred_rows(px, items)
        _, peak_rows = tracemalloc.get_traced_memory()
        del rows
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        rows_f = A._transformed_vectors(items, lambda img, i: np.flip(img, 1), metric="correlation", model=None,
                                        batch_size=64, device=None)
        _, peak_f = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = whole.nbytes
    # the float32 rows, plus a couple of items' float64 work (old: + 5 float64 copies of all 24 items)
    assert peak_rows < out_bytes + 12 * vol.size * 8, (peak_rows, out_bytes)
    assert peak_f - base < out_bytes + 12 * vol.size * 8, (peak_f - base, out_bytes)
    np.testing.assert_array_equal(A._centred_rows(px, items), whole)
    np.testing.assert_array_equal(rows_f, flipped)


def test_mirrored_copy_of_a_volume_fitted_by_an_odd_crop_is_found(tmp_path: Path) -> None:
    """center_fit crops or pads a file to the item size; by an odd number of voxels, the fitted item's centre is
    half a voxel off the file's, so the mirror image of the fitted training item lies one voxel off the fitted
    mirrored file. Exact mirrored copies of dipy's aniso_vox (58 x 58 x 24, fitted to nibabel's anatomical
    33 x 41 x 25) verified with flips scored SSIM 0.54-0.61 ('different', 'similar'). A flip now reaches a
    one-voxel shift along its axis."""
    anat = data.load_volume("anatomical").array
    aniso = data.load_volume("aniso_vox").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a_anat.npy", anat)  # the first training item: its shape is the item size
    np.save(tmp_path / "t" / "b_aniso.npy", aniso)
    for ax in range(3):
        np.save(tmp_path / "s" / f"flip{ax}.npy", np.ascontiguousarray(np.flip(aniso, axis=ax)))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="correlation", mode="volumes", k=2, verify_flips=True,
                out=tmp_path / "o", progress=False)
    assert r.summary["item_size"] == list(anat.shape)
    rows = {Path(x["synth_path"]).stem: x for x in _best(_rows(tmp_path / "o")).values()}
    for ax in range(3):
        x = rows[f"flip{ax}"]
        assert Path(x["train_path"]).name == "b_aniso.npy" and x["label"] == "duplicate", x
        assert float(x["ssim"]) > 0.99 and x["transform"].startswith(f"flip{ax}"), x
    # an item fitted without an odd residual (here, its own shape) keeps the plain flip
    v, names = A.verify_pairs(anat[None], np.flip(anat, 1)[None].copy(), spatial_dims=3, flips=True)
    assert names == ["flip1"] and v[0] == pytest.approx(1.0, abs=1e-6)


def test_a_searched_flip_mirrors_about_the_file_centre() -> None:
    """_flip_item with the item's _fit_offset is the mirror of the file, then the centre fit: for every
    parity of crop and pad along each axis (2D and 3D, random files), the flipped fitted mirror equals the
    fitted file exactly, except, after an odd crop, the one slab the crop left out, which repeats its
    neighbour. The plain flip of the fitted item is one voxel off wherever the crop or pad is odd."""
    assert A._fit_offset((13, 11, 14, 10, 12), (12, 12, 12, 12, 12)) == (1, -1, 0, 0, 0)
    rng = np.random.default_rng(7)
    for size in ((12, 15), (9, 10, 11)):
        for _ in range(12):
            shape = tuple(int(m + rng.integers(-3, 4)) for m in size)  # odd and even crops and pads
            f = rng.normal(size=shape).astype(np.float32) + 3.0
            off = A._fit_offset(shape, size)
            for ax in range(len(size)):
                t = data.center_fit(f, size)
                s = data.center_fit(np.ascontiguousarray(np.flip(f, ax)), size)
                v = A._flip_item(s, (ax,), off)
                exact = [slice(None)] * len(size)
                if off[ax] == 1:  # odd crop: slab 0 was outside the crop; it repeats slab 1
                    exact[ax] = slice(1, None)
                    edge = np.take(v, [0], axis=ax)
                    np.testing.assert_array_equal(edge, np.take(v, [1], axis=ax))
                np.testing.assert_array_equal(v[tuple(exact)], t[tuple(exact)], err_msg=f"{shape} axis {ax}")
                plain = np.flip(s, ax)
                assert np.array_equal(plain, t) == (off[ax] == 0), (shape, ax)
                # None (audits before format 7): the plain flip
                np.testing.assert_array_equal(A._flip_item(s, (ax,), None), plain)


def test_verify_none_finds_mirrored_copies_of_odd_cropped_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """With verify='none' the search's flip is the match. Front-back mirrors of MNI axial slices (197 x 233,
    fitted to 120 x 150: odd crops) lay one voxel off the flipped fitted item: correlation 0.97-0.98 (and SSIM
    0.80-0.83, 'similar', by the deepssim encoder's measure). The search now mirrors about the file's centre:
    0.998 or more. evaluate scores a format-7 audit the same way, and one from before with the plain flip."""
    mni = data.load_volume("mni152").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    for z in range(40, 130, 10):
        np.save(tmp_path / "t" / f"z{z}.npy", np.ascontiguousarray(mni[:, :, z], dtype=np.float32))
    for z in (60, 90):
        np.save(tmp_path / "s" / f"m{z}.npy", np.ascontiguousarray(mni[:, ::-1, z], dtype=np.float32))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="correlation", size=(120, 150), k=1, verify="none",
                verify_flips=True, out=tmp_path / "o", progress=False)
    assert r.summary["format_version"] >= 8  # (8: the mirrors of several axes)
    rows = {Path(x["synth_path"]).stem: x for x in _best(_rows(tmp_path / "o")).values()}
    got = []
    for z in (60, 90):
        x = rows[f"m{z}"]
        assert Path(x["train_path"]).name == f"z{z}.npy" and x["transform"] == "hflip", x
        got.append(float(x["cosine"]))
        # the plain flip of the fitted item, as before format 7
        t = data.center_fit(np.ascontiguousarray(mni[:, :, z], dtype=np.float32), (120, 150))
        s = data.center_fit(np.ascontiguousarray(mni[:, ::-1, z], dtype=np.float32), (120, 150))
        plain = np.corrcoef(t.ravel(), s[:, ::-1].ravel())[0, 1]
        assert plain < 0.99 and got[-1] > 0.997 and got[-1] > plain, (z, plain, got[-1])
    labels = _labels(tmp_path / "l.csv", ("z60.npy", "m60.npy", 2), ("z90.npy", "m90.npy", 2))
    seen = _spy_evaluate_scores(monkeypatch)
    A.evaluate(tmp_path / "o", labels)
    np.testing.assert_allclose(seen.pop(), got, atol=1e-6)
    summary = tmp_path / "o" / "summary.json"
    old = json.loads(summary.read_text())
    old["format_version"] = 6
    summary.write_text(json.dumps(old))
    # (a pair the search kept takes the search's own score, whatever the format: without the saved search,
    # every pair is scored by the format's rule, as a labelled pair outside the top-k is)
    (tmp_path / "o" / "work" / "search.npz").rename(tmp_path / "search.npz")
    A.evaluate(tmp_path / "o", labels)
    assert all(b < 0.99 for b in seen.pop())
    (tmp_path / "search.npz").rename(tmp_path / "o" / "work" / "search.npz")
    # item cache entries of earlier versions have no fit offsets: their files are decoded again, once
    entries = sorted((tmp_path / "o" / "cache" / "items").glob("*.items"))
    assert len(entries) == 11 and all("fit" in A._entry_header(f) for f in entries)
    for f in entries:
        head, px = A._read_entry(f, pixels=True)
        A._write_entry(f, head["ids"], head["indices"], px)  # (as format 6 wrote them)
        assert "fit" not in A._entry_header(f)
    r2 = A.audit(tmp_path / "t", tmp_path / "s", metric="correlation", size=(120, 150), k=1, verify="none",
                 verify_flips=True, out=tmp_path / "o2", cache_dir=tmp_path / "o" / "cache", progress=False)
    assert [float(x["cosine"]) for x in _rows(r2.out)] == got
    assert all(A._entry_header(f)["fit"] == [[1, 1]] for f in entries)  # 197 x 233 cropped to 120 x 150


def test_shifted_transform_is_verified_on_the_overlap_of_the_two_views() -> None:
    """A shift verified with its uncovered band filled with the image minimum scores that band as a
    difference: exact front-back mirrors of MNI axial slices centre-fitted by an odd number of voxels (197 x 233
    to 120 x 150, and to 24 x 30) scored 0.989 and 0.83-0.92 ('similar' at 0.83), where they are the same image
    one voxel over. verify_pairs now also scores a shifted transform on the overlap of the two fields of view
    and keeps the better score."""
    mni = data.load_volume("mni152").array
    for z in (60, 80):
        sl = np.ascontiguousarray(mni[:, :, z], dtype=np.float32)
        for shape in ((120, 150), (24, 30)):
            a = data.center_fit(sl, shape)[None]
            b = data.center_fit(np.ascontiguousarray(sl[:, ::-1]), shape)[None]
            v, names = A.verify_pairs(a, b, spatial_dims=2, flips=True)
            # (the MNI template is left-right symmetric: the front-back mirror turned by 180°, hvflip, is the
            # same image one voxel over, and scores the same 1; format 8 tries it too)
            assert names[0] in ("hflip+shift(0,1)", "hvflip+shift(1,1)") and v[0] == pytest.approx(1.0, abs=1e-6)
            old, old_names = A.verify_pairs(a, b, spatial_dims=2, flips=True, overlap=False, all_mirrors=False)
            assert old_names == ["hflip+shift(0,1)"] and old[0] < 0.996, (z, shape, old)
    # an overlap narrower than the SSIM window (7) is not scored: the filled image alone decides; 7 wide, it is
    rng = np.random.default_rng(3)
    for rows, want_exact in ((7, False), (8, True)):
        t = rng.normal(size=(1, rows, 40)).astype(np.float32)
        moved = A._shift(t[0], (1, 0))[None]
        v, names = A.verify_pairs(t, moved, spatial_dims=2, shifts=1)
        old, old_names = A.verify_pairs(t, moved, spatial_dims=2, shifts=1, overlap=False)
        assert names == old_names == ["shift(-1,0)"] and old[0] < 0.6, (rows, names, old)
        assert (v[0] == pytest.approx(1.0, abs=1e-6)) if want_exact else (v[0] == old[0]), (rows, v, old)


def test_best_shift_is_the_overlap_correlation_of_a_direct_sum() -> None:
    """_best_shift (FFT cross-correlation, zero-padded to a fast length; overlap norms from a table of cell
    sums) against the direct sum over each shift's overlap, 2D and 3D, odd and prime sizes, reach 0..3."""
    rng = np.random.default_rng(11)

    def direct(ref: np.ndarray, img: np.ndarray, reach: tuple[int, ...]) -> np.ndarray:
        r, b = ref - ref.mean(), img - img.mean()
        out = np.empty(tuple(2 * m + 1 for m in reach))
        for k in np.ndindex(out.shape):
            d = tuple(i - m for i, m in zip(k, reach, strict=True))
            src, dst = A._shift_slices(d, ref.shape)  # img[src] lands on ref[dst]
            num = float((r[dst] * b[src]).sum())
            den = float(np.sqrt(np.square(r[dst]).sum() * np.square(b[src]).sum()))
            out[k] = num / den if den > 0 else 0.0
        return out

    for shape in ((13, 17), (7, 31), (9, 11, 8), (16, 5, 7)):
        for reach_max in range(4):
            ref = rng.normal(size=shape)
            img = np.roll(ref, 1, axis=0) + rng.normal(0, 0.5, shape)
            reach = tuple(int(rng.integers(0, reach_max + 1)) for _ in shape)
            pad = max(reach_max, 1)
            padded = tuple(A._fft_len(n + pad) for n in shape)
            ref_c = ref - ref.mean()
            fft = np.fft.rfftn(ref_c, s=padded, axes=tuple(range(len(shape))))
            d, score = A._best_shift(fft, A._square_table(ref_c, pad), shape, padded, img, reach)
            want = direct(ref, img, reach)
            k = tuple(x + m for x, m in zip(d, reach, strict=True))
            assert score == pytest.approx(want[k], abs=1e-9), (shape, reach, d)
            assert score >= want.max() - 1e-9, (shape, reach, d, want.max())
    # the fast FFT lengths: the smallest 7-smooth number at or above n
    smooth = [m for m in range(1, 3000) if all(p in (2, 3, 5, 7) for p in _prime_factors(m))]
    for n in range(1, 2500):
        assert A._fft_len(n) == min(m for m in smooth if m >= n), n


def _prime_factors(m: int) -> list[int]:
    out, p = [], 2
    while m > 1:
        while m % p == 0:
            out.append(p)
            m //= p
        p += 1
    return out


def test_audit_and_evaluate_verify_shifts_on_the_overlap_from_format_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit verifies a shifted transform on the overlap too (format 6); evaluate scores an audit's pairs
    as that audit verified them: on the overlap from format 6, with the filled band before it."""
    mni = data.load_volume("mni152").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    for z in (60, 80):
        sl = np.ascontiguousarray(mni[:, :, z], dtype=np.float32)
        np.save(tmp_path / "t" / f"z{z}.npy", sl)
        np.save(tmp_path / "s" / f"m{z}.npy", np.ascontiguousarray(sl[:, ::-1]))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="correlation", size=(24, 30), k=1, verify_flips=True,
                out=tmp_path / "o", progress=False)
    assert r.summary["format_version"] >= 6
    rows = {Path(x["synth_path"]).stem: x for x in _best(_rows(tmp_path / "o")).values()}
    for z in (60, 80):
        x = rows[f"m{z}"]
        # (hvflip+shift(1,1) is the same image on the left-right symmetric MNI template: format 8 tries it)
        assert Path(x["train_path"]).stem == f"z{z}" and x["transform"] in ("hflip+shift(0,1)",
                                                                            "hvflip+shift(1,1)"), x
        assert float(x["ssim"]) == pytest.approx(1.0, abs=1e-6) and x["label"] == "duplicate", x
    labels = _labels(tmp_path / "l.csv", ("z60.npy", "m60.npy", 2), ("z80.npy", "m80.npy", 2))
    seen = _spy_evaluate_scores(monkeypatch)
    A.evaluate(tmp_path / "o", labels)
    np.testing.assert_allclose(seen.pop(), [1.0, 1.0], atol=1e-6)
    summary = tmp_path / "o" / "summary.json"
    old = json.loads(summary.read_text())
    old["format_version"] = 5
    summary.write_text(json.dumps(old))
    A.evaluate(tmp_path / "o", labels)
    before = seen.pop()
    assert before[0] < 0.85 and before[1] < 0.996, before  # z = 60 was "similar" then


def test_ssim_search_with_flips_finds_mirrored_copies_it_would_not_rank(tmp_path: Path) -> None:
    """With metric ssim, verify_flips only re-scored the candidates of the plain SSIM search: a mirrored copy
    whose source the unflipped search did not rank in the top k was never verified against it. Exact
    front-back mirror images of four MNI axial slices, k=1: one was labelled 'different' (SSIM 0.22 against
    another slice). The SSIM search now also searches the flipped items, as the deepssim and correlation
    searches do."""
    mni = data.load_volume("mni152").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    for z in (60, 70, 80, 90):
        np.save(tmp_path / "t" / f"z{z}.npy", mni[:, :, z])
        np.save(tmp_path / "s" / f"m{z}.npy", np.ascontiguousarray(np.flip(mni[:, :, z], 1)))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", k=1, verify_flips=True, out=tmp_path / "o",
                progress=False)
    rows = {Path(x["synth_path"]).stem: x for x in _rows(tmp_path / "o")}
    assert set(rows) == {f"m{z}" for z in (60, 70, 80, 90)}
    for z in (60, 70, 80, 90):
        x = rows[f"m{z}"]
        assert Path(x["train_path"]).stem == f"z{z}" and x["label"] == "duplicate", x
        assert float(x["ssim"]) == pytest.approx(1.0, abs=1e-6) and x["transform"] == "hflip", x
    assert r.summary["counts"]["duplicate"] == 4
    # the histogram and pair counts stay those of the plain search: every pair once
    assert sum(r.summary["pair_counts_search"].values()) == 16


def test_evaluate_of_a_volume_correlation_audit_scores_the_pairs_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate (verify='none', metric correlation) centred the pixels of every labelled pair in float64 at once,
    and every flip variant of them: 16 pairs of MNI volumes peaked at 6 GB (192 volumes' worth). The pairs are
    scored a batch of about ``_ROW_VOXELS`` voxels at a time, with the audit's search scores."""
    import tracemalloc

    anat = _flipped_noisy_volumes(tmp_path, seed=6, noise=50)
    out = tmp_path / "o"
    A.audit(tmp_path / "t", tmp_path / "s", metric="correlation", verify="none", mode="volumes", k=2,
            verify_flips=True, out=out, progress=False)
    rows = _rows(out)
    labels = _labels(tmp_path / "l.csv", *[(Path(r["train_path"]).name, Path(r["synth_path"]).name, 1) for r in rows])
    seen = _spy_evaluate_scores(monkeypatch)
    monkeypatch.setattr(A, "_ROW_VOXELS", 2 * anat.size, raising=False)
    tracemalloc.start()
    try:
        ev = A.evaluate(out, labels)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ev["n"] == 12
    np.testing.assert_allclose(seen[-1], [float(r["cosine"]) for r in rows], atol=2e-6)
    # a couple of pairs' float64 rows and variants at a time (old: all 12 pairs' at once, ~30 MB)
    assert peak < 40 * anat.size * 8, peak


def test_out_inside_an_input_folder_does_not_report_its_stores_as_unread_images(
    ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The rerun of an audit whose OUT is inside an input folder found OUT/work's search.npz and
    verify_*.npz and warned that they were files "of image formats this tool does not read", to be
    converted; they are the audit's own stores. A .npz of the user's there is still reported."""
    train, synth = tmp_path / "train", tmp_path / "synth"
    shutil.copytree(ds["train"], train)
    synth.mkdir()
    for name in ("s00.npy", "s12.npy"):
        shutil.copy(ds["synth"] / name, synth / name)
    out = synth / "audit"
    kw = dict(metric="correlation", k=2, out=out, progress=False)
    A.audit(train, synth, **kw)
    assert sorted((out / "work").glob("*.npz"))
    with caplog.at_level("WARNING", logger="deepssim_fast.io"):
        A.audit(train, synth, **kw)
    assert "image formats this tool does not read" not in caplog.text
    caplog.clear()
    np.savez(synth / "mine.npz", a=np.zeros(3))
    with caplog.at_level("WARNING", logger="deepssim_fast.io"):
        A.audit(train, synth, **kw)
    assert "image formats this tool does not read are left out (1 .npz)" in caplog.text


def test_odd_names_stale_evaluation_and_scores_on_a_threshold(ds: dict, tmp_path: Path) -> None:
    """Found by probing the outputs:
    * a file name holding "\\r" was written unquoted in matches.csv (rows end in "\\n"), so readers split its row;
    * a label key " lead.npy" was stripped to "lead.npy" and scored another file's pair;
    * an evaluation.json stayed beside the outputs of a rerun whose work folder had been deleted;
    * a score printed with 6 (CSV) or 4 (report) decimals could round onto a threshold it lies above, beside
      the label that says it is above."""
    train_names = sorted(ds["train_arrays"])
    synth = tmp_path / "synth"
    synth.mkdir()
    copy_of = train_names[3]
    np.save(synth / "cr\rname.npy", ds["train_arrays"][copy_of])  # an exact copy
    np.save(synth / " lead.npy", ds["train_arrays"][copy_of])  # an exact copy, its name led by a space
    np.save(synth / "lead.npy", data.center_fit(data.load_volume("piesno").array[:, :, 7], SIZE))  # novel
    out = tmp_path / "out"
    res = A.audit(ds["train"], synth, metric="ssim", k=2, out=out, progress=False)
    rows = _rows(out)
    assert len(rows) == 3 * 2 and all(len(r) == len(A.MATCHES_HEADER) and None not in r for r in rows)
    cr = [r for r in rows if r["synth_path"].endswith("cr\rname.npy")]
    assert len(cr) == 2 and cr[0]["label"] == "duplicate" and cr[0]["train_path"].endswith(copy_of)
    labels = _labels(tmp_path / "lab.csv", (copy_of, " lead.npy", 1), (copy_of, "lead.npy", 0))
    ev = A.evaluate(res.out, labels)
    assert ev["macro_f1"] == pytest.approx(1.0)
    assert (out / "evaluation.json").exists()
    # the work folder deleted (to free its stores), then a rerun with other settings into the same OUT
    shutil.rmtree(out / "work")
    A.audit(ds["train"], synth, metric="correlation", verify="none", k=2, thresholds=(0.3, 0.5), out=out,
            progress=False)
    assert not (out / "evaluation.json").exists()
    # scores next to a threshold: enough digits to stay on their side of it
    from deepssim_fast.report import format_score
    assert format_score(0.611539, (0.6, 0.6115)) == "0.61154"
    assert format_score(np.float32(0.85), (0.6, 0.85), 6) == "0.85000002"  # float32 0.85 lies above 0.85
    assert format_score(0.85, (0.6, 0.85), 6) == "0.850000"  # on it: labelled similar, printed as it is
    assert format_score(0.1234567, (0.6, 0.85)) == "0.1235"
    # a high threshold between a verified SSIM and its 6-decimal rounding: the old CSV printed the rounding,
    # on the other side of the threshold from the label
    from deepssim_fast.ssim import ssim
    novel = [r for r in rows if r["synth_path"].endswith("/lead.npy")]
    v0 = float(ssim(ds["train_arrays"][os.path.basename(novel[0]["train_path"])], np.load(synth / "lead.npy"),
                    preset="deepssim"))  # (the preset's data range is the first image's, the training one)
    assert float(novel[0]["ssim"]) == pytest.approx(v0, abs=6e-7) and float(novel[0]["ssim"]) != v0
    th = (v0 - 0.5, (v0 + float(novel[0]["ssim"])) / 2)
    res2 = A.audit(ds["train"], synth, metric="ssim", k=2, thresholds=th, out=tmp_path / "out2", progress=False)
    seen = 0
    for r in _rows(res2.out):
        v = float(r["ssim"])
        assert (v > th[1]) == (r["label"] == "duplicate"), r
        seen += abs(v - v0) < 1e-6
    assert seen >= 1


def test_volumes_mode_ignores_the_slice_policy_with_a_warning_and_keeps_its_search(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--axis/--slice-*/--min-foreground were accepted without a word in volumes mode, and still changed the
    saved search's key, so a rerun with --axis 0 searched again."""
    vol = data.load_volume("aniso_vox").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a.npy", vol)
    np.save(tmp_path / "t" / "b.npy", np.ascontiguousarray(vol[::-1]))
    np.save(tmp_path / "s" / "c.npy", vol + 1.0)
    out = tmp_path / "o"
    A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=1, out=out, progress=False)
    with caplog.at_level(logging.INFO, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=1, out=out, progress=False,
                policy=SlicePolicy(axis=0, step=3, min_foreground=0.5))
    assert "mode='volumes' compares whole volumes: the slice policy" in caplog.text
    assert "configuration changed" not in caplog.text


def test_evaluate_names_a_damaged_summary(ssim_run: A.AuditResult, tmp_path: Path) -> None:
    """An empty {} summary.json gave a KeyError traceback, invalid JSON an error naming no file."""
    d = tmp_path / "copy"
    shutil.copytree(ssim_run.out, d)
    labels = _labels(tmp_path / "lab.csv", ("mni_030.npy", "s00.npy", 1))
    (d / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"copy/summary\.json: not an audit summary \(no thresholds, metric"):
        A.evaluate(d, labels)
    (d / "summary.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"copy/summary\.json: not a readable audit summary"):
        A.evaluate(d, labels)


def test_flips_of_several_axes_and_rotations_of_the_unflipped_slice(tmp_path: Path) -> None:
    """Format 8. A slice turned by 180° (both in-plane flips) and a volume stored as LPS against a RAS training
    volume were missed even with verify_flips (one flip at a time: 0.553 for the LPS volume, "different");
    and adding verify_flips to verify_rotations lost a 90°-turned copy that rotations alone found (rotations
    were tried on the best-correlating flip only, here the wrong one). Checked on asymmetric real scans (the
    MNI template is left-right symmetric and hides the first)."""
    s0 = data.load_volume("s0_10slices").array[::2, ::2, :]
    t = np.ascontiguousarray(s0[:, :, 3])
    for syn, kw, name in ((np.rot90(t, 2), {"flips": True}, "hvflip"),
                          (np.rot90(t, 1), {"flips": True, "rotations": 90.0}, "rot(+90)")):
        v, n = A.verify_pairs(t[None], np.ascontiguousarray(syn)[None], spatial_dims=2, **kw)
        assert v[0] > 0.99 and n[0] == name, (v, n)
        old, _ = A.verify_pairs(t[None], np.ascontiguousarray(syn)[None], spatial_dims=2, all_mirrors=False, **kw)
        assert old[0] < 0.85  # as audits before format 8 verified it (evaluate of such audits keeps this)
    vol = data.load_volume("aniso_vox").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "ras.npy", vol)
    np.save(tmp_path / "t" / "other.npy", data.center_fit(data.load_volume("example4d", frame=0).array, vol.shape))
    np.save(tmp_path / "s" / "lps.npy", np.ascontiguousarray(vol[::-1, ::-1, :]))
    r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=1, verify_flips=True,
                out=tmp_path / "o", progress=False)
    (row,) = _rows(tmp_path / "o")
    assert row["train_path"].endswith("ras.npy") and row["label"] == "duplicate" and float(row["ssim"]) > 0.99
    assert row["transform"].startswith("flip01") and r.summary["format_version"] >= 8
    ev = A.evaluate(r.out, _labels(tmp_path / "lab.csv", ("ras.npy", "lps.npy", 1), ("other.npy", "lps.npy", 0)))
    assert ev["macro_f1"] == pytest.approx(1.0)


def test_a_file_rewritten_while_the_audit_decodes_is_decoded_again_on_the_rerun(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume state recorded the input files' identities after decoding: a synthetic file rewritten while
    the audit decoded (a generator still writing) was recorded as its new self beside results of its old
    content, and every rerun resumed them (a planted copy stayed 'different'). The identities are now taken
    before any file is read, so the rerun sees the change and matches a clean run."""
    synth = tmp_path / "synth"
    shutil.copytree(ds["synth"], synth)
    victim = synth / "s10.npy"  # novel anatomy: 'different'
    copy = ds["train_arrays"]["mni_070.npy"]
    orig = A._decode_all

    def decode_then_rewrite(name, paths, **kw):
        r = orig(name, paths, **kw)
        if name == "synth":
            np.save(victim, copy)  # rewritten just after it was decoded
        return r

    kw = {"metric": "ssim", "k": 1, "chunk_size": 3, "progress": False}
    monkeypatch.setattr(A, "_decode_all", decode_then_rewrite)
    A.audit(ds["train"], synth, out=tmp_path / "o", **kw)
    monkeypatch.setattr(A, "_decode_all", orig)
    A.audit(ds["train"], synth, out=tmp_path / "o", **kw)
    A.audit(ds["train"], synth, out=tmp_path / "clean", **kw)
    row = {r["synth_path"]: r for r in _rows(tmp_path / "o")}[str(victim)]
    assert row["label"] == "duplicate" and row["train_path"].endswith("mni_070.npy")
    _compare_outputs(tmp_path / "clean", tmp_path / "o")


def test_a_second_audit_into_the_same_out_stops_at_once(ds: dict, tmp_path: Path) -> None:
    """Two audits into one OUT (the second with other thresholds) both finished without a word; the second
    had reset the first's work folder, and kept the first's counts under its own state on every rerun. An
    audit now holds a lock on OUT; another stops before touching it, naming the process that holds it."""
    out = tmp_path / "o"
    kw = {"metric": "ssim", "k": 1, "progress": False}
    out.mkdir()
    with A._out_lock(out):  # (as a running audit holds it: another open file, so another lock)
        with pytest.raises(A.OutputInUse, match=rf"{re.escape(str(out))} is in use by another audit \(process "
                                                rf"{os.getpid()}\)"):
            A.audit(ds["train"], ds["synth"], out=out, **kw)
    assert sorted(p.name for p in out.iterdir()) == [".deepssim_fast.lock"]  # nothing written
    r = A.audit(ds["train"], ds["synth"], out=out, **kw)  # released
    assert r.summary["n_synth"] > 0
    r2 = A.audit(ds["train"], ds["synth"], out=out, **kw)  # and released again when it returned
    assert r2.summary["counts"] == r.summary["counts"]


@pytest.mark.parametrize("linear", [True, False])
def test_batched_shift_search_gives_each_pair_its_own_result_bit_for_bit(linear: bool) -> None:
    """_best_shifts over a batch of pairs (one FFT call for all) against the same pairs one at a time
    (_best_shift, a batch of one): the same shift and the same correlation, bit for bit, 2D and 3D, real MRI
    and random, odd sizes, so a pair's result does not depend on the pairs batched with it. (numpy's complex
    multiply rounds the elements of its vector loop and of its tail differently: the batched search multiplies
    a pair's spectra on their own. The batch-of-one path was checked against the pair-by-pair code of the
    previous release, bit for bit; its correlations are checked against a direct sum above.)"""
    rng = np.random.default_rng(5)
    mni = data.load_volume("mni152").array
    real = np.stack([data.center_fit(mni[::4, ::4, z], (41, 37)) for z in range(40, 140, 5)]).astype(np.float32)
    cases = [(real, np.roll(real[::-1], (1, -2), axis=(1, 2)) + rng.normal(0, 2, real.shape).astype(np.float32)),
             (rng.random((9, 13, 17)).astype(np.float32), rng.random((9, 13, 17)).astype(np.float32)),
             (rng.random((4, 9, 11, 8)).astype(np.float32), rng.random((4, 9, 11, 8)).astype(np.float32))]
    for t, s in cases:
        shape = t.shape[1:]
        for reach in ((0,) * len(shape), (1,) * len(shape), (2, 1) + (0,) * (len(shape) - 2)):
            pad = max(max(reach), 1) if linear else 0
            padded = tuple(A._fft_len(n + pad) if pad else n for n in shape)
            tc = np.stack([x.astype(np.float64) - x.mean() for x in t])
            axes = tuple(range(1, len(shape) + 1))
            ds, scores = A._best_shifts(np.fft.rfftn(tc, s=padded, axes=axes), A._square_tables(tc, pad), shape,
                                        padded, s, reach, linear=linear)
            for i in range(len(t)):
                one = np.fft.rfftn(tc[i], s=padded, axes=tuple(range(len(shape))))
                d, score = A._best_shift(one, A._square_table(tc[i], pad), shape, padded, s[i], reach, linear=linear)
                assert (d, score) == (ds[i], scores[i]), (shape, reach, i)


def test_verify_pairs_gives_each_pair_the_same_result_alone_or_in_any_batch() -> None:
    """Verification searches its transforms a batch of pairs at a time; a pair's verified SSIM and transform
    must not depend on which pairs share its batch (a resume, evaluate and the audit batch them differently)."""
    rng = np.random.default_rng(1)
    mni = data.load_volume("mni152").array
    t = np.stack([data.center_fit(mni[::4, ::4, z], (41, 37)) for z in range(40, 140, 4)]).astype(np.float32)
    s = t[rng.permutation(len(t))].copy()
    s[::3] = np.flip(t[::3], axis=(1, 2)) + rng.normal(0, 2, t[::3].shape).astype(np.float32)
    s[2::4] = np.roll(t[2::4], (1, -2), axis=(1, 2))
    for kw in (dict(flips=True, shifts=2), dict(flips=True, shifts=1, rotations=10.0),
               dict(flips=True, shifts=2, overlap=False, all_mirrors=False)):
        whole = A.verify_pairs(t, s, spatial_dims=2, **kw)
        for step in (1, 7):
            parts = [A.verify_pairs(t[a:a + step], s[a:a + step], spatial_dims=2, **kw) for a in range(0, len(t), step)]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0]), (kw, step)
            assert sum((p[1] for p in parts), []) == whole[1], (kw, step)


def test_settings_that_cannot_work_are_named_with_their_flags(ds: dict, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """thresholds (0.6, 1.0) were taken without a word, and no pair can be a duplicate then (a score is at most
    1, and duplicate means above high): an exact copy came out "similar", 0 % memorised. verify_rotations with
    verify='none' was refused in the API's names only."""
    with pytest.raises(ValueError, match=r"verify_rotations \(--verify-rotations\) is applied when verifying "
                                         r"\(verify='ssim', --verify ssim\)"):
        A.audit(ds["train"], ds["synth"], metric="correlation", verify="none", verify_rotations=5.0,
                out=tmp_path / "o", progress=False)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], ds["synth"], metric="correlation", verify="none", k=1, thresholds=(0.6, 1.0),
                    out=tmp_path / "o", progress=False)
    assert "no item can be labelled duplicate" in caplog.text
    assert r.summary["counts"]["duplicate"] == 0 and r.summary["counts"]["similar"] >= 5  # (the plants)


def test_volumes_mode_refuses_a_batch_of_volumes_and_warns_of_items_mostly_padding(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A batch of volumes saved as one (N, D, H, W) .npy was read as a D-long series of (N, D, H) "frames",
    padded and audited: the exact copy in it scored -0.03, "different", without a word (slices mode refuses such
    a file). And an item size taken from a 128 x 128 x 10 first training file made 40 x 48 x 40 volumes 94 %
    padding, two unrelated brain regions a duplicate: the fit is said now when it keeps or fills under half."""
    mni = data.load_volume("mni152").array
    a, b = (np.ascontiguousarray(mni[x:x + 40, 60:108, 30:70]) for x in (30, 60))
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    np.save(tmp_path / "t" / "a.npy", a)
    np.save(tmp_path / "s" / "batch2.npy", np.stack([a, b]))
    np.save(tmp_path / "s" / "b.npy", b)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=1, out=tmp_path / "o",
                    progress=False)
    assert r.summary["n_synth"] == 1
    (bad,) = r.summary["skipped"]
    assert bad["path"].endswith("batch2.npy") and "save one volume per file" in bad["reason"]
    assert "a batch of 2 volumes of 40 x 48 x 40 saved as one (N, D, H, W) array, or a series" in bad["reason"]
    assert "more than half padding" not in caplog.text  # (one shape: nothing to say)
    np.save(tmp_path / "t" / "S0.npy", np.ascontiguousarray(mni[:128:1, :128, 40:50]))  # (sorts first)
    # twice: the second run takes every item from the cache, where the warning, given only when an item was
    # decoded, was lost (a rerun, or a file in both sets, decoded once); it comes from the cached shapes now
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
            A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", mode="volumes", k=1, out=tmp_path / "o2",
                    progress=False)
        assert re.search(r"item\(s\), e\.g\. .*a\.npy of shape \(40, 48, 40\), lose more than half their voxels or "
                         r"are more than half padding at the item size \(128, 128, 10\)", caplog.text)
        assert re.search(r"\d+ synth item\(s\)", caplog.text)


def test_slices_mostly_cropped_are_said_in_pixels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The warning of items that the centre fit crops or pads past half said "voxels" for 2D slices too: it says
    pixels in slices mode (voxels in volumes mode, above)."""
    mni = data.load_volume("mni152").array
    (tmp_path / "t").mkdir()
    (tmp_path / "s").mkdir()
    for z in (60, 90):
        np.save(tmp_path / "t" / f"t{z}.npy", _small(mni[:, :, z]))  # (66 x 78: the item size)
    np.save(tmp_path / "s" / "big.npy", np.ascontiguousarray(mni[:, :, 75]))  # (cropped to a fifth)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "t", tmp_path / "s", metric="ssim", k=1, out=tmp_path / "o", progress=False)
    assert re.search(r"1 synth item\(s\), e\.g\. .*big\.npy of shape \(\d+, \d+\), lose more than half their "
                     r"pixels or are more than half padding at the item size \(66, 78\)", caplog.text), caplog.text
    assert "voxels" not in caplog.text


def test_a_work_folder_without_its_state_is_not_reused_under_other_options(
        ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """OUT/work without state.json (deleted by hand or by a cleanup script) kept its searches and verified
    chunks, which the next run reused whatever its options: matches.csv had flipped transforms and 5 ranks
    beside a summary of no flips and k = 3. They are cleared now, and the run equals a fresh one."""
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    A.audit(ds["train"], ds["synth"], metric="ssim", k=5, out=out, verify_flips=True, chunk_size=3,
            progress=False)
    (out / "work" / "state.json").unlink()
    r = A.audit(ds["train"], ds["synth"], metric="ssim", k=3, out=out, verify_flips=False, chunk_size=3,
                progress=False)
    f = A.audit(ds["train"], ds["synth"], metric="ssim", k=3, out=fresh, verify_flips=False, chunk_size=3,
                progress=False)
    assert _rows(out) == _rows(fresh)
    assert {int(x["rank"]) for x in _rows(out)} == {1, 2, 3}
    assert not any("flip" in x["transform"] for x in _rows(out))
    assert r.summary["counts"] == f.summary["counts"]


def test_resume_says_so_and_a_changed_engine_or_option_starts_over_naming_it(
        ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume looked like a fresh run, and a changed option threw the finished work away with an INFO line
    only (shown with -v): a mistyped option lost hours silently. A resume under another backend mixed two
    engines' scores in one matches.csv (the backend was not part of the run's configuration)."""
    out = tmp_path / "o"
    run = dict(metric="ssim", k=3, out=out, chunk_size=3, progress=False)
    A.audit(ds["train"], ds["synth"], **run)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(ds["train"], ds["synth"], **run)
    assert "resuming the earlier run of this configuration" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], ds["synth"], **dict(run, backend="torch"))
    assert re.search(r"the configuration changed since the last run \(engine\): its finished search and "
                     r"verification are discarded", caplog.text), caplog.text
    assert r.summary["engine"]["backend"] == "torch"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):  # torch again, with a device for nothing
        A.audit(ds["train"], ds["synth"], **dict(run, backend="torch", device="cpu"))
    assert "resuming the earlier run" in caplog.text  # (an ssim audit has no encoder: its device is no change)
    caplog.clear()
    monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", "torch")  # the same engine, asked for by the environment
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(ds["train"], ds["synth"], **run)
    assert "resuming the earlier run" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(ds["train"], ds["synth"], **dict(run, k=2))
    assert re.search(r"changed since the last run \(k\)", caplog.text), caplog.text


def test_the_search_variant_verified_on_a_shift_is_scored_on_its_overlap_too() -> None:
    """The search variant a pair owes its search score to is scored by verification as well (verify_pairs'
    ``extra``); a shifted one had its filled score only, where the shifts verification finds itself are also
    scored on the overlap: a verified SSIM of 0.178 where the overlap gives 0.189 (README: "the better score
    counts")."""
    from deepssim_fast.reference import ssim_reference

    t = np.ascontiguousarray(data.load_volume("mni152").array[40:140, 40:140, 70], dtype=np.float32)
    rng = np.random.default_rng(3)
    s = np.roll(t, -2, axis=1)
    s[:, -2:] = rng.random((t.shape[0], 2)).astype(np.float32) * float(t.max())  # the band the shift uncovers
    d = (0, 2)
    best, names = A.verify_pairs(t[None], s[None], spatial_dims=2,
                                 extra=[("shift(0,2)", lambda x: A._shift(x, d))])
    shifted = A._shift(s, d)
    dst = A._shift_slices(d, t.shape)[1]
    filled = float(ssim_reference(t, shifted, preset="deepssim"))
    on_overlap = float(ssim_reference(t[dst], shifted[dst], preset="deepssim"))
    assert on_overlap > filled + 1e-3  # (the case is one where the overlap matters)
    assert names == ["shift(0,2)"] and abs(float(best[0]) - on_overlap) <= 1e-6, (best, filled, on_overlap)


def test_a_search_that_scores_most_pairs_a_duplicate_is_warned_about(
        ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An encoder trained a few steps scored all 140 pairs of an audit a duplicate, blank images included; with
    --verify none the audit reported 100 % memorised without a word. An embedding search that puts at least
    half of all pairs above the high threshold now says that it does not tell the images apart. (Here:
    embeddings that are all one vector. Exact SSIM and correlation searches are not warned about: SSIM is the
    label's own score, and registered anatomy correlates highly.)"""
    rng = np.random.default_rng(0)
    v = rng.standard_normal(16).astype(np.float32)
    np.save(tmp_path / "t.npy", np.tile(v, (5, 1)) + 1e-4 * rng.standard_normal((5, 16)).astype(np.float32))
    np.save(tmp_path / "s.npy", np.tile(v, (20, 1)) + 1e-4 * rng.standard_normal((20, 16)).astype(np.float32))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "t.npy", tmp_path / "s.npy", metric="embeddings", verify="none", k=1,
                out=tmp_path / "o", progress=False)
    assert re.search(r"the search on the given embeddings scores 100 of 100 pairs \(100 %\) a duplicate: they do not "
                     r"tell these images apart .*the labels are these scores \(--verify none\)", caplog.text)
    # blank images are alike to any search; exact SSIM is the labels' own score: no warning
    (tmp_path / "bt").mkdir()
    (tmp_path / "bs").mkdir()
    for i in range(5):
        np.save(tmp_path / "bt" / f"t{i}.npy", np.full((32, 32), float(i), np.float32))
    for i in range(20):
        np.save(tmp_path / "bs" / f"s{i:02d}.npy", np.full((32, 32), 10.0 + i, np.float32))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        A.audit(tmp_path / "bt", tmp_path / "bs", metric="ssim", k=1, verify="none", out=tmp_path / "ob",
                progress=False)
        A.audit(ds["train"], ds["synth"], metric="ssim", k=1, out=tmp_path / "o_mri", progress=False)
    assert "do not tell these images apart" not in caplog.text


def test_a_k_above_the_training_set_is_said(ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """-k 100 with 14 training items was clamped to 14 without a word (the summary said "top 14")."""
    with caplog.at_level("WARNING", logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], ds["synth"] / "s04.npy", metric="ssim", k=100, verify="none",
                    out=tmp_path / "o", progress=False)
    assert r.summary["k"] == 14
    assert ("k=100 is more than the 14 training items: every training item is kept for each synthetic item "
            "(k=14)") in caplog.text


def test_a_batch_of_seven_or_more_volumes_in_one_npy_is_refused(tmp_path: Path) -> None:
    """21 volumes of 32^3 saved as one (21, 32, 32, 32) .npy were read as 32 frames of 21 x 32 x 32 (a 4D .npy
    is a series along its last axis, as NIfTI stores one): three exact copies of each training volume all came
    out "different", 0 % memorised, without a word (a batch of fewer than 7 was refused, its frames being
    thinner than the SSIM window). Such a file is refused as a batch now, in both modes; a series with its
    frames last is read as before."""
    vol = data.load_volume("mni152").array
    vols = [np.ascontiguousarray(vol[40 + 8 * i:72 + 8 * i, 60:92, 60:92]) for i in range(7)]
    (tmp_path / "train").mkdir()
    (tmp_path / "synth").mkdir()
    for i, v in enumerate(vols):
        np.save(tmp_path / "train" / f"t{i}.npy", v)
    np.save(tmp_path / "synth" / "batch.npy", np.stack(vols * 3))  # (21, 32, 32, 32)
    np.save(tmp_path / "synth" / "series.npy", np.stack(vols[:2], axis=-1))  # (32, 32, 32, 2): frames last
    kw = dict(metric="ssim", mode="volumes", k=1, verify="none", progress=False)
    r = A.audit(tmp_path / "train", tmp_path / "synth", out=tmp_path / "o", **kw)
    (sk,) = r.summary["skipped"]
    assert sk["path"] == str(tmp_path / "synth" / "batch.npy")
    assert ("a batch of 21 volumes of 32 x 32 x 32 saved as one (N, D, H, W) array, or a series of 32 frames of "
            "21 x 32 x 32?") in sk["reason"]
    assert r.summary["n_synth"] == 2 and r.summary["counts"]["duplicate"] == 2  # the series' two frames
    with pytest.raises(DataError, match=r"batch\.npy: a 4D array of shape \(21, 32, 32, 32\): a batch of 21"):
        list(iter_slices([tmp_path / "synth" / "batch.npy"], SlicePolicy(min_foreground=0), strict=True))


def test_a_series_whose_first_axis_is_thinnest_is_named_with_the_way_to_read_it(tmp_path: Path) -> None:
    """The batch-of-volumes rule also takes a real series stored (D, H, W, T) with few slices for a batch:
    its message offers np.moveaxis, which reads it; and read_image (the ssim command's --frame) refuses such a
    file as the audit does (it read it)."""
    from deepssim_fast.io import read_image

    vol = data.load_volume("mni152").array[60:70, 60:92, 60:92]  # 10 x 32 x 32
    series = np.stack([vol + i for i in range(20)], axis=-1).astype(np.float32)  # (10, 32, 32, 20)
    np.save(tmp_path / "series.npy", series)
    with pytest.raises(DataError, match=r"or a series of 20 frames of 10 x 32 x 32\?.*np\.moveaxis\(a, 0, 2\)"):
        read_image(tmp_path / "series.npy", frame=0)
    np.save(tmp_path / "moved.npy", np.moveaxis(series, 0, 2))  # (32, 32, 10, 20): read as 20 frames
    np.testing.assert_array_equal(read_image(tmp_path / "moved.npy", frame=3), np.moveaxis(series, 0, 2)[..., 3])


def test_verify_none_with_flips_says_what_its_pair_counts_and_histogram_cover(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, axes_titles: list) -> None:
    """--verify none --verify-flips on mirrored copies of training slices: the page said 100 % duplicate and
    matches.csv '1.000000,,duplicate,hflip', but summary.json's pair_counts_search and the only histogram
    ('correlation: all N pairs') were those of the search of the unflipped items alone, without a word: a pair's
    best score over the flips is not in them. The summary now names what its pair counts cover and gives each
    flip search's own counts; the histogram draws those too, and its title and the page say which is which."""
    names = sorted(ds["train_arrays"])[:4]
    synth = tmp_path / "s"
    synth.mkdir()
    for n in names:
        np.save(synth / n, np.ascontiguousarray(ds["train_arrays"][n][:, ::-1]))
    titles = axes_titles
    out = tmp_path / "o"
    kw = dict(metric="correlation", verify="none", verify_flips=True, k=2, out=out, progress=False)
    A.audit(ds["train"], synth, **kw)
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["duplicate"] == 4
    assert all(r["transform"] == "hflip" for r in _rows(out) if r["rank"] == "1")
    assert s["pair_counts_search_covers"].startswith("the synthetic items as given (the search without flips)")
    per = s["pair_counts_search_variants"]
    assert sorted(per) == ["hflip", "hvflip", "vflip"]
    assert all(sum(c.values()) == s["n_pairs"] == 4 * 14 for c in per.values())
    assert per["hflip"]["duplicate"] >= 4  # the 4 mirrored copies, each scored 1 by the hflip search
    assert "correlation, search without flips: all 56 pairs" in titles
    text = re.sub(r"\s+", " ", (out / "report.html").read_text())
    assert "search of the synthetic items as given (without flips)" in text
    # a resume keeps each variant's counts (they are saved with the search); one saved before they were is
    # searched again
    page = (out / "report.html").read_bytes()
    A.audit(ds["train"], synth, **kw)
    assert json.loads((out / "summary.json").read_text())["pair_counts_search_variants"] == per
    res = A.SearchResult.load(out / "work" / "search.npz")
    assert list(res.variant_counts) == ["hflip", "vflip", "hvflip"]  # (in the order searched)
    res.variant_counts = None
    res.save(out / "work" / "search.npz")
    A.audit(ds["train"], synth, **kw)
    assert json.loads((out / "summary.json").read_text())["pair_counts_search_variants"] == per
    assert (out / "report.html").read_bytes() == page
    # no variants: the counts cover every pair's one score
    r = A.audit(ds["train"], synth, metric="correlation", verify="none", k=2, out=tmp_path / "o2", progress=False)
    assert r.summary["pair_counts_search_variants"] == {}
    assert r.summary["pair_counts_search_covers"].startswith("the synthetic items as given (no flips or shifts")


def test_warnings_that_change_how_the_results_read_are_in_the_summary_and_report_once(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'6 file(s) of image formats this tool does not read are left out (3 .dcm, 3 .jpg)' and '1 synthetic
    file(s) are also training files ... each will match itself as a duplicate' went to stderr only. They are
    in summary.json's warnings and near the top of report.html now, each once, also after a resume; the
    run's own bookkeeping (a resume, the skipped inputs listed apart) is not among them."""
    synth = tmp_path / "synth"
    synth.mkdir()
    for name in ("s04.npy", "s12.npy", "s99_corrupt.npy"):
        shutil.copy(ds["synth"] / name, synth / name)
    (synth / "linked.npy").symlink_to(ds["train"] / "mni_030.npy")
    for i in range(3):
        (synth / f"slice{i}.dcm").write_bytes(b"DICM")
        (synth / f"photo{i}.jpg").write_bytes(b"\xff\xd8\xff")
    kw = dict(metric="ssim", k=2, chunk_size=1, progress=False)
    whole = A.audit(ds["train"], synth, out=tmp_path / "whole", **kw)
    warned = whole.summary["warnings"]
    assert len(warned) == 2, warned
    assert warned[0] == (f"{synth}: 6 file(s) of image formats this tool does not read are left out (3 .dcm, "
                         f"3 .jpg); convert them to .nii, .nii.gz, .png, .npy")
    assert warned[1].startswith(f"1 synthetic file(s) are also training files ({synth / 'linked.npy'}): each "
                                "will match itself as a duplicate")
    page = (tmp_path / "whole" / "report.html").read_text()
    assert page.index("<h2>Warnings</h2>") < page.index("<h2>Score distribution</h2>")
    assert "3 .dcm, 3 .jpg" in page and "also training files" in page

    def die(stage: str, index: int) -> None:
        if stage == "verify" and index == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    with pytest.raises(KeyboardInterrupt):
        A.audit(ds["train"], synth, out=tmp_path / "resumed", **kw)
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: None)
    resumed = A.audit(ds["train"], synth, out=tmp_path / "resumed", **kw)
    assert resumed.summary["warnings"] == warned  # not lost, not twice, no word of the resume
    _compare_outputs(tmp_path / "whole", tmp_path / "resumed")
    # an audit with nothing to warn about: none (its skipped corrupt file is listed among the skipped inputs)
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["warnings"] == warned
    plain = A.audit(ds["train"], ds["synth"] / "s04.npy", out=tmp_path / "plain", **kw)
    assert plain.summary["warnings"] == []


def test_a_folder_of_the_users_named_shards_in_out_is_neither_removed_nor_left_out(ds: dict, tmp_path: Path) -> None:
    """Found by a probe: an --out holding a folder named ``shards`` (or ``shards_<x>``) lost it without a word
    (the audit took it for its Dask search's checkpoints), and when the audit read its images from that folder
    they were first left out as "its own outputs": 0 % memorised where half the synthetic set are copies. A
    shards folder is the audit's only when it holds nothing but all-pairs checkpoints now; this one's images are
    audited, and the folder stays, also through a rerun with other settings (which clears the audit's own)."""
    data = tmp_path / "data"
    names = sorted(p.name for p in ds["train"].glob("*.npy"))
    for i, name in enumerate(names):  # the sources of the two copies below are in data/shards
        (data / ("shards" if i >= 7 else "other")).mkdir(parents=True, exist_ok=True)
        shutil.copy(ds["train"] / name, data / ("shards" if i >= 7 else "other") / name)
    synth = [ds["synth"] / n for n in ("s03.npy", "s04.npy", "s12.npy")]  # copies of mni_110, mni_134; a novel scan
    kw = dict(metric="correlation", k=1, verify="none", out=data, progress=False)
    r = A.audit(data, synth, **kw)
    assert (r.summary["n_train"], r.summary["counts"]["duplicate"]) == (14, 2)
    assert sorted(p.name for p in (data / "shards").iterdir()) == names[7:]
    (data / "shards_vflip").mkdir()  # an earlier Dask search's checkpoints: the audit's, cleared on a change
    (data / "shards_vflip" / "allpairs-0123456789abcdef.json").write_text("{}")
    r2 = A.audit(data, synth, **dict(kw, k=2))
    assert (r2.summary["n_train"], r2.summary["counts"]["duplicate"]) == (14, 2)
    assert sorted(p.name for p in (data / "shards").iterdir()) == names[7:]
    assert not (data / "shards_vflip").exists()


def test_files_of_the_audits_names_in_a_folder_that_is_no_audits_are_refused_not_removed(
        ds: dict, tmp_path: Path) -> None:
    """Found by a probe: with --out a project folder, its evaluation.json, its work/search*.npz and its folders
    shards/ and shards_hflip/ were deleted without a word (work/ always existed by the time the audit looked for
    a "fresh OUT", so it took any OUT for an earlier audit's). Only an OUT that was an audit's before the run
    (its lock file, work/state.json, or summary.json beside matches.csv) has files the audit may replace; in any
    other folder files of those names are refused before any work, and so are shard folders of other files
    where a Dask search would write its shards. Nothing is touched, and no lock file is left."""
    proj = tmp_path / "proj"
    (proj / "work").mkdir(parents=True)
    (proj / "evaluation.json").write_text('{"mine": 1}')
    np.savez(proj / "work" / "search1.npz", a=np.zeros(2))
    mine = {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    kw = dict(metric="correlation", k=1, verify="none", progress=False)
    synth = ds["synth"] / "s04.npy"
    with pytest.raises(ValueError, match=rf"{re.escape(str(proj))} is not an audit's output folder .*: "
                                         r"evaluation\.json, work/search1\.npz .*nothing was changed.*another --out"):
        A.audit(ds["train"], synth, out=proj, **kw)
    assert {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()} == mine
    # folders of the user's named shards*: left alone without Dask; refused where the Dask search would write
    other = tmp_path / "other"
    (other / "shards").mkdir(parents=True)
    (other / "shards_hflip").mkdir()
    (other / "shards" / "part-0001.parquet").write_bytes(b"PAR1")
    (other / "shards_hflip" / "x.txt").write_text("notes")
    A.audit(ds["train"], synth, out=other, **kw)
    A.audit(ds["train"], synth, out=other, **dict(kw, k=2))  # (another configuration: the audit's files go)
    assert (other / "shards" / "part-0001.parquet").read_bytes() == b"PAR1"
    assert (other / "shards_hflip" / "x.txt").read_text() == "notes"
    fresh = tmp_path / "fresh"
    for d in ("shards", "shards_hflip"):
        shutil.copytree(other / d, fresh / d)
    with pytest.raises(ValueError, match=r"shards holds files other than the all-pairs checkpoints .*"
                                         r"\(e\.g\. part-0001\.parquet\).*shards_hflip holds .*x\.txt"):
        A.audit(ds["train"], synth, out=fresh, verify_flips=True, workers=1, **kw)
    assert sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*")) == [
        "shards", "shards/part-0001.parquet", "shards_hflip", "shards_hflip/x.txt"]


def _zip_member_span(f: Path, member: str) -> tuple[int, int]:
    """(offset, length) of the bytes of the stored (uncompressed) member ``member`` of the zip file ``f``."""
    import struct
    import zipfile

    with zipfile.ZipFile(f) as z:
        info = z.getinfo(member)
    raw = f.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip_byte(f: Path, at: int) -> None:
    raw = bytearray(f.read_bytes())
    raw[at] ^= 0x5A
    f.write_bytes(bytes(raw))


def test_a_damaged_search_or_verified_chunk_is_computed_again_with_a_warning(
        ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a probe: a truncated work/search.npz, or a work/search_NNNNN.npz or verify_NNNNN.npz with bytes
    flipped inside (the verified chunk's ssim.npy or transform.npy: only its indices were checked) stopped every
    rerun with a zipfile.BadZipFile traceback. Each is treated as missing now, as an unreadable state.json is: a
    warning names it (about the run, not in summary.json), that part is computed again, and the outputs are
    those of the undamaged run."""
    out = tmp_path / "o"
    kw = dict(metric="ssim", k=2, chunk_size=3, out=out, progress=False)
    A.audit(ds["train"], ds["synth"], **kw)
    want = {n: (out / n).read_bytes() for n in DETERMINISTIC}
    work = out / "work"

    def rerun(damaged: Path) -> None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
            r = A.audit(ds["train"], ds["synth"], **kw)
        assert any(m.startswith(f"{damaged}: unreadable") for m in caplog.messages), caplog.messages
        assert not any(str(damaged) in w for w in r.summary["warnings"])
        for n, b in want.items():
            assert (out / n).read_bytes() == b, n

    search = work / "search.npz"
    search.write_bytes(search.read_bytes()[: search.stat().st_size // 2])
    rerun(search)
    search.unlink()  # (the exact SSIM search then reads its chunks)
    chunk = work / "search_00001.npz"
    at, n = _zip_member_span(chunk, "scores.npy")
    _flip_byte(chunk, at + n - 1)
    rerun(chunk)
    verified = work / "verify_00000.npz"
    for member in ("ssim.npy", "transform.npy"):
        at, n = _zip_member_span(verified, member)
        _flip_byte(verified, at + n - 1)
        rerun(verified)


def _npy_data_span(f: Path) -> tuple[int, int]:
    """(offset, length) of the array data of the .npy file ``f``."""
    with open(f, "rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        return fh.tell(), int(np.prod(shape)) * dtype.itemsize


def test_damaged_embeddings_are_named_and_embedded_again_and_unchecked_ones_once(
        ds: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a probe: the cached embeddings (cache/embeddings/*.npy) and a search variant's
    (work/synth_vectors_<variant>.npy), written without fsync, were checked for shape and finiteness only: bytes
    flipped in place (still a .npy) gave other matches without a word, and a zeroed data part stopped every
    rerun with "train row 4 is all zeros", naming neither the file nor its image. Each carries a checksum now:
    a damaged one is named in a warning and embedded again; one without a checksum (an earlier version's) is
    embedded again without a warning, once."""
    import torch

    from deepssim_fast.model import build_model

    torch.manual_seed(0)
    model = build_model("small", input_size=32)
    synth = [ds["synth"] / n for n in ("s00.npy", "s04.npy", "s12.npy")]
    out, cache = tmp_path / "o", tmp_path / "cache"
    kw = dict(model=model, metric="deepssim", k=2, verify="none", verify_flips=True, out=out, cache_dir=cache,
              progress=False)
    A.audit(ds["train"], synth, **kw)
    want = (out / "matches.csv").read_bytes()
    embs = sorted((cache / "embeddings").glob("*.npy"))
    assert len(embs) == 14 + 3
    flipped, zeroed, unchecked = embs[2], embs[5], embs[8]
    variant = out / "work" / "synth_vectors_hflip.npy"
    for f in (flipped, variant):
        at, n = _npy_data_span(f)
        _flip_byte(f, at + n // 2)
        np.load(f)  # (still a .npy)
    at, n = _npy_data_span(zeroed)
    raw = zeroed.read_bytes()
    zeroed.write_bytes(raw[:at] + bytes(n) + raw[at + n :])
    np.save(unchecked, np.load(unchecked))  # as an earlier version wrote it
    (out / "work" / "search.npz").unlink()  # (the search runs again, and reads the variants' embeddings)
    embedded: list[int] = []
    real = A._embed
    monkeypatch.setattr(A, "_embed", lambda images, *a, **k: embedded.append(len(images)) or real(images, *a, **k))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], synth, **kw)
    warned = [m for m in caplog.messages if "checksum" in m]
    for f in (flipped, zeroed, variant):
        assert sum(str(f) in m and "embedding again" in m for m in warned) == 1, (f, caplog.messages)
    assert not any(str(unchecked) in m for m in caplog.messages)
    assert not any("checksum" in w for w in r.summary["warnings"])
    assert sum(embedded) == 3 + len(synth)  # the three files' items, and the synthetic items flipped
    assert (out / "matches.csv").read_bytes() == want
    embedded.clear()
    (out / "work" / "search.npz").unlink()
    A.audit(ds["train"], synth, **kw)  # each rewritten with its checksum: nothing is embedded again
    assert embedded == [] and (out / "matches.csv").read_bytes() == want


def _same_outputs(a: Path, b: Path) -> None:
    """The deterministic outputs of the audits into ``a`` and ``b`` are the same but for the folder's name."""
    for name in DETERMINISTIC:
        assert (a / name).read_bytes().replace(os.fsencode(a), b"OUT") == (b / name).read_bytes().replace(
            os.fsencode(b), b"OUT"), name


def _killed_at_verify_chunk(ds: dict, kw: dict, monkeypatch: pytest.MonkeyPatch, chunk: int = 1) -> None:
    """Run the audit ``kw`` until it has verified ``chunk`` chunks, then kill it (as a Ctrl-C would)."""

    def die(stage: str, index: int) -> None:
        if stage == "verify" and index == chunk:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(A, "_chunk_hook", die)
    with pytest.raises(KeyboardInterrupt):
        A.audit(ds["train"], ds["synth"], **kw)
    monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: None)


def test_a_pixel_store_damaged_in_place_stops_the_resumed_run_naming_the_item(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a probe: the pixel stores (work/<set>_pixels.npy) carried no checksum, and a resume reused one
    of the right shape, so bytes flipped inside a row gave verified SSIM (and a report) computed from damaged
    pixels without a word. Each row has its CRC-32 now (work/<set>_pixels.crc.npy), checked when it is first
    read: the run stops naming the store, the item and how to recover, and removes the store, which the next
    run builds again from the cache; its outputs are then those of a run never damaged. evaluate does the same."""
    kw = dict(metric="ssim", k=2, chunk_size=3, progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "a", **kw)
    out = tmp_path / "o"
    _killed_at_verify_chunk(ds, dict(kw, out=out), monkeypatch)
    store = out / "work" / "synth_pixels.npy"
    ids = json.loads((out / "work" / "items.json").read_text())["synth"]["ids"]
    at, n = _npy_data_span(store)
    row = n // len(ids)
    _flip_byte(store, at + 7 * row + row // 2)  # an item of the chunk not yet verified; the size is unchanged
    with pytest.raises(RuntimeError, match="damaged") as ei:
        A.audit(ds["train"], ds["synth"], out=out, **kw)
    msg = str(ei.value)
    assert str(store) in msg and f"item 7 ({ids[7]})" in msg and "run the audit again" in msg, msg
    assert not store.exists() and not (out / "work" / "synth_pixels.crc.npy").exists()
    A.audit(ds["train"], ds["synth"], out=out, **kw)
    _same_outputs(out, tmp_path / "a")

    # evaluate reads the rows of the labelled pairs: a damaged one stops it the same way
    src = ds["truth"]["s04.npy"][1]
    labels = _labels(tmp_path / "l.csv", (src, "s04.npy", 1), ("mni_030.npy", "s10.npy", 0))
    want = A.evaluate(out, labels)
    tstore = out / "work" / "train_pixels.npy"
    t_ids = json.loads((out / "work" / "items.json").read_text())["train"]["ids"]
    j = next(i for i, t in enumerate(t_ids) if t.startswith(f"{ds['train'] / src}#"))
    at, n = _npy_data_span(tstore)
    _flip_byte(tstore, at + j * (n // len(t_ids)) + 5)
    with pytest.raises(RuntimeError, match="damaged") as ei:
        A.evaluate(out, labels)
    assert str(tstore) in str(ei.value) and f"item {j} ({t_ids[j]})" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="run the audit"):  # (removed: not scored from it again)
        A.evaluate(out, labels)
    A.audit(ds["train"], ds["synth"], out=out, **kw)  # builds it again
    assert A.evaluate(out, labels) == want


def test_a_pixel_store_without_its_checksums_is_built_again_on_resume(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A store without its checksum file (an earlier version's, or a run killed between the two writes) is not
    trusted: the resumed run builds it again from the cache, as one whose checksum file is damaged (named in a
    warning about the run); the outputs are those of an uninterrupted run."""
    kw = dict(metric="ssim", k=2, chunk_size=3, progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "a", **kw)
    out = tmp_path / "o"
    _killed_at_verify_chunk(ds, dict(kw, out=out), monkeypatch)
    work = out / "work"
    (work / "synth_pixels.crc.npy").unlink()
    at, n = _npy_data_span(work / "train_pixels.crc.npy")
    _flip_byte(work / "train_pixels.crc.npy", at + n // 2)
    written: list[str] = []
    real = A._write_pixels
    monkeypatch.setattr(A, "_write_pixels", lambda items, w: written.append(items.name) or real(items, w))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(ds["train"], ds["synth"], out=out, **kw)
    assert sorted(written) == ["synth", "train"]
    assert any(str(work / "train_pixels.crc.npy") in m and "building the pixel store again" in m
               for m in caplog.messages), caplog.messages
    assert not any("pixel store" in w for w in r.summary["warnings"])
    _same_outputs(out, tmp_path / "a")
    for s in ("train", "synth"):  # each with its checksums again
        A._open_store(work / f"{s}_pixels.npy", json.loads((work / "items.json").read_text())[s]["ids"])


def test_a_resume_reuses_its_checked_pixel_stores_and_checks_each_row_it_reads_once(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume keeps the stores and their checksums (nothing is written again) and gives the outputs of an
    uninterrupted run; the rows it reads are checked, each once."""
    kw = dict(metric="ssim", k=2, chunk_size=3, progress=False)
    A.audit(ds["train"], ds["synth"], out=tmp_path / "a", **kw)
    out = tmp_path / "o"
    _killed_at_verify_chunk(ds, dict(kw, out=out), monkeypatch)
    work = out / "work"
    stamps = {f.name: f.stat().st_mtime_ns for f in work.glob("*_pixels*.npy")}
    assert sorted(stamps) == ["synth_pixels.crc.npy", "synth_pixels.npy", "train_pixels.crc.npy",
                              "train_pixels.npy"]
    written: list[str] = []
    checked: list[tuple[str, int]] = []
    real_check = A._PixelStore._check
    monkeypatch.setattr(A, "_write_pixels", lambda items, w: written.append(items.name))

    def check(self, r, row):
        if not self._ok[r]:
            checked.append((self.path.name, r))
        return real_check(self, r, row)

    monkeypatch.setattr(A._PixelStore, "_check", check)
    A.audit(ds["train"], ds["synth"], out=out, **kw)
    assert written == []
    assert {f.name: f.stat().st_mtime_ns for f in work.glob("*_pixels*.npy")} == stamps
    assert len(checked) == len(set(checked)) and ("synth_pixels.npy", 7) in checked
    _same_outputs(out, tmp_path / "a")


def test_a_pixel_store_checks_the_rows_of_every_kind_of_index(tmp_path: Path) -> None:
    """_PixelStore gives what its memory map gives for an index, a negative one, a slice, a list, an array and
    a mask, checking exactly the rows read; np.asarray checks them all."""
    import zlib

    px = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    store = tmp_path / "x_pixels.npy"
    np.save(store, px)
    seeds = A._row_seeds(store, [f"id{i}" for i in range(5)])
    crcs = np.array([zlib.crc32(r, int(sd)) for r, sd in zip(px, seeds, strict=True)], np.uint32)
    A._save_checked(A._store_crc_path(store), crcs.view(A._ROW_CRC), durable=False)
    s = A._open_store(store, [f"id{i}" for i in range(5)])
    assert len(s) == 5 and s.shape == px.shape
    for key in (1, -1, np.int64(2), slice(1, 4), slice(None, None, -2), [0, 3, 3], np.array([4, 1]),
                np.array([True, False, True, False, False])):
        np.testing.assert_array_equal(s[key], px[key])
    np.testing.assert_array_equal(s[np.array([[0, 1], [4, 3]])], px[np.array([[0, 1], [4, 3]])])  # (any shape)
    np.testing.assert_array_equal(np.asarray(s), px)
    assert s._ok.all()
    # past the first axis, or not an item index: refused (a bare True gave the whole store as one "row", checked
    # against row 0's checksum, and the intact store was removed as damaged)
    for key in ((0, 1), True, np.True_, None, Ellipsis):
        with pytest.raises(TypeError, match="indexed by items along its first axis"):
            s[key]
    assert store.exists()
    with pytest.raises(IndexError):
        s[5]

    at, n = _npy_data_span(store)
    _flip_byte(store, at + 3 * (n // 5))  # row 3
    s = A._open_store(store, [f"id{i}" for i in range(5)])
    np.testing.assert_array_equal(s[:3], px[:3])
    assert s[[4, 0]].shape == (2, 3, 4) and not s._ok[3]
    with pytest.raises(RuntimeError, match=r"x_pixels\.npy is damaged: item 3 \(id3\) fails its checksum"):
        s[2:5]
    assert not store.exists() and not A._store_crc_path(store).exists()


def test_pixel_stores_swapped_with_their_checksums_are_caught_and_earlier_checksums_not_trusted(
        ds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a probe: the checksums covered each row's bytes alone, so work/train_pixels.npy and
    synth_pixels.npy swapped together with their .crc.npy files (two sets of as many items) passed every check,
    and the resumed run verified and showed each set's pixels as the other's. Each row's CRC is seeded with its
    set and item id now: a row in the other set's store, or at another item's position, fails its check as a
    damaged row does, and a resume checks each store's first row as it opens it, building a swapped store again
    (said in a warning about the run). Checksums of the earlier format (the bytes alone) are not trusted: a resume
    builds the store again, evaluate says to run the audit again."""
    import zlib

    train, synth = tmp_path / "train", tmp_path / "synth"
    train.mkdir()
    synth.mkdir()
    for name in sorted(ds["train_arrays"])[:4]:
        shutil.copy(ds["train"] / name, train / name)
    for name in ("s00.npy", "s04.npy", "s10.npy", "s11.npy"):
        shutil.copy(ds["synth"] / name, synth / name)
    kw = dict(metric="ssim", k=2, chunk_size=1, progress=False)
    A.audit(train, synth, out=tmp_path / "a", **kw)

    def die(stage: str, index: int) -> None:
        if stage == "verify" and index == 1:
            raise KeyboardInterrupt("simulated kill")

    def resumed(out: Path, change: Callable[[Path], None]) -> A.AuditResult:
        monkeypatch.setattr(A, "_chunk_hook", die)
        with pytest.raises(KeyboardInterrupt):
            A.audit(train, synth, out=out, **kw)
        monkeypatch.setattr(A, "_chunk_hook", lambda stage, index: None)
        change(out / "work")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
            r = A.audit(train, synth, out=out, **kw)
        assert r.summary["warnings"] == []
        _same_outputs(out, tmp_path / "a")
        return r

    def swap(work: Path) -> None:  # the two sets' stores swapped, checksums and all
        for suffix in ("_pixels.npy", "_pixels.crc.npy"):
            t, s_ = work / f"train{suffix}", work / f"synth{suffix}"
            t.rename(work / "swap")
            s_.rename(t)
            (work / "swap").rename(s_)

    resumed(tmp_path / "o", swap)
    said = [m for m in caplog.messages if "building the pixel store again" in m]
    assert len(said) == 2 and all("item 0 (" in m and "fails its checksum" in m for m in said), caplog.messages

    # two rows of a store swapped with their checksums: evaluate stops as at a damaged row
    work = tmp_path / "o" / "work"
    store, crc = work / "synth_pixels.npy", work / "synth_pixels.crc.npy"
    ids = json.loads((work / "items.json").read_text())["synth"]["ids"]
    labels = _labels(tmp_path / "l.csv", *[(sorted(ds["train_arrays"])[0], Path(i.split("#")[0]).name, 0)
                                           for i in ids[:2]])
    want = A.evaluate(tmp_path / "o", labels)
    px, crcs = np.load(store), A._load_checked(crc)
    px[[0, 1]], crcs[[0, 1]] = px[[1, 0]], crcs[[1, 0]]
    np.save(store, px)
    A._save_checked(crc, crcs, durable=False)
    with pytest.raises(RuntimeError, match=r"is damaged: item [01] \(.*\) fails its checksum .*: its row was "
                                           r"changed, or is not that item's"):
        A.evaluate(tmp_path / "o", labels)
    A.audit(train, synth, out=tmp_path / "o", **kw)  # (builds the removed store again)
    assert A.evaluate(tmp_path / "o", labels) == want

    # checksums of the earlier format (plain uint32 of the rows' bytes alone): evaluate refuses them, a resume
    # builds the stores again
    def earlier(work: Path) -> None:
        for side in ("train", "synth"):
            rows = np.load(work / f"{side}_pixels.npy")
            A._save_checked(work / f"{side}_pixels.crc.npy", np.array([zlib.crc32(r) for r in rows], np.uint32),
                            durable=False)

    earlier(work)
    with pytest.raises(ValueError, match=r"checksums of an earlier version's format .*run the audit into"):
        A.evaluate(tmp_path / "o", labels)
    resumed(tmp_path / "r", earlier)
    said = [m for m in caplog.messages if "building the pixel store again" in m]
    assert len(said) == 2 and all("earlier version's format" in m for m in said), caplog.messages
    assert A.evaluate(tmp_path / "r", labels) == dict(want, audit=str(tmp_path / "r"))


def test_a_new_reader_version_decodes_every_file_again(ds: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a probe: the item cache key had no version of the reader, so after an upgrade whose reader
    refuses files it used to read (an RGB (H, W, 3) .npy), those files were still audited from their old cache
    entries. The key carries the reader's version (_READER_VERSION) now: a new reader decodes every file again."""
    synth = [ds["synth"] / n for n in ("s04.npy", "s12.npy")]
    kw = dict(metric="correlation", k=1, verify="none", cache_dir=tmp_path / "cache", out=tmp_path / "o",
              progress=False)
    assert A.audit(ds["train"], synth, **kw).summary["n_synth"] == 2
    real = A._decode_file

    def new_reader(p: Path, mode: str, policy: SlicePolicy) -> tuple:
        if p.name == "s12.npy":
            raise DataError(f"{p}: refused by the new reader")
        return real(p, mode, policy)

    monkeypatch.setattr(A, "_decode_file", new_reader)
    monkeypatch.setattr(A, "_READER_VERSION", A._READER_VERSION + 1)
    r = A.audit(ds["train"], synth, **kw)
    assert r.summary["n_synth"] == 1
    assert [(s["path"], s["reason"]) for s in r.summary["skipped"]] == [(str(synth[1]),
                                                                         f"{synth[1]}: refused by the new reader")]


def test_a_killed_audits_decode_workers_do_not_keep_its_out_locked(tmp_path: Path) -> None:
    """Found by a probe: the decode workers (forked DataLoader processes) inherited the audit's locked descriptor
    of OUT/.deepssim_fast.lock, and an flock belongs to the open file, which they shared: after the audit was
    killed (SIGKILL) they kept OUT locked for ~5 s, until their watchdog ended them, and a rerun was refused as
    "in use by another audit" meanwhile. Forked children close their copies at once now: the lock goes with the
    audit."""
    import signal

    from _checkout import PKG_ROOT

    for kind in ("train", "synth"):
        (tmp_path / kind).mkdir()
        rng = np.random.default_rng(len(kind))
        for i in range(60):
            np.save(tmp_path / kind / f"{kind}{i:03d}.npy", rng.random((64, 64), dtype=np.float32))
    code = """
import importlib, sys, time
A = importlib.import_module("deepssim_fast.audit")
write = A._write_entry
def slow(*args, **kw):  # (the decode workers stay busy)
    print("decoding", flush=True)
    time.sleep(0.05)
    return write(*args, **kw)
A._write_entry = slow
A.audit(sys.argv[1], sys.argv[2], metric="ssim", out=sys.argv[3], decode_workers=2, progress=False)
"""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PKG_ROOT, os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "train"), str(tmp_path / "synth"), str(out)],
                             stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "decoding", (tmp_path / "stderr.txt").read_text()
        os.kill(p.pid, signal.SIGKILL)  # the audit alone (the OOM killer, kill -9), with its workers running
        p.wait(timeout=30)
        t0 = time.perf_counter()
        while True:
            try:
                with A._out_lock(out):
                    break
            except A.OutputInUse as exc:
                assert time.perf_counter() - t0 < 1.0, exc
                time.sleep(0.02)
    finally:
        p.stdout.close()
        try:
            os.killpg(p.pid, signal.SIGKILL)  # (its workers, where any are left)
        except ProcessLookupError:
            pass


def test_a_lock_held_after_its_process_ended_is_said(ds: dict, tmp_path: Path) -> None:
    """The message about a locked OUT named the process holding it; where that process is no longer running
    (its children may still hold the lock: decode workers exiting), it says so, and to retry in a few seconds."""
    import fcntl

    out = tmp_path / "o"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fd = os.open(out / ".deepssim_fast.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{gone.pid}\n".encode())
        # (hedged: where the holder runs on another machine or container sharing the folder, its id means nothing
        # here and the lock is not stale)
        with pytest.raises(A.OutputInUse, match=rf"held by process {gone.pid}, which is not running on this machine"
                                                r"\. If another audit into it runs on another machine or container, "
                                                r"wait for it to finish; otherwise its decode workers may still be "
                                                r"exiting: retry in a few seconds"):
            A.audit(ds["train"], ds["synth"], metric="ssim", k=1, out=out, progress=False)
    finally:
        os.close(fd)


def test_evaluate_does_not_run_beside_an_audit_of_its_folder(ds: dict, tmp_path: Path) -> None:
    """Found by a probe: evaluate took no lock, and run beside an audit rerun into the same folder it could
    write an evaluation.json whose thresholds were not those of the summary.json beside it. It holds the
    audit's lock now: beside a running audit it stops, naming the process, and writes nothing; an audit started
    beside an evaluation stops too."""
    out = tmp_path / "o"
    kw = dict(metric="correlation", k=1, verify="none", out=out, progress=False)
    A.audit(ds["train"], ds["synth"] / "s04.npy", **kw)
    labels = _labels(tmp_path / "l.csv", ("mni_134.npy", "s04.npy", 1))
    with A._out_lock(out):  # (an audit rerun in progress)
        with pytest.raises(A.OutputInUse, match=rf"{re.escape(str(out))} is in use by an audit \(process "
                                                rf"{os.getpid()}\).*then evaluate again"):
            A.evaluate(out, labels)
    assert not (out / "evaluation.json").exists()
    with A._out_lock(out, "evaluate"):  # (an evaluation in progress)
        with pytest.raises(A.OutputInUse, match=r"is in use by an evaluation \(process"):
            A.audit(ds["train"], ds["synth"] / "s04.npy", **dict(kw, thresholds=(0.2, 0.3)))
    r = A.evaluate(out, labels)
    assert r["n"] == 1 and r["thresholds"] == [0.6, 0.85] and (out / "evaluation.json").exists()


def test_correlation_rows_are_file_backed_made_only_for_a_search_and_removed(ds: dict, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A correlation audit held every item's centred row in memory (10^5 items of 256×256: 27 GB), made them
    again on a rerun that reused the saved search, and with flips kept the previous variant's rows while
    building the next. The rows are now file-backed under OUT/work (removed after the search), made only when
    the search runs; the results are those of in-memory rows."""
    made, searched = [], []
    real_rows, real_search = A._centred_rows, A._cosine_search
    monkeypatch.setattr(A, "_ROWS_IN_MEMORY_BYTES", 0)  # (these small rows would stay in memory)

    def rows(pixels, items, *a, **kw):
        made.append(items.name)
        return real_rows(pixels, items, *a, **kw)

    def search(t, s, **kw):
        searched.append((isinstance(t, np.memmap), isinstance(s, np.memmap)))
        return real_search(t, s, **kw)

    monkeypatch.setattr(A, "_centred_rows", rows)
    monkeypatch.setattr(A, "_cosine_search", search)
    kw = dict(metric="correlation", k=3, verify="none", verify_flips=True, progress=False)
    r = A.audit(ds["train"], ds["synth"], out=tmp_path / "o", **kw)
    assert searched and all(t and s for t, s in searched), searched  # (the plain search and each flip's)
    assert not list((tmp_path / "o" / "work").glob("*rows*"))
    n_made = len(made)
    assert n_made >= 2
    # a rerun that reuses the saved search makes no rows
    made.clear()
    A.audit(ds["train"], ds["synth"], out=tmp_path / "o", **kw)
    assert made == []
    # in-memory rows (the code before) give the same matches
    monkeypatch.setattr(A, "_row_store", lambda work, tag, items: _in_memory(items))
    r2 = A.audit(ds["train"], ds["synth"], out=tmp_path / "o2", **kw)
    assert (r.out / "matches.csv").read_bytes() == (r2.out / "matches.csv").read_bytes()


def _in_memory(items):
    import contextlib

    return contextlib.nullcontext(np.empty((len(items), int(np.prod(items.pixels.shape[1:]))), np.float32))


def test_skipped_inputs_are_named_in_the_log_up_to_a_limit(tmp_path: Path, caplog) -> None:
    """Every skipped input printed its own warning, with no cap (7000 lines for 7000 constant or damaged files,
    again on every rerun); the first ones are named, then one line says the rest are in summary.json."""
    tdir, sdir = tmp_path / "t", tmp_path / "s"
    tdir.mkdir()
    sdir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(tdir / f"t{i}.npy", rng.random((24, 24), dtype=np.float32))
        np.save(sdir / f"s{i}.npy", rng.random((24, 24), dtype=np.float32))
    n_bad = A.SKIPS_LOGGED + 5
    for i in range(n_bad):
        np.save(sdir / f"c{i:02d}.npy", np.full((24, 24), float(i), np.float32))  # constant: no correlation
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        r = A.audit(tdir, sdir, metric="correlation", k=2, verify="none", out=tmp_path / "o", progress=False)
    named = [m for m in caplog.messages if m.startswith("skipping synth item")]
    assert len(named) == A.SKIPS_LOGGED, named
    assert sum("not named here" in m for m in caplog.messages) == 1
    assert len(r.summary["skipped"]) == n_bad


def test_lock_row_store_and_linked_shards_mends(ds: dict, tmp_path: Path, monkeypatch) -> None:
    """Review mends: a row store a killed run left in OUT/work is removed at the next start (as large as the pixel
    stores, it was never removed); evaluate locks a folder whose lock file is another user's (flock works on a
    read-only descriptor; it failed with 'Permission denied'); an OUT/shards linked to a scratch folder of
    checkpoints is written into, and on a change of configuration its checkpoints go, not the link or its folder
    (it was refused, 'holds files other than the all-pairs checkpoints')."""
    out = tmp_path / "o"
    A.audit(ds["train"], ds["synth"], metric="correlation", k=2, verify="none", out=out, progress=False)
    stale = out / "work" / ".synth_rows.tmp"
    stale.write_bytes(b"\0" * 4096)
    A.audit(ds["train"], ds["synth"], metric="correlation", k=2, verify="none", out=out, progress=False)
    assert not stale.exists()

    real_open = os.open

    def no_write(path, flags, *a):  # noqa: ANN001, ANN202
        if str(path).endswith(".deepssim_fast.lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_write)
    with A._out_lock(out, "evaluate"):
        pass
    # an OUT the user cannot write in at all, with no lock file yet: that is the error, not "No such file or
    # directory" of the lock file (the read-only retry's)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(PermissionError, match="cannot write in this output folder") as err:
        with A._out_lock(fresh):
            pass
    assert err.value.filename == str(fresh)
    monkeypatch.setattr(os, "open", real_open)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "allpairs-0123abcd-00001.npz").write_bytes(b"x")
    (out / "shards").symlink_to(scratch, target_is_directory=True)
    A._refuse_foreign_files(out, owned=True, shard_folders=["shards"])  # (no refusal)
    A._clear_stage_files(out / "work", keep_verified=True)
    assert (out / "shards").is_symlink() and scratch.is_dir() and not any(scratch.iterdir())
    (scratch / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files other than the all-pairs checkpoints"):
        A._refuse_foreign_files(out, owned=True, shard_folders=["shards"])


def test_evaluate_takes_the_audits_own_label_for_a_pair_it_labelled(ds: dict, tmp_path: Path, monkeypatch) -> None:
    """evaluate scores the labelled pairs again; for `--metric ssim --verify none` with the per-pair kernel, not
    the search's matrix, and on whatever engine it runs: one float32 step either side of a threshold, it
    labelled a pair otherwise than matches.csv (similar recall 0 where the audit said similar). A pair the audit
    labelled now takes the audit's label; other pairs are scored as before."""
    out = tmp_path / "o"
    A.audit(ds["train"], ds["synth"], metric="ssim", k=2, verify="none", out=out, progress=False)
    rows = [r for r in _rows(out) if r["rank"] == "1"]
    dup = next(r for r in rows if r["label"] == "duplicate")
    far = next(t for t in sorted(ds["train_arrays"]) if t not in {r["train_id"].rsplit("/", 1)[-1] for r in _rows(out)
                                                                  if r["synth_id"] == dup["synth_id"]})
    labels = tmp_path / "labels.csv"
    labels.write_text(f"real_key,synth_key,label\n{dup['train_id']},{dup['synth_id']},1\n"  # (1: duplicate)
                      f"{far},{dup['synth_id']},0\n")
    # the scores computed again, all off (a stand-in for another engine's last bits at a threshold)
    monkeypatch.setattr(A, "_ssim_pairs", lambda a, b, **kw: np.full(len(a), 0.7))
    res = A.evaluate(out, labels)
    assert res["per_class"]["duplicate"]["recall"] == 1.0  # (from matches.csv, not the score of 0.7)
    assert res["per_class"]["different"]["recall"] == 0.0  # (not in matches.csv: its score, 0.7, says similar)
    # a matches.csv saved again by a spreadsheet (a byte-order mark) is read too (its header did not match)
    m = out / "matches.csv"
    m.write_bytes(b"\xef\xbb\xbf" + m.read_bytes())
    assert A.evaluate(out, labels)["per_class"]["duplicate"]["recall"] == 1.0


def test_a_labels_file_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    """real_key,synth_key,label,label was read with the last 'label' column winning, without a word."""
    f = tmp_path / "l.csv"
    f.write_text("real_key,synth_key,label,label\nt00.npy,s00.npy,1,0\n")
    with pytest.raises(ValueError, match=r"names column\(s\) label more than once"):
        A._label_rows(f)


@pytest.mark.parametrize("mode", ["slices", "volumes"])
def test_an_offset_float64_training_file_and_its_plain_copy_are_a_duplicate(tmp_path: Path, mode: str) -> None:
    """A float64 training volume of 1e7 + MRI in [0, 1] was stored by the audit in float32 (~1 ulp of 1e7:
    its structure gone), so its exact copy without the offset came out "different". Such files are read in
    float64 and fitted to float32 (io.fit_float32), which the deepssim preset does not see."""
    vol = data.center_fit(data.load_volume("t1_coronal_slice").array, (40, 44)).astype(np.float64)
    vol = (vol - vol.min()) / (vol.max() - vol.min())
    vol = np.stack([vol * (0.7 + 0.05 * k) for k in range(8)], axis=-1)
    other = np.roll(vol[::-1], 5, axis=1) ** 2
    (tmp_path / "tr").mkdir()
    (tmp_path / "sy").mkdir()
    np.save(tmp_path / "tr" / "offset.npy", vol + 1e7)
    np.save(tmp_path / "tr" / "other.npy", other.astype(np.float32))
    np.save(tmp_path / "sy" / "copy.npy", vol.astype(np.float32))
    r = A.audit(tmp_path / "tr", tmp_path / "sy", metric="ssim", k=1, mode=mode, out=tmp_path / "o",
                progress=False, **({"policy": SlicePolicy(axis=2)} if mode == "slices" else {}))
    rows = list(csv.DictReader(open(tmp_path / "o" / "matches.csv", encoding="utf-8")))
    assert rows and all("offset.npy" in row["train_id"] for row in rows), rows
    assert all(row["label"] == "duplicate" for row in rows), [(row["synth_id"], row["ssim"]) for row in rows]
    assert r.summary["counts"]["duplicate"] == len(rows)


@pytest.mark.parametrize("mode", ["volumes", "slices"])
def test_matches_csv_paths_of_4d_frames_are_files(tmp_path: Path, mode: str) -> None:
    """matches.csv's *_path columns held ``series.nii.gz@t1`` for a frame of a 4D file, which is no file: a
    script that opened or moved the flagged files failed on every such row. The path is the file now, and the
    frame has its own column. The result's fields named in its repr are attributes too."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    vol = data.center_fit(data.load_volume("t1_coronal_slice").array, (32, 36)).astype(np.float32)
    a = np.stack([vol * (0.6 + 0.05 * k) for k in range(8)], axis=-1)
    b = np.roll(a[::-1], 7, axis=0) + rng.normal(0, 5, a.shape).astype(np.float32)
    (tmp_path / "tr").mkdir()
    (tmp_path / "sy").mkdir()
    series = tmp_path / "tr" / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([b, a], axis=-1), np.eye(4)), series)
    np.save(tmp_path / "sy" / "copy.npy", a)
    r = A.audit(tmp_path / "tr", tmp_path / "sy", metric="ssim", k=1, mode=mode, out=tmp_path / "o",
                progress=False, **({"policy": SlicePolicy(axis=2)} if mode == "slices" else {}))
    rows = list(csv.DictReader(open(tmp_path / "o" / "matches.csv", encoding="utf-8")))
    assert rows
    for row in rows:
        assert row["train_path"] == str(series) and Path(row["train_path"]).is_file()
        assert row["train_frame"] == "1" and row["label"] == "duplicate", row
        assert row["train_id"].startswith(f"{series}@t1")
        assert row["synth_frame"] == "" and Path(row["synth_path"]).is_file()
    assert r.counts == r.summary["counts"] and r.counts["duplicate"] == r.n_synth == len(rows)
    assert r.metric == "ssim" and r.n_train == (2 if mode == "volumes" else 16) and r.skipped == []
    assert r.report == tmp_path / "o" / "report.html"


def test_nifti_files_stored_in_other_orientations_are_named_in_a_warning(tmp_path: Path) -> None:
    """Found by a probe: voxels are compared as stored, and an LPS copy of an RAS scan (as a DICOM converter
    writes it) is a mirrored image of its source: without flips searched it was not matched with its source
    and was labelled "different", without a word about the files' orientations. A warning now counts each
    set's orientations, names a file of each, and says whether --verify-flips finds the difference (mirrors)
    or the files must be reoriented (axes in another order); a resumed run says it too, and files of one
    orientation give no warning."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    img = data.nib_load(data.dataset_path("mni152"))
    vol = data.center_fit(np.asarray(img.dataobj, np.float32), (40, 48, 40))
    ras = nib.Nifti1Image(vol, img.affine)

    def as_codes(codes: str) -> nib.Nifti1Image:
        return ras.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes))))

    tr, sy = tmp_path / "tr", tmp_path / "sy"
    tr.mkdir()
    sy.mkdir()
    nib.save(ras, tr / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.roll(vol[::-1], 9, axis=1) ** 1.5, img.affine), tr / "other.nii.gz")
    lps = as_codes("LPS")
    assert np.array_equal(np.asarray(lps.dataobj), vol[::-1, ::-1])
    nib.save(lps, sy / "copy_lps.nii.gz")
    kw = dict(metric="ssim", k=1, mode="volumes", progress=False)

    def rows(out: Path) -> list[dict]:
        return list(csv.DictReader(open(out / "matches.csv", encoding="utf-8")))

    head = (f"the NIfTI inputs are stored in 2 orientations (training: RAS 2 (e.g. {tr / 'other.nii.gz'}); "
            f"synthetic: LPS 1 (e.g. {sy / 'copy_lps.nii.gz'})): voxels are compared as stored (the affine is not "
            "used), so a copy saved in another orientation is a mirrored or transposed image of its source")
    plain = A.audit(tr, sy, out=tmp_path / "plain", **kw)
    (said,) = plain.summary["warnings"]
    assert said.startswith(head) and said.endswith(
        "they differ by mirrors, which --verify-flips searches: give --verify-flips, or reorient the files to one "
        "orientation first (e.g. nibabel.as_closest_canonical)"), said
    assert plain.counts["duplicate"] == 0  # (what the warning is about: the copy is missed)
    again = A.audit(tr, sy, out=tmp_path / "plain", **kw)  # a resume: from the cache entries' headers
    assert again.summary["warnings"] == [said]
    assert said in (tmp_path / "plain" / "report.html").read_text(encoding="utf-8").replace("&#x27;", "'")

    flips = A.audit(tr, sy, out=tmp_path / "flips", verify_flips=True, **kw)
    (said,) = flips.summary["warnings"]
    assert said.startswith(head) and said.endswith("they differ by mirrors, which --verify-flips searches (on)")
    (row,) = rows(tmp_path / "flips")
    assert row["train_id"] == str(tr / "scan.nii.gz") and row["label"] == "duplicate"
    assert row["transform"] == "flip01" and float(row["ssim"]) == pytest.approx(1.0, abs=1e-6)

    (sy / "copy_lps.nii.gz").unlink()
    nib.save(as_codes("ARS"), sy / "copy_ars.nii.gz")  # (axes 0 and 1 swapped: no flip lines it up)
    swapped = A.audit(tr, sy, out=tmp_path / "swapped", verify_flips=True, **kw)
    (said,) = swapped.summary["warnings"]
    assert "synthetic: ARS 1 (e.g." in said and said.endswith(
        "their array axes run along other body axes (or an affine gives none), which --verify-flips does not "
        "search: reorient the files to one orientation first (e.g. nibabel.as_closest_canonical)"), said

    (sy / "copy_ars.nii.gz").unlink()
    nib.save(ras, sy / "copy_ras.nii.gz")
    same = A.audit(tr, sy, out=tmp_path / "same", **kw)
    assert same.summary["warnings"] == [] and same.counts["duplicate"] == 1
