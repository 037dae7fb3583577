"""deepssim_fast.io: discovery, decoding (PNG / .npy / NIfTI), slicing; real shipped MRI and seeded data."""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from deepssim_fast import data
from deepssim_fast.data import DataError, SlicePolicy
from deepssim_fast.io import discover, image_kind, iter_slices, read_image


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "b" / "deep" / "z.npy", rng.random((9, 7)).astype(np.float32))
    np.save(tmp_path / "a" / "y.npy", rng.random((9, 7)).astype(np.float32))
    _png(tmp_path / "a" / "x.png", (rng.random((9, 7)) * 255).astype(np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    return tmp_path


def test_discover_directory_is_recursive_sorted_and_filtered(tree: Path) -> None:
    got = discover(tree)
    assert [p.relative_to(tree.resolve()).as_posix() for p in got] == ["a/x.png", "a/y.npy", "b/deep/z.npy"]
    assert all(p.is_absolute() for p in got)


def test_discover_glob_file_and_list_deduplicate(tree: Path) -> None:
    g = discover(str(tree / "a" / "*.npy"))
    assert [p.name for p in g] == ["y.npy"]
    both = discover([tree / "a", str(tree / "a" / "y.npy"), str(tree / "**" / "*.npy")])
    assert [p.name for p in both] == ["x.png", "y.npy", "z.npy"]
    assert discover(tree / "a" / "x.png") == [(tree / "a" / "x.png").resolve()]


@pytest.mark.parametrize(
    "spec,match",
    [("missing_dir", "no such file"), ("*.nothing", "matched no"), ("a/notes.txt", "unsupported file type")],
)
def test_discover_errors_name_the_spec(tree: Path, spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as ei:
        discover(str(tree / spec))
    assert spec.split("/")[-1] in str(ei.value)


def test_discover_names_image_files_of_formats_it_does_not_read(
    tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DICOM, JPEG and MGZ files in a searched folder were left out without a word; they are still left out,
    counted by format in one warning. Files that are not images (notes.txt) are not mentioned."""
    for name in ("b/deep/slice1.dcm", "b/deep/slice2.DCM", "a/photo.jpg", "brain.mgz"):
        (tree / name).write_bytes(b"\0" * 8)
    with caplog.at_level("WARNING", logger="deepssim_fast.io"):
        got = discover(tree)
    assert [p.name for p in got] == ["x.png", "y.npy", "z.npy"]
    msgs = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(msgs) == 1
    assert "4 file(s)" in msgs[0] and "2 .dcm" in msgs[0] and "1 .jpg" in msgs[0] and "1 .mgz" in msgs[0]
    assert "notes" not in msgs[0] and ".txt" not in msgs[0]
    # a glob that matches them names them too (a quoted 'dir/*' finds what the folder's search finds, and
    # left them out without a word); matched through a folder, they are counted once
    for pattern, n in ((f"{tree}/*", 4), (f"{tree}/b/deep/*", 2), (f"{tree}/**", 4)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="deepssim_fast.io"):
            discover(pattern)
        msgs = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
        assert sum(int(m.split(" file(s)")[0].rsplit(" ", 1)[1]) for m in msgs) == n, (pattern, msgs)


def test_discover_empty_directory_and_empty_list(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        discover(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty input"):
        discover([])


def test_image_kind() -> None:
    assert image_kind("a/b.NII.GZ") == "nifti"
    assert image_kind("x.nii") == "nifti"
    assert image_kind("x.png") == "png"
    assert image_kind("x.npy") == "npy"
    assert image_kind("x.jpg") is None


def test_read_png_gray8_gray16_rgb_rgba(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    g8 = (rng.random((13, 11)) * 255).astype(np.uint8)
    out = read_image(_png(tmp_path / "g8.png", g8))
    assert out.dtype == np.float32 and out.shape == (13, 11)
    np.testing.assert_array_equal(out, g8.astype(np.float32))
    g16 = (rng.random((13, 11)) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_image(_png(tmp_path / "g16.png", g16)), g16.astype(np.float32))
    rgb = (rng.random((13, 11, 3)) * 255).astype(np.uint8)
    want = 0.299 * rgb[..., 0].astype(np.float32) + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(read_image(_png(tmp_path / "rgb.png", rgb)), want, rtol=0, atol=1e-4)
    rgba = np.concatenate([rgb, (rng.random((13, 11, 1)) * 255).astype(np.uint8)], axis=2)
    np.testing.assert_allclose(read_image(_png(tmp_path / "rgba.png", rgba)), want, rtol=0, atol=1e-4)



_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png16(path: Path, arr: np.ndarray, colour: int, interlace: bool = False) -> Path:
    """A 16-bit PNG of colour type ``colour`` written by hand (Pillow writes no 16-bit colour): the scanlines
    use the five PNG filter types in turn, optionally Adam7-interlaced."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    px = np.ascontiguousarray(arr.reshape(h, w, -1), ">u2").view(np.uint8).reshape(h, w, -1).astype(np.int16)
    raw = bytearray()
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        sub = px[y0::dy, x0::dx]
        if sub.size == 0:
            continue
        a = np.pad(sub, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        b = np.pad(sub, ((1, 0), (0, 0), (0, 0)))[:-1]
        c = np.pad(sub, ((1, 0), (1, 0), (0, 0)))[:-1, :-1]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        preds = [0 * a, a, b, (a + b) >> 1, np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))]
        for y in range(sub.shape[0]):
            t = (y + x0) % 5
            raw += bytes([t]) + ((sub[y] - preds[t][y]) & 255).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, int(interlace))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("interlace", [False, True])
def test_read_png16_colour_keeps_16_bits(tmp_path: Path, interlace: bool) -> None:
    """16-bit RGB, RGBA and grey+alpha keep their 16-bit samples through the conversion to grey (Pillow
    reads them as 8 bits), every filter type and Adam7 included; their dtype range is uint16's."""
    from deepssim_fast.io import stored_dtype

    rng = np.random.default_rng(7)
    for h, w in ((13, 11), (3, 2), (1, 1)):
        rgba = rng.integers(0, 65536, (h, w, 4)).astype(np.uint16)
        rgba[0, 0, :3] = 65535
        f = rgba.astype(np.float32)
        lum = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        for name, colour, arr, want in (("rgb", 2, rgba[..., :3], lum), ("rgba", 6, rgba, lum),
                                        ("la", 4, rgba[..., [0, 3]], f[..., 0])):
            p = _png16(tmp_path / f"{name}{h}.png", arr, colour, interlace)
            got = read_image(p)
            assert got.dtype == np.float32 and got.shape == (h, w)
            np.testing.assert_array_equal(got, want)
            assert stored_dtype(p) == np.uint16
            # the same file through Pillow gives the high bytes of the samples this reader returns
            with Image.open(p) as im:
                np.testing.assert_array_equal(np.asarray(im)[..., 0], arr[..., 0] >> 8)
    g = rng.integers(0, 65536, (40, 30)).astype(np.uint16)
    got = read_image(_png16(tmp_path / "many.png", np.dstack([g, g, g]), 2, interlace))
    assert len(np.unique(got)) == len(np.unique(g)) and float(got.max()) > 255


def test_read_png16_colour_damaged_names_path(tmp_path: Path) -> None:
    p = _png16(tmp_path / "rgb.png", np.zeros((5, 4, 3), np.uint16), 2)
    good = p.read_bytes()
    p.write_bytes(good[:-20])  # truncated inside IDAT
    with pytest.raises(DataError, match="rgb.png: not a readable PNG file.*truncated"):
        read_image(p)
    bad = bytearray(good)
    bad[40] ^= 0xFF  # a byte inside the IDAT chunk: its CRC no longer matches
    p.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="rgb.png: not a readable PNG file.*CRC"):
        read_image(p)


def _chunk_at(data: bytes, kind: bytes) -> tuple[int, int]:
    """``(offset, length)`` of the first chunk of type ``kind`` in a PNG file's bytes."""
    import struct

    pos = 8
    while True:
        n, t = struct.unpack(">I4s", data[pos : pos + 8])
        if t == kind:
            return pos, n
        pos += 12 + n


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16"])
@pytest.mark.parametrize("kind", [b"IDAT", b"tEXt"])
def test_png_with_a_bad_chunk_crc_is_refused_for_every_decoder(tmp_path: Path, mode: str, kind: bytes) -> None:
    """A CRC mismatch marks a damaged file for the PNGs Pillow decodes too, as for the 16-bit colour ones
    this module decodes: Pillow itself does not check the CRC of the image data (IDAT), and an ancillary
    chunk's bad CRC came out as 'cannot identify image file'."""
    from PIL import PngImagePlugin

    arr = np.arange(12 * 10).reshape(12, 10) % 250
    img = Image.fromarray(arr.astype(np.uint16 if mode == "I;16" else np.uint8))
    img = img.convert(mode) if mode in ("RGB", "P") else img
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "synthetic sample")
    p = tmp_path / "bad.png"
    img.save(p, pnginfo=info)
    read_image(p)  # intact: decodes
    data = bytearray(p.read_bytes())
    pos, n = _chunk_at(bytes(data), kind)
    data[pos + 8 + n] ^= 0x5A  # the chunk's stored CRC; its contents are intact
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"bad.png: not a readable PNG file .*CRC error in the '{kind.decode()}'"):
        read_image(p)


def test_png_past_pillows_decompression_bomb_limit_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    """Pillow's DecompressionBombError (an image past PIL.Image.MAX_IMAGE_PIXELS, e.g. 13500 x 13500) escaped
    as itself: not a DataError, so an audit stopped instead of skipping the file with its reason."""
    from PIL import Image

    from deepssim_fast.io import stored_dtype

    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > 2 x 100: Pillow's error, not its warning
    for read in (read_image, stored_dtype):
        with pytest.raises(DataError, match=r"big\.png: the image is larger than Pillow's decompression-bomb "
                                            r"limit .*raise PIL\.Image\.MAX_IMAGE_PIXELS \(now 100\)"):
            read(p)


