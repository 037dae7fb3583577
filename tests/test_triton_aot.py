"""Every Triton kernel compiles for NVIDIA GPUs (sm_90: H100/H200, sm_80: A100, sm_100: B200) — without a GPU.

The interpreted tests check what the kernels compute; these check what the interpreter cannot: that the
launches the real launchers make (``kernels.aot.representative_launches``) compile through Triton and its
bundled ``ptxas`` to a cubin, without register spills, within the shared memory of the architecture, and
that the tensor-core precisions of the top-k kernel do reach the tensor cores (HGMMA on sm_90, HMMA on
sm_80; sm_100 is compiled and checked for spills and shared memory only) while ``"ieee"`` stays on fp32
FMAs. Compilation runs in a fresh process without ``TRITON_INTERPRET`` (the interpreter replaces the
compiler's builder) and with its own cache directory.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import _prestart
import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np
    from kernels import aot
    res = {}
    for name, launch in aot.representative_launches().items():
        for arch in (90, 80, 100):
            try:
                compiled = aot.compile_launch(launch, arch)
                r = aot.resources(compiled)
                _, sig, _, _ = aot.signature(launch)
                floats = [v for k, v in zip(sig, launch.args) if sig[k] == "fp32" and isinstance(v, float)]
                res[f"{name} sm_{arch}"] = dict(
                    ok=True, fp32_args_exact=all(float(np.float32(v)) == v for v in floats),
                    cubin_elf=compiled.asm["cubin"][:4] == b"\x7fELF", registers=r["registers"],
                    local_bytes=r["local_bytes"], shared=int(compiled.metadata.shared),
                    sass={k: v for k, v in r["sass"].items()})
            except Exception as exc:  # reported per case, asserted below
                res[f"{name} sm_{arch}"] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[-2000:])
    print("RESULT " + json.dumps(res))
""")

# Shared memory per block available on each architecture (bytes).
_SMEM = {"sm_90": 227 * 1024, "sm_80": 163 * 1024, "sm_100": 227 * 1024}


