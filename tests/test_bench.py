"""The benchmark runner (``python -m bench``) and the one-shot GPU suite (``bench/gpu_suite.py``).

* The GPU suite's ``--dry-run`` runs every check and every timing case on tiny shapes with the Triton
  kernels in the interpreter (TRITON_INTERPRET=1, set by the script before triton is imported, hence a
  subprocess), so the script cannot rot between GPU sessions.
* Its checkers are tested on their own with planted faults (a NaN left in an output, an error above the
  tolerance, a wrong neighbour, a wrong tie order, a miscounted histogram): each must be caught.
* The runner runs a tiny benchmark package of this test (never BENCHMARKS.md: ``--no-append``); a failing
  provider is a row, a missing module is reported, the others still run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import _prestart
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.py"


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.fixture(scope="module")
def gpu_suite_module():
    """bench/gpu_suite.py imported as a module (no --dry-run in argv: triton is not switched, not needed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import bench.gpu_suite as gs

    return gs


# ------------------------------------------------------------------------------------------ gpu_suite
def _suite_dry_run_job(tmp: Path):
    out = tmp / "gs"
    argv = [sys.executable, str(SUITE), "--dry-run", "--out", str(out), "--seed", "20261129"]
    return argv, dict(cwd=ROOT, env=_subprocess_env()), dict(out=out)


# (these scripts run beside the suite from its start: _prestart)
_prestart.register("gpu_suite_dry_run", make=_suite_dry_run_job, timeout=240,
                   wanted_by=_prestart.uses(__name__, test="test_gpu_suite_dry_run_passes_and_writes_json"))


def test_gpu_suite_dry_run_passes_and_writes_json() -> None:
    proc, ctx = _prestart.result("gpu_suite_dry_run")
    out = ctx["out"]
    tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-6000:])
    assert proc.returncode == 0, tail
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["passed"] is True, tail
    assert res["env"]["triton_interpret"] == "1" and res["env"]["dry_run"] is True
    assert res["seed"] == 20261129
    names = [c["name"] for c in res["checks"]]
    failed = [c for c in res["checks"] if not c["ok"]]
    assert not failed, failed
    # every Triton path is checked: 2D (each window and dtype), 3D, ssim_matrix, all-pairs; random and real
    for part in ("ssim2d uniform float32", "ssim2d uniform bfloat16", "ssim2d gaussian float32",
                 "ssim2d uniform float16", "ssim2d uniform uint8",
                 "ssim2d preset=deepssim", "ssim2d broadcast", "ssim3d uniform", "ssim3d gaussian",
                 "ssim_matrix random", "ssim_matrix preset=deepssim", "all_pairs random",
                 "all_pairs self mode", "slice embeddings", "all_pairs wide rows"):
        assert any(part in n for n in names), (part, names)
    assert any(" real " in n for n in names), "real MRI slices were not used in the dry run"
    assert all(c["err"] is None or c["err"] <= c["tol"] for c in res["checks"])
    # the Triton kernels themselves ran (interpreted), not a fallback
    assert {"deepssim_fast.kernels.ssim", "deepssim_fast.kernels.cosine_topk"} <= set(res["kernels_loaded"])
    # ceilings measured, every timing case ran (tiny) with a Triton provider and the torch baselines
    assert {"copy_GBps", "mm_bf16_TFLOPs", "mm_fp32_TFLOPs"} <= set(res["ceilings"])
    timed = {(t["kernel"], t["provider"]) for t in res["timings"] if t["times_ms"]}
    for kernel, provider in (("ssim2d u7", "triton"), ("ssim2d g11", "triton"), ("ssim3d u7", "triton"),
                             ("ssim2d u7", "torch (deepssim_fast)"), ("ssim_matrix u7", "triton ssim_matrix"),
                             ("all_pairs top-k", "triton all_pairs"),
                             ("all_pairs top-k", "torch.mm bf16 + topk")):
        assert (kernel, provider) in timed, (kernel, provider, sorted(timed))
    # the short table is printed last and saved; the full log is there
    lines = proc.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| kernel | size | provider |"))
    assert all(line.startswith("|") for line in lines[header:])
    assert (out / "gpu_suite.md").read_text().startswith("| kernel | size | provider |")
    assert "[PASS]" in (out / "gpu_suite.log").read_text()


def test_gpu_allpairs_diag_dry_run_finds_the_histograms_right(tmp_path: Path) -> None:
    """bench/gpu_allpairs_diag.py (the diagnosis of the H200's histogram miscount) runs interpreted: every
    tl.histogram form and every cosine_topk histogram mode agrees with the float64 rule on its tiny cases."""
    out = tmp_path / "dg"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_allpairs_diag.py"), "--dry-run", "--out",
                           str(out)], cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "diag.json").read_text())
    assert res["hist_op"] and all(row["l1"] == ["0", "0", "0"] for row in res["hist_op"]), res["hist_op"]
    assert len(res["modes"]) == 3
    for case in res["modes"]:
        assert sorted(case["cells"]) == ["0", "1", "2"], case
        assert all(cell.startswith("+0, 0 ") for cell in case["cells"].values()), case
    timed = {t["case"]: t for t in res["timing"]}
    assert "torch.mm bf16 + topk (chunks 8192)" in timed and "cosine_topk fp16 mode 1" in timed
    # the Triton launches are timed inside each real call: a part of it, never more
    t = timed["cosine_topk fp16 mode 1"]
    assert 0 < t["kernel_ms"][0] <= t["ms"][0], t
    assert res["problems"] == [] and "diag: no problems" in proc.stdout
    assert "== 3. time of" in (out / "diag.log").read_text()


def _smoke_job(tmp_root: Path):
    out, tmp = tmp_root / "smoke", tmp_root / "tmp"
    tmp.mkdir()
    env = dict(_subprocess_env(), TMPDIR=str(tmp))
    argv = [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu", "--out", str(out)]
    return argv, dict(cwd=ROOT, env=env), dict(out=out, tmp=tmp)


_prestart.register("gpu_smoke_cpu", make=_smoke_job, timeout=300,
                   wanted_by=_prestart.uses(__name__, test="test_gpu_smoke_runs_on_the_cpu"))


def test_gpu_smoke_runs_on_the_cpu() -> None:
    """bench/gpu_smoke.py with --device cpu: every public-API call it makes on a GPU, made on the CPU; the
    audit compares the torch engine with the default one (cupy checks need a GPU and are left out). Nothing
    is left in the temporary folder (each run left ~17 MB in /tmp before)."""
    pytest.importorskip("nilearn")
    proc, ctx = _prestart.result("gpu_smoke_cpu")
    out, tmp = ctx["out"], ctx["tmp"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "smoke.json").read_text())
    names = [r["name"] for r in res]
    assert all(r["ok"] for r in res), res
    for part in ("all_pairs on the host", "all_pairs(numpy", "dense=True", "real slices", "ssim(torch",
                 "train(small", "embed on", "load_model", "audit("):
        assert any(part in n for n in names), (part, names)
    audit_row = next(r for r in res if r["name"].startswith("audit("))
    assert audit_row["detail"].startswith("8/8 planted copies labelled duplicate"), audit_row
    assert "the torch engine against the CPU default" in audit_row["detail"], audit_row
    assert (out / "matches_cpu.csv").is_file() and (out / "matches_device.csv").is_file()
    assert [p.name for p in tmp.iterdir() if p.name.startswith("deepssim")] == []  # (torch may leave its own)


_GPU_BENCHES = textwrap.dedent(r"""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from bench import bench_all_pairs as ap, bench_ssim as bs
    import importlib
    # (modules by name: the packages' attributes of these names are the functions)
    ct = importlib.import_module("deepssim_fast.kernels.cosine_topk")
    ssim_mod = importlib.import_module("deepssim_fast.ssim")
    out = {}
    quiet = lambda s: None
    rows = ap.gpu_case(n=40, d=16, k=3, log=quiet, device="cpu", precisions=("ieee", "fp16"))
    out["ap"] = {r.provider: r.note for r in rows}
    cases = ((2, (16, 18), 3), (3, (11, 12, 11), 1))
    out["ssim"] = [r.provider + ": " + r.note for r in bs._gpu(True, device="cpu", cases=cases)]
    real_topk, real_ssim = ct.cosine_topk, ssim_mod.ssim

    def moved(*a, **kw):  # a histogram with 4 pairs counted a bin too high
        s, i, h, c = real_topk(*a, **kw)
        h = h.clone()
        b = int(h.argmax())
        h[b] -= 4
        h[b + 1] += 4
        return s, i, h, c

    def off(*a, **kw):
        r = real_ssim(*a, **kw)
        return r + 1e-3 if kw.get("backend") == "triton" else r

    for key, mod, name, fake, call in (
            ("ap_bad", ct, "cosine_topk", moved,
             lambda: ap.gpu_case(n=40, d=16, k=3, log=quiet, device="cpu", precisions=("ieee",))),
            ("ssim_bad", ssim_mod, "ssim", off, lambda: bs._gpu(True, device="cpu", cases=cases[:1]))):
        setattr(mod, name, fake)
        try:
            call()
            out[key] = "no error"
        except AssertionError as exc:
            out[key] = str(exc)
        setattr(mod, name, {"cosine_topk": real_topk, "ssim": real_ssim}[name])
    print(json.dumps(out))
""")


def _gpu_benches_job(tmp: Path):
    env = dict(_subprocess_env(), TRITON_INTERPRET="1")
    return [sys.executable, "-c", _GPU_BENCHES, str(ROOT)], dict(cwd=ROOT, env=env), {}


