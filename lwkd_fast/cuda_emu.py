"""The CUDA execution layer for the CPU: runs the unmodified ``csrc/cuda`` kernels with CUDA
semantics on a machine without a GPU (docs/ARCHITECTURE.md, "CUDA execution layer").

:func:`load` rewrites the CUDA sources mechanically (nothing a kernel computes changes), compiles
them as C++ against ``csrc/emu`` (the device model: a fiber per CUDA thread, block barriers and
warp collectives that fail on divergence, poisoned shared memory, launch checks, schedule
fuzzing), loads the result as the operator library ``torch.ops.lwkd_emu.*`` (the schemas of
``csrc/ops.cpp``, CPU tensors in and out) and registers it as the backend ``"cuda_emu"``, so that
``lwkd_fast.use_backend("cuda_emu")`` runs every op through the CUDA kernels:

    >>> from lwkd_fast import cuda_emu
    >>> cuda_emu.load()                       # builds once (about a minute), then cached
    >>> with lw.use_backend("cuda_emu"):
    ...     D = lw.attention_discrepancy(s, t)   # attn_maps_kernel, attn_rows_fwd_kernel, ...

Variants: ``"default"`` and ``"sanitize"`` (AddressSanitizer plus UBSan's alignment, bounds,
null, shift and overflow checks, so a misaligned 16-byte access traps where the GPU raises a
misaligned-address error).  The sanitizer build only loads into a process started with the ASan
runtime preloaded (:func:`sanitizer_env`).

Schedules (``LWKD_EMU_SCHEDULE`` or :func:`schedule`): ``default`` runs the runnable thread of
lowest index first, ``reverse`` the highest, ``random:SEED`` a random one, and the blocks of a
grid in ascending, descending or random order; a result that changes with the schedule is a race.

This needs a source checkout (the ``csrc/`` tree next to the package) and a C++ compiler; it is
a verification tool, not a runtime backend.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

__all__ = ["BACKEND", "NAMESPACE", "load", "loaded", "schedule", "stats", "kernels_in_sources",
           "rewrite_cuda_source", "rewrite_schema_source", "sanitizer_env", "source_root"]

BACKEND = "cuda_emu"
NAMESPACE = "lwkd_emu"
VARIANTS = ("default", "sanitize")
_REWRITER_VERSION = "1"

_FLAGS = {
    "default": ["-O2", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
                "-Wno-sign-compare"],
    "sanitize": ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-math-errno", "-Wno-unknown-pragmas",
                 "-fsanitize=address,alignment,bounds,null,shift,signed-integer-overflow,vla-bound,return",
                 "-fno-sanitize-recover=all"],
}
_LDFLAGS = {
    "default": [],
    "sanitize": ["-fsanitize=address,alignment,bounds,null,shift,signed-integer-overflow,vla-bound,return"],
}

_loaded: Optional[str] = None


# ------------------------------------------------------------------------------------------------
# Source rewriting (mechanical; line numbers are preserved so every diagnostic names the
# original file and line)
# ------------------------------------------------------------------------------------------------


def _code_mask(src: str) -> List[bool]:
    """True for characters outside comments and string/character literals."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _finds(src: str, pattern: str, mask: List[bool]) -> List[re.Match]:
    return [m for m in re.finditer(pattern, src) if mask[m.start()]]


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression (``name``, ``ns::name``, ``name<T, U>``) ending at ``end``."""
    j = end
    while j > 0 and src[j - 1].isspace():
        j -= 1
    if j > 0 and src[j - 1] == ">":  # template arguments
        depth, k = 0, j - 1
        while k >= 0:
            if src[k] == ">":
                depth += 1
            elif src[k] == "<":
                depth -= 1
                if depth == 0:
                    break
            k -= 1
        j = k
        while j > 0 and src[j - 1].isspace():
            j -= 1
    k = j
    while k > 0 and (src[k - 1].isalnum() or src[k - 1] in "_:"):
        k -= 1
    if k == j:
        raise ValueError(f"cuda_emu: no kernel name before the launch at offset {end}")
    return k


def _rewrite_launches(src: str) -> Tuple[str, int]:
    out, pos, count = [], 0, 0
    mask = _code_mask(src)
    for m in _finds(src, r"<<<", mask):
        if m.start() < pos:
            continue
        close = src.find(">>>", m.end())
        if close < 0:
            raise ValueError("cuda_emu: unterminated <<<...>>> launch")
        start = _kernel_start(src, m.start())
        kernel = src[start:m.start()].rstrip()
        name = " ".join(kernel.split()).replace('"', '\\"')
        config = src[m.end():close]
        out.append(src[pos:start])
        out.append(f'::lwkd_emu::launcher({kernel}, "{name}", __FILE__, __LINE__, {config})')
        pos = close + 3
        count += 1
    out.append(src[pos:])
    return "".join(out), count


def _rewrite_shared(src: str) -> Tuple[str, int]:
    out, pos, count = [], 0, 0
    mask = _code_mask(src)
    for m in _finds(src, r"\b__shared__\b", mask):
        if m.start() < pos:
            continue
        ext = re.search(r"\bextern\s+$", src[max(0, m.start() - 40):m.start()])
        depth, j = 0, m.end()
        while j < len(src):
            ch = src[j]
            if mask[j]:
                if ch in "{([":
                    depth += 1
                elif ch in "})]":
                    depth -= 1
                elif ch == ";" and depth == 0:
                    break
            j += 1
        decl = src[m.end():j]
        core = decl.rstrip()
        while core.endswith("]"):  # drop the array bounds
            core = core[:core.rindex("[")].rstrip()
        name = re.search(r"([A-Za-z_]\w*)\s*$", core)
        if name is None:
            raise ValueError(f"cuda_emu: cannot find the name of the __shared__ declaration {decl.strip()!r}")
        var = name.group(1)
        if ext:
            elem = core[:name.start()].strip()
            begin = m.start() - len(ext.group(0))
            out.append(src[pos:begin])
            out.append(f"{elem}* {var} = LWKD_EMU_DYNAMIC_SHARED({elem})")
        else:
            out.append(src[pos:m.start()])
            out.append(f"static{decl}; LWKD_EMU_SHARED({var})")
        pos = j  # the ';' is kept
        count += 1
    out.append(src[pos:])
    return "".join(out), count


_SIMPLE = [
    (r"TORCH_LIBRARY_IMPL\(\s*lwkd\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,"),
    (r"\.is_cuda\(\)", ".is_cpu()"),
    (r"pinned_memory\(\s*true\s*\)", "pinned_memory(false)"),
]


def rewrite_cuda_source(src: str, path: str) -> Tuple[str, Dict[str, int]]:
    """The C++ of one ``csrc/cuda`` file for the CPU execution layer, and what was rewritten."""
    counts: Dict[str, int] = {}
    src, counts["launches"] = _rewrite_launches(src)
    src, counts["shared"] = _rewrite_shared(src)
    for pattern, repl in _SIMPLE:
        src, counts[pattern] = re.subn(pattern, repl, src)
    return f'#line 1 "{path}"\n' + src, counts


def rewrite_schema_source(src: str, path: str = "csrc/ops.cpp") -> str:
    """``csrc/ops.cpp`` with its schemas defined for the ``lwkd_emu`` namespace."""
    src, n = re.subn(r"TORCH_LIBRARY\(\s*lwkd\s*,", f"TORCH_LIBRARY({NAMESPACE},", src)
    if n != 1:
        raise ValueError(f"cuda_emu: expected one TORCH_LIBRARY(lwkd, m) block in {path}, found {n}")
    src = re.sub(r"m\.set_python_module\([^)]*\);", "", src)
    src = src.replace("PyInit__C", "PyInit__lwkd_emu_schemas")
    return f'#line 1 "{path}"\n' + src


def kernels_in_sources(cuda_dir: Optional[Path] = None) -> List[str]:
    """Names of every ``__global__`` function in ``csrc/cuda`` (what the emulated tests must run)."""
    cuda_dir = Path(cuda_dir or source_root() / "csrc" / "cuda")
    names = set()
    for f in sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.cuh")):
        src = f.read_text()
        mask = _code_mask(src)
        for m in _finds(src, r"\b__global__\b", mask):
            head = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", src[m.end():m.end() + 400])
            names.add(re.findall(r"[A-Za-z_]\w*", head[:head.index("(")])[-1])
    return sorted(names)


# ------------------------------------------------------------------------------------------------
# Build and load
# ------------------------------------------------------------------------------------------------


def source_root() -> Path:
    """The source checkout that holds ``csrc/`` (the parent of the package directory)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "csrc" / "cuda").is_dir() or not (root / "csrc" / "emu").is_dir():
        raise RuntimeError(
            f"lwkd_fast.cuda_emu needs a source checkout: {root / 'csrc'} with cuda/ and emu/ was not found "
            "(install the package from a clone with `pip install -e .`)"
        )
    return root


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return  # keep the timestamp: ninja rebuilds only what changed
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def generate(out: Path, cuda_dir: Optional[Path] = None, root: Optional[Path] = None) -> List[Path]:
    """Write the rewritten sources under ``out`` and return the translation units to compile."""
    root = root or source_root()
    cuda_dir = Path(cuda_dir or root / "csrc" / "cuda")
    units = []
    files = [(f, "cuda") for f in sorted(cuda_dir.iterdir())]
    files.append((root / "csrc" / "emu" / "selftest.cu", "emu"))  # the layer's own test kernels
    for f, sub in files:
        if f.suffix not in (".cu", ".cuh"):
            continue
        rel = f"csrc/{sub}/{f.name}"
        text, counts = rewrite_cuda_source(f.read_text(), rel)
        dest = out / sub / (f.stem + (".cpp" if f.suffix == ".cu" else ".cuh"))
        _write_if_changed(dest, text)
        if f.suffix == ".cu":
            if counts["launches"] == 0 and "__global__" in text:
                raise ValueError(f"cuda_emu: {rel} defines kernels but no launch was found")
            units.append(dest)
    schema = out / "ops_emu.cpp"
    _write_if_changed(schema, rewrite_schema_source((root / "csrc" / "ops.cpp").read_text()))
    return [schema] + units + [root / "csrc" / "emu" / "runtime.cpp"]


