"""Foundation: native extension, backends and dispatch, shipped real MRI, loader errors, CLI doctor."""
from __future__ import annotations

import gzip
import importlib
import json
import os
import subprocess
import sys

import warnings

import numpy as np
import pytest
from _checkout import assert_ok, run_python
import torch

import deepssim_fast
from deepssim_fast import data

bk = importlib.import_module("deepssim_fast.backends")


# ---------------------------------------------------------------- native extension
def test_native_imports_and_reports_simd_and_threads():
    from deepssim_fast import _native

    assert _native.simd_level() in ("scalar", "avx2", "avx512")
    assert _native.detected_simd_level() in ("scalar", "avx2", "avx512")
    assert _native.num_threads() >= 1
    assert isinstance(list(_native.capabilities), list)


def test_native_simd_level_can_be_lowered_and_restored():
    from deepssim_fast import _native

    detected = _native.detected_simd_level()
    try:
        _native.set_simd_level("scalar")
        assert _native.simd_level() == "scalar"
        _native.set_simd_level("avx512")  # capped by what the CPU supports
        assert _native.simd_level() == detected
        _native.set_simd_level("avx2")
        assert _native.simd_level() == ("scalar" if detected == "scalar" else "avx2")
    finally:
        _native.set_simd_level("auto")
    assert _native.simd_level() == detected
    with pytest.raises(ValueError, match="expected 'auto', 'scalar', 'avx2' or 'avx512'"):
        _native.set_simd_level("sse9")


def test_native_thread_count_is_settable():
    from deepssim_fast import _native

    try:
        _native.set_num_threads(1)
        assert _native.num_threads() == 1
        _native.set_num_threads(3)
        assert _native.num_threads() == 3
    finally:
        _native.set_num_threads(0)
    with pytest.raises(ValueError):
        _native.set_num_threads(-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="address-space limit via /proc and RLIMIT_AS")
def test_native_loops_survive_threads_that_cannot_be_started():
    """More worker threads asked for than the process may start (here: an address-space limit that leaves room
    for a few thread stacks, not 4000): the native loops run on the threads they got. Was: the failed
    std::thread start escaped parallel_for with the started threads still joinable, and std::terminate
    aborted the process."""
    code = """
import resource
import numpy as np
from deepssim_fast import _native
x = np.random.default_rng(0).standard_normal((1_100_000, 1)).astype(np.float32)  # 4297 chunks of 256 rows
out = np.zeros_like(x)
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
_native.set_num_threads(4000)
assert _native.normalize_rows(x, out) == -1
assert np.array_equal(out, np.sign(x)), "normalised 1-column rows are their signs"
print("ok")
"""
    assert_ok(run_python(code, timeout=300))


