"""Real brain MRI that ships inside wheels the project depends on — no download at run time.

=====================  ==========  =====================================================  ==============
name                   package     file                                                   shape
=====================  ==========  =====================================================  ==============
``mni152``             nilearn     datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_...nii.gz 197×233×189 T1
``t1_coronal_slice``   dipy        data/files/t1_coronal_slice.npy                        256×256 T1 (2D)
``s0_10slices``        dipy        data/files/S0_10slices.nii.gz                          128×128×10
``aniso_vox``          dipy        data/files/aniso_vox.nii.gz                            58×58×24
``piesno``             dipy        data/files/test_piesno.nii.gz                          96×96×14
``example4d``          nibabel     tests/data/example4d.nii.gz                            128×96×24×2 (4D)
``anatomical``         nibabel     tests/data/anatomical.nii                              33×41×25
=====================  ==========  =====================================================  ==============

Everything is returned as float32 numpy arrays together with its source name. Slicing follows one
documented policy, :class:`SlicePolicy`, shared with the audit's NIfTI reader.
"""
from __future__ import annotations

import importlib.util
import io
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    package: str
    relpath: str
    description: str


DATASETS: dict[str, _Entry] = {
    "mni152": _Entry("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                     "MNI152 2009a symmetric T1 template, 197x233x189, 1 mm"),
    "t1_coronal_slice": _Entry("dipy", "data/files/t1_coronal_slice.npy", "T1 coronal slice, 256x256"),
    "s0_10slices": _Entry("dipy", "data/files/S0_10slices.nii.gz", "diffusion b0 volume, 128x128x10"),
    "aniso_vox": _Entry("dipy", "data/files/aniso_vox.nii.gz", "anisotropic-voxel T1, 58x58x24"),
    "piesno": _Entry("dipy", "data/files/test_piesno.nii.gz", "noisy diffusion volume, 96x96x14"),
    "example4d": _Entry("nibabel", "tests/data/example4d.nii.gz", "4D fMRI run, 128x96x24x2"),
    "anatomical": _Entry("nibabel", "tests/data/anatomical.nii", "small anatomical T1, 33x41x25"),
}


class DataError(ValueError):
    """A file or dataset could not be loaded as asked; the message names the path and the problem."""


#: The ending of a DataError's message that holds where the reader leaves the file out (the audit, train and
#: embed skip an unreadable file, and say so); where the error stops the caller instead (the ssim command, a
#: --strict run) these words are wrong, and the command line drops them (:func:`stopped`).
NOT_USED = "; the file is not used"


def stopped(text: str) -> str:
    """``text`` (an error's message) for a caller that stops on it: without :data:`NOT_USED`."""
    return text.replace(NOT_USED, "")


@dataclass(frozen=True)
class Volume:
    """A loaded image: ``array`` is float32, 2D or 3D; ``source`` names where it came from."""

    array: np.ndarray
    source: str


@dataclass(frozen=True)
class Slice:
    """A 2D slice (float32) of a volume: ``source`` plus the ``axis`` and ``index`` it was cut at."""

    array: np.ndarray
    source: str
    axis: int
    index: int

    @property
    def key(self) -> str:
        return f"{self.source}#{self.axis}:{self.index}"


@dataclass(frozen=True)
class SlicePolicy:
    """How a volume is cut into 2D slices.

    axis:            the axis the slices are taken perpendicular to (0, 1 or 2; default 2, axial for RAS data).
    start, stop:     slice index range along ``axis`` (Python slice semantics; None = whole range).
    step:            keep every ``step``-th slice.
    min_foreground:  skip a slice whose fraction of foreground pixels is below this (0 keeps all).
    foreground_level: a pixel is foreground when above ``min + foreground_level × (max − min)`` of its volume,
                     so the rule does not change when intensities are shifted or rescaled (a scan in [−1, 1]
                     or z-scored keeps the slices it keeps in [0, 255]); a constant volume has no foreground.
    """

    axis: int = 2
    start: int | None = None
    stop: int | None = None
    step: int = 1
    min_foreground: float = 0.05
    foreground_level: float = 0.1

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"SlicePolicy.axis must be 0, 1 or 2, got {self.axis}")
        if self.step < 1:
            raise ValueError(f"SlicePolicy.step must be >= 1, got {self.step}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"SlicePolicy.min_foreground must be in [0, 1], got {self.min_foreground}")
        if not 0.0 <= self.foreground_level < 1.0:
            raise ValueError(f"SlicePolicy.foreground_level must be in [0, 1), got {self.foreground_level}")

    def token(self) -> str:
        """A stable string for cache keys ("fg2": the foreground level is relative to the volume's range;
        caches written when it was relative to its maximum alone are not reused)."""
        return (f"ax{self.axis}_{self.start}_{self.stop}_{self.step}_{self.min_foreground}_"
                f"{self.foreground_level}_fg2")

    def foreground(self, vmin: float, vmax: float) -> float | None:
        """The intensity above which a pixel of a volume with this range is foreground; None when the volume
        is constant (no pixel is foreground)."""
        if not vmax > vmin:
            return None
        return vmin + self.foreground_level * (vmax - vmin)

    def keeps(self, s: np.ndarray, level: float | None) -> bool:
        """Whether slice ``s`` has at least ``min_foreground`` of its pixels above ``level``."""
        if self.min_foreground <= 0:
            return True
        frac = float((s > level).mean()) if level is not None and s.size else 0.0
        return frac >= self.min_foreground


def dataset_names() -> list[str]:
    return list(DATASETS)


def dataset_path(name: str) -> Path:
    """Path of a shipped dataset file inside its package. Errors say which package is missing."""
    try:
        entry = DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}") from None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise DataError(f"dataset {name!r} ships inside the {entry.package!r} wheel, which is not installed: "
                        f"pip install {entry.package} (or deepssim_fast[data])")
    path = Path(spec.origin).parent / entry.relpath
    if not path.is_file():
        raise DataError(f"dataset {name!r}: expected file {path} is missing from the installed "
                        f"{entry.package} package")
    return path