def _digest(*parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        for p in part:
            h.update(p.encode())
            h.update(b"\0")
    return h.hexdigest()[:12]


def build(variant: str = "default", *, cuda_dir: Optional[Path] = None, build_root: Optional[Path] = None,
          verbose: bool = False) -> str:
    """Build (incrementally) and load the emulated library; returns the path of the shared object.

    ``cuda_dir`` replaces ``csrc/cuda`` (the mutation script builds mutated copies)."""
    if variant not in VARIANTS:
        raise ValueError(f"cuda_emu.build: unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    from torch.utils import cpp_extension

    root = source_root()
    key = _digest([variant, _REWRITER_VERSION, torch.__version__, str(cuda_dir or "")], _FLAGS[variant])
    base = Path(build_root or os.environ.get("LWKD_EMU_BUILD_DIR") or root / "build" / "cuda_emu")
    bdir = base / f"{variant}-{key}"
    gen = bdir / "gen"
    sources = generate(gen, cuda_dir, root)
    name = f"lwkd_emu_{variant}_{key}"
    preload = os.environ.pop("LD_PRELOAD", None)  # the compilers need no ASan runtime
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(gen), str(root / "csrc" / "emu" / "shim"), str(root / "csrc")],
            extra_cflags=_FLAGS[variant],
            extra_ldflags=_LDFLAGS[variant],
            build_directory=str(bdir),
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def load(variant: str = "default", *, cuda_dir: Optional[Path] = None, verbose: bool = False) -> str:
    """Build if needed, load ``torch.ops.lwkd_emu`` and register the ``"cuda_emu"`` backend.

    Idempotent within a process; one variant per process."""
    global _loaded
    if _loaded is not None:
        if _loaded != variant:
            raise RuntimeError(f"cuda_emu.load: the {_loaded!r} variant is already loaded in this process")
        return _loaded
    if variant == "sanitize" and "asan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("cuda_emu.load('sanitize') needs the ASan runtime preloaded: run the process with "
                           "the environment of lwkd_fast.cuda_emu.sanitizer_env()")
    build(variant, cuda_dir=cuda_dir, verbose=verbose)
    from . import ops

    ops.register_native_backend(BACKEND, NAMESPACE, device_types=("cpu",))
    _loaded = variant
    return variant


