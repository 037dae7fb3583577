"""all_pairs with backend="triton": the Triton tile kernel under TRITON_INTERPRET=1 on CPU tensors.

The interpreter must be switched on before Triton is imported, and the rest of the suite must not run
interpreted, so the checks run in a fresh interpreter (subprocess) with the variable set; it prints one
JSON line per check, which the tests below assert on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import _prestart
import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(r"""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import numpy as np
    import torch
    from deepssim_fast.all_pairs import all_pairs
    from deepssim_fast import reference as ref, data
    from deepssim_fast.kernels import cosine_topk as ck

    # count the kernel's launches (each result records those since the previous one): the results must come
    # from the Triton kernel itself, not from a fallback that computes the same numbers
    from _triton_launches import count_launches
    LAUNCHES = count_launches(ck, "_cosine_topk_kernel")

    class Results(list):
        seen = 0

        def append(self, d):
            d["launches"] = LAUNCHES[0] - self.seen
            self.seen = LAUNCHES[0]
            super().append(d)

    out = Results()

    def compare(name, train, synth, k, **kw):
        tt = torch.from_numpy(train)
        ts = None if synth is None else torch.from_numpy(synth)
        r = all_pairs(tt, ts, k=k, backend="triton", progress=False, **kw)
        n = all_pairs(train, synth, k=k, progress=False)
        s_ref, i_ref = ref.topk_reference(train, synth, k)
        sim = ref.cosine_matrix_reference(train, train if synth is None else synth).numpy()
        if synth is None:
            np.fill_diagonal(sim, np.nan)
        x = (sim[~np.isnan(sim)] + 1.0) * 100.0
        near_edge = int((np.abs(x - np.round(x)) < 1e-4).sum())
        out.append(dict(
            name=name, backend=r.backend,
            scores_dtype=str(r.scores.dtype), indices_dtype=str(r.indices.dtype),
            shape=list(r.scores.shape), k=k,
            idx_equal_native=bool(np.array_equal(r.indices, n.indices)),
            idx_equal_ref=bool(np.array_equal(r.indices, i_ref)),
            max_score_err=float(np.abs(r.scores - s_ref).max()) if r.scores.size else 0.0,
            descending=bool(np.all(np.diff(r.scores, axis=1) <= 0)),
            hist_total=int(r.histogram[0].sum()), n_pairs=int(sim.size - (len(sim) if synth is None else 0)),
            hist_diff=int(np.abs(r.histogram[0] - n.histogram[0]).sum()), near_edge=near_edge,
            classes_equal=r.class_counts == n.class_counts,
            hits_equal=bool(np.array_equal(r.train_hits, n.train_hits)),
        ))

    rng = np.random.default_rng(7)
    f = lambda n, d: rng.standard_normal((n, d)).astype(np.float32)
    compare("1x7 k=1", f(7, 5), f(1, 5), 1)
    compare("7x70 k=10 d=19", f(70, 19), f(7, 19), 10)
    compare("45x100 k=64 > tile", f(100, 40), f(45, 40), 64)
    compare("33x65 small chunks", f(65, 8), f(33, 8), 5, block=16, tile=32)
    ties = f(40, 12); ties = np.concatenate([ties, ties[:5], ties[:5]])
    compare("exact ties", ties, ties[:5].copy(), 3)
    compare("self", f(60, 16), None, 4)
    sl = [s.array for s in data.real_slices((32, 32), datasets=["s0_10slices"])]
    emb = np.stack([s.reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel() for s in sl]).astype(np.float32)
    emb = emb[np.abs(emb).sum(axis=1) > 0]
    compare("real MRI", emb[::2].copy(), emb[1::2].copy(), 3)
    # tf32 / bf16 input precisions run (scores within their rounding)
    tr, sy = f(50, 32), f(9, 32)
    n = all_pairs(tr, sy, k=3, progress=False)
    for p in ("tf32x3", "tf32", "fp16"):
        r = all_pairs(torch.from_numpy(tr), torch.from_numpy(sy), k=3, backend="triton", precision=p,
                      progress=False)
        out.append(dict(name="precision " + p, max_score_err=float(np.abs(r.scores - n.scores).max()),
                        hist_total=int(r.histogram[0].sum()), n_pairs=50 * 9))
    try:
        all_pairs(torch.from_numpy(tr), torch.from_numpy(sy), k=3, backend="triton", precision="bf16",
                  progress=False)
        out.append(dict(name="bf16 refused", refused=False))
    except ValueError as exc:
        out.append(dict(name="bf16 refused", refused="CUDA" in str(exc)))
    # scores exactly at float32(threshold): train rows are unit axes, so each score is one exact product
    # and equals the synthetic row's component; the class rule compares the float32 score in float64
    for low, high in ((0.6, 0.85), (1.0 / 3.0, 0.5)):
        comps = []
        for t in (low, high):
            f32 = np.float32(t)
            comps += [f32, np.nextafter(f32, np.float32(2)), np.nextafter(f32, np.float32(-2))]
        comps = np.array(comps, dtype=np.float32)
        synth = np.zeros((len(comps), 2), np.float32)
        synth[:, 0] = comps
        synth[:, 1] = np.sqrt(1.0 - comps.astype(np.float64) ** 2).astype(np.float32)
        train = np.eye(2, dtype=np.float32)
        r = all_pairs(torch.from_numpy(train), torch.from_numpy(synth), k=2, backend="triton",
                      thresholds=(low, high), progress=False)
        s = np.concatenate([r.scores.ravel()]).astype(np.float64)
        want = dict(different=int((s <= low).sum()), similar=int(((s > low) & (s <= high)).sum()),
                    duplicate=int((s > high).sum()))
        out.append(dict(name=f"exact thresholds {low:.4f} {high:.4f}", classes=r.class_counts, want=want,
                        at_threshold=int(np.isin(r.scores.ravel(), comps[[0, 3]]).sum())))
    # scores exactly at and next to bin edges, for a tile histogram (7, 200 bins) and the per-pair atomic
    # path (2000 bins): the histogram must equal the float64 rule bin for bin
    for bins in (7, 200, 2000):
        js = np.unique(np.linspace(0, bins, 12).astype(int))
        comps = []
        for j in js:
            f = np.float32(2.0 * j / bins - 1.0)
            comps += [f, np.nextafter(f, np.float32(2)), np.nextafter(f, np.float32(-2))]
        c = np.clip(np.array(comps, dtype=np.float32), -1, 1)
        synth = np.stack([c, np.sqrt(np.maximum(0.0, 1.0 - c.astype(np.float64) ** 2)).astype(np.float32)], 1)
        train = np.eye(2, dtype=np.float32)
        r = all_pairs(torch.from_numpy(train), torch.from_numpy(synth), k=2, backend="triton", bins=bins,
                      progress=False)
        sc = np.concatenate([r.scores.ravel()]).astype(np.float64)
        idx = np.clip(np.floor((sc + 1.0) / 2.0 * bins), 0, bins - 1).astype(int)
        want = np.bincount(idx, minlength=bins)
        n = all_pairs(train, synth, k=2, bins=bins, progress=False)
        out.append(dict(name=f"bin edges {bins}", hist_equal_rule=bool(np.array_equal(r.histogram[0], want)),
                        hist_equal_native=bool(np.array_equal(r.histogram[0], n.histogram[0])),
                        classes_equal_native=r.class_counts == n.class_counts,
                        scores_equal_native=bool(np.array_equal(r.scores, n.scores)),
                        n_pairs=int(r.histogram[0].sum()), want_pairs=2 * len(c)))
    # the three histogram modes of the kernel, called directly, against the native engine: random rows
    # plus rows whose scores sit exactly on bin edges and thresholds, self-pairs excluded
    base = rng.standard_normal((40, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    comps = [0.6, 0.85, -0.5, 0.0, 0.61, 1.0]
    comps += [ck.largest_float32_le(t) for t in (0.6, 0.85)]  # scores equal to the kernel's thresholds
    edge = np.zeros((len(comps), 16), np.float32)
    edge[:, 0] = np.float32(comps)
    edge[:, 1] = np.sqrt(1.0 - edge[:, 0].astype(np.float64) ** 2).astype(np.float32)
    rows = np.concatenate([base, edge, np.eye(16, dtype=np.float32)[:2]])
    n = all_pairs(rows, None, k=4, progress=False)
    for mode in (0, 1, 2):
        s_, i_, h_, c_ = ck.cosine_topk(torch.from_numpy(rows), torch.from_numpy(rows), k=4, bins=200,
                                        hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85), self_offset=0,
                                        hist_mode=mode)
        out.append(dict(name=f"hist_mode {mode}",
                        hist_equal_native=bool(np.array_equal(h_.numpy(), n.histogram[0])),
                        classes=c_.tolist(), classes_native=[n.class_counts[c] for c in
                                                             ("different", "similar", "duplicate")],
                        score_err=float(np.abs(s_.numpy() - n.scores).max())))
    # bin counts where the tile histogram's sink slot needs a slot past next_pow2(bins) (1, and powers of two
    # up to TILE_HIST_MAX_BINS), both tile-histogram modes, a set against itself and against another
    qx = rows[:23].copy()
    for bins in (1, 256, 1024):
        n_self = all_pairs(rows, None, k=4, bins=bins, progress=False)
        n_cross = all_pairs(rows, qx, k=4, bins=bins, progress=False)
        for mode in (1, 2):
            for tag, q_, off, nat in (("self", rows, 0, n_self), ("cross", qx, None, n_cross)):
                _, _, h_, c_ = ck.cosine_topk(torch.from_numpy(q_), torch.from_numpy(rows), k=4, bins=bins,
                                              hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85), self_offset=off,
                                              hist_mode=mode)
                out.append(dict(name=f"sink bins {bins} mode {mode} {tag}",
                                hist_equal_native=bool(np.array_equal(h_.numpy(), nat.histogram[0])),
                                classes=c_.tolist(), classes_native=[nat.class_counts[c] for c in
                                                                     ("different", "similar", "duplicate")]))
    # a 128 x 256 tile (32768 pairs, allowed: below 2^16) of duplicates only: the packed class count of
    # histogram modes 0 and 1 reaches bit 31 of its int32 (it read [0, 65536, -32768])
    q = torch.zeros(128, 8); q[:, 0] = 1
    for mode in (0, 1, 2):
        _, _, h_, c_ = ck.cosine_topk(q, q[:1].expand(256, 8), k=1, bins=200, hist_range=(-1.0, 1.0),
                                      thresholds=(0.6, 0.85), hist_mode=mode,
                                      blocks=dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=8, num_warps=4))
        out.append(dict(name=f"full tile of duplicates mode {mode}", classes=c_.tolist(),
                        hist_total=int(h_.sum())))
    # 30 identical training rows: the interpreter's tl.dot (numpy's matmul) scored them apart by their place in
    # the tile, so copies came back out of index order; candidates are re-scored pair by pair
    rng = np.random.default_rng(41)
    base = rng.standard_normal((1, 64)).astype(np.float32)
    dups = np.concatenate([rng.standard_normal((5, 64)).astype(np.float32), np.repeat(base, 30, 0)])
    near = base + 0.3 * rng.standard_normal((10, 64)).astype(np.float32)
    compare("identical rows", dups, near, 3)
    compare("identical rows small chunks", dups, near, 3, block=4, tile=13)
    # the counts take each returned pair at its returned (re-scored) score: a threshold and a bin edge put
    # between a returned pair's kernel score and its re-scored one. The kernel's score of every pair comes
    # from a call that keeps every candidate (its launches and sums are those of any k)
    real_topk = ck.cosine_topk
    kernel_out = []

    def spy(*a, **kw):
        res = real_topk(*a, **kw)
        kernel_out.append((res[0].clone(), res[1].clone()))
        return res

    def separating_bins(g, f):
        b = np.arange((1 << 20) - 4000, (1 << 20) + 1, dtype=np.float64)
        split = np.floor((g + 1.0) / 2.0 * b) != np.floor((f + 1.0) / 2.0 * b)
        return int(b[split][-1]) if split.any() else None

    ck.cosine_topk = spy
    for case in ("cross all", "cross k=2", "self all", "self k=2"):
        self_mode = case.startswith("self")
        checks = []
        for seed in range(8):
            rng = np.random.default_rng(90 + seed)
            base = rng.standard_normal((1, 40))
            train = (base + 0.8 * rng.standard_normal((12, 40))).astype(np.float32)
            synth = None if self_mode else (base + 0.8 * rng.standard_normal((6, 40))).astype(np.float32)
            ns, n_cand = (12, 11) if self_mode else (6, 12)
            k = n_cand if case.endswith("all") else 2  # k=2 keeps 10 candidates: not every pair re-scored
            tt, ts = torch.from_numpy(train), None if synth is None else torch.from_numpy(synth)
            kernel_out.clear()
            all_pairs(tt, ts, k=n_cand, backend="triton", progress=False)
            ks, ki = kernel_out[-1]
            gemm = np.full((ns, 12), np.nan)
            np.put_along_axis(gemm, ki.numpy(), ks.numpy().astype(np.float64), axis=1)
            r = all_pairs(tt, ts, k=k, backend="triton", progress=False)
            rows = np.repeat(np.arange(ns), k)
            g, f = gemm[rows, r.indices.ravel()], r.scores.ravel().astype(np.float64)
            differ = np.flatnonzero(g != f)
            if not len(differ):
                continue
            j = differ[0]
            high = (g[j] + f[j]) / 2
            bins = separating_bins(g[j], f[j]) or 200
            kernel_out.clear()
            r2 = all_pairs(tt, ts, k=k, backend="triton", thresholds=(-1.0, high), bins=bins, progress=False)
            ks2, ki2 = kernel_out[-1]
            want = gemm.copy()
            want[rows, r.indices.ravel()] = f
            v = want[~np.isnan(want)]
            hist = np.bincount(np.clip(np.floor((v + 1.0) / 2.0 * bins), 0, bins - 1).astype(np.int64),
                               minlength=bins)
            checks.append(dict(
                seed=seed, bins=bins, score_above_high=bool(f[j] > high),
                kernel_same=bool(np.array_equal(np.take_along_axis(gemm, ki2.numpy(), 1), ks2.numpy())),
                scores_same=bool(np.array_equal(r2.scores, r.scores)),
                classes=r2.class_counts, want=dict(different=0, similar=int((v <= high).sum()),
                                                   duplicate=int((v > high).sum())),
                hist_equal=bool(np.array_equal(r2.histogram[0], hist)),
                hist_total=int(r2.histogram[0].sum()), n_pairs=ns * n_cand))
            break  # (one such pair a case: each interpreted call takes ~0.3 s)
        out.append(dict(name="counts follow the top-k " + case, checks=checks))
    ck.cosine_topk = real_topk
    for line in out:
        print("RESULT " + json.dumps(line))
