"""The ``deepssim-fast`` command line. Every subcommand calls the public API; printing happens here only."""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _cmd_doctor(args: argparse.Namespace) -> int:
    import numpy
    import torch

    from . import __version__
    from .backends import backends

    info = backends()
    if args.json:
        print(json.dumps({"deepssim_fast": __version__, "python": platform.python_version(),
                          "numpy": numpy.__version__, "torch": torch.__version__, "backends": info}, indent=2))
        return 0
    print(f"deepssim_fast {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
          f"torch {torch.__version__}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    nat = info["native"]
    if nat["available"]:
        print(f"native : yes  simd={nat['simd']} (cpu supports {nat['detected_simd']})  threads={nat['threads']}  "
              f"capabilities={','.join(nat['capabilities']) or '-'}")
    else:
        print("native : NO  (the C++ extension did not import; reinstall from source)")
    print(f"torch  : yes  threads={info['torch']['threads']}")
    tr = info["triton"]
    print(f"triton : {'yes' if tr['available'] else 'no'}  version={tr['version']}  mode={tr['mode']}")
    print(f"cuda   : {', '.join(info['cuda']) if info['cuda'] else 'no CUDA device'}")
    print(f"cupy   : {info['cupy'] or 'not installed (optional: pip install deepssim_fast[cupy])'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepssim-fast", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="print the usable backends and versions")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"deepssim-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