@pytest.mark.parametrize("depth", [2, 8])
def test_png_palette_index_past_the_palette_is_refused(tmp_path: Path, depth: int) -> None:
    """A palette image whose pixels index past the end of its PLTE has no colour for them; Pillow decoded
    them as black (0), a made-up value. Indices within the palette keep their luminance."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def write(name: str, idx: list[int]) -> Path:
        row = bytes(idx) if depth == 8 else bytes([sum(v << (6 - 2 * i) for i, v in enumerate(idx))])
        p = tmp_path / name
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 1, depth, 3, 0, 0, 0))
                      + chunk(b"PLTE", bytes([10, 20, 30, 40, 50, 60, 70, 80, 90]))
                      + chunk(b"IDAT", zlib.compress(b"\x00" + row)) + chunk(b"IEND", b""))
        return p

    got = read_image(write("ok.png", [0, 1, 2, 1]))
    lum = [np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
           for r, g, b in ((10, 20, 30), (40, 50, 60), (70, 80, 90), (40, 50, 60))]
    np.testing.assert_array_equal(got, np.array([lum], np.float32))
    with pytest.raises(DataError, match="bad.png: not a readable PNG file .*palette index 3.* 3 entries"):
        read_image(write("bad.png", [0, 1, 3, 2]))


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("depth,scale,dtype", [(1, 1, np.bool_), (2, 85, np.uint8), (4, 17, np.uint8)])
def test_png_low_bit_depth_grey_values_and_dtype_range(
    tmp_path: Path, depth: int, scale: int, dtype: type, interlace: bool
) -> None:
    """1-, 2- and 4-bit greyscale (bit-packed rows, odd widths, Adam7 too) decode as the module docstring
    says: 1-bit as 0/1 with bool's range, 2- and 4-bit scaled to 0..255 with uint8's."""
    import struct
    import zlib

    from deepssim_fast.io import stored_dtype

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rng = np.random.default_rng(depth)
    for w, h in ((1, 1), (3, 2), (7, 5), (9, 9)):
        s = rng.integers(0, 1 << depth, (h, w))
        raw = b""
        for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
            for row in s[y0::dy, x0::dx]:
                if row.size:  # a pass with no columns has no scanlines
                    bits = "".join(format(int(v), f"0{depth}b") for v in row)
                    bits += "0" * (-len(bits) % 8)
                    raw += b"\x00" + bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
        p = tmp_path / f"g{depth}_{w}x{h}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, interlace))
                      + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        np.testing.assert_array_equal(read_image(p), (s * scale).astype(np.float32))
        assert stored_dtype(p) == dtype


def test_read_npy_ranks_frames_and_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for dt in (np.uint8, np.int16, np.float64, np.float32):
        a = (rng.random((8, 9, 5)) * 100).astype(dt)
        np.save(tmp_path / "v.npy", a)
        got = read_image(tmp_path / "v.npy")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, a.astype(np.float32))
    four = rng.random((6, 7, 8, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", four)
    with pytest.raises(DataError, match="choose a frame"):
        read_image(tmp_path / "f.npy")
    np.testing.assert_array_equal(read_image(tmp_path / "f.npy", frame=2), four[..., 2])
    with pytest.raises(DataError, match="out of range"):
        read_image(tmp_path / "f.npy", frame=3)


def test_a_4d_file_without_a_frame_names_the_frame_once(tmp_path: Path, capsys) -> None:
    """The message for a 4D file read without a frame carried its own hint for the command line, which the CLI's
    translation of keywords into flags doubled: "choose a frame (--frame 0..2; command line: --frame)". It says
    ``frame=`` from Python and ``--frame`` on the command line, once."""
    from deepssim_fast import cli

    four = np.random.default_rng(2).random((6, 7, 8, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", four)
    nib.save(nib.Nifti1Image(four, np.eye(4)), tmp_path / "f.nii")
    for name, what in (("f.npy", "array"), ("f.nii", "volume")):
        f = str(tmp_path / name)
        with pytest.raises(DataError) as ei:
            read_image(f)
        assert str(ei.value) == f"{f}: 4D {what} of shape (6, 7, 8, 3); choose a frame (frame=0..2)"
        capsys.readouterr()
        assert cli.main(["ssim", f, f]) == 2
        err = capsys.readouterr().err
        assert f"{f}: 4D {what} of shape (6, 7, 8, 3); choose a frame (--frame 0..2)\n" in err, err
        assert "command line" not in err, err

def test_folder_search_leaves_hidden_files_out_as_a_glob_does(tmp_path: Path) -> None:
    """A folder search listed macOS's ``._x.png`` companions and files in ``.git`` (which then failed to read,
    aborting --strict audits), where the README's "a quoted glob finds the same files" left them out."""
    img = np.arange(64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("a.npy", "._a.npy", ".hidden.npy", "sub/b.npy", "sub/.c.npy", ".git/d.npy"):
        np.save(tmp_path / name, img)
    want = [tmp_path / "a.npy", tmp_path / "sub" / "b.npy"]
    assert discover(tmp_path) == want
    assert discover(str(tmp_path / "*")) == want
    assert discover(str(tmp_path / "**" / "*.npy")) == want
    # named, a hidden file or folder is used
    assert discover(tmp_path / "._a.npy") == [tmp_path / "._a.npy"]
    assert discover(tmp_path / ".git") == [tmp_path / ".git" / "d.npy"]
    assert discover(str(tmp_path / ".*.npy")) == [tmp_path / "._a.npy", tmp_path / ".hidden.npy"]


def test_read_image_in_float64_keeps_stored_values(tmp_path: Path) -> None:
    """dtype=np.float64: float64 .npy and NIfTI values come back exactly (PNG samples as stored); the
    default stays float32; other dtypes are refused."""
    rng = np.random.default_rng(3)
    a = 1e5 + rng.random((9, 11))
    np.save(tmp_path / "a.npy", a)
    nib.save(nib.Nifti1Image(a[..., None].copy(), np.eye(4)), tmp_path / "a.nii.gz")
    for name in ("a.npy", "a.nii.gz"):
        got = read_image(tmp_path / name, dtype=np.float64)
        assert got.dtype == np.float64 and np.array_equal(got.reshape(a.shape), a), name
        assert read_image(tmp_path / name).dtype == np.float32
    px = np.array([[65535, 7], [3, 40000]], dtype=np.uint16)
    Image.fromarray(px).save(tmp_path / "px.png")
    got = read_image(tmp_path / "px.png", dtype=np.float64)
    assert got.dtype == np.float64 and np.array_equal(got, px)
    with pytest.raises(ValueError, match="float32 or float64"):
        read_image(tmp_path / "a.npy", dtype=np.int16)



@pytest.mark.parametrize(
    "content,match",
    [
        (np.zeros((4, 4), dtype=object), "not a readable .npy"),
        (np.array([[1.0, np.nan], [0.0, 1.0]], dtype=np.float32), "NaN or Inf"),
        (np.zeros(5, dtype=np.float32), "expected a 2D image or 3D volume"),
        (np.zeros((3, 3), dtype=np.complex64), "unsupported dtype"),
        # numpy files timedelta64 under the integers; a duration is not a pixel value (the ssim command
        # stopped on "Invalid integer data type 'm'.")
        (np.arange(9).reshape(3, 3).astype("m8[s]"), "unsupported dtype timedelta64"),
    ],
)
def test_read_npy_bad_content_names_path(tmp_path: Path, content: np.ndarray, match: str) -> None:
    p = tmp_path / "bad.npy"
    np.save(p, content, allow_pickle=True)
    with pytest.raises(DataError, match=match) as ei:
        read_image(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("raw,reason", [(b"junk", "does not start with"), (b"", "the file is empty")])
def test_a_npy_file_without_the_numpy_header_is_not_called_a_pickle(tmp_path: Path, raw: bytes,
                                                                    reason: str) -> None:
    """A corrupt or mislabelled .npy (4 bytes of junk) was reported with numpy's reason "This file contains
    pickled (object) data. If you trust the file you can load it unsafely ...": neither true nor advice to
    follow. The reason now says what is wrong: no NumPy header."""
    p = tmp_path / "bad.npy"
    p.write_bytes(raw)
    with pytest.raises(DataError) as ei:
        read_image(p)
    msg = str(ei.value)
    assert str(p) in msg and "no NumPy header" in msg and reason in msg
    assert "pickle" not in msg and "unsafely" not in msg


def test_an_empty_png_is_called_empty(tmp_path: Path) -> None:
    """A 0-byte .png was "not a PNG, nor another image format Pillow identifies", where an empty .npy or
    NIfTI is called empty."""
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.png: not a readable PNG file \(the file is empty\)"):
        read_image(p)


def test_read_corrupt_and_missing_files(tmp_path: Path) -> None:
    for name in ("c.png", "c.npy", "c.nii.gz", "c.nii"):
        p = tmp_path / name
        p.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(DataError) as ei:
            read_image(p)
        assert str(p) in str(ei.value)
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.jpg").write_bytes(b"x")
        read_image(tmp_path / "x.jpg")


def test_unidentifiable_png_reason_is_the_same_on_every_read(tmp_path: Path) -> None:
    """Pillow's 'cannot identify image file <_io.BytesIO object at 0x7f...>' put a memory address in the skip
    reason, so an audit rerun into the same OUT (a resume) wrote another summary.json and report.html."""
    p = tmp_path / "c.png"
    p.write_bytes(b"\x00garbage" * 10)
    reasons = set()
    for _ in range(3):
        with pytest.raises(DataError) as ei:
            read_image(p)
        reasons.add(str(ei.value))
    (reason,) = reasons
    assert reason.startswith(f"{p}: not a readable PNG file") and " at 0x" not in reason


@pytest.mark.parametrize("suffix", [".Nii", ".Nii.gz", ".nIi.GZ"])
def test_nifti_with_a_mixed_case_extension_is_read(tmp_path: Path, suffix: str) -> None:
    """discover() takes ``scan.Nii.gz`` as NIfTI, but nibabel looked for ``scan.nii.gz`` and reported the file
    that exists as missing, so the audit skipped it ('No such file or directory'). NIfTI-2 too."""
    from deepssim_fast.io import _file_slices, _file_volumes

    rng = np.random.default_rng(3)
    vol = rng.random((8, 7, 5)).astype(np.float32) + 1  # (slices of 8 x 7: at least the SSIM window)
    series = rng.random((8, 7, 5, 2)).astype(np.float32) + 1
    for stem, arr, klass in (("v", vol, nib.Nifti1Image), ("s", series, nib.Nifti1Image),
                             ("n2", vol, nib.Nifti2Image)):
        lower = tmp_path / f"{stem}{suffix.lower()}"
        nib.save(klass(arr, np.eye(4)), str(lower))
        p = lower.rename(tmp_path / f"{stem}{suffix}")
        assert discover(tmp_path / f"{stem}*") == [p]
        if arr.ndim == 3:
            np.testing.assert_array_equal(read_image(p), arr)
            got = [s.array for s in _file_slices(p, SlicePolicy(min_foreground=0))]
            np.testing.assert_array_equal(np.stack(got, axis=2), arr)
        else:
            np.testing.assert_array_equal(read_image(p, frame=1), arr[..., 1])
            assert [s for s, _ in _file_volumes(p)] == [f"{p}@t0", f"{p}@t1"]
            assert len(_file_slices(p, SlicePolicy(min_foreground=0))) == 10


@pytest.mark.parametrize("name", ["phase.nii", "phase.nii.gz", "phase4d.nii.gz"])
def test_complex_nifti_is_refused_not_cast_to_its_real_part(tmp_path: Path, name: str) -> None:
    """A complex NIfTI (MR magnitude + phase) was read as its real part, the imaginary part dropped with only
    numpy's ComplexWarning; it is refused by path, like a complex .npy, and skipped by iter_slices."""
    rng = np.random.default_rng(0)
    shape = (12, 10, 3, 2) if "4d" in name else (12, 10, 3)
    a = (rng.random(shape) + 1j * rng.random(shape)).astype(np.complex64)
    p = tmp_path / name
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(p))
    with pytest.raises(DataError, match="complex") as ei:
        read_image(p, frame=0 if a.ndim == 4 else None)
    assert str(p) in str(ei.value)
    skipped: list = []
    assert list(iter_slices([p], SlicePolicy(min_foreground=0), skipped=skipped)) == []
    assert len(skipped) == 1 and skipped[0][0] == str(p) and "complex" in skipped[0][1]


def test_read_nifti_real_scan_matches_loader() -> None:
    p = data.dataset_path("anatomical")
    np.testing.assert_array_equal(read_image(p), data.load_volume("anatomical").array)


@pytest.mark.parametrize("name", ["anatomical", "s0_10slices"])  # .nii (array proxy) and .nii.gz
@pytest.mark.parametrize(
    "policy",
    [SlicePolicy(), SlicePolicy(axis=0, start=3, stop=20, step=2), SlicePolicy(axis=1, min_foreground=0.0)],
)
def test_iter_slices_real_volumes_match_volume_slices(name: str, policy: SlicePolicy) -> None:
    p = data.dataset_path(name)
    got = list(iter_slices([p], policy))
    want = data.load_slices(name, policy)
    assert [(s.axis, s.index) for s in got] == [(s.axis, s.index) for s in want]
    assert all(s.source == str(p) for s in got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.array, w.array)
        assert g.array.dtype == np.float32


def test_iter_slices_4d_cut_per_frame_and_2d_gives_itself(tmp_path: Path) -> None:
    p4 = data.dataset_path("example4d")
    sl = list(iter_slices([p4], SlicePolicy(min_foreground=0.0)))
    n = nib.load(str(p4)).shape[2]
    assert [s.source for s in sl] == [f"{p4}@t0"] * n + [f"{p4}@t1"] * n
    np.testing.assert_array_equal(sl[n + 3].array, data.load_volume("example4d", frame=1).array[:, :, 3])
    img = np.arange(63, dtype=np.float32).reshape(7, 9)
    np.save(tmp_path / "two.npy", img)
    (one,) = list(iter_slices([tmp_path / "two.npy"]))
    assert one.index == 0 and one.key == f"{tmp_path / 'two.npy'}#2:0"
    np.testing.assert_array_equal(one.array, img)


def test_iter_slices_skips_or_raises_on_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = tmp_path / "good.nii"
    shutil.copy(data.dataset_path("anatomical"), good)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not gzip at all")
    trunc = tmp_path / "trunc.nii"
    trunc.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    skipped: list = []
    with caplog.at_level("WARNING"):
        out = list(iter_slices([bad, good, trunc], skipped=skipped))
    assert {s.source for s in out} == {str(good)}
    assert [p for p, _ in skipped] == [str(bad), str(trunc)]
    assert all(p in r for p, r in skipped)
    assert "skipping" in caplog.text and str(bad) in caplog.text
    with pytest.raises(DataError, match="bad.nii.gz"):
        list(iter_slices([good, bad], strict=True))


def test_iter_slices_logs_a_multi_line_reason_on_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nibabel's reason for short data has a newline: the 'skipping' warning is one line, the reason given
    back in ``skipped`` is kept as it is."""
    import gzip

    raw = data.dataset_path("anatomical").read_bytes()
    bad = tmp_path / "short.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) - 4096]))  # a valid gzip of a truncated .nii
    skipped: list = []
    with caplog.at_level("WARNING", logger="deepssim_fast.io"):
        assert list(iter_slices([bad], skipped=skipped)) == []
    ((path, reason),) = skipped
    assert path == str(bad) and "\n" in reason and "damaged" in reason
    (msg,) = [rec.getMessage() for rec in caplog.records]
    assert reason.startswith(f"{bad}: ")  # (the log line names the path once)
    assert msg == f"skipping {bad}: {' '.join(reason[len(str(bad)) + 2:].split())}"


def test_discover_keeps_symlink_paths(tmp_path: Path) -> None:
    """A link is reported under the name the user gave (absolute, not resolved); two links stay two files."""
    target = tmp_path / "real" / "t0.npy"
    target.parent.mkdir()
    np.save(target, np.zeros((8, 8), np.float32))
    (tmp_path / "synth").mkdir()
    try:
        os.symlink(target, tmp_path / "synth" / "gen_1.npy")
        os.symlink(target, tmp_path / "synth" / "gen_2.npy")
    except (OSError, NotImplementedError):
        pytest.skip("this OS cannot make symlinks")
    got = discover(tmp_path / "synth")
    assert got == [tmp_path / "synth" / "gen_1.npy", tmp_path / "synth" / "gen_2.npy"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert discover("synth/gen_1.npy") == [tmp_path / "synth" / "gen_1.npy"]
        assert discover(["synth/./gen_1.npy", str(tmp_path / "synth" / "gen_1.npy")]) == [
            tmp_path / "synth" / "gen_1.npy"
        ]
    finally:
        os.chdir(cwd)


def _mri_slice(i: int = 10) -> np.ndarray:
    """A small real MRI slice (anatomical scan, axial slice i)."""
    return np.ascontiguousarray(data.load_volume("anatomical").array[:, :, i])


def test_a_link_to_a_folder_enclosing_the_search_root_is_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """train/parent -> .. took the search of train/ out to its parent, and through parent/synth the synthetic
    set into the training set: the audit reported 100 % memorised. Only links back to folders below the root
    were caught; the folders enclosing the root count as ancestors now (by the given and the resolved path)."""
    data_dir = tmp_path / "data"
    (data_dir / "train").mkdir(parents=True)
    (data_dir / "synth").mkdir()
    for i in range(2):
        np.save(data_dir / "train" / f"t{i}.npy", _mri_slice(10 + i))
        np.save(data_dir / "synth" / f"s{i}.npy", _mri_slice(20 + i))
    try:
        os.symlink("..", data_dir / "train" / "parent", target_is_directory=True)
        os.symlink(tmp_path, data_dir / "train" / "top", target_is_directory=True)
        os.symlink(data_dir / "train", tmp_path / "via_link", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("this OS cannot make symlinks")
    want = [data_dir / "train" / "t0.npy", data_dir / "train" / "t1.npy"]
    with caplog.at_level("WARNING"):
        assert discover(data_dir / "train") == want
    assert "symlink loop" in caplog.text
    # the root reached through a link of its own: its resolved parents are guarded as well
    assert discover(tmp_path / "via_link") == [tmp_path / "via_link" / "t0.npy", tmp_path / "via_link" / "t1.npy"]
    # a root that is a link to a folder enclosing it, or to its own folder, is searched (the parents of the
    # link's own path were taken for the root's ancestors, and such a root found nothing)
    (data_dir / "all").symlink_to(".", target_is_directory=True)
    (data_dir / "synth" / "up").symlink_to(data_dir, target_is_directory=True)
    want_all = sorted([data_dir / "all" / s / f for s, f in (("synth", "s0.npy"), ("synth", "s1.npy"),
                                                                 ("train", "t0.npy"), ("train", "t1.npy"))])
    assert discover(data_dir / "all") == want_all
    assert discover(data_dir / "synth" / "up") == [q.parent.parent.parent / "synth" / "up" / q.relative_to(
        data_dir / "all") for q in want_all]


def test_discover_follows_linked_folders_guards_loops_and_keeps_broken_links(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlinked sub-folder is part of the tree; a link back to an ancestor is not walked round again; a
    broken image link is listed (reading it fails with a reason) instead of vanishing; a pattern finds what
    the folder search finds."""
    real = tmp_path / "real"
    (real / "deep").mkdir(parents=True)
    np.save(real / "a.npy", _mri_slice(10))
    np.save(real / "deep" / "b.npy", _mri_slice(11))
    inp = tmp_path / "in"
    inp.mkdir()
    np.save(inp / "own.npy", _mri_slice(12))
    try:
        os.symlink(real, inp / "site2", target_is_directory=True)
        os.symlink(tmp_path / "nowhere" / "scan.png", inp / "gone.png")
        os.symlink(inp, inp / "loop", target_is_directory=True)  # the folder contains itself
    except (OSError, NotImplementedError):
        pytest.skip("this OS cannot make symlinks")
    want = [inp / "gone.png", inp / "own.npy", inp / "site2" / "a.npy", inp / "site2" / "deep" / "b.npy"]
    with caplog.at_level("WARNING"):
        assert discover(inp) == want
    assert "symlink loop" in caplog.text
    assert discover(str(inp / "*")) == want  # a matching folder is searched recursively, as the shell gives it
    assert discover(str(inp / "**" / "*.npy")) == want[1:]
    assert discover(str(inp / "**" / "*.png")) == want[:1]
    assert discover([str(inp / "**"), inp]) == want
    # the broken link is an unreadable input: skipped with its reason, or an error under strict
    skipped: list = []
    got = list(iter_slices(discover(inp), SlicePolicy(), skipped=skipped))
    assert {s.source for s in got} == {str(p) for p in want[1:]}
    assert [p for p, _ in skipped] == [str(inp / "gone.png")]
    assert "broken symbolic link" in skipped[0][1] and "nowhere" in skipped[0][1]
    with pytest.raises(DataError, match="gone.png: broken symbolic link"):
        list(iter_slices(discover(inp), strict=True))
    with pytest.raises(DataError, match="broken symbolic link"):
        read_image(inp / "gone.png")
    # named by itself it is the same unreadable input (it was "no such file or directory", aborting the run)
    assert discover(inp / "gone.png") == want[:1]
    assert discover([inp / "gone.png", str(inp / "own.npy")]) == want[:2]
    with pytest.raises(ValueError, match="no such file or directory"):  # a name that is nothing at all
        discover(inp / "typo.png")


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_damaged_nii_is_skipped_whole_even_when_the_selected_slices_avoid_the_damage(
    tmp_path: Path, damage: str
) -> None:
    """An uncompressed .nii is read through nibabel's array proxy slice by slice; a truncated end or a NaN
    in a slice the policy does not select must still fail the whole file, as it does for the same .nii.gz."""
    src = data.dataset_path("anatomical")
    img = nib.load(str(src))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    n = vol.shape[2]
    nii, gz = tmp_path / f"{damage}.nii", tmp_path / f"{damage}.nii.gz"
    if damage == "nan":
        vol[:, :, n - 3] = np.nan
        for f in (nii, gz):
            nib.save(nib.Nifti1Image(vol, img.affine), str(f))
    else:
        good = tmp_path / "good.nii"
        nib.save(nib.Nifti1Image(vol, img.affine), str(good))
        raw = good.read_bytes()
        nii.write_bytes(raw[: len(raw) - vol.shape[0] * vol.shape[1] * 4])  # the last slice cut off
        import gzip

        gz.write_bytes(gzip.compress(nii.read_bytes()))
    policy = SlicePolicy(stop=5, min_foreground=0.0)  # slices 0..4, far from the damage
    for f in (nii, gz):
        skipped: list = []
        assert list(iter_slices([f], policy, skipped=skipped)) == []
        assert [p for p, _ in skipped] == [str(f)], f
        assert str(f) in skipped[0][1]
        with pytest.raises(DataError, match=f.name):
            list(iter_slices([f], policy, strict=True))
        if damage == "nan":
            assert "NaN or Inf" in skipped[0][1]
    if damage == "truncated":
        with pytest.raises(DataError, match=r"truncated NIfTI file: \d+ bytes, but its header .* needs \d+"):
            list(iter_slices([nii], policy, strict=True))
    # the undamaged part of the same scan gives its slices
    assert len(list(iter_slices([src], policy))) == 5


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("where", ["bit", "block"])
def test_nii_gz_with_damaged_compressed_data_is_refused_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              where: str, in_memory: bool) -> None:
    """A .nii.gz whose compressed stream is damaged in the middle (one flipped bit; 64 zeroed bytes) failed
    gzip's CRC but was read as image data: nibabel reads only the bytes its header asks for and never reaches
    the trailer, so one voxel came out changed (a volumes audit called it a duplicate of the original at
    1.000000) or half the voxels garbage. It is refused whole now, named, in every reader, whether it is
    read from memory or (over data.GZIP_IN_MEMORY) checked first and then streamed."""
    if not in_memory:
        monkeypatch.setattr(data, "GZIP_IN_MEMORY", 0)
    src = data.dataset_path("aniso_vox")
    b = bytearray(src.read_bytes())
    mid = len(b) // 2
    if where == "bit":
        b[mid] ^= 0x10
    else:
        b[mid:mid + 64] = bytes(64)
    bad = tmp_path / "damaged.nii.gz"
    bad.write_bytes(bytes(b))
    # bytes after the gzip data that are not gzip data are ignored, as gzip -d and nibabel ignore them
    tail = tmp_path / "tail.nii.gz"
    tail.write_bytes(src.read_bytes() + b"garbage!")
    assert data.load_nifti(tail).shape == nib.load(str(src)).shape
    # an uncompressed NIfTI named .nii.gz is named as such (zlib said "incorrect header check")
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(gzip.decompress(src.read_bytes()))
    with pytest.raises(DataError, match=r"plain\.nii\.gz: not gzip-compressed data, though named \.gz"):
        data.load_nifti(plain)
    (tmp_path / "empty.nii.gz").write_bytes(b"")  # (an interrupted copy: not "an uncompressed NIfTI renamed")
    with pytest.raises(DataError, match=r"empty\.nii\.gz: damaged gzip data .*empty or ends within the gzip"):
        data.load_nifti(tmp_path / "empty.nii.gz")
    with pytest.raises(DataError, match=r"damaged\.nii\.gz: damaged gzip data .*; the file is not used"):
        data.load_nifti(bad)
    with pytest.raises(DataError, match="damaged gzip data"):
        list(data.iter_nifti_frames(bad))
    skipped: list = []
    assert list(iter_slices([bad], SlicePolicy(min_foreground=0.0), skipped=skipped)) == []
    assert [p for p, _ in skipped] == [str(bad)] and "damaged gzip data" in skipped[0][1]
    # the undamaged file reads as before
    assert data.load_nifti(src).shape == nib.load(str(src)).shape


