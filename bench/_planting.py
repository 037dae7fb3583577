"""Planted near-copies for the all-pairs benches (numpy only: the scale case's child process imports it and must
not import torch, whose memory would count in its peak RSS).

Random unit vectors in d=256 put every pair at |cosine| < ~0.35, all in the class "different": the class counts'
check never saw a "similar" or "duplicate" pair. A few hundred synthetic rows are replaced by near-copies of
training rows at a chosen cosine, half above the duplicate threshold (0.85) and half between the two (0.6, 0.85),
so that every class is non-empty; the workload (shapes, k, bins) stays the same.
"""
from __future__ import annotations

import numpy as np

CLASSES = ("different", "similar", "duplicate")
DUPLICATE_COS = (0.9, 0.98)  # cosines drawn for the planted duplicates (threshold 0.85)
SIMILAR_COS = (0.66, 0.8)  # ... and for the planted similar pairs (thresholds 0.6, 0.85), clear of both edges


def planted_count(n_synth: int, most: int = 300) -> int:
    """How many near-copies go into a synthetic set of ``n_synth`` rows: a few hundred, at most an eighth of it
    (at least 2: one of each class)."""
    return max(2, min(most, n_synth // 8))


def near_copy_plan(n_train: int, n_synth: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(synthetic rows to replace, the training row each copies, its cosine): distinct rows; the first half of the
    cosines in DUPLICATE_COS, the rest in SIMILAR_COS."""
    rng = np.random.default_rng([seed, 0])
    count = min(count, n_synth)
    rows = np.sort(rng.choice(n_synth, count, replace=False))
    cols = rng.integers(0, n_train, count)
    dup = (count + 1) // 2
    cos = np.concatenate([rng.uniform(*DUPLICATE_COS, dup), rng.uniform(*SIMILAR_COS, count - dup)])
    return rows, cols, cos


def near_copies(t: np.ndarray, cos: np.ndarray, seed: int) -> np.ndarray:
    """Unit rows at exactly cosine ``cos[i]`` (to float32 rounding) with the row ``t[i]``: cos·t + sin·u, u a
    random unit vector orthogonal to t. float32."""
    rng = np.random.default_rng([seed, 1])
    t = np.asarray(t, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    u = rng.standard_normal(t.shape)
    u -= np.sum(u * t, axis=1, keepdims=True) * t
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = np.asarray(cos, dtype=np.float64)[:, None]
    return (c * t + np.sqrt(1.0 - c * c) * u).astype(np.float32)


def plant(train: np.ndarray, synth: np.ndarray, count: int, seed: int = 7) -> np.ndarray:
    """Replace ``count`` rows of ``synth`` (numpy, in place) by near-copies of training rows (near_copy_plan);
    returns their cosines."""
    rows, cols, cos = near_copy_plan(len(train), len(synth), count, seed)
    synth[rows] = near_copies(train[cols], cos, seed)
    return cos


def check_classes_exercised(name: str, class_counts) -> None:
    """AssertionError unless every class (different, similar, duplicate) counts at least one pair: a class with no
    pair is not exercised by the check of the counts (the planted near-copies are missing)."""
    counts = dict(zip(CLASSES, class_counts, strict=True)) if not isinstance(class_counts, dict) else class_counts
    empty = [c for c in CLASSES if int(counts[c]) == 0]
    if empty:
        raise AssertionError(f"{name}: class counts {({c: int(counts[c]) for c in CLASSES})}: {', '.join(empty)} "
                             "empty, so the check of the counts does not exercise it (planted near-copies missing)")
