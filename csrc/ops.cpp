// Every schema of the `lwkd` operator library, defined once.  Kernels live in csrc/cpu and
// csrc/cuda and only register implementations; fake (meta) kernels and autograd formulas are
// registered from Python in lwkd_fast/registry.py, all of them (named below with set_python_module
// so that torch can point at it when the extension is loaded on its own).
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
  m.set_python_module("lwkd_fast.registry");

  // ---- discrepancies (SPEC sections 1-2) -----------------------------------------------------
  // Attention-map discrepancy of K layer pairs in one call.  Returns the per-sample values
  // (K, B) plus the attention maps (B, N) of every student and teacher layer, which the backward
  // reuses instead of re-reading the teacher features.
  // `masks` (optional, last): one entry per pair, None or a (B, N) 0/1 mask of the valid
  // locations (SPEC section 2, "Masked locations"); the maps returned are never masked.
  m.def(
      "attention_discrepancy(Tensor[] student, Tensor[] teacher, float p, str metric, float beta, "
      "str normalize, float tau, float eps, int channel_dim, Tensor?[]? masks=None) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "attention_discrepancy_backward(Tensor grad, Tensor[] student, Tensor[] maps_s, "
      "Tensor[] maps_t, float p, str metric, float beta, str normalize, float tau, float eps, "
      "int channel_dim, Tensor?[]? masks=None) -> Tensor[]");
  // Discrepancy of per-sample derivative maps (Jacobians, Hessian-vector products), (K, B).
  m.def("map_discrepancy(Tensor[] student, Tensor[] teacher, str metric, float beta, float eps) -> Tensor");
  m.def(
      "map_discrepancy_backward(Tensor grad, Tensor[] student, Tensor[] teacher, str metric, "
      "float beta, float eps) -> Tensor[]");

  // Bytes held by the CPU gradient-buffer pool (csrc/cpu/buffer_pool.h); release=True first
  // drops every idle buffer.
  m.def("cpu_buffer_pool(bool release=False) -> int");

  // ---- optimizer (SPEC sections 4-5) ---------------------------------------------------------
  // The per-layer rate rule.  Updates `state` (the momentum factors m, (K,)) and, when given,
  // the one-element int64 counter `nonfinite` (+1 when any discrepancy is unusable: non-finite
  // or negative) in place; returns eta = base_lr * m (K,) in the dtype of `state`.  The base
  // rate is `base_lr_tensor` (0-dim or (K,), read on the device) when given, else `base_lr` (1
  // or K host values).
  // `found_inf` (optional): a one-element float32 tensor on the same device (apex's
  // device-side skip flag, torch.amp's found_inf).  When it is nonzero nothing is updated (state,
  // reference and the counter keep their values) and the result is eta = base_lr * m with the
  // unchanged m; the flag is read on the device, never on the host.
  // `ref_state` (optional): the (2, K) running reference of normalize "running" (row 0 the moving
  // averages of D, row 1 their accumulated weights; zeros at the start), same dtype as `state`,
  // updated in place with decay `ref_momentum`; absent: normalize "none" (ref_momentum unused).
  m.def(
      "layerwise_rates(Tensor discrepancies, Tensor(a!) state, Tensor(b!)? nonfinite, "
      "float[] base_lr, Tensor? base_lr_tensor, float momentum, float gamma, float s_min, "
      "float s_max, float eps, Tensor? found_inf=None, Tensor(c!)? ref_state=None, "
      "float ref_momentum=0.99) -> Tensor");
  // The fused per-layer optimizer step, one op per algorithm: every tensor of every group in one
  // pass, each reading its rate eta = lr_g * factors[layer_g] (layer -1: the head, eta = lr_g) on
  // the device.  Per group g: group_layer, group_lr (0.0 where group_lr_tensor holds a 0-dim
  // tensor rate; group_lr_tensor may be empty) and one entry of each named hyper-parameter list,
  // meaning what it means for torch.optim.SGD / AdamW.  tensor_group maps each tensor to its group.
  //   layerwise_sgd_step: momentum_buffer empty when no group has momentum; `fresh` lists
  //                       tensors whose buffer starts now (buf = g).
  //   layerwise_adamw_step: max_exp_avg_sq empty when no group uses amsgrad; steps = float32
  //                       step counts, incremented here.
  // Entries of state lists whose group does not use them may be any placeholder tensor.
  // `found_inf` (optional, last): as for layerwise_rates; when it is nonzero the whole step is
  // skipped on the device: no parameter, state tensor or step count changes.
  m.def(
      "layerwise_sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffer, "
      "Tensor factors, int[] tensor_group, int[] fresh, int[] group_layer, float[] group_lr, "
      "Tensor?[] group_lr_tensor, float[] weight_decay, float[] momentum, float[] dampening, "
      "bool[] nesterov, bool[] maximize, Tensor? found_inf=None) -> ()");
  m.def(
      "layerwise_adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor(d!)[] max_exp_avg_sq, Tensor(e!)[] steps, Tensor factors, "
      "int[] tensor_group, int[] group_layer, float[] group_lr, Tensor?[] group_lr_tensor, "
      "float[] weight_decay, float[] beta1, float[] beta2, float[] eps, bool[] amsgrad, "
      "bool[] maximize, Tensor? found_inf=None) -> ()");
  // Instruction set of the CPU step loops: "" queries, "auto" | "default" | "avx2" | "avx512"
  // selects (for tests and benchmarks); returns the one in use.
  m.def("_optim_cpu_isa(str isa) -> str");
}
