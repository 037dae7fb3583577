"""Timing harness shared by every bench_<capability>.py.

Each case times every provider in turn in the same process on the same inputs: warm-up, then
``repeat`` timed runs; the table reports the median with min–max and the ratio to a baseline provider
in the same run (never absolute times across runs: these machines are shared and noisy).
Rows are printed as a table and appended to BENCHMARKS.md with date, machine, versions and commit.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


@dataclass
class Row:
    capability: str
    case: str
    provider: str
    work: float  # items per call (pairs, queries, images, ...)
    unit: str  # what an item is, e.g. "pairs"
    times: list[float] = field(default_factory=list)
    baseline: str | None = None
    ratio: float | None = None  # baseline median / this median (>1: faster than the baseline)
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def rate(self) -> float:
        return self.work / self.median if self.times and self.median > 0 else float("nan")

    def as_dict(self) -> dict:
        """The row as plain JSON values: a failed provider's median and rate (NaN) and ratio are None, since
        NaN is not JSON (json.dumps wrote the bare token NaN, which strict parsers refuse)."""
        d = asdict(self)
        d.update(median=self.median, rate=self.rate)
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


def time_fn(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, sync: Callable[[], None] | None = None
            ) -> list[float]:
    """Wall times (s) of ``repeat`` calls after ``warmup`` calls. ``sync`` runs after each call (e.g. CUDA sync)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    out = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def run_case(capability: str, case: str, providers: dict[str, Callable[[], object]], *, work: float, unit: str,
             baseline: str | None = None, warmup: int = 1, repeat: int = 5,
             repeats: dict[str, int] | None = None, notes: dict[str, str] | None = None,
             log: Callable[[str], None] = print) -> list[Row]:
    """Time every provider on the same case; ratios are against ``baseline`` (default: the first provider).

    ``repeats`` overrides ``repeat`` per provider (for a slow competitor timed on fewer runs).
    A provider that raises is reported with its error in ``note`` instead of times.
    """
    rows = []
    for name, fn in providers.items():
        r = Row(capability, case, name, work, unit, note=(notes or {}).get(name, ""))
        try:
            r.times = time_fn(fn, warmup=warmup, repeat=(repeats or {}).get(name, repeat))
        except Exception as exc:  # noqa: BLE001 - a failing competitor is a result, not a crash
            r.note = f"failed: {type(exc).__name__}: {exc}"[:200]
        log(f"  {case:<40} {name:<28} " + (f"{r.median * 1e3:10.2f} ms  {r.rate:12.1f} {unit}/s" if r.times
                                             else r.note))
        rows.append(r)
    base = baseline or next(iter(providers))
    bmed = next((r.median for r in rows if r.provider == base and r.times), None)
    for r in rows:
        r.baseline = base
        if bmed and r.times:
            r.ratio = bmed / r.median
    return rows


def _fmt_time(s: float) -> str:
    """A time in s, ms or µs; the unit is chosen after rounding (0.99996 s was printed "1000.0 ms")."""
    if s != s:  # nan
        return "-"
    if s < 1e-3 and float(f"{s * 1e6:.0f}") < 1000:
        return f"{s * 1e6:.0f} µs"
    if s < 1 and float(f"{s * 1e3:.1f}") < 1000:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _fmt_rate(rate: float) -> str:
    """A rate with three significant figures at least: one decimal from 100 up, else three figures with their
    trailing zeros kept ("1.00", "18.0", "0.543"; ``.3g`` printed 1 and 18), never a bare trailing '.'."""
    if rate >= 100:
        return f"{rate:,.1f}"
    text = f"{rate:#.3g}"
    mant, e, exp = text.partition("e")
    return mant.rstrip(".") + e + exp


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| case | provider | median (min–max) | rate | vs baseline | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.times:
            t = f"{_fmt_time(r.median)} ({_fmt_time(min(r.times))}–{_fmt_time(max(r.times))})"
            # (three significant figures at least: 0.54 pairs/s was printed 0.5, and the ratio column could not
            # be recomputed from the rates of slow providers)
            rate = f"{_fmt_rate(r.rate)} {r.unit}/s"
            ratio = f"{r.ratio:.2f}× {r.baseline}" if r.ratio is not None else "-"
        else:
            t, rate, ratio = "-", "-", "-"
        cells = (r.case, r.provider, t, rate, ratio, r.note)
        # (a check's message "(|diff| 0.264 > 0.0001)" in a note split its row into 8 cells)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# Distributions whose versions go on every BENCHMARKS.md table (the project's engines and the competitors).
PACKAGES = ("deepssim_fast", "triton", "scikit-image", "faiss-cpu", "pytorch-msssim", "monai", "torchmetrics")


