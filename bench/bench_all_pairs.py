"""Benchmark of deepssim_fast.all_pairs (issue 4): exact cosine top-k + histogram over all pairs.

Cases (every provider in the same process, same unit-norm embeddings; random, with a few hundred synthetic rows
replaced by near-copies of training rows, half "duplicate" and half "similar" (bench/_planting.py), so that the
checked class counts have every class):
* CPU n × n × 256, k=10: deepssim_fast (native; histogram and class counts included) vs faiss
  ``IndexFlatIP.search`` (the baseline; without faiss its row says "not installed" and ratios are against
  torch.mm + topk), chunked ``torch.mm`` + ``torch.topk``, numpy matmul + argpartition, and the plain
  numpy sgemm on the same shapes (GFLOP/s: the floor of any exact fp32 GEMM route).
* Scale (not in quick mode): 200000 × 200000 × 256 in a subprocess: time and peak RSS; extrapolated to 10^6².
* GPU (only where CUDA is present): Triton vs ``torch.mm`` (bf16) + ``torch.topk``.

``python -m bench.bench_all_pairs [--quick] [--no-append] [--scale-n N]``
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time

import numpy as np
import torch

from bench._planting import check_classes_exercised, near_copies, near_copy_plan, plant, planted_count
from bench.harness import ROOT, Row, append_markdown, markdown_table, run_case

logger = logging.getLogger(__name__)

CAP = "all_pairs"
FAISS = "faiss IndexFlatIP.search"
FAISS_MISSING = "not installed (pip install faiss-cpu, the bench extra)"
TORCH_TOPK = "torch.mm + torch.topk (chunked)"


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _torch_topk(train: torch.Tensor, synth: torch.Tensor, k: int, block: int = 4096):
    out_s, out_i = [], []
    for a in range(0, synth.shape[0], block):
        v, i = torch.topk(synth[a:a + block] @ train.T, k, dim=1)
        out_s.append(v)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)


def _numpy_topk(train: np.ndarray, synth: np.ndarray, k: int, block: int = 4096):
    out = []
    for a in range(0, synth.shape[0], block):
        s = synth[a:a + block] @ train.T
        p = np.argpartition(-s, k - 1, axis=1)[:, :k]
        o = np.argsort(-np.take_along_axis(s, p, axis=1), axis=1)
        out.append(np.take_along_axis(p, o, axis=1))
    return np.concatenate(out)


def _sgemm(train: np.ndarray, synth: np.ndarray, block: int = 4096) -> None:
    buf = np.empty((block, train.shape[0]), np.float32)
    for a in range(0, synth.shape[0], block):
        q = synth[a:a + block]
        np.matmul(q, train.T, out=buf[: q.shape[0]])


def check_topk(name: str, res, train: np.ndarray, synth: np.ndarray, ref_scores: np.ndarray, *,
               tol: float = 1e-5, block: int = 4096) -> None:
    """Raise ``AssertionError`` unless ``res`` is a correct top-k of ``synth`` against ``train``.

    ``ref_scores`` (n_synth, k), descending, come from an independent route (faiss, or torch.mm + topk): our
    scores must match them within ``tol`` rank by rank (so the k-th best is right, whatever the order among
    ties), and every reported index must point at a pair whose float64 dot product is its reported score.
    The histogram and the class counts must each account for every pair once.
    """
    n_synth, k = ref_scores.shape
    s, idx = np.asarray(res.scores), np.asarray(res.indices)
    if s.shape != (n_synth, k) or idx.shape != (n_synth, k):
        raise AssertionError(f"{name}: result shapes {s.shape} / {idx.shape}, expected {(n_synth, k)}")
    err = np.abs(s.astype(np.float64) - ref_scores.astype(np.float64))
    if not np.all(err <= tol):
        i, j = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(err), err, np.inf))), err.shape)
        raise AssertionError(f"{name}: top-k score [{i}, {j}] = {s[i, j]!r}, reference {ref_scores[i, j]!r} "
                             f"(|diff| {err[i, j]:.3g} > {tol:g})")
    for a in range(0, n_synth, block):
        q = synth[a:a + block].astype(np.float64)
        t = train[idx[a:a + block]].astype(np.float64)
        dots = np.einsum("id,ikd->ik", q, t)
        bad = np.abs(dots - s[a:a + block]) > tol
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise AssertionError(f"{name}: row {a + i} rank {j} reports index {idx[a + i, j]} with score "
                                 f"{s[a + i, j]!r}, but that pair's dot product is {dots[i, j]!r}")
    if np.any(np.diff(s, axis=1) > 0):
        raise AssertionError(f"{name}: top-k scores are not in descending order")
    pairs = n_synth * train.shape[0]
    counts = np.asarray(res.histogram[0])
    if int(counts.sum()) != pairs or sum(res.class_counts.values()) != pairs:
        raise AssertionError(f"{name}: histogram counts {int(counts.sum()):,} and class counts "
                             f"{sum(res.class_counts.values()):,} pairs, expected {pairs:,}")
    check_histogram(name, res, train, synth)


def check_histogram(name: str, res, train: np.ndarray, synth: np.ndarray, *, block: int = 1024,
                    eps: float = 1e-6) -> None:
    """Raise ``AssertionError`` unless ``res``'s histogram and class counts are those of every pair's cosine,
    recomputed here in float64 (rows normalised), block by block: only pairs within ``eps`` of a bin edge or a
    threshold, where a float32 score may fall on either side, may be counted elsewhere. (Only the totals were
    checked: a histogram with every pair in bin 0 and every pair a duplicate was timed and published.)"""
    counts = np.asarray(res.histogram[0], dtype=np.int64)
    bins = len(counts)
    low, high = (float(v) for v in res.thresholds)
    t = train.astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    ref, cls = np.zeros(bins, np.int64), np.zeros(3, np.int64)
    near_bin = near_cls = 0
    for a in range(0, synth.shape[0], block):
        q = synth[a:a + block].astype(np.float64)
        sc = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ t.T
        y = (sc + 1.0) / 2.0 * bins  # (the engine's convention: floor((s - lo) / (hi - lo) * bins), clamped)
        ref += np.bincount(np.clip(np.floor(y).astype(np.int64), 0, bins - 1).ravel(), minlength=bins)
        near_bin += int(np.count_nonzero(np.abs(y - np.round(y)) < eps * bins / 2))
        cls += [np.count_nonzero(sc <= low), np.count_nonzero((sc > low) & (sc <= high)),
                np.count_nonzero(sc > high)]
        near_cls += int(np.count_nonzero((np.abs(sc - low) < eps) | (np.abs(sc - high) < eps)))
    off = int(np.abs(counts - ref).sum())
    if off > 2 * near_bin:
        b = int(np.argmax(np.abs(counts - ref)))
        raise AssertionError(f"{name}: histogram differs from the float64 recount in {off:,} counts (bin {b}: "
                             f"{int(counts[b]):,} vs {int(ref[b]):,}); only {near_bin:,} pairs lie near an edge")
    got = np.array([res.class_counts[c] for c in ("different", "similar", "duplicate")], np.int64)
    if int(np.abs(got - cls).sum()) > 2 * near_cls:
        raise AssertionError(f"{name}: class counts {got.tolist()} vs the float64 recount {cls.tolist()}; only "
                             f"{near_cls:,} pairs lie near a threshold")


def check_identical(name: str, res, ref, ref_name: str) -> None:
    """Raise ``AssertionError`` unless two native results are bit for bit the same (the engine's promise
    across kernels and SIMD levels)."""
    same = (np.array_equal(res.scores, ref.scores) and np.array_equal(res.indices, ref.indices)
            and np.array_equal(res.histogram[0], ref.histogram[0]) and res.class_counts == ref.class_counts)
    if not same:
        raise AssertionError(f"{name}: result differs from {ref_name} (scores, indices, histogram or classes)")


def _recording_kernels(fn):
    """``fn()`` and the approximate-score kernels its native all-pairs calls ran (``topk_fused`` returns each)."""
    from deepssim_fast import _native

    used: set[str] = set()
    fused = _native.topk_fused

    def spy(*args):
        kern = fused(*args)
        used.add(kern)
        return kern

    _native.topk_fused = spy
    try:
        return fn(), used
    finally:
        _native.topk_fused = fused


def cpu_case(n: int, d: int = 256, k: int = 10, repeat: int = 3, log=print) -> list[Row]:
    from deepssim_fast.all_pairs import all_pairs

    train, synth = _unit(n, d, 1), _unit(n, d, 2)
    plant(train, synth, planted_count(n))  # (every pair was "different": the class check saw one class)
    flop = 2.0 * n * n * d
    from deepssim_fast import _native

    providers = {"deepssim_fast (native)": lambda: all_pairs(train, synth, k=k, progress=False)}
    def forced(level: str, kernel: str):
        def run():
            try:
                _native.set_simd_level(level)
                _native.set_topk_kernel(kernel)
                return all_pairs(train, synth, k=k, progress=False)
            finally:
                _native.set_simd_level("auto")
                _native.set_topk_kernel("auto")
        return run

    # what the default ran (the automatic choice weighs the int16 kernels' speed measured on this CPU: fp32 on
    # some AVX2 CPUs, Zen 1), then the kernels other CPUs without AVX-512 VNNI run: the AVX2 int16 (vpmaddwd)
    # kernel, and the fp32 kernel (which the default also takes at fine bins)
    first, used = _recording_kernels(providers["deepssim_fast (native)"])
    default_kernel = " + ".join(sorted(used - {"none"}))
    int16 = _native.topk_int16_kernel()
    if int16 and default_kernel != "int16-avx2":
        providers["deepssim_fast (native, AVX2 int16 kernel)"] = forced("avx2", "int16")
    if int16 and default_kernel != "fp32":
        providers["deepssim_fast (native, fp32 kernel)"] = forced("avx2", "fp32")
    try:
        import faiss

        index = faiss.IndexFlatIP(d)
        index.add(train)
        providers[FAISS] = lambda: index.search(synth, k)
        have_faiss = True
    except ImportError:  # (its row vanished and every ratio was against ourselves, under "Ratios against faiss")
        have_faiss = False
    tt, ts = torch.from_numpy(train), torch.from_numpy(synth)
    providers[TORCH_TOPK] = lambda: _torch_topk(tt, ts, k)
    providers["numpy matmul + argpartition"] = lambda: _numpy_topk(train, synth, k)
    providers["numpy sgemm only (floor)"] = lambda: _sgemm(train, synth)
    base = FAISS if have_faiss else TORCH_TOPK
    # correctness before any timing: every deepssim_fast provider against an independent top-k (faiss, or
    # torch.mm + topk without it), and the forced kernels bit for bit against the default
    if have_faiss:
        ref_s, ref_i = index.search(synth, k)
        ref_name = "faiss"
    else:
        vs, vi = _torch_topk(tt, ts, k)
        ref_s, ref_i, ref_name = vs.numpy(), vi.numpy(), "torch.mm + topk"
    results = {}
    same: dict[str, float] = {}
    for name, fn in providers.items():
        if not name.startswith("deepssim_fast"):
            continue
        results[name] = r0 = first if name == "deepssim_fast (native)" else fn()
        check_topk(name, r0, train, synth, ref_s)
        check_classes_exercised(name, r0.class_counts)
        if name != "deepssim_fast (native)":
            check_identical(name, r0, results["deepssim_fast (native)"], "deepssim_fast (native)")
        same[name] = float(np.mean(np.sort(ref_i, axis=1) == np.sort(r0.indices, axis=1)))
    res = results["deepssim_fast (native)"]
    log(f"  checked: every deepssim_fast provider's top-k against {ref_name}, native kernels identical")
    case = f"CPU {n}x{n}x{d} k={k}"
    rows = run_case(CAP, case, providers, work=float(n) * n, unit="pairs", baseline=base,
                    warmup=1, repeat=repeat, repeats={"numpy matmul + argpartition": 1}, log=log)
    if not have_faiss:  # the missing competitor keeps its row, where it would have been, saying why it has no times
        missing = Row(CAP, case, FAISS, float(n) * n, "pairs", baseline=base, note=FAISS_MISSING)
        log(f"  {case:<40} {FAISS:<28} {FAISS_MISSING}")
        rows.insert(next(i for i, r in enumerate(rows) if r.provider == TORCH_TOPK), missing)
    # the arithmetic floor of each kernel: its multiply-add rate on one core with cached panels, all cores
    rates = _native.topk_kernel_rates()
    cores = _native.num_threads()
    kernel_of = {"deepssim_fast (native)": default_kernel, "deepssim_fast (native, AVX2 int16 kernel)": "int16-avx2",
                 "deepssim_fast (native, fp32 kernel)": "fp32"}
    for r in rows:
        kern = kernel_of.get(r.provider)
        if kern in rates and r.times:
            floor = float(n) * n * d / (rates[kern] * cores)
            r.extra["gemm_floor_s"] = floor
            r.note = (r.note + f" GEMM floor {floor:.3g} s ({rates[kern] / 1e9:.0f} G multiply-adds/s per core "
                      f"in L1 x {cores} cores)").strip()
        if r.times:
            r.extra["gflops"] = flop / r.median / 1e9
            kern = kernel_of.get(r.provider, "")
            kind = ("" if r.provider != "deepssim_fast (native)" or not kern else
                    f" (fp32-equivalent; {kern} kernel)" if "int16" in kern else f" ({kern} kernel)")
            kind = kind or (" (fp32-equivalent)" if "int16" in r.provider else "")
            r.note = (r.note + f" {r.extra['gflops']:.0f} GFLOP/s{kind}").strip()
        if r.provider.startswith("deepssim_fast"):
            cc = res.class_counts
            r.note += (f"; histogram + class counts included; {cc['different']:,} different, {cc['similar']:,} "
                       f"similar, {cc['duplicate']:,} duplicate")
            r.extra["class_counts"] = dict(cc)
            r.note += f"; checked against {ref_name} before timing"
            if have_faiss and r.provider in same:
                r.note += f"; top-k sets equal to faiss: {same[r.provider]:.4%}"
    return rows


_SCALE_CHILD = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[4])  # (the checkout, for bench._planting: numpy only, no torch in this process)
from bench._planting import plant, planted_count
from deepssim_fast.all_pairs import all_pairs
def peak_mb():
    # VmHWM: this process's own peak. ru_maxrss is NOT used on Linux: across fork + exec it keeps the
    # parent's peak (a bench runner that already holds 2 GB would report 2 GB here before any work).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(3)
def unit(n):
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 65536):
        b = rng.standard_normal((min(n, a + 65536) - a, d)).astype(np.float32)
        x[a:a + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x
train, synth = unit(n), unit(n)
plant(train, synth, planted_count(n))
rss0 = peak_mb()
t = time.perf_counter()
r = all_pairs(train, synth, k=k, progress=False)
dt = time.perf_counter() - t
print(json.dumps(dict(seconds=dt, peak_rss_mb=peak_mb(), inputs_rss_mb=rss0, pairs=r.n_pairs,
                      class_counts={c: int(v) for c, v in r.class_counts.items()})))
"""