""")


# (the interpreted run goes beside the suite from its start: _prestart)
_prestart.register("all_pairs_triton_interpreted", wanted_by=_prestart.uses(__name__, fixture="interpreted_results"),
                   make=_prestart.interpreted_script(_SCRIPT), timeout=600)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    proc, _ = _prestart.result("all_pairs_triton_interpreted")
    assert proc.returncode == 0, f"interpreted run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    res = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            d = json.loads(line[len("RESULT "):])
            res[d["name"]] = d
    assert len(res) == 40, proc.stdout
    return res


def test_every_interpreted_result_came_from_the_triton_kernel(interpreted_results):
    """Each case launched the kernel (a fallback to another engine would give the same numbers)."""
    for name, r in interpreted_results.items():
        if name != "bf16 refused":
            assert r["launches"] >= 1, (name, r)
    assert interpreted_results["bf16 refused"]["launches"] == 0
    # fp16 inputs really are rounded (an fp32 fallback would match the native scores exactly)
    assert interpreted_results["precision fp16"]["max_score_err"] > 1e-6


@pytest.mark.parametrize("name", ["1x7 k=1", "7x70 k=10 d=19", "45x100 k=64 > tile", "33x65 small chunks",
                                  "exact ties", "self", "real MRI", "identical rows",
                                  "identical rows small chunks"])
def test_triton_interpreted_matches_native_and_reference(interpreted_results, name):
    r = interpreted_results[name]
    assert r["backend"] == "triton"
    assert r["scores_dtype"] == "float32" and r["indices_dtype"] == "int64"
    assert r["descending"]
    assert r["idx_equal_native"], r
    assert r["max_score_err"] <= 1e-6, r
    assert r["hist_total"] == r["n_pairs"]
    assert r["hist_diff"] <= 2 * r["near_edge"], r
    assert r["hits_equal"]
    if r["hist_diff"] == 0:
        assert r["classes_equal"]


@pytest.mark.parametrize("case", ["cross all", "cross k=2", "self all", "self k=2"])
def test_triton_counts_take_the_returned_pairs_at_their_returned_scores(interpreted_results, case):
    """The kernel bins its own scores; the top-k it returns is re-scored pair by pair, an ulp away at times.
    With a threshold (and a bin edge) between a returned pair's two scores, the result contradicted itself: a
    top-k score above ``high`` with no duplicate counted, or the reverse. The counts now take every returned
    pair at its returned score and every other pair at the kernel's, self pairs left out, each pair once."""
    checks = interpreted_results["counts follow the top-k " + case]["checks"]
    assert len(checks) == 1, "no returned pair whose kernel score differed from its re-scored one"
    for c in checks:
        assert c["kernel_same"] and c["scores_same"], c
        assert c["classes"] == c["want"], c
        assert c["hist_equal"], c
        assert c["hist_total"] == c["n_pairs"], c