def _decompressed_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of the bytes decompressed in this process from now on: by every gzip stream (reads, and the
    reads a forward seek or a rewind makes) and by the package's own checked pass, data._gunzip."""
    import gzip

    total = [0]
    orig = gzip._GzipReader.read
    orig_gunzip = data._gunzip

    def counting(self, size=-1):  # noqa: ANN001, ANN202
        out = orig(self, size)
        total[0] += len(out)
        return out

    def counting_gunzip(p, keep=0):  # noqa: ANN001, ANN202
        out = orig_gunzip(p, keep=1 << 40)
        n = out.seek(0, 2)
        total[0] += n
        return out if n <= keep else None

    monkeypatch.setattr(gzip._GzipReader, "read", counting)
    monkeypatch.setattr(data, "_gunzip", counting_gunzip)
    return total


@pytest.mark.parametrize("in_memory", [True, False])
def test_4d_nifti_gz_frames_are_decompressed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  in_memory: bool) -> None:
    """Reading a 4D .nii.gz frame by frame with load_nifti(frame=t) decompressed everything before frame t
    again for each t: 48 frames of 96 x 96 x 50 took 6 s for the volumes (9 s for the slices) instead of
    0.3 s. The audit's per-file readers now read the frames in one pass; the values are unchanged.
    A file up to data.GZIP_IN_MEMORY is decompressed once in all, its CRC checked in the same pass; a larger
    one once to check it and once for its frames (in_memory=False)."""
    from deepssim_fast.io import _file_slices, _file_volumes

    passes = 1 if in_memory else 2
    if not in_memory:
        monkeypatch.setattr(data, "GZIP_IN_MEMORY", 0)

    rng = np.random.default_rng(7)
    raw = (rng.random((40, 36, 30, 12)) * 1000).astype(np.int16)  # 1 MB: the 8-64 KB read buffers are small beside it
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 3.0)  # scaled data: frames come back as float32 of the scaled values
    p = tmp_path / "series.nii.gz"
    nib.save(img, str(p))
    want = [data.load_nifti(p, frame=t) for t in range(raw.shape[3])]
    np.testing.assert_allclose(want[4], raw[..., 4] * 0.5 + 3.0, rtol=1e-6)

    count = _decompressed_bytes(monkeypatch)
    got = list(data.iter_nifti_frames(p))
    assert count[0] <= passes * raw.nbytes + 2**16  # (with the header read and the read buffers)
    assert len(got) == raw.shape[3]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w)

    count[0] = 0
    vols = _file_volumes(p)
    assert count[0] <= passes * raw.nbytes + 2**17  # (the shape is read first, from the header)
    assert [s for s, _ in vols] == [f"{p}@t{t}" for t in range(raw.shape[3])]
    for (_, g), w in zip(vols, want, strict=True):
        np.testing.assert_array_equal(g, w)

    count[0] = 0
    slices = _file_slices(p, SlicePolicy(min_foreground=0))
    assert count[0] <= passes * raw.nbytes + 2**17
    assert len(slices) == raw.shape[2] * raw.shape[3]
    s = slices[5 * raw.shape[2] + 2]
    assert s.source == f"{p}@t5" and s.index == 2
    np.testing.assert_array_equal(s.array, want[5][:, :, 2])

    count[0] = 0
    np.testing.assert_array_equal(data.load_nifti(p, frame=3), want[3])  # one frame: at most the passes above
    assert count[0] <= passes * raw.nbytes + 2**16

    # per frame (the old way) would decompress ~ frames / 2 times the data: the bound above tells them apart
    count[0] = 0
    for t in range(raw.shape[3]):
        data.load_nifti(p, frame=t)
    assert count[0] > 4 * raw.nbytes


