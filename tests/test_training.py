"""Training the DeepSSIM encoder: on-the-fly SSIM targets of augmented pairs, reproducibility, resume, CSV
pairs, a short run on real MRI that clearly learns, and bad input."""
from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from deepssim_fast import data
from deepssim_fast.model import load_model
from deepssim_fast.reference import ssim_reference
from deepssim_fast.training import (
    Augmenter,
    PairSampler,
    evaluate,
    fixed_pairs,
    make_pool,
    read_checkpoint,
    ssim_targets,
    train,
    zoom_out_pairs,
)
from deepssim_fast.model import build_model

SMALL = dict(backbone="small", input_size=64, batch_size=8, val_pairs=32, progress=False)


@pytest.fixture(scope="module")
def mni_slices() -> list[data.Slice]:
    return data.load_slices("mni152", data.SlicePolicy(axis=2, step=3))


def _first_mismatch(a: np.ndarray, b: np.ndarray, atol: float) -> str:
    bad = np.argwhere(~np.isclose(a, b, atol=atol, rtol=0))
    if bad.size == 0:
        return ""
    return f"{len(bad)} mismatches, first at {bad[0]}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}"


# ---------------------------------------------------------------------------------------------- targets
def test_targets_are_ssim_of_the_augmented_pair(mni_slices) -> None:
    m = build_model("small", input_size=96)
    pool = make_pool(mni_slices, m.config)
    sampler = PairSampler(pool.images, pool.groups, pool.positions)
    pb = sampler.batch(24, np.random.SeedSequence([5, 1]), Augmenter())
    assert pb.a.shape == (24, 96, 96) and pb.a.dtype == torch.float32
    assert set(pb.kinds) == {"random", "neighbour", "copy"}
    changed = [k for k in range(24) if not np.array_equal(pb.a[k].numpy(), pool.images[pb.i[k]])]
    assert changed, "augmentation never changed an image"
    t = ssim_targets(pb.a, pb.b).numpy()
    assert t.dtype == np.float32 and t.shape == (24,)
    ref = ssim_reference(pb.a, pb.b, spatial_dims=2, preset="deepssim")
    assert not _first_mismatch(t, ref, 1e-4), _first_mismatch(t, ref, 1e-4)
    # outside oracle: scikit-image on z-scored images, data range of the first image (the reference labels)
    for k in changed[:4]:
        a, b = pb.a[k].numpy().astype(np.float64), pb.b[k].numpy().astype(np.float64)
        za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
        sk = structural_similarity(za, zb, data_range=za.max() - za.min(), win_size=7)
        assert t[k] == pytest.approx(sk, abs=1e-4)
    # a copy pair keeps the same slice but is augmented independently: its target is usually < 1
    copies = [k for k in range(24) if pb.kinds[k] == "copy"]
    assert all(pb.i[k] == pb.j[k] for k in copies)
    nbs = [k for k in range(24) if pb.kinds[k] == "neighbour"]
    assert all(pool.groups[pb.i[k]] == pool.groups[pb.j[k]] and
               1 <= abs(pool.positions[pb.i[k]] - pool.positions[pb.j[k]]) <= 3 for k in nbs)


def test_augmentation_is_seeded() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.random((40, 24, 24), dtype=np.float32)
    imgs = np.repeat(imgs[:1], 40, axis=0)  # one image 40 times: differences come from the draws alone
    aug = Augmenter()
    a1, a2, b = aug(imgs, 7), aug(imgs, 7), aug(imgs, 8)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, b)
    # each image is drawn independently (p = 0.33 per transform): some untouched, some flipped, not all alike
    untouched = [np.array_equal(a1[k], imgs[k]) for k in range(40)]
    flipped0 = [np.array_equal(a1[k], imgs[k][::-1]) for k in range(40)]
    assert 0 < sum(untouched) < 40
    assert 0 < sum(flipped0) < 40
    assert len({a1[k].tobytes() for k in range(40)}) > 4
    np.testing.assert_array_equal(Augmenter(enabled=False)(imgs, 1), imgs)


def test_zoom_out_keeps_aligned_pairs_aligned() -> None:
    rng = np.random.default_rng(3)
    imgs = rng.random((60, 32, 32), dtype=np.float32) + 1.0
    kinds = ["random", "neighbour", "copy"] * 20
    a, b = zoom_out_pairs(imgs, imgs, kinds, (0.5, 0.75), np.random.default_rng(11))
    a2, b2 = zoom_out_pairs(imgs, imgs, kinds, (0.5, 0.75), np.random.default_rng(11))
    np.testing.assert_array_equal(a, a2)  # seeded
    np.testing.assert_array_equal(b, b2)
    shrunk = [k for k in range(60) if not np.array_equal(a[k], imgs[k])]
    assert 0 < len(shrunk) < 60  # factor 1.0 is one of the choices
    for k in shrunk:
        bg = a[k] == imgs[k].min()
        assert bg.mean() >= 1 - 0.75 ** 2 - 0.05, "the canvas outside the shrunk image is background"
    for k in range(60):
        if kinds[k] != "random":  # same image, same factor and position: still identical
            np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], b[k]) for k in range(0, 60, 3)), "random pairs drawn independently"
    for bad in ((1.5,), (1.0,), (0.05,)):
        with pytest.raises(ValueError, match="zoom_out"):
            PairSampler(imgs, ["g"] * 60, list(range(60)), zoom_out=bad)


def test_zoom_out_training_runs_and_is_recorded(tmp_path, mni_slices) -> None:
    imgs = mni_slices[:16]
    m = train(imgs, max_steps=2, seed=1, out=tmp_path, zoom_out=(0.6,), **{**SMALL, "size_policy": "pad"})
    assert m.config.size_policy == "pad" and len(m.history) == 2
    ck = read_checkpoint(tmp_path / "last.pt")
    assert ck["train_args"]["zoom_out"] == [0.6]
    plain = [r["loss"] for r in train(imgs, max_steps=2, seed=1, **SMALL).history]
    zoomed = [r["loss"] for r in train(imgs, max_steps=2, seed=1, zoom_out=(0.6,), **SMALL).history]
    assert plain != zoomed


def test_a_fit_that_keeps_less_than_half_the_images_is_said_once_per_run(mni_slices, caplog) -> None:
    """train on 197 x 233 slices at input 64 (the ``small`` default 128 alike) trained on their central
    pixels alone, without a word. It is said once per call, for the training and validation images together."""
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "model's input size" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        train(mni_slices[:6], max_steps=1, val_images=mni_slices[6:10], **dict(SMALL, val_pairs=4))
    (msg,) = said()
    assert "10 of 10 images" in msg and "197 x 233" in msg and "64 x 64" in msg, msg
    assert "--size-policy pad" in msg and "--input-size" in msg, msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        pool = make_pool(mni_slices[:3], build_model("small", input_size=64).config, what="eval images")
    (msg,) = said()
    assert "3 of 3 eval images" in msg and "197 x 233" in msg, msg
    np.testing.assert_array_equal(pool.images[0], mni_slices[0].array[66:130, 84:148])  # the fit is as it was
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        train(mni_slices[:6], max_steps=1, val_fraction=0.0, **dict(SMALL, size_policy="pad"))
    assert said() == []


# ------------------------------------------------------------------------------------------- reproducibility
def test_seeded_reproducibility(mni_slices) -> None:
    imgs = mni_slices[:20]
    h1 = [r["loss"] for r in train(imgs, max_steps=3, seed=3, **SMALL).history]
    h2 = [r["loss"] for r in train(imgs, max_steps=3, seed=3, **SMALL).history]
    h3 = [r["loss"] for r in train(imgs, max_steps=3, seed=4, **SMALL).history]
    assert h1 == h2
    assert h1 != h3
    # the caller's global torch RNG is left as it was
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    train(imgs, max_steps=1, seed=3, **SMALL)
    assert torch.equal(torch.rand(1), before)


def test_resume_continues_the_same_loss_curve(tmp_path, mni_slices, caplog) -> None:
    imgs = mni_slices[:24]
    kw = dict(SMALL, seed=11, val_every=2)
    full_c = train(imgs, max_steps=6, out=tmp_path / "fc", **kw)
    half = train(imgs, max_steps=3, out=tmp_path / "hc", **kw)
    ck = read_checkpoint(tmp_path / "hc" / "last.pt")
    assert ck["step"] == 3 and "optimizer" in ck and ck["seed"] == 11
    assert ck["train_args"]["total_steps"] == 3
    assert [r["loss"] for r in half.history] == [r["loss"] for r in full_c.history[:3]]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        rest_c = train(imgs, max_steps=6, out=tmp_path / "hc", resume=tmp_path / "hc" / "last.pt", **kw)
    assert "other settings" not in caplog.text  # running on to more steps is not a change of settings
    # (the confirmation after an interruption, at the default level: it was said with -v only)
    assert f"resumed from {tmp_path / 'hc' / 'last.pt'} at step 3" in caplog.text, caplog.text
    assert [r["step"] for r in rest_c.history] == [4, 5, 6]
    assert [r["loss"] for r in rest_c.history] == [r["loss"] for r in full_c.history[3:]]
    # the final weights (last.pt of both runs) are identical too
    w_full = read_checkpoint(tmp_path / "fc" / "last.pt")["model"]
    w_rest = read_checkpoint(tmp_path / "hc" / "last.pt")["model"]
    assert all(torch.equal(w_full[k], w_rest[k]) for k in w_full)
    # the log CSV has one row per step over both runs
    with open(tmp_path / "hc" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["t_target"]) >= 0 and float(r["t_model"]) > 0 for r in rows)


