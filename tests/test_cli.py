"""The deepssim-fast command line: subcommands call the public API, print, fail with one clear line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from _checkout import run_python

from deepssim_fast import data
from deepssim_fast.cli import build_parser, main
from deepssim_fast.reference import ssim_reference


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real MNI axial slices at a third of the resolution: train (6 .npy, 1 PNG), synth (2 copies, 1 new)."""
    root = tmp_path_factory.mktemp("cli")
    vol = data.load_volume("mni152").array
    t, s = root / "train", root / "synth"
    t.mkdir()
    s.mkdir()
    arrs = {}
    for i in range(40, 130, 15):
        a = data.center_fit(np.ascontiguousarray(vol[::3, ::3, i]), (64, 72))
        arrs[i] = a
        np.save(t / f"t{i:03d}.npy", a)
    Image.fromarray(arrs[40].astype(np.uint8)).save(t / "t999.png")
    np.save(s / "copy55.npy", arrs[55] * 1.2 + 3)
    np.save(s / "copy100.npy", np.ascontiguousarray(arrs[100][::-1]))
    piesno = data.load_volume("piesno").array
    np.save(s / "novel.npy", data.center_fit(piesno[:, :, 7], (64, 72)))
    return {"root": root, "train": t, "synth": s, "arrs": arrs}


def test_help_lists_every_subcommand() -> None:
    text = build_parser().format_help()
    for cmd in ("doctor", "ssim", "train", "embed", "export", "audit", "evaluate", "demo", "bench"):
        assert cmd in text


def test_every_option_has_help_text_and_shows_its_default() -> None:
    """`--help` on each subcommand describes every option; one whose default is a value says it (the README
    points users to --help: `--thresholds`, `--metric`, `--epochs` and a dozen others had no line at all)."""
    import argparse

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in subs.choices.items():
        if name == "bench":  # its arguments are `python -m bench`'s, whose --help describes them
            continue
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            what = f"{name} {'/'.join(action.option_strings)}"
            assert action.help, f"{what} has no help text"
            d = action.default
            if isinstance(d, (int, float, str, tuple)) and not isinstance(d, bool) and action.dest != "verbose_sub":
                shown = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in d) if isinstance(d, tuple) \
                    else f"{d:g}" if isinstance(d, float) else str(d)
                assert shown in action.help or "%(default)" in action.help, f"{what}: default {d!r} not in help"