def test_iter_nifti_frames_real_series_3d_file_and_errors(tmp_path: Path) -> None:
    p4 = data.dataset_path("example4d")
    frames = list(data.iter_nifti_frames(p4))
    assert len(frames) == nib.load(str(p4)).shape[3]
    for t, f in enumerate(frames):
        np.testing.assert_array_equal(f, data.load_nifti(p4, frame=t))
    p3 = data.dataset_path("s0_10slices")
    (only,) = list(data.iter_nifti_frames(p3))
    np.testing.assert_array_equal(only, data.load_nifti(p3))

    a = np.ones((5, 4, 3, 4), np.float32)
    a[1, 2, 0, 2] = np.nan
    bad = tmp_path / "nan4d.nii.gz"
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(bad))
    it = data.iter_nifti_frames(bad)
    assert np.all(next(it) == 1) and np.all(next(it) == 1)  # frames before the bad one are fine
    with pytest.raises(DataError, match=r"NaN or Inf values \(frame 2\)") as ei:
        next(it)
    assert str(bad) in str(ei.value)
    with pytest.raises(DataError, match="no such file"):
        list(data.iter_nifti_frames(tmp_path / "gone.nii.gz"))


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_slices_any_memory_order(order: str, axis: int) -> None:
    """volume_slices cuts with a basic-indexing view (np.take had copied each slice of a Fortran-ordered
    volume, as nibabel returns them, ~100x slower); the slices are the same in either memory order."""
    v = np.random.default_rng(axis).random((7, 6, 5)).astype(np.float32)
    v = np.asfortranarray(v) if order == "F" else np.ascontiguousarray(v)
    sl = data.volume_slices(v, SlicePolicy(axis=axis, min_foreground=0))
    assert [s.index for s in sl] == list(range(v.shape[axis]))
    for s in sl:
        assert s.array.flags.c_contiguous and s.array.dtype == np.float32
        np.testing.assert_array_equal(s.array, np.take(v, s.index, axis=axis))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_uncompressed_nifti_slices_along_any_axis_are_read_in_few_reads(tmp_path: Path, axis: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting an uncompressed .nii across its storage order went slice by slice through nibabel's proxy,
    thousands of small reads each: a 256 x 256 x 176 volume along axis 0 took 36.6 s (0.5 s along axis 1).
    Along axes 0 and 1 the memory-mapped volume is now read whole (0.2 s and 0.08 s); along axis 2 slices
    are still read one at a time. Same values either way; a truncated file is still refused by name. (A file
    with an intercept is read whole in float64, see fit_float32: once, whatever the axis.)"""
    from nibabel.arrayproxy import ArrayProxy

    from deepssim_fast.io import _file_slices

    rng = np.random.default_rng(axis)
    raw = (rng.random((23, 19, 11)) * 1000).astype(np.int16)
    policy = SlicePolicy(axis=axis, min_foreground=0.0)
    for inter in (0.0, -7.0):
        img = nib.Nifti1Image(raw, np.eye(4))
        img.header.set_slope_inter(0.25, inter)
        p = tmp_path / f"t1_{inter}.nii"
        nib.save(img, str(p))
        reads: list[object] = []
        real = ArrayProxy.__getitem__

        def counting(self, slicer, reads=reads, real=real):  # noqa: ANN001, ANN202
            reads.append(slicer)
            return real(self, slicer)

        monkeypatch.setattr(ArrayProxy, "__getitem__", counting)
        got = _file_slices(p, policy)
        # (axis 2: a checking pass, then the slices)
        assert len(reads) == (2 * raw.shape[2] if axis == 2 and inter == 0 else 1)
        monkeypatch.undo()
        want = data.volume_slices(data.load_nifti(p), policy, source=str(p))
        assert [(s.axis, s.index, s.source) for s in got] == [(s.axis, s.index, s.source) for s in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g.array, w.array)
        np.testing.assert_allclose(got[3].array, np.take(raw, 3, axis=axis) * 0.25 + inter, rtol=1e-6)

        short = tmp_path / "short.nii"
        short.write_bytes(p.read_bytes()[:-100])
        with pytest.raises(DataError, match=r"truncated NIfTI file: \d+ bytes, but its header .* needs \d+") as ei:
            _file_slices(short, policy)
        assert str(short) in str(ei.value)


def test_a_one_frame_4d_npy_is_its_volume_as_a_one_frame_nifti_is(tmp_path: Path) -> None:
    # A 4D array with one frame is a volume: a NIfTI of shape (x, y, z, 1) reads without frame= and keeps
    # its plain path as the source; a .npy of the same shape had asked for a frame and named its slices
    # "<path>@t0", so the same scan saved two ways got two different ids (label keys, reports).
    from deepssim_fast.io import _file_slices, _file_volumes

    vol = np.random.default_rng(5).random((8, 7, 8, 1)).astype(np.float32) + 0.5
    pn, pa = tmp_path / "one.nii.gz", tmp_path / "one.npy"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(pn))
    np.save(pa, vol)
    for p in (pn, pa):
        np.testing.assert_array_equal(read_image(p), vol[..., 0])
        np.testing.assert_array_equal(read_image(p, frame=0), vol[..., 0])
        assert [s for s, _ in _file_volumes(p)] == [str(p)]
        sl = _file_slices(p, SlicePolicy(axis=2, min_foreground=0.0))
        assert len(sl) == 8 and {s.source for s in sl} == {str(p)}
    with pytest.raises(DataError, match="out of range"):
        read_image(pa, frame=1)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_5d_nifti_with_unit_trailing_axes_is_its_volume_or_series(tmp_path: Path, suffix: str) -> None:
    # Some tools save a volume as 5D, (X, Y, Z, 1, 1) (NIfTI's fifth axis holds a voxel's components): it was
    # refused as "unsupported NIfTI rank 5", so a training scan saved that way was never audited. Trailing
    # axes of length 1 past the fourth are dropped; a real vector image, (X, Y, Z, 1, 3), is still refused,
    # and its error says why.
    from deepssim_fast.io import _file_slices, _file_volumes

    mni = data.load_volume("anatomical").array[::3, ::3, ::3]
    vol = np.ascontiguousarray(mni[..., None, None])
    series = np.stack([mni, mni[::-1] + 1], axis=3)[..., None]  # (X, Y, Z, 2, 1)
    paths = {}
    for name, a in (("vol", vol), ("series", series), ("vector", np.repeat(vol, 3, axis=4))):
        paths[name] = tmp_path / f"{name}{suffix}"
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(paths[name]))
        assert len(nib.load(str(paths[name])).shape) == 5
    np.testing.assert_array_equal(read_image(paths["vol"]), mni)
    assert [s for s, _ in _file_volumes(paths["vol"])] == [str(paths["vol"])]
    sl = _file_slices(paths["vol"], SlicePolicy(axis=2, min_foreground=0.0))
    assert [s.index for s in sl] == list(range(mni.shape[2])) and {s.source for s in sl} == {str(paths["vol"])}
    np.testing.assert_array_equal(sl[4].array, mni[:, :, 4])
    np.testing.assert_array_equal(read_image(paths["series"], frame=1), mni[::-1] + 1)
    frames = list(data.iter_nifti_frames(paths["series"]))
    assert len(frames) == 2 and np.array_equal(frames[0], mni)
    assert [s for s, _ in _file_volumes(paths["series"])] == [f"{paths['series']}@t{t}" for t in (0, 1)]
    with pytest.raises(DataError, match=r"rank 5 .*3 values per voxel along axis 4"):
        read_image(paths["vector"])
    skipped: list = []
    assert list(iter_slices([paths["vector"]], skipped=skipped)) == []
    assert [p for p, _ in skipped] == [str(paths["vector"])] and "vector" in skipped[0][1]


def test_channel_first_npy_images_are_their_image_not_a_stack_of_rows(tmp_path: Path) -> None:
    # A sample saved from torch is channel-first: (1, H, W) or (1, 1, H, W). The (1, H, W) array was read as a
    # volume and cut along axis 2 into W "slices" of shape (1, H), and (1, 1, H, W) as W frames: an exact copy
    # of a training slice saved that way was never found, and W bogus items diluted the audit.
    from deepssim_fast.io import _file_slices, _file_volumes

    img = np.random.default_rng(6).random((9, 11)).astype(np.float32) + 0.5
    vol = np.random.default_rng(7).random((7, 9, 11)).astype(np.float32) + 0.5
    policy = SlicePolicy(axis=2, min_foreground=0.0)
    for name, arr, want in (("chw", img[None], img), ("nchw", img[None, None], img), ("cdhw", vol[None], vol)):
        p = tmp_path / f"{name}.npy"
        np.save(p, arr)
        np.testing.assert_array_equal(read_image(p), want)
        assert [s for s, _ in _file_volumes(p)] == [str(p)]
        sl = _file_slices(p, policy)
        assert {s.source for s in sl} == {str(p)}
        assert [s.array.shape for s in sl] == ([(9, 11)] if want.ndim == 2 else [(7, 9)] * 11)
    # a trailing single frame already was the image; a plain (H, W) stays as it was
    np.save(tmp_path / "hw1.npy", img[..., None])
    assert [s.array.shape for s in _file_slices(tmp_path / "hw1.npy", policy)] == [(9, 11)]
    np.save(tmp_path / "one_row.npy", img[:1])
    assert read_image(tmp_path / "one_row.npy").shape == (1, 11)


@pytest.mark.parametrize("how", ["minus1_1", "zscore", "all_negative", "offset"])
def test_foreground_rule_keeps_the_same_slices_when_intensities_are_shifted_or_rescaled(
        tmp_path: Path, how: str) -> None:
    """The foreground level was 0.1 x the volume's maximum: a scan rescaled to [-1, 1] (a generator's output)
    kept 0 of aniso_vox's 24 slices, an all-negative one none either, so a memorised copy was never audited.
    The level is now min + 0.1 x (max - min): the kept slices are the same for every affine rescaling, on the
    in-memory path, the .npy path and the NIfTI proxy path (axis 2 of a .nii)."""
    v = data.load_volume("aniso_vox").array.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    w = {"minus1_1": 2 * (v - lo) / (hi - lo) - 1, "zscore": (v - v.mean()) / v.std(),
         "all_negative": v - 2 * hi, "offset": v + 1000.0}[how].astype(np.float32)
    pol = SlicePolicy()  # the defaults: 5 % of pixels above 10 % of the range
    want = [s.index for s in data.volume_slices(v, pol)]
    assert 0 < len(want) <= v.shape[2]
    assert [s.index for s in data.volume_slices(w, pol)] == want
    np.save(tmp_path / "w.npy", w)
    nib.save(nib.Nifti1Image(w, np.eye(4)), tmp_path / "w.nii")
    for name in ("w.npy", "w.nii"):
        assert [s.index for s in iter_slices([tmp_path / name], pol)] == want, name
    # a constant volume has no foreground, whatever its value
    assert data.volume_slices(np.full((8, 8, 3), -5.0, np.float32), pol) == []


def test_empty_nifti_axis_npz_as_npy_and_float32_overflow_are_named(tmp_path: Path) -> None:
    """A NIfTI with a zero-length axis was read as a (10, 0) image and audited as a padded blank (the .npy of
    that shape was refused); an .npz saved as .npy failed with "'NpzFile' object has no attribute 'ndim'";
    finite float64 values past float32's range were reported as "NaN or Inf values"."""
    for name in ("e.nii", "e.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((10, 12, 0), np.float32), np.eye(4)), tmp_path / name)
        with pytest.raises(DataError, match=r"e\.nii.*empty image, shape \(10, 12, 0\)"):
            read_image(tmp_path / name)
        skipped: list = []
        assert list(iter_slices([tmp_path / name], SlicePolicy(min_foreground=0), skipped=skipped)) == []
        assert "empty image" in skipped[0][1]
    z = tmp_path / "z.npy"
    with open(z, "wb") as f:
        np.savez(f, a=np.zeros((4, 4)), b=np.ones((4, 4)))
    with pytest.raises(DataError, match=r"z\.npy: a \.npz archive \(2 arrays: a, b\)"):
        read_image(z)
    from deepssim_fast.io import stored_dtype
    with pytest.raises(DataError, match=r"\.npz archive"):
        stored_dtype(z)
    big = np.full((6, 6), 1e39)
    np.save(tmp_path / "big.npy", big)
    nib.save(nib.Nifti1Image(big, np.eye(4)), tmp_path / "big.nii.gz")
    for name in ("big.npy", "big.nii.gz"):
        with pytest.raises(DataError, match=r"values up to 1e\+39 exceed the range of float32"):
            read_image(tmp_path / name)
        assert read_image(tmp_path / name, dtype=np.float64).max() == 1e39


def test_a_literal_name_starting_with_a_tilde_is_found(tmp_path: Path, monkeypatch) -> None:
    """Path.expanduser raised "Could not determine home directory" for "~scans" (no such user) before the
    literal folder of that name was tried."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~scans").mkdir()
    np.save(tmp_path / "~scans" / "x.npy", np.ones((4, 4), np.float32))
    want = [Path("~scans/x.npy")]
    assert [p.relative_to(tmp_path) if p.is_absolute() else p for p in discover("~scans")] == want
    assert [p.relative_to(tmp_path) if p.is_absolute() else p for p in discover("~scans/x.npy")] == want


def test_a_batch_of_images_saved_as_one_array_is_refused_not_cut_into_strips(tmp_path: Path) -> None:
    """Three generated slices saved as one (3, H, W) .npy (as sampling code saves a batch) were read as a
    volume and cut along axis 2 into 3-pixel-high strips, padded and audited: exact copies of training slices
    scored 0.2, with no warning. (3, 1, H, W) gave 1-pixel strips. Both are now refused with a reason."""
    vol = data.load_volume("mni152").array
    batch = np.stack([vol[:, :, z] for z in (60, 70, 80)]).astype(np.float32)  # (3, 197, 233)
    np.save(tmp_path / "b3.npy", batch)
    np.save(tmp_path / "b31.npy", batch[:, None])
    for name in ("b3.npy", "b31.npy"):
        with pytest.raises(DataError, match=rf"{name}: a volume of shape .* cut along axis 2 gives slices of "
                                            r"3 x (197|1) pixels.*save one image per file"):
            list(iter_slices([tmp_path / name], SlicePolicy(), strict=True))
        skipped: list = []
        assert list(iter_slices([tmp_path / name], SlicePolicy(), skipped=skipped)) == []
        assert "narrower than the 7-pixel SSIM window" in skipped[0][1]
    # --axis 0 reads the batch as its images; real volumes are cut as before
    got = [s.array for s in iter_slices([tmp_path / "b3.npy"], SlicePolicy(axis=0, min_foreground=0))]
    assert len(got) == 3 and all(np.array_equal(g, b) for g, b in zip(got, batch, strict=True))
    nib.save(nib.Nifti1Image(batch.transpose(1, 2, 0), np.eye(4)), tmp_path / "v.nii")  # (197, 233, 3)
    assert len(list(iter_slices([tmp_path / "v.nii"], SlicePolicy(min_foreground=0)))) == 3
    with pytest.raises(DataError, match=r"v\.nii: a volume of shape \(197, 233, 3\) cut along axis 0"):
        list(iter_slices([tmp_path / "v.nii"], SlicePolicy(axis=0), strict=True))


def test_a_batch_of_seven_or_more_images_in_one_npy_is_refused_not_cut_into_strips(tmp_path: Path) -> None:
    """Twelve 96 x 96 slices saved as one (12, 96, 96) .npy passed the 7-pixel check above and were audited as
    96 strips of 12 x 96: exact copies of them scored 0.05-0.1 and the audit said 0 % memorised. A .npy whose
    slices are strips a quarter as high as long, the short side along axis 0, is refused as a batch now;
    --axis 0 reads its images, and volumes (a NIfTI of the same shape; a .npy with a thin last axis, or one
    whose first axis is not much shorter) are cut as before."""
    vol = data.load_volume("mni152").array
    batch = np.stack([data.center_fit(vol[:, :, z], (96, 96)) for z in range(50, 110, 5)]).astype(np.float32)
    assert batch.shape == (12, 96, 96)
    np.save(tmp_path / "b12.npy", batch)
    with pytest.raises(DataError, match=r"b12\.npy: an array of shape \(12, 96, 96\) cut along axis 2 gives "
                                        r"strips of 12 x 96 pixels: a batch of 12 images of 96 x 96 saved as one "
                                        r"\(N, H, W\) array, or a volume of 12 thick slices along axis 0\? Give "
                                        r"--axis 0 to cut it along its first axis"):
        list(iter_slices([tmp_path / "b12.npy"], SlicePolicy(), strict=True))
    skipped: list = []
    assert list(iter_slices([tmp_path / "b12.npy"], SlicePolicy(), skipped=skipped)) == []
    assert "a batch of 12 images" in skipped[0][1]
    got = [s.array for s in iter_slices([tmp_path / "b12.npy"], SlicePolicy(axis=0, min_foreground=0))]
    assert len(got) == 12 and all(np.array_equal(g, b) for g, b in zip(got, batch, strict=True))
    # not batches: a thin last axis, a first axis not 4x shorter, and the same array as a NIfTI volume
    np.save(tmp_path / "thin_last.npy", batch.transpose(1, 2, 0))  # (96, 96, 12)
    np.save(tmp_path / "vol.npy", np.stack([batch[0]] * 30))  # (30, 96, 96): strips 30 x 96, kept
    nib.save(nib.Nifti1Image(batch, np.eye(4)), tmp_path / "b12.nii")
    assert len(list(iter_slices([tmp_path / "thin_last.npy"], SlicePolicy(min_foreground=0)))) == 12
    assert len(list(iter_slices([tmp_path / "vol.npy"], SlicePolicy(min_foreground=0)))) == 96
    assert len(list(iter_slices([tmp_path / "b12.nii"], SlicePolicy(min_foreground=0)))) == 96


@pytest.mark.parametrize("channels", [3, 4])
def test_an_rgb_image_saved_as_npy_is_refused_not_audited_as_its_channels(tmp_path: Path, channels: int) -> None:
    """An RGB (RGBA) image saved with np.save, (H, W, 3) or (H, W, 4), was cut along axis 2 into one grey item
    per colour channel: three (four) items per image, each scored alone. It is refused now, naming the
    file, what it looks like and the remedies; its PNG is read as one item (its luminance), and a volume of
    3 slices saved as (3, H, W) is read with --axis 0. A NIfTI of the same shape is a volume, cut as before."""
    sl = data.load_volume("mni152").array[:, :, 90]
    grey = (sl / sl.max() * 255).astype(np.uint8)
    rgb = np.stack([grey] * channels, axis=-1)
    if channels == 4:
        rgb[..., 3] = 255
    np.save(tmp_path / "rgb.npy", rgb)
    with pytest.raises(DataError, match=rf"rgb\.npy: an array of shape \({grey.shape[0]}, {grey.shape[1]}, "
                                        rf"{channels}\) cut along axis 2 gives {channels} slices: the colour "
                                        rf"channels of an RGBA? image, or a volume of {channels} slices\?.*PNG.*"
                                        rf"one \(H, W\) file per slice.*--axis 0"):
        list(iter_slices([tmp_path / "rgb.npy"], SlicePolicy(min_foreground=0), strict=True))
    np.save(tmp_path / "rgb1.npy", rgb[..., None])  # (H, W, C, 1): a one-frame series of it, the same image
    with pytest.raises(DataError, match=rf"rgb1\.npy: an array of shape \({grey.shape[0]}, {grey.shape[1]}, "
                                        rf"{channels}, 1\) cut along axis 2 gives {channels} slices"):
        list(iter_slices([tmp_path / "rgb1.npy"], SlicePolicy(min_foreground=0), strict=True))
    skipped: list = []
    assert list(iter_slices([tmp_path / "rgb.npy"], SlicePolicy(min_foreground=0), skipped=skipped)) == []
    assert [p for p, _ in skipped] == [str(tmp_path / "rgb.npy")]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    (one,) = list(iter_slices([tmp_path / "rgb.png"], SlicePolicy(min_foreground=0)))
    np.testing.assert_allclose(one.array, grey, atol=0.5)
    np.save(tmp_path / "three.npy", np.moveaxis(rgb, -1, 0))  # (C, H, W): C slices along axis 0
    assert len(list(iter_slices([tmp_path / "three.npy"], SlicePolicy(axis=0, min_foreground=0)))) == channels
    nib.save(nib.Nifti1Image(rgb.astype(np.float32), np.eye(4)), tmp_path / "slab.nii")
    assert len(list(iter_slices([tmp_path / "slab.nii"], SlicePolicy(min_foreground=0)))) == channels


def test_a_bytes_path_is_a_path(tmp_path: Path) -> None:
    """discover(b"x.npy") iterated the bytes and failed with "expected str, bytes or os.PathLike object, not
    int"; bytes name a path, as they do for open() and os.fspath."""
    np.save(tmp_path / "x.npy", np.ones((8, 8), np.float32))
    want = [tmp_path / "x.npy"]
    assert discover(os.fsencode(tmp_path / "x.npy")) == want
    assert discover([os.fsencode(tmp_path)]) == want


def test_an_empty_path_is_refused_not_read_as_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """Path("") is Path("."): discover("") searched the working folder recursively (an unset shell variable
    trained on whatever lay there)."""
    np.save(tmp_path / "x.npy", np.ones((8, 8), np.float32))
    monkeypatch.chdir(tmp_path)
    for spec in ("", "  ", [str(tmp_path / "x.npy"), ""]):
        with pytest.raises(ValueError, match="empty path"):
            discover(spec)


def test_hidden_images_left_out_of_a_search_are_named(tmp_path: Path, caplog) -> None:
    """Hidden files (``.scan.npy``, macOS's ``._x.png``) are left out of a folder search by design, but they
    vanished without a word; and a folder holding only hidden images was said to hold no image files."""
    import logging

    for name in ("a.npy", ".scan.npy", "sub/.c.npy", "sub/._b.npy", "sub2/.e.npy", "sub2/f.npy", "sub3/g.npy",
                 "sub3/.h.npy"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "d" / name, np.ones((8, 8), np.float32))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.io"):
        assert discover(tmp_path / "d") == [tmp_path / "d" / "a.npy", tmp_path / "d" / "sub2" / "f.npy",
                                            tmp_path / "d" / "sub3" / "g.npy"]
        # one line for a whole discover() call, however many folders it searched (a glob of 30 subject folders
        # printed 30); macOS's ._ companions are metadata, not counted
        assert discover([tmp_path / "d" / "sub2", tmp_path / "d" / "sub3"]) == [tmp_path / "d" / "sub2" / "f.npy",
                                                                               tmp_path / "d" / "sub3" / "g.npy"]
    said = [r.getMessage() for r in caplog.records if "hidden" in r.getMessage()]
    assert len(said) == 2, said
    assert "4 hidden image-named file(s)" in said[0] and ".scan.npy" in said[0], said
    assert "2 hidden image-named file(s)" in said[1], said
    (tmp_path / "h").mkdir()
    np.save(tmp_path / "h" / ".only.npy", np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"contains no .* files \(only hidden ones.*\.only\.npy"):
        discover(tmp_path / "h")
    with pytest.raises(ValueError, match=r"contains no .* files$"):  # (an empty folder: no note)
        (tmp_path / "e").mkdir()
        discover(tmp_path / "e")


def test_an_entry_that_cannot_be_looked_at_is_listed_to_fail_its_read(tmp_path: Path, monkeypatch) -> None:
    """In a folder that can be listed but not entered (mode 444), ``Path.is_file`` raised PermissionError and
    the whole audit stopped, without --strict; the entry is now listed, so its read fails and it is skipped
    with its reason like any unreadable file. (Simulated: the tests may run as root.)"""
    (tmp_path / "d").mkdir()
    for name in ("a.npy", "x.npy"):
        np.save(tmp_path / "d" / name, np.ones((8, 8), np.float32))
    real = Path.is_file

    def is_file(self):  # noqa: ANN001, ANN202
        if self.name == "x.npy":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert discover(tmp_path / "d") == [tmp_path / "d" / "a.npy", tmp_path / "d" / "x.npy"]


def test_a_jpeg_named_png_is_read_and_said(tmp_path: Path, caplog, monkeypatch) -> None:
    """A JPEG (or TIFF) saved under a .png name was decoded by content without a word; a lossy file in a
    collection of 'PNG' slices is worth a line. Said for the first few files only."""
    import logging

    from deepssim_fast import io as dio

    monkeypatch.setattr(dio, "_WARNED", {})
    img = (np.arange(48 * 40, dtype=np.float64).reshape(48, 40) % 251).astype(np.uint8)
    for i in range(8):
        Image.fromarray(img).save(tmp_path / f"s{i}.png", format="JPEG" if i < 7 else "TIFF")
    Image.fromarray(img).save(tmp_path / "real.png")
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.io"):
        for i in range(8):
            assert read_image(tmp_path / f"s{i}.png").shape == (48, 40)
        assert read_image(tmp_path / "real.png").shape == (48, 40)
    msgs = [r.getMessage() for r in caplog.records]
    assert "s0.png: named .png but is a JPEG file; read as JPEG (lossy" in msgs[0]
    assert len(msgs) == dio._WARN_MAX + 1 and "further files like this are not named" in msgs[-1], msgs
    assert not any("real.png" in m for m in msgs)


def _structured(shape: tuple[int, ...]) -> np.ndarray:
    """A real MRI slice (dipy's T1), centre-fitted, in [0, 1] float64; 3D shapes repeat it along the last axis
    with a ramp so the slices differ."""
    img = data.center_fit(data.load_volume("t1_coronal_slice").array, shape[:2]).astype(np.float64)
    img = (img - img.min()) / (img.max() - img.min())
    if len(shape) == 2:
        return img
    return np.stack([img * (0.6 + 0.4 * k / shape[2]) for k in range(shape[2])], axis=-1)


@pytest.mark.parametrize("kind", ["npy-float64", "npy-int64", "nifti-float64", "nifti-4d-float64"])
def test_files_that_float32_cannot_hold_keep_their_structure(tmp_path: Path, kind: str) -> None:
    """A file of 1e7 + a spread of 1 (float64), or int64 values near 2^40 with a spread of 4000, was read in
    float32 for training, embedding and the audit: ~1 ulp of its offset, so its structure was rounded away and
    its exact copy without the offset scored "different". Such files are read in float64 and fitted to float32
    by a positive affine map (which the z-score, the deepssim preset and correlation do not see): slices and
    volumes now equal those of the copy up to that map."""
    import deepssim_fast as dsf
    from deepssim_fast.io import _file_volumes

    base = _structured((48, 52, 9))
    if kind == "npy-int64":
        stored, path = np.round(base * 4000).astype(np.int64) + (1 << 40), tmp_path / "v.npy"
        np.save(path, stored)
        plain = (stored - (1 << 40)).astype(np.float32)
    elif kind == "npy-float64":
        stored, path = base + 1e7, tmp_path / "v.npy"
        np.save(path, stored)
        plain = base.astype(np.float32)
    else:
        stored = base + 1e7
        if kind == "nifti-4d-float64":
            stored = np.stack([stored, stored[::-1]], axis=-1)
        path = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(stored, np.eye(4)), path)
        plain = (stored - 1e7).astype(np.float32)
    assert float(np.abs(stored.astype(np.float32).astype(np.float64) - stored).max()) > 1e-3 * np.ptp(base)
    vols = _file_volumes(path)
    want = [plain] if plain.ndim == 3 else [plain[..., t] for t in range(plain.shape[-1])]
    assert len(vols) == len(want)
    for (_src, got), w in zip(vols, want, strict=True):
        assert got.dtype == np.float32
        assert float(dsf.ssim(got, w, spatial_dims=3, preset="deepssim")) > 0.9999
    got_slices = list(iter_slices([path], SlicePolicy(axis=2)))
    plain_path = tmp_path / "plain.npy"
    np.save(plain_path, plain)
    want_slices = list(iter_slices([plain_path], SlicePolicy(axis=2)))
    assert [s.key.split("#")[-1] for s in got_slices] == [s.key.split("#")[-1] for s in want_slices]
    for g, w in zip(got_slices, want_slices, strict=True):
        assert float(dsf.ssim(g.array, w.array, preset="deepssim")) > 0.9999
    # an image float32 does hold is cast, not mapped
    from deepssim_fast.io import fit_float32

    assert fit_float32(base.astype(np.float64)).dtype == np.float32
    assert np.array_equal(fit_float32(base * 100), (base * 100).astype(np.float32))