def test_triton_ties_and_self_pairs(interpreted_results):
    assert interpreted_results["exact ties"]["idx_equal_ref"]
    assert interpreted_results["self"]["idx_equal_ref"]
    assert interpreted_results["self"]["n_pairs"] == 60 * 59


def test_triton_low_precision_inputs(interpreted_results):
    assert interpreted_results["precision tf32"]["hist_total"] == 450
    assert interpreted_results["precision tf32x3"]["hist_total"] == 450
    assert interpreted_results["precision tf32x3"]["max_score_err"] <= 1e-5
    assert interpreted_results["precision fp16"]["hist_total"] == 450
    assert interpreted_results["precision fp16"]["max_score_err"] <= 5e-3
    assert interpreted_results["precision tf32"]["max_score_err"] <= 5e-3
    assert interpreted_results["bf16 refused"]["refused"]  # the interpreter cannot run bf16 dots


def test_triton_not_available_on_cpu_without_interpreter():
    """In this (non-interpreted) process, asking for Triton on CPU tensors is a clear error."""
    import numpy as np

    from deepssim_fast.all_pairs import all_pairs
    from deepssim_fast.backends import BackendUnavailableError

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("suite itself runs interpreted")
    x = np.ones((4, 3), np.float32)
    with pytest.raises(BackendUnavailableError, match="triton"):
        all_pairs(x, x, k=1, backend="triton", progress=False)