def _bundled_tools_present() -> bool:
    import triton.backends.nvidia as nv

    bin_dir = os.path.join(os.path.dirname(nv.__file__), "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


def _compile_job(tmp):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton_cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-c", _SCRIPT], dict(env=env, cwd=root), {}


if _bundled_tools_present():  # (the compile runs beside the suite from its start: _prestart)
    _prestart.register("triton_aot", wanted_by=_prestart.uses(__name__, fixture="compiled"),
                       make=_compile_job, timeout=900)


@pytest.fixture(scope="module")
def compiled():
    if not _bundled_tools_present():
        pytest.skip("this Triton install has no bundled ptxas/cuobjdump (not an x86-64 Linux wheel)")
    proc, _ = _prestart.result("triton_aot")
    assert proc.returncode == 0, f"AOT compilation script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_kernel_launch_compiles_to_a_cubin_without_spills(compiled):
    assert len(compiled) == 3 * 19, sorted(compiled)
    failed = {k: v["error"] for k, v in compiled.items() if not v["ok"]}
    assert not failed, failed
    for case, r in compiled.items():
        arch = case.rsplit(" ", 1)[1]
        assert r["cubin_elf"], case
        assert 0 < r["registers"] <= 255, (case, r["registers"])
        assert r["local_bytes"] == 0, f"{case}: {r['local_bytes']} bytes of local memory (register spills)"
        assert r["shared"] <= _SMEM[arch], (case, r["shared"])


def test_topk_precisions_reach_the_tensor_cores_and_ieee_does_not(compiled):
    for precision in ("tf32x3", "tf32", "fp16", "bf16", "ieee"):
        sm90 = compiled[f"cosine_topk {precision} sm_90"]["sass"]
        sm80 = compiled[f"cosine_topk {precision} sm_80"]["sass"]
        if precision == "ieee":
            assert "HGMMA" not in sm90 and "HMMA" not in sm80, precision
            assert sm90.get("FFMA", 0) > 0 and sm80.get("FFMA", 0) > 0, precision
        else:
            assert sm90.get("HGMMA", 0) > 0, (precision, "no warpgroup MMA on sm_90")
            assert sm80.get("HMMA", 0) > 0, (precision, "no MMA on sm_80")
    # tf32x3 is three tf32 products per tile (hi*hi + hi*lo + lo*hi): a silent downgrade to one product gives
    # the same scores under the interpreter, so only the instruction counts can tell (measured: sm_80 HMMA
    # 96 against 32, sm_90 HGMMA 20 against 4)
    x3 = {a: compiled[f"cosine_topk tf32x3 {a}"]["sass"] for a in ("sm_80", "sm_90")}
    x1 = {a: compiled[f"cosine_topk tf32 {a}"]["sass"] for a in ("sm_80", "sm_90")}
    assert x3["sm_80"]["HMMA"] >= 3 * x1["sm_80"]["HMMA"], (x3["sm_80"], x1["sm_80"])
    assert x3["sm_90"]["HGMMA"] >= 3 * x1["sm_90"]["HGMMA"], (x3["sm_90"], x1["sm_90"])


def test_ssim_kernel_is_fp32_arithmetic_without_tensor_cores(compiled):
    # SSIM is exact-to-1e-5 work: fp32 FMAs on every architecture, never a reduced-precision MMA. (sm_100's
    # ptxas may pair them all into FFMA2, two fp32 FMAs in one instruction: the direct kernel's are.)
    for case, r in compiled.items():
        if case.startswith("ssim"):  # ssim and ssim_matrix
            assert r["sass"].get("FFMA", 0) + r["sass"].get("FFMA2", 0) > 0, case
            assert not any("MMA" in op for op in r["sass"]), case


def test_topk_float_arguments_survive_fp32_rounding(compiled):
    # A Python float argument reaches a compiled kernel as fp32: thresholds must already be fp32 values
    # (the largest float32 <= each threshold), or scores equal to float32(threshold) change class.
    for case, r in compiled.items():
        if case.startswith("cosine_topk"):
            assert r["fp32_args_exact"], case


_ONES_SCRIPT = textwrap.dedent(r"""
    import json
    import torch
    from kernels import aot
    from kernels import cosine_topk as kc

    res = {}
    q = torch.nn.functional.normalize(torch.randn(1, 64), dim=1)
    t = torch.nn.functional.normalize(torch.randn(70, 64), dim=1)
    blocks = kc.default_blocks(torch.device("cuda"), 1)
    for bins in (1, 200, 4096):
        with aot.record_launches(kc, "_cosine_topk_kernel") as rec:
            kc.cosine_topk(q, t, k=1, bins=bins, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85), blocks=blocks)
        _, sig, consts, _ = aot.signature(rec[0], specialize_ones=True)
        try:
            aot.compile_launch(rec[0], 90, specialize_ones=True)
            res[str(bins)] = dict(ok=True, ones=sorted(n for n in sig if sig[n] == "constexpr" and consts[n] == 1))
        except Exception as exc:
            res[str(bins)] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[-1500:])
    print("RESULT " + json.dumps(res))
""")


def _ones_job(tmp):
    argv, kwargs, ctx = _compile_job(tmp)
    return [sys.executable, "-c", _ONES_SCRIPT], kwargs, ctx


if _bundled_tools_present():
    _prestart.register("triton_aot_ones", make=_ones_job, timeout=600, wanted_by=_prestart.uses(
        __name__, test="test_topk_kernel_compiles_with_arguments_equal_to_one_specialised"))


def test_topk_kernel_compiles_with_arguments_equal_to_one_specialised():
    # Triton's launcher passes an integer argument equal to 1 as a constexpr (a Python int, not a tensor):
    # bins=1 (the kernel called nbins.to(...)) failed to compile on the GPU, while the interpreter and the
    # unspecialised AOT compile above ran it. k=1 and a single synthetic row specialise other arguments too.
    if not _bundled_tools_present():
        pytest.skip("this Triton install has no bundled ptxas/cuobjdump (not an x86-64 Linux wheel)")
    proc, _ = _prestart.result("triton_aot_ones")
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    failed = {b: r["error"] for b, r in res.items() if not r["ok"]}
    assert not failed, failed
    assert "nbins" in res["1"]["ones"] and "stride_cs_t" in res["1"]["ones"], res["1"]


def test_every_launch_asks_for_fused_multiply_adds() -> None:
    """The kernels were checked with fused multiply-adds, Triton 3.9's default, which 3.9 warns will turn off
    in 3.10: every launch asks for them (enable_fp_fusion), and the ahead-of-time compile takes the option
    as an option, not as a kernel argument."""
    from kernels import aot

    launches = aot.representative_launches()
    assert launches
    for name, launch in launches.items():
        assert launch.kwargs.get("enable_fp_fusion") is True, name
        _jit, _sig, consts, options = aot.signature(launch)
        assert options.get("enable_fp_fusion") is True and "enable_fp_fusion" not in consts, name
