"""Compile every variant of the Triton rate-rule kernel that the host code launches for a real GPU
target (sm_80) with Triton's compiler; the interpreter that runs it in the tests never does.

Run by tests/test_rule.py::test_triton_rates_kernel_compiles_for_gpu in a subprocess, because
the interpreter must be off (TRITON_INTERPRET is read when triton is imported).  Records the
launches of lwkd_fast.triton.optim.layerwise_rates on CPU tensors instead of running them.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from lwkd_fast.triton import optim as O  # noqa: E402


def main(arch: int) -> None:
    kernel = O._rates_kernel
    recorded = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                sig = {n: mangle_type(a) for n, a in zip(kernel.arg_names, args)}
                sig.update({k: "constexpr" for k in constexprs})
                recorded[tuple(sorted(constexprs.items()))] = (sig, constexprs)
            return launch

    O._rates_kernel = Recorder()
    for sdtype, running, flag, gamma in ((torch.float32, False, None, 1.0), (torch.float32, True, torch.zeros(()), 1.5),
                                        (torch.float64, True, None, 0.0), (torch.float64, False, torch.zeros(()), 2.0)):
        ref = torch.zeros(2, 5, dtype=sdtype) if running else None
        O.layerwise_rates(torch.rand(5), torch.ones(5, dtype=sdtype), torch.zeros((), dtype=torch.int64), [0.1], None,
                          0.9, gamma, 0.1, 10.0, 1e-12, flag, ref, 0.9)
    for sig, constexprs in recorded.values():
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32))
        assert len(compiled.asm["cubin"]) > 0
    print(f"DONE {len(recorded)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
