"""Triton tile kernel of :func:`deepssim_fast.all_pairs`: cosine scores, histogram and per-tile top-k.

One program computes a (BLOCK_M synthetic rows) × (BLOCK_N training rows) tile of scores with ``tl.dot``
(fp32 accumulation; inputs in fp32 ``"ieee"``, ``"tf32x3"`` (fp32 split into three tf32 products on the
tensor cores), ``"tf32"``, ``"fp16"`` or ``"bf16"``; unit-norm rows fit fp16), adds the tile to the
histogram and the class counts (a tile histogram in shared memory and int32 atomics per non-empty slot,
see :func:`histogram_mode`; above ``TILE_HIST_MAX_BINS`` bins, one global atomic per pair), and writes
for each row only its best ``KC = min(k, BLOCK_N)`` candidates of the tile that reach the row's running
k-th score — the n_synth × n_train matrix never reaches GPU memory. A second step (:func:`merge_topk`,
plain torch) merges the candidates into the running top-k: score descending, ties to the lower index.

Conventions are those of ``deepssim_fast.all_pairs``: bin = floor((s - lo) / (hi - lo) * bins) in float64,
clamped; classes compare the float32 score in float64 with the thresholds (done exactly in float32 against
the largest float32 at or below each threshold); the pair (i, self_offset + i) is excluded when
``self_offset`` is given.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (slowly) — that is how CI tests it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from deepssim_fast.all_pairs import PRECISIONS  # one list for the API's check and this kernel's

from . import FP_FUSION

logger = logging.getLogger(__name__)

# Up to this many bins, each program builds a histogram of its tile in shared memory (see histogram_mode);
# beyond it, pairs go to the global histogram by atomics.
TILE_HIST_MAX_BINS = 1024
#: Overrides :func:`histogram_mode` in :func:`cosine_topk` (0, 1 or 2; a diagnostic and benchmark switch).
HIST_MODE_ENV = "DEEPSSIM_FAST_TRITON_HIST_MODE"
_LOW_MASK = (1 << 32) - 1  # low half of merge_topk's keys
_INT64_MAX = torch.iinfo(torch.int64).max  # index of an empty top-k slot


@triton.jit
def _cosine_topk_kernel(Q, T, THR, CS, CI, HIST, CLS, RANGE,
                        n_q, n_t, d, row0, col0, self_delta,
                        stride_q, stride_t, stride_cs_m, stride_cs_t,
                        nbins, low_t, high_t,
                        HAS_SELF: tl.constexpr, UNIT_RANGE: tl.constexpr, HIST_MODE: tl.constexpr,
                        NB: tl.constexpr, HB: tl.constexpr, KC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, COMPENSATED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_q
    cmask = cols < n_t
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # COMPENSATED (wide rows): each K block's products are summed apart and added to acc by Kahan's rule
    # (comp holds the part of the sum an addition lost). Compiled, tl.dot accumulates into its accumulator
    # one product at a time, so over d products the rounding of acc + (a product far below its ulp)
    # drifts: at d = 2^21 a unit row scored 0.9987 against itself (the interpreter's blocked matmul hid it)
    comp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # row offsets in int64: row * d passes 2^31 for wide rows (correlation audits send whole volumes, d ~ 5e6)
    q_rows = rows.to(tl.int64)[:, None] * stride_q
    t_rows = cols.to(tl.int64)[:, None] * stride_t
    for k0 in range(0, d, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < d
        q = tl.load(Q + q_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        t = tl.load(T + t_rows + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if COMPENSATED:
            into = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            into = acc
        if PRECISION == "bf16":
            part = tl.dot(q.to(tl.bfloat16), tl.trans(t.to(tl.bfloat16)), into, out_dtype=tl.float32)
        elif PRECISION == "fp16":
            part = tl.dot(q.to(tl.float16), tl.trans(t.to(tl.float16)), into, out_dtype=tl.float32)
        elif PRECISION == "tf32":
            part = tl.dot(q, tl.trans(t), into, input_precision="tf32")
        elif PRECISION == "tf32x3":  # three tf32 products (hi*hi + hi*lo + lo*hi): ~fp32 on tensor cores
            part = tl.dot(q, tl.trans(t), into, input_precision="tf32x3")
        else:
            part = tl.dot(q, tl.trans(t), into, input_precision="ieee")
        if COMPENSATED:
            y = part - comp
            total = acc + y
            comp = (total - acc) - y
            acc = total
        else:
            acc = part
    if COMPENSATED:
        acc = acc - comp
    valid = rmask[:, None] & cmask[None, :]
    if HAS_SELF:
        # global synth row (row0 + r) is global train row (row0 + r + self_offset); col0 + c is the column
        valid = valid & ((rows[:, None] + self_delta) != cols[None, :])
    # ---- histogram and class counts (float64 rule, identical to the CPU engines). Compiled Triton passes a
    # Python float argument as fp32, so the range comes as float64 values in memory (RANGE = [lo, width]),
    # and the thresholds as the largest floats <= low / high: acc > low_t <=> (double) acc > low.
    s64 = acc.to(tl.float64)
    # (tl.cast, not nbins.to: a compiled launch passes an integer argument equal to 1 as a constexpr Python
    # int, which has no .to; bins=1 failed to compile on the GPU while the interpreter ran it)
    nb64 = tl.cast(nbins, tl.float64)
    if UNIT_RANGE:
        # range [-1, 1]: ((s + 1) / 2) * bins == (s + 1) * (bins / 2) in float64, bit for bit (halving is
        # exact), so the rule needs no division; |s| <= ~1 keeps the floor far inside int32
        b = tl.floor((s64 + 1.0) * (nb64 * 0.5)).to(tl.int32)
        b = tl.minimum(tl.maximum(b, 0), nbins - 1)
    else:
        lo = tl.load(RANGE)
        width = tl.load(RANGE + 1)
        b = tl.floor((s64 - lo) / width * nb64)
        b = tl.minimum(tl.maximum(b, 0.0), nb64 - 1.0).to(tl.int32)
    # Pairs outside the tile's valid part (past the last row or column, or the diagonal in self mode) go to a
    # sink slot past the real bins, which the atomics below skip. (tl.histogram's mask= is not used: with
    # Triton 3.6.0 on an H200 it miscounted inside this kernel — e.g. 23 of 35 pairs in the wrong bin on a 5 x 7
    # problem — while the same histogram on a plain loaded tile was right; bench/gpu_allpairs_diag.py.)
    if HIST_MODE == 2:
        # one tile histogram over (class, bin) slots: per-bin counts and class counts are its sums; the
        # slots of a fourth class (3 * NB..) are the sink
        cls = (acc > low_t).to(tl.int32) + (acc > high_t).to(tl.int32)  # 0 different, 1 similar, 2 duplicate
        slot = tl.where(valid, b + cls * NB, 3 * NB)
        h2 = tl.reshape(tl.histogram(tl.reshape(slot, (BLOCK_M * BLOCK_N,)), 4 * NB), (4, NB))
        cls_idx = tl.arange(0, 4)
        per_bin = tl.sum(tl.where(cls_idx[:, None] < 3, h2, 0), axis=0)
        per_cls = tl.sum(h2, axis=1)
        bins_idx = tl.arange(0, NB)
        tl.atomic_add(HIST + bins_idx, per_bin, mask=(bins_idx < nbins) & (per_bin > 0))
        tl.atomic_add(CLS + cls_idx, per_cls, mask=(cls_idx < 3) & (per_cls > 0))
    else:
        if HIST_MODE == 1:
            # a tile histogram of the bins alone: HB > nbins slots, the last is the sink
            h = tl.histogram(tl.reshape(tl.where(valid, b, HB - 1), (BLOCK_M * BLOCK_N,)), HB)
            bins_idx = tl.arange(0, HB)
            tl.atomic_add(HIST + bins_idx, h, mask=(bins_idx < nbins) & (h > 0))
        else:
            # too many bins for a tile histogram in shared memory: one global atomic per pair (spread over
            # the bins)
            tl.atomic_add(HIST + b, tl.full((BLOCK_M, BLOCK_N), 1, tl.int32), mask=valid)
        # both class comparisons packed in one int32 reduction (a tile has < 2^16 pairs). The high half can
        # reach bit 31 (2^15 or more duplicates in a tile): the sum wraps to a negative int32, whose
        # arithmetic shift would carry the sign in, so the high count is masked after the shift
        code = tl.where(valid, (acc > low_t).to(tl.int32) + ((acc > high_t).to(tl.int32) << 16), 0)
        packed = tl.sum(tl.sum(code, axis=1), axis=0)
        n_valid = tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0)
        n_low = packed & 0xFFFF
        n_high = (packed >> 16) & 0xFFFF
        tl.atomic_add(CLS + 0, n_valid - n_low)
        tl.atomic_add(CLS + 1, n_low - n_high)
        tl.atomic_add(CLS + 2, n_high)
    # ---- per-row candidates of this tile: those reaching the running k-th score, best KC of them
    thr = tl.load(THR + rows, mask=rmask, other=float("inf"))
    neg_inf = float("-inf")
    s = tl.where(valid & (acc >= thr[:, None]), acc, neg_inf)
    n_cand = tl.sum((s > neg_inf).to(tl.int32), axis=1)
    n_iter = tl.minimum(tl.max(n_cand, axis=0), KC)
    big = n_t + BLOCK_N
    out_at = rows.to(tl.int64) * stride_cs_m + pid_n * stride_cs_t
    for i in range(n_iter):
        m = tl.max(s, axis=1)
        ci = tl.min(tl.where((s == m[:, None]) & (m[:, None] > neg_inf), cols[None, :], big), axis=1)
        keep = rmask & (m > neg_inf)
        tl.store(CS + out_at + i, m, mask=keep)
        tl.store(CI + out_at + i, (ci + col0).to(tl.int64), mask=keep)
        s = tl.where(cols[None, :] == ci[:, None], neg_inf, s)


def largest_float32_le(x: float) -> float:
    """The largest float32 value <= x (as a Python float): for a float32 score s, s > it <=> (double) s > x."""
    f = np.float32(x)
    if float(f) > x:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_blocks(device: torch.device, k: int) -> dict[str, int]:
    """Tile sizes keyed on where the kernel runs (small tiles interpret quickly on CPU)."""
    if device.type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8}


def _release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a Triton version string (default: the installed one), or None if unreadable."""
    try:
        major, minor = (int(v) for v in (version or triton.__version__).split(".")[:2])
    except ValueError:
        return None
    return major, minor


