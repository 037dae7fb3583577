"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) checks what a kernel computes but not that it compiles: the
compiler rejects things the interpreter accepts (block shapes, dtypes of ``tl.dot`` operands, layouts),
and register spills or shared-memory overflows only show up in the compiled kernel. Triton's compiler and
its bundled ``ptxas`` run on any x86-64 machine, so this module compiles a kernel down to a cubin for a
chosen architecture (sm_90 = H100/H200, sm_80 = A100) and reads its resources back from the cubin.

The launch being compiled is the one the real launcher makes: :func:`record_launches` swaps the kernel in
its module for a recorder, the launcher is called as usual (CPU tensors under ``TRITON_INTERPRET=1`` are
fine, nothing runs), and each recorded launch is turned into a signature from its arguments' types
(tensors -> pointer to their dtype; Python ints -> i32, or i64 when they do not fit; floats -> fp32;
bools -> i1; ``tl.constexpr`` parameters -> their values; ``num_warps``/``num_stages`` -> options). Integer
arguments are not specialised (no divisibility hints), so the cubin is the generic variant of the kernel;
``specialize_ones=True`` passes the integer arguments equal to 1 as constexprs, as Triton's launcher does
(a kernel must compile for that variant too: bins=1, k=1, a single row or tile, a 2D plane count of 1).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_POINTER_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass
class Launch:
    """One kernel launch as the launcher made it: the kernel, its grid, arguments and options."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def record_launches(module: Any, name: str) -> Iterator[list[Launch]]:
    """Replace ``module.name`` (a Triton kernel) by a recorder for the duration; yields the launches.

    Nothing is executed: output buffers of the launcher keep whatever they were created with. Launchers
    refuse CPU tensors unless ``TRITON_INTERPRET`` is set, so it is set while recording (the kernels were
    compiled-mode functions when imported; Triton decides that at import, not at call time).
    """
    real = getattr(module, name)
    launches: list[Launch] = []

    class _Recorder:
        def __getitem__(self, grid: Any):
            def launch(*args: Any, **kwargs: Any) -> None:
                launches.append(Launch(real, grid, args, dict(kwargs)))

            return launch

    setattr(module, name, _Recorder())
    try:
        with env_set("TRITON_INTERPRET", "1"):
            yield launches
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the code inside, then restore it (or its absence)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _jit_function(kernel: Any) -> JITFunction:
    """The compilable JITFunction of a kernel (a fresh one when the interpreter wrapped it)."""
    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"not a Triton kernel: {kernel!r}")
    return JITFunction(fn)


def _arg_type(name: str, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        try:
            return "*" + _POINTER_TYPES[value.dtype]
        except KeyError:
            raise TypeError(f"argument {name!r}: tensors of dtype {value.dtype} have no Triton pointer type") from None
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name!r}: cannot type {type(value).__name__} for ahead-of-time compilation")


def signature(launch: Launch, specialize_ones: bool = False
              ) -> tuple[JITFunction, dict[str, str], dict[str, Any], dict[str, Any]]:
    """(kernel, signature, constexprs, options) of a recorded launch, as ``triton.compile`` takes them.

    ``specialize_ones``: integer (not bool) arguments equal to 1 become constexprs of value 1, the variant
    Triton's launcher compiles for them (``do_not_specialize`` parameters excepted).
    """
    jit = _jit_function(launch.kernel)
    names = [p.name for p in jit.params]
    constexpr = {p.name for p in jit.params if p.is_constexpr}
    no_spec = {p.name for p in jit.params if getattr(p, "do_not_specialize", False)}
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(jit.fn).bind(*launch.args, **kwargs)
    bound.apply_defaults()
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for name in names:
        value = bound.arguments[name]
        if name in constexpr:
            sig[name] = "constexpr"
            consts[name] = value
        elif (specialize_ones and isinstance(value, int) and not isinstance(value, bool) and value == 1
              and name not in no_spec):
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = _arg_type(name, value)
    return jit, sig, consts, options


def compile_launch(launch: Launch, arch: int = 90, *, specialize_ones: bool = False) -> Any:
    """Compile a recorded launch for ``sm_<arch>`` (90: H100/H200, 80: A100); returns Triton's kernel.

    ``result.asm`` holds every stage (``ttir``, ``ttgir``, ``llir``, ``ptx``, ``cubin``);
    ``specialize_ones``: see :func:`signature`.
    """
    jit, sig, consts, options = signature(launch, specialize_ones)
    src = ASTSource(fn=jit, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with this Triton install ({path})")
    return path


def resources(compiled: Any) -> dict[str, Any]:
    """Registers per thread, local memory (spills) and shared memory per block, and the SASS mix.

    Read from the cubin with the ``cuobjdump`` bundled with Triton: ``{"registers", "local_bytes",
    "shared_bytes", "num_warps", "sass": Counter(opcode -> count)}``.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", usage))
    ops = Counter(m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", sass))
    return {
        "registers": int(fields.get("REG", -1)),
        "local_bytes": int(fields.get("LOCAL", -1)),
        "shared_bytes": int(fields.get("SHARED", -1)),
        "num_warps": int(compiled.metadata.num_warps),
        "sass": ops,
    }


def _ssim_on_gpu(ks: Any, launch: Launch) -> Launch:
    """An SSIM launch recorded on CPU tensors with the warps its launcher picks on a GPU."""
    kw = launch.kwargs
    variant = "separable" if kw["SEPARABLE"] else "direct"
    launch.kwargs["num_warps"] = ks.default_num_warps(variant, kw["K"], kw["KZ"])
    return launch


def _as_bf16(args: tuple) -> tuple:
    """A recorded fp16 launch's arguments as the bf16 launch passes them (operands stored in bf16)."""
    return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.dtype == torch.float16 else a for a in args)