def loaded() -> Optional[str]:
    """The variant loaded in this process, or None."""
    return _loaded


def schedule(value: str = "") -> str:
    """Set (``"default"``, ``"reverse"``, ``"random"``, ``"random:SEED"``) or query (``""``) the
    thread and block schedule of the emulated launches; returns the one in use."""
    return torch.ops.lwkd_emu._emu_schedule(value)


def stats(reset: bool = False) -> Dict[str, Tuple[int, int, int]]:
    """``{kernel: (launches, blocks, threads)}`` since the last reset."""
    out = {}
    for line in torch.ops.lwkd_emu._emu_stats(reset).splitlines():
        parts = line.split()
        if len(parts) == 4:
            out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return out


def sanitizer_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a process that loads the ``"sanitize"`` variant: the ASan runtime
    preloaded, leak checks off (the Python interpreter is not instrumented), aborting on the
    first report."""
    env = dict(os.environ if base is None else base)
    libs = []
    # libstdc++ right after the ASan runtime: otherwise ASan's __cxa_throw interceptor finds no
    # real __cxa_throw (python does not link libstdc++) and the first C++ exception aborts
    for lib in ("libasan.so", "libstdc++.so"):
        path = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                              check=True).stdout.strip()
        if not os.path.isabs(path):
            raise RuntimeError(f"cuda_emu: the compiler has no {lib} (install the ASan runtime of g++)")
        libs.append(os.path.realpath(path))
    env["LD_PRELOAD"] = ":".join(libs)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


if __name__ == "__main__":  # python -m lwkd_fast.cuda_emu [variant]: build and list the kernels
    v = sys.argv[1] if len(sys.argv) > 1 else "default"
    print(build(v, verbose=True))
    print("kernels:", ", ".join(kernels_in_sources()))