def _is_nifti_name(path: Path) -> bool:
    n = path.name.lower()
    return n.endswith((".nii", ".nii.gz"))


def nib_load(path: str | os.PathLike, *, mmap: bool | str = True, keep_file_open: bool | None = None):
    """``nibabel.load`` of a single-file NIfTI (``.nii``/``.nii.gz``, extension in any case).

    nibabel matches a mixed-case extension (``scan.Nii``, ``scan.Nii.gz``) case-insensitively but then opens
    the name rebuilt in lower case, and fails with FileNotFoundError on a file that exists; such a file is
    opened by its own name instead (NIfTI-1 or NIfTI-2 by its header size, gzip by the extension).
    ``keep_file_open=True`` keeps one file handle (for a ``.nii.gz``, one decompression stream) for all the
    image's reads, so frames read in order decompress the file once."""
    import nibabel as nib
    from nibabel.fileholders import FileHolder
    from nibabel.openers import ImageOpener

    try:
        return _drop_unit_axes(nib.load(os.fspath(path), mmap=mmap, keep_file_open=keep_file_open))
    except FileNotFoundError:
        if not (Path(path).is_file() and _is_nifti_name(Path(path))):
            raise
    with ImageOpener(os.fspath(path)) as f:
        head = f.read(4)
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    return _drop_unit_axes(klass.from_file_map({"image": FileHolder(filename=os.fspath(path))}, mmap=mmap,
                                               keep_file_open=keep_file_open))


def _drop_unit_axes(img):
    """``img`` without the axes of length 1 that follow its fourth (a volume that a tool saved as 5D,
    (X, Y, Z, 1, 1), is that volume; (X, Y, Z, T, 1) is a series of T frames), its data still read lazily
    through the same file; any other image unchanged (a vector image, (X, Y, Z, 1, 3), stays 5D and is
    refused by the readers, naming its shape)."""
    shape = tuple(img.shape)
    n = len(shape)
    while n > 4 and shape[n - 1] == 1:
        n -= 1
    if n == len(shape) or not hasattr(img.dataobj, "reshape"):
        return img
    return img.__class__(img.dataobj.reshape(shape[:n]), img.affine, img.header, img.extra)