def test_an_api_resume_without_options_continues_the_runs_own_settings(tmp_path, mni_slices, caplog) -> None:
    """train(resume=...) through the API ran at its own defaults, not the run's: batch size 32 and lr 1e-3
    after 2 and 0.01 ("resuming ... with other settings"), and 40 epochs after a run of 4 steps, where its
    docstring promised the same loss curve (the CLI took them from the checkpoint). Options not given are
    the run's own now, as on the command line; given ones are used and named."""
    imgs = mni_slices[:12]
    kw = dict(SMALL, seed=5, batch_size=2, lr=0.01, val_pairs=4, val_every=2, lr_schedule="cosine",
              warmup_steps=1, val_fraction=0.25)
    full = train(imgs, max_steps=4, out=tmp_path / "full", **kw)
    train(imgs, max_steps=4, out=tmp_path / "r", time_limit=0, **kw)  # stopped after its first step
    assert read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 1
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        rest = train(imgs, out=tmp_path / "r", resume=tmp_path / "r" / "last.pt", progress=False)
    assert "other settings" not in caplog.text, caplog.text
    assert [r["step"] for r in rest.history] == [2, 3, 4]
    assert [r["lr"] for r in rest.history] == [r["lr"] for r in full.history[1:]]
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history[1:]]
    args = read_checkpoint(tmp_path / "r" / "last.pt")["train_args"]
    assert {k: args[k] for k in ("batch_size", "lr", "lr_schedule", "warmup_steps", "val_fraction", "val_pairs",
                                 "val_every", "total_steps")} == {
        "batch_size": 2, "lr": 0.01, "lr_schedule": "cosine", "warmup_steps": 1, "val_fraction": 0.25,
        "val_pairs": 4, "val_every": 2, "total_steps": 4}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):  # a given option is used and said
        train(imgs, max_steps=5, lr=0.02, out=tmp_path / "r", resume=tmp_path / "r" / "last.pt", progress=False)
    assert "lr 0.01 -> 0.02" in caplog.text


def test_a_resumed_run_leaves_the_callers_torch_generator_as_it_was(tmp_path, mni_slices) -> None:
    """train forks torch's global generator (module docstring); a resumed run built its model (random
    initial weights, then replaced by the checkpoint's) outside the fork and so advanced the caller's."""
    kw = dict(SMALL, batch_size=2, val_pairs=4)
    train(mni_slices[:6], max_steps=1, out=tmp_path / "r", **kw)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    train(mni_slices[:6], max_steps=2, resume=tmp_path / "r" / "last.pt",
          **{k: v for k, v in kw.items() if k != "backbone"})
    assert torch.equal(torch.rand(1), before)


def test_resume_after_a_kill_between_checkpoints_logs_each_step_once(tmp_path, mni_slices) -> None:
    """last.pt is written at validation steps, a log row at every step: a run killed between the two and
    resumed runs some steps again; the log keeps the checkpoint's steps and drops the rest (and any partial
    line), so it reads as one uninterrupted run."""
    imgs = mni_slices[:24]
    kw = dict(SMALL, seed=11, val_every=3)
    full = train(imgs, max_steps=8, out=tmp_path / "full", **kw)
    train(imgs, max_steps=3, out=tmp_path / "k", **kw)  # last.pt at step 3
    with open(tmp_path / "k" / "log.csv", "a") as f:  # what a kill at step 5 leaves: rows 4, 5, half of 6
        f.write("4,0,0.5,0.1,0.001,0,0,0,,,\n5,0,0.5,0.1,0.001,0,0,0,,,\n6,0,0.4")
    train(imgs, max_steps=8, out=tmp_path / "k", resume=tmp_path / "k" / "last.pt", **kw)
    with open(tmp_path / "k" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in full.history], rel=1e-6)


def test_resume_checks_the_model_settings_and_applies_the_run_settings(tmp_path, mni_slices, caplog) -> None:
    imgs = mni_slices[:12]
    kw = dict(SMALL, batch_size=2, val_pairs=4, weight_decay=1e-3)
    train(imgs, max_steps=1, out=tmp_path / "r", **kw)
    ck = tmp_path / "r" / "last.pt"
    base = {k: v for k, v in kw.items() if k != "backbone"}
    with pytest.raises(ValueError, match="emb_dim=256 but emb_dim=128 was given"):
        train(imgs, max_steps=2, resume=ck, **dict(base, emb_dim=128))
    with pytest.raises(ValueError, match="input_size=64 but input_size=48"):
        train(imgs, max_steps=2, resume=ck, **dict(base, input_size=48))
    # other run settings: allowed, said, and really used (the optimizer's weight decay is this run's)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, max_steps=2, out=tmp_path / "r", resume=ck, **dict(base, weight_decay=0.5, lr=5e-2))
    assert "weight_decay 0.001 -> 0.5" in caplog.text and "lr 0.001 -> 0.05" in caplog.text
    after = read_checkpoint(ck)
    assert after["train_args"]["weight_decay"] == 0.5
    assert all(g["weight_decay"] == 0.5 for g in after["optimizer"]["param_groups"])


def test_resume_of_a_cosine_schedule_with_other_max_steps_is_said(tmp_path, mni_slices, caplog) -> None:
    """Under the cosine schedule the learning rate of every step follows total_steps: a resume with another
    max_steps changed the curve without a word (total_steps was never compared, as under a constant rate,
    where running on is what resuming is for)."""
    imgs = mni_slices[:8]
    kw = dict(SMALL, batch_size=2, val_pairs=4, lr_schedule="cosine")
    train(imgs, max_steps=2, out=tmp_path / "c", **kw)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, max_steps=4, out=tmp_path / "c", resume=tmp_path / "c" / "last.pt", **kw)
    assert "total_steps 2 -> 4" in caplog.text


def test_a_new_run_stopped_before_its_first_checkpoint_leaves_no_earlier_last_pt(tmp_path, mni_slices,
                                                                                monkeypatch) -> None:
    """A new run into a used out= kept the earlier run's last.pt until its own first checkpoint: stopped
    before that, out= held the earlier run's weights beside this run's log.csv, and --resume out/last.pt
    continued the earlier run under this run's log rows."""
    import deepssim_fast.training as T

    imgs = mni_slices[:8]
    kw = dict(SMALL, batch_size=2, val_pairs=4)
    train(imgs, max_steps=1, out=tmp_path / "o", **kw)
    assert (tmp_path / "o" / "last.pt").is_file()

    def stopped(*a, **k):  # the run is killed at its first step
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_lr_at", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(imgs, max_steps=3, out=tmp_path / "o", seed=9, **kw)
    assert not (tmp_path / "o" / "last.pt").exists() and not (tmp_path / "o" / "best.pt").exists()


def test_resume_into_another_folder_returns_the_best_weights(tmp_path, mni_slices) -> None:
    """The best validation may come before the resume; the resumed run into another out= still returns (and
    keeps) those weights, not the last ones."""
    imgs = mni_slices[:24]
    kw = dict(SMALL, seed=5, val_every=2, lr=3e-2)
    a = train(imgs, max_steps=4, out=tmp_path / "a", **kw)
    vals = [r["val_loss"] for r in a.history if r["val_loss"] is not None]
    best_step = [r["step"] for r in a.history if r["val_loss"] == min(vals)][0]
    assert best_step < 4  # (this seed and rate: the validation loss rises after step 2)
    train(imgs, max_steps=best_step, out=tmp_path / "h", **kw)
    b = train(imgs, max_steps=4, out=tmp_path / "b", resume=tmp_path / "h" / "last.pt", **kw)
    assert b.best_val == a.best_val
    want = read_checkpoint(tmp_path / "a" / "best.pt")["model"]
    got = b.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert read_checkpoint(tmp_path / "b" / "best.pt")["best_val"] == a.best_val


def test_resume_into_another_folder_keeps_the_whole_log(tmp_path, mni_slices) -> None:
    """out/log.csv of a run resumed into another folder held only the steps run there (best.pt was copied
    over, the curve before the resume was not): it now reads like the uninterrupted run's log."""
    imgs = mni_slices[:8]
    kw = dict(SMALL, batch_size=2, val_pairs=4, seed=3)
    train(imgs, max_steps=3, out=tmp_path / "full", **kw)
    train(imgs, max_steps=2, out=tmp_path / "h", **kw)
    train(imgs, max_steps=3, out=tmp_path / "b", resume=tmp_path / "h" / "last.pt", **kw)

    def rows(folder: str) -> list[list[str]]:
        with open(tmp_path / folder / "log.csv", newline="") as f:
            return [r[:5] for r in csv.reader(f)]  # (step, epoch, loss, mae, lr; not the timings)

    assert [r[0] for r in rows("b")] == ["step", "1", "2", "3"]
    assert rows("b") == rows("full")
    assert [r[0] for r in rows("h")] == ["step", "1", "2"]  # the resumed run's own folder is left alone


def test_a_resume_with_nothing_left_into_another_folder_leaves_it_complete(tmp_path, mni_slices, caplog) -> None:
    """A resume at step 4 with max_steps=2 into another out= trains nothing: out was left without last.pt (only
    best.pt and log.csv), and a later resume from out/last.pt failed. out/last.pt is now the resumed checkpoint;
    in the checkpoint's own folder a last.pt further on than the resumed best.pt is kept."""
    imgs = mni_slices[:16]
    kw = dict(SMALL, seed=1, val_every=2)
    train(imgs, max_steps=4, out=tmp_path / "full", **kw)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        m = train(imgs, resume=tmp_path / "full" / "last.pt", max_steps=2, out=tmp_path / "nothing", progress=False)
    assert m.steps_run == 0 and "nothing left to train" in caplog.text
    assert sorted(p.name for p in (tmp_path / "nothing").iterdir()) == ["best.pt", "last.pt", "log.csv"]
    assert (tmp_path / "nothing" / "last.pt").read_bytes() == (tmp_path / "full" / "last.pt").read_bytes()
    more = train(imgs, resume=tmp_path / "nothing" / "last.pt", max_steps=5, progress=False)
    assert [r["step"] for r in more.history] == [5]
    # from best.pt (step 2 or 4) in its own folder: last.pt (step 4) is left as it was
    last = (tmp_path / "full" / "last.pt").read_bytes()
    train(imgs, resume=tmp_path / "full" / "best.pt", max_steps=2, out=tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "last.pt").read_bytes() == last


