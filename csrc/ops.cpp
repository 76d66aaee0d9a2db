// Every schema of the `lwkd` operator library, defined once.  Kernels live in csrc/cpu and
// csrc/cuda and only register implementations; fake (meta) kernels and autograd formulas are
// registered from Python in lwkd_fast/ops.py (named below with set_python_module so that torch
// can point at it when the extension is loaded on its own).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lwkd_fast._C` loads this shared object, which runs the TORCH_LIBRARY static
// initialisers below.  The module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lwkd_fast native kernels (registered as torch.ops.lwkd.*)",
      -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lwkd, m) {
  m.set_python_module("lwkd_fast.ops");

  // ---- discrepancies (SPEC sections 1-2) -----------------------------------------------------
  // Attention-map discrepancy of K layer pairs in one call.  Returns the per-sample values
  // (K, B) plus the attention maps (B, N) of every student and teacher layer, which the backward
  // reuses instead of re-reading the teacher features.
  m.def(
      "attention_discrepancy(Tensor[] student, Tensor[] teacher, float p, str metric, float beta, "
      "str normalize, float tau, float eps, int channel_dim) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "attention_discrepancy_backward(Tensor grad, Tensor[] student, Tensor[] maps_s, "
      "Tensor[] maps_t, float p, str metric, float beta, str normalize, float tau, float eps, "
      "int channel_dim) -> Tensor[]");
  // Discrepancy of per-sample derivative maps (Jacobians, Hessian-vector products), (K, B).
  m.def("map_discrepancy(Tensor[] student, Tensor[] teacher, str metric, float beta, float eps) -> Tensor");
  m.def(
      "map_discrepancy_backward(Tensor grad, Tensor[] student, Tensor[] teacher, str metric, "
      "float beta, float eps) -> Tensor[]");

  // Bytes held by the CPU gradient-buffer pool (csrc/cpu/buffer_pool.h); release=True first
  // drops every idle buffer.
  m.def("cpu_buffer_pool(bool release=False) -> int");
}
