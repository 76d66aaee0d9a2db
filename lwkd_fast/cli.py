"""The ``lwkd-fast`` command line: ``info``, ``check`` (and the commands other modules add)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Optional


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, ops
    from .benchmarking import cpu_name

    print(f"lwkd_fast {__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; "
          f"GPU visible: {torch.cuda.is_available()})")
    try:
        import triton

        tri = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure
        tri = f"not importable ({type(exc).__name__})"
    print(f"triton    {tri}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    print(f"cpu       {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    if ops._C is not None:
        print(f"extension {ops._C.__file__}")
    else:
        print(f"extension not loaded: {ops._C_ERROR}")
    print(f"requested backend: {ops.requested_backend()} (LWKD_BACKEND / use_backend)")
    print()
    info = ops.backends()
    print(f"{'backend':<10} {'available':<10} {'devices':<12} reason")
    for name, st in info.items():
        print(f"{name:<10} {str(st['available']):<10} {','.join(st['devices']) or '-':<12} {st['reason'] or ''}")
    kernels = info["native"].get("kernels", {})
    if kernels:
        print()
        print("native kernels (op: dispatch keys)")
        for op, keys in kernels.items():
            print(f"  lwkd::{op:<34} {', '.join(keys) or 'none'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"version": __version__, "torch": torch.__version__, "backends": info}, fh, indent=2)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.interpret:
        # must happen before triton is imported anywhere
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from . import check, ops

    devices: List[str] = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    backends = args.backend or list(ops.BACKENDS)
    for b in backends:
        if b not in ops.BACKENDS:
            print(f"unknown backend {b!r}; expected one of {', '.join(ops.BACKENDS)}", file=sys.stderr)
            return 2
    skipped = []
    for dev in devices:
        for b in backends:
            ok, why = ops.backend_status(b, "attention_discrepancy", torch.device(dev).type)
            if not ok:
                skipped.append(f"{b} on {dev}: {why}")

    def progress(r):
        if not args.quiet:
            mark = "." if r.ok else "F"
            print(mark, end="", flush=True)

    results = check.run_checks(devices, backends, progress=progress)
    if not args.quiet:
        print()
    print(check.format_table(results))
    for s in skipped:
        print(f"skipped: {s}")
    failures = [r for r in results if not r.ok]
    for r in failures:
        print(f"\nFAIL {r.op} [{r.backend}/{r.device}/{r.dtype}] {r.label}: {r.error or ''}")
        for k, v in r.verdicts.items():
            print(f"    {k}: {v}")
    n = len(results)
    print(f"\n{n - len(failures)}/{n} cases passed" + ("" if not failures else f", {len(failures)} FAILED"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([r.__dict__ for r in results], fh, indent=2, default=str)
    return 1 if failures or n == 0 else 0


# Other modules register sub-commands here: name -> (help, add_arguments(parser), run(args) -> int)
COMMANDS: Dict[str, tuple] = {}


def register_command(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    COMMANDS[name] = (help, add_arguments, run)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lwkd-fast",
        description="Fast derivative-matching kernels and layer-wise learning rates for knowledge distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, backends available here and why not")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="run every available backend against the float64 reference")
    p.add_argument("--device", action="append", help="device to check (repeatable; default: cpu and cuda if present)")
    p.add_argument("--backend", action="append", help="backend to check (repeatable; default: all available)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels on CPU tensors under the Triton interpreter")
    p.add_argument("--quiet", action="store_true", help="no progress dots")
    p.add_argument("--json", metavar="FILE", help="also write every case's result as JSON")
    p.set_defaults(func=cmd_check)

    _load_command_modules()
    for name, (help_, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


# modules that contribute sub-commands (demo, bench); absent ones are skipped
COMMAND_MODULES = ("lwkd_fast.demo", "lwkd_fast.bench")


def _load_command_modules() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def main(argv: Optional[List[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    # run through the package module so that sub-commands registered by other modules (which
    # import lwkd_fast.cli) land in the same COMMANDS table
    from lwkd_fast.cli import main as _main

    sys.exit(_main())
