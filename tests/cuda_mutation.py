"""Mutation test of the CUDA test suite: inject realistic bugs into copies of csrc/cuda, one at a
time, build each mutant with the CPU execution layer (lwkd_fast.cuda_emu) and check that the
emulated tests catch it.

    python tests/cuda_mutation.py            # every mutant, a table at the end
    python tests/cuda_mutation.py -k sync    # the mutants whose name contains "sync"
    python tests/cuda_mutation.py --list

Each mutant runs the `cuda_emu` tests of the kernel test modules (the three schedules) and, when
they pass, the sanitizer build's grid (misaligned vector accesses and out-of-bounds reads or
writes that x86 tolerates only the sanitizer sees).  A mutant is caught when either run fails.
The mutants share one build directory, so ninja recompiles only the mutated translation unit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "cuda_mutants"
SUITE = ["tests/test_discrepancy.py", "tests/test_optim.py", "tests/test_rule.py", "tests/test_empty_inputs.py",
         "tests/test_cuda_emu.py::test_every_kernel_in_csrc_cuda_executes"]
SANITIZER_SUITE = ["tests/test_cuda_emu.py::test_sanitizer_build_runs_the_kernel_grid_clean"]


@dataclass
class Mutant:
    name: str
    file: str
    old: str
    new: str
    why: str
    also: tuple = ()  # further (old, new) edits of the same file, for a bug that takes two


MUTANTS = [
    Mutant("block_reduce-no-leading-sync", "device_utils.cuh",
           "  __syncthreads();  // smem may still be read by a previous reduction\n", "\n",
           "block_reduce writes smem while another warp may still read the previous reduction"),
    Mutant("block_reduce-no-trailing-sync", "device_utils.cuh",
           "  if (lane == 0) smem[warp] = v;\n  __syncthreads();\n", "  if (lane == 0) smem[warp] = v;\n\n",
           "block_reduce reads the warp partials before every warp wrote its own"),
    Mutant("warp_reduce-skips-offset-1", "device_utils.cuh",
           "for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));",
           "for (int off = 16; off > 1; off >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, off));",
           "the warp reduction skips the last shuffle offset"),
    Mutant("load8-tail-off-by-one", "device_utils.cuh",
           "for (int j = 0; j < kVec; ++j) out[j] = j < valid ? to_acc<acc_t>(p[j]) : acc_t(0);",
           "for (int j = 0; j < kVec; ++j) out[j] = j <= valid ? to_acc<acc_t>(p[j]) : acc_t(0);",
           "the tail mask of the 8-element load reads one element too many"),
    Mutant("feat-vec-no-stride-check", "discrepancy_cuda.cu",
           "f.vec = base_ok && ((f.layout == kPosContig && (C == 1 || f.sc % unit == 0)) ||",
           "f.vec = aligned16(f.ptr) || ((f.layout == kPosContig && (C == 1 || f.sc % unit == 0)) ||",
           "the stride checks before the 16-byte vector loads are dropped"),
    Mutant("grad-store-no-alignment-check", "discrepancy_cuda.cu",
           "const bool vec = fx.vec != 0 && fg.vec != 0;", "const bool vec = fx.vec != 0;",
           "the gradient buffer's alignment is not checked before 16-byte stores"),
    Mutant("chan-shuffle-skips-offset", "discrepancy_cuda.cu",
           "for (int off = G >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);",
           "for (int off = G >> 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);",
           "the channels_last lane-group reduction skips its first offset"),
    Mutant("attn-tile-tail-short", "discrepancy_cuda.cu",
           "r.cnt = static_cast<int>(L.chunk < L.N - r.i0 ? L.chunk : L.N - r.i0);",
           "r.cnt = static_cast<int>(L.chunk < L.N - r.i0 ? L.chunk : L.N - r.i0 - 1);",
           "the last attention tile of a sample drops its last position"),
    # (either barrier alone is redundant: the scratch is used only with several channel groups,
    # which means one pass of the tile loop, and that pass ends with a barrier -- so both go)
    Mutant("attn-maps-no-sync-between-tensors", "discrepancy_cuda.cu",
           "    chan_mean_tile<decltype(tag), acc_t, M>(L.x, tl.b, tl.i0, tl.cnt, p, ms, sc);\n  });\n  __syncthreads();\n",
           "    chan_mean_tile<decltype(tag), acc_t, M>(L.x, tl.b, tl.i0, tl.cnt, p, ms, sc);\n  });\n\n",
           "student and teacher channel reductions share the scratch without a barrier",
           also=(("            out[base + e] = s * inv_c;\n          }\n        }\n        __syncthreads();\n",
                  "            out[base + e] = s * inv_c;\n          }\n        }\n\n"),)),
    Mutant("map-rows-bound-off-by-one", "discrepancy_cuda.cu",
           "if (row >= P.num_layers * P.B) return;", "if (row > P.num_layers * P.B) return;",
           "one thread too many writes a per-sample value past the end"),
    Mutant("rule-tree-no-sync", "optim_cuda.cu",
           "      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + w];\n    }\n    __syncthreads();\n",
           "      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + w];\n    }\n\n",
           "the rule's tree reduction has no barrier between levels"),
    Mutant("step-vector-tail", "optim_cuda.cu",
           "    const bool v = vec && i + kIlp <= n;\n    op_t rp[kIlp], rg[kIlp], rb[kIlp];",
           "    const bool v = vec && i < n;\n    op_t rp[kIlp], rg[kIlp], rb[kIlp];",
           "the SGD step uses a 4-wide vector access across the end of a tensor"),
    Mutant("adamw-empty-call-early-return", "optim_cuda.cu",
           "  // no early return when every tensor is empty: AdamW still counts the step of each parameter\n",
           "  if (tasks.empty()) return;\n",
           "the review bug: a call whose tensors are all empty returns before counting the AdamW step"),
    Mutant("bump-ignores-skip-flag", "optim_cuda.cu",
           "  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: counts stay",
           "  // (skip flag dropped)",
           "the AdamW step count is bumped on a skipped step"),
]


def run(cmd, env, log):
    t0 = time.time()
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return r.returncode, time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-sanitizer", action="store_true", help="skip the sanitizer run of uncaught mutants")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.file:22s} {m.why}")
        return 0
    src = WORK / "src" / "cuda"
    pristine = ROOT / "csrc" / "cuda"
    env = dict(os.environ, LWKD_EMU_CUDA_DIR=str(src), LWKD_EMU_BUILD_DIR=str(WORK / "build"), PYTHONUNBUFFERED="1")
    rows = []
    for m in chosen:
        if src.exists():
            shutil.rmtree(src)
        shutil.copytree(pristine, src)
        target = src / m.file
        text = target.read_text()
        edits = ((m.old, m.new),) + tuple(m.also)
        if any(text.count(old) != 1 for old, _ in edits):
            rows.append((m.name, "STALE (the mutated text is not in the source once)", 0.0))
            print(f"{m.name}: stale", flush=True)
            continue
        for old, new in edits:
            text = text.replace(old, new)
        target.write_text(text)
        log = WORK / f"{m.name}.log"
        code, secs = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "cuda_emu", *SUITE],
                         env, log)
        verdict = "caught by the emulated tests" if code not in (0, 5) else None
        if verdict is None and not args.no_sanitizer:
            code2, secs2 = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *SANITIZER_SUITE],
                               env, WORK / f"{m.name}.sanitizer.log")
            secs += secs2
            verdict = "caught by the sanitizer build" if code2 not in (0, 5) else None
        rows.append((m.name, verdict or "NOT CAUGHT", secs))
        print(f"{m.name}: {verdict or 'NOT CAUGHT'} ({secs:.0f} s; log {log})", flush=True)
    shutil.rmtree(src, ignore_errors=True)
    caught = sum(1 for _, v, _ in rows if v.startswith("caught"))
    print(f"\n{'mutant':36s} result")
    for name, verdict, secs in rows:
        print(f"{name:36s} {verdict} ({secs:.0f} s)")
    print(f"\ncaught {caught} of {len(rows)} mutants")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