@pytest.mark.parametrize("name", ["exact thresholds 0.6000 0.8500", "exact thresholds 0.3333 0.5000"])
def test_triton_class_counts_at_float32_thresholds(interpreted_results, name):
    r = interpreted_results[name]
    assert r["at_threshold"] == 2, r  # the scores do sit exactly at float32(low) and float32(high)
    assert r["classes"] == r["want"], r


def test_largest_float32_le_makes_float32_compares_exact():
    """Compiled Triton passes a Python float as fp32; the kernel gets thresholds that survive that."""
    import numpy as np

    from deepssim_fast.kernels.cosine_topk import largest_float32_le

    rng = np.random.default_rng(3)
    for x in [0.6, 0.85, 1.0 / 3.0, 0.5, -0.2, 0.0, 1.0, -1.0, *rng.uniform(-1, 1, 50).tolist()]:
        t = largest_float32_le(x)
        assert float(np.float32(t)) == t and t <= x
        s = np.float32(x)
        around = [s]
        lo = hi = s
        for _ in range(4):
            lo = np.nextafter(lo, np.float32(-2))
            hi = np.nextafter(hi, np.float32(2))
            around += [lo, hi]
        for v in around:
            assert (v > np.float32(t)) == (float(v) > x), (x, v)


@pytest.mark.parametrize("bins", [7, 200, 2000])
def test_triton_histogram_is_the_float64_rule_at_bin_edges(interpreted_results, bins):
    # 7 and 200 bins: the tile's (class, bin) histogram; 2000: one global atomic per pair
    r = interpreted_results[f"bin edges {bins}"]
    assert r["n_pairs"] == r["want_pairs"]
    assert r["scores_equal_native"], r  # one exact product per score: identical on every engine
    assert r["hist_equal_rule"] and r["hist_equal_native"], r
    assert r["classes_equal_native"], r