def _check_real_dtype(p: Path, img) -> None:
    """DataError unless the NIfTI stores real numbers: complex data (complex64/128/256, as MR phase images
    are stored) would be cast to its real part, the imaginary part silently dropped; an RGB/RGBA one has
    no single intensity."""
    try:
        dt = np.dtype(img.get_data_dtype())
    except Exception:  # noqa: BLE001 - left to the read, which names the problem
        return
    if np.issubdtype(dt, np.complexfloating) or dt.fields is not None:
        raise DataError(f"{p}: unsupported NIfTI data type {dt} (complex or RGB values); expected a real "
                        "scalar image (for complex MRI, save the magnitude)")


def _open_nifti(p: Path, *, mmap: bool = True, keep_file_open: bool | None = None):
    """The nibabel image of a NIfTI file that exists, is named as one, loads, holds real numbers and, for a
    ``.nii.gz``, has gzip data that pass their CRC and length checks (:func:`_gunzip`).

    A ``.nii.gz`` that decompresses to at most :data:`GZIP_IN_MEMORY` bytes is decompressed once, checked in
    the same pass, and read from memory; a larger one is checked in a pass of its own and then read through
    nibabel's stream (two decompressions, memory bounded by a frame)."""
    if not p.exists():
        raise DataError(f"{p}: no such file")
    if not _is_nifti_name(p):
        raise DataError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
    raw = _gunzip(p, keep=GZIP_IN_MEMORY) if p.name.lower().endswith(".gz") else None
    try:
        img = _nifti_from_buffer(raw) if raw is not None else nib_load(p, mmap=mmap, keep_file_open=keep_file_open)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    _check_real_dtype(p, img)
    return img


def _nifti_from_buffer(buf: io.BytesIO):
    """The NIfTI-1 or NIfTI-2 image (by its header size, in either byte order) held in ``buf``, a whole
    uncompressed single-file NIfTI, read from memory (axes of length 1 past the fourth dropped, as
    :func:`nib_load` drops them)."""
    import nibabel as nib

    head = buf.getbuffer()[:4].tobytes()
    sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    buf.seek(0)
    return _drop_unit_axes(klass.from_file_map(klass.make_file_map({"image": buf, "header": buf})))


# A .nii.gz decompressing to at most this many bytes is decompressed once and read from memory (a 256^3
# float32 volume is 64 MiB); a larger one (a long 4D series) is checked, then streamed.
GZIP_IN_MEMORY = 128 << 20


def _gunzip(p: Path, keep: int = 0) -> io.BytesIO | None:
    """Decompress a ``.gz`` file to the end of its gzip data, so that its CRC and length are checked:
    nibabel reads only the bytes its header asks for and never reaches the trailer, so a flipped bit or a
    zeroed block in the middle of the stream was read as image data (one voxel off; or half the voxels
    garbage, up to 8.7e20). The decompressed bytes are returned in a BytesIO (written as they come: no
    second copy) when they are at most ``keep`` bytes, else None (the whole stream is checked either way).
    Bytes after the last gzip member that are not gzip data (padding, a stray tail) are ignored, as
    ``gzip -d`` and nibabel ignore them. DataError names a damaged, truncated or uncompressed file."""
    chunk, out_max, magic = 1 << 22, 1 << 24, b"\x1f\x8b"
    held: io.BytesIO | None = io.BytesIO() if keep > 0 else None
    size = 0

    def take(out: bytes) -> None:
        nonlocal held, size
        size += len(out)
        if held is not None:
            if size > keep:
                held = None  # (too large to hold: checked only)
            else:
                held.write(out)

    try:
        with open(p, "rb") as f:
            buf = f.read(chunk)
            if len(buf) < 2:
                raise EOFError("the file is empty or ends within the gzip header (a truncated file)")
            if buf[:2] != magic:  # (zlib said "incorrect header check")
                raise DataError(f"{p}: not gzip-compressed data, though named .gz (an uncompressed NIfTI renamed? "
                                "name it .nii)")
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # (a gzip member: its CRC-32 and size are checked)
            while True:
                take(d.decompress(buf, out_max))
                while d.unconsumed_tail and not d.eof:  # (bounded output: highly compressible data)
                    take(d.decompress(d.unconsumed_tail, out_max))
                if d.eof:
                    rest = d.unused_data
                    while len(rest) < 2 and (more := f.read(chunk)):
                        rest += more
                    if rest[:2] != magic:
                        return held
                    d, buf = zlib.decompressobj(16 + zlib.MAX_WBITS), rest  # the next member
                    continue
                buf = f.read(chunk)
                if not buf:
                    raise EOFError("the gzip data end before their end marker (a truncated file)")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{p}: damaged gzip data ({type(exc).__name__}: {exc}){NOT_USED}") from exc


