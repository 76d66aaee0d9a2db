"""Compile the Triton kernels of lwkd_fast ahead of time for real GPU targets, without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so GPU-only errors (what the
code generator rejects, what LLVM or ptxas cannot lower) are invisible to it.  This script runs
the real host code of every op (attention and map discrepancy forward and backward, the rate
rule, the SGD and AdamW steps) on CPU tensors with the interpreter OFF, records every launch it
would make (kernel, argument types, compile-time constants, num_warps) at the package's one
launch entry point (lwkd_fast.triton._common.launch) instead of launching, and compiles the
variants to cubins for the requested targets (Triton's bundled ptxas; no driver needed).

Which variants: the cases below launch more variants than it takes to compile every code path
once (about 1 s of compiler time each, per target).  A variant is described by its compile-time
constants that choose code (dtypes, layouts, metric, power, store mode, ...; not the block sizes
and divisibility hints, which only tune), and the script compiles the fewest recorded variants
(greedily) such that, for every kernel, every value of such a constant, every pairing of a dtype
constant with another such constant's value, and both the aligned and the unaligned form of the
tile kernels (16-byte divisibility hints, or none) that the cases produce is compiled.

It reports per variant whether the PTX holds 128-bit vector loads / stores (ld/st.global.v4):
the aligned cases below must get them on their tile kernels (the divisibility hints work); and
which float32 square roots and divisions it uses (approximate ``sqrt.approx`` / ``div.full`` or
correctly rounded ``sqrt.rn`` / ``div.rn``): the AdamW step must use the correctly rounded ones.

Usage: python tests/triton_aot_compile.py [--shard I/N] 80 90
Output: one JSON object per compiled variant ({"arch", "kernel", "aligned", "vector_loads",
"vector_stores", "approx_f32", "ieee_sqrt_f32", "ieee_div_f32", "constexprs"}), then a line
"DONE <variants compiled> <variants selected> <variants recorded>".  With ``--shard I/N`` the
process compiles every N-th selected variant starting at I, so N processes share the work.
Run by tests/test_triton.py::test_kernels_compile_for_gpu_targets in subprocesses, because the
test process itself runs under TRITON_INTERPRET=1.
"""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from lwkd_fast.triton import _common  # noqa: E402
from lwkd_fast.triton import discrepancy as D  # noqa: E402
from lwkd_fast.triton import optim as O  # noqa: E402

# compile-time constants that only tune (sizes, divisibility hints), not choose code
TUNING_SUFFIXES = ("_DIV", "_ALIGN", "KPAD", "MAXC", "BLOCK", "BLOCK_N", "BLOCK_C")
DTYPE_CONSTANTS = ("S_DT", "T_DT", "DT", "M_F64", "FAC_F64")
OPTIONS = ("num_warps",)


def record_launches():
    """[(kernel, signature, constexprs, options)] of every distinct launch of the cases."""
    recorded = {}

    def fake_launch(kernel, grid, *args, **kw):
        options = {k: kw.pop(k) for k in OPTIONS if k in kw}
        sig = {name: mangle_type(a) for name, a in zip(kernel.arg_names, args)}
        sig.update({name: "constexpr" for name in kw})
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in kw.items())),
               tuple(sorted(options.items())))
        recorded.setdefault(key, (kernel, sig, dict(kw), options))

    _common.launch = fake_launch
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    _discrepancy_cases(r)
    _optim_cases(r)
    return list(recorded.values())


def _discrepancy_cases(r):
    cases = [
        (torch.float32, dict(p=2.0, metric="at", normalize="sum"), False),
        (torch.float16, dict(p=1.5, metric="at", normalize="sum"), True),
        (torch.bfloat16, dict(p=1.0, metric="jsd", normalize="sum"), True),
        (torch.float64, dict(p=2.0, metric="jsd", normalize="softmax"), False),
    ]
    for dtype, cfg, cl in cases:
        s = [r(2, 3, 4, 5, dtype=dtype), r(2, 6, 3, 3, dtype=dtype)[:, ::2]]
        t = [r(2, 2, 4, 5, dtype=dtype), r(2, 4, 3, 3, dtype=dtype)]
        if cl:
            s[0] = s[0].to(memory_format=torch.channels_last)
        s = [x.requires_grad_() for x in s]
        d = D.attention_discrepancy(s, t, cfg["p"], cfg["metric"], 0.5, cfg["normalize"], 0.7, 1e-12, 1)
        torch.autograd.grad(d.sum(), s)
    for dtype, metric in ((torch.float32, "cos"), (torch.bfloat16, "jsd"), (torch.float64, "cos"),
                          (torch.float16, "jsd")):
        u = [r(2, 3, 7, dtype=dtype).requires_grad_()]
        d = D.map_discrepancy(u, [r(2, 3, 7, dtype=dtype)], metric, 0.5, 1e-12)
        torch.autograd.grad(d.sum(), u)
    # aligned shapes (16-byte aligned samples, channels and positions): vector loads expected
    for dtype in (torch.float32, torch.bfloat16):
        s = [r(2, 32, 8, 8, dtype=dtype).requires_grad_(),
             r(2, 64, 4, 4, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()]
        t = [r(2, 16, 8, 8, dtype=dtype), r(2, 32, 4, 4, dtype=dtype).to(memory_format=torch.channels_last)]
        d = D.attention_discrepancy(s, t, 2.0, "at", 0.5, "sum", 1.0, 1e-12, 1)
        torch.autograd.grad(d.sum(), s)
        u = [r(2, 3, 16, 16, dtype=dtype).requires_grad_()]
        d = D.map_discrepancy(u, [r(2, 3, 16, 16, dtype=dtype)], "cos", 0.5, 1e-12)
        torch.autograd.grad(d.sum(), u)


def _optim_cases(r):
    K = 3
    d = r(K).abs()
    # the rule: counter, scalar rate, gamma 1 / per-layer rate tensor, gamma 0.5, float64 state,
    # skip flag / gamma 0
    O.layerwise_rates(d, torch.ones(K), torch.zeros(1, dtype=torch.int64), [0.1], None, 0.9, 1.0, 0.1, 10.0, 1e-12)
    O.layerwise_rates(d, torch.ones(K, dtype=torch.float64), None, [], torch.full((K,), 0.1), 0.9, 0.5, 0.1, 10.0,
                      1e-12, torch.zeros(()))
    O.layerwise_rates(d, torch.ones(K), None, [0.1, 0.2, 0.3], None, 0.9, 0.0, 0.1, 10.0, 1e-12)
    # the steps: both algorithms, every parameter dtype; float64 factors and the skip flag on some
    for k, dtype in enumerate((torch.float32, torch.float64, torch.bfloat16, torch.float16)):
        p, grad = r(5, 7, dtype=dtype), r(5, 7, dtype=dtype)
        factors = torch.ones(1, dtype=torch.float64 if k % 2 else torch.float32)
        flag = [torch.zeros(())] if k >= 2 else []
        O.layerwise_sgd_step([p], [grad], [torch.zeros_like(p)], factors, [0], [], [0], [0.1], [],
                             [0.0], [0.9], [0.0], [False], [False], *flag)
        O.layerwise_adamw_step([p], [grad], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)],
                               [torch.zeros(())], factors, [0], [0], [1e-3], [],
                               [0.01], [0.9], [0.999], [1e-8], [bool(k % 2)], [False], *flag)


