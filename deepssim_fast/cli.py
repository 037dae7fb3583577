"""The ``deepssim-fast`` command line. Every subcommand calls the public API; printing happens here only."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .io import one_line

Handler = Callable[[argparse.Namespace], int]


def _cmd_doctor(args: argparse.Namespace) -> int:
    import numpy
    import torch

    from . import __version__
    from .backends import backends

    info = backends()
    if args.json:
        print(
            json.dumps(
                {
                    "deepssim_fast": __version__,
                    "python": platform.python_version(),
                    "numpy": numpy.__version__,
                    "torch": torch.__version__,
                    "backends": info,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"deepssim_fast {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
        f"torch {torch.__version__}"
    )
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    nat = info["native"]
    if nat["available"]:
        print(
            f"native : yes  simd={nat['simd']} (cpu supports {nat['detected_simd']})  "
            f"threads={nat['threads']}  all-pairs kernel="
            f"{nat.get('topk_kernel') or ('-' if 'topk_kernel_error' in nat else '- (rebuild the extension)')}"
            + (f" (forced: {nat['topk_kernel_choice']})" if nat.get("topk_kernel_choice") not in (None, "auto")
               else "")
            + (f" (int16-avx2 {nat['topk_int16_speedup']:.2f}x the fp32 kernel's speed here)"
               if "topk_int16_speedup" in nat else "")
            + f"  capabilities={','.join(nat['capabilities']) or '-'}"
        )
        if nat.get("topk_kernel_error"):
            print(f"note: {nat['topk_kernel_error']}: every all_pairs call on the native engine will fail")
    else:
        print("native : NO  (the C++ extension did not import; reinstall from source)")
    print(f"torch  : yes  threads={info['torch']['threads']}")
    tr = info["triton"]
    print(f"triton : {'yes' if tr['available'] else 'no'}  version={tr['version']}  "
          + (f"mode={tr['mode']}" if tr["available"] else f"({tr['reason']})"))
    print(f"cuda   : {', '.join(info['cuda']) if info['cuda'] else 'no CUDA device'}")
    print(f"cupy   : {info['cupy'] or 'not installed (optional: pip install deepssim_fast[cupy] for a CUDA 12 torch, '}"
          f"{'' if info['cupy'] else '[cupy13] for CUDA 13)'}")
    env = info["environment"]
    print("environment: " + ("  ".join(f"{k}={v}" for k, v in env.items()) if env else "no DEEPSSIM_FAST_* overrides"))
    from .backends import BACKENDS, KNOWN_ENV, env_backend

    unknown = [k for k in env if k.startswith("DEEPSSIM_FAST_") and k not in KNOWN_ENV]
    if unknown:
        print(f"note: {', '.join(unknown)}: not a variable deepssim_fast reads (misspelt?); known: "
              f"{', '.join(sorted(KNOWN_ENV - {'DEEPSSIM_FAST_TEST_KILL_ONCE'}))}")
    raw, forced = env_backend()  # (as backends.resolve reads it)

    if forced not in (None, "auto") and forced not in BACKENDS:
        print(f"note: DEEPSSIM_FAST_BACKEND={raw!r} is not one of {BACKENDS} (or 'auto'): calls that use the "
              "default backend will fail")
    elif forced in ("native", "triton") and not info[forced]["available"]:
        print(f"note: DEEPSSIM_FAST_BACKEND={forced}, which is not available here: calls that use the default "
              "backend will fail")
    return 0


def _policy(args: argparse.Namespace):
    from .data import SlicePolicy

    try:
        return SlicePolicy(
            axis=args.axis,
            start=args.slice_start,
            stop=args.slice_stop,
            step=args.slice_step,
            min_foreground=args.min_foreground,
        )
    except ValueError as exc:  # named by its flag, not by the API's field ("SlicePolicy.min_foreground")
        text = str(exc)
        for field, flag in (("axis", "--axis"), ("step", "--slice-step"), ("min_foreground", "--min-foreground")):
            text = text.replace(f"SlicePolicy.{field}", flag)
        if "--min-foreground" in text:
            text += " (a fraction of a slice's pixels: 0.05 is 5 %)"
        raise ValueError(text) from None


def _add_policy(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slicing of volumes (NIfTI / 3D .npy)")
    g.add_argument("--axis", type=int, default=2, help="slice axis (default 2)")
    g.add_argument("--slice-start", type=int, default=None,
                   help="first slice index (a negative one counts from the end, as in Python: -5 = the last five)")
    g.add_argument("--slice-stop", type=int, default=None,
                   help="stop slice index (exclusive; negative: from the end)")
    g.add_argument("--slice-step", type=int, default=1, help="keep every n-th slice (default 1: all)")
    g.add_argument(
        "--min-foreground",
        type=float,
        default=0.05,
        help="skip slices whose fraction of foreground pixels (above 10%% of the volume's intensity range, "
        "from its minimum) is below this fraction (default 0.05 = 5%%; 0 keeps all)",
    )


def _cmd_ssim(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import numpy as np

    from ._atomic import atomic_path
    from .io import discover, read_image, stored_dtype

    opts = dict(
        window=args.window,
        win_size=args.win_size,
        sample_covariance=not args.population_covariance,
        preset=args.preset,
        data_range=args.data_range,
        backend=args.backend,
    )
    from ._ssim_common import resolve_params

    # the options before any file is read (--win-size 4 was refused after every image had been decoded)
    resolve_params(ndim=None, spatial_dims=2, sigma=1.5, k1=0.01, k2=0.03,
                   **{k: v for k, v in opts.items() if k != "backend"})
    a, b = Path(args.a), Path(args.b)

    def dtype_range(dt: Any) -> float:
        return 1.0 if dt == np.bool_ else float(np.iinfo(dt).max) - float(np.iinfo(dt).min)

    def integer_range(files: list[Path], images: list[np.ndarray], n_a: int) -> Any:
        """Files decode to float32; integer files keep scikit-image's dtype range (uint8 255) unless
        --data-range or a preset says otherwise. ``files[:n_a]`` are the first side of the pairs, the rest
        the second. Returns the files' stored dtypes (None: floating point), or None when the options set
        the range."""
        if args.data_range is not None or args.preset is not None:
            return None
        kinds = [stored_dtype(f) for f in files]
        groups: dict = {}
        for f, d, im in zip(files, kinds, images, strict=True):
            groups.setdefault(d, []).append((f, im))
        for dt, members in groups.items():
            if dt is None or dt in (np.uint8, np.bool_):
                continue
            if dt not in kinds[:n_a] or dt not in kinds[n_a:]:
                continue  # (no pair of two such files: every pair with one scores on max - min, said below)
            span = max(float(im.max()) for _, im in members) - min(float(im.min()) for _, im in members)
            if span < dtype_range(dt):
                # (scikit-image warns for these dtypes too: np.save of an int array is int64, whose range 1.8e19
                # makes any two images of values in the thousands score ~1.0; int16 MRI in the thousands
                # against 65535 scores ~0.9 for two different slices)
                print(f"deepssim-fast ssim: warning: the files store {dt} pixels, so data_range is its dtype "
                      f"range {dtype_range(dt):.4g} (scikit-image's convention), but their values span only "
                      f"{span:.4g}: scores are pushed towards 1 whatever the images; give --data-range",
                      file=sys.stderr)
        if len(groups) > 1:
            names = ", ".join(f"{members[0][0]}: {d or 'floating point'}" for d, members in groups.items())
            # (one float file among PNGs had every pair, PNG against PNG too, scored on max - min: a pair's
            # score depended on the other files in its folders)
            print(f"deepssim-fast ssim: warning: the files store different pixel types ({names}): a pair of "
                  "two files of one integer type uses its dtype range, any other pair max - min over the pair "
                  "(give --data-range for one range throughout)", file=sys.stderr)
        return kinds

    def pair_range(da: Any, db: Any) -> float | None:
        """A pair's data_range by its files' stored dtypes: the dtype range for one integer type, else None
        (max - min over the pair)."""
        return dtype_range(da) if da is not None and da == db else None

    def read(p: Path) -> np.ndarray:
        # in float64: float64 files keep their values (ssim rounds them to float32 only where that is exact
        # enough, see ssim's float64 rule); float32 decoding had moved scores of offset images by ~5e-5
        # (exactly float32 images, as integer and float32 files are, go on as float32: half the memory)
        x = read_image(p, frame=args.frame, dtype=np.float64)
        with np.errstate(over="ignore"):  # (values past float32's range stay float64)
            x32 = x.astype(np.float32)
        return x32 if np.array_equal(x32, x) else x

    if args.out and args.out != "-":  # (an --out that cannot be written was found after every pair was scored)
        from ._atomic import check_writable_path

        check_writable_path(args.out)
    if a.is_file() and b.is_file():
        x, y = read(a), read(b)
        if x.dtype != y.dtype:  # (one file exact in float32, the other not: ssim takes one dtype per call)
            x, y = x.astype(np.float64), y.astype(np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{a} has shape {x.shape} but {b} has shape {y.shape}; SSIM needs equal shapes")
        kinds = integer_range([a, b], [x, y], 1)
        if kinds is not None:
            opts["data_range"] = pair_range(*kinds)
        from .ssim import ssim

        v = float(np.asarray(ssim(x, y, spatial_dims=x.ndim, **opts)))
        if not args.out:
            print(f"{v:.6f}")
            return 0
        # with --out, the CSV of the folder comparison, one row (--out was ignored here: no file was written)
        # (paths made absolute, as the folder comparison's discovered files are)
        pa, pb = [Path(os.path.abspath(a))], [Path(os.path.abspath(b))]
        rows = [(str(pa[0]), str(pb[0]), f"{v:.6f}")]
    else:
        pa, pb = discover(args.a), discover(args.b)
        imgs_a = [read(p) for p in pa]
        imgs_b = [read(p) for p in pb]
        shape = imgs_a[0].shape
        for p, im in zip([*pa, *pb], imgs_a + imgs_b, strict=True):
            if im.shape != shape:
                raise ValueError(f"{p} has shape {im.shape} but {pa[0]} has shape {shape}; SSIM needs equal "
                                 f"shapes")
        kinds = integer_range([*pa, *pb], imgs_a + imgs_b, len(pa))
        fa, fb = np.stack(imgs_a), np.stack(imgs_b)
        if fa.dtype != fb.dtype:  # (float64 .npy files against float32 ones or PNGs: a TypeError traceback)
            fa, fb = fa.astype(np.float64), fb.astype(np.float64)
        from .ssim import ssim_matrix

        kw = {"spatial_dims": 3} if len(shape) == 3 else {}
        if kinds is None:
            m = np.asarray(ssim_matrix(fa, fb, progress=not args.quiet, **kw, **opts))
        else:  # a block of pairs per (stored dtype of a, stored dtype of b), each with its range
            ka, kb = kinds[:len(pa)], kinds[len(pa):]
            m = np.empty((len(pa), len(pb)), dtype=np.float64)
            for da in dict.fromkeys(ka):
                ia = [i for i, d in enumerate(ka) if d == da]
                for db in dict.fromkeys(kb):
                    ib = [j for j, d in enumerate(kb) if d == db]
                    block = ssim_matrix(fa[ia], fb[ib], progress=not args.quiet, **kw,
                                        **dict(opts, data_range=pair_range(da, db)))
                    m[np.ix_(ia, ib)] = np.asarray(block)
        rows = [(str(p), str(q), f"{m[i, j]:.6f}") for i, p in enumerate(pa) for j, q in enumerate(pb)]
    if args.out == "-":  # the CSV on stdout (it was written to a file named "-")
        w = csv.writer(sys.stdout)
        w.writerow(["a", "b", "ssim"])
        w.writerows(rows)
    elif args.out:
        # (a file name that is not UTF-8 keeps its own bytes, as in the audit's matches.csv)
        with atomic_path(args.out) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                errors="surrogateescape") as f:
            w = csv.writer(f)
            w.writerow(["a", "b", "ssim"])
            w.writerows(rows)
        print(f"wrote {len(rows)} scores ({len(pa)} x {len(pb)}) to {args.out}")
    else:
        for r in rows:
            print("\t".join(r))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import discover
    from .training import _checkpoint_marks, train

    if args.resume and not os.path.exists(args.resume):  # (said before the images are searched)
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint file (--resume)", args.resume)
    # (the options not given are None: train() takes a resumed run's own, else its defaults)
    model = train(
        discover(args.images),
        backbone=args.backbone or (None if args.resume else "small"),
        pretrained=args.pretrained,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        emb_dim=args.emb_dim,
        val_images=discover(args.val) if args.val else None,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        policy=_policy(args),
        time_limit=args.time_limit,
        progress=not args.quiet,
        input_size=args.input_size,
        size_policy=args.size_policy,
        zoom_out=None if args.zoom_out is None else tuple(args.zoom_out),
        val_fraction=args.val_fraction,
        val_split=args.val_split,
        val_pairs=args.val_pairs,
        val_every=args.val_every,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        strict=args.strict,
    )
    skipped = getattr(model, "skipped", [])
    if skipped:  # (each was logged as a warning when it was read)
        print(f"left out {len(skipped)} file(s), e.g. {one_line(skipped[0][1])} (an unreadable file: --strict "
              "aborts instead)", file=sys.stderr)
    best_val = getattr(model, "best_val", None)
    best = Path(args.out) / "best.pt"
    # best.pt is this run's only when it validated (train removes an earlier run's) and holds the loss said: a
    # resume whose best came before it named a best.pt of other weights and another loss (one a killed run
    # had written past its last.pt); else the last weights
    marks = _checkpoint_marks(best) if best_val is not None and best.is_file() else None
    holds = marks is not None and marks[1] == best_val
    ckpt = best if holds else Path(args.out) / "last.pt"
    val = ("no validation (the last weights)" if best_val is None else f"best validation loss {best_val:.6g}"
           if holds else f"best validation loss {best_val:.6g}, whose weights no best.pt holds (the last weights)")
    if getattr(model, "steps_run", None) == 0:  # (a resume with no step left printed "trained ...")
        print(f"nothing trained (no step left: see the warning above); {val}; checkpoint: {ckpt}")
    else:
        print(f"trained {model.config.backbone} encoder; {val}; checkpoint: {ckpt}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    import io
    import json
    from pathlib import Path

    import numpy as np

    from ._atomic import atomic_write_bytes, file_in_the_way
    from .io import discover, iter_slices
    from .model import embed, load_model, usable_slices

    from .report import skip_reason

    if args.batch_size < 1:  # (before the images are read)
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    # ("outdir/" wrote outdir.npy and outdir.ids.txt beside the folder, existing or not)
    if Path(args.out).is_dir() or args.out.endswith((os.sep, "/")):
        raise ValueError(f"--out {args.out} is a folder; give the .npy file to write (e.g. "
                         f"{Path(args.out) / 'embeddings.npy'})")
    blocker = file_in_the_way(args.out)
    if blocker is not None:  # (found when the embeddings were written, after all the work)
        raise ValueError(f"--out {args.out}: {blocker} is a file, not a folder")
    out = Path(args.out)
    if out.suffix != ".npy":  # (what np.save would do: the file name says what it holds)
        out = out.with_name(out.name + ".npy")
    files, earlier = _embed_inputs(discover(args.images), out)
    if earlier:  # (a rerun into an input folder had embedded its own earlier output as one more image)
        print(f"deepssim-fast embed: warning: left out {len(earlier)} .npy file(s) that an earlier embed wrote "
              f"(item ids beside them), e.g. {earlier[0]}", file=sys.stderr)
    if not files:
        raise ValueError(f"{' '.join(args.images)}: no image to embed (the {len(earlier)} .npy file(s) found are "
                         f"embeddings an earlier embed wrote, e.g. {earlier[0]})")
    # the model (and --device) before the images: a missing model was found after every image was read
    model = load_model(args.model, device=args.device)
    skipped: list = []
    slices = usable_slices(iter_slices(files, _policy(args), strict=args.strict, skipped=skipped),
                           strict=args.strict, skipped=skipped)
    if not slices:
        first = f"; {one_line(skipped[0][1])}" if skipped else ""
        raise ValueError(f"{' '.join(args.images)}: no image to embed ({len(skipped)} file(s) skipped{first})")
    emb = embed(
        [s.array for s in slices],
        model,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    keys = [s.key for s in slices]
    # one id per line; a file name with a line break in it would split its id over two lines (and the audit
    # would then name every row by number), so such a set of ids is written as a JSON list instead
    ids = out.with_suffix(".ids.json" if any("\n" in k for k in keys) else ".ids.txt")
    # each file atomically, the stale ids first: a run killed between the two leaves the new embeddings
    # without ids, never beside the ids of another run
    for stale in (out.with_suffix(".ids.txt"), out.with_suffix(".ids.json")):
        stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write_bytes(out, buf.getvalue())
    if ids.suffixes[-1] == ".json":  # (a name that is not UTF-8 is held as surrogates, which JSON escapes)
        atomic_write_bytes(ids, json.dumps(keys, indent=0).encode("ascii"))
    else:  # (a file name that is not UTF-8 keeps its own bytes)
        atomic_write_bytes(ids, os.fsencode("".join(k + "\n" for k in keys)))
    _print_skipped([f"skipped {one_line(p)}: {one_line(skip_reason(p, r))}" for p, r in skipped], "the warnings above")
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out} (item ids in {ids})")
    return 0


def _embed_inputs(found: list, out: Any) -> tuple[list, list]:
    """``(images, earlier)``: the files ``found`` for embed without ``earlier``, the .npy files an earlier embed
    wrote (those with its item ids beside them: ``<name>.ids.txt`` or ``<name>.ids.json``), this run's ``out``
    among them. Raises ValueError where ``out`` is one of the images: the embeddings would overwrite it."""
    from pathlib import Path

    earlier = [p for p in found if p.suffix == ".npy"
               and any(p.with_suffix(s).is_file() for s in (".ids.txt", ".ids.json"))]
    left_out = set(earlier)
    images = [p for p in found if p not in left_out]
    target = Path(out).resolve()
    hit = next((p for p in images if p.resolve() == target), None)
    if hit is not None:
        other = "" if str(hit) == os.path.abspath(out) else f" ({hit})"  # (by another path to it: named as found)
        raise ValueError(f"--out {out} is one of the input images{other}: the embeddings would overwrite it; give "
                         "another file name")
    return images, earlier


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._atomic import file_in_the_way
    from .model import _SETTINGS_SAID_BY_CALLER, SIZE_POLICIES, _is_torchscript, load_model
    from .training import _checkpoint_marks

    out = Path(args.out)
    if out.is_dir() or args.out.endswith((os.sep, "/")):
        raise ValueError(f"--out {args.out} is a folder; give the TorchScript file to write (e.g. "
                         f"{out / 'encoder.ts.pt'})")
    blocker = file_in_the_way(args.out)
    if blocker is not None:
        raise ValueError(f"--out {args.out}: {blocker} is a file, not a folder")
    if out.exists() and os.path.exists(args.model) and os.path.samefile(out, args.model):
        raise ValueError(f"--out {args.out} is the --model file itself; give another file name")
    existed = out.is_file()
    if existed and not _is_torchscript(out):
        marks = _checkpoint_marks(out)  # (its tensors are mapped, not read: a checkpoint can be GBs)
        if marks is not None:  # (TorchScript over a run's last.pt: `train --resume` refused it from then on)
            at = f" (step {marks[0]})" if marks[0] is not None else ""
            raise ValueError(f"--out {args.out} is a deepssim_fast training checkpoint{at}: TorchScript written over "
                             "it would make its run impossible to resume (train --resume takes checkpoints only); "
                             "give another file name")
    # (a foreign TorchScript file, the published weights, is written again with the preprocessing settings it
    # is loaded with, --input-size and --size-policy: load_model then reads them from it, as from ours; the ones
    # not given, which it assumes, are said here: load_model's warning advised running this very command)
    said = _SETTINGS_SAID_BY_CALLER.set(True)
    try:
        model = load_model(args.model, input_size=args.input_size, size_policy=args.size_policy)
    finally:
        _SETTINGS_SAID_BY_CALLER.reset(said)
    cfg = model.config
    # (flag, words, value stored, values it takes) of the settings not given
    assumed = [(flag, words, value, takes) for flag, words, value, takes, given in (
        ("--input-size", "input size", cfg.input_size, "N", args.input_size),
        ("--size-policy", "size policy", cfg.size_policy, "{" + ",".join(SIZE_POLICIES) + "}", args.size_policy))
        if given is None]
    if cfg.extra.get("foreign") and assumed:
        print(f"warning: {args.model} stores no preprocessing settings and {' and '.join(a[0] for a in assumed)} "
              f"{'was' if len(assumed) == 1 else 'were'} not given: the copy stores the published DeepSSIM "
              f"encoder's {' and '.join(f'{a[1]} {a[2]}' for a in assumed)}; if the model expects other "
              f"settings, run export again with {' '.join(f'{a[0]} {a[3]}' for a in assumed)}", file=sys.stderr)
    model.save_torchscript(out)  # (atomically)
    settings = f"input {cfg.input_size} x {cfg.input_size}, size policy {cfg.size_policy}"
    where = f"{out} (replaced the file that was there)" if existed else str(out)
    if cfg.extra.get("foreign"):
        print(f"wrote the foreign TorchScript encoder again to {where}, with its preprocessing settings "
              f"({settings}), which --model reads from it")
    else:
        print(f"wrote the {cfg.backbone} encoder as TorchScript to {where} ({settings}; torch.jit.load runs it on "
              "z-scored (N, 1, S, S) images; --model takes it)")
    return 0


def _print_summary(s: dict, out: str) -> None:
    from .report import format_percent, skip_reason

    c = s["counts"]
    print(
        f"{s['n_synth']} synthetic items vs {s['n_train']} training items ({s['metric']}, top {s['k']}): "
        f"{c['duplicate']} duplicate, {c['similar']} similar, {c['different']} different "
        f"— {format_percent(s['fraction_memorised'])} % memorised"
    )
    _print_skipped([f"skipped {sk['set']} input {one_line(sk['path'])}: "
                    f"{one_line(skip_reason(sk['path'], sk['reason']))}" for sk in s["skipped"]],
                   f"{out}/summary.json ('skipped') and the report")
    print(f"report: {out}/report.html")


# At the end of a command, at most this many skipped inputs are repeated (each was logged when it was met).
SKIPPED_SHOWN = 10


def _print_skipped(lines: list[str], where: str) -> None:
    """The skipped inputs, again after the progress bars: the first :data:`SKIPPED_SHOWN`, then how many more
    and where all are listed (thousands of bad files had every one said twice). Their reasons name the
    command's flags, as the warnings that first said them did (:class:`_FlagFormatter`)."""
    for line in lines[:SKIPPED_SHOWN]:
        print(f"warning: {_in_flags(line)}", file=sys.stderr)
    if len(lines) > SKIPPED_SHOWN:
        print(f"warning: ... and {len(lines) - SKIPPED_SHOWN} more skipped inputs ({len(lines)} in all; every one "
              f"is in {where})", file=sys.stderr)


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit

    size = tuple(args.size) if args.size else None
    res = audit(
        args.train,
        args.synth,
        model=args.model,
        metric=args.metric,
        k=args.k,
        thresholds=tuple(args.thresholds),
        verify=args.verify,
        out=args.out,
        workers=args.workers,
        scheduler=args.scheduler,
        policy=_policy(args),
        mode=args.mode,
        size=size,
        verify_shifts=args.verify_shifts,
        verify_flips=args.verify_flips,
        verify_rotations=args.verify_rotations,
        strict=args.strict,
        cache_dir=args.cache_dir,
        decode_workers=args.decode_workers,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        device=args.device,
        backend=args.backend,
        progress=not args.quiet,
    )
    _print_summary(res.summary, str(res.out))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .audit import evaluate

    r = evaluate(args.audit, args.labels, backend=args.backend, model=args.model)
    def num(x: float | None) -> str:  # a score that is not defined (a class with no examples): n/a
        return f"{x:9.4f}" if x is not None else f"{'n/a':>9}"

    print(f"{'class':<10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, v in r["per_class"].items():
        print(f"{name:<10} {num(v['precision'])} {num(v['recall'])} {num(v['f1'])} {v['support']:8d}")
    print(f"{'macro':<10} {num(r['macro_precision'])} {num(r['macro_recall'])} {num(r['macro_f1'])} {r['n']:8d}")
    print(
        f"macro F1 = {num(r['macro_f1']).strip()} (over {', '.join(r['macro_classes']) or 'no class'}); "
        f"written to {args.audit}/evaluation.json"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(
        args.out,
        train_seconds=args.train_seconds,
        seed=args.seed,
        progress=not args.quiet,
        retrain=args.retrain,
    )
    print(f"report: {r['report']}")
    print(
        f"planted duplicates: recall {r['recall']:.3f}, precision {r['precision']:.3f} "
        f"({r['found']}/{r['planted']} found, {r['false_positives']} false positives); "
        f"similar near-copies labelled similar: {r['near_similar']}/{r['near']}; "
        f"novel labelled different: {r['novel_different']}/{r['novel']}"
    )
    pc = r["search_pair_counts"]
    print(f"encoder alone (the search, before exact-SSIM verification): true source first for "
          f"{r['search_source_first']}/{r['planted']} planted duplicates; pairs by search score: "
          f"{pc['duplicate']} duplicate, {pc['similar']} similar, {pc['different']} different")
    if pc["different"] == 0 and pc["similar"] == 0:
        print("warning: the encoder scores every pair a duplicate: it is barely trained (--train-seconds "
              f"{args.train_seconds:g}); the results above come from verification alone", file=sys.stderr)
    print(f"total {r['seconds']:.0f} s")
    ok = r["recall"] >= 0.95 and r["precision"] >= 0.9
    if not ok:
        print("demo targets missed (recall >= 0.95 and precision >= 0.9)", file=sys.stderr)
    return 0 if ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks live beside the package in a source checkout (bench/), which a console script does
    # not have on sys.path: look for it next to the installed package, then in the working directory.
    from pathlib import Path

    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "__main__.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    try:
        from bench.__main__ import main as bench_main
    except ImportError:
        raise RuntimeError(
            "the benchmarks live in the source checkout (bench/): run this from a clone of "
            "the repository, e.g. `cd deepssim_fast && deepssim-fast bench --quick`"
        ) from None
    return int(bench_main(list(args.bench_args), prog="deepssim-fast bench") or 0)


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, before the subcommand and after it."""
    return int(getattr(args, "verbose", 0) or 0) + int(getattr(args, "verbose_sub", 0) or 0)


def _train_default(name: str):
    """The default of ``train(name=...)``: the CLI's options without a default of their own use the API's
    (those a resume takes from its run are None in the signature: their value is in TRAIN_DEFAULTS)."""
    import inspect

    from .training import TRAIN_DEFAULTS, train

    if name in TRAIN_DEFAULTS:
        return TRAIN_DEFAULTS[name]
    return inspect.signature(train).parameters[name].default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepssim-fast",
        description="Find the training images a generative model memorised: exact SSIM, all-pairs search of "
                    "embeddings, DeepSSIM encoder training and memorisation audits with a report in the browser. "
                    "`deepssim-fast doctor` shows what this machine can use; `deepssim-fast COMMAND -h` explains a "
                    "command.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    # -v is accepted after the subcommand too; it counts separately (a subcommand's defaults would
    # overwrite the main parser's count) and verbosity() adds both
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", dest="verbose_sub", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", parents=[common], help="print the usable backends and versions")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_cmd_doctor)

    s = sub.add_parser("ssim", parents=[common], help="SSIM of two images, or all pairs of two folders (CSV)")
    s.add_argument("a", help="image file (PNG, .npy, NIfTI) or folder / glob")
    s.add_argument("b", help="image file or folder / glob")
    s.add_argument("--preset", choices=["deepssim"], default=None, help="z-score both, range of the first")
    s.add_argument("--window", choices=["uniform", "gaussian"], default="uniform",
                   help="uniform window (default, as scikit-image) or gaussian (sigma 1.5, 11 taps; sample "
                   "covariance unless --population-covariance)")
    s.add_argument("--win-size", type=int, default=None, help="uniform window side (default 7; the gaussian "
                   "window's is 11, fixed by its sigma 1.5)")
    s.add_argument("--population-covariance", action="store_true",
                   help="population (1/N) window covariance instead of the sample covariance N/(N-1); with "
                   "--window gaussian this is what pytorch-msssim and MONAI compute (scikit-image's "
                   "use_sample_covariance=False)")
    s.add_argument(
        "--data-range",
        type=float,
        default=None,
        help="default: a pair of integer files of one type (8-bit PNG, integer .npy) their dtype range (uint8 "
        "255), as scikit-image; any other pair (float files, NIfTI, two integer types) max - min over the pair",
    )
    s.add_argument("--backend", default=None, help="native, torch or triton (default: by data location)")
    s.add_argument("--frame", type=int, default=None,
                   help="the volume of 4D files (NIfTI, .npy) to compare, 0-based (-1: the last); every file must "
                   "then be 4D")
    s.add_argument("--out", default=None, help="CSV file of the scores (columns a, b, ssim; '-': the CSV on "
                   "standard output; default: print the scores)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_ssim)

    t = sub.add_parser("train", parents=[common], help="train a DeepSSIM encoder on a folder of images/volumes")
    t.add_argument("--images", required=True, nargs="+", help="training images: folders, globs or files")
    t.add_argument("--val", default=None, nargs="+",
                   help="validation images: folders, globs or files (default: a split of --images)")
    t.add_argument("--out", required=True,
                   help="output directory (last.pt, log.csv, and best.pt when there is a validation set)")
    t.add_argument(
        "--backbone", default=None, choices=["small", "resnet18", "convnext_tiny", "convnext_base"],
        help="encoder (default: small; with --resume, the checkpoint's)",
    )
    t.add_argument("--pretrained", default=None, help="local ImageNet state_dict for the backbone")
    t.add_argument("--epochs", type=int, default=None,
                   help="passes over the training images (default 40; with --resume and neither --epochs nor "
                        "--max-steps, the resumed run's own number of steps)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="number of optimizer steps; overrides --epochs")
    t.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    # (options of the run a checkpoint records: with --resume, those not given are the checkpoint's, as
    # train() takes them)
    t.add_argument("--batch-size", type=int, default=None,
                   help=f"image pairs per step, at least 2 (default {_train_default('batch_size')})")
    t.add_argument("--lr", type=float, default=None, help=f"learning rate (default {_train_default('lr')})")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                   help="constant learning rate, or cosine decay to 0 over the run (default "
                   f"{_train_default('lr_schedule')})")
    t.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="linear learning-rate warm-up over the first N steps (default "
                   f"{_train_default('warmup_steps')})")
    t.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="without --val, validate on this fraction of --images, chosen by --seed (default "
                   f"{_train_default('val_fraction')}; in [0, 1); fewer than 2 images means no validation and no "
                   "best.pt)")
    t.add_argument("--val-split", choices=("files", "images"), default=None,
                   help="how --val-fraction is held out: whole files (default; a volume's slices are near-copies of "
                   "their neighbours) or single images, knowingly (one volume); with --resume, the run's")
    t.add_argument("--val-pairs", type=int, default=None, metavar="N",
                   help=f"number of fixed validation pairs (default {_train_default('val_pairs')})")
    t.add_argument("--val-every", type=int, default=None, metavar="STEPS",
                   help="validate every this many steps (default: once per epoch, and at the end)")
    t.add_argument("--emb-dim", type=int, default=None, help="embedding size (default 256; with --resume the "
                   "checkpoint's)")
    t.add_argument("--input-size", type=int, default=None, help="network input side (default: per backbone)")
    t.add_argument("--size-policy", default=None, choices=["fit", "resize", "pad"],
                   help="how images reach the input size: centre crop/pad (fit, the default), resize, or "
                   "letterbox pad + resize")
    t.add_argument("--zoom-out", type=float, nargs="*", default=None, metavar="F",
                   help="zoom-out augmentation factors, e.g. 0.5 0.65 0.8 (off by default)")
    t.add_argument("--resume", default=None, help="checkpoint to resume from (OUT/last.pt); the options of its "
                   "run that are not given here (the number of steps, batch size, learning rate, schedule and "
                   "warm-up, validation, zoom-out) are taken from it")
    t.add_argument("--seed", type=int, default=None,
                   help="seed of the weights, pairs and split (default 42; with --resume, the checkpoint's)")
    t.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda if available)")
    t.add_argument("--strict", action="store_true",
                   help="abort on the first unreadable file (default: leave it out with a warning)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_policy(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("embed", parents=[common], help="embed images with a model into a .npy file")
    e.add_argument("--model", required=True, help="checkpoint or TorchScript file")
    e.add_argument("--images", required=True, nargs="+", help="folders, globs or files")
    e.add_argument("--out", required=True,
                   help="output .npy (.npy is added if missing; item ids, one per row, go to the same name "
                   "with .ids.txt instead of .npy, or .ids.json, a JSON list, where a file name holds a line break)")
    e.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    e.add_argument("--device", default=None, help="torch device for the encoder, e.g. cuda (default cpu)")
    e.add_argument("--strict", action="store_true", help="abort on the first unreadable file")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_policy(e)
    e.set_defaults(func=_cmd_embed)

    x = sub.add_parser("export", parents=[common],
                       help="write a model (checkpoint) as TorchScript, the published DeepSSIM weights' format")
    x.add_argument("--model", required=True, help="checkpoint (OUT/best.pt, OUT/last.pt) or TorchScript file")
    x.add_argument("--out", required=True,
                   help="TorchScript file to write (torch.jit.load reads it; its model settings are stored in it)")
    x.add_argument("--input-size", type=int, default=None,
                   help="a foreign TorchScript file's input side, stored in the file written (default 224; ours "
                   "store their own)")
    x.add_argument("--size-policy", default=None, choices=["fit", "resize", "pad"],
                   help="a foreign TorchScript file's size policy, stored in the file written (default resize)")
    x.set_defaults(func=_cmd_export)

    a = sub.add_parser(
        "audit", parents=[common], help="find synthetic samples that copy training samples; write a report"
    )
    a.add_argument("--train", required=True, nargs="+", help="training set: folders, globs or files")
    a.add_argument("--synth", required=True, nargs="+", help="synthetic set: folders, globs or files")
    a.add_argument("--model", default=None, help="encoder checkpoint or TorchScript file (metric deepssim)")
    a.add_argument(
        "--metric",
        default="deepssim",
        choices=["deepssim", "ssim", "correlation", "embeddings"],
        help="search score: cosine of the encoder's embeddings (deepssim, the default; needs --model), exact "
        "SSIM of every pair (ssim), Pearson correlation of the pixels (correlation), or cosine of the rows of "
        "embedding .npy files (embeddings; needs --verify none)",
    )
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("-k", "--k", type=int, default=5, help="candidates per synthetic item (default 5)")
    a.add_argument(
        "--thresholds",
        type=float,
        nargs=2,
        default=(0.6, 0.85),
        metavar=("LOW", "HIGH"),
        help="labels: different <= LOW < similar <= HIGH < duplicate (default 0.6 0.85)",
    )
    a.add_argument(
        "--verify",
        default="ssim",
        choices=["ssim", "none"],
        help="re-score the candidates with exact SSIM (ssim, the default), or label from the search score (none; "
        "required by --metric embeddings)",
    )
    a.add_argument(
        "--verify-shifts",
        type=int,
        default=0,
        metavar="PX",
        help="also verify over integer shifts up to PX pixels (best by cross-correlation; default 0: none; a "
        "shift also scored on the overlap of the two views); the search also queries the items shifted by PX "
        "(8 more searches in 2D, 6 in 3D)",
    )
    a.add_argument(
        "--verify-flips",
        action="store_true",
        help="also verify flips: horizontal, vertical and both (slices); along each axis and each set of axes "
        "(volumes: 7 mirrors, flip01 = LPS against RAS); the search also queries the flipped items, each "
        "mirrored about the centre of its file (with --metric ssim, one more exact search per flip)",
    )
    a.add_argument(
        "--verify-rotations",
        type=float,
        default=0.0,
        metavar="DEG",
        help="also verify rotations of the unflipped slice and of its best flip by ±DEG/2 and ±DEG degrees "
        "(slices only; default 0: none)",
    )
    a.add_argument("--mode", default="slices", choices=["slices", "volumes"],
                   help="2D slices (default) or 3D volumes (metrics ssim and correlation)")
    a.add_argument("--size", type=int, nargs="+", default=None,
                   help="common item shape (centre crop/pad; default: the first training item's shape)")
    a.add_argument("--strict", action="store_true", help="abort on the first unreadable file")
    a.add_argument("--cache-dir", default=None, help="per-file cache (default OUT/cache)")
    a.add_argument("--decode-workers", type=int, default=0,
                   help="DataLoader worker processes (default 0: decode in this process)")
    a.add_argument("--workers", type=int, default=None, help="run the search on a local Dask cluster")
    a.add_argument("--scheduler", default=None, help="Dask scheduler address for the search")
    a.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    a.add_argument("--chunk-size", type=int, default=256,
                   help="synthetic items per chunk of verification (and of the exact-SSIM search), each saved as it "
                        "finishes, so an interrupted run resumes from there (default 256)")
    a.add_argument("--device", default=None,
                   help="torch device for the encoder (metric deepssim only), e.g. cuda (default cpu)")
    a.add_argument("--backend", default=None,
                   help="SSIM and search engine: native, torch or triton (default: by data location)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_policy(a)
    a.set_defaults(func=_cmd_audit)

    v = sub.add_parser(
        "evaluate", parents=[common], help="precision/recall/macro F1 of an audit against labelled pairs"
    )
    v.add_argument("--audit", required=True, help="audit output directory")
    v.add_argument(
        "--labels", required=True, help="CSV with real_key, synth_key, label (0 diff, 1 dup, 2 sim)"
    )
    v.add_argument("--backend", default=None,
                   help="SSIM engine for re-scoring: native, torch or triton (default: by data location)")
    v.add_argument(
        "--model",
        default=None,
        help="deepssim audits with --verify none and flips/shifts only: the encoder the audit used, to embed "
        "the variants again (default: the file recorded in summary.json)",
    )
    v.set_defaults(func=_cmd_evaluate)

    m = sub.add_parser("demo", parents=[common], help="end-to-end audit on real brain MRI with planted copies")
    m.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    m.add_argument("--train-seconds", type=float, default=150.0, help="encoder training budget (default 150)")
    m.add_argument("--retrain", action="store_true", help="ignore a cached encoder in OUT")
    m.add_argument("--seed", type=int, default=0, help="seed of the planted copies and training (default 0)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="run the benchmarks (source checkout only)", add_help=False,
                       description="Arguments go to `python -m bench`: [NAMES] [--quick] [--no-append] [--list] ...")
    b.add_argument("bench_args", nargs="*", help="arguments of `python -m bench` (try --help)")
    b.set_defaults(func=_cmd_bench)
    return p


def dask_logging(level: int) -> None:
    """Give Dask's loggers (``distributed``, ``dask``) the command's level: WARNING by default and with
    ``-q``, INFO with ``-v``, DEBUG with ``-vv``.

    ``distributed`` sets its logger to INFO when it is imported, after the command's ``basicConfig``, and its
    records reach that handler, so a ``--workers`` run printed the scheduler's and nanny's start/stop lines
    and the dashboard URL whatever the verbosity. It is imported here (only for a command that will use
    Dask, so a missing Dask is reported where it is needed) and its level set after its own setup."""
    try:
        import distributed  # noqa: F401 - its import configures its loggers; ours comes after
    except ImportError:
        return
    for name in ("distributed", "dask"):
        logging.getLogger(name).setLevel(level)


#: Arguments that name files or folders: an empty string among them is refused before the command runs
_PATH_ARGS = frozenset({"a", "b", "out", "images", "val", "model", "train", "synth", "audit", "labels", "resume",
                        "pretrained", "cache_dir", "scheduler"})

#: API parameter names that a command's flag of another name sets (the rest match by name: batch_size is
#: --batch-size), for :func:`_name_flags`
_FLAG_ALIASES = {
    "train": {"val_images": "--val"},
    "demo": {"time_limit": "--train-seconds"},
}


@functools.lru_cache(maxsize=16)
def _command_flags(parser: argparse.ArgumentParser, command: str) -> tuple[dict, dict]:
    """``(own, other)``: API parameter name -> (flag, argparse action or None) for the flags of ``command``
    (with :data:`_FLAG_ALIASES`), and name -> flag for those of the other commands, where every command that
    has the parameter spells it so. (Cached: every log line of a command goes through :func:`_name_flags`.)"""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    own: dict[str, tuple[str, Any]] = {}
    other: dict[str, set[str]] = {}
    for name, p in (sub.choices.items() if sub is not None else ()):
        for a in p._actions:
            opts = [o for o in a.option_strings if o.startswith("--")] or list(a.option_strings)  # (-k)
            if opts and a.dest not in ("help", "verbose_sub"):
                if name == command:
                    own[a.dest] = (opts[0], a)
                else:
                    other.setdefault(a.dest, set()).add(opts[0])
    for name, flag in _FLAG_ALIASES.get(command, {}).items():
        own[name] = (flag, None)
    return own, {n: next(iter(f)) for n, f in other.items() if len(f) == 1}


def _name_flags(parser: argparse.ArgumentParser, command: str, text: str) -> str:
    """``text`` (an error or warning the API wrote in its parameters' names) in the flags of ``command``.

    * A parameter that is what the sentence is about keeps its name, with the flag beside it: followed by
      " must", " needs" or " factors", at the start of the message or after a space, and only once
      ("batch_size must be an integer >= 2" -> "batch_size (--batch-size) must be ..."); paths and values in a
      message are never touched ("new model (v2).pt" had become "new model (--model) (v2).pt").
    * The API's keyword forms become the command line's: ``verify='ssim'`` -> ``--verify ssim``,
      ``verify_flips=True`` -> ``--verify-flips``, ``val_images=`` -> ``--val``; a flag's own value named after
      its parameter, ``metric 'correlation'`` (a value among the flag's choices) -> ``--metric correlation``; a
      parameter written with an underscore, or a list ``a/b`` of parameters, on its own -> its flag
      (``drop verify_flips/verify_shifts`` -> ``drop --verify-flips/--verify-shifts``).
    * A parameter of another command only where the message names that flag already (a warning about the
      model's training flags, read in ``embed``: "an --input-size (input_size=)").
    * A flag then said twice in a row is said once: "--val (--val)", "(--verify ssim, --verify ssim)"; and so is
      the API's hint for the command line, "pass --verify none (command line: --verify none)" (:func:`_said_once`).

    Short names without an underscore (``k``, ``lr``, ``out``) are taken only as the message's subject (the
    first form). A name inside a path (``/data/val_images/x.png``), an identifier or an object's repr
    (``SlicePolicy(axis=1, ...)``) is left as it is, and so is one before a colon (a file of that name)."""
    return _said_once(_name_flags_of(*_command_flags(parser, command), text))


def _said_once(text: str) -> str:
    """``text`` without a parenthetical "(command line: X)" whose X it says right before (the API's hint for the
    command line, once its own words are in flags: "pass --verify none (command line: --verify none)")."""
    import re

    return re.sub(r" \(command line: ([^()]+)\)",
                  lambda m: "" if m.string[:m.start()].endswith(m.group(1)) else m.group(0), text)


def _name_flags_of(own: dict, other: dict, text: str) -> str:
    """:func:`_name_flags` with the command's flags (:func:`_command_flags`) looked up."""
    import ast
    import re
    import shlex

    original = text
    for name, (flag, _) in sorted(own.items(), key=lambda kv: -len(kv[0])):
        if flag in text or name not in text:
            continue
        pat = rf"(^|(?<=\s))({re.escape(name)})(?= must | needs | factors )"
        if name.count("_") == 0 and len(name) < 4:  # (k, lr, out: only as the message's subject)
            pat = rf"^({re.escape(name)})(?= must )"
        m = re.search(pat, text)
        if m:
            end = m.end()
            text = f"{text[:end]} ({flag}){text[end:]}"

    def flag_of(name: str) -> str | None:
        if name in own:
            return own[name][0]
        f = other.get(name)
        return f if f is not None and f in original else None

    def short(name: str) -> bool:
        return name.count("_") == 0 and len(name) < 4

    said: set[str] = set()
    names = "|".join(re.escape(n) for n in sorted((n for n in set(own) | set(other) if n in text), key=len,
                                                  reverse=True))
    if not names:  # (most log lines: no parameter's name at all)
        return text
    # an object's repr is a value, not the API speaking: "SlicePolicy(axis=1, ..., min_foreground=0.05)" stays
    kept: list[str] = []

    def keep(m: re.Match) -> str:
        kept.append(m.group(0))
        return f"\0{len(kept) - 1}\0"

    text = re.sub(r"\b[A-Z]\w*\((?:[^()]|\([^()]*\))*\)", keep, text.replace("\0", ""))
    edge = r"(?<![\w./\\=-])"  # (not inside a path, an identifier or another keyword's value)
    quoted = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""

    def keyword(m: re.Match) -> str:  # name=value, name=
        name, value = m.group(1), m.group(2)
        flag = flag_of(name)
        if flag is None or short(name):
            return m.group(0)
        if value is None:
            said.add(flag)
            return flag
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return m.group(0)
        action = own.get(name, (None, None))[1]
        if v is True and isinstance(action, argparse._StoreTrueAction):
            out = flag
        elif isinstance(v, str):  # (with its alternatives: metric='ssim' / 'correlation')
            alts = [ast.literal_eval(q) for q in re.findall(quoted, m.group(3) or "")]
            out = " / ".join([f"{flag} {shlex.quote(v)}", *(shlex.quote(a) for a in alts)])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out = f"{flag} {value}"
        else:  # (False, None: no flag says that)
            return m.group(0)
        said.add(out)
        return out

    text = re.sub(rf"{edge}({names})=({quoted}|-?\d+(?:\.\d+)?(?:e-?\d+)?\b|True\b|False\b|None\b)?"
                  rf"(?(2)((?:(?<=['\"]) / (?:{quoted}))*)|(?=[\s),;:/]|$))", keyword, text)

    def choice(m: re.Match) -> str:  # metric 'correlation', metric 'deepssim' or 'correlation'
        name = m.group(1)
        flag, action = own.get(name, (None, None))
        values = re.findall(quoted, m.group(0)[len(name):])
        try:
            vs = [ast.literal_eval(v) for v in values]
        except (ValueError, SyntaxError):
            return m.group(0)
        if flag is None or not getattr(action, "choices", None) or not all(v in action.choices for v in vs):
            return m.group(0)
        out = f"{flag} " + re.sub(quoted, lambda q: str(ast.literal_eval(q.group(0))), m.group(0)[len(name) + 1:])
        said.add(f"{flag} {vs[0]}")
        return out

    text = re.sub(rf"{edge}({names}) (?:{quoted})(?:(?:, (?:{quoted}))*,? or (?:{quoted}))?", choice, text)

    def bare(m: re.Match) -> str:  # verify_flips/verify_shifts, val_fraction
        parts = m.group(0).split("/")
        flags = [flag_of(n) for n in parts]
        if None in flags or (len(parts) == 1 and "_" not in parts[0]):
            return m.group(0)
        said.update(flags)
        return "/".join(flags)

    # (not before ":": "val_images: is an existing folder" names a folder of that name)
    text = re.sub(rf"{edge}(?:{names})(?:/(?:{names}))*(?![\w./\\=:-]| \(--)", bare, text)
    for flag in sorted(said, key=len, reverse=True):  # a flag said twice in a row: once
        f = re.escape(flag)
        text = re.sub(rf"{f} \({f}\)(?![\w-])", flag, text)
        text = re.sub(rf"{f} \({f}(?:: |, | / )", f"{flag} (", text)
        text = re.sub(rf"\({f}(?:, | / ){f}(?![\w-])", f"({flag}", text)
    return re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], text)


#: (parser, command) of the command main() runs, for :func:`_in_flags`; None outside main()
_RUNNING: tuple[argparse.ArgumentParser, str] | None = None


def _in_flags(text: str) -> str:
    """``text`` in the flags of the command running (:func:`_name_flags`); as it is outside main()."""
    return text if _RUNNING is None else _name_flags(*_RUNNING, text)


class _FlagFormatter(logging.Formatter):
    """The command line's log lines: this package's messages name the command's flags, as its errors do
    (:func:`_name_flags`: "drop --verify-flips", not "drop verify_flips"). The record itself is not changed:
    other handlers (summary.json's warnings, a program's own) keep the API's words."""

    def __init__(self, fmt: str, parser: argparse.ArgumentParser, command: str) -> None:
        super().__init__(fmt)
        self.parser, self.command = parser, command

    def format(self, record: logging.LogRecord) -> str:
        if record.name != "deepssim_fast" and not record.name.startswith("deepssim_fast."):
            return super().format(record)
        shown = logging.makeLogRecord(record.__dict__)
        shown.msg, shown.args = _name_flags(self.parser, self.command, record.getMessage()), None
        return super().format(shown)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:  # (building the parser imports the training module: seconds on a loaded machine, Ctrl-C included)
        parser = build_parser()
        if command == "bench":  # everything after `bench` belongs to `python -m bench`, verbatim
            cut = argv.index("bench") + 1
            args = parser.parse_args(argv[:cut])
            args.bench_args = argv[cut:]
        else:
            args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print(f"deepssim-fast{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 128 + 2
    empty = [f"--{k.replace('_', '-')}" if k not in ("a", "b") else k.upper() for k, v in vars(args).items()
             if k in _PATH_ARGS and any(isinstance(x, str) and not x.strip()
                                        for x in (v if isinstance(v, (list, tuple)) else [v]))]
    if empty:  # (an unset shell variable: "" read as the working folder, or wrote OUT's files into it)
        what = "empty address" if empty == ["--scheduler"] else "empty path"
        print(f"deepssim-fast {args.command}: error: {', '.join(empty)}: {what} (an unset variable?)",
              file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(verbosity(args), 2)
    # -v/-vv speak for this tool (and its bench scripts); other libraries keep to warnings: -vv had put
    # dozens of matplotlib font_manager and PIL chunk lines between the tool's own
    root = logging.getLogger()
    before = list(root.handlers)
    # (restored on return, with the root's level: a program that called main() had its later warnings shown
    # in this command's flags, "drop --verify-flips" for its own verify_flips=)
    formatters, root_level = {h: h.formatter for h in before}, root.level
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for h in root.handlers:  # the handler that prints here (not one a program calling main() set up): flags
        if h not in before or isinstance(h.formatter, _FlagFormatter):
            h.setFormatter(_FlagFormatter("%(levelname)s %(name)s: %(message)s", parser, args.command))
    own = [logging.getLogger(name) for name in ("deepssim_fast", "bench", "distributed", "dask")]
    levels = [lg.level for lg in own]  # (restored on return: main() called in a program leaves its loggers)
    for lg in own[:2]:  # (distributed and dask: set by dask_logging below, with --workers/--scheduler)
        lg.setLevel(level)
    if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None:
        dask_logging(level)
    # SIGTERM (a batch scheduler's time limit, `kill`) ends a command as Ctrl-C does: the same one line and resume
    # hint instead of dying without a word (finished work is kept either way: every output is atomic)
    previous_term = _handle_sigterm()
    global _RUNNING
    running, _RUNNING = _RUNNING, (parser, args.command)
    # TypeError is deliberately not among the one-line errors: what a command passes on is parsed by
    # argparse, and files are decoded by deepssim_fast.io, which reports a bad dtype or an unreadable file as
    # a ValueError (or skips it). A TypeError reaching here is an internal bug ("'NoneType' object is not
    # subscriptable", a wrong keyword), whose traceback is what a bug report needs.
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # the reader of stdout went away (`deepssim-fast ssim A/ B/ | head`): stop quietly, as a command killed
        # by SIGPIPE would, instead of reporting "error: [Errno 32] Broken pipe"; stdout goes to /dev/null so
        # that the interpreter's final flush does not fail again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # (a stdout without a file descriptor)
            pass
        return 128 + 13  # 141, the shell's status of a command ended by SIGPIPE
    except FloatingPointError as exc:  # a diverged training run: an outcome the README names, not a bug (a traceback)
        text = one_line(exc).replace("learning rate (lr)", "learning rate (--lr)")
        if args.command == "train" and os.path.isfile(os.path.join(args.out, "last.pt")):  # (a finite checkpoint)
            text += (f"; continue from the last checkpoint with --resume {os.path.join(args.out, 'last.pt')} and a "
                     "lower --lr (the steps after it run again)")
        print(f"deepssim-fast {args.command}: error: {text}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # (numpy's "Unable to allocate 37.3 GiB ..." for --input-size 100000: a traceback)
        print(f"deepssim-fast {args.command}: error: out of memory ({one_line(exc) or 'MemoryError'}); check the "
              "sizes asked for (--size, --input-size, --batch-size, --emb-dim)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        from .data import stopped

        # (the command stops here: "the file is not used", which holds where a reader leaves a file out, does not)
        text = stopped(one_line(exc))
        if (isinstance(exc, NotADirectoryError) and exc.filename  # (the OS's own words only, not a message of ours)
                and exc.strerror == os.strerror(errno.ENOTDIR)):
            text = f"{exc.filename}: a part of this path is a file, not a folder"
        elif (isinstance(exc, OSError) and isinstance(exc.filename, (str, bytes, os.PathLike)) and exc.strerror
              and exc.filename2 is None):
            # "[Errno 21] is an existing folder; give a file name: 'train'" -> "train: is an existing folder; ..."
            text = one_line(f"{os.fsdecode(exc.filename)}: {exc.strerror}")
        print(f"deepssim-fast {args.command}: error: {_name_flags(parser, args.command, text)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM): one line, not a traceback from wherever it was
        hint = ""
        if args.command == "audit":
            kept = os.path.join(args.out, "work")
            if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None:
                kept += f" and {os.path.join(args.out, 'shards*')}"  # (where a Dask search keeps its shards)
            hint = f"; finished work is kept in {kept}: run the same command again to resume"
        elif args.command == "train" and os.path.isfile(os.path.join(args.out, "last.pt")):
            hint = (f"; continue from the last checkpoint with --resume {os.path.join(args.out, 'last.pt')} "
                    "(the steps after it run again)")
        term = isinstance(exc, _Terminated)
        print(f"deepssim-fast {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}{hint}",
              file=sys.stderr)
        return 128 + (15 if term else 2)  # 143 / 130, the shell's status of a command ended by SIGTERM / SIGINT
    finally:
        _RUNNING = running
        _restore_sigterm(previous_term)
        for lg, lv in zip(own, levels, strict=True):
            lg.setLevel(lv)
        for h in list(root.handlers):
            if h in formatters:
                h.setFormatter(formatters[h])
            elif isinstance(h.formatter, _FlagFormatter):  # (basicConfig's, above)
                root.removeHandler(h)
        root.setLevel(root_level)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is (see :func:`_handle_sigterm`)."""


def _handle_sigterm() -> Any:
    """Turn SIGTERM into :class:`_Terminated` in the main thread; returns the previous handler (None where
    signals cannot be set: not the main thread, or a platform without SIGTERM)."""
    import signal

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # (ignored by whoever started us: left so, as
            return None                                          # Python leaves an ignored SIGINT)
        return signal.signal(signal.SIGTERM, raise_terminated)
    except (ValueError, AttributeError, OSError):
        return None


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