def scale_case(n: int = 200000, d: int = 256, k: int = 10, log=print) -> list[Row]:
    """One run in a fresh process (peak RSS is the child's own VmHWM, inputs included)."""
    proc = subprocess.run([sys.executable, "-c", _SCALE_CHILD, str(n), str(d), str(k), str(ROOT)],
                          capture_output=True, text=True, timeout=24 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"scale run failed: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    check_classes_exercised(f"scale {n}x{n}", res["class_counts"])
    ext = res["seconds"] * (1e6 / n) ** 2
    row = Row(CAP, f"CPU scale {n}x{n}x{d} k={k}", "deepssim_fast (native)", float(n) * n, "pairs",
              times=[res["seconds"]], baseline="deepssim_fast (native)", ratio=1.0,
              note=(f"peak RSS {res['peak_rss_mb']:.0f} MB (inputs alone {res['inputs_rss_mb']:.0f} MB); "
                    f"10^6 x 10^6 extrapolated: {ext / 3600:.1f} h"),
              extra=res)
    log(f"  {row.case:<40} {row.provider:<28} {res['seconds']:.1f} s  peak RSS {res['peak_rss_mb']:.0f} MB")
    return [row]


def gpu_case(n: int = 100000, d: int = 256, k: int = 10, log=print, *, device: str = "cuda",
             precisions: tuple[str, ...] = ("bf16", "tf32", "ieee")) -> list[Row]:
    """Triton top-k + histogram against torch.mm bf16 + torch.topk on a GPU; each Triton output is checked
    against every pair's float64 cosine (an AssertionError stops the case). ``device="cpu"`` under
    ``TRITON_INTERPRET=1`` runs it on tiny sizes (the tests; bf16 does not run interpreted)."""
    from deepssim_fast.kernels.cosine_topk import cosine_topk

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)
    synth = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)
    at, of, cos = near_copy_plan(n, n, planted_count(n), seed=7)  # (as the CPU case: every class non-empty)
    copies = near_copies(train[torch.from_numpy(of).to(dev)].double().cpu().numpy(), cos, seed=7)
    synth[torch.from_numpy(at).to(dev)] = torch.from_numpy(copies).to(dev)
    tb, sb = train.bfloat16(), synth.bfloat16()

    def torch_bf16():
        for a in range(0, n, 16384):
            torch.topk(sb[a:a + 16384] @ tb.T, k, dim=1)

    def gemm_bf16():
        for a in range(0, n, 16384):
            sb[a:a + 16384] @ tb.T

    kept: dict[str, tuple] = {}  # each precision's last timed output, checked after its timing

    def triton(p):
        def run():
            kept[p] = cosine_topk(synth, train, k=k, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85),
                                  precision=p)
        return run

    from bench.gpu_suite import precision_tol, verify_all_pairs
    from bench.harness import time_fn

    names = {p: f"triton ({'ieee fp32' if p == 'ieee' else p})" for p in precisions}
    providers = {**{names[p]: triton(p) for p in precisions}, "torch.mm bf16 + topk": torch_bf16,
                 "torch.mm bf16 only": gemm_bf16}
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    rows = []
    for name, fn in providers.items():
        r = Row(CAP, f"GPU {n}x{n}x{d} k={k}", name, float(n) * n, "pairs")
        try:
            r.times = time_fn(fn, warmup=1, repeat=3, sync=sync)
        except Exception as exc:  # noqa: BLE001
            r.note = f"failed: {type(exc).__name__}: {exc}"[:200]
        p = next((q for q, nm in names.items() if nm == name), None)
        if p in kept:  # every pair's float64 cosine recounted on the GPU, at the precision's rounding bound
            scores, indices, hist, classes = kept.pop(p)
            ok, err, detail = verify_all_pairs(scores, indices, hist, classes, train, synth, tol=precision_tol(p))
            if not ok:
                raise AssertionError(f"{name}: timed output wrong: {detail}")
            check_classes_exercised(name, [int(c) for c in classes])
            r.note = (r.note + " output checked against every pair's float64 cosine").strip()
        rows.append(r)
        log(f"  {r.case:<40} {name:<28} " + (f"{r.median * 1e3:.1f} ms" if r.times else r.note))
    gemm = next((r for r in rows if r.provider == "torch.mm bf16 only" and r.times), None)
    for r in rows:
        r.baseline = "torch.mm bf16 + topk"
        base = next((x for x in rows if x.provider == r.baseline and x.times), None)
        if base and r.times:
            r.ratio = base.median / r.median
        if gemm and r.times:
            r.note = (r.note + f" {gemm.median / r.median:.0%} of the bf16 GEMM rate").strip()
    return rows


