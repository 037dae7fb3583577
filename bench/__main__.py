"""The benchmark runner: ``python -m bench [NAMES] [--quick] [--no-append]`` (also ``deepssim-fast bench``).

Each NAME is a capability — ``ssim``, ``all_pairs``, ``train``, ``audit``, ``distributed`` (default: all) —
whose module ``bench/bench_<name>.py`` exposes ``run(quick: bool = False, append: bool = True) -> list[Row]``;
a dotted module path (``pkg.my_bench``) exposing the same ``run`` works too. Every module times all its
providers side by side in one process (bench/harness.py) and, unless ``--no-append``, appends its rows to
BENCHMARKS.md with date, machine, versions and commit. A module that is missing or raises is reported and
the others still run; a provider that fails inside a module is a row with its error, not a failure.

The runner prints one combined table (grouped by capability) and a status line per module; ``--json PATH``
also writes every row and status. Exit status: 0 when every selected module ran, 1 when one was missing
or raised, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/__main__.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Row, machine_info, markdown_table  # noqa: E402

logger = logging.getLogger(__name__)

QUICK_TARGET_S = 120.0  # `--quick` is meant to finish in under 2 minutes on 2 cores
CAPABILITIES = ("ssim", "all_pairs", "train", "audit", "distributed")
ALIASES = {"all-pairs": "all_pairs", "allpairs": "all_pairs", "topk": "all_pairs", "training": "train",
           "model": "train", "dask": "distributed"}


@dataclass
class Outcome:
    """What one benchmark module did: ``status`` is "ok", "missing" or "failed"."""

    name: str
    module: str
    status: str
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    error: str = ""
    cpu_seconds: float = 0.0  # CPU time of this process (all threads) while the module ran

    @property
    def failed_providers(self) -> list[str]:
        return [f"{r.case} / {r.provider}" for r in self.rows if not r.times]


def module_for(name: str) -> str:
    """The module path behind a benchmark NAME (a capability, ``bench_<capability>``, or a dotted path)."""
    if "." in name:
        return name
    key = ALIASES.get(name, name).removeprefix("bench_").replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in CAPABILITIES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(CAPABILITIES)} "
                         f"(or give a dotted module path with a run() function)")
    return f"bench.bench_{key}"


def run_module(name: str, *, quick: bool, append: bool) -> Outcome:
    """Import one benchmark module and call its ``run``; never raises. Records wall and CPU seconds."""
    cpu0 = time.process_time()
    o = _run_module(name, quick=quick, append=append)
    o.cpu_seconds = time.process_time() - cpu0
    return o


def _run_module(name: str, *, quick: bool, append: bool) -> Outcome:
    path = module_for(name)
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (path == exc.name or path.startswith(exc.name + ".")):
            return Outcome(name, path, "missing", time.perf_counter() - t0, error=f"no module {path}")
        return Outcome(name, path, "failed", time.perf_counter() - t0,
                       error=f"import: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a broken module is reported, the others still run
        logger.debug("importing %s failed:\n%s", path, traceback.format_exc())
        return Outcome(name, path, "failed", time.perf_counter() - t0,
                       error=f"import: {type(exc).__name__}: {exc}")
    run = getattr(mod, "run", None)
    if not callable(run):
        return Outcome(name, path, "failed", time.perf_counter() - t0, error=f"{path} has no run() function")
    try:
        rows = run(quick=quick, append=append)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return Outcome(name, path, "failed", time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    rows = list(rows or [])
    bad = [type(r).__name__ for r in rows if not isinstance(r, Row)]
    if bad:
        return Outcome(name, path, "failed", time.perf_counter() - t0,
                       error=f"run() returned {bad[0]} items, expected bench.harness.Row")
    return Outcome(name, path, "ok", time.perf_counter() - t0, rows=rows)


def combined_table(outcomes: Sequence[Outcome]) -> str:
    """One markdown table per capability that produced rows, in the order they ran."""
    parts = []
    for o in outcomes:
        groups: dict[str, list[Row]] = {}
        for r in o.rows:
            groups.setdefault(r.capability or o.name, []).append(r)
        for cap, rows in groups.items():
            parts.append(f"## {cap}\n\n{markdown_table(rows)}")
    return "\n\n".join(parts)


def status_table(outcomes: Sequence[Outcome]) -> str:
    lines = ["| benchmark | module | status | wall | CPU (this process) | rows | failed providers | error |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        fp = ", ".join(o.failed_providers) or "-"
        lines.append(f"| {o.name} | {o.module} | {o.status} | {o.seconds:.1f} s | {o.cpu_seconds:.1f} s | "
                     f"{len(o.rows)} | {fp} | {o.error or '-'} |")
    return "\n".join(lines)


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run: {', '.join(CAPABILITIES)} or a dotted module path "
                        "(default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: the whole suite in under 2 minutes")
    p.add_argument("--no-append", dest="append", action="store_false",
                   help="do not append the tables to BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write rows and status as JSON")
    p.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="library logging (-v info, -vv debug)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench") -> int:
    """Run the selected benchmarks; print the combined table and the status of each module (``prog``: the
    command as its messages name it, ``deepssim-fast bench`` from the command line tool)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        for name in CAPABILITIES:
            print(f"{name:<12} {module_for(name)}")
        return 0
    names = args.names or list(CAPABILITIES)
    try:
        for n in names:
            module_for(n)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json is not None and (args.json.is_dir() or str(args.json).endswith(("/", os.sep))):
        # (found when the run had finished: IsADirectoryError and a traceback, after minutes of benchmarks)
        print(f"{prog}: error: --json {args.json}: a folder; give the path of the JSON file to write",
              file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    elif args.verbose:  # (under `deepssim-fast bench`, whose handler came first: `bench ... -v` was ignored)
        logging.getLogger().setLevel(min(level, logging.getLogger().level))
    info = machine_info()
    print(f"# deepssim_fast benchmarks{' (quick)' if args.quick else ''} — {info['date']} · {info['cpu']} · "
          f"{info['cores']} cores · GPU {info['gpu']} · torch {info['torch']} · commit {info['commit']} · "
          f"native build: {info['native']}{'' if args.append else ' · not appended to BENCHMARKS.md'}")
    t0 = time.perf_counter()
    outcomes = []
    for n in names:
        print(f"\n== {n} ({module_for(n)})", flush=True)
        o = run_module(n, quick=args.quick, append=args.append)
        if o.status != "ok":
            print(f"   {o.status}: {o.error}", flush=True)
        outcomes.append(o)
    total = time.perf_counter() - t0
    print()
    table = combined_table(outcomes)
    if table:
        print(table)
        print()
    print(status_table(outcomes))
    n_ok = sum(o.status == "ok" for o in outcomes)
    print(f"\n{n_ok}/{len(outcomes)} benchmark modules ran in {total:.1f} s")
    if args.quick and total > QUICK_TARGET_S:
        slowest = sorted(outcomes, key=lambda o: -o.seconds)[:3]
        slow = ", ".join(f"{o.name} {o.seconds:.0f} s" for o in slowest)
        print(f"note: --quick took {total:.0f} s, over its {QUICK_TARGET_S:.0f} s target (slowest: {slow}); "
              f"on a shared machine compare CPU time, or rerun when it is quiet")
    if args.json is not None:
        from deepssim_fast._atomic import atomic_write_bytes

        atomic_write_bytes(args.json, _json_text({
            "machine": info, "quick": args.quick, "appended": args.append, "seconds": total,
            "modules": [{"name": o.name, "module": o.module, "status": o.status, "seconds": o.seconds,
                         "cpu_seconds": o.cpu_seconds,
                         "error": o.error, "failed_providers": o.failed_providers,
                         "rows": [r.as_dict() for r in o.rows]} for o in outcomes],
        }).encode())
    return 0 if n_ok == len(outcomes) else 1


def _json_text(obj: object) -> str:
    """``obj`` as strict JSON: NaN and infinities (a failed fit's slope in a row's ``extra``) become null,
    where json.dumps wrote the bare token NaN, which strict parsers refuse."""
    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, default=str, allow_nan=False)


if __name__ == "__main__":
    sys.exit(main())
