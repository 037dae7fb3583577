"""Build deepssim_fast and its native extension ``deepssim_fast._native``.

The extension is plain C++17 over buffers (pybind11 + numpy buffer protocol); it never links libtorch.
It is compiled for a portable x86-64 baseline: AVX2/FMA code paths are selected at run time
(function-level ``target`` attributes), so one wheel runs on every x86-64 CPU.
"""
import glob
import hashlib
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_source_hash(csrc: str = os.path.join(HERE, "csrc")) -> str:
    """sha256 (hex) over csrc/*.cpp and csrc/*.h, sorted by name: for each file its name, a NUL, its size in
    decimal, a NUL, then its bytes. Built into the extension as ``_native.source_hash``; bench/harness.py
    computes the same over the checkout's csrc to tell a stale build (keep the two functions the same)."""
    h = hashlib.sha256()
    paths = glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.h"))
    for path in sorted(paths, key=os.path.basename):
        with open(path, "rb") as f:
            data = f.read()
        h.update(os.path.basename(path).encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


extra_compile = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
if os.environ.get("DEEPSSIM_FAST_DEBUG"):
    extra_compile = ["-O0", "-g"]

ext = Pybind11Extension(
    "deepssim_fast._native",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=extra_compile,
    extra_link_args=["-pthread"],
    depends=sorted(glob.glob("csrc/*.h")),
    # (a bare hex token, made a string in module.cpp: no quotes to survive each compiler's command line)
    define_macros=[("DSF_SOURCE_HASH", native_source_hash())],
)

setup(
    name="deepssim_fast",
    version="0.1.0",
    description="Fast exact SSIM, streaming all-pairs cosine top-k and DeepSSIM memorisation audits for brain MRI",
    python_requires=">=3.10",
    packages=["deepssim_fast", "deepssim_fast.kernels"],
    package_dir={"deepssim_fast": "deepssim_fast", "deepssim_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "numpy>=1.24",
        # 2.3: torch.uint16/32/64 (the dtype table); 2.7: the first CUDA build whose own triton pin (3.3.0)
        # meets the kernels' floor, so a user's CUDA torch and the GPU extra agree
        "torch>=2.7,<3",
        "nibabel>=5",
        "monai>=1.3",
        "tqdm>=4.60",
        "pillow>=9",
        "matplotlib>=3.7",  # the audit's report figures
    ],
    extras_require={
        "data": ["nilearn>=0.10", "dipy>=1.8"],
        "report": [],  # (matplotlib is a core dependency now; the extra stays so old install lines work)
        "dask": ["dask>=2024.1", "distributed>=2024.1", "threadpoolctl>=3"],
        # the GPU kernels: CUDA builds of torch on Linux bring their own triton already; CPU-only installs skip
        # its ~290 MB (tl.gather: backends.MIN_TRITON)
        "gpu": ["triton>=3.3; platform_system == 'Linux'"],
        # cupy's wheel must match torch's CUDA: "cupy" for CUDA 12 builds, "cupy13" for CUDA 13 (PyPI's torch 2.13)
        "cupy": ["cupy-cuda12x"],
        "cupy13": ["cupy-cuda13x"],
        "test": ["pytest>=7", "scikit-image>=0.22", "scikit-learn>=1.3", "faiss-cpu>=1.8", "nilearn>=0.10",
                 "dipy>=1.8", "dask>=2024.1", "distributed>=2024.1", "ruff",
                 "triton>=3.3; platform_system == 'Linux'"],  # (its interpreter runs the kernel tests on CPU)
        "bench": ["scikit-image>=0.22", "faiss-cpu>=1.8", "pytorch-msssim>=1.0", "torchmetrics>=1.0",
                  "nilearn>=0.10", "dipy>=1.8"],
    },
    entry_points={"console_scripts": ["deepssim-fast=deepssim_fast.cli:main"]},
)