# ---------------------------------------------------------------------------------------------- learning
def test_short_run_on_real_slices_learns(tmp_path) -> None:
    # axial MNI152 slices; a slab z in [64, 76) is held out, with 4-slice margins never trained on either
    axial = data.load_slices("mni152", data.SlicePolicy(axis=2))
    train_sl = [s for s in axial if not 60 <= s.index < 80]
    held = [s for s in axial if 64 <= s.index < 76]
    torch.manual_seed(0)
    untrained = build_model("small", input_size=64)
    before = evaluate(untrained, held, n_pairs=192, seed=2)
    m = train(train_sl, backbone="small", input_size=64, batch_size=32, max_steps=60, lr_schedule="cosine",
              warmup_steps=5, val_every=30, val_pairs=96, progress=False, out=tmp_path)
    after = evaluate(m, held, n_pairs=192, seed=2)
    assert set(after["by_kind"]) == {"random", "neighbour", "copy"}
    hist = np.asarray(after["target_hist"])
    assert hist[:4].sum() > 0 and hist[-3:].sum() > 0, f"held-out targets do not span the range: {hist}"
    # measured here: untrained MAE 0.71 / r 0.79, after 60 steps MAE 0.07 / r 0.95 (the 5-minute acceptance
    # run is in bench/bench_train.py); the bounds sit between, so each one alone separates the two
    assert before["mae"] > 0.3 and before["r"] < 0.87, before
    assert after["mae"] <= 0.15 and after["r"] >= 0.9, after
    # best.pt is the best validation checkpoint and loads with weights_only
    best = load_model(tmp_path / "best.pt")
    assert read_checkpoint(tmp_path / "best.pt")["best_val"] == pytest.approx(m.best_val)
    assert evaluate(best, held, n_pairs=192, seed=2)["mae"] == pytest.approx(after["mae"], abs=1e-5)


# ---------------------------------------------------------------------------------------------- CSV format
def test_reference_csv_pairs(tmp_path, mni_slices) -> None:
    imgs = mni_slices[:10]
    p = tmp_path / "pairs.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["real_key", "synth_key", "ssim", "split"])
        for k in range(6):
            w.writerow([imgs[k].key, imgs[k + 1].key, "0.5", "train"])
        w.writerow([imgs[7].key, imgs[8].key, "0.4", "val"])
        w.writerow([imgs[8].key, imgs[9].key, "0.4", "validation"])
        w.writerow([imgs[0].key, imgs[9].key, "0.1", "test"])
    import deepssim_fast.training as T

    drawn: list[tuple[int, int]] = []
    val: list = []
    sample, fixed = T.PairSampler.sample, T.fixed_pairs

    in_fixed = [False]

    def spy_sample(self, n, rng):
        i, j, kinds = sample(self, n, rng)
        if not in_fixed[0]:  # the training batches (fixed_pairs draws the validation set the same way)
            drawn.extend(zip(i.tolist(), j.tolist(), strict=True))
        return i, j, kinds

    def spy_fixed(pool, n_pairs, seed, **kw):
        val.append(kw.get("pairs"))
        in_fixed[0] = True
        try:
            return fixed(pool, n_pairs, seed, **kw)
        finally:
            in_fixed[0] = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.PairSampler, "sample", spy_sample)
        mp.setattr(T, "fixed_pairs", spy_fixed)
        m = train(imgs, max_steps=2, pairs_csv=p, **SMALL)
    assert len(m.history) == 2 and m.best_val is not None
    # training draws only the CSV's "train" rows (images are the pool in list order); validation is its
    # "val" and "validation" rows; the "test" row is never used
    train_rows = {(k, k + 1) for k in range(6)}
    assert drawn and set(drawn) <= train_rows, drawn
    assert len(set(drawn)) > 1
    assert [sorted(map(tuple, v)) for v in val] == [[(7, 8), (8, 9)]]
    # keys by list position work for plain arrays
    q = tmp_path / "pos.csv"
    q.write_text("real_key,synth_key,ssim,split\n0,1,0.3,train\n2,3,0.2,train\n")
    assert len(train([s.array for s in imgs], max_steps=1, pairs_csv=q, **SMALL).history) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("real_key,synth_key,ssim,split\n0,nope,0.3,train\n")
    with pytest.raises(ValueError, match=r"line 2: key 'nope' matches no image"):
        train([s.array for s in imgs], max_steps=1, pairs_csv=bad, **SMALL)
    cols = tmp_path / "cols.csv"
    cols.write_text("a,b\n0,1\n")
    with pytest.raises(ValueError, match="expected columns"):
        train([s.array for s in imgs], max_steps=1, pairs_csv=cols, **SMALL)


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.skipif(importlib.util.find_spec("deepssim_fast.io") is None,
                    reason="deepssim_fast.io (the io engineer's module) is not in this tree yet")
