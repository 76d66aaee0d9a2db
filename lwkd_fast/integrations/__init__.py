"""Adapters that drop the layer discrepancies and the layer-wise optimizer into existing KD code.

* :mod:`lwkd_fast.integrations.torchdistill` -- a registered mid-level loss
  (``LayerwiseDiscrepancyLoss``), a high-level loss that also reports the total loss
  (``LayerwiseWeightedSumLoss``) and registered optimizer builders (``LayerwiseSGD``,
  ``LayerwiseAdamW``) for torchdistill's config-driven ``DistillationBox``.
* :mod:`lwkd_fast.integrations.mdistiller` -- ``LWKD``, a ``Distiller`` subclass for mdistiller's
  trainer (``forward_train(image, target) -> (logits, losses_dict)``), and ``register()``, the one
  line ``tools/train.py`` needs (distiller, trainer and ``CFG.LWKD`` node).
* :mod:`lwkd_fast.integrations.repdistiller` -- ``LayerwiseAttention``, a RepDistiller-style
  criterion ``forward(g_s, g_t) -> [loss per layer]`` backed by one fused op, and
  ``feature_layers`` (the modules behind ``feat_s[1:-1]``).
* :mod:`lwkd_fast.integrations.transformers` -- hidden-state and attention-probability pairings
  of Hugging Face models (``hidden_state_pairs``, ``attention_pairs``) for ``LayerwiseDistiller``.

Each submodule's docstring gives the recipe for that framework's own entry point (the README
quotes it verbatim); in each, the default replaces the framework's AT loss like for like.

Each submodule imports its framework only when it is imported itself; ``import lwkd_fast`` and
``import lwkd_fast.integrations`` need none of them.

The optimizer contract every adapter follows
    An adapter that computes discrepancies is a *discrepancy source*: after each forward it sets
    ``latest_discrepancies`` (the detached (K,) tensor D) and ``found_inf`` (a 0-dim float device
    tensor, nonzero when the loss it knows is not finite, or None when it does not know the loss).
    ``opt.attach(source)`` makes a plain ``opt.step()`` -- what every framework's trainer calls --
    read D (and the skip flag) from the source, on the device, without a host synchronisation.
    ``source.observe_loss(total_loss)`` lets a training loop report the loss it actually
    backpropagates, so a non-finite total (not only a non-finite matching term) skips the step.

Parameter groups come from :func:`layerwise_param_groups` (SPEC section 4: forward-execution order
of one pass, computed by :func:`lwkd_fast.distill.execution_order_groups`), and
:func:`make_layerwise_optimizer` builds ``LayerwiseSGD`` / ``LayerwiseAdamW`` over them and attaches
a source; :func:`producing_modules` finds the modules that produce a model's returned features.
None of them needs any KD framework.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["DiscrepancySource", "layerwise_param_groups", "make_layerwise_optimizer", "producing_modules",
           "unwrap_model"]


class DiscrepancySource:
    """Mixin for objects the layer-wise optimizer can ``attach`` to.

    ``latest_discrepancies``: the (K,) discrepancies of the latest forward (detached), or None
    before the first one.  ``found_inf``: 0-dim float tensor on D's device, nonzero when the loss
    the adapter knows was not finite (the optimizer then skips the update on the device), or None.
    """

    latest_discrepancies: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None

    def _publish(self, discrepancies: torch.Tensor, loss: Optional[torch.Tensor]) -> None:
        self.latest_discrepancies = discrepancies.detach()
        self.found_inf = None if loss is None else (~torch.isfinite(loss.detach())).to(torch.float32).reshape(())

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Report the total loss of this step (the one that is backpropagated): ``found_inf``
        becomes ``(~isfinite(loss)).float()``, so the attached optimizer skips the update when the
        whole loss -- not only this adapter's term -- is not finite.  No host synchronisation."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.observe_loss: expected the loss tensor, got {type(loss).__name__}")
        self.found_inf = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` wrappers (names of its
    sub-modules are then the ones the user writes in configs)."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def producing_modules(op: str, model: nn.Module, run: Callable[[nn.Module], Any],
                      pick: Callable[[Any], Sequence[Tuple[str, torch.Tensor]]],
                      hint: str = "pass the module names explicitly") -> List[str]:
    """Names of the sub-modules of ``model`` whose outputs are the tensors ``pick(run(model))``
    (a list of ``(label, tensor)``), found by tensor identity on one forward pass in eval mode
    without gradients (every training flag restored).  A tensor several modules return (a stage
    container and its last block) maps to the one that finishes last, the stage; tuple outputs
    count element by element.  Raises ValueError naming the label when no module returned it."""
    from ..distill import _temporarily_eval

    produced: Dict[int, Any] = {}
    handles = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor):
                    produced[id(t)] = (name, t)  # keeps t alive, so ids stay unique during the pass

        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), _temporarily_eval(model):
            picked = pick(run(model))
    finally:
        for h in handles:
            h.remove()
    names = []
    for label, t in picked:
        hit = produced.get(id(t))
        if hit is None or hit[1] is not t:
            raise ValueError(
                f"{op}: {label} (shape {tuple(t.shape)}) is not the output of any sub-module of "
                f"{type(model).__name__}; {hint}"
            )
        names.append(hit[0])
    return names


def _check_layers(op: str, student: nn.Module, layers: Sequence[str]) -> List[str]:
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{op}: layers must be a non-empty list of the matched student module names "
                         f"(in the order of the discrepancies), got {layers!r}")
    modules = dict(student.named_modules())
    out = []
    for j, name in enumerate(layers):
        if not isinstance(name, str) or name not in modules or not name:
            cands = [n for n in modules if n]
            shown = ", ".join(cands[:40]) + (" ..." if len(cands) > 40 else "")
            raise ValueError(f"{op}: layers[{j}] = {name!r} is not a sub-module of the student; available: {shown}")
        out.append(name)
    return out


def layerwise_param_groups(student: nn.Module, layers: Sequence[str], example_input: torch.Tensor, *,
                           requires_grad_only: bool = True, op: str = "layerwise_param_groups") -> List[Dict[str, Any]]:
    """SPEC section 4 parameter groups of ``student`` for K matched student modules ``layers``.

    Returns ``[{"params": [...], "layer": j}, ..., {"params": [...], "layer": None}]`` (empty groups
    omitted; ``None`` is the head group, factor 1).  One forward pass of ``example_input`` in eval
    mode without gradients finds the execution order; the model's state is not changed.  With
    ``requires_grad_only`` parameters that do not require a gradient (frozen modules) are left out,
    as torch.optim users filter them.
    """
    from ..distill import execution_order_groups

    student = unwrap_model(student)
    names = _check_layers(op, student, layers)
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"{op}: example_input must be a tensor batch the student accepts, got "
                        f"{type(example_input).__name__}")
    idx_groups = execution_order_groups(student, names, example_input, op=op, stacklevel=3)
    params = list(student.parameters())
    K = len(names)
    out = []
    for j, idx in enumerate(idx_groups):
        ps = [params[i] for i in idx if params[i].requires_grad or not requires_grad_only]
        if ps:
            out.append({"params": ps, "layer": j if j < K else None})
    if not out:
        raise ValueError(f"{op}: the student has no parameter that requires a gradient")
    return out


def make_layerwise_optimizer(kind: str, student: nn.Module, layers: Sequence[str], example_input: torch.Tensor,
                             lr: Union[float, torch.Tensor], *, source: Any = None,
                             extra_params: Optional[Iterable[torch.Tensor]] = None,
                             requires_grad_only: bool = True, **kwargs) -> torch.optim.Optimizer:
    """``LayerwiseSGD`` (``kind="sgd"``) or ``LayerwiseAdamW`` (``"adamw"``) over
    :func:`layerwise_param_groups`, attached to ``source`` (any discrepancy source: an adapter
    of this package, or an object with ``latest_discrepancies`` / ``found_inf``) so that a plain
    ``opt.step()`` uses its latest D.  ``extra_params`` (e.g. connector or regressor modules a
    KD method adds) form one more head group with factor 1.  Other keyword arguments go to the
    optimizer (``momentum``, ``weight_decay``, ``rate_momentum``, ``gamma``, ``sync``, ...)."""
    from .. import optim

    kinds = {"sgd": optim.LayerwiseSGD, "adamw": optim.LayerwiseAdamW}
    if kind not in kinds:
        raise ValueError(f"make_layerwise_optimizer: unknown kind {kind!r}; expected 'sgd' or 'adamw'")
    groups = layerwise_param_groups(student, layers, example_input, requires_grad_only=requires_grad_only,
                                    op="make_layerwise_optimizer")
    if extra_params is not None:
        extra = [p for p in extra_params if p.requires_grad or not requires_grad_only]
        seen = {id(p) for g in groups for p in g["params"]}
        extra = [p for p in extra if id(p) not in seen]
        if extra:
            groups.append({"params": extra, "layer": None})
    opt = kinds[kind](groups, lr, num_layers=len(layers), **kwargs)
    if source is not None:
        opt.attach(source)
    return opt