def representative_launches() -> dict[str, Launch]:
    """The launches each Triton path makes on a GPU, recorded from the real launchers with CUDA defaults.

    Keys name the case: SSIM in 2D and 3D, both windows, the three kernel input dtypes and both kernel
    variants; ssim_matrix's moment maps and cross terms; cosine top-k in each precision, with self-pairs
    excluded, with more bins than a tile histogram takes, and with rows wide enough for the compensated sum.
    Shapes are small (they only set integer arguments).
    """
    from deepssim_fast import _ssim_common as sc

    from . import cosine_topk as kc
    from . import ssim as ks

    out: dict[str, Launch] = {}
    ssim_cases = [(2, "uniform", torch.float32, "separable"), (2, "gaussian", torch.float16, "separable"),
                  (3, "uniform", torch.bfloat16, "separable"), (3, "gaussian", torch.float32, "separable"),
                  (2, "uniform", torch.float32, "direct"), (3, "gaussian", torch.bfloat16, "direct")]
    for sd, window, dtype, variant in ssim_cases:
        gauss = window == "gaussian"
        p = sc.resolve_params(ndim=sd + 1, spatial_dims=sd, window=window, win_size=11 if gauss else 7,
                              sigma=1.5, data_range=None, k1=0.01, k2=0.03, sample_covariance=not gauss,
                              preset=None)
        shape = (2,) + ((16, 20, 24) if sd == 3 else (40, 48))
        x = torch.rand(shape).to(dtype)
        idx = torch.arange(2)
        with record_launches(ks, "_ssim_kernel") as rec:
            ks.ssim_pairs(x, x, idx, idx, p, variant=variant)
        out[f"ssim {sd}d {window} {str(dtype).replace('torch.', '')} {variant}"] = _ssim_on_gpu(ks, rec[0])
    # ssim_matrix with moment reuse: the per-image maps (mode 1) and the cross terms (mode 2)
    p = sc.resolve_params(ndim=3, spatial_dims=2, window="uniform", win_size=7, sigma=1.5, data_range=None,
                          k1=0.01, k2=0.03, sample_covariance=True, preset=None)
    x = torch.rand(2, 40, 48)
    with record_launches(ks, "_ssim_kernel") as rec:
        ks.ssim_matrix_block(x, x, p)
    out["ssim_matrix 2d uniform float32 moments"] = _ssim_on_gpu(ks, rec[0])
    out["ssim_matrix 2d uniform float32 cross"] = _ssim_on_gpu(ks, rec[-1])
    q = torch.nn.functional.normalize(torch.randn(70, 64), dim=1)
    blocks = kc.default_blocks(torch.device("cuda"), 10)
    for precision, self_pairs, bins in [("ieee", False, 200), ("tf32x3", False, 200), ("tf32", False, 200),
                                        ("fp16", False, 200),
                                        ("bf16", False, 200), ("ieee", True, 200), ("bf16", False, 4096)]:
        # the launcher refuses bf16 on CPU tensors (the interpreter mis-executes it); the launch is the
        # fp16 one with the precision switched, which is what a CUDA call passes
        with record_launches(kc, "_cosine_topk_kernel") as rec:
            kc.cosine_topk(q, q, k=10, bins=bins, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85),
                           precision="fp16" if precision == "bf16" else precision,
                           self_offset=0 if self_pairs else None, blocks=blocks)
        rec[0].kwargs["PRECISION"] = precision
        rec[0].args = _as_bf16(rec[0].args) if precision == "bf16" else rec[0].args
        out[f"cosine_topk {precision}" + (" self-pairs" if self_pairs else "")
            + (f" {bins} bins" if bins != 200 else "")] = rec[0]
    # rows wider than COMPENSATED_MIN_D: the compensated (Kahan) sum over the K blocks
    wide = torch.nn.functional.normalize(torch.randn(70, kc.COMPENSATED_MIN_D + 8), dim=1)
    for precision in ("ieee", "bf16"):
        with record_launches(kc, "_cosine_topk_kernel") as rec:
            kc.cosine_topk(wide, wide, k=10, bins=200, hist_range=(-1.0, 1.0), thresholds=(0.6, 0.85),
                           precision="fp16" if precision == "bf16" else precision, blocks=blocks)
        rec[0].kwargs["PRECISION"] = precision
        rec[0].args = _as_bf16(rec[0].args) if precision == "bf16" else rec[0].args
        out[f"cosine_topk {precision} wide rows"] = rec[0]
    # both tile-histogram modes, whichever this Triton release would pick
    for mode in (1, 2):
        launch = out["cosine_topk bf16"]
        out[f"cosine_topk bf16 hist_mode {mode}"] = Launch(launch.kernel, launch.grid, launch.args,
                                                           dict(launch.kwargs, HIST_MODE=mode))
    return out