def test_train_from_paths(tmp_path, mni_slices) -> None:
    for k, s in enumerate(mni_slices[:8]):
        np.save(tmp_path / f"slice_{k:02d}.npy", s.array)
    m = train(str(tmp_path), max_steps=1, **SMALL)
    assert len(m.history) == 1


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_training_input(mni_slices) -> None:
    imgs = [s.array.copy() for s in mni_slices[:4]]
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        train(imgs[:1], max_steps=1, **SMALL)
    with pytest.raises(ValueError, match="at least 2 images, got 0"):
        train([], max_steps=1, **SMALL)
    bad = [a.copy() for a in imgs]
    bad[2][5, 5] = np.inf
    with pytest.raises(ValueError, match=r"images\[2\]: contains NaN or Inf"):
        train(bad, max_steps=1, **SMALL)
    named = list(mni_slices[:3])
    arr = named[1].array.copy()
    arr[0, 0] = np.nan
    named[1] = data.Slice(arr, named[1].source, named[1].axis, named[1].index)
    with pytest.raises(ValueError, match=rf"images\[1\] \({named[1].key}\): contains NaN"):
        train(named, max_steps=1, **SMALL)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 64, 64\)"):
        train([np.zeros((2, 3, 64, 64)), np.zeros((64, 64))], max_steps=1, **SMALL)
    with pytest.raises(ValueError, match=r"val_images needs at least 2 images, got 1"):
        train(imgs, val_images=imgs[:1], max_steps=1, **SMALL)
    with pytest.raises(ValueError, match="max_steps"):
        train(imgs, max_steps=0, **SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        train(imgs, max_steps=1, **dict(SMALL, batch_size=1))
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        train(imgs, max_steps=1, **dict(SMALL, backbone="vit"))
    with pytest.raises(ValueError, match="pair_mix"):
        train(imgs, max_steps=1, pair_mix=(1.0, -1.0, 0.0), **SMALL)


def test_pairs_csv_with_a_bom_and_a_hash_in_a_folder_name(tmp_path):
    """Keys are 'path#axis:index': a '#' inside the path belongs to the path (the key splits at its last '#'),
    and a CSV saved by Excel (UTF-8 with a BOM) reads like any other."""
    from deepssim_fast.training import ImagePool, read_pairs_csv

    keys = [f"/data/run#3/scan{i}.nii.gz#2:{i}" for i in range(3)]
    pool = ImagePool(np.zeros((3, 8, 8), np.float32), keys, ["g"] * 3, [0, 1, 2])
    p = tmp_path / "pairs.csv"
    p.write_bytes("\ufeffreal_key,synth_key,ssim,split\nscan0.nii.gz,scan2,0.5,train\n".encode())
    pairs = read_pairs_csv(p, pool)
    assert [(a, b) for rows in pairs.values() for a, b, _ in rows] == [(0, 2)]


def _four_images():
    """A pool of four blank 8 x 8 images keyed /d/s0.npy#2:0 .. /d/s3.npy#2:0 (what the pairs-CSV tests read)."""
    from deepssim_fast.training import ImagePool

    return ImagePool(np.zeros((4, 8, 8), np.float32), [f"/d/s{i}.npy#2:0" for i in range(4)], ["g"] * 4,
                     [0, 1, 2, 3])


def _assert_csv_error(path, content: bytes, match: str) -> None:
    """Write ``content`` to ``path``; reading it as a pairs CSV of :func:`_four_images` raises ``match``."""
    from deepssim_fast.training import read_pairs_csv

    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_pairs_csv(path, _four_images())


def test_pairs_csv_rows_with_missing_fields_are_named(tmp_path) -> None:
    """A row with fewer fields than the header (a truncated line, a row missing its split) crashed with a bare
    AttributeError ('NoneType' object has no attribute 'strip') or TypeError from float(None), naming neither
    the file nor the line."""
    head = "real_key,synth_key,ssim,split\ns0,s1,0.5,train\n"
    for k, (row, missing) in enumerate((("s2,s3", "ssim, split"), ("s2", "synth_key, ssim, split"),
                                        ("s2,s3,0.4", "split"))):
        _assert_csv_error(tmp_path / f"short{k}.csv", (head + row + "\n").encode(),
                          rf"short{k}.csv line 3: no value for {missing}")


def test_pairs_csv_errors_name_the_line_of_the_file(tmp_path) -> None:
    """Errors named the row's position among the rows read plus one, not its line: blank lines (which the
    CSV reader skips) and a quoted field across lines put the named line before the bad one."""
    for name, text, match in (
            ("blank.csv", "real_key,synth_key,ssim,split\ns0,s1,0.5,train\n\n\ns2,nope,0.5,train\n",
             r"blank.csv line 5: key 'nope' matches no image"),
            ("quoted.csv", 'real_key,synth_key,ssim,split\ns0,s1,0.5,"train"\ns0,s1,0.5,"a\nb"\ns2,s3,x,train\n',
             r"quoted.csv line 5: ssim 'x' is not a number"),
            ("short.csv", "real_key,synth_key,ssim,split\n\ns2,s3\n", r"short.csv line 3: no value for ssim, split")):
        _assert_csv_error(tmp_path / name, text.encode(), match)


def test_pairs_csv_encoding_extra_fields_and_other_splits_are_named(tmp_path, caplog) -> None:
    """A Latin-1 file raised a bare UnicodeDecodeError naming neither file nor line; a row with more fields
    than the header was read as if it had none extra; rows of other splits (the reference's test pairs) were
    dropped without a word."""
    from deepssim_fast.training import read_pairs_csv

    _assert_csv_error(tmp_path / "latin.csv",
                      "real_key,synth_key,ssim,split\ns0,s1,0.5,train\ns2,s3,0.4,tr\xe9in\n".encode("latin-1"),
                      r"latin.csv line 3: not UTF-8 text \(byte 0xe9\)")
    _assert_csv_error(tmp_path / "long.csv", b"real_key,synth_key,ssim,split\ns0,s1,0.5,train\ns2,s3,0.4,train,extra\n",
                      r"long.csv line 3: 5 fields, the header has 4")
    pool = _four_images()
    r = tmp_path / "test.csv"
    r.write_text("real_key,synth_key,ssim,split\ns0,s1,0.5,train\ns2,s3,0.4,test\ns1,s3,0.4,test\n")
    with caplog.at_level(logging.INFO, logger="deepssim_fast.training"):
        out = read_pairs_csv(r, pool)
    assert out["train"] == [(0, 1, 0.5)] and "2 row(s) of split 'test' left out" in caplog.text


def test_pairs_csv_key_that_names_two_images_is_said_to_be_ambiguous(tmp_path) -> None:
    """Numbered files (0.npy ... 11.npy, listed 0, 1, 10, 11, 2, ...): the key '2' is the stem of 2.npy and
    the list position of 10.npy. Such keys were dropped as ambiguous and then reported as matching NO image,
    which sends the user looking for a missing file; the error now says which images the key names."""
    from deepssim_fast.training import ImagePool, read_pairs_csv

    keys = [f"/d/{n}.npy#2:0" for n in sorted(map(str, range(12)))]
    pool = ImagePool(np.zeros((12, 8, 8), np.float32), keys, keys, [0] * 12)
    p = tmp_path / "pairs.csv"
    p.write_text("real_key,synth_key,ssim,split\n0.npy,2.npy,0.5,train\n0,2,0.5,train\n")
    with pytest.raises(ValueError, match=r"line 3: key '2' is ambiguous: it names image 2 \(/d/10.npy#2:0\) and "
                                         r"image 4 \(/d/2.npy#2:0\)"):
        read_pairs_csv(p, pool)
    p.write_text("real_key,synth_key,ssim,split\n0.npy,2.npy,0.5,train\n1,/d/10.npy#2:0,0.5,train\n")
    assert read_pairs_csv(p, pool)["train"] == [(0, 4, 0.5), (1, 2, 0.5)]


def test_pairs_csv_takes_the_reference_keys(tmp_path) -> None:
    """The reference names an image <base>/<uid>/<name>.png by the key "<uid>___<name>"; its pairs CSVs
    matched no image here. Such a key now names the image whose folder and stem it gives."""
    from deepssim_fast.training import ImagePool, read_pairs_csv

    keys = ["/d/real/sub-01/slice_010.png#2:0", "/d/real/sub-02/slice_010.png#2:0", "/d/syn/gen-7/img.png#2:0"]
    pool = ImagePool(np.zeros((3, 8, 8), np.float32), keys, keys, [0] * 3)
    p = tmp_path / "pairs.csv"
    p.write_text("real_key,synth_key,ssim,split\nsub-02___slice_010,gen-7___img,0.25,train\n"
                 "sub-01___slice_010,gen-7___img,0.5,val\n")
    assert read_pairs_csv(p, pool) == {"train": [(1, 2, 0.25)], "val": [(0, 2, 0.5)]}
    p.write_text("real_key,synth_key,ssim,split\nsub-03___slice_010,gen-7___img,0.25,train\n")
    with pytest.raises(ValueError, match="line 2: key 'sub-03___slice_010' matches no image"):
        read_pairs_csv(p, pool)


def test_pairs_csv_ssim_column_is_compared_in_the_log(tmp_path, mni_slices, caplog) -> None:
    """The module docstring says the CSV ``ssim`` column is compared against the SSIM of the un-augmented
    pairs in the log; it was read and dropped. The comparison (against the images at the model input) is
    what shows a CSV whose keys name other images than the ones its SSIM was computed on."""
    imgs = [s.array for s in mni_slices[:6]]
    pool = make_pool(imgs, build_model("small", input_size=64).config)
    rows = [(0, 1), (1, 2), (2, 3), (4, 5)]
    truth = ssim_reference(pool.images[[i for i, _ in rows]], pool.images[[j for _, j in rows]],
                           spatial_dims=2, preset="deepssim")
    p = tmp_path / "pairs.csv"
    p.write_text("real_key,synth_key,ssim,split\n" + "".join(
        f"{i},{j},{t + 0.1 * (k == 3):.6f},{'val' if k == 3 else 'train'}\n"
        for k, ((i, j), t) in enumerate(zip(rows, truth, strict=True))))
    with caplog.at_level(logging.INFO, logger="deepssim_fast.training"):
        train(imgs, max_steps=1, pairs_csv=p, **SMALL)
    line = next((r.getMessage() for r in caplog.records if "ssim column" in r.getMessage()), "")
    assert "over 4 rows: MAE 0.0250, max 0.1000 (4, 5)" in line, line


def test_out_that_is_a_file_is_named_before_training(tmp_path, mni_slices) -> None:
    f = tmp_path / "not_a_dir"
    f.write_text("keep")
    with pytest.raises(NotADirectoryError, match="not_a_dir.*existing file"):
        train(mni_slices[:4], max_steps=1, out=f, **SMALL)
    assert f.read_text() == "keep"


def test_resume_with_another_backbone_is_an_error(tmp_path, mni_slices) -> None:
    imgs = mni_slices[:6]
    kw = dict(SMALL, batch_size=2, val_pairs=4)
    train(imgs, max_steps=1, out=tmp_path / "r", **kw)
    ck = tmp_path / "r" / "last.pt"
    with pytest.raises(ValueError, match="'small' checkpoint but backbone='resnet18'"):
        train(imgs, max_steps=2, resume=ck, **dict(kw, backbone="resnet18"))
    # without backbone= the checkpoint's is used
    m = train(imgs, max_steps=2, resume=ck, **{k: v for k, v in kw.items() if k != "backbone"})
    assert m.config.backbone == "small" and [r["step"] for r in m.history] == [2]


def test_resume_from_a_model_checkpoint_without_training_state_is_named(tmp_path, mni_slices) -> None:
    """resume= with a checkpoint written by save_checkpoint (model and config, no optimizer or step: a file
    load_model reads) crashed after the data were prepared with a bare KeyError: 'optimizer'."""
    plain = build_model("small", input_size=64).save_checkpoint(tmp_path / "model.pt")
    kw = {k: v for k, v in SMALL.items() if k != "backbone"}
    with pytest.raises(ValueError, match=r"model.pt.*has no training state \(optimizer, step\)"):
        train(mni_slices[:6], max_steps=2, resume=plain, **kw)


def test_bad_validation_and_schedule_arguments_are_named(mni_slices) -> None:
    """val_pairs=0 failed deep inside with torch's 'torch.cat(): expected a non-empty list of Tensors';
    a negative val_every validated at every step and a negative warmup_steps was ignored, both silently;
    seed=None failed with int()'s TypeError. Each is now an error naming the argument, before training; seed=None
    now means "not given" (42, or a resumed checkpoint's seed), and seed=1.5 is the error."""
    imgs = mni_slices[:6]
    for kw, name in ((dict(val_pairs=0), "val_pairs"), (dict(val_pairs=-3), "val_pairs"),
                     (dict(val_every=-1), "val_every"), (dict(val_every=0), "val_every"),
                     (dict(warmup_steps=-1), "warmup_steps")):
        with pytest.raises(ValueError, match=name):
            train(imgs, max_steps=1, **dict(SMALL, **kw))
    with pytest.raises(TypeError, match="seed must be an integer, got 1.5"):
        train(imgs, max_steps=1, seed=1.5, **SMALL)
    a = train(imgs, max_steps=1, seed=None, **SMALL)
    b = train(imgs, max_steps=1, seed=42, **SMALL)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]



def test_bad_evaluate_counts_are_named(mni_slices) -> None:
    """evaluate(n_pairs=0) failed with torch's bare 'torch.cat(): expected a non-empty list of Tensors',
    batch_size=0 with range()'s 'arg 3 must not be zero', seed=-1 with numpy's 'expected non-negative
    integer'; n_pairs=True evaluated one pair. Each is now an error naming the argument."""
    m = build_model("small", input_size=64)
    imgs = mni_slices[:6]
    for kw, name in ((dict(n_pairs=0), "n_pairs"), (dict(n_pairs=-3), "n_pairs"), (dict(n_pairs=2.5), "n_pairs"),
                     (dict(n_pairs=True), "n_pairs"), (dict(batch_size=0), "batch_size"),
                     (dict(batch_size=-1), "batch_size"), (dict(seed=-1), "seed")):
        with pytest.raises(ValueError, match=f"evaluate: {name} must be"):
            evaluate(m, imgs, **kw)
    with pytest.raises(TypeError, match="evaluate: seed must be an integer"):
        evaluate(m, imgs, seed=1.5)
    assert evaluate(m, imgs, n_pairs=np.int64(3), batch_size=2)["n"] == 3
    # a device other than the model's: the inputs were moved there and the model not (a device mismatch
    # deep in the forward pass on a GPU machine); now an error naming both, the model left where it is
    with pytest.raises(ValueError, match=r"device='meta' but the model's parameters are on 'cpu'"):
        evaluate(m, imgs, n_pairs=3, device="meta")
    assert next(m.parameters()).device.type == "cpu"
    assert evaluate(m, imgs, n_pairs=3, device="cpu")["n"] == 3

def test_a_large_val_fraction_leaves_two_training_images(mni_slices, caplog) -> None:
    """val_fraction=0.9 of 10 images asked for 9 validation images, which left 1 to train on: the split
    then dropped validation altogether and warned 'only 0 validation image(s)'. Training now keeps 2 images
    and the rest validate."""
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        m = train(mni_slices[:10], max_steps=1, val_fraction=0.9, **dict(SMALL, val_pairs=4))
    assert m.best_val is not None and "validation image" not in caplog.text


def test_val_fraction_zero_asks_for_no_validation_without_a_warning(mni_slices, caplog) -> None:
    """val_fraction=0 is how a caller asks for no validation; it warned 'only 0 validation image(s) ... give
    val_images= or more images' as if something had gone wrong."""
    with caplog.at_level(logging.INFO, logger="deepssim_fast.training"):
        m = train(mni_slices[:6], max_steps=1, val_fraction=0.0, **dict(SMALL, val_pairs=4))
    assert m.best_val is None
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "validation" in r.getMessage()]
    assert not warned and "val_fraction 0: no validation" in caplog.text


def test_a_split_too_small_to_validate_keeps_every_image_for_training(mni_slices, caplog) -> None:
    """val_fraction 0.1 of 9 images held out 1 image: too few to validate, so there was no validation, but
    the image was still left out of training, used for nothing (an epoch of 9 images at batch size 4 ran
    2 steps, as for 8). README: "fewer than 2 means no validation" — every image then trains."""
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        m = train(mni_slices[:9], epochs=1, val_fraction=0.1, **dict(SMALL, batch_size=4, val_pairs=4))
    assert m.best_val is None and "only 1 validation image(s)" in caplog.text
    assert len(m.history) == 3  # ceil(9 / 4) steps: all 9 images train