#: The first Triton release the tile-histogram modes (1 and 2) are used with: they were written with
#: ``tl.histogram``'s ``mask=`` (new in 3.4; before it they did not compile, checked with 3.3.1 and 3.2.0), and
#: older releases were not checked again once the mask gave way to a sink slot; mode 0 is used there.
MASKED_HISTOGRAM_RELEASE = (3, 4)


def histogram_mode(bins: int, triton_version: str | None = None) -> int:
    """How a program adds its tile to the histogram and the class counts.

    2: one ``tl.histogram`` over 4 x next_pow2(bins) (class, bin) slots; 1: a histogram of the bins and
    one packed reduction of both class comparisons; 0 (more than ``TILE_HIST_MAX_BINS`` bins, or a Triton
    older than ``MASKED_HISTOGRAM_RELEASE``): a global atomic per pair. 2 and 1 are chosen by Triton release
    from their compiled sm_90 code (bf16, 200 bins, SASS per score): 3.9.0 gives 70 (mode 2) and 89
    (mode 1); 3.6.0, whose histogram costs more per slot, gives 204 and 140 — so mode 2 from Triton 3.9 on,
    mode 1 before. Timed on an H200 with Triton 3.6.0 (100000² pairs, d=256, k=10, bf16): mode 1 160 ms,
    mode 2 267 ms, mode 0 2337 ms (one global atomic per pair: the bins near 0 are contended).
    ``DEEPSSIM_FAST_TRITON_HIST_MODE`` (0, 1 or 2) overrides the choice in :func:`cosine_topk`
    (bench/gpu_suite.py times modes 1 and 2).
    """
    if bins > TILE_HIST_MAX_BINS:
        return 0
    release = _release(triton_version)
    if release is None:
        return 1
    if release < MASKED_HISTOGRAM_RELEASE:
        return 0
    return 2 if release >= (3, 9) else 1