@pytest.mark.parametrize("dt,offset", [(np.uint64, 1 << 63), (np.int64, -(1 << 62))])
def test_64_bit_integer_files_past_float64s_exact_range_keep_their_structure(tmp_path: Path, dt: type,
                                                                             offset: int) -> None:
    """int64 / uint64 values past 2^53 were cast to float64 before their offset was taken off: two different
    images near 2^63 both came out constant, and the audit called them duplicates (SSIM 1.0). The minimum is
    now taken off in integer arithmetic first, so each reads as its copy without the offset; a spread that
    float64 cannot hold either is refused."""
    import deepssim_fast as dsf
    from deepssim_fast.io import _file_volumes, fit_float32

    rng = np.random.default_rng(6)
    small = [rng.integers(0, 100, (32, 32)) for _ in range(2)]
    for k, s in enumerate(small):
        np.save(tmp_path / f"w{k}.npy", s.astype(dt) + dt(offset))
        np.save(tmp_path / f"p{k}.npy", s - s.min())
    pol = SlicePolicy(min_foreground=0)
    got = {}
    for name in ("w0", "w1", "p0", "p1"):
        f = tmp_path / f"{name}.npy"
        (sl,) = list(iter_slices([f], pol, strict=True))
        ((_src, vol),) = _file_volumes(f)
        assert np.array_equal(sl.array, vol) and sl.array.dtype == np.float32
        assert np.array_equal(read_image(f, dtype=np.float64), vol) and np.array_equal(read_image(f), vol)
        got[name] = vol
    for k, s in enumerate(small):
        assert np.array_equal(got[f"w{k}"], s - s.min())
        assert np.array_equal(fit_float32(s.astype(dt) + dt(offset)), got[f"p{k}"])
    score = float(dsf.ssim(got["w0"], got["w1"], preset="deepssim"))
    assert score < 0.5 and score == float(dsf.ssim(got["p0"], got["p1"], preset="deepssim"))
    wide = np.zeros((32, 32), dt) + dt(offset)
    wide[0, 0] += dt((1 << 53) + 1)
    np.save(tmp_path / "wide.npy", wide)
    says = r"wide\.npy: integer values span 9007199254740993 \(from -?\d+ to -?\d+\): too wide a range for float64"
    with pytest.raises(DataError, match=says):
        read_image(tmp_path / "wide.npy")
    with pytest.raises(DataError, match=says):
        list(iter_slices([tmp_path / "wide.npy"], pol, strict=True))
    with pytest.raises(DataError, match=says):
        _file_volumes(tmp_path / "wide.npy")
    with pytest.raises(DataError, match=r"image: integer values span 9007199254740993"):
        fit_float32(wide)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_scaled_nifti_values_past_float32_are_named_as_such_on_every_path(tmp_path: Path, suffix: str) -> None:
    """An int16 .nii with a slope of 1e37 was skipped as "contains NaN or Inf values (slice 0 along axis 2)",
    with numpy's overflow warning, where the same .nii.gz said its values exceed float32's range: the
    slice-by-slice reader now says so too, without the warning."""
    import warnings

    v = np.random.default_rng(7).integers(0, 100, (12, 12, 8)).astype(np.int16)
    v[3, 4, 5] = 99
    img = nib.Nifti1Image(v, np.eye(4))
    img.header.set_slope_inter(1e37, 0)
    f = tmp_path / f"big{suffix}"
    nib.save(img, f)
    says = rf"big{suffix}: values up to 9\.9e\+38 exceed the range of float32 \(3\.403e\+38\); rescale the data$"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=says):
            read_image(f)
        for axis in (2, 0):
            skipped: list = []
            assert list(iter_slices([f], SlicePolicy(axis=axis, min_foreground=0), skipped=skipped)) == []
            assert re.search(says, skipped[0][1]), skipped


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_negative_dimension_in_a_nifti_header_is_named_not_blamed_on_the_slicing(tmp_path: Path,
                                                                                   suffix: str) -> None:
    """A header whose dim field says (12, 12, -8) was skipped because "the slice range None:None:1 selects
    none of its -8 slices": the options were blamed for a corrupt file."""
    from deepssim_fast.io import _file_volumes

    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.ones((12, 12, 8), np.float32), np.eye(4)), good)
    raw = bytearray(good.read_bytes())
    raw[40:56] = np.array([3, 12, 12, -8, 1, 1, 1, 1], "<i2").tobytes()
    f = tmp_path / f"neg{suffix}"
    f.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    says = rf"neg{re.escape(suffix)}: invalid dimensions in the header: shape \(12, 12, -8\)"
    for axis in (2, 0):
        skipped: list = []
        assert list(iter_slices([f], SlicePolicy(axis=axis, min_foreground=0), skipped=skipped)) == []
        assert re.search(says, skipped[0][1]), skipped
    with pytest.raises(DataError, match=says):
        read_image(f)
    with pytest.raises(DataError, match=says):
        _file_volumes(f)