def test_resume_with_another_freeze_setting_is_an_error(tmp_path, mni_slices) -> None:
    """freeze_stages=True given with resume= of an unfrozen checkpoint was silently ignored (nothing frozen,
    the run went on unfrozen); like the other model settings, a value that differs is now an error."""
    imgs = mni_slices[:8]
    kw = dict(SMALL, batch_size=2, val_pairs=4)
    train(imgs, max_steps=1, out=tmp_path / "r", **kw)
    ck = tmp_path / "r" / "last.pt"
    base = {k: v for k, v in kw.items() if k != "backbone"}
    with pytest.raises(ValueError, match="freeze_stages=False but freeze_stages=True was given"):
        train(imgs, max_steps=2, resume=ck, freeze_stages=True, **base)
    m = train(imgs, max_steps=2, resume=ck, freeze_stages=False, **base)  # the same value is fine
    assert all(p.requires_grad for p in m.parameters())


def test_pairs_csv_without_validation_rows_validates_on_val_images(tmp_path, mni_slices, caplog) -> None:
    """With pairs_csv= and no validation rows in it, val_images= was silently dropped (no validation, no
    best.pt, no word said). It is now used; both validation sources at once is an error; neither says so."""
    imgs = mni_slices[:10]
    p = tmp_path / "pairs.csv"
    p.write_text("real_key,synth_key,ssim,split\n" + "".join(f"{k},{k + 1},0.5,train\n" for k in range(6)))
    arrays = [s.array for s in imgs]
    m = train(arrays, max_steps=2, pairs_csv=p, val_images=mni_slices[20:26], out=tmp_path / "o", **SMALL)
    assert m.best_val is not None and (tmp_path / "o" / "best.pt").is_file()
    assert m.history[-1]["val_loss"] is not None  # (validated at the end, on val_images' pairs)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        assert train(arrays, max_steps=1, pairs_csv=p, **SMALL).best_val is None
    assert "no validation rows" in caplog.text
    q = tmp_path / "val.csv"
    q.write_text(p.read_text() + "7,8,0.4,val\n")
    with pytest.raises(ValueError, match="1 validation rows and val_images= was given too"):
        train(arrays, max_steps=1, pairs_csv=q, val_images=mni_slices[20:26], **SMALL)


def test_a_new_run_does_not_leave_an_earlier_runs_best_pt(tmp_path, mni_slices, capsys) -> None:
    """A new (not resumed) run into an out= that held another run kept that run's best.pt when it had no
    validation of its own (or stopped before its first), beside its own last.pt and log.csv; the CLI then
    named that stale file as the trained checkpoint. The new run removes it; the CLI names last.pt."""
    from deepssim_fast.cli import main

    for k, s in enumerate(mni_slices[:8]):
        np.save(tmp_path / f"s{k}.npy", s.array)
    out = tmp_path / "out"
    args = ["train", "--images", str(tmp_path / "*.npy"), "--out", str(out), "--input-size", "64",
            "--batch-size", "2", "--max-steps", "1", "--val-pairs", "4", "-q"]
    assert main([*args, "--val-fraction", "0.5"]) == 0
    assert (out / "best.pt").is_file() and f"checkpoint: {out / 'best.pt'}" in capsys.readouterr().out
    assert main([*args, "--val-fraction", "0", "--seed", "7"]) == 0
    assert f"checkpoint: {out / 'last.pt'}" in capsys.readouterr().out
    assert not (out / "best.pt").exists()
    assert read_checkpoint(out / "last.pt")["seed"] == 7


def _fake_demo_training(tmp_path, monkeypatch) -> tuple[Path, list[dict]]:
    """The demo's encoder folder, and the calls of a stand-in for its 150 s training run (records each call's
    options, writes best.pt)."""
    import deepssim_fast.training as T

    calls: list[dict] = []

    def fake_train(images, **kw):
        calls.append(kw)
        m = build_model("small", input_size=32)
        m.save_checkpoint(tmp_path / "enc" / "best.pt")
        return m

    monkeypatch.setattr(T, "train", fake_train)
    enc = tmp_path / "enc"
    enc.mkdir()
    return enc, calls


def test_demo_does_not_reuse_the_encoder_of_a_stopped_training(tmp_path, monkeypatch) -> None:
    """The demo reused OUT/encoder/best.pt whenever it loaded, but the trainer writes best.pt at its first
    validation: a demo stopped during its 150 s of training (Ctrl-C, a kill) left a barely trained encoder
    that every later run reused as if finished. Only an encoder whose training finished is reused now."""
    import deepssim_fast.demo as demo

    enc, calls = _fake_demo_training(tmp_path, monkeypatch)
    build_model("small", input_size=32).save_checkpoint(enc / "best.pt")  # what a stopped run leaves
    demo._train_encoder(enc, seconds=1.0, seed=0, progress=False, retrain=False)
    assert len(calls) == 1, "the encoder of an unfinished training was reused"
    demo._train_encoder(enc, seconds=1.0, seed=0, progress=False, retrain=False)
    assert len(calls) == 1, "a finished encoder was not reused"
    demo._train_encoder(enc, seconds=1.0, seed=0, progress=False, retrain=True)
    assert len(calls) == 2


def test_validation_pairs_from_a_csv_are_each_validated_once(mni_slices) -> None:
    """A pairs CSV's validation rows were resampled with replacement (5 rows gave e.g. (2,3) twice, (8,9)
    twice and never (0,1) or (4,5)), so the validation loss was not over the CSV's pairs. fixed_pairs
    with pairs= now takes each pair once, in order."""
    from deepssim_fast.training import fixed_pairs

    pool = make_pool(mni_slices[:12], build_model("small", input_size=32).config)
    val = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    fp = fixed_pairs(pool, len(val), 42, pairs=val, augment=False, chunk=2)
    for k, (i, j) in enumerate(val):
        np.testing.assert_array_equal(fp.a[k].numpy(), pool.images[i])
        np.testing.assert_array_equal(fp.b[k].numpy(), pool.images[j])
    want = ssim_reference(torch.from_numpy(pool.images[[i for i, _ in val]]),
                          torch.from_numpy(pool.images[[j for _, j in val]]), spatial_dims=2, preset="deepssim")
    assert not _first_mismatch(fp.targets.numpy(), want, 1e-4)
    more = fixed_pairs(pool, 7, 42, pairs=val, augment=False)  # more pairs than rows: in turn
    np.testing.assert_array_equal(more.a[5].numpy(), pool.images[0])
    np.testing.assert_array_equal(more.b[6].numpy(), pool.images[3])


def test_bad_zoom_out_is_named_before_the_images_are_read(tmp_path) -> None:
    """--zoom-out 1.5 was refused only after every image had been read (minutes on a large folder)."""
    from deepssim_fast.training import train

    with pytest.raises(ValueError, match="zoom"):
        train(str(tmp_path / "no_such_folder"), backbone="small", max_steps=1, zoom_out=(1.5,), progress=False)


def test_demo_retrains_when_the_cached_encoder_had_other_settings(tmp_path, monkeypatch, caplog) -> None:
    """`demo --train-seconds 0` then a plain `demo` reused the one-step encoder (the marker records the
    settings, but they were not compared), missing the demo's targets without saying why."""
    import deepssim_fast.demo as demo

    enc, calls = _fake_demo_training(tmp_path, monkeypatch)
    demo._train_encoder(enc, seconds=0.0, seed=0, progress=False, retrain=False)
    demo._train_encoder(enc, seconds=0.0, seed=0, progress=False, retrain=False)
    assert [c["time_limit"] for c in calls] == [0.0]  # same settings: reused
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.demo"):
        demo._train_encoder(enc, seconds=150.0, seed=0, progress=False, retrain=False)
    assert [c["time_limit"] for c in calls] == [0.0, 150.0]
    assert "was trained with train_seconds=0.0, not train_seconds=150.0" in caplog.text
    demo._train_encoder(enc, seconds=150.0, seed=7, progress=False, retrain=False)
    assert [c["seed"] for c in calls] == [0, 0, 7]
    demo._train_encoder(enc, seconds=150.0, seed=7, progress=False, retrain=False)
    assert len(calls) == 3


@pytest.mark.parametrize("name, value", [("time_limit", float("nan")), ("time_limit", -1.0),
                                         ("cpu_time_limit", float("nan")), ("cpu_time_limit", "5")])
def test_time_limits_are_checked(name: str, value, mni_slices) -> None:
    """time_limit=nan ran without any limit (NaN compares False), -1 stopped after one step."""
    with pytest.raises(ValueError, match=f"{name} must be a non-negative number of seconds"):
        train(mni_slices[:4], backbone="small", input_size=32, max_steps=1, **{name: value})


def test_a_run_without_validation_can_be_resumed_after_a_kill(tmp_path, mni_slices, monkeypatch) -> None:
    """Without validation (val_fraction 0, or too few images to split), last.pt was written only at the end: a
    run killed at any step before could not be resumed and all its steps were lost. last.pt now comes every
    val_every steps (once per epoch by default) whatever the validation."""
    from deepssim_fast import training as tr

    imgs = mni_slices[:16]
    kw = dict(SMALL, seed=5, val_fraction=0.0, val_every=2)
    full = train(imgs, max_steps=6, out=tmp_path / "full", **kw)
    real_row = tr._Logger.row

    def killed_at_step_5(self, row):
        real_row(self, row)
        if row["step"] == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tr._Logger, "row", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(imgs, max_steps=6, out=tmp_path / "k", **kw)
    monkeypatch.setattr(tr._Logger, "row", real_row)
    assert read_checkpoint(tmp_path / "k" / "last.pt")["step"] == 4
    rest = train(imgs, max_steps=6, out=tmp_path / "k", resume=tmp_path / "k" / "last.pt", **kw)
    assert [r["step"] for r in rest.history] == [5, 6]
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in full.history[4:]]
    w_full = read_checkpoint(tmp_path / "full" / "last.pt")["model"]
    w_rest = read_checkpoint(tmp_path / "k" / "last.pt")["model"]
    assert all(torch.equal(w_full[k], w_rest[k]) for k in w_full)


