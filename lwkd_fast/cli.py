"""The ``lwkd-fast`` command line: ``info``, ``check``, ``bench`` and ``demo``.

Start-up is cheap: this module imports neither torch nor the package's API, so ``--help`` and
argument errors answer at once; a command imports what it needs when it runs.  ``bench`` and
``demo`` live in their own modules, imported only when that command is named (they register their
arguments and entry point with :func:`register_command`).

Every value is checked before any work starts.  A value that cannot be used ends the command with
ONE line on stderr naming the flag, the value and what is accepted, and exit status 2 (argparse's
own errors are cut to that one line too); a missing optional dependency names the extra to install
and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

PROG = "lwkd-fast"
# lwkd_fast.ops.BACKENDS, without importing torch; "cuda_emu" (the csrc/cuda kernels on the CPU,
# lwkd_fast.cuda_emu) is registered when `check --backend cuda_emu` asks for it
BACKEND_NAMES = ("reference", "native", "triton", "cuda_emu")


class UsageError(Exception):
    """A command-line value that cannot be used here; the message names the flag, the value and
    what is accepted.  Reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage block first: one line instead
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------------
# Argument types (no torch): each raises argparse.ArgumentTypeError with what is accepted
# ------------------------------------------------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is checked when the command runs)."""
    kind, sep, index = text.strip().lower().partition(":")
    if kind == "cpu" and not sep or kind == "cuda" and (not sep or index.isdigit()):
        return text.strip().lower()
    raise argparse.ArgumentTypeError(f"{text!r} is not accepted: expected cpu, cuda or cuda:N")


def output_file(text: str) -> str:
    """A file this process can create or overwrite (checked now, not after minutes of work)."""
    path = os.path.abspath(os.path.expanduser(text))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        problem = "it is a directory"
    elif not os.path.isdir(parent):
        problem = f"directory {parent} does not exist"
    elif not os.access(parent, os.W_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        problem = f"{'it' if os.path.exists(path) else 'directory ' + parent} is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not accepted: {problem}; expected a writable file path")