def test_a_single_slice_volume_is_pointed_at_the_axis_of_length_one(tmp_path: Path) -> None:
    """A (64, 1, 64) NIfTI (one coronal slice) cut along axis 2 was told "give --axis 0", which was refused
    with the same advice; its axis 1, of length 1, is named now, and the axis in use is never suggested."""
    f = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(8).random((64, 1, 64)).astype(np.float32), np.eye(4)), f)
    for axis in (2, 0):
        with pytest.raises(DataError, match=r"give --axis 1: its axis 1 has length 1") as ei:
            list(iter_slices([f], SlicePolicy(axis=axis), strict=True))
        assert "--axis 0" not in str(ei.value) and f"--axis {axis}" not in str(ei.value)
    (one,) = list(iter_slices([f], SlicePolicy(axis=1), strict=True))
    assert one.array.shape == (64, 64)
    # thin slices cut along axis 0 are not told to use the axis they were cut along
    np.save(tmp_path / "b.npy", np.ones((64, 3, 64), np.float32))
    with pytest.raises(DataError, match="narrower than the 7-pixel SSIM window") as ei:
        list(iter_slices([tmp_path / "b.npy"], SlicePolicy(axis=0), strict=True))
    assert "--axis 0" not in str(ei.value)


def _anatomical_int16() -> np.ndarray:
    """nibabel's shipped anatomical.nii (33 x 41 x 25 T1) as int16."""
    from nibabel.testing import data_path

    return np.asanyarray(nib.load(os.path.join(data_path, "anatomical.nii")).dataobj).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_with_an_intercept_is_read_in_float64_like_its_copy(tmp_path: Path, suffix: str) -> None:
    """An int16 scan with slope 3e-5 and intercept 1e7 (1e7 plus a spread of ~1, the README's case) was read in
    float32: nibabel moves scl_slope/scl_inter from the header into the array proxy on load, so the header
    said (None, None) and the file was never taken for one that needs float64. Each slice came back as one
    value, and the scan's exact copy scored SSIM 0.004-0.013. Its slices and volume now read as the copy's."""
    import deepssim_fast as dsf
    from deepssim_fast.io import _file_volumes

    raw = _anatomical_int16()
    img = nib.Nifti1Image(raw, np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(3e-5, 1e7)
    scan = tmp_path / f"scan{suffix}"
    nib.save(img, scan)
    copy = tmp_path / "copy.npy"
    np.save(copy, raw.astype(np.float32))
    pol = SlicePolicy(min_foreground=0)
    got = list(iter_slices([scan], pol, strict=True))
    want = list(iter_slices([copy], pol, strict=True))
    assert [s.index for s in got] == [s.index for s in want] == list(range(raw.shape[2]))
    for g, w in zip(got, want, strict=True):
        assert len(np.unique(g.array)) == len(np.unique(raw[..., g.index])), g.key
        if np.ptp(w.array) > 0:
            assert float(dsf.ssim(g.array, w.array, preset="deepssim")) == pytest.approx(1.0, abs=1e-6), g.key
    ((_src, vol),) = _file_volumes(scan)
    ((_src, plain),) = _file_volumes(copy)
    assert len(np.unique(vol)) == len(np.unique(raw))
    assert float(dsf.ssim(vol, plain, spatial_dims=3, preset="deepssim")) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_64_bit_integer_nifti_past_2_53_reads_as_the_same_npy(tmp_path: Path, suffix: str) -> None:
    """An int64 NIfTI with values past 2^53 was cast to float64 by nibabel before anything else: the anatomical
    scan + 2^60 came back as a few levels per slice, where the same array as .npy has its minimum taken off in
    integer arithmetic first and keeps every level. The NIfTI now reads as the .npy (a scaled one: its scaling
    applied to the integers less their minimum), and a span float64 cannot hold is refused naming the file."""
    import deepssim_fast as dsf
    from deepssim_fast.io import _file_volumes

    raw = _anatomical_int16().astype(np.int64)
    big = raw + (1 << 60)
    nii, npy, plain = tmp_path / f"big{suffix}", tmp_path / "big.npy", tmp_path / "plain.npy"
    nib.save(nib.Nifti1Image(big, np.eye(4), dtype=np.int64), nii)
    np.save(npy, big)
    np.save(plain, raw.astype(np.float32))
    pol = SlicePolicy(min_foreground=0)
    got = list(iter_slices([nii], pol, strict=True))
    want = list(iter_slices([npy], pol, strict=True))
    copy = list(iter_slices([plain], pol, strict=True))
    assert [s.index for s in got] == [s.index for s in want] == list(range(raw.shape[2]))
    for g, w, c in zip(got, want, copy, strict=True):
        assert np.array_equal(g.array, w.array), g.key
        assert len(np.unique(g.array)) == len(np.unique(raw[..., g.index])), g.key
        if np.ptp(c.array) > 0:
            assert float(dsf.ssim(g.array, c.array, preset="deepssim")) == pytest.approx(1.0, abs=1e-6), g.key
    ((_s, vol),) = _file_volumes(nii)
    ((_s, vol_npy),) = _file_volumes(npy)
    assert np.array_equal(vol, vol_npy) and len(np.unique(vol)) == len(np.unique(raw))
    for dt in (np.float64, np.float32):
        assert np.array_equal(read_image(nii, dtype=dt), read_image(npy, dtype=dt))
    np.testing.assert_array_equal(read_image(nii, dtype=np.float64), raw - raw.min())

    # scaled: the slope applied to the integers less their minimum; within 2^53, nibabel's slope * x + inter
    img = nib.Nifti1Image(big, np.eye(4), dtype=np.int64)
    img.header.set_slope_inter(2.0, 5.0)
    nib.save(img, tmp_path / f"scaled{suffix}")
    np.testing.assert_array_equal(read_image(tmp_path / f"scaled{suffix}", dtype=np.float64), 2.0 * (raw - raw.min()))
    img = nib.Nifti1Image(raw, np.eye(4), dtype=np.int64)
    img.header.set_slope_inter(2.0, 5.0)
    nib.save(img, tmp_path / f"small{suffix}")
    np.testing.assert_array_equal(read_image(tmp_path / f"small{suffix}", dtype=np.float64), 2.0 * raw + 5.0)

    # a span past 2^53 (here 2^63) is refused, naming the file, on every path
    span = np.where(raw > 1000, 1 << 62, -(1 << 62)).astype(np.int64)
    wide = tmp_path / f"span{suffix}"
    nib.save(nib.Nifti1Image(span, np.eye(4), dtype=np.int64), wide)
    says = rf"span{re.escape(suffix)}: integer values span 9223372036854775808 \(from -\d+ to \d+\): too wide a range"
    with pytest.raises(DataError, match=says):
        read_image(wide)
    with pytest.raises(DataError, match=says):
        list(iter_slices([wide], pol, strict=True))
    with pytest.raises(DataError, match=says):
        _file_volumes(wide)
    # a frame of a series is named with its frame
    series = tmp_path / f"series{suffix}"
    nib.save(nib.Nifti1Image(np.stack([big, span], axis=-1), np.eye(4), dtype=np.int64), series)
    frame_says = rf"series{re.escape(suffix)}: integer values \(frame 1\) span 9223372036854775808"
    with pytest.raises(DataError, match=frame_says):
        _file_volumes(series)
    assert np.array_equal(read_image(series, frame=0), read_image(npy))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_a_link_to_a_device_is_listed_and_refused_unread(tmp_path: Path) -> None:
    """A FIFO named fifo.png and a symlink to /dev/zero named zero.npy were dropped from a folder search without
    a word, and named themselves they were "no such file or directory", though they exist. They are inputs
    now, refused by the readers without being opened (a FIFO blocks until a writer comes, /dev/zero reads
    forever): skipped with "not a regular file" and what they are."""
    import threading

    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "ok.npy", np.arange(64, dtype=np.float32).reshape(8, 8))
    fifo, zero = d / "fifo.png", d / "zero.npy"
    os.mkfifo(fifo)
    os.symlink("/dev/zero", zero)
    done = threading.Event()

    def unblock() -> None:  # (a reader that opened the FIFO would hang the tests: a writer comes after 10 s)
        if not done.wait(10):
            with open(fifo, "wb"):
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        assert discover(d) == [fifo, d / "ok.npy", zero]
        assert discover(str(d / "*")) == [fifo, d / "ok.npy", zero]
        assert discover(fifo) == [fifo] and discover(zero) == [zero]
        with pytest.raises(DataError, match=r"fifo\.png: not a regular file: a FIFO \(named pipe\)"):
            read_image(fifo)
        with pytest.raises(DataError, match=r"zero\.npy: not a regular file: a character device \(a symbolic link "
                                            r"to /dev/zero\)"):
            read_image(zero)
        skipped: list = []
        got = list(iter_slices(discover(d), SlicePolicy(min_foreground=0), skipped=skipped))
        assert [s.source for s in got] == [str(d / "ok.npy")]
        assert [(p, "not a regular file" in why) for p, why in skipped] == [(str(fifo), True), (str(zero), True)]
    finally:
        done.set()


