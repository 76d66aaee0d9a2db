// CPU execution layer: launch checks.  An emulated launch raises at the launch itself (it runs
// synchronously), so the post-launch check has nothing left to report.
#pragma once

#include <c10/util/Exception.h>

#include "../../cuda_runtime.h"

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr)                                                      \
  do {                                                                            \
    const cudaError_t lwkd_emu_err = (expr);                                      \
    TORCH_CHECK(lwkd_emu_err == cudaSuccess, "lwkd_emu: CUDA call failed: ", #expr); \
  } while (0)