def test_resume_on_other_training_images_is_warned(tmp_path, mni_slices, caplog) -> None:
    """A resume on another image set breaks the loss curve the resume promises; the run settings were compared,
    the images not at all."""
    kw = dict(SMALL, batch_size=2, val_pairs=4, seed=3)
    train(mni_slices[:8], max_steps=1, out=tmp_path / "r", **kw)
    resume = dict(kw, resume=tmp_path / "r" / "last.pt")
    del resume["backbone"]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(mni_slices[:8], max_steps=2, out=tmp_path / "same", **resume)
    assert "other settings" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(mni_slices[8:16], max_steps=2, out=tmp_path / "other", **resume)
    assert re.search(r"other settings than its run \(train_images '8 images \(pixels [0-9a-f]+\)' -> "
                     r"'8 images \(pixels [0-9a-f]+\)'\)", caplog.text)


def test_train_arguments_are_checked_before_the_images_are_read(tmp_path, mni_slices) -> None:
    """seed=-1 failed after every image was read, in numpy's "expected non-negative integer" (2**70: torch's
    "Overflow when unpacking long long"); device='cuda' without CUDA in torch's AssertionError; a NaN pair_mix
    at the first draw ("Probabilities contain NaN"); max_steps=True ran one step."""
    missing = tmp_path / "not_read"  # (a path never read: each error comes first)
    for seed in (-1, 2**70):
        with pytest.raises(ValueError, match=f"seed must be a non-negative integer below 2\\*\\*63, got {seed}"):
            train(str(missing), max_steps=1, seed=seed, **SMALL)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available here"):
            train(str(missing), max_steps=1, device="cuda", **SMALL)
    for name, v in (("max_steps", True), ("epochs", True), ("val_every", np.bool_(True))):
        with pytest.raises(ValueError, match=name):
            train(str(missing), **{"max_steps": 1, **SMALL, name: v})
    with pytest.raises(ValueError, match="batch_size"):
        train(str(missing), max_steps=1, **dict(SMALL, batch_size=True))
    for mix in ((float("nan"), 1, 1), (float("inf"), 1, 1)):
        with pytest.raises(ValueError, match="pair_mix must be three finite non-negative weights"):
            train([s.array for s in mni_slices[:4]], max_steps=1, pair_mix=mix, **SMALL)


def test_a_file_too_small_for_the_encoder_is_left_out_as_an_unreadable_one(tmp_path, mni_slices) -> None:
    """A 5 x 5 image among the files aborted train (and embed, named "images[5]", its position among the files
    kept) after every file was read; unreadable files are left out with a warning, and so is it now (--strict:
    an error naming it)."""
    from deepssim_fast.data import DataError

    d = tmp_path / "imgs"
    d.mkdir()
    for i, s in enumerate(mni_slices[:4]):
        np.save(d / f"s{i}.npy", s.array)
    np.save(d / "tiny.npy", np.ones((5, 5), np.float32))
    model = train(str(d), max_steps=1, val_fraction=0.0, **SMALL)
    assert [Path(p).name for p, _ in model.skipped] == ["tiny.npy"]
    assert "image of shape (5, 5) is too small for the encoder" in model.skipped[0][1]
    with pytest.raises(DataError, match=r"tiny.npy: image of shape \(5, 5\) is too small"):
        train(str(d), max_steps=1, val_fraction=0.0, strict=True, **SMALL)


def test_setup_errors_come_before_the_earlier_run_is_touched(tmp_path, mni_slices) -> None:
    """tensorboard=True without tensorboard failed when the log opened: after the earlier run's best.pt and
    last.pt had been removed and its log.csv rewritten. A missing pairs CSV, a scalar zoom_out: found after every
    image was read, or in Python's words ("'float' object is not iterable")."""
    imgs = [s.array for s in mni_slices[:8]]
    kw = dict(SMALL, batch_size=2, val_pairs=4, val_fraction=0.25)
    train(imgs, max_steps=2, out=tmp_path / "o", **kw)
    before = {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()}
    assert set(before) == {"best.pt", "last.pt", "log.csv"}
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the tensorboard package"):
            train(imgs, max_steps=2, out=tmp_path / "o", tensorboard=True, **kw)
        assert {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()} == before
    with pytest.raises(ValueError, match="tensorboard=True needs out="):
        train(str(tmp_path / "not_read"), max_steps=2, tensorboard=True, **kw)
    with pytest.raises(FileNotFoundError, match="pairs CSV .*missing.csv: no such file"):
        train(str(tmp_path / "not_read"), max_steps=2, pairs_csv=tmp_path / "missing.csv", **kw)
    for z in (0.5, "0.5", [0.5, "x"]):
        with pytest.raises(ValueError, match="zoom_out must be a sequence of factors"):
            train(str(tmp_path / "not_read"), max_steps=2, zoom_out=z, **kw)


def test_pairs_csv_positions_after_a_skipped_file_and_other_splits(tmp_path, mni_slices, caplog) -> None:
    """With a file left out (unreadable), a list position named the image after the gap (key 2 -> a3.png):
    refused now (every position, once a file is out). Rows of split 'training' were left out with an INFO
    line; they train, and rows of unknown splits are warned about. A resume on another pairs CSV (other
    training data) is warned too."""
    from deepssim_fast.data import Slice
    from deepssim_fast.training import read_pairs_csv

    d = tmp_path / "imgs"
    d.mkdir()
    for i, s in enumerate(mni_slices[:5]):
        np.save(d / f"a{i}.npy", s.array)
    (d / "a2.npy").write_bytes(b"not an array")
    csv_path = tmp_path / "pos.csv"
    csv_path.write_text("real_key,synth_key,ssim,split\n1,2,0.5,train\n")
    with pytest.raises(ValueError, match=r"line 2: key '1' is a list position, but 1 file\(s\) were left out "
                                         r"\(e.g. .*a2.npy\)"):
        train(str(d), max_steps=1, pairs_csv=csv_path, **SMALL)
    named = tmp_path / "named.csv"
    named.write_text("real_key,synth_key,ssim,split\na1,a3,0.5,training\na0,a4,0.5,train\na1,a4,0.5,tst\n")
    from deepssim_fast.model import ModelConfig

    pool = make_pool([Slice(s.array, str(d / f"a{i}.npy"), 2, 0) for i, s in enumerate(mni_slices[:5])],
                     ModelConfig(backbone="small", input_size=64))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        rows = read_pairs_csv(named, pool)
    assert rows["train"] == [(1, 3, 0.5), (0, 4, 0.5)] and rows["tst"] == [(1, 4, 0.5)]
    assert "1 row(s) of split 'tst'" in caplog.text
    # a resume on other CSV pairs
    imgs = [Slice(s.array, str(d / f"a{i}.npy"), 2, 0) for i, s in enumerate(mni_slices[:5])]
    kw = dict(SMALL, batch_size=2, val_pairs=4, seed=1)
    train(imgs, max_steps=1, out=tmp_path / "r", pairs_csv=named, **kw)
    other = tmp_path / "other.csv"
    other.write_text("real_key,synth_key,ssim,split\na0,a1,0.5,train\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, max_steps=2, resume=tmp_path / "r" / "last.pt", pairs_csv=other,
              **{k: v for k, v in kw.items() if k != "backbone"})
    assert re.search(r"other settings than its run \(.*pairs_csv '\w+' -> '\w+'", caplog.text)


def test_frozen_stages_keep_their_batchnorm_statistics(mni_slices) -> None:
    """freeze_stages froze the weights of stages 0-1, but their BatchNorm running statistics still moved with
    every training batch, so the "frozen" stem computed something else after training."""
    model = train([s.array for s in mni_slices[:8]], max_steps=3, freeze_stages=True,
                  **dict(SMALL, batch_size=4, val_pairs=4))
    fresh = build_model("small", input_size=64, freeze_stages=True)
    frozen_bn = [n for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and all(not p.requires_grad for p in m.parameters(recurse=False))]
    assert frozen_bn, "the small backbone's frozen stages have BatchNorm layers"
    fm = dict(fresh.backbone.named_modules())
    for n in frozen_bn:
        m = dict(model.backbone.named_modules())[n]
        assert torch.equal(m.running_mean, fm[n].running_mean) and torch.equal(m.running_var, fm[n].running_var)
    model.train()
    assert all(not dict(model.backbone.named_modules())[n].training for n in frozen_bn)
    assert model.head.training  # (the rest trains as before)


def test_evaluate_takes_what_embed_takes_and_does_not_depend_on_the_batch_size(tmp_path, mni_slices) -> None:
    """evaluate("model.pt", ...) failed in "'str' object has no attribute 'config'", a float64 model in torch's
    dtype mismatch, 64 x 64 pairs on a 32-input model gave numbers; images beside pairs were ignored; and its
    scores moved in the last bits with batch_size (a final batch of one: another convolution code path)."""
    from deepssim_fast.model import ModelConfig, save_checkpoint
    from deepssim_fast.training import fixed_pairs

    torch.manual_seed(0)
    m = build_model("small", input_size=64)
    ckpt = save_checkpoint(tmp_path / "m.pt", m)
    pool = make_pool(mni_slices[:6], ModelConfig(backbone="small", input_size=64))
    fp = fixed_pairs(pool, 40, 0)
    base = evaluate(m, pairs=fp, batch_size=64)
    for bs in (1, 3, 7):
        got = evaluate(m, pairs=fp, batch_size=bs)
        assert got["mse"] == base["mse"] and got["mae"] == base["mae"], bs
    assert evaluate(str(ckpt), pairs=fp)["mse"] == base["mse"]
    m64 = build_model("small", input_size=64).double()
    assert np.isfinite(evaluate(m64, pairs=fp)["mse"])
    with pytest.raises(ValueError, match="give images or pairs, not both"):
        evaluate(m, mni_slices[:6], pairs=fp)
    small_pool = make_pool(mni_slices[:6], ModelConfig(backbone="small", input_size=32))
    with pytest.raises(ValueError, match=r"pairs of \(32, 32\) images, but the model takes 64 x 64"):
        evaluate(m, pairs=fixed_pairs(small_pool, 4, 0))