#: Integers up to this magnitude are exact in float64 (its 53-bit significand); past it they round.
_FLOAT64_EXACT = 1 << 53


def _exact_float64(name: object, a: np.ndarray, what: str = "") -> np.ndarray:
    """The 8-byte integer array ``a`` as float64: as it is where float64 holds every value (|x| <= 2^53),
    else less its minimum, taken off in uint64 arithmetic (modulo 2^64, so exact however the signed values
    lie) before the cast. Cast first, two different images of values near 2^63 both rounded to one constant
    and were taken for duplicates. DataError naming ``name`` (and ``what``) when the spread itself is past
    2^53."""
    if a.size == 0:  # (the readers name an empty image)
        return a.astype(np.float64)
    lo, hi = int(a.min()), int(a.max())
    if -_FLOAT64_EXACT <= lo and hi <= _FLOAT64_EXACT:
        return a.astype(np.float64)
    if hi - lo > _FLOAT64_EXACT:
        raise DataError(f"{name}: integer values{what} span {hi - lo} (from {lo} to {hi}): too wide a range for "
                        f"float64, which holds integers exactly up to 2^53 ({float(_FLOAT64_EXACT):.4g}); rescale "
                        "the data")
    return (a.astype(np.uint64, copy=False) - np.uint64(lo % (1 << 64))).astype(np.float64)


def _read_int64(p: Path, img, index, what: str = "") -> np.ndarray:
    """``img.dataobj[index]`` of a NIfTI stored as 64-bit integers, in float64, exact: the stored integers
    through :func:`_exact_float64` (less their minimum, in integer arithmetic, where they pass 2^53), then the
    file's scaling. nibabel casts them to float64 first (values past 2^53 rounded: the anatomical scan + 2^60
    read as a few levels per slice) or scales them in float64 (the same). Scaled integers that float64 holds
    give ``slope * x + inter`` as nibabel computes it; integers less their minimum give ``slope * (x - min)``,
    the scaled values less the minimum's (the intercept, an offset, is dropped with the rest of it)."""
    proxy = img.dataobj
    slope = float(np.asarray(getattr(proxy, "slope", 1.0)))
    inter = float(np.asarray(getattr(proxy, "inter", 0.0)))
    try:
        if (slope, inter) == (1.0, 0.0) or not hasattr(proxy, "_get_unscaled"):
            ints = np.asarray(proxy[index])  # (unscaled: nibabel gives the stored integers as they are)
        else:
            ints = np.asarray(proxy._get_unscaled(slicer=index))  # (the stored integers of ``index`` alone)
    except Exception as exc:  # truncated gzip, short data, ...
        raise DataError(f"{p}: could not read image data{what} ({type(exc).__name__}: {exc})") from exc
    if ints.dtype.kind not in "iu":  # (scaled by a proxy without _get_unscaled: float64 already)
        return ints.astype(np.float64, copy=False)
    if ints.size == 0:
        return ints.astype(np.float64)
    d = _exact_float64(p, ints, what)
    if (slope, inter) == (1.0, 0.0):
        return d
    held = -_FLOAT64_EXACT <= int(ints.min()) and int(ints.max()) <= _FLOAT64_EXACT
    with np.errstate(over="ignore", invalid="ignore"):  # (non-finite values are named by the caller)
        return d * slope + inter if held else d * slope