def test_merge_topk_orders_by_score_then_lower_index():
    """The packed-key merge against a lexsort reference: heavy ties, negative scores, +-0, empty slots."""
    import numpy as np
    import torch

    from deepssim_fast.kernels.cosine_topk import merge_topk

    rng = np.random.default_rng(11)
    imax = np.iinfo(np.int64).max
    for trial in range(20):
        m, k, c = 7, int(rng.integers(1, 6)), int(rng.integers(0, 40))
        levels = np.array([-1.0, -0.5, -0.0, 0.0, 0.25, 0.6, 1.0, np.float32(0.6) + 1e-7], np.float32)
        run_s = np.sort(rng.choice(levels, (m, k)), axis=1)[:, ::-1].astype(np.float32)
        run_i = rng.integers(0, 1000, (m, k))
        cand_s = rng.choice(levels, (m, c)).astype(np.float32)
        cand_i = rng.integers(0, 1000, (m, c))
        empty = rng.random((m, c)) < 0.3
        cand_s[empty], cand_i[empty] = -np.inf, imax
        if trial % 4 == 0:  # rows with fewer real scores than k
            run_s[:, -1], run_i[:, -1] = -np.inf, imax
        got_s, got_i = merge_topk(torch.from_numpy(run_s.copy()), torch.from_numpy(run_i),
                                  torch.from_numpy(cand_s), torch.from_numpy(cand_i), k)
        s_all = np.concatenate([run_s, cand_s], 1) + np.float32(0.0)
        i_all = np.concatenate([run_i, cand_i], 1)
        for r in range(m):
            order = np.lexsort((i_all[r], -s_all[r].astype(np.float64)))[:k]
            np.testing.assert_array_equal(got_s[r].numpy(), s_all[r][order])
            np.testing.assert_array_equal(got_i[r].numpy(), i_all[r][order])


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_triton_class_counts_of_a_full_tile_of_duplicates(interpreted_results, mode):
    """32768 duplicate pairs in one tile: the int32 packing of both class counts must not carry a sign."""
    r = interpreted_results[f"full tile of duplicates mode {mode}"]
    assert r["classes"] == [0, 0, 128 * 256], r
    assert r["hist_total"] == 128 * 256


@pytest.mark.parametrize("n_t,chunk,bn", [(1, 512, 32), (100, 512, 32), (100000, 16384, 128), (16385, 16384, 128)])
def test_train_chunks_cover_the_rows_in_growing_launches(n_t, chunk, bn):
    from deepssim_fast.kernels.cosine_topk import train_chunks

    ranges = train_chunks(n_t, chunk, bn)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_t
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True))  # contiguous
    sizes = [c1 - c0 for c0, c1 in ranges]
    assert all(0 < s <= chunk for s in sizes)
    assert sizes[0] <= 8 * bn
    assert all(b >= a for a, b in zip(sizes[:-2], sizes[1:-1], strict=True))  # growing (the last may be cut)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_triton_histogram_modes_agree_with_native(interpreted_results, mode):
    # 0: per-pair global atomics; 1: tile histogram + packed class reduction; 2: (class, bin) histogram
    r = interpreted_results[f"hist_mode {mode}"]
    assert r["hist_equal_native"], r
    assert r["classes"] == r["classes_native"], r
    assert r["score_err"] <= 1e-6, r  # (near-identical rows: the order of near-ties may differ)


@pytest.mark.parametrize("bins", [1, 256, 1024])
@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("tag", ["self", "cross"])
def test_tile_histogram_sink_slot_stays_out_of_the_bins(interpreted_results, bins, mode, tag):
    """Invalid pairs go to a sink slot; at 1 bin and at powers of two that slot lies past next_pow2(bins), and
    a sink inside the real bins (mode 1 with next_pow2(bins) slots) counted padding there."""
    r = interpreted_results[f"sink bins {bins} mode {mode} {tag}"]
    assert r["hist_equal_native"], r
    assert r["classes"] == r["classes_native"], r


def test_histogram_mode_by_triton_release():
    from deepssim_fast.kernels.cosine_topk import TILE_HIST_MAX_BINS, histogram_mode

    assert histogram_mode(200, "3.9.0") == 2
    assert histogram_mode(200, "3.10.1") == 2
    assert histogram_mode(200, "3.6.0") == 1
    assert histogram_mode(TILE_HIST_MAX_BINS + 1, "3.9.0") == 0
    assert histogram_mode(200, "unknown") == 1


def test_histogram_mode_environment_override(monkeypatch):
    """DEEPSSIM_FAST_TRITON_HIST_MODE picks the kernel's histogram mode (the launch is recorded, not run)."""
    import torch

    import deepssim_fast.kernels.cosine_topk as ck
    from deepssim_fast.kernels import aot

    q = torch.nn.functional.normalize(torch.randn(9, 8), dim=1)
    modes = []
    for env in ("", "0", "1", "2"):
        monkeypatch.setenv("DEEPSSIM_FAST_TRITON_HIST_MODE", env)
        with aot.record_launches(ck, "_cosine_topk_kernel") as rec:
            ck.cosine_topk(q, q, k=2, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85))
        modes.append(rec[0].kwargs["HIST_MODE"])
    assert modes == [ck.histogram_mode(200), 0, 1, 2]
    monkeypatch.setenv("DEEPSSIM_FAST_TRITON_HIST_MODE", "1")
    too_many = r"hist_mode 1 with 2000 .*\(set by DEEPSSIM_FAST_TRITON_HIST_MODE\)"
    with aot.record_launches(ck, "_cosine_topk_kernel"), pytest.raises(ValueError, match=too_many):
        ck.cosine_topk(q, q, k=2, bins=2000, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85))
    # a value that is no mode names the variable (int() had raised "invalid literal for int() ...: 'two'")
    for bad in ("two", "3", "-1"):
        monkeypatch.setenv("DEEPSSIM_FAST_TRITON_HIST_MODE", bad)
        with aot.record_launches(ck, "_cosine_topk_kernel") as rec, \
                pytest.raises(ValueError, match=f"DEEPSSIM_FAST_TRITON_HIST_MODE='{bad}': expected 0, 1 or 2"):
            ck.cosine_topk(q, q, k=2, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85))
        assert not rec