def test_native_does_not_link_libtorch():
    from deepssim_fast import _native

    out = subprocess.run(["ldd", _native.__file__], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out


# ---------------------------------------------------------------- backends
def test_backends_lists_everything():
    assert deepssim_fast.backends is bk.backends
    info = deepssim_fast.backends()
    assert set(info) >= {"native", "torch", "triton", "cuda", "cupy"}
    assert info["native"]["available"] is True
    assert info["native"]["simd"] in ("scalar", "avx2", "avx512")
    assert info["torch"]["available"] is True
    if not torch.cuda.is_available():
        assert info["cuda"] == []


def test_resolve_follows_data_and_overrides(monkeypatch):
    monkeypatch.delenv(bk.ENV_VAR, raising=False)
    x = np.zeros((2, 2), np.float32)
    assert bk.resolve(None, [x]) == "native"
    assert bk.resolve("torch", [x]) == "torch"
    monkeypatch.setenv(bk.ENV_VAR, "torch")
    assert bk.resolve(None, [x]) == "torch"
    assert bk.resolve("native", [x]) == "native"  # the argument beats the environment
    monkeypatch.setenv(bk.ENV_VAR, "bogus")
    # the error names the environment variable the value came from (the caller passed no backend)
    with pytest.raises(ValueError, match=r"^\$DEEPSSIM_FAST_BACKEND='bogus' is not supported here; expected one of "
                       r".*\(or 'auto', or unset it\)$"):
        bk.resolve(None, [x])
    with pytest.raises(ValueError, match=r"^\$DEEPSSIM_FAST_BACKEND='native' is not supported here"):
        monkeypatch.setenv(bk.ENV_VAR, "native")
        bk.resolve("auto", [x], supported=("torch", "triton"))
    with pytest.raises(ValueError, match=r"^backend 'bogus' is not supported here; expected one of \([^)]*\)$"):
        bk.resolve("bogus", [x])


def test_forced_unavailable_backend_says_what_to_install(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so triton is available")
    with pytest.raises(bk.BackendUnavailableError, match="^backend 'triton' is not available: .*NVIDIA GPU"):
        bk.resolve("triton", [np.zeros(3)])
    monkeypatch.setenv(bk.ENV_VAR, "triton")
    with pytest.raises(bk.BackendUnavailableError,
                       match=r"^\$DEEPSSIM_FAST_BACKEND='triton': backend 'triton' is not available: .*NVIDIA GPU"):
        bk.resolve(None, [np.zeros(3)])
    with pytest.raises(ValueError, match="unknown backend"):
        bk.require("metal")


def test_readme_names_the_functions_that_take_backend():
    """README said "`backend=` on every public function", but the encoder functions (train, embed, load_model,
    build_model) take none: calling one with backend= is a TypeError. The functions the Backends convention
    names must take it."""
    import inspect
    import re
    from pathlib import Path

    readme = Path(deepssim_fast.__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is in the source checkout only")
    text = " ".join(readme.read_text(encoding="utf-8").split())
    m = re.search(r"\*\*Backends\*\* follow the data: .*?`backend=` on (.*?), or `DEEPSSIM_FAST_BACKEND`", text)
    assert m, "README's Backends convention no longer says where backend= is taken"
    public = [n for n in deepssim_fast.__all__ if callable(getattr(deepssim_fast, n))
              and not isinstance(getattr(deepssim_fast, n), type)]
    takes = {n for n in public if "backend" in inspect.signature(getattr(deepssim_fast, n)).parameters}
    if "every public function" in m.group(1):
        assert takes == set(public), f"without backend=: {sorted(set(public) - takes)}"
    named = set(re.findall(r"`(\w+)`", m.group(1))) & set(public)
    assert named and named <= takes, f"named but without backend=: {sorted(named - takes)}"


def test_resolve_supported_subset():
    with pytest.raises(ValueError, match="not supported"):
        bk.resolve("triton", [np.zeros(3)], supported=("native", "torch"))


def test_to_torch_and_back_keeps_kind():
    from deepssim_fast._arrays import like_input, to_torch

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = to_torch(a)
    assert t.data_ptr() == a.__array_interface__["data"][0]  # no copy
    assert isinstance(like_input(t * 2, a), np.ndarray)
    assert isinstance(like_input(t, t), torch.Tensor)
    flipped = a[:, ::-1]  # negative strides
    np.testing.assert_array_equal(to_torch(flipped).numpy(), flipped)
    # a negative stride on a length-1 axis: numpy calls the view contiguous (np.ascontiguousarray returned it
    # as it was, and torch.from_numpy refused it)
    one = np.arange(6.0).reshape(1, 2, 3)[::-1]
    assert one.strides[0] < 0 and one.flags.c_contiguous
    np.testing.assert_array_equal(to_torch(one).numpy(), one)
    ro = np.arange(4.0)
    ro.flags.writeable = False
    assert to_torch(ro).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert to_torch(ro).data_ptr() != ro.ctypes.data  # copied: torch tensors are writable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (and no "not writable" warning)
        shared = to_torch(ro, read_only=True)
    assert shared.data_ptr() == ro.ctypes.data and shared.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="object array"):
        to_torch(np.array([np.zeros(2), np.zeros(3)], dtype=object))
    # None and non-numeric arrays: a TypeError naming the argument (None read as a 0-d "object array (ragged
    # or mixed input?)"; strings and dates failed inside torch.from_numpy, without the argument's name)
    with pytest.raises(TypeError, match=r"^x is None; expected an array"):
        to_torch(None, name="x")
    for bad in ("abc", np.array(["a", "b"]), np.array([b"a"]), np.array(["2020-01-01"], dtype="datetime64[D]")):
        with pytest.raises(TypeError, match=r"^y: got an array of non-numeric dtype"):
            to_torch(bad, name="y")
    assert to_torch(np.array([True, False])).dtype == torch.bool
    assert to_torch(np.array([1 + 2j])).dtype == torch.complex128  # complex is numeric; SSIM refuses it itself


# ---------------------------------------------------------------- shipped real MRI
@pytest.mark.parametrize("name,package,shape", [
    ("mni152", "nilearn", (197, 233, 189)),
    ("t1_coronal_slice", "dipy", (256, 256)),
    ("s0_10slices", "dipy", (128, 128, 10)),
    ("aniso_vox", "dipy", (58, 58, 24)),
    ("piesno", "dipy", (96, 96, 14)),
    ("anatomical", "nibabel", (33, 41, 25)),
])
def test_shipped_volumes_load(name, package, shape):
    assert data.DATASETS[name].package == package
    vol = data.load_volume(name)
    assert vol.source == name
    assert vol.array.dtype == np.float32
    assert vol.array.shape == shape
    assert np.isfinite(vol.array).all()
    assert float(vol.array.std()) > 0, "a real scan is not constant"


def test_4d_volume_needs_a_frame():
    path = data.dataset_path("example4d")
    with pytest.raises(data.DataError, match=r"4D volume of shape \(128, 96, 24, 2\); choose a frame") as e:
        data.load_volume("example4d")
    assert str(path) in str(e.value)
    f0 = data.load_volume("example4d", frame=0).array
    f1 = data.load_volume("example4d", frame=1).array
    assert f0.shape == (128, 96, 24) and not np.array_equal(f0, f1)
    with pytest.raises(data.DataError, match="frame 5 out of range"):
        data.load_volume("example4d", frame=5)
    with pytest.raises(data.DataError, match="is 3D"):
        data.load_nifti(data.dataset_path("anatomical"), frame=0)


def test_slices_follow_the_policy():
    vol = data.load_volume("mni152").array
    every = data.volume_slices(vol, data.SlicePolicy(axis=2, min_foreground=0))
    assert len(every) == vol.shape[2]
    kept = data.load_slices("mni152")
    assert 0 < len(kept) < vol.shape[2], "near-empty slices at the ends are skipped"
    assert all(s.array.shape == (197, 233) and s.array.dtype == np.float32 for s in kept)
    sub = data.load_slices("mni152", data.SlicePolicy(axis=0, start=50, stop=150, step=10, min_foreground=0))
    assert [s.index for s in sub] == list(range(50, 150, 10))
    assert sub[0].array.shape == (233, 189)
    np.testing.assert_array_equal(sub[1].array, vol[60])
    assert sub[1].key == "mni152#0:60"
    with pytest.raises(ValueError, match="axis"):
        data.SlicePolicy(axis=3)
    with pytest.raises(ValueError, match="step"):
        data.SlicePolicy(step=0)


def test_real_slices_center_fit():
    sl = list(data.real_slices((64, 64), datasets=["anatomical", "t1_coronal_slice"]))
    assert len(sl) == 26 and all(s.array.shape == (64, 64) for s in sl)
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = data.center_fit(img, (5, 2))
    assert out.shape == (5, 2)
    np.testing.assert_array_equal(out[1:4], img[:, 1:3])
    assert (out[0] == img.min()).all()


def test_loader_errors_name_path_and_problem(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(data.DataError, match="no such file") as e:
        data.load_nifti(missing)
    assert str(missing) in str(e.value)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(data.DataError, match="not a NIfTI file"):
        data.load_nifti(txt)
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(data.DataError, match="not a readable NIfTI") as e:
        data.load_nifti(fake)
    assert str(fake) in str(e.value)
    with pytest.raises(data.DataError, match="unknown dataset 'brain'"):
        data.load_volume("brain")


def test_nan_volume_is_rejected(tmp_path):
    import nibabel as nib

    arr = np.ones((8, 8, 8), np.float32)
    arr[3, 3, 3] = np.nan
    p = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), p)
    with pytest.raises(data.DataError, match="NaN or Inf"):
        data.load_nifti(p)


# ---------------------------------------------------------------- CLI
def test_cli_doctor_lists_backends():
    out = subprocess.run([sys.executable, "-m", "deepssim_fast", "doctor", "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["backends"]["native"]["available"] is True
    text = subprocess.run([sys.executable, "-m", "deepssim_fast", "doctor"], capture_output=True, text=True,
                          check=True).stdout
    for word in ("native", "torch", "triton", "cuda", "cupy"):
        assert word in text


# ---------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_file_and_cleans_up_on_failure(tmp_path):
    from deepssim_fast._atomic import atomic_write, atomic_write_bytes

    p = tmp_path / "sub" / "out.bin"
    atomic_write_bytes(p, b"first")
    atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"second"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_bytes() == b"second", "a failed write leaves the old file untouched"
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.bin"], "no temporary file is left behind"


def test_atomic_write_errors_name_the_file(tmp_path):
    """A write to a full disk (or a failing fsync) raises an OSError that names no file: the audit stopped with
    "error: [Errno 28] No space left on device" and nothing else. The error now names the file being written,
    and keeps its type and errno."""
    import errno

    from deepssim_fast._atomic import atomic_path, atomic_write

    p = tmp_path / "cache" / "items.bin"

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device") as ei:
        atomic_write(p, full)
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(p)
    assert str(p) in str(ei.value)
    assert list(p.parent.iterdir()) == [], "no temporary file is left behind"
    with pytest.raises(OSError) as ei, atomic_path(p) as tmp:
        tmp.write_bytes(b"x")
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    assert ei.value.errno == errno.EIO and str(p) in str(ei.value)
    with pytest.raises(PermissionError, match="denied") as ei:  # (the subclass is kept)
        atomic_write(p, lambda f: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    assert ei.value.filename == str(p)
    other = str(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError) as ei:  # an error that names its own file keeps it
        atomic_write(p, lambda f: open(other + "/x"))
    assert ei.value.filename == other + "/x"


def test_an_existing_read_only_file_is_refused_before_the_work(tmp_path, monkeypatch):
    """all_pairs(out=PATH) on an existing read-only file ran the whole call, replaced the file anyway (its
    read-only mode kept), then failed with PermissionError reopening it read-write: the result lost, hours of
    work on a large set. ssim_matrix(out=PATH) the same. Both refuse it first now, as open(path, "r+") does,
    and leave it as it was. Writers that do not reopen their file (AllPairsResult.save, embed --out, a
    training checkpoint) replace it as before: a rename needs only the folder's permission. (Root may write any
    file: there os.access is made to say what it says to any other user.)"""
    import errno
    import importlib
    import stat

    import deepssim_fast as dsf
    from deepssim_fast import _atomic

    rng = np.random.default_rng(3)
    t, s = rng.standard_normal((12, 8)), rng.standard_normal((5, 8))
    ro, ro_m, res = tmp_path / "ro.npy", tmp_path / "m.npy", tmp_path / "res.npz"
    for f in (ro, ro_m):
        np.save(f, np.zeros(3))
    res.write_bytes(b"old")
    for f in (ro, ro_m, res):
        f.chmod(0o444)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(_atomic.os, "access", lambda p, mode: not (
            mode & os.W_OK and not stat.S_IMODE(os.stat(p).st_mode) & 0o222) and real(p, mode))
    called = []
    monkeypatch.setattr(importlib.import_module("deepssim_fast.all_pairs"), "_run_native",
                        lambda *a, **k: called.append(1))
    monkeypatch.setattr(importlib.import_module("deepssim_fast.ssim"), "_fill_matrix",
                        lambda *a, **k: called.append(2))
    with pytest.raises(PermissionError, match="read-only") as ei:
        dsf.all_pairs(t, s, k=2, out=ro, progress=False)
    assert ei.value.errno == errno.EACCES and ei.value.filename == str(ro)
    imgs = rng.random((2, 16, 16)).astype(np.float32)
    with pytest.raises(PermissionError, match="read-only") as ei:
        dsf.ssim_matrix(imgs, imgs, out=ro_m, progress=False)
    assert ei.value.filename == str(ro_m)
    assert called == [], "refused before any scoring"
    for f in (ro, ro_m):
        np.testing.assert_array_equal(np.load(f), np.zeros(3))
    monkeypatch.undo()
    r = dsf.all_pairs(t, s, k=2, progress=False)
    r.save(res)  # (no reopening: replaced, as before)
    assert dsf.AllPairsResult.load(res) == r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy", "res.npz", "ro.npy"], "no temporary file left"


def test_atomic_write_takes_names_up_to_the_file_system_limit(tmp_path):
    """The temporary name adds 14 bytes to the file's: a legal name of 242-255 bytes could never be written
    ("File name too long", naming the temporary file). Such names get a shortened temporary name, which
    remove_temporaries still finds by the file's name; a folder that cannot be written names the file."""
    import errno

    from deepssim_fast._atomic import _create_temporary, atomic_write_bytes, remove_temporaries

    for name in ("r" * 251 + ".npz", "ü" * 120 + ".npy", "a" * 241 + ".bin"):
        p = tmp_path / name
        assert len(os.fsencode(name)) <= 255
        atomic_write_bytes(p, b"data")
        assert p.read_bytes() == b"data" and sorted(tmp_path.iterdir()) == [p]
        tmp, fd = _create_temporary(p)  # a killed write's leftover: removed by the file's name
        os.close(fd)
        assert len(os.fsencode(tmp.name)) <= 255
        assert remove_temporaries(tmp_path, [name]) == [tmp]
        p.unlink()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # (root writes anywhere)
            return
        with pytest.raises(PermissionError) as ei:
            atomic_write_bytes(ro / "x.bin", b"data")
        assert ei.value.errno == errno.EACCES and ei.value.filename == str(ro / "x.bin")
    finally:
        ro.chmod(0o700)


def test_memmap_outputs_reserve_their_blocks_so_a_full_disk_is_an_error(tmp_path, monkeypatch):
    """A memmap's file is created sparse: on a disk too full for it, writing the mapped pages killed the process
    with SIGBUS ("Bus error", exit 135, no message, a temporary file left behind): the audit's pixel stores,
    all_pairs(out=) and ssim_matrix(out=). Their blocks are now reserved when the file is created, so a full
    disk is an OSError naming the file, and nothing is left behind."""
    import errno

    from deepssim_fast import _atomic
    from deepssim_fast.all_pairs import all_pairs
    from deepssim_fast.audit import audit
    from deepssim_fast.ssim import ssim_matrix

    # reserve() allocates the blocks of a sparse file (where the filesystem reports allocated blocks)
    f = tmp_path / "sparse.npy"
    m = np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=(256, 1024))
    del m
    size, before = os.path.getsize(f), os.stat(f).st_blocks * 512
    _atomic.reserve(f)
    if before < size:  # (a filesystem that keeps files sparse, as ext4, xfs and tmpfs do)
        assert os.stat(f).st_blocks * 512 >= size, "the sparse file was not allocated"
    assert np.load(f).shape == (256, 1024)

    # a full disk (fallocate fails as it does there): an error naming the file asked for, no leftovers
    def full(fd, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic, "_fallocate", full)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 8)).astype(np.float32)
    imgs = rng.random((6, 16, 16)).astype(np.float32)
    for name, call in (("m.npy", lambda p: all_pairs(emb, emb, k=2, out=p, progress=False)),
                       ("s.npy", lambda p: ssim_matrix(imgs, imgs, out=p, progress=False)),
                       ("s.raw", lambda p: ssim_matrix(imgs, imgs, out=p, progress=False))):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        with pytest.raises(OSError, match="No space left on device") as ei:
            call(d / name)
        assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(d / name), ei.value
        assert list(d.iterdir()) == [], name
    for side in ("t", "s"):
        (tmp_path / side).mkdir()
        for i in range(3):
            np.save(tmp_path / side / f"{i}.npy", imgs[i + (3 if side == "s" else 0)])
    out = tmp_path / "audit"
    with pytest.raises(OSError, match="No space left on device") as ei:
        audit(tmp_path / "t", tmp_path / "s", metric="correlation", k=2, out=out, progress=False)
    assert ei.value.filename == str(out / "work" / "train_pixels.npy"), ei.value
    assert not list((out / "work").glob(".*.tmp"))


def test_unknown_simd_environment_value_is_reported_not_silently_dropped():
    from deepssim_fast import _native

    r = subprocess.run([sys.executable, "-c", "from deepssim_fast import _native; print(_native.simd_level())"],
                       env={**os.environ, "DEEPSSIM_FAST_SIMD": "avx3"}, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == _native.detected_simd_level()
    assert "DEEPSSIM_FAST_SIMD='avx3' is not one of auto, scalar, avx2, avx512" in r.stderr


def test_unknown_ssim_box_environment_value_is_reported_not_silently_dropped():
    """DEEPSSIM_FAST_SSIM_BOX: 0/off/false/no turn the running-sum kernels off, 1/on/true/yes or unset leave
    them on; another value left them on without a word. It is now said, once per process."""
    code = ("import numpy as np, deepssim_fast as d; x = np.random.default_rng(0).random((3, 32, 32));"
            "print(d.ssim(x, x[::-1].copy(), spatial_dims=2).tolist()); print(d.ssim(x, x, spatial_dims=2).tolist())")
    runs = {v: subprocess.run([sys.executable, "-c", code], env={**os.environ, "DEEPSSIM_FAST_SSIM_BOX": v},
                              capture_output=True, text=True, check=True) for v in ("maybe", "On", "off")}
    assert runs["maybe"].stderr.count("DEEPSSIM_FAST_SSIM_BOX='maybe' is not one of") == 1, runs["maybe"].stderr
    assert runs["maybe"].stdout == runs["On"].stdout  # left on, as before
    assert "DEEPSSIM_FAST_SSIM_BOX" not in runs["On"].stderr + runs["off"].stderr


def test_bad_thread_count_environment_value_is_reported_not_silently_dropped():
    """DEEPSSIM_FAST_NUM_THREADS: a positive integer sets the count, 0 or empty means all cores; anything else
    falls back to all cores with a warning naming the variable and value (was: silently)."""
    from deepssim_fast import _native

    code = "from deepssim_fast import _native; print(_native.num_threads(), _native.num_threads())"
    all_cores = None
    for value, want, warns in (("abc", None, True), ("-2", None, True), ("4x", None, True), ("0", None, False),
                               ("", None, False), ("3", 3, False), (" 5 ", 5, False)):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DEEPSSIM_FAST_NUM_THREADS": value},
                           capture_output=True, text=True, check=True)
        got = [int(v) for v in r.stdout.split()]
        if want is None:
            all_cores = got[0] if all_cores is None else all_cores
            assert got == [all_cores, all_cores], (value, got)
        else:
            assert got == [want, want], (value, got)
        msg = f"DEEPSSIM_FAST_NUM_THREADS='{value}' is not a thread count"
        assert (msg in r.stderr) == warns, (value, r.stderr)
        assert r.stderr.count("DEEPSSIM_FAST_NUM_THREADS") == int(warns), "warned once per process"
    assert all_cores >= 1 and _native.num_threads() >= 1


def test_simd_environment_variable_caps_the_level():
    """DEEPSSIM_FAST_SIMD=scalar|avx2|avx512 caps the level the kernels use (never above the CPU's)."""
    from deepssim_fast import _native

    detected = _native.detected_simd_level()
    order = ["scalar", "avx2", "avx512"]
    for cap in order:
        out = subprocess.run([sys.executable, "-c", "from deepssim_fast import _native; print(_native.simd_level())"],
                             env={**os.environ, "DEEPSSIM_FAST_SIMD": cap}, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == order[min(order.index(cap), order.index(detected))], (cap, out, detected)


def test_a_flipped_stack_of_one_image_is_accepted():
    """``x[::-1]`` of a (1, H, W) stack has a negative stride on its length-1 axis, which numpy calls
    contiguous: ssim, ssim_matrix and all_pairs failed with torch's 'negative strides are not supported'."""
    import numpy as np

    from deepssim_fast.all_pairs import all_pairs
    from deepssim_fast.ssim import ssim, ssim_matrix

    rng = np.random.default_rng(0)
    a = rng.random((1, 16, 18)).astype(np.float32)
    b = rng.random((1, 16, 18)).astype(np.float32)
    flipped = a[::-1]
    assert flipped.strides[0] < 0
    np.testing.assert_array_equal(ssim(flipped, b, spatial_dims=2), ssim(a.copy(), b, spatial_dims=2))
    np.testing.assert_array_equal(ssim_matrix(flipped, b, progress=False), ssim_matrix(a.copy(), b, progress=False))
    e = rng.standard_normal((1, 8)).astype(np.float32)
    r = all_pairs(rng.standard_normal((5, 8)), e[::-1], k=2, progress=False)
    assert r.indices.shape == (1, 2)


def test_a_missing_native_extension_is_said_once_as_a_warning(monkeypatch) -> None:
    """Without the C++ extension (a source tree shadowing the installed package, a wheel built for a newer
    glibc) every CPU call ran on the torch engine, 20-300x slower, and only `doctor` said so."""
    backends = importlib.import_module("deepssim_fast.backends")  # (the package's attribute is a function)

    monkeypatch.setitem(sys.modules, "deepssim_fast._native", None)  # (import: ImportError)
    monkeypatch.setattr(backends, "_NATIVE_MISSING_SAID", False)
    monkeypatch.delenv("DEEPSSIM_FAST_BACKEND", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (not where the caller asks, as doctor does, or names an engine)
        assert backends.available("native") is False
        assert backends.resolve("torch", [np.zeros(3)]) == "torch"
    with pytest.warns(RuntimeWarning, match=r"C\+\+ extension deepssim_fast\._native did not import; "
                                            r"reinstall .* torch engine, much slower.*doctor"):
        assert backends.resolve(None, [np.zeros(3)]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve(None, [np.zeros(3)]) == "torch"  # once


def test_native_threads_follow_the_affinity_and_simd_names_are_lenient() -> None:
    """A probe: under taskset (Slurm --cpus-per-task, docker --cpuset-cpus) the native engine still started a
    thread per online CPU, and `doctor` showed that count; DEEPSSIM_FAST_SIMD='AVX2', ' avx2' or 'auto' were
    'not one of scalar, avx2, avx512' (the other variables take case and blanks, and set_simd_level 'auto')."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this system")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from deepssim_fast import _native; print(_native.num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "DEEPSSIM_FAST_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1", out
    from deepssim_fast import _native

    if _native.detected_simd_level() == "scalar":
        pytest.skip("no AVX2 on this CPU")
    code = "from deepssim_fast import _native; print(_native.simd_level())"
    for value in (" AVX2 ", "Avx2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(env, DEEPSSIM_FAST_SIMD=value))
        assert out.stdout.strip() == "avx2" and "not one of" not in out.stderr, (value, out)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(env, DEEPSSIM_FAST_SIMD="auto"))
    assert out.stdout.strip() == _native.detected_simd_level() and "not one of" not in out.stderr