def _aligned(constexprs):
    """All tensors of the variant carry a divisibility hint of at least 16 bytes."""
    divs = {k: v for k, v in constexprs.items() if k.endswith("_DIV")}
    aligns = {k: v for k, v in constexprs.items() if k.endswith("_ALIGN")}
    return bool(divs) and all(v >= 16 for v in aligns.values())


def _features(name, constexprs):
    code = [(k, repr(v)) for k, v in constexprs.items() if not k.endswith(TUNING_SUFFIXES)]
    feats = {(name, c) for c in code} | {(name, "aligned", _aligned(constexprs))}
    feats |= {(name, a, b) for a in code if a[0] in DTYPE_CONSTANTS for b in code if b[0] not in DTYPE_CONSTANTS}
    return feats


def select(variants):
    """The fewest variants (greedy set cover, recording order on ties) that compile every feature."""
    feats = [_features(k.fn.__name__, ce) for k, _, ce, _ in variants]
    need = set().union(*feats) if feats else set()
    chosen = []
    while need:
        best = max(range(len(variants)), key=lambda i: (len(feats[i] & need), -i))
        chosen.append(best)
        need -= feats[best]
    return [variants[i] for i in sorted(chosen)]


_APPROX_F32 = re.compile(r"\b(sqrt|div|rcp)\.approx(\.ftz)?\.f32\b|\bdiv\.full(\.ftz)?\.f32\b")


def _compile_all(kernel, sig, constexprs, options, archs, tmpdir):
    """(arch, compiled) for every arch, newest first.  The front end (Python AST -> Triton IR)
    does not depend on the target: the newest arch is compiled from the AST, the others from its
    Triton IR, through the same pipeline otherwise (the only target-dependent step of that first
    stage, lowering tensor descriptors to pointers below sm_90, runs again on the IR)."""
    out, ttir = [], None
    for arch in sorted(archs, reverse=True):
        target = GPUTarget("cuda", arch, 32)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs) if ttir is None else ttir
        compiled = triton.compile(src, target=target, options=dict(options))
        if ttir is None:
            ttir = os.path.join(tmpdir, f"{kernel.fn.__name__}.ttir")
            with open(ttir, "w") as fh:
                fh.write(compiled.asm["ttir"])
        out.append((arch, compiled))
    return out


def main(archs, shard=0, nshards=1):
    import tempfile

    recorded = record_launches()
    variants = select(recorded)
    mine = variants[shard::nshards]
    tmpdir = tempfile.mkdtemp(prefix="lwkd_aot_")
    for kernel, sig, constexprs, options in mine:
        for arch, compiled in _compile_all(kernel, sig, constexprs, options, archs, tmpdir):
            assert len(compiled.asm["cubin"]) > 0
            ptx = compiled.asm["ptx"]
            print(json.dumps({
                "arch": arch, "kernel": kernel.fn.__name__, "aligned": _aligned(constexprs),
                "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[248]\.", ptx)),
                "vector_stores": bool(re.search(r"st\.global(\.\w+)*\.v[248]\.", ptx)),
                "approx_f32": bool(_APPROX_F32.search(ptx)),
                "ieee_sqrt_f32": bool(re.search(r"\bsqrt\.rn\.f32\b", ptx)),
                "ieee_div_f32": bool(re.search(r"\bdiv\.rn\.f32\b", ptx)),
                "constexprs": {k: str(v) for k, v in constexprs.items()},
            }), flush=True)
    print(f"DONE {len(mine)} {len(variants)} {len(recorded)}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    shard, nshards = 0, 1
    if argv[:1] == ["--shard"]:
        shard, nshards = (int(x) for x in argv[1].split("/"))
        argv = argv[2:]
    main([int(a) for a in argv] or [80, 90], shard, nshards)