_prestart.register("gpu_benches_interpreted", make=_gpu_benches_job, timeout=300,
                   wanted_by=_prestart.uses(__name__, test="test_gpu_benches_check_the_outputs_they_time"))


def test_gpu_benches_check_the_outputs_they_time() -> None:
    """`python -m bench` on a GPU timed Triton's all-pairs (bf16/tf32/fp32) and SSIM without looking at what
    they returned. Each output is now checked (all-pairs: every pair's float64 cosine at the precision's
    rounding bound; SSIM: every pair against the CPU engine) and a wrong one stops the case. Run here under
    the Triton interpreter on tiny sizes."""
    proc, _ = _prestart.result("gpu_benches_interpreted")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("triton (ieee fp32)", "triton (fp16)"):
        assert "output checked against every pair's float64 cosine" in res["ap"][name], res["ap"]
    assert "failed" not in " ".join(res["ap"].values())
    assert len(res["ssim"]) >= 2 and all("failed" not in r for r in res["ssim"] if r.startswith("deepssim")), res
    assert "triton (ieee fp32): timed output wrong" in res["ap_bad"] and "histogram bin" in res["ap_bad"], res
    assert "deepssim_fast triton vs native" in res["ssim_bad"], res


def test_gpu_smoke_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    script = str(ROOT / "bench" / "gpu_smoke.py")
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for args, msg in ((["--device", "bogus"], "--device 'bogus'"), (["--device", "meta"], "expected cuda"),
                      (["--device", "cpu", "--out", str(a_file)], "is a file"),
                      (["--dev", "cpu"], "unrecognized arguments")):
        proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=_subprocess_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_gpu_suite_budget_guard_skips_timings(tmp_path: Path) -> None:
    out = tmp_path / "gs"
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# bench\n")
    proc = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out),
                           "--sections", "timings", "--budget-s", "0.001",
                           "--append-md", "--benchmarks-md", str(md)], cwd=ROOT,
                          env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    assert res["timings"], res
    assert all(t["note"] == "skipped: time budget" and not t["times_ms"] for t in res["timings"])
    kernels = {t["kernel"] for t in res["timings"]}
    assert {"ssim2d u7", "ssim3d g11", "ssim_matrix u7", "all_pairs top-k"} <= kernels
    assert res["checks"] == []
    text = md.read_text()  # --append-md: the machine line and the table under the existing text
    assert text.startswith("# bench\n") and "### GPU suite" in text and "| kernel | size | provider |" in text
    assert "| all_pairs top-k |" in text and "skipped: time budget" in text
    assert "(dry run: tiny shapes interpreted on the CPU, not GPU timings)" in text  # never mistaken for a GPU's


def test_gpu_suite_checks_past_their_share_of_the_budget_are_skipped_and_fail_the_suite(
        gpu_suite_module, tmp_path: Path) -> None:
    # The checks had no time limit: slow compiles on a lent GPU could eat the budget the timings need. Past
    # --checks-share of --budget-s a check is not run; it is reported as skipped, never as passed.
    gs = gpu_suite_module
    budget = gs.Budget(100.0)
    suite = gs.Suite(torch.device("cpu"), gs.DRY_SIZES, seed=1, budget=budget, dry=True, sections={"checks"},
                     checks_share=0.5)
    ran = []
    suite.check("first", lambda: (ran.append(1), (True, 0.0, 1.0, ""))[1])
    budget.t0 -= 60.0  # 60 s later: past 50 % of 100 s
    suite.check("second", lambda: (ran.append(2), (True, 0.0, 1.0, ""))[1])
    assert ran == [1]
    assert [(c.name, c.ok, c.skipped) for c in suite.checks] == [("first", True, False), ("second", False, True)]
    block = gs.markdown_block(suite, {"device": "cpu", "torch": "x", "triton": "y"})
    assert "Checks: 1/2 passed" in block and "1 check(s) did not run (time budget)" in block
    assert "skipped: second" in block and "failed" not in block
    with pytest.raises(SystemExit):
        gs.parse_args(["--checks-share", "0"])
    assert gs.parse_args([]).checks_share == 0.5 and gs.parse_args(["--dry-run"]).checks_share == 1.0


def test_machine_line_tells_cpu_generations_apart() -> None:
    # VMs report a bare "AMD EPYC": runs on a Zen 3 (AVX2 only) and a Zen 4 (AVX-512 VNNI), whose all-pairs
    # ratios against faiss differ by ~1.5x, had identical machine lines in BENCHMARKS.md.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.harness import cpu_line

    block = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {fam}\nmodel\t\t: {model}\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma {extra}\n\nprocessor\t: 1\n"
             "model name\t: other\n")
    assert cpu_line(block.format(fam=25, model=1, extra="")) == "AMD EPYC (family 25 model 1; AVX2, no AVX-512)"
    assert cpu_line(block.format(fam=25, model=17, extra="avx512f avx512bw avx512_vnni")) == \
        "AMD EPYC (family 25 model 17; AVX-512 with VNNI)"
    assert cpu_line(block.format(fam=6, model=85, extra="avx512f")) == "AMD EPYC (family 6 model 85; AVX-512, no VNNI)"
    assert cpu_line("model name\t: Some CPU\nflags\t: sse2\n") == "Some CPU (no AVX2)"
    assert cpu_line("") == ""


