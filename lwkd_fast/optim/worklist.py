"""The step plan: the flattened work list one fused step hands to its step op
(``layerwise_sgd_step`` / ``layerwise_adamw_step``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .tensors import _is_dense, _is_dtensor, _local

def _group_args(groups: Sequence[Dict[str, Any]]
                ) -> Tuple[List[int], List[float], List[Optional[torch.Tensor]]]:
    """The per-group rate arguments of both step ops: each group's layer (-1 for the head), its base
    rate (a float; 0.0 where it is a tensor) and the tensor rate (or None).  The hyper-parameter
    lists that follow them are the optimizer's (``_hyper_lists``)."""
    group_layer, group_lr, group_lr_tensor = [], [], []
    for group in groups:
        group_layer.append(-1 if group["layer"] is None else int(group["layer"]))
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            group_lr.append(0.0)
            group_lr_tensor.append(lr)
        else:
            group_lr.append(float(lr))
            group_lr_tensor.append(None)
    return group_layer, group_lr, group_lr_tensor


class _WorkList:
    """The tensors one fused step updates (those with a gradient), their state tensors and
    their group indices, as handed to the step op; plus what to record in ``opt.state`` once
    the step has run (SGD momentum buffers created by this step) and which parameters' state
    this work list created (``created``).

    ``owners`` are the parameters themselves, ``params`` what the kernels update: the same
    tensor, or -- resolved again at every step (:meth:`kernel_inputs`) for the indices in
    ``special`` -- a DTensor's local shard, or a dense working copy of a non-dense parameter
    (copied in before the call and out after it).  ``shapes`` / ``dtypes`` are the owners'
    at build time: :meth:`same_params` tells a parameter resized or re-typed since."""

    __slots__ = ("owners", "params", "grads", "s1", "s2", "s3", "steps", "tgroup", "fresh", "pending", "present",
                 "created", "special", "shapes", "dtypes", "plain", "ptrs", "special_ptrs")

    def __init__(self, owners, grads, s1, s2, s3, steps, tgroup, fresh=(), pending=(), created=()):
        # (``params`` / ``grads``: the owners' and their gradients' local tensors, see _local)
        self.owners, self.params, self.grads = owners, [_local(p) for p in owners], [_local(g) for g in grads]
        self.s1, self.s2, self.s3 = s1, s2, s3
        self.steps, self.tgroup = steps, tgroup
        self.fresh, self.pending = list(fresh), list(pending)
        self.created = list(created) + [p for p, _ in self.pending]
        self.present: Optional[List[bool]] = None
        self.special = [i for i, p in enumerate(owners) if _is_dtensor(p) or not _is_dense(p)]
        special = set(self.special)
        self.plain = [p for i, p in enumerate(owners) if i not in special]
        self.shapes = [p.shape for p in owners]
        self.dtypes = [p.dtype for p in owners]
        self.ptrs = [p.data_ptr() for p in self.plain]
        self.special_ptrs = self._special_ptrs()

    def _special_ptrs(self) -> List[int]:
        return [_local(self.owners[i]).data_ptr() for i in self.special]

    def same_params(self) -> bool:
        """No parameter was replaced under the optimizer since the list was built (``p.data =
        ...``, ``model.to(...)``): same shapes and dtypes, same storage addresses (a new
        storage is what a change of device, dtype or memory layout makes)."""
        owners = self.owners
        return ([p.shape for p in owners] == self.shapes and [p.data_ptr() for p in self.plain] == self.ptrs
                and [p.dtype for p in owners] == self.dtypes
                and (not self.special or self._special_ptrs() == self.special_ptrs))

    def kernel_inputs(self, grads):
        """``(params, grads, copies)`` for this step's kernel call; ``copies`` pairs each
        non-dense parameter with the dense working copy to copy back after the call."""
        if not self.special:
            return self.params, grads, ()
        params, grads, copies = list(self.params), list(grads), []
        for i in self.special:
            p = _local(self.owners[i])
            grads[i] = _local(grads[i])
            if not _is_dense(p):
                dense = torch.empty_like(p)  # the layout of the state created for p (zeros_like)
                dense.copy_(p)
                copies.append((p, dense))
                p = dense
            params[i] = p
        return params, grads, copies

    def commit(self, state) -> List[torch.Tensor]:
        """Record the step's new state; returns the parameters whose state it created."""
        if self.pending:
            for p, buf in self.pending:
                state[p]["momentum_buffer"] = buf
            self.pending = []
            self.fresh = []  # from now on these buffers carry momentum
        self.grads = []  # do not keep this step's gradients alive
        created, self.created = self.created, []
        return created
