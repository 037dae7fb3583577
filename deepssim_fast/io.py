"""Reading image collections: discovery, decoding and slicing of NIfTI, PNG and .npy files.

Conventions
-----------
* :func:`discover` turns a *spec* (directory, glob pattern, file, or a list of these) into a sorted,
  de-duplicated list of paths. Directories are searched recursively for ``.nii``, ``.nii.gz``, ``.png``
  and ``.npy``, following symlinked sub-folders, leaving out hidden files and folders (names starting
  with ``.``, as a glob's ``*`` does); a folder that is its own ancestor (a symlink loop, by
  ``(st_dev, st_ino)``) is not entered again. A glob pattern gives the same files: a matching folder is
  searched as if named by itself, and ``**`` follows linked folders with the same loop protection. An
  image-named symlink whose target is missing, or an image-named FIFO, device or socket, is kept, so that
  reading it fails (a FIFO or device is refused unopened) and it is reported (skipped with its reason)
  rather than dropped unseen; image files left out as hidden, hidden ones and those directly in hidden
  folders (which are not searched, nor walked to count), are counted in a warning. Paths are made
  absolute (``os.path.abspath``: ``.`` and ``..`` removed) but symlinks are not resolved, so a linked
  file keeps the name the user gave it and two links to one file (or a folder reached through two paths)
  are two inputs. The order is ``sorted()`` over those absolute paths, never ``os.listdir`` order.
* :func:`read_image` returns float32, 2D or 3D:

  - PNG: 8- or 16-bit grayscale as stored (no rescaling); 1-bit grayscale gives 0 and 1 (dtype range,
    :func:`stored_dtype`, bool's 1), while 2- and 4-bit grayscale are scaled to 0..255 (x85, x17, as
    Pillow decodes them; dtype range uint8's 255), so SSIM with the dtype range is that of the stored
    values with their own range (3, 15). Colour images are converted to luminance with the ITU-R BT.601
    weights, ``0.299 R + 0.587 G + 0.114 B``, computed in float32 (no rounding) from the stored samples
    (a grey pixel, R == G == B, gives its value exactly, as a grey image would), so 16-bit colour (RGB,
    RGBA, grey+alpha; decoded by this module, as Pillow reduces them to 8 bits) keeps its 16-bit values
    (0..65535) as 8-bit colour keeps 0..255; an alpha channel is ignored (grey+alpha gives its grey
    channel). Palette images are expanded to RGB first.
  - ``.npy``: a 2D or 3D numeric array (4D needs ``frame``, which picks the last axis, as for NIfTI; a 4D
    array of one frame is that volume, as a one-frame NIfTI is); leading axes of length 1 are dropped first
    (channel-first samples: (1, H, W) and (1, 1, H, W) are the image, (1, D, H, W) the volume); pickled
    object arrays are refused, and so is an (H, W, 3) or (H, W, 4) array cut along axis 2 (an RGB(A) image:
    one item per colour channel). A 64-bit integer array with values past +-2^53, which float64 cannot hold,
    is read less its minimum (taken off in integer arithmetic, so its structure is kept); one whose values
    span more than 2^53 is refused.
  - NIfTI: :func:`deepssim_fast.data.load_nifti` (4D needs ``frame``, unless it has one); complex and RGB data types are
    refused (a complex file is not cast to its real part). The slicing readers take a file of a wide data type,
    or with an intercept (scl_inter, which nibabel keeps in the image's array proxy, not in its header), in
    float64, fitted to float32 by :func:`fit_float32`. 64-bit integer data are read as a ``.npy`` of them is
    (less their minimum, taken off in integer arithmetic, past +-2^53; a span past 2^53 refused), and a
    scaled file's slope is applied after that (where the minimum was taken off, the intercept goes with it).

  NaN or Inf values, other ranks and unreadable files raise :class:`deepssim_fast.data.DataError` naming
  the path and the problem.
* :func:`iter_slices` cuts each image into 2D :class:`~deepssim_fast.data.Slice` objects with a
  :class:`~deepssim_fast.data.SlicePolicy` (2D images give themselves, index 0). A 4D NIfTI is cut frame
  by frame; the slices of frame ``t`` have ``source = "<path>@t<t>"``. Uncompressed ``.nii`` volumes are
  read slice by slice through nibabel's memory-mapped array proxy; a ``.nii.gz`` (not seekable) is
  decompressed once, so at most one volume is held in memory at a time. Either way the whole file is
  checked (length, NaN/Inf in every slice) before its first slice is given, whatever slices the policy
  selects: a damaged file is skipped whole, never used in part.
* Slices of different sizes are brought to one shape with :func:`deepssim_fast.data.center_fit`
  (centre crop or pad with the slice's minimum, no resampling) by the callers that need one shape.
"""

from __future__ import annotations

import glob
import io
import logging
import contextvars
import os
import re
import stat
import struct
import zlib
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .data import (
    NOT_USED,
    DataError,
    Slice,
    SlicePolicy,
    _check_real_dtype,
    _exact_float64,
    center_fit,
    iter_nifti_frames,
    load_nifti,
    nib_load,
)

logger = logging.getLogger(__name__)

EXTENSIONS = (".nii", ".nii.gz", ".png", ".npy")
Spec = str | os.PathLike | Sequence[str | os.PathLike]

__all__ = [
    "EXTENSIONS",
    "discover",
    "read_image",
    "iter_slices",
    "image_kind",
    "center_fit",
    "Slice",
    "SlicePolicy",
    "DataError",
]