def require_device(flag: str, device: str):
    """The ``torch.device`` for a ``device_name`` value, or a UsageError when it is not here."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = ("this torch is a CPU-only build" if not torch.version.cuda
                   else "torch.cuda.is_available() is False")
            raise UsageError(f"{flag} {device!r}: no GPU is visible here ({why}; torch {torch.__version__}); "
                             "accepted here: cpu")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{flag} {device!r}: this machine has {count} GPU(s); accepted here: cpu, "
                             + ", ".join(["cuda"] + [f"cuda:{i}" for i in range(count)]))
    return dev


def missing_modules(needs: Sequence[Tuple[str, str]]) -> List[str]:
    """The pip names of the ``(import name, pip name)`` pairs that are not installed."""
    return [pip for mod, pip in needs if importlib.util.find_spec(mod) is None]


def write_json(path: Optional[str], obj) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)


# ------------------------------------------------------------------------------------------------
# What runs here, and why
# ------------------------------------------------------------------------------------------------

OP_FAMILIES = (("discrepancy ops", "attention_discrepancy"), ("rate rule + optimizer step", "layerwise_sgd_step"))


def _load_ops():
    """lwkd_fast.ops, imported on first use (the CLI starts without torch)."""
    from . import ops

    return ops


def requested_backend(ops) -> str:
    """``LWKD_BACKEND`` / ``use_backend``, or a UsageError naming the bad value."""
    try:
        return ops.requested_backend()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def backend_choice(op: str, device_type: str) -> Tuple[Optional[str], str]:
    """(backend that runs ``op`` on ``device_type`` now, why) -- backend None when nothing can."""
    import torch

    ops = _load_ops()
    requested = requested_backend(ops)
    if device_type == "cuda" and not torch.cuda.is_available():
        return None, "no GPU is visible here"
    try:
        chosen = ops.select_backend(op, torch.device(device_type))
    except RuntimeError as exc:  # a forced backend that cannot run
        return None, str(exc)
    if requested != "auto":
        return chosen, f"forced: {requested} (LWKD_BACKEND / use_backend)"
    if chosen == "native":
        return chosen, f"the {device_type.upper()} kernels of lwkd_fast._C"
    _, why_native = ops.backend_status("native", op, device_type)
    if chosen == "triton":
        return chosen, f"Triton kernels; native: {why_native}"
    why = f"native: {why_native}"
    if device_type == "cuda":
        why += f"; triton: {ops.backend_status('triton', op, device_type)[1]}"
    return chosen, why


def describe_backends(device_types: Sequence[str]) -> List[str]:
    """One line per (device, op family): which backend will run it and why."""
    lines = []
    for dev in device_types:
        for family, op in OP_FAMILIES:
            chosen, why = backend_choice(op, dev)
            lines.append(f"  {dev:<5} {family:<27} -> {chosen or 'nothing'}: {why}")
    return lines


def extension_line() -> str:
    ops = _load_ops()
    build = ops._C_BUILD
    if ops._C is not None:
        what = f"built against torch {build['torch']}" if build.get("torch") else "build record absent"
        cuda = "; CPU and CUDA kernels" if "CUDA" in ops.native_kernels().get("attention_discrepancy", []) else \
            f"; CPU kernels only: {ops._no_cuda_reason()}"
        return f"loaded from {ops._C.__file__} ({what}{cuda})"
    return f"NOT USED -- {ops._C_ERROR}"


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .benchmarking import cpu_name

    ops = _load_ops()
    print(f"lwkd_fast {__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no, a CPU-only build'}; "
          f"GPU visible: {torch.cuda.is_available()})")
    try:
        import triton

        tri = triton.__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure
        tri = f"not importable ({type(exc).__name__})"
    print(f"triton    {tri}  (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    print(f"cpu       {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(f"extension {extension_line()}")
    print(f"requested backend: {requested_backend(ops)} (LWKD_BACKEND / use_backend)")
    print("what runs here:")
    print("\n".join(describe_backends(["cpu", "cuda"])))
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
    write_json(args.json, {"version": __version__, "torch": torch.__version__, "extension_state": ops._C_STATE,
                           "extension_error": ops._C_ERROR, "build": ops._C_BUILD, "backends": info})
    return 0


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", action="append", type=device_name,
                   help="device to check: cpu, cuda or cuda:N (repeatable; default: cpu, and cuda if a GPU is visible)")
    p.add_argument("--backend", action="append", choices=BACKEND_NAMES,
                   help="backend to check (repeatable; default: every backend available here)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels on CPU tensors under the Triton interpreter")
    p.add_argument("--quiet", action="store_true", help="no progress dots")
    p.add_argument("--json", metavar="FILE", type=output_file, help="also write every case's result as JSON")


def cmd_check(args: argparse.Namespace) -> int:
    if args.interpret:
        # must happen before triton is imported anywhere
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    devices: List[str] = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for dev in devices:
        require_device("--device", dev)
    from . import check

    ops = _load_ops()
    if args.backend and "cuda_emu" in args.backend:
        from . import cuda_emu

        try:
            cuda_emu.load()  # builds once (a few minutes), then cached under build/cuda_emu
        except RuntimeError as exc:
            print(f"lwkd-fast check: --backend cuda_emu: {exc}", file=sys.stderr)
            return 2
    backends = args.backend or list(ops.BACKENDS)
    print(f"lwkd_fast._C: {extension_line()}")
    print("what runs here:")
    print("\n".join(describe_backends(sorted({torch.device(d).type for d in devices}))))
    print()
    skipped = []
    for dev in devices:
        for b in backends:
            ok, why = ops.backend_status(b, "attention_discrepancy", torch.device(dev).type)
            if not ok:
                skipped.append(f"{b} on {dev}: {why}")

    def progress(r):
        if not args.quiet:
            print("." if r.ok else "F", end="", flush=True)

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
    broken = ops._C_STATE == "broken"
    if broken:  # every case may pass on the reference backend, but the install is not what was built
        print(f"FAIL install: {ops._C_ERROR}; rebuild with `{ops._rebuild_hint()}`")
    write_json(args.json, [r.__dict__ for r in results])
    return 1 if failures or n == 0 or broken else 0


# ------------------------------------------------------------------------------------------------
# The command table
# ------------------------------------------------------------------------------------------------


@dataclass
class Command:
    help: str
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    run: Optional[Callable[[argparse.Namespace], int]] = None
    module: Optional[str] = None              # imported when the command is named; it registers itself
    needs: Tuple[Tuple[str, str], ...] = ()    # (import name, pip name) the command cannot run without
    extra: str = ""                            # the extra that installs them


COMMANDS: Dict[str, Command] = {
    "info": Command("versions, which backend runs here and why, what is not available and why",
                    _info_arguments, cmd_info),
    "check": Command("run every available backend against the float64 reference on this machine",
                     _check_arguments, cmd_check),
    "bench": Command("side-by-side benchmark of every kernel against what users would use instead",
                     module="lwkd_fast.bench"),
    "demo": Command("layer-wise distillation on sklearn's digits: accuracy table, rate trajectories, plot",
                    module="lwkd_fast.demo",
                    needs=(("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib")),
                    extra="demo"),
}


def register_command(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    """Called by a command's module when it is imported: its arguments and entry point."""
    cmd = COMMANDS.setdefault(name, Command(help))
    cmd.help, cmd.add_arguments, cmd.run = help, add_arguments, run


def _load(name: str) -> Command:
    cmd = COMMANDS[name]
    if cmd.run is None and cmd.module:
        importlib.import_module(cmd.module)
    return cmd


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's module is imported (its arguments are needed)."""
    parser = _Parser(
        prog=PROG,
        description="Fast derivative-matching kernels and layer-wise learning rates for knowledge distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == selected:
            cmd = _load(name)
            cmd.add_arguments(p)
            p.set_defaults(func=cmd.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and argument errors (2, one line)
        return exc.code if isinstance(exc.code, int) else 2
    cmd = COMMANDS[args.command]
    missing = missing_modules(cmd.needs)
    if missing:
        print(f"{PROG} {args.command}: needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
              f"not installed: pip install 'lwkd-fast[{cmd.extra}]'", file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (lwkd-fast info | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    # run through the package module, so that the commands' modules (which import lwkd_fast.cli)
    # register into the same COMMANDS table
    from lwkd_fast.cli import main as _main

    sys.exit(_main())
