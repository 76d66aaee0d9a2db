"""Compile the Triton discrepancy kernels ahead of time for real GPU targets, without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so GPU-only errors (what the
code generator rejects, what LLVM or ptxas cannot lower) are invisible to it.  This script runs
the real host code on CPU tensors with the interpreter OFF, records every launch it would make
(kernel, argument types, compile-time constants) instead of launching, and compiles each distinct
variant to a cubin for the requested targets (Triton's bundled ptxas; no driver needed).

It also reports, per variant, whether the PTX holds 128-bit vector loads (ld.global.v4): the
aligned cases below must get them on their tile kernels (the divisibility hints work), the ragged
ones exercise the masked tails.

Usage: python tests/triton_aot_compile.py 80 90
Output: one JSON object per compiled variant ({"arch", "kernel", "aligned", "vector_loads",
"vector_stores"}), then a line "DONE <number of variants>".
Run by tests/test_triton.py::test_kernels_compile_for_gpu_targets in a subprocess, because the
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

from lwkd_fast.triton import discrepancy as D  # noqa: E402


def record_launches():
    recorded = {}

    def fake_launch(kernel, grid, *args, **constexprs):
        names = kernel.arg_names
        sig = {}
        for name, a in zip(names, args):
            sig[name] = mangle_type(a)
        for name, v in constexprs.items():
            sig[name] = "constexpr"
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())))
        recorded[key] = (kernel, sig, dict(constexprs))

    D._launch = fake_launch
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

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
    return list(recorded.values())


def _aligned(constexprs):
    """All tensors of the variant carry a divisibility hint of at least 16 bytes."""
    divs = {k: v for k, v in constexprs.items() if k.endswith("_DIV")}
    aligns = {k: v for k, v in constexprs.items() if k.endswith("_ALIGN")}
    return bool(divs) and all(v >= 16 for v in aligns.values())


def main(archs):
    variants = record_launches()
    for kernel, sig, constexprs in variants:
        for arch in archs:
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": D.CONFIG.num_warps})
            assert len(compiled.asm["cubin"]) > 0
            ptx = compiled.asm["ptx"]
            print(json.dumps({
                "arch": arch, "kernel": kernel.fn.__name__, "aligned": _aligned(constexprs),
                "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v[248]\.", ptx)),
                "vector_stores": bool(re.search(r"st\.global(\.\w+)*\.v[248]\.", ptx)),
                "constexprs": {k: str(v) for k, v in constexprs.items()},
            }))
    print(f"DONE {len(variants)}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