class _Ran(Exception):
    """Raised by a stand-in engine: which engine all_pairs chose, and on what device."""


def test_host_data_and_auto_backend_on_a_cuda_machine(monkeypatch):
    """On a CUDA machine (simulated: no GPU here), backend="triton" with numpy data moves the data to the GPU
    (compiled Triton cannot read host memory), for all_pairs and for ssim; and DEEPSSIM_FAST_BACKEND=auto
    with device="cuda" runs Triton as when the variable is unset. Stand-ins record what the engines get."""
    import numpy as np
    import torch

    import importlib

    AP = importlib.import_module("deepssim_fast.all_pairs")  # (the package exports functions of these names)
    S = importlib.import_module("deepssim_fast.ssim")
    backends = importlib.import_module("deepssim_fast.backends")
    from deepssim_fast.kernels import ssim as ks

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # the move itself: a host tensor goes to "cuda" (here that fails: this torch has no CUDA), and under
    # the interpreter it stays
    with pytest.raises((AssertionError, RuntimeError)):
        backends.triton_device(torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = torch.zeros(2)
    assert backends.triton_device(t) is t
    monkeypatch.delenv("TRITON_INTERPRET")

    monkeypatch.setattr(backends, "_cuda_devices", lambda: ["simulated GPU"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    meta = torch.device("meta")  # stands for the GPU
    seen: list = []

    def to_gpu(x):
        seen.append(x.shape)
        return x.to(meta)

    monkeypatch.setattr(AP, "_triton_device", to_gpu)
    monkeypatch.setattr(S, "_triton_device", to_gpu)
    monkeypatch.setattr(AP, "_normalize", lambda t, name, dp, device: torch.zeros(
        t.shape[0], dp, device=meta if torch.device(device).type in ("cuda", "meta") else device))

    def engine(name):
        def run(*args, **kwargs):
            raise _Ran(name, args[0].device)
        return run

    monkeypatch.setattr(AP, "_run_triton", engine("triton"))
    monkeypatch.setattr(AP, "_run_native", engine("native"))
    rng = np.random.default_rng(0)
    tr, sy = rng.standard_normal((20, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(_Ran) as ran:
        AP.all_pairs(tr, sy, k=2, backend="triton", progress=False)
    assert ran.value.args == ("triton", meta)
    for env in (None, "auto"):
        if env is None:
            monkeypatch.delenv("DEEPSSIM_FAST_BACKEND", raising=False)
        else:
            monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", env)
        with pytest.raises(_Ran) as ran:
            AP.all_pairs(tr, sy, k=2, device="cuda", progress=False)
        assert ran.value.args[0] == "triton", env
    monkeypatch.delenv("DEEPSSIM_FAST_BACKEND", raising=False)

    got: list = []

    def kernel(xf, yf, ix, iy, p, **kw):
        got.append((xf.device, yf.device, ix.device))
        return torch.full((ix.numel(),), 0.5, dtype=torch.float64)

    monkeypatch.setattr(ks, "ssim_pairs", kernel)
    seen.clear()
    x = rng.random((2, 16, 16)).astype(np.float32)
    out = S.ssim(x, x[::-1].copy(), spatial_dims=2, backend="triton")
    assert got == [(meta, meta, meta)] and len(seen) == 2
    assert isinstance(out, np.ndarray) and np.allclose(out, 0.5)


def test_a_launch_counts_fewer_than_2_31_pairs():
    """Per-launch histogram and class counters are int32: block x chunk is capped below 2^31 (65536 x 65536
    asked for 2^32 pairs in one launch); ordinary sizes keep their chunk, rounded up to whole tiles."""
    from deepssim_fast.kernels.cosine_topk import launch_chunk

    assert launch_chunk(16384, 128, 8192) == 16384
    assert launch_chunk(1000, 128, 8192) == 1024
    for rows, chunk in ((65536, 65536), (65536, 32768), (8192, 1 << 20), (1 << 20, 1 << 20)):
        tc = launch_chunk(chunk, 128, rows)
        assert tc % 128 == 0 and rows * tc < 2**31 and tc <= max(128, -(-chunk // 128) * 128)
    assert launch_chunk(1 << 20, 64, 1 << 26) == 64  # at least one tile


def test_a_launch_fits_the_grid_y_limit():
    """A launch puts its tiles of training rows on the grid's y axis (at most 65535 on CUDA): a large
    ``train_chunk`` with few synthetic rows asked for 65536 tiles (20M training rows, one query). Recorded on
    the meta device, so nothing is allocated or run."""
    import torch

    import deepssim_fast.kernels.cosine_topk as ck
    from deepssim_fast.kernels import aot

    for bn in (16, 32, 128):
        assert all(ck.launch_chunk(1 << 40, bn, rows) <= 65535 * bn for rows in (1, 7, 8192))
    q, t = torch.empty(1, 8, device="meta"), torch.empty(20_000_000, 8, device="meta")
    with aot.record_launches(ck, "_cosine_topk_kernel") as rec:
        ck.cosine_topk(q, t, k=3, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85), synth_block=1,
                       train_chunk=1 << 30, blocks=ck.default_blocks(torch.device("cuda"), 3))
    assert max(r.grid[1] for r in rec) <= 65535
    assert sum(r.args[9] for r in rec) == t.shape[0]  # (n_t of each launch) every training row once


_GPU_ORDER_SCRIPT = textwrap.dedent(r"""
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import numpy as np
    import torch
    from triton.runtime import interpreter as itp

    # the compiled fp32 dot's order: every product added to the accumulator in turn, each sum rounded to
    # float32 (the interpreter's own tl.dot is one blocked matmul per K block, far more accurate)
    def one_product_at_a_time(self, a, b, acc, input_precision, max_num_imprecise_acc):
        A, B = a.data.astype(np.float32), b.data.astype(np.float32)
        s = acc.data.astype(np.float32).copy()
        for k in range(A.shape[-1]):
            s = (s + A[:, k:k + 1] * B[k:k + 1, :]).astype(np.float32)
        return itp.TensorHandle(s, acc.dtype.scalar)

    itp.InterpreterBuilder.create_dot = one_product_at_a_time
    from deepssim_fast.all_pairs import all_pairs
    from deepssim_fast import reference as ref

    rng = np.random.default_rng(3)
    train = rng.standard_normal((3, 1 << 16)).astype(np.float32)  # a 256 x 256 slice per row
    synth = np.concatenate([train[1:2], rng.standard_normal((1, 1 << 16)).astype(np.float32)])
    r = all_pairs(torch.from_numpy(train), torch.from_numpy(synth), k=3, backend="triton", progress=False)
    sim = ref.cosine_matrix_reference(train, synth).numpy()
    true = np.take_along_axis(sim, r.indices, axis=1)
    print("RESULT " + json.dumps(dict(top=r.indices[:, 0].tolist(), self_score=float(r.scores[0, 0]),
                                      max_err=float(np.abs(r.scores - true).max()))))
""")


def test_triton_wide_rows_keep_fp32_accuracy_in_the_gpu_summation_order():
    """Compiled, tl.dot adds d products into one fp32 accumulator one at a time: at d = 2^16 a unit row scored
    1 - 1.2e-5 against itself (1 - 1.3e-3 at 2^21, the GPU suite's wide-row check), against ~1e-7 under
    the interpreter, whose dot this test replaces by that order. Wide rows are summed with compensation."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _GPU_ORDER_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreted run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert r["top"][0] == 1
    assert abs(r["self_score"] - 1.0) <= 1e-6 and r["max_err"] <= 1e-6, r


def test_normalisation_chunks_of_wide_rows_stay_small(monkeypatch):
    """The device path normalised 4096 rows at a time in float64 whatever their width: 1100 rows of 2^21
    (the GPU suite's wide-row check) made two 18 GB temporaries, and a whole-volume correlation audit
    (d ~ 7e6) could not fit on a GPU that holds its data many times over. Recorded on the meta device (the
    path a CUDA tensor takes) and on the numpy fallback: no chunk passes 256 MiB of float64."""
    import importlib

    import numpy as np
    import torch

    ap = importlib.import_module("deepssim_fast.all_pairs")
    seen: list[tuple[int, ...]] = []

    class Stop(Exception):
        pass

    def spy(c, *args, **kwargs):
        seen.append(tuple(c.shape))
        raise Stop

    monkeypatch.setattr(torch.linalg, "vector_norm", spy)
    with pytest.raises(Stop):
        ap._normalize(torch.empty(1100, 1 << 21, device="meta"), "train", 1 << 21, "meta")
    assert seen and seen[0][0] * seen[0][1] * 8 <= 256 << 20, seen
    monkeypatch.undo()
    # the numpy fallback (no native extension): same bound, and the same rows as the native rule
    views: list[tuple[int, ...]] = []
    host_view = ap._host_view

    def record(t):
        views.append(tuple(t.shape))
        return host_view(t)

    monkeypatch.setattr(ap, "_host_view", record)
    monkeypatch.setattr(ap, "_NORM_CHUNK_BYTES", 8 * 64 * 3)  # 3 rows of 64 per chunk
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32))
    out = np.zeros((10, 64), np.float32)
    assert ap._normalize_rows_numpy(x, out) == -1
    assert max(v[0] for v in views) == 3 and sum(v[0] for v in views) == 10
    np.testing.assert_allclose(out, (x.double() / x.double().norm(dim=1, keepdim=True)).float().numpy(), rtol=0,
                               atol=0)


def test_triton_releases_the_kernels_do_not_compile_with(monkeypatch):
    """setup.py allowed Triton >= 3.0, but compiled with Triton 3.3.1 the all-pairs kernel failed in its
    default histogram modes (``tl.histogram`` took no ``mask=`` before 3.4) and with 3.2.0 every SSIM kernel
    failed (no ``tl.gather``). Before 3.4 the all-pairs kernel now uses mode 0 (per-pair atomics), which
    compiles there, refusing modes 1 and 2 by name; before 3.3 the backend is unavailable and says why."""
    import torch

    import importlib

    import deepssim_fast.kernels.cosine_topk as ck
    from deepssim_fast.kernels import aot

    backends = importlib.import_module("deepssim_fast.backends")  # (the package exports a function of that name)
    assert ck.histogram_mode(200, "3.3.1") == 0 and ck.histogram_mode(200, "3.2.0") == 0
    assert ck.histogram_mode(200, "3.4.0") == 1
    q = torch.nn.functional.normalize(torch.randn(9, 8), dim=1)
    monkeypatch.setattr(ck.triton, "__version__", "3.3.1")
    with aot.record_launches(ck, "_cosine_topk_kernel") as rec:
        ck.cosine_topk(q, q, k=2, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85))
    assert rec[0].kwargs["HIST_MODE"] == 0
    monkeypatch.setenv("DEEPSSIM_FAST_TRITON_HIST_MODE", "2")
    with aot.record_launches(ck, "_cosine_topk_kernel") as rec, \
            pytest.raises(ValueError, match=r"hist_mode 2 \(set by DEEPSSIM_FAST_TRITON_HIST_MODE\) needs Triton "
                                            r">= 3.4 .*Triton 3.3.1"):
        ck.cosine_topk(q, q, k=2, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85))
    assert not rec
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.available("triton")
    monkeypatch.setattr(backends, "_triton_version", lambda: "3.2.0")
    assert not backends.available("triton") and not backends.backends()["triton"]["available"]
    with pytest.raises(backends.BackendUnavailableError, match=r"Triton 3.2.0 is installed.*>= 3.3"):
        backends.require("triton")


def test_tile_histograms_take_no_mask():
    """The tile histograms leave out invalid pairs through a sink slot, never through ``tl.histogram``'s
    ``mask=``: compiled by Triton 3.6.0 on an H200, the masked form miscounted inside this kernel (23 of 35
    pairs in the wrong bin on a 5 x 7 problem) while the interpreter, which CI runs, was right — so CI guards the form.
    (bench/gpu_allpairs_diag.py shows both on a GPU; BENCHMARKS.md, "GPU suite".)"""
    import ast
    import inspect
    import textwrap

    import deepssim_fast.kernels.cosine_topk as ck

    src = textwrap.dedent(inspect.getsource(ck._cosine_topk_kernel.fn))
    calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and n.func.attr == "histogram"]
    assert len(calls) == 2  # mode 2's (class, bin) histogram and mode 1's bin histogram
    for call in calls:
        assert [kw.arg for kw in call.keywords] == [], ast.unparse(call)
        assert len(call.args) == 2, ast.unparse(call)


def test_cuda_launch_sizes_keep_the_candidates_within_their_budget():
    """On CUDA a launch takes CUDA_TRAIN_CHUNK training rows and as many synthetic rows as keep its candidate
    slots (rows x tiles x min(k, BLOCK_N), 12 bytes each) within CUDA_CANDIDATE_BYTES (and 1/32 of the GPU's
    memory), within [1024, 32768] and whole row blocks."""
    import deepssim_fast.kernels.cosine_topk as ck

    for chunk, bn, kc, bm in ((65536, 128, 10, 64), (65536, 128, 100, 64), (65536, 128, 1, 64), (300, 128, 5, 64),
                              (65536, 64, 64, 128), (1 << 20, 128, 128, 64)):
        rows = ck.cuda_synth_block(chunk, bn, kc, bm)
        assert rows % bm == 0 and 1024 <= rows <= 32768, (chunk, kc, rows)
        slots = rows * -(-chunk // bn) * kc
        assert slots * 12 <= ck.CUDA_CANDIDATE_BYTES or rows == 1024, (chunk, kc, rows)
    assert ck.cuda_synth_block(65536, 128, 10, 64) == 17472  # k=10: 17472 rows x 512 tiles x 10 slots
    assert ck.cuda_synth_block(128, 128, 1, 64) == 32768
    # the launcher's choice on CUDA: the budget shrinks with the GPU's memory (1/32 of it), the caller's sizes
    # win, and a launch always counts fewer than 2^31 pairs
    big = dict(kc=10, block_m=64, block_n=128)
    assert ck.launch_sizes("cuda", 100_000, 100_000, **big) == (17472, 65536)
    assert ck.launch_sizes("cuda", 100_000, 100_000, device_memory=141 << 30, **big) == (17472, 65536)
    assert ck.launch_sizes("cuda", 100_000, 100_000, device_memory=8 << 30, **big) == (4352, 65536)
    assert ck.launch_sizes("cuda", 100_000, 100_000, synth_block=8192, train_chunk=16384, **big) == (8192, 16384)
    assert ck.launch_sizes("cpu", 100_000, 100_000, **big) == (256, 512)
    for n_q in (1, 1000, 10**6):
        for kc in (1, 10, 128):
            for sb_user in (None, 7, 1 << 20):
                sb, tc = ck.launch_sizes("cuda", n_q, 10**6, kc=kc, block_m=64, block_n=128, synth_block=sb_user,
                                         train_chunk=1 << 22)
                assert min(sb, n_q) * tc < 2**31 and tc % 128 == 0 and (sb_user is None or sb == sb_user)


def test_half_precision_products_read_half_precision_operands():
    """fp16 (and bf16 on CUDA) launches get their operands stored in that precision (half the bytes per tile
    load, no conversion in the kernel; the same round-to-nearest-even values); fp32 precisions keep fp32.
    Recorded on the meta device: nothing is allocated or run."""
    import torch

    import deepssim_fast.kernels.cosine_topk as ck
    from deepssim_fast.kernels import aot

    q, t = torch.empty(5, 8, device="meta"), torch.empty(40, 8, device="meta")
    for precision, want in (("fp16", torch.float16), ("ieee", torch.float32), ("tf32", torch.float32),
                            ("tf32x3", torch.float32)):
        with aot.record_launches(ck, "_cosine_topk_kernel") as rec:
            ck.cosine_topk(q, t, k=3, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85),
                           precision=precision, blocks=ck.default_blocks(torch.device("cuda"), 3))
        assert rec and all(r.args[0].dtype == want and r.args[1].dtype == want for r in rec), precision
        assert rec[0].kwargs["PRECISION"] == precision