def test_resume_says_what_it_cannot_honour(tmp_path, mni_slices, caplog) -> None:
    """Three resumes that misled without a word: another seed was ignored (the checkpoint's continues); other
    validation pairs kept the old best.pt and reported the old set's loss as the best; a total at or below the
    checkpoint's step trained nothing and reported success."""
    kw = dict(SMALL, batch_size=2, val_pairs=4, seed=3, val_every=1, val_fraction=0.25)
    train(mni_slices[:24], max_steps=2, out=tmp_path / "r", **kw)
    ck = read_checkpoint(tmp_path / "r" / "last.pt")
    resume = dict(kw, resume=tmp_path / "r" / "last.pt")
    del resume["backbone"]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        a = train(mni_slices[:24], max_steps=3, out=tmp_path / "a", **dict(resume, seed=7))
    assert re.search(r"seed 7 given, but .*last\.pt continues the run of seed 3 .*: seed 7 is not used", caplog.text)
    assert read_checkpoint(tmp_path / "a" / "last.pt")["seed"] == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):  # not given: no warning, seed 3
        b = train(mni_slices[:24], max_steps=3, out=tmp_path / "b", **dict(resume, seed=None))
    assert "is not used" not in caplog.text
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(mni_slices[:24], max_steps=3, out=tmp_path / "v", val_images=mni_slices[30:36], **resume)
    assert re.search(r"on other validation pairs than its run's \(validation, val_images\): its best validation "
                     r"loss [\d.e-]+ is not comparable, so best.pt is replaced", caplog.text), caplog.text
    best = read_checkpoint(tmp_path / "v" / "best.pt")
    assert best["step"] == 3 and best["best_val"] != ck["best_val"]  # chosen on the new pairs
    caplog.clear()  # other --val images than a run that had --val images: the same (an image digest tells them)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(mni_slices[:24], max_steps=4, out=tmp_path / "v2", val_images=mni_slices[40:46],
              **dict(resume, resume=tmp_path / "v" / "last.pt"))
    assert re.search(r"on other validation pairs than its run's \(val_images\)", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(mni_slices[:24], max_steps=2, out=tmp_path / "n", **resume)
    assert re.search(r"at step 2 with 2 steps in all: there is nothing left to train", caplog.text)


def test_training_removes_the_temporaries_of_killed_checkpoint_writes(tmp_path, mni_slices) -> None:
    """A SIGKILL during a checkpoint write left .last.pt.<random>.tmp behind (2.4 MB for `small`, ~350 MB for
    convnext_base), and no run removed them. A run removes those of its outputs at least 10 minutes old (a
    younger one may be another run's write in progress)."""
    out = tmp_path / "o"
    out.mkdir()
    old, young = out / ".last.pt.0123abcd.tmp", out / ".best.pt.89abcdef.tmp"
    for f in (old, young):
        f.write_bytes(b"partial checkpoint")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    train(mni_slices[:8], max_steps=1, out=out, **dict(SMALL, batch_size=2, val_pairs=4))
    assert not old.exists() and young.exists()


def test_validation_files_that_are_training_files_are_named(tmp_path, mni_slices, caplog) -> None:
    """train --images D --val D (or a val folder holding copies by link) validated on the training images, and
    best.pt was chosen by them, without a word. A warning names them now; distinct files say nothing."""
    files = []
    for i, sl in enumerate(mni_slices[:8]):
        files.append(tmp_path / f"s{i}.npy")
        np.save(files[-1], sl.array)
    (tmp_path / "val").mkdir()
    os.symlink(files[0], tmp_path / "val" / "same.npy")
    np.save(tmp_path / "val" / "other.npy", mni_slices[9].array)
    kw = dict(SMALL, batch_size=2, val_pairs=4, max_steps=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(files, val_images=[files[1], tmp_path / "val" / "same.npy", tmp_path / "val" / "other.npy"], **kw)
    (msg,) = [r.getMessage() for r in caplog.records if "training images too" in r.getMessage()]
    assert msg.startswith("2 of the val_images files are training images too (e.g. ") and str(files[1]) in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(files[:6], val_images=files[6:], **kw)
    assert "training images too" not in caplog.text


def test_evaluate_checks_a_foreign_models_output_as_embed_does(tmp_path, mni_slices) -> None:
    """evaluate/predict_pairs called the model without embed's checks: a module without parameters gave a bare
    StopIteration, one returning a tuple a TypeError from cosine_similarity, NaN output a NaN MSE reported as
    a result. Each is embed's clear error now."""
    import torch.nn as nn

    from deepssim_fast.model import load_model
    from deepssim_fast.training import evaluate

    class Tup(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1)[:, :8], x.flatten(1)[:, :8]

    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :8] * float("nan")

    class Plain(nn.Module):  # (no parameters at all)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :8] + 1.0

    imgs = [s.array for s in mni_slices[:6]]
    for cls, msg in ((Tup, "model returned a tuple, not a tensor of embeddings"),
                     (Nan, "model produced NaN/Inf embeddings"), (Plain, None)):
        p = tmp_path / f"{cls.__name__}.pt"
        torch.jit.save(torch.jit.script(cls()), str(p))
        m = load_model(p, input_size=32, size_policy="fit")
        if msg is None:
            r = evaluate(m, imgs, n_pairs=8)
            assert r["n"] == 8 and np.isfinite(r["mae"])
        else:
            with pytest.raises(ValueError, match=msg):
                evaluate(m, imgs, n_pairs=8)


def test_validation_holds_out_whole_volumes_and_a_diverged_model_is_not_returned(tmp_path: Path, caplog) -> None:
    """Probe findings: the default split held out single slices, each beside a training slice of the same
    volume (near-copies: best.pt was chosen on an optimistic loss); it holds out whole files now, and says so
    where it cannot. At a huge learning rate the loss stayed finite while BatchNorm's running statistics
    overflowed, and train returned and saved a model that embedded to NaN. And lr=np.float32(1e-3) was refused."""
    import importlib
    import logging

    tr = importlib.import_module("deepssim_fast.training")
    keys = [f"/d/v{v}.nii.gz#2:{i}" for v in range(10) for i in range(30)]
    a, b = tr._split_train_val(len(keys), 0.1, 42, keys)
    held = {keys[i].split("#")[0] for i in b}
    assert len(b) == 30 and held.isdisjoint({keys[i].split("#")[0] for i in a})
    flat = [f"/d/s{i}.png#2:0" for i in range(50)]  # (2D files: one image each, split as before)
    assert all(np.array_equal(x, y) for x, y in zip(tr._split_train_val(50, 0.1, 42, flat),
                                                    tr._split_train_val(50, 0.1, 42), strict=True))
    two = [f"/d/v{v}.nii.gz#2:{i}" for v in range(2) for i in range(30)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        a, b = tr._split_train_val(len(two), 0.1, 42, two)
    assert len(b) == 6 and any("beside their neighbours" in m for m in caplog.messages)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):  # (val_split="images": knowingly)
        a2, b2 = tr._split_train_val(len(two), 0.1, 42, None)
    assert np.array_equal(a2, a) and np.array_equal(b2, b) and not caplog.messages  # (the same slices, unsaid)

    rng = np.random.default_rng(0)
    imgs = [rng.random((40, 40), dtype=np.float32) for _ in range(6)]
    with pytest.raises(ValueError, match="val_split must be 'files' or 'images'"):
        train(imgs, max_steps=1, val_split="volumes", **SMALL)
    with pytest.raises(FloatingPointError, match=r"holds non-finite values .*lower the learning rate"):
        train(imgs, max_steps=5, lr=1e6, val_fraction=0, out=tmp_path / "o", **{**SMALL, "batch_size": 4})
    if (tmp_path / "o" / "last.pt").exists():  # (an earlier step's checkpoint, saved while still finite)
        ck = read_checkpoint(tmp_path / "o" / "last.pt")
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    m = train(imgs, max_steps=1, lr=np.float32(1e-3), val_fraction=0, **{**SMALL, "batch_size": 4})
    assert m.history[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        train(imgs, max_steps=1, lr=True, val_fraction=0, **SMALL)
    from deepssim_fast import embed

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        embed(imgs, m, batch_size=True)


def test_a_training_set_of_blank_images_is_said(caplog) -> None:
    """A training set of constant images trained to a loss of ~0 without a word."""
    import logging

    imgs = [np.full((40, 40), float(i), np.float32) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, max_steps=1, val_fraction=0, **{**SMALL, "batch_size": 4})
    assert any("every training image is constant" in m for m in caplog.messages)


def test_split_review_mends(tmp_path: Path, caplog) -> None:
    """Review mends of the file-wise validation split: a 4D series' frames are one file (a frame was held out
    and the other frames of the same scan trained on); 2D files beside volumes that leave every volume out of
    validation are said; files too large for the fraction are said as such; a diverged model with validation
    on stops with FloatingPointError too (a ValueError from the validation's NaN embeddings); val_split beside
    val_images is refused; a pairs CSV naming a column twice is refused."""
    import importlib
    import logging

    tr = importlib.import_module("deepssim_fast.training")
    series = [f"/d/fmri.nii.gz@t{t}#2:{i}" for t in range(10) for i in range(30)]
    vols = [f"/d/v{v}.nii.gz#2:{i}" for v in range(3) for i in range(30)]
    keys = series + vols

    def files(idx):  # noqa: ANN001, ANN202
        return {re.sub(r"@t\d+$", "", keys[i].split("#")[0]) for i in idx}

    for seed in range(5):
        a, b = tr._split_train_val(len(keys), 0.1, seed, keys)
        assert files(a).isdisjoint(files(b)), (seed, files(b))
    pngs = [f"/d/s{i}.png#2:0" for i in range(20)]
    big = [f"/d/v{v}.nii.gz#2:{i}" for v in range(4) for i in range(30)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        tr._split_train_val(140, 0.1, 0, pngs + big)
        many = [f"/d/v{v}.nii.gz#2:{i}" for v in range(50) for i in range(100)]
        tr._split_train_val(5000, 0.005, 42, many)
    assert any("single-image files only" in m for m in caplog.messages), caplog.messages
    assert any("every file gives more slices than 50" in m for m in caplog.messages), caplog.messages

    rng = np.random.default_rng(0)
    imgs = [rng.random((40, 40), dtype=np.float32) for _ in range(12)]
    with pytest.raises(FloatingPointError, match="training diverged by step .*lower the learning rate"):
        train(imgs, max_steps=5, lr=1e6, val_fraction=0.34, val_every=1, **{**SMALL, "batch_size": 4})
    with pytest.raises(ValueError, match="does not apply with val_images"):
        train(imgs[:6], val_images=imgs[6:], val_split="images", max_steps=1, **SMALL)
    csvf = tmp_path / "p.csv"
    csvf.write_text("real_key,synth_key,ssim,ssim,split\n0,1,0.1,0.8,train\n")
    with pytest.raises(ValueError, match=r"names column\(s\) ssim more than once"):
        tr.read_pairs_csv(csvf, tr.ImagePool(np.zeros((2, 8, 8), np.float32), ["0", "1"], ["g", "g"], [0, 1]))


# ---------------------------------------------------------------------------------------------- probe r3 mends
TINY = dict(backbone="small", input_size=32, batch_size=2, val_pairs=4, progress=False)


def test_a_resume_sets_aside_a_best_pt_written_past_its_checkpoint(tmp_path, mni_slices, caplog, capsys) -> None:
    """A run killed between writing best.pt and last.pt at a validation left best.pt a step past last.pt; a
    resume whose validations never beat the checkpoint's best kept it, and the CLI printed the checkpoint's
    loss beside a best.pt of other weights and another loss (the warning said "in K or K"). That best.pt is set
    aside now, and the CLI names last.pt when no best.pt holds the loss it prints."""
    from deepssim_fast.cli import main

    for k, s in enumerate(mni_slices[:8]):
        np.save(tmp_path / f"s{k}.npy", s.array)
    out = tmp_path / "K"
    args = ["train", "--images", str(tmp_path / "*.npy"), "--out", str(out), "--input-size", "32", "--batch-size",
            "2", "--max-steps", "2", "--val-pairs", "4", "--val-every", "2", "--val-fraction", "0.25", "-q"]
    assert main(args) == 0
    capsys.readouterr()
    ck = torch.load(out / "best.pt", weights_only=True)  # what the kill leaves: best.pt of step 4, last.pt of 2
    assert ck["step"] == 2 == read_checkpoint(out / "last.pt")["step"]
    ck.update(step=4, best_val=ck["best_val"] / 2,
              model={k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()})
    torch.save(ck, out / "best.pt")
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):  # (nothing left: no validation)
        assert main(["train", "--images", str(tmp_path / "*.npy"), "--out", str(out), "--resume",
                     str(out / "last.pt"), "-q"]) == 0
    said = capsys.readouterr().out
    assert f"checkpoint: {out / 'last.pt'}" in said and "no best.pt holds" in said, said
    assert not (out / "best.pt").exists() and read_checkpoint(out / "best.step4.pt")["step"] == 4
    assert f"moved to {out / 'best.step4.pt'}" in caplog.text and "past the resumed step 2" in caplog.text
    assert f"(in {out})" in caplog.text, caplog.text  # (the folder once, not "in K or K")
    # a best.pt of another loss (another run's, at an earlier step) is set aside too; the checkpoint's own stays
    ck.update(step=1)
    torch.save(ck, out / "best.pt")
    train([s.array for s in mni_slices[:8]], resume=out / "last.pt", out=out, progress=False)
    assert not (out / "best.pt").exists() and (out / "best.step1.pt").is_file()


def test_a_resume_from_best_pt_behind_last_pt_is_said(tmp_path, mni_slices, caplog) -> None:
    """--resume OUT/best.pt while OUT/last.pt was further on trained the later steps again and overwrote last.pt
    without a word."""
    imgs = [s.array for s in mni_slices[:8]]
    out = tmp_path / "R"
    train(imgs, max_steps=2, val_every=2, val_fraction=0.25, val_split="images", out=out, **TINY)
    ck = torch.load(out / "last.pt", weights_only=True)
    ck["step"] = 4  # (a run on to step 4, whose best came at step 2)
    torch.save(ck, out / "last.pt")
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, max_steps=3, resume=out / "best.pt", out=out, progress=False)
    assert f"resuming {out / 'best.pt'} at step 2, but {out / 'last.pt'} is at step 4" in caplog.text, caplog.text
    assert "is not this run's best.pt" not in caplog.text  # (the resumed file itself is kept)
    assert read_checkpoint(out / "last.pt")["step"] == 3


def test_a_resume_on_re_oriented_images_is_warned_and_old_digests_stay_resumable(tmp_path, mni_slices,
                                                                                  caplog) -> None:
    """The training images' digest was of per-image pixel sums: the same images, every one flipped, passed for
    the same set (no warning; the new validation loss was compared with the old set's best). It is of the
    pixels now; a checkpoint with a digest of the older kind is resumed without a warning (unknown, not a
    change), unless its image count differs."""
    imgs = [data.center_fit(s.array, (32, 32)) for s in mni_slices[:8]]  # (at the input size: flipped as fitted)
    train(imgs, max_steps=1, val_fraction=0.25, val_split="images", out=tmp_path / "r", **TINY)
    resume = dict(resume=tmp_path / "r" / "last.pt", max_steps=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train([np.ascontiguousarray(a[:, ::-1]) for a in imgs], out=tmp_path / "flip", **resume)
    assert "train_images '6 images (pixels " in caplog.text and "val_images" in caplog.text, caplog.text
    assert "on other validation pairs" in caplog.text
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    ck["train_args"].update(train_images="6 images (0123456789ab)", val_images="2 images (ba9876543210)")
    torch.save(ck, tmp_path / "r" / "last.pt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, out=tmp_path / "old", **resume)
    assert "other settings" not in caplog.text and "other validation pairs" not in caplog.text, caplog.text
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs + imgs[:4], out=tmp_path / "more", **resume)
    assert "train_images '6 images (0123456789ab)' -> '9 images (pixels " in caplog.text, caplog.text


def test_a_stack_of_slices_splits_as_one_volume(caplog) -> None:
    """A stack (N, H, W) is one volume to the pair sampler (neighbour pairs by position), but the validation
    split held out single slices beside their neighbours without the warning files get."""
    rng = np.random.default_rng(0)
    base = rng.random((40, 40), dtype=np.float32)
    stack = np.stack([base + 0.1 * k + 0.2 * rng.random((40, 40), dtype=np.float32) for k in range(8)])
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        m = train(stack, max_steps=1, val_fraction=0.25, **TINY)
    assert any("arrays without files" in r and "beside their neighbours" in r for r in caplog.messages), \
        caplog.messages
    assert m.best_val is not None  # (single slices are held out, as documented)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):  # knowingly: no warning
        train(stack, max_steps=1, val_fraction=0.25, val_split="images", **TINY)
    assert not any("beside their neighbours" in r for r in caplog.messages)


def test_a_validation_set_of_blank_images_is_said(mni_slices, caplog) -> None:
    """Blank validation images (every target 1: best.pt chosen on nothing) were not warned about; the all-blank
    warning covered the training images only."""
    imgs = [s.array for s in mni_slices[:6]]
    blank = [np.full((40, 40), float(v), np.float32) for v in (0.0, 3.0)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, val_images=blank, max_steps=1, **TINY)
    assert any("every validation image is constant" in r for r in caplog.messages), caplog.messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        train(imgs, val_images=[s.array for s in mni_slices[6:8]], max_steps=1, **TINY)
    assert not any("constant" in r for r in caplog.messages)


def test_a_blank_image_stays_exactly_blank_through_augmentation(mni_slices) -> None:
    # the rotation's bilinear resampling left ~1e-7 noise on a blank of a non-zero value (-1 on data scaled to
    # [-1, 1], CT air -1024); the z-score of the SSIM target blew it up: a blank/blank pair's target 0.02-0.3
    values = (-1.0, -1024.0, 0.0, 0.3)
    blanks = np.stack([np.full((64, 64), v, np.float32) for v in values for _ in range(10)])
    aug = Augmenter()
    for seed in range(3):
        np.testing.assert_array_equal(aug(blanks, seed), blanks)
    real = [np.asarray(s.array, np.float32) for s in mni_slices[8:14]]
    scaled = [2 * (a - a.min()) / (a.max() - a.min()) - 1 for a in real]
    pool = make_pool(scaled + [np.full_like(scaled[0], -1.0)] * 4, build_model("small", input_size=64).config)
    fp = fixed_pairs(pool, 32, seed=0, pairs=[(6, 6), (7, 7), (8, 9), (0, 1)] * 8)
    blank_pairs = [k for k in range(32) if k % 4 != 3]
    np.testing.assert_array_equal(fp.targets.numpy()[blank_pairs], 1.0)
    np.testing.assert_array_equal(fp.a.numpy()[blank_pairs], -1.0)
    assert any(not np.array_equal(fp.a[k].numpy(), pool.images[0]) for k in range(3, 32, 4)), \
        "the other images are still augmented"


def test_a_resume_with_nothing_left_keeps_a_newer_last_pt(tmp_path, caplog) -> None:
    """A resume with nothing left to train copied the resumed checkpoint to out/last.pt (226ff01) even where
    out/last.pt was further on: o2/last.pt of step 8 became the step-4 checkpoint, and log.csv was cut back to
    step 4, silently; the warning said steps 5-8 were trained again and last.pt overwritten at this run's first
    checkpoint, where nothing was trained. out is now left as it was, and the warning says so."""
    imgs = list(np.random.default_rng(0).random((16, 32, 32), dtype=np.float32))
    full, o2 = tmp_path / "full", tmp_path / "o2"
    train(imgs, max_steps=4, out=full, **TINY)
    train(imgs, resume=full / "last.pt", max_steps=8, out=o2, progress=False)
    assert read_checkpoint(o2 / "last.pt")["step"] == 8
    before = {p.name: p.read_bytes() for p in o2.iterdir() if p.is_file()}
    assert {"last.pt", "log.csv"} <= set(before)
    with caplog.at_level(logging.WARNING, logger="deepssim_fast"):
        m = train(imgs, resume=full / "last.pt", max_steps=4, out=o2, progress=False)
    assert m.steps_run == 0 and read_checkpoint(o2 / "last.pt")["step"] == 8
    assert {p.name: p.read_bytes() for p in o2.iterdir() if p.is_file()} == before  # (log.csv and best.pt too)
    assert f"nothing was trained and nothing was written in {o2}" in caplog.text, caplog.text
    assert f"{o2 / 'last.pt'} is at step 8, further on than the resumed checkpoint" in caplog.text
    assert "trained again" not in caplog.text and "overwritten" not in caplog.text, caplog.text
    # out/last.pt at the resumed step (or missing) is still written: a resume from out continues
    caplog.clear()
    (o2 / "last.pt").unlink()
    train(imgs, resume=full / "last.pt", max_steps=4, out=o2, progress=False)
    assert (o2 / "last.pt").read_bytes() == (full / "last.pt").read_bytes()
    assert "nothing was written" not in caplog.text