def package_versions() -> str:
    """'name version' of each installed distribution in PACKAGES (read from metadata, nothing imported)."""
    from importlib import metadata

    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def cpu_line(cpuinfo: str) -> str:
    """The CPU as the machine line names it, from ``/proc/cpuinfo`` text: model name, family and model, and
    the widest SIMD level the kernels use ("AMD EPYC (family 25 model 1; AVX2, no AVX-512)"). VMs often
    report a bare "AMD EPYC"; the family and model tell a Zen 3 from a Zen 4, whose ratios differ."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    if not name:
        return ""
    flags = set(fields.get("flags", "").split())
    if {"avx512f", "avx512_vnni"} <= flags:
        simd = "AVX-512 with VNNI"
    elif "avx512f" in flags:
        simd = "AVX-512, no VNNI"
    elif "avx2" in flags:
        simd = "AVX2, no AVX-512"
    else:
        simd = "no AVX2"
    where = ""
    if "cpu family" in fields and "model" in fields:
        where = f"family {fields['cpu family']} model {fields['model']}; "
    return f"{name} ({where}{simd})"


def native_source_hash(csrc: Path | None = None) -> str:
    """sha256 (hex) of the C++ sources in ``csrc`` (default: this checkout's), as setup.py stamps them into the
    extension (``_native.source_hash``): csrc/*.cpp and csrc/*.h sorted by name, each as its name, a NUL, its
    size in decimal, a NUL, then its bytes. (Keep in step with setup.py's native_source_hash.)"""
    import hashlib

    csrc = ROOT / "csrc" if csrc is None else Path(csrc)
    h = hashlib.sha256()
    for path in sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")], key=lambda p: p.name):
        data = path.read_bytes()
        h.update(path.name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def native_build() -> str:
    """Whether the C++ extension that runs was built from this checkout's csrc: "matches csrc", "STALE
    (rebuild: make native)", or why it cannot be told (no extension, a build without the stamp, no csrc)."""
    try:
        from deepssim_fast import _native
    except Exception as exc:  # noqa: BLE001 - a header line, never a crash (a GPU host may have no build)
        return f"not importable ({type(exc).__name__})"
    built = getattr(_native, "source_hash", "unknown")
    if not isinstance(built, str) or built == "unknown":
        return "unknown (built without a source stamp; rebuild: make native)"
    if not (ROOT / "csrc").is_dir():
        return f"{built[:12]} (no csrc here to compare)"
    return "matches csrc" if built == native_source_hash() else "STALE (rebuild: make native)"


def machine_info() -> dict[str, str]:
    import numpy
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = cpu_line(f.read()) or cpu
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        # (BENCHMARKS.md itself aside: the first table a run appends made every later one "+dirty")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)BENCHMARKS.md"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        # (a copy of the tree without .git, as a lent GPU machine gets: git fails, and says so on stderr)
        commit = head.stdout.strip() if head.returncode == 0 and head.stdout.strip() else "unknown"
        if commit != "unknown" and dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        # (the cores this process may run on: under taskset or a CPU quota's affinity, os.cpu_count() said 2
        # for a run on 1)
        "cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "gpu": gpu,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "commit": commit,
        # (the commit names the sources; this says whether the extension that ran was built from them)
        "native": native_build(),
        "packages": package_versions(),
    }


def append_markdown(title: str, rows: Sequence[Row], *, path: Path = BENCHMARKS_MD, comment: str = "") -> None:
    """Append a titled table with the machine line to BENCHMARKS.md (created if missing)."""
    info = machine_info()
    head = (f"\n### {title}\n\n_{info['date']} · {info['cpu']} · {info['cores']} cores · GPU {info['gpu']} · "
            f"python {info['python']} · numpy {info['numpy']} · torch {info['torch']} · commit {info['commit']} · "
            f"native build: {info['native']}_\n\n")
    if info.get("packages"):  # the competitors' versions, on their own line
        head += f"_{info['packages']}_\n\n"
    body = head + (comment.strip() + "\n\n" if comment else "") + markdown_table(rows) + "\n"
    append_text(path, body)


def append_text(path: Path, text: str) -> None:
    """Add ``text`` at the end of ``path`` (BENCHMARKS.md, created with its title if missing) atomically: the
    whole file is rewritten beside it and moved over it, so a run killed while writing leaves the file as it
    was, never a half-written section."""
    from deepssim_fast._atomic import atomic_write_bytes

    # (two runs appending at once each read the file, added their section and replaced it: the one that
    # replaced it first lost its sections; an flock on a lock file beside it makes the read and replace one step)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as held:
        try:
            import fcntl

            fcntl.flock(held, fcntl.LOCK_EX)
        except (ImportError, OSError):  # (no flock here: as before)
            pass
        old = path.read_text(encoding="utf-8") if path.exists() else "# deepssim_fast benchmarks\n"
        atomic_write_bytes(path, (old + text).encode("utf-8"))