def _read_data(p: Path, img, index, what: str = "", dtype: Any = np.float32) -> np.ndarray:
    """``img.dataobj[index]`` as float32 (or ``dtype``), every value finite; errors name the file (and
    ``what``). 64-bit integers are read exactly (:func:`_read_int64`), as a ``.npy`` of them is."""
    def read(dt: Any) -> np.ndarray:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                return np.asarray(img.dataobj[index], dtype=dt)
        except Exception as exc:  # truncated gzip, short data, ...
            raise DataError(f"{p}: could not read image data{what} ({type(exc).__name__}: {exc})") from exc

    try:
        stored = np.dtype(img.get_data_dtype())
    except Exception:  # noqa: BLE001 - left to the read, which names the problem
        stored = np.dtype(np.float32)
    wide = None
    if stored.kind in "iu" and stored.itemsize == 8:
        wide = _read_int64(p, img, index, what)
        with np.errstate(over="ignore", invalid="ignore"):
            arr = wide.astype(dtype, copy=False)
    else:
        arr = read(dtype)
    if arr.size == 0:  # (a .npy of this shape is refused the same way)
        raise DataError(f"{p}: empty image, shape {tuple(img.shape)}{what}")
    if not np.isfinite(arr).all():
        if wide is None:
            wide = read(np.float64) if np.dtype(dtype) != np.float64 else arr
        if np.isfinite(wide).all():  # finite values past float32's range, not NaN/Inf in the file
            raise DataError(f"{p}: values up to {float(np.abs(wide).max()):.4g}{what} exceed the range of "
                            f"{np.dtype(dtype).name} ({float(np.finfo(dtype).max):.4g}); rescale the data")
        raise DataError(f"{p}: contains NaN or Inf values{what}")
    return arr


def load_nifti(path: str | os.PathLike, *, frame: int | None = None, mmap: bool = True,
               dtype: Any = np.float32) -> np.ndarray:
    """Load a NIfTI file as a float32 array of rank 2 or 3 (``dtype=np.float64``: float64, so that float64
    data and scaled integers keep every bit nibabel gives them; 64-bit integers are read exactly, less their
    minimum where they pass +-2^53, see :func:`_read_int64`).

    A 4D file needs ``frame`` (which volume of the series); ``frame`` on a 3D file is an error.
    Errors name the path and the problem: missing file, not a NIfTI, wrong rank, complex or RGB data
    (never cast to a real part), NaN/Inf values. (Every frame of a 4D file, in order and decompressed
    once: :func:`iter_nifti_frames`.)
    """
    p = Path(path)
    img = _open_nifti(p, mmap=mmap)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1 and frame in (None, 0):
        return _read_data(p, img, (..., 0), dtype=dtype)  # a 3D volume stored as 4D
    if len(shape) == 4:
        if frame is None:
            raise DataError(f"{p}: 4D volume of shape {shape}; choose a frame (frame=0..{shape[3] - 1})")
        if not -shape[3] <= frame < shape[3]:
            raise DataError(f"{p}: frame {frame} out of range for 4D shape {shape}")
        return _read_data(p, img, (..., frame), dtype=dtype)
    if len(shape) in (2, 3):
        if frame is not None:
            raise DataError(f"{p}: frame={frame} given but the volume is {len(shape)}D, shape {shape}")
        return _read_data(p, img, ..., dtype=dtype)
    raise _rank_error(p, shape)


def _rank_error(p: Path, shape: tuple) -> DataError:
    """The DataError for a NIfTI image of a rank the readers do not take (after :func:`_drop_unit_axes`)."""
    what = ""
    if len(shape) == 5:  # (NIfTI's fifth axis holds the components of a vector or multi-valued voxel)
        what = f": {shape[4]} values per voxel along axis 4 (a vector or multi-component image)"
    return DataError(f"{p}: unsupported NIfTI rank {len(shape)} (shape {shape}){what}; expected 2D, 3D or "
                     "4D (one value per voxel)")


