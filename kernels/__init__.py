"""Triton kernels of deepssim_fast, installed as ``deepssim_fast.kernels``.

One module per capability, kernel and launcher together: ``ssim.py`` (fused windowed SSIM),
``cosine_topk.py`` (tiled cosine scores + histogram + per-tile top-k). Kernels run compiled on NVIDIA
GPUs and under ``TRITON_INTERPRET=1`` on CPU tensors for tests. Importing this package does not import
Triton; each module does, so a machine without Triton can still use the rest of deepssim_fast.
"""

#: Every launch asks for fused multiply-adds (Triton's ``enable_fp_fusion``): the kernels were checked with
#: them (Triton 3.9's default; 3.9 warns the default turns off in 3.10), so a newer Triton compiles the same
#: arithmetic, e.g. the SSIM kernel's ``qa - sa * sa`` as one rounding.
FP_FUSION = True
