"""The CUDA kernels are built and linked in every CI run, but no GPU is present to run them.

What can be asserted honestly without a GPU:

* the extension registers a CUDA kernel for every ``lwkd::`` op (when torch has CUDA and nvcc was
  found, the build must not have skipped CUDA silently);
* the shared object carries device code for sm_80 and sm_90 (SASS) plus PTX for newer GPUs, and
  every ``__global__`` kernel of csrc/cuda is in each SASS image (read from the ELF ``.nv_fatbin``
  section; cuobjdump is not needed);
* the CUDA unit's arithmetic is the shared one: it calls no math function of its own, only the
  helpers of csrc/common/lwkd_common.h, and every helper it calls is also called by the CPU
  kernels -- so the CPU tests execute the formulas the GPU kernels use;
* it includes the narrow headers only.

Running the kernels is left to ``lwkd-fast check`` on a GPU machine.
"""

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from lwkd_fast import ops

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CPU_SRC = ROOT / "csrc" / "cpu" / "discrepancy_cpu.cpp"
COMMON = ROOT / "csrc" / "common" / "lwkd_common.h"


def _nvcc_found() -> bool:
    if shutil.which("nvcc"):
        return True
    return any(os.path.exists(os.path.join(h, "bin", "nvcc"))
               for h in (os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda") if h)


CUDA_EXPECTED = bool(torch.version.cuda) and _nvcc_found() and os.environ.get("LWKD_NO_CUDA", "") in ("", "0")

requires_ext = pytest.mark.skipif(ops._C is None, reason=f"native extension not loaded: {ops._C_ERROR}")


# ------------------------------------------------------------------------------------------------
# Reading the .so: ELF sections and the CUDA fat binary
# ------------------------------------------------------------------------------------------------


def _elf_section(path: str, wanted: str):
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF shared object"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = headers[shstrndx][4]
    for h in headers:
        end = data.index(b"\0", stroff + h[0])
        if data[stroff + h[0]:end].decode() == wanted:
            return data[h[4]:h[4] + h[5]]
    return None


def _fatbin_entries(blob: bytes):
    """(kind, arch, payload) of every image: kind 1 = PTX, 2 = ELF (SASS).  Layout of the fat
    binary container: magic 0xBA55ED50, u16 version, u16 header size, u64 size, then entries with
    u16 kind, u16, u32 header size, u64 payload size, ..., u32 arch at offset 28."""
    out, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos += 8
            continue
        p = pos + hsize
        while p < pos + hsize + fsize:
            kind, _u, ehs, size = struct.unpack_from("<HHIQ", blob, p)
            (arch,) = struct.unpack_from("<I", blob, p + 28)
            out.append((kind, arch, blob[p + ehs:p + ehs + size]))
            p += ehs + size
        pos += hsize + fsize
    return out


def _kernel_names():
    names = set()
    for f in sorted(CUDA_DIR.glob("*.cu")):
        src = f.read_text()
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", src))
    return names


def _cuda_sources():
    return "\n".join(f.read_text() for f in sorted(CUDA_DIR.glob("*.cu*")))


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------


@requires_ext
def test_every_lwkd_op_has_a_cuda_kernel():
    if not CUDA_EXPECTED:
        pytest.skip("torch without CUDA, nvcc not found, or LWKD_NO_CUDA=1: CUDA kernels are not built")
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lwkd::"))
    assert set(f"lwkd::{op}" for op in ops.NATIVE_OPS) <= set(names)
    # ops without tensor arguments (cpu_buffer_pool) have one device-independent kernel instead
    missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
               and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CompositeExplicitAutograd")]
    assert not missing, f"lwkd ops without a CUDA kernel: {missing}"
    # and the dispatch layer sees them (the status reason is about the device, not the build)
    for op in ops.NATIVE_OPS:
        assert "CUDA" in ops.native_kernels()[op]


# ------------------------------------------------------------------------------------------------
# Device code in the shared object
# ------------------------------------------------------------------------------------------------


@requires_ext
def test_fatbin_has_sm80_sm90_and_every_kernel():
    if not CUDA_EXPECTED:
        pytest.skip("CUDA kernels are not built here")
    blob = _elf_section(ops._C.__file__, ".nv_fatbin")
    assert blob is not None, "the extension has no .nv_fatbin section: no device code was linked"
    entries = _fatbin_entries(blob)
    sass = {}  # one image per translation unit and arch: look at all of an arch's images together
    for kind, arch, payload in entries:
        if kind == 2:
            sass.setdefault(arch, []).append(payload)
    ptx = {arch for kind, arch, _ in entries if kind == 1}
    assert {80, 90} <= set(sass), f"SASS images for {sorted(sass)}; expected at least sm_80 and sm_90"
    assert ptx and max(ptx) >= 90, f"PTX for {sorted(ptx)}: newer GPUs need PTX of compute_90 or later"
    kernels = _kernel_names()
    assert len(kernels) >= 9, kernels
    for arch in (80, 90):
        images = [im for im in sass[arch] if im[:4] == b"\x7fELF"]  # compressed: names unreadable
        if not images:
            continue
        absent = sorted(k for k in kernels if not any(k.encode() in im for im in images))
        assert not absent, f"sm_{arch} image lacks kernels {absent}"


def _fatbin_ptx(entries) -> str:
    """Text of the embedded PTX (zstd-compressed by CUDA 13's fatbinary: decompressed with the
    zstd command-line tool; the container pads the frame, hence no return-code check)."""
    texts = []
    for kind, _arch, payload in entries:
        if kind != 1:
            continue
        if payload[:4] == b"\x28\xb5\x2f\xfd":
            zstd = shutil.which("zstd")
            if zstd is None:
                pytest.skip("the embedded PTX is zstd-compressed and the zstd tool is not installed")
            out = subprocess.run([zstd, "-d", "-c"], input=payload, capture_output=True).stdout
        else:
            out = payload
        texts.append(out.decode("utf-8", "replace"))
    return "\n".join(texts)


def _ptx_entries(ptx: str):
    """{mangled kernel name: body} of every .entry in the PTX."""
    out = {}
    for chunk in re.split(r"\n(?=(?:\.visible |\.weak )?\.entry )", ptx):
        m = re.match(r"(?:\.visible |\.weak )?\.entry (\S+)\(", chunk)
        if m:
            out[m.group(1)] = chunk
    return out


_VEC_LD = re.compile(r"ld\.global(?:\.nc)?\.(?:v4\.(?:f32|u32|b32|s32)|v2\.(?:f64|u64|b64))")
_VEC_ST = re.compile(r"st\.global(?:\.wb)?\.(?:v4\.(?:f32|u32|b32|s32)|v2\.(?:f64|u64|b64))")


@requires_ext
def test_cuda_ptx_vector_access_and_no_local_memory():
    """Static evidence for the access pattern, read from the PTX linked into the .so: every
    instantiation of a tile kernel issues 16-byte vector loads (the gradient kernels also vector
    stores), and no kernel has a local-memory frame -- the __grid_constant__ work tables are read
    in place rather than copied, and no array went to the stack."""
    if not CUDA_EXPECTED:
        pytest.skip("CUDA kernels are not built here")
    ptx = _fatbin_ptx(_fatbin_entries(_elf_section(ops._C.__file__, ".nv_fatbin")))
    assert ".entry" in ptx, "no kernel entries in the embedded PTX"
    entries = _ptx_entries(ptx)
    kernels = _kernel_names()
    for k in kernels:
        assert any(k in name for name in entries), f"kernel {k} is missing from the PTX"
    tile = {"attn_maps_kernel", "attn_grad_kernel", "map_stats_kernel", "map_terms_kernel", "map_proj_kernel",
            "map_grad_kernel"}
    for name, body in entries.items():
        family = next((k for k in kernels if k in name), None)
        assert "__local_depot" not in body, f"{family}: uses local memory ({name})"
        if family in tile:
            assert _VEC_LD.search(body), f"{family}: no 16-byte vector loads ({name})"
        if family in ("attn_grad_kernel", "map_grad_kernel"):
            assert _VEC_ST.search(body), f"{family}: no 16-byte vector stores ({name})"


# ------------------------------------------------------------------------------------------------
# The arithmetic is the shared one
# ------------------------------------------------------------------------------------------------

_RAW_MATH = re.compile(
    r"(?<![\w.])(?:std::)?(?:__)?(log|exp|sqrt|rsqrt|pow|log2|exp2|log1p|expm1|fabs)f?\s*\(")


def _common_helpers():
    src = COMMON.read_text()
    return set(re.findall(r"LWKD_HD\s+[\w:<>]+\s+(\w+)\s*\(", src))


def test_cuda_unit_calls_no_math_of_its_own():
    src = _strip_comments(_cuda_sources())
    assert '#include "common/lwkd_common.h"' in src
    raw = sorted(set(m.group(0) for m in _RAW_MATH.finditer(src)))
    assert not raw, f"CUDA sources call math functions directly instead of lwkd_common.h: {raw}"


def test_every_shared_helper_the_cuda_unit_uses_runs_on_the_cpu():
    helpers = _common_helpers()
    assert {"abs_pow", "abs_pow_grad", "jsd_term", "jsd_grad_ps", "sqdist_term", "sqdist_grad_q",
            "sqdist_grad_a", "sumnorm_grad_a", "softmax_grad_a", "clamp_eps", "passes_clamp"} <= helpers
    cuda = _strip_comments(_cuda_sources())
    cpu = _strip_comments(CPU_SRC.read_text())
    used = {h for h in helpers if re.search(rf"\b{h}\s*[<(]", cuda)}
    assert {"abs_pow", "abs_pow_grad", "jsd_term", "jsd_grad_ps", "sqdist_term", "sqdist_grad_q",
            "sqdist_grad_a", "sumnorm_grad_a", "softmax_grad_a"} <= used
    not_on_cpu = sorted(h for h in used if not re.search(rf"\b{h}\s*[<(]", cpu))
    assert not not_on_cpu, f"helpers used by the CUDA kernels but never by the CPU kernels: {not_on_cpu}"


def test_cuda_unit_uses_narrow_headers():
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", _cuda_sources())
    for banned in ("torch/extension.h", "ATen/cuda/CUDAContext.h", "ATen/ATen.h"):
        assert banned not in includes, f"{banned} multiplies compile time; include narrow headers"
    for needed in ("c10/cuda/CUDAStream.h", "c10/cuda/CUDAGuard.h", "torch/library.h"):
        assert needed in includes