def iter_nifti_frames(path: str | os.PathLike, *, dtype: Any = np.float32) -> Iterator[np.ndarray]:
    """Every frame of a 4D NIfTI file, in order, as float32 (or ``dtype``) 3D arrays (a 2D or 3D file gives
    itself once).

    The file is opened once and read front to back: a ``.nii.gz`` is decompressed once, its CRC checked in
    the same pass (a series over :data:`GZIP_IN_MEMORY`: once to check it, once for the frames, see
    :func:`_open_nifti`), where ``load_nifti(path, frame=t)`` for each t decompresses the file again
    (48 frames of 96 x 96 x 50 through nibabel's stream: 0.3 s against 6 s). Errors as
    :func:`load_nifti`'s; a NaN/Inf names its frame; damaged gzip data fails before the first frame."""
    p = Path(path)
    img = _open_nifti(p, keep_file_open=True)  # (a damaged .nii.gz is refused whole, before its first frame)
    shape = img.shape
    if len(shape) in (2, 3):
        yield _read_data(p, img, ..., dtype=dtype)
        return
    if len(shape) != 4:
        raise _rank_error(p, shape)
    for t in range(shape[3]):
        yield _read_data(p, img, (..., t), f" (frame {t})", dtype=dtype)


def load_volume(name: str, *, frame: int | None = None) -> Volume:
    """Load a shipped dataset by name (see the module table) as a float32 :class:`Volume`."""
    path = dataset_path(name)
    if path.suffix == ".npy":
        if frame is not None:
            raise DataError(f"{path}: frame={frame} given but {name!r} is a 2D image")
        arr = np.load(path).astype(np.float32)
    else:
        arr = load_nifti(path, frame=frame)
    return Volume(np.ascontiguousarray(arr), name)


def volume_slices(volume: np.ndarray, policy: SlicePolicy | None = None, *, source: str = "array"
                  ) -> list[Slice]:
    """Cut a 3D array into 2D float32 slices following ``policy`` (a 2D array gives itself)."""
    policy = policy or SlicePolicy()
    v = np.asarray(volume)
    if v.ndim == 2:
        return [Slice(np.ascontiguousarray(v, dtype=np.float32), source, policy.axis, 0)]
    if v.ndim != 3:
        raise DataError(f"{source}: expected a 2D or 3D volume, got shape {v.shape}")
    level = policy.foreground(float(v.min()), float(v.max())) if v.size else None
    out = []
    for i in range(v.shape[policy.axis])[policy.start:policy.stop:policy.step]:
        # (a basic-indexing view: np.take copied a slice of a Fortran-ordered volume, as nibabel gives
        # them, ~100x slower: 1.4 ms against 0.017 ms for 96 x 96)
        s = v[(slice(None),) * policy.axis + (i,)]
        if not policy.keeps(s, level):
            continue
        out.append(Slice(np.ascontiguousarray(s, dtype=np.float32), source, policy.axis, int(i)))
    return out


def load_slices(name: str, policy: SlicePolicy | None = None, *, frame: int | None = None) -> list[Slice]:
    """2D slices of a shipped dataset, cut by ``policy``. For ``example4d`` pass ``frame``."""
    vol = load_volume(name, frame=frame)
    return volume_slices(vol.array, policy, source=name)


def center_fit(image: np.ndarray, shape: Sequence[int], *, fill: float | None = None) -> np.ndarray:
    """Centre-crop or pad ``image`` to ``shape`` (the size policy of the audit and the encoder).

    Padding uses ``fill`` (default: the image minimum, i.e. background). No resampling, so pixel
    values and SSIM structure are kept as they are.
    """
    img = np.asarray(image)
    if img.ndim != len(shape):
        raise ValueError(f"center_fit: image has shape {img.shape} but target shape is {tuple(shape)}")
    fill_value = float(img.min()) if fill is None and img.size else (fill or 0.0)
    out = np.full(tuple(shape), fill_value, dtype=img.dtype)
    src, dst = [], []
    for n, m in zip(img.shape, shape, strict=True):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = img[tuple(src)]
    return out


def real_slices(shape: Sequence[int] | None = None, *, datasets: Sequence[str] | None = None,
                policy: SlicePolicy | None = None) -> Iterator[Slice]:
    """Iterate over slices of the shipped 3D scans (``example4d`` frame 0), optionally centre-fit to ``shape``.

    The deterministic source of "real images" for tests, benchmarks and the demo.
    """
    names = list(datasets) if datasets is not None else [n for n in DATASETS]
    for name in names:
        frame = 0 if name == "example4d" else None
        for s in load_slices(name, policy, frame=frame):
            arr = s.array if shape is None else center_fit(s.array, shape)
            yield Slice(arr, s.source, s.axis, s.index)
