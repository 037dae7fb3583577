"""Array plumbing shared by the engines: numpy / torch / cupy in, the caller's kind out.

cupy arrays cross to torch through DLPack (no copy); results go back the same way.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch


def is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


def to_torch(x: Any, *, name: str = "input", read_only: bool = False) -> torch.Tensor:
    """View ``x`` (numpy, torch, cupy, or anything np.asarray accepts) as a torch tensor, no copy if possible.

    A read-only numpy array (``np.load(..., mmap_mode="r")``) is copied, since torch tensors are writable,
    unless ``read_only``: the caller promises never to write to the result, which then shares the array's
    memory (a memory-mapped input stays on disk instead of being read whole into memory). An array in the
    other byte order (big-endian ``>f4`` / ``>i2`` NIfTI or .npy data on a little-endian host) is copied to
    native order, values unchanged."""
    if isinstance(x, torch.Tensor):
        return x
    if is_cupy(x):
        return torch.from_dlpack(x)
    if x is None:
        raise TypeError(f"{name} is None; expected an array (numpy, torch or cupy)")
    if isinstance(x, (list, tuple)):  # a stack given as a list: its images must share one shape
        shapes = [tuple(e.shape) if isinstance(e, torch.Tensor) else tuple(np.shape(e)) for e in x]
        if any(sh != shapes[0] for sh in shapes):
            j = next(j for j, sh in enumerate(shapes) if sh != shapes[0])
            raise ValueError(f"{name}: a {type(x).__name__} of arrays of different shapes: {name}[0] has shape "
                             f"{shapes[0]}, {name}[{j}] {shapes[j]}; bring them to one shape first")
        if x and all(isinstance(e, torch.Tensor) for e in x):  # (np.asarray failed on tensors needing grad)
            try:
                return torch.stack([e.detach() for e in x])
            except RuntimeError as exc:  # (tensors on different devices, of layouts stack cannot join)
                raise TypeError(f"{name}: cannot stack the {type(x).__name__} of {len(x)} tensors ({exc})") from exc
    if isinstance(x, np.ma.MaskedArray):  # (np.asarray drops the mask: masked values were used as data)
        raise TypeError(f"{name}: a masked array; its mask would be ignored and the values under it used. Pass "
                        f"{name}.filled(value) (or {name}.data) to say which values to use")
    try:
        a = np.asarray(x)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from exc
    if a.dtype == object:
        raise TypeError(f"{name}: got an object array (ragged or mixed input?), shape {a.shape}")
    if a.dtype.kind not in "biufc":  # strings, bytes, dates, records: torch has no such tensors
        raise TypeError(f"{name}: got an array of non-numeric dtype {a.dtype}, shape {a.shape}; expected numbers")
    if not a.dtype.isnative:  # torch.from_numpy rejects non-native byte order (NIfTI data is often big-endian)
        a = a.astype(a.dtype.newbyteorder("="))
    elif any(st < 0 for st in a.strides):  # torch.from_numpy rejects negative strides (flipped views)
        # a copy, not np.ascontiguousarray: numpy calls an array contiguous whatever the strides of its
        # length-1 axes, and returned a flipped stack of one image (x[::-1], shape (1, H, W)) as it was
        a = a.copy(order="C")
    elif not a.flags.writeable and not read_only:
        a = a.copy()
    try:
        if not a.flags.writeable:  # (read_only: torch warns that writing would be undefined; nothing writes)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(a)
        return torch.from_numpy(a)
    except TypeError as exc:  # torch's message names neither the input nor its dtype's numpy name
        raise TypeError(f"{name}: dtype {a.dtype} is not supported (use a float or integer dtype, e.g. "
                        f"float32), shape {a.shape}") from exc


def check_readable(t: torch.Tensor, name: str, reader: str) -> None:
    """A clear error for a tensor holding no data ``reader`` (``"ssim"``, ``"all_pairs"``) can read: one on a
    device other than the CPU or CUDA (meta: "Cannot copy out of meta tensor", deep inside), or a sparse one
    ("reshape is not implemented for sparse tensors")."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: a tensor on device {str(t.device)!r}, which {reader} cannot read; give it on "
                         "'cpu' or 'cuda'")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: {t.layout} tensors are not supported; pass a dense tensor (.to_dense())")


def to_numpy(x: Any, *, name: str = "input") -> np.ndarray:
    """``x`` as a numpy array on the host (copies from GPU)."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, torch.Tensor):
        try:
            return x.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:  # sparse layouts, dtypes numpy lacks (float8 ...)
            raise TypeError(f"{name}: cannot convert a {x.layout} {x.dtype} tensor of shape "
                            f"{tuple(x.shape)} to numpy ({exc})") from exc
    if is_cupy(x):
        return x.get()
    return np.asarray(x)


def like_input(result: torch.Tensor, original: Any) -> Any:
    """Return ``result`` as the same kind of array as ``original`` (numpy, torch or cupy)."""
    if isinstance(original, torch.Tensor):
        return result
    if is_cupy(original):
        import cupy

        return cupy.from_dlpack(result)
    return result.detach().cpu().numpy()


def ieee_floats(fn: Any) -> Any:
    """``fn`` run with flush-to-zero and denormals-are-zero cleared on the calling thread (the caller's mode
    given back after, whatever happens): its numpy and torch work there computes with IEEE subnormals, as the
    native loops do for theirs. With ``torch.set_flush_denormal(True)`` in force, the wide rows' block sums and
    fold turned scores of ~1e-40 into 0, and their pairs changed class at a threshold of 0."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            from . import _native
        except ImportError:  # (no extension: the torch engine follows the caller's mode)
            return fn(*args, **kwargs)
        saved = _native.ieee_floats_enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _native.ieee_floats_exit(saved)

    return run