def test_gpu_suite_arguments(gpu_suite_module, tmp_path: Path) -> None:
    gs = gpu_suite_module
    with pytest.raises(SystemExit) as e:
        gs.parse_args(["--sections", "checks,bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        gs.parse_args(["--budget-s", "0"])
    if not torch.cuda.is_available():  # without a GPU and without --dry-run: a clear refusal, status 2
        assert gs.main(["--out", str(tmp_path / "x")]) == 2


def _suite(gs, tmp_path: Path):
    return gs.Suite(torch.device("cpu"), gs.DRY_SIZES, seed=7, budget=gs.Budget(60.0), dry=True,
                    sections={"checks"})


def test_ssim_checker_catches_unwritten_and_inaccurate_outputs(gpu_suite_module, tmp_path: Path,
                                                               monkeypatch) -> None:
    """The SSIM check passes an exact result and fails on a NaN (unwritten element) or a 1e-4 error."""
    gs = gpu_suite_module
    from deepssim_fast.reference import ssim_reference

    fault = {"kind": None}

    def fake_ssim(x, y, *, spatial_dims=None, backend=None, **opts):
        assert backend == "triton"
        bx, by = torch.broadcast_tensors(x, y)
        r = torch.from_numpy(np.asarray(ssim_reference(bx, by, spatial_dims=spatial_dims, **opts))).float()
        if fault["kind"] == "nan":
            r.view(-1)[-1] = float("nan")
        elif fault["kind"] == "off":
            r.view(-1)[0] += 1e-4
        elif fault["kind"] == "shape":
            r = r.reshape(-1)[:-1]
        return r

    import deepssim_fast  # noqa: F401 - the package first (its __init__ imports the real module)

    monkeypatch.setitem(sys.modules, "deepssim_fast.ssim", types.SimpleNamespace(ssim=fake_ssim))
    suite = _suite(gs, tmp_path)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 13, 17, generator=g)
    y = (0.7 * x + 0.3 * torch.rand(4, 13, 17, generator=g))
    ok, err, tol, _ = suite._ssim_check(x, y, spatial_dims=2, tol=1e-5, window="gaussian",
                                        sample_covariance=False)
    assert ok and err is not None and err < 1e-6
    ok, _, _, _ = suite._ssim_check(x[0], y, spatial_dims=2, tol=1e-5)  # one-vs-many broadcasting
    assert ok
    for kind, words in (("nan", "non-finite"), ("off", "mean ssim"), ("shape", "batch shape")):
        fault["kind"] = kind
        ok, err, _, detail = suite._ssim_check(x, y, spatial_dims=2, tol=1e-5)
        assert not ok and words in detail, (kind, detail)
        if kind == "off":
            assert err is not None and abs(err - 1e-4) < 1e-6


def _reference_result(train: torch.Tensor, synth: torch.Tensor | None, k: int):
    from deepssim_fast.reference import class_counts_reference, histogram_reference, topk_reference

    s, i = topk_reference(train, synth, k)
    counts, edges = histogram_reference(train, synth, bins=200)
    cc = class_counts_reference(train, synth)
    return types.SimpleNamespace(scores=s.copy(), indices=i.copy(), histogram=(counts.copy(), edges),
                                 class_counts=dict(cc), thresholds=(0.6, 0.85),
                                 train_hits=np.bincount(i[:, 0], minlength=train.shape[0]).astype(np.int64))


def test_all_pairs_checker_catches_wrong_neighbours_ties_and_counts(gpu_suite_module, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The all-pairs check passes the brute-force result and fails on each planted fault."""
    gs = gpu_suite_module
    g = torch.Generator().manual_seed(5)
    train, synth = torch.randn(40, 16, generator=g), torch.randn(9, 16, generator=g)
    train[2] = train[1]
    synth[0] = train[1]
    k = 4

    def corrupt(res, kind: str):
        if kind == "nan":
            res.scores[3, -1] = np.nan
        elif kind == "swap":  # the best neighbour of row 4 replaced by its least similar training row
            res.indices[4, 0] = int(torch.argmin(train @ synth[4]))
        elif kind == "tie":  # the planted tie returned in the wrong order
            res.indices[0, :2] = [2, 1]
        elif kind == "hist":
            res.histogram[0][100] += 1
            res.histogram[0][101] -= 1
        elif kind == "hits":
            res.train_hits[0] += 1
        elif kind == "classes":
            res.class_counts["similar"] += 1
        return res

    fault = {"kind": None}

    def fake_all_pairs(tr, sy, *, k, backend=None, progress=True, bins=200, precision="ieee"):
        assert backend == "triton" and progress is False
        res = _reference_result(tr, sy, k)
        return corrupt(res, fault["kind"]) if fault["kind"] else res

    import deepssim_fast  # noqa: F401 - the package first (its __init__ imports the real module)

    monkeypatch.setitem(sys.modules, "deepssim_fast.all_pairs",
                        types.SimpleNamespace(all_pairs=fake_all_pairs))
    suite = _suite(gs, tmp_path)
    ok, err, _, detail = suite._all_pairs_check(train, synth, k, tie_row=(0, [1, 2]))
    assert ok, detail
    ok, _, _, detail = suite._all_pairs_check(train, None, k)  # self mode
    assert ok, detail
    for kind in ("nan", "swap", "tie", "hist", "hits", "classes"):
        fault["kind"] = kind
        ok, _, _, detail = suite._all_pairs_check(train, synth, k, tie_row=(0, [1, 2]))
        assert not ok, (kind, detail)


def test_real_data_fallback_to_phantoms(gpu_suite_module, monkeypatch) -> None:
    """Without the data packages the suite says so and uses phantoms of the asked shape (it still runs)."""
    gs = gpu_suite_module
    import deepssim_fast.data as data

    def missing(*a, **k):
        raise data.DataError("dataset ships inside the 'nilearn' wheel, which is not installed")

    monkeypatch.setattr(data, "real_slices", missing)
    monkeypatch.setattr(data, "load_volume", missing)
    arr, src = gs.real_slice_stack((20, 22), 5, dry=False, seed=1)
    assert arr.shape == (5, 20, 22) and arr.dtype == np.float32 and "absent" in src
    assert np.isfinite(arr).all() and arr.std() > 0
    vol, vsrc = gs.real_volume((12, 14, 11), dry=False, seed=1)
    assert vol.shape == (12, 14, 11) and "absent" in vsrc


# ------------------------------------------------------------------------------------------ the runner
FAKE_BENCH = '''
from bench.harness import run_case

SEEN = {}


def run(quick=False, append=True):
    def broken():
        raise RuntimeError("competitor not installed here")

    rows = run_case("fakecap", "sum of 10000 ints", {"builtin sum": lambda: sum(range(10000)),
                                                     "numpy": lambda: __import__("numpy").arange(10000).sum(),
                                                     "broken competitor": broken},
                    work=10000, unit="ints", repeat=2, log=lambda s: None)
    for r in rows:
        r.extra["append"] = append
        r.extra["quick"] = quick
    return rows
'''

RAISING_BENCH = '''
def run(quick=False, append=True):
    raise ValueError("this capability module is broken")
'''


@pytest.fixture
def fake_benches(tmp_path: Path, monkeypatch) -> Path:
    pkg = tmp_path / "fakebenches"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bench_ok.py").write_text(textwrap.dedent(FAKE_BENCH))
    (pkg / "bench_raises.py").write_text(textwrap.dedent(RAISING_BENCH))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    return tmp_path


def test_runner_reports_failures_and_keeps_going(fake_benches: Path, capsys) -> None:
    from bench.__main__ import main

    bm = ROOT / "BENCHMARKS.md"
    before = bm.read_text() if bm.exists() else None
    out_json = fake_benches / "rows.json"
    rc = main(["fakebenches.bench_raises", "fakebenches.nothing_here", "fakebenches.bench_ok", "--quick",
               "--no-append", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 1  # a module raised and one is missing: reported, not hidden
    # (strict JSON: a failed provider's NaN median was written as the bare token NaN)
    res = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    status = {m["name"]: m for m in res["modules"]}
    assert status["fakebenches.bench_raises"]["status"] == "failed"
    assert "this capability module is broken" in status["fakebenches.bench_raises"]["error"]
    assert status["fakebenches.nothing_here"]["status"] == "missing"
    ok = status["fakebenches.bench_ok"]
    assert ok["status"] == "ok" and len(ok["rows"]) == 3
    assert ok["failed_providers"] == ["sum of 10000 ints / broken competitor"]
    assert all(r["extra"] == {"append": False, "quick": True} for r in ok["rows"])
    rows = {r["provider"]: r for r in ok["rows"]}
    assert len(rows["builtin sum"]["times"]) == 2 and rows["builtin sum"]["ratio"] == pytest.approx(1.0)
    assert rows["numpy"]["ratio"] > 0 and "failed: RuntimeError" in rows["broken competitor"]["note"]
    assert rows["broken competitor"]["median"] is None and rows["broken competitor"]["rate"] is None
    # the combined table and the status table are printed
    assert "## fakecap" in out and "| sum of 10000 ints | builtin sum |" in out
    assert "failed: RuntimeError: competitor not installed here" in out
    assert "| fakebenches.nothing_here | fakebenches.nothing_here | missing |" in out
    assert "1/3 benchmark modules ran" in out
    if before is not None and bm.exists():
        assert "fakecap" not in bm.read_text()[len(before):]  # nothing of this run was appended


def test_runner_ok_exit_status_and_bad_names(fake_benches: Path, capsys) -> None:
    from bench.__main__ import CAPABILITIES, main, module_for

    assert main(["fakebenches.bench_ok", "--no-append"]) == 0
    assert "1/1 benchmark modules ran" in capsys.readouterr().out
    assert main(["no_such_capability"]) == 2
    assert "unknown benchmark 'no_such_capability'" in capsys.readouterr().err
    # --json naming a folder failed once the whole run had finished (IsADirectoryError, a traceback); and a
    # NaN inside a row's extra (a failed fit's slope) was written as the bare token NaN
    assert main(["fakebenches.bench_ok", "--no-append", "--json", str(fake_benches)]) == 2
    err = capsys.readouterr().err
    assert f"--json {fake_benches}: a folder; give the path of the JSON file to write" in err
    from bench.__main__ import _json_text

    assert json.loads(_json_text({"slope": float("nan"), "xs": [1.0, float("inf")]})) == {"slope": None,
                                                                                         "xs": [1.0, None]}
    assert module_for("all-pairs") == module_for("bench_all_pairs") == "bench.bench_all_pairs"
    assert module_for("training") == "bench.bench_train"
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"bench.bench_{c}" in listed for c in CAPABILITIES)


def test_machine_info_outside_a_git_checkout_says_unknown(tmp_path: Path, monkeypatch) -> None:
    """A copy of the tree without .git (what a lent GPU machine runs the suite from): git rev-parse fails
    and machine_info's commit was '' (the BENCHMARKS.md line read 'commit _'); it now says 'unknown'."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness

    monkeypatch.setattr(harness, "ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert harness.machine_info()["commit"] == "unknown"
    if (ROOT / ".git").exists():  # (a source checkout: its own commit)
        monkeypatch.setattr(harness, "ROOT", ROOT)
        assert harness.machine_info()["commit"] not in ("", "unknown")


# ------------------------------------------------------------------------------------------ result checks
def test_all_pairs_bench_refuses_to_time_a_wrong_result(monkeypatch) -> None:
    """bench_all_pairs reported a ratio against faiss whatever the engine returned (the agreement was a
    percentage in the note, computed after timing, for the default kernel only). A wrong neighbour must
    now stop the case before anything is timed."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_all_pairs as b

    ap = importlib.import_module("deepssim_fast.all_pairs")  # (the package's attribute is the function)

    real = ap.all_pairs

    def corrupted(change):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            res = real(*args, **kwargs)
            change(res)
            return res
        return call

    def wrong_neighbour(res):  # noqa: ANN001, ANN202
        res.indices = res.indices.copy()
        res.indices[3, 0] = (res.indices[3, 0] + 1) % 64  # a neighbour that does not have that score

    # (only the totals of the histogram and class counts were checked: every pair in bin 0 and every pair a
    # duplicate was timed, with "checked against faiss" in its note)
    def all_in_bin_0(res):  # noqa: ANN001, ANN202
        counts, edges = res.histogram
        moved = np.zeros_like(counts)
        moved[0] = counts.sum()
        res.histogram = (moved, edges)

    def all_duplicates(res):  # noqa: ANN001, ANN202
        res.class_counts = {"different": 0, "similar": 0, "duplicate": sum(res.class_counts.values())}

    for change, match in ((wrong_neighbour, "row 3 rank 0"),
                          (all_in_bin_0, "histogram differs from the float64 recount"),
                          (all_duplicates, "class counts .* vs the float64 recount")):
        monkeypatch.setattr(ap, "all_pairs", corrupted(change))
        with pytest.raises(AssertionError, match=match):
            b.cpu_case(64, d=16, k=4, repeat=1, log=lambda s: None)
    monkeypatch.setattr(ap, "all_pairs", real)
    rows = b.cpu_case(64, d=16, k=4, repeat=1, log=lambda s: None)
    ours = [r for r in rows if r.provider.startswith("deepssim_fast")]
    assert ours and all("checked against" in r.note and r.ratio is not None for r in ours)


def test_ssim_bench_refuses_to_time_a_wrong_result(monkeypatch) -> None:
    """bench_ssim timed our SSIM against scikit-image without ever comparing the values: a kernel that
    returned wrong scores still got its ratio. The case must now stop before timing."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_ssim as b

    mod = importlib.import_module("deepssim_fast.ssim")
    real = mod.ssim
    monkeypatch.setattr(mod, "ssim", lambda *a, **kw: np.asarray(real(*a, **kw)) + 1e-3)
    with pytest.raises(AssertionError, match="vs scikit-image"):
        b._cpu_2d(quick=True)
    with pytest.raises(AssertionError, match="3D vs scikit-image"):
        b._cpu_3d(quick=True)
    b.check_close("same", [0.5, 0.25], np.array([0.5, 0.25 + 1e-6]), 1e-5)
    with pytest.raises(AssertionError, match="nan"):
        b.check_close("nan", [0.5, float("nan")], [0.5, 0.5], 1e-5)


def test_audit_bench_refuses_to_time_a_wrong_verification(monkeypatch) -> None:
    """bench_audit timed verify_pairs against the scikit-image loop without comparing their values (and the
    whole audit against the reference-style loop without comparing the matches). A verification that is off
    by 1e-3 must now stop the case before anything is timed."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_audit as b

    mod = importlib.import_module("deepssim_fast.audit")
    real = mod.verify_pairs

    def off(*a, **kw):
        score, names = real(*a, **kw)
        return np.asarray(score) + 1e-3, names

    monkeypatch.setattr(mod, "verify_pairs", off)
    with pytest.raises(AssertionError, match="verify_pairs vs scikit-image"):
        b.run(quick=True, append=False)

    # the search over flips and shifts was timed unchecked (zeros got 1268x in a probe)
    def zeros_with_search(*a, **kw):
        score, names = real(*a, **kw)
        return (np.zeros_like(np.asarray(score)), names) if kw.get("flips") else (score, names)

    monkeypatch.setattr(mod, "verify_pairs", zeros_with_search)
    with pytest.raises(AssertionError, match=r"verify_pairs \(flips\+shifts\): pair 0 found 'vflip\+shift\(1,2\)' "
                                             r"at 0\.000000"):
        b.run(quick=True, append=False)


def test_distributed_bench_refuses_to_time_a_sharded_result_that_differs(monkeypatch) -> None:
    """bench_distributed timed the Dask providers against one process without comparing their results; the
    sharded run must now equal one process's bit for bit before anything is timed. (Its baseline row said
    "2 threads" whatever the machine: it now names the engine's thread count.)"""
    import logging

    import importlib

    from distributed import Client, LocalCluster

    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_distributed as b
    from deepssim_fast import distributed as dd

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as c:
        rows = b.scaling_case(c, c, n_train=300, n_synth=40, d=16, k=3, repeat=1, log=lambda s: None)
        one = next(r for r in rows if r.provider == b.ONE_PROCESS)
        assert "engine threads" in one.note
        assert all("checked" in r.note for r in rows if r.provider != b.ONE_PROCESS)
        real = dd.all_pairs_distributed

        def off(*a, **kw):
            res = real(*a, **kw)
            res.class_counts = dict(res.class_counts, duplicate=res.class_counts["duplicate"] + 1)
            return res

        # the overhead case's shard counts and its 256 plain engine calls are checked too (they were timed
        # unchecked), and so is the per-shard training pass
        orows, _ = b.overhead_case(c, n_train=300, n_synth=40, d=16, k=3, repeat=1, log=lambda s: None)
        assert orows and all("checked" in r.note for r in orows)
        assert all("failed" not in r.note for r in b.train_pass_case(500, 16, 3, repeat=1, log=lambda s: None))
        monkeypatch.setattr(dd, "all_pairs_distributed", off)
        with pytest.raises(AssertionError, match="differs from one process"):
            b.scaling_case(c, c, n_train=300, n_synth=40, d=16, k=3, repeat=1, log=lambda s: None)
        with pytest.raises(AssertionError, match="1 shards: result differs"):
            b.overhead_case(c, n_train=300, n_synth=40, d=16, k=3, repeat=1, log=lambda s: None)
        monkeypatch.setattr(dd, "all_pairs_distributed", real)
        ap = importlib.import_module("deepssim_fast.all_pairs")
        real_ap = ap.all_pairs

        def one_row_off(*a, **kw):
            res = real_ap(*a, **kw)
            if res.scores.shape[0] == 1:
                res.scores = res.scores + np.float32(1e-3)
            return res

        monkeypatch.setattr(ap, "all_pairs", one_row_off)
        with pytest.raises(AssertionError, match="shards: result differs|engine calls.*: result differs"):
            b.overhead_case(c, n_train=300, n_synth=40, d=16, k=3, repeat=1, log=lambda s: None)
        with pytest.raises(AssertionError, match="per-shard training pass"):
            b.train_pass_case(500, 16, 3, repeat=1, log=lambda s: None)


def test_gpu_suite_checks_the_outputs_of_its_timed_calls(gpu_suite_module, tmp_path: Path) -> None:
    """The suite's timings (10^5 x 10^5 all-pairs in bf16, 4096-pair SSIM batches) were never checked: only
    the small check shapes were, and bf16/fp16/tf32 not at all. Each timed output of ours is now checked:
    all-pairs against the float64 cosine of every pair at its precision's rounding bound, SSIM against the
    float64 reference at pairs spread over the batch and the torch backend at all of them."""
    import deepssim_fast as dsf

    gs = gpu_suite_module
    g = torch.Generator().manual_seed(11)
    train, synth = torch.randn(300, 24, generator=g), torch.randn(70, 24, generator=g)
    res = dsf.all_pairs(train.numpy(), synth.numpy(), k=5, progress=False)
    ok, err, tol, detail = gs.Suite._timed_all_pairs_check(res, train, synth, "ieee")
    assert ok and err < 1e-6 and tol == gs.SCORE_TOL, detail
    # the bf16 bound admits a bf16 result, not one off by more than its rounding
    # (tf32 inputs may be truncated, not rounded: twice fp16's bound)
    assert gs.precision_tol("bf16") > 7.8e-3 > gs.precision_tol("tf32") > 1.95e-3 > gs.precision_tol("fp16") > 9.7e-4
    faults = {
        "score": lambda r: r.scores.__setitem__((5, 0), r.scores[5, 0] + 2e-5),
        "not top-k": lambda r: r.indices.__setitem__((9, 4), int(np.argmin(train.numpy() @ synth[9].numpy()))),
        "histogram": lambda r: (r.histogram[0].__setitem__(150, r.histogram[0][150] + 3),
                                r.histogram[0].__setitem__(40, r.histogram[0][40] - 3)),
        "classes": lambda r: r.class_counts.update(similar=r.class_counts["similar"] + 1,
                                                   different=r.class_counts["different"] - 1),
        "hits": lambda r: r.train_hits.__setitem__(0, r.train_hits[0] + 1),
    }
    words = {"score": "off its pair's cosine", "not top-k": "not a top-k set", "histogram": "histogram bin",
             "classes": "off: different, similar", "hits": "train_hits"}
    for kind, fault in faults.items():
        bad = dsf.all_pairs(train.numpy(), synth.numpy(), k=5, progress=False)
        fault(bad)
        ok, _, _, detail = gs.Suite._timed_all_pairs_check(bad, train, synth, "ieee")
        assert not ok and words[kind] in detail, (kind, detail)
    # a count moved 80 bins away, between two pairs each within the tolerance of an edge, keeps every bin
    # within its own bounds (a review found it passed): the prefix bounds catch it
    ca, cb = -0.5 + 3e-6, 0.3 + 3e-6
    t2 = torch.tensor([[ca, (1 - ca * ca) ** 0.5], [cb, (1 - cb * cb) ** 0.5]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    r2 = dsf.all_pairs(t2.numpy(), s2.numpy(), k=2, progress=False)
    ok, _, _, detail = gs.Suite._timed_all_pairs_check(r2, t2, s2, "ieee")
    assert ok, detail
    assert r2.histogram[0][130] == 1 and r2.histogram[0][50] == 1
    r2.histogram[0][130], r2.histogram[0][49] = 0, 1
    ok, _, _, detail = gs.Suite._timed_all_pairs_check(r2, t2, s2, "ieee")
    assert not ok and "counts moved further than a tolerance" in detail, detail
    # self mode: self-pairs left out of the recount
    ok, _, _, detail = gs.Suite._timed_all_pairs_check(dsf.all_pairs(train.numpy(), None, k=3, progress=False),
                                                       train, None, "ieee")
    assert ok, detail

    # a provider whose timed output is wrong fails the suite, and its row says so
    suite = gs.Suite(torch.device("cpu"), gs.DRY_SIZES, seed=7, budget=gs.Budget(60.0), dry=True,
                     sections={"timings"}, checks_share=0.0)  # (timed-output checks ignore the checks' share)
    x = torch.rand(5, 12, 13, generator=g)
    y = (0.6 * x + 0.4 * torch.rand(5, 12, 13, generator=g)).contiguous()
    opts = dict(spatial_dims=2, data_range=1.0)
    check = suite._ssim_output_check(x, y, opts, pairs=[0, 2, 4])
    good = dsf.ssim(x, y, **opts)
    late = good.clone()
    late[3] += 1e-4  # off at a pair that is not one of the reference pairs: the torch-backend comparison
    suite._time_case("ssim2d", "5x12x13", {"right": lambda: good, "wrong": lambda: late, "other": lambda: late},
                     work=5, unit="pairs", flop=None, ceiling=None, baseline="right", est_s=0.0,
                     checks={"right": check, "wrong": check})
    rows = {t.provider: t for t in suite.timings}
    assert "output checked" in rows["right"].note and "FAILED" in rows["wrong"].note
    assert "checked" not in rows["other"].note  # (no checker: competitors are not ours to check)
    named = {c.name.rsplit(" ", 1)[-1]: c for c in suite.checks}
    assert named["right"].ok and not named["wrong"].ok and "torch backend" in named["wrong"].detail
    assert not named["wrong"].skipped


def test_gpu_suite_section_says_when_its_timings_support_no_claim(gpu_suite_module) -> None:
    """The BENCHMARKS.md section gave the timing table under "Checks: 5/7 passed" with nothing else: timings
    of kernels that failed their checks read like results. It now says so in bold and names the failures."""
    import types

    gs = gpu_suite_module
    env = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "x", "triton": "y"}

    def suite(checks):
        return types.SimpleNamespace(checks=checks, seed=1, ceilings={}, table_lines=lambda: ["| t |"])

    ok = gs.markdown_block(suite([gs.Check("ssim 2d", True)]), env)
    assert "Checks: 1/1 passed" in ok and "support no claim" not in ok
    bad = gs.markdown_block(suite([gs.Check("ssim 2d", True), gs.Check("all_pairs bf16", False)]), env)
    assert "Checks: 1/2 passed" in bad and "**1 check(s) failed" in bad and "support no claim" in bad
    assert "(failed: all_pairs bf16)" in bad
    assert "no checks ran" in gs.markdown_block(suite([]), env)


def test_benchmark_tables_are_appended_atomically(tmp_path: Path, monkeypatch) -> None:
    """BENCHMARKS.md was appended to in place: a run killed mid-write left half a section. The file is now
    rewritten beside itself and moved over, so it holds the old text or the old text plus the whole table."""
    monkeypatch.syspath_prepend(str(ROOT))
    import os

    from bench import harness

    md = tmp_path / "B.md"
    md.write_text("# title\n\nold\n")
    harness.append_text(md, "\n### new\n\n| a |\n")
    assert md.read_text() == "# title\n\nold\n\n### new\n\n| a |\n"

    def killed(src, dst):  # the move never happens: the process died while the new file was written
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        harness.append_text(md, "\n### half\n")
    assert md.read_text() == "# title\n\nold\n\n### new\n\n| a |\n"
    fresh = tmp_path / "none.md"
    monkeypatch.undo()
    harness.append_text(fresh, "x\n")
    assert fresh.read_text() == "# deepssim_fast benchmarks\nx\n"


def test_appends_from_two_processes_at_once_all_arrive_and_a_bar_in_a_note_stays_in_its_cell(tmp_path: Path,
                                                                                              monkeypatch) -> None:
    """Two runs appending at once each read the file, added their section and moved the result over it: 155 of
    300 sections survived a probe. A lock beside the file makes each read-and-replace one step now. And a
    check's message "(|diff| 0.264 > 0.0001)" in a note split its row into 8 cells."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness

    md = tmp_path / "B.md"
    md.write_text("# title\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from bench import harness\n"
            "for i in range(40): harness.append_text(Path(sys.argv[2]), f'\\n### {sys.argv[3]} {i}\\n')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(md), tag], env=_subprocess_env())
             for tag in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    text = md.read_text()
    assert all(f"### {tag} {i}\n" in text for tag in ("a", "b") for i in range(40))
    row = harness.Row(capability="x", case="c", provider="p", work=1, unit="pairs", note="refused (|diff| 0.26 > 1e-4)")
    line = harness.markdown_table([row]).splitlines()[-1]
    assert line.count(" | ") == 5 and "(\\|diff\\| 0.26" in line


def test_audit_files_bench_times_two_roots_and_refuses_differing_results(tmp_path: Path) -> None:
    """bench/audit_files.py on 20 + 20 files: both roots (here the same package twice) run cold and resumed
    audits and the table is printed; a root whose matches.csv differs gets no timings (exit 1)."""
    script = ROOT / "bench" / "audit_files.py"
    env = _subprocess_env()
    args = [sys.executable, str(script), "--files", "20", "--repeats", "1", "--data", str(tmp_path / "d"),
            "--root", str(ROOT), "--root", str(ROOT)]
    p = subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith(f"| {ROOT} |")]
    assert len(rows) == 2 and all(ln.count(" s (") == 3 for ln in rows), p.stdout
    assert "matches.csv identical" in p.stdout

    # a "root" whose audit labels differently: its results differ, so nothing is timed
    other = tmp_path / "other" / "deepssim_fast"
    shutil.copytree(ROOT / "deepssim_fast", other, ignore=shutil.ignore_patterns("__pycache__"))
    audit_py = other / "audit.py"
    src = audit_py.read_text()
    assert "def label_of(score" in src  # every pair labelled with other thresholds: all "similar"
    audit_py.write_text(src.replace("def label_of(score", "def _label_of_real(score", 1)
                        + "\n\ndef label_of(score, thresholds):\n    return _label_of_real(score, (-1.0, 2.0))\n")
    p = subprocess.run(args[:-2] + ["--root", str(other.parent)], capture_output=True, text=True, env=env,
                       check=False, timeout=600)
    assert p.returncode == 1 and "differs" in p.stderr and "| " not in p.stdout


def test_decode_nifti_bench_times_two_roots_and_refuses_differing_values(tmp_path: Path) -> None:
    """bench/decode_nifti.py on a small series: both roots (here the same package twice) are timed per case and
    the table printed; a root that reads other values gets no timings (exit 1)."""
    script = ROOT / "bench" / "decode_nifti.py"
    env = _subprocess_env()
    args = [sys.executable, str(script), "--repeats", "1", "--data", str(tmp_path / "d"), "--series-shape", "12",
            "10", "8", "3", "--root", str(ROOT), "--root", str(ROOT)]
    p = subprocess.run(args, capture_output=True, text=True, env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| ") and " s (" in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| MNI152 template .nii.gz, slices (axis 2)",
                                                 "| 4D .nii.gz 12x10x8x3 int16, 3 volumes", "| same file, 24 slices"]
    assert all(r.count(" s (") == 2 and r.rstrip().endswith("× |") for r in rows), p.stdout
    other = tmp_path / "other" / "deepssim_fast"  # a "root" whose reader scales every value
    shutil.copytree(ROOT / "deepssim_fast", other, ignore=shutil.ignore_patterns("__pycache__"))
    data_py = other / "data.py"
    src = data_py.read_text()
    assert "    arr = read(dtype)\n" in src
    data_py.write_text(src.replace("    arr = read(dtype)\n", "    arr = read(dtype) * 2\n", 1))
    p = subprocess.run(args[:-2] + ["--root", str(other.parent)], capture_output=True, text=True, env=env,
                       check=False, timeout=600)
    assert p.returncode == 1 and "read other values" in p.stderr and " s (" not in p.stdout


def test_a_missing_competitor_is_its_own_failed_row_not_the_whole_case(monkeypatch) -> None:
    """MONAI's metric was built before the SSIM cases' providers ran: without MONAI each case failed whole, our
    rows with it. And `python -m bench.bench_audit --help` ran the benchmark (the module read no arguments)."""
    import subprocess
    import sys

    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_ssim as b

    monkeypatch.setitem(sys.modules, "monai", None)  # (import monai: ImportError)
    monkeypatch.setitem(sys.modules, "monai.metrics", None)
    rows = {r.provider: r for r in b._cpu_3d(quick=True)}
    assert rows["deepssim_fast native"].times and rows["deepssim_fast native"].ratio > 0
    assert not rows["MONAI SSIMMetric (uniform 7)"].times
    assert "failed: ModuleNotFoundError" in rows["MONAI SSIMMetric (uniform 7)"].note
    out = subprocess.run([sys.executable, "-m", "bench.bench_audit", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage:") and "--no-append" in out.stdout


def test_all_pairs_bench_scale_n_0_skips_the_scale_case_only(monkeypatch) -> None:
    """--scale-n 0 ("skip the scale case") dropped the GPU case too, unsaid: it sat under scale_n > 0."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_all_pairs as b

    called = []
    for name in ("cpu_case", "scale_case", "gpu_case"):
        monkeypatch.setattr(b, name, lambda *a, name=name, **kw: called.append(name) or [])
    monkeypatch.setattr(b.torch.cuda, "is_available", lambda: True)
    b.run(append=False, scale_n=0)
    assert called == ["cpu_case", "gpu_case"]
    called.clear()
    said: list[str] = []
    b.run(quick=True, append=False, log=said.append)
    assert called == ["cpu_case"]
    assert any("scale case skipped (--quick)" in s for s in said) and any("GPU case skipped" in s for s in said)
    # --quick --scale-n N: the asked-for scale case runs (it was dropped without a word)
    called.clear()
    b.run(quick=True, append=False, scale_n=5000, log=said.append)
    assert called == ["cpu_case", "scale_case"]


def test_ssim_bench_checks_the_calls_it_times(monkeypatch) -> None:
    """The checks covered x[:4], x[:1] and a[:band] while the timed calls ran on every pair: an engine right for
    small batches and off by 0.05 above them got 38x, 7.7x and 1.8x in a probe. The checks are of the timed
    calls' outputs now; and a refused case fails the run (it exited 0, the runner saying "ok")."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_ssim as b

    mod = importlib.import_module("deepssim_fast.ssim")
    real, real_m = mod.ssim, mod.ssim_matrix

    def wrong_when_big(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = np.asarray(real(*a, **kw))
        return out + 0.05 if out.size > 4 else out

    monkeypatch.setattr(mod, "ssim", wrong_when_big)
    with pytest.raises(AssertionError, match="vs scikit-image"):
        b._cpu_2d(quick=True)
    def wrong_after_the_first(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = np.array(real(*a, **kw), dtype=np.float64)
        out.reshape(-1)[1:] += 0.05  # (right for one pair, as the old check's call)
        return out

    monkeypatch.setattr(mod, "ssim", wrong_after_the_first)
    with pytest.raises(AssertionError, match="3D vs scikit-image"):
        b._cpu_3d(quick=True)
    monkeypatch.setattr(mod, "ssim", real)

    def wrong_rows(A, B, **kw):  # noqa: ANN001, ANN003, ANN202
        m = np.array(real_m(A, B, **kw))
        m[len(m) // 2:] += 0.05  # (right in the first rows, as the old check's band)
        return m

    monkeypatch.setattr(mod, "ssim_matrix", wrong_rows)
    with pytest.raises(AssertionError, match="ssim_matrix"):
        b._matrix(quick=True)
    def _cpu_2d(quick):  # noqa: ANN001, ANN202
        raise AssertionError("refused")

    monkeypatch.setattr(b, "_cpu_2d", _cpu_2d)
    with pytest.raises(RuntimeError, match=r"1 SSIM case\(s\) failed or were refused: _cpu_2d"):
        b.run(quick=True, append=False, cases=["2d"])


def test_training_step_split_checks_its_targets_before_timing(monkeypatch) -> None:
    """The step-split case timed ssim_targets without checking them: targets of zeros got 2460x and the 5 %
    goal was reported met. They are checked against the float64 reference first now."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_train as b

    monkeypatch.setattr(b, "ssim_targets", lambda a, c: torch.zeros(a.shape[0]))
    with pytest.raises(AssertionError, match=r"ssim targets vs the float64 reference: max \|diff\|"):
        b.step_split(quick=True)


def test_slow_rates_keep_three_figures_and_cores_follow_the_affinity(monkeypatch) -> None:
    """A rate of 0.54 pairs/s was printed 0.5 (the ratio column could not be recomputed from the rates), and the
    machine line counted os.cpu_count() cores under taskset."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness

    row = harness.Row(capability="x", case="c", provider="p", work=1.0, unit="pairs", times=[1 / 0.54321])
    assert "| 0.543 pairs/s |" in harness.markdown_table([row])
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert harness.machine_info()["cores"] == "1"


def test_rates_keep_trailing_zeros_and_times_round_before_their_unit(monkeypatch) -> None:
    """Rates were formatted with .3g, which drops trailing zeros ("1 pairs/s", "18 pairs/s") against the promise of
    three significant figures; and 0.99996 s was printed "1000.0 ms" (the unit was chosen before rounding)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness

    fmt = harness._fmt_rate
    assert [fmt(v) for v in (1.0, 18.0, 0.54321, 0.5, 2.5e-5, 99.94, 99.96, 100.0, 1234.56)] == \
        ["1.00", "18.0", "0.543", "0.500", "2.50e-05", "99.9", "100", "100.0", "1,234.6"]
    assert not any(fmt(v).endswith(".") for v in (99.96, 999.6, 9.9996, 0.99996))
    t = harness._fmt_time
    assert [t(v) for v in (0.99996, 0.99994, 1.0, 0.00099996, 0.0009994, 0.5, 2.5e-5, float("nan"))] == \
        ["1.00 s", "999.9 ms", "1.00 s", "1.0 ms", "999 µs", "500.0 ms", "25 µs", "-"]
    row = harness.Row(capability="x", case="c", provider="p", work=18.0, unit="pairs", times=[1.0])
    assert "| 18.0 pairs/s |" in harness.markdown_table([row])
    row.work = 1.0
    assert "| 1.00 pairs/s |" in harness.markdown_table([row])


def test_the_header_tells_whether_the_native_build_matches_csrc(tmp_path: Path, monkeypatch) -> None:
    """The environment header named a commit but could not show that the C++ extension that ran was built from
    its sources. setup.py stamps a hash of csrc/*.cpp and csrc/*.h into the extension (_native.source_hash);
    the harness computes the same over the checkout's csrc and says whether they match."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness
    from deepssim_fast import _native

    assert isinstance(_native.source_hash, str) and len(_native.source_hash) == 64
    assert harness.native_source_hash() == _native.source_hash  # (this build: `make native` after each change)
    assert harness.native_build() == "matches csrc"
    assert harness.machine_info()["native"] == "matches csrc"
    # a changed source text (or a file added) changes the hash
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", copy)
    assert harness.native_source_hash(copy) == _native.source_hash
    mod = copy / "module.cpp"
    mod.write_text(mod.read_text() + "\n// changed\n")
    assert harness.native_source_hash(copy) != _native.source_hash
    mod.unlink()
    shutil.copy(ROOT / "csrc" / "module.cpp", mod)
    (copy / "extra.h").write_text("")
    assert harness.native_source_hash(copy) != _native.source_hash
    # a checkout whose csrc differs from the build is called stale in the header; a build without the stamp says so
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    assert harness.native_build() == "STALE (rebuild: make native)"
    md = tmp_path / "B.md"
    harness.append_markdown("t", [], path=md)
    assert "native build: STALE (rebuild: make native)" in md.read_text()
    monkeypatch.setattr(_native, "source_hash", "unknown", raising=False)
    assert harness.native_build().startswith("unknown")


def test_distributed_estimate_counts_broadcast_rounds_and_names_the_cores(monkeypatch) -> None:
    """A doubling broadcast to N workers needs ceil(log2 N) rounds; max(1, N).bit_length() charged one more
    (1 round for one worker, 5 for 16). And the estimate said "these 2 cores" and "Dask on 2 cores" on any machine."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_distributed as b
    from bench.harness import Row

    assert [b.broadcast_rounds(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [0, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError):
        b.broadcast_rounds(0)

    def row(provider, seconds, work=1e6):
        return Row(b.CAP, "c", provider, work, "pairs", times=[seconds])

    rows = [row(b.ONE_PROCESS, 1.0), row("dask 1 worker × 1 thread", 2.0), row("dask 2 workers × 1 thread", 1.2),
            row("all_pairs, 1 synthetic row", 0.01, work=1e5)]
    text = b.estimate(rows, 0.005, cores=8)
    assert "One process on these 8 cores" in text and "Dask on 8 cores" in text and "ceiling 2×" in text
    assert "2 cores" not in text
    assert "(ceiling 1×)" in b.estimate(rows, 0.005, cores=1)
    # N = 1: no broadcast round at all (0.1-0.5 s per round over the same fixed terms); N = 2: one
    t1 = [1e12 * b.H200_ALL_PAIRS_S[p] for p in ("bf16", "ieee")]
    shards = -(-10**6 // 16384)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("* N = ")]
    for g, rounds, line in zip((1, 2, 4, 8, 16), (0, 1, 2, 3, 4), lines, strict=True):
        lo, hi = (t / g + shards * 0.105 / g + 10 + per * rounds for t, per in zip(t1, (0.1, 0.5), strict=True))
        assert line == f"* N = {g}: ≈ {lo:.0f}–{hi:.0f} s", (g, line)
    monkeypatch.setattr(b, "usable_cores", lambda: 3)
    assert "these 3 cores" in b.estimate(rows, 0.005)
    # its GPU figures cited PERF-NOTES.md, a file outside the repository: they name their real sources now
    assert "PERF-NOTES" not in text and "PERF-NOTES" not in Path(b.__file__).read_text(encoding="utf-8")
    assert "nominal FP32 peak (67 TFLOP/s, spec sheet)" in text and "measured bf16 matmul rate, 769 TFLOP/s" in text


def test_ssim_gpu_roofline_uses_the_3d_flop_counts_and_says_the_peak_is_nominal(monkeypatch, gpu_suite_module) -> None:
    """The GPU rows' roofline fraction charged 3D cases the 2D FLOP counts (161 / 241 per pixel; 232 / 352 per
    voxel in gpu_suite's table) and divided by a hard-coded 67e12 called "FP32 roofline". One table now, and
    the peak is named for what it is: a spec sheet's nominal figure."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_ssim as b

    assert {(sd, w): b.ssim_flop(sd, w) for sd in (2, 3) for w in ("uniform", "gaussian")} == \
        {(2, "uniform"): 161.0, (2, "gaussian"): 241.0, (3, "uniform"): 232.0, (3, "gaussian"): 352.0}
    assert all(b.ssim_flop(*key) == v for key, v in gpu_suite_module.SSIM_FLOP.items())
    shape3 = (160, 192, 160)
    note = b.roofline_note(100.0, shape3, 3, "uniform", "NVIDIA H200")
    assert note == f"{100 * np.prod(shape3) * 232 / 67e12:.1%} of the nominal FP32 peak (H200 spec sheet, " \
                   "67 TFLOP/s; 232 FLOP/voxel)"
    assert "352 FLOP/voxel" in b.roofline_note(1.0, shape3, 3, "gaussian", "NVIDIA H100 80GB HBM3")
    assert "241 FLOP/px" in b.roofline_note(1.0, (256, 256), 2, "gaussian", "NVIDIA H200")
    assert "51 TFLOP/s" in b.roofline_note(1.0, (256, 256), 2, "uniform", "NVIDIA H100 PCIe")
    assert b.roofline_note(1.0, (256, 256), 2, "uniform", "NVIDIA GeForce RTX 4090") == ""


def test_ssim_bench_checks_training_targets_and_gaussian_matrix_independently(monkeypatch) -> None:
    """The training call's native result was checked against the torch backend only (they share the front end:
    a fault there passed), and the Gaussian-11 ssim_matrix against ssim pair by pair only (same). Each is
    checked against an independent reference now: the float64 reference, and scikit-image at a few entries."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_ssim as b

    mod = importlib.import_module("deepssim_fast.ssim")
    real, real_m = mod.ssim, mod.ssim_matrix

    def off_preset(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - both backends off alike (a shared front-end fault)
        r = real(*a, **kw)
        return r + 1e-3 if kw.get("preset") == "deepssim" else r

    monkeypatch.setattr(mod, "ssim", off_preset)
    with pytest.raises(AssertionError, match="native vs the float64 reference"):
        b._training_call(quick=True)

    def off_gaussian(f):  # noqa: ANN001, ANN202
        def call(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            r = np.array(f(*a, **kw), dtype=np.float32)
            return r + np.float32(0.01) if kw.get("window") == "gaussian" else r
        return call

    monkeypatch.setattr(mod, "ssim", off_gaussian(real))
    monkeypatch.setattr(mod, "ssim_matrix", off_gaussian(real_m))
    with pytest.raises(AssertionError, match=r"ssim_matrix \(Gaussian 11\) vs scikit-image"):
        b._matrix(quick=True)


def test_ssim_bench_gpu_case_follows_cases_cannot_lose_the_cpu_rows_and_simd_is_restored(monkeypatch) -> None:
    """The GPU cases ignored --cases and ran outside the try/except that keeps the CPU rows: a failing GPU check
    lost every CPU row. And --simd stayed set after run()."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_ssim as b
    from bench.harness import Row
    from deepssim_fast import _native

    called: list[str] = []

    def cpu(quick):  # noqa: ANN001, ANN202
        called.append("2d")
        return [Row(b.CAP, "2d", "deepssim_fast native", 1, "pairs", times=[1.0])]

    def _gpu(quick, **kw):  # noqa: ANN001, ANN003, ANN202
        called.append("gpu")
        raise AssertionError("deepssim_fast triton vs native: wrong")

    appended: list = []
    monkeypatch.setattr(b, "_cpu_2d", cpu)
    monkeypatch.setattr(b, "_gpu", _gpu)
    monkeypatch.setattr(b.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(b, "append_markdown", lambda title, rows, **kw: appended.append((list(rows), kw)))
    before = _native.simd_cap()
    try:
        assert [r.case for r in b.run(quick=True, append=True, cases=["2d"], simd="scalar")] == ["2d"]
        assert called == ["2d"] and _native.simd_cap() == before
        assert "native: scalar" in appended[-1][1]["comment"]  # (the level the run used, not the restored one)
        called.clear()
        with pytest.raises(RuntimeError, match="_gpu"):
            b.run(quick=True, append=True, cases=["2d", "gpu"], simd="scalar")
        assert called == ["2d", "gpu"] and _native.simd_cap() == before
        rows = appended[-1][0]
        assert [(r.case, r.provider) for r in rows] == [("2d", "deepssim_fast native"), ("_gpu", "failed")]
        assert "triton vs native" in rows[1].note
        monkeypatch.setattr(b.torch.cuda, "is_available", lambda: False)  # no CUDA: the GPU case is skipped
        called.clear()
        assert len(b.run(quick=True, append=False, cases=["2d", "gpu"])) == 1 and called == ["2d"]
    finally:
        _native.set_simd_level(before)


def test_audit_bench_whole_audit_case_is_warm_in_full_mode_and_labelled_cold_in_quick(monkeypatch) -> None:
    """The whole-audit case ran warmup=0 and repeat 1 (quick) or 2: its median mixed a cold and a warm run. Full
    mode warms up once and takes the median of 3; quick mode keeps one cold run and says so in the rows' note."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_audit as b

    full, quick = b.audit_case_timing(False), b.audit_case_timing(True)
    assert full["warmup"] == 1 and full["repeat"] >= 3 and "cold" not in full["note"]
    assert quick["warmup"] == 0 and quick["repeat"] == 1 and "cold single run" in quick["note"]
    seen: dict[str, dict] = {}
    real_run_case = b.run_case

    def spy(capability, case, providers, **kw):  # noqa: ANN001, ANN003, ANN202
        seen[case] = kw
        return real_run_case(capability, case, providers, **kw)

    monkeypatch.setattr(b, "run_case", spy)
    # (and the table's comment says who ran on how many threads: ours on every core, scikit-image's loops on one;
    # the reference-style loop's row says it loads each file once)
    comments: list[str] = []
    monkeypatch.setattr(b, "append_markdown", lambda title, rows, **kw: comments.append(kw["comment"]))
    rows = b.run(quick=True, append=True)
    case = next(c for c in seen if c.startswith("audit ssim"))
    assert (seen[case]["warmup"], seen[case]["repeat"]) == (0, 1)
    audit_rows = [r for r in rows if r.case == case]
    assert len(audit_rows) == 2 and all("cold single run" in r.note and len(r.times) == 1 for r in audit_rows)
    from deepssim_fast import _native

    assert f"Ours on {_native.num_threads()} native threads, the scikit-image loops on one" in comments[0]
    assert "each file loaded once" in next(r.note for r in audit_rows if r.provider == "reference-style loop")


def test_audit_bench_reference_loop_loads_each_file_once(tmp_path: Path, monkeypatch) -> None:
    """The reference-style loop reloaded both .npy files for every pair (np.load inside the pair loop: 10-15 %
    of that baseline's time), which a fair reference implementation would not do. Each file is loaded once now,
    and the CSV still holds every synthetic file's top k by scikit-image SSIM."""
    import csv
    from collections import Counter

    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_audit as b

    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "synth").mkdir()
    train = [rng.normal(size=(24, 24)).astype(np.float32) for _ in range(4)]
    for i, a in enumerate(train):
        np.save(tmp_path / "train" / f"t{i}.npy", a)
    for i in range(3):
        np.save(tmp_path / "synth" / f"s{i}.npy", train[i + 1] + rng.normal(0, 0.1, (24, 24)).astype(np.float32))
    loads: Counter = Counter()

    def counting_load(path):  # noqa: ANN001, ANN202
        loads[Path(path).name] += 1
        return np.load(path)

    b.reference_style_audit(tmp_path / "train", tmp_path / "synth", tmp_path / "ref.csv", k=2, load=counting_load)
    assert loads == Counter({f"{d}{i}.npy": 1 for d, n in (("t", 4), ("s", 3)) for i in range(n)})
    with open(tmp_path / "ref.csv", newline="") as f:
        out = list(csv.reader(f))
    assert [r[:3] for r in out if r[2] == "1"] == [["s0.npy", "t1.npy", "1"], ["s1.npy", "t2.npy", "1"],
                                                  ["s2.npy", "t3.npy", "1"]]
    assert len(out) == 6
    want = b._skimage_pair(train[1], np.load(tmp_path / "synth" / "s0.npy"))
    assert float(out[0][3]) == want


def test_all_pairs_bench_without_faiss_keeps_its_row_and_says_the_real_baseline(monkeypatch) -> None:
    """Without faiss its row vanished (the note was built and never passed on), every ratio was against our own
    engine, and the text still said "Ratios against faiss in the same run". The row stays, saying why it has no
    times, the ratios are against torch.mm + topk, and the text names that baseline."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_all_pairs as b

    monkeypatch.setitem(sys.modules, "faiss", None)  # (import faiss: ImportError)
    rows = b.cpu_case(64, d=16, k=4, repeat=1, log=lambda s: None)
    by = {r.provider: r for r in rows}
    faiss = by["faiss IndexFlatIP.search"]
    assert not faiss.times and faiss.ratio is None
    assert faiss.note == "not installed (pip install faiss-cpu, the bench extra)"
    assert {r.baseline for r in rows} == {"torch.mm + torch.topk (chunked)"}
    assert by["torch.mm + torch.topk (chunked)"].ratio == pytest.approx(1.0)
    assert by["deepssim_fast (native)"].ratio is not None and "checked against torch.mm + topk" in \
        by["deepssim_fast (native)"].note
    line = next(ln for ln in b.markdown_table(rows).splitlines() if "| faiss IndexFlatIP.search |" in ln)
    assert "not installed (pip install faiss-cpu, the bench extra)" in line
    appended: list[str] = []
    monkeypatch.setattr(b, "cpu_case", lambda *a, **kw: rows)
    monkeypatch.setattr(b, "append_markdown", lambda title, rows, comment="": appended.append(comment))
    b.run(quick=True, append=True, log=lambda s: None)
    assert "CPU ratios against torch.mm + torch.topk (chunked) in the same run" in appended[0]
    assert "faiss not installed" in appended[0] and "against faiss" not in appended[0]


def test_all_pairs_bench_plants_near_copies_so_every_class_is_checked(monkeypatch) -> None:
    """Random d=256 embeddings put every pair in "different": the class-count check never saw "similar" or
    "duplicate". A few hundred near-copies (cosine > 0.85 and in (0.6, 0.85)) are planted in each case's synthetic
    set now, and a case whose counts leave a class empty is refused."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import _planting as p
    from bench import bench_all_pairs as b

    assert [p.planted_count(n) for n in (16, 64, 4000, 200000)] == [2, 8, 300, 300]
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 256)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    synth = np.zeros((40, 256), np.float32)
    cos = p.plant(train, synth, 10)
    rows, cols, want = p.near_copy_plan(50, 40, 10, 7)
    np.testing.assert_allclose(np.sum(synth[rows].astype(np.float64) * train[cols], axis=1), want, atol=1e-6)
    assert np.array_equal(cos, want) and np.all(cos[:5] > 0.85) and np.all((cos[5:] > 0.6) & (cos[5:] < 0.85))

    res = b.cpu_case(64, d=256, k=4, repeat=1, log=lambda s: None)
    ours = [r for r in res if r.provider.startswith("deepssim_fast")]
    assert ours and all(min(r.extra["class_counts"].values()) > 0 for r in ours)
    assert all(" similar, " in r.note and " duplicate;" in r.note for r in ours)
    scale = b.scale_case(n=800, d=256, k=3, log=lambda s: None)[0]
    assert min(scale.extra["class_counts"].values()) > 0
    monkeypatch.setattr(b, "plant", lambda *a, **kw: None)  # random embeddings alone: the class check refuses
    with pytest.raises(AssertionError, match="empty, so the check of the counts does not exercise it"):
        b.cpu_case(64, d=256, k=4, repeat=1, log=lambda s: None)


def test_all_pairs_bench_names_the_kernel_the_default_ran_and_times_the_others(monkeypatch) -> None:
    """The default row's note named the int16 kernel the CPU has, whichever kernel the automatic choice ran (on
    Zen 1 it takes fp32: "int16-avx2 kernel" and its GEMM floor were printed beside an fp32 run, and the fp32
    row timed the default twice). It now names the kernel its calls returned, and the forced rows are the
    kernels the default did not run."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_all_pairs as b

    from deepssim_fast import _native

    int16 = _native.topk_int16_kernel()
    if int16 is None:
        pytest.skip("this CPU has no int16 all-pairs kernel")
    forced = {"int16-avx2": "deepssim_fast (native, AVX2 int16 kernel)", "fp32": "deepssim_fast (native, fp32 kernel)"}
    try:
        for speedup in (1.0, 1.61):  # the int16 AVX2 kernel as fast as fp32 (Zen 1), and 1.61x (Zen 4)
            _native.set_topk_int16_speedup(speedup)
            rows = b.cpu_case(64, d=256, k=4, repeat=1, log=lambda s: None)
            by = {r.provider: r for r in rows}
            ran = "int16-vnni" if int16 == "int16-vnni" else "fp32" if speedup == 1.0 else "int16-avx2"
            note = by["deepssim_fast (native)"].note
            assert (f"(fp32-equivalent; {ran} kernel)" if "int16" in ran else f"({ran} kernel)") in note, note
            assert [p for p in forced.values() if p in by] == [p for k, p in forced.items() if k != ran]
    finally:
        _native.set_topk_int16_speedup(0)


def test_embed_rows_check_the_output_they_time(monkeypatch) -> None:
    """The `embed <backbone>` rows were timed with no look at the output. The last timed call's embeddings are
    checked now: finite, (images, emb_dim), unit rows, and equal at a few rows to an embed of those images alone."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import bench_train as b

    real = b.embed
    tiny = [("small", 64, 6)]
    rows = b.embed_throughput(quick=True, cases=tiny)
    assert [r.provider for r in rows if r.case.endswith("(cpu)")] == ["small cpu"]
    assert all("output checked" in r.note and r.times for r in rows)

    def wrong_in_big_batches(images, model, **kw):  # noqa: ANN001, ANN003, ANN202
        e = np.array(real(images, model, **kw))
        if len(e) > 3:
            e[3:] = np.roll(e[3:], 1, axis=1)  # still unit rows, but not these images' embeddings
        return e

    def not_normalised(images, model, **kw):  # noqa: ANN001, ANN003, ANN202
        return np.array(real(images, model, **kw)) * 2

    for fake, words in ((wrong_in_big_batches, "differs from the same image embedded alone"),
                        (not_normalised, "expected unit rows"),
                        (lambda images, model, **kw: np.array(real(images, model, **kw))[:, :-1], "expected float32"),
                        (lambda images, model, **kw: np.array(real(images, model, **kw)) * np.nan, "non-finite")):
        monkeypatch.setattr(b, "embed", fake)
        with pytest.raises(AssertionError, match=words):
            b.embed_throughput(quick=True, cases=tiny)


def test_ssim_bench_times_ours_on_one_thread_too_and_restores_the_thread_counts(monkeypatch) -> None:
    """Our native SSIM (every core, 2 here) was compared with scikit-image's loop (one thread) and nothing in a
    run's table said so, nor gave the equal-cores ratio. Each CPU case now has a "1 thread" row of our engine,
    with its own ratio, run with the native and torch thread counts at 1 and the caller's counts restored after
    (an override set before the run included); the rows' notes and the run's comment say who ran on what."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_ssim as b
    from bench.harness import Row
    from deepssim_fast import _native

    monkeypatch.setitem(sys.modules, "monai", None)  # (the competitors fail fast: their rows are not this test's)
    monkeypatch.setitem(sys.modules, "monai.metrics", None)
    monkeypatch.setitem(sys.modules, "pytorch_msssim", None)
    mod = importlib.import_module("deepssim_fast.ssim")
    real = mod.ssim
    seen: list[tuple[int, int]] = []

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append((_native.num_threads(), torch.get_num_threads()))
        return real(*a, **kw)

    monkeypatch.setattr(mod, "ssim", spy)
    saved_native, saved_torch = _native.num_threads_override(), torch.get_num_threads()
    try:
        _native.set_num_threads(3)
        torch.set_num_threads(2)
        rows = {r.provider: r for r in b._cpu_3d(quick=True)}
        assert _native.num_threads_override() == 3 and torch.get_num_threads() == 2
        one = rows[b.ONE_THREAD]
        assert one.times and one.ratio > 0 and one.baseline == "scikit-image" and one.work == 4
        assert "equal-cores ratio" in one.note
        assert "3 native threads" in rows["deepssim_fast native"].note and "one thread" in rows["scikit-image"].note
        assert (1, 1) in seen and (3, 2) in seen and set(seen) == {(1, 1), (3, 2)}
        with pytest.raises(ValueError), b.threads(1):  # (restored when the call fails too)
            raise ValueError
        assert _native.num_threads_override() == 3 and torch.get_num_threads() == 2
    finally:
        _native.set_num_threads(saved_native)
        torch.set_num_threads(saved_torch)
    appended: list[str] = []
    monkeypatch.setattr(b, "_cpu_2d", lambda quick: [Row(b.CAP, "2d", b.ONE_THREAD, 1, "pairs", times=[1.0])])
    monkeypatch.setattr(b, "append_markdown", lambda title, rows, **kw: appended.append(kw["comment"]))
    b.run(quick=True, cases=["2d"])
    assert "scikit-image runs on one thread" in appended[0] and b.ONE_THREAD in appended[0]


def test_ssim_bench_checks_the_torch_provider_across_its_own_batch(monkeypatch) -> None:
    """The torch provider was checked at the native check's indices that fell inside its batch (idx < n_t): one
    pair of 16, the first. A torch backend wrong at its batch's last pair got its ratio; it is refused now."""
    monkeypatch.syspath_prepend(str(ROOT))
    import importlib

    from bench import bench_ssim as b

    assert list(b.spread(16, 4)) == [0, 5, 10, 15] and list(b.spread(3, 24)) == [0, 1, 2]
    mod = importlib.import_module("deepssim_fast.ssim")
    real = mod.ssim

    def torch_wrong_at_the_end(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = np.array(real(*a, **kw), dtype=np.float64)
        if kw.get("backend") == "torch":
            out[-1] += 0.05
        return out

    monkeypatch.setattr(mod, "ssim", torch_wrong_at_the_end)
    with pytest.raises(AssertionError, match="deepssim_fast torch vs scikit-image"):
        b._cpu_2d(quick=True)


def test_ssim_bench_refuses_a_misconfigured_competitor(monkeypatch) -> None:
    """Only our providers were checked: a competitor set up with another window, data range or covariance
    would have been timed and given a ratio. Each competitor's timed call is checked now against scikit-image
    with its settings (one data range per batch, population covariance); a missing one stays its own row."""
    monkeypatch.syspath_prepend(str(ROOT))
    import pytorch_msssim

    from bench import bench_ssim as b

    real_monai = b._monai

    def gaussian_window(x, y, dr, spatial_dims):  # noqa: ANN001, ANN202 - pytorch-msssim's default window
        return pytorch_msssim.ssim(x, y, data_range=dr, size_average=False)

    monkeypatch.setattr(b, "_msssim_uniform", gaussian_window)
    with pytest.raises(AssertionError, match=r"pytorch-msssim \(win=uniform 7\) vs scikit-image"):
        b._cpu_2d(quick=True)
    with pytest.raises(AssertionError, match=r"pytorch-msssim \(win=uniform 7\) 3D vs scikit-image"):
        b._cpu_3d(quick=True)
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(b, "_monai", lambda sd, dr, kernel="uniform": real_monai(sd, 2 * dr, kernel))
    with pytest.raises(AssertionError, match=r"MONAI SSIMMetric \(uniform 7\) 3D vs scikit-image"):
        b._cpu_3d(quick=True)
    with pytest.raises(AssertionError, match=r"MONAI SSIMMetric \(uniform 7\) vs scikit-image"):
        b._cpu_2d(quick=True)
    # the checker itself: a wrong count of scores is refused; a competitor that cannot run is left to its row
    with pytest.raises(AssertionError, match="3 scores for 4 pairs"):
        b.check_competitor("c", lambda: torch.zeros(3), 4, np.array([0]), [0.0])
    b.check_competitor("c", lambda: (_ for _ in ()).throw(ImportError("no")), 4, np.array([0]), [0.0])
    b.check_competitor("c", lambda: torch.full((4, 1), 0.5), 4, np.array([0, 3]), [0.5, 0.5 + 1e-6])