def test_a_glob_whose_bracket_names_a_real_folder_says_how_to_escape_it(tmp_path: Path) -> None:
    """A glob under a folder named ``br[a]ck`` matched nothing ('[a]' is a set of characters: it looked in
    ``brack``) and said only "matched no ... files". It now says that '[' is glob syntax and, where the
    bracketed part exists as written, gives the escaped pattern."""
    folder = tmp_path / "br[a]ck"
    folder.mkdir()
    np.save(folder / "y.npy", np.ones((8, 8), np.float32))
    pattern = str(folder / "*.npy")
    fix = os.path.join(str(tmp_path), "br[[]a]ck", "*.npy")
    with pytest.raises(ValueError, match=r"matched no .* files; '\[' starts a set of characters in a glob pattern, "
                                         r"but .*br\[a\]ck exists as written") as ei:
        discover(pattern)
    assert repr(fix) in str(ei.value)
    assert discover(fix) == [folder / "y.npy"]
    # a name holding brackets in a component with a wildcard
    np.save(folder / "scan[1]_a.npy", np.ones((8, 8), np.float32))
    fix = os.path.join(glob.escape(str(folder)), "scan[[]1]*.npy")
    with pytest.raises(ValueError, match=r"but .*scan\[1\]_a\.npy exists as written") as ei:
        discover(os.path.join(glob.escape(str(folder)), "scan[1]*.npy"))
    assert repr(fix) in str(ei.value)
    assert discover(fix) == [folder / "scan[1]_a.npy"]
    # no hint where no name holds the brackets: a set of characters that matched nothing is what the user meant
    # (it suggested escaping for d/[xyz].png), and an unclosed '[' is literal to glob already
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "a.npy", np.ones((8, 8), np.float32))
    (tmp_path / "d" / "scan[1.txt").write_text("not an image")
    for pattern in (tmp_path / "no[ne]" / "*.npy", tmp_path / "d" / "[xyz].npy", tmp_path / "d" / "scan[1*",
                    tmp_path / "none*" / "*.npy"):
        with pytest.raises(ValueError, match=r"matched no .* files$"):
            discover(str(pattern))


