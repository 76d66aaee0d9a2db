"""The fake (meta) kernels and autograd formulas of every native op, registered once per operator
library that serves the op: ``lwkd`` (lwkd_fast._C), ``lwkd_emu`` (the CUDA execution layer), and
for the attention op also ``lwkd_triton`` (lwkd_fast.triton.attention defines it with the native
schema).  csrc/ops.cpp names this module (``m.set_python_module``) as the home of the fakes, so
that torch can point at it when the extension is loaded on its own.  The schemas are in
csrc/ops.cpp, the kernels in csrc/cpu and csrc/cuda."""

from __future__ import annotations

import torch

from . import ops, reference, rule


def _no_double_backward(ns: str, op: str) -> None:
    """Differentiating ``ns::op`` (a backward op) raises."""
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"lwkd_fast: differentiating {ns}::{op} (double backward through a discrepancy kernel) "
            "is not supported; run that computation under lwkd_fast.use_backend('reference')"
        )

    torch.library.register_autograd(f"{ns}::{op}", backward, setup_context=setup)


def _masks_grad(ctx) -> tuple:
    """The attention backward's masks slot mirrors how torch flattened the input: no slot when the
    call omitted the argument; a list holding any None is one leaf, a list of tensors only a list."""
    if not ctx.has_masks_arg:
        return ()
    whole = ctx.masks is None or any(m is None for m in ctx.masks)
    return (None if whole else [None] * len(ctx.masks),)


def register_attention_ops(ns: str) -> None:
    """Fake kernels and autograd of ``ns::attention_discrepancy`` (and its backward) in one library
    of the native schema: the native ones, and lwkd_fast.triton.attention's (``lwkd_triton``)."""
    lib = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::attention_discrepancy")
    def _attention_fake(student, teacher, p, metric, beta, normalize, tau, eps, channel_dim, masks=None):
        dt = reference.acc_dtype(*student, *teacher)
        B = student[0].shape[0]
        d = student[0].new_empty((len(student), B), dtype=dt)
        maps_s = [x.new_empty((B, reference.bcn_locations(x, channel_dim)), dtype=dt) for x in student]
        maps_t = [x.new_empty((B, reference.bcn_locations(x, channel_dim)), dtype=dt) for x in teacher]
        return d, maps_s, maps_t

    @torch.library.register_fake(f"{ns}::attention_discrepancy_backward")
    def _attention_bwd_fake(grad, student, maps_s, maps_t, p, metric, beta, normalize, tau, eps, channel_dim,
                            masks=None):
        return [torch.empty_like(x) for x in student]

    def _attention_setup(ctx, inputs, output):
        student, _teacher, p, metric, beta, normalize, tau, eps, channel_dim, *masks = inputs
        _d, maps_s, maps_t = output
        ctx.mark_non_differentiable(*maps_s, *maps_t)  # kept for the backward only
        ctx.K = len(student)
        ctx.args = (p, metric, beta, normalize, tau, eps, channel_dim)
        ctx.masks = masks[0] if masks else None  # constants (no gradient)
        ctx.has_masks_arg = bool(masks)  # the call passed the optional argument
        ctx.save_for_backward(*student, *maps_s, *maps_t)

    def _attention_backward(ctx, grad_d, _grad_maps_s, _grad_maps_t):
        K = ctx.K
        saved = ctx.saved_tensors
        student, maps_s, maps_t = saved[:K], saved[K : 2 * K], saved[2 * K :]
        if grad_d is None:
            grads = [None] * K
        else:
            grads = lib.attention_discrepancy_backward(grad_d, student, maps_s, maps_t, *ctx.args, ctx.masks)
        return (list(grads), [None] * K, None, None, None, None, None, None, None) + _masks_grad(ctx)

    torch.library.register_autograd(
        f"{ns}::attention_discrepancy", _attention_backward, setup_context=_attention_setup
    )
    _no_double_backward(ns, "attention_discrepancy_backward")


def register_map_ops(ns: str) -> None:
    """Fake kernels and autograd of the native ``ns::map_discrepancy`` (lwkd_triton's map op has
    its own schema, fake and autograd: its backward reuses the forward's row statistics)."""
    lib = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::map_discrepancy")
    def _map_fake(student, teacher, metric, beta, eps):
        dt = reference.acc_dtype(*student, *teacher)
        return student[0].new_empty((len(student), student[0].shape[0]), dtype=dt)

    @torch.library.register_fake(f"{ns}::map_discrepancy_backward")
    def _map_bwd_fake(grad, student, teacher, metric, beta, eps):
        return [torch.empty_like(x) for x in student]

    def _map_setup(ctx, inputs, output):
        student, teacher, metric, beta, eps = inputs
        ctx.K = len(student)
        ctx.args = (metric, beta, eps)
        ctx.save_for_backward(*student, *teacher)

    def _map_backward(ctx, grad_d):
        K = ctx.K
        saved = ctx.saved_tensors
        grads = lib.map_discrepancy_backward(grad_d, saved[:K], saved[K:], *ctx.args)
        return list(grads), [None] * K, None, None, None

    torch.library.register_autograd(f"{ns}::map_discrepancy", _map_backward, setup_context=_map_setup)
    _no_double_backward(ns, "map_discrepancy_backward")


def register_rates_op(ns: str) -> None:
    """Fake kernel of ``ns::layerwise_rates`` (no autograd: the rule runs under no_grad)."""
    @torch.library.register_fake(f"{ns}::layerwise_rates")
    def _rates_fake(discrepancies, state, nonfinite, base_lr, base_lr_tensor, momentum, gamma, s_min,
                    s_max, eps, found_inf=None, ref_state=None, ref_momentum=rule.DEFAULT_REF_MOMENTUM):
        return torch.empty_like(state, memory_format=torch.contiguous_format)


def register_step_ops(ns: str) -> None:
    """Fake kernels of ``ns::layerwise_sgd_step`` / ``ns::layerwise_adamw_step`` (they update
    their tensor lists in place and return nothing)."""
    @torch.library.register_fake(f"{ns}::layerwise_sgd_step")
    def _sgd_step_fake(params, grads, momentum_buffer, factors, tensor_group, fresh, group_layer, group_lr,
                       group_lr_tensor, weight_decay, momentum, dampening, nesterov, maximize, found_inf=None):
        return None

    @torch.library.register_fake(f"{ns}::layerwise_adamw_step")
    def _adamw_step_fake(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, steps, factors, tensor_group,
                         group_layer, group_lr, group_lr_tensor, weight_decay, beta1, beta2, eps, amsgrad,
                         maximize, found_inf=None):
        return None


def register_native(ns: str) -> None:
    """Everything torch needs beside the kernels, for every op of one native library."""
    register_attention_ops(ns)
    register_map_ops(ns)
    register_rates_op(ns)
    register_step_ops(ns)


ops.on_native_namespace(register_native)
