#!/usr/bin/env bash
# One-shot GPU verification and benchmark (issue: "The CUDA kernels run in every CI run").
#
# On a machine with an NVIDIA GPU and this package already installed (README command 1; nothing
# new is installed here), in the repository root:
#
#     bash benchmarks/gpu_check.sh            # writes docs/bench-gpu.{txt,json,png}
#
# 1. `lwkd-fast check --device cuda` for every backend (native CUDA kernels, Triton, reference),
#    each against the float64 reference (SPEC section 6 tolerances);
# 2. `lwkd-fast bench --device cuda --quick`: the native CUDA and Triton kernels against eager
#    torch, torch.compile and torch.optim, measured in one run.
# It stops at the first failing check (the benchmark numbers of a backend that computes wrong
# results mean nothing).  Budget: about 3 minutes on one H100/H200-class GPU, 8 at most (the
# overall `timeout` below).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${LWKD_GPU_OUT:-docs}
BUDGET=${LWKD_GPU_BUDGET_S:-480}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device (GPU: $GPU)" >&2; exit 2; }

start=$(date +%s)
deadline=$((start + BUDGET))
left() { echo $((deadline - $(date +%s))); }

txt="$OUT/bench-gpu.txt"
{
  echo "# lwkd_fast GPU check and benchmark"
  echo "# GPU: $GPU"
  echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# $(python -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)')"
  echo "# command: bash benchmarks/gpu_check.sh"
  echo
} > "$txt"

for backend in native triton reference; do
  echo "== lwkd-fast check --device cuda --backend $backend" | tee -a "$txt"
  timeout "$(left)" lwkd-fast check --device cuda --backend "$backend" --quiet \
      --json "$OUT/check-gpu-$backend.json" 2>&1 | tee -a "$txt"
done

echo "== lwkd-fast bench --device cuda --quick" | tee -a "$txt"
timeout "$(left)" lwkd-fast bench --device cuda --quick --json "$OUT/bench-gpu.json" --plot "$OUT/bench-gpu.png" \
    2>&1 | tee -a "$txt"
echo "== gpu_check: done in $(( $(date +%s) - start )) s on $GPU" | tee -a "$txt"