#: Rows wider than this many (padded) components are summed with compensation (see the kernel's COMPENSATED):
#: below it, one running fp32 sum stays within ~1e-6 of the exact score (measured on unit rows against
#: themselves with the GPU's one-product-at-a-time order: 2^12, 8e-7; 2^16, 1e-5; 2^21, 1.3e-3).
COMPENSATED_MIN_D = 4096


# CUDA's limit on the grid's y dimension, where a launch puts its tiles of training rows
MAX_GRID_Y = 65535


#: Training rows per launch on CUDA (the first launches are smaller: :func:`train_chunks`).
CUDA_TRAIN_CHUNK = 65536
#: The candidates one launch may write (scores and indices, 12 bytes a slot), which sets the synthetic rows
#: per launch on CUDA (:func:`cuda_synth_block`): at most this, and at most 1/32 of the GPU's memory. The
#: merge's temporaries are ~3.7 times as large (measured with torch on the CPU), so a launch holds up to
#: ~5 GB at the default on a large GPU, ~1.2 GB on an 8 GB one; ``synth_block``/``train_chunk`` (all_pairs'
#: ``block``/``tile``) set smaller launches.
CUDA_CANDIDATE_BYTES = 1 << 30


def cuda_synth_block(chunk: int, block_n: int, kc: int, block_m: int, budget: int = CUDA_CANDIDATE_BYTES) -> int:
    """Synthetic rows per launch on CUDA: as many as keep one launch's candidate slots (rows x tiles x kc,
    12 bytes each) within ``budget``, a multiple of ``block_m`` in [1024, 32768].

    Fewer, larger launches merge less often: on an H200 (100000² pairs, d=256, k=10, bf16) 8192 synthetic x
    16384 training rows per launch took 160 ms, 32768 x 65536 took 137 ms (bench/gpu_allpairs_diag.py)."""
    per_row = -(-int(chunk) // block_n) * kc * 12
    rows = max(1024, min(32768, int(budget) // max(1, per_row)))
    return max(block_m, rows // block_m * block_m)


def launch_sizes(device_type: str, n_q: int, n_t: int, *, kc: int, block_m: int, block_n: int,
                 synth_block: int | None = None, train_chunk: int | None = None,
                 device_memory: int | None = None) -> tuple[int, int]:
    """``(synthetic rows, training rows)`` per launch: the caller's where given; else on CUDA
    ``CUDA_TRAIN_CHUNK`` training rows and :func:`cuda_synth_block`'s rows for a candidate budget of
    min(``CUDA_CANDIDATE_BYTES``, ``device_memory`` / 32); elsewhere (the interpreter) 256 x 512. The training
    rows are whole tiles, and few enough that a launch counts fewer than 2^31 pairs (:func:`launch_chunk`)."""
    if device_type == "cuda":
        budget = CUDA_CANDIDATE_BYTES if device_memory is None else min(CUDA_CANDIDATE_BYTES,
                                                                        int(device_memory) // 32)
        tc = launch_chunk(int(train_chunk or CUDA_TRAIN_CHUNK), block_n, min(int(synth_block or 1), n_q))
        sb = int(synth_block or cuda_synth_block(min(tc, n_t), block_n, kc, block_m, budget))
    else:
        sb, tc = int(synth_block or 256), int(train_chunk or 512)
    return sb, launch_chunk(tc, block_n, min(sb, n_q))


def launch_chunk(chunk: int, block_n: int, rows: int) -> int:
    """Training rows per launch: ``chunk`` rounded up to whole tiles, and small enough that one launch's pairs
    (``rows`` x chunk) stay below 2^31, since a launch counts them in int32 (histogram and class atomics),
    and that its tiles fit the grid's y dimension (at most ``MAX_GRID_Y``; a larger grid fails to launch)."""
    tc = max(block_n, -(-int(chunk) // block_n) * block_n)
    return max(block_n, min(tc, ((2**31 - 1) // max(1, rows)) // block_n * block_n, MAX_GRID_Y * block_n))


def train_chunks(n_t: int, chunk: int, block_n: int) -> list[tuple[int, int]]:
    """Column ranges of the launches over the training rows: 8 tiles first, doubling up to ``chunk``.

    Candidates of a launch are those reaching the running k-th score of the launches before it; in the
    first launch that threshold is -inf and every tile yields k candidates per row. Starting small raises
    the threshold early: on random unit vectors (100k training rows, k=10) the candidate loop ran 1.18
    iterations per tile on average instead of 2.36 with fixed 16384-row chunks, for 3 more launches.
    """
    out, c0, size = [], 0, max(block_n, min(chunk, 8 * block_n))
    while c0 < n_t:
        out.append((c0, min(n_t, c0 + size)))
        c0 += size
        size = min(chunk, 2 * size)
    return out


def merge_topk(run_s: torch.Tensor, run_i: torch.Tensor, cand_s: torch.Tensor, cand_i: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k best of running (m, k) + candidates (m, c) per row: score descending, index ascending.

    Empty slots hold -inf with index INT64_MAX and never displace a real score. One ``torch.topk`` over
    int64 keys that order exactly as (score descending, index ascending): the score's float32 bits made
    monotone as a signed integer (-0.0 taken as +0.0) in the high half, 2^32 - 1 - index in the low half
    (indices < 2^31). Two stable segmented sorts did the same before, at several times the memory traffic.
    """
    s = torch.cat([run_s, cand_s], dim=1).to(torch.float32) + 0.0  # -0.0 -> +0.0
    i = torch.cat([run_i, cand_i], dim=1)
    bits = s.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    low = _LOW_MASK - torch.clamp(i, max=_LOW_MASK)  # the empty slots' INT64_MAX -> 0: last among ties
    key = torch.topk((ordered << 32) + low, k, dim=1).values
    hi = (key >> 32).to(torch.int32)
    out_s = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi).view(torch.float32)
    low = key & _LOW_MASK
    out_i = torch.where(low == 0, torch.full_like(low, _INT64_MAX), _LOW_MASK - low)
    return out_s, out_i


def cosine_topk(Q: torch.Tensor, T: torch.Tensor, *, k: int, bins: int, hist_range: tuple[float, float],
                thresholds: tuple[float, float], self_offset: int | None = None,
                synth_block: int | None = None, train_chunk: int | None = None, precision: str = "ieee",
                progress: bool = False, dense_out: Any = None, blocks: dict[str, int] | None = None,
                hist_mode: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact streaming top-k + histogram of Q (n_q, dp) against T (n_t, dp), rows already L2-normalised.

    Returns ``(scores (n_q, k) float32, indices (n_q, k) int64, hist (bins,) int64, classes (3,) int64)``
    on the inputs' device (``classes`` = different, similar, duplicate). Memory: O((n_q + n_t) dp +
    synth_block × (train_chunk / BLOCK_N) × min(k, BLOCK_N)); the score matrix is never stored.
    ``dense_out`` (a host array (n_q, n_t)) receives the scores, computed separately by ``torch.mm``.
    """
    if Q.ndim != 2 or T.ndim != 2 or Q.shape[1] != T.shape[1]:
        raise ValueError(f"cosine_topk: expected Q (n_q, d) and T (n_t, d), got {tuple(Q.shape)} and "
                         f"{tuple(T.shape)}")
    if Q.device != T.device:
        raise ValueError(f"cosine_topk: Q on {Q.device} but T on {T.device}")
    if T.shape[0] >= 1 << 31:
        raise ValueError(f"cosine_topk: {T.shape[0]} training rows; at most 2^31 - 1 (merge keys)")
    if precision not in PRECISIONS:
        raise ValueError(f"cosine_topk: precision must be one of {PRECISIONS}, got {precision!r}")
    if Q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("cosine_topk: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if precision == "bf16" and Q.device.type != "cuda":
        # Triton 3.x's interpreter mis-executes bf16 tl.dot (results off by ~1e10): refuse rather than lie.
        raise ValueError("cosine_topk: precision='bf16' runs only on CUDA; use 'fp16' under TRITON_INTERPRET")
    Q = Q.to(torch.float32).contiguous()
    T = T.to(torch.float32).contiguous()
    # half-precision products read their operands stored in that precision: half the bytes each tile loads,
    # and no conversion in the kernel (torch and Triton both round float32 to nearest even: same values)
    op_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    Qk = Q.to(op_dtype)
    Tk = Qk if T is Q else T.to(op_dtype)  # (a set against itself: one copy)
    dev = Q.device
    n_q, d = Q.shape
    n_t = T.shape[0]
    cfg = dict(default_blocks(dev, k), **(blocks or {}))
    bm, bn, bk, nw = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    if bm * bn >= 1 << 16:
        raise ValueError(f"cosine_topk: BLOCK_M x BLOCK_N = {bm * bn} must stay below 65536 (packed counts)")
    kc = min(k, bn)
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    sb, tc = launch_sizes(dev.type, n_q, n_t, kc=kc, block_m=bm, block_n=bn, synth_block=synth_block,
                          train_chunk=train_chunk, device_memory=total)
    lo, hi = hist_range
    rng = torch.tensor([float(lo), float(hi) - float(lo)], dtype=torch.float64, device=dev)
    low_t, high_t = (largest_float32_le(t) for t in thresholds)
    unit_range = (float(lo), float(hi)) == (-1.0, 1.0)
    hist = torch.zeros(bins, dtype=torch.int64, device=dev)
    cls = torch.zeros(3, dtype=torch.int64, device=dev)
    hist32 = torch.zeros(bins, dtype=torch.int32, device=dev)
    cls32 = torch.zeros(3, dtype=torch.int32, device=dev)
    out_s = torch.empty((n_q, k), dtype=torch.float32, device=dev)
    out_i = torch.empty((n_q, k), dtype=torch.int64, device=dev)
    nb = max(2, _next_pow2(bins))
    # mode 1's tile histogram: the bins and a sink slot past them (twice the slots when bins is a power of
    # two: under Triton 3.6, 4136 -> 4896 SASS instructions at 256 bins, 6936 -> 9768 at 1024, no spills)
    hb = max(2, _next_pow2(bins + 1))
    source = ""
    if hist_mode is None:
        env = os.environ.get(HIST_MODE_ENV, "").strip()
        if env and env not in ("0", "1", "2"):
            raise ValueError(f"{HIST_MODE_ENV}={env!r}: expected 0, 1 or 2 (or unset: chosen by Triton release)")
        hist_mode = int(env) if env else histogram_mode(bins)
        source = f" (set by {HIST_MODE_ENV})" if env else source
    hist_mode = int(hist_mode)
    if hist_mode not in (0, 1, 2) or (hist_mode and bins > TILE_HIST_MAX_BINS):
        raise ValueError(f"cosine_topk: hist_mode {hist_mode} with {bins} bins (0, 1, 2; 1 and 2 take at most "
                         f"{TILE_HIST_MAX_BINS} bins){source}")
    release = _release(None)
    if hist_mode and release is not None and release < MASKED_HISTOGRAM_RELEASE:
        raise ValueError(f"cosine_topk: hist_mode {hist_mode}{source} needs Triton >= "
                         f"{'.'.join(map(str, MASKED_HISTOGRAM_RELEASE))} (the first release they are used "
                         f"with); this is "
                         f"Triton {triton.__version__}: use hist_mode 0")
    from tqdm.auto import tqdm

    with tqdm(total=n_q * n_t, unit="pair", unit_scale=True, desc="all_pairs[triton]", leave=False,
              disable=None if progress else True) as bar:
        for r0 in range(0, n_q, sb):
            r1 = min(n_q, r0 + sb)
            m = r1 - r0
            q = Q[r0:r1]
            run_s = torch.full((m, k), float("-inf"), dtype=torch.float32, device=dev)
            run_i = torch.full((m, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
            for c0, c1 in train_chunks(n_t, tc, bn):
                nct = c1 - c0
                n_tiles = -(-nct // bn)
                thr = run_s[:, -1].contiguous()
                cs = torch.full((m, n_tiles, kc), float("-inf"), dtype=torch.float32, device=dev)
                ci = torch.full((m, n_tiles, kc), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
                hist32.zero_()
                cls32.zero_()
                has_self = self_offset is not None
                self_delta = (self_offset + r0 - c0) if has_self else 0
                grid = (triton.cdiv(m, bm), n_tiles)
                _cosine_topk_kernel[grid](
                    Qk[r0:r1], Tk[c0:c1], thr, cs, ci, hist32, cls32, rng,
                    m, nct, d, r0, c0, self_delta,
                    Qk.stride(0), Tk.stride(0), cs.stride(0), cs.stride(1),
                    bins, low_t, high_t,
                    HAS_SELF=has_self, UNIT_RANGE=unit_range, HIST_MODE=hist_mode, NB=nb, HB=hb, KC=kc, BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_K=bk,
                    PRECISION=precision, COMPENSATED=d > COMPENSATED_MIN_D, num_warps=nw,
                    enable_fp_fusion=FP_FUSION)
                hist += hist32.to(torch.int64)
                cls += cls32.to(torch.int64)
                run_s, run_i = merge_topk(run_s, run_i, cs.reshape(m, -1), ci.reshape(m, -1), k)
                if dense_out is not None:
                    dense_out[r0:r1, c0:c1] = (q @ T[c0:c1].T).cpu().numpy()
                bar.update(m * nct)
            out_s[r0:r1] = run_s
            out_i[r0:r1] = run_i
    return out_s, out_i, hist, cls


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