def test_a_closed_stdout_pipe_is_not_an_error(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """`deepssim-fast doctor | head -1` printed "error: [Errno 32] Broken pipe" and exited 2: the reader
    stopping early is no error of the command, which now ends quietly with a shell's SIGPIPE status."""
    import deepssim_fast.cli as cli

    def closed(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_doctor", closed)
    assert main(["doctor"]) == 141
    assert capsys.readouterr().err == ""


def test_doctor_still_works(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "backends" in info and info["deepssim_fast"]
    # the settings that change what runs are shown, and a forced backend that cannot run is said (doctor printed
    # the same report with DEEPSSIM_FAST_BACKEND=triton on a machine without Triton's GPU); also the all-pairs
    # kernel, and why Triton is off
    import os

    from deepssim_fast import _native

    for k in [k for k in os.environ if k.startswith("DEEPSSIM_FAST_") or k == "TRITON_INTERPRET"]:
        monkeypatch.delenv(k)
    assert main(["doctor", "--json"]) == 0
    triton = json.loads(capsys.readouterr().out)["backends"]["triton"]
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "environment: no DEEPSSIM_FAST_* overrides" in out
    int16 = _native.topk_int16_kernel()
    if int16 == "int16-avx2":  # the automatic choice weighs that kernel's speed measured here (said)
        assert "x the fp32 kernel's speed here)  " in out
        try:  # as fast as fp32 (Zen 1): auto takes fp32, and says why; 1.61x (Zen 4): int16
            for speedup, want in ((1.0, "fp32 (int16-avx2 1.00x"), (1.61, "int16-avx2 (int16-avx2 1.61x")):
                _native.set_topk_int16_speedup(speedup)
                assert main(["doctor"]) == 0
                assert f"all-pairs kernel={want} the fp32 kernel's speed here)  " in capsys.readouterr().out
        finally:
            _native.set_topk_int16_speedup(0)
    else:
        assert f"all-pairs kernel={int16 or 'fp32'}  " in out
    # the kernel in force, not the one the CPU could run (DEEPSSIM_FAST_TOPK_KERNEL=fp32 said int16-vnni), and
    # a value that names no kernel (every all_pairs call then fails) is a note
    monkeypatch.setenv("DEEPSSIM_FAST_TOPK_KERNEL", "fp32")
    assert main(["doctor"]) == 0
    assert "all-pairs kernel=fp32 (forced: fp32)" in capsys.readouterr().out
    monkeypatch.setenv("DEEPSSIM_FAST_TOPK_KERNEL", "bogus")
    assert main(["doctor"]) == 0
    out_bogus = capsys.readouterr().out
    assert ("note: DEEPSSIM_FAST_TOPK_KERNEL='bogus': expected 'auto', 'fp32' or 'int16': every all_pairs call on "
            "the native engine will fail") in out_bogus
    monkeypatch.delenv("DEEPSSIM_FAST_TOPK_KERNEL")
    if not triton["available"]:
        assert f"triton : no  version={triton['version']}  ({triton['reason']})" in out
        monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", "triton")
        assert main(["doctor"]) == 0
        out = capsys.readouterr().out
        assert "environment: DEEPSSIM_FAST_BACKEND=triton" in out
        assert "note: DEEPSSIM_FAST_BACKEND=triton, which is not available here" in out
        assert main(["doctor", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)["backends"]
        assert info["environment"] == {"DEEPSSIM_FAST_BACKEND": "triton"} and info["triton"]["reason"]
    # a value every call refuses, as calls read it (any case: 'Native' is 'native', 'Nativ' is nothing)
    monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", "Nativ")
    assert main(["doctor"]) == 0
    assert ("note: DEEPSSIM_FAST_BACKEND='Nativ' is not one of ('native', 'torch', 'triton')"
            in capsys.readouterr().out)
    monkeypatch.setenv("DEEPSSIM_FAST_BACKEND", "Native")
    assert main(["doctor"]) == 0
    assert "is not one of" not in capsys.readouterr().out


def test_ssim_two_files_prints_the_score(folders: dict, capsys: pytest.CaptureFixture) -> None:
    a, b = folders["train"] / "t055.npy", folders["synth"] / "copy55.npy"
    assert main(["ssim", str(a), str(b), "--preset", "deepssim"]) == 0
    got = float(capsys.readouterr().out.strip())
    assert got == pytest.approx(float(ssim_reference(np.load(a), np.load(b), preset="deepssim")), abs=1e-5)
    assert main(["ssim", str(a), str(folders["train"] / "t070.npy"), "--data-range", "255"]) == 0
    got = float(capsys.readouterr().out.strip())
    want = float(ssim_reference(np.load(a), np.load(folders["train"] / "t070.npy"), data_range=255.0))
    assert got == pytest.approx(want, abs=1e-5)


def test_ssim_of_integer_files_uses_their_dtype_range(folders: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Files decode to float32, but 8/16-bit PNGs and integer .npy keep scikit-image's dtype range (uint8 255),
    as the API does for the arrays themselves; float files use the pair's range; mixed types warn."""
    from skimage.metrics import structural_similarity

    a8, b8 = (np.clip(folders["arrs"][i], 0, 255).astype(np.uint8) for i in (55, 70))
    Image.fromarray(a8).save(tmp_path / "a.png")
    Image.fromarray(b8).save(tmp_path / "b.png")
    want = structural_similarity(a8, b8)
    pair_range = structural_similarity(a8.astype(np.float32), b8.astype(np.float32),
                                       data_range=float(max(a8.max(), b8.max()) - min(a8.min(), b8.min())))
    assert abs(want - pair_range) > 1e-3  # the two conventions differ on this pair
    assert main(["ssim", str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(want, abs=1e-5)
    a16, b16 = (x.astype(np.uint16) * 200 for x in (a8, b8))
    Image.fromarray(a16).save(tmp_path / "a16.png")
    Image.fromarray(b16).save(tmp_path / "b16.png")
    assert main(["ssim", str(tmp_path / "a16.png"), str(tmp_path / "b16.png")]) == 0
    want = structural_similarity(a16, b16, data_range=65535)
    assert float(capsys.readouterr().out.strip()) == pytest.approx(want, abs=1e-5)
    np.save(tmp_path / "a.npy", a8.astype(np.int16))
    np.save(tmp_path / "b.npy", b8.astype(np.int16))
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 0
    got = float(capsys.readouterr().out.strip())
    want16 = structural_similarity(a8.astype(np.int16), b8.astype(np.int16), data_range=65535)  # int16's range
    assert got == pytest.approx(want16, abs=1e-5)
    # --data-range wins; mixed integer / float files fall back to the pair's range, with a warning
    assert main(["ssim", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--data-range", "100"]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(
        structural_similarity(a8, b8, data_range=100), abs=1e-5)
    np.save(tmp_path / "bf.npy", b8.astype(np.float32))
    assert main(["ssim", str(tmp_path / "a.png"), str(tmp_path / "bf.npy")]) == 0
    out = capsys.readouterr()
    assert float(out.out.strip()) == pytest.approx(pair_range, abs=1e-5)
    assert "different pixel types" in out.err and "a.png: uint8" in out.err


def test_ssim_folders_of_mixed_pixel_types_score_each_pair_by_its_own_files(tmp_path: Path, folders: dict,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """One float file in a folder of 8-bit PNGs switched every pair, PNG against PNG too, to max - min over
    the pair: a pair's score depended on the other files in its folders. A pair of two files of one integer
    type keeps its dtype range; the others use the pair's."""
    from skimage.metrics import structural_similarity

    a8, b8, c8 = (np.clip(folders["arrs"][i], 0, 255).astype(np.uint8) for i in (55, 70, 85))
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    Image.fromarray(a8).save(tmp_path / "A" / "a.png")
    Image.fromarray(b8).save(tmp_path / "B" / "b.png")
    np.save(tmp_path / "B" / "c.npy", c8.astype(np.float32))
    alone = tmp_path / "alone.csv"
    assert main(["ssim", str(tmp_path / "A" / "a.png"), str(tmp_path / "B" / "b.png"), "--out", str(alone)]) == 0
    out = tmp_path / "m.csv"
    assert main(["ssim", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "different pixel types" in err and "a pair of two files of one integer type uses its dtype range" in err
    rows = {Path(r[1]).name: float(r[2]) for r in csv.reader(out.open()) if r[0] != "a"}
    want_png = structural_similarity(a8, b8)  # dtype range 255
    assert rows["b.png"] == pytest.approx(want_png, abs=1e-5)
    assert rows["b.png"] == pytest.approx(float(next(csv.reader(alone.open().readlines()[1:]))[2]), abs=1e-6)
    rng = float(max(a8.max(), c8.max()) - min(a8.min(), c8.min()))
    assert rows["c.npy"] == pytest.approx(
        structural_similarity(a8.astype(np.float32), c8.astype(np.float32), data_range=rng), abs=1e-5)


def test_ssim_warns_of_a_dtype_range_only_where_a_pair_uses_it(tmp_path: Path, folders: dict,
                                                               capsys: pytest.CaptureFixture) -> None:
    """An 8-bit against a 16-bit PNG was warned that "the files store uint16 pixels, so data_range is its
    dtype range 6.554e+04", then scored on max - min over the pair, as the next warning said: no pair used
    uint16's range. That warning now names only the dtypes some pair is scored with."""
    from skimage.metrics import structural_similarity

    a8, b8 = (np.clip(folders["arrs"][i], 0, 255).astype(np.uint8) for i in (55, 70))
    b16 = b8.astype(np.uint16) * 200
    for d in ("A", "B"):
        (tmp_path / d).mkdir()
    Image.fromarray(a8).save(tmp_path / "A" / "a.png")
    Image.fromarray(b16).save(tmp_path / "B" / "b16.png")
    assert main(["ssim", str(tmp_path / "A" / "a.png"), str(tmp_path / "B" / "b16.png")]) == 0
    out = capsys.readouterr()
    rng = float(max(a8.max(), b16.max()) - min(a8.min(), b16.min()))
    assert float(out.out.strip()) == pytest.approx(
        structural_similarity(a8.astype(np.float32), b16.astype(np.float32), data_range=rng), abs=1e-5)
    assert "different pixel types" in out.err and "data_range is its dtype range" not in out.err
    # folders: a uint16 file on one side only uses no uint16 range; on both sides, one pair does
    Image.fromarray(b8).save(tmp_path / "B" / "b8.png")
    Image.fromarray(a8.astype(np.uint16) * 200).save(tmp_path / "A" / "a16.png")
    os.remove(tmp_path / "B" / "b16.png")
    assert main(["ssim", str(tmp_path / "A"), str(tmp_path / "B"), "--out", "-", "-q"]) == 0
    assert "data_range is its dtype range" not in capsys.readouterr().err
    Image.fromarray(b16).save(tmp_path / "B" / "b16.png")
    assert main(["ssim", str(tmp_path / "A"), str(tmp_path / "B"), "--out", "-", "-q"]) == 0
    assert "the files store uint16 pixels, so data_range is its dtype range" in capsys.readouterr().err


def test_ssim_out_that_cannot_be_written_is_refused_before_scoring(tmp_path: Path, folders: dict,
                                                                  capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--out naming a folder (or under a file) was found when the CSV was written, after every pair."""
    import importlib

    mod = importlib.import_module("deepssim_fast.ssim")
    monkeypatch.setattr(mod, "ssim_matrix", lambda *a, **k: pytest.fail("scored before --out was checked"))
    (tmp_path / "afile").write_text("x")
    for bad, says in ((tmp_path, "is an existing folder"), (tmp_path / "afile" / "m.csv",
                                                             "afile is an existing file, not a folder")):
        assert main(["ssim", str(folders["train"]), str(folders["synth"]), "--out", str(bad)]) == 2
        assert says in capsys.readouterr().err


def test_train_and_embed_take_an_unquoted_glob(tmp_path: Path, folders: dict, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """`--images train/*.png` reaches the command as many words (the shell expands the glob): --images and
    --val took one, and the rest failed with the top-level usage ("unrecognized arguments")."""
    from deepssim_fast.cli import build_parser

    files = [str(p) for p in sorted(folders["train"].iterdir())[:3]]
    t = build_parser().parse_args(["train", "--images", *files, "--val", *files[:2], "--out", str(tmp_path)])
    assert t.images == files and t.val == files[:2]
    e = build_parser().parse_args(["embed", "--images", *files, "--model", "m.pt", "--out", "e.npy"])
    assert e.images == files


def test_doctor_names_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """DEEPSSIM_FAST_NUM_THREAD=1 was listed among the settings in force, which nothing reads."""
    monkeypatch.setenv("DEEPSSIM_FAST_NUM_THREAD", "1")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "note: DEEPSSIM_FAST_NUM_THREAD: not a variable deepssim_fast reads (misspelt?)" in out
    assert "DEEPSSIM_FAST_NUM_THREADS" in out  # (among the known ones)
    monkeypatch.delenv("DEEPSSIM_FAST_NUM_THREAD")
    monkeypatch.setenv("DEEPSSIM_FAST_NUM_THREADS", "1")
    assert main(["doctor"]) == 0
    assert "not a variable deepssim_fast reads" not in capsys.readouterr().out


def test_bench_messages_name_the_command_they_came_from(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "nosuch", "--no-append"]) == 2
    err = capsys.readouterr().err
    assert "deepssim-fast bench: error: " in err and "python -m bench" not in err


def test_ssim_two_folders_writes_csv(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores.csv"
    assert (
        main(
            [
                "ssim",
                str(folders["train"]),
                str(folders["synth"]),
                "--preset",
                "deepssim",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote 21 scores (7 x 3)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 21 and set(rows[0]) == {"a", "b", "ssim"}
    r = next(x for x in rows if x["a"].endswith("t055.npy") and x["b"].endswith("copy55.npy"))
    want = float(ssim_reference(np.load(r["a"]), np.load(r["b"]), preset="deepssim"))
    assert float(r["ssim"]) == pytest.approx(want, abs=1e-5)



def test_ssim_two_files_with_out_writes_the_csv(folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """`ssim A B --out FILE` with two files printed the score and silently wrote no FILE; it now writes the
    CSV of a folder comparison (a, b, ssim; absolute paths), one row."""
    monkeypatch.chdir(folders["train"])
    out = tmp_path / "one.csv"
    assert main(["ssim", "t055.npy", str(folders["synth"] / "copy55.npy"), "--preset", "deepssim", "--out",
                 str(out)]) == 0
    assert "wrote 1 scores (1 x 1)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["a"] == str(folders["train"] / "t055.npy")
    assert rows[0]["b"] == str(folders["synth"] / "copy55.npy")
    want = float(ssim_reference(np.load(rows[0]["a"]), np.load(rows[0]["b"]), preset="deepssim"))
    assert float(rows[0]["ssim"]) == pytest.approx(want, abs=1e-5)
    # --out - is the CSV on standard output (a file named "-" was written)
    assert main(["ssim", "t055.npy", str(folders["synth"] / "copy55.npy"), "--preset", "deepssim", "--out",
                 "-"]) == 0
    printed = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert printed == rows and not (folders["train"] / "-").exists()


def test_ssim_folders_of_unequal_shapes_name_the_file(folders: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Folder comparisons score the images as they are (as deepssim_fast.ssim does), never cropped or
    padded: an image of another shape is an error that names it."""
    d = tmp_path / "mixed"
    d.mkdir()
    np.save(d / "a.npy", folders["arrs"][55])
    np.save(d / "odd.npy", np.zeros((60, 70), dtype=np.float32))
    assert main(["ssim", str(folders["train"]), str(d), "-q", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "odd.npy" in err and "(60, 70)" in err and not (tmp_path / "s.csv").exists()


def test_ssim_csv_is_written_atomically(folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("previous\n")

    class Broken:
        def __init__(self, f) -> None:
            self.w = real(f)

        def writerow(self, r) -> None:
            self.w.writerow(r)

        def writerows(self, rows) -> None:
            self.w.writerow(next(iter(rows)))
            raise OSError("disk full")

    real = csv.writer
    monkeypatch.setattr(csv, "writer", Broken)
    args = ["ssim", str(folders["train"]), str(folders["synth"]), "-q", "--out", str(out)]
    assert main(args) == 2
    assert "disk full" in capsys.readouterr().err
    assert out.read_text() == "previous\n" and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]

def test_ssim_errors_are_one_line(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "odd.npy", np.zeros((10, 11), dtype=np.float32))
    assert main(["ssim", str(folders["train"] / "t055.npy"), str(tmp_path / "odd.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "odd.npy" in err and "shape" in err
    assert err.startswith("deepssim-fast ssim: error:")
    assert main(["ssim", str(tmp_path / "missing.npy"), str(tmp_path / "odd.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.npy" in err


def test_ssim_of_4d_files_takes_frame(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The 4D error asked for a frame, which the ssim command could not be given."""
    from deepssim_fast.ssim import ssim

    rng = np.random.default_rng(5)
    a = rng.random((12, 12, 12, 2)).astype(np.float32)
    b = a + 0.1 * rng.random(a.shape).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a.npy" in err and "--frame" in err, err
    for frame in (0, 1):
        assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--frame", str(frame)]) == 0
        want = float(ssim(a[..., frame], b[..., frame], spatial_dims=3))
        assert capsys.readouterr().out.strip() == f"{want:.6f}"


def test_ssim_of_float64_files_scores_their_stored_values(folders: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """float64 files were decoded to float32 first: on an MNI slice scaled to [0, 1] and offset by 1e4
    (float32's ulp there is 1e-3 of its range) the command printed 0.769484 where the stored values score
    0.769410."""
    import nibabel as nib

    from deepssim_fast.ssim import ssim

    x, y = (np.load(folders["train"] / f).astype(np.float64) for f in ("t055.npy", "t070.npy"))
    x, y = x / x.max() + 1e5, y / y.max() + 1e5  # intensities in [0, 1], offset: not float32 numbers
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    np.save(tmp_path / "A" / "x.npy", x)
    np.save(tmp_path / "B" / "y.npy", y)
    nib.save(nib.Nifti1Image(y, np.eye(4)), tmp_path / "B" / "z.nii.gz")  # a float64 2D NIfTI
    want = float(ssim_reference(x, y))
    assert want == pytest.approx(float(ssim(x, y)), abs=1e-6)
    rounded = float(ssim_reference(x.astype(np.float32), y.astype(np.float32)))
    assert abs(rounded - want) > 5e-6  # what float32 decoding scored: the check below tells them apart
    assert main(["ssim", str(tmp_path / "A" / "x.npy"), str(tmp_path / "B" / "y.npy"), "-q"]) == 0
    assert float(capsys.readouterr().out.strip()) == pytest.approx(want, abs=1e-6)
    assert main(["ssim", str(tmp_path / "A"), str(tmp_path / "B"), "-q"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:  # the .npy and the NIfTI hold the same float64 values
        assert float(row[2]) == pytest.approx(want, abs=1e-6), row


def test_audit_and_evaluate_commands(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "audit"
    rc = main(
        [
            "audit",
            "--train",
            str(folders["train"]),
            "--synth",
            str(folders["synth"]),
            "--metric",
            "ssim",
            "--out",
            str(out),
            "-k",
            "7",
            "--verify-flips",
            "--verify-shifts",
            "2",
            "-q",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"report: {out}/report.html" in text
    assert "2 duplicate" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["duplicate"] == 2 and summary["n_train"] == 7
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "real_key,synth_key,label\nt055.npy,copy55.npy,1\nt100,copy100,1\nt040.npy,novel.npy,0\n"
        "t085.npy,copy55.npy,2\n"
    )
    assert main(["evaluate", "--audit", str(out), "--labels", str(labels)]) == 0
    text = capsys.readouterr().out
    ev = json.loads((out / "evaluation.json").read_text())
    # y_true [1,1,0,2], y_pred [1,1,0,0]: dup f1 1, different p 1/2 r 1 f1 2/3, similar f1 0
    assert ev["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert f"macro F1 = {ev['macro_f1']:.4f}" in text


def test_audit_errors(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    np.save(bad / "ok.npy", folders["arrs"][55])
    rc = main(
        [
            "audit",
            "--train",
            str(folders["train"]),
            "--synth",
            str(bad),
            "--metric",
            "ssim",
            "--strict",
            "--out",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "x.png" in err
    rc = main(
        [
            "audit",
            "--train",
            str(folders["train"]),
            "--synth",
            str(bad),
            "--metric",
            "ssim",
            "--out",
            str(tmp_path / "o2"),
            "-q",
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    assert "x.png" in cap.err and "skipped" in cap.err
    rc = main(
        [
            "audit",
            "--train",
            str(tmp_path / "nothing"),
            "--synth",
            str(bad),
            "--out",
            str(tmp_path / "o3"),
            "--metric",
            "ssim",
        ]
    )
    assert rc == 2 and "nothing" in capsys.readouterr().err
    rc = main(["audit", "--train", str(folders["train"]), "--synth", str(bad), "--out", str(tmp_path / "o4")])
    assert rc == 2 and "needs a model" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, says in ((afile, "is an existing file, not a folder"), (afile / "sub", f"{afile} is not a directory")):
        rc = main(["audit", "--train", str(folders["train"]), "--synth", str(bad), "--metric", "ssim",
                   "--out", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and str(out) in err and says in err and "Errno" not in err, err
    # the same for --cache-dir (it said "[Errno 20] Not a directory: '.../afile/items'", after decoding began)
    for cache, says in ((afile, "is an existing file, not a folder"), (afile / "sub", f"{afile} is not a directory")):
        rc = main(["audit", "--train", str(folders["train"]), "--synth", str(bad), "--metric", "ssim",
                   "--out", str(tmp_path / "o5"), "--cache-dir", str(cache), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "cache folder" in err and says in err and "--cache-dir" in err, err
    assert afile.read_text() == "mine"
    # --model with a metric that does not embed was silently unused
    rc = main(["audit", "--train", str(folders["train"]), "--synth", str(bad), "--metric", "correlation",
               "--model", str(afile), "--out", str(tmp_path / "o6"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--metric deepssim only" in err and "--model" in err, err
    # and --device, which places the encoder only: a correlation audit ran on the CPU engine without a word
    for metric in ("correlation", "ssim"):
        rc = main(["audit", "--train", str(folders["train"]), "--synth", str(folders["synth"]), "--metric", metric,
                   "--device", "cuda", "--out", str(tmp_path / "o7"), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and "--metric deepssim only" in err and "--backend triton" in err, err
        assert not (tmp_path / "o7").exists()


def test_embed_command_with_small_model(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from deepssim_fast.model import build_model, embed, save_checkpoint

    torch.manual_seed(0)
    model = build_model("small", input_size=64, emb_dim=32)
    ckpt = save_checkpoint(tmp_path / "m.pt", model)
    out = tmp_path / "emb" / "e.npy"
    assert (
        main(["embed", "--model", str(ckpt), "--images", str(folders["synth"]), "--out", str(out), "-q"]) == 0
    )
    assert "wrote 3 x 32 embeddings" in capsys.readouterr().out
    e = np.load(out)
    ids = out.with_suffix(".ids.txt").read_text().split()
    assert [Path(i.split("#")[0]).name for i in ids] == ["copy100.npy", "copy55.npy", "novel.npy"]
    want = embed([np.load(folders["synth"] / "copy100.npy")], model, progress=False)
    np.testing.assert_allclose(e[0], want[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # a name without .npy gets it (as np.save would), and the message names the files really written
    plain = tmp_path / "emb" / "plain"
    assert main(["embed", "--model", str(ckpt), "--images", str(folders["synth"]), "--out", str(plain), "-q"]) == 0
    msg = capsys.readouterr().out
    assert f"to {plain}.npy (item ids in {plain}.ids.txt)" in msg
    assert np.array_equal(np.load(f"{plain}.npy"), e) and len(Path(f"{plain}.ids.txt").read_text().split()) == 3


def test_embeddings_audit_names_the_images_embed_wrote(folders: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit of embed's outputs (--metric embeddings) named every item ``<file>.npy#row:<i>``, though embed
    writes each row's image id beside the embeddings: matches.csv and the report said which row, not which
    image, and labels could not name the images. The ids file is now read: items are named, and found by
    evaluate, as a pixel audit names them. An ids file that does not fit its rows is named in a warning and
    the rows keep their numbers. The gallery shows the images the ids name."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64, emb_dim=32))
    for side in ("train", "synth"):
        args = ["embed", "--model", str(ckpt), "--images", str(folders[side]), "--out", str(tmp_path / side), "-q"]
        assert main(args) == 0
    out = tmp_path / "o"
    args = ["audit", "--train", str(tmp_path / "train.npy"), "--synth", str(tmp_path / "synth.npy"), "--metric",
            "embeddings", "--verify", "none", "-k", "2", "--out", str(out), "-q"]
    import deepssim_fast.report as report

    shown = []
    real = report.gallery_png
    monkeypatch.setattr(report, "gallery_png", lambda suspects, *a, **kw: (shown.extend(suspects),
                                                                            real(suspects, *a, **kw))[1])
    assert main(args) == 0
    with open(out / "matches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["synth_path"]).name for r in rows} == {"copy100.npy", "copy55.npy", "novel.npy"}
    # the gallery shows the images (read from the files the ids name: an embeddings audit has no pixels)
    assert len(shown) == 3
    for sp in shown:
        for side in ("synth", "train"):
            want = np.load(sp[f"{side}_id"].rsplit("#", 1)[0]) if sp[f"{side}_id"].endswith(".npy#2:0") else None
            if want is not None:
                np.testing.assert_array_equal(sp[f"{side}_image"], want)
            else:  # (the PNG of the training set)
                assert sp[f"{side}_image"].shape == (64, 72)
    assert all(Path(r["train_path"]).parent == folders["train"] and r["train_id"].endswith("#2:0")
               and r["train_index"] == "0" for r in rows)
    best = {Path(r["synth_path"]).name: Path(r["train_path"]).name for r in rows if r["rank"] == "1"}
    assert best["copy55.npy"] == "t055.npy"  # (a contrast change: the same embedding up to the encoder)
    labels = tmp_path / "l.csv"
    labels.write_text("real_key,synth_key,label\nt055.npy,copy55.npy,1\n")  # (1: duplicate)
    assert main(["evaluate", "--audit", str(out), "--labels", str(labels)]) == 0  # (the keys name images)
    assert json.loads((out / "evaluation.json").read_text())["per_class"]["duplicate"]["support"] == 1
    # an ids file that does not fit (a row more): named in a warning, the rows keep their numbers
    ids = tmp_path / "synth.ids.txt"
    ids.write_text(ids.read_text() + "extra#2:0\n")
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.audit"):
        assert main([*args[:-3], "--out", str(tmp_path / "o2"), "-q"]) == 0
    assert "4 ids for 3 rows" in caplog.text and str(ids) in caplog.text
    with open(tmp_path / "o2" / "matches.csv", newline="") as f:
        assert {r["synth_id"] for r in csv.DictReader(f)} == {f"{tmp_path / 'synth.npy'}#row:{i}" for i in range(3)}


def test_embed_failing_mid_write_leaves_no_stale_ids(folders: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both files are written atomically, the old ids removed first: a run that dies between the two leaves
    new embeddings without ids, never next to another run's ids."""
    import torch

    from deepssim_fast import _atomic
    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64, emb_dim=32))
    out = tmp_path / "e.npy"
    out.write_bytes(b"old embeddings")
    out.with_suffix(".ids.txt").write_text("old\nids\n")
    real = _atomic.atomic_write_bytes

    def die_on_ids(path, data):
        if str(path).endswith(".ids.txt"):
            raise KeyboardInterrupt("killed")
        return real(path, data)

    monkeypatch.setattr(_atomic, "atomic_write_bytes", die_on_ids)
    # (main reports a KeyboardInterrupt in one line, with the shell's SIGINT status)
    assert main(["embed", "--model", str(ckpt), "--images", str(folders["synth"]), "--out", str(out), "-q"]) == 130
    assert np.load(out).shape == (3, 32) and not out.with_suffix(".ids.txt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_file_names_that_are_not_utf8_reach_the_ssim_csv_and_embed_ids(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file named in another encoding (Latin-1 ``ü``: the byte 0xfc, held by Python as ``\\udcfc``) keeps its
    own bytes in ``ssim --out`` and in embed's ids file, as in the audit's matches.csv: both raised
    UnicodeEncodeError ('surrogates not allowed', naming no file), embed after writing the embeddings."""
    import os

    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    d = tmp_path / "imgs"
    d.mkdir()
    name = os.fsdecode(b"M\xfcller.npy")
    try:
        with open(d / name, "wb") as f:
            np.save(f, folders["arrs"][55])
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    raw = os.fsencode(str(d / name))
    out = tmp_path / "s.csv"
    assert main(["ssim", str(d), str(folders["synth"] / "copy55.npy"), "--out", str(out), "-q"]) == 0
    assert raw + b"," + os.fsencode(str(folders["synth"] / "copy55.npy")) in out.read_bytes()
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64, emb_dim=32))
    emb = tmp_path / "e.npy"
    assert main(["embed", "--model", str(ckpt), "--images", str(d), "--out", str(emb), "-q"]) == 0
    assert emb.with_suffix(".ids.txt").read_bytes() == raw + b"#2:0\n"
    capsys.readouterr()


def test_embed_ids_of_file_names_with_a_line_break_go_to_a_json_list(folders: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """A file name holding a line break split its id over two lines of ``<name>.ids.txt``: the audit then found
    one id too many and named every row by number. Such ids are written as ``<name>.ids.json`` (a JSON list),
    which the embeddings audit reads; a later plain run removes it, and a damaged one is named in a warning."""
    import torch

    from deepssim_fast.audit import _embedding_ids
    from deepssim_fast.model import build_model, save_checkpoint

    d = tmp_path / "imgs"
    d.mkdir()
    odd = d / "scan\n2.npy"
    try:
        np.save(odd, folders["arrs"][55])
    except OSError:
        pytest.skip("this file system refuses line breaks in names")
    np.save(d / "plain.npy", folders["arrs"][100])
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64, emb_dim=32))
    emb = tmp_path / "e.npy"
    emb.with_suffix(".ids.txt").write_text("stale\n")
    assert main(["embed", "--model", str(ckpt), "--images", str(d), "--out", str(emb), "-q"]) == 0
    assert f"(item ids in {emb.with_suffix('.ids.json')})" in capsys.readouterr().out
    assert not emb.with_suffix(".ids.txt").exists()
    want = [f"{d / 'plain.npy'}#2:0", f"{odd}#2:0"]  # (files in sorted order)
    assert json.loads(emb.with_suffix(".ids.json").read_text()) == want
    assert _embedding_ids(emb, 2) == want
    emb.with_suffix(".ids.json").write_text('{"not": "a list"}')
    assert _embedding_ids(emb, 2) is None  # (the audit names the rows by number, with a warning)
    odd.unlink()  # a plain set again: .ids.txt, and the JSON list of the earlier run is gone
    assert main(["embed", "--model", str(ckpt), "--images", str(d), "--out", str(emb), "-q"]) == 0
    assert not emb.with_suffix(".ids.json").exists()
    assert emb.with_suffix(".ids.txt").read_text() == f"{d / 'plain.npy'}#2:0\n"
    assert _embedding_ids(emb, 1) == [f"{d / 'plain.npy'}#2:0"]
    capsys.readouterr()


def test_bench_command_dispatches_or_explains(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types

    seen = {}
    fake = types.ModuleType("bench.__main__")

    def fake_main(argv, prog="python -m bench"):
        seen["argv"], seen["prog"] = argv, prog
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "bench.__main__", fake)
    assert main(["bench", "ssim", "--quick"]) == 0
    assert seen["argv"] == ["ssim", "--quick"]
    assert main(["bench", "--no-append", "all_pairs", "--json", "out.json"]) == 0
    assert seen["argv"] == ["--no-append", "all_pairs", "--json", "out.json"]
    monkeypatch.setitem(sys.modules, "bench.__main__", None)  # as if there were no source checkout
    assert main(["bench"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_train_command_writes_a_checkpoint(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "enc"
    rc = main(
        [
            "train",
            "--images",
            str(folders["train"]),
            "--out",
            str(out),
            "--backbone",
            "small",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--emb-dim",
            "16",
            "-q",
        ]
    )
    assert rc == 0
    assert "trained small encoder" in capsys.readouterr().out
    assert (out / "last.pt").exists() or (out / "best.pt").exists()
    from deepssim_fast.model import load_model

    model = load_model(out / ("best.pt" if (out / "best.pt").exists() else "last.pt"))
    assert model.config.emb_dim == 16



def test_train_command_leaves_unreadable_files_out_unless_strict(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train stopped at the first unreadable file (rc 2), where audit and embed leave it out with a warning;
    --strict now aborts, as theirs does."""
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(folders["train"], imgs)
    (imgs / "broken.nii.gz").write_text("not a NIfTI file")
    base = ["train", "--images", str(imgs), "--backbone", "small", "--max-steps", "1", "--batch-size", "4",
            "--emb-dim", "8", "-q"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "left out 1 file(s)" in captured.err and "broken.nii.gz" in captured.err
    assert main([*base, "--out", str(tmp_path / "b"), "--strict"]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "b" / "last.pt").exists()


def test_train_command_resumes_with_its_run_settings(folders: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A run with --val-fraction 0.5 resumed with only --resume took the command's default 0.1: the validation
    images trained, validation stopped (7 images), no warning, and the pre-resume best.pt came back as the
    result. The options not given are now the checkpoint's, so the resumed run's log equals an uninterrupted
    run's row for row; and a resume that does change them is warned about."""
    base = ["--images", str(folders["train"]), "--backbone", "small", "--emb-dim", "8", "--input-size", "32",
            "-q", "--seed", "3"]
    run = ["--batch-size", "2", "--val-fraction", "0.5", "--val-pairs", "4", "--val-every", "1", "--lr", "0.002"]
    assert main(["train", *base, *run, "--out", str(tmp_path / "full"), "--max-steps", "4"]) == 0
    assert main(["train", *base, *run, "--out", str(tmp_path / "part"), "--max-steps", "2"]) == 0
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        assert main(["train", *base, "--out", str(tmp_path / "part"), "--max-steps", "4",
                     "--resume", str(tmp_path / "part" / "last.pt")]) == 0, capsys.readouterr().err
    assert "other settings" not in caplog.text
    logs = []
    for name in ("full", "part"):
        with open(tmp_path / name / "log.csv", newline="") as f:
            logs.append([(r["step"], r["loss"], r["val_loss"], r["lr"]) for r in csv.DictReader(f)])
    assert logs[0] == logs[1] and len(logs[0]) == 4 and all(r[2] for r in logs[0])
    # given, another setting is used and named
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        assert main(["train", *base, "--out", str(tmp_path / "part"), "--max-steps", "5", "--val-fraction", "0.1",
                     "--resume", str(tmp_path / "part" / "last.pt")]) == 0
    assert "val_fraction 0.5 -> 0.1" in caplog.text
    assert "without validation" in caplog.text  # 0.1 of 7 images validates none: the last weights come back
    assert "checkpoint: " in capsys.readouterr().out


def test_train_command_has_the_validation_and_schedule_options(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """train() took val_fraction, val_pairs, val_every and lr_schedule; the command had no options for
    them. Their defaults are train()'s own."""
    import inspect

    from deepssim_fast.training import TRAIN_DEFAULTS, train

    # not given: None, which train() reads as a resumed run's own value, else its default (TRAIN_DEFAULTS),
    # and the help says that default
    args = build_parser().parse_args(["train", "--images", "x", "--out", "y"])
    for name in ("val_fraction", "val_pairs", "val_every", "lr_schedule", "warmup_steps", "batch_size", "lr",
                 "epochs", "zoom_out"):
        assert getattr(args, name) is None and inspect.signature(train).parameters[name].default is None, name
    helps = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert f"(default {TRAIN_DEFAULTS['batch_size']})" in helps and f"(default {TRAIN_DEFAULTS['lr']})" in helps
    out = tmp_path / "enc"
    # 7 images: the default val_fraction 0.1 holds out none (no best.pt); 0.5 holds out 4, so 3 train and
    # an epoch is 2 steps of batch 2, so the default would validate at steps 2 and 3 only
    argv = ["train", "--images", str(folders["train"]), "--out", str(out), "--backbone", "small",
            "--max-steps", "3", "--batch-size", "2", "--emb-dim", "16", "--input-size", "32", "-q",
            "--val-fraction", "0.5", "--val-pairs", "5", "--val-every", "1", "--lr-schedule", "cosine"]
    with caplog.at_level(logging.INFO, logger="deepssim_fast.training"):
        assert main(argv) == 0, capsys.readouterr().err
    assert (out / "best.pt").exists()
    assert "validation: 5 pairs" in caplog.text
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [bool(r["val_loss"]) for r in rows] == [True, True, True]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[0] > lrs[1] > lrs[2] > 0  # cosine decay, not constant
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for opt in ("--val-fraction", "--val-pairs", "--val-every", "--lr-schedule", "--warmup-steps"):
        assert opt in help_text
    # --warmup-steps reaches train(): a constant rate after two steps of linear warm-up
    out2 = tmp_path / "warm"
    argv = ["train", "--images", str(folders["train"]), "--out", str(out2), "--backbone", "small",
            "--max-steps", "3", "--batch-size", "2", "--emb-dim", "16", "--input-size", "32", "-q",
            "--val-fraction", "0", "--warmup-steps", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    with open(out2 / "log.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])


def test_user_errors_are_one_line_but_a_type_error_keeps_its_traceback(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input files reach the commands as ValueErrors (one line, exit 2); a TypeError is an internal
    bug and propagates with its traceback instead of looking like a user error."""
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "c.npy", np.ones((64, 72), np.complex64))
    np.save(bad / "s.npy", np.full((64, 72), "a"))
    argv = ["train", "--images", str(bad), "--out", str(tmp_path / "o"), "--max-steps", "1", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepssim-fast train: error:") and "dtype" in err and len(err.splitlines()) == 1

    def buggy(_args):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr("deepssim_fast.cli._cmd_train", buggy)
    with pytest.raises(TypeError, match="NoneType"):
        main(argv)

def test_dask_loggers_follow_the_cli_verbosity(
    folders: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """distributed sets its loggers to INFO when imported: a -q --workers audit printed ~24 scheduler and
    nanny lines with the dashboard URL. They follow the CLI's level: WARNING by default and with -q, INFO
    with -v."""
    import logging

    pytest.importorskip("distributed")
    names = ("distributed", "dask")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        with caplog.at_level(logging.DEBUG):
            rc = main(["audit", "--train", str(folders["train"]), "--synth", str(folders["synth"]), "--metric",
                       "correlation", "--verify", "none", "-k", "1", "--workers", "1",
                       "--out", str(tmp_path / "o"), "-q"])
        assert rc == 0
        noisy = [f"{r.name}: {r.getMessage()}" for r in caplog.records
                 if r.name.split(".")[0] in names and r.levelno < logging.WARNING]
        assert noisy == []
        assert "dashboard at" not in capsys.readouterr().err
        # (and main() leaves them as it found them, as it leaves the package's own)
        assert all(logging.getLogger(n).level == saved[n] for n in names)
        from deepssim_fast.cli import dask_logging

        dask_logging(logging.INFO)  # -v
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.INFO for n in names)
    finally:
        for n, lv in saved.items():
            logging.getLogger(n).setLevel(lv)


def test_verbose_after_the_subcommand_and_verify_rotations(
    folders: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import importlib

    A = importlib.import_module("deepssim_fast.audit")
    from deepssim_fast.cli import verbosity

    p = build_parser()
    base = ["audit", "--train", "t", "--synth", "s", "--out", "o"]
    assert verbosity(p.parse_args(base)) == 0
    assert verbosity(p.parse_args(["-v", *base])) == 1
    assert verbosity(p.parse_args([*base, "-v"])) == 1
    assert verbosity(p.parse_args(["-v", *base, "-vv"])) == 3
    assert verbosity(p.parse_args(["doctor", "-v"])) == 1
    assert verbosity(p.parse_args(["evaluate", "--audit", "a", "--labels", "l", "--verbose"])) == 1
    seen = {}

    class _Res:
        out = tmp_path
        summary = {"n_synth": 1, "n_train": 1, "metric": "ssim", "k": 1, "fraction_memorised": 0.0,
                   "counts": {"duplicate": 0, "similar": 0, "different": 1}, "skipped": []}

    def fake(train, synth, **kw):
        seen.update(kw)
        return _Res()

    monkeypatch.setattr(A, "audit", fake)
    assert main([*base, "--metric", "ssim", "--verify-rotations", "4", "-v"]) == 0
    assert seen["verify_rotations"] == 4.0
    assert main([*base, "--metric", "ssim"]) == 0
    assert seen["verify_rotations"] == 0.0


def test_embeddings_metric_error_gives_the_cli_spelling(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    np.save(tmp_path / "e.npy", np.eye(4, dtype=np.float32))
    rc = main(["audit", "--train", str(tmp_path / "e.npy"), "--synth", str(tmp_path / "e.npy"),
               "--metric", "embeddings", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    # the API's hint "(command line: --verify none)" is not said again after the flags it became
    assert rc == 2 and "pass --verify none" in err and "command line:" not in err, err


def test_a_command_line_hint_is_dropped_only_where_it_repeats_what_comes_before() -> None:
    """The API's "(command line: X)" after its own words: once they are in flags, X was said twice."""
    from deepssim_fast.cli import _name_flags

    parser = build_parser()
    said = _name_flags(parser, "audit", "pass verify='none' (command line: --verify none)")
    assert said == "pass --verify none", said
    kept = "pass shift=2 (command line: --verify-shifts 2)"  # (another X: kept)
    assert _name_flags(parser, "audit", kept) == kept


def test_embeddings_file_with_no_rows_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 0-row embeddings file: the error names it and its shape (it was a bare 'empty input set')."""
    np.save(tmp_path / "train.npy", np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 32), np.float32))
    rc = main(["audit", "--metric", "embeddings", "--verify", "none", "--train", str(tmp_path / "train.npy"),
               "--synth", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "empty input set" not in err
    assert f"{tmp_path / 'empty.npy'}: no embeddings (shape (0, 32))" in err


def test_multi_line_skip_reasons_are_printed_on_one_line(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """nibabel's message for short data ends '...\\n - could the file be damaged?': the skipped-input warning
    and the --strict error are still one line each."""
    import gzip

    raw = data.dataset_path("anatomical").read_bytes()
    bad = tmp_path / "short.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) - 4096]))  # a valid gzip of a truncated .nii
    synth = tmp_path / "synth"
    synth.mkdir()
    np.save(synth / "copy.npy", folders["arrs"][55])
    base = ["audit", "--train", str(folders["train"]), "--synth", str(synth / "copy.npy"), str(bad),
            "--metric", "ssim", "-k", "1", "--verify", "none", "-q"]
    assert main([*base, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    reason = json.loads((tmp_path / "o" / "summary.json").read_text())["skipped"][0]["reason"]
    assert "\n" in reason  # summary.json keeps nibabel's text as it is
    lines = [ln for ln in err.splitlines() if str(bad) in ln and not ln.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped synth input")
    assert lines[0].endswith("could the file be damaged?)"), lines
    assert main([*base, "--out", str(tmp_path / "o2"), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err and "damaged" in err


def test_multi_line_skip_reasons_are_logged_on_one_line(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit's logged 'skipping ...' warning for nibabel's two-line reason is one line too, as the
    printed 'warning: skipped ...' line is: no log line holds the reason's second half without the path."""
    import gzip

    raw = data.dataset_path("anatomical").read_bytes()
    bad = tmp_path / "short.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) - 4096]))  # a valid gzip of a truncated .nii
    np.save(tmp_path / "copy.npy", folders["arrs"][55])
    with caplog.at_level("WARNING"):
        assert main(["audit", "--train", str(folders["train"]), "--synth", str(tmp_path / "copy.npy"), str(bad),
                     "--metric", "ssim", "-k", "1", "--verify", "none", "-q", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    lines = caplog.text.splitlines()
    logged = [ln for ln in lines if str(bad) in ln]
    assert len(logged) == 1 and "skipping" in logged[0], lines
    assert logged[0].endswith("could the file be damaged?)"), lines
    assert all(str(bad) in ln for ln in lines if "damaged" in ln), lines


def test_audit_summary_line_never_rounds_a_share_to_none(capsys: pytest.CaptureFixture) -> None:
    """The printed summary said '1 duplicate ... — 0.0 % memorised' for 1 of 2001 synthetic items."""
    from deepssim_fast.cli import _print_summary

    s = {"n_synth": 2001, "n_train": 5, "metric": "correlation", "k": 5, "fraction_memorised": 1 / 2001,
         "counts": {"duplicate": 1, "similar": 0, "different": 2000}, "skipped": []}
    _print_summary(s, "o")
    assert "1 duplicate, 0 similar, 2000 different — 0.05 % memorised" in capsys.readouterr().out


def test_ctrl_c_ends_with_one_line_saying_how_to_resume(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Ctrl-C during `deepssim-fast audit` printed a KeyboardInterrupt traceback from wherever the audit was
    (deep in matplotlib or numpy), and nothing about the finished work: it now prints one line saying the
    run resumes from OUT/work when the same command is run again, and exits 130 as a shell does on SIGINT."""
    import deepssim_fast.cli as cli

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_audit", interrupted)
    try:
        rc = main(["audit", "--train", str(tmp_path), "--synth", str(tmp_path), "--out", str(tmp_path / "o")])
    except KeyboardInterrupt:
        rc = None
    assert rc == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "interrupted" in err and "same command again" in err and str(tmp_path / "o" / "work") in err
    # with Dask the finished shards are in OUT/shards* (the hint named OUT/work alone)
    assert main(["audit", "--train", str(tmp_path), "--synth", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--workers", "2"]) == 130
    assert (f"finished work is kept in {tmp_path / 'o' / 'work'} and {tmp_path / 'o' / 'shards*'}: run the same "
            "command again") in capsys.readouterr().err
    monkeypatch.setattr(cli, "_cmd_doctor", interrupted)
    try:
        rc = main(["doctor"])
    except KeyboardInterrupt:
        rc = None
    assert rc == 130
    assert capsys.readouterr().err.strip() == "deepssim-fast doctor: interrupted"


def test_embed_batch_size_is_checked_before_the_images_are_read(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """embed --batch-size 0 was refused only after every image had been read."""
    assert main(["embed", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "e.npy"), "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err


def test_ssim_warns_when_an_integer_dtype_range_dwarfs_the_data(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """np.save of an int array is int64: its range (1.8e19) as data_range made two unrelated images of values in
    the thousands score 1.000000, silently (scikit-image warns)."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "a.npy", rng.integers(0, 3000, (32, 32)))
    np.save(tmp_path / "b.npy", rng.integers(0, 3000, (32, 32)))
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 0
    out = capsys.readouterr()
    assert float(out.out) == pytest.approx(1.0, abs=1e-6)  # the convention itself is kept
    assert "store int64 pixels" in out.err and "give --data-range" in out.err
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--data-range", "3000"]) == 0
    out = capsys.readouterr()
    assert float(out.out) < 0.1 and out.err == ""


def test_slicing_flag_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """'--min-foreground 5' (meaning 5 %) said "SlicePolicy.min_foreground must be in [0, 1]"."""
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.float32))
    for flag, value, said in (("--min-foreground", "5", "--min-foreground must be in [0, 1], got 5.0 (a fraction"),
                              ("--axis", "3", "--axis must be 0, 1 or 2"),
                              ("--slice-step", "0", "--slice-step must be >= 1")):
        assert main(["audit", "--train", str(tmp_path), "--synth", str(tmp_path), "--metric", "ssim",
                     "--out", str(tmp_path / "o"), flag, value]) == 2
        err = capsys.readouterr().err
        assert said in err and "SlicePolicy" not in err, err


def test_ssim_of_a_float64_file_and_a_float32_exact_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A float64 .npy (np.save's default) beside a PNG or a float64 file exact in float32 crashed with
    "x and y must have the same dtype" (each file kept its own dtype)."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    a = rng.random((24, 24)) * 200  # float64, not exact in float32
    b = np.round(rng.random((24, 24)) * 200)  # float64 whole numbers: exact in float32
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 0
    want = structural_similarity(a, b, data_range=float(max(a.max(), b.max()) - min(a.min(), b.min())))
    assert float(capsys.readouterr().out) == pytest.approx(want, abs=1e-6)


def test_ssim_refuses_a_window_size_for_the_gaussian_window(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--win-size was ignored with --window gaussian (even an even size was taken); then any --win-size was
    refused with it, where the API takes win_size=11, the gaussian window's own size. The command gives the
    API's reason now, before any file is read."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((24, 24)).astype(np.float32))
    assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--window", "gaussian",
                 "--win-size", "5"]) == 2
    err = capsys.readouterr().err
    assert "--win-size 5 with --window gaussian" in err or "win_size=5 with window='gaussian'" in err, err
    assert "the Gaussian window's size is set by sigma (11 taps" in err
    for extra in ([], ["--win-size", "11"]):
        assert main(["ssim", str(tmp_path / "a.npy"), str(tmp_path / "a.npy"), "--window", "gaussian", *extra]) == 0
        assert float(capsys.readouterr().out) == pytest.approx(1.0)


def test_out_paths_blocked_by_a_file_or_naming_a_folder_are_clear(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """`ssim ... --out afile/x.csv` said "[Errno 17] File exists: 'afile'"; `--out outdir` (a folder) failed
    after writing a temporary file; `embed --out outdir/` wrote outdir.npy and outdir.ids.txt beside it."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((24, 24)).astype(np.float32))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "outdir").mkdir()
    a = str(tmp_path / "a.npy")
    assert main(["ssim", a, a, "--out", str(tmp_path / "afile" / "x.csv")]) == 2
    assert "afile is an existing file, not a folder" in capsys.readouterr().err
    assert main(["ssim", a, a, "--out", str(tmp_path / "outdir")]) == 2
    # (the path first, as the tool's other errors put it: it said "[Errno 21] is an existing folder; give a
    # file name: '.../outdir'")
    assert capsys.readouterr().err == (f"deepssim-fast ssim: error: {tmp_path / 'outdir'}: is an existing folder; "
                                       "give a file name\n")
    assert main(["embed", "--model", str(tmp_path / "m.pt"), "--images", a, "--out",
                 str(tmp_path / "outdir") + "/"]) == 2
    assert "is a folder; give the .npy file to write" in capsys.readouterr().err
    # a folder that does not exist yet, said by its trailing slash: it wrote newdir.npy beside it
    assert main(["embed", "--model", str(tmp_path / "m.pt"), "--images", a, "--out",
                 str(tmp_path / "newdir") + "/"]) == 2
    assert "newdir/ is a folder; give the .npy file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "afile", "outdir"]


def test_embed_names_volumes_that_give_no_slice(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A readable volume with no slice past the foreground rule made embed say "no readable images"; in a
    folder it was dropped with an INFO line only. It is now a skipped input with the audit's reason."""
    import torch

    from deepssim_fast.model import build_model

    torch.manual_seed(0)
    build_model("small", input_size=32).save_checkpoint(tmp_path / "m.pt")
    (tmp_path / "imgs").mkdir()
    np.save(tmp_path / "imgs" / "zero.npy", np.zeros((8, 8, 5), np.float32))
    out = tmp_path / "e.npy"
    assert main(["embed", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "imgs" / "zero.npy"),
                 "--out", str(out)]) == 2
    assert "no image to embed (1 file(s) skipped; " in capsys.readouterr().err
    np.save(tmp_path / "imgs" / "ok.npy", np.random.default_rng(0).random((32, 32)).astype(np.float32))
    assert main(["embed", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "imgs"),
                 "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "zero.npy: no slice passes the foreground threshold" in err
    assert err.count("zero.npy") == 1  # the path is said once
    assert np.load(out).shape[0] == 1


def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C in the first seconds of a command (building the parser imports the training module) printed a
    traceback instead of the one-line 'interrupted'."""
    import deepssim_fast.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["audit", "--train", "x"]) == 130
    assert capsys.readouterr().err == "deepssim-fast audit: interrupted\n"


def test_train_and_embed_say_what_they_left_out_and_how_to_go_on(folders: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without validation ended "best validation loss None"; Ctrl-C in train gave no hint that last.pt
    resumes it; a 5 x 5 image among embed's files aborted it, named "images[5]"."""
    from deepssim_fast import training

    d = tmp_path / "imgs"
    shutil.copytree(folders["train"], d)
    np.save(d / "tiny.npy", np.ones((5, 5), np.float32))
    out = tmp_path / "enc"
    args = ["train", "--images", str(d), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
            "--input-size", "32", "--val-fraction", "0", "-q"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert f"no validation (the last weights); checkpoint: {out / 'last.pt'}" in cap.out
    assert "left out 1 file(s)" in cap.err and "tiny.npy: image of shape (5, 5) is too small" in cap.err
    assert main(["embed", "--model", str(out / "last.pt"), "--images", str(d), "--out", str(tmp_path / "e.npy"),
                 "-q"]) == 0
    cap = capsys.readouterr()
    assert np.load(tmp_path / "e.npy").shape[0] == 7 and "tiny.npy" not in (tmp_path / "e.ids.txt").read_text()
    assert "skipped" in cap.err and "tiny.npy: image of shape (5, 5) is too small for the encoder" in cap.err
    assert main(["embed", "--model", str(out / "last.pt"), "--images", str(d), "--out", str(tmp_path / "f.npy"),
                 "-q", "--strict"]) == 2
    assert "tiny.npy: image of shape (5, 5) is too small" in capsys.readouterr().err

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "make_pool", interrupted)  # (inside train: the run is under way)
    assert main(args) == 130
    assert capsys.readouterr().err.strip() == (f"deepssim-fast train: interrupted; continue from the last checkpoint "
                                               f"with --resume {out / 'last.pt'} (the steps after it run again)")


def test_ssim_gaussian_population_covariance_as_the_readme_says(folders: dict, capsys: pytest.CaptureFixture,
                                                                tmp_path: Path) -> None:
    """README: window="gaussian", sample_covariance=False is what pytorch-msssim and MONAI compute; the command
    had no way to ask for it (always the sample covariance). And --verify-rotations 200 was refused in the API's
    name only."""
    from skimage.metrics import structural_similarity

    a, b = folders["train"] / "t055.npy", folders["train"] / "t070.npy"
    x, y = np.load(a), np.load(b)
    dr = float(max(x.max(), y.max()) - min(x.min(), y.min()))
    for flag, sample in (([], True), (["--population-covariance"], False)):
        assert main(["ssim", str(a), str(b), "--window", "gaussian", *flag]) == 0
        want = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=sample,
                                     data_range=dr)
        assert float(capsys.readouterr().out) == pytest.approx(want, abs=1e-5)
    assert main(["audit", "--train", str(folders["train"]), "--synth", str(folders["synth"]), "--out",
                 str(tmp_path / "o"), "--metric", "ssim", "--verify-rotations", "200"]) == 2
    assert "verify_rotations (--verify-rotations) must be a number of degrees" in capsys.readouterr().err


def test_errors_name_flags_and_come_before_the_work(folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """From a probe of ~150 bad values: an empty path ("$UNSET") searched the working folder (train trained on
    it) or wrote OUT's files there; the API's parameter names stood where the flags were meant; numpy's
    MemoryError and "[Errno 20] Not a directory" came through raw (a traceback, or errno text); embed read every
    image before finding its model missing, an audit decoded every file before its --backend was refused, and a
    failed audit left OUT holding only its lock file; demo built its data before refusing --train-seconds -1."""
    import deepssim_fast.cli as cli

    monkeypatch.chdir(tmp_path)
    train, synth = str(folders["train"]), str(folders["synth"])

    def err(args: list[str]) -> str:
        assert main(args) == 2, args
        text = capsys.readouterr().err
        assert text.count("\n") == 1 and "Traceback" not in text, text
        return text

    assert "--images: empty path" in err(["train", "--images", "", "--out", "t"])
    assert "--out: empty path" in err(["train", "--images", train, "--out", ""])
    assert "A: empty path" in err(["ssim", "", train])
    assert "batch_size (--batch-size) must be an integer >= 2" in err(
        ["train", "--images", train, "--out", "t", "--batch-size", "0"])
    assert "win_size (--win-size) must be a positive odd integer" in err(["ssim", train, synth, "--win-size", "0"])
    assert "k (--k) must be a positive integer" in err(["audit", "--train", train, "--synth", synth, "--out", "o",
                                                        "--metric", "ssim", "-k", "0"])
    assert "train_seconds (--train-seconds) must be a non-negative number" in err(
        ["demo", "--out", "d", "--train-seconds", "-1"])
    assert "backend (--backend) 'bogus' is not one of" in err(
        ["audit", "--train", train, "--synth", synth, "--out", "o", "--metric", "ssim", "--backend", "bogus"])
    assert "model file missing.pt does not exist" in err(
        ["audit", "--train", train, "--synth", synth, "--out", "o/n2/n3", "--model", "missing.pt"])  # (o/ too)
    # a path is never annotated ("new model (v2).pt" had become "new model (--model) (v2).pt")
    assert "model file new model (v2).pt does not exist" in err(
        ["audit", "--train", train, "--synth", synth, "--out", "o", "--model", "new model (v2).pt"])
    assert "--scheduler: empty address" in err(["audit", "--train", train, "--synth", synth, "--out", "o",
                                                "--metric", "correlation", "--scheduler", ""])
    (tmp_path / "a.npy").write_bytes(b"x")
    assert "--out a.npy/x.npy: a.npy is a file, not a folder" in err(
        ["embed", "--model", "missing.pt", "--images", train, "--out", "a.npy/x.npy"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.npy").write_bytes(b"not an array")
    assert "model file missing.pt: no such file" in err(
        ["embed", "--model", "missing.pt", "--images", str(bad), "--strict", "--out", "e.npy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "bad"]  # (no t/, o/, d/ or e.npy)

    def raises(exc: BaseException):
        def cmd(args: object) -> int:
            raise exc
        return cmd

    monkeypatch.setattr(cli, "_cmd_ssim", raises(MemoryError("Unable to allocate 37.3 GiB")))
    assert "error: out of memory (Unable to allocate 37.3 GiB); check the sizes" in err(["ssim", train, synth])
    monkeypatch.setattr(cli, "_cmd_ssim", raises(NotADirectoryError(20, "Not a directory", "a.npy/x.csv")))
    assert "error: a.npy/x.csv: a part of this path is a file, not a folder" in err(["ssim", train, synth])


def test_errors_and_warnings_say_flags_not_the_apis_keywords(folders: dict, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The API's keyword forms reached the command line as they were: "drop verify_flips/verify_shifts, verify
    with exact SSIM (verify='ssim'), or use metric 'correlation'", "metric='deepssim' needs a model", and the
    warning "mode='volumes' compares whole volumes" (the annotation covered "X must / needs / factors" only).
    Errors, log warnings and the skipped inputs repeated at the end now say --verify-flips, --verify ssim,
    --metric deepssim, --mode volumes; summary.json keeps the API's words."""
    train, synth = str(folders["train"]), str(folders["synth"])
    base = ["audit", "--train", train, "--synth", synth, "--out", str(tmp_path / "o")]
    assert main([*base, "--metric", "ssim", "--verify", "none", "--verify-flips"]) == 2
    err = capsys.readouterr().err
    assert ("drop --verify-flips/--verify-shifts, verify with exact SSIM (--verify ssim), or use --metric "
            "correlation") in err, err
    assert "with --verify none flips and shifts" in err and "=" not in err and "verify_" not in err, err
    assert main(base) == 2  # (deepssim, the default metric, without --model)
    err = capsys.readouterr().err
    assert "--metric deepssim needs a model" in err and "or use --metric ssim / correlation without" in err, err

    # a warning logged by the API and a skipped input's reason (said when met and again at the end): in a
    # process of its own, as the command line's log handler is not installed under pytest's
    rng = np.random.default_rng(3)
    t, s = tmp_path / "t", tmp_path / "s"
    t.mkdir()
    s.mkdir()
    vols = [rng.random((12, 12, 12)).astype(np.float32) for _ in range(2)]
    for i, v in enumerate(vols):
        np.save(t / f"v{i}.npy", v)
    np.save(s / "copy.npy", vols[1])
    np.save(s / "flat.npy", vols[0][:, :, 0])  # (2D: no volume)
    r = run_python("import sys; from deepssim_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                   "audit", "--train", str(t), "--synth", str(s), "--out", str(tmp_path / "v"), "--metric", "ssim",
                   "--mode", "volumes", "--axis", "1", "-k", "1", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--mode volumes compares whole volumes" in r.stderr, r.stderr
    assert r.stderr.count("flat.npy: --mode volumes needs 3D images") == 2, r.stderr
    assert "mode=" not in r.stderr, r.stderr
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert any("mode='volumes' compares whole volumes" in w for w in summary["warnings"]), summary["warnings"]
    assert "mode='volumes' needs 3D images" in summary["skipped"][0]["reason"]


def test_the_foreign_model_warning_names_no_flag_the_command_lacks(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """`embed --model foreign.pt` warned "assuming the published DeepSSIM encoder's (--input-size 224,
    --size-policy resize)", flags embed does not have (the log handler turned input_size=224 into a flag, as the
    export command in the same message names it): the assumed values are said in words."""
    import torch

    from deepssim_fast.cli import _name_flags
    from deepssim_fast.model import load_model

    foreign = tmp_path / "foreign.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1))).save(str(foreign))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        load_model(foreign)
    (said,) = [r.getMessage() for r in caplog.records if "stores no preprocessing settings" in r.getMessage()]
    for command in ("embed", "audit", "export"):
        shown = _name_flags(build_parser(), command, said)  # (what the command line's log handler prints)
        assert "assuming the published DeepSSIM encoder's input size 224 and size policy resize;" in shown, shown
        assert "`deepssim-fast export --model" in shown and "--size-policy {fit,resize,pad} --out FILE`" in shown
        assert "|" not in shown and "--input-size 224" not in shown and "--size-policy resize" not in shown, shown


def test_main_leaves_the_logging_it_set_up_as_it_found_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """main() in a program without logging set up (a notebook) left its basicConfig handler, with the
    command's flag formatter, on the root logger: the program's later warnings were printed in that command's
    flags ("drop --verify-flips/--verify-shifts, or use --device cpu" for its own "verify_flips=").
    (pytest's own handlers are on the root logger: they are taken off for the test, as in such a program.)"""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    root.setLevel(logging.ERROR)
    try:
        assert main(["audit", "--train", str(tmp_path / "nope"), "--synth", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "x"), "--metric", "ssim"]) == 2
        assert root.handlers == [] and root.level == logging.ERROR, (root.handlers, root.level)
        capsys.readouterr()
        root.setLevel(logging.WARNING)
        logging.getLogger("deepssim_fast.audit").warning("drop verify_flips/verify_shifts, or use device='cpu'")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    assert "drop verify_flips/verify_shifts, or use device='cpu'" in err and "--" not in err, err


def test_a_command_stopped_by_a_damaged_file_does_not_say_the_file_is_left_out(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """`ssim A/ B/` with an empty .nii.gz in B stopped (no scores written) saying "...: damaged gzip data (...);
    the file is not used", the words of a reader that leaves the file out. A command the error stops (ssim, an
    audit with --strict) now says the damage alone; an audit still leaves the file out, and says so."""
    import nibabel as nib

    rng = np.random.default_rng(4)
    t, bad = tmp_path / "train", tmp_path / "bad"
    t.mkdir()
    bad.mkdir()
    for i in range(2):
        np.save(t / f"a{i}.npy", rng.random((32, 32)).astype(np.float32))
    (bad / "empty.nii.gz").write_bytes(b"")  # (an interrupted copy)
    assert main(["ssim", "-q", str(t), str(bad), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "empty.nii.gz: damaged gzip data (EOFError: the file is empty" in err and "not used" not in err, err
    assert not (tmp_path / "s.csv").exists()
    # a gzip stream damaged in the middle: read by the audit's decoder as by ssim's
    (bad / "empty.nii.gz").unlink()
    nib.save(nib.Nifti1Image(rng.random((32, 32, 3)).astype(np.float32), np.eye(4)), bad / "damaged.nii.gz")
    b = bytearray((bad / "damaged.nii.gz").read_bytes())
    b[len(b) // 2:len(b) // 2 + 64] = bytes(64)
    (bad / "damaged.nii.gz").write_bytes(bytes(b))
    np.save(bad / "ok.npy", rng.random((32, 32)).astype(np.float32))
    base = ["audit", "--train", str(t), "--synth", str(bad), "--metric", "ssim", "-k", "1", "--min-foreground", "0",
            "-q"]
    assert main([*base, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "damaged.nii.gz: damaged gzip data" in err and "not used" not in err, err
    assert main([*base, "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    (skip,) = json.loads((tmp_path / "o" / "summary.json").read_text())["skipped"]
    assert skip["path"].endswith("damaged.nii.gz") and skip["reason"].endswith("; the file is not used"), skip


def test_demo_says_what_the_encoder_alone_found(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                tmp_path: Path) -> None:
    """A one-step encoder scored every pair a duplicate, and the demo still printed recall 1.000 (verification
    with k = 10 among 77 slices finds the copies whatever the encoder): the search's own share is printed now,
    with a warning when it labels every pair a duplicate. And its ground truth named an axis-0 flip "flip
    left-right" where the audit (rightly, on screen) says vflip."""
    import deepssim_fast.demo as demo

    base = {"report": "r.html", "recall": 1.0, "precision": 1.0, "found": 36, "planted": 36, "false_positives": 0,
            "near_similar": 24, "near": 24, "novel_different": 15, "novel": 15, "seconds": 9.0,
            "search_source_first": 35}
    for pairs, warned in (({"different": 0, "similar": 0, "duplicate": 5775}, True),
                          ({"different": 5100, "similar": 613, "duplicate": 62}, False)):
        monkeypatch.setattr(demo, "run_demo", lambda *a, pairs=pairs, **kw: dict(base, search_pair_counts=pairs))
        assert main(["demo", "--out", str(tmp_path / "d"), "--train-seconds", "0", "-q"]) == 0
        cap = capsys.readouterr()
        assert (f"true source first for 35/36 planted duplicates; pairs by search score: {pairs['duplicate']} "
                f"duplicate") in cap.out
        assert ("the encoder scores every pair a duplicate: it is barely trained" in cap.err) == warned
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    for seed in range(6):
        out, name = demo._copy_transform("flip", img, np.random.default_rng(seed))
        assert np.array_equal(out, img[::-1]) == name.startswith("vflip (axis 0)")
        assert np.array_equal(out, img[:, ::-1]) == name.startswith("hflip (axis 1)")


def test_demo_says_it_is_building_the_data(monkeypatch, capsys, tmp_path):
    """The demo's first ~20 s (data and truth) had no output at all; with progress on it now names the stage
    on stderr before it starts, and is quiet with progress off."""
    from deepssim_fast import demo

    class _Stop(Exception):
        pass

    def stop(*a, **kw):
        raise _Stop

    monkeypatch.setattr(demo, "build_demo_data", stop)
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "d", train_seconds=0, progress=True)
    err = capsys.readouterr().err
    assert "demo: building the data under" in err and "planted copies" in err, err
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "d", train_seconds=0, progress=False)
    assert "building the data" not in capsys.readouterr().err


def test_sigterm_ends_a_command_as_ctrl_c_does(tmp_path):
    """A batch scheduler's time limit (SIGTERM) ended an audit without a word (status -15), where Ctrl-C
    prints one line with the resume hint. SIGTERM now takes the same way out, with status 143; the process's
    SIGTERM handler is back afterwards, and one ignored by whoever started the command stays ignored. (In a
    subprocess: a handler that failed to install would end the test run itself.)"""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "o"
    script = textwrap.dedent(f"""
        import signal, sys
        from deepssim_fast import cli

        def killed(args):
            signal.raise_signal(signal.SIGTERM)
            raise AssertionError("not reached")

        cli._cmd_audit = killed
        before = signal.getsignal(signal.SIGTERM)
        rc = cli.main(["audit", "--train", {str(tmp_path)!r}, "--synth", {str(tmp_path)!r}, "--out", {str(out)!r},
                       "--metric", "ssim"])
        assert signal.getsignal(signal.SIGTERM) == before, "handler not restored"
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == (f"deepssim-fast audit: terminated (SIGTERM); finished work is kept in "
                                   f"{os.path.join(str(out), 'work')}: run the same command again to resume")
    ignored = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    assert ignored.returncode == 1 and "not reached" in ignored.stderr  # (SIGTERM ignored: the command ran on)


def test_train_resume_without_a_length_keeps_the_runs_own(folders: dict, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture) -> None:
    """The interrupt hint says to continue with --resume; given neither --max-steps nor --epochs, the resumed
    run took --epochs' default 40 (here 40 epochs, not the run's 3 steps) and trained on past the run's end.
    It keeps the resumed run's own total now; --epochs or --max-steps given still set it."""
    base = ["--images", str(folders["train"]), "--backbone", "small", "--emb-dim", "8", "--input-size", "32",
            "-q", "--batch-size", "2", "--val-fraction", "0"]
    assert main(["train", *base, "--out", str(tmp_path / "r"), "--max-steps", "3"]) == 0
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.training"):
        assert main(["train", *base, "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "r" / "last.pt")]) == 0
    from deepssim_fast.model import read_checkpoint

    assert read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 3
    assert "nothing left to train" in caplog.text
    # (and the last line does not say "trained small encoder" for it)
    assert capsys.readouterr().out.splitlines()[-1].startswith("nothing trained (no step left")
    assert main(["train", *base, "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "r" / "last.pt"),
                 "--max-steps", "4"]) == 0
    assert read_checkpoint(tmp_path / "r" / "last.pt")["step"] == 4
    assert capsys.readouterr().out.splitlines()[-1].startswith("trained small encoder")


def test_many_skipped_inputs_are_repeated_at_the_end_up_to_a_limit_and_logged_without_a_doubled_path(
    folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Every skipped file was said twice, in the log as it was met and again at the end, with thousands of bad
    files doubling the log; embed's and train's log line also named the path twice ("skipping X: X: not a
    readable PNG file"). The end repeats the first ten now and says how many more and where all are; the log
    line names the path once."""
    from deepssim_fast.cli import SKIPPED_SHOWN

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    np.save(imgs / "good.npy", folders["arrs"][55])
    n_bad = SKIPPED_SHOWN + 3
    for i in range(n_bad):
        (imgs / f"bad{i:02d}.png").write_bytes(b"not a png")
    from deepssim_fast.model import build_model, save_checkpoint

    model = save_checkpoint(tmp_path / "enc.pt", build_model("small"))
    with caplog.at_level("WARNING"):
        rc = main(["embed", "--model", str(model), "--images", str(imgs), "--out", str(tmp_path / "e.npy"), "-q"])
    err = capsys.readouterr().err
    assert rc == 0
    shown = [ln for ln in err.splitlines() if ln.startswith("warning: skipped")]
    assert len(shown) == SKIPPED_SHOWN
    assert f"warning: ... and 3 more skipped inputs ({n_bad} in all; every one is in the warnings above)" in err
    logged = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(logged) == n_bad
    for m in logged:
        path = m.split("skipping ", 1)[1].split(": ", 1)[0]
        assert m.count(path) == 1, m


def test_verbose_speaks_for_this_tool_not_for_every_library(tmp_path: Path) -> None:
    """-vv set the root logger to DEBUG: dozens of PIL chunk lines (and matplotlib font_manager lines in an
    audit) came between the tool's own. -v/-vv now set this tool's level; other libraries keep to warnings."""
    vol = data.load_volume("mni152").array
    for name, z in (("a.png", 90), ("b.png", 92)):
        sl = vol[40:120, 50:130, z]
        Image.fromarray((sl / sl.max() * 255).astype(np.uint8)).save(tmp_path / name)
    r = run_python("import sys; from deepssim_fast.cli import main; sys.exit(main(sys.argv[1:]))",
                   "-vv", "ssim", str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DEBUG deepssim_fast" in r.stderr or "INFO deepssim_fast" in r.stderr, r.stderr[-2000:]
    others = [ln for ln in r.stderr.splitlines() if ln.startswith(("DEBUG", "INFO"))
              and not ln.split(" ", 2)[1].startswith(("deepssim_fast", "bench"))]
    assert others == [], others[:5]


def test_main_leaves_the_callers_logger_levels(tmp_path: Path) -> None:
    """main() set the package logger's level and left it: a program calling main() (a notebook, a pipeline)
    lost the package's INFO records afterwards, or got its DEBUG ones after a -vv call."""
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16)).astype(np.float32))
    a = str(tmp_path / "a.npy")
    pkg = logging.getLogger("deepssim_fast")
    before = pkg.level
    try:
        pkg.setLevel(logging.INFO)
        assert main(["ssim", a, a]) == 0 and pkg.level == logging.INFO
        assert main(["-vv", "ssim", a, a]) == 0 and pkg.level == logging.INFO
        pkg.setLevel(logging.NOTSET)
        assert main(["-v", "ssim", a, a]) == 0 and pkg.level == logging.NOTSET
    finally:
        pkg.setLevel(before)


def test_a_missing_resume_checkpoint_is_named_before_the_images_are_searched(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train --resume gone.pt searched --images first (a missing folder was the error reported, or a long
    search ran) before saying the checkpoint was missing."""
    rc = main(["train", "--images", str(tmp_path / "no_such_folder"), "--out", str(tmp_path / "o"),
               "--resume", str(tmp_path / "gone.pt")])
    assert rc == 2
    assert capsys.readouterr().err == (f"deepssim-fast train: error: {tmp_path / 'gone.pt'}: no such checkpoint "
                                       "file (--resume)\n")


def test_os_errors_without_a_path_name_and_a_resume_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError naming a file descriptor (filename 999) made the error handler fail with a TypeError; a
    --resume that is a folder was called "no such checkpoint file"."""
    import deepssim_fast.cli as cli

    def bad_fd(args):  # noqa: ANN001, ANN202
        os.stat(999)

    monkeypatch.setattr(cli, "_cmd_doctor", bad_fd)
    parser_default = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_doctor(parser_default(), bad_fd))
    assert main(["doctor"]) == 2
    assert "Bad file descriptor" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        np.save(tmp_path / "imgs" / f"i{i}.npy", np.random.default_rng(i).random((16, 16)).astype(np.float32))
    assert main(["train", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--resume",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint" not in err and "is a directory" in err, err


def _with_doctor(parser, fn):  # noqa: ANN001, ANN202
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub.choices["doctor"].set_defaults(func=fn)
    return parser


def test_demo_into_another_audits_folder_is_refused(monkeypatch, tmp_path: Path, capsys) -> None:
    """demo --out a folder holding another command's audit replaced that audit's matches, summary and report
    without a word. It is refused now, before any work; an earlier demo's folder (its data/ground_truth.csv
    beside the summary) is reused as before."""
    from deepssim_fast import demo

    calls = []
    monkeypatch.setattr(demo, "build_demo_data", lambda *a, **kw: calls.append(1) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    other = tmp_path / "a1"
    other.mkdir()
    (other / "summary.json").write_text("{}")
    assert main(["demo", "--out", str(other), "--train-seconds", "0", "-q"]) == 2
    assert f"{other} holds the outputs of another audit" in capsys.readouterr().err
    assert calls == [] and (other / "summary.json").read_text() == "{}"
    (other / "data").mkdir()
    (other / "data" / "ground_truth.csv").write_text("synth,kind\n")  # an earlier demo's folder
    (other / "matches.csv").write_text("")  # (its audit's outputs: summary.json beside matches.csv)
    assert main(["demo", "--out", str(other), "--train-seconds", "0", "-q"]) == 130  # (reached the data stage)
    assert calls == [1]


def test_help_describes_the_tool_not_the_module(capsys) -> None:
    """`deepssim-fast --help` showed the module's developer note ("printing happens here only")."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "printing happens here" not in out and "memorised" in out and "doctor" in out


def test_demo_without_its_data_leaves_no_empty_folders(monkeypatch, tmp_path: Path) -> None:
    """Without the data extra the demo failed with a clear message but left OUT/data/{train,synth} behind."""
    from deepssim_fast import demo

    def missing():
        raise ImportError("no nilearn")

    monkeypatch.setattr(demo, "_template_slices", missing)
    with pytest.raises(ImportError):
        demo.build_demo_data(tmp_path / "data")
    assert not (tmp_path / "data" / "train").exists() and not (tmp_path / "data" / "synth").exists()


def test_audit_into_a_folder_of_the_users_with_files_of_its_names_is_refused_in_one_line(
        folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An --out that is no audit's (a project folder) lost its evaluation.json and work/search*.npz without a
    word. They are refused now, before any work, in one line naming them and the way out; nothing is touched
    (no lock file is left either). evaluate beside a running audit of its folder is one line too."""
    from deepssim_fast.audit import _out_lock

    proj = tmp_path / "proj"
    (proj / "work").mkdir(parents=True)
    (proj / "evaluation.json").write_text("{}")
    (proj / "work" / "search1.npz").write_bytes(b"mine")
    args = ["audit", "--train", str(folders["train"]), "--synth", str(folders["synth"]), "--metric", "correlation",
            "--verify", "none", "-k", "1", "-q"]
    assert main([*args, "--out", str(proj)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"deepssim-fast audit: error: {proj} is not an audit's output "
                                                   "folder"), err
    assert "evaluation.json, work/search1.npz" in err and "give another --out" in err
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == ["evaluation.json", "work", "work/search1.npz"]
    assert (proj / "evaluation.json").read_text() == "{}" and (proj / "work" / "search1.npz").read_bytes() == b"mine"
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    labels = tmp_path / "labels.csv"
    labels.write_text("real_key,synth_key,label\nt055.npy,copy55.npy,1\n")
    capsys.readouterr()
    with _out_lock(out):  # (an audit rerun in progress)
        assert main(["evaluate", "--audit", str(out), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"deepssim-fast evaluate: error: {out} is in use by an audit (process" in err
    assert not (out / "evaluation.json").exists()


def test_demo_into_a_folder_the_audit_would_refuse_is_refused_before_the_data(tmp_path: Path) -> None:
    """A review found the demo ran its data (~20 s) and encoder (~150 s) into a folder holding a report.html or
    a work folder of the user's, and only then had the audit refuse it; it is refused first now."""
    from deepssim_fast import demo

    out = tmp_path / "proj"
    (out / "work").mkdir(parents=True)
    (out / "work" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an audit's output folder"):
        demo.run_demo(out, train_seconds=0, progress=False)
    assert not (out / "data").exists()


def test_ssim_of_folders_of_float64_and_float32_files(tmp_path: Path, capsys) -> None:
    """`deepssim-fast ssim A_FOLDER B_FOLDER` where one side's .npy files are float64 and the other's float32
    stopped with a TypeError traceback (A and B must have the same dtype); the file-vs-file case cast both."""
    from deepssim_fast import ssim

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = rng.random((20, 24), dtype=np.float32)
    b = 1e4 + rng.random((20, 24))  # (float64, not exact in float32)
    np.save(tmp_path / "a" / "a0.npy", a)
    np.save(tmp_path / "b" / "b0.npy", b)
    assert main(["ssim", str(tmp_path / "a"), str(tmp_path / "b"), "--out", "-", "-q"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    assert float(row[2]) == pytest.approx(float(ssim(a.astype(np.float64), b)), abs=1e-6)


def test_a_diverging_training_run_is_one_line_with_the_resume_hint(folders: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A diverging run raised FloatingPointError, which the error handler did not catch: a 15-line traceback and
    exit 1, while the README presents it as an expected outcome ("lower --lr")."""
    out = tmp_path / "o"
    argv = ["train", "--images", str(folders["train"]), "--out", str(out), "--input-size", "32", "--batch-size",
            "4", "--max-steps", "6", "--lr", "1e6", "--val-fraction", "0", "--val-every", "1", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("deepssim-fast train: error: training diverged") and "lower the learning rate (--lr)" in err
    assert (out / "last.pt").is_file()  # (a finite checkpoint of a step before: the hint names it)
    assert f"--resume {out / 'last.pt'} and a lower --lr" in err, err


def test_export_writes_torchscript_that_plain_torch_loads(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The README says the tool reads and writes the published weights' format (TorchScript), but no command
    wrote it. `deepssim-fast export` does: plain torch.jit.load of the file gives the loaded checkpoint's raw
    outputs; a foreign TorchScript file is written again with its preprocessing settings."""
    import torch

    from deepssim_fast.model import build_model, load_model

    torch.manual_seed(0)
    ck = tmp_path / "enc.pt"
    build_model("small", input_size=32).save_checkpoint(ck)
    ts = tmp_path / "enc.ts.pt"
    assert main(["export", "--model", str(ck), "--out", str(ts)]) == 0
    assert f"to {ts}" in capsys.readouterr().out
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.jit.load(str(ts))(x), load_model(ck)(x))
    assert load_model(ts).config == load_model(ck).config
    assert main(["export", "--model", str(ts), "--out", str(tmp_path / "again.pt")]) == 0  # (ours: as it is)
    # a foreign file (no stored settings) is written again with the settings given, which loads then read
    foreign = tmp_path / "foreign.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1))).save(str(foreign))
    assert main(["export", "--model", str(foreign), "--out", str(tmp_path / "f2.pt"), "--input-size", "48",
                 "--size-policy", "fit"]) == 0
    m = load_model(tmp_path / "f2.pt")
    assert (m.config.input_size, m.config.size_policy, m.config.extra.get("foreign")) == (48, "fit", True)
    capsys.readouterr()
    # export given --input-size alone, as the foreign file's warning advised: that warning (which advised this
    # very command, "--size-policy fit|resize|pad" unquoted, a shell pipeline) is not given; export says what
    # the copy stores instead
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.model"):
        assert main(["export", "--model", str(foreign), "--out", str(tmp_path / "f4.pt"), "--input-size",
                     "128"]) == 0
    err = capsys.readouterr().err
    assert "stores no preprocessing settings" not in caplog.text, caplog.text
    assert ("--size-policy was not given: the copy stores the published DeepSSIM encoder's size policy resize; "
            "if the model expects other settings, run export again with --size-policy {fit,resize,pad}") in err, err
    assert "|" not in err and "--input-size" not in err, err
    m = load_model(tmp_path / "f4.pt")
    assert (m.config.input_size, m.config.size_policy) == (128, "resize")
    for argv, said in ((["--out", str(ck)], "is the --model file itself"), (["--out", str(tmp_path)], "is a folder")):
        assert main(["export", "--model", str(ck), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("deepssim-fast export: error:") and said in err, err
    assert main(["export", "--model", str(ck), "--out", str(tmp_path / "x.pt"), "--input-size", "64"]) == 2
    assert "overrides apply to foreign TorchScript files only" in capsys.readouterr().err


def test_embed_leaves_out_earlier_embeddings_and_refuses_an_input_as_out(folders: dict, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """`embed --out DIR/emb.npy --images DIR` run again embedded its own emb.npy as an image (a fourth row,
    without a word); `--out DIR/copy55.npy`, an input, was overwritten by the embeddings."""
    import torch

    from deepssim_fast.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small", input_size=64, emb_dim=32))
    d = tmp_path / "imgs"
    shutil.copytree(folders["synth"], d)
    out = d / "emb.npy"
    args = ["embed", "--model", str(ckpt), "--images", str(d), "-q", "--out"]
    assert main([*args, str(out)]) == 0
    assert np.load(out).shape[0] == 3 and capsys.readouterr().err == ""
    # an earlier run's output of another name (its ids a JSON list), and this run's own: both left out, said once
    np.save(d / "old.npy", np.load(out))
    (d / "old.ids.json").write_text("[]")
    assert main([*args, str(out)]) == 0
    err = capsys.readouterr().err
    assert np.load(out).shape[0] == 3 and "emb.npy" not in out.with_suffix(".ids.txt").read_text()
    assert err.count("\n") == 1 and "left out 2 .npy file(s)" in err and f"e.g. {out}" in err, err
    # an input named as --out (given as written, without .npy, or by another path to it) is refused before the
    # model is loaded, and left as it was
    kept = (d / "copy55.npy").read_bytes()
    for given in (d / "copy55.npy", d / "copy55", tmp_path / "imgs" / ".." / "imgs" / "copy55.npy"):
        assert main(["embed", "--model", str(tmp_path / "missing.pt"), "--images", str(d), "--out", str(given)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "copy55.npy is one of the input images" in err, err
    assert (d / "copy55.npy").read_bytes() == kept and not (d / "copy55.ids.txt").exists()
    # a folder of earlier embeddings only: nothing to embed, said so
    e = tmp_path / "embs"
    e.mkdir()
    shutil.copy(out, e / "a.npy")
    shutil.copy(out.with_suffix(".ids.txt"), e / "a.ids.txt")
    assert main([*args[:4], str(e), "--out", str(tmp_path / "b.npy")]) == 2
    assert "no image to embed" in capsys.readouterr().err


def test_export_refuses_to_overwrite_a_training_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`export --out RUN/last.pt` wrote TorchScript over the run's checkpoint: `train --resume` then failed. Any
    other existing file is replaced, and the line says so."""
    from deepssim_fast.model import build_model, save_checkpoint

    model = build_model("small", input_size=32)
    ck = model.save_checkpoint(tmp_path / "enc.pt")
    run = tmp_path / "run"
    run.mkdir()
    last = save_checkpoint(run / "last.pt", model, step=3, best_val=None)
    kept = last.read_bytes()
    assert main(["export", "--model", str(ck), "--out", str(last)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(last) in err and "training checkpoint" in err and "resume" in err, err
    assert last.read_bytes() == kept
    ts = tmp_path / "enc.ts.pt"
    assert main(["export", "--model", str(ck), "--out", str(ts)]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main(["export", "--model", str(ck), "--out", str(ts)]) == 0  # (TorchScript: replaced, said)
    assert "replaced" in capsys.readouterr().out
    (tmp_path / "notes.pt").write_text("x")
    assert main(["export", "--model", str(ck), "--out", str(tmp_path / "notes.pt")]) == 0
    assert "replaced" in capsys.readouterr().out


def test_cli_device_errors_give_the_flag_and_batch_size_help_its_minimum(
        folders: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA device this machine lacks was answered "use device='cpu'" (the API's spelling) on the command
    line; `train --help` did not say that --batch-size 1 is refused."""
    import argparse

    import torch

    from deepssim_fast.model import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ck = build_model("small", input_size=32).save_checkpoint(tmp_path / "enc.pt")
    for argv in (["embed", "--model", str(ck), "--images", str(folders["synth"]), "--out", str(tmp_path / "e.npy")],
                 ["train", "--images", str(folders["train"]), "--out", str(tmp_path / "t"), "--max-steps", "1"]):
        assert main([*argv, "--device", "cuda", "-q"]) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available here" in err and "use --device cpu" in err and "device='cpu'" not in err, err
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bs = next(a for a in subs.choices["train"]._actions if a.dest == "batch_size")
    assert "at least 2" in bs.help