def run(quick: bool = False, append: bool = True, *, scale_n: int | None = None, log=print) -> list[Row]:
    """Run the all-pairs cases; ``quick`` uses 4000² and skips the scale and GPU cases (well under a minute)
    unless ``scale_n`` asks for the scale case; ``scale_n`` rows for the scale case (default 200000 in a full
    run), 0 skips it. What is skipped is said."""
    rows = cpu_case(4000 if quick else 20000, repeat=2 if quick else 3, log=log)
    n = (0 if quick else 200000) if scale_n is None else scale_n
    if n > 0:  # (--quick --scale-n N dropped the asked-for case without a word)
        rows += scale_case(n, log=log)
    else:
        log("  scale case skipped (" + ("--quick" if quick and scale_n is None else "--scale-n 0") + ")")
    if not quick and torch.cuda.is_available():  # (it sat under scale_n > 0: --scale-n 0 dropped it unsaid)
        rows += gpu_case(log=log)
    else:
        log("  GPU case skipped (" + ("--quick" if quick else "no CUDA device") + ")")
    if append:
        append_markdown("all_pairs: exact cosine top-k + histogram" + (" (quick)" if quick else ""), rows,
                        comment=table_comment(rows))
    return rows


def table_comment(rows: list[Row]) -> str:
    """The text over the table: what the embeddings are and the baseline the CPU ratios are against, as it is in
    the rows (without faiss it said "Ratios against faiss" over ratios against ourselves)."""
    cpu = [r for r in rows if r.case.startswith("CPU ") and not r.case.startswith("CPU scale")]
    base = cpu[0].baseline if cpu else None
    text = ("Unit-norm random embeddings, d=256, k=10, with a few hundred synthetic rows replaced by near-copies of "
            "training rows (half duplicate, half similar) so that every class is counted. ")
    if base:
        text += f"CPU ratios against {base} in the same run"
        if any(r.provider == FAISS and not r.times for r in cpu):
            text += f" (faiss {FAISS_MISSING})"
        text += "; "
    if any(r.case.startswith("GPU ") for r in rows):
        text += "GPU ratios against torch.mm bf16 + topk on the same GPU; "
    return text + "deepssim_fast includes the 200-bin histogram and class counts."


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--scale-n", type=int, default=None,
                    help="rows of the scale case (default 200000, none with --quick; 0: skip it)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    rows = run(quick=a.quick, append=not a.no_append, scale_n=a.scale_n)
    print(markdown_table(rows))
    print(f"total {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