def image_kind(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"png"``, ``"npy"`` from the file name, or None for anything else."""
    n = Path(path).name.lower()
    if n.endswith((".nii", ".nii.gz")):
        return "nifti"
    if n.endswith(".png"):
        return "png"
    if n.endswith(".npy"):
        return "npy"
    return None


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) made one space, for log lines and the command
    line's warnings and errors: a skip reason keeps its full text where it is stored (``skipped``,
    summary.json), but nibabel's 'Expected N bytes ...\\n - could the file be damaged?' would break a line
    in two."""
    return " ".join(str(text).split())


_WARNED: dict[str, int] = {}
_WARN_MAX = 5


def reset_warnings() -> None:
    """Start the counts of :func:`_warn_few` again (an audit does, so that each names its own files)."""
    _WARNED.clear()


def _warn_few(kind: str, message: str) -> None:
    """A warning of kind ``kind``, said for the first ``_WARN_MAX`` files in this process and then once more
    to say that further ones are not (a collection of 10^5 such files would print 10^5 lines)."""
    n = _WARNED.get(kind, 0)
    _WARNED[kind] = n + 1
    # (said while decoding: an audit reading its item cache, or decoding in worker processes, does not say it
    # again, so it is left out of the audit's summary.json, which a rerun must reproduce)
    quiet = {"audit_result": False}
    if n < _WARN_MAX:
        logger.warning("%s", message, extra=quiet)
    elif n == _WARN_MAX:
        logger.warning("%s (further files like this are not named)", message, extra=quiet)


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_candidate(q: Path) -> bool:
    """An image-named entry that is a file, a broken symlink, or anything else but a folder (a FIFO, a link
    to /dev/zero): kept so that reading it fails and it is reported (skipped with its reason, or an error
    under ``strict``) instead of vanishing unnoticed (:func:`_require_exists` refuses what is not a regular
    file without opening it)."""
    if image_kind(q) is None:
        return False
    try:
        if q.is_file():
            return True
        if q.is_symlink() and not q.exists():
            return True
        return q.exists() and not q.is_dir()
    except OSError:  # (a folder that can be listed but not entered: is_file raised EACCES and stopped the audit)
        return True


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk(root: str, ancestors: tuple[tuple[int, int], ...] = (), hidden: bool = True,
          hidden_out: list[tuple[str, bool]] | None = None) -> Iterator[str]:
    """Every entry below the folder ``root`` (not ``root`` itself), depth first in sorted order, following
    symlinked folders. A folder that is one of its own ancestors (a symlink loop; compared by ``(st_dev,
    st_ino)``) is not entered again; a folder reached along two different paths is searched under both.
    A folder that cannot be listed is reported with a warning. ``hidden=False``: entries whose name starts
    with ``.`` are left out, folders with their contents, and are not searched; the image files among them
    are appended to ``hidden_out`` as ``(path, in_hidden_folder)`` (a hidden image-named file: False; an
    image file directly inside a hidden folder: True, see :func:`_images_directly_in`), so the caller can say
    what it left out. macOS's ``._name`` companions, metadata and not images, are not listed."""
    me = _dir_id(root)
    if me is None or me in ancestors:
        if me is not None:
            logger.warning("%s: symlink loop (a link to a folder that contains it); not searched again", root)
        return
    chain = (*ancestors, me)
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        logger.warning("%s: folder not searched (%s)", root, exc)
        return
    for e in entries:
        if not hidden and e.name.startswith("."):
            # (macOS's ._name companions are metadata, not images: not worth a word)
            if hidden_out is not None and not e.name.startswith("._"):
                try:
                    hidden_dir = e.is_dir()
                except OSError:
                    hidden_dir = False
                if not hidden_dir:
                    if image_kind(Path(e.name)) is not None:
                        hidden_out.append((e.path, False))
                elif not e.is_symlink():
                    # (images in .cache were left out without the word hidden files get; only the folder's own
                    # entries are looked at: walking .git, or a .venv linked to a virtualenv, took seconds)
                    hidden_out.extend((q, True) for q in _images_directly_in(e.path))
            continue
        yield e.path
        try:
            is_dir = e.is_dir()  # follows a symlinked folder
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(e.path, chain, hidden, hidden_out)


def _images_directly_in(folder: str) -> list[str]:
    """The image-named entries directly inside the hidden ``folder`` that are not folders themselves (one
    listing: its subfolders are not searched, linked or not, and a folder that cannot be listed gives none,
    without a warning, as it was never going to be searched), for the count of what a search left out."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for e in entries:
        if e.name.startswith("._") or image_kind(Path(e.name)) is None:
            continue
        try:
            if e.is_dir():
                continue
        except OSError:
            pass
        out.append(e.path)
    return out


# Image formats a folder search may meet but does not read: named in a warning, not left out unnoticed.
_OTHER_IMAGE_SUFFIXES = (".dcm", ".ima", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img",
                         ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".npz", ".h5", ".hdf5")


def _under(q: Path, folders: Sequence[str] | Callable[[Path], bool]) -> bool:
    """Whether ``q`` (as given, made absolute, or resolved) lies in one of ``folders`` (absolute paths), or,
    where ``folders`` is a predicate (discover's ``outputs``), whether it says so."""
    if callable(folders):
        return bool(folders(q))
    if not folders:
        return False
    return any(c.startswith(d.rstrip(os.sep) + os.sep) for c in (os.path.abspath(q), os.path.realpath(q))
               for d in folders)


def _search_dir(p: Path, ancestors: tuple[tuple[int, int], ...] = (),
                outputs: Sequence[str] | Callable[[Path], bool] = ()) -> list[Path]:
    """The image files below folder ``p`` (see :func:`_walk`); files of other image formats found there are
    counted by suffix and named in one warning (they are not read), except those in ``outputs`` (folders of
    the caller's own stores, such as an audit's OUT/work inside an input folder). Hidden files and folders
    (names starting with ``.``: macOS's ``._x.png`` companions, ``.git``) are left out, as a glob's ``*`` leaves
    them out."""
    found: list[Path] = []
    other: dict[str, int] = {}
    # the folders enclosing the search root count as ancestors too: a link to one of them ("parent -> ..")
    # led the search out of the root (a training folder's link to its parent took the synthetic set in, and
    # the audit reported 100 % memorised)
    # (the resolved path's parents only: those of a linked root's own path can be the root itself, or lie
    # below it, and then the search found nothing)
    ups = {_dir_id(os.fspath(a)) for a in Path(os.path.realpath(p)).parents}
    ups.discard(None)
    hidden: list[tuple[str, bool]] = []
    for q in map(Path, _walk(os.fspath(p), (*ancestors, *sorted(ups)), hidden=False, hidden_out=hidden)):
        if _is_candidate(q):
            found.append(q)
        elif q.suffix.lower() in _OTHER_IMAGE_SUFFIXES and os.path.isfile(q) and not _under(q, outputs):
            other[q.suffix.lower()] = other.get(q.suffix.lower(), 0) + 1
    if other:
        _warn_other_formats(p, other)
    hidden = [h for h in hidden if not _under(Path(h[0]), outputs)]
    if hidden:  # (left out by design, as a glob's * leaves them out, but said once per discover(): _HIDDEN)
        log = _HIDDEN.get()
        if log is not None:
            log.extend(hidden)
        else:
            _say_hidden(hidden)
    return found


# the hidden image files the searches of one discover() call left out, said there once
_HIDDEN: contextvars.ContextVar[list[tuple[str, bool]] | None] = contextvars.ContextVar("_HIDDEN", default=None)


def _hidden_what(hidden: Sequence[tuple[str, bool]]) -> str:
    """The image files a folder search left out as hidden (``(path, in_hidden_folder)``, see :func:`_walk`),
    counted by kind, each kind with an example: "2 hidden image-named file(s) (names starting with '.'), e.g.
    d/.a.npy, and 3 image file(s) directly in hidden folders (...), e.g. d/.cache/b.npy" (hidden folders are
    not searched, so images further down in them are not counted)."""
    named = [h for h, inside in hidden if not inside]
    inside = [h for h, inside in hidden if inside]
    parts = []
    if named:
        parts.append(f"{len(named)} hidden image-named file(s) (names starting with '.'), e.g. {named[0]}")
    if inside:
        parts.append(f"{len(inside)} image file(s) directly in hidden folders (names starting with '.', not "
                     f"searched), e.g. {inside[0]}")
    return ", and ".join(parts)


def _say_hidden(hidden: list[tuple[str, bool]]) -> None:
    logger.warning("%s, left out of the folder search; rename them, or name them (or their folder) explicitly, "
                   "to include them", _hidden_what(hidden))


def _warn_other_formats(where: Any, other: dict[str, int]) -> None:
    """One warning for the files of image formats this tool does not read found at ``where`` (a folder or a
    glob pattern), counted by suffix."""
    counts = ", ".join(f"{n} {suf}" for suf, n in sorted(other.items()))
    logger.warning("%s: %d file(s) of image formats this tool does not read are left out (%s); convert them "
                   "to %s", where, sum(other.values()), counts, ", ".join(EXTENSIONS))


def _glob_parts_match(pat: list[str], parts: list[str]) -> bool:
    """glob's rules on path components: ``**`` matches zero or more components, other components
    ``fnmatch`` (case-sensitive); names starting with ``.`` match only a component that starts with ``.``."""
    import fnmatch

    if not pat:
        return not parts
    head = pat[0]
    if head == "**":
        if _glob_parts_match(pat[1:], parts):
            return True
        return bool(parts) and not parts[0].startswith(".") and _glob_parts_match(pat, parts[1:])
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _glob_parts_match(pat[1:], parts[1:])


def _split_pattern(pattern: str) -> tuple[str, list[str]]:
    """``(root, rest)``: the pattern's literal leading folder ("" for the current one) and the components
    after it, the first of which holds a wildcard."""
    comps = pattern.split(os.sep)
    n = 0
    while n < len(comps) - 1 and not _has_magic(comps[n]):
        n += 1
    root = os.sep.join(comps[:n]) or (os.sep if pattern.startswith(os.sep) else "")
    return root, comps[n:]


def _glob(pattern: str) -> list[str]:
    """The paths matching ``pattern``, as ``glob.glob(pattern, recursive=True)`` gives them. A pattern with
    ``**`` is matched against :func:`_walk` of its literal leading folder instead, so it follows symlinked
    folders with the same loop protection as a folder search (``glob`` walks a symlink loop over and over,
    until the OS refuses the path)."""
    if "**" not in pattern:
        return glob.glob(pattern)
    root, rest = _split_pattern(pattern)
    pat = [c for c in rest if c not in ("", os.curdir)]
    if not os.path.isdir(root or os.curdir):
        return []
    hits = [root] if root and _glob_parts_match(pat, []) else []
    # (a hidden name matches only a pattern component that starts with '.': without one, hidden folders are
    # not walked, as they matched nothing; a .venv linked to a virtualenv was walked in full)
    for q in _walk(root or os.curdir, hidden=any(c.startswith(".") for c in pat)):
        rel = os.path.relpath(q, root or os.curdir)
        if _glob_parts_match(pat, rel.split(os.sep)):
            hits.append(q if root else rel)
    return hits


def _glob_matches(pattern: str, outputs: Sequence[str] | Callable[[Path], bool] = ()) -> list[Path]:
    """The image files a glob pattern names: matching files and broken image-named links, and the contents
    of matching folders, searched as if named by themselves (as the shell's expansion of the pattern would
    give them). The folders between the pattern's literal root and a matching folder count as its ancestors
    for the loop protection of :func:`_walk`, so a pattern finds what a search of its root would find."""
    root, _ = _split_pattern(pattern)
    base = root or os.curdir
    found: list[Path] = []
    searched: list[str] = []
    other: dict[str, int] = {}
    for h in sorted(_glob(pattern)):
        if any(h.startswith(d.rstrip(os.sep) + os.sep) for d in searched):
            continue  # inside a folder already searched: nothing new (its other-format files counted once)
        if os.path.isdir(h):
            searched.append(h)
            rel = os.path.relpath(h, base)
            steps = [] if rel == os.curdir else rel.split(os.sep)[:-1]
            chain = [base] + [os.path.join(base, *steps[: i + 1]) for i in range(len(steps))]
            if rel != os.curdir:
                found.extend(_search_dir(Path(h), tuple(i for i in map(_dir_id, chain) if i is not None), outputs))
            else:
                found.extend(_search_dir(Path(h), outputs=outputs))
        elif _is_candidate(Path(h)):
            found.append(Path(h))
        elif (suf := Path(h).suffix.lower()) in _OTHER_IMAGE_SUFFIXES and os.path.isfile(h) and not _under(
                Path(h), outputs):
            # (matched directly, they were left out without the warning a search of their folder gives)
            other[suf] = other.get(suf, 0) + 1
    if other:
        _warn_other_formats(pattern, other)
    return found


def _bracket_hint(s: str) -> str:
    """For a glob pattern ``s`` that matched nothing and holds ``[``: that brackets are glob syntax (a set of
    characters), with the escaped pattern, where a path whose name holds the brackets as written exists (a
    folder named ``br[a]ck``: ``br[a]ck/*.png`` looked for ``brack/*.png``). Nothing where none does: a set
    that simply matched nothing (``d/[xyz].png``) is what the user wrote, and an unclosed ``[`` is already
    literal to glob, so escaping it would change nothing."""
    if "[" not in s:
        return ""
    comps = s.split(os.sep)
    for n in range(len(comps) - 1, 0, -1):
        head = os.sep.join(comps[:n])
        if "[" in head and os.path.lexists(os.path.expanduser(head)):
            fix = os.sep.join([glob.escape(head), *comps[n:]])
            return (f"; '[' starts a set of characters in a glob pattern, but {head} exists as written: to match "
                    f"its name, escape the bracket as '[[]' ({fix!r}, as glob.escape writes it)")
    # (a name with the brackets in a component that also holds a wildcard: scan[1]*.npy for scan[1]_a.npy;
    # the escapes glob.escape writes, [[] [*] [?], are kept as they are)
    fix = re.sub(r"\[[\[*?]\]|\[", lambda m: "[[]" if m.group(0) == "[" else m.group(0), s)
    found = set(_glob(os.path.expanduser(fix))) - set(_glob(os.path.expanduser(s)))
    if found:
        return (f"; '[' starts a set of characters in a glob pattern, but {min(found)} exists as written: to match "
                f"its name, escape the bracket as '[[]' ({fix!r}, as glob.escape writes it)")
    return ""


def _discover_one(item: str | os.PathLike, outputs: Sequence[str] | Callable[[Path], bool] = ()) -> list[Path]:
    s = os.fspath(item)
    if not str(s).strip():  # (Path("") is Path("."): an unset shell variable searched the working folder)
        raise ValueError(f"empty path {s!r}: give a directory, a glob pattern or a file (an unset variable?)")
    # (os.path.expanduser leaves a name it cannot expand as it is: Path.expanduser raised for "~scans", a
    # folder of that literal name, with "Could not determine home directory")
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        found = _search_dir(p, outputs=outputs)
        if not found:
            hidden: list[tuple[str, bool]] = []
            for _q in _walk(os.fspath(p), hidden=False, hidden_out=hidden):
                pass
            note = (f" (only hidden ones, which a search leaves out: {_hidden_what(hidden)}; rename them or name "
                    "them explicitly)" if hidden else "")
            raise ValueError(f"{s}: directory contains no .nii, .nii.gz, .png or .npy files{note}")
        return found
    if p.is_file():
        if image_kind(p) is None:
            raise ValueError(f"{s}: unsupported file type (expected one of {', '.join(EXTENSIONS)})")
        return [p]
    if _is_candidate(p):  # an image-named broken link: an unreadable input, as when a folder or glob finds it
        return [p]
    if _has_magic(s):
        found = _glob_matches(os.path.expanduser(s), outputs)
        if not found:
            raise ValueError(f"{s}: glob pattern matched no .nii, .nii.gz, .png or .npy files{_bracket_hint(s)}")
        return found
    raise ValueError(f"{s}: no such file or directory")


def discover(spec: Spec, *, outputs: Sequence[str | os.PathLike] | Callable[[Path], bool] = ()) -> list[Path]:
    """All image files named by ``spec``, as absolute paths, sorted and without duplicates.

    ``spec`` is a directory (searched recursively, symlinked sub-folders included), a glob pattern (``**``
    allowed; a matching folder is searched recursively), a single file, or a list/tuple of any of these.
    Symlinks keep their own path (not their target's); a broken image-named link, named itself or found in a
    folder or by a pattern, is listed (reading it raises :class:`DataError`). Raises ValueError naming the spec when
    nothing is found. ``outputs``: folders of the caller's own stores (an audit's OUT/work, ...), or a
    predicate telling whether a path is such a store; files of other image formats in them are not named in
    the warning about such files.
    """
    if isinstance(spec, bytes):  # (a bytes path was iterated as its byte values: "not int")
        spec = os.fsdecode(spec)
    items: Iterable = [spec] if isinstance(spec, (str, os.PathLike)) else spec
    items = [os.fsdecode(it) if isinstance(it, bytes) else it for it in items]
    if not items:
        raise ValueError("empty input specification: give a directory, a glob pattern or files")
    own = outputs if callable(outputs) else [os.path.abspath(os.fspath(d)) for d in outputs]
    out: set[Path] = set()
    hidden: list[str] = []
    token = _HIDDEN.set(hidden)
    try:
        for it in items:
            out.update(Path(os.path.abspath(q)) for q in _discover_one(it, own))
    finally:
        _HIDDEN.reset(token)
    if hidden:
        _say_hidden(hidden)
    if not out:
        raise ValueError(f"{spec!r}: no image files found")
    return sorted(out, key=lambda q: str(q))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Adam7 passes: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_COLOUR_CHANNELS = {2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (RGB, grey+alpha, RGBA)


def _png_header(head: bytes) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG's IHDR chunk (``head``: the file's first bytes, 26 suffice), or
    None when the file does not start with the PNG signature and an IHDR chunk (left to Pillow, which names
    the problem)."""
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _png_unfilter(rows: np.ndarray, h: int, w: int, bpp: int) -> np.ndarray:
    """Undo the PNG row filters of one (sub-)image: ``rows`` is ``h`` scanlines of ``1 + w * bpp`` bytes (the
    filter type, then the filtered bytes); returns the ``(h, w, bpp)`` uint8 samples. Each byte depends on
    the byte one pixel to its left, the one above and the one above-left, so the anti-diagonals of the pixel
    grid are reconstructed in turn, each at once for all five filter types."""
    ftype = rows[:, 0]
    if (ftype > 4).any():
        raise ValueError(f"unknown PNG filter type {int(ftype.max())}")
    filt = rows[:, 1:].reshape(h, w, bpp).astype(np.int16)
    out = np.zeros((h + 1, w + 1, bpp), np.int16)  # a row of zeros above, a column of zeros to the left
    for d in range(h + w - 1):
        y = np.arange(max(0, d - w + 1), min(h - 1, d) + 1)
        x = d - y
        a, b, c = out[y + 1, x], out[y, x + 1], out[y, x]
        t = ftype[y][:, None]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select([t == 0, t == 1, t == 2, t == 3], [np.zeros_like(a), a, b, (a + b) >> 1], paeth)
        out[y + 1, x + 1] = (filt[y, x] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The chunks of a PNG file (``data`` starts with the signature) as ``(type, body)``, up to IEND, with
    the CRC of every chunk checked, the image data's (IDAT) and the ancillary ones' included: a damaged file
    is refused whole, whichever decoder reads its pixels (Pillow does not check IDAT CRCs). Raises
    ValueError describing the damage."""
    pos, chunks = 8, []
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("file truncated inside a chunk header")
        n, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        if pos + 12 + n > len(data):
            raise ValueError(f"file truncated inside the {ctype.decode('latin-1')!r} chunk")
        body = data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        if zlib.crc32(ctype + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC error in the {ctype.decode('latin-1')!r} chunk")
        chunks.append((ctype, body))
        if ctype == b"IEND":
            break
        pos += 12 + n
    return chunks


def _read_png16_colour(chunks: Sequence[tuple[bytes, bytes]]) -> np.ndarray:
    """The samples of a 16-bit colour PNG (colour type 2, 4 or 6) as an ``(h, w, channels)`` uint16 array,
    from its chunks (:func:`_png_chunks`, CRCs checked).

    Pillow decodes these to 8 bits per channel, so they are decoded here: the IDAT stream inflated (no
    further than the image needs), row filters undone, Adam7 interlacing handled. Raises ValueError
    describing a damaged file."""
    ihdr = next((body for ctype, body in chunks if ctype == b"IHDR"), b"")
    idat = [body for ctype, body in chunks if ctype == b"IDAT"]
    if len(ihdr) != 13:
        raise ValueError("bad IHDR chunk")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr)
    if depth != 16 or colour not in _PNG_COLOUR_CHANNELS or compression or filtering or interlace > 1:
        raise ValueError(f"unsupported IHDR (bit depth {depth}, colour type {colour}, methods "
                         f"{compression}/{filtering}/{interlace})")
    if w == 0 or h == 0:
        raise ValueError(f"empty image ({w} x {h})")
    ch = _PNG_COLOUR_CHANNELS[colour]
    bpp = 2 * ch
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    sizes = [(-(-(h - y0) // dy), -(-(w - x0) // dx)) for x0, y0, dx, dy in passes]
    need = sum(ph * (1 + pw * bpp) for ph, pw in sizes if ph and pw)
    raw = zlib.decompressobj().decompress(b"".join(idat), need)
    if len(raw) < need:
        raise ValueError(f"image data truncated ({len(raw)} of {need} bytes)")
    buf = np.frombuffer(raw, np.uint8)
    out = np.empty((h, w, ch), np.uint16)
    off = 0
    for (x0, y0, dx, dy), (ph, pw) in zip(passes, sizes, strict=True):
        if not (ph and pw):
            continue  # an empty pass has no scanlines at all
        size = ph * (1 + pw * bpp)
        u8 = _png_unfilter(buf[off : off + size].reshape(ph, 1 + pw * bpp), ph, pw, bpp)
        off += size
        out[y0::dy, x0::dx] = (u8[..., 0::2].astype(np.uint16) << 8) | u8[..., 1::2]
    return out


def _bomb_error(p: Path, exc: Exception) -> DataError:
    """Pillow refuses images past ``PIL.Image.MAX_IMAGE_PIXELS`` (its decompression-bomb guard)."""
    from PIL import Image

    return DataError(f"{p}: the image is larger than Pillow's decompression-bomb limit ({exc}); if the file is "
                     f"trusted, raise PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}) before reading it")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """The BT.601 luminance, ``0.299 R + 0.587 G + 0.114 B`` in float32, of the ``(h, w, 3+)`` float32 samples
    ``rgb`` (a fourth channel, alpha, ignored); a grey pixel (R == G == B) gives its value exactly. The
    weights do not sum to exactly 1 in float32: a grey image saved as RGB read up to 1.5e-5 off the same
    image saved as grey (mode L)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.where((r == g) & (g == b), r, 0.299 * r + 0.587 * g + 0.114 * b)


def _read_png(p: Path, dtype: Any = np.float32) -> np.ndarray:
    """The image of a PNG file as float32 (or ``dtype``: grayscale samples converted to it directly; the
    luminance of colour is computed in float32 either way)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = p.read_bytes()
        if not data:  # (Pillow said "not a PNG, nor another image format Pillow identifies")
            raise DataError(f"{p}: not a readable PNG file (the file is empty)")
        chunks: list[tuple[bytes, bytes]] = []
        if data.startswith(_PNG_SIGNATURE):  # anything else is left to Pillow, which names the problem
            try:
                chunks = _png_chunks(data)
            except ValueError as exc:
                raise DataError(f"{p}: not a readable PNG file ({type(exc).__name__}: {exc})") from exc
        header = _png_header(data)
        if header is not None and header[0] == 16 and header[1] in _PNG_COLOUR_CHANNELS:
            try:
                px = _read_png16_colour(chunks)
            except (ValueError, zlib.error) as exc:
                raise DataError(f"{p}: not a readable PNG file ({type(exc).__name__}: {exc})") from exc
            if header[1] == 4:  # grey + alpha
                return np.ascontiguousarray(px[..., 0], dtype=np.float32)
            return np.ascontiguousarray(_luminance(px.astype(np.float32)))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format != "PNG":  # (a JPEG saved as x.png, a TIFF: decoded by content, which was unsaid)
                _warn_few("not-png", f"{p}: named .png but is a {im.format} file; read as {im.format}"
                                     + (" (lossy compression: its pixels are not the original's)"
                                        if im.format in ("JPEG", "WEBP") else ""))
            mode = im.mode
            if mode == "P":
                # an index past the palette's end has no colour (Pillow would give it black): damaged file
                plte = next((body for ctype, body in chunks if ctype == b"PLTE"), None)
                top = int(np.asarray(im).max())
                if plte is not None and top >= len(plte) // 3:
                    raise DataError(f"{p}: not a readable PNG file (a pixel has palette index {top}, but the "
                                    f"palette has {len(plte) // 3} entries)")
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            if mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im).astype(dtype)
            elif mode in ("LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
                if mode == "LA":
                    return np.asarray(im, dtype=np.float32)[..., 0].copy()
                arr = _luminance(np.asarray(im.convert("RGB") if mode not in ("RGB", "RGBA") else im,
                                            dtype=np.float32))
            else:
                raise DataError(f"{p}: unsupported PNG mode {mode!r}")
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(p, exc) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names the buffer it was given, '<_io.BytesIO object at 0x7f...>': a skip reason that
        # changed from run to run, so a rerun's (a resume's) summary.json and report.html differed
        raise DataError(f"{p}: not a readable PNG file (UnidentifiedImageError: not a PNG, nor another image "
                        "format Pillow identifies)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{p}: not a readable PNG file ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(arr, dtype=dtype)


# .npy files up to this size are read whole; larger ones (4D series, big volumes) memory-mapped, so a frame
# reads only its own part. (Mapping costs ~0.1 ms a file: at 10^5 small files it was a tenth of decoding.)
_NPY_MMAP_BYTES = 1 << 24


_NPY_MAGIC = b"\x93NUMPY"


def npy_error(p: Path, exc: BaseException) -> DataError:
    """The DataError for a ``.npy`` file that ``np.load(allow_pickle=False)`` refused with ``exc``.

    numpy takes any file without the NumPy header for a pickle and says "This file contains pickled (object)
    data. If you trust the file you can load it unsafely ...": advice that does not fit a corrupt, empty or
    mislabelled file. A file without the header is named as such; otherwise numpy's reason is kept."""
    try:
        with open(p, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError:
        head = None
    if head is not None and head != _NPY_MAGIC:
        what = "the file is empty" if not head else f"it does not start with {_NPY_MAGIC!r}"
        return DataError(f"{p}: not a readable .npy file (no NumPy header: {what})")
    return DataError(f"{p}: not a readable .npy file ({type(exc).__name__}: {exc})")


def _open_npy(p: Path) -> np.ndarray:
    """The array of a ``.npy`` file, its leading axes of length 1 dropped while it has more than two:
    samples saved from torch are channel-first, (1, H, W) or (1, 1, H, W) for an image, (1, D, H, W) for a
    volume (cut along its last axis, (1, H, W) would give W one-pixel-high "slices")."""
    try:
        mmap = "r" if p.stat().st_size > _NPY_MMAP_BYTES else None
        a = np.load(p, allow_pickle=False, mmap_mode=mmap)
    except (ValueError, OSError, EOFError) as exc:
        raise npy_error(p, exc) from exc
    _require_array(p, a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


def _require_array(p: Path, a: Any) -> None:
    """DataError unless ``np.load`` gave an array: it opens a zip (an ``.npz`` archive) whatever the file's
    name, and ``.npy`` readers then failed with "'NpzFile' object has no attribute 'ndim'"."""
    if not isinstance(a, np.ndarray):
        names = list(getattr(a, "files", []))
        if hasattr(a, "close"):
            a.close()
        raise DataError(f"{p}: a .npz archive ({len(names)} arrays: {', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}), not a .npy array; save one image per file "
                        "with numpy.save")


def _npy_image(p: Path, a: np.ndarray, frame: int | None, dtype: Any = np.float32) -> np.ndarray:
    """The image (or ``frame`` of the 4D array) ``a``, loaded from ``p``, as float32 (or ``dtype``): checked
    as :func:`read_image` checks every file."""
    # (numpy counts timedelta64 as an integer type: durations are not pixel values)
    numeric = (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.timedelta64)) or a.dtype == np.bool_
    if not numeric or np.issubdtype(a.dtype, np.complexfloating):
        raise DataError(f"{p}: unsupported dtype {a.dtype}; expected a real numeric array")
    if a.ndim == 4 and a.shape[3] == 1 and frame in (None, 0):
        a = a[..., 0]  # one frame: the volume itself, as load_nifti reads a one-frame series
        frame = None
    if a.ndim == 4:
        _check_npy_batch_of_volumes(p, a.shape)
        if frame is None:
            raise DataError(f"{p}: 4D array of shape {a.shape}; choose a frame (frame=0..{a.shape[3] - 1})")
        if not -a.shape[3] <= frame < a.shape[3]:
            raise DataError(f"{p}: frame {frame} out of range for 4D shape {a.shape}")
        a = a[..., frame]
    elif frame is not None:
        raise DataError(f"{p}: frame={frame} given but the array is {a.ndim}D, shape {a.shape}")
    if a.ndim not in (2, 3):
        raise DataError(f"{p}: expected a 2D image or 3D volume, got shape {a.shape}")
    if a.dtype.kind in "iu" and a.dtype.itemsize == 8:
        a = _exact_float64(p, a)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.array(a, dtype=dtype)
    if arr.size and not np.isfinite(arr).all() and np.isfinite(a).all():
        # finite float64 values past float32's range became Inf: not "NaN or Inf values" in the file
        raise DataError(f"{p}: values up to {float(np.abs(a).max()):.4g} exceed the range of "
                        f"{np.dtype(dtype).name} ({float(np.finfo(dtype).max):.4g}); rescale the data")
    return _checked(p, arr)


def _checked(p: Path, arr: np.ndarray) -> np.ndarray:
    if arr.size == 0:
        raise DataError(f"{p}: empty image, shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{p}: contains NaN or Inf values")
    return arr


_PNG_DTYPES = {"1": np.bool_, "L": np.uint8, "LA": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8,
               "RGBX": np.uint8, "CMYK": np.uint8, "YCbCr": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
               "I;16L": np.uint16, "I": np.int32}


def stored_dtype(path: str | os.PathLike) -> np.dtype | None:
    """The integer (or bool) dtype a file stores its pixels in, None for floating-point data.

    What scikit-image's dtype-range convention needs after :func:`read_image` has decoded to float32: PNG by
    its bit depth and mode (8-bit modes, colour ones too, uint8; 16-bit grey and 16-bit colour uint16; "I"
    int32; "1" bool; "F" None), .npy by its header. NIfTI gives None: its values are the scaled floats
    nibabel returns (``scl_slope``/``inter``), whatever the on-disk type.
    """
    p = Path(path)
    kind = image_kind(p)
    if kind == "png":
        from PIL import Image

        with open(p, "rb") as f:
            header = _png_header(f.read(26))
        if header is not None and header[0] == 16 and header[1] in _PNG_COLOUR_CHANNELS:
            return np.dtype(np.uint16)  # Pillow's mode ("RGB", "RGBA") would say 8 bits
        try:
            with Image.open(p) as im:
                dt = _PNG_DTYPES.get(im.mode)
        except Image.DecompressionBombError as exc:
            raise _bomb_error(p, exc) from exc
        return None if dt is None else np.dtype(dt)
    if kind == "npy":
        try:
            a = np.load(p, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise npy_error(p, exc) from exc
        _require_array(p, a)
        dt = a.dtype
        integer = np.issubdtype(dt, np.integer) and not np.issubdtype(dt, np.timedelta64)
        return dt if (integer or dt == np.bool_) else None
    return None


#: What a file that is not a regular one is, by its stat mode (named in the readers' refusal).
_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_exists(p: Path) -> None:
    """DataError unless ``p`` exists and is a regular file (or a folder, which the readers name); a broken
    symlink says so, with the target it names. A FIFO (opened, it blocks until a writer comes), a device (a
    link to /dev/zero reads forever) or a socket is refused without being opened."""
    if p.exists():
        try:
            mode = p.stat().st_mode
        except OSError:  # (left to the readers, which name the problem)
            return
        what = next((name for test, name in _SPECIAL_FILES if test(mode)), None)
        if what is not None:
            link = f" (a symbolic link to {os.readlink(p)})" if p.is_symlink() else ""
            raise DataError(f"{p}: not a regular file: {what}{link}{NOT_USED}")
        return
    if p.is_symlink():
        try:
            target = os.readlink(p)
        except OSError:  # pragma: no cover - a link that vanished between the two calls
            target = "?"
        raise DataError(f"{p}: broken symbolic link (its target {target} does not exist)")
    raise DataError(f"{p}: no such file")


def read_image(path: str | os.PathLike, *, frame: int | None = None, dtype: Any = np.float32) -> np.ndarray:
    """Decode one file as a float32 2D image or 3D volume (see the module docstring for each format).

    ``dtype=np.float64`` decodes in float64 instead: float64 ``.npy`` and NIfTI data (and scaled NIfTI
    integers) keep every bit, where float32 would round values with a large offset to a few ulps of their
    own range (what ``deepssim-fast ssim`` uses, so that its score is that of the stored values). PNG
    samples are integers, exact either way (colour's luminance stays computed in float32). A 64-bit integer
    ``.npy`` or NIfTI with values past +-2^53 comes back less its minimum (see the module docstring).

    Raises :class:`DataError` naming the path and the problem (missing, unsupported type, corrupt,
    wrong rank, NaN/Inf values).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"read_image: dtype must be float32 or float64, got {dtype}")
    p = Path(path)
    kind = image_kind(p)
    _require_exists(p)
    if kind is None:
        raise DataError(f"{p}: unsupported file type (expected one of {', '.join(EXTENSIONS)})")
    if kind == "nifti":
        try:
            return load_nifti(p, frame=frame, dtype=dtype)
        except DataError as exc:
            # (a negative dimension failed the read with "negative count" and the like: the header is named)
            try:
                _check_nifti_dims(p, nib_load(p).shape)
            except DataError as dims:
                raise dims from exc
            except Exception:  # noqa: BLE001 - nibabel cannot load it: the read's own reason stands
                pass
            raise
    if kind == "png":
        if frame is not None:
            raise DataError(f"{p}: frame={frame} given but a PNG is a 2D image")
        return _checked(p, _read_png(p, dtype).astype(dtype, copy=False))
    return _npy_image(p, _open_npy(p), frame, dtype)


def _check_nifti_dims(p: Path, shape: Sequence[int]) -> None:
    """DataError for a header with a negative dimension (a corrupt file): reads of it failed with "memory
    mapped length must be positive", or it was said to have a slice range that selects none of its -8 slices.
    (A zero-length axis is an empty image, named as such by the readers.)"""
    if any(int(n) < 0 for n in shape):
        raise DataError(f"{p}: invalid dimensions in the header: shape {tuple(int(n) for n in shape)}")


def _nifti_shape(p: Path) -> tuple[int, ...]:
    """The shape of a NIfTI file from its header (:func:`nib_load`'s), checked by :func:`_check_nifti_dims`;
    DataError naming the file when nibabel cannot load it."""
    try:
        shape = tuple(int(n) for n in nib_load(p).shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    _check_nifti_dims(p, shape)
    return shape


def _check_nii_length(p: Path, img: Any) -> None:
    """DataError unless the uncompressed NIfTI file ``p`` (loaded as ``img``) is as long as its header says:
    data offset + shape x item size (nibabel's reads of a short file say "Expected N bytes, got M")."""
    shape = tuple(img.shape)
    try:
        dtype = img.header.get_data_dtype()
        # (where the proxy reads from: a header written with vox_offset 0, as nibabel writes them, has its data
        # at 352 in a single .nii, and a check from the header's 0 let files 352 bytes short through)
        need = int(img.dataobj.offset) + int(np.prod(shape)) * dtype.itemsize
    except Exception as exc:  # noqa: BLE001 - a header nibabel loaded but cannot describe
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    have = os.path.getsize(p)
    if have < need:
        raise DataError(
            f"{p}: truncated NIfTI file: {have} bytes, but its header ({shape} {dtype} values) needs {need}"
        )


def _proxy_slices(p: Path, policy: SlicePolicy) -> Iterator[Slice] | None:
    """Slices along axis 2 (the slowest of its storage order) of an uncompressed 3D NIfTI read one at a time
    through nibabel's array proxy; None for other files and other axes (once the length check below passed).

    The whole volume is checked, whatever slices the policy selects, as a ``.nii.gz`` is by decompressing
    it: the file must be as long as its header says (data offset + shape x item size), and every slice is
    read once (one at a time) for NaN/Inf values and the volume maximum, before the first slice is given.
    So a truncated or NaN-holding file raises :class:`DataError` instead of contributing the slices that
    happen to avoid its bad part."""
    if not p.name.lower().endswith(".nii"):
        return None
    try:
        img = nib_load(p, mmap=True)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt files
        raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = img.shape
    _check_nifti_dims(p, shape)
    if len(shape) != 3:
        return None
    _check_real_dtype(p, img)
    if 0 in shape:
        raise DataError(f"{p}: empty image, shape {shape}")
    _check_nii_length(p, img)
    if policy.axis != 2:
        # Across the file's (Fortran) storage order a slice through the proxy is thousands of small reads: a
        # 256 x 256 x 176 int16 volume cut along axis 0 took 36.6 s. The caller reads the memory-mapped
        # volume whole instead (~0.01 s; the same values, as load_nifti reads it as the proxy reads a slice).
        return None
    proxy = img.dataobj
    idx = list(range(shape[policy.axis]))[policy.start : policy.stop : policy.step]

    def read(i: int, dt: Any) -> np.ndarray:
        sl: list = [slice(None)] * 3
        sl[policy.axis] = i
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # (non-finite values are named below)
                return np.asarray(proxy[tuple(sl)], dtype=dt)
        except Exception as exc:  # noqa: BLE001 - truncated data and the like
            raise DataError(f"{p}: could not read slice {i} ({type(exc).__name__}: {exc})") from exc

    def not_finite(i: int) -> DataError:
        # Slice i holds NaN/Inf in float32: in the file, or finite scaled values past float32's range (a
        # slope of 1e37), which were called NaN or Inf here while the same .nii.gz said what they are. Said
        # as load_nifti says it, with the volume's largest value.
        top = 0.0
        for j in [i, *range(shape[policy.axis])]:
            w = read(j, np.float64)
            if not np.isfinite(w).all():
                return DataError(f"{p}: contains NaN or Inf values (slice {j} along axis {policy.axis})")
            top = max(top, float(np.abs(w).max()))
        return DataError(f"{p}: values up to {top:.4g} exceed the range of float32 "
                         f"({float(np.finfo(np.float32).max):.4g}); rescale the data")

    def take(i: int) -> np.ndarray:
        s = read(i, np.float32)
        if not np.isfinite(s).all():
            raise not_finite(i)
        return s

    # First pass over every slice, one at a time: the whole file is readable and finite, and its range
    # (the foreground level is relative to it).
    lo, hi = np.inf, -np.inf
    for i in range(shape[policy.axis]):
        s = take(i)
        if s.size:
            lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
    level = policy.foreground(lo, hi)

    def gen() -> Iterator[Slice]:
        for i in idx:
            s = take(i)
            if not policy.keeps(s, level):
                continue
            yield Slice(np.ascontiguousarray(s), str(p), policy.axis, int(i))

    return gen()


#: The smallest side of a slice cut from a volume: the SSIM window (scikit-image's 7). A narrower "slice" is a
#: volume that is not one: a batch of images saved as one array.
MIN_SLICE_SIDE = 7


#: A .npy whose slices along the policy's axis are strips this many times longer than high, with the short
#: side along axis 0, is taken for a batch of images saved as one (N, H, W) array (see _check_slice_sides).
NPY_STRIP_RATIO = 4


def _check_slice_sides(p: Path, shape: Sequence[int], policy: SlicePolicy, *, npy: bool = False) -> None:
    """DataError when the volume of ``shape`` (a 4D file: its frames' shape) cut along ``policy.axis`` gives
    slices narrower than :data:`MIN_SLICE_SIDE`. Generated samples saved as one (N, H, W) array were cut along
    axis 2 into N-pixel-high slices, padded to the item size and audited: exact copies scored 0.2, silently.
    For a ``.npy`` (``npy``), also when the slices are strips whose short side, along axis 0, is at most
    1/:data:`NPY_STRIP_RATIO` of their long side: 12 slices of 96 x 96 saved as one (12, 96, 96) array
    passed the window check and were audited as 96 strips of 12 x 96; exact copies of them scored 0.05-0.1
    ("different"), and the audit reported 0 % memorised. And when an (H, W, 3) or (H, W, 4) ``.npy`` is cut
    along axis 2: an RGB(A) image saved with ``np.save`` was audited as one grey item per colour channel."""
    if len(shape) < 3:
        return
    side = [int(n) for i, n in enumerate(shape[:3]) if i != policy.axis]
    shape_t = tuple(int(n) for n in shape)
    dims = [int(n) for n in shape[:3]]
    # an axis of length 1 (one coronal slice, (X, 1, Z)) whose cut gives wide enough slices: the one to give
    # (such a file cut along axis 2 was told to give --axis 0, which was refused the same way)
    unit = [k for k in range(3) if k != policy.axis and dims[k] == 1
            and min(n for i, n in enumerate(dims) if i != k) >= MIN_SLICE_SIDE]
    if unit:
        hint = f" (or give --axis {unit[0]}: its axis {unit[0]} has length 1)"
    elif len(shape) == 3 and policy.axis != 0:
        hint = " (or, when every input is an (N, H, W) batch, give --axis 0)"
    else:
        hint = ""
    if min(side) < MIN_SLICE_SIDE:
        raise DataError(
            f"{p}: a volume of shape {shape_t} cut along axis {policy.axis} gives slices of {side[0]} x "
            f"{side[1]} pixels, narrower than the {MIN_SLICE_SIDE}-pixel SSIM window; a batch of images saved as "
            "one array, (N, H, W) or (N, 1, H, W), is read as a volume: save one image per file" + hint)
    vol = shape_t[:3] if len(shape_t) == 3 or (len(shape_t) == 4 and shape_t[3] == 1) else None
    if npy and vol is not None and policy.axis == 2 and vol[2] in (3, 4):
        # (an RGB image saved with np.save was audited as 3 grey items, one per colour channel; (H, W, 3, 1), a
        # one-frame series of it, too)
        c = vol[2]
        raise DataError(
            f"{p}: an array of shape {shape_t} cut along axis 2 gives {c} slices: the colour channels of an "
            f"{'RGB' if c == 3 else 'RGBA'} image, or a volume of {c} slices? Save a colour image as PNG (read as "
            f"its luminance) or as one grey (H, W) array, and a volume of {c} slices as one (H, W) file per slice "
            f"(or as ({c}, H, W) with --axis 0, which cuts every input along its first axis)")
    if npy and policy.axis != 0 and side[0] * NPY_STRIP_RATIO <= side[1] and int(shape[0]) < min(
            int(n) for n in shape[1:3]):
        raise DataError(
            f"{p}: an array of shape {shape_t} cut along axis {policy.axis} gives strips of {side[0]} x {side[1]} "
            f"pixels: a batch of {shape_t[0]} images of {shape_t[1]} x {shape_t[2]} saved as one (N, H, W) array, "
            f"or a volume of {shape_t[0]} thick slices along axis 0? Give --axis 0 to cut it along its first axis "
            "(the images of a batch, the slices of such a volume), or save one image per file")


def skip_reason(path: str, reason: str) -> str:
    """A skip reason without its leading ``path: `` or ``path#axis:index: `` (the readers' errors name the file
    or the slice; where the path is shown beside the reason it was said twice). A slice's own place is kept:
    ``#2:0: constant image ...`` becomes ``slice 2:0: constant image ...``."""
    if reason.startswith(f"{path}: "):
        return reason[len(path) + 2:]
    m = re.match(re.escape(path) + r"((?:@t\d+)?)#(\d+):(\d+): ", reason)
    if m is not None:
        frame = f"frame {m.group(1)[2:]}, " if m.group(1) else ""
        return f"{frame}slice {m.group(2)}:{m.group(3)}: {reason[m.end():]}"
    return reason


def fit_float32(a: np.ndarray, *, name: object = "image") -> np.ndarray:
    """``a`` as float32. A float64 or 32/64-bit integer image that float32 cannot hold to
    ``FLOAT32_ROUNDING_TOL`` of its own range (values beyond float32's range, a large offset against a small
    spread, values too small for float32's normal range) is first mapped to [0, 1] in float64: every size
    policy (crop/pad with the minimum, resampling, the foreground threshold, which is relative to the range)
    commutes with that positive affine map, and every consumer of the pixels is blind to it (the encoder's
    per-image z-score, the deepssim preset of SSIM, Pearson correlation) — the structure is kept instead of
    being rounded away (or overflowing to Inf). 64-bit integers past 2^53 have their minimum taken off in
    integer arithmetic first (:func:`_exact_float64`); a spread past 2^53 raises :class:`DataError` naming
    ``name``."""
    from ._ssim_common import FLOAT32_ROUNDING_TOL

    if a.dtype == np.float32 or a.dtype.itemsize < 4 or a.dtype.kind not in "fiu":
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iu" and a.dtype.itemsize == 8:
        d = _exact_float64(name, a)
    else:
        d = a.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        f = d.astype(np.float32)
    lo, hi = float(d.min()), float(d.max())
    err = float(np.abs(f.astype(np.float64) - d).max())
    if err <= FLOAT32_ROUNDING_TOL * (hi - lo):
        return f
    if hi == lo:  # a constant image (which float32 cannot hold): its z-score is zeros whatever the value
        return np.zeros(d.shape, np.float32)
    return ((d - lo) / (hi - lo)).astype(np.float32)


def _wide_dtype(dt: Any) -> bool:
    """float64 and 32/64-bit integers: the stored dtypes whose values float32 may not hold."""
    dt = np.dtype(dt)
    return (dt.kind == "f" and dt.itemsize > 4) or (dt.kind in "iu" and dt.itemsize >= 4)


def _nifti_wide(p: Path) -> bool:
    """Whether a NIfTI file's values may need more than float32 (read in float64 then, see
    :func:`fit_float32`): a wide data type, or an intercept (scl_inter: an offset such as 1e7 against a small
    spread; a slope alone keeps 16-bit data to float32's precision).

    The intercept is the image's (its array proxy's ``inter``): nibabel moves scl_slope and scl_inter from the
    header into the proxy when it loads a file and resets them in the header, whose ``get_slope_inter()`` said
    (None, None) for every file. An int16 scan of slope 3e-5 and intercept 1e7 was read in float32, one value
    per slice, and its exact copy scored SSIM 0.01 ("different")."""
    try:
        img = nib_load(p)
        inter = getattr(img.dataobj, "inter", None)  # (0.0 for an unscaled file; None for an in-memory array)
        if inter is not None:
            inter = float(np.asarray(inter))
        return _wide_dtype(img.header.get_data_dtype()) or (
            inter is not None and bool(np.isfinite(inter)) and inter != 0)
    except Exception:  # noqa: BLE001 - the readers name what is wrong with the file
        return False


def _wide_volumes(p: Path, a: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """The volumes of a NIfTI file (``a`` None) or of the array ``a`` of a .npy file whose values may need
    float64 (:func:`_nifti_wide`, :func:`_wide_dtype`): each frame read in float64 and fitted to float32
    (:func:`fit_float32`), named as :func:`_file_volumes` names them. Float32 reading had kept ~1 ulp of 1e7
    for a file of 1e7 + a spread of 1: its structure was gone, and its exact copy, offset removed, scored
    "different"."""
    if a is None:
        img = nib_load(p)
        shape = img.shape
        if p.name.lower().endswith(".nii") and 0 not in shape:  # (named as the slice-by-slice reader names it)
            _check_nii_length(p, img)
        if len(shape) == 4 and shape[3] > 1:
            return [(f"{p}@t{t}", fit_float32(v)) for t, v in enumerate(iter_nifti_frames(p, dtype=np.float64))]
        return [(str(p), fit_float32(load_nifti(p, dtype=np.float64)))]
    if a.ndim == 4 and a.shape[3] > 1:
        return [(f"{p}@t{t}", fit_float32(_npy_image(p, a, t, np.float64))) for t in range(a.shape[3])]
    return [(str(p), fit_float32(_npy_image(p, a, None, np.float64)))]


def _file_slices(p: Path, policy: SlicePolicy) -> list[Slice]:
    """All slices of one file (read fully before returning, so a corrupt file fails before any slice)."""
    from .data import volume_slices

    _require_exists(p)
    kind = image_kind(p)
    if kind == "nifti":
        _check_slice_sides(p, _nifti_shape(p), policy)
        if _nifti_wide(p):
            return [s for src, vol in _wide_volumes(p) for s in volume_slices(vol, policy, source=src)]
        lazy = _proxy_slices(p, policy)
        if lazy is not None:
            return list(lazy)
        try:
            shape = nib_load(p).shape
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{p}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
        if len(shape) == 4 and shape[3] > 1:  # (each frame read once, in order: see iter_nifti_frames)
            out: list[Slice] = []
            for t, vol in enumerate(iter_nifti_frames(p)):
                out.extend(volume_slices(vol, policy, source=f"{p}@t{t}"))
            return out
        return volume_slices(load_nifti(p), policy, source=str(p))
    if kind == "npy":  # (opened once: each np.load parses the header again)
        a = _open_npy(p)
        _check_slice_sides(p, a.shape, policy, npy=True)
        if _wide_dtype(a.dtype):
            return [s for src, vol in _wide_volumes(p, a) for s in volume_slices(vol, policy, source=src)]
        if a.ndim == 4 and a.shape[3] > 1:  # (one frame: the volume, as for NIfTI)
            out = []
            for t in range(a.shape[3]):
                out.extend(volume_slices(_npy_image(p, a, t), policy, source=f"{p}@t{t}"))
            return out
        return volume_slices(_npy_image(p, a, None), policy, source=str(p))
    return volume_slices(read_image(p), policy, source=str(p))


def _file_volumes(p: Path) -> list[tuple[str, np.ndarray]]:
    """The volumes of one file as ``(source, array)``: a 4D file gives one volume per frame, with
    ``source = "<path>@t<t>"`` as :func:`iter_slices` names the slices of its frames; any other file gives
    itself, ``source = "<path>"`` (the rank is left to the caller to check)."""
    _require_exists(p)
    kind = image_kind(p)
    if kind == "nifti":
        shape = _nifti_shape(p)
        if _nifti_wide(p):
            return _wide_volumes(p)
        if len(shape) == 4 and shape[3] > 1:
            return [(f"{p}@t{t}", vol) for t, vol in enumerate(iter_nifti_frames(p))]
    elif kind == "npy":
        a = _open_npy(p)
        if _wide_dtype(a.dtype):
            return _wide_volumes(p, a)
        if a.ndim == 4 and a.shape[3] > 1:
            return [(f"{p}@t{t}", _npy_image(p, a, t)) for t in range(a.shape[3])]
        return [(str(p), _npy_image(p, a, None))]
    return [(str(p), read_image(p))]


def _check_npy_batch_of_volumes(p: Path, shape: Sequence[int]) -> None:
    """DataError when a 4D ``.npy`` of more than one frame looks like a batch of volumes, (N, D, H, W), rather
    than a series of frames along its last axis, (X, Y, Z, T), as NIfTI stores one: its first axis is the
    shortest of the three spatial ones and shorter than the last. 21 volumes of 32^3 saved as one array were
    read as 32 frames of 21 x 32 x 32, and their exact copies of training volumes all came out "different",
    without a word (a batch of fewer than 7 was refused, as its frames were thinner than the SSIM window).
    A real series whose first axis is its thinnest is refused too, with the way to read it."""
    n = [int(v) for v in shape]
    if n[3] > 1 and n[0] < min(n[1], n[2]) and n[0] < n[3]:
        raise DataError(
            f"{p}: a 4D array of shape {tuple(n)}: a batch of {n[0]} volumes of {n[1]} x {n[2]} x {n[3]} saved as "
            f"one (N, D, H, W) array, or a series of {n[3]} frames of {n[0]} x {n[1]} x {n[2]}? A 4D .npy is read as "
            "a series of frames along its last axis, as NIfTI stores one, so a batch would be read wrongly: save "
            "one volume per file. A series whose first axis is its thinnest is taken for a batch: save it as "
            "NIfTI, or with that axis moved (np.moveaxis(a, 0, 2))")


def no_slice_reason(p: Path, policy: SlicePolicy) -> str:
    """Why a file gave no slice in slices mode: its slice range (``policy.start/stop/step``) selects none of
    the slices along ``policy.axis``, or no selected slice passes the foreground threshold."""
    try:
        kind = image_kind(p)
        if kind == "nifti":
            shape = tuple(nib_load(p).shape)
        elif kind == "npy":
            shape = tuple(_open_npy(p).shape)  # (leading axes of length 1 dropped, as the slices were cut)
        else:
            shape = ()
    except Exception:  # noqa: BLE001 - the file was read a moment ago; the plain reason then
        shape = ()
    if len(shape) >= 3:
        n = int(shape[policy.axis])
        if not range(n)[policy.start : policy.stop : policy.step]:
            return (f"{p}: the slice range {policy.start}:{policy.stop}:{policy.step} selects none of its {n} "
                    f"slices along axis {policy.axis}")
    return (f"{p}: no slice passes the foreground threshold (min_foreground {policy.min_foreground}, "
            f"foreground_level {policy.foreground_level} of the volume's intensity range above its minimum)")


def iter_slices(
    paths: Iterable[str | os.PathLike],
    policy: SlicePolicy | None = None,
    *,
    strict: bool = False,
    skipped: list | None = None,
) -> Iterator[Slice]:
    """Yield the 2D slices of every file in ``paths``, in order, cut by ``policy`` (default SlicePolicy()).

    A file that cannot be read is appended to ``skipped`` as ``(path, reason)`` and logged as a warning,
    or, with ``strict=True``, raises :class:`DataError` naming the path. A readable file that gives no slice
    (its slice range selects none, or none passes the foreground threshold) is appended and logged the same
    way, also with ``strict=True``. A file is read completely
    before its first slice is yielded, so a corrupt file never contributes part of its slices.
    """
    policy = policy or SlicePolicy()
    for path in paths:
        p = Path(path)
        try:
            slices = _file_slices(p, policy)
        except DataError as exc:
            if strict:
                raise
            logger.warning("skipping %s: %s", p, one_line(skip_reason(str(p), str(exc))))
            if skipped is not None:
                skipped.append((str(p), str(exc)))
            continue
        if not slices:  # (readable, but nothing to give: said as the audit says it, never dropped silently)
            reason = no_slice_reason(p, policy)
            logger.warning("skipping %s: %s", p, one_line(skip_reason(str(p), reason)))
            if skipped is not None:
                skipped.append((str(p), reason))
        yield from slices
