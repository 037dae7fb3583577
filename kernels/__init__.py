"""Triton kernels of deepssim_fast, installed as ``deepssim_fast.kernels``.

One module per capability, kernel and launcher together: ``ssim.py`` (fused windowed SSIM),
``cosine_topk.py`` (tiled cosine scores + histogram + per-tile top-k). Kernels run compiled on NVIDIA
GPUs and under ``TRITON_INTERPRET=1`` on CPU tensors for tests. Importing this package does not import
Triton; each module does, so a machine without Triton can still use the rest of deepssim_fast.
"""