def test_images_in_hidden_folders_are_counted_with_hidden_files(tmp_path: Path, caplog) -> None:
    """The warning about hidden files left out of a search counted hidden image-named files only: images in a
    hidden folder (``.cache/b.npy``), left out too, were not counted, and a folder holding only such images was
    said to hold no image files, without the note. Both are counted now, each kind named with an example."""
    import logging

    d = tmp_path / "d"
    for name in ("a.npy", ".x.npy", ".cache/b.npy", ".cache/deep/c.png", ".cache/._m.npy", ".cache/notes.txt"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            _png(d / name, np.zeros((8, 8), np.uint8))
        elif name.endswith(".txt"):
            (d / name).write_text("not an image")
        else:
            np.save(d / name, np.ones((8, 8), np.float32))
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.io"):
        assert discover(d) == [d / "a.npy"]
    # (hidden folders are not searched: the images directly in them are counted, .cache/deep/c.png is not)
    (said,) = [r.getMessage() for r in caplog.records if "hidden" in r.getMessage()]
    assert f"1 hidden image-named file(s) (names starting with '.'), e.g. {d / '.x.npy'}, and 1 image file(s) " \
           f"directly in hidden folders (names starting with '.', not searched), e.g. {d / '.cache' / 'b.npy'}, " \
           "left out" in said, said
    only = tmp_path / "only"
    (only / ".hdir").mkdir(parents=True)
    np.save(only / ".hdir" / "h.npy", np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"contains no .* files \(only hidden ones, which a search leaves out: 1 "
                                         r"image file\(s\) directly in hidden folders .*\.hdir/h\.npy"):
        discover(only)


def test_hidden_folders_are_not_walked_to_count_their_images(tmp_path: Path, monkeypatch, caplog) -> None:
    """To count the images left out in hidden folders, a search walked each hidden folder in full, following
    its links: a project's ``.venv`` linked to a virtualenv (47k entries) took 9 s for 6 images and counted
    the .png/.npy files of site-packages, and a link loop inside ``.cache``, never searched, was warned about.
    Only the hidden folder's own entries are looked at now, a linked hidden folder not at all; a ``**`` glob
    does not walk hidden folders either (a hidden name matches only a component that starts with '.')."""
    import logging

    big = tmp_path / "big"
    for i in range(12):
        (big / f"s{i}" / "t").mkdir(parents=True)
        np.save(big / f"s{i}" / "x.npy", np.ones((4, 4), np.float32))
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / ".cache" / "deep").mkdir(parents=True)
    for i in range(3):
        _png(proj / "data" / f"{i}.png", np.zeros((8, 8), np.uint8))
    np.save(proj / ".cache" / "b.npy", np.ones((4, 4), np.float32))
    np.save(proj / ".cache" / "deep" / "c.npy", np.ones((4, 4), np.float32))
    (proj / ".venv").symlink_to(big, target_is_directory=True)
    (proj / ".cache" / "up").symlink_to("..", target_is_directory=True)  # a loop, in a folder never searched
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path=".", *args, **kwargs):
        scanned.append(os.fspath(path))
        return real_scandir(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    want = [proj / "data" / f"{i}.png" for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.io"):
        assert discover(proj) == want
    assert sorted(scanned) == sorted(map(str, (proj, proj / "data", proj / ".cache"))), scanned
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "loop" in m], said
    (hidden,) = [m for m in said if "hidden" in m]
    assert f"1 image file(s) directly in hidden folders (names starting with '.', not searched), e.g. " \
           f"{proj / '.cache' / 'b.npy'}" in hidden, hidden
    scanned.clear()
    assert discover(str(proj / "**" / "*.png")) == want
    assert not [d for d in scanned if os.sep + "." in d], scanned
    # named, a hidden folder is searched, its links followed (and its loop said)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepssim_fast.io"):
        assert discover(proj / ".cache") == [proj / ".cache" / "b.npy", proj / ".cache" / "deep" / "c.npy"]
    assert [r.getMessage() for r in caplog.records if "symlink loop" in r.getMessage()], caplog.records
    assert discover(proj / ".venv") == [proj / ".venv" / f"s{i}" / "x.npy" for i in sorted(range(12), key=str)]


def test_a_grey_image_saved_in_colour_reads_as_the_grey_one(tmp_path: Path) -> None:
    """A grey image saved as RGB (R == G == B) read up to 1.5e-5 off the same image saved as grey: the BT.601
    weights, 0.299 + 0.587 + 0.114, do not sum to exactly 1 in float32. A grey pixel of a colour image now
    gives its value exactly: RGB, RGBA, a grey palette and 16-bit RGB(A) read bit-identical to mode L / I;16;
    a coloured pixel keeps its luminance."""
    t1 = data.center_fit(data.load_volume("t1_coronal_slice").array, (64, 72)).astype(np.float64)
    t1 = (t1 - t1.min()) / (t1.max() - t1.min())
    g8 = np.round(t1 * 255).astype(np.uint8)
    grey = read_image(_png(tmp_path / "l.png", g8))
    assert np.array_equal(grey, g8.astype(np.float32))
    rgb = np.dstack([g8, g8, g8])
    for name, img in (("rgb", Image.fromarray(rgb)), ("rgba", Image.fromarray(np.dstack([rgb, g8]))),
                      ("p", Image.fromarray(g8).convert("P"))):
        img.save(tmp_path / f"{name}.png")
        assert np.array_equal(read_image(tmp_path / f"{name}.png"), grey), name
    g16 = np.round(t1 * 65535).astype(np.uint16)
    grey16 = read_image(_png(tmp_path / "l16.png", g16))
    assert np.array_equal(grey16, g16.astype(np.float32))
    for name, colour, arr in (("rgb16", 2, np.dstack([g16, g16, g16])), ("rgba16", 6, np.dstack([g16] * 4))):
        assert np.array_equal(read_image(_png16(tmp_path / f"{name}.png", arr, colour)), grey16), name
    # a coloured pixel among grey ones: its luminance, the grey ones their value
    rgb[3, 4] = (200, 10, 60)
    got = read_image(_png(tmp_path / "mixed.png", rgb))
    want = grey.copy()
    want[3, 4] = np.float32(0.299) * 200 + np.float32(0.587) * 10 + np.float32(0.114) * 60
    assert np.array_equal(got, want)
